"""Bad data through the CLI: every malformed or hostile data file, unreadable image or unsafe cache is one line on
stderr naming the input, exit code 2, and nothing written; the opt-ins (--allow-outside-root, --skip-bad-images)
and the per-user synthetic cache work end to end."""
import json
import os
import stat

import pytest

from leanclip import kernels
from leanclip import synthetic as S
from tests.engine.cli_checks import run


@pytest.fixture(autouse=True)
def _torch_backend():
    with kernels.set_backend("torch"):
        yield


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """The default synthetic cache goes to this test's folder, never the real home."""
    monkeypatch.setenv("LEANCLIP_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture()
def tree(tmp_path):
    """A 3-class CoOp tree: tmp/shapes/split_zhou_Shapes.json + tmp/shapes/images/<class>/<split>_i.png."""
    path = S.write_split_file(tmp_path / "shapes", S.make_classes(3, seed=1), 2, 1, 2, size=16, name="Shapes")
    return tmp_path / "shapes", path


def train(capsys, tmp_path, *data):
    return run(capsys, "train", "--method", "ln", "--epochs", "1", "--shots", "1", "--no-progress",
               "--output", tmp_path / "run", *data)


def assert_one_line_error(rc, out, err, tmp_path, *names):
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("leanclip: error: "), err
    assert "Traceback" not in err and out == ""
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    assert not (tmp_path / "run").exists()


def edited(split_path, name, edit):
    raw = json.loads(open(split_path).read())
    edit(raw)
    p = os.path.join(os.path.dirname(split_path), name)
    with open(p, "w") as f:
        json.dump(raw, f)
    return p


def _set_first(rel):
    def edit(raw):
        raw["train"][0][0] = rel
    return edit


def test_split_paths_outside_root_are_refused(capsys, tmp_path, tree):
    root, split = tree
    outside = tmp_path / "outside.png"
    outside.write_bytes((root / "images" / json.loads(open(split).read())["test"][0][0]).read_bytes())
    os.symlink(outside, root / "images" / "link.png")
    for name, rel in [("dotdot.json", "../../outside.png"), ("abs.json", str(outside)), ("link.json", "link.png")]:
        bad = edited(split, name, _set_first(rel))
        rc, out, err = train(capsys, tmp_path, "--split-file", bad)
        assert_one_line_error(rc, out, err, tmp_path, name, "train[0]", repr(rel), repr(str(root / "images")),
                              "--allow-outside-root")
    # opting in reads it
    def edit(raw):
        raw["test"][0][0] = "../../outside.png"

    bad = edited(split, "optin.json", edit)
    rc, out, err = run(capsys, "zeroshot", "--split-file", bad, "--allow-outside-root", "--no-progress")
    assert rc == 0, err
    assert json.loads(out.strip().splitlines()[-1])["n"] == 6


def _nested(path):
    with open(path, "w") as f:
        f.write("[" * 100_000 + "]" * 100_000)


@pytest.mark.parametrize("case,expect", [
    ("nested", "nests too deeply"),
    ("not_json", "not valid JSON"),
    ("not_utf8", "not UTF-8"),
    ("top_list", "expected an object"),
    ("str_label", "is not [relpath, int label, classname]"),
    ("float_label", "is not [relpath, int label, classname]"),
    ("negative_label", "negative label"),
    ("nul_path", "NUL byte"),
    ("no_test", "no 'test' list"),
])
def test_malformed_split_file(capsys, tmp_path, tree, case, expect):
    root, split = tree
    bad = str(root / f"{case}.json")
    if case == "nested":
        _nested(bad)
    elif case == "not_json":
        open(bad, "w").write("{train: oops")
    elif case == "not_utf8":
        open(bad, "wb").write(b'{"train": [["\xff", 0, "a"]], "test": []}')
    elif case == "top_list":
        json.dump([1, 2], open(bad, "w"))
    else:
        def edit(raw):
            if case == "no_test":
                del raw["test"]
                return
            entry = raw["train"][0]
            if case == "str_label":
                entry[1] = "0"
            elif case == "float_label":
                entry[1] = 0.0
            elif case == "negative_label":
                entry[1] = -1
            else:
                entry[0] = "a\x00b.png"
        bad = edited(split, f"{case}.json", edit)
    rc, out, err = train(capsys, tmp_path, "--split-file", bad)
    assert_one_line_error(rc, out, err, tmp_path, f"{case}.json", expect)


def _imagenet(tmp_path, classnames: str, folders=("n01", "n02")):
    d = tmp_path / "inet" / "imagenet"
    for part in ("train", "val"):
        S.write_image_folder(d / "images" / part, S.make_classes(len(folders), seed=0), 2, size=16)
        for spec, wnid in zip(S.make_classes(len(folders), seed=0), folders):
            os.rename(d / "images" / part / spec.folder, d / "images" / part / wnid)
    (d / "classnames.txt").write_text(classnames)
    return tmp_path / "inet"


@pytest.mark.parametrize("classnames,expect", [
    ("n01 tench\n", "missing from class-names file"),
    ("n01 tench\nn02\n", "line 2"),
    ("n01 tench\nn01 goldfish\nn02 carp\n", "listed twice"),
])
def test_imagenet_classnames_problems(capsys, tmp_path, classnames, expect):
    root = _imagenet(tmp_path, classnames)
    rc, out, err = train(capsys, tmp_path, "--data", root, "--dataset", "imagenet")
    assert_one_line_error(rc, out, err, tmp_path, "classnames.txt", expect)


def test_empty_dataset_folders(capsys, tmp_path):
    d = tmp_path / "inet" / "imagenet"
    (d / "images" / "train").mkdir(parents=True)
    (d / "images" / "val").mkdir()
    (d / "classnames.txt").write_text("n01 tench\n")
    rc, out, err = train(capsys, tmp_path, "--data", tmp_path / "inet", "--dataset", "imagenet")
    assert_one_line_error(rc, out, err, tmp_path, str(d / "images" / "train"), "no class sub-folders")
    (tmp_path / "nothing").mkdir()
    rc, out, err = train(capsys, tmp_path, "--data", tmp_path / "nothing", "--dataset", "oxford_pets")
    assert_one_line_error(rc, out, err, tmp_path, str(tmp_path / "nothing"), "split_zhou_OxfordPets.json")


def _break_first_train_image(root, split) -> str:
    victim = str(root / "images" / json.loads(open(split).read())["train"][0][0])
    data = open(victim, "rb").read()
    open(victim, "wb").write(data[: len(data) // 2])
    return victim


@pytest.mark.parametrize("workers", ["0", "1"])
def test_bad_image_names_its_path(capsys, tmp_path, tree, workers):
    root, split = tree
    victim = _break_first_train_image(root, split)
    rc, out, err = run(capsys, "train", "--method", "ln", "--epochs", "1", "--shots", "2", "--no-progress",
                       "--num-workers", workers, "--split-file", split, "--output", tmp_path / "run")
    assert rc == 2 and out == "" and "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("leanclip: error:")]
    assert len(lines) == 1 and "\n" not in lines[0] and repr(victim) in lines[0], err
    assert not (tmp_path / "run" / "result.json").exists()
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()


def test_skip_bad_images_drops_and_counts(capsys, tmp_path, tree):
    root, split = tree
    victim = _break_first_train_image(root, split)
    (root / "images" / json.loads(open(split).read())["test"][0][0]).write_text("not an image")
    rc, out, err = run(capsys, "train", "--method", "ln", "--epochs", "1", "--shots", "2", "--no-progress",
                       "--split-file", split, "--output", tmp_path / "run", "--skip-bad-images")
    assert rc == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert res["train_images"] == 3 * 2 - 1 and res["metrics"]["test"]["n"] == 3 * 2 - 1
    notes = [ln for ln in err.splitlines() if "--skip-bad-images" in ln]
    assert len(notes) == 1 and "skipped 2 unreadable image(s)" in notes[0] and repr(victim) in notes[0]


def test_default_synthetic_cache_is_private_and_checked(capsys, tmp_path):
    args = ("zeroshot", "--synthetic-classes", "3", "--no-progress")
    rc, out, err = run(capsys, *args)
    assert rc == 0, err
    cache = tmp_path / "cache" / "synthetic"
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700
    (root,) = [p for p in cache.iterdir()]
    assert S.manifest_problem(root) is None
    first = json.loads(out.strip().splitlines()[-1])
    # a changed image is noticed and the dataset rebuilt: the same result as before
    victim = next((root / "images").rglob("test_*.png"))
    victim.write_bytes(b"planted")
    rc, out, err = run(capsys, *args)
    assert rc == 0, err
    assert json.loads(out.strip().splitlines()[-1]) == first and S.manifest_problem(root) is None
    # a cache folder others may write to is refused, before anything else happens
    os.chmod(cache, 0o777)
    rc, out, err = run(capsys, *args)
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert repr(str(cache)) in err and "writable by group or others" in err
