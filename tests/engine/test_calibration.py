"""The first step's measured peak against the recompute plan: a measurement within the budget keeps the plan; one
above it re-plans for the budget scaled by measured / predicted, and the run stays the same run."""
import json

import pytest
import torch

from leanclip import budget, calibration, lean, methods
from tests.engine.test_lean import CLASSNAMES


def _planned(fresh_tiny, fraction=0.6):
    with pytest.warns(UserWarning, match="memory budget"):
        return methods.prepare(fresh_tiny(), "ln", recompute="auto", memory_budget=fraction, batch_size=6,
                               text_batch_size=3, classnames=CLASSNAMES)


def _policies(model):
    return [(b.leanclip_recompute, b.leanclip_chunk) for b in model.modules() if getattr(type(b), "lean_block", False)]


def test_a_peak_within_the_budget_keeps_the_plan(fresh_tiny):
    m = _planned(fresh_tiny)
    plan = m.leanclip_info["options"]["recompute_plan"]
    before = _policies(m)
    rec = calibration.calibrate(m, plan["budget_bytes"])
    assert rec["replanned"] is False and rec["ratio"] == plan["budget_bytes"] / plan["predicted_peak_bytes"]
    assert _policies(m) == before and m.leanclip_info["options"]["recompute_plan"]["calibration"] == rec


def test_a_peak_over_the_budget_replans_for_the_scaled_budget(fresh_tiny):
    m = _planned(fresh_tiny, 1.0)  # plain fits: every block at none
    plan = m.leanclip_info["options"]["recompute_plan"]
    assert {p for p, _ in _policies(m)} == {"none"}
    measured = 2 * plan["predicted_peak_bytes"]  # the device needed twice what the estimate said
    with pytest.warns(UserWarning, match="re-planned"):
        rec = calibration.calibrate(m, measured)
    new = m.leanclip_info["options"]["recompute_plan"]
    scaled = int(plan["budget_bytes"] * plan["predicted_peak_bytes"] / measured)
    assert rec["replanned"] is True and rec["scaled_budget_bytes"] == scaled
    assert new["predicted_peak_bytes"] <= scaled and new["budget_bytes"] == plan["budget_bytes"]
    assert new["calibration"] is rec and rec["previous"] == plan["summary"]
    want = budget.plan_recompute(m, scaled, 6, text_batch_size=3)
    assert new["policies"] == {k: list(v) for k, v in want.policies.items()}
    assert {p for p, _ in _policies(m)} != {"none"}  # the blocks now run the new plan
    json.dumps(m.leanclip_info)


def test_no_plan_fits_the_scaled_budget(fresh_tiny):
    m = _planned(fresh_tiny)
    plan = m.leanclip_info["options"]["recompute_plan"]
    with pytest.raises(ValueError, match="the first step measured .* no plan fits"):
        calibration.calibrate(m, 1000 * plan["predicted_peak_bytes"])


def test_a_model_without_a_budget_plan_is_refused(fresh_tiny):
    m = methods.prepare(fresh_tiny(), "ln", lean=True, recompute="block", classnames=CLASSNAMES)
    with pytest.raises(ValueError, match="no recompute plan"):
        calibration.calibrate(m, 1)
    assert calibration.FirstStepCheck(m, torch.device("cuda")).active is False
    assert calibration.FirstStepCheck(_planned(fresh_tiny), torch.device("cpu")).active is False


def _train(fresh_tiny, tmp_path, name, monkeypatch, factor=None):
    """Two optimizer steps of the trainer; with ``factor``, the first step "measures" ``factor`` times the plan's
    predicted peak (the CUDA measurement, stood in for on CPU)."""
    import open_clip
    from leanclip.trainer import TrainConfig, train

    m = _planned(fresh_tiny, 1.0)
    if factor is not None:
        predicted = m.leanclip_info["options"]["recompute_plan"]["predicted_peak_bytes"]
        monkeypatch.setattr(calibration, "_measures", lambda device: True)
        monkeypatch.setattr(calibration, "_resident", lambda device: 1000)
        monkeypatch.setattr(calibration, "_peak", lambda device: 1000 + int(factor * predicted))
    torch.manual_seed(3)
    ds = torch.utils.data.TensorDataset(torch.randn(12, 3, 32, 32), torch.arange(12) % len(CLASSNAMES))
    cfg = TrainConfig(epochs=1, batch_size=6, lr=1e-2, seed=0, device="cpu", precision="fp32", progress=False,
                      warmup_epochs=0, output=str(tmp_path / name))
    res = train(m, ds, CLASSNAMES, ["a photo of a {}."], open_clip.get_tokenizer("ViT-B-16"), cfg)
    return m, res["losses"]


def test_a_run_replanned_after_its_first_step_is_the_same_run(fresh_tiny, tmp_path, monkeypatch):
    plain, losses = _train(fresh_tiny, tmp_path, "as-planned", monkeypatch)
    assert "calibration" not in plain.leanclip_info["options"]["recompute_plan"]  # CPU: nothing measured
    with pytest.warns(UserWarning, match="re-planned"):
        m, replanned = _train(fresh_tiny, tmp_path, "replanned", monkeypatch, factor=3.0)
    plan = m.leanclip_info["options"]["recompute_plan"]
    assert plan["calibration"]["replanned"] is True and abs(plan["calibration"]["ratio"] - 3.0) < 1e-6
    assert {p for p, _ in _policies(m)} != {"none"}
    assert len(losses) == len(replanned) == 2
    torch.testing.assert_close(torch.tensor(replanned), torch.tensor(losses), rtol=1e-6, atol=1e-7)
    for (n, p), (n2, q) in zip(plain.named_parameters(), m.named_parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=n)
