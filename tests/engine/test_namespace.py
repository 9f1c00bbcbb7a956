"""One import namespace: `leanclip` and its subpackages only, never the repository's folder names, so it works beside
Hugging Face's `kernels` distribution and in a folder that holds a user's own `engine.py`."""
import importlib.util
import os
import subprocess
import sys
import textwrap
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

import leanclip

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import sys
    import torch, open_clip
    import leanclip
    from leanclip import kernels
    from leanclip.configs import register_tiny_config
    assert kernels.layer_norm(torch.randn(2, 8), torch.ones(8), torch.zeros(8)).shape == (2, 8)
    model = open_clip.create_model(register_tiny_config(), pretrained=None)
    leanclip.prepare(model, "ln")
    import engine, kernels as hub_kernels           # the user's engine.py and another 'kernels' distribution
    assert engine.USER and hub_kernels.HUB
    assert leanclip.kernels is not hub_kernels
    print("ok", sorted(m for m in sys.modules if m.split(".")[0] in ("engine", "kernels", "bench")))
""")


def test_leanclip_is_the_only_namespace(tmp_path):
    (tmp_path / "engine.py").write_text("USER = True\n")
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("HUB = True\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    # only the user's own modules: leanclip never imported a top-level engine / kernels / bench
    assert p.stdout.strip().endswith("['engine', 'kernels']"), p.stdout


def test_package_layout():
    root = os.path.dirname(leanclip.__file__)
    assert os.path.basename(root) == "engine"  # the repository's folder, installed as `leanclip`
    from leanclip import bench, kernels

    assert kernels.__name__ == "leanclip.kernels" and bench.__name__ == "leanclip.bench"


# ------------------------------------------------------------------ the checkout never shadows an installed package
def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(extra)
    return env


def test_no_repo_folder_is_an_installed_top_level_name():
    """Python started in the checkout puts it first on sys.path: a folder there that is a regular package would hide
    every installed distribution of the same top-level name (as kernels/ once hid Hugging Face's `kernels`)."""
    installed = {name for name, dists in packages_distributions().items() if "leanclip" not in dists}
    packages = [d.name for d in REPO.iterdir() if d.is_dir() and (d / "__init__.py").exists()]
    assert not [name for name in packages if name in installed]
    assert not (REPO / "kernels" / "__init__.py").exists()  # its sources live in kernels/src (leanclip.kernels)


PROBE = "import kernels; print(kernels.__file__)"


@pytest.mark.parametrize("launch", ["-c", "-m", "stdin"])
def test_repo_root_imports_the_installed_kernels(tmp_path, launch):
    """From the repository root, `python -c`, `python -m` and a REPL-like `python -` (each puts the root first on
    sys.path) import the `kernels` installed on the path, not the repository's kernels/ folder."""
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("HUB = True\n")
    (site / "probe_kernels.py").write_text(PROBE + "\n")
    cmd = {"-c": [sys.executable, "-c", PROBE], "-m": [sys.executable, "-m", "probe_kernels"],
           "stdin": [sys.executable, "-"]}[launch]
    p = subprocess.run(cmd, cwd=REPO, env=_clean_env(PYTHONPATH=str(site)), input=PROBE if launch == "stdin" else None,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert Path(p.stdout.strip()) == site / "kernels" / "__init__.py"


def test_pytest_session_sees_no_repo_kernels():
    """Under pytest (the repo root on sys.path through pytest.ini) `kernels` is Hugging Face's, or nothing importable
    with an API: never a regular package inside the checkout."""
    spec = importlib.util.find_spec("kernels")
    assert spec is None or spec.origin is None or REPO not in Path(spec.origin).resolve().parents


def test_transformers_hub_kernels_from_repo_root():
    """transformers >= 5.25 imports Hugging Face's `kernels` at `transformers.integrations.hub_kernels`; from the
    repository root that import must find the installed package."""
    pytest.importorskip("transformers")
    if importlib.util.find_spec("transformers.integrations.hub_kernels") is None:
        pytest.skip("this transformers has no hub_kernels integration")
    p = subprocess.run([sys.executable, "-c", "import transformers.integrations.hub_kernels"], cwd=REPO,
                       env=_clean_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
