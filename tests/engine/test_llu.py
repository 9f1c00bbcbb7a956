"""LLU pipeline: feature cache, banks, per-sample gate, identity init, chunked evaluation, training on features."""
import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from leanclip import data, kernels, llu
from leanclip.checkpoint import load_trainable, read_trainable
from leanclip.feature_cache import FeatureCache
from leanclip.methods import prepare
from leanclip.trainer import TrainConfig, evaluate, train, zeroshot

TEMPLATES = ["a photo of a {}."]


@pytest.fixture(autouse=True)
def _torch_backend():
    with kernels.set_backend("torch"):
        yield


@pytest.fixture(scope="session")
def pretrained_base(request, tmp_path_factory, tiny_name):
    import open_clip

    from leanclip.checkpoint import load_pretrained
    from leanclip.cli import synthetic_pretrained_weights

    try:
        folder = request.config.cache.mkdir("leanclip-tiny-pretrained")
    except Exception:  # cache provider disabled
        folder = tmp_path_factory.mktemp("tiny-pretrained")
    path = synthetic_pretrained_weights(folder, tiny_name, 40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = open_clip.create_model(tiny_name, pretrained=None)
    load_pretrained(m, path)
    return m


def _cfg(**kw):
    base = dict(method="llu", epochs=5, batch_size=16, lr=1e-2, optimizer="adamw", weight_decay=0.0, warmup_epochs=0,
                progress=False, seed=1)
    base.update(kw)
    return TrainConfig(**base)


def _llu_model(base, **opts):
    """``base`` prepared with llu. Lambda 10, not the authors' 1e3: this E=64 model is trained from scratch for
    seconds and its features are far less clustered than CLIP ViT-B's (E=512), so 1e3 keeps the heads too close to
    zero-shot to beat it; the bank: every training feature."""
    return prepare(copy.deepcopy(base), "llu", **{"llu_lambda": 10.0, "llu_clusters": 0, **opts})


def _unit(n, e, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, e, generator=g), dim=-1)


# ---------------------------------------------------------------------------------------------------- the gate
def test_identity_at_init(pretrained_base):
    m = _llu_model(pretrained_base)
    x = _unit(37, 64, 1)
    for head in (m.llu_image, m.llu_text):
        head.set_bank(_unit(11, 64, 2))
        out = head(x)
        torch.testing.assert_close(out, x, rtol=0, atol=1e-6)  # normalize(a*x + (1-a)*x) == x


def test_alpha_is_per_sample():
    from leanclip.heads import LLUHead

    head = LLUHead(16, beta=0.5, gamma=20.0)
    d = _unit(9, 16, 3)
    head.set_bank(d)
    x = torch.cat([d[:2], _unit(5, 16, 4)])  # two samples sit on the bank (alpha = beta), five far from it
    a = head.alpha(x)
    ref = 0.5 * torch.exp(-20.0 * (1.0 - (x.double() @ d.double().t()).max(1).values))
    torch.testing.assert_close(a.double(), ref, rtol=1e-5, atol=1e-7)
    assert a[:2].tolist() == pytest.approx([0.5, 0.5], abs=1e-5)
    assert a[2:].max() < 0.4  # not one max over the whole batch
    singles = torch.cat([head.alpha(x[i:i + 1]) for i in range(len(x))])
    torch.testing.assert_close(a, singles)


def test_llu_logits_chunked_without_n_by_m(pretrained_base, monkeypatch):
    m = _llu_model(pretrained_base)
    m.llu_image.set_bank(_unit(300, 64, 5))
    m.llu_text.set_bank(_unit(6, 64, 6))
    with torch.no_grad():  # move away from the identity so the heads matter
        m.llu_image.weight.add_(0.05 * torch.randn(64, 64))
        m.llu_text.bias.add_(0.05)
    feats, txt = _unit(1000, 64, 7), _unit(6, 64, 8)
    rows = []
    real = kernels.max_sim

    def spy(x, d):
        rows.append(x.shape[0])
        return real(x, d)

    monkeypatch.setattr(kernels, "max_sim", spy)
    full = llu.llu_logits(m, feats, txt, batch_size=1000)
    rows.clear()
    chunked = llu.llu_logits(m, feats, txt, batch_size=128)
    assert chunked.shape == (1000, 6)
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
    assert max(r for r in rows) <= 128  # the image gate only ever sees a chunk
    ref = m.logit_scale.exp() * m.llu_image(feats) @ m.llu_text(txt).t()
    torch.testing.assert_close(chunked, ref.detach(), rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------------------------------- banks
def test_cluster_bank():
    x = _unit(40, 8, 9)
    torch.testing.assert_close(llu.cluster_bank(x, None), x)
    torch.testing.assert_close(llu.cluster_bank(x, 512), x)  # min(512, n) = n clusters: the features themselves
    c = llu.cluster_bank(x, 5)
    assert c.shape == (5, 8)
    torch.testing.assert_close(c.norm(dim=1), torch.ones(5))
    from sklearn.cluster import AgglomerativeClustering

    lab = AgglomerativeClustering(n_clusters=5, metric="cosine", linkage="complete").fit_predict(x.double().numpy())
    want = torch.stack([F.normalize(x[torch.as_tensor(lab) == k].double().mean(0), dim=0) for k in range(5)])
    torch.testing.assert_close(c.double(), want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------- cache
def test_feature_cache_hit_and_miss(pretrained_base, shapes, tmp_path):
    m = _llu_model(pretrained_base)
    cache = FeatureCache(tmp_path / "feats")
    f1, y1 = llu.cached_image_features(m, shapes["train"], cache, 32)
    assert (cache.hits, cache.misses) == (0, 1)
    assert f1.shape == (64, 64) and f1.dtype == torch.float32 and y1.tolist() == shapes["train"].labels.tolist()
    torch.testing.assert_close(f1.norm(dim=1), torch.ones(64))
    f2, y2 = llu.cached_image_features(m, shapes["train"], cache, 32)
    assert (cache.hits, cache.misses) == (1, 1)
    assert torch.equal(f1, f2) and torch.equal(y1, y2)
    # the heads are not part of the identity: a trained head still hits
    with torch.no_grad():
        m.llu_image.weight.add_(1.0)
    llu.cached_image_features(m, shapes["train"], cache, 32)
    assert (cache.hits, cache.misses) == (2, 1)
    # another dataset, another transform, other encoder weights -> misses
    llu.cached_image_features(m, shapes["test"], cache, 32)
    assert cache.misses == 2
    other_tf = data.TensorImageDataset(shapes["train"].images, shapes["train"].labels,
                                       data.clip_transform(32, train=False, mean=(0.5, 0.5, 0.5)))
    llu.cached_image_features(m, other_tf, cache, 32)
    assert cache.misses == 3
    with torch.no_grad():
        m.visual.ln_post.bias.add_(0.1)
    f3, _ = llu.cached_image_features(m, shapes["train"], cache, 32)
    assert cache.misses == 4 and not torch.equal(f3, f1)
    files = sorted((tmp_path / "feats").glob("*.safetensors"))
    assert len(files) == 4
    # a corrupt file is a miss and gets rewritten
    key_file = files[0]
    key_file.write_bytes(b"garbage")
    c2 = FeatureCache(tmp_path / "feats")
    assert c2.load(key_file.stem) is None


def test_cache_matches_uncached(pretrained_base, shapes, tmp_path):
    m = _llu_model(pretrained_base)
    a, _ = llu.extract_image_features(m, shapes["test"], 50)
    b, _ = llu.cached_image_features(m, shapes["test"], FeatureCache(tmp_path), 128)
    torch.testing.assert_close(a, b)
    ref = F.normalize(pretrained_base.encode_image(torch.stack([shapes["test"][i][0] for i in range(128)])), dim=-1)
    torch.testing.assert_close(a, ref.detach(), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------- training
def test_train_llu_on_features_learns(pretrained_base, tok, shapes):
    cn = shapes["classnames"]
    m = _llu_model(pretrained_base, llu_clusters=16)
    feats, labels = llu.extract_image_features(m, shapes["train"])
    tfe, tl = llu.extract_image_features(m, shapes["test"])
    txt = llu.class_text_features(m, cn, TEMPLATES, tok)
    enc_before = {n: p.detach().clone() for n, p in m.named_parameters() if not n.startswith("llu_")}
    res = llu.train_llu(m, feats, labels, txt, _cfg())
    assert res["bank_size"] == 16 and m.llu_image.bank.shape == (16, 64) and m.llu_text.bank.shape == (8, 64)
    h = res["history"]
    k = len(h) // 5
    assert sum(r["ce"] for r in h[-k:]) < sum(r["ce"] for r in h[:k])
    zs = zeroshot(m, shapes["test"], cn, TEMPLATES, tok)["top1"]
    after = llu.evaluate_llu(m, tfe, tl, txt)["top1"]
    assert after > zs
    # the same numbers through the generic path (image_features + class_logits with the heads)
    assert evaluate(m, shapes["test"], cn, TEMPLATES, tok)["top1"] == pytest.approx(after)
    for n, p in m.named_parameters():
        if n in enc_before:
            assert torch.equal(p, enc_before[n]) and p.grad is None, n


def test_llu_regulariser_pulls_to_identity(pretrained_base, tok, shapes):
    """The same training with lam = 0 moves the heads away from (I, 0); a large lam keeps them much closer."""
    cn = shapes["classnames"]
    reg = {}
    for lam in (0.0, 1e5):
        m = _llu_model(pretrained_base, llu_lambda=lam)
        feats, labels = llu.extract_image_features(m, shapes["train"])
        txt = llu.class_text_features(m, cn, TEMPLATES, tok)
        llu.train_llu(m, feats, labels, txt, _cfg())
        reg[lam] = sum(float(h.reg().detach()) for h in (m.llu_image, m.llu_text))
    assert reg[0.0] > 0 and reg[1e5] < 0.2 * reg[0.0], reg


def test_train_dispatches_llu_with_cache_checkpoint_and_base_to_new(pretrained_base, tok, shapes, tmp_path):
    cn = shapes["classnames"]
    x, y = shapes["test"].images, shapes["test"].labels
    tf = shapes["test"].transform
    tr_x, tr_y = shapes["train"].images, shapes["train"].labels
    base_train = data.TensorImageDataset(tr_x[tr_y < 4], tr_y[tr_y < 4], tf)
    base_test = data.TensorImageDataset(x[y < 4], y[y < 4], tf)
    new_test = data.TensorImageDataset(x[y >= 4], y[y >= 4] - 4, tf)
    m = _llu_model(pretrained_base)
    cfg = _cfg(output=str(tmp_path / "run"))
    s = train(m, base_train, cn[:4], TEMPLATES, tok, cfg,
              eval_sets={"base": base_test, "new": (new_test, cn[4:])})
    assert set(s["metrics"]) == {"base", "new", "H"}
    assert s["feature_cache"]["misses"] == 3 and s["bank_size"] == 32
    assert all(math.isfinite(v) for v in s["losses"])
    # a second run hits the cache for every dataset
    m2 = _llu_model(pretrained_base)
    s2 = train(m2, base_train, cn[:4], TEMPLATES, tok, cfg, eval_sets={"base": base_test, "new": (new_test, cn[4:])})
    assert s2["feature_cache"] == {**s["feature_cache"], "hits": 3, "misses": 0}
    assert s2["losses"] == s["losses"] and s2["metrics"] == s["metrics"]
    # the checkpoint carries the banks: a fresh model evaluates identically
    m3 = _llu_model(pretrained_base)
    load_trainable(m3, tmp_path / "run" / "checkpoint.safetensors")
    assert evaluate(m3, base_test, cn[:4], TEMPLATES, tok)["top1"] == pytest.approx(s["metrics"]["base"]["top1"])
    assert evaluate(m3, new_test, cn[4:], TEMPLATES, tok)["top1"] == pytest.approx(s["metrics"]["new"]["top1"])


def test_llu_resume_is_exact(pretrained_base, tok, shapes, tmp_path):
    cn = shapes["classnames"]
    a = _llu_model(pretrained_base)
    sa = train(a, shapes["train"], cn, TEMPLATES, tok, _cfg(epochs=3, output=str(tmp_path / "a")))
    b = _llu_model(pretrained_base)
    train(b, shapes["train"], cn, TEMPLATES, tok, _cfg(epochs=3, output=str(tmp_path / "b"), stop_after_epoch=2))
    c = _llu_model(pretrained_base)
    sc = train(c, shapes["train"], cn, TEMPLATES, tok, _cfg(epochs=3, output=str(tmp_path / "b")),
               resume=str(tmp_path / "b"))
    assert sc["losses"] == sa["losses"]
    assert torch.equal(a.llu_image.weight, c.llu_image.weight) and torch.equal(a.llu_text.bias, c.llu_text.bias)


def test_llu_input_errors(pretrained_base):
    m = _llu_model(pretrained_base)
    with pytest.raises(ValueError, match="train_labels"):
        llu.train_llu(m, _unit(4, 64), torch.tensor([0, 1, 2, 5]), _unit(3, 64), _cfg())
    with pytest.raises(ValueError, match="prepare"):
        llu.train_llu(prepare(copy.deepcopy(pretrained_base), "ln"), _unit(4, 64), torch.zeros(4, dtype=torch.long),
                      _unit(3, 64), _cfg())


def test_llu_non_finite_stops_and_keeps_last_finite_checkpoint(pretrained_base, tmp_path):
    """Epoch 1 on finite features (checkpoint written), resumed on NaN features: the run stops at step 5 with one
    line, the epoch-1 checkpoint untouched and the heads in memory as they were; a diverging lr stops before a
    checkpoint holding inf is written."""
    from leanclip import utils
    from leanclip.run_files import CHECKPOINT_NAME, LOG_NAME

    feats, labels, txt = _unit(64, 64, seed=1), torch.arange(64) % 8, _unit(8, 64, seed=2)
    cfg = _cfg(epochs=3, output=str(tmp_path / "a"))
    llu.train_llu(_llu_model(pretrained_base), feats, labels, txt,
                  _cfg(epochs=3, output=str(tmp_path / "a"), stop_after_epoch=1))
    ckpt = tmp_path / "a" / CHECKPOINT_NAME
    saved = ckpt.read_bytes()
    m = _llu_model(pretrained_base)
    with pytest.raises(utils.NonFiniteLossError, match=r"non-finite loss \(nan\) at step 5 \(epoch 2\).*kept at"):
        llu.train_llu(m, torch.full_like(feats, float("nan")), labels, txt, cfg, resume=tmp_path / "a")
    assert ckpt.read_bytes() == saved
    m2 = _llu_model(pretrained_base)
    load_trainable(m2, ckpt)
    for h in ("llu_image", "llu_text"):  # the resumed weights: no NaN step was applied
        for (n, p), (_, p2) in zip(getattr(m, h).named_parameters(), getattr(m2, h).named_parameters()):
            assert torch.equal(p, p2), (h, n)
    assert [r["step"] for r in utils.read_jsonl(tmp_path / "a" / LOG_NAME)] == [1, 2, 3, 4]

    m = _llu_model(pretrained_base)
    with pytest.raises(utils.NonFiniteLossError, match="learning rate .* too high"):
        llu.train_llu(m, feats, labels, txt, _cfg(epochs=2, lr=utils.LR_MAX, optimizer="sgd", scheduler="constant",
                                                  output=str(tmp_path / "b")))  # the highest rate a config takes
    if (tmp_path / "b" / CHECKPOINT_NAME).exists():  # the one an earlier epoch left, finite
        assert all(torch.isfinite(t).all() for t in read_trainable(tmp_path / "b" / CHECKPOINT_NAME)[1].values())
