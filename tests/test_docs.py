"""The repository carries every document it cites: each `*.md` path named in the code, tests and docs exists."""
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CITED = re.compile(r"(?<![\w/.-])((?:[\w.-]+/)*[A-Z][A-Z0-9_-]*\.md)\b")  # DESIGN.md, docs/SWEEP.md, csrc/README.md
TEXT = (".py", ".md", ".sh", ".cpp", ".cu", ".h", ".ini", ".cfg", ".toml", "")


def _tracked_text_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [REPO / f for f in out.split() if Path(f).suffix in TEXT and (REPO / f).is_file()]


def test_every_cited_document_exists():
    missing = []
    for path in _tracked_text_files():
        for name in CITED.findall(path.read_text(errors="replace")):
            if not any((base / name).exists() for base in (REPO, path.parent, REPO / "docs")):
                missing.append(f"{path.relative_to(REPO)} cites {name}")
    assert not missing, missing
