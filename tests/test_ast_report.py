"""tools/ast_report.py on this repository: the library imports no command module (at any level), each concept the
report counts is defined once, no private name is read outside its package, and a planted library -> command import,
private read or second ``strip`` is found."""
import importlib.util
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("ast_report", ROOT / "tools" / "ast_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_library_imports_no_command_and_each_concept_is_defined_once():
    r = _tool().report(ROOT)
    assert r["library_to_command_imports"] == [] and r["private_crossings"] == []
    assert r["modules_per_package"]["leanclip.cli"] >= 1 and r["modules"] > 30
    once = {k: v for k, v in r["concepts"].items() if k not in ("run_file_literals", "inline_device",
                                                                   "checks_rerun_in_method")}
    assert once == dict.fromkeys(once, 1)
    assert r["concepts"]["inline_device"] == r["concepts"]["checks_rerun_in_method"] == 0


def test_a_planted_import_and_a_second_strip_are_counted(tmp_path, capsys):
    tool = _tool()
    for folder in ("engine", "kernels/src", "bench"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    planted = tmp_path / "engine" / "planted.py"
    planted.write_text("from leanclip import lean\nfrom leanclip.methods import _prepare\n\n\n"
                       "def strip(model):\n    from leanclip.cli.common import UsageError\n"
                       "    return lean._deltas(model)\n")
    r = tool.report(tmp_path)
    assert r["library_to_command_imports"] == ["leanclip.planted -> leanclip.cli.common"]
    assert r["private_crossings"] == ["leanclip.planted -> leanclip.lean._deltas",
                                      "leanclip.planted -> leanclip.methods._prepare"]
    assert r["concepts"]["strip_defs"] == 2
    assert tool.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| measure | value |") and "| library -> command imports | 1: " in out
    assert tool.main([str(tmp_path / "nowhere")]) == 2
    assert tool.main([str(tmp_path), "--before", str(ROOT)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| measure | before | after |") and "| library -> command imports | 0 | 1: " in out
