"""Houlsby in-layer adapters: trainable counts, exact identity at init, lean gradients under every recompute policy
against open_clip's plain blocks, a training step, checkpoints, classification, combinations with ln, bad input."""
import pytest
import torch

from engine import houlsby, lean
from engine.checkpoint import load_trainable, save_trainable
from engine.methods import count_trainable, layernorm_names, prepare, trainable_parameters


@pytest.fixture
def batch(tok):
    g = torch.Generator().manual_seed(3)
    return torch.randn(3, 3, 32, 32, generator=g), tok(["a photo of a cat", "a dog", "two red cubes on a table"])


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in trainable_parameters(model):
            p.copy_(0.1 * torch.randn(p.shape, generator=g))


def _loss(model, images, tokens, plain=False):
    img = model.encode_image(images, normalize=True)
    txt = model.encode_text(tokens, normalize=True) if plain else lean.encode_text_lean(model, tokens, normalize=True)
    g = torch.Generator().manual_seed(7)
    return (img * torch.randn(img.shape, generator=g)).sum() + (txt * torch.randn(txt.shape, generator=g)).sum()


def _houlsby_count(width, layers, reduction):
    m = width // reduction
    return layers * 2 * (2 * width * m + m + width)


def test_count_tiny_and_vit_b16_formula(fresh_tiny, create_model):
    m = prepare(fresh_tiny(), "houlsby")
    assert count_trainable(m) == 2 * _houlsby_count(64, 2, 8)
    assert all(".ls_1.houlsby." in n or ".ls_2.houlsby." in n for n, _ in trainable_parameters(m))
    m = prepare(fresh_tiny(), "houlsby", reduction=4, tower="text")
    assert count_trainable(m) == _houlsby_count(64, 2, 4)
    from engine.configs import register_reduced_config

    b16 = prepare(create_model(register_reduced_config("ViT-B-16", layers=2)), "houlsby")
    assert count_trainable(b16) * 6 == _houlsby_count(768, 12, 8) + _houlsby_count(512, 12, 8) == 5_146_368


@pytest.mark.parametrize("lean_on", [True, False])
def test_identity_at_init(fresh_tiny, batch, lean_on):
    base = fresh_tiny().eval()
    m = prepare(fresh_tiny(), "houlsby", lean=lean_on).eval()
    with torch.no_grad():
        for a, b in zip((base.encode_image(batch[0]), base.encode_text(batch[1])),
                        (m.encode_image(batch[0]), m.encode_text(batch[1]))):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("policy", lean.POLICIES)
def test_lean_grads_match_plain(fresh_tiny, batch, policy):
    plain = prepare(fresh_tiny(), "houlsby", lean=False)
    _randomize(plain)
    m = prepare(fresh_tiny(), "houlsby", recompute=policy)
    _randomize(m)
    assert not lean.is_lean(plain) and lean.is_lean(m)
    _loss(plain.train(), *batch, plain=True).backward()
    _loss(m.train(), *batch).backward()
    ref = dict(trainable_parameters(plain))
    for n, p in trainable_parameters(m):
        assert ref[n].grad.abs().sum() > 0, n
        torch.testing.assert_close(p.grad, ref[n].grad, atol=1e-5, rtol=1e-4, msg=n)
    assert all(p.grad is None for p in m.parameters() if not p.requires_grad)


def test_training_step_changes_only_adapters(fresh_tiny, batch):
    m = prepare(fresh_tiny(), "houlsby")
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = torch.optim.SGD([p for _, p in trainable_parameters(m)], lr=0.5)
    for _ in range(2):  # up moves on step 1, down from step 2 on
        opt.zero_grad()
        _loss(m.train(), *batch).backward()
        opt.step()
    for n, p in m.named_parameters():
        assert (not torch.equal(before[n], p)) == p.requires_grad, n


def test_classification_training(fresh_tiny, shapes, tok):
    from engine.train import TrainConfig, train

    m = prepare(fresh_tiny(), "houlsby", reduction=4)
    train(m, shapes["train"], shapes["classnames"], ["a photo of a {}."], tok,
          TrainConfig(epochs=1, batch_size=16, lr=1e-3, warmup_epochs=0))
    assert any(p.abs().sum() > 0 for n, p in trainable_parameters(m) if n.endswith("up.weight"))


def test_checkpoint_round_trip(fresh_tiny, tmp_path, batch):
    m = prepare(fresh_tiny(), "houlsby")
    _randomize(m)
    path = tmp_path / "h.safetensors"
    save_trainable(m, path)
    other = prepare(fresh_tiny(), "houlsby")
    load_trainable(other, path)
    with torch.no_grad():
        torch.testing.assert_close(m.eval().encode_image(batch[0]), other.eval().encode_image(batch[0]))


def test_ln_plus_houlsby_and_ln_as_initialization(fresh_tiny, tmp_path, batch):
    m = prepare(fresh_tiny(), "ln+houlsby")
    assert set(layernorm_names(m)) < {n for n, _ in trainable_parameters(m)}
    assert count_trainable(m) == count_trainable(prepare(fresh_tiny(), "ln")) + 2 * _houlsby_count(64, 2, 8)
    _randomize(m)
    _loss(m.train(), *batch).backward()
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
    houlsby.strip(m)
    assert not houlsby.inlayer_adapters(m)
    assert not any(m2._forward_pre_hooks for m2 in m.modules() if isinstance(m2, torch.nn.Identity))


@pytest.mark.parametrize("opts, match", [({"reduction": 0}, "reduction"), ({"reduction": 3}, "divide"),
                                         ({"reduction": 2.0}, "reduction"), ({"tower": "x"}, "tower")])
def test_bad_options_leave_the_model_unchanged(fresh_tiny, opts, match):
    m = fresh_tiny()
    with pytest.raises(ValueError, match=match):
        prepare(m, "houlsby", **opts)
    assert not houlsby.inlayer_adapters(m) and not lean.is_lean(m)
