"""leanclip engine: PEFT methods on open_clip models, lean modules, trainer, data, evaluation, CLI.

    import engine
    model = open_clip.create_model("ViT-B-16", pretrained=None)
    engine.prepare(model, "clipfit", recompute="mlp+qkv")
    engine.save_trainable(model, "run/clipfit.safetensors")

Names resolve lazily so ``import engine`` stays cheap (open_clip and sklearn load on first use).
"""
import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "prepare": "engine.methods",
    "merge": "engine.lora",
    "METHODS": "engine.methods",
    "trainable_parameters": "engine.methods",
    "count_trainable": "engine.methods",
    "save_trainable": "engine.checkpoint",
    "load_trainable": "engine.checkpoint",
    "load_pretrained": "engine.weights",
    "resolve_pretrained": "engine.weights",
    "image_features": "engine.features",
    "text_features": "engine.features",
    "class_logits": "engine.features",
    "saved_activation_bytes": "engine.memory",
    "train": "engine.trainer",
    "TrainConfig": "engine.trainer",
    "evaluate": "engine.trainer",
    "zeroshot": "engine.trainer",
    "base_to_new": "engine.trainer",
    "estimate_saved_bytes": "engine.lean",
    "register_method": "engine.methods",
    "frozen_text_features": "engine.features",
    "clipfit_kd_loss": "engine.features",
    "encode_text_lean": "engine.lean",
    "apply_lean": "engine.lean",
    "remove_lean": "engine.lean",
    "set_recompute": "engine.lean",
    "choose_recompute": "engine.lean",
    "POLICIES": "engine.lean",
    "peak_cuda_bytes": "engine.memory",
    "LLUHead": "engine.heads",
    "PromptLearner": "engine.heads",
    "LinearProbe": "engine.heads",
    "ClipAdapter": "engine.heads",
    "register_tiny_config": "engine.configs",
    "register_reduced_config": "engine.configs",
    "load_into": "engine.checkpoint",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
