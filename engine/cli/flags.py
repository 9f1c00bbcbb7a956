"""Where each flag of ``train`` / ``eval`` / ``zeroshot`` is read: one table (:data:`SCOPES`) and one check
(:func:`check_scopes`), run before any work.

A flag given where nothing reads it would change nothing while the run looks as if it had: that is a usage error
(one line, exit 2). A flag is *given* when it appears on the command line, whatever its value (``--kd-lambda 8`` on
``--method coop`` is refused as well as ``--kd-lambda 4``): :func:`given_dests` re-parses the words with every
default replaced by a marker, so a default value typed out is told from no flag at all.

Each row names the places (:data:`PLACES`: subcommand and task) that read the flag, and for ``train`` optionally
which methods do (a predicate over the ``+`` components and a few words saying which). A flag missing from the table
is read everywhere its subcommand defines it. Checks that depend on another flag's value (``--recompute-chunk``
needs ``--recompute block``, ``--pairs-split`` needs ``--pairs``) stay with the code that reads the flags.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable

from leanclip.cli.common import UsageError
from leanclip.cli.option_flags import OPTION_FLAGS

TRAIN, CONTRASTIVE = ("train", "classify"), ("train", "contrastive")
EVAL, RETRIEVAL = ("eval", "classify"), ("eval", "retrieval")
ZEROSHOT = ("zeroshot", "classify")
PLACES = (TRAIN, CONTRASTIVE, EVAL, RETRIEVAL, ZEROSHOT)
CLASSIFY = (TRAIN, EVAL, ZEROSHOT)


def _place_name(place) -> str:
    command, task = place
    return command if command == "zeroshot" else f"{command} --task {task}"


def _has_hook(parts, role: str) -> bool:
    from leanclip.registry import METHOD_TRAITS

    return any(role in METHOD_TRAITS[p].hooks for p in parts)


def _learns_prompts(parts) -> bool:
    """A component replaces the class prompts (CoOp's, or CoCoOp's image-conditioned ones)."""
    return _has_hook(parts, "prompts") or _has_hook(parts, "image_prompts")


def _trainer(parts) -> str:
    from leanclip.registry import method_trainer

    return method_trainer("+".join(parts))


def _declares(parts, option: str) -> bool:
    from leanclip.registry import method_options

    return any(option in method_options(p) for p in parts)


@dataclass(frozen=True)
class Scope:
    """Where a flag is read: ``places`` (subcommand, task); on ``train``, only by the methods ``methods(parts)``
    accepts (None: every method), described by ``which`` in the error."""
    places: tuple
    methods: Callable[[list], bool] | None = None
    which: str = ""
    hint: str = ""


_BACKPROP = Scope((TRAIN, CONTRASTIVE), lambda parts: _trainer(parts) == "backprop",
                  "methods that back-propagate through the towers")
_DATA = Scope(CLASSIFY, hint="the contrastive task and retrieval read image-text pairs: --pairs FILE")
_PAIRS = (CONTRASTIVE, RETRIEVAL)

# dest -> Scope. Flags of the model and run groups (--model, --device, --batch-size, ...) are read everywhere.
SCOPES: dict[str, Scope] = {
    # data: the classification datasets; image-text pairs for the contrastive task and retrieval
    "data": _DATA, "split_file": _DATA, "synthetic": _DATA, "dataset": _DATA,
    "shots": Scope(CLASSIFY), "subsample": Scope(CLASSIFY), "eval_split": Scope(CLASSIFY),
    "synthetic_classes": Scope(CLASSIFY), "synthetic_dir": Scope(CLASSIFY), "skip_bad_images": Scope(CLASSIFY),
    "seed": Scope((TRAIN, CONTRASTIVE)),
    "num_workers": Scope((TRAIN, CONTRASTIVE, EVAL, ZEROSHOT)),
    # a prompt-learning method (CoOp) replaces the templates with its learned context; the contrastive task reads
    # them for its zero-shot evaluation (--zeroshot-data)
    "templates": Scope((*CLASSIFY, CONTRASTIVE), lambda parts: not _learns_prompts(parts),
                       "methods without learned prompts"),
    "template_set": Scope((*CLASSIFY, CONTRASTIVE), lambda parts: not _learns_prompts(parts),
                          "methods without learned prompts"),
    # method and optimisation (train)
    "tower": Scope((TRAIN, CONTRASTIVE), lambda parts: _declares(parts, "tower"), "methods with a tower option"),
    "recompute": _BACKPROP, "recompute_chunk": _BACKPROP, "memory_budget": _BACKPROP,
    "optimizer": Scope((TRAIN, CONTRASTIVE)),
    "warmup_epochs": Scope((TRAIN, CONTRASTIVE)), "warmup_lr": Scope((TRAIN,)),
    "grad_accum": Scope((TRAIN,), lambda parts: _trainer(parts) == "backprop",
                        "methods that back-propagate through the towers"),
    # shorthands for a method option (leanclip.cli.option_flags): read by the methods that declare it
    **{dest: Scope((TRAIN,), lambda parts, o=option: _declares(parts, o), f"the methods with option {option}")
       for dest, option in OPTION_FLAGS.items()},
    "preset": Scope((TRAIN, CONTRASTIVE)),  # coop, cocoop, prograd for classification, lilt for the contrastive task
    "init_from": Scope((TRAIN, CONTRASTIVE)),
    # the contrastive task and retrieval
    "pairs": Scope(_PAIRS), "pairs_split": Scope(_PAIRS), "synthetic_eval_pairs": Scope(_PAIRS),
    "eval_pairs": Scope((CONTRASTIVE,)), "eval_pairs_split": Scope((CONTRASTIVE,)),
    "synthetic_pairs": Scope((CONTRASTIVE,)), "max_steps": Scope((CONTRASTIVE,)),
    "warmup_steps": Scope((CONTRASTIVE,)), "min_lr": Scope((CONTRASTIVE,)), "max_pairs": Scope((CONTRASTIVE,)),
    "zeroshot_data": Scope((CONTRASTIVE,)), "zeroshot_dataset": Scope((CONTRASTIVE,)),
    "randaugment": Scope((CONTRASTIVE,)), "augment": Scope((CONTRASTIVE,)), "temperature": Scope((CONTRASTIVE,)),
    "reduction": Scope((CONTRASTIVE,)), "deep_init": Scope((CONTRASTIVE,)), "no_projections": Scope((CONTRASTIVE,)),
    "no_initial_eval": Scope((CONTRASTIVE,)),
}


class _Unset:
    """The marker :func:`given_dests` puts in place of every default."""

    def __repr__(self) -> str:
        return "<unset>"


_UNSET = _Unset()


def given_dests(subparser: argparse.ArgumentParser, words) -> set[str]:
    """The destinations of the flags that ``words`` (the command line after the subcommand) gives, whatever their
    values: argparse sets a default only where the namespace has no value yet, so a namespace holding a marker
    for every destination keeps it exactly for the flags not given (``append`` flags default to None and are
    left out of the marking)."""
    ns = argparse.Namespace()
    dests = {a.dest for a in subparser._actions if a.dest != argparse.SUPPRESS}
    for a in subparser._actions:
        if a.dest in dests and not isinstance(a, argparse._AppendAction):
            setattr(ns, a.dest, _UNSET)
    subparser.parse_args(list(words), namespace=ns)
    return {d for d in dests if getattr(ns, d, None) is not _UNSET and getattr(ns, d, None) is not None}


def _flag(subparser, dest: str) -> str:
    for a in subparser._actions:
        if a.dest == dest and a.option_strings:
            return max(a.option_strings, key=len)
    return "--" + dest.replace("_", "-")


def check_scopes(args, given: set[str], subparser) -> None:
    """UsageError (one line) for the first flag in ``given`` that nothing reads in this command, task and method."""
    place = (args.command, getattr(args, "task", None) or "classify")
    parts = None
    for dest in sorted(given):
        scope = SCOPES.get(dest)
        if scope is None:
            continue
        flag = _flag(subparser, dest)
        if place not in scope.places:
            where = ", ".join(_place_name(p) for p in scope.places)
            hint = f"; {scope.hint}" if scope.hint else ""
            raise UsageError(f"{flag} is not read by {_place_name(place)} (only by {where}){hint}")
        if scope.methods is None or args.command != "train":
            continue
        if parts is None:
            from leanclip.methods import parse_method  # registers the methods (seconds): only when a row needs them

            parts = parse_method(args.method)
        if not scope.methods(parts):
            raise UsageError(f"{flag} has no effect on --method {'+'.join(parts)} (read by {scope.which} only)")


def check_command_line(parser: argparse.ArgumentParser, argv, args) -> None:
    """:func:`check_scopes` for ``args``, parsed by ``parser`` (``leanclip.cli.build_parser``) from ``argv``: the
    built-in subcommands only (extensions declare their own flags)."""
    if args.command not in ("train", "eval", "zeroshot"):
        return
    argv = list(argv)
    start = next(i for i, w in enumerate(argv) if not w.startswith("-")) + 1  # after the subcommand's name
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    subparser = subs.choices[args.command]
    check_scopes(args, given_dests(subparser, argv[start:]), subparser)
