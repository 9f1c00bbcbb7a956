import json
import os
import stat

import pytest

from leanclip import utils


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_write_hands_a_temp_name_in_the_same_folder(tmp_path):
    target = tmp_path / "sub" / "out.bin"
    seen = []

    def writer(tmp):
        seen.append(tmp)
        assert os.path.dirname(tmp) == str(target.parent) and os.path.isfile(tmp) and not target.exists()
        with open(tmp, "wb") as f:
            f.write(b"new")

    assert utils.atomic_write(target, writer, sync_dir=True) == target
    assert target.read_bytes() == b"new" and not os.path.exists(seen[0])
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~_umask()  # not mkstemp's 0600
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.bin"]


def test_atomic_write_failing_writer_keeps_old_file_and_no_temp(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def writer(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        utils.atomic_write(target, writer)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_atomic_write_json_indent(tmp_path):
    p = utils.atomic_write_json(tmp_path / "a.json", {"a": [1, 2]}, indent=None)
    assert p.read_text() == '{"a": [1, 2]}\n'
    assert json.loads(utils.atomic_write_json(p, {"b": 1}).read_text()) == {"b": 1}


# ------------------------------------------------------------------------------------------------------ valid JSON
def _strict_loads(text):
    def no_constant(name):
        raise ValueError(f"invalid JSON constant {name}")

    return json.loads(text, parse_constant=no_constant)


def test_json_writers_write_null_for_non_finite_floats(tmp_path):
    import math

    import numpy as np
    import torch

    obj = {"nan": float("nan"), "inf": [math.inf, -math.inf, 1.5], "np": np.float32("nan"), "np_ok": np.float64(2.5),
           "t": torch.tensor([1.0, float("nan")]), "t0": torch.tensor(float("inf")), "nested": ({"x": math.nan},),
           "int": np.int64(3), "ok": True}
    want = {"nan": None, "inf": [None, None, 1.5], "np": None, "np_ok": 2.5, "t": [1.0, None], "t0": None,
            "nested": [{"x": None}], "int": 3, "ok": True}
    assert _strict_loads(utils.to_json(obj)) == want
    assert _strict_loads(utils.json_dumps(obj)) == want
    assert _strict_loads(utils.atomic_write_json(tmp_path / "a.json", obj).read_text()) == want
    utils.append_jsonl(tmp_path / "l.jsonl", {"step": 1, "loss": math.nan})
    utils.append_jsonl(tmp_path / "l.jsonl", {"step": 2, "loss": 0.5})
    assert [_strict_loads(x) for x in (tmp_path / "l.jsonl").read_text().splitlines()] == [
        {"step": 1, "loss": None}, {"step": 2, "loss": 0.5}]
    # a log another writer left with bare NaN is rewritten as valid JSON
    (tmp_path / "old.jsonl").write_text('{"step": 1, "loss": NaN}\n{"step": 2, "loss": Infinity}\n')
    utils.truncate_jsonl(tmp_path / "old.jsonl", lambda r: True)
    assert [_strict_loads(x)["loss"] for x in (tmp_path / "old.jsonl").read_text().splitlines()] == [None, None]


# ------------------------------------------------------------------------------------------- stale temp files
_KILLED_WRITER = """
import os, signal, sys
from leanclip import utils

def writer(tmp):
    with open(tmp, "wb") as f:
        f.write(b"half a checkpoint")
    os.kill(os.getpid(), signal.SIGKILL)

utils.atomic_write(sys.argv[1], writer)
"""


def test_remove_stale_temps_after_a_killed_write(tmp_path):
    import subprocess
    import sys

    target = tmp_path / "checkpoint.safetensors"
    target.write_bytes(b"old")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(target)], env=env, capture_output=True)
    assert r.returncode == -9, r.stderr.decode()
    left = [p.name for p in tmp_path.iterdir() if p.name != "checkpoint.safetensors"]
    assert len(left) == 1 and left[0].startswith(utils.TEMP_PREFIX + "checkpoint.safetensors.")
    (tmp_path / ".other.tmp").write_bytes(b"not ours")          # other programs' temps are left alone
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / (utils.TEMP_PREFIX + "x.tmp")).write_bytes(b"")  # not recursive
    removed = utils.remove_stale_temps(tmp_path)
    assert [p.name for p in removed] == left
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp", "checkpoint.safetensors", "sub"]
    assert target.read_bytes() == b"old"
    assert utils.remove_stale_temps(tmp_path / "missing") == []


# ----------------------------------------------------------------------------------------------- non-finite guard
def test_check_finite_step_messages(tmp_path):
    import math

    utils.check_finite_step(1.0, 2.0, step=3, epoch=1, lr=0.1)
    utils.check_finite_step(1.0, None, step=3, epoch=1, lr=0.1)
    with pytest.raises(utils.NonFiniteLossError, match=r"loss \(nan\) at step 1 \(epoch 1\): before any update.*no "
                                                       r"checkpoint was written"):
        utils.check_finite_step(math.nan, 1.0, step=1, epoch=1, lr=0.1)
    ckpt = tmp_path / "c.safetensors"
    ckpt.write_bytes(b"x")
    with pytest.raises(utils.NonFiniteLossError, match=r"gradient \(norm inf\) at step 7 \(epoch 2\): the learning "
                                                       r"rate \(0\.5\) is likely too high.*kept at") as e:
        utils.check_finite_step(0.3, math.inf, step=7, epoch=2, lr=0.5, checkpoint=ckpt)
    assert "\n" not in str(e.value) and isinstance(e.value, RuntimeError) and e.value.exit_code == 3


def test_check_finite_params_and_grad_norm():
    import torch

    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    assert float(utils.grad_norm([a, b])) == 0.0  # no gradients yet
    a.grad, b.grad = torch.full((3,), 2.0), torch.tensor([float("nan"), 0.0])
    assert torch.isnan(utils.grad_norm([a, b])) and float(utils.grad_norm([a])) == pytest.approx(12 ** 0.5)
    utils.check_finite_params([a, b], step=1, epoch=1, lr=1.0)
    with torch.no_grad():
        b[0] = float("inf")
    with pytest.raises(utils.NonFiniteLossError, match="non-finite weights after step 4"):
        utils.check_finite_params([a, b], step=4, epoch=1, lr=1.0)


# ------------------------------------------------------------------------------------------------------- progress
class _CountingIterable:
    def __init__(self, n):
        self.n, self.iters = n, 0

    def __len__(self):
        return self.n

    def __iter__(self):
        self.iters += 1
        return iter(range(self.n))


@pytest.mark.parametrize("tty", [False, True])
@pytest.mark.parametrize("enabled", [False, True])
def test_track_iterates_once(tty, enabled, monkeypatch):
    monkeypatch.setattr(utils, "_stderr_is_tty", lambda: tty)
    it = _CountingIterable(5)
    assert list(utils.track(it, "x", enabled)) == list(range(5)) and it.iters == 1


def _log_lines():
    import logging

    lines = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    return lines, Keep()


def test_progress_off_a_terminal_is_plain_log_lines(monkeypatch, capsys):
    monkeypatch.setattr(utils, "_stderr_is_tty", lambda: False)
    lines, handler = _log_lines()
    log = utils.get_logger()
    log.addHandler(handler)
    try:
        with utils.Progress(25, "epoch 1/2") as bar:
            for i in range(25):
                bar.update(1, loss=f"{i:.1f}")
        with utils.Progress(5, "off", enabled=False) as bar:
            bar.update(1)
    finally:
        log.removeHandler(handler)
    assert lines == [f"epoch 1/2: {n}/25 loss={n - 1:.1f}" for n in (3, 6, 9, 12, 15, 18, 21, 24, 25)]
    assert "\r" not in capsys.readouterr().err


def test_progress_on_a_terminal_is_a_bar(monkeypatch, capsys):
    monkeypatch.setattr(utils, "_stderr_is_tty", lambda: True)
    lines, handler = _log_lines()
    utils.get_logger().addHandler(handler)
    try:
        with utils.Progress(4, "epoch 1/1") as bar:
            for _ in range(4):
                bar.update(1, loss="0.5")
    finally:
        utils.get_logger().removeHandler(handler)
    err = capsys.readouterr().err
    assert "\r" in err and "epoch 1/1" in err and lines == []
