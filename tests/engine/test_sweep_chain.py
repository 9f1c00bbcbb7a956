"""Chained sweeps (``--methods ln,coop@ln``): the chained cell starts from its base cell's checkpoint and equals a
lone ``leanclip train --init-from`` run; dependency order, resuming, a failed base, the report's row, and the
refusals (unknown / missing / untrained base, a cycle, a bad name, a hand-edited manifest) before any write."""
import json
import shlex
from pathlib import Path

import pytest

from leanclip import cli
from leanclip.cli import sweep, sweep_grid
from leanclip.cli.chain import dependency_order, split_chain
from leanclip.cli.common import UsageError, read_checkpoint_meta

LN, CHAIN = "fewshot/Synthetic/ln/shots1_seed1", "fewshot/Synthetic/coop@ln/shots1_seed1"


def _main(argv, capsys) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _grid(out, weights, *extra):
    return ["sweep", "--protocol", "fewshot", "--methods", "coop@ln,ln", "--shots", "1", "--seeds", "1",
            "--epochs", "1", "--batch-size", "8", "--pretrained", weights, "--workers", "0", "--output", out, *extra]


def _cells(out) -> dict:
    return json.loads((Path(out) / "sweep.json").read_text())["cells"]


def test_dependency_order_and_cycles():
    assert split_chain("coop@ln") == ("coop", "ln") and split_chain("a@b@c") == ("a", "b@c")
    assert split_chain("ln+coop") == ("ln+coop", None)
    deps = {"a@b@c": "b@c", "b@c": "c"}
    assert dependency_order(["a@b@c", "x", "b@c", "c"], deps) == ["c", "b@c", "a@b@c", "x"]
    assert dependency_order(["x", "y"], {"x": "outside"}) == ["x", "y"]  # a base outside the list is not placed
    with pytest.raises(UsageError, match=r"cycle \(p -> q -> p\)"):
        dependency_order(["p", "q"], {"p": "q", "q": "p"})


@pytest.mark.parametrize("methods,needle", [
    ("coop@foo", "base 'foo': unknown method"),
    ("coop@ln", "list 'ln' in --methods too"),
    ("zeroshot,coop@zeroshot", "no checkpoint to start from"),
    ("ln,coop@ln,coop@ln", "listed twice"),
    ("ln,coop@../ln", "is not a method name"),
    ("ln,@ln", "is not a method name"),
])
def test_bad_chains_exit_2_before_any_write(tmp_path, weights, methods, needle, capsys):
    out = tmp_path / "s"
    rc, stdout, err = _main(["sweep", "--protocol", "fewshot", "--methods", methods, "--shots", "1", "--seeds", "1",
                             "--pretrained", weights, "--output", out, "--plan"], capsys)
    assert rc == 2 and stdout == "" and needle in err and err.count("\n") == 1, err
    assert not out.exists()


def test_a_manifest_whose_chain_has_no_base_is_refused(tmp_path, weights, capsys):
    out = tmp_path / "s"
    assert _main(_grid(out, weights, "--plan"), capsys)[0] == 0
    manifest = json.loads((out / "sweep.json").read_text())
    manifest["protocols"]["fewshot"]["methods"] = ["coop@ln"]
    (out / "sweep.json").write_text(json.dumps(manifest))
    rc, _, err = _main(["report", out], capsys)
    assert rc == 2 and "protocols.fewshot.methods" in err and "list 'ln'" in err and err.count("\n") == 1


def test_chained_cell_starts_from_its_base_resumes_and_equals_a_lone_run(tmp_path, weights, capsys):
    out = tmp_path / "s"
    rc, stdout, _ = _main(_grid(out, weights, "--plan"), capsys)
    lines = stdout.splitlines()  # dependency order: the base's line first, though --methods lists it second
    assert rc == 0 and len(lines) == 2 and f"/{LN} " in lines[0] and f"/{CHAIN} " in lines[1]
    words = shlex.split(lines[1])[2:]
    assert words[words.index("--method") + 1] == "coop" and words[words.index("--init-from") + 1] == str(out / LN)
    # killed after one cell: the base ran (queued first), the chained cell is still pending
    rc, stdout, _ = _main(_grid(out, weights, "--max-cells", "1"), capsys)
    assert rc == 0 and json.loads(stdout)["ran"] == 1
    assert _cells(out)[LN]["state"] == "done" and _cells(out)[CHAIN]["state"] == "pending"
    rc, stdout, _ = _main(_grid(out, weights), capsys)  # resumed: only the unfinished cell runs
    assert rc == 0 and json.loads(stdout)["ran"] == 1 and json.loads(stdout)["done"] == 2
    meta = read_checkpoint_meta(out / CHAIN)
    assert meta["method"] == "coop" and meta["options"]["init_from"] == str(out / LN / "checkpoint.safetensors")
    alone = tmp_path / "alone"
    words[words.index("--output") + 1] = str(alone)
    assert cli.main(words) == 0
    capsys.readouterr()
    got, want = (json.loads((d / "result.json").read_text()) for d in (out / CHAIN, alone))
    assert got["metrics"] == want["metrics"] and got["final_train_loss"] == want["final_train_loss"]
    rc, stdout, _ = _main(["report", out], capsys)
    row = next(line for line in stdout.splitlines() if line.startswith("| coop@ln |"))
    assert rc == 0 and f"{got['metrics']['test']['top1']:.2f} ± 0.00" in row


def test_a_chained_cell_whose_base_failed_is_failed_and_retried_with_it(tmp_path, weights, monkeypatch, capsys):
    import leanclip.trainer as trainer

    out = tmp_path / "s"
    real = trainer.train

    def ln_fails(model, *a, **kw):
        if model.leanclip_info["method"] == "ln":
            raise RuntimeError("ln broke")
        return real(model, *a, **kw)

    with monkeypatch.context() as mp:
        mp.setattr(trainer, "train", ln_fails)
        rc, stdout, _ = _main(_grid(out, weights), capsys)
    assert rc == 1 and json.loads(stdout)["failed"] == 2
    cells = _cells(out)
    assert "ln broke" in cells[LN]["error"]
    assert cells[CHAIN]["error"].startswith(f"its base cell {LN} is failed") and not (out / CHAIN).exists()
    rc, stdout, _ = _main(_grid(out, weights, "--retry-failed"), capsys)
    assert rc == 0 and json.loads(stdout)["ran"] == 2 and json.loads(stdout)["done"] == 2


def test_parallel_workers_start_a_chained_cell_after_its_base_ended(tmp_path, weights, monkeypatch, capsys):
    """--workers 2: the chained cell's thread waits for its base (cells replaced by a stub that writes a result)."""
    import threading
    import time

    events, lock = [], threading.Lock()

    def stub(cell, spec, runner, device):
        with lock:
            events.append(("start", cell.method, cell.seed))
        time.sleep(0.3 if cell.method == "ln" else 0.0)
        step = sweep_grid.steps_of(cell, spec)[0]
        step.out.mkdir(parents=True, exist_ok=True)
        step.result.write_text(json.dumps({"command": "train", "metrics": {"test": {"top1": 50.0}}}))
        with lock:
            events.append(("end", cell.method, cell.seed))
        return None

    monkeypatch.setattr(sweep, "run_cell", stub)
    argv = _grid(tmp_path / "s", weights)
    argv[argv.index("--workers") + 1] = "2"
    argv[argv.index("--seeds") + 1] = "1,2"
    rc, stdout, _ = _main(argv, capsys)
    assert rc == 0 and json.loads(stdout)["done"] == 4, stdout
    for seed in (1, 2):
        assert events.index(("end", "ln", seed)) < events.index(("start", "coop@ln", seed)), events
