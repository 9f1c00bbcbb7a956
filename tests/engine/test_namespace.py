"""One import namespace: `leanclip` and its subpackages only, never the repository's folder names, so it works beside
Hugging Face's `kernels` distribution and in a folder that holds a user's own `engine.py`."""
import os
import subprocess
import sys
import textwrap

import leanclip

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
