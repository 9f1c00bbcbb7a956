"""The open_clip boundary: every open_clip internal the engine touches, in one module.

A new open_clip release, or a second model family beside it, changes this file (or adds one beside it), not the
methods, the lean modules or the weights loader. What lives here:

- the module classes the lean swap replaces and the block layout it supports (``block_supported``);
- the anchored parameter-name patterns of the two towers (``IMAGE_RE``, ``TEXT_RE``, ``tower_of``) and of CLIPFit's
  text biases;
- tower access: ``text_tower`` (CLIP's flattened text tower or ``CustomTextCLIP.text``), ``tower_blocks``,
  ``embed_dim``, how the text tower pools (``pools_at_eot`` / ``pool_index``), how errors name a tower;
- the weight-file helpers of open_clip leanclip reuses (pretrained-tag tables, hub download, state-dict conversions,
  positional-embedding resizing, preprocessing config) and its model-config registry;
- ``random_init``: building a model on purpose without weights, minus open_clip's "No pretrained weights loaded" log.

Public open_clip API (``open_clip.create_model``, ``get_tokenizer``, ``list_models``) is called where it is used.
"""
from __future__ import annotations

import contextlib
import logging
import re
from types import SimpleNamespace

import torch
from open_clip import factory as _factory
from open_clip import pretrained as pretrained_tables  # noqa: F401  (tag tables: get_pretrained_cfg, ...)
from open_clip.coca_model import CoCa, MultimodalCfg  # noqa: F401  (the config fields openclip_config checks)
from open_clip.constants import HF_CONFIG_NAME  # noqa: F401
from open_clip.convert import convert_state_dict  # noqa: F401
from open_clip.loss import ClipLoss  # noqa: F401  (leanclip.losses)
from open_clip.model import (  # noqa: F401
    CLIP, CLIPTextCfg, CLIPVisionCfg, convert_to_custom_text_state_dict, get_model_preprocess_cfg, resize_pos_embed, resize_text_pos_embed,
    set_model_preprocess_cfg,
)
from open_clip.pretrained import (  # noqa: F401
    download_pretrained_from_hf, is_pretrained_cfg, list_pretrained_tags_by_model,
)
from open_clip.tokenizer import SimpleTokenizer  # noqa: F401  (the benchmarks' fallback tokenizer)
from open_clip.transform import merge_preprocess_dict  # noqa: F401
from open_clip.transformer import (  # noqa: F401
    LayerNorm, LayerNormFp32, QuickGELU, ResidualAttentionBlock, Transformer, VisionTransformer, text_global_pool,
)
from torch import nn

# --------------------------------------------------------------------------------------------------- parameter names
# Anchored patterns (CLIP flattens the text tower at top level, CustomTextCLIP keeps it under "text.").
IMAGE_RE = re.compile(r"^visual\.")
TEXT_RE = re.compile(r"^(?:text\.|transformer\.|token_embedding\.|positional_embedding$|ln_final\.|"
                     r"text_projection(?:$|\.))")
BIAS_RE = re.compile(r"(?:^|\.)(?:bias|in_proj_bias|q_bias|v_bias)$")  # q_bias / v_bias: EVA's fused qkv
CLIPFIT_TEXT_RE = re.compile(r"^(?:text\.)?transformer\.resblocks\.\d+\.mlp\.c_proj\.bias$")


def tower_of(name: str) -> str | None:
    """``"image"``, ``"text"`` or None (logit_scale, added heads) for an open_clip parameter/module name."""
    if IMAGE_RE.match(name):
        return "image"
    if TEXT_RE.match(name):
        return "text"
    return None


def class_name(obj) -> str:
    """``module.QualName`` of ``obj``'s class (how errors and notices name a tower, block or attention)."""
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


# ------------------------------------------------------------------------------------------------------------ towers
def text_tower(model: nn.Module) -> SimpleNamespace | None:
    """The pieces of an open_clip text tower (``CLIP``'s flattened one or ``CustomTextCLIP.text``), or None for
    towers that are not open_clip transformers (e.g. Hugging Face text encoders)."""
    src, prefix = (model, "") if hasattr(model, "token_embedding") and hasattr(model, "transformer") else (
        getattr(model, "text", None), "text.")
    if src is None or not hasattr(src, "token_embedding") or not isinstance(getattr(src, "transformer", None),
                                                                          Transformer):
        return None
    return SimpleNamespace(
        module=src,
        prefix=prefix,
        token_embedding=src.token_embedding,
        positional_embedding=src.positional_embedding,
        transformer=src.transformer,
        ln_final=src.ln_final,
        text_projection=src.text_projection,
        attn_mask=getattr(src, "attn_mask", None),
        pool_type=getattr(src, "text_pool_type", getattr(src, "pool_type", "argmax")),
        eos_id=getattr(src, "text_eos_id", getattr(src, "eos_id", None)),
        cls_emb=getattr(src, "cls_emb", None),
        pad_mask=bool(getattr(src, "use_pad_mask", False)),
    )


def is_vit_image_tower(model: nn.Module) -> bool:
    """Whether the image tower is open_clip's ``VisionTransformer`` (the one the lean modules and in-layer methods
    know)."""
    return isinstance(getattr(model, "visual", None), VisionTransformer)


def tower_blocks(model: nn.Module, tower: str) -> list[nn.Module]:
    """The residual blocks of the image and/or text tower (``tower``: image, text or both), image first: where the
    in-layer methods (LoRA, Houlsby, Compacter) attach."""
    out = []
    if tower in ("image", "both"):
        vis = model.visual
        out += list(vis.transformer.resblocks) if isinstance(vis, VisionTransformer) else [
            b for _, b in custom_tower_blocks(model, "image")]
    if tower in ("text", "both"):
        out += list(text_tower(model).transformer.resblocks)
    return out


# --------------------------------------------------------------------------------------------------- custom towers
# open_clip's custom towers (CustomTextCLIP with vision_cfg.timm_model_name / text_cfg.hf_model_name): a timm image
# tower (open_clip.timm_model.TimmModel: ``visual.trunk`` + a fresh ``visual.head``) and a Hugging Face text tower
# (open_clip.hf_model.HFTextEncoder: ``text.transformer`` + a fresh ``text.proj``). Both modules import without timm /
# transformers installed; only building them needs the packages.
def timm_image_tower(model: nn.Module) -> nn.Module | None:
    """``model.visual`` when it is open_clip's ``TimmModel`` (a timm image tower), else None."""
    from open_clip.timm_model import TimmModel

    v = getattr(model, "visual", None)
    return v if isinstance(v, TimmModel) else None


def hf_text_tower(model: nn.Module) -> nn.Module | None:
    """``model.text`` when it is open_clip's ``HFTextEncoder`` (a Hugging Face text tower), else None."""
    from open_clip.hf_model import HFTextEncoder

    t = getattr(model, "text", None)
    return t if isinstance(t, HFTextEncoder) else None


def hf_mean_pools(tower: nn.Module) -> bool:
    """Whether a Hugging Face text tower mean-pools its tokens (open_clip's ``MeanPooler``)."""
    from open_clip.hf_model import MeanPooler

    return isinstance(tower.pooler, MeanPooler)


def custom_projection_modules(model: nn.Module, tower: str) -> list[tuple[str, nn.Module]]:
    """(prefix, module) of the fresh projection of a timm image tower (``visual.head``: its linear / MLP projection;
    with ``timm_proj="none"`` the trunk's classifier sized to the embedding) or a Hugging Face text tower
    (``text.proj``), for ``tower`` in image / text / both; empty for other towers."""
    out = []
    v = timm_image_tower(model) if tower in ("image", "both") else None
    if v is not None:
        head = getattr(v, "head", None)
        if head is not None and any(True for _ in head.parameters()):
            out.append(("visual.head.", head))
        elif hasattr(v.trunk, "get_classifier"):
            for n, m in v.trunk.named_modules():
                if m is v.trunk.get_classifier():
                    out.append((f"visual.trunk.{n}.", m))
                    break
    t = hf_text_tower(model) if tower in ("text", "both") else None
    if t is not None and getattr(t, "proj", None) is not None:
        out.append(("text.proj.", t.proj))
    return out


def custom_tower_blocks(model: nn.Module, tower: str) -> list[tuple[str, nn.Module]]:
    """(name, block) of the transformer blocks of a timm image tower (``visual.trunk.blocks``) and / or a Hugging
    Face text tower (its encoder layer list, from open_clip's ``hf_configs.arch_dict``); empty for other towers."""
    out = []
    v = timm_image_tower(model) if tower in ("image", "both") else None
    if v is not None and isinstance(getattr(v.trunk, "blocks", None), (nn.Sequential, nn.ModuleList)):
        out += [(f"visual.trunk.blocks.{i}", b) for i, b in enumerate(v.trunk.blocks)]
    t = hf_text_tower(model) if tower in ("text", "both") else None
    if t is not None:
        from open_clip.hf_configs import arch_dict

        names = arch_dict.get(t.config.model_type, {}).get("config_names", {})
        enc_name = "encoder" if hasattr(t.transformer, "encoder") else None
        enc = t.transformer.encoder if enc_name else t.transformer
        layers = getattr(enc, names.get("layer_attr", "layer"), None)
        if isinstance(layers, (nn.Sequential, nn.ModuleList)):
            pre = "text.transformer." + (f"{enc_name}." if enc_name else "") + names.get("layer_attr", "layer")
            out += [(f"{pre}.{i}", b) for i, b in enumerate(layers)]
    return out


def block_supported(blk: nn.Module) -> bool:
    """Whether ``blk`` has the layout the lean block implements: open_clip's default ``ResidualAttentionBlock`` (or
    a lean subclass that marks itself with ``lean_block = True``) with a self-attention ``nn.MultiheadAttention``
    (packed in_proj, no bias_k/v or zero-attention) and the ``c_fc -> gelu -> c_proj`` MLP."""
    attn = getattr(blk, "attn", None)
    mlp = getattr(blk, "mlp", None)
    return (
        (type(blk) is ResidualAttentionBlock or getattr(type(blk), "lean_block", False))
        and isinstance(attn, nn.MultiheadAttention)
        and attn._qkv_same_embed_dim
        and attn.bias_k is None and attn.bias_v is None and not attn.add_zero_attn
        and attn.in_proj_weight is not None
        and isinstance(mlp, nn.Sequential) and list(mlp._modules) == ["c_fc", "gelu", "c_proj"]
        and not hasattr(blk, "ln_1_kv")
    )


def pools_at_eot(pool_type: str, eos_id) -> bool:
    """Whether a text tower reads one token per sequence, at the position ``pool_index`` finds."""
    return pool_type == "argmax" or (pool_type == "eos" and eos_id is not None)


def pool_index(tokens: torch.Tensor, pool_type: str, eos_id) -> torch.Tensor | None:
    """The position each sequence of ``tokens`` is read at (the EOT token), or None when the tower pools otherwise."""
    if not pools_at_eot(pool_type, eos_id):
        return None
    return tokens.argmax(dim=-1) if pool_type == "argmax" else (tokens == eos_id).int().argmax(dim=-1)


def tower_class(model: nn.Module, tower: str) -> str:
    """The class name (``module.QualName``) of ``model``'s ``"image"`` or ``"text"`` tower, as errors name it. CLIP
    keeps its text transformer at top level, so its text tower is named by the model class. A model of another family
    that names its own towers (a ``tower_class(tower)`` method, e.g. ``leanclip.models.transformers``) is asked."""
    named = getattr(model, "tower_class", None)
    if callable(named):
        return named(tower)
    if tower == "image":
        return class_name(getattr(model, "visual", None))
    t = text_tower(model)
    if t is not None:
        return class_name(t.module) + (" (flattened text transformer)" if t.module is model else "")
    text = getattr(model, "text", None)
    return class_name(text if text is not None else model)


def embed_dim(model: nn.Module) -> int | None:
    """The joint embedding width: ``visual.output_dim`` (open_clip ViT and ModifiedResNet), else the width of the
    text projection (towers without ``output_dim``, e.g. timm ones); None when neither says."""
    dim = getattr(getattr(model, "visual", None), "output_dim", None)
    if dim is None:
        t = text_tower(model)
        proj = t.text_projection if t is not None else None
        if isinstance(proj, nn.Linear):
            dim = proj.out_features
        elif isinstance(proj, torch.Tensor) and proj.dim() == 2:
            dim = proj.shape[1]
        else:
            dim = getattr(getattr(model, "text", None), "output_dim", None)
    return None if dim is None else int(dim)


# ----------------------------------------------------------------------------------------------- configs and weights
def model_configs() -> dict:
    """open_clip's registry of model configs (name -> config dict), rescanned once if empty."""
    return _factory._MODEL_CONFIGS


def rescan_model_configs() -> None:
    _factory._rescan_model_configs()


def find_checkpoint_in_dir(folder) -> str | None:
    """The weights file open_clip would pick in a hub folder (``open_clip_model.safetensors`` first)."""
    return _factory._find_checkpoint_in_dir(folder)


# -------------------------------------------------------------------------------------------- random init, on purpose
_NO_WEIGHTS_PREFIX = "No pretrained weights loaded for model "


class _NoWeightsNotice(logging.Filter):
    """Drops open_clip's "No pretrained weights loaded for model ..." record and nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_NO_WEIGHTS_PREFIX)


@contextlib.contextmanager
def random_init():
    """Around ``open_clip.create_model(name, pretrained=None)`` where random weights are the point (tiny test configs,
    benchmark models): open_clip logs "No pretrained weights loaded" on every such build, which reads like a failed
    download to a newcomer. The filter drops that one record; every other open_clip log line and Python warning
    passes. open_clip's factory logs through the root logger (``logging.warning``); its module logger
    (``open_clip.factory``) carries the filter too, for a release that logs there. A logger's filter sees only the
    records logged on that logger, and sees them before any handler (a terminal, pytest's log capture) does."""
    loggers = [logging.getLogger(), logging.getLogger(_factory.__name__)]
    notice = _NoWeightsNotice()
    for lg in loggers:
        lg.addFilter(notice)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(notice)
