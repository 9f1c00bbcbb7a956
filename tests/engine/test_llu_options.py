"""LLU ablation options (gate, init, reg, shared): each head's math against a float64 reference, the options through
prepare, training, the checkpoint, and ``leanclip train`` / ``leanclip eval`` (recorded and re-applied)."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from leanclip import cli, heads, llu
from leanclip.checkpoint import load_trainable, save_trainable
from leanclip.methods import prepare
from tests.engine.cli_checks import run as _run


def _unit(n, e, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, e, generator=g, dtype=torch.float64), dim=-1)


def _reference(x, w, b, bank, gate, beta=0.5, gamma=20.0, threshold=0.1):
    """LLU output in float64, written from the formulas (no code shared with leanclip.heads)."""
    x, w, b, bank = (t.double() for t in (x, w, b, bank))
    dist = 1.0 - (x @ bank.t()).max(dim=1).values
    alpha = {"exp": beta * torch.exp(-gamma * dist), "dirac": (dist <= threshold).double(),
             "none": torch.ones_like(dist)}[gate][:, None]
    g = x @ w.t() + b
    g = g / g.norm(dim=1, keepdim=True)
    out = alpha * g + (1 - alpha) * x
    return out / out.norm(dim=1, keepdim=True), alpha[:, 0]


def _perturbed(head, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.add_(0.3 * torch.randn(head.weight.shape, generator=g))
        head.bias.add_(0.1 * torch.randn(head.bias.shape, generator=g))
    return head


@pytest.mark.parametrize("gate", ["exp", "dirac", "none"])
def test_gate_matches_float64_reference(gate):
    e = 16
    bank = _unit(9, e, 0)
    # samples at spread-out distances from the bank: some within the Dirac threshold, some beyond
    x = F.normalize(bank[torch.arange(12) % 9] + torch.linspace(0.05, 1.5, 12, dtype=torch.float64)[:, None]
                    * _unit(12, e, 1), dim=-1)
    dist = 1 - (x @ bank.t()).max(1).values
    threshold = float(dist.sort().values[5:7].mean())  # midway between two samples' distances: no tie at the edge
    h = _perturbed(heads.LLUHead(e, 0.7, 5.0, gate=gate, threshold=threshold))
    ref, alpha = _reference(x, h.weight, h.bias, bank, gate, 0.7, 5.0, threshold)
    got = h(x.float(), bank.float())
    assert torch.allclose(h.alpha(x.float(), bank.float()).double(), alpha, atol=1e-6)
    assert torch.allclose(got.double(), ref, atol=1e-5)
    if gate == "dirac":
        assert sorted(alpha.tolist()) == [0.0] * 6 + [1.0] * 6  # a hard mask, both values present
    if gate == "none":
        assert torch.allclose(got, F.normalize(h.transform(x.float()), dim=-1), atol=1e-6)
        assert torch.allclose(h(x.float()), got)  # no bank needed


def test_random_init_is_seeded_and_not_identity():
    e = 16
    a = heads.LLUHead(e, init="random", generator=torch.Generator().manual_seed(3))
    b = heads.LLUHead(e, init="random", generator=torch.Generator().manual_seed(3))
    c = heads.LLUHead(e, init="random", generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert not torch.equal(a.weight, c.weight)
    bound = 1 / math.sqrt(e)
    a = a.requires_grad_(False)
    assert float(a.weight.abs().max()) <= bound and float(a.bias.abs().max()) <= bound
    assert float(a.weight.std()) == pytest.approx(bound / math.sqrt(3), rel=0.2)  # U(-bound, bound)
    x = _unit(5, e, 2).float()
    assert not torch.allclose(a(x, x), x, atol=1e-3)  # not the identity at start (identity init is: test_llu.py)


@pytest.mark.parametrize("form", ["mse", "norm"])
def test_regulariser_forms_float64(form):
    e = 8
    h = _perturbed(heads.LLUHead(e, reg=form)).double()
    d, b = (h.weight - torch.eye(e, dtype=torch.float64)).detach(), h.bias.detach()
    want = (d.square().sum() / e ** 2 + b.square().sum() / e) if form == "mse" else \
        (d.square().sum().sqrt() + b.square().sum().sqrt())
    r = h.reg()
    assert r.dtype == torch.float64 and float(r.detach()) == pytest.approx(float(want), rel=1e-12)
    r.backward()
    gw = 2 * d / e ** 2 if form == "mse" else d / d.norm()
    gb = 2 * b / e if form == "mse" else b / b.norm()
    assert torch.allclose(h.weight.grad, gw, rtol=1e-10) and torch.allclose(h.bias.grad, gb, rtol=1e-10)
    at_identity = heads.LLUHead(e, reg=form)
    at_identity.reg().backward()  # subgradient 0 at (I, 0), not NaN
    assert float(at_identity.reg().detach()) == 0.0 and not at_identity.weight.grad.any()


def test_shared_map_one_parameter_set(fresh_tiny, tmp_path):
    m = prepare(fresh_tiny(), "llu", shared=True, init="random")
    assert m.llu_text.weight is m.llu_image.weight and m.llu_text.bias is m.llu_image.bias
    e = m.llu_image.dim
    assert sum(p.numel() for p in llu._head_params(m)) == e * e + e
    # one map: one regulariser term
    assert float(llu.llu_reg(m).detach()) == pytest.approx(float(m.llu_image.reg().detach()))
    # separate banks, one map: the text head gates against its own bank
    m.llu_image.set_bank(_unit(4, e, 0).float())
    m.llu_text.set_bank(_unit(3, e, 1).float())
    assert not torch.equal(m.llu_image.bank, m.llu_text.bank)
    save_trainable(m, tmp_path / "c.safetensors")
    m2 = prepare(fresh_tiny(), "llu", shared=True, init="random", init_seed=5)
    load_trainable(m2, tmp_path / "c.safetensors")
    assert m2.llu_text.weight is m2.llu_image.weight and torch.equal(m2.llu_image.weight, m.llu_image.weight)
    assert torch.equal(m2.llu_text.bank, m.llu_text.bank)


def test_unshared_heads_differ_with_random_init(fresh_tiny):
    m = prepare(fresh_tiny(), "llu", init="random", init_seed=2)
    m2 = prepare(fresh_tiny(), "llu", init="random", init_seed=2)
    assert not torch.equal(m.llu_image.weight, m.llu_text.weight)
    assert torch.equal(m.llu_text.weight, m2.llu_text.weight)
    assert float(llu.llu_reg(m).detach()) == pytest.approx(float((m.llu_image.reg() + m.llu_text.reg()).detach()))


@pytest.mark.parametrize("opts,needle", [
    ({"gate": "soft"}, "gate"), ({"init": "zeros"}, "init"), ({"reg": "l1"}, "reg"), ({"threshold": 2.5}, "threshold"),
    ({"threshold": float("nan")}, "threshold"), ({"shared": "yes"}, "shared"), ({"init_seed": -1}, "init_seed"),
])
def test_bad_options_rejected_before_any_change(fresh_tiny, opts, needle):
    m = fresh_tiny()
    with pytest.raises(ValueError, match=needle):
        prepare(m, "llu", **opts)
    assert not hasattr(m, "llu_image") and all(p.requires_grad for p in m.parameters())


# ------------------------------------------------------------------------------------------------------------ CLI
ABLATIONS = {
    "paper-reg": ["reg=norm"],
    "random-init": ["init=random", "init_seed=3"],
    "dirac": ["gate=dirac", "threshold=0.2"],
    "linear": ["gate=none", "init=random"],
    "shared": ["shared=true"],
    "paper-blend": ["blend=paper"],
}
LAMBDA = {"linear": 0}  # the linear ablation as docs/PAPERS.md writes it: no pull towards the identity


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_cli_train_then_eval_reapplies(capsys, tmp_path, weights, synth_dir, monkeypatch, name):
    from leanclip import methods

    opts = [a for o in ABLATIONS[name] for a in ("--opt", o)]
    data = ["--synthetic-classes", 4, "--synthetic-dir", synth_dir, "--no-progress", "--threads", 1]
    rc, out, err = _run(capsys, "train", "--method", "llu", *opts, "--pretrained", weights, "--shots", 4,
                        "--epochs", 2, "--lr", 0.01, "--llu-lambda", LAMBDA.get(name, 0.1), "--output", tmp_path,
                        *data)
    assert rc == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert [r["epoch"] for r in res["identity_distance"]["per_epoch"]] == [1, 2]
    assert list(res["identity_distance"]["final"]) == (["shared"] if name == "shared" else ["image", "text"])
    want = dict(o.split("=") for o in ABLATIONS[name])
    meta = cli.common.read_checkpoint_meta(tmp_path)
    assert {k: str(meta["options"][k]).lower() for k in want} == want  # recorded in the checkpoint
    seen = {}
    real = methods.prepare

    def spy(model, method, **kw):
        seen.update(kw)
        return real(model, method, **kw)

    monkeypatch.setattr(methods, "prepare", spy)
    rc, out, err = _run(capsys, "eval", "--checkpoint", tmp_path, "--pretrained", weights, *data)
    assert rc == 0, err
    assert {k: str(seen[k]).lower() for k in want} == want  # re-applied by eval
    assert json.loads(out.strip().splitlines()[-1])["top1"] == pytest.approx(res["metrics"]["test"]["top1"])


def test_cli_bad_option_value_exit_2(capsys, tmp_path, weights, synth_dir):
    rc, out, err = _run(capsys, "train", "--method", "llu", "--opt", "gate=soft", "--pretrained", weights,
                        "--output", tmp_path / "run", "--synthetic-dir", synth_dir, "--no-progress")
    assert rc == 2 and "gate" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
    rc, _, err = _run(capsys, "train", "--method", "llu", "--opt", "threshold=x", "--output", tmp_path / "run",
                      "--synthetic-dir", synth_dir, "--no-progress")
    assert rc == 2 and "threshold" in err and not (tmp_path / "run").exists()
