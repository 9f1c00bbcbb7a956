"""LilT's zero-shot protocol after alignment: its prompts, --templates / --template-set honoured, CIFAR-100 and SVHN
in torchvision's on-disk layouts (tiny fake files written here), a split file as --zeroshot-data."""
import json
import os
import pickle

import numpy as np
import pytest
from cli_checks import last_json, run
from PIL import Image

from leanclip.zeroshot_sets import lilt_templates, read_cifar100, read_svhn


def _cifar100(root, n=6, classes=("apple", "maple_tree", "bus")):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
    labels = [i % len(classes) for i in range(n)]
    for split in ("train", "test"):
        with open(folder / split, "wb") as f:
            pickle.dump({"data": data, "fine_labels": labels, "coarse_labels": [0] * n}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": list(classes), "coarse_label_names": ["x"]}, f)
    return data, labels


def _svhn(root, n=5):
    from scipy.io import savemat

    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    y = np.array([[10], [1], [2], [10], [9]][:n], dtype=np.uint8)
    root.mkdir(parents=True, exist_ok=True)
    savemat(str(root / "test_32x32.mat"), {"X": x, "y": y})
    return x, y


def test_lilt_prompts():
    assert lilt_templates("svhn") == ["a photo of the number {}"] == lilt_templates("SVHN")
    assert lilt_templates("ImageNetV2") == ["a photo of {}"] == lilt_templates("cifar100") == lilt_templates(None)


def test_cifar100_reader(tmp_path):
    data, labels = _cifar100(tmp_path)
    images, got, names = read_cifar100(tmp_path)
    assert names == ["apple", "maple tree", "bus"] and got == labels
    assert images.shape == (6, 3, 32, 32) and np.array_equal(images.reshape(6, -1).numpy(), data)


def test_svhn_reader_maps_ten_to_zero(tmp_path):
    x, _ = _svhn(tmp_path)
    images, labels, names = read_svhn(tmp_path)
    assert labels == [0, 1, 2, 0, 9] and names == [str(d) for d in range(10)]
    assert images.shape == (5, 3, 32, 32) and int(images[2, 1, 4, 7]) == int(x[4, 7, 1, 2])  # (h, w, c, n) -> nchw


def test_cifar_pickle_may_not_run_code(tmp_path):
    _cifar100(tmp_path)
    with open(tmp_path / "cifar-100-python" / "test", "wb") as f:
        pickle.dump(os.getcwd, f)  # a global outside numpy
    with pytest.raises(ValueError, match="not a CIFAR pickle"):
        read_cifar100(tmp_path)


TRAIN = ("train", "--task", "contrastive", "--method", "lilt-ln", "--synthetic-pairs", 16, "--batch-size", 8,
         "--max-steps", 1, "--no-initial-eval", "--synthetic-eval-pairs", 8, "--threads", 1, "--no-progress")


def _zeroshot(capsys, out, *flags):
    rc, stdout, err = run(capsys, *TRAIN, *flags, "--output", out)
    assert rc == 0, err
    return last_json(stdout)["zeroshot"]


def test_after_alignment_cifar100_with_lilt_prompt_and_templates_honoured(capsys, tmp_path):
    _cifar100(tmp_path / "data")
    common = ("--zeroshot-data", tmp_path / "data", "--zeroshot-dataset", "cifar100")
    zs = _zeroshot(capsys, tmp_path / "a", *common)
    assert zs["templates"] == ["a photo of {}"] and zs["n"] == 6
    zs = _zeroshot(capsys, tmp_path / "b", *common, "--templates", "a blurry {} here", "itap of {}")
    assert zs["templates"] == ["a blurry {} here", "itap of {}"]
    zs = _zeroshot(capsys, tmp_path / "c", *common, "--template-set", "coop")
    assert zs["templates"] == ["a photo of a {}."]  # CoOp's default for a dataset it does not list


def test_after_alignment_svhn_and_a_split_file(capsys, tmp_path):
    _svhn(tmp_path / "svhn")
    zs = _zeroshot(capsys, tmp_path / "a", "--zeroshot-data", tmp_path / "svhn", "--zeroshot-dataset", "SVHN")
    assert zs["templates"] == ["a photo of the number {}"] and zs["n"] == 5
    folder = tmp_path / "split"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (32, 32), (60 * i, 0, 0)).save(folder / f"{i}.png")
    entries = [[f"{i}.png", i % 2, ["cat", "dog"][i % 2]] for i in range(4)]
    (folder / "split_zhou_Pets.json").write_text(json.dumps({"train": entries, "val": [], "test": entries}))
    zs = _zeroshot(capsys, tmp_path / "b", "--zeroshot-data", folder / "split_zhou_Pets.json")
    assert zs["dataset"] == "Pets" and zs["n"] == 4 and zs["templates"] == ["a photo of {}"]


def test_templates_without_zeroshot_data_is_a_usage_error(capsys, tmp_path):
    rc, _, err = run(capsys, *TRAIN, "--templates", "a {}", "--output", tmp_path / "x")
    assert rc == 2 and "need --zeroshot-data" in err and not (tmp_path / "x").exists()
    _svhn(tmp_path / "svhn")
    rc, _, err = run(capsys, *TRAIN, "--zeroshot-data", tmp_path / "nope", "--zeroshot-dataset", "svhn",
                     "--output", tmp_path / "y")
    assert rc == 2 and "nope" in err and not (tmp_path / "y").exists()
