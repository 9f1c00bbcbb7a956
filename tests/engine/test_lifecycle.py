"""``leanclip.lifecycle.strip``: owned children go (ModuleList entries renumbered in place), a hook stays while its
module still holds a child it runs, and a deep copy strips the same way (hooks are matched by function)."""
import copy

import torch
from torch import nn

from leanclip.lifecycle import Added, strip


class Mine(nn.Identity):
    pass


class Theirs(nn.Identity):
    pass


def _hook(module, args):
    return args


def _model():
    m = nn.Sequential(nn.Linear(2, 2), nn.ModuleList([nn.Linear(2, 2), Mine(), nn.Linear(2, 2)]))
    m[0].add_module("a", Mine())
    m[0].register_forward_pre_hook(_hook)
    return m


MINE = Added(owns=lambda c: isinstance(c, Mine), hooks={_hook: lambda c: isinstance(c, (Mine, Theirs))})


def test_strip_removes_owned_modules_and_idle_hooks():
    for m in (_model(), copy.deepcopy(_model())):
        kept = m[1][2]
        assert strip(m, MINE) is m
        assert not any(isinstance(c, Mine) for c in m.modules())
        assert list(m[1]._modules) == ["0", "1"] and m[1][1] is kept
        assert not m[0]._forward_pre_hooks
        m[0](torch.zeros(1, 2))


def test_a_hook_stays_while_another_child_needs_it():
    m = _model()
    m[0].add_module("b", Theirs())
    strip(m, MINE)
    assert "a" not in m[0]._modules and "b" in m[0]._modules
    assert list(m[0]._forward_pre_hooks.values()) == [_hook]
