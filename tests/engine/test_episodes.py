"""Episodic N-way K-shot evaluation: sampling (valid, deterministic by seed), the prototype classifier and the CI
against direct float64 computations, and ``leanclip episodes`` on synthetic data (same seed -> same numbers, the
images encoded once, a checkpoint re-applied, bad arguments -> exit 2 before any write)."""
import json
import math
import os
import statistics

import pytest
import torch
import torch.nn.functional as F

from leanclip import cli
from leanclip.cli import episodes
from tests.engine.cli_checks import last_json
from tests.engine.cli_checks import run as _run


def _labels(counts):
    return torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])


def test_sampling_valid_and_deterministic():
    labels = _labels([8, 3, 9, 7, 12, 6])  # class 1 has too few images for K + Q = 6
    a = episodes.sample_episodes(labels, 3, 2, 4, 30, seed=5)
    b = episodes.sample_episodes(labels, 3, 2, 4, 30, seed=5)
    c = episodes.sample_episodes(labels, 3, 2, 4, 30, seed=6)
    assert all(torch.equal(x.support, y.support) and torch.equal(x.query, y.query)
               and torch.equal(x.classes, y.classes) for x, y in zip(a, b))
    assert any(not torch.equal(x.query, y.query) for x, y in zip(a, c))
    seen = set()
    for ep in a:
        assert ep.classes.numel() == 3 and len(set(ep.classes.tolist())) == 3 and 1 not in ep.classes.tolist()
        assert not set(ep.support.tolist()) & set(ep.query.tolist())
        assert labels[ep.support].tolist() == ep.classes.repeat_interleave(2).tolist()
        assert labels[ep.query].tolist() == ep.classes.repeat_interleave(4).tolist()
        seen |= set(ep.classes.tolist())
    assert seen == {0, 2, 3, 4, 5}
    with pytest.raises(ValueError, match="--ways 6: only 5 class"):
        episodes.sample_episodes(labels, 6, 2, 4, 1, seed=0)
    for kw, flag in (({"ways": 1}, "--ways"), ({"shots": 0}, "--shots"), ({"queries": 0}, "--queries"),
                     ({"episodes": 0}, "--episodes")):
        args = {"ways": 2, "shots": 1, "queries": 1, "episodes": 1, **kw}
        with pytest.raises(ValueError, match=flag):
            episodes.sample_episodes(labels, args["ways"], args["shots"], args["queries"], args["episodes"], 0)


def test_mean_ci95_formula():
    vals = [60.0, 80.0, 73.3, 100.0, 46.7]
    r = episodes.mean_ci95(vals)
    assert r["mean"] == pytest.approx(statistics.fmean(vals), abs=1e-12)
    assert r["std"] == pytest.approx(statistics.stdev(vals), abs=1e-12)
    assert r["ci95"] == pytest.approx(1.96 * statistics.stdev(vals) / math.sqrt(5), abs=1e-12)
    assert episodes.mean_ci95([42.0]) == {"mean": 42.0, "ci95": None, "std": None, "n": 1}


def test_prototype_and_text_accuracy_against_direct_computation():
    g = torch.Generator().manual_seed(0)
    labels = _labels([6] * 5)
    feats = F.normalize(torch.randn(30, 8, generator=g) + 1.5 * torch.randn(5, 8, generator=g)[labels], dim=-1)
    text_logits = torch.randn(30, 5, generator=g)
    eps = episodes.sample_episodes(labels, 3, 2, 3, 10, seed=1)
    acc = episodes.episode_accuracies(eps, feats, text_logits)
    for ep, p_acc, t_acc in zip(eps, acc["prototype"], acc["text"]):
        protos = [F.normalize(feats[ep.support[i * 2:(i + 1) * 2]].double().mean(0), dim=0) for i in range(3)]
        correct_p = correct_t = 0
        for j, qi in enumerate(ep.query.tolist()):
            truth = j // 3
            sims = [float(feats[qi].double() @ p) for p in protos]
            correct_p += max(range(3), key=lambda i: sims[i]) == truth
            scores = [float(text_logits[qi, c]) for c in ep.classes.tolist()]
            correct_t += max(range(3), key=lambda i: scores[i]) == truth
        assert p_acc == pytest.approx(100 * correct_p / 9) and t_acc == pytest.approx(100 * correct_t / 9)


# ------------------------------------------------------------------------------------------------ command

def _common(synth_dir, *more):
    return ["--synthetic-dir", synth_dir, "--synthetic-classes", 5, "--no-progress", "--threads", 1, *more]


def _count_encoded(monkeypatch) -> list:
    """Images through the image encoder (leanclip.feature_cache's one encode step), per batch."""
    from leanclip import feature_cache

    calls = []
    real = feature_cache.encode_images
    monkeypatch.setattr(feature_cache, "encode_images", lambda m, x: calls.append(x.shape[0]) or real(m, x))
    return calls


def test_cli_deterministic_and_encodes_each_image_once(capsys, weights, synth_dir, tmp_path, monkeypatch):
    calls = _count_encoded(monkeypatch)
    def argv(seed):
        return ["episodes", "--pretrained", weights, "--ways", 3, "--shots", 2, "--queries", 4, "--episodes", 25,
                "--seed", seed, "--batch-size", 32, *_common(synth_dir)]

    rc, out, err = _run(capsys, *argv(7), "--output", tmp_path)
    assert rc == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert json.loads((tmp_path / "episodes.json").read_text()) == res
    assert sum(calls) == res["images_encoded"] <= 100  # the images the episodes use, once each
    assert set(res["classifiers"]) == {"text", "prototype"} and res["classifiers"]["text"]["n"] == 25
    for k, r in res["classifiers"].items():
        assert r == episodes.mean_ci95(res["per_episode"][k])
    assert res["classifiers"]["prototype"]["mean"] > 100 / 3  # above chance on the pre-trained tiny model
    rc, out, _ = _run(capsys, *argv(7))
    again = json.loads(out.strip().splitlines()[-1])
    assert rc == 0 and again["per_episode"] == res["per_episode"]
    rc, out, _ = _run(capsys, *argv(8))
    assert rc == 0 and json.loads(out.strip().splitlines()[-1])["per_episode"] != res["per_episode"]


def test_cli_with_checkpoint(capsys, weights, synth_dir, tmp_path):
    run_dir = tmp_path / "run"
    rc, _, err = _run(capsys, "train", "--method", "ln", "--pretrained", weights, "--shots", 2, "--epochs", 1,
                      "--output", run_dir, *_common(synth_dir))
    assert rc == 0, err
    argv = ["episodes", "--checkpoint", run_dir, "--pretrained", weights, "--ways", 2, "--shots", 1, "--queries", 3,
            "--episodes", 5, *_common(synth_dir)]
    rc, out, err = _run(capsys, *argv)
    assert rc == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert res["method"] == "ln" and res["checkpoint"].endswith("checkpoint.safetensors")
    rc, out, err = _run(capsys, *argv[:3], *argv[5:])  # the recorded weights must be named, as for eval
    assert rc == 2 and "--pretrained" in err


@pytest.mark.parametrize("flags,needle", [
    (["--ways", 1], "--ways must be >= 2"),
    (["--ways", 6], "--ways 6: only 5 class"),
    (["--shots", 0], "--shots must be >= 1"),
    (["--queries", 0], "--queries must be >= 1"),
    (["--episodes", 0], "--episodes must be >= 1"),
    (["--shots", 10, "--queries", 11], "--ways 5: only 0 class"),
    (["--seed", -1], "--seed"),
    (["--checkpoint", "/nonexistent/run"], "--checkpoint"),
    (["--dataset", "dtd"], "--dataset needs --data"),
    (["--templates", "no placeholder"], "{}"),
    (["--use-recorded-weights"], "--use-recorded-weights needs --checkpoint"),
    (["--adapt", "ln"], "--adapt must be one of coop, adapter, linear-probe"),
    (["--adapt", "ln+coop"], "--adapt must be one of coop, adapter, linear-probe"),
    (["--adapt-steps", 3], "--adapt-steps needs --adapt"),
    (["--adapt-lr", 0.1], "--adapt-lr needs --adapt"),
    (["--adapt", "coop", "--adapt-steps", 0], "--adapt-steps must be >= 1"),
    (["--adapt", "adapter", "--adapt-lr", 0], "--adapt-lr must be > 0"),
    (["--adapt", "linear-probe", "--adapt-lr", "nan"], "--adapt-lr must be a finite number"),
    (["--mini-imagenet", "/nonexistent/imagenet"], "/nonexistent/imagenet"),
    (["--mini-imagenet", "/nonexistent/imagenet", "--dataset", "x"], "drop --dataset"),
])
def test_cli_bad_args_exit_2_without_writes(capsys, synth_dir, tmp_path, flags, needle):
    rc, out, err = _run(capsys, "episodes", *_common(synth_dir), *flags, "--output", tmp_path / "out")
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert out == "" and not (tmp_path / "out").exists()


def test_help_of_the_new_commands(capsys):
    """argparse %-formats help strings: the top-level list and each command's --help must render."""
    assert cli.main(["--help"]) == 0
    listing = capsys.readouterr().out
    for name in ("analyze", "episodes", "wilds"):
        assert name in listing
        assert cli.main([name, "--help"]) == 0
        assert f"leanclip {name}" in capsys.readouterr().out


def test_checkpoint_trained_from_init_from_is_scored_with_those_weights(capsys, weights, synth_dir, tmp_path,
                                                                        monkeypatch):
    """A run trained with --init-from keeps only its own parameters; episodes (and wilds, through the same
    leanclip.cli.common.eval_model) must load the starting weights it recorded before them, as eval does."""
    from safetensors.torch import load_file

    ln_run, coop_run = tmp_path / "ln", tmp_path / "coop"
    for argv in (["--method", "ln", "--output", ln_run],
                 ["--method", "coop", "--init-from", ln_run, "--output", coop_run]):
        rc, _, err = _run(capsys, "train", *argv, "--pretrained", weights, "--shots", 2, "--epochs", 1,
                          *_common(synth_dir))
        assert rc == 0, err
    scored = []
    real = episodes.eval_model
    monkeypatch.setattr(episodes, "eval_model", lambda *a, **k: scored.append(real(*a, **k)) or scored[-1])
    rc, _, err = _run(capsys, "episodes", "--checkpoint", coop_run, "--pretrained", weights, "--ways", 2, "--shots", 1,
                      "--queries", 2, "--episodes", 2, *_common(synth_dir))
    assert rc == 0, err
    state = dict(scored[0][0].named_parameters())
    ln_trained = {k: v for k, v in load_file(str(ln_run / "checkpoint.safetensors")).items() if k in state}
    assert ln_trained and all(torch.equal(state[k].detach(), v) for k, v in ln_trained.items())


# ------------------------------------------------------------------------------------------------ --adapt

def _adapt_argv(weights, synth_dir, method, *more):
    return ["episodes", "--pretrained", weights, "--ways", 3, "--shots", 1, "--queries", 2, "--episodes", 3,
            "--seed", 4, "--adapt", method, "--adapt-steps", 3, "--batch-size", 4, *_common(synth_dir), *more]


@pytest.mark.parametrize("method", ["coop", "adapter", "linear-probe"])
def test_cli_adapt_reports_mean_ci_and_encodes_each_image_once(capsys, weights, synth_dir, monkeypatch, method):
    calls = _count_encoded(monkeypatch)
    rc, out, err = _run(capsys, *_adapt_argv(weights, synth_dir, method))
    assert rc == 0, err
    res = last_json(out)
    assert sum(calls) == res["images_encoded"] <= 27  # 3 episodes x 3 ways x 3: one pass serves all
    assert set(res["classifiers"]) == {"text", "prototype", "adapt"}
    r = res["classifiers"]["adapt"]
    assert r == episodes.mean_ci95(res["per_episode"]["adapt"]) and r["n"] == 3 and r["ci95"] is not None
    assert res["adapt"]["method"] == method and res["adapt"]["steps"] == 3
    assert res["adapt"]["optimizer"] == ("adamw" if method == "linear-probe" else "sgd")


def test_cli_adapt_same_seed_same_numbers_whatever_the_worker_count(capsys, weights, synth_dir):
    runs = []
    for workers in (0, 1):
        rc, out, err = _run(capsys, *_adapt_argv(weights, synth_dir, "coop", "--num-workers", workers))
        assert rc == 0, err
        runs.append(last_json(out)["per_episode"])
    assert runs[0] == runs[1]


def _adapt_reference(model, method, images, y, n_query, names, templates, tokenizer, cfg, seed):
    """The same episode trained on images, the image encoder and the text tower run at every step (plain autograd):
    what the path on cached encoder rows must equal."""
    from leanclip import features, methods, utils
    from leanclip.training import build_optimizer, lr_at, set_lr

    utils.seed_everything(seed)
    extra = {"templates": templates} if method == "linear-probe" else {}
    methods.prepare(model, method, classnames=names, tokenizer=tokenizer, lean=model.leanclip_info["options"]["lean"],
                    **extra)
    opt = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    sup, qry = images[:-n_query], images[-n_query:]
    model.train()
    for step in range(cfg.epochs):
        set_lr(opt, lr_at(step, cfg, 1))
        opt.zero_grad()
        txt = features.text_features(model, names, templates, tokenizer)
        F.cross_entropy(features.class_logits(model, features.image_features(model, sup), txt), y).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        txt = features.text_features(model, names, templates, tokenizer)
        return features.class_logits(model, features.image_features(model, qry), txt)


@pytest.mark.parametrize("method", ["coop", "adapter", "linear-probe"])
def test_adapt_episode_on_encoder_rows_equals_training_on_images(fresh_tiny, tokenizer, method):
    """A fresh module per episode (same seed: same logits), trained from cached encoder rows exactly as from images;
    the scored model's tuned LayerNorms stay as they were, frozen."""
    from leanclip import methods
    from leanclip.episode_adapt import adapt_config, adapt_episode
    from leanclip.features import encode_images

    model = fresh_tiny()
    methods.prepare(model, "ln")
    ln = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    g = torch.Generator().manual_seed(0)
    images = torch.randn(7, 3, 32, 32, generator=g)
    with torch.no_grad():
        enc = encode_images(model.eval(), images)
    names, templates, y = ["cat", "dog", "ship"], ["a photo of a {}."], torch.tensor([0, 1, 2, 0])
    cfg = adapt_config(method, 4, lr=0.5)
    kw = dict(seed=3, device=torch.device("cpu"), precision="fp32")
    a = adapt_episode(model, method, enc[:4], y, enc[4:], names, templates, tokenizer, cfg, **kw)
    b = adapt_episode(model, method, enc[:4], y, enc[4:], names, templates, tokenizer, cfg, **kw)
    assert a.shape == (3, 3) and torch.equal(a, b)
    if method == "adapter":  # its layers start random: another seed, another start
        c = adapt_episode(model, method, enc[:4], y, enc[4:], names, templates, tokenizer, cfg, **{**kw, "seed": 4})
        assert not torch.equal(a, c)
    ref = _adapt_reference(model, method, images, y, 3, names, templates, tokenizer, cfg, 3)
    torch.testing.assert_close(a, ref, rtol=1e-5, atol=1e-5)
    untrained = adapt_episode(model, method, enc[:4], y, enc[4:], names, templates, tokenizer,
                              adapt_config(method, 1, lr=1e-12), **kw)
    assert not torch.allclose(a, untrained, atol=1e-3)  # the 4 steps moved the new module
    state = dict(model.named_parameters())
    assert all(torch.equal(state[n].detach(), v) and not state[n].requires_grad for n, v in ln.items())
    assert len(model.leanclip_info["modules"]) == 1 and model.leanclip_info["method"] == method


# ------------------------------------------------------------------------------------------------ Mini-ImageNet

def _fake_imagenet(root, wnids, per_class=2):
    from PIL import Image

    for i, w in enumerate(wnids):
        d = root / "train" / w
        d.mkdir(parents=True)
        for j in range(per_class):
            Image.new("RGB", (12, 12), (20 * i % 256, 60 * j % 256, 90)).save(d / f"{w}_{j}.JPEG")
    return root


def test_mini_imagenet_lists():
    from leanclip.mini_imagenet import split_classes

    lists = {s: split_classes(s) for s in ("train", "val", "test")}
    assert {s: len(v) for s, v in lists.items()} == {"train": 64, "val": 16, "test": 20}
    wnids = [w for v in lists.values() for w in v]
    assert len(set(wnids)) == 100 and all(w.startswith("n") and len(w) == 9 for w in wnids)
    assert "n01930112" in lists["test"] and "n01532829" in lists["train"] and "n01855672" in lists["val"]
    assert all(list(v) == sorted(v) and all(v.values()) for v in lists.values())
    with pytest.raises(ValueError, match="one of train, val, test"):
        split_classes("trainval")


def test_mini_imagenet_split_over_an_imagenet_folder(tmp_path):
    from leanclip.mini_imagenet import mini_imagenet_split, split_classes

    test = split_classes("test")
    root = _fake_imagenet(tmp_path / "imagenet", [*test, "n01532829", "n09999999"])  # + a train and a foreign class
    samples, names = mini_imagenet_split(root, "test")
    assert names == list(test.values()) and len(samples) == 40
    assert [s.label for s in samples] == [i for i in range(20) for _ in range(2)]
    assert all(os.path.basename(os.path.dirname(s.path)) == list(test)[s.label] for s in samples)
    assert mini_imagenet_split(root / "train", "test")[1] == names  # the train folder itself
    (root / "classnames.txt").write_text("".join(f"{w} class {i}\n" for i, w in enumerate(test)))
    assert mini_imagenet_split(root, "test")[1] == [f"class {i}" for i in range(20)]
    (root / "classnames.txt").write_text("n01930112 nematode\n")
    with pytest.raises(ValueError, match="does not list Mini-ImageNet class 'n01981276'"):
        mini_imagenet_split(root, "test")
    (root / "classnames.txt").unlink()
    with pytest.raises(FileNotFoundError, match="Mini-ImageNet val class 'n01855672' has no folder"):
        mini_imagenet_split(root, "val")
    outside = tmp_path / "elsewhere.JPEG"
    outside.write_bytes((root / "train" / "n01930112" / "n01930112_0.JPEG").read_bytes())
    os.symlink(outside, root / "train" / "n01930112" / "link.JPEG")
    with pytest.raises(ValueError, match="outside"):
        mini_imagenet_split(root, "test")


def test_cli_mini_imagenet(capsys, weights, tmp_path):
    from leanclip.mini_imagenet import split_classes

    test = list(split_classes("test"))
    root = _fake_imagenet(tmp_path / "imagenet", test)
    argv = ["episodes", "--mini-imagenet", root, "--pretrained", weights, "--ways", 3, "--shots", 1, "--queries", 1,
            "--episodes", 2, "--no-progress", "--threads", 1]
    rc, out, err = _run(capsys, *argv)
    assert rc == 0, err
    res = last_json(out)
    assert res["dataset"] == "MiniImageNet" and res["split"] == "test" and res["classes"] == 20
    assert res["templates"] == ["a photo of a {}."]
    (root / "train" / test[5] / f"{test[5]}_0.JPEG").unlink()
    (root / "train" / test[5] / f"{test[5]}_1.JPEG").unlink()
    (root / "train" / test[5]).rmdir()
    rc, out, err = _run(capsys, *argv, "--output", tmp_path / "out")
    assert rc == 2 and test[5] in err and len(err.strip().splitlines()) == 1 and out == ""
    assert not (tmp_path / "out").exists()


def test_mini_imagenet_ln_then_adapt_per_episode(capsys, weights, tmp_path):
    """The "+ LN" rows end to end: export the 64 training classes, LN-tune on them, then adapt CoOp per episode on
    the test classes from that checkpoint (its LN weights, frozen)."""
    from leanclip.mini_imagenet import split_classes

    train, test = list(split_classes("train")), list(split_classes("test"))
    root = _fake_imagenet(tmp_path / "imagenet", train, per_class=10)
    _fake_imagenet(tmp_path / "imagenet", test)
    split = tmp_path / "mini_train.json"
    rc, out, err = _run(capsys, "episodes", "--mini-imagenet", root, "--split", "train", "--export-split", split)
    assert rc == 0, err
    assert last_json(out)["splits"] == {"train": 64 * 9, "val": 64, "test": 64}
    saved = json.loads(split.read_text())
    assert {os.path.dirname(p) for p, _, _ in saved["test"]} == set(train) and saved["val"] == saved["test"]
    run_dir = tmp_path / "ln"
    rc, _, err = _run(capsys, "train", "--method", "ln", "--pretrained", weights, "--split-file", split,
                      "--image-root", root / "train", "--shots", 1, "--epochs", 1, "--output", run_dir,
                      "--no-progress", "--threads", 1)
    assert rc == 0, err
    rc, out, err = _run(capsys, "episodes", "--checkpoint", run_dir, "--pretrained", weights, "--mini-imagenet",
                        root, "--ways", 3, "--shots", 1, "--queries", 1, "--episodes", 2, "--adapt", "coop",
                        "--adapt-steps", 2, "--no-progress", "--threads", 1)
    assert rc == 0, err
    res = last_json(out)
    assert res["method"] == "ln" and res["classes"] == 20 and res["classifiers"]["adapt"]["n"] == 2
    rc, _, err = _run(capsys, "episodes", "--export-split", split)
    assert rc == 2 and "--export-split needs --mini-imagenet" in err


def test_cli_adapt_reads_the_shared_feature_cache(capsys, weights, synth_dir, tmp_path, monkeypatch):
    """With $LEANCLIP_FEATURE_CACHE the one encoder pass is the cache's entry: a second run reuses it (no image
    encoded) and gives the same numbers."""
    from leanclip.feature_cache import ENV_VAR, count_events

    cache = tmp_path / "cache"
    monkeypatch.setenv(ENV_VAR, str(cache))
    results = []
    for _ in range(2):
        calls = _count_encoded(monkeypatch)
        rc, out, err = _run(capsys, *_adapt_argv(weights, synth_dir, "adapter"))
        assert rc == 0, err
        results.append((sum(calls), last_json(out)["per_episode"]))
    assert results[0][0] > 0 and results[1][0] == 0 and results[0][1] == results[1][1]
    assert count_events(cache) == {"passes": 1, "hits": 1}


def test_adapt_method_the_model_cannot_take_is_refused_before_any_work(hf_cache):
    """CoOp on SigLIP's text tower (no start token to splice the context after): the method's own check, run on the
    scored model with an episode's classes, without changing it."""
    from leanclip import weights
    from leanclip.episode_adapt import check_adapt_model
    from leanclip.models import transformers as hf
    from tests.engine.hf_family import SIGLIP_ID, lay_out_cache

    lay_out_cache(hf_cache)
    model = weights.create_model("transformers:" + SIGLIP_ID)
    tok = hf.get_tokenizer(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="coop.*SiglipTextModel"):
        check_adapt_model(model, "coop", ["cat", "dog"], ["a photo of a {}."], tok)
    check_adapt_model(model, "adapter", ["cat", "dog"], ["a photo of a {}."], tok)
    assert getattr(model, "leanclip_info", None) is None
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
