"""``leanclip analyze``: statistics against scipy / direct float64 computations, the LayerNorm profile and groups on
hand-made parameter dicts, and the command on tiny synthetic runs (two runs, one run against its initial weights,
bad input -> exit 2 before any write)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from leanclip import cli, kernels
from leanclip.cli import analyze
from leanclip.configs import register_tiny_config
from tests.engine.cli_checks import run as _run

L3 = "leanclip-tiny-L3"


# ------------------------------------------------------------------------------------------------ statistics
@pytest.mark.parametrize("x,y", [
    ([0, 1, 2, 3, 4], [0.1, 0.5, 0.2, 0.9, 0.7]),
    ([0, 1, 2, 3, 4, 5], [1.0, 1.0, 0.5, 0.5, 0.2, 3.0]),  # ties
    ([3, 1, 2], [1e-9, 3e-9, 2e-9]),
])
def test_correlations_match_scipy(x, y):
    stats = pytest.importorskip("scipy.stats")
    assert analyze.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
    assert analyze.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)


def test_correlations_undefined():
    assert analyze.spearman([0, 1], [1, 2]) is None and analyze.pearson([0, 1], [1, 2]) is None
    assert analyze.spearman([0, 1, 2], [5, 5, 5]) is None and analyze.pearson([0, 1, 2], [5, 5, 5]) is None
    with pytest.raises(ValueError, match="length"):
        analyze.pearson([0, 1, 2], [1, 2])


# ------------------------------------------------------------------------------------------------ profile
def _ln_names(prefix, blocks, pre, post):
    names = [f"{prefix}{pre}"] if pre else []
    names += [f"{prefix}transformer.resblocks.{i}.{ln}" for i in range(blocks) for ln in ("ln_1", "ln_2")]
    return names + [f"{prefix}{post}"]


def test_layernorm_profile_and_groups_float64():
    g = torch.Generator().manual_seed(0)
    width, blocks = 6, 4
    before, after = {}, {}
    modules = _ln_names("visual.", blocks, "ln_pre", "ln_post") + _ln_names("", blocks, None, "ln_final")
    for k, m in enumerate(modules):
        for leaf in ("weight", "bias"):
            before[f"{m}.{leaf}"] = torch.randn(width, generator=g)
            depth = int(m.split("resblocks.")[1].split(".")[0]) if "resblocks" in m else 0
            scale = (depth + 1) * (1.0 if leaf == "weight" else -0.5) * (0.1 if m.startswith("visual") else 1.0)
            after[f"{m}.{leaf}"] = before[f"{m}.{leaf}"] + scale * (1 + 0.01 * torch.rand(width, generator=g))
    extra = {"transformer.resblocks.1.mlp.c_proj.bias": 8, "visual.transformer.resblocks.0.attn.in_proj_bias": 18,
             "visual.conv1.weight": 5, "llu_image.weight": 4, "logit_scale": 1}
    for n, size in extra.items():
        before[n] = torch.randn(size, generator=g)
        after[n] = before[n] + 0.25
    after["only.in.after"] = torch.zeros(2)
    res = analyze.analyze_params(before, after, added={"llu_image"})
    assert res["compared"] == len(before)
    assert set(res["groups"]) == {"image LayerNorm", "text LayerNorm", "text mlp.c_proj.bias", "image bias",
                                  "image other", "added: llu_image", "other"}
    for tower, prefix in (("image", "visual."), ("text", "")):
        prof = res["layernorm"][tower]
        assert [e["depth"] for e in prof["layers"]][0] == ("pre" if tower == "image" else 0)
        assert prof["layers"][-1]["depth"] == "post"
        for row in prof["per_block"]:
            for key, leaf in (("gamma", "weight"), ("beta", "bias")):
                ds = [(after[f"{prefix}transformer.resblocks.{row['depth']}.{ln}.{leaf}"]
                       - before[f"{prefix}transformer.resblocks.{row['depth']}.{ln}.{leaf}"]).double().abs()
                      for ln in ("ln_1", "ln_2")]
                assert row[f"{key}_mean_abs"] == pytest.approx(float(torch.cat(ds).mean()), rel=1e-6)
        # the change grows with depth for gamma and beta alike
        assert prof["depth_correlation"]["gamma"] == {"n": blocks, "spearman": pytest.approx(1.0),
                                                      "pearson": pytest.approx(1.0, abs=1e-3)}
        assert prof["depth_correlation"]["beta"]["spearman"] == pytest.approx(1.0)
    group = res["groups"]["text mlp.c_proj.bias"]
    assert group["numel"] == 8 and group["l1"] == pytest.approx(2.0) and group["mean_abs"] == pytest.approx(0.25)
    p = {r["name"]: r for r in res["parameters"]}["visual.conv1.weight"]
    assert p["l2"] == pytest.approx(0.25 * 5 ** 0.5, rel=1e-6)
    assert p["rel_l2"] == pytest.approx(p["l2"] / float(before["visual.conv1.weight"].double().norm()), rel=1e-9)
    with pytest.raises(ValueError, match="different architectures"):
        analyze.analyze_params({"ln_final.weight": torch.zeros(3)}, {"ln_final.weight": torch.zeros(4)})


# ------------------------------------------------------------------------------------------------ command

@pytest.fixture(scope="module")
def runs(tmp_path_factory, weights):
    """Two ln runs of a 3-block tiny model (random init), one ln and one llu run of the tiny model trained from the
    pre-trained weights, and a smoke run (no --pretrained: the default synthetic pre-training)."""
    register_tiny_config(L3, vision_cfg={"layers": 3}, text_cfg={"layers": 3})
    root = tmp_path_factory.mktemp("analyze")
    common = ["--shots", 2, "--epochs", 1, "--lr", 0.05, "--optimizer", "adamw", "--synthetic-classes", 4,
              "--synthetic-dir", root / "syn", "--no-progress", "--threads", 1]
    spec = {"a": ["--model", L3, "--seed", 1], "b": ["--model", L3, "--seed", 2],
            "pre": ["--pretrained", weights], "llu": ["--pretrained", weights, "--method", "llu"], "smoke": []}
    with kernels.set_backend("torch"):  # a module fixture runs outside conftest's per-test backend choice
        for name, args in spec.items():
            method = [] if "--method" in args else ["--method", "ln"]
            assert cli.main([str(a) for a in ["train", *method, *args, *common, "--output", root / name]]) == 0
    return root


def test_two_runs(capsys, runs, tmp_path):
    out_dir = tmp_path / "cmp"
    rc, out, err = _run(capsys, "analyze", runs / "a", runs / "b" / "checkpoint.safetensors", "--output", out_dir)
    assert rc == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert json.loads((out_dir / "analysis.json").read_text()) == res
    assert (out_dir / "ln_change.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and res["plot"]
    a = load_file(str(runs / "a" / "checkpoint.safetensors"))
    b = load_file(str(runs / "b" / "checkpoint.safetensors"))
    assert res["reference"] == "RUN_A" and res["methods"] == ["ln", "ln"] and res["only_in_a"] == []
    assert res["compared"] == sum(1 for k in a if not k.startswith("optim"))
    for tower, prefix in (("image", "visual."), ("text", "")):
        prof = res["layernorm"][tower]
        assert [r["depth"] for r in prof["per_block"]] == [0, 1, 2]
        row = prof["per_block"][2]
        want = torch.cat([(b[f"{prefix}transformer.resblocks.2.{ln}.weight"].double()
                           - a[f"{prefix}transformer.resblocks.2.{ln}.weight"].double()).abs()
                          for ln in ("ln_1", "ln_2")]).mean()
        assert row["gamma_mean_abs"] == pytest.approx(float(want), rel=1e-9)
        assert prof["depth_correlation"]["gamma"]["n"] == 3


def test_one_run_against_initial_weights(capsys, runs, weights):
    rc, out, err = _run(capsys, "analyze", runs / "pre")
    assert rc == 2 and "--pretrained" in err and len(err.strip().splitlines()) == 1  # weights are named, as for eval
    rc, out, err = _run(capsys, "analyze", runs / "pre", "--pretrained", weights)
    assert rc == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    init = load_file(weights)
    run = load_file(str(runs / "pre" / "checkpoint.safetensors"))
    entry = next(e for e in res["layernorm"]["image"]["layers"] if e["module"] == "visual.ln_post")
    want = (run["visual.ln_post.bias"].double() - init["visual.ln_post.bias"].double()).abs().sum()
    assert res["reference"] == "initial weights" and entry["beta_l1"] == pytest.approx(float(want), rel=1e-9)
    assert entry["beta_l1"] > 0


def test_llu_maps_against_identity(capsys, runs):
    """LLU's maps have no pretrained value: analyze measures them against (I, 0), the regulariser's origin."""
    rc, out, err = _run(capsys, "analyze", runs / "llu", "--use-recorded-weights")
    assert rc == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    run = load_file(str(runs / "llu" / "checkpoint.safetensors"))
    names = ["llu_image.bias", "llu_image.weight", "llu_text.bias", "llu_text.weight"]
    assert res["compared"] == 4 and res["not_compared"] == [] and sorted(p["name"] for p in res["parameters"]) == names
    for p in res["parameters"]:
        t = run[p["name"]].double()
        ref = torch.eye(t.shape[0], dtype=torch.float64) if t.dim() == 2 else torch.zeros_like(t)
        assert p["l2"] == pytest.approx(float((t - ref).norm()), rel=1e-12) and p["l2"] > 0
        assert p["l1"] == pytest.approx(float((t - ref).abs().sum()), rel=1e-12)
        assert p["group"] == f"added: {p['name'].split('.')[0]}"
    # the same distances the run's result.json reports for its maps
    final = json.loads((runs / "llu" / "result.json").read_text())["identity_distance"]["final"]
    by_name = {p["name"]: p["l2"] for p in res["parameters"]}
    for head in ("image", "text"):
        assert final[head]["w_minus_i_fro"] == pytest.approx(by_name[f"llu_{head}.weight"], rel=1e-9)
        assert final[head]["b_norm"] == pytest.approx(by_name[f"llu_{head}.bias"], rel=1e-9)


def test_smoke_run_against_its_recorded_start(capsys, runs, tiny_name):
    """A run trained without --pretrained records no weights: its start (seeded init + the recorded synthetic
    pre-training) is rebuilt, with or without --use-recorded-weights (as docs/PAPERS.md writes the command)."""
    from leanclip.cli.common import SMOKE_PRETRAIN_STEPS

    init = load_file(cli.synthetic_pretrained_weights(None, tiny_name, SMOKE_PRETRAIN_STEPS))
    run = load_file(str(runs / "smoke" / "checkpoint.safetensors"))
    want = float((run["visual.ln_post.bias"].double() - init["visual.ln_post.bias"].double()).abs().sum())
    results = []
    for flags in (["--use-recorded-weights"], []):
        rc, out, err = _run(capsys, "analyze", runs / "smoke", *flags)
        assert rc == 0, err
        res = json.loads(out.strip().splitlines()[-1])
        entry = next(e for e in res["layernorm"]["image"]["layers"] if e["module"] == "visual.ln_post")
        assert entry["beta_l1"] == pytest.approx(want, rel=1e-9) and want > 0
        results.append(res)
    assert results[0] == results[1]


def test_random_init_run_against_its_start(capsys, runs):
    rc, out, err = _run(capsys, "analyze", runs / "a")
    assert rc == 0, err
    prof = json.loads(out.strip().splitlines()[-1])["layernorm"]["text"]
    assert all(r["gamma_mean_abs"] > 0 for r in prof["per_block"])  # trained at lr 0.05 from the seeded init


@pytest.mark.parametrize("argv,needle", [
    (["{root}/nope"], "RUN_A"),
    (["{root}/a", "{root}/nope"], "RUN_B"),
    (["{root}/a", "{root}/pre"], "different architectures"),
    (["{root}/pre", "--model", L3, "--pretrained", "{weights}"], "different architectures"),
    (["{root}/a", "{root}/b", "{root}/pre"], "one or two runs"),
    (["{root}/a", "{root}/b", "--pretrained", "{weights}"], "one run"),
    (["{root}/syn"], "RUN_A"),
])
def test_bad_input_exit_2_and_no_write(capsys, runs, weights, tmp_path, argv, needle):
    argv = [a.format(root=runs, weights=weights) for a in argv]
    rc, out, err = _run(capsys, "analyze", *argv, "--output", tmp_path / "out")
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists() and out == ""
