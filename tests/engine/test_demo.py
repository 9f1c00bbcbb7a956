"""``leanclip demo``: the quick demo end to end through the CLI (demo.json + PNG, sane values, trainable counts),
determinism for a seed, the symmetric InfoNCE against a hand computation, and the pre-training loop's seeding."""
import json
import math
import os
import stat
import warnings

import pytest
import torch

from leanclip import cli, kernels
from leanclip.cli import demo
from leanclip.losses import clip_loss
from leanclip.pretrain import pretrain_contrastive

PER_METHOD_KEYS = {"trainable_params", "base_acc", "new_acc", "H", "step_time_ratio", "saved_act_ratio"}


@pytest.fixture(autouse=True)
def _torch_backend():  # also set by tests/engine/conftest.py; kept so this file runs on its own
    with kernels.set_backend("torch"):
        yield


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One quick demo through the CLI hook (``leanclip demo --quick``), shared by the tests below."""
    out = tmp_path_factory.mktemp("demo")
    rc = cli.main(["demo", "--quick", "--output", str(out), "--seed", "0", "--no-progress", "--threads", "1"])
    assert rc == 0
    return out, json.loads((out / "demo.json").read_text())


def test_quick_demo_writes_json_and_png(quick_run):
    out, res = quick_run
    png = (out / "demo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert not [p.name for p in out.iterdir() if p.name not in ("demo.json", "demo.png")]  # no temp files left
    mask = os.umask(0)
    os.umask(mask)
    for f in ("demo.json", "demo.png"):  # the usual umask mode, not the temp file's 0600
        assert stat.S_IMODE((out / f).stat().st_mode) == 0o666 & ~mask, f
    for m in demo.METHODS:
        assert PER_METHOD_KEYS <= set(res[m]), m
        for k in ("base_acc", "new_acc", "H"):
            assert 0.0 <= res[m][k] <= 1.0, (m, k, res[m][k])
        b, n = res[m]["base_acc"], res[m]["new_acc"]
        assert res[m]["H"] == pytest.approx(0.0 if b + n == 0 else 2 * b * n / (b + n))
        assert res[m]["trainable_params"] > 0
        assert res[m]["step_time_ratio"] > 0 and math.isfinite(res[m]["step_time_ratio"])
        assert 0 < res[m]["saved_act_ratio"] <= 1.05, (m, res[m]["saved_act_ratio"])  # lean never keeps more
        assert isinstance(res[m]["beats_zero_shot"], bool)
    zs = res["zero-shot"]
    assert {"base_acc", "new_acc", "H"} <= set(zs) and all(0.0 <= zs[k] <= 1.0 for k in ("base_acc", "new_acc", "H"))
    assert res["config"]["name"] == "quick" and res["config"]["seed"] == 0
    assert res["machine"]["torch"] == torch.__version__
    assert res["task"]["shots"] == demo.QUICK.shots
    nb = len(res["task"]["base"])
    assert nb == math.ceil(demo.QUICK.n_classes / 2) and len(res["task"]["new"]) == demo.QUICK.n_classes - nb
    assert res["task"]["train_images"] == nb * demo.QUICK.shots
    assert res["pretrain"]["steps"] == demo.QUICK.pretrain_steps
    assert res["pretrain"]["final_loss"] < res["pretrain"]["first_loss"]  # the pre-training learns something


def test_quick_demo_trainable_params_match_a_fresh_prepare(quick_run):
    import open_clip

    from leanclip.methods import count_trainable, prepare

    _, res = quick_run
    name = demo.register_demo_config(demo.QUICK)
    tokenizer = open_clip.get_tokenizer(name)
    for m in demo.METHODS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = open_clip.create_model(name, pretrained=None)
        prepare(model, m, classnames=res["task"]["base"], tokenizer=tokenizer)
        assert res[m]["trainable_params"] == count_trainable(model), m


def test_quick_demo_is_deterministic(quick_run):
    """Same seed, same thread count -> the same accuracies (lean-vs-plain timing skipped: it is not seeded)."""
    _, res = quick_run
    again = demo.run_demo(demo.QUICK, output=None, seed=0, progress=False, measure=False)
    for m in ("zero-shot", *demo.METHODS):
        for k in ("base_acc", "new_acc", "H"):
            assert again[m][k] == res[m][k], (m, k)
    assert again["pretrain"]["loss_every_10"] == res["pretrain"]["loss_every_10"]
    assert again["zero-shot"]["step_time_ratio"] is None and again["ln"]["saved_act_ratio"] is None


def test_demo_notes_methods_that_do_not_beat_zero_shot():
    results = {"zero-shot": {"H": 0.5}, "ln": {"H": 0.6}, "bitfit": {"H": 0.5}, "llu": {"H": 0.4}, "full": {"H": 0.1}}
    notes = demo.compare_to_zero_shot(results, ["ln", "bitfit", "llu", "full"])
    assert [r["beats_zero_shot"] for r in (results["ln"], results["bitfit"], results["llu"], results["full"])] == [
        True, False, False, False]
    assert len(notes) == 2 and "bitfit" in notes[0] and "llu" in notes[1]  # "full" is the reference, not a PEFT method
    assert all("does NOT beat zero-shot" in n for n in notes)


def test_format_table_lists_every_method():
    rows = {"zero-shot": {"trainable_params": 0, "base_acc": 0.5, "new_acc": 0.25, "H": 1 / 3, "step_time_ratio": None,
                          "saved_act_ratio": None},
            "ln": {"trainable_params": 1234, "base_acc": 1.0, "new_acc": 0.5, "H": 2 / 3, "step_time_ratio": 0.5,
                   "saved_act_ratio": 0.25}}
    table = demo.format_table(rows).splitlines()
    assert table[0].split()[0] == "method" and len(table) == 4
    assert "1,234" in table[3] and "0.50x" in table[3] and "0.25x" in table[3] and "66.7%" in table[3]
    assert table[2].split()[-1] == "-"


def test_demo_cli_rejects_bad_threads(capsys):
    assert cli.main(["demo", "--quick", "--threads", "-1", "--output", "unused"]) == 2
    assert "--threads" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------- loss
def test_clip_loss_matches_hand_computation():
    img = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0, 0.5], [0.2, 1.0, 0.0], [0.0, 0.3, 1.0]]), dim=-1)
    txt = torch.nn.functional.normalize(torch.tensor([[0.9, 0.1, 0.4], [0.0, 1.0, 0.2], [0.5, 0.0, 1.0]]), dim=-1)
    scale = 10.0
    s = [[scale * sum(float(a) * float(b) for a, b in zip(img[i], txt[j])) for j in range(3)] for i in range(3)]

    def ce_rows(m):  # mean over rows i of -log softmax(m[i])[i]
        return sum(math.log(sum(math.exp(v) for v in m[i])) - m[i][i] for i in range(3)) / 3

    st = [[s[j][i] for j in range(3)] for i in range(3)]
    expected = 0.5 * (ce_rows(s) + ce_rows(st))
    got = clip_loss(img, txt, scale)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert clip_loss(img.double(), txt.double(), scale).dtype == torch.float64
    assert float(got) == pytest.approx(expected, rel=1e-5)
    assert float(clip_loss(img, txt, torch.tensor(scale))) == pytest.approx(expected, rel=1e-5)  # tensor scale
    assert float(clip_loss(img.bfloat16(), txt.bfloat16(), scale)) == pytest.approx(expected, rel=3e-2)


def test_clip_loss_gradient_and_errors():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(5, 8, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    txt = torch.nn.functional.normalize(torch.randn(5, 8, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: clip_loss(a, b, 3.0).double(), (img, txt))
    # perfectly aligned pairs with a large scale: loss -> 0
    eye = torch.eye(4)
    assert float(clip_loss(eye, eye, 100.0)) < 1e-6
    with pytest.raises(ValueError, match="must match"):
        clip_loss(torch.randn(3, 4), torch.randn(2, 4), 1.0)
    with pytest.raises(ValueError, match="2-D"):
        clip_loss(torch.randn(3), torch.randn(3), 1.0)
    with pytest.raises(ValueError, match="empty"):
        clip_loss(torch.randn(0, 4), torch.randn(0, 4), 1.0)
    with pytest.raises(TypeError):
        clip_loss([[1.0]], torch.randn(1, 1), 1.0)


# ----------------------------------------------------------------------------------------------------- pre-training
def _pretrain(create_model, name, seed, steps=3):
    import open_clip

    from leanclip.synthetic import make_caption_corpus

    torch.manual_seed(0)
    model = create_model(name)
    tok = open_clip.get_tokenizer(name)
    x, caps = make_caption_corpus(24, size=32, seed=0, as_float=True)
    losses = pretrain_contrastive(model, x, caps, tok, steps=steps, batch_size=8, lr=1e-3, seed=seed)
    return losses, model


def test_pretrain_contrastive_is_seeded(create_model, tiny_name):
    a, ma = _pretrain(create_model, tiny_name, seed=5)
    b, mb = _pretrain(create_model, tiny_name, seed=5)
    c, _ = _pretrain(create_model, tiny_name, seed=6)
    assert len(a) == 3 and all(math.isfinite(v) for v in a)
    assert a == b and a != c
    for (n, p), (_, q) in zip(ma.named_parameters(), mb.named_parameters()):
        assert torch.equal(p, q), n
    assert not ma.training  # left in eval mode
    assert float(ma.logit_scale.detach()) <= math.log(100.0) + 1e-6


def test_pretrain_contrastive_validates(create_model, tiny_name):
    import open_clip

    model = create_model(tiny_name)
    tok = open_clip.get_tokenizer(tiny_name)
    x = torch.zeros(4, 3, 32, 32)
    with pytest.raises(ValueError, match="captions"):
        pretrain_contrastive(model, x, ["a"] * 3, tok, steps=1, batch_size=2, lr=1e-3, seed=0)
    with pytest.raises(ValueError, match="images"):
        pretrain_contrastive(model, x[0], ["a"] * 4, tok, steps=1, batch_size=2, lr=1e-3, seed=0)
    with pytest.raises(ValueError, match="steps"):
        pretrain_contrastive(model, x, ["a"] * 4, tok, steps=0, batch_size=2, lr=1e-3, seed=0)
