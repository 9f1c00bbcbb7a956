"""Bad input under torchrun: every rank stops at the same point with the same one line, no rank waits in a
collective for one that gave up (leanclip.distributed.inputs_checked). The torchrun launcher's own failure summary
(it reports any child that exits non-zero) follows the ranks' lines and is not leanclip's."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from leanclip import distributed as D
from tests.engine.cli_checks import torchrun_two_process

TIMEOUT_S = 300

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")


@pytest.mark.parametrize("task,method", [("classify", "ln"), ("contrastive", "lilt-ln")])
def test_bad_output_under_torchrun_is_one_line_on_each_rank(task, method, tmp_path):
    """Rank 0 alone checks --output; before, rank 1 went on and died in its next collective with 66 lines of
    traceback."""
    (tmp_path / "cwd").mkdir()
    data = ["--shots", "1", "--synthetic-dir", tmp_path / "syn"] if task == "classify" else []  # classify's flags
    proc = torchrun_two_process(["train", "--task", task, "--method", method, "--epochs", "1", *data,
                                 "--no-progress", "--device", "cpu", "--output", "/proc/leanclip-out"], TIMEOUT_S,
                                cwd=tmp_path / "cwd")
    lines = proc.stderr.splitlines()
    ours = [ln for ln in lines if ln.startswith("leanclip: error:")]
    assert proc.returncode != 0 and 1 <= len(ours) <= 2 and len(set(ours)) == 1, proc.stderr[-3000:]
    assert "--output '/proc/leanclip-out'" in ours[0]
    assert not any(ln.startswith("[rank") for ln in lines), proc.stderr[-3000:]  # no rank's traceback
    assert not os.listdir(tmp_path / "cwd")


def _checks(info, failing: int) -> None:
    D.inputs_checked(info)  # all good here
    if info.rank == failing:
        raise ValueError(f"bad input seen by rank {info.rank}")
    D.inputs_checked(info, final=True)


def _rank(rank: int, world: int, init: str, failing: int, out: str) -> None:
    """One rank of a command, the way the CLI runs it: the checks, and a handler that joins the agreement."""
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    info = D.DistInfo(rank, world, rank, "gloo", torch.device("cpu"))
    try:
        try:
            _checks(info, failing)
            result = "passed"
        except ValueError as e:
            D.inputs_checked(info, error=e)  # the point the failing rank did not reach; raises
            raise
    except ValueError as e:
        result = f"stopped: {e}"
    D.inputs_checked(info, error=ValueError("after the agreement"))  # a no-op now: no collective left to meet
    with open(os.path.join(out, f"rank{rank}"), "w") as f:
        f.write(result)
    dist.destroy_process_group()


def test_a_refusal_on_any_rank_stops_every_rank_with_its_message(tmp_path):
    mp.spawn(_rank, args=(2, f"file://{tmp_path / 'store'}", 1, str(tmp_path)), nprocs=2, join=True)
    results = {r: (tmp_path / f"rank{r}").read_text() for r in range(2)}
    assert results == {0: "stopped: bad input seen by rank 1", 1: "stopped: bad input seen by rank 1"}


def test_outside_torchrun_nothing_is_gathered():
    info = D.DistInfo()
    D.inputs_checked(info)
    D.inputs_checked(info, final=True, error=ValueError("x"))  # world size 1: the caller's handler re-raises
    assert not dist.is_initialized()
