"""``leanclip --help`` says what each subcommand does, in words a newcomer can act on (not where its code lives)."""
import re

from leanclip.cli import SUBCOMMANDS, main


def test_top_level_help_describes_every_subcommand(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "provided by" not in out
    for name in ["train", "eval", "zeroshot", *SUBCOMMANDS]:
        m = re.search(rf"^ {{4}}{re.escape(name)} {{2,}}(\S.*)$", out, re.MULTILINE)
        assert m, f"{name} is not listed with a description"
        assert len(m.group(1).split()) >= 3, f"{name}: {m.group(1)!r} is not a description"


def test_bench_help_names_its_default_folder(capsys):
    assert main(["bench", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "./leanclip-bench/" in out and "--output" in out


def test_a_reader_that_stops_early_gets_no_traceback():
    """``leanclip methods | head -1``: the closed pipe ends the command quietly (128 + SIGPIPE), stderr empty."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "leanclip", "methods"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the interpreter has started: the first write meets a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141, err
    assert "Traceback" not in err and "Broken pipe" not in err, err
