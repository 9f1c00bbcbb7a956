"""``clipfit`` (CLIPFit): train the text tower's MLP output biases and the image tower's LayerNorms, with the
paper's two regularisers as loss terms: distillation to the zero-shot class text features and an L2 pull towards
the starting values."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from leanclip import utils
from leanclip.features import clipfit_kd_loss, frozen_text_features
from leanclip.options import OptionRange, option, recorded_option
from leanclip.registry import MethodTraits, register_method
from leanclip.select import CLIPFIT_TEXT_RE, layernorm_names, names_matching, tower_class, unlock, unlock_layernorms


def _check_clipfit(model, text_bias=True, image_ln=True, l2_reg=0.0, **_):
    for name, v in (("text_bias", text_bias), ("image_ln", image_ln)):
        if not isinstance(v, bool):
            raise ValueError(f"method 'clipfit': {name} must be true or false, got {v!r}")
    if not (text_bias or image_ln):
        raise ValueError("method 'clipfit': text_bias=false and image_ln=false leave nothing to train")
    if isinstance(l2_reg, bool) or not isinstance(l2_reg, (int, float)) or not 0 <= l2_reg < float("inf"):
        raise ValueError(f"method 'clipfit': l2_reg must be a finite number >= 0, got {l2_reg!r}")
    if image_ln and not layernorm_names(model, "image"):
        raise ValueError(f"method 'clipfit' trains the image tower's LayerNorms, and the image tower "
                         f"{tower_class(model, 'image')} has none")
    if text_bias and not names_matching(model, CLIPFIT_TEXT_RE, "text"):
        raise ValueError(f"method 'clipfit' trains the text tower's transformer.resblocks.*.mlp.c_proj.bias, and the "
                         f"text tower {tower_class(model, 'text')} has none")


def _clipfit_distillation(ctx):
    """CLIPFit's loss term ``kd_lambda * (1 - mean_k cos(t_k, t0_k))``, t0 the zero-shot class text features of the
    weights the run starts from (constant: computed once)."""
    lam = float(recorded_option(ctx.model, ClipfitOptions, "kd_lambda"))
    if not lam:
        return None
    with torch.no_grad(), utils.autocast(ctx.device, ctx.precision):
        teacher = frozen_text_features(ctx.model, ctx.classnames, ctx.templates, ctx.tokenizer).detach().float()
    return lambda txt: ("kd", clipfit_kd_loss(txt, teacher, lam))


def _clipfit_l2(ctx):
    """CLIPFit's second regulariser: ``l2_reg * sum_g mean_{t in g} ||t - t0||^2`` over its three parameter groups
    (text ``c_proj`` biases, image LayerNorm biases, image LayerNorm weights), t0 the values the run starts from."""
    lam = float(recorded_option(ctx.model, ClipfitOptions, "l2_reg"))
    if not lam:
        return None
    groups: dict[str, list] = {}
    image_ln = set(layernorm_names(ctx.model, "image"))
    for name, p in ctx.model.named_parameters():
        if p.requires_grad and (CLIPFIT_TEXT_RE.search(name) or name in image_ln):
            key = "text_bias" if CLIPFIT_TEXT_RE.search(name) else f"image_ln_{name.rsplit('.', 1)[-1]}"
            groups.setdefault(key, []).append((p, p.detach().clone()))

    def term(txt):
        total = sum(torch.stack([(p.float() - p0.float()).pow(2).sum() for p, p0 in g]).mean()
                    for g in groups.values())
        return "l2", lam * total
    return term


@dataclass(frozen=True)
class ClipfitOptions:
    text_bias: bool = option(True, "train the text tower's mlp.c_proj biases")
    image_ln: bool = option(True, "train the image tower's LayerNorms")
    # l2_reg weighs a sum of squared parameter shifts against a cross-entropy of order 1
    l2_reg: float = option(0.0, "weight of the L2 pull of each trained group towards its start (0: off)",
                           range=OptionRange(float, 0.0, 1e6))
    # a loss-term weight like l2_reg: the distillation loss is at most 2
    kd_lambda: float = option(8.0, "weight of the distillation to the zero-shot class text features (0: off); "
                                   "--kd-lambda sets it", range=OptionRange(float, 0.0, 1e6))


@register_method("clipfit", check=_check_clipfit, options=ClipfitOptions,
                 traits=MethodTraits(loss_terms=(_clipfit_distillation, _clipfit_l2), template_set="clipfit",
                                     mergeable=True))
def _clipfit(model, text_bias=True, image_ln=True, l2_reg=0.0, kd_lambda=8.0):
    """Text ``transformer.resblocks.*.mlp.c_proj.bias`` (``text_bias``) + every image LayerNorm (ln_pre, ln_1, ln_2,
    ln_post; ``image_ln``): either alone is the paper's ablation. On a timm image tower (SigLIP / SigLIP2, EVA02,
    PE-Core: open_clip ``CustomTextCLIP``) CLIPFit's parts map to: the text tower is open_clip's own, so its
    ``mlp.c_proj.bias`` stays; the image LayerNorms are every LayerNorm of the timm tower - ``norm_pre``, each block's
    ``norm1`` / ``norm2``, EVA's sub-LNs ``attn.norm`` / ``mlp.norm``, q/k norms where present, the final ``norm`` /
    ``fc_norm`` and the MAP head's ``attn_pool.norm``. ``l2_reg``: weight of the L2 penalty on each
    trainable group's distance from its starting values (0 = off, the paper's default recipe). ``kd_lambda``: the
    weight of the distillation term (both weights are read by the loss terms, not here)."""
    if text_bias:
        unlock(model, CLIPFIT_TEXT_RE, "text")
    if image_ln:
        unlock_layernorms(model, "image")
    return {}
