"""LilT / LiT methods for contrastive image–text alignment (Khan & Fu 2023; Zhai et al. 2022).

Registered with ``leanclip.registry.register_method`` (``leanclip.methods`` imports this module)::

    lilt-ln        every LayerNorm of both towers + the projections (visual.proj, text_projection)
    lilt-bitfit    every bias of both towers (incl. attn.in_proj_bias, LN biases) + the projections
    lilt-adapter   bottleneck adapters (d -> d/r -> d, GELU, residual) in the branch before ln_1 and ln_2 of every
                   block of both towers, + every LayerNorm + the projections
    lilt-deep      one extra transformer block appended to each tower, + every LayerNorm + the projections
    lilt-proj      the projections only (visual.proj, text_projection)
    lit            image tower locked, text tower (embeddings, blocks, ln_final, text_projection) fully trained
                   (``locked="text"``: LiT reversed, the image tower trained in full)
    lit+lilt-*     LiT + a LilT method on the image tower: the text tower is trained fully, the image tower gets the
                   LilT treatment (a fully trainable tower gets no adapters / extra block)

On open_clip's custom towers (LilT's unaligned setting, ``leanclip.configs.register_unaligned_config``: a timm image
tower and a Hugging Face text tower) the projections are the fresh ``visual.head.*`` and ``text.proj.*``
(``projection_names``), ``lilt-adapter`` puts an adapter before every LayerNorm inside each timm / Hugging Face block,
and ``lilt-deep`` appends a timm block (``leanclip.models.timm.new_block_like``) / a BERT-style layer
(``leanclip.models.hf_text.new_layer_like``); mT5 and other text layers are a ValueError naming the class. On a
``transformers`` CLIP / SigLIP model (``transformers:<id>``) it appends a ``CLIPEncoderLayer`` / ``SiglipEncoderLayer``
to each tower's ``encoder.layers`` (``leanclip.models.transformers.new_layer_like``), counted in the tower config.

Every method also adds ``model.lilt_temperature`` (``leanclip.contrastive.LearnableTemperature``: tau = 0.07 at start,
clamped to [0.001, 0.5]), trained with the rest; ``leanclip.contrastive.train_contrastive`` uses it.

Options (``leanclip.prepare(model, method, **opts)``): ``tower`` (``both``/``image``/``text``: which towers the LilT
part touches), ``projections`` (default True), ``temperature`` (default 0.07), ``reduction`` (adapters, default 4),
``deep_init`` (``copy``: the extra block starts as a copy of the tower's last block, ``random``: open_clip's init),
``ln_tower`` (``lilt-adapter`` / ``lilt-deep``: whose LayerNorms are unlocked, separately from where the adapters or
the block go: ``same`` = ``tower`` (default), ``both``, ``image``, ``text``, ``none``), ``bitfit`` (``lilt-adapter``:
also every non-LayerNorm bias of ``tower``), ``locked`` (``lit``: ``image`` (default) or ``text``),
``image_layers`` / ``text_layers`` (``lilt-ln``: the blocks whose LayerNorms are unlocked, ``leanclip.layer_ranges``;
LilT's Fig. 5). The ablation rows of the paper are these options (adapters without LN: ``ln_tower=none``; BitFit + adapters without LN:
``ln_tower=none, bitfit=True``; LN of one tower: ``ln_tower=text`` / ``image``), ``lilt-proj`` and ``locked="text"``.

Initialisation (exact identities at the start, so the prepared model computes what the unprepared one did - except
the extra layer of a post-LN Hugging Face tower, below):

- adapters: ``up`` (d/r -> d) weight and bias are zero, so ``adapter(x) = x + up(gelu(down(x))) = x``; ``down`` has
  the default nn.Linear init. The gradient reaches ``up`` at once (its input gelu(down(x)) is non-zero) and ``down``
  from the second step on (the LoRA / Houlsby-style near-identity start, made exact).
- extra block: ``attn.out_proj`` and ``mlp.c_proj`` weights and biases are zero, so ``x + 0 + 0 = x`` (timm:
  ``attn.proj`` and ``mlp.fc2``; ``transformers``: ``self_attn.out_proj`` and ``mlp.fc2``). A BERT-style layer ends in ``LayerNorm(x + sub-layer(x))``, which no weights
  make the identity on arbitrary x: it starts as a copy of the tower's last layer (the tower then applies that layer
  twice) or, with ``deep_init="random"``, from BERT's initialisation; its output changes at the start either way.

Adapters live in the LayerNorm they precede: ``blk.ln_1.adapter`` (an ``Adapter``) with a forward pre-hook on
``blk.ln_1`` (so ``ln_1(x)`` computes ``ln_1(adapter(x))``). The LayerNorm keeps its class (open_clip's or the lean
one), its parameter names (``...ln_1.weight``) and works in both plain and lean blocks, under recompute too; adapter
parameters are named ``...resblocks.<i>.ln_1.adapter.down.weight`` etc. The extra block is appended to
``<tower>.transformer.resblocks`` (so it is index ``layers``: ``visual.transformer.resblocks.12.*`` on ViT-B-16),
gets the tower's attention mask (causal for text: EOT truncation stays exact) and is swapped for the lean block like
the others. Re-preparing with a LilT method removes previous adapters / extra blocks first;
``leanclip.lifecycle.strip(model, lilt.ADDED)`` does it by hand (``prepare`` with a non-LilT method leaves them in
place, frozen).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from leanclip.layer_ranges import ALL, selected_layernorms
from leanclip.lifecycle import strip
from leanclip.methods._lilt_modules import (
    ADDED, DEEP_INITS, Adapter, adapter_layernorms, adapters, add_adapters, add_deep_blocks, check_deep_towers,
    check_reduction, deep_blocks,
)
from leanclip.models import transformers as _hf
from leanclip.models.openclip import custom_projection_modules, hf_text_tower, timm_image_tower
from leanclip.models.openclip_config import CONFIG_WIDTH_MAX
from leanclip.methods._options import Tower, tower_option
from leanclip.options import OptionRange, option
from leanclip.registry import MethodTraits, register_method
from leanclip.select import (
    BIAS_RE, TOWERS, check_coverage, check_tower, layernorm_names, model_device, names_matching, require_open_clip_tower,
    tower_class, tower_of, unlock, unlock_layernorms, unlock_names,
)

__all__ = ["Adapter", "add_adapters", "add_deep_blocks", "ADDED", "adapters", "deep_blocks", "unlock_projections",
           "projection_names", "trainable_summary", "check_reduction", "LILT_METHODS"]

LILT_METHODS = ("lilt-ln", "lilt-bitfit", "lilt-adapter", "lilt-deep", "lilt-proj", "lit")
PROJ_RE = re.compile(r"^(?:visual\.proj|(?:text\.)?text_projection(?:\.weight|\.bias)?)$")
TEMPERATURE_NAME = "lilt_temperature"
# the learnable temperature is the contrastive logit scale (leanclip.contrastive reads the hook, not the name)
LILT_TRAITS = MethodTraits(hooks={"temperature": TEMPERATURE_NAME})
# a whole tower trains: the lower learning rate of LiT
FULL_TOWER_TRAITS = MethodTraits(hooks={"temperature": TEMPERATURE_NAME}, contrastive_defaults={"lr": 1e-4})
LN_TOWERS = ("same", "both", "image", "text", "none")  # ln_tower: "same" = the towers the adapters / block go to
# temperature: where LearnableTemperature keeps it (leanclip.contrastive.TEMPERATURE_MIN / _MAX; lilt does not import
# the training module); reduction: no reduction beyond the widest tower a model config may have divides a width
TEMPERATURE_RANGE = {"temperature": OptionRange(float, 0.001, 0.5)}
ADAPTER_RANGES = {**TEMPERATURE_RANGE, "reduction": OptionRange(int, 1, CONFIG_WIDTH_MAX)}


# ----------------------------------------------------------------------------------------------------------- towers
def _tower_fully_trainable(model: nn.Module, which: str) -> bool:
    ps = [p for n, p in model.named_parameters() if tower_of(n) == which]
    return bool(ps) and all(p.requires_grad for p in ps)


def _effective_tower(model: nn.Module, tower: str) -> str:
    """``tower`` minus any tower that is already trained in full (e.g. the text tower after ``lit``)."""
    if tower not in TOWERS:
        raise ValueError(f"tower must be one of {TOWERS}, got {tower!r}")
    keep = [t for t in (("image", "text") if tower == "both" else (tower,)) if not _tower_fully_trainable(model, t)]
    if not keep:
        return "none"
    return keep[0] if len(keep) == 1 else "both"


# ----------------------------------------------------------------------------------------------------------- helpers
def projection_names(model: nn.Module, tower: str = "both") -> list[str]:
    """The projection parameters of ``tower``: ``visual.proj`` / ``text_projection`` on open_clip towers; the fresh
    ``visual.head.*`` of a timm image tower and ``text.proj.*`` of a Hugging Face text tower (open_clip custom
    towers)."""
    out = names_matching(model, PROJ_RE, tower)
    params = {id(p): n for n, p in model.named_parameters()}
    custom = _hf.projection_modules(model, tower) if _hf.is_transformers(model) else \
        custom_projection_modules(model, tower)
    for _, mod in custom:
        out += [params[id(p)] for p in mod.parameters() if id(p) in params]
    return out


def unlock_projections(model: nn.Module, tower: str = "both") -> int:
    """Unlock the projections of ``tower`` (``projection_names``)."""
    return unlock_names(model, projection_names(model, tower))


def _temperature_module(model: nn.Module, temperature: float) -> dict:
    from leanclip.contrastive import LearnableTemperature

    if TEMPERATURE_NAME in model._modules:  # a previous component of this combination added it
        return {}
    dev = model_device(model)
    return {TEMPERATURE_NAME: LearnableTemperature(temperature).to(dev)}


def _non_ln_biases(model: nn.Module, tower: str) -> list[str]:
    """Every bias of ``tower`` (``attn.in_proj_bias`` included) except the LayerNorms' (BitFit without LN)."""
    ln = set(layernorm_names(model, tower))
    return [n for n in names_matching(model, BIAS_RE, tower) if n not in ln]


def _lilt(model, *, tower, projections, temperature, unlock_fn=None, adapters_r=None, deep_init=None,
          ln_tower=None, bitfit=False) -> dict:
    """The LilT recipe on ``tower`` (a tower already trained in full is left out): adapters / an extra block,
    ``unlock_fn``, the non-LayerNorm biases (``bitfit``), the projections; LayerNorms of ``ln_tower`` ("same":
    ``tower``; None: not this method's business)."""
    if not isinstance(projections, bool):
        raise ValueError(f"projections must be True or False, got {projections!r}")
    tw = _effective_tower(model, tower)
    lt = "none" if ln_tower in (None, "none") else _effective_tower(model, tower if ln_tower == "same" else ln_tower)
    if tw != "none":
        if adapters_r is not None:
            add_adapters(model, adapters_r, tw)
        if deep_init is not None:
            add_deep_blocks(model, tw, deep_init)
        if unlock_fn is not None:
            unlock_fn(model, tw)
        if bitfit:
            unlock_names(model, _non_ln_biases(model, tw))
        if projections:
            unlock_projections(model, tw)
    if lt != "none":
        unlock_layernorms(model, lt)
    return _temperature_module(model, temperature)


def _check_no_lilt_modules(model, tower: str, method: str) -> None:
    names = [n for n, _ in adapters(model) + deep_blocks(model) if tower_of(n) == tower]
    if names:
        raise ValueError(f"{method!r} after a LilT method that added modules to the {tower} tower ({names[0]}, ...): "
                         f"write 'lit' first (e.g. 'lit+lilt-adapter'), so the fully trained tower gets none")


# ----------------------------------------------------------------------------------------------------------- checks
def _check_lilt_common(model, method: str, tower, projections, temperature) -> None:
    from leanclip.contrastive import LearnableTemperature

    check_tower(tower)
    if not isinstance(projections, bool):
        raise ValueError(f"projections must be True or False, got {projections!r}")
    LearnableTemperature(temperature)  # validates the value
    if projections:
        _require_projection(model, method, tower)


def _require_projection(model, method: str, tower: str) -> None:
    """ValueError naming the tower class unless each tower of ``tower`` has a projection LilT trains: an open_clip
    transformer tower (``visual.proj`` / ``text_projection``), a timm image tower (``visual.head``) or a Hugging Face
    text tower (``text.proj``)."""
    for t in ("image", "text") if tower == "both" else (tower,):
        custom = timm_image_tower(model) if t == "image" else hf_text_tower(model)
        if custom is not None or _hf.is_transformers(model):
            if not projection_names(model, t):
                why = " (timm_proj / hf_proj_type none)" if custom is not None else ""
                raise ValueError(f"method {method!r} trains the {t} tower's projection, and the {t} tower "
                                 f"{tower_class(model, t)} has none{why}: pass projections=False")
            continue
        require_open_clip_tower(model, method, t, "its projection visual.proj / text_projection is trained")


def _check_lilt_ln(model, tower="both", projections=True, temperature=0.07, image_layers=ALL, text_layers=ALL,
                   **_):
    _check_lilt_common(model, "lilt-ln", tower, projections, temperature)
    layers = {"image": image_layers, "text": text_layers}
    for t, spec in layers.items():
        if spec != ALL and tower not in (t, "both"):
            raise ValueError(f"{t}_layers: method 'lilt-ln' with tower={tower} leaves the {t} tower locked")
    return check_coverage(model, "lilt-ln", selected_layernorms(model, tower, layers), tower, "LayerNorms")


def _check_lilt_bitfit(model, tower="both", projections=True, temperature=0.07, **_):
    _check_lilt_common(model, "lilt-bitfit", tower, projections, temperature)
    return check_coverage(model, "lilt-bitfit", names_matching(model, BIAS_RE, tower), tower, "biases")


def _check_lilt_blocks(method: str):
    def check(model, tower="both", projections=True, temperature=0.07, reduction=4, deep_init="copy",
              ln_tower="same", bitfit=False, **_):
        _check_lilt_common(model, method, tower, projections, temperature)
        if ln_tower not in LN_TOWERS:
            raise ValueError(f"ln_tower must be one of {', '.join(LN_TOWERS)}, got {ln_tower!r}")
        if not isinstance(bitfit, bool):
            raise ValueError(f"bitfit must be true or false, got {bitfit!r}")
        if method == "lilt-adapter":
            for w in sorted({ln.normalized_shape[0] for ln in adapter_layernorms(model, tower)}):
                check_reduction(reduction, w)
            return
        check_deep_towers(model, tower)
        if deep_init not in DEEP_INITS:
            raise ValueError(f"deep_init must be one of {DEEP_INITS}, got {deep_init!r}")
    return check


def _check_proj(model, tower="both", temperature=0.07, **_):
    _check_lilt_common(model, "lilt-proj", tower, True, temperature)


def _check_lit(model, temperature=0.07, locked="image", **_):
    from leanclip.contrastive import LearnableTemperature

    LearnableTemperature(temperature)
    if locked not in ("image", "text"):
        raise ValueError(f"locked must be image or text, got {locked!r}")
    trained = "text" if locked == "image" else "image"
    if not any(tower_of(n) == trained for n, _ in model.named_parameters()):
        raise ValueError(f"method 'lit' with locked={locked} trains the {trained} tower, and the {trained} tower "
                         f"{tower_class(model, trained)} has no parameters")


# ----------------------------------------------------------------------------------------------------------- options
def _projections() -> Any:
    return option(True, "also train the projections (visual.proj, text_projection) of tower")


def _temperature() -> Any:
    return option(0.07, "the learnable temperature's start", range=TEMPERATURE_RANGE["temperature"])


@dataclass(frozen=True)
class LiltUnlockOptions:
    tower: Tower = tower_option("that trains (and gets the added modules)")
    projections: bool = _projections()
    temperature: float = _temperature()


@dataclass(frozen=True)
class LiltLnOptions(LiltUnlockOptions):
    image_layers: str = option(ALL, "the image tower's blocks whose LayerNorms train: 'all', 'N', 'A-B' (inclusive) "
                                    "or a comma list; a range leaves ln_pre / ln_post locked")
    text_layers: str = option(ALL, "the text tower's blocks whose LayerNorms train, as image_layers")


@dataclass(frozen=True)
class _LiltModulesOptions(LiltUnlockOptions):
    ln_tower: Literal[LN_TOWERS] = option("same", "whose LayerNorms train beside the added modules (same: tower's; "
                                                  "none: no LayerNorm)")
    bitfit: bool = option(False, "also train every non-LayerNorm bias of tower")


@dataclass(frozen=True)
class LiltAdapterOptions(_LiltModulesOptions):
    reduction: int = option(4, "the bottleneck is the width / reduction", range=ADAPTER_RANGES["reduction"])


@dataclass(frozen=True)
class LiltDeepOptions(_LiltModulesOptions):
    deep_init: Literal[DEEP_INITS] = option("copy", "start the extra block as a copy of the last one, or at random")


@dataclass(frozen=True)
class LiltProjOptions:
    tower: Tower = tower_option("whose projection trains")
    temperature: float = _temperature()


@dataclass(frozen=True)
class LitOptions:
    temperature: float = _temperature()
    locked: Literal["image", "text"] = option("image", "the tower that stays frozen; the other trains in full")


# ----------------------------------------------------------------------------------------------------------- methods
@register_method("lilt-ln", check=_check_lilt_ln, traits=LILT_TRAITS, options=LiltLnOptions)
def _lilt_ln(model, tower="both", projections=True, temperature=0.07, image_layers=ALL, text_layers=ALL):
    """LilT-LN: every LayerNorm weight+bias of ``tower`` + the projections (+ the learnable temperature).
    ``image_layers`` / ``text_layers`` (``leanclip.layer_ranges``: ``"6-11"``, ``"0-5"``, ``"0-2,5"``; ``"all"``, the
    default: every LayerNorm): that tower's LayerNorms inside those blocks only (LilT's Fig. 5 patterns)."""
    _begin(model)
    layers = {"image": image_layers, "text": text_layers}

    def unlock_fn(m, tw):
        unlock_names(m, selected_layernorms(m, tw, layers))
    return _lilt(model, tower=tower, projections=projections, temperature=temperature, unlock_fn=unlock_fn)


@register_method("lilt-bitfit", check=_check_lilt_bitfit, traits=LILT_TRAITS, options=LiltUnlockOptions)
def _lilt_bitfit(model, tower="both", projections=True, temperature=0.07):
    """LilT-BitFit: every bias of ``tower`` (incl. attn.in_proj_bias and LN biases) + the projections."""
    _begin(model)
    return _lilt(model, tower=tower, projections=projections, temperature=temperature,
                 unlock_fn=lambda m, t: unlock(m, BIAS_RE, t))


@register_method("lilt-adapter", check=_check_lilt_blocks("lilt-adapter"), traits=LILT_TRAITS,
                 options=LiltAdapterOptions)
def _lilt_adapter(model, tower="both", reduction=4, projections=True, temperature=0.07, ln_tower="same",
                  bitfit=False):
    """LilT adapters: bottleneck adapters before ln_1 / ln_2 of every block (zero-init up-projection) + the
    projections of ``tower``, + the LayerNorms of ``ln_tower`` ("same": ``tower``; "none": adapters without LN,
    "image" / "text": one tower's, whatever ``tower`` is); ``bitfit``: also every non-LayerNorm bias of ``tower``."""
    _begin(model)
    return _lilt(model, tower=tower, projections=projections, temperature=temperature, adapters_r=reduction,
                 ln_tower=ln_tower, bitfit=bitfit)


@register_method("lilt-deep", check=_check_lilt_blocks("lilt-deep"), traits=LILT_TRAITS, options=LiltDeepOptions)
def _lilt_deep(model, tower="both", deep_init="copy", projections=True, temperature=0.07, ln_tower="same",
               bitfit=False):
    """LilT deep: one extra block on top of each tower (zero-init out_proj / c_proj: exact identity at the start),
    + the projections of ``tower`` + the LayerNorms of ``ln_tower`` and, with ``bitfit``, every non-LayerNorm bias
    of ``tower`` (as for ``lilt-adapter``: the paper's BitFit + DA row)."""
    _begin(model)
    return _lilt(model, tower=tower, projections=projections, temperature=temperature, deep_init=deep_init,
                 ln_tower=ln_tower, bitfit=bitfit)


@register_method("lilt-proj", check=_check_proj, traits=LILT_TRAITS, options=LiltProjOptions)
def _lilt_proj(model, tower="both", temperature=0.07):
    """Projections only (LilT's row c): ``visual.proj`` / ``text_projection`` of ``tower`` + the temperature."""
    _begin(model)
    return _lilt(model, tower=tower, projections=True, temperature=temperature)


@register_method("lit", check=_check_lit, traits=FULL_TOWER_TRAITS, options=LitOptions)
def _lit(model, temperature=0.07, locked="image"):
    """LiT: the ``locked`` tower (default image) stays frozen, the other one is trained in full (text: token /
    positional embeddings, blocks, ln_final, text_projection; image: every visual parameter) (+ the learnable
    temperature). ``locked="text"`` is LiT reversed (LilT's row m)."""
    _begin(model)
    trained = "text" if locked == "image" else "image"
    _check_no_lilt_modules(model, trained, "lit")
    n = 0
    for name, p in model.named_parameters():
        if tower_of(name) == trained:
            p.requires_grad_(True)
            n += 1
    if n == 0:
        raise ValueError(f"lit: the model has no {trained}-tower parameters")
    return _temperature_module(model, temperature)


def _begin(model) -> None:
    """Remove LilT modules left by an earlier ``prepare`` - unless an earlier component of the same combination
    added them (``prepare`` drops the previous run's ``lilt_temperature`` before applying the first component, so its
    presence means we are the 2nd+ component of ``a+b``)."""
    if TEMPERATURE_NAME not in model._modules:
        strip(model, ADDED)


# ----------------------------------------------------------------------------------------------------------- counts
def trainable_summary(model: nn.Module) -> dict:
    """{"trainable", "total", "percent", "image", "text", "other"}: trainable parameter counts of a prepared model
    (``total`` counts every parameter, added ones included)."""
    out = {"trainable": 0, "total": 0, "image": 0, "text": 0, "other": 0}
    for n, p in model.named_parameters():
        out["total"] += p.numel()
        if p.requires_grad:
            out["trainable"] += p.numel()
            out[tower_of(n) or "other"] += p.numel()
    out["percent"] = 100.0 * out["trainable"] / max(out["total"], 1)
    return out
