"""``leanclip sweep``: a protocol grid (methods x datasets x shots x seeds) as resumable cells.

    leanclip sweep --protocol base2new --methods coop,clipfit,llu --datasets coop11 --seeds 1,2,3 \\
        --data ~/data --model ViT-B-16 --pretrained openai --output sweeps/b2n
    leanclip report sweeps/b2n

Each cell is one run directory ``SWEEP/<protocol>/<dataset>/<method>/shots<K>_seed<S>/`` made by the very commands
``--plan`` prints (``leanclip train`` for the cell, then ``leanclip eval`` on each target for the cross-dataset
protocols; ``leanclip zeroshot`` for the ``zeroshot`` row), so a cell's result is the result of running it alone.
Cells run as subprocesses (``--workers N``, ``--devices`` gives each its own GPU) or, with ``--workers 0``, inside
this process one after another (no start-up cost per cell: small CPU sweeps).

State: ``SWEEP/sweep.json`` (written atomically by this process only) holds every protocol's grid and settings and each
cell's state (pending / running / done / failed + the error line). What is on disk decides: a cell whose result
files exist is done and never rerun; one with a checkpoint but no result (interrupted) resumes from it; a failed
cell is retried only with ``--retry-failed``. One sweep at a time per folder (a lock that cells started by it also
hold). Methods that leave the image tower frozen share its features through ``SWEEP/features``
(``leanclip.feature_cache``; passes and reuses counted in sweep.json).

Every argument is checked before anything is written (one line, exit 2). Exit 0 when no cell failed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from leanclip import utils
from leanclip.cli import build_parser, main
from leanclip.cli.common import (
    DEFAULT_MODEL, SEED_MAX, UsageError, check_numbers, check_output, default_pretrain_steps,
    method_opts_from_flags, synthetic_pretrained_weights,
)
from leanclip.cli.chain import chain_bases, dependency_order, split_chain
from leanclip.cli.flags import check_command_line
from leanclip.data import DATASET_INFO, find_split_file
from leanclip.feature_cache import ENV_VAR, count_events
from leanclip.metrics import harmonic_mean
from leanclip.models import transformers as hf
from leanclip.registry import method_options
from leanclip.templates import canonical_dataset_name
from leanclip.run_files import CHECKPOINT_NAME, FEATURES_DIR, RESULT_FILES, RUN_FILES
from leanclip.weights import HF_HUB_PREFIX, LOCAL_DIR_PREFIX, recordable_source, resolve_pretrained

PROG = "leanclip"
PROTOCOLS = ("fewshot", "base2new", "xd", "dg")
ZEROSHOT = "zeroshot"  # the zero-shot CLIP row: `leanclip zeroshot`, one cell per dataset (no shots, no seed)
MANIFEST = "sweep.json"
LOCK = ".sweep.lock"
SYNTHETIC = "Synthetic"
IMAGENET_VARIANTS = ["ImageNetV2", "ImageNetSketch", "ImageNetA", "ImageNetR"]
COOP10 = ["Caltech101", "OxfordPets", "StanfordCars", "Flowers102", "Food101", "FGVCAircraft", "SUN397", "DTD",
          "EuroSAT", "UCF101"]
DATASET_SETS = {"coop11": ["ImageNet", *COOP10], "coop10": COOP10, "imagenet-variants": IMAGENET_VARIANTS}
DEFAULT_SHOTS = {"fewshot": [1, 2, 4, 8, 16], "base2new": [16], "xd": [16], "dg": [16]}
DEFAULT_TARGETS = {"xd": "coop10", "dg": "imagenet-variants"}
# a method, dataset or protocol name becomes a folder of the sweep: one path component that cannot climb out of it
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}\Z")
METHOD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+@-]{0,127}\Z")  # a plain name, or chained: X@Y (leanclip.cli.chain)
STATES = ("pending", "running", "done", "failed")
# train flags the grid sets per cell, and the contrastive-task flags (a sweep classifies): not taken from the user
GRID_DESTS = {"help", "method", "shots", "seed", "subsample", "data", "dataset", "split_file", "synthetic", "output",
              "resume", "overwrite", "eval_split", "image_root", "no_progress", "opt", "task", "augment", "deep_init",
              "max_steps", "no_initial_eval", "no_projections", "pairs", "pairs_split", "eval_pairs",
              "eval_pairs_split", "reduction", "temperature", "warmup_steps", "synthetic_pairs",
              "synthetic_eval_pairs"}
NOT_FOR_EVAL = {"batch_size"}  # a training batch; eval / zeroshot keep their evaluation batch (and cache key)


# --------------------------------------------------------------------------------------------------------- arguments
def _ints(flag: str, lo: int, hi: int):
    def parse(text: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
        if not values or len(set(values)) != len(values) or any(not lo <= v <= hi for v in values):
            raise argparse.ArgumentTypeError(f"expected distinct integers in [{lo}, {hi}], got {text!r}")
        return values
    parse.__name__ = flag
    return parse


def _names(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return values


def _subparser(kind: str) -> argparse.ArgumentParser:
    """A fresh ``leanclip <kind>`` parser."""
    sub = next(a for a in build_parser(kind)._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[kind]


def _train_actions() -> dict[str, argparse.Action]:
    """The ``leanclip train`` options a sweep passes through to every cell: dest -> action (a fresh copy)."""
    return {a.dest: a for a in _subparser("train")._actions if a.dest not in GRID_DESTS}


@functools.lru_cache(maxsize=None)
def _passed_flags() -> dict[str, tuple[str, bool]]:
    """dest -> (option string, is an on/off switch) of the passed-through train options."""
    return {dest: (max(a.option_strings, key=len), isinstance(a, argparse._StoreTrueAction))
            for dest, a in _train_actions().items()}


@functools.lru_cache(maxsize=None)
def _subcommand_dests(kind: str) -> frozenset:
    return frozenset(a.dest for a in _subparser(kind)._actions)


@functools.lru_cache(maxsize=None)
def _parser(kind: str) -> argparse.ArgumentParser:
    return build_parser(kind)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Run a protocol grid as resumable cells (one run directory each) and record it in "
                     "SWEEP/sweep.json; `leanclip report SWEEP` prints its tables.")
    g = p.add_argument_group("grid")
    g.add_argument("--protocol", required=True, choices=PROTOCOLS,
                   help="fewshot (accuracy per shot count), base2new (train on base classes; base / new / H), xd "
                        "(train on --source, evaluate on the --datasets), dg (the same with ImageNet variants)")
    g.add_argument("--methods", required=True, type=_names, metavar="M,M,...",
                   help="comma-separated methods (any `leanclip train --method`, '+' combinations, and "
                        "'zeroshot' for the zero-shot CLIP row)")
    g.add_argument("--datasets", type=_names, default=None, metavar="D,D,...",
                   help=f"comma-separated datasets under --data, 'synthetic', or a named set "
                        f"({', '.join(DATASET_SETS)}); xd / dg: the targets (default {DEFAULT_TARGETS['xd']} / {DEFAULT_TARGETS['dg']}); "
                        f"default for fewshot / base2new: coop11 with --data, synthetic without")
    g.add_argument("--source", default=None, help="xd / dg: the training dataset (default ImageNet)")
    g.add_argument("--shots", dest="shot_list", type=_ints("--shots", 0, 100_000), default=None, metavar="K,K,...",
                   help="comma-separated K (0 = whole train split; default 1,2,4,8,16 for fewshot, 16 otherwise)")
    g.add_argument("--seeds", type=_ints("--seeds", 0, SEED_MAX), default=[1, 2, 3], metavar="S,S,...",
                   help="comma-separated seeds (default 1,2,3)")
    g.add_argument("--data", metavar="ROOT", default=None, help="data root holding the datasets (CoOp layouts)")
    g.add_argument("--opt", action="append", default=None, metavar="[METHOD:]KEY=VALUE",
                   help="a method option for every method of the grid that declares KEY, or only for METHOD")
    r = p.add_argument_group("sweep")
    r.add_argument("--output", required=True, metavar="SWEEP", help="sweep folder (created; reused to resume)")
    r.add_argument("--plan", action="store_true",
                   help="print one self-contained shell command per pending cell (for a scheduler) and exit")
    r.add_argument("--workers", type=int, default=1, metavar="N",
                   help="cells run at once, each in its own process (default 1; 0 = in this process)")
    r.add_argument("--devices", type=_ints("--devices", 0, 1023), default=None, metavar="I,I,...",
                   help="comma-separated CUDA device indices, one per worker (CUDA_VISIBLE_DEVICES of each cell)")
    r.add_argument("--retry-failed", action="store_true", help="run failed cells again")
    r.add_argument("--max-cells", type=int, default=None, metavar="N",
                   help="run at most N cells in this invocation (the rest stay pending)")
    r.add_argument("--no-feature-cache", action="store_true",
                   help="every cell computes its own image features (no SWEEP/features)")
    t = p.add_argument_group("passed to every cell (see leanclip train --help)")
    for a in _train_actions().values():
        a.default = argparse.SUPPRESS  # only what the user gives is passed on
        a.required = False
        t._add_action(a)


# ------------------------------------------------------------------------------------------------------------- spec
@dataclass
class Spec:
    """A validated sweep request."""
    protocol: str
    methods: list[str]
    datasets: list[str]          # fewshot / base2new: the grid's datasets; xd / dg: the targets
    source: str | None
    shots: list[int]
    seeds: list[int]
    data: str | None             # absolute data root
    output: Path
    flags: dict = field(default_factory=dict)      # dest -> value given on the command line (passed through)
    opts: dict = field(default_factory=dict)       # method -> ["KEY=VALUE", ...]
    features: bool = True

    def settings(self) -> dict:
        """What must not change between invocations on one folder (the grid may grow)."""
        return {"data": self.data, "source": self.source, "flags": _flag_argv(self.flags, None), "opts": self.opts}


@dataclass(frozen=True)
class Cell:
    protocol: str
    dataset: str
    method: str
    shots: int
    seed: int

    @property
    def id(self) -> str:
        return f"{self.protocol}/{self.dataset}/{self.method}/shots{self.shots}_seed{self.seed}"

    @property
    def base(self) -> "Cell | None":
        """The cell a chained cell (``X@Y``) starts from: ``Y``'s, same protocol, dataset, shots and seed."""
        base = split_chain(self.method)[1]
        return None if base is None else Cell(self.protocol, self.dataset, base, self.shots, self.seed)


def cells_of(spec: Spec) -> list[Cell]:
    """The grid's cells: dataset-major, then shots, seed, method (cells sharing features run close together); the
    methods in dependency order, so a chained cell (``X@Y``) comes after the cell it starts from."""
    out = []
    methods = dependency_order(spec.methods, {m: split_chain(m)[1] for m in spec.methods if split_chain(m)[1]})
    for ds in ([spec.source] if spec.protocol in ("xd", "dg") else spec.datasets):
        if ZEROSHOT in spec.methods:
            out.append(Cell(spec.protocol, ds, ZEROSHOT, 0, 0))
        for k in spec.shots:
            for s in spec.seeds:
                out += [Cell(spec.protocol, ds, m, k, s) for m in methods if m != ZEROSHOT]
    return out


# ------------------------------------------------------------------------------------------------------- validation
def build_spec(args) -> Spec:
    """Check every argument (no write, no model built) and return the request."""
    data = os.path.abspath(os.path.expanduser(args.data)) if args.data else None
    if data is not None and not os.path.isdir(data):
        raise UsageError(f"--data {args.data!r} is not a directory")
    protocol = args.protocol
    spec = Spec(protocol, _check_methods(args.methods, protocol), [], None,
                args.shot_list or DEFAULT_SHOTS[protocol], args.seeds, data, Path(os.path.abspath(args.output)),
                features=not args.no_feature_cache)
    if protocol in ("xd", "dg"):
        spec.source = _dataset_names([args.source or "ImageNet"], data, "--source")[0]
        if spec.source in IMAGENET_VARIANTS or spec.source == SYNTHETIC:
            raise UsageError(f"--source {spec.source}: a {protocol} source needs a train split (e.g. ImageNet)")
        spec.datasets = _dataset_names(args.datasets or [DEFAULT_TARGETS[protocol]], data, "--datasets")
        if spec.source in spec.datasets:
            raise UsageError(f"--datasets: the source {spec.source} is evaluated anyway; leave it out of the targets")
        _check_xd_source(spec)
    else:
        if args.source is not None:
            raise UsageError(f"--source is for the xd / dg protocols, not {protocol}")
        spec.datasets = _dataset_names(args.datasets or (["coop11"] if data else ["synthetic"]), data, "--datasets")
    spec.flags = {dest: getattr(args, dest) for dest in _passed_flags() if hasattr(args, dest)}
    if spec.flags.get("pretrained") is not None:
        spec.flags["pretrained"] = _check_weights(spec.flags["pretrained"], spec.flags.get("model"))
    spec.opts = _method_opts(spec.methods, args.opt)
    _check_workers(args)
    check_output(spec.output, resume=None, overwrite=False)
    for cell in cells_of(spec):  # each command a cell will run parses as `leanclip` parses it
        for step in steps_of(cell, spec):
            _check_argv(step.argv)
    return spec


def plain_name(name, what: str) -> str:
    """``name`` when it is one plain path component (:data:`PLAIN_NAME`: no separator, no ``..``, no leading dot);
    UsageError naming ``what`` otherwise."""
    if not isinstance(name, str) or not PLAIN_NAME.match(name):
        raise UsageError(f"{what}: {_short(name)} is not a plain name (letters, digits and . _ + - , starting with a "
                         f"letter or digit): it names a folder of the sweep")
    return name


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _check_methods(methods: list[str], protocol: str) -> list[str]:
    from leanclip.methods import check_task, is_closed_set, parse_method

    out = []
    for m in methods:
        _method_name(m)
        names = [] if m == ZEROSHOT else m.split("@")
        for i, n in enumerate(names):
            if i and n == ZEROSHOT:
                continue  # refused as a base by chain_bases, with the reason
            try:
                names[i] = "+".join(parse_method(n))
                if i == 0:  # the trained method; its bases are checked as entries of their own
                    check_task(n, "classify")
            except ValueError as e:
                raise UsageError(f"--methods: {e}" if not i else f"--methods: {m!r}: base {n!r}: {e}") from None
        if names and protocol != "fewshot" and is_closed_set(names[0]):
            raise UsageError(f"--methods: {names[0]!r} classifies only its training classes; the {protocol} protocol "
                             f"evaluates other classes (use it with --protocol fewshot)")
        name = "@".join(names) if names else m
        if name in out:
            raise UsageError(f"--methods: {name!r} is listed twice")
        out.append(_method_name(name))
    chain_bases(out, frozenset({ZEROSHOT}))
    return out


def _method_name(name) -> str:
    """A method of the grid: a plain name (:func:`plain_name`), or plain names joined by ``@`` (a chained method,
    ``leanclip.cli.chain``); UsageError otherwise."""
    if not (isinstance(name, str) and "@" in name):
        return plain_name(name, "--methods")
    if not METHOD_NAME.match(name) or any(not PLAIN_NAME.match(p) for p in name.split("@")):
        raise UsageError(f"--methods: {_short(name)} is not a method name: plain names (letters, digits and . _ + - , "
                         f"starting with a letter or digit), chained as X@Y")
    return name


def _dataset_names(names: list[str], data: str | None, flag: str) -> list[str]:
    """Named sets expanded, spellings made canonical, each dataset found under ``data`` (split file or folder)."""
    out = []
    for name in [n for given in names for n in DATASET_SETS.get(given.lower(), [given])]:
        plain_name(name, flag)  # before any file is looked up with it
        try:
            canonical = canonical_dataset_name(name)
        except KeyError:
            canonical = None
        if name.lower() == "synthetic" or canonical == SYNTHETIC:
            canonical = SYNTHETIC
        elif data is None:
            raise UsageError(f"{flag}: dataset {name!r} needs --data ROOT (only 'synthetic' is generated)")
        else:
            info = DATASET_INFO.get(canonical) if canonical else None
            if info is not None and info.split_name is None:
                if not os.path.isdir(os.path.join(data, info.dataset_dir)):
                    raise UsageError(f"{flag}: {canonical}: no folder {info.dataset_dir!r} under --data {data!r}")
            else:
                try:
                    find_split_file(data, name)
                except FileNotFoundError as e:
                    raise UsageError(f"{flag}: {e}") from None
        if (canonical or name) in out:
            raise UsageError(f"{flag}: dataset {canonical or name!r} is listed twice")
        out.append(plain_name(canonical or name, flag))
    return out


def _check_xd_source(spec: Spec) -> None:
    """``leanclip eval`` evaluates a checkpoint on another dataset only when the source was read from folders
    (ImageNet layout): a split-file source records its split's hash, and eval then refuses other splits."""
    info = DATASET_INFO.get(spec.source)
    if info is None or info.split_name is not None:
        raise UsageError(f"--source {spec.source}: the {spec.protocol} protocol trains on a folder-layout dataset "
                         f"(ImageNet); leanclip eval refuses to move a split-file run to another split")


def _check_weights(pretrained: str, model: str | None) -> str:
    """``--pretrained`` resolved once here (a tag or hub id is fetched before the cells start), recorded in the form
    that resolves the same from any folder (absolute path for a file)."""
    model = model or DEFAULT_MODEL
    if hf.is_name(model):
        raise UsageError(f"--pretrained: --model {model} carries its own weights (the Hugging Face id is the "
                         f"weights); drop --pretrained")
    try:
        resolve_pretrained(pretrained, model)
    except (ValueError, OSError) as e:
        raise UsageError(f"--pretrained: {e}") from None
    return recordable_source(pretrained, model)


def _method_opts(methods: list[str], pairs) -> dict:
    """``--opt [METHOD:]KEY=VALUE`` -> ``{method: ["KEY=VALUE", ...]}``, each checked against what the method
    declares; an unscoped KEY goes to every method that declares it (at least one must). A chained method's options
    are those of the method it trains (``X`` of ``X@Y``); ``Y``'s cell has its own."""
    out: dict[str, list[str]] = {m: [] for m in methods if m != ZEROSHOT}
    for pair in pairs or []:
        scope, sep, rest = pair.partition(":")
        if sep and "=" not in scope:
            if scope not in out:
                raise UsageError(f"--opt {pair!r}: {scope!r} is not a trained method of --methods")
            targets, kv = [scope], rest
        else:
            kv = pair
            key = kv.partition("=")[0].strip().replace("-", "_")
            targets = [m for m in out if any(key in method_options(p) for p in _parts(m))]
            if not targets:
                raise UsageError(f"--opt {pair!r}: no method of --methods declares {key!r}")
        for m in targets:
            out[m].append(kv)
    for m, kvs in out.items():
        method_opts_from_flags(_parts(m), kvs)  # typed and checked; UsageError names the pair
    return {m: kvs for m, kvs in out.items() if kvs}


def _parts(method: str) -> list[str]:
    """The components of the method a cell trains (``X`` of a chained ``X@Y``)."""
    return split_chain(method)[0].split("+")


def _check_workers(args) -> None:
    if not 0 <= args.workers <= 64:
        raise UsageError(f"--workers must be in [0, 64], got {args.workers}")
    if args.max_cells is not None and args.max_cells < 1:
        raise UsageError(f"--max-cells must be >= 1, got {args.max_cells}")
    if args.devices is None:
        return
    if args.workers == 0:
        raise UsageError("--devices needs cells in their own processes (--workers >= 1)")
    if args.workers > len(args.devices):
        raise UsageError(f"--workers {args.workers} > {len(args.devices)} --devices: one device per worker")
    visible = torch.cuda.device_count()
    if max(args.devices) >= visible:
        raise UsageError(f"--devices {','.join(map(str, args.devices))}: {visible} CUDA device(s) visible")


def _check_argv(argv: list[str]) -> None:
    """``argv`` parses as a ``leanclip`` command with in-range numbers (what the cell will check first)."""
    try:
        args = _parser(argv[0]).parse_args(argv)
    except SystemExit:  # pragma: no cover - the parser raises UsageError; --help never appears in a cell
        raise UsageError(f"cannot parse the cell command {shlex.join(argv)}") from None
    except UsageError as e:
        raise UsageError(f"a cell command is invalid: {e}") from None
    check_numbers(args)
    try:
        check_command_line(_parser(argv[0]), argv, args)
    except UsageError as e:
        raise UsageError(f"a cell command is invalid: {e}") from None


# ------------------------------------------------------------------------------------------------------------ steps
@dataclass(frozen=True)
class Step:
    """One ``leanclip`` command of a cell: ``argv`` (without the program), the folder it writes, its result file."""
    kind: str
    argv: list
    out: Path

    @property
    def result(self) -> Path:
        return self.out / RESULT_FILES[self.kind]


def _flag_argv(flags: dict, kind: str | None) -> list[str]:
    """The passed-through flags as command-line words for a ``kind`` step (None: all of them)."""
    allowed = None if kind is None else _subcommand_dests(kind) - (NOT_FOR_EVAL if kind != "train" else set())
    out = []
    for dest, value in flags.items():
        if allowed is not None and dest not in allowed:
            continue
        opt, switch = _passed_flags()[dest]
        if switch:
            out += [opt] if value else []
        elif isinstance(value, (list, tuple)):
            out += [opt, *map(str, value)]
        else:
            out += [opt, str(value)]
    return out


def _data_argv(spec: Spec, dataset: str) -> list[str]:
    return ["--synthetic"] if dataset == SYNTHETIC else ["--data", spec.data, "--dataset", dataset]


def _inside(output: Path, folder: Path) -> Path:
    """``folder`` when it resolves (symlinks followed) to a place strictly under ``output``; UsageError otherwise.
    The names that make a cell's folders are plain (:func:`plain_name`): this is the check that does not rely on it."""
    root, resolved = output.resolve(), folder.resolve()
    if resolved == root or not resolved.is_relative_to(root):
        raise UsageError(f"cell folder {str(folder)!r} resolves to {str(resolved)!r}, outside the sweep folder "
                         f"{str(root)!r}")
    return folder


def steps_of(cell: Cell, spec: Spec) -> list[Step]:
    """The commands that make ``cell``, in order; every folder they write is checked to lie under the sweep folder."""
    return [Step(s.kind, s.argv, _inside(spec.output, s.out)) for s in _steps(cell, spec)]


def _steps(cell: Cell, spec: Spec) -> list[Step]:
    d = spec.output / cell.id
    targets = spec.datasets if cell.protocol in ("xd", "dg") else []
    if cell.method == ZEROSHOT:
        runs = {"fewshot": [("all", cell.dataset)], "base2new": [("base", cell.dataset), ("new", cell.dataset)]}
        runs = runs.get(cell.protocol) or [("all", ds) for ds in [cell.dataset, *targets]]
        folders = [d / (sub if cell.protocol == "base2new" else ds) for sub, ds in runs]
        return [Step("zeroshot", ["zeroshot", "--subsample", sub, *_data_argv(spec, ds), "--output", str(folder),
                                  "--no-progress", *_flag_argv(spec.flags, "zeroshot")], folder)
                for (sub, ds), folder in zip(runs, folders)]
    opts = [w for kv in spec.opts.get(cell.method, []) for w in ("--opt", kv)]
    if cell.base is not None:  # a chained cell starts from its base cell's checkpoint
        opts += ["--init-from", str(spec.output / cell.base.id)]
    sub = "base" if cell.protocol == "base2new" else "all"
    out = [Step("train", ["train", "--method", split_chain(cell.method)[0], "--shots", str(cell.shots), "--seed",
                          str(cell.seed), "--subsample", sub, *_data_argv(spec, cell.dataset), "--output", str(d),
                          "--no-progress", *_flag_argv(spec.flags, "train"), *opts], d)]
    for t in targets:
        out.append(Step("eval", ["eval", "--checkpoint", str(d), *_data_argv(spec, t), "--output",
                                 str(d / "eval" / t), "--no-progress", *_flag_argv(spec.flags, "eval")],
                        d / "eval" / t))
    return out


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
        raise InvalidResult(f"invalid result {str(path)!r}: {'.'.join(keys)} is {_short(value)}, expected a "
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
            bad(key, f"must be an object, got {_short(manifest.get(key))}")
    for protocol, entry in manifest["protocols"].items():
        if protocol not in PROTOCOLS:
            bad("protocols", f"holds {_short(protocol)}, not one of {', '.join(PROTOCOLS)}")
        if not isinstance(entry, dict):
            bad(f"protocols.{protocol}", f"must be an object, got {_short(entry)}")
        _check_grid_entry(entry, f"protocols.{protocol}", protocol in ("xd", "dg"), bad)
    for cell_id, entry in manifest["cells"].items():
        where = f"cells[{_short(cell_id)}]"
        if not isinstance(entry, dict):
            bad(where, f"must be an object, got {_short(entry)}")
        if entry.get("state") not in STATES:
            bad(f"{where}.state", f"must be one of {', '.join(STATES)}, got {_short(entry.get('state'))}")
        if not isinstance(entry.get("error"), (str, type(None))):
            bad(f"{where}.error", f"must be a string or null, got {_short(entry.get('error'))}")


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
              ("flags", lambda v: isinstance(v, dict) and all(k in _passed_flags() and value(x) for k, x in v.items()),
               "an object of `leanclip train` options (dest: number, string, switch or list of strings)"),
              ("opts", lambda v: isinstance(v, dict) and all(
                  isinstance(k, str) and k in entry.get("methods", ()) and isinstance(x, list)
                  and all(isinstance(kv, str) for kv in x) for k, x in v.items()),
               "an object {method: [\"KEY=VALUE\", ...]} over the grid's methods")]
    for key, ok, what in checks:
        if key not in entry:
            bad(f"{where}.{key}", "is missing")
        if not ok(entry[key]):
            bad(f"{where}.{key}", f"must be {what}, got {_short(entry[key])}")
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


class _FolderLock:
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


# ----------------------------------------------------------------------------------------------------------- runner
LOG_NAME = "sweep.log"  # each step's stdout + stderr, in its output folder


def _error_line(log: Path) -> str:
    """The one-line error a failed command printed (``leanclip: error: ...``), else its last line."""
    try:
        lines = [ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    except OSError:
        lines = []
    errors = [ln for ln in lines if ln.startswith(f"{PROG}: error:")]
    return (errors or lines or ["failed without output"])[-1][:500]


class Runner:
    """Runs one ``leanclip`` command: in this process (``workers == 0``) or as a child process on ``device``."""

    def __init__(self, spec: Spec, in_process: bool, lock_fd: int | None):
        self.env = {ENV_VAR: str(spec.output / FEATURES_DIR) if spec.features else ""}
        self.in_process, self.lock_fd = in_process, lock_fd
        self.children: set = set()
        self.stopping = False

    def __call__(self, argv: list[str], log: Path, device: int | None) -> int:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"$ {shlex.join([PROG, *argv])}\n")
            f.flush()
            return self._in_process(argv, f) if self.in_process else self._child(argv, f, device)

    def _in_process(self, argv, f) -> int:
        import traceback

        saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        try:
            with contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
                try:
                    return main(argv)
                except Exception as e:  # a bug in a cell: recorded, the sweep goes on
                    traceback.print_exc(file=f)
                    print(f"{PROG}: error: {type(e).__name__}: {e}", file=f)
                    return 1
        finally:
            for k, v in saved.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)

    def _child(self, argv, f, device) -> int:
        env = {**os.environ, **self.env, **({"CUDA_VISIBLE_DEVICES": str(device)} if device is not None else {})}
        proc = subprocess.Popen([sys.executable, "-m", "leanclip", *argv], stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, pass_fds=(self.lock_fd,) if self.lock_fd else ())
        self.children.add(proc)
        try:
            return proc.wait()
        finally:
            self.children.discard(proc)

    def stop(self) -> None:
        self.stopping = True
        for proc in list(self.children):
            proc.terminate()
        for proc in list(self.children):
            proc.wait()


def run_cell(cell: Cell, spec: Spec, runner: Runner, device: int | None) -> str | None:
    """Run the steps of ``cell`` that have no result yet; None on success, else the error line."""
    for step in steps_of(cell, spec):
        if read_result(step) is not None:
            continue
        rc = runner(step.argv + resume_words(step), step.out / LOG_NAME, device)
        if rc == 130 and runner.in_process:  # leanclip's exit code for an interrupt it caught
            raise KeyboardInterrupt
        if rc != 0:
            return f"{step.kind} exited {rc}: {_error_line(step.out / LOG_NAME)}"
    return None


def plan_line(cell: Cell, spec: Spec) -> str:
    """One shell line that makes ``cell`` (its pending steps joined with ``&&``)."""
    env = f"{ENV_VAR}={shlex.quote(str(spec.output / FEATURES_DIR)) if spec.features else ''} "
    return " && ".join(env + shlex.join([PROG, *s.argv, *resume_words(s)])
                       for s in steps_of(cell, spec) if read_result(s) is None)


# ------------------------------------------------------------------------------------------------------------- main
def run(args) -> int:
    spec = build_spec(args)
    spec.output.mkdir(parents=True, exist_ok=True)
    with _FolderLock(spec.output) as lock:
        manifest = load_manifest(spec.output)
        whole = merge(manifest, spec)
        whole.features = spec.features  # a choice of this invocation, not a setting of the folder
        reconcile(manifest, whole, args.retry_failed)
        asked = set(cells_of(spec))
        todo = [c for c in cells_of(whole) if c in asked and manifest["cells"][c.id]["state"] == "pending"]
        write_manifest(manifest, spec.output)
        if args.plan:
            for cell in todo:
                print(plan_line(cell, whole))
            return 0
        todo = todo[:args.max_cells] if args.max_cells else todo
        t0 = time.perf_counter()
        _smoke_weights(todo, whole)
        _run_cells(todo, whole, manifest, args, lock.fd)
        write_manifest(manifest, spec.output)
    states = [manifest["cells"][c.id]["state"] for c in cells_of(whole)]
    summary = {"command": "sweep", "output": str(spec.output), "protocol": spec.protocol, "cells": len(states),
               **{s: states.count(s) for s in ("done", "failed", "pending")}, "ran": len(todo),
               "seconds": round(time.perf_counter() - t0, 3), "feature_cache": manifest.get("feature_cache")}
    print(utils.to_json(summary, indent=None))
    return 1 if summary["failed"] else 0


def _smoke_weights(todo: list[Cell], spec: Spec) -> None:
    """The cached synthetic pre-training that cells without ``--pretrained`` start from (``--pretrain-steps``, or
    the smoke-run default on synthetic data: ``leanclip.cli.common.default_pretrain_steps``), made once here before
    the cells start, rather than by each of N workers at the same time."""
    model, flags = spec.flags.get("model", DEFAULT_MODEL), spec.flags
    if flags.get("pretrained") is not None or model.startswith((HF_HUB_PREFIX, LOCAL_DIR_PREFIX, hf.PREFIX)):
        return  # named weights (pre-trained further in each cell) or a model that carries its own
    for synthetic in sorted({c.dataset == SYNTHETIC for c in todo}):
        steps = flags.get("pretrain_steps")
        steps = default_pretrain_steps(model, None, synthetic) if steps is None else steps
        if steps:
            synthetic_pretrained_weights(None, model, steps, image_size=flags.get("image_size"))


def _run_cells(todo: list[Cell], spec: Spec, manifest: dict, args, lock_fd: int) -> None:
    """Run ``todo``; the manifest is updated (and written) when a cell starts and when it ends."""
    import queue
    import signal
    import threading
    runner = Runner(spec, args.workers == 0, lock_fd)
    guard = threading.Lock()
    devices = queue.Queue()
    for d in args.devices[:args.workers] if args.devices else [None] * max(args.workers, 1):
        devices.put(d)
    log = utils.get_logger()
    ended = {c.id: threading.Event() for c in todo}  # set when a cell of this invocation has ended, however

    def base_unfinished(cell: Cell) -> bool:
        """A chained cell waits for its base cell (queued before it: cells_of's dependency order); True when it
        cannot run: recorded as failed when its base did not finish, left pending when the sweep is stopping."""
        if cell.base is None:
            return False
        if cell.base.id in ended:
            ended[cell.base.id].wait()
        with guard:
            state = manifest["cells"].get(cell.base.id, {}).get("state", "pending")
            if runner.stopping or state == "done":
                return runner.stopping
            manifest["cells"][cell.id].update(state="failed", error=f"its base cell {cell.base.id} is {state}: "
                                                                    f"it starts from that cell's checkpoint")
            write_manifest(manifest, spec.output)
        log.info("sweep: %s failed (base cell %s is %s)", cell.id, cell.base.id, state)
        return True

    def one(cell: Cell) -> None:
        try:
            if not base_unfinished(cell):
                run_one(cell)
        finally:
            ended[cell.id].set()

    def run_one(cell: Cell) -> None:
        device = devices.get()
        try:
            with guard:
                manifest["cells"][cell.id].update(state="running", error=None)
                write_manifest(manifest, spec.output)
            t = time.perf_counter()
            error, metrics = run_cell(cell, spec, runner, device), None
            if not error:
                try:
                    metrics = cell_metrics(cell, spec)
                except InvalidResult as e:
                    error = str(e)
            with guard:
                entry = manifest["cells"][cell.id]
                if runner.stopping:  # stopped by us: resumable, not failed
                    entry.update(state="pending", error=None)
                    return
                entry.update(state="failed" if error else "done", error=error,
                             seconds=round(time.perf_counter() - t, 3))
                if not error:
                    entry["metrics"] = metrics
                write_manifest(manifest, spec.output)
            log.info("sweep: %s %s%s", cell.id, entry["state"], f" ({error})" if error else "")
        finally:
            devices.put(device)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term) if threading.current_thread() is threading.main_thread() \
        else None
    pool = ThreadPoolExecutor(max_workers=args.workers) if args.workers else None
    try:
        if pool is None:
            for cell in todo:
                one(cell)
        else:
            for f in [pool.submit(one, c) for c in todo]:
                f.result()
    except KeyboardInterrupt:
        runner.stop()  # its cells stay resumable (checkpoint per epoch); their state returns to pending
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        with guard:
            for entry in manifest["cells"].values():
                if entry["state"] == "running":
                    entry["state"] = "pending"
            write_manifest(manifest, spec.output)
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
