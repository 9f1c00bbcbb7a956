"""LLU's distance from the identity (per head, both regulariser forms; per epoch and in the run's result) and the
``blend=paper`` option (eq. 4: g(x) blended without normalizing it first), each against numbers written out by hand
or a float64 computation that shares no code with ``leanclip.heads``."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from leanclip import heads, kernels, llu
from leanclip.methods import prepare
from leanclip.trainer import TrainConfig


@pytest.fixture(autouse=True)
def _torch_backend():
    with kernels.set_backend("torch"):
        yield


def _unit(n, e, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, e, generator=g, dtype=dtype), dim=-1)


# ---------------------------------------------------------------------------------------------- identity distance
def _set_map(head, entries, bias):
    """W = I + the given (row, col) -> value entries, b = ``bias`` padded with zeros."""
    with torch.no_grad():
        head.weight.copy_(torch.eye(head.dim))
        for (i, j), v in entries.items():
            head.weight[i, j] += v
        head.bias.zero_()
        head.bias[:len(bias)] = torch.tensor(bias)


def test_identity_distances_by_hand(fresh_tiny):
    m = prepare(fresh_tiny(), "llu")
    e = m.llu_image.dim
    assert llu.identity_distances(m) == {h: {"w_minus_i_fro": 0.0, "b_norm": 0.0, "reg_mse": 0.0, "reg_norm": 0.0}
                                         for h in ("image", "text")}
    _set_map(m.llu_image, {(0, 1): 0.5, (2, 2): -0.5}, [3.0, 4.0])  # ||W-I||_F = sqrt(0.5), ||b|| = 5
    _set_map(m.llu_text, {(1, 0): 2.0}, [0.0, 0.0, 1.0])              # ||W-I||_F = 2, ||b|| = 1
    got = llu.identity_distances(m)
    want = {"image": {"w_minus_i_fro": math.sqrt(0.5), "b_norm": 5.0,
                      "reg_mse": 0.5 / e ** 2 + 25.0 / e, "reg_norm": math.sqrt(0.5) + 5.0},
            "text": {"w_minus_i_fro": 2.0, "b_norm": 1.0, "reg_mse": 4.0 / e ** 2 + 1.0 / e, "reg_norm": 3.0}}
    assert got.keys() == want.keys()
    for h in want:
        assert got[h] == pytest.approx(want[h], rel=1e-12)
    # the two regulariser forms the heads train with measure the same
    assert got["image"]["reg_mse"] == pytest.approx(float(m.llu_image.reg().detach()), rel=1e-6)
    m.llu_text.reg_form = "norm"
    assert got["text"]["reg_norm"] == pytest.approx(float(m.llu_text.reg().detach()), rel=1e-6)


def test_shared_map_reported_once(fresh_tiny):
    m = prepare(fresh_tiny(), "llu", shared=True)
    _set_map(m.llu_image, {(0, 0): 1.0}, [2.0])
    got = llu.identity_distances(m)
    assert list(got) == ["shared"] and got["shared"]["reg_norm"] == pytest.approx(3.0, rel=1e-12)


def _features(n=24, e=64, classes=4, seed=0):
    txt = _unit(classes, e, seed + 1, torch.float32)
    y = torch.arange(n) % classes
    x = F.normalize(txt[y] + 0.8 * _unit(n, e, seed + 2, torch.float32), dim=-1)
    return x, y, txt


def test_distance_logged_per_epoch_and_in_summary(fresh_tiny, tmp_path):
    m = prepare(fresh_tiny(), "llu", llu_lambda=1.0, llu_clusters=0)
    x, y, txt = _features(e=m.llu_image.dim)
    cfg = TrainConfig(method="llu", epochs=3, batch_size=10, lr=1e-2, optimizer="adamw", weight_decay=0.0,
                      warmup_epochs=0, progress=False, seed=1,
                      output=str(tmp_path))
    res = llu.train_llu(m, x, y, txt, cfg)
    rec = res["identity_distance"]
    assert [r["epoch"] for r in rec["per_epoch"]] == [1, 2, 3]
    assert rec["final"] == llu.identity_distances(m)
    assert {k: v for k, v in rec["per_epoch"][-1].items() if k != "epoch"} == rec["final"]
    first = rec["per_epoch"][0]["image"]["w_minus_i_fro"]
    assert 0 < first != rec["final"]["image"]["w_minus_i_fro"]  # the maps moved, and on between epochs
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    ends = [r for r in logged if "identity_distance" in r]
    assert [r["epoch"] for r in ends] == [1, 2, 3] and ends[-1]["identity_distance"] == rec["final"]
    assert [r["step"] for r in ends] == [3, 6, 9]  # the last step of each epoch (24 samples, batches of 10)


# ---------------------------------------------------------------------------------------------- blend=paper
def _eq4(x, w, b, bank, beta, gamma):
    """Eq. 4 in float64, written from the paper: out = normalize(alpha g(x) + (1 - alpha) x), g(x) = W x + b."""
    alpha = beta * torch.exp(-gamma * (1.0 - (x @ bank.t()).max(dim=1).values))[:, None]
    out = alpha * (x @ w.t() + b) + (1.0 - alpha) * x
    return out / out.norm(dim=1, keepdim=True)


def test_blend_paper_is_eq4_to_rounding():
    """The fp32 head (the gate's max through ``kernels.max_sim``) against eq. 4 in float64: outputs and the
    gradients of W and b to fp32 rounding."""
    e = 16
    bank, x = _unit(7, e, 0), _unit(10, e, 1)
    h = heads.LLUHead(e, 0.6, 4.0, blend="paper")
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        h.weight.mul_(1.7).add_(0.3 * torch.randn(e, e, generator=g))  # |g(x)| far from 1
        h.bias.add_(0.2 * torch.randn(e, generator=g))
    w = h.weight.detach().double().requires_grad_()
    b = h.bias.detach().double().requires_grad_()
    want = _eq4(x, w, b, bank, 0.6, 4.0)
    got = h(x.float(), bank.float())
    assert got.dtype == torch.float32 and torch.allclose(got.double(), want, rtol=0, atol=2e-6)
    up = _unit(10, e, 3)  # an arbitrary upstream gradient
    (got.double() * up).sum().backward()
    (want * up).sum().backward()
    assert torch.allclose(h.weight.grad.double(), w.grad, rtol=1e-4, atol=1e-6)
    assert torch.allclose(h.bias.grad.double(), b.grad, rtol=1e-4, atol=1e-6)
    normalized = heads.LLUHead(e, 0.6, 4.0)
    normalized.load_state_dict(h.state_dict())
    assert not torch.allclose(normalized(x.float(), bank.float()), got, atol=1e-3)  # the default normalizes g(x)


def test_blend_paper_fp32_to_rounding_and_identity_at_start(fresh_tiny):
    m = prepare(fresh_tiny(), "llu", blend="paper")
    e = m.llu_image.dim
    assert m.llu_image.blend == m.llu_text.blend == "paper"
    x, bank = _unit(6, e, 4, torch.float32), _unit(5, e, 5, torch.float32)
    assert torch.allclose(m.llu_image(x, bank), x, atol=1e-6)  # W = I, b = 0: out = x for either blend
    with torch.no_grad():
        m.llu_image.weight.mul_(2.0)
    want = _eq4(x.double(), m.llu_image.weight.double(), m.llu_image.bias.double(), bank.double(), 0.5, 20.0)
    assert torch.allclose(m.llu_image(x, bank).double(), want, atol=1e-6)


def test_bad_blend_rejected_before_any_change(fresh_tiny):
    m = fresh_tiny()
    with pytest.raises(ValueError, match="blend must be one of normalized, paper"):
        prepare(m, "llu", blend="eq4")
    assert not hasattr(m, "llu_image")
