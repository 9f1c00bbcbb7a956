"""Small open_clip model configs registered at run time (tests, demo, benchmarks). No weights are downloaded.

    from leanclip.configs import register_tiny_config, register_reduced_config
    name = register_tiny_config()                       # "leanclip-tiny": E=64, ViT 2x64 patch 8 @32px, text 2x64
    model = open_clip.create_model(name, pretrained=None)
    name = register_reduced_config("ViT-B-16", layers=2)  # "ViT-B-16-L2": ViT-B-16 widths with 2 blocks per tower
    name = register_unaligned_config("deit-bert", timm_model="deit_base_patch16_224",
                                     hf_text="bert-base-uncased", pretrained=True)  # LilT's unaligned towers
"""
from __future__ import annotations

import copy
import logging
import warnings

import torch

TINY_NAME = "leanclip-tiny"

TINY_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def _registry() -> dict:
    from leanclip.models.openclip import model_configs

    return model_configs()


def register_config(name: str, config: dict, *, overwrite: bool = True) -> str:
    """Register ``config`` (an open_clip model config dict) under ``name`` so ``open_clip.create_model(name)``
    builds it. Returns ``name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if not isinstance(config, dict) or "vision_cfg" not in config or "text_cfg" not in config:
        raise ValueError("config must be an open_clip model config dict with 'vision_cfg' and 'text_cfg'")
    reg = _registry()
    if name in reg and not overwrite and reg[name] != config:
        raise ValueError(f"a different config is already registered as {name!r}")
    reg[name] = copy.deepcopy(config)
    return name


def _merged(cfg: dict, overrides: dict) -> dict:
    """``cfg`` with ``overrides`` merged into its top level; ``vision_cfg`` / ``text_cfg`` dicts key by key."""
    for k, v in overrides.items():
        if k in ("vision_cfg", "text_cfg"):
            cfg[k].update(v)
        else:
            cfg[k] = v
    return cfg


def register_tiny_config(name: str = TINY_NAME, **overrides) -> str:
    """Register the tiny test config (embed 64; vision width 64, 2 layers, 2 heads, patch 8, image 32; text width
    64, 2 layers, 2 heads, context 77, vocab 49408). ``overrides`` are merged into the top level, ``vision_cfg``
    and ``text_cfg`` dicts are merged key by key (e.g. ``quick_gelu=True``, ``vision_cfg={"ls_init_value": 0.1}``).
    Returns the registered name."""
    cfg = copy.deepcopy(TINY_CONFIG)
    return register_config(name, _merged(cfg, overrides))


# Tiny open_clip configs with a timm image tower (``CustomTextCLIP``), each built from a released family's timm model
# function with width 64, 2 blocks, 2 heads, patch 8 at 32 px (``leanclip.models.timm.TINY_TIMM_MODELS``) and an open_clip
# text tower as in the released config (SigLIP2's: no causal mask, last-token pooling, projection bias, tanh GELU).
_TINY_TEXT = {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}
_SIGLIP_TEXT = {"no_causal_mask": True, "proj_bias": True, "pool_type": "last", "norm_kwargs": {"eps": 1e-6},
                "act_kwargs": {"approximate": "tanh"}}
# (no family name holds "siglip": open_clip would pick its SigLIP tokenizer for the name, which downloads a vocabulary)
TINY_TIMM_FAMILIES = {  # family: (timm model, timm_pool, timm_proj, text_cfg extras, top-level extras)
    "vit-map": ("leanclip_tiny_siglip2", "map", "none", _SIGLIP_TEXT, {"init_logit_bias": -10}),
    "vit-qknorm": ("leanclip_tiny_vit_qknorm", "map", "none", _SIGLIP_TEXT, {"init_logit_bias": -10}),
    "eva02": ("leanclip_tiny_eva02", "token", None, {}, {}),
    "eva02-fused": ("leanclip_tiny_eva02_fused", "token", None, {}, {}),
    "pe-core": ("leanclip_tiny_pe_core", "map", None, {}, {}),
    "eva-postnorm": ("leanclip_tiny_eva02_postnorm", "token", None, {}, {}),
    "convnext": ("convnext_atto", "avg", "linear", {}, {}),
}


def register_tiny_timm_config(family: str, name: str | None = None) -> str:
    """Register a tiny open_clip config whose image tower is a timm trunk of ``family`` (``TINY_TIMM_FAMILIES``:
    vit-map: SigLIP / SigLIP2's, vit-qknorm, eva02, eva02-fused, eva-postnorm: EVA02-E's, pe-core, convnext) and whose text tower is a tiny open_clip transformer
    (embed 64). Returns the name (default ``f"leanclip-tiny-{family}"``)."""
    from leanclip.models.timm import register_tiny_models

    if family not in TINY_TIMM_FAMILIES:
        raise ValueError(f"unknown tiny timm family {family!r}; valid: {', '.join(TINY_TIMM_FAMILIES)}")
    register_tiny_models()
    model, pool, proj, text, top = TINY_TIMM_FAMILIES[family]
    cfg = {"embed_dim": 64, "custom_text": True, **top,
           "vision_cfg": {"image_size": 32, "timm_model_name": model, "timm_model_pretrained": False,
                          "timm_pool": pool, "timm_proj": proj},
           "text_cfg": {**_TINY_TEXT, **copy.deepcopy(text)}}
    return register_config(name or f"leanclip-tiny-{family}", cfg)


def register_reduced_config(base: str = "ViT-B-16", layers: int = 2, *, text_layers: int | None = None,
                            name: str | None = None) -> str:
    """Register a copy of open_clip config ``base`` with ``layers`` vision blocks and ``text_layers`` (default
    ``layers``) text blocks: same widths/heads/patches, far cheaper. Returns the name (default ``f"{base}-L{layers}"``)."""
    from leanclip.models.openclip import rescan_model_configs

    reg = _registry()
    if base not in reg:
        rescan_model_configs()
    if base not in reg:
        raise ValueError(f"unknown open_clip config {base!r}")
    if int(layers) < 1:
        raise ValueError(f"layers must be >= 1, got {layers!r}")
    cfg = copy.deepcopy(reg[base])
    cfg["vision_cfg"]["layers"] = int(layers)
    cfg["text_cfg"]["layers"] = int(text_layers if text_layers is not None else layers)
    name = name or f"{base}-L{int(layers)}" + (f"T{int(text_layers)}" if text_layers is not None else "")
    return register_config(name, cfg)


def register_unaligned_config(name: str, *, timm_model: str, hf_text: str, embed_dim: int = 256,
                              image_size: int = 224, context_length: int = 64, pretrained: bool = False,
                              timm_pool: str = "token", timm_proj: str = "linear",
                              hf_pooler: str = "cls_last_hidden_state_pooler", hf_proj: str = "linear",
                              **overrides) -> str:
    """Register an open_clip custom-tower config (``CustomTextCLIP``): the timm image model ``timm_model`` (e.g.
    ``deit_base_patch16_224``, DINO's ``vit_base_patch16_224.dino``) and the Hugging Face text model ``hf_text`` (a
    hub id such as ``bert-base-uncased``, ``princeton-nlp/unsup-simcse-bert-base-uncased``,
    ``bert-base-multilingual-cased``, or a local folder with config.json and the tokenizer files), joined by fresh
    projections to ``embed_dim`` (``visual.head.proj``, ``text.proj``) - LilT's unaligned-towers setting.

    ``pretrained``: the towers' own pretrained weights (timm ``timm_model_pretrained`` / transformers
    ``hf_model_pretrained``), downloaded by timm and transformers when the model is built (``create_model(name,
    pretrained=None)``: there is no joint checkpoint, the projections start random). Without it both towers are
    randomly initialised from their configs (tests). ``timm_pool`` "token" reads the ViT's CLS token (DeiT / DINO),
    ``hf_pooler`` "cls_last_hidden_state_pooler" BERT's [CLS] (open_clip's poolers: ``mean_pooler``, ``cls_pooler``
    - BERT's pooler layer, ...); ``timm_proj`` / ``hf_proj`` "linear" or "mlp". The tokenizer is ``hf_text``'s
    (``open_clip.get_tokenizer(name)``), ``context_length`` tokens. ``overrides`` go into the top level of the config
    as in ``register_tiny_config``. Returns ``name``."""
    cfg = {
        "embed_dim": int(embed_dim),
        "vision_cfg": {"image_size": int(image_size), "timm_model_name": timm_model,
                       "timm_model_pretrained": bool(pretrained), "timm_pool": timm_pool, "timm_proj": timm_proj},
        "text_cfg": {"context_length": int(context_length), "hf_model_name": hf_text, "hf_tokenizer_name": hf_text,
                     "hf_model_pretrained": bool(pretrained), "hf_pooler_type": hf_pooler, "hf_proj_type": hf_proj},
        "custom_text": True,
    }
    return register_config(name, _merged(cfg, overrides))


def create_random_model(name: str, seed: int = 0, **kw):
    """``open_clip.create_model(name, pretrained=None, **kw)`` after ``torch.manual_seed(seed)`` (the same random
    weights every time), without open_clip's "No pretrained weights loaded" log and warnings: random init is meant."""
    import open_clip
    kw.setdefault("pretrained_image", False)  # random: no timm / Hugging Face tower weights either
    kw.setdefault("pretrained_text", False)
    torch.manual_seed(seed)
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return open_clip.create_model(name, pretrained=None, **kw)
    finally:
        logging.disable(logging.NOTSET)
