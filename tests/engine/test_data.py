"""Data layer, templates and synthetic generator. Fixtures are written into tmp_path at run time (no binary files)."""
import json
import os
import re

import numpy as np
import pytest
import torch

from leanclip import data as D
from leanclip import synthetic as S
from leanclip import templates as T
from leanclip.data import Sample

# ----------------------------------------------------------------------------------------------------------------------
# helpers / fixtures


def _fake_samples(counts: dict[int, int], root="/data/x") -> list[Sample]:
    """Samples without files: counts = {label: n}."""
    return [Sample(f"{root}/c{y}/img_{i:03d}.jpg", y, f"class {y}") for y, n in counts.items() for i in range(n)]


@pytest.fixture(scope="module")
def classes():
    return S.make_classes(5, seed=3)


@pytest.fixture()
def split_tree(tmp_path, classes):
    """CoOp-style flat layout: tmp/split_zhou_Synthetic.json + tmp/images/<class>/<split>_i.png."""
    path = S.write_split_file(tmp_path, classes, n_train=6, n_val=2, n_test=3, size=16, seed=0)
    return tmp_path, path


# ----------------------------------------------------------------------------------------------------------------------
# ImageFolderSource


def test_image_folder_source_labels_sorted(tmp_path, classes):
    samples = S.write_image_folder(tmp_path / "tree", classes, 3, size=16, seed=1)
    src = D.ImageFolderSource(tmp_path / "tree")
    assert src.class_folders == sorted(c.folder for c in classes)
    assert src.classnames == [f.replace("_", " ") for f in src.class_folders]
    assert len(src) == 15 == len(samples)
    for s in src:
        assert os.path.isfile(s.path)
        assert src.classnames[s.label] == s.classname
        assert os.path.basename(os.path.dirname(s.path)) == src.class_folders[s.label]
    # written labels follow `classes` order; read labels the sorted order -- names agree
    by_path = {s.path: s.classname for s in samples}
    assert all(by_path[s.path] == s.classname for s in src)


def test_image_folder_source_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        D.ImageFolderSource(missing)
    (tmp_path / "empty_root").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        D.ImageFolderSource(tmp_path / "empty_root")
    root = tmp_path / "root"
    S.write_image_folder(root, S.make_classes(2, 0), 2, size=8)
    (root / "lonely_class").mkdir()
    (root / "lonely_class" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="lonely_class"):
        D.ImageFolderSource(root)
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(NotADirectoryError, match="file.txt"):
        D.ImageFolderSource(f)


# ----------------------------------------------------------------------------------------------------------------------
# split files


def test_read_split_file(split_tree, classes):
    root, path = split_tree
    assert os.path.basename(path) == "split_zhou_Synthetic.json"
    splits = D.read_split_file(path, root / "images")
    assert {k: len(v) for k, v in splits.items()} == {"train": 30, "val": 10, "test": 15}
    for split in splits.values():
        for s in split:
            assert os.path.isfile(s.path)
            assert s.classname == classes[s.label].name
    # default image root: <dir>/images
    assert D.read_split_file(path) == splits
    raw = json.loads(open(path).read())
    assert all(len(e) == 3 and not os.path.isabs(e[0]) for e in raw["train"])
    assert D.classnames_from_samples(splits) == [c.name for c in classes]


def test_split_file_missing_image(split_tree):
    root, path = split_tree
    raw = json.loads(open(path).read())
    victim = raw["test"][2][0]
    os.remove(root / "images" / victim)
    os.remove(root / "images" / raw["train"][0][0])
    with pytest.raises(FileNotFoundError, match=re.escape(victim)) as ei:
        D.read_split_file(path, root / "images")
    msg = str(ei.value)
    assert "split_zhou_Synthetic.json" in msg and "2 image(s) missing" in msg
    # check_exists=False skips the check
    assert len(D.read_split_file(path, root / "images", check_exists=False)["test"]) == 15


def test_split_file_bad_contents(tmp_path):
    img = tmp_path / "a.png"
    img.write_bytes(b"")
    p = tmp_path / "split_zhou_Bad.json"

    def write(obj):
        p.write_text(json.dumps(obj))

    write({"train": [["a.png", 0, "cat"]], "test": [["a.png", 0, "dog"]]})
    with pytest.raises(ValueError, match="label 0 is used for two class names"):
        D.read_split_file(p, tmp_path)
    write({"train": [["a.png", 0, "cat"]], "test": [["a.png", 1, "cat"]]})
    with pytest.raises(ValueError, match="class name 'cat' has two labels"):
        D.read_split_file(p, tmp_path)
    write({"train": [["a.png", "0", "cat"]], "test": []})
    with pytest.raises(ValueError, match=r"train\[0\]"):
        D.read_split_file(p, tmp_path)
    write({"train": []})
    with pytest.raises(ValueError, match="'test'"):
        D.read_split_file(p, tmp_path)
    p.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        D.read_split_file(p, tmp_path)
    with pytest.raises(FileNotFoundError, match="split_zhou_Missing.json"):
        D.read_split_file(tmp_path / "split_zhou_Missing.json", tmp_path)
    write({"train": [["a.png", 0, "cat"]], "test": [["a.png", 0, "cat"]]})  # no "val": reads as empty
    assert D.read_split_file(p, tmp_path)["val"] == []


def test_find_split_file_layouts(tmp_path, classes):
    # flat: <root>/split_zhou_Synthetic.json, images under <root>/images
    flat = tmp_path / "flat"
    S.write_split_file(flat, classes, 2, 1, 1, size=8)
    assert D.find_split_file(flat, "Synthetic") == (str(flat / "split_zhou_Synthetic.json"), str(flat / "images"))
    # flat, images directly relative to <root>
    bare = tmp_path / "bare"
    S.write_split_file(bare, classes, 2, 1, 1, size=8, image_dir="")
    assert D.find_split_file(bare, "synthetic")[1] == str(bare)
    # CoOp layout for a real dataset name: <root>/eurosat/split_zhou_EuroSAT.json + <root>/eurosat/2750/...
    coop = tmp_path / "coop"
    S.write_split_file(coop / "eurosat", classes, 2, 1, 1, size=8, name="EuroSAT", image_dir="2750")
    path, image_root = D.find_split_file(coop, "EuroSAT")
    assert path == str(coop / "eurosat" / "split_zhou_EuroSAT.json") and image_root == str(coop / "eurosat" / "2750")
    # CoOp file name differs from ours: DTD -> dtd/split_zhou_DescribableTextures.json, images in dtd/images
    S.write_split_file(coop / "dtd", classes, 2, 1, 1, size=8, name="DescribableTextures")
    splits, names = D.load_dataset(coop, "dtd")
    assert names == [c.name for c in classes] and len(splits["train"]) == 10
    assert D.find_split_file(coop, "DescribableTextures")[1] == str(coop / "dtd" / "images")
    with pytest.raises(FileNotFoundError, match="split_zhou_OxfordPets.json"):
        D.find_split_file(coop, "OxfordPets")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        D.find_split_file(tmp_path / "nowhere", "EuroSAT")


def test_load_dataset_fgvc_and_imagenet(tmp_path):
    # FGVCAircraft as CoOp reads it
    d = tmp_path / "fgvc_aircraft"
    (d / "images").mkdir(parents=True)
    (d / "variants.txt").write_text("707-320\nA300B4\n")
    for split, ids in {"train": ["1", "2", "3"], "val": ["4"], "test": ["5", "6"]}.items():
        lines = [f"{i} {'707-320' if int(i) % 2 else 'A300B4'}" for i in ids]
        (d / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
        for i in ids:
            (d / "images" / f"{i}.jpg").write_bytes(b"")
    splits, names = D.load_dataset(tmp_path, "FGVCAircraft")
    assert names == ["707-320", "A300B4"]
    assert [(os.path.basename(s.path), s.label) for s in splits["train"]] == [("1.jpg", 0), ("2.jpg", 1), ("3.jpg", 0)]
    os.remove(d / "images" / "5.jpg")
    with pytest.raises(FileNotFoundError, match="5.jpg"):
        D.load_dataset(tmp_path, "fgvc_aircraft")

    # ImageNet: classnames.txt + images/{train,val}/<wnid>; val = test
    inet = tmp_path / "imagenet"
    (inet / "classnames.txt").parent.mkdir()
    (inet / "classnames.txt").write_text("n01440764 tench\nn01443537 goldfish\n")
    cls = [S.ClassSpec("circle", "red"), S.ClassSpec("square", "blue")]
    for part in ("train", "val"):
        S.write_image_folder(inet / "images" / part, cls, 2, size=8)
        for spec, wnid in zip(cls, ["n01440764", "n01443537"]):
            os.rename(inet / "images" / part / spec.folder, inet / "images" / part / wnid)
    splits, names = D.load_dataset(tmp_path, "ImageNet")
    assert names == ["tench", "goldfish"]
    assert len(splits["train"]) == 4 and splits["val"] == splits["test"] and len(splits["test"]) == 4
    assert {(s.label, s.classname) for s in splits["train"]} == {(0, "tench"), (1, "goldfish")}
    (inet / "classnames.txt").write_text("n01440764 tench\n")
    with pytest.raises(ValueError, match="n01443537.*classnames.txt|classnames.txt.*n01443537"):
        D.load_dataset(tmp_path, "ImageNet")


# ----------------------------------------------------------------------------------------------------------------------
# few-shot


def test_few_shot_deterministic_and_counts():
    samples = _fake_samples({0: 10, 1: 7, 2: 12, 3: 9})
    a = D.few_shot(samples, 4, seed=1)
    b = D.few_shot(list(reversed(samples)), 4, seed=1)  # input order does not matter
    c = D.few_shot(samples, 4, seed=2)
    assert a == b
    assert a != c
    for sel in (a, c):
        counts = {}
        for s in sel:
            counts[s.label] = counts.get(s.label, 0) + 1
        assert counts == {0: 4, 1: 4, 2: 4, 3: 4}
        assert len(set(sel)) == len(sel) and set(sel) <= set(samples)
    assert [s.label for s in a] == sorted(s.label for s in a)
    # the full class when K == class size; any positive K allowed
    assert len(D.few_shot(samples, 7, seed=0)) == 28
    assert len(D.few_shot(samples, 3, seed=0)) == 12
    state = np.random.get_state()[1].copy(), __import__("random").getstate()
    D.few_shot(samples, 2, seed=5)
    assert (np.random.get_state()[1] == state[0]).all() and __import__("random").getstate() == state[1]


def test_few_shot_errors():
    samples = _fake_samples({0: 10, 1: 3})
    with pytest.raises(ValueError, match=r"class 'class 1' \(label 1\) has only 3 sample"):
        D.few_shot(samples, 4, seed=0)
    for bad in (0, -2):
        with pytest.raises(ValueError, match="shots"):
            D.few_shot(samples, bad, seed=0)
    with pytest.raises(TypeError, match="shots"):
        D.few_shot(samples, True, seed=0)
    with pytest.raises(TypeError, match="seed"):
        D.few_shot(samples, 1, seed=1.5)
    with pytest.raises(ValueError, match="no samples"):
        D.few_shot([], 1, seed=0)


def test_few_shot_cached(tmp_path, monkeypatch):
    samples = _fake_samples({0: 8, 1: 8, 2: 8})
    cache = tmp_path / "cache"
    first = D.few_shot_cached(samples, 2, 1, cache)
    assert first == D.few_shot(samples, 2, 1)
    path = D.few_shot_cache_path(samples, 2, 1, cache)
    assert os.path.isfile(path) and os.listdir(cache) == [os.path.basename(path)]  # no temp file left behind
    stored = json.loads(open(path).read())
    assert stored["shots"] == 2 and stored["seed"] == 1 and len(stored["items"]) == 6
    assert stored["items"][0][0] == "c0/" + os.path.basename(first[0].path)  # relpaths, not absolute

    # second call reads the file (sampling is not run again) ...
    def boom(*a, **k):
        raise AssertionError("few_shot should not be called when the cache is valid")

    monkeypatch.setattr(D.fewshot, "few_shot", boom)  # the module few_shot_cached calls it from
    assert D.few_shot_cached(samples, 2, 1, cache) == first
    # ... and honours what it says: hand-edit the selection to other valid samples
    other = [s for s in samples if s not in first]
    stored["items"] = [[f"c{s.label}/" + os.path.basename(s.path), s.label] for y in range(3) for s in
                       [o for o in other if o.label == y][:2]]
    open(path, "w").write(json.dumps(stored))
    edited = D.few_shot_cached(samples, 2, 1, cache)
    assert set(edited).isdisjoint(first)
    # a moved data root shares the cache (keys use relative paths)
    moved = _fake_samples({0: 8, 1: 8, 2: 8}, root="/elsewhere/y")
    assert D.few_shot_cache_path(moved, 2, 1, cache) == path
    monkeypatch.undo()

    # corrupt -> warning + regenerated; missing -> regenerated
    open(path, "w").write("{garbage")
    with pytest.warns(RuntimeWarning, match="unusable"):
        assert D.few_shot_cached(samples, 2, 1, cache) == first
    assert json.loads(open(path).read())["key"] == stored["key"]  # rewritten, valid again
    os.remove(path)
    assert D.few_shot_cached(samples, 2, 1, cache) == first and os.path.isfile(path)
    # wrong counts in a well-formed file -> regenerated
    data = json.loads(open(path).read())
    data["items"] = data["items"][:-1]
    open(path, "w").write(json.dumps(data))
    with pytest.warns(RuntimeWarning):
        assert D.few_shot_cached(samples, 2, 1, cache) == first
    # other seed / shots -> other file
    assert D.few_shot_cache_path(samples, 2, 2, cache) != path
    assert D.few_shot_cache_path(samples, 4, 1, cache) != path


# ----------------------------------------------------------------------------------------------------------------------
# base / new


def test_subsample_classes_base_new():
    names = ["ant", "bee", "cat", "dog", "eel"]
    samples = {
        "train": [Sample(f"/d/{n}{i}.jpg", y, n) for y, n in enumerate(names) for i in range(2)],
        "test": [Sample(f"/d/t_{n}.jpg", y, n) for y, n in enumerate(names)],
    }
    base, base_names = D.subsample_classes(samples, "base")
    new, new_names = D.subsample_classes(samples, "new")
    everything, all_names = D.subsample_classes(samples, "all")
    assert base_names == ["ant", "bee", "cat"] and new_names == ["dog", "eel"] and all_names == names
    assert sorted({s.label for s in base["train"]}) == [0, 1, 2]
    assert [(s.label, s.classname) for s in base["test"]] == [(0, "ant"), (1, "bee"), (2, "cat")]
    assert [(s.label, s.classname) for s in new["test"]] == [(0, "dog"), (1, "eel")]
    assert len(new["train"]) == 4 and everything == samples

    # labels are sorted first (not taken in order of appearance), then relabelled from 0; single list in -> list out
    shuffled = [Sample("/a", 10, "x"), Sample("/b", 3, "y"), Sample("/c", 7, "z"), Sample("/d", 3, "y")]
    out, names_base = D.subsample_classes(shuffled, "base")  # ceil(3/2) = 2 -> labels 3, 7
    assert names_base == ["y", "z"] and [(s.path, s.label) for s in out] == [("/b", 0), ("/c", 1), ("/d", 0)]
    out, names_new = D.subsample_classes(shuffled, "new")
    assert names_new == ["x"] and [(s.path, s.label) for s in out] == [("/a", 0)]

    with pytest.raises(ValueError, match="which"):
        D.subsample_classes(samples, "novel")
    with pytest.raises(ValueError, match="selects no class"):
        D.subsample_classes([Sample("/a", 0, "x")], "new")


# ----------------------------------------------------------------------------------------------------------------------
# torch datasets / loaders


def test_image_dataset(split_tree):
    root, path = split_tree
    splits = D.read_split_file(path)
    ds = D.ImageDataset(splits["train"])
    x, y = ds[3]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert y == splits["train"][3].label and ds.labels[3] == y
    tds = D.ImageDataset(splits["train"], transform=D.clip_transform(24))
    x2, _ = tds[3]
    assert x2.shape == (3, 24, 24) and x2.dtype == torch.float32
    xt, _ = D.ImageDataset(splits["train"], transform=D.clip_transform(12, train=True))[0]
    assert xt.shape == (3, 12, 12)
    bad = root / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(D.BadImageError, match="broken.png"):
        D.ImageDataset([Sample(str(bad), 0, "x")])[0]


def test_tensor_dataset_and_loader(classes):
    x, y = S.make_classification_set(classes, 4, size=8, seed=0)
    ds = D.TensorImageDataset(x, y)
    img, label = ds[5]
    assert img.dtype == torch.float32 and torch.allclose(img, x[5].float() / 255) and label == int(y[5])
    hwc = D.TensorImageDataset(x.permute(0, 2, 3, 1).numpy(), y.tolist())
    assert torch.equal(hwc.images, x)
    assert D.TensorImageDataset(x, y, transform=D.clip_transform(16))[0][0].shape == (3, 16, 16)
    with pytest.raises(ValueError, match="labels"):
        D.TensorImageDataset(x, y[:-1])

    def order(seed, epochs=2):
        loader = D.make_loader(ds, batch_size=6, shuffle=True, seed=seed)
        return [torch.cat([b[1] for b in loader]).tolist() for _ in range(epochs)], loader

    (o1, _), (o2, _), (o3, _) = order(0), order(0), order(1)
    assert o1 == o2 and o1 != o3 and o1[0] != o1[1]  # reproducible, seed-dependent, reshuffled per epoch
    batches = list(D.make_loader(ds, 6, shuffle=False, seed=0, drop_last=True))
    assert len(batches) == 3 and batches[0][0].shape == (6, 3, 8, 8)
    with pytest.raises(ValueError, match="batch_size"):
        D.make_loader(ds, 0, True, 0)


# ----------------------------------------------------------------------------------------------------------------------
# templates


def test_templates():
    assert T.get_templates("OxfordPets") == ["a photo of a {}, a type of pet."]
    assert T.get_templates("oxford_pets") == ["a photo of a {}, a type of pet."]
    assert T.get_templates("EuroSAT") == ["a centered satellite photo of {}."]
    assert T.get_templates("DescribableTextures") == T.get_templates("dtd") == ["{} texture."]
    assert T.get_templates("Flowers102") == T.get_templates("OxfordFlowers") == ["a photo of a {}, a type of flower."]
    assert T.get_templates("Food101") == ["a photo of {}, a type of food."]
    assert T.get_templates("FGVCAircraft") == ["a photo of a {}, a type of aircraft."]
    assert T.get_templates("UCF101") == ["a photo of a person doing {}."]
    assert T.get_templates("imagenet-sketch") == T.get_templates(None) == ["a photo of a {}."]
    assert len(T.DATASET_TEMPLATES) >= 15 and len(T.IMAGENET_ENSEMBLE) == 7
    assert all("{}" in t for t in [*T.DATASET_TEMPLATES.values(), *T.IMAGENET_ENSEMBLE])
    # unknown dataset: default, or KeyError when strict
    assert T.get_templates("MyPhotos") == [T.DEFAULT_TEMPLATE]
    with pytest.raises(KeyError, match="MyPhotos"):
        T.get_templates("MyPhotos", strict=True)
    # override wins
    assert T.get_templates("EuroSAT", override="a {} seen from above.") == ["a {} seen from above."]
    assert T.get_templates("EuroSAT", override=["a {}.", "the {}."]) == ["a {}.", "the {}."]
    assert T.get_templates("DTD", override="ensemble") == T.IMAGENET_ENSEMBLE
    got = T.get_templates("DTD", override="ensemble")
    got.append("x {}")
    assert len(T.IMAGENET_ENSEMBLE) == 7  # returned lists are copies
    with pytest.raises(ValueError, match="no '{}' placeholder"):
        T.get_templates("DTD", override="a photo of a cat.")
    with pytest.raises(ValueError, match="a photo"):
        T.get_templates(None, override=["a {}.", "a photo"])
    with pytest.raises(ValueError, match="empty"):
        T.get_templates(None, override=[])
    assert T.canonical_dataset_name("caltech-101") == "Caltech101"
    assert T.clean_classname("  Yorkshire__terrier ") == "Yorkshire terrier"
    prompts = T.format_prompts(["golden_retriever", "cat"], ["a {}.", "art of the {}."])
    assert prompts == [["a golden retriever.", "art of the golden retriever."], ["a cat.", "art of the cat."]]
    assert T.format_prompts(["x_y"], "{} texture {}.", clean=False) == [["x_y texture x_y."]]
    with pytest.raises(ValueError, match="placeholder"):
        T.format_prompts(["cat"], ["nothing here"])


# ----------------------------------------------------------------------------------------------------------------------
# synthetic


def test_synthetic_classes_and_render():
    cls = S.make_classes(12, seed=0)
    assert cls == S.make_classes(12, seed=0) and cls != S.make_classes(12, seed=1)
    assert len({c.name for c in cls}) == 12
    assert S.ClassSpec("triangle", "red", "striped").name == "red striped triangle"
    assert S.ClassSpec("circle", "blue").name == "blue circle" and S.ClassSpec("circle", "blue").folder == "blue_circle"
    with pytest.raises(ValueError, match="n_classes"):
        S.make_classes(10_000)
    with pytest.raises(ValueError, match="hexagram"):
        S.ClassSpec("hexagram", "red")
    for size in (32, 64):
        for domain in S.DOMAINS:
            a = S.render(cls[0], np.random.default_rng(5), size=size, domain=domain)
            b = S.render(cls[0], np.random.default_rng(5), size=size, domain=domain)
            assert a.shape == (size, size, 3) and a.dtype == np.uint8
            assert np.array_equal(a, b)
    src = S.render(cls[0], 5, size=32)
    shifted = S.render(cls[0], 5, size=32, domain="shifted")
    assert src.mean() < shifted.mean()  # dark vs light background
    with pytest.raises(ValueError, match="domain"):
        S.render(cls[0], 0, domain="night")
    # every shape / texture draws something of its colour
    for shape in S.SHAPES:
        for tex in S.TEXTURES:
            img = S.render(S.ClassSpec(shape, "green", tex), 0, size=32)
            assert ((img[..., 1] > 120) & (img[..., 0] < 110)).sum() > 10, (shape, tex)


def test_synthetic_sets(tmp_path):
    cls = S.make_classes(6, seed=2)
    x, y = S.make_classification_set(cls, 5, size=32, seed=7)
    assert x.shape == (30, 3, 32, 32) and x.dtype == torch.uint8
    assert y.tolist() == [c for c in range(6) for _ in range(5)]
    x2, y2 = S.make_classification_set(cls, 5, size=32, seed=7)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, S.make_classification_set(cls, 5, size=32, seed=8)[0])
    xs, _ = S.make_classification_set(cls, 5, size=32, seed=7, domain="shifted")
    assert not torch.equal(x, xs)
    xf, _ = S.make_classification_set(cls, 2, size=16, seed=0, as_float=True)
    assert xf.dtype == torch.float32 and xf.max() <= 1
    imgs, caps = S.make_caption_corpus(40, size=32, seed=0)
    assert imgs.shape == (40, 3, 32, 32) and len(caps) == 40 and all(isinstance(c, str) for c in caps)
    imgs5, caps5, specs = S.make_caption_corpus(20, size=32, seed=0, captions_per_image=5, return_specs=True)
    assert all(len(c) == 5 and len(set(c)) == 5 for c in caps5)
    for spec, cs in zip(specs, caps5):
        assert all(spec.colour in c and spec.shape in c for c in cs)
    assert S.make_caption_corpus(20, size=32, seed=0, captions_per_image=5)[1] == caps5
    assert S.caption_for(S.ClassSpec("circle", "orange", "dotted")) == "an orange dotted circle"


def test_synthetic_split_roundtrip(tmp_path):
    cls = S.make_classes(4, seed=0)
    path = S.write_split_file(tmp_path, cls, 3, 1, 2, size=16, seed=1, test_domain="shifted")
    splits, names = D.load_dataset(tmp_path, "Synthetic")
    assert names == [c.name for c in cls]
    assert [len(splits[k]) for k in D.SPLITS] == [12, 4, 8]
    x, y = D.ImageDataset(splits["test"])[0]
    assert x.shape == (3, 16, 16)
    assert D.find_split_file(tmp_path, "Synthetic") == (path, str(tmp_path / "images"))


# ----------------------------------------------------------------------------------------------------------------------
# untrusted data files: image paths stay inside the image root


def _rewrite_first_train_path(path, rel):
    raw = json.loads(open(path).read())
    raw["train"][0][0] = rel
    bad = os.path.join(os.path.dirname(path), "split_zhou_Edited.json")
    with open(bad, "w") as f:
        json.dump(raw, f)
    return bad


@pytest.mark.parametrize("kind", ["dotdot", "nested_dotdot", "absolute", "symlink_file", "symlink_dir"])
def test_split_paths_must_stay_inside_image_root(split_tree, tmp_path_factory, kind):
    root, path = split_tree
    images = root / "images"
    secret_dir = tmp_path_factory.mktemp("outside")
    secret = secret_dir / "secret.png"
    secret.write_bytes((images / json.loads(open(path).read())["test"][0][0]).read_bytes())
    first_class = sorted(p.name for p in images.iterdir())[0]
    if kind == "dotdot":
        rel = os.path.relpath(secret, images)
    elif kind == "nested_dotdot":
        rel = f"{first_class}/../../{os.path.relpath(secret, root)}"
    elif kind == "absolute":
        rel = str(secret)
    elif kind == "symlink_file":
        os.symlink(secret, images / "link.png")
        rel = "link.png"
    else:
        os.symlink(secret_dir, images / "linkdir")
        rel = "linkdir/secret.png"
    bad = _rewrite_first_train_path(path, rel)
    with pytest.raises(ValueError) as ei:
        D.read_split_file(bad, images)
    msg = str(ei.value)
    assert "\n" not in msg and "split_zhou_Edited.json" in msg and "train[0]" in msg and repr(rel) in msg
    assert repr(str(images)) in msg and "allow-outside-root" in msg
    # the user may opt in; the sample keeps the path as joined
    splits = D.read_split_file(bad, images, allow_outside_root=True)
    assert splits["train"][0].path == os.path.join(str(images), rel)
    # load_dataset (the CLI's --data path) checks the same way and passes the opt-in through
    os.replace(bad, path)
    with pytest.raises(ValueError, match="outside the image root"):
        D.load_dataset(root, "Synthetic")
    assert D.load_dataset(root, "Synthetic", allow_outside_root=True)[0]["train"][0].path.endswith(
        os.path.basename(rel))


def test_split_paths_inside_root_through_symlinks_are_fine(split_tree, tmp_path):
    """Symlinks that stay inside the root, a root that is itself a symlink, and 'a/../b' inside it are accepted."""
    root, path = split_tree
    images = root / "images"
    first_class = sorted(p.name for p in images.iterdir())[0]
    os.symlink(images / first_class, images / "alias")
    one = sorted(os.listdir(images / first_class))[0]
    bad = _rewrite_first_train_path(path, f"alias/../{first_class}/{one}")
    assert os.path.isfile(D.read_split_file(bad, images)["train"][0].path)
    bad = _rewrite_first_train_path(path, f"alias/{one}")
    assert os.path.isfile(D.read_split_file(bad, images)["train"][0].path)
    os.symlink(images, tmp_path / "images_link")
    assert len(D.read_split_file(path, tmp_path / "images_link")["train"]) == 30


def test_fgvc_list_paths_must_stay_inside(tmp_path):
    d = tmp_path / "fgvc_aircraft"
    (d / "images").mkdir(parents=True)
    (d / "variants.txt").write_text("707-320\n")
    (tmp_path / "escape.jpg").write_bytes(b"")
    (d / "images" / "1.jpg").write_bytes(b"")
    (d / "images_variant_train.txt").write_text("../../escape 707-320\n")
    for split in ("val", "test"):
        (d / f"images_variant_{split}.txt").write_text("1 707-320\n")
    with pytest.raises(ValueError, match=r"images_variant_train.txt.*line 1.*'\.\./\.\./escape\.jpg'.*image root"):
        D.load_dataset(tmp_path, "FGVCAircraft")
    splits, _ = D.load_dataset(tmp_path, "FGVCAircraft", allow_outside_root=True)
    assert os.path.isfile(splits["train"][0].path)
    (d / "variants.txt").write_text("707-320\n707-320\n")
    with pytest.raises(ValueError, match="variants.txt.*more than once"):
        D.load_dataset(tmp_path, "FGVCAircraft", allow_outside_root=True)


# ----------------------------------------------------------------------------------------------------------------------
# malformed data files: a ValueError naming the file, never a bare Python error


def test_split_file_malformed_text(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    p = tmp_path / "split_zhou_Bad.json"
    p.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="split_zhou_Bad.json.*nests too deeply"):
        D.read_split_file(p, tmp_path)
    p.write_bytes(b'{"train": [["\xff.png", 0, "cat"]], "test": []}')
    with pytest.raises(ValueError, match="split_zhou_Bad.json.*not UTF-8"):
        D.read_split_file(p, tmp_path)
    for entry, what in [(["a\x00.png", 0, "cat"], "NUL"), (["", 0, "cat"], "empty path"),
                        (["a.png", -3, "cat"], "negative label"), (["a.png", 0, " "], "empty class name"),
                        (["a.png", True, "cat"], "is not"), (["a.png", 1.0, "cat"], "is not")]:
        p.write_text(json.dumps({"train": [entry], "test": []}))
        with pytest.raises(ValueError, match=rf"split_zhou_Bad.json.*train\[0\].*{what}"):
            D.read_split_file(p, tmp_path)
    (tmp_path / "a_dir.json").mkdir()
    with pytest.raises(ValueError, match="a_dir.json.*not a regular file"):
        D.read_split_file(tmp_path / "a_dir.json", tmp_path)
    with pytest.raises(ValueError, match="a_dir.json.*not a regular file"):
        D.read_classnames_file(tmp_path / "a_dir.json")


def test_classnames_file_bad_lines(tmp_path):
    f = tmp_path / "classnames.txt"
    f.write_text("n01 tench\nn02\n")
    with pytest.raises(ValueError, match="classnames.txt.*line 2"):
        D.read_classnames_file(f)
    f.write_text("n01 tench\nn01 goldfish\n")
    with pytest.raises(ValueError, match="classnames.txt.*line 2.*'n01' is listed twice"):
        D.read_classnames_file(f)
    f.write_bytes(b"n01 tench\nn02 \xff\n")
    with pytest.raises(ValueError, match="classnames.txt.*not UTF-8"):
        D.read_classnames_file(f)
    f.write_text("\n\n")
    with pytest.raises(ValueError, match="classnames.txt.*empty"):
        D.read_classnames_file(f)
    assert D.read_classnames_file(_write(f, "n01  tench fish\n\nn02\tgold fish\n")) == {"n01": "tench fish",
                                                                                         "n02": "gold fish"}


def _write(path, text):
    path.write_text(text)
    return path


_HUGE_LABEL = """
import resource, sys
from leanclip import data as D
vm = next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmSize:")) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.RLIM_INFINITY))  # a walk of range(n) fails fast
try:
    D.classnames_from_samples([D.Sample("a", 0, "a"), D.Sample("b", 10**18, "b")])
except ValueError as e:
    print(e)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc for the memory cap")
def test_huge_label_gap_is_reported_at_once():
    """A label of 10**18 in a data file must not make the contiguity check walk (and list) range(10**18). Run in a
    child process under a memory cap, so that such a walk ends in a MemoryError there, not in the host's OOM killer."""
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-c", _HUGE_LABEL], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "no sample for label(s) [1, 2, 3, 4, 5]" in p.stdout


# ----------------------------------------------------------------------------------------------------------------------
# bad images: BadImageError naming the path, also from DataLoader workers; check_images for --skip-bad-images


def _bad_image_files(tmp_path, good_png: bytes) -> dict[str, str]:
    from PIL import Image

    jpg = tmp_path / "good.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(jpg, quality=90)
    files = {
        "truncated_png": good_png[: len(good_png) // 2],
        "truncated_jpeg": jpg.read_bytes()[: jpg.stat().st_size // 2],
        "text_named_jpg": b"hello, I am not an image\n",
        "empty": b"",
    }
    out = {}
    for name, blob in files.items():
        p = tmp_path / (name + (".png" if "png" in name else ".jpg"))
        p.write_bytes(blob)
        out[name] = str(p)
    (tmp_path / "folder.jpg").mkdir()
    out["directory"] = str(tmp_path / "folder.jpg")
    return out


def test_bad_images_raise_one_line_naming_the_path(split_tree, tmp_path):
    root, path = split_tree
    good = D.read_split_file(path)["train"][0].path
    bad = _bad_image_files(tmp_path, open(good, "rb").read())
    for kind, p in bad.items():
        with pytest.raises(D.BadImageError) as ei:
            D.ImageDataset([Sample(p, 0, "x")], D.clip_transform(16))[0]
        msg = str(ei.value)
        assert isinstance(ei.value, ValueError) and ei.value.path == p, kind
        assert "\n" not in msg and repr(p) in msg, (kind, msg)
    from PIL import Image

    with Image.open(bad["truncated_jpeg"]) as im:
        im.verify()  # passes: why check_images decodes instead of verifying
    ok, errors = D.check_images([Sample(good, 0, "x"), *(Sample(p, 0, "x") for p in bad.values()),
                                 Sample(good, 0, "x")], threads=2)
    assert [s.path for s in ok] == [good, good]
    assert sorted(e.path for e in errors) == sorted(bad.values())


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_image_is_a_bad_image(split_tree):
    root, path = split_tree
    good = D.read_split_file(path)["train"][0].path
    os.chmod(good, 0)
    try:
        with pytest.raises(D.BadImageError, match=re.escape(repr(good))):
            D.ImageDataset([Sample(good, 0, "x")])[0]
    finally:
        os.chmod(good, 0o644)


def test_bad_image_in_a_worker_stays_one_line(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_text("not an image")
    loader = D.make_loader(D.ImageDataset([Sample(str(bad), 0, "x")]), 1, False, 0, num_workers=1)
    with pytest.raises(D.BadImageError) as ei:
        next(iter(loader))
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith(f"cannot read image {str(bad)!r}") and "worker process 0" in msg
    assert "Traceback" in ei.value.worker_traceback


# ----------------------------------------------------------------------------------------------------------------------
# synthetic-data cache: per-user, private, hash-checked


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv(S.CACHE_ENV, str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert S.cache_dir() == str(tmp_path / "explicit")
    monkeypatch.delenv(S.CACHE_ENV)
    assert S.cache_dir() == str(tmp_path / "xdg" / "leanclip")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert S.cache_dir() == str(tmp_path / "home" / ".cache" / "leanclip")


def test_private_dir_is_created_0700_and_refuses_shared_ones(tmp_path):
    d = S.private_dir(tmp_path / "a" / "synthetic")
    assert os.stat(d).st_mode & 0o777 == 0o700
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(ValueError, match=r"'.*shared'.*writable by group or others"):
        S.private_dir(shared)
    os.chmod(shared, 0o755)
    assert S.private_dir(shared) == str(shared)  # readable by others is fine: nobody else can plant files
    if os.geteuid() == 0:  # only root can give a folder away
        os.chown(shared, os.geteuid() + 4321, -1)
        with pytest.raises(ValueError, match="belongs to another user"):
            S.private_dir(shared)


def test_cached_split_dataset_checks_its_manifest(tmp_path):
    base = tmp_path / "cache"
    root = S.cached_split_dataset(base, 3, 16, 2, 1, 1)
    assert S.manifest_problem(root) is None
    manifest = json.loads(open(os.path.join(root, S.MANIFEST)).read())["files"]
    assert "split_zhou_Synthetic.json" in manifest and len(manifest) == 1 + 3 * 4
    splits, names = D.load_dataset(root, "Synthetic")
    victim = splits["train"][0].path
    original = open(victim, "rb").read()
    mtime = os.stat(os.path.join(root, "split_zhou_Synthetic.json")).st_mtime_ns
    assert S.cached_split_dataset(base, 3, 16, 2, 1, 1) == root  # valid: reused as is
    assert os.stat(os.path.join(root, "split_zhou_Synthetic.json")).st_mtime_ns == mtime

    with open(victim, "wb") as f:  # planted / corrupted image
        f.write(b"planted")
    assert "does not match its recorded sha256" in S.manifest_problem(root)
    assert S.cached_split_dataset(base, 3, 16, 2, 1, 1) == root
    assert open(victim, "rb").read() == original and S.manifest_problem(root) is None

    open(os.path.join(root, "images", "extra.png"), "wb").close()  # unlisted file
    assert "unlisted" in S.manifest_problem(root)
    assert S.cached_split_dataset(base, 3, 16, 2, 1, 1) == root
    assert not os.path.exists(os.path.join(root, "images", "extra.png"))

    os.remove(os.path.join(root, S.MANIFEST))  # a cache from before manifests
    assert "no readable manifest" in S.manifest_problem(root)
    assert S.cached_split_dataset(base, 3, 16, 2, 1, 1) == root and S.manifest_problem(root) is None
    assert sorted(os.listdir(base)) == [os.path.basename(root)]  # no temp or stale folders left behind


def test_image_folders_keep_symlinks_inside(tmp_path, classes):
    """Folder datasets come from archives too: a symlinked class folder or file leading out of the root is refused
    (naming it) unless allowed; a link back up the tree is walked once, not until the path is too long."""
    outside = tmp_path / "elsewhere"
    S.write_image_folder(outside, classes[:1], 2, size=8)
    root = tmp_path / "tree"
    S.write_image_folder(root, classes[1:3], 2, size=8)
    first = sorted(p.name for p in root.iterdir())[0]
    os.symlink(root / first, root / first / "loop")  # a cycle: tree/<first>/loop -> tree/<first>
    assert len(D.ImageFolderSource(root)) == 4
    os.symlink(outside / classes[0].folder, root / "zz_linked_class")
    with pytest.raises(ValueError, match=r"image folder '.*tree'.*'zz_linked_class/0000.png'.*outside the image root"):
        D.ImageFolderSource(root)
    assert len(D.ImageFolderSource(root, allow_outside_root=True)) == 6
    # the ImageNet reader (wnid folders) passes the opt-in through load_dataset
    inet = tmp_path / "data" / "imagenet"
    S.write_image_folder(inet / "images" / "train", classes[1:2], 2, size=8)
    os.rename(inet / "images" / "train" / classes[1].folder, inet / "images" / "train" / "n01")
    (inet / "images" / "val").mkdir()
    os.symlink(outside / classes[0].folder, inet / "images" / "val" / "n01")
    (inet / "classnames.txt").write_text("n01 tench\n")
    with pytest.raises(ValueError, match="outside the image root"):
        D.load_dataset(tmp_path / "data", "ImageNet")
    splits, _ = D.load_dataset(tmp_path / "data", "ImageNet", allow_outside_root=True)
    assert len(splits["test"]) == 2
