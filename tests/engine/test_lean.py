"""Lean modules == plain open_clip: outputs and every trainable gradient, for every method and recompute policy;
EOT truncation exactness; dtype semantics."""
import copy

import pytest
import torch
import torch.nn.functional as F

from leanclip import features, kernels, lean, lean_ops, methods
from leanclip.configs import register_reduced_config, register_tiny_config

CLASSNAMES = ["cat", "golden retriever", "airbus a320 aircraft"]
TEMPLATES = ["a photo of a {}.", "a blurry photo of the {}, a type of thing."]

METHOD_CASES = [
    ("ln", {}),
    ("ln", {"tower": "image"}),
    ("ln", {"tower": "text"}),
    ("bitfit", {}),
    ("clipfit", {}),
    ("llu", {}),
    ("linear-probe", {}),
    ("coop", {"n_ctx": 4}),
    ("coop", {"n_ctx": 16}),
    ("adapter", {}),
    ("full", {}),
    ("ln+linear-probe", {}),
    ("ln+coop", {}),
    ("ln+adapter", {}),
]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _prep(model, method, opts, tok, lean_, policy, seed=0):
    torch.manual_seed(seed)
    methods.prepare(model, method, lean=lean_, recompute=policy if lean_ else "none", classnames=CLASSNAMES,
                    tokenizer=tok, **opts)
    torch.manual_seed(seed + 1)
    with torch.no_grad():  # move heads off their special inits so every gradient is informative
        for name in model.leanclip_info["modules"]:
            for p in getattr(model, name).parameters():
                p.add_(0.05 * torch.randn_like(p))
        if hasattr(model, "llu_image"):
            model.llu_image.set_bank(torch.randn(5, model.llu_image.dim))
            model.llu_text.set_bank(torch.randn(4, model.llu_text.dim))
    return model


def _step(model, images, labels, tok, teacher=None):
    img = features.image_features(model, images)
    txt = features.text_features(model, CLASSNAMES, TEMPLATES, tok)
    logits = features.class_logits(model, img, txt)
    loss = F.cross_entropy(logits, labels)
    if teacher is not None:
        loss = loss + features.clipfit_kd_loss(txt, teacher)
    if hasattr(model, "llu_image"):
        loss = loss + 0.1 * (model.llu_image.reg() + model.llu_text.reg())
    loss.backward()
    return logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()
                             if p.requires_grad and p.grad is not None}


def _compare(plain, lean_model, tok, images, labels, tol=1e-5, plain64=None):
    """Logits and every trainable gradient of ``lean_model`` equal ``plain``'s to fp32 rounding: relative error
    <= tol, or - where a gradient is itself so cancellation-prone that two fp32 runs differ by more - no farther
    from a float64 run of the plain model (``plain64()``) than plain fp32 is."""
    teacher = None
    if plain.leanclip_info["method"] == "clipfit":
        teacher = features.frozen_text_features(plain, CLASSNAMES, TEMPLATES, tok)
    la, ga = _step(plain, images, labels, tok, teacher)
    lb, gb = _step(lean_model, images, labels, tok, teacher)
    assert _rel(lb, la) <= tol, _rel(lb, la)
    trainable = {n for n, p in plain.named_parameters() if p.requires_grad}
    assert set(ga) == set(gb)
    assert ga, "no gradients at all"
    bad = [n for n in ga if not _rel(gb[n], ga[n]) <= tol]
    if bad:
        assert plain64 is not None, [(n, _rel(gb[n], ga[n])) for n in bad]
        m64 = plain64()
        t64 = None if teacher is None else features.frozen_text_features(m64, CLASSNAMES, TEMPLATES, tok)
        _, g64 = _step(m64, images.double(), labels, tok, t64)
        for n in bad:
            e_plain, e_lean = _rel(ga[n], g64[n]), _rel(gb[n], g64[n])
            assert e_lean <= 2 * e_plain + 1e-6, (n, _rel(gb[n], ga[n]), e_plain, e_lean)
    return trainable, ga


@pytest.mark.parametrize("method,opts", METHOD_CASES, ids=[m + ("-" + "-".join(f"{k}{v}" for k, v in o.items())
                                                                  if o else "") for m, o in METHOD_CASES])
@pytest.mark.parametrize("policy", lean.POLICIES)
def test_lean_equals_plain(method, opts, policy, fresh_tiny, tokenizer):
    torch.manual_seed(123)
    images = torch.randn(3, 3, 32, 32)
    labels = torch.tensor([0, 2, 1])
    plain = _prep(fresh_tiny(), method, opts, tokenizer, False, "none")
    leanm = _prep(fresh_tiny(), method, opts, tokenizer, True, policy)
    assert lean.is_lean(leanm) and not lean.is_lean(plain)
    trainable, grads = _compare(plain, leanm, tokenizer, images, labels)
    # every trainable parameter that can influence the loss got a gradient
    if method in ("ln", "bitfit", "clipfit", "full") and opts.get("tower", "both") == "both":
        assert set(grads) == trainable - ({"logit_scale"} if method != "full" else set())


def test_lean_equals_plain_layerscale_quickgelu(tokenizer, create_model):
    name = register_tiny_config("leanclip-tiny-ls", quick_gelu=True, vision_cfg={"ls_init_value": 0.5},
                                text_cfg={"ls_init_value": 0.5})
    torch.manual_seed(0)
    base = create_model(name)
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([1, 0])
    for method in ("ln", "full"):
        for policy in lean.POLICIES:
            plain = _prep(copy.deepcopy(base), method, {}, tokenizer, False, "none")
            leanm = _prep(copy.deepcopy(base), method, {}, tokenizer, True, policy)
            _compare(plain, leanm, tokenizer, images, labels)


def test_lean_equals_plain_reduced_vit_b16(tokenizer, create_model):
    """Real ViT-B-16 widths (768/512, 12/8 heads, 224px, patch 16) with 2 blocks per tower."""
    name = register_reduced_config("ViT-B-16", layers=2)
    torch.manual_seed(0)
    base = create_model(name)
    images, labels = torch.randn(2, 3, 224, 224), torch.tensor([2, 0])
    for method, policy in (("ln", "mlp+qkv"), ("clipfit", "none"), ("bitfit", "block")):
        plain = _prep(copy.deepcopy(base), method, {}, tokenizer, False, "none")
        leanm = _prep(copy.deepcopy(base), method, {}, tokenizer, True, policy)
        _compare(plain, leanm, tokenizer, images, labels,
                 plain64=lambda: _prep(copy.deepcopy(base).double(), method, {}, tokenizer, False, "none"))


def test_swap_keeps_names_and_is_reversible(fresh_tiny):
    m = fresh_tiny()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    classes = {n: type(x) for n, x in m.named_modules()}
    lean.apply_lean(m, "mlp")
    assert list(m.state_dict()) == list(before)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in before.items())
    assert type(m.visual.transformer.resblocks[0]) is lean.LeanResidualAttentionBlock
    assert type(m.ln_final) is lean.LeanLayerNorm
    assert m.transformer.resblocks[1].leanclip_recompute == "mlp"
    copy.deepcopy(m)  # deep-copyable
    lean.remove_lean(m)
    assert {n: type(x) for n, x in m.named_modules()} == classes
    assert not hasattr(m.transformer.resblocks[0], "leanclip_recompute") or \
        "leanclip_recompute" not in m.transformer.resblocks[0].__dict__


class _ForeignAttention(torch.nn.Module):
    """Like the attention a newer open_clip puts in ResidualAttentionBlock: not an nn.MultiheadAttention (same
    parameters and call, so open_clip's own forward still runs)."""

    def __init__(self, mha):
        super().__init__()
        self.mha = mha
        self.batch_first = mha.batch_first

    def forward(self, q, k, v, need_weights=False, attn_mask=None):
        return self.mha(q, k, v, need_weights=need_weights, attn_mask=attn_mask)


@pytest.mark.parametrize("where", ["visual.transformer.resblocks.1", "transformer.resblocks.0"])
def test_unknown_attention_is_never_a_silent_no_op(fresh_tiny, tokenizer, where):
    m = fresh_tiny()
    blk = m.get_submodule(where)
    blk.attn = _ForeignAttention(blk.attn)
    classes = {n: type(x) for n, x in m.named_modules()}
    tower = "image" if where.startswith("visual") else "text"
    with pytest.raises(ValueError, match=rf"{tower} tower block \d is open_clip.transformer.ResidualAttentionBlock "
                                         rf"with attn .*_ForeignAttention"):
        lean.apply_lean(m)
    assert {n: type(x) for n, x in m.named_modules()} == classes  # checked before anything was swapped
    with pytest.raises(ValueError, match="lean=True.*_ForeignAttention"):
        methods.prepare(m, "ln", lean=True)
    assert {n: type(x) for n, x in m.named_modules()} == classes
    other = "text" if tower == "image" else "image"
    with pytest.warns(UserWarning, match=rf"leanclip: lean on the {other} tower only: .*_ForeignAttention"):
        methods.prepare(m, "ln")  # automatic: the other tower goes lean, and a notice names what stays plain
    assert lean.is_lean(m) and m.leanclip_info["options"]["lean_towers"] == [other]
    own = "visual." if tower == "image" else ("transformer.", "ln_final")  # this tower keeps open_clip's modules
    assert all(type(x) is classes[n] for n, x in m.named_modules() if n.startswith(own))
    assert all(type(x) is not classes[n] for n, x in m.named_modules() if n == (
        "transformer.resblocks.0" if tower == "image" else "visual.transformer.resblocks.0"))
    features.text_features(m, CLASSNAMES, None, tokenizer).sum().backward()
    assert m.ln_final.weight.grad is not None


def test_apply_lean_on_parts(fresh_tiny):
    m = fresh_tiny()
    blk = m.transformer.resblocks[0]
    blk.attn = _ForeignAttention(blk.attn)
    with pytest.raises(ValueError, match="ResidualAttentionBlock with attn .*_ForeignAttention"):
        lean.apply_lean(blk)
    with pytest.raises(ValueError, match=r"Transformer <root> block 0 is .*_ForeignAttention"):
        lean.apply_lean(m.transformer)
    with pytest.raises(ValueError, match="found nothing to make lean in torch.nn.modules.linear.Linear"):
        lean.apply_lean(torch.nn.Linear(2, 2))
    lean.apply_lean(m.visual)  # a supported tower on its own
    assert type(m.visual) is lean.LeanVisionTransformer and lean.lean_obstacles(m.visual) == []
    # a prepared lean model is covered (lean blocks count as known blocks)
    m2 = fresh_tiny()
    methods.prepare(m2, "ln")
    assert lean.lean_obstacles(m2) == [] and lean.is_lean(m2)


def test_open_clip_encode_text_on_lean_model(fresh_tiny, tokenizer):
    """open_clip's own encode_text (full 77-token mask) still works on a lean model (causal mask detected)."""
    plain, m = fresh_tiny(), fresh_tiny()
    lean.apply_lean(m)
    tok = tokenizer(["a photo of a dog.", "x"])
    with torch.no_grad():
        assert _rel(m.encode_text(tok), plain.encode_text(tok)) < 1e-5
        img = torch.randn(2, 3, 32, 32)
        assert _rel(m.encode_image(img), plain.encode_image(img)) < 1e-5


def test_non_causal_and_bool_masks():
    torch.manual_seed(0)
    from open_clip.transformer import ResidualAttentionBlock

    blk = ResidualAttentionBlock(32, 4)
    lblk = copy.deepcopy(blk)
    lean.apply_lean(lblk)
    x = torch.randn(2, 6, 32)
    bool_mask = torch.rand(6, 6) > 0.7
    bool_mask.fill_diagonal_(False)
    float_mask = torch.zeros(6, 6).masked_fill_(bool_mask, float("-inf"))
    causal = torch.full((6, 6), float("-inf")).triu_(1)
    with torch.no_grad():
        for mask in (None, float_mask, bool_mask, causal):
            assert _rel(lblk(x, attn_mask=mask), blk(x, attn_mask=mask)) < 1e-5
    assert lean_ops.is_causal_mask(causal, 6) and lean_ops.is_causal_mask(causal, 3)
    assert not lean_ops.is_causal_mask(float_mask, 6)
    assert not lean_ops.is_causal_mask(torch.ones(6, 6, dtype=torch.bool).triu_(1), 6)  # open_clip: additive 0/1


def test_batch_first_false_block():
    torch.manual_seed(0)
    from open_clip.transformer import ResidualAttentionBlock

    blk = ResidualAttentionBlock(32, 4, batch_first=False)
    lblk = copy.deepcopy(blk)
    lean.apply_lean(lblk)
    x = torch.randn(5, 2, 32)  # (L, N, D)
    with torch.no_grad():
        assert _rel(lblk(x), blk(x)) < 1e-5


@pytest.mark.parametrize("policy", lean.POLICIES)
def test_forward_rows_equals_full_block_rows(policy):
    """The last block at the pooled rows only: output and gradients (x, LN and bias params) == full block rows."""
    torch.manual_seed(0)
    from open_clip.transformer import ResidualAttentionBlock

    blk = ResidualAttentionBlock(32, 4, ls_init_value=0.5)
    lblk = copy.deepcopy(blk)
    lean.apply_lean(lblk, policy)
    for b in (blk, lblk):
        for n, p in b.named_parameters():
            p.requires_grad_(n.startswith("ln_") or n.endswith("bias"))
    L = 7
    bool_mask = torch.rand(L, L) > 0.7
    bool_mask.fill_diagonal_(False)
    masks = {"none": None, "causal": torch.full((L, L), float("-inf")).triu_(1),
             "float": torch.zeros(L, L).masked_fill_(bool_mask, float("-inf")),
             "3d": torch.randn(3 * 4, L, L)}
    rows = torch.tensor([0, 4, 6])
    for name, mask in masks.items():
        x0 = torch.randn(3, L, 32, dtype=torch.float64).float()
        x, lx = x0.clone().requires_grad_(), x0.clone().requires_grad_()
        ref = blk(x, attn_mask=mask)[torch.arange(3), rows]
        out = lblk.forward_rows(lx, rows, attn_mask=mask)
        assert out.shape == (3, 32) and _rel(out, ref) < 1e-5, name
        g = torch.randn_like(ref)
        (ref * g).sum().backward()
        (out * g).sum().backward()
        assert _rel(lx.grad, x.grad) < 1e-5, name
        for (n, p), q in zip(blk.named_parameters(), lblk.parameters()):
            if p.requires_grad:
                assert _rel(q.grad, p.grad) < 1e-5, (name, n)
                p.grad = q.grad = None
    with torch.no_grad():  # default row: the CLS token
        x = torch.randn(2, L, 32)
        assert _rel(lblk.forward_rows(x), blk(x)[:, 0]) < 1e-5


def test_vision_rows_only_when_cls_is_all_that_is_read(fresh_tiny):
    m = fresh_tiny()
    lean.apply_lean(m)
    vis = m.visual
    assert type(vis) is lean.LeanVisionTransformer
    img = torch.randn(2, 3, 32, 32)
    calls = []
    last = vis.transformer.resblocks[-1]
    last.forward_rows = lambda *a, **k: calls.append(1) or type(last).forward_rows(last, *a, **k)
    with torch.no_grad():
        ref = m.encode_image(img)
        assert calls == [1]
        vis.pool_type = "avg"  # every token is read: open_clip's own forward
        avg = m.encode_image(img)
        assert calls == [1] and not torch.allclose(avg, ref)
        vis.pool_type, vis.output_tokens = "tok", True
        pooled, tokens = m.encode_image(img)
        assert calls == [1] and tokens.shape[1] == vis.grid_size[0] * vis.grid_size[1]
        assert _rel(pooled, ref) < 1e-5


# ----------------------------------------------------------------------------------------------------------- EOT
def test_eot_truncation_is_exact(fresh_tiny, tokenizer):
    for make_lean in (False, True):
        m = fresh_tiny()
        methods.prepare(m, "ln", lean=make_lean)
        tok = tokenizer(["a photo of a dog.", "a cat", "an extremely long and detailed description of a small bird"])
        n = lean.eot_length(m, tok)
        assert n == int(tok.argmax(-1).max()) + 1 < 77
        full = m.encode_text(tok)                       # open_clip, full 77-token context
        trunc = lean.encode_text_lean(m, tok)
        assert _rel(trunc, full) < 1e-6
        # gradients too
        g1 = torch.autograd.grad(full.square().sum(), m.ln_final.weight)[0]
        g2 = torch.autograd.grad(lean.encode_text_lean(m, tok).square().sum(), m.ln_final.weight)[0]
        assert _rel(g2, g1) < 1e-5


def test_eot_truncation_fallbacks(fresh_tiny, tokenizer):
    m = fresh_tiny()
    tok = tokenizer(["a dog"])
    m.text_pool_type = "last"       # reads the last position: no truncation possible
    assert lean.eot_length(m, tok) == 77
    m.text_pool_type = "argmax"
    m.attn_mask = None              # bidirectional: no truncation
    assert lean.eot_length(m, tok) == 77
    with pytest.raises(ValueError, match="tokens"):
        lean.encode_text_lean(m, tok[0])


def test_prompt_embeddings_path_matches_tokens(fresh_tiny, tokenizer):
    m = fresh_tiny()
    lean.apply_lean(m)
    tok = tokenizer(["a photo of a dog.", "a cat"])
    emb = m.token_embedding(tok)
    with torch.no_grad():
        assert _rel(lean.encode_text_lean(m, tok, prompt_embeddings=emb), m.encode_text(tok)) < 1e-6
    with pytest.raises(ValueError, match="prompt_embeddings"):
        lean.encode_text_lean(m, tok, prompt_embeddings=emb[:, :10])


# ----------------------------------------------------------------------------------------------------------- dtypes
def test_layernorm_dtype_semantics():
    from open_clip.transformer import LayerNorm, LayerNormFp32

    x = torch.randn(4, 8, dtype=torch.bfloat16)
    for cls in (LayerNorm, LayerNormFp32):
        ref = cls(8)
        m = copy.deepcopy(ref)
        lean.apply_lean(m)
        assert type(m) is not cls
        y, r = m(x), ref(x)
        assert y.dtype == r.dtype == torch.bfloat16
        assert _rel(y.float(), r.float()) < 1e-2
    # fp32 LayerNorm weight with a bf16 input: the kernel takes mixed precision directly
    ln = LayerNorm(8)
    lean.apply_lean(ln)
    assert ln(x).dtype == torch.bfloat16


def test_frozen_bf16_weights(fresh_tiny, tokenizer):
    """prepare(frozen_dtype=bf16): frozen tower weights bf16, trainable fp32; runs and matches fp32 loosely."""
    images, labels = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2])
    for method in ("ln", "bitfit", "clipfit", "coop"):
        ref = _prep(fresh_tiny(), method, {}, tokenizer, True, "none")
        m = fresh_tiny()
        torch.manual_seed(0)
        methods.prepare(m, method, frozen_dtype=torch.bfloat16, recompute="mlp+qkv", classnames=CLASSNAMES,
                        tokenizer=tokenizer)
        torch.manual_seed(1)
        with torch.no_grad():
            for name in m.leanclip_info["modules"]:
                for p in getattr(m, name).parameters():
                    p.add_(0.05 * torch.randn_like(p))
        for n, p in m.named_parameters():
            if p.requires_grad:
                assert p.dtype == torch.float32, n
            elif methods.tower_of(n) is not None:
                assert p.dtype == torch.bfloat16, n
        assert m.logit_scale.dtype == torch.float32
        la, ga = _step(ref, images, labels, tokenizer)
        lb, gb = _step(m, images, labels, tokenizer)
        assert lb.dtype == torch.float32
        assert _rel(lb, la) < 5e-2
        for n in ga:
            assert gb[n].dtype == torch.float32
            assert _rel(gb[n], ga[n]) < 0.1, (method, n, _rel(gb[n], ga[n]))


@pytest.mark.parametrize("autocast", [False, True])
def test_recompute_is_exact(fresh_tiny, tokenizer, autocast):
    """Every recompute policy reproduces the lean 'none' run bit for bit (fp32 and bf16 autocast)."""
    images, labels = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2])
    ref = None
    for policy in lean.POLICIES:
        m = _prep(fresh_tiny(), "ln+coop", {}, tokenizer, True, policy)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits, grads = _step(m, images, labels, tokenizer)
        if ref is None:
            ref = (logits, grads)
            continue
        assert torch.equal(logits, ref[0])
        assert grads.keys() == ref[1].keys()
        assert all(torch.equal(grads[n], ref[1][n]) for n in grads), policy


@pytest.mark.skipif("triton" not in kernels.available_backends(), reason="needs triton")
def test_lean_block_on_triton_kernels():
    """One small lean block through the real Triton kernels (interpreter on CPU): mixed trainable params, SAC."""
    from open_clip.transformer import ResidualAttentionBlock

    from leanclip import kernels

    torch.manual_seed(0)
    blk = ResidualAttentionBlock(32, 2)
    for p in blk.parameters():
        p.requires_grad_(False)
    for p in (blk.ln_1.weight, blk.ln_2.bias, blk.mlp.c_fc.bias, blk.attn.in_proj_bias):
        p.requires_grad_(True)
    lblk = copy.deepcopy(blk)
    lean.apply_lean(lblk, "mlp+qkv")
    x = torch.randn(2, 5, 32, requires_grad=True)
    causal = torch.full((5, 5), float("-inf")).triu_(1)
    with kernels.set_backend("triton"):
        y = lblk(x, attn_mask=causal)
        y.square().sum().backward()
    got = [p.grad for p in lblk.parameters() if p.requires_grad] + [x.grad.clone()]
    x.grad = None
    ref_y = blk(x, attn_mask=causal)
    ref_y.square().sum().backward()
    ref = [p.grad for p in blk.parameters() if p.requires_grad] + [x.grad]
    assert _rel(y, ref_y) < 1e-5
    for a, b in zip(got, ref):
        assert _rel(a, b) < 1e-5


def test_cpu_lean_blocks_call_aten_where_kernels_would_run_its_torch_backend(fresh_tiny, tokenizer, monkeypatch):
    """On CPU tensors kernels' torch backend runs ATen's LayerNorm and GEMM: the lean modules call them directly
    (the same math without a custom op's per-call cost); a backend that is not torch keeps the kernels path."""
    from leanclip import kernels

    calls = []
    for name in ("layer_norm", "frozen_linear"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    m = _prep(fresh_tiny(), "ln", {}, tokenizer, True, "none")
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    _step(m, images, labels, tokenizer)
    assert calls == []
    monkeypatch.setattr(lean_ops, "_resolve_backend", lambda op, device, dtype=None: "triton")
    assert lean_ops._aten_path(torch.ones(2, 3)) is False
    assert lean_ops._aten_path(torch.ones(2, 3, dtype=torch.bfloat16)) is False
