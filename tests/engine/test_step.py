"""The per-method step (leanclip.step.ClassifyStep) and the method declarations it reads: feature hooks and extra loss
terms come from the registry, never from method names or attribute probing."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from leanclip import features, registry
from leanclip.methods import prepare
from leanclip.registry import MethodTraits, register_method
from leanclip.step import ClassifyStep
from leanclip.trainer import TrainConfig, train

TEMPLATES = ["a photo of a {}."]
CLASSNAMES = ["red cube", "blue ball", "green cone"]


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _images_labels(n=6):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 32, 32, generator=g), torch.arange(n) % len(CLASSNAMES)


@pytest.mark.parametrize("method", ["ln", "clipfit", "coop", "ln+adapter", "lora"])
def test_step_gradients_equal_one_graph(method, tiny_base, tok):
    """begin / micro / finish (text tower backward once, into a detached copy) gives the gradients of the step's
    loss as one graph, for methods that train the text side, the image side, a prompt or an extra loss term."""
    images, labels = _images_labels()
    models = []
    for _ in range(2):
        torch.manual_seed(0)  # added modules start equal
        models.append(prepare(copy.deepcopy(tiny_base), method, classnames=CLASSNAMES, tokenizer=tok))
    for m in models:
        m.train()
        if method == "lora":  # dropout draws differ between the two paths; compare the deterministic step
            for mod in m.modules():
                if isinstance(mod, nn.Dropout):
                    mod.p = 0.0
    a = ClassifyStep(models[0], CLASSNAMES, TEMPLATES, tok)
    loss_a = a(images, labels)
    b = ClassifyStep(models[1], CLASSNAMES, TEMPLATES, tok)
    loss_b = b.loss(images, labels)
    loss_b.backward()
    assert loss_a.item() == pytest.approx(loss_b.item(), rel=1e-6)
    ga, gb = _grads(models[0]), _grads(models[1])
    assert ga.keys() == gb.keys() and ga
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=1e-5, atol=1e-7)


def test_grad_accum_micro_batches_equal_one_batch(tiny_base, tok):
    images, labels = _images_labels(8)
    m1, m2 = (prepare(copy.deepcopy(tiny_base), "clipfit") for _ in range(2))
    ClassifyStep(m1, CLASSNAMES, TEMPLATES, tok)(images, labels)
    s = ClassifyStep(m2, CLASSNAMES, TEMPLATES, tok)
    s.begin()
    for i in range(0, 8, 3):
        s.micro(images[i:i + 3], labels[i:i + 3], weight=len(labels[i:i + 3]) / 8)
    s.finish()
    g1, g2 = _grads(m1), _grads(m2)
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-5, atol=1e-7)


def test_fixed_text_trains_the_image_side_only(tiny_base, tok):
    images, labels = _images_labels()
    m = prepare(copy.deepcopy(tiny_base), "ln")
    step = ClassifyStep(m, CLASSNAMES, TEMPLATES, tok, fixed_text=True)
    assert not step.text_trains
    step(images, labels)
    trained = {n for n, p in m.named_parameters() if p.grad is not None}
    assert trained and all(n.startswith("visual.") for n in trained)


class _Shift(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.shift = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x):
        return x + self.shift


@pytest.fixture
def custom_method():
    """A method registered the way a user would: a feature hook on a module of its own name and an extra loss."""
    made = []

    def penalty(ctx):
        made.append(ctx.cfg)
        return lambda txt: ("shift_l2", 0.1 * ctx.model.my_shift.shift.pow(2).sum())

    @register_method("test-shift", traits=MethodTraits(hooks={"image_features": "my_shift"}, loss_terms=(penalty,)))
    def _shift(model):
        return {"my_shift": _Shift(model.visual.output_dim)}

    yield made
    for table in (registry.METHODS, registry.METHOD_TRAITS, registry.METHOD_CHECKS):
        table.pop("test-shift", None)


def test_feature_hook_is_read_from_the_declaration(custom_method, tiny_base):
    images, _ = _images_labels(2)
    m = prepare(copy.deepcopy(tiny_base), "test-shift")
    raw = m.encode_image(images).float()
    torch.testing.assert_close(features.image_features(m, images), F.normalize(raw + 0.5, dim=-1))
    assert features.image_features(tiny_base, images).shape == (2, m.visual.output_dim)  # unprepared: no hook


def test_extra_loss_term_is_trained_and_logged(custom_method, tiny_base, tok, shapes, tmp_path):
    m = prepare(copy.deepcopy(tiny_base), "test-shift")
    cfg = TrainConfig(epochs=1, batch_size=32, lr=1e-2, optimizer="adamw", weight_decay=0.0, warmup_epochs=0,
                      progress=False, output=str(tmp_path))
    summary = train(m, shapes["train"], shapes["classnames"], TEMPLATES, tok, cfg)
    assert custom_method and custom_method[0].method == "test-shift"  # the factory saw the run's config
    from leanclip import utils

    recs = utils.read_jsonl(tmp_path / "log.jsonl")
    assert all("shift_l2" in r and r["loss"] == pytest.approx(r["ce"] + r["shift_l2"], rel=1e-6) for r in recs)
    assert summary["steps"] == len(recs)


def test_two_components_cannot_share_a_hook_role(custom_method):
    with pytest.raises(ValueError, match="both replace the image_features"):
        registry.parse_method("adapter+test-shift")
    with pytest.raises(ValueError, match="hook roles"):
        register_method("test-bad-role", lambda m: {}, traits=MethodTraits(hooks={"nonsense": "x"}))
