"""LilT / LiT methods: registration, exact identity at init (adapters, extra block), trainable counts, naming and
checkpoint round trips, lean/plain gradient agreement, combinations, bad input, and that every method raises
retrieval recall on synthetic pairs (tiny CLIP, CPU)."""
import copy
import warnings

import pytest
import torch

from leanclip import kernels
from leanclip.lifecycle import strip
from leanclip.methods import lilt
from leanclip.checkpoint import load_trainable, save_trainable
from leanclip.contrastive import ContrastiveConfig, evaluate_retrieval, train_contrastive
from leanclip.methods import METHODS, prepare
from leanclip.pairs import synthetic_pairs

PRETRAIN_STEPS = 40
TRAIN_METHODS = ["lilt-ln", "lilt-bitfit", "lilt-adapter", "lilt-deep", "lit", "lit+lilt-adapter"]


def _create(name):
    import open_clip

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return open_clip.create_model(name, pretrained=None)


@pytest.fixture(scope="session")
def tiny(tiny_base):
    """Random tiny CLIP (seed 0) with perturbed LayerNorms: the shared conftest fixture."""
    return tiny_base


@pytest.fixture(scope="session")
def misaligned(request, tmp_path_factory, tiny_name):
    """"Unimodally pre-trained, not aligned": a tiny CLIP contrastively pre-trained on synthetic captions (cached in
    pytest's cache, shared with the CLI / trainer tests) whose projections are then re-drawn at random, so retrieval
    starts near chance and alignment has to be learned again."""
    from leanclip.checkpoint import load_pretrained
    from leanclip.cli import synthetic_pretrained_weights

    try:
        folder = request.config.cache.mkdir("leanclip-tiny-pretrained")
    except Exception:  # cache provider disabled
        folder = tmp_path_factory.mktemp("tiny-pretrained")
    m = _create(tiny_name)
    load_pretrained(m, synthetic_pretrained_weights(folder, tiny_name, PRETRAIN_STEPS))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in (m.visual.proj, m.text_projection):
            p.copy_(torch.randn(p.shape, generator=g) * p.std())
    return m


@pytest.fixture(scope="session")
def train_pairs():
    return synthetic_pairs(256, size=32, seed=100)


@pytest.fixture(scope="session")
def test_pairs():
    return synthetic_pairs(100, size=32, seed=101)


def _feats(model, tok, n=6):
    from leanclip.features import encode_tokens, image_features

    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, 3, 32, 32, generator=g)
    t = torch.as_tensor(tok(["a red circle", "a big blue striped square on the left", "x", "a dotted green star",
                             "one", "a small yellow triangle"][:n]))
    with torch.no_grad():
        return image_features(model, x, normalize=False), encode_tokens(model, t)


def _n(model, pred):
    return sum(p.numel() for n, p in model.named_parameters() if pred(n, p))


# --------------------------------------------------------------------------------------------------- registration
def test_methods_registered_on_import():
    for name in ("lilt-ln", "lilt-bitfit", "lilt-adapter", "lilt-deep", "lit"):
        assert name in METHODS


# --------------------------------------------------------------------------------------------------- identity
@pytest.mark.parametrize("lean", [True, False])
@pytest.mark.parametrize("method", ["lilt-adapter", "lilt-deep", "lit+lilt-adapter", "lit+lilt-deep"])
def test_identity_at_init(method, lean, tiny, tok):
    ref = prepare(copy.deepcopy(tiny), "lilt-ln", lean=lean)   # same module types, nothing added
    m = prepare(copy.deepcopy(tiny), method, lean=lean)
    assert lilt.adapters(m) or lilt.deep_blocks(m)
    for a, b in zip(_feats(m, tok), _feats(ref, tok)):
        if lean and "deep" in method:  # the appended block is now the one run at the pooled rows only
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(a, b)  # zero-init up / output projections: exactly the unprepared computation
    for a, b in zip(_feats(m, tok), _feats(copy.deepcopy(tiny), tok)):  # the untouched open_clip model
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------- counts
def test_trainable_counts(tiny):
    v, t = tiny.visual.transformer, tiny.transformer
    dv, dt = v.width, t.width
    n_ln = _n(tiny, lambda n, p: ".ln_" in n or n.startswith("ln_") or "visual.ln_" in n)
    proj = tiny.visual.proj.numel() + tiny.text_projection.numel()

    m = prepare(copy.deepcopy(tiny), "lilt-ln")
    s = lilt.trainable_summary(m)
    assert s["trainable"] == n_ln + proj + 1  # + the temperature
    assert m.lilt_temperature.temp.requires_grad and m.visual.proj.requires_grad and m.text_projection.requires_grad
    assert s["percent"] == pytest.approx(100 * s["trainable"] / s["total"])

    m = prepare(copy.deepcopy(tiny), "lilt-ln", projections=False)
    assert lilt.trainable_summary(m)["trainable"] == n_ln + 1

    m = prepare(copy.deepcopy(tiny), "lilt-bitfit")
    n_bias = _n(tiny, lambda n, p: n.endswith("bias"))
    assert lilt.trainable_summary(m)["trainable"] == n_bias + proj + 1

    m = prepare(copy.deepcopy(tiny), "lilt-adapter")  # r = 4
    per = lambda d: 2 * d * (d // 4) + d // 4 + d  # noqa: E731
    n_ad = 2 * len(v.resblocks) * per(dv) + 2 * len(t.resblocks) * per(dt)
    assert len(lilt.adapters(m)) == 2 * (len(v.resblocks) + len(t.resblocks))
    assert lilt.trainable_summary(m)["trainable"] == n_ad + n_ln + proj + 1

    m = prepare(copy.deepcopy(tiny), "lilt-deep")
    blk = lambda tr: sum(p.numel() for p in tr.resblocks[-1].parameters())  # noqa: E731  (its LNs included)
    assert blk(v) == 12 * dv * dv + 13 * dv and blk(t) == 12 * dt * dt + 13 * dt  # mlp_ratio 4
    assert lilt.trainable_summary(m)["trainable"] == blk(v) + blk(t) + n_ln + proj + 1

    m = prepare(copy.deepcopy(tiny), "lit")
    s = lilt.trainable_summary(m)
    assert s["image"] == 0 and s["text"] == _n(tiny, lambda n, p: not n.startswith("visual.") and n != "logit_scale")
    assert s["other"] == 1


# --------------------------------------------------------------------------------------------------- naming, checkpoint
@pytest.mark.parametrize("method", ["lilt-adapter", "lilt-deep"])
def test_state_dict_names_and_trainable_roundtrip(method, tiny, tok, tmp_path):
    m = prepare(copy.deepcopy(tiny), method)
    names = set(m.state_dict())
    assert "visual.transformer.resblocks.0.ln_1.weight" in names  # original LN names kept
    assert "transformer.resblocks.1.ln_2.bias" in names
    if method == "lilt-adapter":
        assert "visual.transformer.resblocks.0.ln_1.adapter.down.weight" in names
        assert "transformer.resblocks.1.ln_2.adapter.up.bias" in names
    else:
        n = len(tiny.visual.transformer.resblocks)
        assert f"visual.transformer.resblocks.{n}.attn.in_proj_weight" in names
        assert f"transformer.resblocks.{n}.mlp.c_proj.weight" in names
    with torch.no_grad():  # move away from the identity init so the round trip means something
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    path = save_trainable(m, tmp_path / "c.safetensors")
    m2 = prepare(copy.deepcopy(tiny), method)
    load_trainable(m2, path)
    for a, b in zip(_feats(m, tok), _feats(m2, tok)):
        assert torch.equal(a, b)
    assert not torch.equal(_feats(m, tok)[0], _feats(prepare(copy.deepcopy(tiny), method), tok)[0])


def test_deepcopy_keeps_own_adapters(tiny, tok):
    m = prepare(copy.deepcopy(tiny), "lilt-adapter")
    with torch.no_grad():
        for _, ad in lilt.adapters(m):
            ad.up.weight.normal_(0, 0.1)
    c = copy.deepcopy(m)
    for a, b in zip(_feats(m, tok), _feats(c, tok)):
        assert torch.equal(a, b)
    with torch.no_grad():
        for _, ad in lilt.adapters(c):
            ad.up.weight.zero_()
    assert not torch.equal(_feats(m, tok)[0], _feats(c, tok)[0])  # the copy's hooks use the copy's adapters


@pytest.mark.parametrize("method", ["lilt-adapter", "lilt-deep"])
def test_lean_gradients_match_plain(method, tiny, tok):
    """Adapters / the extra block inside lean blocks (with recompute) give the plain open_clip gradients."""
    from leanclip.features import encode_tokens, image_features

    torch.manual_seed(3)
    plain = prepare(copy.deepcopy(tiny), method, lean=False)
    with torch.no_grad():
        for p in plain.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(3, 3, 32, 32)
    t = torch.as_tensor(tok(["a red circle", "two blue squares", "a star"]))
    grads = {}
    for name, lean, rc in (("plain", False, "none"), ("lean", True, "mlp+qkv"), ("block", True, "block")):
        m = copy.deepcopy(plain)
        prepare_state = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
        prepare(m, method, lean=lean, recompute=rc)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if n in prepare_state:
                    p.copy_(prepare_state[n])
        loss = image_features(m, x).pow(3).sum() + torch.nn.functional.normalize(encode_tokens(m, t), dim=-1).pow(
            3).sum()
        loss.backward()
        grads[name] = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad and p.grad is not None}
    assert set(grads["plain"]) == set(grads["lean"]) == set(grads["block"])
    for n, g in grads["plain"].items():
        torch.testing.assert_close(grads["lean"][n], g, rtol=1e-4, atol=1e-6, msg=n)
        torch.testing.assert_close(grads["block"][n], g, rtol=1e-4, atol=1e-6, msg=n)


# --------------------------------------------------------------------------------------------------- combinations
def test_lit_and_combinations(tiny):
    m = prepare(copy.deepcopy(tiny), "lit")
    for n, p in m.named_parameters():
        if n.startswith("visual."):
            assert not p.requires_grad, n
        elif n != "logit_scale":
            assert p.requires_grad, n
    m = prepare(copy.deepcopy(tiny), "lit+lilt-adapter")
    names = [n for n, _ in lilt.adapters(m)]
    assert names and all(n.startswith("visual.") for n in names)  # the fully trained text tower gets none
    assert m.visual.proj.requires_grad and m.visual.ln_post.weight.requires_grad
    assert not m.visual.transformer.resblocks[0].attn.in_proj_weight.requires_grad
    assert all(p.requires_grad for n, p in m.named_parameters() if n.startswith("transformer."))
    m = prepare(copy.deepcopy(tiny), "lit+lilt-deep")
    assert [n.split(".")[0] for n, _ in lilt.deep_blocks(m)] == ["visual"]
    m = prepare(copy.deepcopy(tiny), "lit+lilt-ln")
    assert lilt.trainable_summary(m)["image"] == _n(tiny, lambda n, p: n.startswith("visual.ln")
                                                    or ".ln_" in n and n.startswith("visual.")) + tiny.visual.proj.numel()
    with pytest.raises(ValueError, match="lit.*first"):
        prepare(copy.deepcopy(tiny), "lilt-adapter+lit")


def test_tower_option(tiny):
    m = prepare(copy.deepcopy(tiny), "lilt-adapter", tower="image")
    assert all(n.startswith("visual.") for n, _ in lilt.adapters(m))
    assert not m.text_projection.requires_grad and m.visual.proj.requires_grad
    m = prepare(copy.deepcopy(tiny), "lilt-deep", tower="text")
    assert [n.split(".")[0] for n, _ in lilt.deep_blocks(m)] == ["transformer"]


def test_reprepare_replaces_lilt_modules(tiny):
    m = copy.deepcopy(tiny)
    n_blocks = len(m.visual.transformer.resblocks)
    prepare(m, "lilt-deep")
    prepare(m, "lilt-deep")
    assert len(m.visual.transformer.resblocks) == n_blocks + 1
    prepare(m, "lilt-adapter")
    assert len(m.visual.transformer.resblocks) == n_blocks and not lilt.deep_blocks(m)
    prepare(m, "lilt-ln")
    assert not lilt.adapters(m)
    prepare(m, "lilt-adapter")
    strip(m, lilt.ADDED)
    assert not lilt.adapters(m)
    assert not any(m.visual.transformer.resblocks[0].ln_1._forward_pre_hooks.values())


# --------------------------------------------------------------------------------------------------- bad input
def test_bad_options(tiny):
    m = copy.deepcopy(tiny)
    with pytest.raises(ValueError, match="reduction=3 does not divide the width 64"):
        prepare(m, "lilt-adapter", reduction=3)
    assert not lilt.adapters(m)  # validated before anything was inserted
    for bad in (0, -2, 2.0, True):
        with pytest.raises(ValueError, match="reduction"):
            prepare(copy.deepcopy(tiny), "lilt-adapter", reduction=bad)
    with pytest.raises(ValueError, match="deep_init"):
        prepare(copy.deepcopy(tiny), "lilt-deep", deep_init="zeros")
    with pytest.raises(ValueError, match="temperature"):
        prepare(copy.deepcopy(tiny), "lilt-ln", temperature=0.9)
    with pytest.raises(ValueError, match="projections"):
        prepare(copy.deepcopy(tiny), "lilt-ln", projections="no")
    with pytest.raises(ValueError, match="unknown option"):
        prepare(copy.deepcopy(tiny), "lilt-ln", reduction=4)


def test_deep_random_init_is_identity(tiny, tok):
    ref = prepare(copy.deepcopy(tiny), "lilt-ln")
    m = prepare(copy.deepcopy(tiny), "lilt-deep", deep_init="random")
    blk = m.visual.transformer.resblocks[-1]
    assert not torch.equal(blk.attn.in_proj_weight, tiny.visual.transformer.resblocks[-1].attn.in_proj_weight)
    for a, b in zip(_feats(m, tok), _feats(ref, tok)):  # lean runs the last block at the pooled rows: ulp-level
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------------- training
def _r1(r):
    return (r["i2t_R@1"] + r["t2i_R@1"]) / 2


@pytest.mark.parametrize("method", TRAIN_METHODS)
def test_method_raises_retrieval_recall(method, misaligned, tok, train_pairs, test_pairs):
    m = prepare(copy.deepcopy(misaligned), method)
    before = evaluate_retrieval(m, test_pairs, tok)
    s = train_contrastive(m, train_pairs, tok, ContrastiveConfig(epochs=2, batch_size=32, lr=3e-3, progress=False))
    after = evaluate_retrieval(m, test_pairs, tok)
    assert s["steps"] == 2 * (len(train_pairs) // 32)
    assert s["final_loss"] < s["losses"][0] - 1.0
    assert _r1(after) >= _r1(before) + 3.0, (before, after)
    assert after["mean"] >= before["mean"] + 15.0, (before, after)
    assert 0.001 <= s["temperature"] <= 0.5


# --------------------------------------------------------------------------------------------------- ablation rows
def _trainable(m):
    return {n for n, p in m.named_parameters() if p.requires_grad}


def test_ablation_rows_trainable_sets(tiny):
    ln_all = {n for n in _trainable(prepare(copy.deepcopy(tiny), "ln"))}
    ln_img = {n for n in ln_all if n.startswith("visual.")}
    ln_txt = ln_all - ln_img
    proj = {"visual.proj", "text_projection", "lilt_temperature.temp"}
    assert _trainable(prepare(copy.deepcopy(tiny), "lilt-proj")) == proj
    assert _trainable(prepare(copy.deepcopy(tiny), "lilt-proj", tower="text")) == {"text_projection",
                                                                                   "lilt_temperature.temp"}
    full = prepare(copy.deepcopy(tiny), "lilt-adapter")
    ad = {n for n in _trainable(full) if ".adapter." in n}
    assert ad and _trainable(full) == ad | ln_all | proj  # the default is unchanged
    no_ln = prepare(copy.deepcopy(tiny), "lilt-adapter", ln_tower="none")  # rows f, h
    assert _trainable(no_ln) == ad | proj
    assert _trainable(prepare(copy.deepcopy(tiny), "lilt-adapter", ln_tower="text")) == ad | ln_txt | proj
    img_ad = prepare(copy.deepcopy(tiny), "lilt-adapter", tower="image", ln_tower="text")  # placement != LN choice
    assert {n.split(".")[0] for n in _trainable(img_ad) if ".adapter." in n} == {"visual"}
    assert _trainable(img_ad) & ln_all == ln_txt
    bias = {n for n, _ in tiny.named_parameters() if n.endswith("bias") and n not in ln_all and n != "logit_scale"}
    bf = prepare(copy.deepcopy(tiny), "lilt-adapter", ln_tower="none", bitfit=True)  # rows j, k
    assert _trainable(bf) == ad | proj | bias and "visual.transformer.resblocks.0.attn.in_proj_bias" in bias
    deep = prepare(copy.deepcopy(tiny), "lilt-deep", ln_tower="image")
    base_ln = {n for n in _trainable(deep) & ln_all}
    assert base_ln == ln_img and lilt.deep_blocks(deep)


def test_lit_reversed(tiny):
    m = prepare(copy.deepcopy(tiny), "lit", locked="text")  # row m
    s = lilt.trainable_summary(m)
    assert s["text"] == 0 and s["image"] == _n(tiny, lambda n, p: n.startswith("visual."))
    m = prepare(copy.deepcopy(tiny), "lit+lilt-adapter", locked="text")
    assert {n.split(".")[0] for n, _ in lilt.adapters(m)} == {"transformer"}  # the LilT part goes to the text tower
    with pytest.raises(ValueError, match="locked"):
        prepare(copy.deepcopy(tiny), "lit", locked="both")
    with pytest.raises(ValueError, match="ln_tower"):
        prepare(copy.deepcopy(tiny), "lilt-adapter", ln_tower="left")
    with pytest.raises(ValueError, match="bitfit"):
        prepare(copy.deepcopy(tiny), "lilt-adapter", bitfit="yes")


def test_ablation_options_through_the_cli(capsys, tmp_path):
    """--opt sets the ablation options; the checkpoint records them and eval re-applies them (its strict load would
    refuse a model prepared with other trainable parameters)."""
    import json

    from leanclip import cli
    from leanclip.cli.common import read_checkpoint_meta

    small = ["--synthetic-eval-pairs", 16, "--no-progress", "--threads", 1]
    argv = ["train", "--task", "contrastive", "--method", "lit+lilt-adapter", "--opt", "locked=text", "--opt",
            "ln_tower=none", "--opt", "bitfit=true", "--epochs", 1, "--batch-size", 16, "--output", tmp_path,
            "--synthetic-pairs", 32, *small]
    assert cli.main([str(a) for a in argv]) == 0, capsys.readouterr().err
    opts = read_checkpoint_meta(tmp_path)["options"]
    assert (opts["locked"], opts["ln_tower"], opts["bitfit"]) == ("text", "none", True)
    capsys.readouterr()
    rc = cli.main([str(a) for a in ["eval", "--task", "retrieval", "--checkpoint", tmp_path, *small]])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert json.loads(out.strip().splitlines()[-1])["method"] == "lit+lilt-adapter"


# --------------------------------------------------------------------------------------------------- LilT's towers
@pytest.fixture(scope="module")
def deit_bert(tmp_path_factory):
    """LilT's unaligned setting in miniature: a DeiT-style timm ViT + a 2-layer BERT (random weights, offline)."""
    pytest.importorskip("timm")
    pytest.importorskip("transformers")
    from leanclip.configs import create_random_model
    from tests.engine.hf_text_family import register_hf_text

    return create_random_model(register_hf_text(tmp_path_factory.mktemp("deit-bert"), "bert", timm_image=True))


def _deit_bert_batch():
    from tests.engine.hf_text_family import tokens

    g = torch.Generator().manual_seed(2)
    return torch.randn(3, 3, 32, 32, generator=g), tokens(0)


@pytest.mark.parametrize("deep_init", ["copy", "random"])
def test_deep_block_on_a_timm_vit_starts_exact(deit_bert, deep_init):
    """The appended timm block (zero attn.proj and mlp.fc2) is the identity: the image tower computes exactly what
    it did, lean or plain; the whole block trains, and re-preparing removes it."""
    images, _ = _deit_bert_batch()
    with torch.no_grad():
        want = copy.deepcopy(deit_bert).eval().encode_image(images)
    for lean in (False, True):
        m = prepare(copy.deepcopy(deit_bert), "lilt-deep", lean=lean, deep_init=deep_init)
        names = [n for n, _ in lilt.deep_blocks(m)]
        assert names == ["visual.trunk.blocks.2", "text.transformer.encoder.layer.2"]
        blk = m.visual.trunk.blocks[2]
        assert type(blk).__name__ == ("LeanTimmBlock" if lean else "Block")
        assert all(p.requires_grad for p in blk.parameters()) and not blk.mlp.fc2.weight.any()
        with torch.no_grad():
            torch.testing.assert_close(m.eval().encode_image(images), want, rtol=0, atol=0)
        prepare(m, "lilt-ln")
        assert len(m.visual.trunk.blocks) == 2 and not lilt.deep_blocks(m)


def test_deep_blocks_on_lilt_towers_train_with_plain_gradients(deit_bert):
    """Both appended blocks on the lean modules, under each recompute policy, get plain autograd's gradients."""
    from tests.engine.peft_checks import projection_loss, randomize_trainable

    images, toks = _deit_bert_batch()
    grads = {}
    for policy in ("plain", "none", "mlp+qkv", "block"):
        m = prepare(copy.deepcopy(deit_bert), "lilt-deep", **({"lean": False} if policy == "plain" else
                                                              {"recompute": policy}))
        randomize_trainable(m)
        projection_loss(m.train().encode_image(images, normalize=True),
                        m.encode_text(toks, normalize=True)).backward()
        grads[policy] = {n: p.grad for n, p in m.named_parameters() if p.requires_grad and p.grad is not None}
    assert "text.transformer.encoder.layer.2.output.dense.weight" in grads["plain"]
    assert "visual.trunk.blocks.2.attn.qkv.weight" in grads["plain"]
    for policy in ("none", "mlp+qkv", "block"):
        assert grads[policy].keys() == grads["plain"].keys()
        for n, g in grads["plain"].items():
            torch.testing.assert_close(grads[policy][n], g, rtol=1e-5, atol=1e-5, msg=n)


def test_deep_blocks_on_lilt_towers_round_trip(deit_bert, tmp_path):
    """The appended blocks' trained values save and load by name into a freshly prepared model."""
    from tests.engine.peft_checks import randomize_trainable

    images, toks = _deit_bert_batch()
    m = prepare(copy.deepcopy(deit_bert), "lilt-deep", deep_init="random")
    randomize_trainable(m)
    save_trainable(m, tmp_path / "deep.safetensors")
    other = prepare(copy.deepcopy(deit_bert), "lilt-deep", deep_init="random")
    load_trainable(other, tmp_path / "deep.safetensors")
    with torch.no_grad():
        for a, b in zip((m.eval().encode_image(images), m.encode_text(toks)),
                        (other.eval().encode_image(images), other.encode_text(toks))):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
