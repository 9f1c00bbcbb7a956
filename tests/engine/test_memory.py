"""Saved-activation accounting, recompute savings, the saved-bytes estimate and what recompute re-runs."""
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from leanclip import features, lean, lean_ops, methods, saved_bytes
from leanclip.configs import register_reduced_config
from leanclip.memory import peak_cuda_bytes, saved_activation_bytes

CLASSNAMES = ["cat", "dog", "golden retriever", "airbus a320", "red-winged blackbird"]

# The counter sees the attention outputs cached by mlp+qkv's selective checkpoint only through
# checkpoint(respect_saved_tensors_hooks=True). Without that argument (torch 2.11) it undercounts mlp+qkv.
needs_sac_hooks = pytest.mark.skipif(
    not lean.SAC_CACHE_COUNTED,
    reason="torch.utils.checkpoint has no respect_saved_tensors_hooks: saved_activation_bytes cannot see "
           "SAC-cached tensors, so mlp+qkv is undercounted")


# ----------------------------------------------------------------------------------------------------------- counter
def test_counter_dedups_and_skips_parameters():
    w = torch.nn.Parameter(torch.randn(64))
    lin = torch.nn.Linear(64, 64)
    x = torch.randn(32, 64, requires_grad=True)

    def f():
        y = x * x                      # saves x twice: one storage
        z = y * w.expand(1000, 32, 64)  # saves a stride-0 view of a parameter (would be 8 MB) and y
        return lin(z.sum(0))            # saves z.sum(0) (and lin.weight: a parameter)

    out, n = saved_activation_bytes(f, exclude=[w, lin])
    assert out.shape == (32, 64)
    assert n == 3 * 32 * 64 * 4        # x, y, z.sum(0)
    _, n_auto = saved_activation_bytes(f)  # parameters of live modules found automatically
    assert n_auto == n
    with torch.no_grad():
        assert saved_activation_bytes(f)[1] == 0
    with pytest.raises(TypeError):
        saved_activation_bytes(42)
    with pytest.raises(TypeError):
        saved_activation_bytes(f, exclude=["w"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_peak_cuda_bytes_needs_cuda():
    with pytest.raises(RuntimeError, match="CUDA"):
        peak_cuda_bytes(lambda: None)


# ----------------------------------------------------------------------------------------------------------- savings
def _fwd(model, images, tokenizer):
    img = features.image_features(model, images)
    txt = features.text_features(model, CLASSNAMES, ["a photo of a {}."], tokenizer)
    return features.class_logits(model, img, txt).sum()


def _measure(base, method, policies, images, tokenizer):
    out = {}
    m = copy.deepcopy(base)
    methods.prepare(m, method, lean=False)
    out["plain"] = saved_activation_bytes(lambda: _fwd(m, images, tokenizer), exclude=m)[1]
    for p in policies:
        methods.prepare(m, method, recompute=p)
        out[p] = saved_activation_bytes(lambda: _fwd(m, images, tokenizer), exclude=m)[1]
        tl = lean.eot_length(m, tokenizer([f"a photo of a {c}." for c in CLASSNAMES]))
        est = saved_bytes.estimate_saved_bytes(m, p, images.shape[0], text_batch_size=len(CLASSNAMES), text_len=tl)
        assert abs(est - out[p]) <= 0.03 * out[p], (method, p, est, out[p])
    return out


@needs_sac_hooks
def test_recompute_savings_vit_b16_width(tokenizer, create_model):
    """ViT-B-16 widths/heads/patches, 4 blocks per tower, batch 2 (ratios do not depend on depth or batch:
    the full 12-block model at batch 8 gives ln: mlp+qkv 0.24x, block 0.09x of plain)."""
    torch.manual_seed(0)
    base = create_model(register_reduced_config("ViT-B-16", layers=4))
    images = torch.randn(2, 3, 224, 224)
    for method in ("ln", "clipfit"):
        r = _measure(base, method, ("none", "mlp+qkv", "block"), images, tokenizer)
        assert r["none"] < r["plain"]                # EOT truncation of the text tower
        assert r["mlp+qkv"] <= 0.5 * r["plain"], (method, r)
        assert min(r[p] for p in ("mlp+qkv", "block")) <= 0.35 * r["plain"], (method, r)
        assert r["block"] < r["mlp+qkv"] < r["none"]


@needs_sac_hooks
@pytest.mark.parametrize("method", ["ln", "bitfit", "clipfit", "coop", "full", "ln+adapter"])
def test_estimate_matches_counter_tiny(method, fresh_tiny, tokenizer):
    m = fresh_tiny()
    images = torch.randn(3, 3, 32, 32)
    for p in lean.POLICIES:
        methods.prepare(m, method, recompute=p, classnames=CLASSNAMES, tokenizer=tokenizer)
        meas = saved_activation_bytes(lambda: _fwd(m, images, tokenizer), exclude=m)[1]
        tok = (m.prompt_learner.tokens(CLASSNAMES, tokenizer) if hasattr(m, "prompt_learner")
               else tokenizer([f"a photo of a {c}." for c in CLASSNAMES]))
        est = saved_bytes.estimate_saved_bytes(m, p, 3, text_batch_size=len(CLASSNAMES), text_len=lean.eot_length(m, tok))
        assert abs(est - meas) <= 0.06 * meas, (method, p, est, meas)
    methods.prepare(m, method, lean=False, classnames=CLASSNAMES, tokenizer=tokenizer)
    meas = saved_activation_bytes(lambda: _fwd(m, images, tokenizer), exclude=m)[1]
    est = saved_bytes.estimate_saved_bytes(m, "none", 3, text_batch_size=len(CLASSNAMES))  # plain: full 77-token text
    assert abs(est - meas) <= 0.06 * meas, (method, "plain", est, meas)


def test_estimate_bad_input(fresh_tiny):
    m = fresh_tiny()
    methods.prepare(m, "ln")
    with pytest.raises(ValueError, match="unknown recompute policy"):
        saved_bytes.estimate_saved_bytes(m, "auto", 2)
    with pytest.raises(ValueError, match="batch_size"):
        saved_bytes.estimate_saved_bytes(m, "none", -1)
    with pytest.raises(ValueError, match="text_len"):
        saved_bytes.estimate_saved_bytes(m, "none", 2, text_len=0)
    bf = saved_bytes.estimate_saved_bytes(m, "mlp", 2, dtype=torch.bfloat16)
    assert bf < saved_bytes.estimate_saved_bytes(m, "mlp", 2)
    methods.prepare(m, "llu")  # encoders frozen: nothing in the towers is saved
    assert saved_bytes.estimate_saved_bytes(m, "none", 8) == 0


# ----------------------------------------------------------------------------------------------------------- recompute
class _OpCounter(TorchDispatchMode):
    def __init__(self, names):
        super().__init__()
        self.names = names
        self.counts = dict.fromkeys(names, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        for n in self.names:
            if n in name and "backward" not in name:
                self.counts[n] += 1
        return func(*args, **(kwargs or {}))


# per full block; the last block runs at the CLS row only (forward_rows) and is either not recomputed or recomputed
# whole: q, kv, out_proj, c_fc and c_proj (5 linears) and one attention
@pytest.mark.parametrize("policy,sdpa,linears,last", [
    ("none", 0, 0, (0, 0)),
    ("mlp", 0, 1, (0, 0)),        # c_fc only (c_proj stays outside the checkpoint)
    ("mlp+qkv", 0, 2, (1, 5)),    # + in_proj; the attention output is kept (SAC MUST_SAVE), out_proj not re-run
    ("block", 1, 3, (1, 5)),      # everything up to the GELU: in_proj, attention, out_proj, c_fc
])
def test_what_backward_recomputes(policy, sdpa, linears, last, fresh_tiny, monkeypatch):
    # frozen projections through kernels.frozen_linear (on CPU the lean blocks call ATen's GEMM directly): one op
    # name per projection forward, whether it runs in the forward or a recompute
    monkeypatch.setattr(lean_ops, "_aten_path", lambda *a: False)
    m = fresh_tiny()
    methods.prepare(m, "ln", recompute=policy)
    x = torch.randn(2, 3, 32, 32)
    loss = m.encode_image(x).square().sum()
    n_blocks = len(m.visual.transformer.resblocks)
    with _OpCounter(["scaled_dot_product", "frozen_linear_fwd"]) as c:
        loss.backward()
    assert c.counts["scaled_dot_product"] == sdpa * (n_blocks - 1) + last[0], c.counts
    assert c.counts["frozen_linear_fwd"] == linears * (n_blocks - 1) + last[1], c.counts
    assert m.visual.ln_pre.weight.grad is not None
