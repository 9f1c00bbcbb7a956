"""``leanclip bench step`` on the methods that add modules to the features: CoOp's prompts and CLIP-Adapter run in
the plain modes too (their parameters move), and LLU (a cached-feature method) times its heads' step on features
encoded once, which the row says. Timings are never asserted."""
import pytest
import torch

from leanclip import llu
from leanclip.bench import common, step, step_report
from leanclip.configs import register_tiny_config

MODES = ["plain", "plain+gc", "lean:none", "lean:block"]


@pytest.fixture(scope="module")
def tiny():
    return register_tiny_config()


@pytest.mark.parametrize("method", ["coop", "adapter", "llu"])
@pytest.mark.parametrize("mode", ["plain", "lean:none"])
def test_step_trains_the_method(tiny, method, mode):
    run, _, model = step.make_step(tiny, method, mode, batch_size=2, n_classes=3, device=torch.device("cpu"),
                                   tokenizer=common.bench_tokenizer(tiny))
    watched = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for _ in range(2):
        assert torch.isfinite(run())
    assert watched and all(not torch.equal(watched[n], p) for n, p in model.named_parameters() if n in watched)
    frozen = [p for n, p in model.named_parameters() if n.startswith("visual.") and n not in watched]
    assert frozen and not any(p.grad is not None for p in frozen)


def test_llu_step_is_the_head_loss_on_encoded_features(tiny):
    tok = common.bench_tokenizer(tiny)
    _, forward, model = step.make_step(tiny, "llu", "lean:none", batch_size=3, n_classes=4,
                                       device=torch.device("cpu"), tokenizer=tok)
    size = model.visual.image_size
    images, labels = step._inputs(3, 4, size if isinstance(size, int) else size[0], torch.device("cpu"))
    from leanclip.features import image_features

    with torch.no_grad():
        feats = image_features(model, images)
        txt = llu.class_text_features(model, [f"class number {i}" for i in range(4)], list(step.TEMPLATES), tok)
    assert torch.allclose(model.llu_image.bank, feats, atol=1e-6)
    assert torch.allclose(model.llu_text.bank, txt, atol=1e-6)
    want = llu.llu_loss(model, feats, labels, txt, 1e3)[0]
    assert float(forward()) == pytest.approx(float(want), rel=1e-6)
    calls = []  # the towers never run in the step
    handle = model.visual.register_forward_hook(lambda *a: calls.append(1))
    forward().backward()
    handle.remove()
    assert calls == []


@pytest.mark.parametrize("method", ["llu", "coop", "adapter"])
def test_bench_one_runs_and_notes_a_cached_step(tiny, method):
    row = step.bench_one(tiny, method, MODES, batch_size=2, n_classes=3, device=torch.device("cpu"), reps=1)
    assert set(row["seconds"]) == set(MODES) and row["failed"] == {}
    assert ("step" in row) == (method == "llu")
    if method == "llu":
        assert "encoded before timing" in row["step"]
        assert "step:" in step_report.summarize({"machine": {"device": "cpu", "cpu": "x", "torch": "t"}, "rows": [row]})
