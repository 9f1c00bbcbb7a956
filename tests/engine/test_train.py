"""Trainer: every method learns on synthetic data (tiny CLIP, CPU), exact resume, logging, evaluation."""
import copy
import json
import math
import warnings

import pytest
import torch

from leanclip import data, kernels, utils
from leanclip.methods import prepare
from leanclip.run_files import CHECKPOINT_NAME, LOG_NAME
from leanclip.trainer import TrainConfig, base_to_new, evaluate, lr_at, train, zeroshot

TEMPLATES = ["a photo of a {}."]
PRETRAIN_STEPS = 40


@pytest.fixture(autouse=True)
def _torch_backend():  # also set by tests/engine/conftest.py; kept so this file runs on its own
    with kernels.set_backend("torch"):
        yield


def pretrained_tiny_file(cache, tmp_path_factory, name: str) -> str:
    """A tiny CLIP contrastively pre-trained for PRETRAIN_STEPS steps on synthetic captions (~20 s once), cached in
    pytest's cache dir. Zero-shot accuracy on the synthetic shapes ~70%."""
    from leanclip.cli import synthetic_pretrained_weights

    try:
        folder = cache.mkdir("leanclip-tiny-pretrained")
    except Exception:  # cache provider disabled
        folder = tmp_path_factory.mktemp("tiny-pretrained")
    return synthetic_pretrained_weights(folder, name, PRETRAIN_STEPS)


@pytest.fixture(scope="session")
def pretrained_path(request, tmp_path_factory, tiny_name):
    return pretrained_tiny_file(request.config.cache, tmp_path_factory, tiny_name)


@pytest.fixture(scope="session")
def pretrained_base(pretrained_path, tiny_name):
    import open_clip

    from leanclip.checkpoint import load_pretrained

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = open_clip.create_model(tiny_name, pretrained=None)
    load_pretrained(m, pretrained_path)
    return m


def _cfg(method, **kw):
    base = dict(method=method, epochs=5, batch_size=16, lr=1e-2, optimizer="adamw", weight_decay=0.0,
                warmup_epochs=0, progress=False, seed=1, eval_batch_size=128)
    base.update(kw)
    return TrainConfig(**base)


# --------------------------------------------------------------------------------------------------- every method
@pytest.mark.parametrize("method", ["ln", "bitfit", "clipfit", "coop", "linear-probe", "llu"])
def test_method_learns(method, pretrained_base, tok, shapes):
    model = copy.deepcopy(pretrained_base)
    cn = shapes["classnames"]
    before = zeroshot(model, shapes["test"], cn, TEMPLATES, tok)["top1"]
    before_train = zeroshot(model, shapes["train"], cn, TEMPLATES, tok)["top1"]
    prepare(model, method, classnames=cn, tokenizer=tok, **({"llu_lambda": 10.0} if method == "llu" else {}))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    s = train(model, shapes["train"], cn, TEMPLATES, tok, _cfg(method),
              eval_sets={"test": shapes["test"], "train": shapes["train"]})
    k = len(s["losses"]) // 5
    first, last = sum(s["losses"][:k]) / k, sum(s["losses"][-k:]) / k
    assert all(math.isfinite(v) for v in s["losses"])
    assert last < first, (method, first, last)
    if method != "coop":  # CoOp's train top1 on these 64 images moves by +-2 images with the batch order (seeds
        # 1-4: 73.4 -> 70.3..79.7) while its loss and test top1 improve for every seed: a check of noise there
        assert s["metrics"]["train"]["top1"] > before_train, (method, before_train, s["metrics"])
    assert s["metrics"]["test"]["top1"] > before, (method, before, s["metrics"])
    # the encoders' frozen weights did not move
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p.detach(), frozen[n]), n


def test_text_features_once_when_text_frozen(pretrained_base, tok, shapes, monkeypatch):
    """ln on the image tower: the text side is frozen, so class text features are computed once per run; clipfit
    trains text biases, so once per step (+ the teacher once)."""
    import leanclip.features as F
    import leanclip.step as S

    calls = {"n": 0}
    real = F.text_features

    def spy(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(F, "text_features", spy)  # the teacher, through frozen_text_features
    monkeypatch.setattr(S, "text_features", spy)  # the step's
    cn = shapes["classnames"]
    model = prepare(copy.deepcopy(pretrained_base), "ln", tower="image")
    s = train(model, shapes["train"], cn, TEMPLATES, tok, _cfg("ln", epochs=1))
    assert calls["n"] == 1 and s["steps"] == 4
    calls["n"] = 0
    model = prepare(copy.deepcopy(pretrained_base), "clipfit")
    s = train(model, shapes["train"], cn, TEMPLATES, tok, _cfg("clipfit", epochs=1))
    assert calls["n"] == 1 + 1 + s["steps"]  # frozen teacher (through text_features) + probe + per step


def test_clipfit_kd_term_logged(pretrained_base, tok, shapes, tmp_path):
    cn = shapes["classnames"]
    model = prepare(copy.deepcopy(pretrained_base), "clipfit")
    train(model, shapes["train"], cn, TEMPLATES, tok, _cfg("clipfit", epochs=2, output=str(tmp_path)))
    recs = utils.read_jsonl(tmp_path / LOG_NAME)
    assert [r["step"] for r in recs] == list(range(1, 9))
    assert all({"loss", "acc", "lr", "img_per_s", "ce", "kd", "epoch"} <= set(r) for r in recs)
    assert recs[0]["kd"] == pytest.approx(0.0, abs=1e-6)  # student == teacher before the first update
    assert recs[-1]["kd"] > 0
    assert all(r["loss"] == pytest.approx(r["ce"] + r["kd"], rel=1e-5) for r in recs)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["method"] == "clipfit" and summary["steps"] == 8


# --------------------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("method,optimizer", [("clipfit", "sgd"), ("coop", "adamw")])
def test_resume_is_exact(method, optimizer, pretrained_base, tok, shapes, tmp_path):
    """2 epochs straight == 1 epoch, stop, resume for the 2nd (random crops/flips + momentum/Adam state + RNG)."""
    cn = shapes["classnames"]
    ds = shapes["train_aug"]
    kw = dict(epochs=2, optimizer=optimizer, lr=5e-3, warmup_epochs=0)
    a = prepare(copy.deepcopy(pretrained_base), method, classnames=cn, tokenizer=tok)
    sa = train(a, ds, cn, TEMPLATES, tok, _cfg(method, output=str(tmp_path / "a"), **kw))

    b = prepare(copy.deepcopy(pretrained_base), method, classnames=cn, tokenizer=tok)
    sb1 = train(b, ds, cn, TEMPLATES, tok, _cfg(method, output=str(tmp_path / "b"), stop_after_epoch=1, **kw))
    assert sb1["stopped_at_epoch"] == 1 and len(sb1["losses"]) == 4
    torch.manual_seed(12345)  # whatever happens in between must not matter
    c = prepare(copy.deepcopy(pretrained_base), method, classnames=cn, tokenizer=tok)
    sc = train(c, ds, cn, TEMPLATES, tok, _cfg(method, output=str(tmp_path / "b"), **kw),
               resume=str(tmp_path / "b"))

    assert sa["losses"] == sc["losses"]  # the resumed summary holds the full history, bit-identical
    assert sb1["losses"] == sa["losses"][:4]
    for (n, pa), (_, pc) in zip(a.named_parameters(), c.named_parameters()):
        assert torch.equal(pa, pc), n
    log_b = [r["loss"] for r in utils.read_jsonl(tmp_path / "b" / LOG_NAME)]
    assert log_b == sa["losses"]


def test_resume_errors(pretrained_base, tok, shapes, tmp_path):
    cn = shapes["classnames"]
    m = prepare(copy.deepcopy(pretrained_base), "ln")
    with pytest.raises(FileNotFoundError):
        train(m, shapes["train"], cn, TEMPLATES, tok, _cfg("ln", epochs=1), resume=str(tmp_path / "nope.safetensors"))
    train(m, shapes["train"], cn, TEMPLATES, tok, _cfg("ln", epochs=1, output=str(tmp_path)))
    m2 = prepare(copy.deepcopy(pretrained_base), "ln")
    with pytest.raises(ValueError, match="steps per epoch"):
        train(m2, shapes["train"], cn, TEMPLATES, tok, _cfg("ln", epochs=2, batch_size=8),
              resume=str(tmp_path / CHECKPOINT_NAME))


# ----------------------------------------------------------------------------------------------- config / schedule
def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(epochs=4, lr=0.1, warmup_epochs=1, warmup_lr=1e-5)
    lrs = [lr_at(s, cfg, 10) for s in range(40)]
    assert lrs[:10] == [1e-5] * 10
    assert lrs[10] == pytest.approx(0.1)
    assert all(x >= y for x, y in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] < 1e-3
    one = TrainConfig(epochs=1, lr=0.1, warmup_epochs=1)  # warm-up would take the whole run: skipped
    assert lr_at(0, one, 5) == pytest.approx(0.1)


@pytest.mark.parametrize("field,value", [("epochs", 0), ("batch_size", -1), ("optimizer", "lbfgs"),
                                         ("precision", "fp8"), ("lr", 0.0), ("grad_accum", 0)])
def test_config_validation(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value}).validate()


@pytest.mark.parametrize("method", ["ln", "clipfit"])
def test_grad_accum_matches_big_batch(method, pretrained_base, tok, shapes):
    """grad_accum=4 x batch 4 == batch 16: same order (the permutation does not depend on the batch size), the same
    optimizer steps, the same losses and parameters up to fp32 summation order (text tower once per step)."""
    cn = shapes["classnames"]
    a = prepare(copy.deepcopy(pretrained_base), method)
    sa = train(a, shapes["train"], cn, TEMPLATES, tok, _cfg(method, epochs=2, batch_size=16, optimizer="sgd"))
    b = prepare(copy.deepcopy(pretrained_base), method)
    sb = train(b, shapes["train"], cn, TEMPLATES, tok, _cfg(method, epochs=2, batch_size=4, grad_accum=4,
                                                            optimizer="sgd"))
    assert sa["steps"] == sb["steps"] == 8
    assert sb["losses"] == pytest.approx(sa["losses"], rel=1e-5)
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=n)
    # a last, partial group (64 images, batch 12 x 2: groups of 24, 24, 16) still takes ceil(6 / 2) = 3 steps
    c = prepare(copy.deepcopy(pretrained_base), method)
    assert train(c, shapes["train"], cn, TEMPLATES, tok, _cfg(method, epochs=1, batch_size=12, grad_accum=2))[
        "steps"] == 3


def test_no_trainable_params_is_an_error(pretrained_base, tok, shapes):
    with pytest.raises(ValueError, match="prepare"):
        train(copy.deepcopy(pretrained_base), shapes["train"], shapes["classnames"], TEMPLATES, tok, _cfg("ln"))
    m = prepare(copy.deepcopy(pretrained_base), "ln")
    with pytest.raises(ValueError, match="prepared with 'ln'"):
        train(m, shapes["train"], shapes["classnames"], TEMPLATES, tok, _cfg("bitfit"))


def test_cuda_without_gpu_is_an_error(pretrained_base, tok, shapes):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    m = prepare(copy.deepcopy(pretrained_base), "ln")
    with pytest.raises(ValueError, match="cuda"):
        train(m, shapes["train"], shapes["classnames"], TEMPLATES, tok, _cfg("ln", device="cuda"))


def test_cpu_bf16_autocast_when_asked(pretrained_base, tok, shapes):
    m = prepare(copy.deepcopy(pretrained_base), "ln")
    s = train(m, shapes["train"], shapes["classnames"], TEMPLATES, tok, _cfg("ln", epochs=1, precision="bf16"))
    assert s["precision"] == "bf16" and all(math.isfinite(v) for v in s["losses"])
    assert utils.resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert utils.resolve_precision("auto", torch.device("cuda")) == "bf16"


# ---------------------------------------------------------------------------------------------------------- eval
def test_evaluate_and_base_to_new(pretrained_base, tok, shapes):
    cn = shapes["classnames"]
    m = copy.deepcopy(pretrained_base)
    zs = zeroshot(m, shapes["test"], cn, TEMPLATES, tok, batch_size=50)
    ev = evaluate(m, shapes["test"], cn, TEMPLATES, tok, batch_size=128)
    assert zs == ev and zs["n"] == 128 and 0 <= zs["top1"] <= zs["top5"] <= 100
    # base-to-new on the tiny set: split the 8 classes 4 / 4, each relabelled from 0
    x, y = shapes["test"].images, shapes["test"].labels
    tf = shapes["test"].transform
    base = data.TensorImageDataset(x[y < 4], y[y < 4], tf)
    new = data.TensorImageDataset(x[y >= 4], y[y >= 4] - 4, tf)
    r = base_to_new(m, base, cn[:4], new, cn[4:], TEMPLATES, tok)
    assert set(r) == {"base", "new", "H"}
    assert r["H"] == pytest.approx(2 * r["base"] * r["new"] / (r["base"] + r["new"]))


def test_rng_state_roundtrip():
    import random

    import numpy as np

    utils.seed_everything(7)
    st = json.loads(json.dumps(utils.get_rng_state()))  # JSON-serialisable
    a = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    utils.seed_everything(99)
    utils.set_rng_state(st)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == a
    assert utils.derive_seed(1, 2) == utils.derive_seed(1, 2) != utils.derive_seed(2, 1)


def test_atomic_writers(tmp_path):
    p = tmp_path / "x" / "a.json"
    utils.atomic_write_json(p, {"a": 1})
    assert json.loads(p.read_text()) == {"a": 1}
    utils.append_jsonl(tmp_path / "l.jsonl", {"step": 1})
    utils.append_jsonl(tmp_path / "l.jsonl", {"step": 2})
    utils.truncate_jsonl(tmp_path / "l.jsonl", lambda r: r["step"] <= 1)
    assert utils.read_jsonl(tmp_path / "l.jsonl") == [{"step": 1}]
    utils.atomic_write_csv(tmp_path / "r.csv", [{"a": 1, "b": 2}, {"a": 3}])
    assert (tmp_path / "r.csv").read_text().splitlines() == ["a,b", "1,2", "3,"]
    assert not [f for f in tmp_path.rglob("*.tmp")]


# ---------------------------------------------------------------------------------------- same seed, same run
def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_same_seed_same_run_whatever_display_workers_or_resume(fresh_tiny, tok, shapes, tmp_path, monkeypatch):
    """Random crops and flips, 2 epochs: the bar on a terminal (tqdm), log lines, no display, 2 loader workers,
    and a stop + resume after epoch 1 all give bit-identical losses and parameters."""
    cn, ds = shapes["classnames"], shapes["train_aug"]
    kw = dict(epochs=2, lr=5e-3, optimizer="sgd")

    def run(tty=False, resume_after=None, **extra):
        monkeypatch.setattr(utils, "_stderr_is_tty", lambda: tty)
        m = prepare(fresh_tiny(), "ln")
        if resume_after is None:
            s = train(m, ds, cn, TEMPLATES, tok, _cfg("ln", **kw, **extra))
            return s["losses"], _params(m)
        out = str(tmp_path / "resumed")
        train(m, ds, cn, TEMPLATES, tok, _cfg("ln", output=out, stop_after_epoch=resume_after, **kw, **extra))
        torch.manual_seed(4321)  # whatever ran in between must not matter
        m = prepare(fresh_tiny(), "ln")
        s = train(m, ds, cn, TEMPLATES, tok, _cfg("ln", output=out, **kw, **extra), resume=out)
        return s["losses"], _params(m)

    ref_losses, ref_params = run(progress=False)
    for variant in (dict(progress=True, tty=True), dict(progress=True, tty=False),
                    dict(progress=False, num_workers=2), dict(progress=True, tty=True, resume_after=1)):
        losses, params = run(**variant)
        assert losses == ref_losses, variant
        for n, p in params.items():
            assert torch.equal(p, ref_params[n]), (variant, n)


def test_epoch_loader_is_a_function_of_seed_and_epoch():
    """Same (seed, epoch) => same batches and augmentations however often iter() is called (a dropped iterator, as
    tqdm.auto makes, included) and in how many workers; the global RNG is neither read nor advanced."""
    from leanclip.trainer import epoch_loader

    class Noisy(torch.utils.data.Dataset):  # each item's "augmentation" draws from the global RNGs
        def __len__(self):
            return 10

        def __getitem__(self, i):
            import random

            import numpy as np

            return torch.tensor([float(i), float(torch.rand(())), float(np.random.rand()), random.random()])

    def batches(loader):
        return torch.cat(list(loader))

    ref = batches(epoch_loader(Noisy(), 4, seed=1, epoch=3))
    torch.manual_seed(99)
    state = torch.get_rng_state()
    loader = epoch_loader(Noisy(), 4, seed=1, epoch=3)
    iter(loader)  # made and dropped
    assert torch.equal(batches(loader), ref) and torch.equal(batches(loader), ref)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(batches(epoch_loader(Noisy(), 4, seed=1, epoch=3, num_workers=2)), ref)
    assert sorted(ref[:, 0].tolist()) == list(range(10)) and ref[:, 0].tolist() != list(range(10))
    other = batches(epoch_loader(Noisy(), 4, seed=1, epoch=4))
    assert other[:, 0].tolist() != ref[:, 0].tolist()
    assert not torch.equal(other[other[:, 0].argsort()], ref[ref[:, 0].argsort()])  # new augmentations per epoch


# ------------------------------------------------------------------------------------------ non-finite losses
class _NanAfter(torch.utils.data.Dataset):
    """The wrapped dataset, with NaN images from the ``after``-th item loaded on (num_workers=0: one process)."""

    def __init__(self, ds, after):
        self.ds, self.after, self.loaded = ds, after, 0

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        x, y = self.ds[i]
        self.loaded += 1
        return (x * float("nan") if self.loaded > self.after else x), y


def _strict_json(text):
    def no_constant(name):
        raise ValueError(name)

    return json.loads(text, parse_constant=no_constant)


@pytest.mark.parametrize("clip", [None, 1.0])
def test_non_finite_loss_stops_and_keeps_last_finite_checkpoint(clip, fresh_tiny, tok, shapes, tmp_path):
    cn = shapes["classnames"]
    ds = _NanAfter(shapes["train"], after=len(shapes["train"]))  # epoch 1 finite, epoch 2 NaN
    m = prepare(fresh_tiny(), "ln")
    with pytest.raises(utils.NonFiniteLossError) as e:
        train(m, ds, cn, TEMPLATES, tok, _cfg("ln", epochs=3, output=str(tmp_path), clip_grad_norm=clip))
    msg = str(e.value)
    assert "\n" not in msg and "non-finite loss (nan) at step 5 (epoch 2)" in msg
    assert "learning rate" in msg and "last finite checkpoint is kept" in msg and CHECKPOINT_NAME in msg
    # the checkpoint is epoch 1's, and the model in memory holds those same weights (no NaN step taken)
    from leanclip.checkpoint import load_trainable

    m2 = prepare(fresh_tiny(), "ln")
    meta = load_trainable(m2, tmp_path / CHECKPOINT_NAME)
    assert meta["extra"]["epoch"] == 1 and meta["step"] == 4
    for (n, p), (_, p2) in zip(m.named_parameters(), m2.named_parameters()):
        assert torch.equal(p, p2) and torch.isfinite(p).all(), n
    recs = [_strict_json(x) for x in (tmp_path / LOG_NAME).read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in recs)
    assert not (tmp_path / "summary.json").exists()


def test_diverging_lr_stops_before_a_checkpoint(fresh_tiny, tok, shapes, tmp_path):
    m = prepare(fresh_tiny(), "full")
    with pytest.raises(utils.NonFiniteLossError, match=r"learning rate \(1e\+04\) is likely too high.*no checkpoint "
                                                       r"was written"):
        train(m, shapes["train"], shapes["classnames"], TEMPLATES, tok,  # the highest rate the config accepts
              _cfg("full", epochs=2, lr=utils.LR_MAX, optimizer="sgd", scheduler="constant", output=str(tmp_path)))
    assert not (tmp_path / CHECKPOINT_NAME).exists() and not (tmp_path / "summary.json").exists()
    for line in (tmp_path / LOG_NAME).read_text().splitlines():
        assert math.isfinite(_strict_json(line)["loss"])


def test_non_finite_inputs_at_the_first_step(fresh_tiny, tok, shapes):
    m = prepare(fresh_tiny(), "ln")
    with pytest.raises(utils.NonFiniteLossError, match=r"step 1 \(epoch 1\): before any update, so the inputs"):
        train(m, _NanAfter(shapes["train"], after=0), shapes["classnames"], TEMPLATES, tok, _cfg("ln", epochs=1))


def test_stale_temps_removed_at_start(fresh_tiny, tok, shapes, tmp_path):
    stale = tmp_path / (utils.TEMP_PREFIX + CHECKPOINT_NAME + ".abc123" + utils.TEMP_SUFFIX)
    stale.write_bytes(b"half a checkpoint")
    m = prepare(fresh_tiny(), "ln")
    train(m, shapes["train"], shapes["classnames"], TEMPLATES, tok, _cfg("ln", epochs=1, output=str(tmp_path)))
    assert not stale.exists() and (tmp_path / CHECKPOINT_NAME).is_file()
    assert _strict_json((tmp_path / "summary.json").read_text())["steps"] == 4


def test_package_exports_stay_what_they_name():
    """leanclip.train is the function whatever was read first (no submodule shares an exported name)."""
    import importlib
    import types

    import leanclip
    for name in leanclip.__all__:
        if name.startswith("__"):
            continue
        importlib.import_module(leanclip._EXPORTS[name])
        assert not isinstance(getattr(leanclip, name), types.ModuleType), name
    assert callable(leanclip.train) and leanclip.train is train


# ---------------------------------------------------------------------------------------- the API checks as the CLI
@pytest.mark.parametrize("field,value", [
    ("weight_decay", -1.0), ("warmup_lr", -1e-5), ("warmup_lr", float("nan")), ("seed", -1), ("seed", 2 ** 32),
    ("lr", float("inf")), ("lr", 1e308), ("clip_grad_norm", float("inf")), ("momentum", -0.1), ("eval_batch_size", 0), ("batch_size", 0),
    ("epochs", 1.5), ("num_workers", -1), ("grad_accum", True),
])
def test_config_refuses_what_the_command_line_refuses(field, value):
    with pytest.raises(ValueError, match=rf"^{field} must be"):
        TrainConfig(**{field: value}).validate()


def test_prepare_refuses_batch_sizes_below_1(fresh_tiny):
    for name in ("batch_size", "text_batch_size", "text_len"):
        bad = -1 if name == "text_batch_size" else 0  # text_batch_size=0: a step without the text tower
        with pytest.raises(ValueError, match=rf"^{name} must be >= 1, got {bad}"):
            prepare(fresh_tiny(), "ln", recompute="auto", memory_budget=10 ** 9, **{"batch_size": 8, name: bad})


class _Unlabelled(torch.utils.data.Dataset):
    """The wrapped dataset without its ``labels`` attribute: its labels are seen only batch by batch."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[i]


def test_labels_out_of_range_and_one_class_are_named_errors(fresh_tiny, tok, shapes):
    cn = shapes["classnames"]
    images = shapes["test"].images[:16]
    bad = data.TensorImageDataset(images, torch.tensor([0] * 15 + [len(cn)]), shapes["test"].transform)
    m = prepare(fresh_tiny(), "ln")
    for ds in (bad, _Unlabelled(bad)):
        with pytest.raises(ValueError, match=rf"^train_set: label {len(cn)} is out of range for {len(cn)} class"):
            train(m, ds, cn, TEMPLATES, tok, _cfg("ln", epochs=1))
        with pytest.raises(ValueError, match=rf"^dataset: label {len(cn)} is out of range"):
            evaluate(m, ds, cn, TEMPLATES, tok, 8)
    with pytest.raises(ValueError, match=r"eval_sets\['test'\]: label"):
        train(m, shapes["train"], cn, TEMPLATES, tok, _cfg("ln", epochs=1), eval_sets={"test": bad})
    one = data.TensorImageDataset(images, torch.zeros(16, dtype=torch.long), shapes["test"].transform)
    with pytest.raises(ValueError, match=r"^classnames has 1 class \('.*'\): classification needs at least 2"):
        train(m, one, cn[:1], TEMPLATES, tok, _cfg("ln", epochs=1))
    with pytest.raises(ValueError, match=r"^classnames has 1 class"):
        evaluate(m, one, cn[:1], TEMPLATES, tok, 8)
