"""CoCoOp: the meta-net conditioning against a direct computation on the tiny model, lean against plain, the CLI
train -> eval round trip, its preset and its option errors."""
import json

import pytest
import torch
import torch.nn.functional as F

from leanclip import features as feats
from leanclip import methods
from leanclip.features import ImageConditionedText
from leanclip.methods.cocoop import MetaPromptLearner
from tests.engine.cli_checks import last_json, run

CLASSNAMES = ["cat", "dog", "red car"]


def _direct_logits(model, images, classnames, tok):
    """CoCoOp's logits written out on open_clip's own modules: pi(x) on the normalized image feature added to each
    context vector, each (image, class) prompt through the text transformer, pooled at EOT, scaled cosine."""
    learner = model.prompt_learner
    x = F.normalize(model.encode_image(images), dim=-1)
    shift = learner.meta_net.linear2(torch.relu(learner.meta_net.linear1(x)))
    tokens = tok([f"{' '.join(['X'] * learner.n_ctx)} {c}." for c in classnames])
    rows = []
    for b in range(images.shape[0]):
        emb = model.token_embedding(tokens).clone()
        emb[:, 1:1 + learner.n_ctx] = learner.ctx + shift[b]
        h = model.transformer(emb + model.positional_embedding, attn_mask=model.attn_mask)
        h = model.ln_final(h)[torch.arange(len(classnames)), tokens.argmax(-1)] @ model.text_projection
        rows.append(F.normalize(h, dim=-1) @ x[b])
    return model.logit_scale.exp() * torch.stack(rows)


def _prepared(fresh_tiny, tok, **kw):
    m = fresh_tiny()
    methods.prepare(m, "cocoop", classnames=CLASSNAMES, tokenizer=tok, lean=False, **kw)
    with torch.no_grad():  # a meta-net at its init is near zero: make the shift matter
        for p in m.prompt_learner.meta_net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return m.eval()


def _features_logits(model, images, tok):
    img = feats.image_features(model, images)
    txt = feats.text_features(model, CLASSNAMES, None, tok)
    assert isinstance(txt, ImageConditionedText)
    return feats.class_logits(model, img, txt)


def test_meta_net_conditioning_equals_the_direct_computation(fresh_tiny, tok):
    torch.manual_seed(0)
    m = _prepared(fresh_tiny, tok)
    images = torch.randn(3, 3, 32, 32)
    got = _features_logits(m, images, tok)  # the features path computes in float32: equal to its rounding
    want = _direct_logits(m, images, CLASSNAMES, tok)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    params = [p for p in m.prompt_learner.parameters()]
    y = torch.tensor([0, 2, 1])
    g_got = torch.autograd.grad(F.cross_entropy(got, y), params)
    g_want = torch.autograd.grad(F.cross_entropy(want, y), params)
    for a, b in zip(g_got, g_want):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # each image has its own prompts: a batch's logits are the per-image logits stacked
    one = torch.cat([_features_logits(m, images[i:i + 1], tok) for i in range(3)])
    torch.testing.assert_close(got, one, rtol=1e-5, atol=1e-5)
    # and the shift matters: without it the logits differ
    with torch.no_grad():
        m.prompt_learner.meta_net.linear2.weight.zero_()
        m.prompt_learner.meta_net.linear2.bias.zero_()
    assert not torch.allclose(_features_logits(m, images, tok), got)


def test_prompts_in_passes_give_the_same_logits(fresh_tiny, tok, monkeypatch):
    torch.manual_seed(4)
    m = _prepared(fresh_tiny, tok)
    images = torch.randn(5, 3, 32, 32)
    whole = _features_logits(m, images, tok)
    calls = []
    real = feats._prompted_text
    monkeypatch.setattr(feats, "_prompted_text", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(feats, "CONDITIONED_PROMPTS_PER_PASS", 2 * len(CLASSNAMES))  # two images a pass
    torch.testing.assert_close(_features_logits(m, images, tok), whole, rtol=1e-5, atol=1e-5)
    assert len(calls) == 3


def test_lean_cocoop_matches_plain(fresh_tiny, tok):
    torch.manual_seed(1)
    plain, lean = fresh_tiny(), fresh_tiny()
    methods.prepare(plain, "cocoop", classnames=CLASSNAMES, tokenizer=tok, lean=False)
    methods.prepare(lean, "cocoop", classnames=CLASSNAMES, tokenizer=tok)  # prepare's default: lean
    assert lean.leanclip_info["options"]["lean"] is True
    lean.prompt_learner.load_state_dict(plain.prompt_learner.state_dict())
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_features_logits(lean, images, tok), _features_logits(plain, images, tok),
                               rtol=1e-4, atol=1e-4)


def test_learner_shapes_and_init(fresh_tiny, tok):
    m = fresh_tiny()
    methods.prepare(m, "cocoop", classnames=CLASSNAMES, tokenizer=tok)
    learner = m.prompt_learner
    assert isinstance(learner, MetaPromptLearner) and learner.n_ctx == 4
    e, width = m.text_projection.shape[1], m.token_embedding.weight.shape[1]
    assert learner.meta_net.linear1.in_features == e and learner.meta_net.linear2.out_features == width
    start = m.token_embedding(tok(["a photo of a"]))[0, 1:5]
    torch.testing.assert_close(learner.ctx.detach(), start.detach())  # CoOp's "a photo of a" start
    emb, tokens = learner(m.token_embedding, ["x", "y"], tok, image_features=torch.randn(3, e))
    assert emb.shape[:2] == tokens.shape == (6, tokens.shape[1])


@pytest.mark.parametrize("kw,msg", [
    (dict(n_ctx=0), "n_ctx must be an int in [1, 4096]"),
    (dict(n_ctx=3), "init_text 'a photo of a' is 4 tokens, n_ctx=3"),  # n_ctx 3: random start, std fine
    (dict(init_text="a photo of a", std=0.1), "std=0.1 has no effect"),
    (dict(classnames=None), "'cocoop' needs classnames"),
])
def test_bad_options_are_one_line_errors(fresh_tiny, tok, kw, msg):
    m = fresh_tiny()
    args = {"classnames": CLASSNAMES, "tokenizer": tok, **kw}
    if kw.get("n_ctx") == 3:
        args["init_text"] = "a photo of a"
    with pytest.raises(ValueError, match=msg.replace("[", r"\[").replace("(", r"\(")) as e:
        methods.prepare(m, "cocoop", **args)
    assert "\n" not in str(e.value) and not hasattr(m, "prompt_learner")


def test_cocoop_does_not_combine_with_coop(fresh_tiny, tok):
    with pytest.raises(ValueError, match="'coop' and 'cocoop' both replace the prompts"):
        methods.prepare(fresh_tiny(), "coop+cocoop", classnames=CLASSNAMES, tokenizer=tok)


@pytest.mark.parametrize("method", ["cocoop+clipfit", "clipfit+cocoop"])
def test_cocoop_does_not_combine_with_a_loss_on_the_class_text_features(fresh_tiny, tok, method):
    """CLIPFit's distillation reads one set of class text features per step; CoCoOp's are per image."""
    m = fresh_tiny()
    with pytest.raises(ValueError, match="'clipfit' adds loss terms on the class text features, which 'cocoop'"):
        methods.prepare(m, method, classnames=["a", "b"], tokenizer=tok)
    assert not any(p.requires_grad is False for p in m.parameters())  # refused before anything was frozen


def test_preset_cocoop_is_the_authors_recipe():
    from leanclip.cli.classify import preset_defaults
    from leanclip.cli.parser import build_parser

    args = build_parser("train").parse_args(["train", "--method", "cocoop", "--preset", "cocoop", "--shots", "16"])
    assert preset_defaults(args.preset, args) == {"optimizer": "sgd", "lr": 2e-3, "weight_decay": 5e-4,
                                                  "batch_size": 1, "warmup_epochs": 1, "epochs": 10}


def test_cli_train_then_eval_round_trip(capsys, tmp_path, synth_dir, weights):
    data = ["--pretrained", weights, "--synthetic-classes", 4, "--synthetic-dir", synth_dir, "--no-progress",
            "--threads", 1, "--shots", 2]
    rc, out, err = run(capsys, "train", "--method", "cocoop", "--preset", "cocoop", "--epochs", 1, "--batch-size", 4,
                       "--opt", "n_ctx=4", "--output", tmp_path / "r", *data)
    assert rc == 0, err
    res = last_json(out)
    assert res["method"] == "cocoop" and res["steps"] == 2 and res["lean"] is True
    cfg = json.loads((tmp_path / "r" / "summary.json").read_text())["config"]
    assert (cfg["optimizer"], cfg["lr"], cfg["warmup_epochs"], cfg["batch_size"]) == ("sgd", 2e-3, 1, 4)
    rc, out2, err = run(capsys, "eval", "--checkpoint", tmp_path / "r", *data[:-2])
    assert rc == 0, err
    assert last_json(out2)["top1"] == pytest.approx(res["metrics"]["test"]["top1"])


@pytest.mark.parametrize("argv,msg", [
    (("--opt", "n_ctx=0"), "n_ctx of method 'cocoop' must be an int in [1, 4096]"),
    (("--opt", "meta=2"), "method 'cocoop' has no option 'meta'"),
    (("--templates", "a {}"), "--templates"),
])
def test_cli_bad_options_exit_2_in_one_line(capsys, tmp_path, argv, msg):
    rc, _, err = run(capsys, "train", "--method", "cocoop", *argv, "--output", tmp_path / "x")
    assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_transformers_clip_family(hf_cache):
    """On a transformers CLIP the image-conditioned prompts go through the family's own text forward: with pi = 0
    the "a photo of a" context gives the zero-shot logits of that template, and a loss reaches every trainable
    parameter."""
    from leanclip import weights
    from leanclip.models import transformers as hf
    from tests.engine.hf_family import CLIP_ID, lay_out_cache

    lay_out_cache(hf_cache)
    names = ["cat", "dog", "bird"]
    plain = weights.create_model("transformers:" + CLIP_ID)
    m = weights.create_model("transformers:" + CLIP_ID)
    tok = hf.get_tokenizer(m)
    methods.prepare(m, "cocoop", classnames=names, tokenizer=tok)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        m.prompt_learner.meta_net.linear2.weight.zero_()
        m.prompt_learner.meta_net.linear2.bias.zero_()
        zs = feats.class_logits(plain, feats.image_features(plain, images),
                                feats.text_features(plain, names, ["a photo of a {}."], tok))
    logits = feats.class_logits(m, feats.image_features(m, images), feats.text_features(m, names, None, tok))
    torch.testing.assert_close(logits.detach(), zs, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        m.prompt_learner.meta_net.linear2.weight.normal_(0, 0.1)
    logits = feats.class_logits(m, feats.image_features(m, images), feats.text_features(m, names, None, tok))
    F.cross_entropy(logits, torch.tensor([0, 2])).backward()
    learner = m.prompt_learner  # the tiny model's E = 24 leaves the meta-net one hidden ReLU unit: it may be dead
    assert all(p.grad is not None for p in learner.parameters())
    assert all(p.grad.abs().sum() > 0 for p in (learner.ctx, learner.meta_net.linear2.bias))
