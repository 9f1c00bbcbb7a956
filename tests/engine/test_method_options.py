"""Typed method options: every method's options dataclass agrees with its keyword options, ``--opt`` converts with
the field's type and refuses a bad value in one line naming the option and what it accepts, ``leanclip methods``
lists the methods and one method's options; and ``leanclip.methods`` registers every module of the package, so a
method dropped in as one new module is found with nothing else edited."""
import dataclasses
import sys
from pathlib import Path
from typing import Literal, Optional

import pytest

import leanclip.methods as methods
from leanclip import registry
from leanclip.cli import UsageError, main
from leanclip.cli.common import method_opts_from_flags
from leanclip.options import describe, option, option_fields, parse_value, ranges_of
from leanclip.registry import METHOD_OPTIONS, METHODS, OptionRange, method_options, register_method


def _ours():
    return [n for n in METHODS if METHODS[n].__module__.startswith("leanclip.")]


def test_every_method_declares_options_that_agree_with_its_function():
    assert len(_ours()) > 15
    for name in _ours():
        cls = METHOD_OPTIONS[name]
        fields = option_fields(cls)
        assert sorted(fields) == sorted(method_options(name)), name
        assert {k: f.default for k, f in fields.items()} == method_options(name), name
        assert all(f.metadata.get("help") for f in fields.values()), f"{name}: an option without help"
        for key, r in ranges_of(cls).items():  # the ranges the fields declare are the ones prepare checks
            assert registry.option_range(name, key) == r


@pytest.mark.parametrize("tp,raw,value", [
    (bool, "yes", True), (bool, "0", False), (int, "12", 12), (float, "1e-3", 1e-3), (str, "a b", "a b"),
    (Literal["exp", "dirac"], "dirac", "dirac"), (tuple[Literal["q", "k", "v"], ...], "q, v", ("q", "v")),
    (Optional[float], "none", None), (Optional[float], "0.5", 0.5), (int | None, "None", None),
    (Optional[str], "", ""), (tuple[str, ...], "a,,b", ("a", "b")),
])
def test_parse_value_by_type(tp, raw, value):
    assert parse_value(tp, raw) == value and type(parse_value(tp, raw)) is type(value)


@pytest.mark.parametrize("tp,raw,expected", [
    (bool, "maybe", "expected true/false"), (int, "1.5", "expected int"), (float, "inf", "expected float"),
    (Literal["exp", "dirac"], "soft", "expected one of exp, dirac"),
    (tuple[Literal["q", "k"], ...], "q,z", "expected a comma-separated list of q, k"),
    (Optional[int], "x", "expected int or none"),
])
def test_parse_value_refuses_with_what_it_expects(tp, raw, expected):
    with pytest.raises(ValueError) as e:
        parse_value(tp, raw)
    assert str(e.value) == expected and describe(tp) == expected.removeprefix("expected ")


def test_opt_is_typed_from_the_dataclass():
    got = method_opts_from_flags(["llu"], ["gate=dirac", "shared=true", "init_seed=3", "beta=0.25"])
    assert got == {"gate": "dirac", "shared": True, "init_seed": 3, "beta": 0.25}
    assert method_opts_from_flags(["lora"], ["targets=q,v"]) == {"targets": ("q", "v")}
    # a default of None no longer reads as a string: the field's type says what it is
    assert method_opts_from_flags(["coop"], ["std=none", "init_text=none"]) == {"std": None, "init_text": None}
    assert method_opts_from_flags(["linear-probe"], ["num_classes=7"]) == {"num_classes": 7}
    assert method_opts_from_flags(["ln", "lilt-adapter"], ["ln_tower=none"]) == {"ln_tower": "none"}


@pytest.mark.parametrize("parts,pair,needle", [
    (["llu"], "gate=soft", "--opt 'gate=soft': expected one of exp, dirac, none for gate"),
    (["lora"], "targets=q,x", "expected a comma-separated list of q, k, v, out, fc, proj for targets"),
    (["lit"], "locked=both", "expected one of image, text for locked"),
    (["clipfit"], "image_ln=off", "expected true/false for image_ln"),
    (["ln"], "tower=image", "tower is set by --tower, not by --opt"),
    (["coop"], "classnames=a", "classnames is set by the dataset's class names"),
])
def test_opt_refuses_in_one_line_naming_the_option(parts, pair, needle):
    with pytest.raises(UsageError) as e:
        method_opts_from_flags(parts, [pair])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_cli_bad_opt_choice_exits_2_before_any_work(capsys, tmp_path):
    rc = main(["train", "--method", "lit", "--task", "contrastive", "--opt", "locked=both",
               "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "locked" in err and "image, text" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_register_method_holds_the_dataclass_to_the_function():
    @dataclasses.dataclass(frozen=True)
    class Opts:
        k: int = option(1, "k", range=OptionRange(int, 1, 4))

    @dataclasses.dataclass(frozen=True)
    class Other:
        k: int = option(2, "k")

    try:
        register_method("test-typed", lambda model, k=1: {}, options=Opts)
        assert registry.option_range("test-typed", "k") == OptionRange(int, 1, 4)
        with pytest.raises(ValueError, match="declares \\['k'\\], the method takes \\['j'\\]"):
            register_method("test-typed-names", lambda model, j=1: {}, options=Opts)
        with pytest.raises(ValueError, match="default k differently \\(2 and 1\\)"):
            register_method("test-typed-defaults", lambda model, k=1: {}, options=Other)
        with pytest.raises(TypeError, match="must be a dataclass"):
            register_method("test-typed-class", lambda model, k=1: {}, options=dict)
        assert not {"test-typed-names", "test-typed-defaults", "test-typed-class"} & set(METHODS)
        # without a dataclass the options are typed from their defaults (and a range's kind where None)
        register_method("test-untyped", lambda model, n=None, flag=False, tower="both": {},
                        ranges={"n": OptionRange(int, 1, 9)})
        assert method_opts_from_flags(["test-untyped"], ["n=3", "flag=yes"]) == {"n": 3, "flag": True}
        with pytest.raises(UsageError, match="tower is set by --tower"):
            method_opts_from_flags(["test-untyped"], ["tower=text"])
    finally:
        for name in ("test-typed", "test-untyped"):
            for table in (METHODS, registry.METHOD_TRAITS, registry.METHOD_RANGES, METHOD_OPTIONS):
                table.pop(name, None)


def test_methods_command_lists_every_method_in_one_line(capsys):
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == sorted(METHODS)
    llu = next(line for line in lines if line.startswith("llu "))
    assert "cached" in llu and "classify" in llu and "contrastive" not in llu


def test_methods_command_shows_one_methods_options_and_traits(capsys):
    assert main(["methods", "lora"]) == 0
    out = capsys.readouterr().out
    assert "mergeable yes" in out and "tasks classify, contrastive" in out
    rank = next(line for line in out.splitlines() if line.startswith("rank "))
    assert rank.split()[:4] == ["rank", "int", "2", "[1,"] and "the rank of each" in rank
    assert "set by --tower" in out
    assert main(["methods", "llu", "--json"]) == 0
    import json
    got = json.loads(capsys.readouterr().out)["llu"]
    assert got["trainer"] == "cached" and not got["mergeable"]
    assert {o["name"]: o["type"] for o in got["options"]}["gate"] == "one of exp, dirac, none"
    assert main(["methods", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown method 'nope'" in err and len(err.splitlines()) == 1


def test_every_module_of_the_package_is_imported_and_registers():
    folder = Path(methods.__file__).parent
    files = sorted(p.stem for p in folder.glob("*.py") if not p.name.startswith("_"))
    assert methods.method_modules() == files and {"ln", "coop", "lora", "llu"} <= set(files)
    registered = {METHODS[n].__module__ for n in METHODS}
    assert {f"leanclip.methods.{f}" for f in files} <= registered


def test_a_new_method_is_one_module(tmp_path, monkeypatch, capsys):
    (tmp_path / "tiny_scale.py").write_text('''
from dataclasses import dataclass
from leanclip.options import OptionRange, option
from leanclip.registry import register_method

@dataclass(frozen=True)
class TinyScaleOptions:
    factor: float = option(2.0, "what the logit scale is multiplied by", range=OptionRange(float, 0.5, 4.0))

@register_method("test-tiny-scale", options=TinyScaleOptions)
def _tiny_scale(model, factor=2.0):
    """Train the logit scale only."""
    model.logit_scale.requires_grad_(True)
    return {}
''')
    monkeypatch.setattr(methods, "__path__", [*methods.__path__, str(tmp_path)])
    try:
        assert "tiny_scale" in methods.discover()
        assert "test-tiny-scale" in METHODS
        assert method_opts_from_flags(["test-tiny-scale"], ["factor=3"]) == {"factor": 3.0}
        with pytest.raises(UsageError, match="factor of method 'test-tiny-scale' must be a finite number in"):
            method_opts_from_flags(["test-tiny-scale"], ["factor=9"])
        assert main(["methods", "test-tiny-scale"]) == 0
        assert "what the logit scale is multiplied by" in capsys.readouterr().out
    finally:
        sys.modules.pop("leanclip.methods.tiny_scale", None)
        for table in (METHODS, registry.METHOD_TRAITS, registry.METHOD_RANGES, METHOD_OPTIONS):
            table.pop("test-tiny-scale", None)
