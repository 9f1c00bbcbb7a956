"""`leanclip sweep` / `leanclip report` on CPU: a small grid over the synthetic dataset and a CoOp-layout dataset the
test writes, interrupted and resumed; every cell equals a run of that cell alone; the report's numbers are the
cells' numbers; the shared image-feature cache is counted and keyed by the weights."""
import csv
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from leanclip import cli
from leanclip.cli import sweep, sweep_grid, sweep_state
from leanclip import feature_cache as fc
from leanclip.data import Sample, write_split_json
from leanclip.run_files import RESULT_FILES

TOY_CLASSES = ["red", "green", "blue", "yellow", "purple", "orange"]
COLOURS = [(220, 30, 30), (30, 200, 40), (30, 40, 220), (230, 220, 30), (150, 30, 160), (240, 140, 20)]
SEEDS = "1,2"


@pytest.fixture(scope="module")
def weights(tiny_name):
    """The weights a smoke run starts from by default (the per-user cache: made once per test session)."""
    return cli.synthetic_pretrained_weights(None, tiny_name, 40)


def _png(path: Path, colour, rng) -> None:
    from PIL import Image

    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    px = np.clip(np.array(colour)[None, None] + rng.integers(-40, 40, (32, 32, 3)), 0, 255).astype("uint8")
    Image.fromarray(px).save(path)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """A CoOp split-file dataset ``Toy`` (root/Toy/split_zhou_Toy.json + images) and an ImageNet-layout pair
    (imagenet/ with train + val, imagenet-sketch/) for the dg protocol; 32 px PNGs coloured by class."""
    import numpy as np

    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    splits = {"train": [], "val": [], "test": []}
    for label, (name, colour) in enumerate(zip(TOY_CLASSES, COLOURS)):
        for split, n in (("train", 4), ("val", 1), ("test", 3)):
            for i in range(n):
                p = root / "Toy" / "images" / name / f"{split}{i}.png"
                _png(p, colour, rng)
                splits[split].append(Sample(str(p), label, name))
    write_split_json(root / "Toy" / "split_zhou_Toy.json", splits, root / "Toy" / "images")
    wnids = [f"n{i:08d}" for i in range(4)]
    for folder, parts in (("imagenet", ["images/train", "images/val"]), ("imagenet-sketch", ["images"])):
        (root / folder).mkdir()
        (root / folder / "classnames.txt").write_text("".join(f"{w} {c}\n" for w, c in zip(wnids, TOY_CLASSES)))
        for part in parts:
            for w, colour in zip(wnids, COLOURS):
                for i in range(3):
                    _png(root / folder / part / w / f"{i}.png", colour, rng)
    return root


def _main(argv, capsys=None) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr() if capsys is not None else ("", "")
    return rc, out, err


def _grid(out, weights, data_root, *extra):
    return ["sweep", "--protocol", "base2new", "--methods", "coop,llu,ln,zeroshot", "--datasets", "synthetic,Toy",
            "--data", data_root, "--shots", "2", "--seeds", SEEDS, "--epochs", "2", "--batch-size", "8",
            "--pretrained", weights, "--output", out, *extra]


def _manifest(out) -> dict:
    return json.loads((Path(out) / "sweep.json").read_text())


def _alone(cell_line: str, scratch: Path) -> list[dict]:
    """Run a `--plan` line's commands in this process with --output moved to ``scratch`` and no feature cache."""
    results = []
    for command in cell_line.split(" && "):
        words = shlex.split(command)
        assert words[0].startswith(f"{fc.ENV_VAR}=") and words[1] == "leanclip"
        argv = words[2:]
        for flag in ("--output", "--checkpoint", "--resume"):
            if flag in argv:
                i = argv.index(flag) + 1
                argv[i] = str(scratch / Path(argv[i]).relative_to(Path(argv[i]).anchor))
        assert cli.main(argv) == 0
        out = Path(argv[argv.index("--output") + 1])
        results.append(json.loads((out / RESULT_FILES[argv[0]]).read_text()))
    return results


def _same(a: dict, b: dict) -> None:
    """Equal results: metrics, losses, counts (not paths or timings)."""
    for k in ("metrics", "final_train_loss", "steps", "train_images", "top1", "top5", "n", "classes"):
        assert a.get(k) == b.get(k), k


def _interrupt_one_cell(out: Path, cell_id: str, monkeypatch) -> None:
    """What a SIGKILL after the first epoch's checkpoint leaves: checkpoint + log, no result, state 'running'."""
    import leanclip.trainer as trainer

    real = trainer.train

    def first_epoch_only(*a, **kw):
        a[5].stop_after_epoch = 1
        return real(*a, **kw)

    line = next(l for l in _plan_lines(out) if f"/{cell_id} " in l + " ")
    argv = shlex.split(line)[2:]
    with monkeypatch.context() as mp:
        mp.setattr(trainer, "train", first_epoch_only)
        mp.setenv(fc.ENV_VAR, str(out / "features"))
        assert cli.main(argv) == 0
    for name in ("result.json", "summary.json"):
        (out / cell_id / name).unlink()
    manifest = _manifest(out)
    manifest["cells"][cell_id]["state"] = "running"
    (out / "sweep.json").write_text(json.dumps(manifest))


def _plan_lines(out) -> list[str]:
    m = _manifest(out)
    spec = sweep_state.spec_from_manifest(Path(out), "base2new", m["protocols"]["base2new"])
    return [sweep.plan_line(c, spec) for c in sweep_grid.cells_of(spec) if m["cells"][c.id]["state"] != "done"]


def test_sweep_interrupted_and_resumed_equals_cells_alone(tmp_path, weights, data_root, monkeypatch, capsys):
    out = tmp_path / "sweep"
    monkeypatch.delenv(fc.ENV_VAR, raising=False)
    # 1. stopped after 3 cells
    rc, stdout, err = _main(_grid(out, weights, data_root, "--workers", "0", "--max-cells", "3"), capsys)
    assert rc == 0, err
    assert json.loads(stdout)["done"] == 3
    states = [c["state"] for c in _manifest(out)["cells"].values()]
    assert len(states) == 14 and states.count("done") == 3 and states.count("pending") == 11
    # 2. one cell killed after its first epoch's checkpoint, one before any checkpoint (a log line only)
    _interrupt_one_cell(out, "base2new/Toy/coop/shots2_seed1", monkeypatch)
    early = out / "base2new/Toy/ln/shots2_seed2"
    early.mkdir(parents=True)
    (early / "log.jsonl").write_text('{"step": 1, "epoch": 1, "loss": 9.0}\n')
    capsys.readouterr()
    # 3. resumed: every cell done, the interrupted one continued from its checkpoint, the early one restarted
    rc, stdout, err = _main(_grid(out, weights, data_root, "--workers", "0"), capsys)
    summary = json.loads(stdout)
    assert rc == 0 and summary["done"] == 14 and summary["ran"] == 11
    assert "--resume" in (out / "base2new/Toy/coop/shots2_seed1/sweep.log").read_text()
    assert "--overwrite" in (early / "sweep.log").read_text()
    # nothing left to do: a finished cell is never rerun
    rc, stdout, _ = _main(_grid(out, weights, data_root, "--workers", "0"), capsys)
    assert rc == 0 and json.loads(stdout)["ran"] == 0
    # 4. every cell equals the same commands run alone (fresh folder, no feature cache)
    manifest = _manifest(out)
    spec = sweep_state.spec_from_manifest(out, "base2new", manifest["protocols"]["base2new"])
    for cell in sweep_grid.cells_of(spec):
        alone = _alone(sweep.plan_line(cell, _fresh(spec)), tmp_path / "alone")
        for step, mine in zip(sweep_grid.steps_of(cell, spec), alone):
            _same(sweep_state.read_result(step), mine)
    # 5. feature cache: one image-tower pass per (tower, split); frozen-tower cells reuse it
    events = [json.loads(l) for l in (out / "features" / fc.EVENTS_NAME).read_text().splitlines()]
    passes = [e["key"] for e in events if e["event"] == "pass"]
    assert len(passes) == len(set(passes))  # write-once: no key computed twice
    # per dataset: base + new test sets for the zero-shot (plain) tower and for the prepared (lean) tower shared by
    # coop and llu, + llu's K-shot train set per seed; ln trains the image tower: never cached
    assert len(passes) == 2 * (2 + 2 + 2)
    test_passes = [e for e in events if e["event"] == "pass" and e["n"] in (9, 100)]  # Toy / Synthetic test halves
    assert len(test_passes) == 2 * 2 * 2  # without the cache: (2 methods x 2 seeds + zero-shot) x 2 halves x 2 sets
    assert manifest["feature_cache"]["passes"] == len(passes) and manifest["feature_cache"]["hits"] > 0
    # 6. the report's numbers are the cells' numbers
    rc, stdout, _ = _main(["report", out], capsys)
    assert rc == 0 and "base-to-new" in stdout and "cells without a result" not in stdout
    rows = list(csv.DictReader(open(out / "report.csv")))
    for ds in ("Synthetic", "Toy"):
        for method in ("coop", "llu", "ln"):
            base = [manifest["cells"][f"base2new/{ds}/{method}/shots2_seed{s}"]["metrics"]["base"] for s in (1, 2)]
            row = next(r for r in rows if r["dataset"] == ds and r["method"] == method and r["column"] == "base")
            assert float(row["mean"]) == pytest.approx(sum(base) / 2, abs=1e-9) and row["n"] == "2"
            results = [json.loads((out / f"base2new/{ds}/{method}/shots2_seed{s}/result.json").read_text())
                       for s in (1, 2)]
            assert base == [r["metrics"]["base"]["top1"] for r in results]
    assert (out / "report_base2new.png").stat().st_size > 0 and (out / "report.md").read_text().startswith("#")


def _fresh(spec):
    """``spec`` as if nothing had run: plan lines without --resume / --overwrite."""
    import dataclasses

    return dataclasses.replace(spec, output=spec.output.parent / "never-written")


def _bad_cases(data_root, weights):
    base = ["--protocol", "base2new", "--methods", "coop", "--datasets", "synthetic", "--seeds", "1"]
    swap = lambda flag, value: [value if i > 0 and base[i - 1] == flag else w for i, w in enumerate(base)]  # noqa
    return {
        "unknown protocol": swap("--protocol", "fewshots"),
        "unknown method": swap("--methods", "coop,nosuch"),
        "method twice": swap("--methods", "coop,coop"),
        "closed set in base2new": swap("--methods", "linear-probe"),
        "seed twice": swap("--seeds", "1,1"),
        "seed not a number": swap("--seeds", "1,x"),
        "negative shots": [*base, "--shots", "-1"],
        "dataset without --data": swap("--datasets", "Toy"),
        "missing dataset": [*swap("--datasets", "DTD"), "--data", data_root],
        "missing data root": [*base, "--data", data_root / "nope"],
        "split-file source for dg": ["--protocol", "dg", "--methods", "coop", "--source", "Toy", "--datasets",
                                     "ImageNetSketch", "--data", data_root],
        "source for base2new": [*base, "--source", "ImageNet"],
        "opt nobody declares": [*base, "--opt", "rank=4"],
        "opt of another method": [*base, "--opt", "lora:rank=4"],
        "opt badly typed": [*base, "--opt", "n_ctx=four"],
        "epochs 0": [*base, "--epochs", "0"],
        "nan lr": [*base, "--lr", "nan"],
        "missing weights": [*base, "--pretrained", data_root / "nope.safetensors"],
        "workers": [*base, "--workers", "-1"],
        "devices in process": [*base, "--workers", "0", "--devices", "0"],
        "more workers than devices": [*base, "--workers", "2", "--devices", "0"],
        "max cells": [*base, "--max-cells", "0"],
        "contrastive flag": [*base, "--task", "contrastive"],
    }


def test_bad_arguments_exit_2_before_any_write(tmp_path, data_root, weights, capsys):
    for name, argv in _bad_cases(data_root, weights).items():
        out = tmp_path / name.replace(" ", "_")
        rc, stdout, err = _main(["sweep", *argv, "--output", out, "--plan"], capsys)  # --plan: never runs a cell
        assert rc == 2 and stdout == "" and err.startswith("leanclip: error:") and err.count("\n") == 1, (name, err)
        assert not out.exists(), name
    rc, _, err = _main(["report", tmp_path], capsys)
    assert rc == 2 and "sweep.json" in err and err.count("\n") == 1


def test_settings_of_a_sweep_folder_are_fixed(tmp_path, weights, data_root, capsys):
    out = tmp_path / "s"
    common = ["sweep", "--protocol", "fewshot", "--methods", "coop", "--seeds", "1", "--shots", "1", "--output", out,
              "--plan"]
    assert _main([*common, "--epochs", "1"], capsys)[0] == 0
    before = (out / "sweep.json").read_text()
    rc, _, err = _main([*common, "--epochs", "2"], capsys)  # other settings: refused, nothing changed
    assert rc == 2 and "other flags" in err and (out / "sweep.json").read_text() == before
    rc, stdout, _ = _main([*common, "--epochs", "1", "--seeds", "1,2"], capsys)  # the grid may grow
    assert rc == 0 and len(stdout.splitlines()) == 2 and _manifest(out)["protocols"]["fewshot"]["seeds"] == [1, 2]


def test_feature_cache_counts_passes_and_follows_the_weights(tmp_path, fresh_tiny, tok):
    from leanclip import prepare
    from leanclip.data import TensorImageDataset

    model = fresh_tiny()
    prepare(model, "coop", classnames=["a", "b"], tokenizer=tok)
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ds = TensorImageDataset(images, torch.tensor([0, 1] * 3))
    cache = fc.FeatureCache(tmp_path)
    kw = dict(device=torch.device("cpu"), precision="fp32", cache=cache)
    first, labels = fc.encoder_features(model, ds, 4, **kw)
    again, _ = fc.encoder_features(model, ds, 4, **kw)
    assert torch.equal(first, again) and labels.tolist() == [0, 1] * 3
    assert fc.count_events(tmp_path) == {"passes": 1, "hits": 1}
    model.eval()
    with torch.no_grad():  # what the encoder gives for the same batches (the batch size is part of the key)
        assert torch.equal(first, torch.cat([model.encode_image(x).float() for x in images.split(4)]))
    with torch.no_grad():  # other weights: another entry, computed anew
        model.visual.conv1.weight.mul_(1.5)
    changed, _ = fc.encoder_features(model, ds, 4, **kw)
    assert not torch.equal(changed, first) and fc.count_events(tmp_path) == {"passes": 2, "hits": 1}
    model.visual.ln_post.weight.requires_grad_(True)  # a training image tower is never cached
    assert fc.encoder_features(model, ds, 4, **kw) is None
    assert fc.encoder_features(model, ds, 4, encoder_only=True, **kw) is not None  # zero-shot reads the encoder


def test_plan_lines_run_in_a_shell_and_parallel_workers_survive_a_kill(tmp_path, weights, capsys):
    out = tmp_path / "s"
    grid = ["sweep", "--protocol", "fewshot", "--methods", "linear-probe,coop", "--shots", "1", "--seeds", SEEDS,
            "--epochs", "2", "--pretrained", weights, "--output", out, "--threads", "1"]  # 2 workers, 2 cores
    rc, stdout, _ = _main([*grid, "--plan"], capsys)
    lines = stdout.splitlines()
    assert rc == 0 and len(lines) == 4 and all(l.count(" leanclip train ") == 1 for l in lines)
    shim = tmp_path / "bin" / "leanclip"  # `leanclip` on PATH, as an installed package provides it
    shim.parent.mkdir()
    shim.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m leanclip \"$@\"\n")
    shim.chmod(0o755)
    # the cells' processes run the torch backend, as this process does (engine conftest), not the Triton interpreter
    env = {**os.environ, "PATH": f"{shim.parent}{os.pathsep}{os.environ['PATH']}", "LEANCLIP_BACKEND": "torch",
           "TRITON_INTERPRET": "0"}
    subprocess.run(["bash", "-c", lines[0]], env=env, check=True, capture_output=True)
    # two worker processes; the sweep and its cells are SIGKILLed once a cell has its first epoch's checkpoint
    proc = subprocess.Popen([sys.executable, "-m", "leanclip", *map(str, grid), "--workers", "2"], env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    def mid_cell():
        return [p.parent for p in out.glob("fewshot/*/*/*/checkpoint.safetensors")
                if not (p.parent / "result.json").exists()]

    cut, killed = [], False
    try:
        while proc.poll() is None and not cut:
            if mid_cell():  # freeze the group, then look again: a cell may have finished in between
                os.killpg(proc.pid, signal.SIGSTOP)
                cut = mid_cell()
                if not cut:
                    os.killpg(proc.pid, signal.SIGCONT)
            time.sleep(0.05)
    finally:
        killed = proc.poll() is None
        if killed:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        _wait_group_gone(proc.pid)  # the cells hold the folder's lock until they are gone
    assert killed, "the sweep ended before a cell had a checkpoint and no result"
    states = {i: c["state"] for i, c in _manifest(out)["cells"].items()}
    assert all(states[str(f.relative_to(out))] == "running" for f in cut)
    # the files decide: a cell whose results were written before the kill (its manifest line may still say
    # running) is done and not rerun; every other cell runs
    unfinished = [i for i in states if not (out / i / "result.json").exists()]
    rc, stdout, _ = _main([*grid, "--workers", "0"], capsys)
    summary = json.loads(stdout)
    assert rc == 0 and summary["done"] == 4 and summary["ran"] == len(unfinished)
    for folder in cut:  # killed mid-cell: continued from its checkpoint
        assert "--resume" in (folder / "sweep.log").read_text()
    # the cell the shell ran (its own process) equals the same cell run inside this process
    first = json.loads((Path(shlex.split(lines[0])[shlex.split(lines[0]).index("--output") + 1]) / "result.json")
                       .read_text())
    _same(first, _alone(lines[0], tmp_path / "alone")[0])
    capsys.readouterr()
    assert _main(["report", out], capsys)[0] == 0
    rows = [r for r in csv.DictReader(open(out / "report.csv")) if r["dataset"] == "Synthetic"]
    assert {r["method"] for r in rows} == {"linear-probe", "coop"} and all(r["n"] == "2" for r in rows)


def test_dg_protocol_trains_on_the_source_and_evaluates_the_targets(tmp_path, weights, data_root, capsys):
    out = tmp_path / "dg"
    rc, stdout, err = _main(["sweep", "--protocol", "dg", "--methods", "zeroshot,coop", "--datasets",
                             "ImageNetSketch", "--data", data_root, "--shots", "2", "--seeds", "1", "--epochs", "1",
                             "--pretrained", weights, "--output", out, "--workers", "0", "--no-feature-cache"], capsys)
    assert rc == 0 and json.loads(stdout)["done"] == 2, err
    assert not (out / "features").exists()  # --no-feature-cache: every cell computes its own features
    cell = out / "dg/ImageNet/coop/shots2_seed1"
    target = json.loads((cell / "eval/ImageNetSketch/eval.json").read_text())
    metrics = _manifest(out)["cells"]["dg/ImageNet/coop/shots2_seed1"]["metrics"]
    assert metrics == {"ImageNet": json.loads((cell / "result.json").read_text())["metrics"]["test"]["top1"],
                       "ImageNetSketch": target["top1"]}
    rc, stdout, _ = _main(["report", out], capsys)
    assert rc == 0 and "| ImageNet | ImageNetSketch | targets avg |" in stdout
    row = next(r for r in csv.DictReader(open(out / "report.csv"))
               if r["method"] == "coop" and r["column"] == "targets avg")
    assert float(row["mean"]) == target["top1"]


def _wait_group_gone(pgid: int, timeout: float = 30.0) -> None:
    end = time.time() + timeout
    while time.time() < end:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError(f"process group {pgid} still alive")


def test_a_failed_cell_is_recorded_listed_and_retried_on_request(tmp_path, weights, capsys):
    out = tmp_path / "f"
    grid = ["sweep", "--protocol", "fewshot", "--methods", "coop,linear-probe", "--shots", "1", "--seeds", "1",
            "--epochs", "1", "--pretrained", weights, "--output", out, "--workers", "0",
            "--opt", "coop:n_ctx=100"]  # typed right, but longer than the text context: the cell fails when it runs
    rc, stdout, _ = _main(grid, capsys)
    assert rc == 1 and json.loads(stdout)["failed"] == 1 and json.loads(stdout)["done"] == 1
    failed = _manifest(out)["cells"]["fewshot/Synthetic/coop/shots1_seed1"]
    assert failed["state"] == "failed" and failed["error"].startswith("train exited 2: leanclip: error:")
    rc, stdout, _ = _main(grid, capsys)  # not retried unless asked
    assert rc == 1 and json.loads(stdout)["ran"] == 0
    rc, stdout, _ = _main([*grid, "--retry-failed"], capsys)
    assert rc == 1 and json.loads(stdout)["ran"] == 1
    rc, stdout, _ = _main(["report", out], capsys)
    assert rc == 0 and "cells without a result (1, not averaged)" in stdout
    assert f"`fewshot/Synthetic/coop/shots1_seed1`: failed: {failed['error']}" in stdout
    coop = next(l for l in stdout.splitlines() if l.startswith("| coop |"))
    assert coop == "| coop | — |"  # nothing averaged in its place


def test_names_that_would_leave_the_sweep_folder_are_refused_before_any_write(tmp_path, weights, capsys):
    from leanclip import data, synthetic

    root = tmp_path / "root"
    (root / "split_zhou_..").mkdir(parents=True)  # split_zhou_../../esc.json resolves to root/esc.json
    split = synthetic.write_split_file(tmp_path / "toy", synthetic.make_classes(3, seed=1), 2, 1, 2, size=16,
                                       name="Toy")
    (root / "esc.json").write_text(Path(split).read_text())
    (root / "images").symlink_to(Path(split).parent / "images")
    assert data.find_split_file(root, "../../esc")[0] == str(root / "split_zhou_../../esc.json")  # found: only the
    out = tmp_path / "a" / "b" / "sweep"                                                         # name check stops it
    base = ["sweep", "--protocol", "fewshot", "--methods", "coop", "--shots", "1", "--seeds", "1", "--epochs", "1",
            "--pretrained", weights, "--workers", "0", "--output", out]
    for argv, needle in (([*base, "--datasets", "../../esc", "--data", root], "--datasets: '../../esc'"),
                         ([*base, "--methods", "../coop"], "--methods: '../coop'"),
                         ([*base, "--datasets", "Toy/..", "--data", root], "--datasets: 'Toy/..'"),
                         ([*base[:2], "xd", *base[3:], "--source", "../ImageNet", "--data", root, "--datasets",
                           "esc"], "--source: '../ImageNet'")):
        rc, stdout, err = _main(argv, capsys)
        assert rc == 2 and stdout == "" and needle in err and err.count("\n") == 1, err
        assert not (tmp_path / "a").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["root", "toy"]
    # a folder of the sweep that is a link to elsewhere: the cells would be written there; refused, nothing written
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out.mkdir(parents=True)
    (out / "fewshot").symlink_to(elsewhere)
    rc, _, err = _main([*base, "--datasets", "synthetic"], capsys)
    assert rc == 2 and "outside the sweep folder" in err and err.count("\n") == 1, err
    assert list(elsewhere.iterdir()) == [] and sorted(p.name for p in out.iterdir()) == ["fewshot"]
    with pytest.raises(cli.UsageError, match="outside the sweep folder"):
        sweep_grid._inside(out, out / "x" / ".." / ".." / "y")
    assert sweep_grid._inside(out, out / "x" / ".." / "y") == out / "x" / ".." / "y"


def test_a_smoke_sweep_starts_from_the_cached_synthetic_pretraining(tmp_path, weights, capsys):
    """No --data, no --pretrained: the cells start from the smoke runs' default weights (not chance level), the same
    as naming the cached file with --pretrained."""
    grid = ["sweep", "--protocol", "fewshot", "--methods", "zeroshot,coop", "--shots", "1", "--seeds", "1",
            "--epochs", "1", "--workers", "0", "--no-feature-cache"]
    rc, stdout, err = _main([*grid, "--output", tmp_path / "default"], capsys)
    assert rc == 0 and json.loads(stdout)["done"] == 2, err
    rc, stdout, err = _main([*grid, "--pretrained", weights, "--output", tmp_path / "named"], capsys)
    assert rc == 0 and json.loads(stdout)["done"] == 2, err
    default, named = (_manifest(tmp_path / n)["cells"] for n in ("default", "named"))
    assert {c: e["metrics"] for c, e in default.items()} == {c: e["metrics"] for c, e in named.items()}
    assert default["fewshot/Synthetic/zeroshot/shots0_seed0"]["metrics"]["acc"] > 40  # 10 classes: chance is 10
    result = json.loads((tmp_path / "default/fewshot/Synthetic/coop/shots1_seed1/result.json").read_text())
    assert result["metrics"]["test"]["top1"] > 40
