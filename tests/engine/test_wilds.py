"""WILDS readers on tiny fake layouts the tests write (the wilds package's folder names and CSV columns), their
official splits, the metrics against direct computations (sklearn for macro F1), and the split-file export."""
import csv
import os

import pytest
import torch
from PIL import Image

from leanclip import data as D
from leanclip.cli import wilds
from tests.engine.cli_checks import run as _run


def _png(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (8, 8), (120, 30, 200)).save(path)


def _csv(path, header, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


@pytest.fixture
def fmow(tmp_path):
    d = tmp_path / "fmow_v1.1"
    rows = [  # split, category, country_code, timestamp -> expected official split
        ("train", "airport", "USA", "2010-05-01T10:00:00Z"),      # train
        ("val", "zoo", "FRA", "2012-12-31T23:59:59Z"),            # id_val
        ("test", "dam", "KEN", "2011-01-01T00:00:00Z"),           # id_test
        ("val", "port", "JPN", "2014-03-03T00:00:00Z"),           # val (OOD)
        ("test", "tower", "BRA", "2016-01-01T00:00:00Z"),         # test (OOD)
        ("test", "park", "XXX", "2017-06-01T00:00:00.000Z"),      # test, unknown country -> Other
        ("train", "barn", "USA", "2016-02-01T00:00:00Z"),         # train from 2016: in no official split
        ("seq", "barn", "USA", "2010-01-01T00:00:00Z"),           # seq: not used
    ]
    _csv(d / "rgb_metadata.csv", ["split", "img_filename", "category", "country_code", "timestamp"],
         [(s, f"x{i}.jpg", c, cc, t) for i, (s, c, cc, t) in enumerate(rows)])
    _csv(d / "country_code_mapping.csv", ["alpha-3", "region"],
         [("USA", "Americas"), ("BRA", "Americas"), ("FRA", "Europe"), ("KEN", "Africa"), ("JPN", "Asia")])
    for i in range(len(rows)):
        _png(str(d / "images" / f"rgb_img_{i}.png"))
    return tmp_path


def test_fmow_official_splits_and_regions(fmow):
    data = wilds.load_wilds(fmow, "FMoW")
    got = {s: [(os.path.basename(x.path), x.classname) for x in v] for s, v in data.splits.items()}
    assert got == {"train": [("rgb_img_0.png", "airport")], "id_val": [("rgb_img_1.png", "zoo")],
                   "id_test": [("rgb_img_2.png", "dam")], "val": [("rgb_img_3.png", "port")],
                   "test": [("rgb_img_4.png", "tower"), ("rgb_img_5.png", "park")]}
    assert data.groups["test"] == ["Americas", "Other"] and data.groups["val"] == ["Asia"]
    assert data.splits["train"][0].label == wilds.FMOW_CATEGORIES.index("airport") == 0
    assert len(wilds.FMOW_CATEGORIES) == 62 and list(wilds.FMOW_CATEGORIES) == sorted(wilds.FMOW_CATEGORIES)
    assert wilds.load_wilds(fmow / "fmow_v1.1", "fmow").splits == data.splits  # the dataset folder itself works


def test_fmow_errors(fmow):
    os.remove(fmow / "fmow_v1.1" / "images" / "rgb_img_4.png")
    with pytest.raises(FileNotFoundError, match="1 image"):
        wilds.read_fmow(fmow)
    assert wilds.read_fmow(fmow, check_exists=False).splits["test"]
    _csv(fmow / "fmow_v1.1" / "country_code_mapping.csv", ["alpha3", "region"], [])
    with pytest.raises(ValueError, match="alpha-3"):
        wilds.read_fmow(fmow)
    with pytest.raises(ValueError, match="unknown WILDS dataset"):
        wilds.load_wilds(fmow, "imagenet")


def test_camelyon17_layout(tmp_path):
    d = tmp_path / "camelyon17_v1.0"
    rows = [("004", 4, 3328, 21792, 1, 0, 0), ("010", 0, 100, 200, 0, 3, 1), ("039", 1, 8, 16, 1, 1, 0),
            ("099", 4, 5, 6, 0, 2, 0)]
    _csv(d / "metadata.csv", ["", "patient", "node", "x_coord", "y_coord", "tumor", "slide", "center", "split"],
         [(i, p, n, x, y, t, 0, c, s) for i, (p, n, x, y, t, c, s) in enumerate(rows)])
    for p, n, x, y, *_ in rows:
        _png(str(d / "patches" / f"patient_{p}_node_{n}" / f"patch_patient_{p}_node_{n}_x_{x}_y_{y}.png"))
    data = wilds.load_wilds(tmp_path, "camelyon17")
    assert {s: len(v) for s, v in data.splits.items()} == {"train": 1, "id_val": 1, "id_test": 0, "val": 1, "test": 1}
    assert data.splits["train"][0].path.endswith("patient_004_node_4/patch_patient_004_node_4_x_3328_y_21792.png")
    assert [s.classname for s in data.splits["train"]] == ["tumor"] and data.groups["test"] == ["hospital 2"]


def test_iwildcam_layout_and_path_containment(tmp_path):
    d = tmp_path / "iwildcam_v2.0"
    _csv(d / "categories.csv", ["y", "category_id", "name"], [(0, 0, "empty"), (1, 7, "zebra"), (2, 9, "lion")])
    rows = [("train", 1, "a.jpg", 3), ("id_test", 2, "b.jpg", 3), ("test", 0, "c.jpg", 11)]
    _csv(d / "metadata.csv", ["split", "location_remapped", "y", "filename"], [(s, loc, y, f) for s, y, f, loc in rows])
    for _, _, f, _ in rows:
        _png(str(d / "train" / f))
    data = wilds.load_wilds(tmp_path, "iwildcam")
    assert data.classnames == ["empty", "zebra", "lion"]
    pairs = [(s.classname, g) for s, g in zip(data.splits["id_test"], data.groups["id_test"])]
    assert pairs == [("lion", "location 3")]
    _csv(d / "metadata.csv", ["split", "location_remapped", "y", "filename"], [("train", 0, 1, "../../secret.jpg")])
    with pytest.raises(ValueError, match="outside the image root"):
        wilds.read_iwildcam(tmp_path, check_exists=False)


def test_group_accuracy_and_worst_region():
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    preds = torch.tensor([0, 1, 0, 0, 0, 2, 1])
    groups = ["Asia", "Asia", "Europe", "Europe", "Other", "Other", "Africa"]
    r = wilds.wilds_metrics("fmow", preds, labels, groups)
    assert r["acc_avg"] == pytest.approx(100 * 4 / 7)
    assert r["per_group"] == {"Africa": {"acc": 0.0, "n": 1}, "Asia": {"acc": 100.0, "n": 2},
                              "Europe": {"acc": 50.0, "n": 2}, "Other": {"acc": 50.0, "n": 2}}
    assert r["acc_worst_region"] == 0.0
    r = wilds.wilds_metrics("fmow", preds[:6], labels[:6], groups[:6])  # no Africa sample: Other is not counted
    assert r["acc_worst_region"] == 50.0
    logits = torch.nn.functional.one_hot(preds, 3).float()  # (N, C) logits are reduced by argmax
    assert wilds.group_accuracy(logits, labels, groups) == wilds.group_accuracy(preds, labels, groups)
    with pytest.raises(ValueError, match="one entry per sample"):
        wilds.group_accuracy(preds, labels, groups[:3])


def test_macro_f1_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 6, (200,), generator=g)
    labels[labels == 4] = 5  # class 4 absent from the ground truth but predicted sometimes
    preds = torch.where(torch.rand(200, generator=g) < 0.6, labels, torch.randint(0, 7, (200,), generator=g))
    want = 100 * metrics.f1_score(labels.numpy(), preds.numpy(), average="macro", labels=torch.unique(labels).numpy())
    assert wilds.macro_f1(preds, labels) == pytest.approx(want, abs=1e-9)
    assert wilds.wilds_metrics("iwildcam", preds, labels, ["l"] * 200)["f1_macro"] == pytest.approx(want, abs=1e-9)


def test_export_split_file_reads_back(fmow, tmp_path):
    data = wilds.load_wilds(fmow, "fmow")
    path = wilds.export_split_file(data, tmp_path / "split_zhou_FMoW.json", val="id_val", test="test")
    back = D.read_split_file(path, data.root)
    assert [s.path for s in back["test"]] == [s.path for s in data.splits["test"]]
    assert [s.label for s in back["val"]] == [s.label for s in data.splits["id_val"]]
    with pytest.raises(ValueError, match="val must be one of"):
        wilds.export_split_file(data, tmp_path / "x.json", val="dev")


# ------------------------------------------------------------------------------------------------ command
def test_cli_fmow_metrics_match_evaluate(capsys, fmow, weights, tmp_path):
    import json

    import open_clip

    from leanclip.checkpoint import load_pretrained
    from leanclip.configs import create_random_model
    from leanclip.trainer import evaluate

    rc, out, err = _run(capsys, "wilds", "--data", fmow, "--dataset", "fmow", "--pretrained", weights, "--split",
                        "test", "--no-progress", "--threads", 1, "--output", tmp_path / "o")
    assert rc == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert res["n"] == 2 and set(res["per_group"]) == {"Americas", "Other"} and res["group_field"] == "region"
    assert res["acc_worst_region"] == res["per_group"]["Americas"]["acc"]  # "Other" is not a region to rank
    assert json.loads((tmp_path / "o" / "wilds.json").read_text()) == res
    data = wilds.load_wilds(fmow, "fmow")
    model = create_random_model("leanclip-tiny", 0)
    load_pretrained(model, weights)
    ds = D.ImageDataset(data.splits["test"], D.clip_transform(32, train=False))
    want = evaluate(model, ds, data.classnames, ["a photo of a {}."], open_clip.get_tokenizer("leanclip-tiny"))
    assert res["acc_avg"] == pytest.approx(want["top1"])


def test_cli_export_reads_back_through_split_file(capsys, tmp_path, weights):
    import json

    d = tmp_path / "camelyon17_v1.0"
    rows = [(f"{p:03d}", 0, 10 * i, 20 * i, i % 2, c, s) for i, (p, c, s) in
            enumerate([(1, 0, 0), (1, 0, 0), (2, 3, 1), (5, 1, 0), (6, 2, 0), (6, 2, 0)])]
    _csv(d / "metadata.csv", ["patient", "node", "x_coord", "y_coord", "tumor", "center", "split"], rows)
    for p, n, x, y, *_ in rows:
        _png(str(d / "patches" / f"patient_{p}_node_{n}" / f"patch_patient_{p}_node_{n}_x_{x}_y_{y}.png"))
    split = tmp_path / "split_zhou_Camelyon17.json"
    rc, out, err = _run(capsys, "wilds", "--data", tmp_path, "--dataset", "camelyon17", "--export-split", split)
    assert rc == 0, err
    assert json.loads(out.strip().splitlines()[-1])["splits"] == {"train": 2, "id_val": 1, "id_test": 0, "val": 1,
                                                                  "test": 2}
    rc, out, err = _run(capsys, "zeroshot", "--split-file", split, "--image-root", d, "--pretrained", weights,
                        "--no-progress", "--threads", 1)
    assert rc == 0, err
    assert json.loads(out.strip().splitlines()[-1])["n"] == 2
    rc, out, err = _run(capsys, "wilds", "--data", tmp_path, "--dataset", "camelyon17", "--split", "id_test")
    assert rc == 2 and "id_test split of camelyon17" in err and out == ""


@pytest.mark.parametrize("flags,needle", [
    (["--data", "{tmp}/nope", "--dataset", "fmow"], "not a directory"),
    (["--data", "{tmp}", "--dataset", "mnist"], "invalid choice"),
    (["--data", "{tmp}", "--dataset", "fmow"], "holds no fmow_v1.1/ folder"),
    (["--data", "{tmp}", "--dataset", "fmow", "--export-split", "{tmp}/s.json", "--pretrained", "x"], "drop"),
    (["--data", "{tmp}", "--dataset", "fmow", "--checkpoint", "{tmp}/nope"], "--checkpoint"),
])
def test_cli_bad_input_exit_2(capsys, tmp_path, flags, needle):
    rc, out, err = _run(capsys, "wilds", *[f.format(tmp=tmp_path) for f in flags], "--output", tmp_path / "out")
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "s.json").exists()
