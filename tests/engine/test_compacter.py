"""Compacter (PHM in-layer adapters): trainable counts and their formula, the shared A_i, exact identity at init, lean gradients under every recompute policy
against open_clip's plain blocks, a training step, checkpoints, classification, combinations with ln, bad input."""
import pytest
import torch

from leanclip import lean
from leanclip.lifecycle import strip
from leanclip.methods import compacter, houlsby
from leanclip.checkpoint import save_trainable
from leanclip.methods import count_trainable, layernorm_names, prepare, trainable_parameters
from tests.engine import peft_checks as checks


def _compacter_count(width, layers, reduction, n=4):
    """Per-tower count without the shared n^3: s, t of down (d/n + m/n each of n) + bias m, same for up + bias d."""
    m = width // reduction
    down = n * (width // n + m // n) + m
    up = n * (m // n + width // n) + width
    return layers * 2 * (down + up)


def test_count_tiny_and_vit_b16_formula(fresh_tiny, create_model):
    m = prepare(fresh_tiny(), "compacter")
    assert count_trainable(m) == 2 * _compacter_count(64, 2, 8) + 4 ** 3
    assert count_trainable(m) == compacter.compacter_count([(64, 2), (64, 2)], 8, 4)
    m = prepare(fresh_tiny(), "compacter", reduction=4, n=2, tower="text")
    assert count_trainable(m) == _compacter_count(64, 2, 4, n=2) + 2 ** 3
    from leanclip.configs import register_reduced_config

    b16 = prepare(create_model(register_reduced_config("ViT-B-16", layers=2)), "compacter")
    per_block = (count_trainable(b16) - 64) // 2
    assert per_block * 12 + 64 == _compacter_count(768, 12, 8) + _compacter_count(512, 12, 8) + 64 == 103_744
    assert compacter.compacter_count([(768, 12), (512, 12)]) == 103_744


def test_rule_is_shared_by_every_layer(fresh_tiny):
    m = prepare(fresh_tiny(), "compacter")
    layers = [x for x in m.modules() if isinstance(x, compacter.PHMLinear)]
    assert len(layers) == 2 * 2 * 2 * 2  # towers x blocks x adapters x (down, up)
    assert len({id(x.rule.A) for x in layers}) == 1
    assert sum(n.endswith(".rule.A") for n, _ in trainable_parameters(m)) == 1
    w = layers[0].weight()  # W = sum_i A_i kron s_i t_i^T
    ref = sum(torch.kron(layers[0].rule.A[i], torch.outer(layers[0].s[i], layers[0].t[i])) for i in range(4))
    torch.testing.assert_close(w, ref)


@pytest.mark.parametrize("lean_on", [True, False])
def test_identity_at_init(fresh_tiny, batch, lean_on):
    checks.assert_identity_at_init(fresh_tiny, batch, "compacter", lean_on)


@pytest.mark.parametrize("policy", lean.POLICIES)
def test_lean_grads_match_plain(fresh_tiny, batch, policy):
    checks.assert_lean_grads_match_plain(fresh_tiny, batch, "compacter", policy)


def test_training_step_changes_only_adapters(fresh_tiny, batch):
    checks.assert_steps_change_only_trainable(prepare(fresh_tiny(), "compacter"), batch)


def test_classification_training(fresh_tiny, shapes, tok):
    checks.assert_classification_trains(fresh_tiny, shapes, tok, "compacter", "up.t", reduction=4)


def test_checkpoint_round_trip(fresh_tiny, tmp_path, batch):
    checks.assert_checkpoint_round_trip(fresh_tiny, tmp_path, batch, "compacter")


def test_ln_plus_compacter_and_ln_as_initialization(fresh_tiny, tmp_path, batch):
    m = prepare(fresh_tiny(), "ln+compacter")
    assert set(layernorm_names(m)) < {n for n, _ in trainable_parameters(m)}
    assert count_trainable(m) == count_trainable(prepare(fresh_tiny(), "ln")) + 2 * _compacter_count(64, 2, 8) + 64
    checks.randomize_trainable(m)
    checks.projection_loss(*checks.features(m.train(), *batch)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in trainable_parameters(m))
    ln_model = prepare(fresh_tiny(), "ln")
    with torch.no_grad():
        for _, p in trainable_parameters(ln_model):
            p.add_(0.5)
    save_trainable(ln_model, tmp_path / "ln.safetensors")
    m = prepare(fresh_tiny(), "compacter", init_from=str(tmp_path / "ln.safetensors"))
    for n, p in trainable_parameters(ln_model):
        assert torch.equal(m.get_parameter(n), p) and not m.get_parameter(n).requires_grad
    assert all(".compacter." in n for n, _ in trainable_parameters(m))


def test_reprepare_and_strip(fresh_tiny, batch):
    m = prepare(fresh_tiny(), "compacter")
    prepare(m, "compacter", reduction=4)  # replaces the earlier adapters
    assert count_trainable(m) == 2 * _compacter_count(64, 2, 4) + 64
    strip(m, houlsby.added())
    assert not houlsby.inlayer_adapters(m)
    assert not any(m2._forward_pre_hooks for m2 in m.modules() if isinstance(m2, torch.nn.Identity))


@pytest.mark.parametrize("opts, match", [({"reduction": 0}, "reduction"), ({"reduction": 3}, "divide"),
                                         ({"reduction": 2.0}, "reduction"), ({"tower": "x"}, "tower"),
                                         ({"n": 0}, "n must"), ({"n": 3}, "divide"), ({"n": 16}, "divide")])
def test_bad_options_leave_the_model_unchanged(fresh_tiny, opts, match):
    m = fresh_tiny()
    with pytest.raises(ValueError, match=match):
        prepare(m, "compacter", **opts)
    assert not houlsby.inlayer_adapters(m) and not lean.is_lean(m)
