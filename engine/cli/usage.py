"""What every ``leanclip`` command module starts from: the program's name, the default model, and ``UsageError`` (a
bad command-line input: one line on stderr, exit code ``EXIT_USAGE``)."""
from __future__ import annotations

DEFAULT_MODEL = "leanclip-tiny"


PROG = "leanclip"
EXIT_USAGE = 2


class UsageError(ValueError):
    """Bad command-line input: one line on stderr, exit code 2."""
