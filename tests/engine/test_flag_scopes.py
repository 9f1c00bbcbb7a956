"""Every flag of train / eval / zeroshot is read where it is accepted: given where nothing reads it, it is a one-line
usage error (exit 2) before any work or write (leanclip.cli.flags)."""
import json

import pytest
import torch
from cli_checks import last_json, run

from leanclip import cli, weights
from leanclip.checkpoint import save_trainable
from leanclip.cli.flags import SCOPES, check_command_line, given_dests
from leanclip.methods import prepare, trainable_parameters

C = ("train", "--task", "contrastive", "--method", "lilt-ln")

# (flag words, command words, the error's words): one row per flag and place where nothing reads it
REFUSED = [
    # --task contrastive reads none of these
    (("--preset", "coop"), C, "--preset coop is a classification recipe"),
    (("--preset", "lilt"), ("train", "--method", "ln"), "--preset lilt is the contrastive alignment recipe"),
    (("--templates", "a {}"), C, "need --zeroshot-data"),  # the zero-shot prompts after alignment
    (("--template-set", "coop"), C, "need --zeroshot-data"),
    (("--shots", "4"), C, "--shots is not read by train --task contrastive"),
    (("--subsample", "base"), C, "--subsample is not read by train --task contrastive"),
    (("--kd-lambda", "8"), C, "--kd-lambda is not read by train --task contrastive"),
    (("--warmup-lr", "1e-5"), C, "--warmup-lr is not read by train --task contrastive"),
    (("--grad-accum", "2"), C, "--grad-accum is not read by train --task contrastive"),
    (("--eval-split", "val"), C, "--eval-split is not read by train --task contrastive"),
    (("--synthetic-classes", "4"), C, "--synthetic-classes is not read by train --task contrastive"),
    (("--skip-bad-images",), C, "--skip-bad-images is not read by train --task contrastive"),
    (("--data", "x"), C, "--pairs FILE"),
    # methods that do not read them
    (("--kd-lambda", "8"), ("train", "--method", "coop"), "--kd-lambda has no effect on --method coop"),
    (("--kd-lambda", "4"), ("train", "--method", "ln"), "--kd-lambda has no effect on --method ln"),
    (("--llu-lambda", "10"), ("train", "--method", "clipfit"), "--llu-lambda has no effect on --method clipfit"),
    (("--llu-clusters", "8"), ("train", "--method", "ln"), "--llu-clusters has no effect on --method ln"),
    (("--grad-accum", "2"), ("train", "--method", "llu"), "--grad-accum has no effect on --method llu"),
    (("--recompute", "block"), ("train", "--method", "llu"), "--recompute has no effect on --method llu"),
    (("--templates", "a {}"), ("train", "--method", "coop"), "--templates has no effect on --method coop"),
    (("--tower", "image"), ("train", "--method", "coop"), "--tower has no effect on --method coop"),
    # the classification task reads none of the contrastive flags
    (("--randaugment",), ("train", "--method", "ln"), "--randaugment is not read by train --task classify"),
    (("--max-steps", "3"), ("train", "--method", "ln"), "--max-steps is not read by train --task classify"),
    (("--zeroshot-data", "x"), ("train", "--method", "ln"), "--zeroshot-data is not read by train --task classify"),
    # eval and zeroshot
    (("--pairs", "p.csv"), ("eval", "--checkpoint", "c"), "--pairs is not read by eval --task classify"),
    (("--shots", "4"), ("eval", "--task", "retrieval", "--checkpoint", "c"), "--shots is not read by eval --task "
                                                                               "retrieval"),
    (("--num-workers", "1"), ("eval", "--task", "retrieval", "--checkpoint", "c"), "--num-workers is not read"),
    (("--seed", "3"), ("zeroshot",), "--seed is not read by zeroshot"),
    (("--seed", "3"), ("eval", "--checkpoint", "c"), "--seed is not read by eval --task classify"),
]


@pytest.mark.parametrize("flag,command,words", REFUSED, ids=lambda v: " ".join(v) if isinstance(v, tuple) else None)
def test_flag_given_where_nothing_reads_it_is_a_usage_error(capsys, tmp_path, flag, command, words):
    out = tmp_path / "run"
    rc, stdout, err = run(capsys, *command, *flag, "--output", out)
    assert rc == 2 and words in err and len(err.strip().splitlines()) == 1, err
    assert stdout == "" and not out.exists()


# the same flags where they are read: the scope check lets them through
ACCEPTED = [
    ("train", "--method", "clipfit", "--kd-lambda", "8"),
    ("train", "--method", "llu", "--llu-lambda", "10", "--llu-clusters", "0"),
    ("train", "--method", "ln", "--grad-accum", "2", "--warmup-lr", "1e-4", "--shots", "4", "--preset", "coop"),
    ("train", "--method", "ln", "--tower", "image", "--templates", "a {}", "--template-set", "clipfit"),
    (*C, "--init-from", "x", "--max-steps", "2", "--seed", "3", "--warmup-epochs", "1", "--preset", "lilt"),
    ("eval", "--task", "retrieval", "--checkpoint", "c", "--pairs", "p.csv"),
    ("zeroshot", "--shots", "4", "--subsample", "base"),
]


@pytest.mark.parametrize("argv", ACCEPTED, ids=" ".join)
def test_flag_given_where_it_is_read_passes(argv):
    parser = cli.build_parser(argv[0])
    check_command_line(parser, list(argv), parser.parse_args(list(argv)))


def test_a_default_value_typed_out_counts_as_given():
    sub = next(a for a in cli.build_parser("train")._actions if hasattr(a, "choices") and a.choices
               and "train" in a.choices).choices["train"]
    assert given_dests(sub, ["--kd-lambda", "8", "--opt", "a=1", "--method", "ln"]) == {"kd_lambda", "opt", "method"}
    assert given_dests(sub, []) == set()
    assert set(SCOPES) <= {a.dest for a in sub._actions}


def _ln_checkpoint(path):
    """An LN-only checkpoint of the model `train --task contrastive` builds (the tiny config, seed 0, no
    pre-training), its LayerNorms moved away from the initial values."""
    model = prepare(weights.create_model("leanclip-tiny", None, seed=0), "ln")
    with torch.no_grad():
        for _, p in trainable_parameters(model):
            p.add_(0.5)
    save_trainable(model, path)
    return {n: p.detach().clone() for n, p in trainable_parameters(model)}


def _trained_value(run_dir, name):
    """A parameter of the model `eval` rebuilds from ``run_dir`` (the LN checkpoint re-applied)."""
    from leanclip.cli.common import prepare_from_checkpoint, read_checkpoint_meta

    meta = read_checkpoint_meta(run_dir)
    model = weights.create_model("leanclip-tiny", None, seed=0)
    prepare_from_checkpoint(model, meta, None, "leanclip-tiny")
    return model.get_parameter(name).detach()


def test_init_from_starts_a_contrastive_alignment_and_eval_reapplies_it(capsys, tmp_path, tiny_name):
    """LN as initialisation for LilT: adapters alone (ln_tower=none) train on top of the LN checkpoint's frozen
    LayerNorms, the loss differs from a run without it, and `eval --task retrieval` rebuilds the trained model."""
    ln = _ln_checkpoint(tmp_path / "ln.safetensors")
    common = ["--task", "contrastive", "--method", "lilt-adapter", "--opt", "ln_tower=none", "--reduction", 8,
              "--synthetic-pairs", 32, "--batch-size", 16, "--epochs", 1, "--synthetic-eval-pairs", 16, "--threads", 1, "--no-progress",
              "--no-initial-eval"]
    rc, out, err = run(capsys, "train", *common, "--output", tmp_path / "plain")
    assert rc == 0, err
    plain = last_json(out)
    rc, out, err = run(capsys, "train", *common, "--init-from", tmp_path / "ln.safetensors",
                       "--output", tmp_path / "init")
    assert rc == 0, err
    res = last_json(out)
    assert res["final_loss"] != plain["final_loss"]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "init" / "checkpoint.safetensors"), "pt") as f:
        opts = json.loads(f.metadata()["options"])
        assert opts["init_from"] == str(tmp_path / "ln.safetensors")
        kept = set(ln) - set(f.keys())  # LayerNorms lilt-adapter does not train: they stay at the checkpoint's values
    assert kept and all(torch.equal(ln[n], _trained_value(tmp_path / "init", n)) for n in kept)
    rc, out, err = run(capsys, "eval", "--task", "retrieval", "--checkpoint", tmp_path / "init",
                       "--synthetic-eval-pairs", 16, "--threads", 1, "--no-progress")
    assert rc == 0, err
    ev = last_json(out)
    for k in ("i2t_R@1", "t2i_R@1", "mean"):
        assert ev[k] == res["metrics"][k]
