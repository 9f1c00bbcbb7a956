"""leanclip: PEFT methods on open_clip models, lean modules, trainer, data, evaluation, CLI.

    import leanclip
    model = open_clip.create_model("ViT-B-16", pretrained=None)
    leanclip.prepare(model, "clipfit", recompute="mlp+qkv")
    leanclip.save_trainable(model, "run/clipfit.safetensors")

Names resolve lazily so ``import leanclip`` stays cheap (open_clip and sklearn load on first use).
"""
import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "prepare": "leanclip.methods",
    "merge": "leanclip.methods",
    "METHODS": "leanclip.methods",
    "trainable_parameters": "leanclip.methods",
    "count_trainable": "leanclip.methods",
    "save_trainable": "leanclip.checkpoint",
    "load_trainable": "leanclip.checkpoint",
    "load_pretrained": "leanclip.weights",
    "resolve_pretrained": "leanclip.weights",
    "image_features": "leanclip.features",
    "text_features": "leanclip.features",
    "class_logits": "leanclip.features",
    "saved_activation_bytes": "leanclip.memory",
    "train": "leanclip.trainer",
    "TrainConfig": "leanclip.trainer",
    "evaluate": "leanclip.trainer",
    "zeroshot": "leanclip.trainer",
    "base_to_new": "leanclip.trainer",
    "estimate_saved_bytes": "leanclip.saved_bytes",
    "register_method": "leanclip.methods",
    "frozen_text_features": "leanclip.features",
    "clipfit_kd_loss": "leanclip.features",
    "encode_text_lean": "leanclip.lean",
    "apply_lean": "leanclip.lean",
    "remove_lean": "leanclip.lean",
    "set_recompute": "leanclip.lean",
    "plan_recompute": "leanclip.budget",
    "predict_peak": "leanclip.budget",
    "POLICIES": "leanclip.lean",
    "peak_cuda_bytes": "leanclip.memory",
    "LLUHead": "leanclip.heads",
    "PromptLearner": "leanclip.heads",
    "LinearProbe": "leanclip.heads",
    "ClipAdapter": "leanclip.heads",
    "register_tiny_config": "leanclip.configs",
    "register_reduced_config": "leanclip.configs",
    "load_into": "leanclip.checkpoint",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'leanclip' has no attribute {name!r}")
