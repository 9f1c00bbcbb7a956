"""Tiny open_clip models with a Hugging Face text tower (``HFTextEncoder``), built offline from ``transformers``
configs written to a local folder (no weights, no tokenizer download): open_clip's own ``roberta-ViT-B-32`` /
``xlm-roberta-base-ViT-B-32`` / ``mt5-base-ViT-B-32`` layout (an open_clip ViT image tower, mean pooling, an MLP
projection) and LilT's (a DeiT-style timm ViT, BERT's [CLS], linear projections), each in miniature."""
import copy
import json

TIMM_VIT = "leanclip_test_vit_tiny"
_COMMON = {"num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 64, "hidden_dropout_prob": 0.0,
           "attention_probs_dropout_prob": 0.0}
HF_CONFIGS = {  # family -> config.json of a 2-layer, width-32 encoder
    "bert": {"model_type": "bert", "architectures": ["BertModel"], "hidden_size": 32, "num_hidden_layers": 2,
             "max_position_embeddings": 32, "type_vocab_size": 2, "pad_token_id": 0, **_COMMON},
    "roberta": {"model_type": "roberta", "hidden_size": 32, "num_hidden_layers": 2, "max_position_embeddings": 34,
                "type_vocab_size": 1, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2, **_COMMON},
    "xlm-roberta": {"model_type": "xlm-roberta", "hidden_size": 32, "num_hidden_layers": 2,
                    "max_position_embeddings": 34, "type_vocab_size": 1, "pad_token_id": 1, "bos_token_id": 0,
                    "eos_token_id": 2, **_COMMON},
    "mt5": {"model_type": "mt5", "d_model": 32, "d_kv": 16, "d_ff": 64, "num_layers": 2, "num_heads": 2,
            "vocab_size": 64, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
            "feed_forward_proj": "gated-gelu", "is_encoder_decoder": True, "dropout_rate": 0.0},
}
_VISION = {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8}


def write_config(folder, family: str, **changes) -> str:
    """``config.json`` of ``HF_CONFIGS[family]`` (with ``changes``) in ``folder``; returns the folder as a string."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**HF_CONFIGS[family], **changes}))
    return str(folder)


def register_hf_text(folder, family: str, *, name: str | None = None, timm_image: bool = False, **changes) -> str:
    """Register a tiny open_clip config whose text tower is the Hugging Face ``family`` encoder written to
    ``folder``: open_clip's own layout (open_clip ViT, mean pooling, MLP projection, embed 64), or with
    ``timm_image`` LilT's (the DeiT-style timm ViT ``TIMM_VIT``, [CLS] pooling, linear projections, embed 16).
    Returns the name."""
    from leanclip.configs import register_config, register_unaligned_config

    path = write_config(folder, family, **changes)
    name = name or f"leanclip-test-hf-{family}{'-timm' if timm_image else ''}"
    if timm_image:
        register_timm_vit()
        return register_unaligned_config(name, timm_model=TIMM_VIT, hf_text=path, embed_dim=16, image_size=32,
                                         context_length=16)
    text = {"context_length": 16, "hf_model_name": path, "hf_tokenizer_name": path, "hf_model_pretrained": False,
            "hf_pooler_type": "mean_pooler", "hf_proj_type": "mlp"}
    return register_config(name, {"embed_dim": 64, "custom_text": True, "vision_cfg": copy.deepcopy(_VISION),
                                  "text_cfg": text})


def register_timm_vit():
    """A DeiT-style timm ViT in miniature under its own timm name (timm's create_model builds it: pretrained cfg,
    classifier reset and pooling as for deit_*/vit_*)."""
    import timm
    from timm.models import register_model

    if timm.is_model(TIMM_VIT):
        return

    @register_model
    def leanclip_test_vit_tiny(pretrained=False, **kw):
        for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kw.pop(k, None)
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                                 depth=2, num_heads=2, mlp_ratio=2, **kw)


def tokens(pad_id: int, batch: int = 3, length: int = 12, seed: int = 0):
    """Token ids in [3, 64) with rows padded (``pad_id``) from different positions (one row unpadded)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (batch, length), generator=g)
    for i, end in enumerate((5, length, 9)[:batch]):
        ids[i, end:] = pad_id
    return ids
