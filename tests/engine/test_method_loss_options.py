"""CLIPFit's ``kd_lambda`` and LLU's ``llu_lambda`` / ``llu_clusters`` are method options, not trainer config fields:
``leanclip methods`` lists them, ``--opt`` and their shorthand flags set them (one table,
``leanclip.cli.option_flags``), the ranges the options declare check them, the loss terms read them from the
prepared model, and a run saved while they were config fields keeps its values (``saved_run_options``)."""
import argparse
import copy
import json

import pytest
import torch

from leanclip import prepare
from leanclip.checkpoint import read_trainable
from leanclip.cli import main
from leanclip.cli.common import UsageError
from leanclip.cli.option_flags import OPTION_FLAGS, options_from_flags
from leanclip.step import ClassifyStep
from leanclip.trainer import TrainConfig, saved_run_options

MOVED = {"clipfit": {"kd_lambda": 8.0}, "llu": {"llu_lambda": 1e3, "llu_clusters": 512}}


@pytest.mark.parametrize("method", sorted(MOVED))
def test_the_methods_command_lists_them_with_their_defaults_and_ranges(capsys, method):
    assert main(["methods", method, "--json"]) == 0
    got = {o["name"]: o for o in json.loads(capsys.readouterr().out)[method]["options"]}
    for name, default in MOVED[method].items():
        assert got[name]["default"] == default and got[name]["range"] and got[name]["help"], got[name]


@pytest.mark.parametrize("name", [n for opts in MOVED.values() for n in opts])
def test_they_are_no_longer_config_fields(name):
    with pytest.raises(TypeError, match=name):
        TrainConfig(**{name: 1})


@pytest.mark.parametrize("method,name,value", [
    ("clipfit", "kd_lambda", -1.0), ("clipfit", "kd_lambda", float("nan")), ("llu", "llu_lambda", -1.0),
    ("llu", "llu_lambda", float("inf")), ("llu", "llu_clusters", -1), ("llu", "llu_clusters", 1.5),
])
def test_prepare_refuses_them_out_of_range(fresh_tiny, method, name, value):
    with pytest.raises(ValueError, match=rf"{name} must be"):
        prepare(fresh_tiny(), method, **{name: value})


def _kd_term(model, tok):
    step = ClassifyStep(model, ["cube", "ball"], ["a photo of a {}."], tok, cfg=TrainConfig())
    return [t for t in step.terms]


def test_the_distillation_weight_is_read_from_the_prepared_model(fresh_tiny, tok):
    base = fresh_tiny()
    txt = torch.nn.functional.normalize(torch.randn(2, base.text_projection.shape[1],
                                                    generator=torch.Generator().manual_seed(0)), dim=-1)
    values = {}
    for lam in (None, 2.0, 6.0):
        model = prepare(copy.deepcopy(base), "clipfit", **({} if lam is None else {"kd_lambda": lam}))
        ((name, value),) = [term(txt) for term in _kd_term(model, tok)]
        assert name == "kd"
        values[lam] = float(value)
    assert values[6.0] == pytest.approx(3 * values[2.0], rel=1e-6) and values[2.0] > 0
    assert values[None] == pytest.approx(4 * values[2.0], rel=1e-6)  # the default, 8
    assert _kd_term(prepare(copy.deepcopy(base), "clipfit", kd_lambda=0.0), tok) == []  # 0: no term at all


def _flags(**given):
    return argparse.Namespace(**{dest: given.get(dest) for dest in OPTION_FLAGS})


def test_the_flags_set_the_options_they_stand_for():
    import leanclip.methods  # noqa: F401  (registers the methods)

    assert options_from_flags(_flags(), ["clipfit"], {}) == {}
    assert options_from_flags(_flags(kd_lambda=4.0), ["clipfit"], {}) == {"kd_lambda": 4.0}
    assert options_from_flags(_flags(llu_lambda=10.0, llu_clusters=0), ["llu"], {"gamma": 5.0}) == {
        "llu_lambda": 10.0, "llu_clusters": 0}
    with pytest.raises(UsageError, match=r"^--kd-lambda and --opt kd_lambda=\.\.\. both set"):
        options_from_flags(_flags(kd_lambda=4.0), ["clipfit"], {"kd_lambda": 8.0})
    with pytest.raises(UsageError, match=r"^--llu-clusters must be an int in \[0, "):
        options_from_flags(_flags(llu_clusters=-1), ["llu"], {})


def test_a_saved_config_s_fields_become_the_options_of_the_method_that_owns_them():
    old = {"epochs": 2, "kd_lambda": 4.0, "llu_lambda": 10.0, "llu_clusters": None}  # every run recorded all three
    assert saved_run_options("clipfit", {"l2_reg": 1.0}, old) == {"l2_reg": 1.0, "kd_lambda": 4.0}
    assert saved_run_options("llu", {}, old) == {"llu_lambda": 10.0, "llu_clusters": None}
    assert saved_run_options("ln+coop", {"n_ctx": 4}, old) == {"n_ctx": 4}
    assert saved_run_options("clipfit", {"kd_lambda": 2.0}, old) == {"kd_lambda": 2.0}  # the options win
    assert saved_run_options("clipfit", None, None) == {}


def test_the_command_line_records_the_option_in_the_checkpoint(capsys, tmp_path, synth_dir):
    out = tmp_path / "run"
    rc = main([str(a) for a in ["train", "--method", "clipfit", "--kd-lambda", 0, "--shots", 1, "--epochs", 1,
                                "--batch-size", 4, "--synthetic-classes", 2, "--synthetic-dir", synth_dir,
                                "--no-progress", "--threads", 1, "--output", out]])
    assert rc == 0, capsys.readouterr().err
    meta = read_trainable(str(out / "checkpoint.safetensors"))[0]
    assert json.loads(meta["options"])["kd_lambda"] == 0.0
    assert "kd_lambda" not in json.loads(meta["extra"])["config"]
