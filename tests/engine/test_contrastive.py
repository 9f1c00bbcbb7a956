"""Contrastive alignment: learnable temperature, InfoNCE, the training loop (determinism, exact resume, outputs),
retrieval evaluation, image-text pair files (CSV / JSONL / Karpathy / COCO / list JSON, errors naming the entry) and
the CLI (train --task contrastive -> eval --task retrieval)."""
import copy
import csv
import json
import math
import warnings

import numpy as np
import pytest
import torch

from leanclip import kernels
from leanclip.contrastive import (
    ContrastiveConfig, LearnableTemperature, evaluate_retrieval, train_contrastive,
)
from leanclip.distributed import check_batch_size
from leanclip.losses import clamp_logit_scale_, clip_loss
from leanclip.methods import prepare
from leanclip.pairs import PairDataset, from_lists, load_pairs, synthetic_pairs
from tests.engine.cli_checks import run as _run


@pytest.fixture(autouse=True)
def _torch_backend():  # also set by tests/engine/conftest.py; kept so this file runs on its own
    with kernels.set_backend("torch"):
        yield


@pytest.fixture(scope="session")
def tiny_model(tiny_name):
    import open_clip

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return open_clip.create_model(tiny_name, pretrained=None)


@pytest.fixture(scope="session")
def pairs64():
    return synthetic_pairs(64, size=32, seed=7)


# --------------------------------------------------------------------------------------------------- temperature, loss
def test_learnable_temperature():
    t = LearnableTemperature()
    assert float(t.temp.detach()) == pytest.approx(0.07) and float(t().detach()) == pytest.approx(1 / 0.07)
    with torch.no_grad():
        t.temp.fill_(5.0)
    assert float(t().detach()) == pytest.approx(2.0)  # forward clamps: logit scale >= 1/0.5
    t.clamp_()
    assert float(t.temp.detach()) == 0.5
    with torch.no_grad():
        t.temp.fill_(1e-6)
    t.clamp_()
    assert float(t().detach()) == pytest.approx(1000.0)
    (t() * 2).backward()  # the gradient still flows on the bound (torch.clamp alone would give 0 there)
    assert t.temp.grad is not None and float(t.temp.grad) != 0
    for bad in ({"init": 0.9}, {"init": 0.0}, {"init": float("nan")}, {"min": 0.1, "init": 0.07}, {"init": True}):
        with pytest.raises(ValueError, match="temperature"):
            LearnableTemperature(**bad)


def test_clip_loss_matches_the_formula_in_float32():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(7, 16, generator=g, dtype=torch.float64), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(7, 16, generator=g, dtype=torch.float64), dim=-1)
    scale = torch.tensor(1 / 0.07, dtype=torch.float64)
    ref = 0.5 * (torch.nn.functional.cross_entropy(scale * img @ txt.T, torch.arange(7))
                 + torch.nn.functional.cross_entropy(scale * txt @ img.T, torch.arange(7)))
    out = clip_loss(img.float(), txt.float(), scale.float(), gather=True)  # one process: gather is a no-op
    assert out.dtype == torch.float32
    assert float(out) == pytest.approx(float(ref), rel=1e-5)
    assert float(out) == pytest.approx(float(clip_loss(img.float(), txt.float(), scale.float())), rel=1e-6)
    with pytest.raises(ValueError):
        clip_loss(img[:3].float(), txt.float(), 1.0)
    with pytest.raises(ValueError):
        clip_loss(img[:0].float(), txt[:0].float(), 1.0)


def test_clamp_logit_scale_caps_a_trained_scale_only():
    m = torch.nn.Module()
    m.logit_scale = torch.nn.Parameter(torch.tensor(7.0))
    clamp_logit_scale_(m)
    assert float(m.logit_scale) == pytest.approx(math.log(100.0))
    m.logit_scale.data.fill_(-1.0)
    clamp_logit_scale_(m)
    assert float(m.logit_scale) == 0.0
    m.logit_scale.requires_grad_(False).fill_(7.0)  # frozen: left as loaded
    clamp_logit_scale_(m)
    assert float(m.logit_scale) == 7.0


@pytest.mark.parametrize("bad", [{"epochs": 0}, {"batch_size": True}, {"lr": 1e9}, {"lr": float("nan")},
                                 {"seed": -1}, {"clip_grad_norm": 0.0}, {"weight_decay": -1.0}, {"num_workers": 1000},
                                 {"precision": "fp16"}])
def test_both_configs_validate_alike(bad):
    """ContrastiveConfig and TrainConfig share one validation: the same bad value, the same one-line error."""
    from leanclip.trainer import TrainConfig

    errors = []
    for cls in (ContrastiveConfig, TrainConfig):
        with pytest.raises(ValueError) as e:
            cls(**bad).validate()
        errors.append(str(e.value))
    assert errors[0] == errors[1] and next(iter(bad)) in errors[0]
    with pytest.raises(ValueError, match="min_lr"):
        ContrastiveConfig(lr=1e-3, min_lr=1e-2).validate()


def test_check_batch_size_names_batch_size():
    assert check_batch_size(16, 2) == 8
    with pytest.raises(ValueError, match="batch_size=15.*world size 2"):
        check_batch_size(15, 2)
    with pytest.raises(ValueError, match="batch_size"):
        check_batch_size(0, 1)


# --------------------------------------------------------------------------------------------------- training loop
def _cfg(**kw):
    base = dict(epochs=2, batch_size=16, lr=3e-3, progress=False, seed=3)
    base.update(kw)
    return ContrastiveConfig(**base)


def test_training_deterministic_and_outputs(tiny_model, tok, pairs64, tmp_path):
    runs = []
    for k in range(2):
        torch.manual_seed(0)  # the adapters' down-projections are drawn from the global RNG
        m = prepare(copy.deepcopy(tiny_model), "lilt-adapter")
        runs.append(train_contrastive(m, pairs64, tok, _cfg(output=str(tmp_path / f"r{k}"), max_steps=6)))
    assert runs[0]["losses"] == runs[1]["losses"] and len(runs[0]["losses"]) == 6  # max_steps inside epoch 2
    out = tmp_path / "r0"
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 7)) and {r["epoch"] for r in log} == {1, 2}
    assert all(0.001 <= r["temperature"] <= 0.5 for r in log)
    assert (out / "checkpoint.safetensors").is_file() and (out / "summary.json").is_file()
    from leanclip.checkpoint import load_trainable

    m2 = prepare(copy.deepcopy(tiny_model), "lilt-adapter")
    meta = load_trainable(m2, out / "checkpoint.safetensors")
    assert meta["step"] == 6 and meta["extra"]["leanclip_task"] == "contrastive"
    # cosine schedule: lr decays to ~0 at the end of the run
    assert log[0]["lr"] == pytest.approx(3e-3 * 0.5 * (1 + math.cos(0))) and log[-1]["lr"] < log[0]["lr"]


def test_augmented_run_does_not_depend_on_workers_or_the_global_rng(tiny_model, tok, pairs64):
    """Random crops are seeded per (seed, epoch, pair): 0 or 2 loader workers, and whatever the global RNG holds,
    give the same losses (an augmentation cached in one process but not in the workers would break this)."""
    runs = []
    for workers, global_seed in ((0, 0), (2, 0), (0, 123)):
        torch.manual_seed(global_seed)
        m = prepare(copy.deepcopy(tiny_model), "lilt-ln")
        runs.append(train_contrastive(m, pairs64, tok, _cfg(augment=True, num_workers=workers, epochs=2))["losses"])
    assert runs[0] == runs[1] == runs[2]


def test_resume_is_exact(tiny_model, tok, pairs64, tmp_path):
    full = train_contrastive(prepare(copy.deepcopy(tiny_model), "lilt-ln"), pairs64, tok,
                             _cfg(output=str(tmp_path / "full")))
    part = train_contrastive(prepare(copy.deepcopy(tiny_model), "lilt-ln"), pairs64, tok,
                             _cfg(output=str(tmp_path / "part"), stop_after_step=3))
    m = prepare(copy.deepcopy(tiny_model), "lilt-ln")
    rest = train_contrastive(m, pairs64, tok, _cfg(output=str(tmp_path / "part")), resume=tmp_path / "part")
    assert part["losses"] == full["losses"][:3]
    assert rest["losses"] == full["losses"]  # history from the log + the resumed steps, bit-identical
    assert [json.loads(x)["step"] for x in (tmp_path / "part" / "log.jsonl").read_text().splitlines()] == list(
        range(1, 9))


def test_training_errors(tiny_model, tok, pairs64):
    with pytest.raises(ValueError, match="not prepared"):
        train_contrastive(copy.deepcopy(tiny_model), pairs64, tok, _cfg())
    m = prepare(copy.deepcopy(tiny_model), "lilt-ln")
    with pytest.raises(ValueError, match="batch_size=128"):
        train_contrastive(m, pairs64, tok, _cfg(batch_size=128))
    with pytest.raises(ValueError, match="batch_size"):
        train_contrastive(m, pairs64, tok, _cfg(batch_size=0))
    with pytest.raises(TypeError, match="PairSet"):
        train_contrastive(m, [(1, "a")], tok, _cfg())
    with pytest.raises(ValueError, match="linear-probe"):
        train_contrastive(prepare(copy.deepcopy(tiny_model), "linear-probe", num_classes=3), pairs64, tok, _cfg())


def test_plain_method_uses_model_logit_scale(tiny_model, tok, pairs64):
    m = prepare(copy.deepcopy(tiny_model), "ln")  # no lilt_temperature: open_clip's logit scale (frozen)
    s = train_contrastive(m, pairs64, tok, _cfg(max_steps=2))
    assert s["temperature"] == pytest.approx(float(1 / tiny_model.logit_scale.detach().exp()), rel=1e-5)


def test_frozen_bf16_runs_under_autocast(tiny_model, tok, pairs64):
    m = prepare(copy.deepcopy(tiny_model), "lilt-adapter", frozen_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="precision='fp32'.*16 bits"):
        train_contrastive(m, pairs64, tok, _cfg(max_steps=1, precision="fp32"))
    s = train_contrastive(m, pairs64, tok, _cfg(max_steps=2))  # auto -> bf16 autocast (fp32 trainables)
    assert s["precision"] == "bf16" and all(math.isfinite(x) for x in s["losses"])
    assert m.visual.transformer.resblocks[0].attn.in_proj_weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in m.parameters() if p.requires_grad)


def test_evaluate_retrieval_multi_caption(tiny_model, tok):
    pairs = synthetic_pairs(12, size=32, seed=4, captions_per_image=3)
    assert pairs.num_images == 12 and len(pairs) == 36
    r = evaluate_retrieval(prepare(copy.deepcopy(tiny_model), "lilt-ln"), pairs, tok, batch_size=5)
    assert r["n_images"] == 12 and r["n_captions"] == 36
    for k in ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "mean"):
        assert 0.0 <= r[k] <= 100.0
    assert r["i2t_R@1"] <= r["i2t_R@5"] <= r["i2t_R@10"]


# --------------------------------------------------------------------------------------------------- pair files
def _png(path, value=0):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def test_csv_and_jsonl(tmp_path):
    _png(tmp_path / "imgs" / "a.png", 10)
    _png(tmp_path / "imgs" / "b.png", 200)
    with open(tmp_path / "p.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption", "other"])
        w.writerow(["imgs/a.png", "a dark square", 1])
        w.writerow(["imgs/b.png", "a bright square", 2])
        w.writerow(["imgs/a.png", "another caption, for a", 3])
    p = load_pairs(tmp_path / "p.csv")
    assert p.num_images == 2 and len(p) == 3 and p.txt_to_img == [0, 1, 0]
    assert p.images[0] == str(tmp_path / "imgs" / "a.png")
    x, c = PairDataset(p)[1]
    assert x.shape == (3, 8, 8) and c == "a bright square" and float(x.mean()) == pytest.approx(200 / 255)
    (tmp_path / "p.jsonl").write_text('{"image": "a.png", "caption": ["one", "two"]}\n\n'
                                      '{"image": "b.png", "caption": "three"}\n')
    p = load_pairs(tmp_path / "p.jsonl", root=tmp_path / "imgs")
    assert p.img_to_txt == [[0, 1], [2]]


def test_pair_file_paths_stay_inside_the_image_root(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    _png(root / "a.png")
    _png(tmp_path / "outside.png")
    (root / "link.png").symlink_to(tmp_path / "outside.png")
    for name, image in (("dotdot", "../outside.png"), ("abs", str(tmp_path / "outside.png")),
                        ("link", "link.png"), ("nested", "x/../../outside.png")):
        f = root / f"{name}.csv"
        f.write_text(f"image,caption\na.png,fine\n{image},escape\n")
        with pytest.raises(ValueError, match=r"line 3 path .* is outside the image root"):
            load_pairs(f)
        assert len(load_pairs(f, allow_outside_root=True)) == 2


def test_pair_file_errors(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "missing.csv").write_text("image,caption\na.png,fine\nnope.png,a caption\n")
    with pytest.raises(FileNotFoundError, match=r"missing\.csv, line 3: image file not found: .*nope\.png"):
        load_pairs(tmp_path / "missing.csv")
    (tmp_path / "empty.csv").write_text("image,caption\na.png,fine\na.png,  \n")
    with pytest.raises(ValueError, match=r"empty\.csv, line 3: empty caption"):
        load_pairs(tmp_path / "empty.csv")
    (tmp_path / "col.csv").write_text("image,text\na.png,fine\n")
    with pytest.raises(ValueError, match=r"col\.csv: missing column 'caption'"):
        load_pairs(tmp_path / "col.csv")
    (tmp_path / "e.jsonl").write_text('{"image": "a.png", "caption": "x"}\n{"image": "a.png"}\n')
    with pytest.raises(ValueError, match=r"e\.jsonl, line 2: missing key 'caption'"):
        load_pairs(tmp_path / "e.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png", "caption": "x"}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2: invalid JSON"):
        load_pairs(tmp_path / "bad.jsonl")
    (tmp_path / "l.json").write_text(json.dumps([{"image": "a.png", "caption": "x"}, {"image": "z.png", "caption": "y"}]))
    with pytest.raises(FileNotFoundError, match=r"l\.json, entry 1: image file not found"):
        load_pairs(tmp_path / "l.json")
    with pytest.raises(ValueError, match="unknown pair file type"):
        load_pairs(tmp_path / "a.png")
    with pytest.raises(FileNotFoundError):
        load_pairs(tmp_path / "none.csv")
    assert len(load_pairs(tmp_path / "missing.csv", check_exists=False)) == 2


def test_karpathy_and_coco_json(tmp_path):
    for n in ("x.jpg", "y.jpg", "z.jpg"):
        _png(tmp_path / "val2014" / n)
    karpathy = {"images": [
        {"filepath": "val2014", "filename": "x.jpg", "split": "train", "sentences": [{"raw": "x one"}, {"raw": "x two"}]},
        {"filepath": "val2014", "filename": "y.jpg", "split": "restval", "sentences": [{"raw": "y one"}]},
        {"filepath": "val2014", "filename": "z.jpg", "split": "test", "sentences": [{"raw": "z one"}, {"raw": "z 2"}]},
    ]}
    (tmp_path / "k.json").write_text(json.dumps(karpathy))
    tr = load_pairs(tmp_path / "k.json", split="train")
    assert tr.num_images == 2 and len(tr) == 3  # train + restval
    te = load_pairs(tmp_path / "k.json", split="test")
    assert te.num_images == 1 and te.captions == ["z one", "z 2"]
    with pytest.raises(ValueError, match="split 'val'.*splits present"):
        load_pairs(tmp_path / "k.json", split="val")
    karpathy["images"][1]["sentences"] = [{"raw": " "}]
    (tmp_path / "k2.json").write_text(json.dumps(karpathy))
    with pytest.raises(ValueError, match=r"k2\.json, images\[1\]: empty caption"):
        load_pairs(tmp_path / "k2.json")
    coco = {"images": [{"id": 1, "file_name": "x.jpg"}, {"id": 2, "file_name": "y.jpg"}],
            "annotations": [{"image_id": 1, "caption": "a"}, {"image_id": 2, "caption": "b"},
                            {"image_id": 1, "caption": "c"}]}
    (tmp_path / "c.json").write_text(json.dumps(coco))
    p = load_pairs(tmp_path / "c.json", root=tmp_path / "val2014")
    assert p.img_to_txt == [[0, 2], [1]]
    coco["annotations"].append({"image_id": 9, "caption": "d"})
    (tmp_path / "c2.json").write_text(json.dumps(coco))
    with pytest.raises(ValueError, match=r"annotations\[3\]: image_id 9"):
        load_pairs(tmp_path / "c2.json", root=tmp_path / "val2014")


def test_from_lists_validation():
    with pytest.raises(ValueError, match="empty caption"):
        from_lists([torch.zeros(3, 4, 4)], [""])
    with pytest.raises(ValueError, match="2 images but 1"):
        from_lists([torch.zeros(3, 4, 4)] * 2, ["a"])


# --------------------------------------------------------------------------------------------------- CLI

def test_cli_train_contrastive_then_eval_retrieval(capsys, tmp_path):
    common = ["--synthetic-eval-pairs", 32, "--threads", 1, "--no-progress"]
    rc, out, err = _run(capsys, "train", "--task", "contrastive", "--method", "lilt-adapter", "--reduction", 8,
                        "--synthetic-pairs", 64, "--batch-size", 16, "--epochs", 1, "--output", tmp_path, *common)
    assert rc == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert res["task"] == "contrastive" and res["steps"] == 4 and res["world_size"] == 1
    assert res["metrics_before"] is not None and "i2t_R@1" in res["metrics"]
    from leanclip.cli.common import read_checkpoint_meta, run_record

    meta = read_checkpoint_meta(tmp_path)  # the provenance sits where a classification run keeps it
    assert run_record(meta)["model_name"] == meta["model_name"] and "weights" in run_record(meta)
    assert "weights" not in meta["extra"] and run_record(meta)["pairs"] is None  # one copy, synthetic pairs
    rc, out, err = _run(capsys, "eval", "--task", "retrieval", "--checkpoint", tmp_path, *common)
    assert rc == 0, err
    ev = json.loads(out.strip().splitlines()[-1])
    assert ev["method"] == "lilt-adapter"
    for k in ("i2t_R@1", "t2i_R@10", "mean"):
        assert ev[k] == res["metrics"][k]  # the checkpoint rebuilds exactly the trained model


def test_cli_contrastive_bad_input(capsys, tmp_path):
    rc, _, err = _run(capsys, "train", "--task", "contrastive", "--method", "lilt-ln", "--reduction", 4,
                      "--no-progress")
    assert rc == 2 and "--reduction has no effect" in err
    rc, _, err = _run(capsys, "train", "--task", "contrastive", "--data", tmp_path, "--no-progress")
    assert rc == 2 and "--pairs" in err
    rc, _, err = _run(capsys, "train", "--task", "contrastive", "--method", "lilt-ln", "--pairs",
                      tmp_path / "none.csv", "--no-progress")
    assert rc == 2 and "none.csv" in err
    rc, _, err = _run(capsys, "train", "--task", "contrastive", "--method", "lilt-ln", "--synthetic-pairs", 8,
                      "--batch-size", 16, "--no-progress", "--no-initial-eval", "--output", tmp_path / "o")
    assert rc == 2 and "batch_size=16" in err
    assert len(err.strip().splitlines()) == 1


def test_non_finite_loss_stops_and_keeps_last_finite_checkpoint(tiny_model, tok, pairs64, tmp_path):
    """Epoch 1 finite (checkpoint), resumed with NaN images: one line at step 5 (epoch 2), the epoch-1 checkpoint
    and the interrupted run's summary kept byte for byte; pretrain_contrastive stops on NaN inputs at its first step."""
    from leanclip import utils
    from leanclip.contrastive import _default_transform
    from leanclip.pretrain import pretrain_contrastive

    out = tmp_path / "run"
    train_contrastive(prepare(copy.deepcopy(tiny_model), "lilt-ln"), pairs64, tok,
                      _cfg(output=str(out), stop_after_step=4))
    saved = (out / "checkpoint.safetensors").read_bytes(), (out / "summary.json").read_bytes()
    m = prepare(copy.deepcopy(tiny_model), "lilt-ln")
    plain = _default_transform(m, True, False)
    with pytest.raises(utils.NonFiniteLossError, match=r"non-finite loss \(nan\) at step 5 \(epoch 2\).*kept at"):
        train_contrastive(m, pairs64, tok, _cfg(output=str(out)), resume=out,
                          transform=lambda im: plain(im) * float("nan"))
    assert ((out / "checkpoint.safetensors").read_bytes(), (out / "summary.json").read_bytes()) == saved
    assert [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]

    x = torch.full((4, 3, 32, 32), float("nan"))
    with pytest.raises(utils.NonFiniteLossError, match=r"step 1 \(epoch 1\): before any update"):
        pretrain_contrastive(copy.deepcopy(tiny_model), x, ["a", "b", "c", "d"], tok, steps=2, batch_size=4,
                             lr=1e-3, seed=0)
