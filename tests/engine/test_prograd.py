"""ProGrad: the step's gradient equals the projection computed by hand from two separate autograd.grad calls (CE and
KL to the zero-shot logits), when they conflict and when they do not, over micro-batches and per parameter tensor;
the CLI round trip, one process against two, its preset and its option errors."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from leanclip import features as feats
from leanclip import methods, registry
from leanclip.methods.prograd import project
from leanclip.select import trainable_parameters
from leanclip.step import ClassifyStep
from tests.engine.cli_checks import last_json, run, torchrun_two

CLASSNAMES = ["cat", "dog", "red car", "tree"]
TEMPLATES = ["a photo of a {}."]


def _hand(model, images, labels, tok, lam=1.0, t=1.0):
    """(ProGrad's gradient per trainable tensor, <g_ce, g_kl> per tensor), written out."""
    params = [p for _, p in trainable_parameters(model)]
    img = feats.image_features(model, images)
    logits = feats.class_logits(model, img, feats.text_features(model, CLASSNAMES, TEMPLATES, tok))
    ce = F.cross_entropy(logits, labels)
    zs = model.logit_scale.exp() * img.detach() @ feats.frozen_text_features(model, CLASSNAMES, TEMPLATES, tok).t()
    p0 = torch.softmax(zs / t, dim=-1)
    kl = t * t * (p0 * (torch.log(p0) - torch.log_softmax(logits / t, dim=-1))).sum(-1).mean()
    g_ce = torch.autograd.grad(ce, params, retain_graph=True)
    g_kl = torch.autograd.grad(kl, params)
    dots = [torch.dot(a.flatten(), b.flatten()) for a, b in zip(g_ce, g_kl)]
    return [a - lam * d / b.pow(2).sum() * b if d < 0 else a for a, b, d in zip(g_ce, g_kl, dots)], dots


def _step_grads(model, images, labels, tok, micro=1):
    step = ClassifyStep(model, CLASSNAMES, TEMPLATES, tok)
    for _, p in trainable_parameters(model):
        p.grad = None
    step.begin()
    n = len(labels)
    for chunk in torch.arange(n).chunk(micro):
        step.micro(images[chunk], labels[chunk], weight=len(chunk) / n)
    step.finish()
    return [p.grad.clone() for _, p in trainable_parameters(model)]


def test_projection_formula():
    a = torch.tensor([1.0, 0.0])
    torch.testing.assert_close(project(a, torch.tensor([-1.0, 1.0])), torch.tensor([0.5, 0.5]))  # now orthogonal
    torch.testing.assert_close(project(a, torch.tensor([-1.0, 1.0]), lam=0.5), torch.tensor([0.75, 0.25]))
    torch.testing.assert_close(project(a, torch.tensor([1.0, 1.0])), a)  # no conflict
    torch.testing.assert_close(project(a, torch.zeros(2)), a)


@pytest.fixture
def model(fresh_tiny, tok):
    torch.manual_seed(0)
    m = fresh_tiny()
    methods.prepare(m, "prograd", classnames=CLASSNAMES, tokenizer=tok, n_ctx=8)
    with torch.no_grad():  # away from the zero-shot prompts, so that CE and KL have gradients of both signs
        m.prompt_learner.ctx.add_(0.5 * torch.randn_like(m.prompt_learner.ctx))
    return m


def test_step_applies_the_projection_in_both_cases(model, tok):
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    seen = set()
    for seed in range(30):
        labels = torch.randint(0, len(CLASSNAMES), (4,), generator=torch.Generator().manual_seed(seed))
        want, dots = _hand(model, images, labels, tok)
        case = bool(dots[0] < 0)
        if case in seen:
            continue
        seen.add(case)
        for micro in (1, 2):  # the rule's gradients accumulate over micro-batches like the CE's
            got = _step_grads(model, images, labels, tok, micro)
            torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-6)
        if len(seen) == 2:
            break
    assert seen == {True, False}


def test_projection_is_per_tensor_with_image_side_parameters(fresh_tiny, tok):
    """ln+prograd: the LayerNorms reach the losses directly (image side) and through the text features; each
    tensor is projected on its own, as in the authors' code."""
    torch.manual_seed(2)
    m = fresh_tiny()
    methods.prepare(m, "ln+prograd", classnames=CLASSNAMES, tokenizer=tok, n_ctx=8, lam=0.7, temperature=2.0)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([3, 2, 1, 0])
    want, dots = _hand(m, images, labels, tok, lam=0.7, t=2.0)
    got = _step_grads(m, images, labels, tok, micro=2)
    assert any(d < 0 for d in dots) and any(d > 0 for d in dots)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_context_init_is_right_aligned(fresh_tiny, tok):
    m = fresh_tiny()
    methods.prepare(m, "prograd", classnames=CLASSNAMES, tokenizer=tok)
    ctx = m.prompt_learner.ctx.detach()
    assert ctx.shape[0] == 16 and ctx[:12].abs().sum() == 0
    torch.testing.assert_close(ctx[12:], m.token_embedding(tok(["a photo of a"]))[0, 1:5].detach())


@pytest.mark.parametrize("kw,msg", [
    (dict(lam=2.0), "lam must be a finite number in [0, 1]"),
    (dict(temperature=0.0), "temperature must be a finite number in (0, 100]"),
    (dict(n_ctx=2), "init_text 'a photo of a' is 4 tokens, n_ctx=2"),
    (dict(tokenizer=None), "'prograd' needs tokenizer"),
])
def test_bad_options_are_one_line_errors(fresh_tiny, tok, kw, msg):
    m = fresh_tiny()
    with pytest.raises(ValueError) as e:
        methods.prepare(m, "prograd", **{"classnames": CLASSNAMES, "tokenizer": tok, **kw})
    assert msg in str(e.value) and "\n" not in str(e.value) and not hasattr(m, "prompt_learner")


def test_combinations_are_checked():
    with pytest.raises(ValueError, match="'prograd' and 'cocoop' both replace the prompts"):
        registry.parse_method("prograd+cocoop")
    registry.register_method("rule-b", lambda model: {}, traits=registry.MethodTraits(gradient_rule=lambda ctx: None))
    try:
        with pytest.raises(ValueError, match="'prograd' and 'rule-b' each change the step's gradient"):
            registry.parse_method("prograd+rule-b")
    finally:
        for table in (registry.METHODS, registry.METHOD_TRAITS, registry.METHOD_RANGES):
            table.pop("rule-b")


def test_preset_prograd_is_coops_schedule():
    from leanclip.cli.classify import preset_defaults
    from leanclip.cli.parser import build_parser

    for shots, epochs in ((16, 200), (4, 100), (1, 50)):
        args = build_parser("train").parse_args(["train", "--preset", "prograd", "--shots", str(shots)])
        assert preset_defaults(args.preset, args) == {"optimizer": "sgd", "lr": 2e-3, "weight_decay": 5e-4,
                                                      "batch_size": 32, "warmup_epochs": 1, "epochs": epochs}


def test_cli_train_then_eval_round_trip(capsys, tmp_path, synth_dir, weights):
    data = ["--pretrained", weights, "--synthetic-classes", 4, "--synthetic-dir", synth_dir, "--no-progress",
            "--threads", 1]
    rc, out, err = run(capsys, "train", "--method", "prograd", "--preset", "prograd", "--epochs", 1, "--batch-size",
                       4, "--shots", 2, "--opt", "lam=0.8", "--output", tmp_path / "r", *data)
    assert rc == 0, err
    res = last_json(out)
    assert res["method"] == "prograd" and res["steps"] == 2 and res["lean"] is True
    rc, out2, err = run(capsys, "eval", "--checkpoint", tmp_path / "r", *data)
    assert rc == 0, err
    assert last_json(out2)["top1"] == pytest.approx(res["metrics"]["test"]["top1"])


@pytest.mark.parametrize("argv,msg", [
    (("--opt", "lam=1.5"), "lam of method 'prograd' must be a finite number in [0, 1]"),
    (("--opt", "init_text=a photo of a big red cat", "--opt", "n_ctx=4"),
     "init_text 'a photo of a big red cat' is 7 tokens, n_ctx=4: the context starts from init_text only when it has "
     "at most n_ctx tokens"),
])
def test_cli_bad_options_exit_2_in_one_line(capsys, tmp_path, weights, argv, msg):
    rc, _, err = run(capsys, "train", "--method", "prograd", *argv, "--pretrained", weights, "--output", tmp_path / "x")
    assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_two_processes_project_the_summed_gradients(tmp_path, capsys):
    """Under torchrun the projection acts on the whole batch's gradients (both summed over the processes): the same
    losses and weights as one process."""
    args = ["train", "--method", "prograd", "--shots", "0", "--synthetic-classes", "2", "--epochs", "1",
            "--batch-size", "7", "--lr", "0.01", "--warmup-epochs", "0", "--seed", "3", "--threads", "1",
            "--no-progress", "--device", "cpu", "--pretrain-steps", "0", "--opt", "n_ctx=4",
            "--synthetic-dir", str(tmp_path / "syn")]
    from leanclip import cli

    assert cli.main([*args, "--output", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    torchrun_two([*args, "--output", str(tmp_path / "two")], 300)

    def losses(d: Path):
        return [json.loads(line)["loss"] for line in (d / "log.jsonl").read_text().splitlines()]

    torch.testing.assert_close(torch.tensor(losses(tmp_path / "two")), torch.tensor(losses(tmp_path / "one")),
                               rtol=1e-5, atol=0)
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "one" / "checkpoint.safetensors"), load_file(tmp_path / "two" / "checkpoint.safetensors")
    torch.testing.assert_close(b["prompt_learner.ctx"], a["prompt_learner.ctx"], rtol=1e-4, atol=1e-6)
