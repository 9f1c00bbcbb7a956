"""Multi-process (DistributedDataParallel) helpers for contrastive training.

    torchrun --nproc_per_node=4 -m leanclip train --task contrastive --method lilt-ln --pairs coco.json ...

``init_distributed()`` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``) and joins the process group (NCCL on GPUs, gloo on CPU); without those variables it is a no-op
(world size 1). ``wrap_ddp`` puts a module under ``DistributedDataParallel``: DDP only buckets and all-reduces
parameters that require grad, so with a PEFT method only the trainable parameters travel. Rank 0 logs and writes checkpoints; ``barrier()`` keeps the others in step.

Bad input under torchrun: every rank checks its inputs, and ``inputs_checked`` makes them stop together. A rank that
gave up on its own (rank 0 alone checks the run folder) would leave the others waiting in their next collective until
the connection dropped, each ending in a traceback instead of the one-line error.
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from leanclip.utils import resolve_device

__all__ = ["DistInfo", "init_distributed", "cleanup", "is_distributed", "get_rank", "get_world_size", "is_main",
           "barrier", "all_reduce_mean", "check_batch_size", "wrap_ddp", "find_free_port",
           "current", "inputs_checked"]

_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False
    inputs_agreed: bool = False  # this rank passed the last inputs_checked (or stopped at one)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return get_rank() == 0


def _env_int(key: str, default: int) -> int:
    v = os.environ.get(key)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"environment variable {key}={v!r} is not an integer") from None


def current(device: torch.device | None = None) -> DistInfo:
    """The state of an already initialised process group (or world size 1)."""
    if dist.is_available() and dist.is_initialized():
        dev = device if device is not None else torch.device("cpu")
        return DistInfo(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0), dist.get_backend(), dev)
    return DistInfo(device=device if device is not None else torch.device("cpu"))


def init_distributed(device: str | torch.device = "auto", backend: str | None = None,
                     timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group described by torchrun's environment variables; world size 1 without them.

    ``device``: ``auto`` (CUDA when visible), ``cpu`` or ``cuda``; on CUDA each process uses GPU ``LOCAL_RANK``.
    ``backend``: default ``nccl`` for CUDA, ``gloo`` for CPU. Returns a ``DistInfo``; call ``cleanup(info)`` at the
    end (it destroys the group only when this call created it)."""
    dev = resolve_device(device)
    world = _env_int("WORLD_SIZE", 1)
    if world < 1:
        raise ValueError(f"WORLD_SIZE must be >= 1, got {world}")
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if dev.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s) are visible")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend(), dev, False)
    if world == 1:
        return DistInfo(0, 1, 0, None, dev, False)
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this build of torch")
    if backend is None:
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and dev.type != "cuda":
        raise ValueError("backend 'nccl' needs CUDA devices (use gloo on CPU)")
    kw = {"device_id": dev} if backend == "nccl" else {}
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s), **kw)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, backend, dev, True)


def cleanup(info: DistInfo | None = None) -> None:
    """Destroy the process group if ``init_distributed`` created it."""
    if info is not None and info.initialized_here and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def inputs_checked(info: DistInfo, *, final: bool = False, error: BaseException | None = None,
                   describe: Callable[[BaseException], str] = str) -> None:
    """A point of a torchrun run where the ranks agree that their inputs are good, before work a refusal must not
    follow (building the model, the run folder's first write). Every rank reaches the same points in the same order:
    a rank calls it there with ``error=None``, or from the handler of the user error that stopped it before the next
    point (``error``); the last point passes ``final=True``. Each call is one collective (all_gather of every rank's
    message or None). When any rank failed, every rank raises: the first failing one its own error, the others a
    ValueError with that error's message as ``describe`` words it, so each prints the same line. A no-op outside
    torchrun and after the last point (a failure in training is not an input's)."""
    if not info.distributed or info.inputs_agreed:
        return
    info.inputs_agreed = final or error is not None
    messages = [None] * info.world_size
    dist.all_gather_object(messages, None if error is None else describe(error))
    first = next((rank for rank, m in enumerate(messages) if m is not None), None)
    if first is None:
        return
    info.inputs_agreed = True  # every rank stops here: no further point to meet at
    if first == info.rank:
        raise error
    raise ValueError(messages[first])


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over all ranks (a copy; ``t`` itself is unchanged). Identity on one process."""
    if not is_distributed():
        return t.detach().clone()
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def check_batch_size(batch_size, world_size: int) -> int:
    """The per-process batch size for a GLOBAL ``batch_size``; ValueError naming batch_size when it does not split
    evenly over ``world_size`` processes."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if batch_size % world_size:
        raise ValueError(f"batch_size={batch_size} (the global batch) is not divisible by the world size "
                         f"{world_size}: every process needs the same number of pairs")
    return batch_size // world_size


def wrap_ddp(module: torch.nn.Module, device: torch.device, *, find_unused_parameters: bool = False):
    """``DistributedDataParallel(module)`` when distributed (only ``requires_grad`` parameters are reduced; buffers
    are not re-broadcast each step), else ``module`` itself."""
    if not is_distributed():
        return module
    if not any(p.requires_grad for p in module.parameters()):
        raise ValueError("the model has no trainable parameters to synchronise")
    kw = {"device_ids": [device.index]} if device.type == "cuda" else {}
    return DDP(module, broadcast_buffers=False, find_unused_parameters=find_unused_parameters,
               gradient_as_bucket_view=True, **kw)


def find_free_port() -> int:
    """A TCP port free on localhost right now (for MASTER_PORT in tests / single-node launches)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
