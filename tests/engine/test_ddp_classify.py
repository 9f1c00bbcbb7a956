"""Multi-process classification training: `torchrun --nproc_per_node=2 -m leanclip train` (gloo, CPU, full data
`--shots 0`, CLIPFit so the text tower's backward and the KD term are covered) follows the same per-step losses and
ends at the same trainable weights as one process with the same global batch; a batch size that does not split evenly
(and a short last batch) included; rank 0 alone writes. Bounded in time; MASTER_PORT is picked free."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from leanclip import cli, kernels
from tests.engine.cli_checks import torchrun_two

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300
# 2 classes x 16 images = 32 (shots 0: the whole train split); batch 7: 4 full batches + one of 4 per epoch, the
# full ones split 4 + 3 over 2 processes
# the random init (--pretrain-steps 0): the smoke-run weights already solve 2 classes, leaving no loss to fall
ARGS = ["train", "--method", "clipfit", "--shots", "0", "--synthetic-classes", "2", "--epochs", "2",
        "--batch-size", "7", "--lr", "0.01", "--warmup-epochs", "0", "--seed", "3", "--threads", "1", "--no-progress",
        "--device", "cpu", "--pretrain-steps", "0"]


@pytest.fixture(autouse=True)
def _torch_backend():
    with kernels.set_backend("torch"):
        yield


def _losses(out_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out_dir / "log.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def _torchrun(args: list) -> dict:
    return torchrun_two(args, TIMEOUT_S)


def _same_weights(one: Path, two: Path) -> None:
    from safetensors.torch import load_file  # the same trainable tensors, written once (rank 0)

    a, b = load_file(one / "checkpoint.safetensors"), load_file(two / "checkpoint.safetensors")
    assert set(a) == set(b)
    for k in a:
        if not k.startswith("optim"):
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_two_process_classify_matches_one_process(tmp_path, capsys):
    syn = ["--synthetic-dir", str(tmp_path / "syn")]
    # one process first (it also builds the synthetic dataset, so the two processes only read it)
    assert cli.main([*ARGS, *syn, "--output", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    _torchrun([*ARGS, *syn, "--output", str(tmp_path / "ddp")])
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "ddp")
    assert len(one) == len(two) == 10  # ceil(32 / 7) = 5 steps per epoch, 2 epochs
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-5, atol=0)
    assert one[-1] < one[0]
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    _same_weights(tmp_path / "one", tmp_path / "ddp")

    # resume: both continue the one-process run's checkpoint for a third epoch; every process loads it
    for name in ("one_r", "ddp_r"):
        shutil.copytree(tmp_path / "one", tmp_path / name)
    assert cli.main([*ARGS, *syn, "--epochs", "3", "--resume", str(tmp_path / "one_r")]) == 0
    capsys.readouterr()
    _torchrun([*ARGS, *syn, "--epochs", "3", "--resume", str(tmp_path / "ddp_r")])
    one, two = _losses(tmp_path / "one_r"), _losses(tmp_path / "ddp_r")
    assert len(one) == len(two) == 15
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-5, atol=0)
    _same_weights(tmp_path / "one_r", tmp_path / "ddp_r")


def test_llu_refuses_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["train", "--method", "llu", "--shots", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cached features" in err[0]
