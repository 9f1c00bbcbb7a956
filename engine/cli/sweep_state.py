"""What a sweep keeps on disk: each step's result file (read back into a cell's metrics), ``SWEEP/sweep.json`` (every
protocol's grid and settings and each cell's state: checked on load, merged with a new grid, reconciled with the
result files, written atomically) and the folder lock one sweep at a time holds."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from leanclip import utils
from leanclip.cli.common import SEED_MAX, UsageError
from leanclip.cli.chain import chain_bases
from leanclip.cli.sweep_grid import (
    LOCK, MANIFEST, METHOD_NAME, PLAIN_NAME, PROTOCOLS, STATES, ZEROSHOT, Cell, Spec, Step, cells_of, passed_flags,
    short, steps_of,
)
from leanclip.feature_cache import count_events
from leanclip.metrics import harmonic_mean
from leanclip.run_files import CHECKPOINT_NAME, FEATURES_DIR, RUN_FILES


def read_result(step: Step) -> dict | None:
    """The step's result JSON when it finished (parsed), else None."""
    try:
        with open(step.result, encoding="utf-8") as f:
            res = json.load(f)
    except (OSError, ValueError):
        return None
    return res if isinstance(res, dict) and res.get("command") == step.kind else None


def resume_words(step: Step) -> list[str]:
    """What a train step needs to continue an interrupted run in its folder: ``--resume`` from its checkpoint, or
    ``--overwrite`` when it stopped before the first one (the folder holds only a log)."""
    if step.kind != "train":
        return []
    if (step.out / CHECKPOINT_NAME).is_file():
        return ["--resume", str(step.out)]
    return ["--overwrite"] if any((step.out / n).exists() for n in RUN_FILES) else []


class InvalidResult(ValueError):
    """A cell's result file holds a value that is not an accuracy: the cell has no usable result (the sweep records
    it as failed, the report lists it as invalid), never a number in a table."""


def _accuracy(result: dict, keys: tuple, path: Path) -> float:
    """``result[keys[0]][keys[1]]...``: a top-1 accuracy, a finite number in [0, 100] (InvalidResult otherwise)."""
    value = result
    for k in keys:
        value = value.get(k) if isinstance(value, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 <= value <= 100:
        raise InvalidResult(f"invalid result {str(path)!r}: {'.'.join(keys)} is {short(value)}, expected a "
                            f"number in [0, 100] (remove the cell's folder to run it again)")
    return float(value)


def cell_metrics(cell: Cell, spec: Spec) -> dict | None:
    """Top-1 accuracies (%) of a finished cell: ``{"acc"}`` (fewshot), ``{"base", "new", "H"}`` (base2new), ``{dataset:
    acc}`` for the source and every target (xd, dg); None while a step has no result; InvalidResult when a result
    file holds something else than accuracies where they belong."""
    results = [(s, read_result(s)) for s in steps_of(cell, spec)]
    if any(r is None for _, r in results):
        return None
    if cell.method == ZEROSHOT:
        top1 = [_accuracy(r, ("top1",), s.result) for s, r in results]
        if cell.protocol == "fewshot":
            return {"acc": top1[0]}
        if cell.protocol == "base2new":
            return {"base": top1[0], "new": top1[1], "H": harmonic_mean(top1[0], top1[1])}
        return dict(zip([cell.dataset, *spec.datasets], top1))
    train, res = results[0]
    if cell.protocol == "fewshot":
        return {"acc": _accuracy(res, ("metrics", "test", "top1"), train.result)}
    if cell.protocol == "base2new":
        return {"base": _accuracy(res, ("metrics", "base", "top1"), train.result),
                "new": _accuracy(res, ("metrics", "new", "top1"), train.result),
                "H": _accuracy(res, ("metrics", "H"), train.result)}
    return {cell.dataset: _accuracy(res, ("metrics", "test", "top1"), train.result),
            **{s.out.name: _accuracy(r, ("top1",), s.result) for s, r in results[1:]}}


# --------------------------------------------------------------------------------------------------------- manifest
def load_manifest(output: Path) -> dict:
    """SWEEP/sweep.json, checked field by field (:func:`check_manifest`); an empty manifest when there is none."""
    path = output / MANIFEST
    if not path.is_file():
        return {"version": 1, "protocols": {}, "cells": {}}
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: not a readable sweep manifest ({e})") from None
    check_manifest(manifest, path)
    return manifest


def check_manifest(manifest, path) -> None:
    """Every field a sweep or a report reads from a manifest, typed and bounded (the names plain, the numbers in
    range); UsageError naming the file and the first bad field. The file is input like any other: it may be
    hand-edited, truncated or another program's."""
    def bad(field: str, problem: str):
        raise UsageError(f"{path}: {field} {problem}")

    if not isinstance(manifest, dict) or manifest.get("version") != 1:
        raise UsageError(f"{path}: not a version-1 leanclip sweep manifest")
    for key in ("protocols", "cells"):
        if not isinstance(manifest.get(key), dict):
            bad(key, f"must be an object, got {short(manifest.get(key))}")
    for protocol, entry in manifest["protocols"].items():
        if protocol not in PROTOCOLS:
            bad("protocols", f"holds {short(protocol)}, not one of {', '.join(PROTOCOLS)}")
        if not isinstance(entry, dict):
            bad(f"protocols.{protocol}", f"must be an object, got {short(entry)}")
        _check_grid_entry(entry, f"protocols.{protocol}", protocol in ("xd", "dg"), bad)
    for cell_id, entry in manifest["cells"].items():
        where = f"cells[{short(cell_id)}]"
        if not isinstance(entry, dict):
            bad(where, f"must be an object, got {short(entry)}")
        if entry.get("state") not in STATES:
            bad(f"{where}.state", f"must be one of {', '.join(STATES)}, got {short(entry.get('state'))}")
        if not isinstance(entry.get("error"), (str, type(None))):
            bad(f"{where}.error", f"must be a string or null, got {short(entry.get('error'))}")


def _check_grid_entry(entry: dict, where: str, cross: bool, bad) -> None:
    """One protocol's grid and settings in a manifest (see :func:`check_manifest`)."""
    def names(v) -> bool:
        return isinstance(v, list) and bool(v) and len(set(map(str, v))) == len(v) \
            and all(isinstance(n, str) and PLAIN_NAME.match(n) for n in v)

    def ints(v, hi: int) -> bool:
        return isinstance(v, list) and bool(v) and len(set(map(str, v))) == len(v) \
            and all(type(n) is int and 0 <= n <= hi for n in v)

    def value(v) -> bool:
        if isinstance(v, list):
            return all(isinstance(x, str) for x in v)
        return v is None or isinstance(v, (str, bool, int)) or (isinstance(v, float) and math.isfinite(v))

    def methods(v) -> bool:
        return isinstance(v, list) and bool(v) and len(set(map(str, v))) == len(v) and all(
            isinstance(n, str) and METHOD_NAME.match(n) and all(PLAIN_NAME.match(p) for p in n.split("@")) for n in v)

    checks = [("methods", methods, "a list of distinct method names (plain, or chained as X@Y)"),
              ("datasets", names, "a list of distinct plain names"),
              ("source", (lambda v: isinstance(v, str) and bool(PLAIN_NAME.match(v))) if cross else
               (lambda v: v is None), "a plain name" if cross else "null"),
              ("shots", lambda v: ints(v, 100_000), "a list of distinct integers in [0, 100000]"),
              ("seeds", lambda v: ints(v, SEED_MAX), f"a list of distinct integers in [0, {SEED_MAX}]"),
              ("data", lambda v: v is None or isinstance(v, str), "a string or null"),
              ("flags", lambda v: isinstance(v, dict) and all(k in passed_flags() and value(x) for k, x in v.items()),
               "an object of `leanclip train` options (dest: number, string, switch or list of strings)"),
              ("opts", lambda v: isinstance(v, dict) and all(
                  isinstance(k, str) and k in entry.get("methods", ()) and isinstance(x, list)
                  and all(isinstance(kv, str) for kv in x) for k, x in v.items()),
               "an object {method: [\"KEY=VALUE\", ...]} over the grid's methods")]
    for key, ok, what in checks:
        if key not in entry:
            bad(f"{where}.{key}", "is missing")
        if not ok(entry[key]):
            bad(f"{where}.{key}", f"must be {what}, got {short(entry[key])}")
    try:
        chain_bases(entry["methods"], frozenset({ZEROSHOT}))
    except UsageError as e:
        bad(f"{where}.methods", str(e).removeprefix("--methods: "))


def _grid_entry(spec: Spec) -> dict:
    return {"methods": spec.methods, "datasets": spec.datasets, "source": spec.source, "shots": spec.shots,
            "seeds": spec.seeds, "data": spec.data, "flags": spec.flags, "opts": spec.opts}


def spec_from_manifest(output: Path, protocol: str, entry: dict) -> Spec:
    return Spec(protocol, entry["methods"], entry["datasets"], entry["source"], entry["shots"], entry["seeds"],
                entry["data"], output, dict(entry["flags"]), dict(entry["opts"]))


def merge(manifest: dict, spec: Spec) -> Spec:
    """Add ``spec``'s grid to the manifest (settings must equal those the folder was started with; grid axes may
    grow) and return the spec of the whole grid recorded for the protocol."""
    old = manifest["protocols"].get(spec.protocol)
    if old is not None:
        recorded = spec_from_manifest(spec.output, spec.protocol, old).settings()
        for key, value in spec.settings().items():
            if recorded[key] != value:
                raise UsageError(f"--output {str(spec.output)!r} holds a {spec.protocol} sweep made with other "
                                 f"{key} ({recorded[key]!r}, now {value!r}); use another --output")
        union = _grid_entry(spec)
        for axis in ("methods", "datasets", "shots", "seeds"):
            union[axis] = old[axis] + [v for v in union[axis] if v not in old[axis]]
    else:
        union = _grid_entry(spec)
    manifest["protocols"][spec.protocol] = union
    return spec_from_manifest(spec.output, spec.protocol, union)


def reconcile(manifest: dict, whole: Spec, retry_failed: bool) -> None:
    """Each cell's state from what is on disk: done when every step has its result; an interrupted (running) or
    new cell is pending; a failed one stays failed unless ``retry_failed``; one whose result file holds no valid
    accuracy is failed with the file and field as its error."""
    for cell in cells_of(whole):
        entry = manifest["cells"].setdefault(cell.id, {"protocol": cell.protocol, "dataset": cell.dataset,
                                                       "method": cell.method, "shots": cell.shots,
                                                       "seed": cell.seed, "state": "pending", "error": None})
        try:
            metrics = cell_metrics(cell, whole)
        except InvalidResult as e:  # rerunning would not touch the file: recorded, reported, the grid goes on
            entry.update(state="failed", error=str(e))
            continue
        if metrics is not None:
            entry.update(state="done", error=None, metrics=metrics)
        elif entry["state"] != "failed" or retry_failed:
            entry.update(state="pending", error=None)


def write_manifest(manifest: dict, output: Path) -> None:
    if (output / FEATURES_DIR).is_dir():
        manifest["feature_cache"] = {"dir": FEATURES_DIR, **count_events(output / FEATURES_DIR)}
    utils.atomic_write_json(output / MANIFEST, manifest)


class FolderLock:
    """An exclusive, non-blocking ``flock`` on SWEEP/.sweep.lock; cells started as processes inherit it, so a sweep
    cannot start while cells of an earlier (killed) one still run."""

    def __init__(self, output: Path):
        self.path, self.fd = output / LOCK, None

    def __enter__(self):
        import fcntl

        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise UsageError(f"--output {str(self.path.parent)!r} is in use by another leanclip sweep (or cells it "
                             f"started)") from None
        return self

    def __exit__(self, *exc):
        os.close(self.fd)
