"""The step-peak estimate and the planner on timm and Hugging Face towers: one tower geometry feeds both estimates,
the saved-bytes estimate follows what autograd keeps, a budget's plan fits and is exact against plain (mixed
policies and chunks), and the Hugging Face layer runs ``block`` over chunks of samples exactly."""
import warnings

import pytest
import torch

pytest.importorskip("timm")
pytest.importorskip("transformers")

from leanclip import budget, geometry, lean, methods, saved_bytes, weights  # noqa: E402
from leanclip.memory import saved_activation_bytes  # noqa: E402
from tests.engine.test_timm_towers import _assert_same, _loss_and_grads, base  # noqa: E402
from tests.engine.test_timm_towers import batch as timm_batch  # noqa: E402,F401  (the fixture)
from tests.engine.test_transformers_family import (  # noqa: E402,F401  (_torch_backend, cache: fixtures)
    NAMES, _torch_backend, backward_beside_plain, cache, prepared,
)

batch = timm_batch
TIMM = ["vit-map", "eva02", "eva02-fused", "pe-core", "eva-postnorm"]


def _timm(family, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return methods.prepare(base(family), "ln", tower="image", classnames=["a", "b", "c"], **kw)


@pytest.mark.parametrize("family", TIMM)
def test_geometry_reads_timm_towers(family):
    m = _timm(family)
    g = geometry.tower_geometry(m, "image")
    trunk = m.visual.trunk
    assert g.family == "timm" and g.depth == len(trunk.blocks) and g.width == trunk.embed_dim
    assert g.tokens == trunk.patch_embed.num_patches + trunk.num_prefix_tokens
    assert g.map_head == (family in ("vit-map", "pe-core")) and g.gated == family.startswith("eva02")
    assert g.units["none"] > g.units["mlp"] > g.units["mlp+qkv"] > g.units["block"] == 1.0
    assert [s.name for s in budget.tower_shapes(m, 4, text_batch_size=0)] == ["image"]


@pytest.mark.parametrize("family", TIMM)
def test_timm_saved_estimate_follows_autograd(family):
    """The saved-bytes estimate is within 10% of what autograd keeps (leanclip.memory), every policy."""
    _assert_estimate_follows(_timm(family), 0.1)


def _assert_estimate_follows(m, tol):
    """The image tower's saved-bytes estimate is within ``tol`` of what autograd keeps, every policy."""
    m.train()
    images = torch.randn(4, 3, 32, 32)
    for policy in lean.POLICIES:
        lean.set_recompute(m, policy)
        kept = saved_activation_bytes(lambda: m.encode_image(images), exclude=m)[1]
        est = saved_bytes.estimate_saved_bytes(m, policy, 4, text_batch_size=0)
        assert abs(est - kept) <= tol * kept, (policy, est, kept)


@pytest.mark.parametrize("family", ["vit-map", "eva02", "eva-postnorm"])
def test_timm_budget_plan_fits_and_a_mixed_plan_is_exact(family, batch):
    m = _timm(family)
    top = budget.predict_peak(m, 3, "none", text_batch_size=0)
    low = budget.predict_peak(m, 3, "block", 1, text_batch_size=0)
    assert low < top
    plans = [budget.plan_recompute(m, int(low + f * (top - low)), 3, text_batch_size=0) for f in (0.0, 0.3, 0.6)]
    assert all(p.peak <= int(low + f * (top - low)) for p, f in zip(plans, (0.0, 0.3, 0.6)))
    mixed = next((p for p in plans if len(set(p.policies["image"])) > 1 or p.chunk), plans[0])
    planned = _timm(family, recompute="auto", memory_budget=mixed.peak, batch_size=3, text_batch_size=0)
    got = [b.leanclip_recompute for b in planned.visual.trunk.blocks]
    assert got == list(mixed.policies["image"]) and "block" in got
    ref = _loss_and_grads(_timm(family, lean=False), batch, plain=True)
    _assert_same(_loss_and_grads(planned, batch, plain=False), ref)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_hf_geometry_and_saved_estimate(cache, family):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = methods.prepare(weights.create_model(NAMES[family]), "ln", tower="image")
    g = geometry.tower_geometry(m, "image")
    assert g.family == "transformers" and g.depth == 2 and g.width == 32 and g.map_head == (family == "siglip")
    _assert_estimate_follows(m, 0.15)


def _assert_equal_to_plain(plain, m):
    """Logits and every trainable gradient of ``m`` equal ``plain``'s (fp64)."""
    grads = backward_beside_plain(plain, m)
    for n, p in methods.trainable_parameters(m):
        torch.testing.assert_close(p.grad, grads[n].grad, atol=1e-11, rtol=1e-9, msg=lambda s: f"{n}: {s}")


@pytest.mark.parametrize("family", ["clip", "siglip"])
@pytest.mark.parametrize("method", ["ln", "lora"])
def test_hf_chunked_block_equals_plain(cache, family, method):
    """``block`` over chunks of 2 samples (3 in the batch) on the Hugging Face layers: outputs and gradients equal
    plain autograd through transformers' own layers (fp64)."""
    kw = {"dropout": 0.0} if method == "lora" else {}
    torch.manual_seed(0)
    plain = prepared(family, method, lean=False, **kw).train()
    torch.manual_seed(0)
    m = prepared(family, method, recompute="block", recompute_chunk=2, **kw).train()
    assert {layer.leanclip_chunk for layer in m.visual.model.encoder.layers} == {2}
    _assert_equal_to_plain(plain, m)


def test_hf_budget_plans_both_towers_and_is_exact(cache):
    """``recompute="auto"`` on a Hugging Face CLIP: the plan covers both towers' layers, fits, and the planned model
    equals plain."""
    probe = prepared("clip", "ln")
    top = budget.predict_peak(probe, 3, "none", text_batch_size=3)
    low = budget.predict_peak(probe, 3, "block", 1, text_batch_size=3)
    limit = int(low + 0.3 * (top - low))
    torch.manual_seed(0)
    plain = prepared("clip", "ln", lean=False).train()
    m = prepared("clip", "ln", recompute="auto", memory_budget=limit, batch_size=3, text_batch_size=3).train()
    plan = m.leanclip_info["options"]["recompute_plan"]
    assert set(plan["policies"]) == {"image", "text"} and plan["predicted_peak_bytes"] <= limit
    assert plan["policies"]["image"] != ["none", "none"]
    _assert_equal_to_plain(plain, m)

