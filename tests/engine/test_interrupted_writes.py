"""A run killed in the middle of an atomic write leaves a temp file (``leanclip.utils.atomic_write``); the next start
of a run in that folder removes it, wherever the run writes (its folder and its few-shot records), once the new
command has passed its checks."""
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from leanclip import cli, utils

# `leanclip` with os.replace patched: the process SIGKILLs itself when it is about to rename the temp file of a write
# whose target name contains $CRASH_ON, i.e. with the temp file complete and the write not done
_CRASHING_CLI = """
import os, signal, sys
_replace = os.replace
def replace(src, dst, *a, **k):
    if os.environ["CRASH_ON"] in os.path.basename(os.fspath(dst)):
        os.kill(os.getpid(), signal.SIGKILL)
    return _replace(src, dst, *a, **k)
os.replace = replace
from leanclip import cli
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.fixture
def split_file(tmp_path):
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    rows = []
    for c in range(2):
        for i in range(2):
            Image.new("RGB", (16, 16), (100 * c, 40 * i, 90)).save(img_dir / f"c{c}_{i}.png")
            rows.append([f"c{c}_{i}.png", c, f"class{c}"])
    path = img_dir / "split_zhou_Tiny.json"
    path.write_text(json.dumps({"train": rows, "val": [], "test": rows}))
    return path


def _temps(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob(utils.TEMP_PREFIX + "*"))


def _train_killed(args, crash_on):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "CRASH_ON": crash_on, "LEANCLIP_BACKEND": "torch",
           "TRITON_INTERPRET": "0"}
    r = subprocess.run([sys.executable, "-c", _CRASHING_CLI, *map(str, args)], env=env, capture_output=True)
    assert r.returncode == -9, r.stderr.decode()[-2000:]


def test_the_next_start_removes_the_temps_of_a_killed_write(split_file, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    train = ["train", "--method", "ln", "--epochs", "1", "--shots", "1", "--no-progress", "--image-size", "32",
             "--split-file", split_file, "--threads", "1", "--output", run]
    _train_killed(train, "fewshot_")  # killed writing the few-shot record, before training
    assert [t.split("/")[0] for t in _temps(run)] == ["fewshot"]
    monkeypatch.chdir(tmp_path)
    assert cli.main(list(map(str, train))) == 0  # the next start: the temp is gone, the record written
    assert _temps(run) == [] and len(list((run / "fewshot").iterdir())) == 1
    _train_killed([*train, "--overwrite"], "checkpoint.safetensors")  # killed writing the first checkpoint
    left = _temps(run)
    assert len(left) == 1 and left[0].startswith(utils.TEMP_PREFIX + "checkpoint.safetensors.")
    before = sorted(p.relative_to(run).as_posix() for p in run.rglob("*"))
    assert cli.main(list(map(str, [*train, "--resume", run]))) == 2  # no checkpoint to resume: refused, untouched
    assert "checkpoint" in capsys.readouterr().err
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*")) == before
    assert cli.main(list(map(str, [*train, "--overwrite"]))) == 0
    assert _temps(run) == [] and (run / "checkpoint.safetensors").is_file()
