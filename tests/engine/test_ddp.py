"""Multi-process training: `torchrun --nproc_per_node=2 -m leanclip train --task contrastive` (gloo, CPU) follows the
same loss trajectory as one process with the same global batch, across an epoch boundary (DistributedSampler +
set_epoch), with rank-0-only logging / checkpointing. Bounded in time; MASTER_PORT is picked free."""
import json
from pathlib import Path

import pytest
import torch

from leanclip import cli, kernels
from leanclip.distributed import find_free_port, is_distributed
from tests.engine.cli_checks import torchrun_two

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 240
ARGS = ["train", "--task", "contrastive", "--method", "lilt-adapter", "--synthetic-pairs", "40",
        "--synthetic-eval-pairs", "8", "--batch-size", "16", "--epochs", "3", "--max-steps", "5", "--seed", "3",
        "--threads", "1", "--no-progress", "--no-initial-eval"]


@pytest.fixture(autouse=True)
def _torch_backend():
    with kernels.set_backend("torch"):
        yield


def _losses(out_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out_dir / "log.jsonl").read_text().splitlines()]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_two_process_gloo_matches_one_process(tmp_path, capsys):
    # 2 processes x 8 pairs (torchrun, gloo on CPU, global-batch negatives via the all-gather with gradient) ...
    torchrun_two([*ARGS, "--device", "cpu", "--output", tmp_path / "ddp"], TIMEOUT_S)
    # ... vs one process x 16 pairs, in this process
    assert cli.main([*ARGS, "--output", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "ddp")
    assert len(one) == len(two) == 5  # 40 // 16 = 2 steps per epoch: the run crosses two epoch boundaries
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-5, atol=0)
    assert one[-1] < one[0]
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == ["checkpoint.safetensors", "log.jsonl",
                                                                    "result.json", "summary.json"]
    from safetensors.torch import load_file  # the same trainable tensors, written once (rank 0)

    a, b = load_file(tmp_path / "one" / "checkpoint.safetensors"), load_file(tmp_path / "ddp" / "checkpoint.safetensors")
    assert set(a) == set(b)
    for k in a:
        if not k.startswith("optim"):
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=k)


def test_single_process_helpers():
    assert not is_distributed()
    p = find_free_port()
    assert 0 < p < 65536
