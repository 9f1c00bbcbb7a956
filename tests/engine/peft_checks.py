"""Checks shared by the tests of the in-layer PEFT methods (houlsby, compacter, lora): each method's test file calls
them with its name and options, so a new method's tests state only what is particular to it."""
import warnings

import torch
import torch.nn.functional as F

from leanclip import lean, methods
from leanclip.checkpoint import load_trainable, save_trainable
from leanclip.methods import prepare, trainable_parameters


def randomize_trainable(model, seed: int = 0) -> None:
    """Move every trainable parameter off its (often zero) init, so gradients and outputs depend on all of them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in trainable_parameters(model):
            p.copy_(0.1 * torch.randn(p.shape, generator=g))


def features(model, images, tokens, plain: bool = False):
    """Normalized image and text features (a lean model reads its text tower at the EOT rows only)."""
    img = model.encode_image(images, normalize=True)
    txt = model.encode_text(tokens, normalize=True) if plain else lean.encode_text_lean(model, tokens, normalize=True)
    return img, txt


def projection_loss(img, txt):
    """A fixed random projection of both feature sets: every feature element gets its own gradient."""
    g = torch.Generator().manual_seed(7)
    return (img * torch.randn(img.shape, generator=g)).sum() + (txt * torch.randn(txt.shape, generator=g)).sum()


def assert_identity_at_init(fresh_tiny, batch, method: str, lean_on: bool) -> None:
    base = fresh_tiny().eval()
    m = prepare(fresh_tiny(), method, lean=lean_on).eval()
    with torch.no_grad():
        for a, b in zip((base.encode_image(batch[0]), base.encode_text(batch[1])),
                        (m.encode_image(batch[0]), m.encode_text(batch[1]))):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def assert_lean_grads_match_plain(fresh_tiny, batch, method: str, policy: str) -> None:
    """The lean model (recompute ``policy``) and open_clip's plain blocks give the same gradient to every trainable
    parameter, and no frozen one gets a gradient."""
    plain = prepare(fresh_tiny(), method, lean=False)
    randomize_trainable(plain)
    m = prepare(fresh_tiny(), method, recompute=policy)
    randomize_trainable(m)
    assert not lean.is_lean(plain) and lean.is_lean(m)
    projection_loss(*features(plain.train(), *batch, plain=True)).backward()
    projection_loss(*features(m.train(), *batch)).backward()
    ref = dict(trainable_parameters(plain))
    for n, p in trainable_parameters(m):
        assert ref[n].grad.abs().sum() > 0, n
        torch.testing.assert_close(p.grad, ref[n].grad, atol=1e-5, rtol=1e-4, msg=n)
    assert all(p.grad is None for p in m.parameters() if not p.requires_grad)


def assert_steps_change_only_trainable(model, batch, steps: int = 2) -> None:
    """``steps`` SGD steps move every trainable parameter and nothing else (zero-initialised factors move from the
    second step on)."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for _, p in trainable_parameters(model)], lr=0.5)
    for _ in range(steps):
        opt.zero_grad()
        projection_loss(*features(model.train(), *batch)).backward()
        opt.step()
    for n, p in model.named_parameters():
        assert (not torch.equal(before[n], p)) == p.requires_grad, n


def assert_checkpoint_round_trip(fresh_tiny, tmp_path, batch, method: str) -> None:
    m = prepare(fresh_tiny(), method)
    randomize_trainable(m)
    path = tmp_path / f"{method}.safetensors"
    save_trainable(m, path)
    other = prepare(fresh_tiny(), method)
    load_trainable(other, path)
    with torch.no_grad():
        torch.testing.assert_close(m.eval().encode_image(batch[0]), other.eval().encode_image(batch[0]))


def assert_classification_trains(fresh_tiny, shapes, tok, method: str, moved_suffix: str, **opts) -> None:
    """One epoch of ``leanclip.trainer`` on the shapes task moves the parameters named ``*moved_suffix``."""
    from leanclip.trainer import TrainConfig, train

    m = prepare(fresh_tiny(), method, **opts)
    train(m, shapes["train"], shapes["classnames"], ["a photo of a {}."], tok,
          TrainConfig(epochs=1, batch_size=16, lr=1e-3, warmup_epochs=0))
    assert any(p.abs().sum() > 0 for n, p in trainable_parameters(m) if n.endswith(moved_suffix))


def prepare_with_notices(model, method: str, **kw) -> list[str]:
    """``prepare(model, method, **kw)``; returns the messages of the warnings (notices) it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        methods.prepare(model, method, **kw)
    return [str(w.message) for w in caught]


def clip_loss(model, images, tokens):
    """Symmetric InfoNCE with the model's own logit_scale, on plain encode_image / encode_text (any towers)."""
    img = F.normalize(model.encode_image(images), dim=-1)
    txt = F.normalize(model.encode_text(tokens), dim=-1)
    logits = model.logit_scale.exp() * img @ txt.t()
    y = torch.arange(len(images))
    return F.cross_entropy(logits, y) + F.cross_entropy(logits.t(), y)
