"""Helpers the CLI tests share: run ``leanclip.cli.main`` in-process and read its JSON result."""
import json

from leanclip import cli


def run(capsys, *argv):
    """``leanclip ARGV`` in this process -> (exit code, stdout, stderr)."""
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def last_json(out: str) -> dict:
    """The JSON result a command prints as its last stdout line."""
    return json.loads(out.strip().splitlines()[-1])
