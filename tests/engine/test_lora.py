"""LoRA (CLIP-LoRA): trainable counts, exact identity at init, lean gradients under every recompute policy against a
plain open_clip reference with the same math, seeded dropout, merge, checkpoints, combinations with ln, bad input."""
import pytest
import torch
from torch.func import functional_call

import leanclip
from leanclip import lean
from leanclip.methods import lora
from leanclip.checkpoint import load_trainable, save_trainable
from leanclip.methods import count_trainable, prepare, trainable_parameters
from tests.engine import peft_checks as checks


def _blocks(model):
    return [(f"visual.transformer.resblocks.{i}.", b) for i, b in enumerate(model.visual.transformer.resblocks)] + [
        (f"transformer.resblocks.{i}.", b) for i, b in enumerate(model.transformer.resblocks)]


def _randomize_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora.lora_modules(model):
            for p in m.parameters():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def _reference_grads(base, prepared, images, tokens):
    """Gradients of every LoRA A/B through plain open_clip modules with the merged weights W + s*B*A."""
    leaves, weights = {}, {}
    for prefix, blk in _blocks(prepared):
        m = blk.lora
        pairs = {t: (m._modules[t].A.detach().clone().requires_grad_(True),
                     m._modules[t].B.detach().clone().requires_grad_(True)) for t in m.targets}
        for t, (a, b) in pairs.items():
            leaves[f"{prefix}lora.{t}.A"], leaves[f"{prefix}lora.{t}.B"] = a, b
        w = base.get_parameter(prefix + "attn.in_proj_weight")
        d = w.shape[1]
        chunks = [w[i * d:(i + 1) * d] + (m.scaling * pairs[t][1] @ pairs[t][0] if t in pairs else 0)
                  for i, t in enumerate("qkv")]
        weights[prefix + "attn.in_proj_weight"] = torch.cat(chunks)
        for t, name in (("out", "attn.out_proj.weight"), ("fc", "mlp.c_fc.weight"), ("proj", "mlp.c_proj.weight")):
            if t in pairs:
                weights[prefix + name] = base.get_parameter(prefix + name) + m.scaling * pairs[t][1] @ pairs[t][0]
    out = functional_call(base, weights, args=(images, tokens))  # CLIP.forward: normalized features
    loss = checks.projection_loss(out[0], out[1])
    names = list(leaves)
    return dict(zip(names, torch.autograd.grad(loss, [leaves[n] for n in names])))


# ----------------------------------------------------------------------------------------------------------- counts
def test_count_tiny_default_and_all_targets(fresh_tiny):
    m = prepare(fresh_tiny(), "lora")
    # 2 towers x 2 blocks x 3 targets x rank 2 x (64 + 64)
    assert count_trainable(m) == 2 * 2 * 3 * 2 * (64 + 64)
    assert all(".lora." in n for n, _ in trainable_parameters(m))
    m = prepare(fresh_tiny(), "lora", targets=("fc", "proj"), rank=3, tower="image")
    assert count_trainable(m) == 2 * 2 * 3 * (64 + 256)
    assert all(n.startswith("visual.") for n, _ in trainable_parameters(m))


def test_count_vit_b16_default(create_model):
    from leanclip.configs import register_reduced_config

    m = create_model(register_reduced_config("ViT-B-16", layers=2))
    prepare(m, "lora")
    assert count_trainable(m) * 12 // 2 == 184_320  # 12 blocks per tower: 110,592 image + 73,728 text


# ----------------------------------------------------------------------------------------------------------- exactness
def test_identity_at_init(fresh_tiny, batch):
    base = fresh_tiny().eval()
    m = prepare(fresh_tiny(), "lora", targets=lora.TARGETS).eval()
    with torch.no_grad():
        for a, b in zip(checks.features(base, *batch, plain=True), checks.features(m, *batch, plain=False)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("policy", lean.POLICIES)
@pytest.mark.parametrize("targets", [("q", "k", "v"), ("q", "v", "out", "fc", "proj")])
def test_lean_grads_match_plain_reference(fresh_tiny, batch, policy, targets):
    base = fresh_tiny()
    m = prepare(fresh_tiny(), "lora", dropout=0.0, targets=targets, recompute=policy)
    _randomize_lora(m)
    m.train()
    loss = checks.projection_loss(*checks.features(m, *batch, plain=False))
    loss.backward()
    ref = _reference_grads(base.train(), m, *batch)
    got = dict(trainable_parameters(m))
    assert set(ref) == set(got)
    for n, g in ref.items():
        torch.testing.assert_close(got[n].grad, g, atol=1e-5, rtol=1e-4, msg=n)
    assert all(p.grad is None for n, p in m.named_parameters() if not p.requires_grad)  # no dW on frozen weights


def test_dropout_is_seeded_and_replayed_by_recompute(fresh_tiny, batch):
    grads = {}
    for policy in ("none", "mlp+qkv", "block", "none"):
        m = prepare(fresh_tiny(), "lora", dropout=0.25, recompute=policy)
        _randomize_lora(m)
        m.train()
        torch.manual_seed(11)
        checks.projection_loss(*checks.features(m, *batch, plain=False)).backward()
        g = torch.cat([p.grad.flatten() for _, p in trainable_parameters(m)])
        for prev in grads.values():
            torch.testing.assert_close(g, prev, atol=1e-6, rtol=1e-5)
        grads[policy] = g
    m.eval()  # dropout is off in eval mode: equal to a dropout-free model
    ref = prepare(fresh_tiny(), "lora", dropout=0.0)
    _randomize_lora(ref)
    with torch.no_grad():
        torch.testing.assert_close(m.encode_image(batch[0]), ref.eval().encode_image(batch[0]))


def test_training_step_changes_only_lora(fresh_tiny, batch):
    checks.assert_steps_change_only_trainable(prepare(fresh_tiny(), "lora"), batch)  # B moves first, A next


def test_bf16_frozen_weights(fresh_tiny, batch):
    m = prepare(fresh_tiny(), "lora", frozen_dtype=torch.bfloat16)
    assert m.visual.transformer.resblocks[0].attn.in_proj_weight.dtype == torch.bfloat16
    assert m.visual.transformer.resblocks[0].lora.q.A.dtype == torch.float32
    _randomize_lora(m)
    images, tokens = batch
    checks.projection_loss(*[f.float() for f in checks.features(m.train(), images.bfloat16(), tokens, plain=False)]).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in trainable_parameters(m))


# ----------------------------------------------------------------------------------------------------------- merge
def test_merge_folds_into_a_plain_model(fresh_tiny, batch):
    m = prepare(fresh_tiny(), "lora", targets=lora.TARGETS, rank=3, alpha=2.0)
    _randomize_lora(m)
    merged = leanclip.merge(m)
    assert not lean.is_lean(merged) and not lora.lora_modules(merged)
    assert not any(isinstance(x, lean.ProjectionDelta) for x in merged.modules())
    assert sorted(n for n, _ in merged.named_parameters()) == sorted(n for n, _ in fresh_tiny().named_parameters())
    assert lora.lora_modules(m) and lean.is_lean(m)  # the trained model is untouched
    with torch.no_grad():
        for a, b in zip(checks.features(m.eval(), *batch, plain=False), checks.features(merged.eval(), *batch, plain=True)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="not prepared"):
        leanclip.merge(fresh_tiny())


# ----------------------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip(fresh_tiny, tmp_path, batch):
    m = prepare(fresh_tiny(), "lora", rank=4)
    _randomize_lora(m)
    path = tmp_path / "lora.safetensors"
    save_trainable(m, path)
    other = prepare(fresh_tiny(), "lora", rank=4)
    load_trainable(other, path)
    for (n, p), (n2, q) in zip(trainable_parameters(m), trainable_parameters(other)):
        assert n == n2 and torch.equal(p, q)
    with torch.no_grad():
        torch.testing.assert_close(m.eval().encode_image(batch[0]), other.eval().encode_image(batch[0]))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == {n for n, _ in trainable_parameters(m)}  # trainable-only


# ----------------------------------------------------------------------------------------------------------- with ln
def test_ln_plus_lora_trains_both(fresh_tiny, batch):
    from leanclip.methods import layernorm_names

    m = prepare(fresh_tiny(), "ln+lora")
    ln = set(layernorm_names(m))
    names = {n for n, _ in trainable_parameters(m)}
    assert ln < names and all(".lora." in n for n in names - ln)
    assert count_trainable(m) == count_trainable(prepare(fresh_tiny(), "ln")) + 2 * 2 * 3 * 2 * 128
    _randomize_lora(m)
    checks.projection_loss(*checks.features(m.train(), *batch, plain=False)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in trainable_parameters(m))


def test_ln_checkpoint_as_initialization(fresh_tiny, tmp_path):
    ln_model = prepare(fresh_tiny(), "ln")
    with torch.no_grad():
        for _, p in trainable_parameters(ln_model):
            p.add_(0.5)
    path = tmp_path / "ln.safetensors"
    save_trainable(ln_model, path)
    m = prepare(fresh_tiny(), "lora", init_from=str(path))
    for n, p in trainable_parameters(ln_model):
        q = m.get_parameter(n)
        assert torch.equal(q, p) and not q.requires_grad
    assert all(".lora." in n for n, _ in trainable_parameters(m))


# ----------------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("opts, match", [
    ({"rank": 0}, "rank"), ({"rank": 1.5}, "rank"), ({"alpha": 0}, "alpha"), ({"dropout": 1.0}, "dropout"),
    ({"targets": ("q", "x")}, "unknown LoRA target"), ({"targets": ()}, "targets"), ({"targets": "q,q"}, "repeat"),
    ({"tower": "audio"}, "tower"), ({"lean": False}, "projection deltas"),
])
def test_bad_options_leave_the_model_unchanged(fresh_tiny, opts, match):
    m = fresh_tiny()
    before = {n: p.detach().clone() for n, p in m.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        prepare(m, "lora", **opts)
    assert not lora.lora_modules(m) and not lean.is_lean(m)
    assert all(torch.equal(before[n], p) for n, p in m.state_dict().items())


def test_string_targets_and_reprepare(fresh_tiny):
    m = prepare(fresh_tiny(), "lora", targets="q, v")
    assert m.visual.transformer.resblocks[0].lora.targets == ("q", "v")
    prepare(m, "lora", rank=1)  # replaces the earlier modules
    assert count_trainable(m) == 2 * 2 * 3 * 1 * 128


def test_merge_of_bf16_frozen_weights_is_a_plain_fp32_model(fresh_tiny, batch):
    m = prepare(fresh_tiny(), "lora", frozen_dtype=torch.bfloat16)
    _randomize_lora(m)
    merged = leanclip.merge(m)
    assert {p.dtype for p in merged.parameters()} == {torch.float32}
    with torch.no_grad():
        torch.testing.assert_close(merged.eval().encode_image(batch[0]),
                                   leanclip.image_features(m.eval(), batch[0], normalize=False), atol=2e-2, rtol=2e-2)
