"""`leanclip report` (and `leanclip sweep`) on what they read from disk: a sweep.json with wrong types or names is one
line naming the file and the field (exit 2, nothing written); a result file whose accuracy is not a finite number in
[0, 100] makes its cell invalid (listed with the file and the field, never averaged). The sweep folders are written
by hand: no training."""
import copy
import json
from pathlib import Path

import pytest

from leanclip.cli import sweep_state
from tests.engine.cli_checks import run

CELL = "fewshot/Synthetic/coop/shots1_seed{}"
GRID = {"methods": ["coop"], "datasets": ["Synthetic"], "source": None, "shots": [1], "seeds": [1, 2], "data": None,
        "flags": {"epochs": 1}, "opts": {}}


def _manifest(grid=None, cells=None) -> dict:
    cells = cells if cells is not None else {
        CELL.format(s): {"protocol": "fewshot", "dataset": "Synthetic", "method": "coop", "shots": 1, "seed": s,
                         "state": "done", "error": None} for s in (1, 2)}
    return {"version": 1, "protocols": {"fewshot": grid if grid is not None else copy.deepcopy(GRID)},
            "cells": cells}


def _write(folder: Path, manifest: dict, results: dict) -> Path:
    """``folder/sweep.json`` + one train result.json per seed whose test top-1 is ``results[seed]`` (raw JSON)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sweep.json").write_text(json.dumps(manifest))
    for seed, top1 in results.items():
        cell = folder / CELL.format(seed)
        cell.mkdir(parents=True, exist_ok=True)
        (cell / "result.json").write_text(f'{{"command": "train", "metrics": {{"test": {{"top1": {top1}}}}}}}')
    return folder


def _coop_row(stdout: str) -> str:
    return next(line for line in stdout.splitlines() if line.startswith("| coop |"))


def test_valid_results_are_averaged(capsys, tmp_path):
    out = _write(tmp_path / "s", _manifest(), {1: 50.0, 2: 60})
    rc, stdout, err = run(capsys, "report", out)
    assert rc == 0, err
    assert _coop_row(stdout) == "| coop | 55.00 ± 5.00 |" and "cells without a result" not in stdout


@pytest.mark.parametrize("bad", ['"high"', "1e308", "NaN", "Infinity", "-0.5", "100.5", "true", "null", "[50]"])
def test_a_result_that_is_no_accuracy_makes_its_cell_invalid(capsys, tmp_path, bad):
    out = _write(tmp_path / "s", _manifest(), {1: 50.0, 2: bad})
    rc, stdout, err = run(capsys, "report", out)
    assert rc == 0, err
    assert _coop_row(stdout) == "| coop | 50.00 ± 0.00 [1/2] |"  # the other seed alone, marked as such
    line = next(line for line in stdout.splitlines() if line.startswith(f"- `{CELL.format(2)}`"))
    assert ": invalid: invalid result " in line and "result.json" in line and "metrics.test.top1" in line
    for value in ("1e+308", "1e308", "nan", "inf"):  # never printed as a result
        assert value not in _coop_row(stdout).lower()
    # the sweep records the cell as failed with the same line and exits 1 (it never reruns a finished step)
    rc, stdout, err = run(capsys, "sweep", "--protocol", "fewshot", "--methods", "coop", "--shots", "1", "--seeds",
                          "1,2", "--epochs", "1", "--output", out, "--workers", "0")
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert rc == 1 and summary["failed"] == 1 and summary["done"] == 1 and summary["ran"] == 0, err
    entry = json.loads((out / "sweep.json").read_text())["cells"][CELL.format(2)]
    assert entry["state"] == "failed" and "metrics.test.top1" in entry["error"]


def _bad_manifests():
    def grid(**change):
        g = copy.deepcopy(GRID)
        g.update(change)
        return _manifest(grid=g)

    no_seeds = copy.deepcopy(GRID)
    del no_seeds["seeds"]
    return {
        "shots a string": (grid(shots="16"), "protocols.fewshot.shots"),
        "seed a string": (grid(seeds=[1, "2"]), "protocols.fewshot.seeds"),
        "seed a bool": (grid(seeds=[True]), "protocols.fewshot.seeds"),
        "seed a float": (grid(seeds=[1.0]), "protocols.fewshot.seeds"),
        "negative shots": (grid(shots=[-1]), "protocols.fewshot.shots"),
        "seeds missing": (_manifest(grid=no_seeds), "protocols.fewshot.seeds"),
        "methods a string": (grid(methods="coop"), "protocols.fewshot.methods"),
        "method climbing out": (grid(methods=["../../x"]), "protocols.fewshot.methods"),
        "dataset climbing out": (grid(datasets=["../esc"]), "protocols.fewshot.datasets"),
        "dataset absolute": (grid(datasets=["/tmp"]), "protocols.fewshot.datasets"),
        "source in fewshot": (grid(source="ImageNet"), "protocols.fewshot.source"),
        "unknown flag": (grid(flags={"nosuch": 1}), "protocols.fewshot.flags"),
        "nan flag": (grid(flags={"lr": float("nan")}), "protocols.fewshot.flags"),
        "opts of no method": (grid(opts={"lora": ["rank=4"]}), "protocols.fewshot.opts"),
        "data a number": (grid(data=3), "protocols.fewshot.data"),
        "grid a list": (_manifest(grid=[1]), "protocols.fewshot"),
        "unknown protocol": ({"version": 1, "protocols": {"../x": GRID}, "cells": {}}, "protocols"),
        "protocols a list": ({"version": 1, "protocols": [], "cells": {}}, "protocols"),
        "cells missing": ({"version": 1, "protocols": {"fewshot": GRID}}, "cells"),
        "cell state": (_manifest(cells={CELL.format(1): {"state": "great", "error": None}}), ".state"),
        "cell error a number": (_manifest(cells={CELL.format(1): {"state": "failed", "error": 3}}), ".error"),
        "cell a string": (_manifest(cells={CELL.format(1): "done"}), "cells["),
        "version 2": ({**_manifest(), "version": 2}, "version-1"),
        "a list": ([], "version-1"),
    }


@pytest.mark.parametrize("name", list(_bad_manifests()))
def test_a_malformed_manifest_is_one_line_naming_file_and_field(capsys, tmp_path, name):
    manifest, field = _bad_manifests()[name]
    out = tmp_path / "s"
    out.mkdir()
    text = json.dumps(manifest)
    (out / "sweep.json").write_text(text)
    rc, stdout, err = run(capsys, "report", out)
    assert rc == 2 and stdout == "" and err.startswith("leanclip: error: ") and err.count("\n") == 1, err
    assert str(out / "sweep.json") in err and field in err, err
    assert sorted(p.name for p in out.iterdir()) == ["sweep.json"]  # no report written
    # the sweep refuses the folder the same way and leaves the manifest as it was
    rc, _, err = run(capsys, "sweep", "--protocol", "fewshot", "--methods", "coop", "--shots", "1", "--seeds", "1",
                     "--output", out, "--plan")
    assert rc == 2 and field in err and err.count("\n") == 1, err
    assert (out / "sweep.json").read_text() == text


def test_a_manifest_the_sweep_wrote_passes_the_check(capsys, tmp_path):
    out = tmp_path / "s"
    rc, _, err = run(capsys, "sweep", "--protocol", "base2new", "--methods", "zeroshot,coop,llu", "--seeds", "1,2",
                     "--epochs", "1", "--lr", "0.01", "--opt", "coop:n_ctx=2",
                     "--no-feature-cache", "--output", out, "--plan")
    assert rc == 0, err
    sweep_state.check_manifest(json.loads((out / "sweep.json").read_text()), out / "sweep.json")
