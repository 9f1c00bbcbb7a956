"""``bitfit``: train every bias of a tower (or both), ``attn.in_proj_bias`` and the LayerNorm biases included."""
from __future__ import annotations

from dataclasses import dataclass

from leanclip.methods._options import Tower, tower_option
from leanclip.registry import MethodTraits, register_method
from leanclip.select import BIAS_RE, check_coverage, check_tower, names_matching, unlock


def _check_bitfit(model, tower="both", **_):
    return check_coverage(model, "bitfit", names_matching(model, BIAS_RE, check_tower(tower)), tower, "biases")


@dataclass(frozen=True)
class BitfitOptions:
    tower: Tower = tower_option("whose biases train")


@register_method("bitfit", check=_check_bitfit, traits=MethodTraits(mergeable=True), options=BitfitOptions)
def _bitfit(model, tower="both"):
    """Every bias of ``tower``, incl. ``attn.in_proj_bias`` and the LayerNorm biases."""
    unlock(model, BIAS_RE, check_tower(tower))
    return {}
