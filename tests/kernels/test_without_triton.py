"""Triton is optional: with it unimportable, `import leanclip`, the three ops and a lean training step run on the
torch backend, and asking for the triton backend is an error naming it."""
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import sys
    sys.modules["triton"] = None  # any `import triton` now raises ImportError, as in a venv without it
    import torch, open_clip
    import leanclip
    from leanclip import kernels
    from leanclip.configs import register_tiny_config
    assert kernels.available_backends() == ["torch"], kernels.available_backends()
    x = torch.randn(5, 8, requires_grad=True)
    kernels.layer_norm(x, torch.ones(8), torch.zeros(8)).sum().backward()
    kernels.frozen_linear(torch.randn(5, 8), torch.randn(3, 8), torch.zeros(3, requires_grad=True)).sum().backward()
    vals, idx = kernels.max_sim(torch.randn(4, 8), torch.randn(6, 8))
    model = open_clip.create_model(register_tiny_config(), pretrained=None)
    leanclip.prepare(model, "ln", lean=True, recompute="block")
    model.encode_image(torch.randn(2, 3, 32, 32)).sum().backward()
    try:
        with kernels.set_backend("triton"):
            kernels.layer_norm(x, torch.ones(8), torch.zeros(8))
    except RuntimeError as e:
        assert "triton" in str(e), e
    else:
        raise AssertionError("the triton backend ran without triton")
    print("ok", sorted(m for m in sys.modules if m == "triton" or m.startswith("triton.")))
""")


def test_leanclip_runs_without_triton():
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    p = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip().endswith("ok ['triton']"), p.stdout  # only the blocked entry: nothing imported triton
