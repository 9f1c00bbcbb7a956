"""``lilt-deep`` on ``transformers`` CLIP / SigLIP (``leanclip.models.transformers.new_layer_like``): the appended
encoder layer is the identity at the start (both inits), counted in the tower config (hidden states, save_pretrained);
the lean layers under every recompute policy give the plain model's outputs and gradients; strip restores the model;
checkpoints carry the layer; the CLI trains and evaluates with it. Tiny models in a Hugging Face cache, offline."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub reads it: nothing here may touch the network

import json  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("transformers")

from leanclip import lean, weights  # noqa: E402
from leanclip.checkpoint import load_trainable, save_trainable  # noqa: E402
from leanclip.lifecycle import strip  # noqa: E402
from leanclip.methods import lilt, prepare, trainable_parameters  # noqa: E402
from leanclip.models import transformers as hf  # noqa: E402
from tests.engine.cli_checks import run  # noqa: E402
# the fixtures too: the tiny models' Hugging Face cache (cache) and the torch kernel backend (autouse)
from tests.engine.test_transformers_family import (  # noqa: E402,F401
    NAMES, _logits, _torch_backend, backward_beside_plain, batch, build, cache,
)

DEPTH = 2  # the tiny towers' layers (tests/engine/hf_family.py)

def deep(family, **kw):
    """The fp64 tiny model prepared with lilt-deep (SigLIP's image tower has no projection: projections=False)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prepare(build(family), "lilt-deep", projections=family == "clip", **kw).eval()


def _towers(m):
    return {"image": m.visual.model, "text": m.text.model}


@pytest.mark.parametrize("family", ["clip", "siglip"])
@pytest.mark.parametrize("init", ["copy", "random"])
def test_appended_layer_starts_as_the_identity(cache, family, init):
    """One layer more per tower, its out_proj / fc2 zero, so the outputs are the unprepared model's (exactly on
    transformers' layers, to rounding on the lean ones); ``copy`` repeats the last layer's other weights, ``random``
    draws them as transformers does; the tower config counts the layer, so hidden_states has layers + 1 entries."""
    images, tokens = batch(build(family))
    with torch.no_grad():  # frozen: nn.MultiheadAttention (SigLIP's pooling head) takes the same path as below
        ref = _logits(build(family).requires_grad_(False), images, tokens)
    for lean_on in (False, True):
        m = deep(family, lean=lean_on, deep_init=init)
        assert lean.is_lean(m) == lean_on
        with torch.no_grad():
            torch.testing.assert_close(_logits(m, images, tokens), ref, atol=0 if not lean_on else 1e-12, rtol=0)
    for tower, tm in _towers(m).items():
        layers = tm.encoder.layers
        assert len(layers) == DEPTH + 1 and tm.config.num_hidden_layers == DEPTH + 1
        assert type(layers[-1]).__name__ == type(layers[0]).__name__  # the lean swap covers it
        new, last = layers[-1], layers[-2]
        assert all(not p.any() for p in (*new.self_attn.out_proj.parameters(), *new.mlp.fc2.parameters()))
        assert torch.equal(new.mlp.fc1.weight, last.mlp.fc1.weight) == (init == "copy"), tower
        assert new.self_attn.config is tm.config
    trained = {n for n, _ in trainable_parameters(m)}
    assert {f"visual.model.encoder.layers.{DEPTH}.self_attn.q_proj.weight",
            f"text.model.encoder.layers.{DEPTH}.mlp.fc2.bias"} <= trained
    assert not any(f"encoder.layers.{DEPTH - 1}.self_attn.q_proj" in n for n in trained)
    with torch.no_grad():
        out = hf.to_transformers(m).vision_model(pixel_values=images, output_hidden_states=True)
    assert len(out.hidden_states) == DEPTH + 2
    torch.testing.assert_close(out.hidden_states[-1], out.hidden_states[-2], atol=0, rtol=0)


@pytest.mark.parametrize("family", ["clip", "siglip"])
@pytest.mark.parametrize("policy", ["none", "mlp", "mlp+qkv", "block"])
def test_lean_policies_equal_plain_gradients(cache, family, policy):
    """With the trainable weights moved (the appended layer's zero projections too), every recompute policy of the
    lean layers gives the outputs and gradients of transformers' own layers (fp64), nothing frozen gets one."""
    torch.manual_seed(0)
    plain = deep(family, lean=False).train()
    torch.manual_seed(0)
    m = deep(family, recompute=policy).train()
    assert lean.is_lean(m) and not lean.is_lean(plain)
    grads = backward_beside_plain(plain, m)
    assert any(n.startswith(f"visual.model.encoder.layers.{DEPTH}.") for n in grads)
    for n, p in trainable_parameters(m):
        if n.startswith("lilt_temperature."):  # the contrastive temperature: not in these logits
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, n
        torch.testing.assert_close(p.grad, grads[n].grad, atol=1e-11, rtol=1e-9, msg=lambda s: f"{n}: {s}")
    assert all(p.grad is None for p in m.parameters() if not p.requires_grad)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_strip_restores_the_model(cache, family):
    base = build(family)
    m = deep(family, deep_init="random")
    strip(m, lilt.ADDED)
    assert not lilt.deep_blocks(m)
    for tm in _towers(m).values():
        assert len(tm.encoder.layers) == DEPTH and tm.config.num_hidden_layers == DEPTH
    state = {k: v for k, v in m.state_dict().items() if not k.startswith("lilt_temperature.")}
    assert state.keys() == base.state_dict().keys()
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in state.items())
    again = prepare(m, "lilt-deep", projections=family == "clip")  # re-preparing replaces, never stacks
    assert len(again.visual.model.encoder.layers) == DEPTH + 1 and len(lilt.deep_blocks(again)) == 2


def test_checkpoint_carries_the_layer_and_save_pretrained_the_depth(cache, tmp_path):
    """save_trainable -> a model prepared with lilt-deep again loads the appended layers (prepare re-creates them);
    the transformers model saved with save_pretrained reloads at the new depth and computes the same."""
    m = deep("clip", lean=False)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, p in trainable_parameters(m):
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    images, tokens = batch(m)
    want = _logits(m, images, tokens)
    path = save_trainable(m, tmp_path / "deep.safetensors")
    other = deep("clip")
    load_trainable(other, path)
    torch.testing.assert_close(_logits(other, images, tokens), want, atol=1e-12, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ln = prepare(build("clip"), "lilt-ln")
    with pytest.raises(ValueError, match="lilt-deep") as e:
        load_trainable(ln, path)
    assert "\n" not in str(e.value)
    hf.to_transformers(m).save_pretrained(tmp_path / "saved")
    reloaded = type(hf.to_transformers(m)).from_pretrained(tmp_path / "saved").double()
    assert reloaded.config.vision_config.num_hidden_layers == DEPTH + 1
    got = reloaded(input_ids=tokens, pixel_values=images).logits_per_image
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_failed_prepare_restores_the_layer_count(cache):
    """A prepare that fails after the layers were appended (no recompute plan fits the budget) puts back the layers
    and the config's count of them."""
    m = build("clip")
    with pytest.raises(ValueError, match="memory budget"):
        prepare(m, "lilt-deep", recompute="auto", memory_budget=1000, batch_size=4)
    for tm in _towers(m).values():
        assert len(tm.encoder.layers) == DEPTH and tm.config.num_hidden_layers == DEPTH


def test_unknown_layer_class_refused_in_one_line(cache):
    m = weights.create_model(NAMES["clip"])
    layer = m.visual.model.encoder.layers[-1]
    layer.__class__ = type("MyEncoderLayer", (type(layer),), {})
    with pytest.raises(ValueError, match="lilt-deep.*image tower .*CLIPVisionModel ends in .*MyEncoderLayer") as e:
        prepare(m, "lilt-deep", lean=False)
    assert "\n" not in str(e.value) and len(m.visual.model.encoder.layers) == DEPTH
    assert prepare(m, "lilt-deep", tower="text", lean=False) is m  # the other tower still takes one


def test_cli_contrastive_train_then_eval(cache, capsys, tmp_path):
    common = ["--model", NAMES["clip"], "--synthetic-eval-pairs", 16, "--threads", 1, "--no-progress"]
    rc, out, err = run(capsys, "train", "--task", "contrastive", "--method", "lilt-deep", "--synthetic-pairs", 16,
                       "--batch-size", 8, "--epochs", 1, "--output", tmp_path, *common)
    assert rc == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert res["task"] == "contrastive" and res["steps"] == 2
    rc, out, err = run(capsys, "eval", "--task", "retrieval", "--checkpoint", tmp_path, *common[2:])
    assert rc == 0, err
    ev = json.loads(out.strip().splitlines()[-1])
    assert ev["method"] == "lilt-deep" and ev["mean"] == res["metrics"]["mean"]
