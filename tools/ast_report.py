"""Structure report of a leanclip source tree, from the standard library's ``ast`` alone.

    python tools/ast_report.py [ROOT]          # ROOT: a checkout or an exported tree (default: this repository)
    python tools/ast_report.py ROOT --json     # the same numbers as one JSON object
    python tools/ast_report.py ROOT --before OLD   # two columns: the tree OLD, then ROOT

Prints one Markdown table: modules per package, function-level imports, files over 600 lines, library -> command
imports, private names read across modules, and a count per concept that the code base should define once. The library is every ``leanclip`` module
outside ``leanclip.cli``, ``leanclip.bench`` and ``leanclip.__main__`` (the commands); it must import no command
module, at any level (a function-level import counts too). A private name (``_x``: a function, a class, a constant or
a module) is read only inside the package that holds it: ``from leanclip.a import _x`` or ``a._x`` from a module
outside ``leanclip.a``'s package is a crossing (a package's own private modules, such as ``leanclip.methods._prepare``
read by ``leanclip.methods``, are not).

Each concept is found by a simple signature, so that trees of different layouts (before and after a restructuring)
are measured by the same rule:

- InfoNCE losses: definitions named ``*clip_loss`` / ``*contrastive_loss`` / ``*info_nce*``, or holding two
  ``cross_entropy`` calls and the ``arange`` of the matching pairs' labels;
- ``def strip(`` definitions;
- model-device helpers (definitions whose whole job is ``next(m.parameters()).device`` or its loop form) and inline
  ``next(<x>.parameters()).device`` expressions elsewhere;
- trainable-parameter helpers: definitions that return a ``requires_grad`` filter over ``parameters()`` /
  ``named_parameters()``;
- feature-cache classes (``class *FeatureCache``), model fingerprints (``def *fingerprint`` over a model or tower),
  image-encode helpers (small definitions that return ``<m>.encode_image(...)`` or ``image_features(...)``);
- run-file literals: occurrences of ``"checkpoint.safetensors"``, ``"log.jsonl"``, ``"summary.json"``,
  ``"result.json"``;
- provenance records: dict literals holding both ``"weights"`` and ``"pretrain_steps"`` keys;
- option checks run twice: classnames validators (``def *check_classnames``), and ``@register_method`` definitions
  that call their own registered ``check`` (``prepare`` already ran it);
- config validations: definitions that check a config's fields themselves: a ``validate`` method of a ``*Config``
  class, or a ``check_config`` helper, holding a ``check_number`` call or at least three ``raise`` statements.
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
from collections import Counter
from pathlib import Path

PACKAGES = {"engine": "leanclip", "kernels/src": "leanclip.kernels", "bench": "leanclip.bench"}
COMMANDS = ("leanclip.cli", "leanclip.bench", "leanclip.__main__")
LONG_FILE = 600
RUN_FILE_NAMES = ("checkpoint.safetensors", "log.jsonl", "summary.json", "result.json")
CONCEPTS = ("infonce_losses", "strip_defs", "device_helpers", "inline_device", "trainable_helpers",
            "feature_cache_classes", "model_fingerprints", "encode_helpers", "run_file_literals",
            "provenance_records", "config_validations", "classnames_validators", "checks_rerun_in_method")


# ----------------------------------------------------------------------------------------------------------- modules
def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of the three package folders."""
    out = {}
    for folder, package in PACKAGES.items():
        base = root / folder
        for path in sorted(base.rglob("*.py")) if base.is_dir() else []:
            parts = [p for p in path.relative_to(base).with_suffix("").parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def is_command(name: str) -> bool:
    return any(name == c or name.startswith(c + ".") for c in COMMANDS)


def imported(node: ast.AST, name: str, is_pkg: bool) -> list[str]:
    """The dotted names an import statement of module ``name`` refers to (relative imports resolved)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
        base = ".".join(anchor + ([base] if base else []))
    return [base] + [f"{base}.{a.name}" for a in node.names]


def resolve(target: str, known: dict[str, Path]) -> str | None:
    while target and target not in known:
        target = target.rpartition(".")[0]
    return target or None


# ---------------------------------------------------------------------------------------------------------- signatures
def _is_next_params_device(node: ast.AST) -> bool:
    """``next(<x>.parameters()).device`` or ``next(iter(<x>.parameters())).device``."""
    if not (isinstance(node, ast.Attribute) and node.attr == "device" and isinstance(node.value, ast.Call)):
        return False
    call = node.value
    if not (isinstance(call.func, ast.Name) and call.func.id == "next" and call.args):
        return False
    arg = call.args[0]
    if isinstance(arg, ast.Call) and isinstance(arg.func, ast.Name) and arg.func.id == "iter" and arg.args:
        arg = arg.args[0]
    return isinstance(arg, ast.Call) and isinstance(arg.func, ast.Attribute) and arg.func.attr == "parameters"


def _calls(node: ast.AST, attr: str) -> list[ast.Call]:
    return [n for n in ast.walk(node) if isinstance(n, ast.Call)
            and ((isinstance(n.func, ast.Attribute) and n.func.attr == attr)
                 or (isinstance(n.func, ast.Name) and n.func.id == attr))]


def _is_infonce(fn: ast.FunctionDef) -> bool:
    name = fn.name.lower()
    if name.endswith("clip_loss") or name.endswith("contrastive_loss") or "info_nce" in name or "infonce" in name:
        return True
    return len(_calls(fn, "cross_entropy")) >= 2 and bool(_calls(fn, "arange"))


def _is_device_helper(fn: ast.FunctionDef) -> bool:
    """A definition whose body is only about the first parameter's device (at most 4 statements)."""
    body = [s for s in fn.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    if len(body) > 4 or "device" not in fn.name:
        return False
    src = ast.dump(ast.Module(body=body, type_ignores=[]))
    return "'parameters'" in src and "'device'" in src


def _is_trainable_helper(fn: ast.FunctionDef) -> bool:
    body = [s for s in fn.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    if len(body) != 1 or not isinstance(body[0], ast.Return) or body[0].value is None:
        return False
    src = ast.dump(body[0].value)
    return "'requires_grad'" in src and ("'parameters'" in src or "'named_parameters'" in src)


def _is_encode_helper(fn: ast.FunctionDef) -> bool:
    body = [s for s in fn.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    if len(body) > 5 or not body or not isinstance(body[-1], ast.Return) or body[-1].value is None:
        return False
    return bool(_calls(body[-1].value, "encode_image") or _calls(body[-1].value, "image_features"))


def _reruns_its_check(fn: ast.FunctionDef) -> bool:
    """A ``@register_method(..., check=_check_x)`` definition that calls ``_check_x`` itself (prepare runs it)."""
    for dec in fn.decorator_list:
        if isinstance(dec, ast.Call) and getattr(dec.func, "id", getattr(dec.func, "attr", "")) == "register_method":
            checks = {k.value.id for k in dec.keywords if k.arg == "check" and isinstance(k.value, ast.Name)}
            return any(getattr(c.func, "id", None) in checks for c in _calls_any(fn))
    return False


def _calls_any(node: ast.AST) -> list[ast.Call]:
    return [n for n in ast.walk(node) if isinstance(n, ast.Call)]


def _checks_fields(fn: ast.FunctionDef) -> bool:
    return bool(_calls(fn, "check_number")) or sum(isinstance(n, ast.Raise) for n in ast.walk(fn)) >= 3


def _is_model_fingerprint(fn: ast.FunctionDef) -> bool:
    return fn.name.endswith("fingerprint") and any(a.arg == "model" for a in fn.args.args)


def concept_counts(tree: ast.AST) -> Counter:
    c = Counter()
    device_helpers = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            c["infonce_losses"] += _is_infonce(node)
            c["strip_defs"] += node.name == "strip"
            if _is_device_helper(node):
                c["device_helpers"] += 1
                device_helpers.update(id(n) for n in ast.walk(node))
            c["trainable_helpers"] += _is_trainable_helper(node)
            c["model_fingerprints"] += _is_model_fingerprint(node)
            c["encode_helpers"] += _is_encode_helper(node)
            c["config_validations"] += node.name == "check_config" and _checks_fields(node)
            c["classnames_validators"] += node.name.endswith("check_classnames")
            c["checks_rerun_in_method"] += _reruns_its_check(node)
        elif isinstance(node, ast.ClassDef):
            c["feature_cache_classes"] += node.name.endswith("FeatureCache")
            if node.name.endswith("Config"):
                c["config_validations"] += sum(_checks_fields(s) for s in node.body
                                               if isinstance(s, ast.FunctionDef) and s.name == "validate")
        elif isinstance(node, ast.Constant) and node.value in RUN_FILE_NAMES:
            c["run_file_literals"] += 1
        elif isinstance(node, ast.Dict):
            keys = {k.value for k in node.keys if isinstance(k, ast.Constant)}
            c["provenance_records"] += {"weights", "pretrain_steps"} <= keys
    c["inline_device"] += sum(_is_next_params_device(n) and id(n) not in device_helpers for n in ast.walk(tree))
    return c


def function_level_imports(tree: ast.AST) -> int:
    count = 0
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            count += sum(isinstance(s, (ast.Import, ast.ImportFrom)) for s in ast.walk(fn) if s is not fn
                         and not isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef)))
    return count


def _private_owner(dotted: str) -> str | None:
    """The package a private name of ``dotted`` belongs to (the part before its first ``_x`` segment), or None."""
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if part.startswith("_") and not part.startswith("__"):
            return ".".join(parts[:i])
    return None


def private_crossings(tree: ast.AST, name: str, is_pkg: bool) -> list[str]:
    """``name -> leanclip.x._y`` for each private name module ``name`` reads from outside the package owning it."""
    home = name if is_pkg else name.rpartition(".")[0]
    inside = (lambda owner: home == owner or home.startswith(owner + "."))
    bound, out = {}, []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            targets = imported(node, name, is_pkg)
            for target in targets[1:] if isinstance(node, ast.ImportFrom) else targets:
                owner = _private_owner(target)
                if target.startswith("leanclip") and owner is not None and not inside(owner):
                    out.append(f"{name} -> {target}")
            for a, target in zip(node.names, targets[1:] if isinstance(node, ast.ImportFrom) else targets):
                if target.startswith("leanclip"):
                    bound[a.asname or a.name.split(".")[0]] = target if a.asname or "." not in a.name else "leanclip"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound:
            target = f"{bound[node.value.id]}.{node.attr}"
            owner = _private_owner(target)
            if owner is not None and not inside(owner):
                out.append(f"{name} -> {target}")
    return out


# ------------------------------------------------------------------------------------------------------------ report
def report(root: Path) -> dict:
    known = modules(root)
    per_package, long_files, concepts = Counter(), [], Counter()
    lib_to_cmd, fn_imports, crossings = [], 0, []
    for name, path in known.items():
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text, filename=str(path))
        per_package[package_of(name, path)] += 1
        lines = text.count("\n") + (not text.endswith("\n") and bool(text))
        if lines > LONG_FILE:
            long_files.append((str(path.relative_to(root)), lines))
        fn_imports += function_level_imports(tree)
        concepts.update(concept_counts(tree))
        crossings += private_crossings(tree, name, path.name == "__init__.py")
        if is_command(name):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in imported(node, name, path.name == "__init__.py"):
                    hit = resolve(target, known)
                    if hit and is_command(hit) and hit != name:
                        lib_to_cmd.append(f"{name} -> {hit}")
    return {"modules_per_package": dict(sorted(per_package.items())), "modules": len(known),
            "function_level_imports": fn_imports, "files_over_600_lines": sorted(long_files),
            "library_to_command_imports": sorted(set(lib_to_cmd)),
            "private_crossings": sorted(set(crossings)),
            "concepts": {k: concepts.get(k, 0) for k in CONCEPTS}}


def rows(r: dict) -> dict[str, str]:
    """Measure -> value, in the table's order."""
    rows = [("modules", str(r["modules"]))]
    rows += [(f"modules in `{p}`", str(n)) for p, n in r["modules_per_package"].items()]
    rows.append(("function-level imports", str(r["function_level_imports"])))
    long_files = r["files_over_600_lines"]
    rows.append((f"files over {LONG_FILE} lines", f"{len(long_files)}: " + ", ".join(f"{p} ({n})" for p, n in long_files)
                 if long_files else "0"))
    cmd = r["library_to_command_imports"]
    rows.append(("library -> command imports", f"{len(cmd)}: " + ", ".join(cmd) if cmd else "0"))
    cross = r.get("private_crossings", [])
    rows.append(("private names read across modules", f"{len(cross)}: " + ", ".join(cross) if cross else "0"))
    rows += [(f"concept: {k.replace('_', ' ')}", str(v)) for k, v in r["concepts"].items()]
    return dict(rows)


def markdown(*reports: dict) -> str:
    """One column per report (a package a tree does not have reads 0)."""
    packages = sorted(set().union(*(r["modules_per_package"] for r in reports)))
    tables = [rows({**r, "modules_per_package": {p: r["modules_per_package"].get(p, 0) for p in packages}})
              for r in reports]
    measures = list(dict.fromkeys(m for t in tables for m in t))
    heads = ["value"] if len(reports) == 1 else ["before", "after"][: len(reports)]
    out = ["| measure | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
    out += [f"| {m} | " + " | ".join(t.get(m, "0") for t in tables) + " |" for m in measures]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", nargs="?", default=str(Path(__file__).resolve().parents[1]))
    ap.add_argument("--json", action="store_true", help="print the numbers as JSON instead of a Markdown table")
    ap.add_argument("--before", metavar="OLD", help="another tree, reported in a first column")
    args = ap.parse_args(argv)
    roots = [Path(p) for p in ([args.before] if args.before else []) + [args.root]]
    for root in roots:
        if not (root / "engine").is_dir():
            print(f"ast_report: {str(root)!r} has no engine/ folder (not a leanclip tree)", file=sys.stderr)
            return 2
    reports = [report(root) for root in roots]
    print(json.dumps(reports[-1] if len(reports) == 1 else reports, indent=1) if args.json else markdown(*reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
