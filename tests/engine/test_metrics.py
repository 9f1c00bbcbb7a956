"""Metrics on hand-computed examples, plus brute-force cross-checks of the chunked retrieval ranks."""
import math

import numpy as np
import pytest
import torch

from leanclip import metrics as M


def test_accuracy_hand_example():
    logits = torch.tensor(
        [
            [0.9, 0.05, 0.02, 0.01, 0.01, 0.01],  # label 0: top-1 hit
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # label 1: rank 5 -> top-5 hit only
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # label 0: rank 6 -> miss
            [0.0, 0.0, 1.0, 0.5, 0.0, 0.0],  # label 3: rank 2 -> top-5 hit
        ]
    )
    labels = torch.tensor([0, 1, 0, 3])
    acc = M.accuracy(logits, labels)
    assert acc == {"top1": 25.0, "top5": 75.0}
    assert M.accuracy(logits, labels, topk=(1, 2, 6)) == {"top1": 25.0, "top2": 50.0, "top6": 100.0}
    assert M.accuracy(logits.numpy(), labels.numpy(), topk=1) == {"top1": 25.0}
    # fewer classes than k: top-5 of 3 classes counts everything
    three = torch.tensor([[0.1, 0.7, 0.2], [1.0, 0.0, 0.5]])
    assert M.accuracy(three, torch.tensor([0, 1])) == {"top1": 0.0, "top5": 100.0}
    meter = M.AccuracyMeter((1, 5))
    meter.update(logits[:3], labels[:3])
    meter.update(logits[3:], labels[3:])
    assert meter.compute() == acc
    # balanced accuracy: class 0 -> 1/2, class 1 -> 0/1, class 3 -> 0/1
    assert M.mean_per_class_accuracy(logits, labels) == pytest.approx(100 * (0.5 + 0 + 0) / 3)


def test_accuracy_errors():
    logits = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        M.accuracy(logits, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="labels must be 1-D"):
        M.accuracy(logits, torch.tensor([0]))
    with pytest.raises(ValueError, match="2-D"):
        M.accuracy(torch.zeros(3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="empty"):
        M.accuracy(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(TypeError, match="integers"):
        M.accuracy(logits, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="topk"):
        M.accuracy(logits, torch.tensor([0, 1]), topk=(0,))
    with pytest.raises(ValueError, match="no samples"):
        M.AccuracyMeter().compute()


def test_harmonic_mean():
    assert M.harmonic_mean(80.0, 60.0) == pytest.approx(2 * 80 * 60 / 140)
    assert M.harmonic_mean(0.0, 0.0) == 0.0
    assert M.harmonic_mean(0.0, 70.0) == 0.0
    assert M.harmonic_mean(50, 50) == 50.0
    with pytest.raises(ValueError, match="non-negative"):
        M.harmonic_mean(-1, 5)
    with pytest.raises(ValueError):
        M.harmonic_mean(float("nan"), 5)


# 3 images × 6 captions, two captions per image (txt_to_img = [0, 0, 1, 1, 2, 2]).
SIM = torch.tensor(
    [
        [0.9, 0.1, 0.8, 0.2, 0.3, 0.0],  # img0: best positive 0.9, no negative >= -> rank 0
        [0.7, 0.6, 0.5, 0.4, 0.1, 0.2],  # img1: best positive 0.5, negatives 0.7, 0.6 -> rank 2
        [0.1, 0.2, 0.3, 0.4, 0.35, 0.05],  # img2: best positive 0.35, negative 0.4 -> rank 1
    ]
)
T2I = [0, 0, 1, 1, 2, 2]
# t2i ranks per caption column: [0, 2, 1, 1 (tie 0.4 with img2 counts against), 0, 1]


def test_retrieval_recall_hand_example():
    r = M.retrieval_recall(SIM, T2I, ks=(1, 2, 3))
    assert r["i2t_R@1"] == pytest.approx(100 / 3)
    assert r["i2t_R@2"] == pytest.approx(200 / 3)
    assert r["i2t_R@3"] == pytest.approx(100.0)
    assert r["t2i_R@1"] == pytest.approx(100 * 2 / 6)
    assert r["t2i_R@2"] == pytest.approx(100 * 5 / 6)
    assert r["t2i_R@3"] == pytest.approx(100.0)
    assert r["i2t_mean"] == pytest.approx((100 / 3 + 200 / 3 + 100) / 3)
    assert r["mean"] == pytest.approx((r["i2t_mean"] + r["t2i_mean"]) / 2)
    # same via img_to_txt (explicit or nested), tensor mapping, numpy input, and one-row chunks
    for kwargs in (
        dict(img_to_txt=[[0, 1], [2, 3], [4, 5]]),
        dict(txt_to_img=[[0, 1], [2, 3], [4, 5]]),
        dict(txt_to_img=torch.tensor(T2I)),
        dict(txt_to_img=T2I, chunk_size=1),
    ):
        assert M.retrieval_recall(SIM, ks=(1, 2, 3), **kwargs) == r
    assert M.retrieval_recall(SIM.numpy(), T2I, ks=(1, 2, 3)) == r
    # default ks: every k >= number of candidates is a hit
    d = M.retrieval_recall(SIM, T2I)
    assert set(d) == {f"{w}_R@{k}" for w in ("i2t", "t2i") for k in (1, 5, 10)} | {"i2t_mean", "t2i_mean", "mean"}
    assert d["i2t_R@5"] == d["t2i_R@10"] == 100.0


def test_retrieval_identity_and_ties():
    assert M.retrieval_recall(torch.eye(4))["mean"] == 100.0
    const = M.retrieval_recall(torch.ones(4, 4), ks=(1, 4))  # ties count against the query
    assert const["i2t_R@1"] == 0.0 and const["t2i_R@1"] == 0.0 and const["i2t_R@4"] == 100.0
    with pytest.raises(ValueError, match="square"):
        M.retrieval_recall(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="image 2 has no caption"):
        M.retrieval_recall(torch.zeros(3, 3), [0, 0, 1])
    with pytest.raises(ValueError, match="txt_to_img has 2 entries"):
        M.retrieval_recall(torch.zeros(3, 3), [0, 1])
    with pytest.raises(ValueError, match="two images"):
        M.retrieval_recall(torch.zeros(2, 2), img_to_txt=[[0, 1], [1]])
    with pytest.raises(ValueError, match="NaN"):
        M.retrieval_recall(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))


def _brute_ranks(sim: np.ndarray, t2i: np.ndarray):
    """Sort-based ranks (no ties in random data)."""
    n_img, n_txt = sim.shape
    i2t = []
    for i in range(n_img):
        order = np.argsort(-sim[i])
        i2t.append(min(int(np.nonzero(order == j)[0][0]) for j in np.nonzero(t2i == i)[0]))
    t2i_r = [int(np.nonzero(np.argsort(-sim[:, j]) == t2i[j])[0][0]) for j in range(n_txt)]
    return np.array(i2t), np.array(t2i_r)


def test_retrieval_matches_brute_force_and_features():
    g = torch.Generator().manual_seed(0)
    n_img, caps, dim = 37, 5, 16
    img = torch.randn(n_img, dim, generator=g)
    t2i = torch.arange(n_img).repeat_interleave(caps)[torch.randperm(n_img * caps, generator=g)]
    txt = img[t2i] + 1.5 * torch.randn(n_img * caps, dim, generator=g)  # noisy captions: ranks spread out
    imgn, txtn = torch.nn.functional.normalize(img, dim=-1), torch.nn.functional.normalize(txt, dim=-1)
    sim = (imgn.double() @ txtn.double().T)
    ks = (1, 5, 10)
    r_i2t, r_t2i = _brute_ranks(sim.numpy(), t2i.numpy())
    want = {**{f"i2t_R@{k}": 100 * float(np.mean(r_i2t < k)) for k in ks},
            **{f"t2i_R@{k}": 100 * float(np.mean(r_t2i < k)) for k in ks}}
    assert 0 < want["i2t_R@1"] < 100 and 0 < want["t2i_R@1"] < 100
    got = M.retrieval_recall(sim, t2i, ks, chunk_size=8)
    for key, val in want.items():
        assert got[key] == pytest.approx(val), key
    feat = M.retrieval_recall_from_features(img.double(), txt.double(), t2i, ks, chunk_size=5)
    for key, val in want.items():
        assert feat[key] == pytest.approx(val), key
    feat32 = M.retrieval_recall_from_features(img, txt, t2i.tolist(), ks)  # float32, one block
    assert math.isclose(feat32["mean"], got["mean"], abs_tol=1e-9)
    with pytest.raises(ValueError, match="equal D"):
        M.retrieval_recall_from_features(img, txt[:, :3], t2i)
