"""Small helpers shared by the trainer, the LLU pipeline and the CLI.

- seeding and RNG state capture/restore (torch CPU + CUDA, numpy, ``random``), JSON-serialisable;
- device / precision resolution (``"auto"`` = CUDA + bf16 autocast when a GPU exists, else CPU + fp32);
- atomic file writes (any writer given a file name; bytes, text, JSON, CSV), a flushed JSONL appender, and the
  removal of the temp files a killed write leaves behind;
- JSON that is always valid: non-finite floats are written as ``null`` (never the bare ``NaN`` / ``Infinity`` that
  Python's ``json`` emits by default and strict readers reject);
- the guard that stops a run on a non-finite loss, gradient or weight (:class:`NonFiniteLossError`);
- the one table of the ranges of the numbers a run takes (:data:`NUMBER_RANGES`, :func:`check_number`), read by the
  library's configs and by the command line alike;
- sha256 digests of files and of named tensors (:func:`tensors_sha256`: what checkpoints and cached features record
  to find a damaged file);
- a package logger and a progress display that never touches what it reports on.
"""
from __future__ import annotations

import base64
import contextlib
import csv
import hashlib
import io
import json
import logging
import math
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

LOGGER_NAME = "leanclip"


# ----------------------------------------------------------------------------------------------------------- logging
class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (not the stream of the first call), so a
    redirected or replaced stderr (a test's capture, a notebook, a wrapper) always gets the log."""

    def __init__(self):
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def get_logger(name: str = LOGGER_NAME, level: int | None = None) -> logging.Logger:
    """The package logger (one stderr handler, ``[leanclip] message`` format), created once."""
    log = logging.getLogger(name)
    if not log.handlers:
        h = _StderrHandler()
        h.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
        log.addHandler(h)
        log.propagate = False
    if level is not None:
        log.setLevel(level)
    elif log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
    return log


# ----------------------------------------------------------------------------------------------------------- seeding
def seed_everything(seed: int) -> None:
    """Seed ``random``, numpy and torch (CPU and every CUDA device)."""
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds all CUDA devices


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that is a fixed function of integer ``parts`` (e.g. ``(seed, epoch)``), stable across runs."""
    h = 1469598103934665603
    for p in parts:
        for b in int(p).to_bytes(16, "little", signed=True):
            h = ((h ^ b) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


def _tensor_to_b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().contiguous().numpy().tobytes()).decode("ascii")


def _b64_to_byte_tensor(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def get_rng_state() -> dict:
    """All RNG states as a JSON-serialisable dict (restored exactly by :func:`set_rng_state`)."""
    np_state = np.random.get_state()
    state = {
        "python": _py_state_to_json(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": _tensor_to_b64(torch.get_rng_state()),
        "cuda": [],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_tensor_to_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(_py_state_from_json(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_b64_to_byte_tensor(state["torch"]))
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        n = min(len(cuda), torch.cuda.device_count())
        torch.cuda.set_rng_state_all([_b64_to_byte_tensor(s) for s in cuda[:n]])


def _py_state_to_json(st):
    version, internal, gauss = st
    return [version, list(internal), gauss]


def _py_state_from_json(st):
    version, internal, gauss = st
    return (version, tuple(internal), gauss)


# --------------------------------------------------------------------------------------------- device and precision
def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/None -> cuda when available else cpu. ``"cuda"`` without a GPU raises ValueError (one line)."""
    if isinstance(device, torch.device):
        dev = device
    else:
        name = "auto" if device is None else str(device)
        if name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(name)
        except RuntimeError as e:
            raise ValueError(f"device: unknown device {name!r} (use auto, cpu or cuda)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda requested but no CUDA GPU is available (use --device cpu or auto)")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device: unsupported device type {dev.type!r} (use auto, cpu or cuda)")
    return dev


PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(precision: str | None, device: torch.device) -> str:
    """``"auto"`` -> ``"bf16"`` on CUDA, ``"fp32"`` on CPU. An explicit ``"bf16"`` is honoured on CPU too (CPU bf16
    autocast), since the user asked for it."""
    precision = precision or "auto"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast(device: torch.device, precision: str):
    """Autocast context for a resolved precision (``"fp32"`` -> a no-op context)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def peak_memory_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


# ------------------------------------------------------------------------------------------------------ atomic files
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    """fsync a folder so a rename inside it survives a crash (best effort: some systems refuse)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


TEMP_PREFIX, TEMP_SUFFIX = ".leanclip-tmp.", ".tmp"  # atomic_write's temp files: a name nothing else uses


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the temp files that :func:`atomic_write` calls killed mid-write left in ``folder`` (not recursive);
    returns what was removed. A run calls it on its own folders when it starts: a temp file there belongs to a
    write that can no longer finish (one run per folder), and a big checkpoint's temp would otherwise stay forever."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.iterdir():
        if p.name.startswith(TEMP_PREFIX) and p.name.endswith(TEMP_SUFFIX) and p.is_file() and not p.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    if removed:
        get_logger().info("removed %d unfinished temp file(s) of an interrupted write in %s", len(removed), folder)
    return removed


def atomic_write(path: str | os.PathLike, writer: Callable[[str], object], *, sync_dir: bool = False) -> Path:
    """Create or replace ``path`` atomically with what ``writer(tmp)`` writes to the file name ``tmp``.

    ``tmp`` is an empty file in ``path``'s folder named ``.leanclip-tmp.<name>.<random>.tmp`` (pass an explicit
    format to writers
    that go by the extension). Once ``writer`` returns, the file is fsynced, given the usual mode
    (``0o666 & ~umask``) and ``os.replace``d onto ``path``; ``sync_dir=True`` also fsyncs the folder so the rename
    itself is durable. If anything fails, the temp file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        writer(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if sync_dir:
        _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """:func:`atomic_write` of ``data``."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(o):
    if isinstance(o, (Path, torch.device, torch.dtype)):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def finite_json(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, ±inf; Python, numpy or a tensor element) replaced by ``None`` and
    numpy scalars / arrays and tensors turned into Python numbers and lists, ready for ``json.dumps(allow_nan=False)``.
    A missing value is ``null`` in valid JSON; ``NaN`` is not JSON at all."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, Mapping):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    if isinstance(obj, (np.generic, np.ndarray, torch.Tensor)):
        return finite_json(obj.tolist())
    return obj


def json_dumps(obj: Any, indent: int | None = None) -> str:
    """Valid JSON text of ``obj`` (non-finite floats as ``null``; compact with ``indent=None``)."""
    seps = (",", ":") if indent is None else None
    return json.dumps(finite_json(obj), indent=indent, separators=seps, allow_nan=False, default=_json_default)


def to_json(obj: Any, indent: int | None = 2) -> str:
    """Valid JSON text of ``obj`` (non-finite floats as ``null``), ``indent=None``: one line."""
    return json.dumps(finite_json(obj), indent=indent, allow_nan=False, default=_json_default)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    """:func:`atomic_write` of ``obj`` as JSON (``indent=None``: one line) and a final newline."""
    return atomic_write_text(path, to_json(obj, indent=indent) + "\n")


def atomic_write_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]],
                     fieldnames: Iterable[str] | None = None) -> Path:
    if fieldnames is None:
        fieldnames = []
        for r in rows:
            for k in r:
                if k not in fieldnames:
                    fieldnames.append(k)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fieldnames), extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    return atomic_write_text(path, buf.getvalue())


def append_jsonl(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Append one JSON line with a single ``write`` of the complete line, then flush and fsync, so a reader never
    sees a partial record (even if the process dies right after)."""
    line = json_dumps(record) + "\n"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                out.append(json.loads(line))
    return out


def truncate_jsonl(path: str | os.PathLike, keep: callable) -> None:
    """Atomically rewrite a JSONL file keeping only the records for which ``keep(record)`` is true (used on resume
    to drop log lines written after the checkpoint)."""
    path = Path(path)
    if not path.exists():
        return
    kept = [r for r in read_jsonl(path) if keep(r)]
    atomic_write_text(path, "".join(json_dumps(r) + "\n" for r in kept))


# --------------------------------------------------------------------------------------------------------- hashing
def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def tensors_sha256(tensors: Mapping[str, torch.Tensor], *texts: str) -> str:
    """sha256 of named tensors (in name order: each name, dtype, shape and bytes) and of ``texts``: what a file of
    tensors records when it is written and is checked against when it is read. It covers the payload as it comes out
    of the file, whatever the container's layout, so any damaged byte of a tensor or of the covered text shows."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer as it is: no copy
    for text in texts:
        h.update(b"\0" + text.encode("utf-8"))
    return h.hexdigest()


def first_non_finite(named: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first floating-point tensor of ``named`` (``model.named_parameters()``, a state dict's items)
    that holds NaN or +-inf, or None."""
    for name, t in named:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


# ------------------------------------------------------------------------------------------------------ number ranges
LR_MAX = 1e4  # far above any useful rate; larger ones overflow the optimizers' fp32 arithmetic
SEED_MAX = 2 ** 32 - 1  # numpy's seed range; torch accepts more, but few-shot sampling goes through numpy
# name -> (kind, lowest, highest): bounds inclusive, None = unbounded; floats must also be finite. The one table of
# these ranges: the configs of the library (leanclip.trainer.TrainConfig, prepare's sizes) check their fields with
# it, and the command line checks each flag whose destination has a row here (leanclip.cli.common.check_numbers),
# so the API never accepts what the command line refuses.
NUMBER_RANGES: dict[str, tuple[type, float | None, float | None]] = {
    "epochs": (int, 1, None),
    "batch_size": (int, 1, None),
    "lr": (float, 0.0, LR_MAX),
    "weight_decay": (float, 0.0, None),
    "warmup_epochs": (int, 0, None),
    "warmup_lr": (float, 0.0, LR_MAX),
    "grad_accum": (int, 1, None),
    "clip_grad_norm": (float, 0.0, None),
    "log_every": (int, 1, None),
    "seed": (int, 0, SEED_MAX),
    "shots": (int, 0, 100_000),
    "synthetic_classes": (int, 2, None),
    "num_workers": (int, 0, 64),
    "threads": (int, 1, 4096),
    "image_size": (int, 8, 8192),
    "pretrain_steps": (int, 0, None),
    "max_steps": (int, 1, None),
    "warmup_steps": (int, 0, None),
    "temperature": (float, 1e-3, 0.5),
    "reduction": (int, 1, None),
    "synthetic_pairs": (int, 2, None),
    "synthetic_eval_pairs": (int, 2, None),
    "min_lr": (float, 0.0, LR_MAX),
    "max_pairs": (int, 2, None),
    "recompute_chunk": (int, 1, None),
}
# strictly positive floats (a zero learning rate or clipping norm is a mistake, not a choice)
POSITIVE_NUMBERS = frozenset({"lr", "clip_grad_norm"})


def check_number(name: str, value, *, label: str | None = None, kind_of: str | None = None) -> None:
    """ValueError naming ``label`` (default ``name``) when ``value`` is not a number of row ``kind_of`` (default
    ``name``) of :data:`NUMBER_RANGES`: an int (not a bool) for int rows, a finite int or float for float rows, > 0
    for :data:`POSITIVE_NUMBERS`, within the row's bounds."""
    row = kind_of or name
    kind, lo, hi = NUMBER_RANGES[row]
    label = label or name
    if isinstance(value, bool) or not isinstance(value, (int, np.integer) if kind is int else (int, float, np.number)):
        raise ValueError(f"{label} must be {'an int' if kind is int else 'a number'}, got {value!r}")
    if kind is float and not math.isfinite(value):
        raise ValueError(f"{label} must be a finite number, got {value}")
    if row in POSITIVE_NUMBERS and not value > 0:
        raise ValueError(f"{label} must be > 0, got {value}")
    if lo is not None and value < lo:
        raise ValueError(f"{label} must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise ValueError(f"{label} must be <= {hi}, got {value}")


# ------------------------------------------------------------------------------------------------ non-finite guard
class NonFiniteLossError(RuntimeError):
    """Training met a non-finite loss, gradient or weight and stopped before the optimizer step could spread it. The
    message is one line (step, epoch, the likely cause, which checkpoint is kept); no checkpoint, log line or
    summary holding the non-finite values was written. The CLI prints the message and exits with ``exit_code``."""

    exit_code = 3


def grad_norm(params: Sequence[torch.nn.Parameter]) -> torch.Tensor:
    """The 2-norm of all gradients of ``params`` (a 0-d tensor, no host sync): non-finite iff any gradient element
    is. One fused pass over the trainable gradients only."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads)


def _kept_checkpoint(checkpoint: str | os.PathLike | None) -> str:
    if checkpoint is not None and Path(checkpoint).is_file():
        return f"the last finite checkpoint is kept at {str(checkpoint)!r}"
    return "no checkpoint was written"


def check_finite_step(loss: float, grad_norm_value: float | None, *, step: int, epoch: int, lr: float,
                      checkpoint: str | os.PathLike | None = None) -> None:
    """Raise :class:`NonFiniteLossError` when the loss (or the gradient norm) of optimizer step ``step`` (1-based,
    counted over the whole run, resumes included) is not finite. Call it BEFORE ``optimizer.step()``, so the
    weights in memory stay the last finite ones too. Step 1 has made no update yet, so its cause is the inputs or
    the weights the run started from; later, an update overshot: most often a learning rate too high."""
    if math.isfinite(loss) and (grad_norm_value is None or math.isfinite(grad_norm_value)):
        return
    what = f"loss ({loss})" if not math.isfinite(loss) else f"gradient (norm {grad_norm_value})"
    if step <= 1:
        cause = "before any update, so the inputs or the starting weights hold NaN/Inf"
    else:
        cause = f"the learning rate ({lr:.3g}) is likely too high, or the inputs hold NaN/Inf"
    raise NonFiniteLossError(f"non-finite {what} at step {step} (epoch {epoch}): {cause}; training stopped, "
                             f"{_kept_checkpoint(checkpoint)}")


def check_finite_params(params: Sequence[torch.nn.Parameter], *, step: int, epoch: int, lr: float,
                        checkpoint: str | os.PathLike | None = None) -> None:
    """Raise :class:`NonFiniteLossError` when an update left a non-finite trainable weight (a finite loss and
    gradient can still overshoot to inf). Called before a checkpoint is written, so none ever holds NaN/Inf."""
    if not params or bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):  # one host sync
        return
    raise NonFiniteLossError(f"non-finite weights after step {step} (epoch {epoch}): the learning rate ({lr:.3g}) is "
                             f"likely too high; training stopped, {_kept_checkpoint(checkpoint)}")


# ---------------------------------------------------------------------------------------------------------- progress
def _stderr_is_tty() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


class Progress:
    """A progress display that is only told counts: it never holds, iterates or measures the loop's iterable, so
    showing it or not cannot change a run (``tqdm.auto``'s asyncio class calls ``iter()`` on what it wraps, which
    draws from a DataLoader's generator a second time). On a terminal: a tqdm bar on stderr. Elsewhere (a log file,
    a pipe, a notebook): about ten plain log lines per bar (``[leanclip] desc: n/total k=v ...``), never carriage
    returns. ``enabled=False``: nothing."""

    LINES = 10

    def __init__(self, total: int | None, desc: str, enabled: bool = True, initial: int = 0):
        self.total, self.desc, self.n = total, desc, int(initial)
        self._bar, self._enabled, self._postfix = None, bool(enabled), {}
        self._every = max(1, math.ceil(total / self.LINES)) if total else 1
        if self._enabled and _stderr_is_tty():
            from tqdm import tqdm  # tqdm.std, the plain terminal bar

            self._bar = tqdm(total=total, initial=initial, desc=desc, leave=False, file=sys.stderr)

    def update(self, n: int = 1, **postfix) -> None:
        if not self._enabled:
            return
        self.n += n
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(n)
            return
        self._postfix = postfix or self._postfix
        if self.n % self._every == 0 or (self.total is not None and self.n >= self.total):
            extra = "".join(f" {k}={v}" for k, v in self._postfix.items())
            get_logger().info("%s: %d/%s%s", self.desc, self.n, self.total if self.total is not None else "?", extra)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track(iterable: Iterable, desc: str, enabled: bool = True, total: int | None = None):
    """Iterate ``iterable`` once (one ``iter()``, as a plain ``for`` loop) while a :class:`Progress` counts the items.
    ``total`` defaults to ``len(iterable)`` when it has one (a DataLoader's length does not iterate it)."""
    if not enabled:
        yield from iterable
        return
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    with Progress(total, desc) as bar:
        for item in iterable:
            yield item
            bar.update()


# ----------------------------------------------------------------------------------------------------------- models
def added_modules(model) -> list[str]:
    """Names of the top-level modules a PEFT method added to ``model`` (``model.leanclip_info["modules"]``)."""
    info = getattr(model, "leanclip_info", None) or {}
    return [m for m in info.get("modules", []) if m in model._modules]


def name_list(names, k: int = 8) -> str:
    """At most ``k`` of ``names``, sorted, for a one-line message (``[...] (+N more)``)."""
    names = sorted(names)
    return str(names[:k]) + (f" (+{len(names) - k} more)" if len(names) > k else "")


BYTE_UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6,
              "gb": 10**9, "tb": 10**12}


def parse_bytes(text, name: str) -> int:
    """A memory size such as ``16GiB``, ``40GB``, ``8000MiB`` or a plain number of bytes, as an int; ValueError
    naming ``name`` (the argument) when it cannot be read or is not positive."""
    s = str(text).strip().lower()
    num = s.rstrip("abgikmt")
    unit = s[len(num):]
    try:
        value = float(num) * BYTE_UNITS[unit]
    except (KeyError, ValueError):
        raise ValueError(f"{name}: cannot read {text!r} (use e.g. 16GiB, 40GB, 8000MiB)") from None
    if not value > 0 or math.isinf(value):
        raise ValueError(f"{name} must be positive, got {text!r}")
    return int(value)
