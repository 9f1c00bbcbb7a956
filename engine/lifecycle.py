"""Removing what a method added to a model: one ``strip`` for every method that inserts modules.

    LILT = Added(owns=lambda m: isinstance(m, Adapter) or getattr(m, "leanclip_lilt_deep", False),
                 hooks={_adapter_pre_hook: lambda m: isinstance(m, Adapter)})
    strip(model, LILT)

A method that inserts modules into the towers (LilT's adapters and appended blocks, LoRA pairs, Houlsby / Compacter
adapters) declares them once as an ``Added``: which child modules are its own (``owns``) and which forward pre-hooks
run them (``hooks``: forward pre-hook or forward hook function -> the children that keep it registered). ``strip``
then removes every owned child, also from a ``ModuleList`` or ``Sequential`` (renumbered in place), and unregisters
each hook from a module that no longer holds a child it runs. Hooks are found by function identity, not by a
handle, so a ``copy.deepcopy`` of a prepared model strips the same way. Re-preparing a method strips its own earlier
modules first; other methods' modules stay.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

from torch import nn

__all__ = ["Added", "strip"]


@dataclass(frozen=True)
class Added:
    """What a method adds: ``owns(child)`` picks its modules; ``hooks`` maps each forward pre-hook function it
    registers to the test of the children that hook runs (the hook stays while the module holds one); ``after``,
    called with the model once its modules are gone, puts back what counted them (a config's layer count)."""
    owns: Callable[[nn.Module], bool]
    hooks: Mapping[Callable, Callable[[nn.Module], bool]] = field(default_factory=dict)
    after: Callable[[nn.Module], None] | None = None


def strip(model: nn.Module, added: Added) -> nn.Module:
    """Remove every module ``added`` owns from ``model`` (not ``model`` itself) and the hooks left without a module
    to run. Returns ``model``."""
    for m in list(model.modules()):
        owned = [name for name, child in m._modules.items() if child is not None and added.owns(child)]
        if isinstance(m, (nn.ModuleList, nn.Sequential)) and owned:
            kept = [child for name, child in m._modules.items() if name not in owned]
            m._modules.clear()
            for i, child in enumerate(kept):
                m._modules[str(i)] = child
        else:
            for name in owned:
                del m._modules[name]
        for fn, runs in added.hooks.items():
            if not any(c is not None and runs(c) for c in m._modules.values()):
                for hooks in (m._forward_pre_hooks, m._forward_hooks):
                    for k, hook in list(hooks.items()):
                        if hook is fn:
                            del hooks[k]
    if added.after is not None:
        added.after(model)
    return model
