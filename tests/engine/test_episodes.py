"""Episodic N-way K-shot evaluation: sampling (valid, deterministic by seed), the prototype classifier and the CI
against direct float64 computations, and ``leanclip episodes`` on synthetic data (same seed -> same numbers, the
images encoded once, a checkpoint re-applied, bad arguments -> exit 2 before any write)."""
import json
import math
import statistics

import pytest
import torch
import torch.nn.functional as F

from leanclip import cli
from leanclip.cli import episodes
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
