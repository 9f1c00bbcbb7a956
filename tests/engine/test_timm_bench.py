"""``leanclip bench step`` on models with a timm image tower: every mode builds and steps (the tower's own gradient
checkpointing is timm's ``set_grad_checkpointing``), and a tokenizer that cannot be had offline (SigLIP's, from the
Hugging Face hub) falls back to open_clip's SimpleTokenizer at the model's context length, with a warning."""
import pytest
import torch

pytest.importorskip("timm")

from leanclip.bench import common, step  # noqa: E402
from leanclip.configs import register_tiny_config, register_tiny_timm_config  # noqa: E402


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


def test_a_mode_refused_for_the_model_is_a_result_not_a_crash():
    """Plain LoRA on open_clip's own ViT blocks does not exist (``nn.MultiheadAttention`` reads ``in_proj_weight``
    itself; the deltas live in the lean blocks): the refusal is recorded under ``failed`` and the other modes still
    run, in one process and with --isolate (the child exits 2)."""
    row = step.bench_one(register_tiny_config(), "lora", ["plain", "lean:none"], batch_size=2, n_classes=3,
                         device=torch.device("cpu"), reps=1, scope="image")
    assert "projection deltas" in row["failed"]["plain"] and "lean:none" in row["seconds"]
    assert row["time_ratio_vs_plain"] == {"lean:none": None}  # no plain to compare with


def test_plain_lora_peers_run_on_a_timm_tower():
    """On a timm tower plain LoRA is timm's own blocks with hooked projections: plain, the tower's checkpointing and
    the lean policies all run (the image tower alone gets the pairs: scope image)."""
    row = step.bench_one(register_tiny_timm_config("pe-core"), "lora", ["plain", "plain+gc", "lean:block"],
                         batch_size=2, n_classes=3, device=torch.device("cpu"), reps=1, scope="image")
    assert row["failed"] == {} and set(row["seconds"]) == {"plain", "plain+gc", "lean:block"}


def test_isolate_records_a_refused_mode(monkeypatch):
    import subprocess
    import types

    def fake(argv, **_):
        mode = argv[argv.index("--modes") + 1]
        if mode == "plain":
            return types.SimpleNamespace(returncode=2, stdout="", stderr="leanclip: error: refused for this model\n")
        row = {"seconds": {mode: 1.0}, "peak_step_bytes": {mode: 10}, "model": "m", "method": "lora",
               "batch_size": 2, "n_classes": 3, "precision": "fp32", "scope": "image", "peak_method": "rss"}
        return types.SimpleNamespace(returncode=0, stdout=__import__("json").dumps({"rows": [row]}), stderr="")

    monkeypatch.setattr(subprocess, "run", fake)
    row = step.bench_isolated("m", "lora", ["plain", "lean:none"], batch_size=2, n_classes=3,
                              device=torch.device("cpu"), reps=1, precision="fp32", scope="image")
    assert row["failed"] == {"plain": "leanclip: error: refused for this model"} and row["seconds"] == {"lean:none": 1.0}

    def crash(argv, **_):
        return types.SimpleNamespace(returncode=1, stdout="", stderr="Traceback ...\nKeyError: 'x'\n")

    monkeypatch.setattr(subprocess, "run", crash)
    with pytest.raises(RuntimeError, match="failed in its own process: KeyError"):
        step.bench_isolated("m", "lora", ["plain"], batch_size=2, n_classes=3, device=torch.device("cpu"), reps=1,
                            precision="fp32", scope="image")
