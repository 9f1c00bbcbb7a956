"""A memory budget instead of a policy name: the budget's forms, the planner's choices (never more recompute than
the budget needs; no recompute where plain's peak fits), per-block plans exact against plain, what a run records,
and the command line's checks."""
import copy
import json

import pytest
import torch

from leanclip import budget, lean, methods
from tests.engine.test_lean import CLASSNAMES, _compare, _prep

GiB = 2 ** 30


@pytest.mark.parametrize("value,plain,want", [
    (12 * GiB, 1, 12 * GiB), ("12GiB", 1, 12 * GiB), ("800MB", 1, 800 * 10 ** 6), ("0.25", 1000, 250),
    (0.5, 1000, 500), (1.0, 1000, 1000), ("5000B", 1, 5000),
])
def test_budget_forms(value, plain, want):
    assert budget.resolve_budget(value, plain) == want


@pytest.mark.parametrize("value", [0, -1, 1.5, 0.0, float("nan"), True, "lots", "0", "-2GiB", "12XB", None, "1.5",
                                   "5000", "nan"])
def test_bad_budgets_are_named(value):
    with pytest.raises(ValueError, match="memory_budget"):
        budget.resolve_budget(value, 1000)


def _lean_ln(fresh_tiny, tower="both"):
    m = methods.prepare(fresh_tiny(), "ln", tower=tower, lean=True, classnames=CLASSNAMES)
    return m


def test_plans_fit_and_need_no_more_recompute_than_the_budget_does(fresh_tiny):
    m = _lean_ln(fresh_tiny)
    kw = dict(text_batch_size=3)
    peaks = {p: budget.predict_peak(m, 6, p, **kw) for p in lean.POLICIES}
    assert peaks["none"] > peaks["block"]  # (between them the order depends on the model: transients grow)
    assert budget.predict_peak(m, 6, "block", 1, **kw) < peaks["block"]
    work = []
    for limit in sorted({*peaks.values(), budget.predict_peak(m, 6, "block", 1, **kw), int(peaks["none"] * 0.6)},
                        reverse=True):
        plan = budget.plan_recompute(m, limit, 6, **kw)
        assert plan.peak <= limit
        work.append(plan.work)
    assert work == sorted(work) and work[0] == 0.0 < work[-1]  # a smaller budget never buys less recompute


def test_a_budget_plain_fits_gets_no_recompute(fresh_tiny):
    """``auto`` is never slower than plain when plain fits: the lean modules with every block at ``none``."""
    plain_model = methods.prepare(fresh_tiny(), "ln", lean=False, classnames=CLASSNAMES)
    plain = budget.plain_peak(plain_model, 6, text_batch_size=3)
    m = methods.prepare(fresh_tiny(), "ln", recompute="auto", memory_budget=1.0, batch_size=6, text_batch_size=3,
                        classnames=CLASSNAMES)
    record = m.leanclip_info["options"]["recompute_plan"]
    assert {p for pols in record["policies"].values() for p in pols} == {"none"}
    assert record["plain_peak_bytes"] == plain and record["budget_bytes"] == plain


def test_too_small_a_budget_names_the_smallest_peak_and_changes_nothing(fresh_tiny):
    m = fresh_tiny()
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(ValueError, match=r"below the smallest predicted step peak for batch 6: [\d.,]+ MiB"):
        methods.prepare(m, "ln", recompute="auto", memory_budget=1000, batch_size=6, classnames=CLASSNAMES)
    assert not lean.is_lean(m) and not hasattr(m, "leanclip_info")
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def _mixed_budget(fresh_tiny, batch):
    """A budget whose plan mixes policies across blocks (found by walking down from plain's peak)."""
    m = _lean_ln(fresh_tiny)
    top = budget.predict_peak(m, batch, "none", text_batch_size=3)
    mixed = []
    for frac in [i / 80 for i in range(80, 0, -1)]:
        try:
            plan = budget.plan_recompute(m, int(top * frac), batch, text_batch_size=3)
        except ValueError:
            break
        if any(len(set(p)) > 1 for p in plan.policies.values()):
            mixed.append((int(top * frac), plan))
    assert mixed, "no budget gives a mixed plan on the tiny model"
    with_chunks = [(limit, plan) for limit, plan in mixed if plan.chunk is not None]
    return (with_chunks or mixed)[0]


def test_a_mixed_plan_is_exact(fresh_tiny, tokenizer):
    """Blocks under different policies (and chunks) in one tower: logits and every gradient equal plain's."""
    torch.manual_seed(2)
    images, labels = torch.randn(5, 3, 32, 32), torch.tensor([0, 2, 1, 1, 0])
    limit, plan = _mixed_budget(fresh_tiny, 5)
    with pytest.warns(UserWarning, match="memory budget .* predicted step peak"):
        m = methods.prepare(fresh_tiny(), "ln", recompute="auto", memory_budget=limit, batch_size=5,
                            text_batch_size=3, classnames=CLASSNAMES)
    blocks = [b for b in m.modules() if isinstance(b, lean.LeanResidualAttentionBlock)]
    assert len({b.leanclip_recompute for b in blocks}) > 1
    assert m.leanclip_info["options"]["recompute_plan"]["policies"] == {k: list(v) for k, v in plan.policies.items()}
    ref = _prep(fresh_tiny(), "ln", {}, tokenizer, True, "none")
    _compare(ref, m, tokenizer, images, labels)


def test_budget_arguments(fresh_tiny):
    with pytest.raises(ValueError, match="needs recompute='block'"):
        methods.prepare(fresh_tiny(), "ln", recompute="auto", memory_budget=0.5, batch_size=4, recompute_chunk=2)
    with pytest.raises(ValueError, match="memory_budget"):
        methods.prepare(fresh_tiny(), "ln", recompute="auto", memory_budget="lots", batch_size=4)
    with pytest.raises(ValueError, match="needs batch_size"):
        methods.prepare(fresh_tiny(), "ln", recompute="auto", memory_budget=0.5)


def test_train_plans_for_a_budget_and_records_it(tmp_path, capsys):
    from leanclip import cli

    out = tmp_path / "run"
    rc = cli.main(["train", "--method", "ln", "--epochs", "1", "--shots", "1", "--memory-budget", "0.3",
                   "--no-progress", "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 0, err[-2000:]
    assert "memory budget" in err and "predicted step peak" in err
    res = json.loads((out / "result.json").read_text())
    assert res["recompute"] == "auto" and res["memory_budget"] == "0.3"
    plan = res["recompute_plan"]
    assert plan["predicted_peak_bytes"] <= plan["budget_bytes"] == int(0.3 * plan["plain_peak_bytes"])


@pytest.mark.parametrize("extra,match", [
    (["--memory-budget", "0.3", "--recompute", "block"], "chooses the recompute policy"),
    (["--memory-budget", "0.3", "--no-lean"], "--no-lean"),
    (["--memory-budget", "lots"], "--memory-budget"),
    (["--memory-budget", "1.5GiBs"], "--memory-budget"),
    (["--memory-budget", "1.5"], "a number without a unit is a fraction"),
])
def test_budget_flag_errors(extra, match, tmp_path, capsys):
    from leanclip import cli

    rc = cli.main(["train", "--method", "ln", "--epochs", "1", "--output", str(tmp_path / "r"), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and match in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


def test_a_tower_the_estimate_does_not_cover_is_refused(fresh_tiny, monkeypatch):
    """Lean blocks the step-peak estimate cannot see (another family's tower) make the planner refuse in one line
    instead of leaving them at ``none`` under a budget they would break."""
    m = _lean_ln(fresh_tiny)
    real = budget.tower_shapes
    monkeypatch.setattr(budget, "tower_shapes", lambda *a, **k: [s for s in real(*a, **k) if s.name == "text"])
    with pytest.raises(ValueError, match="estimate covers open_clip, timm and Hugging Face towers, not "
                                         ".*LeanResidual"):
        budget.plan_recompute(m, 10 ** 9, 4, text_batch_size=3)
