"""The grid of ``leanclip sweep``: its flags, the ``Spec`` of a protocol (methods x datasets x shots x seeds) and its
``Cell`` s, every check of the arguments (one line, exit 2, before anything is written), and the ``leanclip``
commands (``Step`` s) that make a cell: the very commands ``--plan`` prints."""
from __future__ import annotations

import argparse
import functools
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import torch

from leanclip.cli import build_parser
from leanclip.cli.common import DEFAULT_MODEL, SEED_MAX, UsageError, check_numbers, check_output, method_opts_from_flags
from leanclip.cli.chain import chain_bases, dependency_order, split_chain
from leanclip.cli.flags import check_command_line
from leanclip.data import DATASET_INFO, find_split_file
from leanclip.models import transformers as hf
from leanclip.registry import method_options
from leanclip.templates import canonical_dataset_name
from leanclip.run_files import RESULT_FILES
from leanclip.weights import recordable_source, resolve_pretrained


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
def passed_flags() -> dict[str, tuple[str, bool]]:
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
    spec.flags = {dest: getattr(args, dest) for dest in passed_flags() if hasattr(args, dest)}
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
        raise UsageError(f"{what}: {short(name)} is not a plain name (letters, digits and . _ + - , starting with a "
                         f"letter or digit): it names a folder of the sweep")
    return name


def short(value, limit: int = 80) -> str:
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
        raise UsageError(f"--methods: {short(name)} is not a method name: plain names (letters, digits and . _ + - , "
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
        opt, switch = passed_flags()[dest]
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
