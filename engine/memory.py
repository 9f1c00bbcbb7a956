"""Memory accounting shared by tests, benchmarks and the CLI.

``saved_activation_bytes(fn)`` counts the bytes autograd keeps for backward while ``fn()`` runs (device-independent,
works on CPU): every tensor packed by ``torch.autograd.graph.saved_tensors_hooks`` - which includes the inputs that
non-reentrant ``torch.utils.checkpoint`` keeps and, with ``respect_saved_tensors_hooks=True`` (what leanclip.lean
passes), the outputs a selective-checkpoint policy caches - deduplicated by untyped storage (a storage is counted
once, whole, however many views of it are saved) and excluding parameter and buffer storages (a stride-0 expanded
view of a weight would otherwise count as gigabytes). If ``checkpoint`` has no ``respect_saved_tensors_hooks``
(torch 2.11), the counter cannot see the SAC cache, so ``mlp+qkv`` is undercounted by its cached attention outputs.
``peak_cuda_bytes(fn)`` reports the CUDA allocator's peak.
"""
from __future__ import annotations

import gc
import warnings
from typing import Callable, Iterable

import torch
from torch import nn


def _storage_key(t: torch.Tensor):
    st = t.untyped_storage()
    return (t.device.type, t.device.index, st.data_ptr())


def _model_storage_keys(exclude) -> set:
    """Storage keys of the parameters and buffers to exclude: of ``exclude`` (module(s) / tensor(s)), or of every
    live ``nn.Module`` and ``nn.Parameter`` when ``exclude`` is None."""
    keys = set()
    if exclude is None:
        with warnings.catch_warnings():  # isinstance() on some lazily-deprecated objects warns
            warnings.simplefilter("ignore")
            objs = gc.get_objects()
            modules = [o for o in objs if isinstance(o, nn.Module)]
            tensors = [o for o in objs if isinstance(o, nn.Parameter)]
    else:
        items = exclude if isinstance(exclude, (list, tuple, set)) else [exclude]
        modules = [sub for o in items if isinstance(o, nn.Module) for sub in o.modules()]
        tensors = [o for o in items if isinstance(o, torch.Tensor)]
        bad = [type(o).__name__ for o in items if not isinstance(o, (nn.Module, torch.Tensor))]
        if bad:
            raise TypeError(f"exclude must hold nn.Module or torch.Tensor objects, got {bad}")
    for m in modules:
        for t in m.parameters(recurse=False):
            tensors.append(t)
        for t in m.buffers(recurse=False):
            if t is not None:
                tensors.append(t)
    for t in tensors:
        if t is not None and t.device.type != "meta":
            keys.add(_storage_key(t))
    return keys


def saved_activation_bytes(fn: Callable[[], object], *, exclude: nn.Module | Iterable | None = None):
    """Run ``fn()`` and return ``(result, bytes)``: the bytes of distinct tensor storages saved for backward during
    the call, parameters/buffers excluded (those of ``exclude``, or of every live nn.Module / nn.Parameter when
    None).

    Only the forward needs to run inside ``fn``; the count is what the backward would have to keep alive."""
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    skip = _model_storage_keys(exclude)
    seen: dict = {}

    def pack(t: torch.Tensor):
        if isinstance(t, nn.Parameter):
            return t
        try:
            key = _storage_key(t)
        except (RuntimeError, NotImplementedError):  # tensor subclasses without a storage
            return t
        if key not in skip and key not in seen:
            seen[key] = t.untyped_storage().nbytes()
        return t

    def unpack(t):
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        result = fn()
    return result, int(sum(seen.values()))


def peak_cuda_bytes(fn: Callable[[], object], device: torch.device | int | str | None = None):
    """Run ``fn()`` on CUDA and return ``(result, peak_bytes)``: ``torch.cuda.max_memory_allocated`` after
    ``reset_peak_memory_stats`` (absolute: includes weights and everything already allocated)."""
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if not torch.cuda.is_available():
        raise RuntimeError("peak_cuda_bytes needs a CUDA device (torch.cuda.is_available() is False)")
    dev = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"device must be a CUDA device, got {dev}")
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    result = fn()
    torch.cuda.synchronize(dev)
    return result, int(torch.cuda.max_memory_allocated(dev))
