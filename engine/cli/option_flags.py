"""Flags that are shorthands for a method option: ``--kd-lambda 4`` is ``--opt kd_lambda=4`` (CLIPFit's distillation
weight), ``--llu-lambda`` / ``--llu-clusters`` LLU's regulariser weight and image-bank size. The one table of them
(:data:`OPTION_FLAGS`) and the one place that turns them into the options ``prepare`` takes
(:func:`options_from_flags`). Each flag defaults to None (not given): the method's own default then holds, as it
does through the API. Where such a flag may be given at all (the methods that declare its option) is
``leanclip.cli.flags``' scope table, built from this one.
"""
from __future__ import annotations

from leanclip.cli.common import UsageError

__all__ = ["OPTION_FLAGS", "options_from_flags"]

# flag destination -> the method option it sets
OPTION_FLAGS: dict[str, str] = {"kd_lambda": "kd_lambda", "llu_lambda": "llu_lambda", "llu_clusters": "llu_clusters"}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def options_from_flags(args, parts: list[str], from_opt: dict) -> dict:
    """The method options the shorthand flags of ``args`` set, checked against the range each of ``parts`` (the
    method's ``+`` components) declares for them; ``from_opt``: the options ``--opt`` gave (the same option given
    both ways is refused rather than one silently winning). UsageError naming the flag."""
    from leanclip.registry import option_range

    out = {}
    for dest, key in OPTION_FLAGS.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        if key in from_opt:
            raise UsageError(f"{_flag(dest)} and --opt {key}=... both set the option {key}: give one")
        for p in parts:
            r = option_range(p, key)
            if r is not None and not r.admits(value):
                raise UsageError(f"{_flag(dest)} must be {r}, got {value!r}")
        out[key] = value
    return out
