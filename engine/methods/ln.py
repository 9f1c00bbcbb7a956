"""``ln``: train every LayerNorm weight and bias of a tower (or both)."""
from __future__ import annotations

from dataclasses import dataclass

from leanclip.methods._options import Tower, tower_option
from leanclip.registry import MethodTraits, register_method
from leanclip.select import check_coverage, check_tower, layernorm_names, unlock_layernorms


def _check_ln(model, tower="both", **_):
    return check_coverage(model, "ln", layernorm_names(model, check_tower(tower)), tower, "LayerNorms")


@dataclass(frozen=True)
class LnOptions:
    tower: Tower = tower_option("whose LayerNorms train")


@register_method("ln", check=_check_ln, traits=MethodTraits(mergeable=True), options=LnOptions)
def _ln(model, tower="both"):
    """Every LayerNorm weight+bias (ln_pre, ln_1, ln_2, ln_post, ln_final) of ``tower``."""
    unlock_layernorms(model, check_tower(tower))
    return {}
