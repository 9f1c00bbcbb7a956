"""``leanclip`` command line (also ``python -m leanclip``).

    leanclip train --method clipfit --data ~/data --dataset oxford_pets --shots 16 --seed 1 --output runs/pets
    leanclip eval --checkpoint runs/pets/checkpoint.safetensors --data ~/data --dataset oxford_pets
    leanclip zeroshot --model ViT-B-16 --pretrained ~/weights/vit_b16.safetensors --data ~/data --dataset dtd
    leanclip train --method ln --epochs 2            # no --data: a synthetic dataset, the tiny model (smoke run)

Data: ``--data ROOT --dataset NAME`` (CoOp layouts, see ``leanclip.data``), ``--split-file F`` (a CoOp split JSON), or
``--synthetic`` (procedural shapes, the default without ``--data``/``--split-file``). Protocol: K-shot sampling of the
train split with ``--seed``, then ``--subsample base|new|all`` (CoCoOp base-to-new; training on ``base`` also reports
the new classes and H). Weights: ``--pretrained`` takes an open_clip pretrained tag, an ``hf-hub:`` id, a hub folder or
a local file (``leanclip.weights``; no file may run code).

Bad input (unknown method, missing file, no GPU for ``--device cuda``, ...) prints one line on stderr and exits 2,
before any work or write; a run stopped by a non-finite loss exits 3. Every command prints a JSON result on stdout (and
writes it under ``--output`` when given).

The package: ``parser`` (one parser, shared argument groups, extension subcommands), ``common`` (checks, run
folders, what a run records and how a checkpoint's run is restored), ``classify`` (train / eval / zeroshot),
``contrastive`` (``--task contrastive`` / ``retrieval``); ``main`` here dispatches and turns user errors into one line.
"""
from __future__ import annotations

import os
import sys
import warnings
from typing import Sequence

from leanclip import utils
from leanclip.cli.classify import (  # noqa: F401  (re-exported)
    BASE_DEFAULTS, COMMANDS, cmd_eval, cmd_train, cmd_zeroshot, load_data,
)
from leanclip.cli.common import (  # noqa: F401  (re-exported)
    EXIT_USAGE, PROG, UsageError, build_model, check_numbers, synthetic_pretrained_weights,
)
from leanclip.cli.flags import check_command_line
from leanclip.cli.parser import SUBCOMMANDS, build_parser, register_subcommand  # noqa: F401

__all__ = ["main", "build_parser", "register_subcommand", "SUBCOMMANDS", "UsageError", "build_model", "load_data",
           "synthetic_pretrained_weights", "cmd_train", "cmd_eval", "cmd_zeroshot", "COMMANDS", "BASE_DEFAULTS",
           "PROG", "EXIT_USAGE"]

# -------------------------------------------------------------------------------------------------------------- main
def _first_command(argv: Sequence[str]) -> str | None:
    for a in argv:
        if not a.startswith("-"):
            return a
    return None


# Exceptions that report a problem with the user's input or environment: one line, no traceback (set
# LEANCLIP_TRACEBACK=1 to see it). Anything else is a bug in leanclip and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
EXIT_DIVERGED = utils.NonFiniteLossError.exit_code  # a run stopped on a non-finite loss: not bad input, not a bug




def one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in msg:
        msg = f"{e.filename}: {msg}"
    return msg or type(e).__name__


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings (notices such as a fallback to open_clip's plain modules) as one ``leanclip: warning:`` line."""
    text = " ".join(str(message).split())
    text = text[len(PROG) + 2:] if text.startswith(f"{PROG}: ") else text
    print(f"{PROG}: warning: {text}", file=file or sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: returns the exit code (0 ok, 2 bad input, 3 a run stopped on a non-finite loss)."""
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser(_first_command(argv))
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help (0) or an argparse usage error (2, message already printed)
            return int(e.code) if isinstance(e.code, int) else (0 if e.code is None else EXIT_USAGE)
        func = COMMANDS.get(args.command) or getattr(args, "func", None)
        if func is None:
            raise UsageError(f"unknown command {args.command!r}")
        check_numbers(args)
        check_command_line(parser, argv, args)
        rc = func(args)
        return int(rc or 0)
    except BrokenPipeError:  # the reader went away (`leanclip methods | head`): stop quietly, as a shell tool does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the interpreter's final flush must not fail
        return 128 + 13  # SIGPIPE
    except Exception as e:
        diverged = isinstance(e, utils.NonFiniteLossError)
        if not (diverged or isinstance(e, USER_ERRORS)) or os.environ.get("LEANCLIP_TRACEBACK") == "1":
            raise
        print(f"{PROG}: error: {one_line(e)}", file=sys.stderr)
        return EXIT_DIVERGED if diverged else EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
