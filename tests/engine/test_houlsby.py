"""Houlsby in-layer adapters: trainable counts, exact identity at init, lean gradients under every recompute policy
against open_clip's plain blocks, a training step, checkpoints, classification, combinations with ln, bad input."""
import pytest
import torch

from leanclip import lean
from leanclip.lifecycle import strip
from leanclip.methods import houlsby
from leanclip.checkpoint import save_trainable
from leanclip.methods import count_trainable, layernorm_names, prepare, trainable_parameters
from tests.engine import peft_checks as checks


def _houlsby_count(width, layers, reduction):
    m = width // reduction
    return layers * 2 * (2 * width * m + m + width)


def test_count_tiny_and_vit_b16_formula(fresh_tiny, create_model):
    m = prepare(fresh_tiny(), "houlsby")
    assert count_trainable(m) == 2 * _houlsby_count(64, 2, 8)
    assert all(".ls_1.houlsby." in n or ".ls_2.houlsby." in n for n, _ in trainable_parameters(m))
    m = prepare(fresh_tiny(), "houlsby", reduction=4, tower="text")
    assert count_trainable(m) == _houlsby_count(64, 2, 4)
    from leanclip.configs import register_reduced_config

    b16 = prepare(create_model(register_reduced_config("ViT-B-16", layers=2)), "houlsby")
    assert count_trainable(b16) * 6 == _houlsby_count(768, 12, 8) + _houlsby_count(512, 12, 8) == 5_146_368


@pytest.mark.parametrize("lean_on", [True, False])
def test_identity_at_init(fresh_tiny, batch, lean_on):
    checks.assert_identity_at_init(fresh_tiny, batch, "houlsby", lean_on)


@pytest.mark.parametrize("policy", lean.POLICIES)
def test_lean_grads_match_plain(fresh_tiny, batch, policy):
    checks.assert_lean_grads_match_plain(fresh_tiny, batch, "houlsby", policy)


def test_training_step_changes_only_adapters(fresh_tiny, batch):
    checks.assert_steps_change_only_trainable(prepare(fresh_tiny(), "houlsby"), batch)


def test_classification_training(fresh_tiny, shapes, tok):
    checks.assert_classification_trains(fresh_tiny, shapes, tok, "houlsby", "up.weight", reduction=4)


def test_checkpoint_round_trip(fresh_tiny, tmp_path, batch):
    checks.assert_checkpoint_round_trip(fresh_tiny, tmp_path, batch, "houlsby")


def test_ln_plus_houlsby_and_ln_as_initialization(fresh_tiny, tmp_path, batch):
    m = prepare(fresh_tiny(), "ln+houlsby")
    assert set(layernorm_names(m)) < {n for n, _ in trainable_parameters(m)}
    assert count_trainable(m) == count_trainable(prepare(fresh_tiny(), "ln")) + 2 * _houlsby_count(64, 2, 8)
    checks.randomize_trainable(m)
    checks.projection_loss(*checks.features(m.train(), *batch)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in trainable_parameters(m))
    ln_model = prepare(fresh_tiny(), "ln")
    with torch.no_grad():
        for _, p in trainable_parameters(ln_model):
            p.add_(0.5)
    save_trainable(ln_model, tmp_path / "ln.safetensors")
    m = prepare(fresh_tiny(), "houlsby", init_from=str(tmp_path / "ln.safetensors"))
    for n, p in trainable_parameters(ln_model):
        assert torch.equal(m.get_parameter(n), p) and not m.get_parameter(n).requires_grad
    assert all(".houlsby." in n for n, _ in trainable_parameters(m))


def test_reprepare_and_strip(fresh_tiny, batch):
    m = prepare(fresh_tiny(), "houlsby")
    prepare(m, "houlsby", reduction=4)  # replaces the earlier adapters
    assert count_trainable(m) == 2 * _houlsby_count(64, 2, 4)
    strip(m, houlsby.added())
    assert not houlsby.inlayer_adapters(m)
    assert not any(m2._forward_pre_hooks for m2 in m.modules() if isinstance(m2, torch.nn.Identity))


@pytest.mark.parametrize("opts, match", [({"reduction": 0}, "reduction"), ({"reduction": 3}, "divide"),
                                         ({"reduction": 2.0}, "reduction"), ({"tower": "x"}, "tower")])
def test_bad_options_leave_the_model_unchanged(fresh_tiny, opts, match):
    m = fresh_tiny()
    with pytest.raises(ValueError, match=match):
        prepare(m, "houlsby", **opts)
    assert not houlsby.inlayer_adapters(m) and not lean.is_lean(m)
