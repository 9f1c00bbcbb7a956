"""open_clip model configs as untrusted input: the fields open_clip's model classes accept and the bounds of every
number in them, checked before anything is built (part of the open_clip boundary, beside ``openclip``).

A config from a file (``--model local-dir:DIR`` / ``hf-hub:ORG/REPO``, their ``open_clip_config.json``) is built by
open_clip as it says: a width of 10**7 or 10**6 blocks would allocate without bound, and a negative, fractional or
misspelled size ends in a traceback deep inside torch (a negative dimension, a division by zero, an assertion that
the heads divide the width, an unexpected keyword). :func:`check_model_config` refuses all of these with one message
naming the field, and :func:`config_param_count` bounds the whole model.

The highest values are 4-10x the largest configs open_clip ships (ViT-e-14: vision width 1792, 56 blocks, head width
112, mlp_ratio 8.57, 36 text blocks; PE-Core-bigG-14: text width 1280, 20 heads; ViT-gopt-16-SigLIP2: embed 1536;
ViT-bigG-14-worldwide: vocabulary 901,629; SigLIP2-512: image 512), so no real model is refused; every built-in
config passes (tests/engine/test_model_config.py).
"""
from __future__ import annotations

import dataclasses
import inspect
import math

CONFIG_WIDTH_MAX = 16384
# 80 GB of fp32 weights: far above EVA02-E-14 (4.4e9 parameters) or ViT-bigG-14 (2.5e9), far below what a hostile
# config could ask for
CONFIG_PARAMS_MAX = 20e9
# field -> (kind, lowest, highest, highest excluded); a name means the same in every section
CONFIG_NUMBERS = {
    "embed_dim": (int, 1, CONFIG_WIDTH_MAX, False),
    "width": (int, 1, CONFIG_WIDTH_MAX, False),
    "layers": (int, 1, 256, False),
    "heads": (int, 1, 1024, False),
    "head_width": (int, 1, CONFIG_WIDTH_MAX, False),
    "dim_head": (int, 1, CONFIG_WIDTH_MAX, False),
    "mlp_ratio": (float, 1e-3, 64.0, False),
    "patch_size": (int, 1, 1024, False),
    "image_size": (int, 1, 8192, False),
    "context_length": (int, 1, 4096, False),  # the causal mask is context^2 floats
    "vocab_size": (int, 1, 2 ** 22, False),
    "pad_id": (int, 0, 2 ** 22, False),  # and below vocab_size (_check_relations)
    "eos_id": (int, 0, 2 ** 22, False),
    "attn_pooler_queries": (int, 1, 4096, False),
    "attn_pooler_heads": (int, 1, 1024, False),
    "n_queries": (int, 1, 4096, False),
    "ls_init_value": (float, -1e3, 1e3, False),
    "patch_dropout": (float, 0.0, 1.0, True),
    "timm_drop": (float, 0.0, 1.0, True),
    "timm_drop_path": (float, 0.0, 1.0, True),
    "init_logit_scale": (float, -80.0, 80.0, False),  # its exp() must stay finite in fp32 (below e^88.7)
    "init_logit_bias": (float, -1e4, 1e4, False),
}
_NONE_OK = ("ls_init_value", "timm_drop_path", "init_logit_bias", "patch_size")
_SECTIONS = ("vision_cfg", "text_cfg", "multimodal_cfg")


def config_fields() -> dict:
    """section ("" for the top level) -> {field: declared type} of what open_clip's model classes accept: the
    keywords of CLIP / CoCa and the fields of CLIPVisionCfg, CLIPTextCfg and CoCa's MultimodalCfg."""
    from leanclip.models.openclip import CLIP, CLIPTextCfg, CLIPVisionCfg, CoCa, MultimodalCfg

    top = {k: None for c in (CLIP, CoCa) for k in list(inspect.signature(c.__init__).parameters)[1:]}
    top.pop("cast_dtype", None)  # the precision is leanclip's to set
    top.update(custom_text="bool", quick_gelu="bool", nonscalar_logit_scale="bool", output_dict="bool")
    fields = lambda c: {f.name: str(f.type) for f in dataclasses.fields(c)}  # noqa: E731
    return {"": top, "vision_cfg": fields(CLIPVisionCfg), "text_cfg": fields(CLIPTextCfg),
            "multimodal_cfg": fields(MultimodalCfg)}


def _pair(x) -> tuple:
    return tuple(x) if isinstance(x, list) else (x, x)


def _number_problem(v, kind, lo, hi, hi_open) -> str | None:
    if isinstance(v, bool) or not isinstance(v, int if kind is int else (int, float)):
        return f"must be {'an int' if kind is int else 'a number'}, got {v!r}"
    if kind is float and not math.isfinite(v):
        return f"must be finite, got {v!r}"
    if not (lo <= v and (v < hi if hi_open else v <= hi)):
        return f"must be in [{lo}, {hi}{')' if hi_open else ']'}, got {v!r}"
    return None


def _check_value(path: str, name: str, v, declared) -> None:
    """One field: numbers against :data:`CONFIG_NUMBERS` (image / patch size may be [height, width], a ResNet
    tower's layers four block counts), flags, names and keyword objects by their declared type."""
    if v is None and name in _NONE_OK:
        return
    if name in CONFIG_NUMBERS:
        many = (name in ("image_size", "patch_size") and isinstance(v, list) and len(v) == 2) or \
               (path == "vision_cfg.layers" and isinstance(v, list) and len(v) == 4)
        for x in v if many else [v]:
            problem = _number_problem(x, *CONFIG_NUMBERS[name])
            if problem:
                raise ValueError(f"{path} {problem}")
    elif declared == "bool" or declared == "<class 'bool'>":
        if not isinstance(v, bool):
            raise ValueError(f"{path} must be true or false, got {v!r}")
    elif "str" in declared and not (v is None or isinstance(v, str)):  # open_clip reads None as "not set"
        raise ValueError(f"{path} must be a string, got {v!r}")
    elif "dict" in declared and not (v is None or isinstance(v, dict)):
        raise ValueError(f"{path} must be an object, got {v!r}")


def _check_vision(v: dict) -> None:
    """The relations open_clip asserts or divides by while building the image tower."""
    if v.get("timm_model_name"):
        return
    width, head_width, image = v.get("width", 768), v.get("head_width", 64), v.get("image_size", 224)
    if isinstance(v.get("layers", 12), list):  # ModifiedResNet: heads = 32 width / head_width, stride 32
        if (32 * width) % head_width:
            raise ValueError(f"vision_cfg.head_width {head_width} does not divide the ResNet feature width "
                             f"32 x {width}")
        if min(_pair(image)) < 32:
            raise ValueError(f"vision_cfg.image_size {image} is below a ResNet tower's stride of 32")
        return
    if width % head_width:
        raise ValueError(f"vision_cfg.head_width {head_width} does not divide vision_cfg.width {width}")
    patch = v.get("patch_size", 16)
    if patch is None or any(i < p for i, p in zip(_pair(image), _pair(patch))):
        raise ValueError(f"vision_cfg.image_size {image} holds no patch of vision_cfg.patch_size {patch}")


def _check_relations(cfg: dict) -> None:
    _check_vision(cfg["vision_cfg"])
    for name in ("text_cfg", "multimodal_cfg"):
        sec = cfg.get(name) or {}
        if not sec or sec.get("hf_model_name"):
            continue
        width, heads, vocab = sec.get("width", 512), sec.get("heads", 8), sec.get("vocab_size", 49408)
        if width % heads:
            raise ValueError(f"{name}.heads {heads} does not divide {name}.width {width}")
        for k in ("pad_id", "eos_id"):
            if sec.get(k, 0) >= vocab:
                raise ValueError(f"{name}.{k} {sec[k]} is not below {name}.vocab_size {vocab}")


def check_model_config(cfg) -> None:
    """ValueError naming the first field of an open_clip model config (the ``model_cfg`` of an
    open_clip_config.json) that open_clip does not know, that has the wrong type, lies outside
    :data:`CONFIG_NUMBERS` or breaks a relation open_clip relies on; then the estimated parameter count must stay
    within :data:`CONFIG_PARAMS_MAX`. Nothing is built."""
    if not isinstance(cfg, dict):
        raise ValueError(f"model_cfg must be an object, got {type(cfg).__name__}")
    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in cfg:
            raise ValueError(f"model_cfg has no {key}")
    for section, declared in config_fields().items():
        values = cfg.get(section) if section else {k: v for k, v in cfg.items() if k not in _SECTIONS}
        if values is None and section == "multimodal_cfg":
            continue
        if not isinstance(values, dict):
            raise ValueError(f"{section} must be an object, got {values!r}")
        for name, v in values.items():
            path = f"{section}.{name}" if section else name
            if name not in declared:
                raise ValueError(f"{path} is not a field of an open_clip model config")
            _check_value(path, name, v, str(declared[name]))
    _check_relations(cfg)
    n = config_param_count(cfg)
    if n > CONFIG_PARAMS_MAX:
        raise ValueError(f"the model would have about {n:.3g} parameters, more than the {CONFIG_PARAMS_MAX:.3g} "
                         f"leanclip builds")


def _blocks(width: int, layers: int, mlp_ratio: float, cross: bool = False) -> int:
    """Weights of ``layers`` transformer blocks: attention 4 w^2 (a cross-attention another 4 w^2), MLP 2 w h."""
    return layers * ((8 if cross else 4) * width * width + 2 * width * int(width * mlp_ratio))


def config_param_count(cfg: dict) -> int:
    """Estimated parameter count of a config whose fields :func:`check_model_config` has bounded: the weight
    matrices and embeddings (norms and biases add well under one percent). A timm image tower or a Hugging Face
    text tower counts zero: its sizes come from timm's / transformers' own registry, not from the file."""
    e, v = cfg["embed_dim"], cfg["vision_cfg"]
    n = 0
    if not v.get("timm_model_name"):
        w, layers, (ih, iw) = v.get("width", 768), v.get("layers", 12), _pair(v.get("image_size", 224))
        if isinstance(layers, list):  # ModifiedResNet: bottlenecks of 17 p^2 at stage width p, then attention pool
            feat = 32 * w
            n += sum(17 * (w * 2 ** i) ** 2 * d for i, d in enumerate(layers))
            n += ((ih // 32) * (iw // 32) + 1) * feat + 3 * feat * feat + feat * e
        else:
            ph, pw = _pair(v.get("patch_size", 16))
            n += 3 * ph * pw * w + ((ih // ph) * (iw // pw) + 1) * w + w * e
            n += _blocks(w, layers, v.get("mlp_ratio", 4.0))
            if v.get("attentional_pool"):
                n += v.get("attn_pooler_queries", 256) * e + 4 * e * e
    for sec, cross in ((cfg["text_cfg"], False), (cfg.get("multimodal_cfg") or {}, True)):
        if sec and not sec.get("hf_model_name"):
            w = sec.get("width", 512)
            n += (sec.get("vocab_size", 49408) + sec.get("context_length", 77)) * w + w * e
            n += _blocks(w, sec.get("layers", 12), sec.get("mlp_ratio", 4.0), cross)
    return int(n)
