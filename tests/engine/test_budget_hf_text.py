"""The step-peak estimate and the recompute planner on open_clip's Hugging Face text towers (``HFTextEncoder`` of
BERT-style layers, ``leanclip.models.hf_text``): the geometry reader, the saved-bytes estimate against what autograd
keeps under every policy, ``block`` over chunks of samples exact against plain, and a budget's plan covering both
towers, fitting, and equal to plain (features and gradients, fp64). Tiny configs, random weights, offline."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub reads it: nothing here may touch the network

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("transformers")

from leanclip import budget, geometry, lean, saved_bytes  # noqa: E402
from leanclip.configs import create_random_model  # noqa: E402
from leanclip.memory import saved_activation_bytes  # noqa: E402
from leanclip.models import hf_text  # noqa: E402
from tests.engine.hf_text_family import register_hf_text  # noqa: E402
from tests.engine.peft_checks import prepare_with_notices  # noqa: E402
from tests.engine.test_hf_text_towers import (  # noqa: E402,F401  (folder: the fixture)
    BERT_STYLE, _assert_same, _plain_reference, _run, base, batch, folder,
)

FP64 = {"atol": 1e-12, "rtol": 1e-12}
CHUNKED = {"atol": 1e-11, "rtol": 1e-9}  # a parameter's gradient summed over chunks: another summation order
TEXT_BATCH, TEXT_LEN = 4, 16


@pytest.mark.parametrize("family", BERT_STYLE)
def test_geometry_reads_the_hf_text_tower(folder, family):
    m = base(folder, family)
    prepare_with_notices(m, "ln")
    g = geometry.tower_geometry(m, "text")
    assert g.family == "hf_text" and g.depth == 2 and g.width == 32 and g.hidden == 64 and g.heads == 2
    assert g.blocks == tuple(layer for _, layer in hf_text.layers(m))
    assert g.tokens == m.text.context_length and geometry.tower_geometry(m, "text", text_len=7).tokens == 7
    # post-LN: both LayerNorm inputs stay under every policy but block; GELU at ratio 2 keeps 2 units
    assert g.units == {"none": 8.0, "mlp": 7.0, "mlp+qkv": 5.0, "block": 1.0}
    assert [s.name for s in budget.tower_shapes(m, 2)] == ["image", "text"]


def test_mt5_has_no_text_geometry(folder):
    """mT5's blocks keep transformers' modules: no estimate, and the planner leaves that tower alone."""
    m = base(folder, "mt5")
    prepare_with_notices(m, "lora")
    assert geometry.tower_geometry(m, "text") is None
    assert [s.name for s in budget.tower_shapes(m, 2)] == ["image"]


def _assert_text_estimate_follows(m, tol):
    """The text tower's saved-bytes estimate is within ``tol`` of what autograd keeps, every policy."""
    m.train()
    ids = torch.randint(3, 64, (TEXT_BATCH, TEXT_LEN), generator=torch.Generator().manual_seed(0))
    for policy in lean.POLICIES:
        lean.set_recompute(m, policy)
        kept = saved_activation_bytes(lambda: m.encode_text(ids), exclude=m)[1]
        est = saved_bytes.estimate_saved_bytes(m, policy, 0, text_batch_size=TEXT_BATCH, text_len=TEXT_LEN)
        assert abs(est - kept) <= tol * kept, (policy, est, kept)


@pytest.mark.parametrize("family", BERT_STYLE)
def test_estimate_matches_saved_bytes(folder, family):
    m = base(folder, family)
    prepare_with_notices(m, "ln")
    _assert_text_estimate_follows(m, 0.1)


# methods whose trainable pieces sit inside the layers: LoRA's pairs (with dropout on q / k / v; without dropout on
# every projection; with dropout after the attention only) and Houlsby / Compacter adapters after each sub-layer
IN_LAYER = {"lora": ("lora", {}),
            "lora-every-projection": ("lora", {"targets": "q,k,v,out,fc,proj", "dropout": 0.0}),
            "lora-out-fc": ("lora", {"targets": "out,fc", "dropout": 0.1}),
            "houlsby": ("houlsby", {}), "compacter": ("compacter", {})}


@pytest.mark.parametrize("run", list(IN_LAYER))
def test_estimate_counts_in_layer_methods(folder, run):
    method, opts = IN_LAYER[run]
    m = base(folder, "roberta")
    prepare_with_notices(m, method, **opts)
    _assert_text_estimate_follows(m, 0.1)


def test_estimate_counts_hidden_dropout_masks(tmp_path):
    """With hidden dropout on, each layer keeps two masks more (and the embeddings one) under every policy but
    block."""
    name = register_hf_text(tmp_path / "roberta-dropout", "roberta", name="leanclip-test-hf-roberta-dropout",
                            hidden_dropout_prob=0.1)
    m = create_random_model(name, seed=0)
    prepare_with_notices(m, "ln")
    assert geometry.tower_geometry(m, "text").units["none"] == 8.0 + 2.0  # CPU: a noise tensor per element
    _assert_text_estimate_follows(m, 0.1)


@pytest.mark.parametrize("method", ["ln", "lora"])
def test_chunked_block_equals_plain(folder, method):
    """``block`` over chunks of 2 samples (3 in the batch) on the text tower's lean layers: features and gradients
    equal transformers' plain layers (to rounding, the text tower alone)."""
    opts = {"tower": "text", **({"targets": "q,v,out", "dropout": 0.0} if method == "lora" else {})}
    ref_model, opts = _plain_reference(folder, "roberta", method, opts, torch.float64)
    ref = _run(ref_model, batch(ref_model, torch.float64))
    m = base(folder, "roberta", torch.float64)
    prepare_with_notices(m, method, recompute="block", recompute_chunk=2, **opts)
    assert {layer.leanclip_chunk for _, layer in hf_text.layers(m)} == {2}
    lora_dtype = {p.dtype for n, p in m.named_parameters() if ".lora." in n}
    # LoRA's factors stay float32 in a float64 model: their gradients, summed over chunks, round in float32
    _assert_same(_run(m, batch(m, torch.float64)), ref,
                 {"atol": 1e-8, "rtol": 1e-6} if torch.float32 in lora_dtype else CHUNKED)


@pytest.mark.parametrize("fraction", [0.0, 0.3])
def test_budget_plans_both_towers_and_equals_plain(folder, fraction):
    """A budget between the heaviest plan's peak and no recompute's: the plan covers the image tower's blocks and
    the text tower's layers, fits, is set on them, and the planned model equals plain (fp64)."""
    m = base(folder, "roberta", torch.float64)
    prepare_with_notices(m, "ln")
    images, ids = batch(m, torch.float64)
    sizes = {"text_batch_size": ids.shape[0], "text_len": ids.shape[1]}
    top = budget.predict_peak(m, images.shape[0], "none", **sizes)
    low = budget.predict_peak(m, images.shape[0], "block", 1, **sizes)
    assert low < top
    limit = int(low + fraction * (top - low))
    plan = budget.plan_recompute(m, limit, images.shape[0], **sizes)
    assert set(plan.policies) == {"image", "text"} and plan.peak <= limit
    assert "block" in plan.policies["text"] and (fraction > 0 or plan.chunk == 1)
    budget.apply_plan(m, plan)
    layers = [layer for _, layer in hf_text.layers(m)]
    assert [layer.leanclip_recompute for layer in layers] == list(plan.policies["text"])
    assert budget.current_peak(m, images.shape[0], **sizes) == plan.peak
    ref_model, _ = _plain_reference(folder, "roberta", "ln", {}, torch.float64)
    _assert_same(_run(m, batch(m, torch.float64)), _run(ref_model, batch(ref_model, torch.float64)), CHUNKED)


def test_the_cli_plans_for_the_tokenizers_context():
    """A Hugging Face text tower's own context (``max_position_embeddings``, 514 for RoBERTa) is far longer than the
    77 tokens open_clip's tokenizer feeds it: the command line plans for the tokenizer's."""
    import types

    from leanclip.cli.common import recompute_kwargs

    args = types.SimpleNamespace(memory_budget="1GiB", recompute="none", recompute_chunk=None)
    kw = recompute_kwargs(args, 4, 8, tokenizer=types.SimpleNamespace(context_length=77))
    assert kw["recompute"] == "auto" and kw["text_len"] == 77 and kw["text_batch_size"] == 8
    assert recompute_kwargs(args, 4, 8)["text_len"] is None  # no tokenizer: the tower's own context
