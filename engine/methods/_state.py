"""The model state ``prepare`` may change, recorded so that an error midway restores it exactly, and the small
steps that change it (dropping what an earlier ``prepare`` added, casting frozen weights); plus the JSON form of the
options ``prepare`` records in ``model.leanclip_info`` (checkpoint metadata)."""
from __future__ import annotations

import copy
from typing import Iterable

import torch
from torch import nn

from leanclip.select import tower_of


class ModelState:
    """What ``prepare`` may change, recorded so that a failure midway puts the model back exactly: per module its
    class (lean swaps), attribute dict (``leanclip_info``, recompute policy, hook handles) and the contents of its
    dict/set attributes (parameters, buffers, submodules - added or removed ones -, hooks); per parameter its tensor
    (a ``frozen_dtype`` cast replaces ``.data``) and ``requires_grad``; copies of the values ``init_from``
    overwrites in place; the attributes of the modules' ``config`` objects (``transformers`` keeps a tower's layer
    count there, which ``lilt-deep`` changes). Only the init_from values are copied: the rest is references (no
    second model in memory)."""

    def __init__(self, model: nn.Module, overwritten: Iterable[str] = ()):
        self.modules = [(m, type(m), dict(m.__dict__),
                         {k: copy.copy(v) for k, v in m.__dict__.items() if isinstance(v, (dict, set))})
                        for m in model.modules()]
        configs = {id(c): c for m in model.modules() if hasattr(c := m.__dict__.get("config"), "__dict__")}
        self.configs = [(c, dict(c.__dict__)) for c in configs.values()]
        self.params = [(p, p.data, p.requires_grad) for p in model.parameters()]
        self.values = [(p, p.detach().clone()) for p in map(model.get_parameter, overwritten)]

    def restore(self) -> None:
        for m, cls, attrs, containers in self.modules:
            m.__class__ = cls
            m.__dict__.clear()
            m.__dict__.update(attrs)
            for k, saved in containers.items():
                attrs[k].clear()
                attrs[k].update(saved)
        for c, attrs in self.configs:
            c.__dict__.clear()
            c.__dict__.update(attrs)
        for p, data, flag in self.params:
            p.data = data
            p.requires_grad_(flag)
        with torch.no_grad():
            for p, v in self.values:
                p.copy_(v)


def jsonable(v):
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    return f"<{type(v).__name__}>"


def remove_added(model: nn.Module) -> None:
    info = getattr(model, "leanclip_info", None) or {}
    for name in info.get("modules", []):
        if name in model._modules:
            del model._modules[name]


def cast_frozen(model: nn.Module, dtype: torch.dtype) -> None:
    for name, p in model.named_parameters():
        if not p.requires_grad and p.is_floating_point() and tower_of(name) is not None and p.dtype != dtype:
            p.data = p.data.to(dtype)
