"""The bounds of leanclip.models.openclip_config against open_clip itself: every config open_clip ships passes, every
number its config classes take is bounded, and the parameter estimate that bounds the whole model is close to the
count of the model open_clip builds (built on the meta device: nothing is allocated)."""
import copy
import dataclasses

import pytest
import torch

from leanclip.models import openclip_config as oc


def _builtin() -> dict:
    from leanclip.models.openclip import model_configs, rescan_model_configs

    if not model_configs():
        rescan_model_configs()
    return {k: copy.deepcopy(v) for k, v in model_configs().items() if not k.startswith("leanclip")}


def test_every_config_open_clip_ships_passes():
    configs = _builtin()
    assert len(configs) > 100
    refused = {}
    for name, cfg in configs.items():
        try:
            oc.check_model_config(cfg)
        except ValueError as e:
            refused[name] = str(e)
    assert not refused, refused
    # the largest of them stays well inside the total (the bound refuses only what no real model needs)
    assert max(oc.config_param_count(c) for c in configs.values()) < oc.CONFIG_PARAMS_MAX / 4


def test_every_number_open_clip_takes_is_bounded():
    """A size field a new open_clip release adds must get a bound here, or configs could set it without one."""
    from open_clip.coca_model import MultimodalCfg
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    numeric = {f.name for c in (CLIPVisionCfg, CLIPTextCfg, MultimodalCfg) for f in dataclasses.fields(c)
               if any(t in str(f.type) for t in ("int", "float")) and "bool" not in str(f.type)}
    assert numeric - set(oc.CONFIG_NUMBERS) == set()


@pytest.mark.parametrize("name", ["ViT-B-32", "RN50", "ViT-bigG-14", "coca_ViT-B-32"])
def test_parameter_estimate_is_close_to_open_clip_s_count(name):
    from open_clip.coca_model import CoCa
    from open_clip.model import CLIP, CustomTextCLIP

    cfg = _builtin()[name]
    estimate = oc.config_param_count(cfg)
    custom = cfg.pop("custom_text", False)
    cls = CoCa if "multimodal_cfg" in cfg else (CustomTextCLIP if custom else CLIP)
    with torch.device("meta"):
        real = sum(p.numel() for p in cls(**cfg).parameters())
    assert 0.85 * real <= estimate <= 1.05 * real, (estimate, real)


@pytest.mark.parametrize("section,field,value", [
    ("vision_cfg", "layers", [3, 4, 10 ** 6, 3]),  # a ResNet tower's stages
    ("vision_cfg", "image_size", [224, -1]),
    ("vision_cfg", "patch_dropout", 1.0),
    ("text_cfg", "eos_id", 49408),  # not below the vocabulary size
    ("text_cfg", "no_causal_mask", "false"),
    ("text_cfg", "pool_type", 3),
    ("", "init_logit_scale", 1e3),  # exp() overflows fp32
    ("", "quick_gelu", 1),
])
def test_fields_are_typed_and_bounded(section, field, value):
    cfg = _builtin()["RN50" if field == "layers" else "ViT-B-32"]
    (cfg[section] if section else cfg)[field] = value
    with pytest.raises(ValueError, match=(f"{section}." if section else "") + field):
        oc.check_model_config(cfg)
