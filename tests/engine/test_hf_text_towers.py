"""open_clip models with a Hugging Face text tower (``HFTextEncoder``: open_clip's roberta / xlm-roberta / mt5 configs,
LilT's BERT): the methods and the lean layers on them (``leanclip.models.hf_text``). Tiny configs written to a local
folder, random weights, offline. BERT-style layers (BertLayer, RobertaLayer, XLMRobertaLayer) go lean under every
recompute policy with features and gradients equal to the plain modules (fp32 to 1e-5, fp64 to 1e-12); mT5's T5
blocks keep their own modules with a one-line notice naming the class; LoRA sits on the q / k / v projections and
merges exactly."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub reads it: nothing here may touch the network

import copy  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("transformers")

from leanclip import lean, methods  # noqa: E402
from leanclip.configs import create_random_model  # noqa: E402
from leanclip.lora_linear import sites as lora_sites  # noqa: E402
from leanclip.methods import lilt, lora  # noqa: E402
from leanclip.models import hf_text  # noqa: E402
from leanclip.models.transformers_lean import LeanLinear  # noqa: E402
from tests.engine.hf_text_family import register_hf_text, tokens  # noqa: E402
from tests.engine.peft_checks import prepare_with_notices, projection_loss, randomize_trainable  # noqa: E402

BERT_STYLE = ["bert", "roberta", "xlm-roberta"]
FAMILIES = BERT_STYLE + ["mt5"]
POLICIES = ["none", "mlp", "mlp+qkv", "block"]
METHODS = {"ln": {}, "bitfit": {}, "lora": {"targets": "q,k,v,out,fc,proj", "dropout": 0.0}, "houlsby": {},
           "compacter": {"reduction": 4}, "lilt-ln": {}, "lilt-adapter": {}}
TOL = {"atol": 1e-5, "rtol": 1e-5}
_BASES: dict = {}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("hf-text")


def base(folder, family: str, dtype=torch.float32):
    if family not in _BASES:
        _BASES[family] = create_random_model(register_hf_text(folder / family, family), seed=0)
    return copy.deepcopy(_BASES[family]).to(dtype)


def batch(model, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 3, 32, 32, generator=g).to(dtype), tokens(model.text.config.pad_token_id)


def _run(model, data):
    """Features and the gradients of every trainable parameter, with the trainable parameters moved off their
    (often zero) start."""
    randomize_trainable(model)
    img = model.train().encode_image(data[0], normalize=True)
    txt = model.encode_text(data[1], normalize=True)
    projection_loss(img, txt).backward()
    return (img.detach(), txt.detach()), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(got, ref, tol):
    (feats, grads), (ref_feats, ref_grads) = got, ref
    for a, b in zip(feats, ref_feats):
        torch.testing.assert_close(a, b, **tol)
    assert grads.keys() == ref_grads.keys()
    assert any(n.startswith("text.") for n in grads), "no text-tower parameter trains"
    for n, g in grads.items():
        if ref_grads[n] is None:  # a parameter the features do not depend on (LilT's temperature)
            assert g is None, n
        else:
            torch.testing.assert_close(g, ref_grads[n], **tol, msg=n)


def _plain_reference(folder, family, method, opts, dtype=torch.float32):
    """The same method on plain modules: LoRA's open_clip image pairs need the lean blocks, so its reference is
    the text tower alone (the lean run then trains the text tower alone too)."""
    if method == "lora":
        opts = {**opts, "tower": "text"}
        if family == "mt5":  # its gated MLP has no single fc projection
            opts["targets"] = "q,k,v,out,proj"
    m = base(folder, family, dtype)
    prepare_with_notices(m, method, lean=False, **opts)
    return m, opts


# ----------------------------------------------------------------------------------------------------------- lean
@pytest.mark.parametrize("family", BERT_STYLE)
def test_bert_style_layers_go_lean(folder, family):
    m = base(folder, family)
    assert prepare_with_notices(m, "ln") == []
    assert m.leanclip_info["options"]["lean"] is True and "lean_towers" not in m.leanclip_info["options"]
    layer = hf_text.layers(m)[0][1]
    assert type(layer).__name__.startswith("Lean") and isinstance(layer, hf_text.bert_layers())
    assert type(layer.attention.self.query) is LeanLinear and type(layer.output.dense) is LeanLinear
    assert type(layer.output.LayerNorm) is hf_text.LeanHFLayerNorm
    lean.remove_lean(m)
    layer = hf_text.layers(m)[0][1]
    assert not lean.is_lean(m) and type(layer) in hf_text.bert_layers()
    assert type(layer.attention.self.query) is torch.nn.Linear and type(layer.output.LayerNorm) is torch.nn.LayerNorm


def test_mt5_keeps_its_modules_with_a_notice(folder):
    m = base(folder, "mt5")
    notes = prepare_with_notices(m, "lora")
    assert len(notes) == 1 and "\n" not in notes[0]
    assert "lean on the image tower only: text tower layer 0 is transformers.models.mt5.modeling_mt5.MT5Block" in \
        notes[0]
    assert type(hf_text.layers(m)[0][1]).__name__ == "MT5Block" and lean.is_lean(m.visual)
    with pytest.raises(ValueError, match="lean=True.*MT5Block"):
        methods.prepare(base(folder, "mt5"), "ln", lean=True)


# every policy on RoBERTa; BERT and XLM-RoBERTa (the same layer code) at both ends; mT5 plain
RUNS = [("roberta", p) for p in POLICIES] + [(f, p) for f in ("bert", "xlm-roberta") for p in ("none", "block")] + [
    ("mt5", "none")]


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family,policy", RUNS)
def test_prepared_equals_plain(folder, family, method, policy):
    """Lean layers under ``policy`` and ``transformers``' plain modules give the same features and the same
    gradient to every trainable parameter (mT5 runs plain on both sides: the methods' placement is checked)."""
    if family == "mt5" and method not in ("lora", "houlsby", "compacter"):
        pytest.skip("mT5 has neither nn.LayerNorm (RMSNorm) nor biases")
    ref_model, opts = _plain_reference(folder, family, method, METHODS[method])
    ref = _run(ref_model, batch(ref_model))
    m = base(folder, family)
    prepare_with_notices(m, method, recompute=policy, **opts)
    assert lean.is_lean(m)
    _assert_same(_run(m, batch(m)), ref, TOL)


@pytest.mark.parametrize("method", ["ln", "lora", "houlsby"])
def test_prepared_equals_plain_in_float64(folder, method):
    """The text tower alone (the open_clip image tower's lean blocks differ from nn.MultiheadAttention in rounding,
    which Houlsby's float32 adapters would carry into the features)."""
    ref_model, opts = _plain_reference(folder, "roberta", method, {**METHODS[method], "tower": "text"}, torch.float64)
    ref = _run(ref_model, batch(ref_model, torch.float64))
    for policy in POLICIES:
        m = base(folder, "roberta", torch.float64)
        prepare_with_notices(m, method, recompute=policy, **opts)
        _assert_same(_run(m, batch(m, torch.float64)), ref, {"atol": 1e-12, "rtol": 1e-12})


def test_dropout_is_replayed_on_recompute(folder, tmp_path):
    """With hidden and attention dropout on, the lean layers draw the plain layers' masks (same seed) and replay
    them when a checkpointed branch is recomputed."""
    name = register_hf_text(tmp_path / "bert-dropout", "bert", name="leanclip-test-hf-bert-dropout",
                            hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2)
    made = create_random_model(name, seed=0)
    ref = methods.prepare(copy.deepcopy(made), "lilt-bitfit", lean=False)
    torch.manual_seed(5)
    want = _run(ref, batch(ref))
    for policy in POLICIES:
        m = methods.prepare(copy.deepcopy(made), "lilt-bitfit", recompute=policy)
        torch.manual_seed(5)
        _assert_same(_run(m, batch(m)), want, TOL)


# ----------------------------------------------------------------------------------------------------------- methods
@pytest.mark.parametrize("method", ["lora", "houlsby", "compacter", "lilt-adapter"])
@pytest.mark.parametrize("family", FAMILIES)
def test_identity_at_init(folder, family, method):
    if family == "mt5" and method == "lilt-adapter":
        pytest.skip("no LayerNorm to put an adapter before")
    ref = base(folder, family).eval()
    m = base(folder, family)
    prepare_with_notices(m, method, **({"reduction": 4} if method == "compacter" else {}))
    data = batch(m)
    with torch.no_grad():
        torch.testing.assert_close(m.eval().encode_text(data[1]), ref.encode_text(data[1]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_sites_and_exact_merge(folder, family):
    m = base(folder, family)
    targets = "q,k,v,out,proj" if family == "mt5" else "q,k,v,out,fc,proj"
    prepare_with_notices(m, "lora", targets=targets)
    names = [n for n, _ in lora_sites(m)]
    first = "text.transformer.block.0.layer.0.SelfAttention.q" if family == "mt5" else \
        "text.transformer.encoder.layer.0.attention.self.query"
    assert first in names and len(names) == 2 * len(targets.split(","))
    assert {n for n, _ in methods.trainable_parameters(m) if n.startswith("text.")} == {
        f"{n}.lora.{x}" for n in names for x in "AB"}
    randomize_trainable(m)
    merged = lora.merge(m)
    assert not lean.is_lean(merged) and not lora_sites(merged) and not lora.lora_modules(merged)
    data = batch(m)
    with torch.no_grad():
        for a, b in zip((m.eval().encode_image(data[0]), m.encode_text(data[1])),
                        (merged.eval().encode_image(data[0]), merged.encode_text(data[1]))):
            torch.testing.assert_close(a, b, **TOL)


def test_mt5_refusals_name_the_class(folder):
    with pytest.raises(ValueError, match="target 'fc' has no single nn.Linear in .*MT5Block.*wi"):
        methods.prepare(base(folder, "mt5"), "lora", targets="q,fc")
    with pytest.raises(ValueError, match="lilt-adapter.*HFTextEncoder"):
        methods.prepare(base(folder, "mt5"), "lilt-adapter", tower="text")
    with pytest.raises(ValueError, match="lilt-deep.*BERT-style.*MT5Block"):
        methods.prepare(base(folder, "mt5"), "lilt-deep")


def test_houlsby_sits_before_the_residual_add(folder):
    m = base(folder, "roberta")
    prepare_with_notices(m, "houlsby")
    ads = [n for n, _ in methods.houlsby.inlayer_adapters(m) if n.startswith("text.")]
    assert ads == [f"text.transformer.encoder.layer.{i}.{s}.houlsby" for i in range(2)
                   for s in ("attention.output.dropout", "output.dropout")]
    assert methods.count_trainable(m) == 2 * 2 * (2 * 64 * 8 + 8 + 64) + 2 * 2 * (2 * 32 * 4 + 4 + 32)


def test_lilt_deep_appends_a_layer_that_starts_as_the_last_one_repeated(folder):
    """A post-LN layer cannot start as the identity: ``deep_init=copy`` appends a copy of the last layer, so the
    tower starts as the original with its last layer applied twice (checked against that plain model), and all of
    the new layer trains; ``random`` starts it from BERT's initialisation."""
    m = base(folder, "roberta")
    prepare_with_notices(m, "lilt-deep", tower="text")
    (name, new), = lilt.deep_blocks(m)
    assert name == "text.transformer.encoder.layer.2" and all(p.requires_grad for p in new.parameters())
    ref = base(folder, "roberta")
    ref.text.transformer.encoder.layer.append(copy.deepcopy(ref.text.transformer.encoder.layer[-1]))
    data = batch(m)
    with torch.no_grad():
        torch.testing.assert_close(m.eval().encode_text(data[1]), ref.eval().encode_text(data[1]), **TOL)
        assert not torch.allclose(m.encode_text(data[1]), base(folder, "roberta").eval().encode_text(data[1]))
    m = base(folder, "roberta")
    prepare_with_notices(m, "lilt-deep", tower="text", deep_init="random")
    new = lilt.deep_blocks(m)[0][1]
    assert torch.equal(new.output.LayerNorm.weight, torch.ones(32)) and not new.intermediate.dense.bias.any()
    assert 0.01 < float(new.attention.self.query.weight.detach().std()) < 0.03  # N(0, initializer_range = 0.02)
    methods.prepare(m, "lilt-ln")
    assert len(hf_text.layers(m)) == 2 and not lilt.deep_blocks(m)
