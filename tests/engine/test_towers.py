"""LilT's central setting: separately pretrained, unaligned towers - a timm ViT image tower (DeiT / DINO in real use)
and a Hugging Face BERT text tower - assembled as an open_clip CustomTextCLIP with fresh projections
(``leanclip.configs.register_unaligned_config``). Built offline: a timm ViT registered small (img 32, width 32, 2
blocks) and a tiny BERT from a local folder (config.json + a vocab.txt written here), random weights,
HF_HUB_OFFLINE=1. Every LilT method prepares (lilt-deep: tests/engine/test_lilt.py), trains with both towers on the
lean modules (the timm blocks and BERT's layers, ``leanclip.models.hf_text``), with gradients equal to plain autograd
on an unprepared copy; train_contrastive / evaluate_retrieval and the CLI run on it."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub reads it: nothing here may touch the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import copy  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

timm = pytest.importorskip("timm")
pytest.importorskip("transformers")

from leanclip import lean, methods  # noqa: E402
from leanclip.lifecycle import strip  # noqa: E402
from leanclip.methods import lilt
from leanclip.configs import create_random_model, register_unaligned_config  # noqa: E402
from leanclip.contrastive import ContrastiveConfig, evaluate_retrieval, train_contrastive  # noqa: E402
from leanclip.pairs import synthetic_pairs  # noqa: E402
from tests.engine.hf_text_family import TIMM_VIT as TIMM_NAME, register_timm_vit  # noqa: E402
from tests.engine.peft_checks import clip_loss, prepare_with_notices  # noqa: E402

MODEL_NAME = "leanclip-test-unaligned"
EMBED = 16
PLAIN_METHODS = ["lilt-ln", "lilt-bitfit", "lilt-adapter", "lilt-proj", "lit"]


def _write_tiny_bert(folder, words):
    """A BERT config (hidden 32, 2 layers, 2 heads, no dropout) and a WordPiece vocab of ``words``: what
    ``AutoConfig`` / ``AutoTokenizer.from_pretrained(folder)`` read, no weights (random init)."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(words)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (folder / "config.json").write_text(json.dumps({
        "model_type": "bert", "architectures": ["BertModel"], "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": len(vocab), "max_position_embeddings": 32,
        "type_vocab_size": 2, "pad_token_id": 0, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer",
                                                              "do_lower_case": True, "model_max_length": 32}))
    return str(folder)


@pytest.fixture(scope="module")
def pairs():
    return synthetic_pairs(64, size=32, seed=7)


@pytest.fixture(scope="module")
def name(tmp_path_factory):
    register_timm_vit()
    words = {w for c in synthetic_pairs(2000, size=32, seed=0).captions for w in re.findall(r"\w+|[^\w\s]", c.lower())}
    folder = _write_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), words)
    return register_unaligned_config(MODEL_NAME, timm_model=TIMM_NAME, hf_text=folder, embed_dim=EMBED,
                                     image_size=32, context_length=16)


@pytest.fixture(scope="module")
def base(name):
    return create_random_model(name, seed=0)


@pytest.fixture(scope="module")
def htok(name):
    import open_clip

    return open_clip.get_tokenizer(name)


# ----------------------------------------------------------------------------------------------------------- model
def test_assembled_model(base, htok, name):
    from open_clip.hf_model import HFTextEncoder
    from open_clip.model import CustomTextCLIP
    from open_clip.timm_model import TimmModel

    assert isinstance(base, CustomTextCLIP) and isinstance(base.visual, TimmModel)
    assert isinstance(base.text, HFTextEncoder) and base.text.config.model_type == "bert"
    tokens = htok(["a red square", "a blue circle on a dark background"])
    assert tokens.shape == (2, 16) and int(tokens[0, 0]) == 2  # [CLS] first, [PAD] = 0 after [SEP]
    assert base.encode_image(torch.randn(2, 3, 32, 32)).shape == (2, EMBED)
    assert base.encode_text(tokens).shape == (2, EMBED)
    # the fresh projections LilT trains
    assert set(lilt.projection_names(base)) == {"visual.head.proj.weight", "text.proj.weight"}
    assert methods.embed_dim(base) == EMBED


def test_pretrained_flags_are_the_towers_own_weights(name):
    """pretrained=True asks timm / transformers for the towers' weights (with network); the config records it and
    leanclip.weights.create_model passes it on only when no joint weights are given."""
    import open_clip

    cfg = open_clip.get_model_config(register_unaligned_config("leanclip-test-unaligned-pt", timm_model=TIMM_NAME,
                                                               hf_text="bert-base-uncased", pretrained=True))
    assert cfg["vision_cfg"]["timm_model_pretrained"] is True and cfg["text_cfg"]["hf_model_pretrained"] is True
    assert cfg["text_cfg"]["hf_tokenizer_name"] == "bert-base-uncased"
    assert open_clip.get_model_config(name)["text_cfg"]["hf_model_pretrained"] is False


# ----------------------------------------------------------------------------------------------------------- methods
@pytest.mark.parametrize("method", PLAIN_METHODS)
def test_methods_prepare_on_plain_modules(base, method):
    m = copy.deepcopy(base)
    assert prepare_with_notices(m, method) == []
    assert lean.is_lean(m) and m.leanclip_info["method"] == method and "lean_towers" not in m.leanclip_info["options"]
    assert type(m.visual.trunk.blocks[0]).__name__ == "LeanTimmBlock"
    assert type(m.text.transformer.encoder.layer[0]).__name__ == "LeanBertLayer"
    names = {n for n, _ in methods.trainable_parameters(m)}
    proj = {"visual.head.proj.weight", "text.proj.weight"}
    if method == "lit":
        assert all(n.startswith("text.") or n == "lilt_temperature.temp" for n in names)
        assert "text.transformer.encoder.layer.1.attention.self.query.weight" in names and "text.proj.weight" in names
        return
    assert proj <= names and "lilt_temperature.temp" in names
    if method == "lilt-proj":
        assert names == proj | {"lilt_temperature.temp"}
    if method in ("lilt-ln", "lilt-adapter"):
        assert {"visual.trunk.blocks.0.norm1.weight", "visual.trunk.norm.bias",
                "text.transformer.embeddings.LayerNorm.weight",
                "text.transformer.encoder.layer.1.output.LayerNorm.bias"} <= names
    if method == "lilt-bitfit":
        assert {"visual.trunk.blocks.0.attn.qkv.bias", "text.transformer.encoder.layer.0.attention.self.key.bias",
                "text.transformer.encoder.layer.0.output.LayerNorm.bias"} <= names
        assert not any(n.endswith(".weight") for n in names - proj)
    if method == "lilt-adapter":  # before every LayerNorm of each block: 2 per timm block, 2 per BERT layer
        ads = [n for n, _ in lilt.adapters(m)]
        assert len(ads) == 8
        assert "visual.trunk.blocks.1.norm2.adapter" in ads
        assert "text.transformer.encoder.layer.0.attention.output.LayerNorm.adapter" in ads
        assert "visual.trunk.blocks.0.norm1.adapter.up.weight" in names


@pytest.mark.parametrize("method", PLAIN_METHODS)
def test_identity_at_init_and_exact_gradients(base, htok, method):
    """The prepared model computes what the unprepared one did (adapters start as identities), and the gradients of
    every trainable parameter the unprepared model has equal plain autograd on it; frozen ones get none."""
    m = copy.deepcopy(base)
    prepare_with_notices(m, method)
    torch.manual_seed(0)
    images = torch.randn(3, 3, 32, 32)
    tokens = htok(["a red square", "a blue circle on a dark background", "there is a striped diamond"])
    ref = copy.deepcopy(base).eval()
    ref.requires_grad_(True)
    ref_loss = clip_loss(ref, images, tokens)
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    m.eval()
    loss = clip_loss(m, images, tokens)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    loss.backward()
    compared = 0
    for n, p in m.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, n
        elif n in ref_grads:
            compared += 1
            assert p.grad is not None, n
            torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-5, atol=1e-7, msg=n)
    assert compared > 0


def test_lean_only_options(base):
    """Both towers are covered (lean=True), and a recompute policy reaches the BERT layers too; frozen_dtype and
    the memory planner plans both towers; frozen_dtype does not cover the BERT tower: one line naming it."""
    prepare_with_notices(copy.deepcopy(base), "lilt-ln", lean=True)
    with pytest.raises(ValueError, match="frozen_dtype does not cover the text tower .*HFTextEncoder"):
        methods.prepare(copy.deepcopy(base), "lilt-bitfit", frozen_dtype=torch.bfloat16)
    planned = methods.prepare(copy.deepcopy(base), "lilt-bitfit", recompute="auto", memory_budget=2 ** 30,
                              batch_size=2)
    assert {"image", "text"} <= set(planned.leanclip_info["options"]["recompute_plan"]["policies"])
    m = copy.deepcopy(base)
    prepare_with_notices(m, "lilt-adapter", recompute="mlp")
    assert {b.leanclip_recompute for b in m.visual.trunk.blocks} == {"mlp"}
    assert {b.leanclip_recompute for b in m.text.transformer.encoder.layer} == {"mlp"}


def test_options_on_custom_towers(base):
    m = copy.deepcopy(base)
    prepare_with_notices(m, "lilt-adapter", tower="text", ln_tower="none", bitfit=True, reduction=8)
    names = {n for n, _ in methods.trainable_parameters(m)}
    assert all(n.startswith("text.") or n == "lilt_temperature.temp" for n in names)
    assert "text.transformer.encoder.layer.0.attention.output.LayerNorm.weight" not in names
    assert "text.transformer.encoder.layer.0.intermediate.dense.bias" in names
    assert [a.reduction for _, a in lilt.adapters(m)] == [8] * 4
    with pytest.raises(ValueError, match="reduction=5 does not divide the width 32"):
        methods.prepare(copy.deepcopy(base), "lilt-adapter", reduction=5)
    prepare_with_notices(m, "lit+lilt-adapter")  # LiT (text tower trained in full) + adapters on the image tower
    assert {n.split(".adapter")[0] for n, _ in lilt.adapters(m)} == {
        f"visual.trunk.blocks.{i}.norm{j}" for i in range(2) for j in (1, 2)}
    assert all(p.requires_grad for n, p in m.named_parameters() if n.startswith("text."))
    prepare_with_notices(m, "lit+lilt-adapter", locked="text")  # LiT reversed: image tower in full, BERT adapters
    assert {n.split(".adapter")[0] for n, _ in lilt.adapters(m)} == {
        f"text.transformer.encoder.layer.{i}.{w}LayerNorm" for i in range(2) for w in ("attention.output.", "output.")}
    assert all(p.requires_grad for n, p in m.named_parameters() if n.startswith("visual."))
    strip(m, lilt.ADDED)
    assert not lilt.adapters(m)


# ----------------------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("method", ["lilt-ln", "lilt-adapter"])
def test_train_and_evaluate(base, htok, pairs, method):
    m = copy.deepcopy(base)
    prepare_with_notices(m, method)
    before = evaluate_retrieval(m, pairs, htok)
    s = train_contrastive(m, pairs, htok, ContrastiveConfig(epochs=3, batch_size=16, lr=3e-3, progress=False))
    after = evaluate_retrieval(m, pairs, htok)
    assert s["steps"] == 12 and all(math.isfinite(x) for x in s["losses"])
    assert sum(s["losses"][-4:]) / 4 < s["losses"][0], s["losses"]
    assert 0.001 <= s["temperature"] <= 0.5
    for r in (before, after):
        assert r["n_images"] == 64 and 0.0 <= r["mean"] <= 100.0


def test_cli_train_and_eval(name, tmp_path, capsys):
    """``leanclip train --task contrastive --model NAME`` on the registered config (same process: the registration
    is in open_clip's config registry), then ``eval`` re-creates it from the checkpoint."""
    from leanclip import cli

    small = ["--synthetic-eval-pairs", 16, "--no-progress", "--threads", 1]
    argv = ["train", "--task", "contrastive", "--model", name, "--method", "lilt-adapter", "--epochs", 1,
            "--batch-size", 16, "--output", tmp_path, "--synthetic-pairs", 32, *small]
    assert cli.main([str(a) for a in argv]) == 0, capsys.readouterr().err
    capsys.readouterr()
    rc = cli.main([str(a) for a in ["eval", "--task", "retrieval", "--checkpoint", tmp_path, *small]])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert json.loads(out.strip().splitlines()[-1])["method"] == "lilt-adapter"
