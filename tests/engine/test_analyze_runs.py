"""``leanclip analyze RUN --grad`` / ``--tsne`` (CLIPFit Fig. 4 left / Fig. 5): the squared-gradient sums against a
direct float64 autograd computation of CLIPFit's loss on a plain tiny open_clip model; the command on tiny synthetic
runs (JSON = printed line, groups = sums of their tensors, seeded: the same numbers and PNG twice); the refusals
(one line, exit 2, before any write), scikit-learn missing included."""
import copy
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from leanclip import cli, kernels, prepare
from leanclip.grad_stats import squared_grad_sums
from leanclip.step import ClassifyStep
from tests.engine.cli_checks import run as _run

CLASSES, TEMPLATE = ["cat", "dog", "bird"], "a photo of a {}."


def _direct(plain, names, start, batches, lam=8.0):
    """sum over batches of each tensor's squared gradient of CE + lam * (1 - mean cos(t, t0)), float64 autograd on
    open_clip's own modules; t0 the text features of ``start`` (the model before training)."""
    tokens = __import__("open_clip").get_tokenizer("ViT-B-16")([TEMPLATE.format(c) for c in CLASSES])
    with torch.no_grad():
        t0 = F.normalize(start.encode_text(tokens), dim=-1)
    params = dict(plain.named_parameters())
    out = {n: 0.0 for n in names}
    for x, y in batches:
        t = F.normalize(plain.encode_text(tokens), dim=-1)
        img = F.normalize(plain.encode_image(x.double()), dim=-1)
        loss = F.cross_entropy(plain.logit_scale.exp() * img @ t.t(), y) + lam * (1 - (t * t0).sum(-1).mean())
        grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        for n, g in zip(names, grads):
            out[n] += 0.0 if g is None else float(g.pow(2).sum())
    return out


def test_squared_grad_sums_equal_plain_autograd(fresh_tiny, tok):
    """The step at moved weights with CLIPFit's teacher from the start, as `analyze --grad --at trained` builds it."""
    base = fresh_tiny()
    model = copy.deepcopy(base)
    prepare(model, "clipfit", classnames=CLASSES, tokenizer=tok)
    cfg = SimpleNamespace()  # the weight of CLIPFit's distillation is the method option kd_lambda (default 8)
    start_step = ClassifyStep(model, CLASSES, [TEMPLATE], tok, cfg=cfg)
    g = torch.Generator().manual_seed(0)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(n.startswith("visual.") for n in names) and any(".mlp.c_proj.bias" in n for n in names)
    with torch.no_grad():  # "trained": every trainable tensor moved
        for n in names:
            dict(model.named_parameters())[n].add_(0.05 * torch.randn(dict(model.named_parameters())[n].shape,
                                                                       generator=g))
    step = ClassifyStep(model, CLASSES, [TEMPLATE], tok, cfg=cfg)
    step.terms = start_step.terms
    batches = [(torch.randn(4, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 1])),
               (torch.randn(3, 3, 32, 32, generator=g), torch.tensor([2, 2, 0]))]
    got, n = squared_grad_sums(model, step, batches)
    assert n == 2 and set(got) == set(names) and all(p.grad is None for p in model.parameters())
    plain = base.double()
    start = copy.deepcopy(plain)
    moved = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in plain.named_parameters():
            p.requires_grad_(name in names)
            if name in names:
                p.copy_(moved[name].double())
    want = _direct(plain, names, start, batches)
    for name in names:
        assert got[name] == pytest.approx(want[name], rel=2e-4, abs=1e-12), name
    assert sum(want.values()) > 0


# ------------------------------------------------------------------------------------------------ command
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A CLIPFit smoke run and an LLU smoke run on 4 synthetic classes (no --pretrained: rebuilt from their record)."""
    root = tmp_path_factory.mktemp("analyze_runs")
    common = ["--shots", 4, "--epochs", 1, "--batch-size", 8, "--synthetic-classes", 4, "--synthetic-dir",
              root / "syn", "--no-progress", "--threads", 1]
    with kernels.set_backend("torch"):
        for method in ("clipfit", "llu"):
            assert cli.main([str(a) for a in ["train", "--method", method, *common, "--output", root / method]]) == 0
    return root


def _json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_grad_command(capsys, runs, tmp_path):
    args = ["analyze", runs / "clipfit", "--grad", "--batches", 3, "--synthetic-dir", runs / "syn"]
    rc, out, err = _run(capsys, *args, "--output", tmp_path / "g")
    assert rc == 0, err
    res = _json(out)
    assert json.loads((tmp_path / "g" / "grad.json").read_text()) == res
    assert "| image LayerNorm |" in out and "| text mlp.c_proj.bias |" in out  # the printed table
    assert res["batches"] == 3 and res["batch_size"] == 8 and res["at"] == "trained" and res["extra_loss_terms"] == 1
    from leanclip.checkpoint import read_trainable

    trained = read_trainable(str(runs / "clipfit" / "checkpoint.safetensors"))[1]
    assert {r["name"] for r in res["parameters"]} == set(trained)
    assert set(res["groups"]) == {"image LayerNorm", "text mlp.c_proj.bias"}
    for group, g in res["groups"].items():
        rows = [r for r in res["parameters"] if r["group"] == group]
        assert g["sum_sq"] == pytest.approx(sum(r["sum_sq"] for r in rows), rel=1e-12) and g["sum_sq"] > 0
        assert g["numel"] == sum(r["numel"] for r in rows) and g["tensors"] == len(rows)
    assert {r["block"] for r in res["parameters"] if "resblocks.1." in r["name"]} == {1}
    rc, out, err = _run(capsys, *args)  # seeded: the same numbers again
    assert rc == 0 and _json(out)["parameters"] == res["parameters"]
    rc, out, err = _run(capsys, *args, "--at", "start")
    assert rc == 0 and _json(out)["parameters"] != res["parameters"]


def _as_saved_before_options_moved(run, folder, **config):
    """A copy of ``run`` whose checkpoint looks as one written while ``kd_lambda`` / ``llu_*`` were TrainConfig
    fields: its config holds them (``config``), its method options do not."""
    import shutil

    from leanclip.checkpoint import _atomic_save, _read

    shutil.copytree(run, folder)
    path = str(folder / "checkpoint.safetensors")
    meta, tensors = _read(path)
    extra, options = json.loads(meta["extra"]), json.loads(meta["options"])
    extra["config"].update(config)
    meta.pop("sha256")
    meta.update(extra=json.dumps(extra), options=json.dumps({k: v for k, v in options.items() if k not in config}))
    _atomic_save(tensors, meta, path)


def test_a_run_saved_with_the_weights_in_its_config_keeps_them(capsys, runs, tmp_path):
    old = tmp_path / "old_clipfit"
    _as_saved_before_options_moved(runs / "clipfit", old, kd_lambda=0.0, llu_lambda=1e3, llu_clusters=512)
    rc, out, err = _run(capsys, "analyze", old, "--grad", "--batches", 1, "--synthetic-dir", runs / "syn")
    assert rc == 0, err
    res = _json(out)
    assert res["kd_lambda"] == 0.0 and res["extra_loss_terms"] == 0  # its weight 0: no distillation term
    old_llu = tmp_path / "old_llu"
    _as_saved_before_options_moved(runs / "llu", old_llu, kd_lambda=8.0, llu_lambda=10.0, llu_clusters=None)
    rc, out, err = _run(capsys, "eval", "--checkpoint", old_llu, "--synthetic-dir", runs / "syn", "--no-progress")
    assert rc == 0, err
    assert _json(out)["method"] == "llu"


def test_tsne_command(capsys, runs, tmp_path):
    pytest.importorskip("sklearn")
    args = ["analyze", runs / "clipfit", "--tsne", "--tsne-samples", 40, "--synthetic-dir", runs / "syn"]
    rc, out, err = _run(capsys, *args, "--output", tmp_path / "a")
    assert rc == 0, err
    res = _json(out)
    png = (tmp_path / "a" / "tsne.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and json.loads((tmp_path / "a" / "tsne.json").read_text()) == res
    assert res["images"] == 40 and res["classes"] == 4 and set(res["silhouette_cosine"]) == {"zero-shot", "tuned"}
    assert all(-1 <= v <= 1 for v in res["silhouette_cosine"].values())
    rc, out, err = _run(capsys, *args, "--output", tmp_path / "b")
    assert rc == 0 and _json(out)["silhouette_cosine"] == res["silhouette_cosine"]
    assert (tmp_path / "b" / "tsne.png").read_bytes() == png


@pytest.mark.parametrize("extra,needle", [
    (["--grad", "--batches", 0], "--batches must be in [1, 100000]"),
    (["--batches", 3], "--batches applies to --grad / --tsne"),
    (["--grad", "--tsne"], "not allowed with argument"),
    (["--tsne"], "--tsne draws tsne.png: give --output DIR"),
    (["--tsne", "--tsne-samples", 5, "--output", "{tmp}/t"], "--tsne-samples must be in"),
    (["RUN2", "--grad"], "--grad analyses one run, got 2"),
])
def test_bad_flags_exit_2_before_any_write(capsys, runs, tmp_path, extra, needle):
    extra = [str(runs / "clipfit") if a == "RUN2" else str(a).replace("{tmp}", str(tmp_path)) for a in extra]
    rc, out, err = _run(capsys, "analyze", runs / "clipfit", *extra)
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "t").exists()


def test_refused_runs(capsys, runs):
    rc, out, err = _run(capsys, "analyze", runs / "llu", "--grad", "--synthetic-dir", runs / "syn")
    assert rc == 2 and "cached features" in err and len(err.strip().splitlines()) == 1
