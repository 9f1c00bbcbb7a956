"""CLI: train -> eval round trip, zeroshot, LLU, base-to-new, resume, bad input -> exit 2 with one line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from leanclip import cli, kernels
from tests.engine.cli_checks import last_json, run

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _torch_backend():
    with kernels.set_backend("torch"):
        yield


def data_args(synth_dir, classes=4):
    return ["--synthetic-classes", classes, "--synthetic-dir", synth_dir, "--no-progress",
            "--threads", 1]


def test_train_then_eval_roundtrip(capsys, tmp_path, synth_dir, weights):
    out_dir = tmp_path / "run"
    rc, out, err = run(capsys, "train", "--method", "clipfit", "--pretrained", weights, "--shots", 4, "--epochs", 3,
                       "--lr", 0.01, "--optimizer", "adamw", "--batch-size", 8, "--output", out_dir,
                       *data_args(synth_dir))
    assert rc == 0, err
    res = last_json(out)
    assert res["command"] == "train" and res["method"] == "clipfit" and res["classes"] == 4
    assert res["train_images"] == 16 and res["steps"] == 6 and res["epochs"] == 3
    assert json.loads((out_dir / "result.json").read_text()) == res
    ckpt = out_dir / "checkpoint.safetensors"
    assert ckpt.is_file() and (out_dir / "log.jsonl").is_file()
    test_acc = res["metrics"]["test"]["top1"]
    assert test_acc > 25.0  # 4 classes: above chance (pre-trained tiny model)

    rc, out, err = run(capsys, "eval", "--checkpoint", ckpt, "--pretrained", weights, *data_args(synth_dir))
    assert rc == 0, err
    ev = last_json(out)
    assert ev["method"] == "clipfit" and ev["n"] == 80
    assert ev["top1"] == pytest.approx(test_acc)  # same model, same data -> same accuracy
    # the run directory works as --checkpoint too; the recorded weights are read only when asked for
    rc, out, err = run(capsys, "eval", "--checkpoint", out_dir, *data_args(synth_dir))
    assert rc == 2 and "--use-recorded-weights" in err and len(err.strip().splitlines()) == 1
    rc, out, _ = run(capsys, "eval", "--checkpoint", out_dir, "--use-recorded-weights", *data_args(synth_dir))
    assert rc == 0 and last_json(out)["top1"] == pytest.approx(test_acc)


def test_zeroshot(capsys, synth_dir, weights, tmp_path):
    rc, out, err = run(capsys, "zeroshot", "--synthetic", "--pretrained", weights, "--output", tmp_path,
                       *data_args(synth_dir))
    assert rc == 0, err
    res = last_json(out)
    assert res["command"] == "zeroshot" and res["n"] == 80 and res["templates"] == ["a photo of a {}."]
    assert res["top1"] > 25.0
    assert json.loads((tmp_path / "zeroshot.json").read_text())["top1"] == res["top1"]
    rc, out, _ = run(capsys, "zeroshot", "--pretrained", weights, "--templates", "a {} shape.", "itap of a {}.",
                     *data_args(synth_dir))
    assert rc == 0 and last_json(out)["templates"] == ["a {} shape.", "itap of a {}."]


def test_random_init_is_reproducible_across_commands(capsys, tmp_path, synth_dir):
    """No --pretrained: the random init is seeded, so eval rebuilds the very model train fine-tuned."""
    rc, out, err = run(capsys, "train", "--method", "ln", "--shots", 2, "--epochs", 1, "--output", tmp_path,
                       *data_args(synth_dir))
    assert rc == 0, err
    acc = last_json(out)["metrics"]["test"]["top1"]
    rc, out, err = run(capsys, "eval", "--checkpoint", tmp_path / "checkpoint.safetensors", *data_args(synth_dir))
    assert rc == 0, err
    assert last_json(out)["top1"] == pytest.approx(acc)


def test_llu_and_base_to_new(capsys, tmp_path, synth_dir, weights):
    rc, out, err = run(capsys, "train", "--method", "llu", "--pretrained", weights, "--shots", 4, "--epochs", 3,
                       "--subsample", "base", "--llu-lambda", 0.01, "--lr", 0.01, "--output", tmp_path,
                       *data_args(synth_dir, classes=6))
    assert rc == 0, err
    res = last_json(out)
    assert res["classes"] == 3 and set(res["metrics"]) == {"base", "new", "H"}
    assert (tmp_path / "features").is_dir()  # cached encoder features
    rc, out, err = run(capsys, "eval", "--checkpoint", tmp_path / "checkpoint.safetensors", "--pretrained", weights,
                       "--subsample", "new", *data_args(synth_dir, classes=6))
    assert rc == 0, err
    ev = last_json(out)
    assert ev["classes"] == 3 and ev["top1"] == pytest.approx(res["metrics"]["new"]["top1"])


def test_resume_via_cli(capsys, tmp_path, synth_dir):
    common = ["--method", "bitfit", "--shots", 2, "--epochs", 2, "--lr", 0.01, "--output", tmp_path,
              *data_args(synth_dir)]
    assert run(capsys, "train", *common)[0] == 0
    first = [r["loss"] for r in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines())]
    # resuming a finished run trains nothing more and keeps the log
    rc, out, err = run(capsys, "train", *common, "--resume", tmp_path)
    assert rc == 0, err
    assert [r["loss"] for r in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines())] == first


@pytest.mark.parametrize("argv,needle", [
    (["train", "--method", "nope"], "unknown method"),
    (["zeroshot", "--pretrained", "/does/not/exist.safetensors"], "no such file"),
    (["zeroshot", "--model", "not-a-model"], "unknown open_clip config"),
    (["zeroshot", "--data", "/does/not/exist", "--dataset", "dtd"], "exist"),
    (["zeroshot", "--data", "."], "--dataset"),
    (["zeroshot", "--split-file", "/does/not/split_zhou_X.json"], "does not exist"),
    (["eval", "--checkpoint", "/does/not/ckpt.safetensors"], "no such file"),
    (["train", "--shots", "-1"], "--shots"),
    (["train", "--method", "ln", "--epochs", "0", "--shots", "1"], "epochs"),
    (["train", "--method", "ln", "--resume", "/does/not/ckpt", "--shots", "1", "--epochs", "1"], "no such file"),
])
def test_bad_input_exits_2_with_one_line(capsys, tmp_path, synth_dir, argv, needle):
    rc, out, err = run(capsys, *argv, "--output", tmp_path, *data_args(synth_dir))
    assert rc == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("leanclip: error:"), err
    assert needle in lines[0]
    assert "Traceback" not in err


def test_bad_data_source_flags(capsys, tmp_path):
    rc, out, err = run(capsys, "train", "--data", "x", "--split-file", "y")  # argparse: mutually exclusive
    assert rc == 2 and "not allowed with" in err


def test_cuda_without_gpu(capsys, synth_dir):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    rc, out, err = run(capsys, "zeroshot", "--device", "cuda", *data_args(synth_dir))
    assert rc == 2 and err.strip().startswith("leanclip: error:") and "cuda" in err and len(err.splitlines()) == 1


def test_help_documents_every_flag(capsys):
    rc, out, _ = run(capsys, "--help")
    assert rc == 0 and "train" in out and "eval" in out and "zeroshot" in out
    for cmd in ("train", "eval", "zeroshot"):
        rc, out, _ = run(capsys, cmd, "--help")
        assert rc == 0
        flags = [ln.split()[0] for ln in out.splitlines() if ln.strip().startswith("--")]
        assert flags
        for f in ("--model", "--pretrained", "--data", "--split-file", "--synthetic", "--shots", "--seed",
                  "--subsample", "--device", "--precision", "--output", "--templates", "--image-size"):
            assert f in out, (cmd, f)
    rc, out, _ = run(capsys, "train", "--help")
    for f in ("--method", "--epochs", "--batch-size", "--lr", "--optimizer", "--recompute", "--resume"):
        assert f in out


def test_extension_subcommands_are_lazy(capsys, monkeypatch, tmp_path):
    mod = tmp_path / "leanclip_fake_ext.py"
    mod.write_text("def add_arguments(p):\n    p.add_argument('--n', type=int, default=3)\n"
                   "def run(args):\n    print('fake', args.n)\n    return 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.SUBCOMMANDS, "fake", ("leanclip_fake_ext", "a fake extension"))
    monkeypatch.setitem(cli.SUBCOMMANDS, "ghost", ("leanclip_no_such_module", "absent"))
    rc, out, _ = run(capsys, "--help")
    assert rc == 0 and "fake" in out and "ghost" not in out
    rc, out, _ = run(capsys, "fake", "--n", 5)
    assert rc == 0 and out.strip() == "fake 5"
    with pytest.raises(ValueError):
        cli.register_subcommand("train", "x")


def test_python_dash_m_engine():
    """The module entry point exits with main()'s code (one interpreter start: ~5 s, torch import)."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "leanclip", "zeroshot", "--device", "nope"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "invalid choice" in p.stderr and "Traceback" not in p.stderr


def test_split_file_and_data_root(capsys, tmp_path):
    from leanclip.synthetic import make_classes, write_split_file

    root = tmp_path / "shapes"
    split = write_split_file(root, make_classes(3, seed=1), 4, 1, 3, size=32, seed=0, name="Shapes")
    rc, out, err = run(capsys, "train", "--method", "ln", "--split-file", split, "--shots", 2, "--epochs", 1,
                       "--output", tmp_path / "run", "--no-progress", "--image-size", 48)
    assert rc == 0, err
    res = last_json(out)
    assert res["dataset"] == "Shapes" and res["classes"] == 3 and res["train_images"] == 6
    assert res["metrics"]["test"]["n"] == 9
    assert (tmp_path / "run" / "fewshot").is_dir()  # the K-shot selection is cached with the run
    rc, out, err = run(capsys, "zeroshot", "--data", root, "--dataset", "Shapes", "--eval-split", "val",
                       "--no-progress")
    assert rc == 0, err
    assert last_json(out)["n"] == 3 and last_json(out)["split"] == "val"


def test_method_options_from_the_command_line(capsys, tmp_path, synth_dir):
    """--opt KEY=VALUE reaches prepare with the option's type, is recorded, and eval re-applies it."""
    from safetensors import safe_open

    out = tmp_path / "lora"
    rc, o, err = run(capsys, "train", "--method", "lora", "--opt", "rank=4", "--opt", "targets=q,v", "--shots", 1,
                     "--epochs", 1, "--output", out, *data_args(synth_dir))
    assert rc == 0, err
    with safe_open(str(out / "checkpoint.safetensors"), framework="pt") as f:
        names = list(f.keys())
        opts = json.loads(f.metadata()["options"])
    assert opts["rank"] == 4 and list(opts["targets"]) == ["q", "v"]
    assert any(n.endswith("lora.q.A") for n in names) and not any(n.endswith("lora.k.A") for n in names)
    with safe_open(str(out / "checkpoint.safetensors"), framework="pt") as f:
        assert f.get_slice(next(n for n in names if n.endswith("lora.q.A"))).get_shape()[0] == 4
    acc = last_json(o)["metrics"]["test"]["top1"]
    rc, o, err = run(capsys, "eval", "--checkpoint", out, *data_args(synth_dir))
    assert rc == 0, err
    assert last_json(o)["top1"] == pytest.approx(acc)
