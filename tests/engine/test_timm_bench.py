"""``leanclip bench step`` on models with a timm image tower: every mode builds and steps (the tower's own gradient
checkpointing is timm's ``set_grad_checkpointing``), and a tokenizer that cannot be had offline (SigLIP's, from the
Hugging Face hub) falls back to open_clip's SimpleTokenizer at the model's context length, with a warning."""
import pytest
import torch

pytest.importorskip("timm")

from leanclip.bench import common, step  # noqa: E402
from leanclip.configs import register_tiny_timm_config  # noqa: E402


@pytest.mark.parametrize("mode", ["plain", "plain+gc", "lean:mlp+qkv", "lean:block/1"])
@pytest.mark.parametrize("family", ["vit-map", "eva02"])
def test_step_modes_on_timm_towers(family, mode):
    name = register_tiny_timm_config(family)
    method = "ln" if mode.startswith("plain") else "lora"  # LoRA runs in the lean blocks only
    run, _, model = step.make_step(name, method, mode, batch_size=2, n_classes=3, device=torch.device("cpu"),
                                   tokenizer=common.bench_tokenizer(name), scope="image")
    assert model.visual.trunk.grad_checkpointing == (mode == "plain+gc")
    # LN weights, LoRA's B (zero at start: any step moves it; A's first moves are below float32 resolution at lr 1e-3)
    watched = {n: p.detach().clone() for n, p in model.named_parameters()
               if p.requires_grad and n.startswith("visual.") and (method == "ln" or n.endswith(".B"))}
    for _ in range(2):
        assert torch.isfinite(run())
    assert watched and all(not torch.equal(watched[n], p) for n, p in model.named_parameters() if n in watched)


def test_bench_tokenizer_falls_back_offline(monkeypatch):
    import open_clip

    name = register_tiny_timm_config("eva02")

    def offline(_):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(open_clip, "get_tokenizer", offline)
    with pytest.warns(UserWarning, match=r"tokenizer of leanclip-tiny-eva02 is not available \(OSError: We couldn't "
                                         r"connect.*SimpleTokenizer with its 24-token context"):
        tok = common.bench_tokenizer(name)
    assert tok(["a photo of a cat"]).shape == (1, 24)
