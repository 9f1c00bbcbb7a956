"""Option fields several method modules declare alike: the tower a method applies to (set by ``--tower``) and what
the command line hands a method from the run itself (class names, tokenizer, prompt templates)."""
from __future__ import annotations

from typing import Any, Literal

from leanclip.options import option
from leanclip.registry import CONTEXT_OPTIONS
from leanclip.select import TOWERS

Tower = Literal[TOWERS]


def tower_option(what: str) -> Any:
    """``tower``: which tower ``what`` (e.g. "whose LayerNorms train"), both by default."""
    return option("both", f"the tower {what}: image, text or both", set_by=CONTEXT_OPTIONS["tower"])


def context_option(name: str, help: str) -> Any:
    """An option the run fills in (``classnames``, ``tokenizer``, ``templates``), None by default."""
    return option(None, help, set_by=CONTEXT_OPTIONS[name])
