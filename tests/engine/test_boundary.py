"""Structure checks: open_clip internals are touched in one module only (leanclip.models.openclip), and the package
has no import cycle among its top-level imports."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"engine": "leanclip", "kernels/src": "leanclip.kernels", "bench": "leanclip.bench"}
BOUNDARY = ROOT / "engine" / "models" / "openclip.py"
PUBLIC_OPEN_CLIP = {"create_model", "get_tokenizer", "list_models", "get_model_config", "__version__"}


def _modules():
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts]) if parts else package] = path
    return out


MODULES = _modules()


@pytest.mark.parametrize("name", sorted(MODULES))
def test_open_clip_internals_only_in_the_boundary(name):
    path = MODULES[name]
    if path == BOUNDARY:
        return
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "open_clip":
            pytest.fail(f"{name}:{node.lineno} imports from {node.module}; go through leanclip.models.openclip")
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("open_clip."):
                    pytest.fail(f"{name}:{node.lineno} imports {alias.name}; go through leanclip.models.openclip")
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "open_clip"
                and node.attr not in PUBLIC_OPEN_CLIP):
            pytest.fail(f"{name}:{node.lineno} uses open_clip.{node.attr}; go through leanclip.models.openclip")


def _top_level_imports(name, path):
    targets = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            subs = [f"{node.module}.{a.name}" for a in node.names]
            names = subs if all(s in MODULES for s in subs) else subs + [node.module]
        else:
            continue
        for t in names:
            while t and t not in MODULES:
                t = t.rpartition(".")[0]
            if t and t != name:
                targets.add(t)
    return targets


def test_no_import_cycle():
    graph = {name: _top_level_imports(name, path) for name, path in MODULES.items()}
    state = {}

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                pytest.fail("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


# The commands: the application side. The library (every other leanclip module) never imports one, at module level or
# inside a function, so that a method, a loop or the lean engine can be used without the command line.
COMMAND_PACKAGES = ("leanclip.cli", "leanclip.bench")
ENTRY_POINTS = {"leanclip.__main__"}  # ``python -m leanclip`` is the command line itself


def _is_command(module: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in COMMAND_PACKAGES)


def _all_imports(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.lineno, node.module
            yield from ((node.lineno, f"{node.module}.{a.name}") for a in node.names)
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
              and node.value.startswith("leanclip.") and " " not in node.value):
            yield node.lineno, node.value  # lazy imports by name (importlib.import_module, the re-export table)


LIBRARY = sorted(n for n in MODULES if not _is_command(n) and n not in ENTRY_POINTS)


@pytest.mark.parametrize("name", LIBRARY)
def test_library_imports_no_command(name):
    found = [f"{name}:{line} imports {target}" for line, target in _all_imports(MODULES[name])
             if target in MODULES and _is_command(target)]
    assert not found, "; ".join(found)


def test_the_library_check_can_fail(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from leanclip.cli import sweep\n")
    assert [t for _, t in _all_imports(probe) if _is_command(t)] == ["leanclip.cli", "leanclip.cli.sweep"]
