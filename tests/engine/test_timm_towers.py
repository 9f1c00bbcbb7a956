"""open_clip models whose image tower is a timm trunk (SigLIP / SigLIP2, EVA02, PE-Core): the lean engine and every
method on them. Tiny configs built from the released timm model functions (``leanclip.configs.register_tiny_timm_config``:
width 64, 2 blocks, 32 px; rotary embeddings, SwiGLU, sub-LN, fused / separate qkv, q/k norm, LayerScale and MAP
pooling kept), random weights, offline. Prepared equals plain (features and gradients, fp32 to 1e-5) for every family x
method x recompute policy; LoRA's gradients equal those of the merged plain model's weights; merge is exact; towers
without transformer blocks (ConvNeXt) and unknown block classes are named in one line."""
import copy
import warnings

import pytest
import torch

timm = pytest.importorskip("timm")

from leanclip import lean, methods, saved_bytes  # noqa: E402
from leanclip.methods import lora
from leanclip.configs import create_random_model, register_tiny_timm_config  # noqa: E402
from leanclip.models import timm as timm_family  # noqa: E402
from tests.engine.peft_checks import features, prepare_with_notices, projection_loss, randomize_trainable  # noqa: E402

FAMILIES = ["vit-map", "vit-qknorm", "eva02", "eva02-fused", "pe-core", "eva-postnorm"]
POLICIES = [("none", None), ("mlp", None), ("mlp+qkv", None), ("block", None), ("block", 2)]
METHODS = ["ln", "bitfit", "clipfit", "houlsby", "compacter", "full"]
LILT = ["lilt-ln", "lilt-bitfit", "lilt-adapter", "lilt-deep", "lit"]
TOL = {"atol": 1e-5, "rtol": 1e-5}
_BASES: dict = {}


def base(family: str):
    if family not in _BASES:
        _BASES[family] = create_random_model(register_tiny_timm_config(family), seed=0)
    return copy.deepcopy(_BASES[family])


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 1000, (3, 24), generator=g)
    for i, eot in enumerate((5, 23, 11)):  # EOT (the largest id) at different positions
        tokens[i, eot] = 49407
        tokens[i, eot + 1:] = 0
    return torch.randn(3, 3, 32, 32, generator=g), tokens


def _loss_and_grads(model, batch, plain: bool):
    randomize_trainable(model)
    img, txt = features(model.train(), *batch, plain=plain)
    projection_loss(img, txt).backward()
    return (img.detach(), txt.detach()), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(got, ref):
    (feats, grads), (ref_feats, ref_grads) = got, ref
    for a, b in zip(feats, ref_feats):
        torch.testing.assert_close(a, b, **TOL)
    assert grads.keys() == ref_grads.keys()
    assert any(g is not None for g in grads.values())
    for n, g in grads.items():
        if ref_grads[n] is None:  # a parameter no feature depends on (e.g. the unused classifier bias)
            assert g is None, n
        else:
            torch.testing.assert_close(g, ref_grads[n], **TOL, msg=n)


# ----------------------------------------------------------------------------------------------------------- lean
@pytest.mark.parametrize("family", FAMILIES)
def test_both_towers_go_lean(family):
    m = base(family)
    assert prepare_with_notices(m, "ln") == []
    assert m.leanclip_info["options"]["lean"] is True and "lean_towers" not in m.leanclip_info["options"]
    blocks = m.visual.trunk.blocks
    lean_class = "LeanEvaPostNormBlock" if "postnorm" in family else (
        "LeanEvaBlock" if "eva" in family or "pe" in family else "LeanTimmBlock")
    assert {type(b).__name__ for b in blocks} == {lean_class}
    assert {type(b).__name__ for b in m.text.transformer.resblocks} == {"LeanResidualAttentionBlock"}
    assert type(blocks[0].norm1) is timm_family.LeanTimmLayerNorm
    lean.remove_lean(m)
    assert not lean.is_lean(m) and type(blocks[0].norm1) is timm.layers.LayerNorm


@pytest.mark.parametrize("policy,chunk", POLICIES, ids=[f"{p}{'/' + str(c) if c else ''}" for p, c in POLICIES])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_prepared_equals_plain(family, method, policy, chunk, batch):
    """The lean model under ``policy`` and the timm / open_clip plain modules give the same features and the same
    gradient to every trainable parameter."""
    ref = _loss_and_grads(methods.prepare(base(family), method, lean=False), batch, plain=True)
    m = methods.prepare(base(family), method, recompute=policy, recompute_chunk=chunk)
    assert lean.is_lean(m)
    _assert_same(_loss_and_grads(m, batch, plain=False), ref)


@pytest.mark.parametrize("method", LILT)
@pytest.mark.parametrize("family", ["eva02", "pe-core", "eva-postnorm"])
def test_lilt_methods_equal_plain(family, method, batch):
    ref = _loss_and_grads(methods.prepare(base(family), method, lean=False), batch, plain=True)
    m = methods.prepare(base(family), method, recompute="block", recompute_chunk=2)
    _assert_same(_loss_and_grads(m, batch, plain=False), ref)
    if method == "lilt-deep":  # a copy of the last timm block, made the identity: zero attn.proj / mlp.fc2 (pre-LN)
        assert [n for n, _ in methods.lilt.deep_blocks(m)][0] == "visual.trunk.blocks.2"  # or zero norms (post-norm)
        for init in ("copy", "random"):
            fresh = methods.prepare(base(family), method, recompute="block", deep_init=init)
            with torch.no_grad():
                torch.testing.assert_close(fresh.eval().encode_image(batch[0]),
                                           base(family).eval().encode_image(batch[0]), rtol=0, atol=0)
    if method == "lilt-adapter":  # before the pre-norms of each block only (not EVA's sub-LNs)
        assert {n.split(".adapter")[0] for n, _ in methods.lilt.adapters(m) if n.startswith("visual.")} == {
            f"visual.trunk.blocks.{i}.norm{j}" for i in range(2) for j in (1, 2)}


def _blocks_run(blocks, x0, seed: int = 5):
    """Output and input / trainable gradients of ``blocks`` run in sequence in training mode, dropout from ``seed``."""
    blocks.train()
    x = x0.clone().requires_grad_(True)
    torch.manual_seed(seed)
    y = x
    for b in blocks:
        y = b(y)
    y.sin().sum().backward()
    return y.detach(), [x.grad] + [p.grad for p in blocks.parameters() if p.requires_grad]


@pytest.mark.parametrize("policy", ["mlp", "mlp+qkv", "block"])
@pytest.mark.parametrize("base_model,lean_class", [("eva02_base_patch16_clip_224", "LeanEvaBlock"),
                                                   ("eva02_enormous_patch14_clip_224", "LeanEvaPostNormBlock")])
def test_dropout_and_drop_path_are_replayed(base_model, lean_class, policy):
    """With attention / projection dropout and stochastic depth, a recomputed branch draws the masks of the forward
    (fp64, exact): the lean blocks equal timm's under every unchunked policy, the MLP checkpoint included."""
    torch.manual_seed(0)
    net = timm.create_model(base_model, pretrained=False, img_size=32, patch_size=8, embed_dim=64, depth=2,
                            num_heads=2, drop_path_rate=0.3, proj_drop_rate=0.1, attn_drop_rate=0.1,
                            **({"ref_feat_shape": (4, 4)} if "base" in base_model else {})).double()
    x0 = torch.randn(3, 17, 64, dtype=torch.float64)
    ref = _blocks_run(copy.deepcopy(net.blocks), x0)
    blocks = copy.deepcopy(net.blocks)
    for b in blocks:
        b.__class__ = getattr(timm_family, lean_class)
        b.leanclip_recompute = policy
    got = _blocks_run(blocks, x0)
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=1e-12)
    for a, b in zip(got[1], ref[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def _post_norm_model():
    """The tiny EVA02-E model with non-zero norm biases, as trained weights have (timm initialises them to zero)."""
    m = base("eva-postnorm")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for blk in m.visual.trunk.blocks:
            for norm in (blk.norm1, blk.norm2):
                norm.bias.copy_(0.1 * torch.randn(norm.bias.shape, generator=g))
    return m


@pytest.mark.parametrize("init", ["copy", "random"])
def test_post_norm_deep_block_starts_as_the_identity_and_learns(init, batch):
    """lilt-deep on a post-norm trunk (EVA02-E): the appended block's norms are zero, so it adds exactly zero;
    zero projections would not do (each branch ends in its LayerNorm, whose output at zero is its bias). At the
    first step the zero norms get a gradient."""
    m = methods.prepare(_post_norm_model(), "lilt-deep", tower="image", recompute="mlp", deep_init=init)
    (_, blk), = methods.lilt.deep_blocks(m)
    assert type(blk).__name__ == "LeanEvaPostNormBlock" and blk.attn.proj.weight.abs().sum() > 0
    assert all(p.abs().sum() == 0 for n in (blk.norm1, blk.norm2) for p in n.parameters())
    with torch.no_grad():
        torch.testing.assert_close(m.eval().encode_image(batch[0]), _post_norm_model().eval().encode_image(batch[0]),
                                   rtol=0, atol=0)
    img = m.train().encode_image(batch[0], normalize=True)
    projection_loss(img, torch.zeros(1, img.shape[1])).backward()
    assert all(n.weight.grad.abs().sum() > 0 for n in (blk.norm1, blk.norm2))
    zero_proj = copy.deepcopy(_post_norm_model().visual.trunk.blocks[-1])
    for lin in (zero_proj.attn.proj, zero_proj.mlp.fc2):
        torch.nn.init.zeros_(lin.weight)
        torch.nn.init.zeros_(lin.bias)
    with torch.no_grad():
        x = torch.randn(2, 5, 64)
        assert not torch.allclose(zero_proj(x), x)


@pytest.mark.parametrize("family", ["vit-map", "eva02"])
def test_llu_on_frozen_timm_towers(family, batch):
    """LLU trains maps on the frozen towers' features: the lean towers give the plain ones."""
    m = methods.prepare(base(family), "llu")
    assert lean.is_lean(m) and {n.split(".")[0] for n, _ in methods.trainable_parameters(m)} == {"llu_image",
                                                                                                "llu_text"}
    with torch.no_grad():
        for a, b in zip(features(m.eval(), *batch), features(base(family).eval(), *batch, plain=True)):
            torch.testing.assert_close(a, b, **TOL)


def test_lilt_names_a_missing_projection():
    """SigLIP's image tower has no projection of its own (timm_proj none): LilT says to pass projections=False."""
    with pytest.raises(ValueError, match="image tower open_clip.timm_model.TimmModel has none.*projections=False"):
        methods.prepare(base("vit-map"), "lilt-ln")
    prepare_with_notices(base("vit-map"), "lilt-ln", projections=False)


def test_coop_on_a_timm_model():
    import open_clip

    name = register_tiny_timm_config("eva02")
    m = base("eva02")
    prepare_with_notices(m, "coop", classnames=["cat", "dog"], tokenizer=open_clip.get_tokenizer(name))
    assert lean.is_lean(m) and [n for n, _ in methods.trainable_parameters(m)] == ["prompt_learner.ctx"]


def test_clipfit_parts():
    names = {n for n, _ in methods.trainable_parameters(methods.prepare(base("eva02"), "clipfit"))}
    assert "text.transformer.resblocks.1.mlp.c_proj.bias" in names
    assert {"visual.trunk.blocks.0.norm1.weight", "visual.trunk.blocks.0.attn.norm.bias",
            "visual.trunk.blocks.1.mlp.norm.weight", "visual.trunk.norm.weight"} <= names
    assert not any(n.startswith("visual.") and "norm" not in n for n in names)


def test_bitfit_reaches_eva_fused_qkv_bias():
    names = {n for n, _ in methods.trainable_parameters(methods.prepare(base("eva02-fused"), "bitfit"))}
    assert {"visual.trunk.blocks.0.attn.q_bias", "visual.trunk.blocks.0.attn.v_bias"} <= names


# ----------------------------------------------------------------------------------------------------------- LoRA
def _weight_grads(model):
    """A copy of ``model`` whose parameters hold their gradients (so ``lora.projection_slices`` slices gradients)."""
    g = copy.deepcopy(model)
    for p, q in zip(model.parameters(), g.parameters()):
        q.data = p.grad if p.grad is not None else torch.zeros_like(p)
    return g


@pytest.mark.parametrize("policy,chunk", POLICIES, ids=[f"{p}{'/' + str(c) if c else ''}" for p, c in POLICIES])
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_gradients_are_those_of_the_merged_weights(family, policy, chunk, batch):
    """With W' = W + s B A, dL/dB = s G A^T and dL/dA = s B^T G for G = dL/dW' of the merged plain model: LoRA's
    gradients under every policy against plain autograd on the merged model (every target; q/k/v of a fused qkv are
    its row thirds, SwiGLU's fc the fc1_g | fc1_x pair)."""
    m = methods.prepare(base(family), "lora", targets="q,k,v,out,fc,proj", dropout=0.0, recompute=policy,
                        recompute_chunk=chunk)
    (feats, grads) = _loss_and_grads(m, batch, plain=False)
    merged = lora.merge(m)
    merged.requires_grad_(True)
    merged_feats = features(merged.train(), *batch, plain=True)
    for a, b in zip(merged_feats, feats):
        torch.testing.assert_close(a, b, **TOL)
    projection_loss(*merged_feats).backward()
    held = _weight_grads(merged)
    checked = 0
    for name, mod in lora.lora_modules(m):
        blk = held.get_submodule(name.rsplit(".", 1)[0])
        for t in mod.targets:
            g = torch.cat([w[:, :] for w, _, _ in lora.projection_slices(blk)[t]], dim=0)
            pair = mod._modules[t]
            torch.testing.assert_close(grads[f"{name}.{t}.B"], mod.scaling * g @ pair.A.detach().t(), **TOL)
            torch.testing.assert_close(grads[f"{name}.{t}.A"], mod.scaling * pair.B.detach().t() @ g, **TOL)
            checked += 1
    assert checked == 6 * 4  # six targets, two blocks per tower


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_is_exact(family, batch):
    m = methods.prepare(base(family), "lora", targets="q,k,v,out,fc,proj")
    randomize_trainable(m)
    merged = lora.merge(m)
    assert not lean.is_lean(merged) and not lora.lora_modules(merged)
    with torch.no_grad():
        for a, b in zip(features(m.eval(), *batch), features(merged.eval(), *batch, plain=True)):
            torch.testing.assert_close(a, b, **TOL)


def _image_grads(model, images, seed: int = 3):
    """Image features and the trainable gradients of one training-mode forward, dropout drawn from ``seed``."""
    torch.manual_seed(seed)
    img = model.train().encode_image(images, normalize=True)
    projection_loss(img, torch.zeros(1, img.shape[1])).backward()
    return img.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_lora_equals_lean_lora(family, batch):
    """``lean=False`` LoRA on a timm tower: the tower's own blocks add the pairs' terms through forward hooks on
    their projections (``leanclip.delta_hooks``) and compute exactly what the lean blocks do, dropout masks included
    (drawn in the same order), with timm's own gradient checkpointing and after a deepcopy."""
    kw = dict(tower="image", targets="q,k,v,out,fc,proj", dropout=0.25)
    ref = methods.prepare(base(family), "lora", **kw)
    randomize_trainable(ref)
    plain = methods.prepare(base(family), "lora", lean=False, **kw)
    plain.load_state_dict(ref.state_dict())
    assert not lean.is_lean(plain)
    want = _image_grads(ref, batch[0])
    _assert_same(_image_grads(plain, batch[0]), want)
    gc = copy.deepcopy(plain)
    gc.zero_grad(set_to_none=True)
    gc.set_grad_checkpointing(True)
    _assert_same(_image_grads(gc, batch[0]), want)


def test_plain_lora_hooks_follow_the_pairs(batch):
    """Stripping the pairs leaves the tower computing what it did before LoRA; merging gives hooks-free plain
    blocks with the same outputs; making the model lean moves the terms into the lean blocks (no hook left, no term
    added twice)."""
    from leanclip import delta_hooks
    from leanclip.lifecycle import strip

    def hooks(model):
        return sum(isinstance(h, delta_hooks.DeltaHook) for m in model.modules() for h in m._forward_hooks.values())

    before = base("eva02-fused").eval()
    m = methods.prepare(base("eva02-fused"), "lora", tower="image", lean=False).eval()
    randomize_trainable(m)
    assert hooks(m) == 2 * 4  # qkv, proj, fc1, fc2 of each block
    with torch.no_grad():
        want = m.encode_image(batch[0])
        merged = lora.merge(m)
        assert hooks(merged) == 0
        torch.testing.assert_close(merged.encode_image(batch[0]), want, **TOL)
        lean.apply_lean(m)
        assert hooks(m) == 0
        torch.testing.assert_close(m.encode_image(batch[0]), want, **TOL)
        lean.remove_lean(m)
        torch.testing.assert_close(m.encode_image(batch[0]), want, **TOL)
        strip(m, lora.ADDED)
        torch.testing.assert_close(m.encode_image(batch[0]), before.encode_image(batch[0]), **TOL)


def test_plain_lora_refuses_open_clip_blocks():
    """open_clip's text blocks read ``in_proj_weight`` inside ``nn.MultiheadAttention``: no hook reaches it, so
    plain LoRA on them stays refused, naming the blocks."""
    with pytest.raises(ValueError, match="text.transformer.resblocks.0.lora"):
        methods.prepare(base("vit-map"), "lora", lean=False)


def test_lora_sites_on_timm_blocks():
    blk = base("eva02").visual.trunk.blocks[0]  # separate q / k / v, SwiGLU
    sites = lora.projection_slices(blk)
    assert sites["q"][0][0] is blk.attn.q_proj.weight and sites["v"][0][0] is blk.attn.v_proj.weight
    assert [w is v for (w, _, _), v in zip(sites["fc"], (blk.mlp.fc1_g.weight, blk.mlp.fc1_x.weight))] == [True] * 2
    fused = base("pe-core").visual.trunk.blocks[0]  # fused qkv: row thirds
    q, k = lora.projection_slices(fused)["q"][0][0], lora.projection_slices(fused)["k"][0][0]
    assert q.data_ptr() == fused.attn.qkv.weight.data_ptr() and k.shape == (64, 64)


# ----------------------------------------------------------------------------------------------------------- pooling
@pytest.mark.parametrize("family", ["vit-map", "pe-core"])
def test_map_pooling_runs_the_last_block_at_every_token(family, batch):
    """MAP pooling (AttentionPoolLatent) attends over every token of the last block, so no pooled-row last block
    applies: the last block runs at all tokens and each of them gets a gradient."""
    m = methods.prepare(base(family), "ln", recompute="block")
    assert m.visual.trunk.attn_pool is not None
    seen = {}

    def keep(_, __, out):
        out.retain_grad()
        seen["out"] = out

    m.visual.trunk.blocks[-1].register_forward_hook(keep)
    img = m.train().encode_image(batch[0])
    n_tokens = (32 // 8) ** 2 + m.visual.trunk.num_prefix_tokens
    assert seen["out"].shape == (3, n_tokens, 64)
    img.pow(2).sum().backward()
    assert (seen["out"].grad.abs().sum(-1) > 0).all()


@pytest.mark.parametrize("family", ["eva02", "eva02-fused", "eva-postnorm"])
def test_token_pooling_runs_the_last_block_at_the_class_token(family, batch):
    """An EVA trunk pools the class token: the lean trunk runs its last block at that row alone (the block's own
    forward is not called, its class-token output is), exactly (the families' prepared-equals-plain tests run
    through it); with dropout in the last block the full forward runs, so every mask is the plain forward's."""
    m = methods.prepare(base(family), "ln", recompute="none")
    trunk = m.visual.trunk
    assert type(trunk) is timm_family.LeanEva and trunk.reads_cls_only()
    calls = []
    trunk.blocks[-1].register_forward_hook(lambda *_: calls.append(1))
    want = base(family).train().encode_image(batch[0])
    torch.testing.assert_close(m.train().encode_image(batch[0]), want, **TOL)
    assert calls == []
    trunk.blocks[-1].drop_path1 = timm.layers.DropPath(0.1)
    assert not trunk.reads_cls_only()
    m.encode_image(batch[0])
    assert calls == [1]
    lean.remove_lean(m)
    assert type(m.visual.trunk) is timm.models.eva.Eva


# ----------------------------------------------------------------------------------------------------------- refusals
def test_convnext_is_named_in_one_line():
    m = base("convnext")
    for method in ("lora", "houlsby", "compacter"):
        with pytest.raises(ValueError, match=rf"^method '{method}' needs transformer blocks.*timm.models.convnext."
                                             rf"ConvNeXt has no transformer blocks$"):
            methods.prepare(m, method)
    with pytest.raises(ValueError, match="lean=True.*ConvNeXt"):
        methods.prepare(m, "ln", lean=True)
    assert not hasattr(m, "leanclip_info")
    notes = prepare_with_notices(m, "ln", recompute="mlp")  # the text tower still goes lean
    assert len(notes) == 1 and "lean on the text tower only" in notes[0] and "ConvNeXt" in notes[0]
    assert "\n" not in notes[0]
    assert {type(b).__name__ for b in m.text.transformer.resblocks} == {"LeanResidualAttentionBlock"}
    assert all(b.leanclip_recompute == "mlp" for b in m.text.transformer.resblocks)
    assert saved_bytes.estimate_saved_bytes(m, "mlp", 2) > 0


class _OtherAttention(timm.layers.attention.Attention):
    """A timm attention subclass the lean block does not implement."""


def test_unknown_block_class_is_named():
    m = base("vit-map")
    blk = m.visual.trunk.blocks[1]
    blk.attn.__class__ = _OtherAttention
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        methods.prepare(m, "ln")
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and "image tower block 1 is timm.models.vision_transformer.Block with attn" in msgs[0]
    assert "_OtherAttention" in msgs[0]
    assert not any(isinstance(x, lean.LeanBlockMixin) for x in m.visual.modules())
    assert lean.is_lean(m.text)
    with pytest.raises(ValueError, match="method 'lora' needs transformer blocks.*_OtherAttention"):
        methods.prepare(m, "lora")


# ----------------------------------------------------------------------------------------------------------- memory
def _saved(model, images):
    from leanclip.memory import saved_activation_bytes

    return saved_activation_bytes(lambda: model.train().visual(images), exclude=model)[1]


@pytest.mark.parametrize("family", FAMILIES)
def test_estimate_matches_measured_image_tower(family, batch):
    """``estimate_saved_bytes`` gives the timm image tower per-block units (``leanclip.models.timm.block_units``):
    within 10% of the measured saved bytes under every policy (LN trained in every block)."""
    for policy in lean.POLICIES:
        m = methods.prepare(base(family), "ln", recompute=policy)
        est = saved_bytes.estimate_saved_bytes(m, policy, 3, text_batch_size=0)
        measured = _saved(m, batch[0])
        assert 0.9 * measured <= est <= 1.1 * measured, (policy, est, measured)


@pytest.mark.parametrize("name", ["vit-map", "eva02", "open_clip"])
def test_lora_terms_are_recomputed_with_their_branch(name, batch):
    """A LoRA pair is a child of the block, not of its projection: its trainable parameters still make the branch
    they add to checkpointed, so ``block`` keeps the block inputs only (a few units), not eager PyTorch's ~10+."""
    from leanclip.configs import register_tiny_config

    make = (lambda: create_random_model(register_tiny_config(), seed=0)) if name == "open_clip" else (
        lambda: base(name))
    saved = {p: _saved(methods.prepare(make(), "lora", dropout=0.0, recompute=p), batch[0]) for p in lean.POLICIES}
    assert saved["block"] < saved["mlp+qkv"] < saved["mlp"] < saved["none"], saved
    assert saved["block"] < 0.3 * saved["none"], saved
