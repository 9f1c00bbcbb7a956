"""Hugging Face ``transformers`` CLIP / SigLIP as a model family (``leanclip.models.transformers``): tiny models saved
into a Hugging Face cache under tmp_path and read offline as ``transformers:<id>``. Outputs equal transformers' own
forward; every method's prepared model equals the plain one at the start and its gradients equal plain autograd
through transformers' forward; LoRA merges back into a plain transformers model exactly; checkpoints refuse another
architecture; the CLI trains and evaluates on the tiny CLIP."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub reads it: nothing here may touch the network

import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.func import functional_call  # noqa: E402

pytest.importorskip("transformers")

from leanclip import kernels, lean, merge, weights  # noqa: E402
from leanclip.checkpoint import load_trainable, save_trainable  # noqa: E402
from leanclip.features import class_logits, image_features, text_features  # noqa: E402
from leanclip.methods import prepare, trainable_parameters  # noqa: E402
from leanclip.models import transformers as hf  # noqa: E402
from tests.engine.cli_checks import last_json, run  # noqa: E402
from tests.engine.hf_family import CLIP_ID, SIGLIP_ID, lay_out_cache, save_repo, tiny_model  # noqa: E402

NAMES = {"clip": "transformers:" + CLIP_ID, "siglip": "transformers:" + SIGLIP_ID}
CLASSES = ["cat", "dog", "bird"]
# each method and what the engine sees of it: unlocked parameters only, or an added module
UNLOCKING = ["ln", "bitfit", "clipfit", "full", "lora"]
ADDING = ["linear-probe", "adapter", "llu", "coop"]


@pytest.fixture(autouse=True)
def _torch_backend():
    with kernels.set_backend("torch"):
        yield


@pytest.fixture
def cache(hf_cache):
    return lay_out_cache(hf_cache)


def build(family):
    return weights.create_model(NAMES[family]).double()


def batch(model, n=3):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, 32, 32, generator=g, dtype=torch.float64)
    tokens = hf.get_tokenizer(model)(["a photo of a cat", "the red car", "a tiny blue square object"][:n])
    return images, tokens


def prepared(family, method, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the lean notice: checked in test_lean_notice
        m = build(family)
        m = prepare(m, method, classnames=CLASSES, tokenizer=hf.get_tokenizer(m), **kw)
        # LoRA's pairs and LilT's adapters are made in float32 (trainable weights stay fp32): fp64 for the exact
        # checks; Houlsby / Compacter bottlenecks compute in float32 by design, the heads on float32 features
        return (m.double() if method in ("lora", "lilt-adapter") else m).eval()


# ----------------------------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_outputs_equal_transformers_forward(cache, family):
    m = weights.create_model(NAMES[family])
    images, tokens = batch(m)
    images = images.float()
    ref = cache[family](input_ids=tokens, pixel_values=images)
    logits = _logits(m, images, tokens)
    torch.testing.assert_close(logits, ref.logits_per_image, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(m.encode_image(images, normalize=True), ref.image_embeds, atol=1e-6, rtol=1e-6)
    if family == "clip":  # the tokenizer's attention mask changes nothing: CLIP pools causally at end of text
        mask = (tokens != 0).long()
        ref_masked = cache[family](input_ids=tokens, attention_mask=mask, pixel_values=images)
        torch.testing.assert_close(logits, ref_masked.logits_per_image, atol=1e-6, rtol=1e-6)
    # the engine's logits (class_logits: logit_scale and SigLIP's logit_bias) are transformers' logits_per_image
    with torch.no_grad():
        feats = image_features(m, images), text_features(m, ["cat", "red car"], ["a photo of a {}."],
                                                              hf.get_tokenizer(m))
        tok2 = hf.get_tokenizer(m)(["a photo of a cat.", "a photo of a red car."])
        torch.testing.assert_close(class_logits(m, *feats),
                                   cache[family](input_ids=tok2, pixel_values=images).logits_per_image,
                                   atol=1e-5, rtol=1e-5)


def test_what_the_engine_reads(cache):
    m = weights.create_model(NAMES["clip"])
    assert m.visual.image_size == 32 and m.visual.output_dim == 24 and m.text.context_length == 16
    assert m.visual.preprocess_cfg["std"][0] == pytest.approx(0.26862954)
    assert m.logit_scale is hf.to_transformers(m).logit_scale
    assert all(n.startswith(("visual.", "text.", "logit_")) for n, _ in m.named_parameters())
    s = weights.create_model(NAMES["siglip"])
    assert s.visual.preprocess_cfg["mean"] == (0.5, 0.5, 0.5) and s.logit_bias is hf.to_transformers(s).logit_bias


def test_user_errors_are_one_line(cache):
    with pytest.raises(ValueError, match="carries its own weights") as e:
        weights.create_model(NAMES["clip"], "openai")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="runs at its own 32x32"):
        weights.create_model(NAMES["clip"], image_size=64)
    with pytest.raises(ValueError, match="empty hub id"):
        weights.create_model("transformers:")
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE") as e:
        weights.create_model("transformers:nobody/not-cached")
    assert "nobody/not-cached" in str(e.value) and "\n" not in str(e.value)


def test_pickle_weights_are_never_read(cache, hf_cache):
    """A repo holding only pytorch_model.bin (a pickle) is refused in one line, before anything is unpickled."""
    save_repo(hf_cache, "leanclip-test/pickle-only", tiny_model("clip"))
    snap = next((hf_cache / "models--leanclip-test--pickle-only" / "snapshots").iterdir())
    torch.save({k: v for k, v in tiny_model("clip").state_dict().items()}, snap / "pytorch_model.bin")
    (snap / "model.safetensors").unlink()
    loads = []
    real_load = torch.load
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "load", lambda *a, **k: loads.append(a) or real_load(*a, **k))
        with pytest.raises(ValueError, match="pickle-only.* has no safetensors weights .*never reads pickled") as e:
            weights.create_model("transformers:leanclip-test/pickle-only")
    assert "\n" not in str(e.value) and not loads


def test_lean_by_default_and_a_notice_naming_an_unknown_layer(cache):
    m = prepared("clip", "ln")
    assert lean.is_lean(m) and m.leanclip_info["options"]["lean"] is True
    assert type(m.visual.model.encoder.layers[0].mlp.fc1).__name__ == "LeanLinear"
    other = weights.create_model(NAMES["clip"])
    layer = other.text.model.encoder.layers[1]
    layer.__class__ = type("MyEncoderLayer", (type(layer),), {})
    with pytest.warns(UserWarning, match=r"lean=False .*text\.model\.encoder\.layers\.1: .*MyEncoderLayer"):
        prepare(other, "ln")
    assert not lean.is_lean(other)
    with pytest.raises(ValueError, match="MyEncoderLayer"):
        prepare(other, "ln", lean=True)
    with pytest.raises(ValueError, match="frozen_dtype"):
        prepare(weights.create_model(NAMES["clip"]), "ln", frozen_dtype=torch.bfloat16)


@pytest.mark.parametrize("family", ["clip", "siglip"])
@pytest.mark.parametrize("method", ["ln", "lora", "full", "houlsby", "compacter", "lilt-adapter"])
@pytest.mark.parametrize("policy", ["none", "mlp", "mlp+qkv", "block"])
def test_lean_policies_equal_plain_gradients(cache, family, method, policy):
    """Every recompute policy of the lean encoder layers gives the plain model's outputs and gradients (fp64; the
    plain model runs transformers' own layers), and no frozen parameter gets one."""
    kw = {"dropout": 0.0} if method == "lora" else {"projections": False} if method == "lilt-adapter" else {}
    torch.manual_seed(0)
    plain = prepared(family, method, lean=False, **kw).train()
    torch.manual_seed(0)
    m = prepared(family, method, recompute=policy, **kw).train()
    assert lean.is_lean(m) and not lean.is_lean(plain)
    grads = backward_beside_plain(plain, m)
    for n, p in trainable_parameters(m):
        if n.startswith("lilt_temperature."):  # LilT's contrastive temperature: not in these logits
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, n
        torch.testing.assert_close(p.grad, grads[n].grad, atol=1e-11, rtol=1e-9, msg=lambda s: f"{n}: {s}")
    assert all(p.grad is None for p in m.parameters() if not p.requires_grad)


@pytest.mark.parametrize("family", ["clip", "siglip"])
@pytest.mark.parametrize("method", ["houlsby", "compacter"])
def test_in_layer_adapters_start_at_the_plain_model(cache, family, method):
    """Houlsby / Compacter adapters sit on each layer's out_proj and fc2 output (zero-initialised up projection):
    the prepared model computes what the plain one does, on transformers' layers and on the lean ones."""
    images, tokens = batch(build(family))
    ref = _logits(build(family), images, tokens)
    for lean_on in (False, True):
        m = prepared(family, method, lean=lean_on)
        assert len([n for n, _ in trainable_parameters(m) if f".{method}." in n]) > 0
        assert all(f".{method}." in n for n, _ in trainable_parameters(m))
        with torch.no_grad():
            torch.testing.assert_close(_logits(m, images, tokens), ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("method", ["lilt-ln", "lilt-bitfit", "lilt-proj", "lilt-adapter"])
def test_lilt_methods_and_their_projections(cache, method):
    """LilT's recipes train CLIP's visual / text projections (SigLIP: only its text head; its image tower has none,
    so projections=False is asked for in one line); the adapters go before every layer_norm1 / layer_norm2."""
    m = prepared("clip", method)
    names = {n for n, _ in trainable_parameters(m)}
    assert {"visual.proj.weight", "text.proj.weight", "lilt_temperature.log_t"} <= names or \
        {"visual.proj.weight", "text.proj.weight"} <= names
    if method == "lilt-adapter":
        assert any(".layer_norm1.adapter." in n for n in names) and any(".layer_norm2.adapter." in n for n in names)
    with pytest.raises(ValueError, match="SiglipVisionModel has none: pass projections=False") as e:
        prepared("siglip", method)
    assert "\n" not in str(e.value)
    if method != "lilt-proj":
        s = prepared("siglip", method, projections=False)
        assert "text.model.head.weight" not in dict(trainable_parameters(s))


def test_coop_on_siglip_refused(cache):
    m = weights.create_model(NAMES["siglip"])
    with pytest.raises(ValueError, match="coop.*SiglipTextModel"):
        prepare(m, "coop", classnames=CLASSES, tokenizer=hf.get_tokenizer(m))


# ----------------------------------------------------------------------------------------------------------- methods
def backward_beside_plain(plain, m) -> dict:
    """Randomise both models alike, check ``m``'s logits equal ``plain``'s (fp64), back-propagate the same weighted
    loss through each, and return ``plain``'s trainable parameters by name (their ``.grad`` to compare with)."""
    for x in (plain, m):
        _randomize(x)
    images, tokens = batch(m)
    ref, out = _logits(plain, images, tokens), _logits(m, images, tokens)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    _weighted(ref).backward()
    _weighted(out).backward()
    return dict(trainable_parameters(plain))


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in trainable_parameters(model):
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _hf_name(name):
    for ours, theirs in (("visual.model.", "vision_model."), ("visual.proj.", "visual_projection."),
                         ("text.model.", "text_model."), ("text.proj.", "text_projection.")):
        if name.startswith(ours):
            return theirs + name[len(ours):]
    return name


def _reference_params(model, leaves):
    """The prepared model's weights under transformers' names, its trainable tensors replaced by ``leaves`` and
    each LoRA pair folded into its projection (differentiably): what plain autograd differentiates."""
    values = {n: leaves.get(n, p.detach()) for n, p in model.named_parameters()}
    for name, mod in model.named_modules():
        if type(mod).__name__ == "LoRALinear":
            delta = mod.lora.scaling * (values[name + ".lora.B"] @ values[name + ".lora.A"])
            values[name + ".weight"] = values[name + ".weight"] + delta
    return {_hf_name(n): v for n, v in values.items() if ".lora." not in n}


def _weighted(logits):
    g = torch.Generator().manual_seed(7)
    return (logits * torch.randn(logits.shape, generator=g, dtype=logits.dtype)).sum()


def _logits(model, images, tokens):
    img, txt, scale, *bias = model(images, tokens)
    return scale * img @ txt.t() + (bias[0] if bias else 0)


@pytest.mark.parametrize("family", ["clip", "siglip"])
@pytest.mark.parametrize("method", UNLOCKING)
def test_unlocking_methods_equal_plain_autograd(cache, family, method):
    """At the start the prepared model computes what the plain one does; with its trainable parameters moved, its
    gradients equal those plain autograd gives through transformers' own forward on the same weights (fp64)."""
    m = prepared(family, method, **({"dropout": 0.0} if method == "lora" else {}))
    images, tokens = batch(m)
    with torch.no_grad():
        torch.testing.assert_close(_logits(m, images, tokens), _logits(build(family), images, tokens),
                                   atol=1e-12, rtol=0)
    _randomize(m)
    _weighted(_logits(m, images, tokens)).backward()
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in trainable_parameters(m)}
    hf_model = hf.to_transformers(build(family))
    ref = functional_call(hf_model, _reference_params(m, leaves), kwargs={"input_ids": tokens, "pixel_values": images})
    _weighted(ref.logits_per_image).backward()
    assert leaves
    for n, p in trainable_parameters(m):
        assert leaves[n].grad is not None and leaves[n].grad.abs().sum() > 0, n
        torch.testing.assert_close(p.grad, leaves[n].grad, atol=1e-10, rtol=1e-8, msg=lambda s: f"{n}: {s}")
    assert all(p.grad is None for p in m.parameters() if not p.requires_grad)


@pytest.mark.parametrize("family", ["clip", "siglip"])
@pytest.mark.parametrize("method", ADDING)
def test_adding_methods_start_from_the_plain_model(cache, family, method):
    """The frozen towers give the plain model's features; the linear probe starts at the zero-shot logits (SigLIP's
    logit_bias as its bias), CoOp's "a photo of a" context at the
    template's prompt, CLIP-Adapter and LLU keep the zero-shot ranking. A loss reaches every trainable parameter
    and nothing frozen."""
    if method == "coop" and family == "siglip":
        pytest.skip("refused: test_coop_on_siglip_refused")
    plain = build(family)
    tok = hf.get_tokenizer(plain)
    images, _ = batch(plain)
    with torch.no_grad():
        img0, txt0 = image_features(plain, images), text_features(plain, CLASSES, None, tok)
        zs = class_logits(plain, img0, txt0)
    m = prepared(family, method, **({"init_text": "a photo of a"} if method == "coop" else {}))
    if method == "llu":
        m.llu_image.set_bank(txt0)
        m.llu_text.set_bank(img0)
    img = image_features(m, images)
    logits = class_logits(m, img, text_features(m, CLASSES, None, tok))
    if method in ("linear-probe", "coop"):
        torch.testing.assert_close(logits.detach(), zs, atol=1e-5, rtol=1e-5)  # float32 features
    else:
        assert torch.equal(logits.argsort(1), zs.argsort(1))
    _weighted(logits).backward()
    assert trainable_parameters(m)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in trainable_parameters(m))
    assert all(p.grad is None for p in m.parameters() if not p.requires_grad)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_lora_merge_gives_back_an_equal_transformers_model(cache, family):
    m = prepared(family, "lora", rank=2, targets="q,k,v,out,fc,proj")
    _randomize(m, seed=3)
    images, tokens = batch(m)
    merged = merge(m)
    assert type(merged).__name__ == ("CLIPModel" if family == "clip" else "SiglipModel")
    assert not any(type(x).__name__ == "LoRALinear" for x in merged.modules())
    assert any(type(x).__name__ == "LoRALinear" for x in m.modules())  # the prepared model is left as it was
    out = merged(input_ids=tokens, pixel_values=images)
    torch.testing.assert_close(out.logits_per_image, _logits(m, images, tokens), atol=1e-10, rtol=1e-10)


# ----------------------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_refuses_another_architecture(cache, hf_cache, tmp_path):
    m = prepared("clip", "ln")
    path = save_trainable(m, tmp_path / "ln.safetensors")
    other = prepared("clip", "ln")
    load_trainable(other, path)
    with pytest.raises(ValueError, match="does not match the model|another architecture") as e:
        load_trainable(prepared("siglip", "ln"), path)
    assert "\n" not in str(e.value) and "ln.safetensors" in str(e.value)
    # the same shapes, another activation: only the stated fingerprint tells them apart
    gelu = tiny_model("clip")
    gelu.config.text_config.hidden_act = "gelu"
    save_repo(hf_cache, "leanclip-test/tiny-clip-gelu", gelu)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        target = prepare(weights.create_model("transformers:leanclip-test/tiny-clip-gelu").double(), "ln")
    with pytest.raises(ValueError, match="another architecture") as e:
        load_trainable(target, path)
    assert "\n" not in str(e.value)
    from leanclip.configs import create_random_model, register_tiny_config

    register_tiny_config()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiny = prepare(create_random_model("leanclip-tiny", 0), "ln")
    with pytest.raises(ValueError):
        load_trainable(tiny, path)


# ----------------------------------------------------------------------------------------------------------- CLI
def test_cli_train_eval_zeroshot_round_trip(cache, capsys, tmp_path, synth_dir):
    data = ["--synthetic-classes", 3, "--synthetic-dir", synth_dir, "--no-progress", "--threads", 1]
    out_dir = tmp_path / "run"
    rc, out, err = run(capsys, "train", "--model", NAMES["clip"], "--method", "lora", "--shots", 2, "--epochs", 1,
                       "--batch-size", 4, "--output", out_dir, *data)
    assert rc == 0, err
    res = last_json(out)
    assert res["method"] == "lora" and res["steps"] == 2
    rc, out, err = run(capsys, "eval", "--checkpoint", out_dir / "checkpoint.safetensors", *data)
    assert rc == 0, err
    assert last_json(out)["top1"] == pytest.approx(res["metrics"]["test"]["top1"])
    rc, out, err = run(capsys, "zeroshot", "--model", NAMES["siglip"], *data)
    assert rc == 0, err
    assert last_json(out)["command"] == "zeroshot" and last_json(out)["n"] > 0
    rc, out, err = run(capsys, "train", "--model", NAMES["clip"], "--pretrained", "openai", "--method", "ln", *data)
    assert rc == 2 and "carries its own weights" in err and len(err.strip().splitlines()) == 1
    rc, out, err = run(capsys, "zeroshot", "--model", "transformers:nobody/not-cached", *data)
    assert rc == 2 and "nobody/not-cached" in err and len(err.strip().splitlines()) == 1
    rc, out, err = run(capsys, "zeroshot", "--model", NAMES["clip"], "--image-size", 64, *data)
    assert rc == 2 and "runs at its own 32x32" in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------------------------- boundary
def test_transformers_internals_only_in_the_boundary():
    """Only leanclip.models.transformers imports transformers (the rest of the engine goes through it)."""
    import ast
    from pathlib import Path

    engine = Path(__file__).resolve().parents[2] / "engine"
    for path in engine.rglob("*.py"):
        if path == engine / "models" / "transformers.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            assert not any(n.split(".")[0] == "transformers" for n in names), f"{path.name}:{node.lineno}"


def test_lean_policies_keep_less(cache):
    """What autograd keeps for backward (leanclip.memory) shrinks policy by policy: plain >= none (frozen projections
    keep no input) > mlp > mlp+qkv > block, on the tiny CLIP with LN trained (fp32, train mode)."""
    from leanclip.memory import saved_activation_bytes

    images = torch.randn(4, 3, 32, 32)
    kept = {}
    for policy in ("plain", "none", "mlp", "mlp+qkv", "block"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = weights.create_model(NAMES["clip"])
            prepare(m, "ln", tower="image", **({"lean": False} if policy == "plain" else {"recompute": policy}))
        kept[policy] = saved_activation_bytes(lambda: m.encode_image(images), exclude=m)[1]
    assert kept["plain"] >= kept["none"] > kept["mlp"] > kept["mlp+qkv"] > kept["block"] > 0, kept


def test_cli_contrastive_task(cache, capsys, tmp_path):
    """LilT's contrastive alignment (synthetic pairs) and retrieval evaluation on the tiny transformers CLIP."""
    rc, out, err = run(capsys, "train", "--task", "contrastive", "--model", NAMES["clip"], "--method", "lilt-ln",
                       "--synthetic-pairs", 16, "--synthetic-eval-pairs", 8, "--epochs", 1, "--batch-size", 8,
                       "--no-progress", "--threads", 1, "--output", tmp_path / "lilt")
    assert rc == 0, err
    res = last_json(out)
    assert res["method"] == "lilt-ln" and res["steps"] == 2


def test_cli_sweep(cache, capsys, tmp_path, synth_dir):
    """A few-shot sweep (in-process cells) on the tiny transformers CLIP; --pretrained beside it is refused first."""
    grid = ["sweep", "--protocol", "fewshot", "--methods", "ln,zeroshot", "--datasets", "synthetic", "--shots", 1,
            "--seeds", 1, "--epochs", 1, "--batch-size", 4, "--model", NAMES["clip"], "--workers", 0, "--threads", 1,
            "--output", tmp_path / "s"]
    rc, out, err = run(capsys, *grid)
    assert rc == 0, err
    summary = last_json(out)
    assert summary["failed"] == 0 and summary["done"] == 2, summary
    rc, out, err = run(capsys, *grid, "--pretrained", "openai")
    assert rc == 2 and "carries its own weights" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_lean_text_reads_the_context_up_to_the_last_end_of_text(cache, family):
    """A lean CLIP runs its text tower on the tokens up to the batch's last end-of-text token (exact: causal attention,
    pooled there); SigLIP, pooled at the last padded position, keeps the whole context."""
    m = prepared(family, "ln")
    _, tokens = batch(m)
    seen = []
    m.text.model.embeddings.register_forward_hook(lambda _m, _i, out: seen.append(out.shape[1]))
    with torch.no_grad():
        torch.testing.assert_close(lean.encode_text_lean(m, tokens), m.encode_text(tokens), atol=1e-12, rtol=0)
    eot = int((tokens == hf.get_tokenizer(m).tokenizer.eos_token_id).int().argmax(-1).max()) + 1
    assert seen == ([eot, 16] if family == "clip" else [16, 16]) and eot < 16
