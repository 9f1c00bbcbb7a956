"""The shared feature cache uses an entry only when it is what it claims to be (its key, its sha256, one row per
sample, the dataset's labels, the images' current files), and only in a private folder."""
import os

import pytest
import torch
from PIL import Image

from leanclip import data
from leanclip import feature_cache as fc
from leanclip import prepare

KW = dict(device=torch.device("cpu"), precision="fp32")


@pytest.fixture
def setup(tmp_path, fresh_tiny, tok):
    """A prepared tiny model, a 6-image dataset read from PNG files (3 classes) and an empty shared cache."""
    model = fresh_tiny()
    prepare(model, "coop", classnames=["a", "b", "c"], tokenizer=tok)
    folder = tmp_path / "images"
    folder.mkdir()
    samples = []
    for i in range(6):
        path = folder / f"{i}.png"
        Image.new("RGB", (32, 32), (40 * i, 200 - 30 * i, 90)).save(path)
        samples.append(data.Sample(str(path), i % 3, "abc"[i % 3]))
    ds = data.ImageDataset(samples, data.clip_transform(32, train=False))
    cache = fc.FeatureCache(tmp_path / "cache")
    return model, ds, cache


def _entry(cache):
    (path,) = cache.root.glob("*.safetensors")
    return path


def _replant(cache, change):
    """Rewrite the one entry with ``change(tensors)``, under its key and with a digest that matches (what someone
    writing the folder could do): only the checks against the dataset can find it."""
    from safetensors.torch import load_file

    path = _entry(cache)
    key = path.name.removesuffix(".safetensors")
    cache.save(key, change(load_file(str(path))))


@pytest.mark.parametrize("change,why", [
    (lambda t: {**t, "labels": torch.zeros_like(t["labels"])}, "labels are not the dataset's"),
    (lambda t: {k: v[:3] for k, v in t.items()}, "rows"),
])
def test_a_planted_entry_is_discarded_and_recomputed(setup, change, why, capsys):
    model, ds, cache = setup
    first, labels = fc.encoder_features(model, ds, 4, cache=cache, **KW)
    _replant(cache, change)
    capsys.readouterr()
    again, again_labels = fc.encoder_features(model, ds, 4, cache=cache, **KW)
    assert torch.equal(again, first) and torch.equal(again_labels, labels) and len(again) == len(ds)
    assert fc.count_events(cache.root) == {"passes": 2, "hits": 0}
    warned = capsys.readouterr().err.splitlines()  # the package logger writes to stderr
    assert len(warned) == 1 and why in warned[0] and str(_entry(cache)) in warned[0], warned
    assert fc.encoder_features(model, ds, 4, cache=cache, **KW)[0].equal(first)  # the entry was repaired
    assert fc.count_events(cache.root) == {"passes": 2, "hits": 1}


def test_a_damaged_entry_fails_its_digest(setup, capsys):
    model, ds, cache = setup
    first, _ = fc.encoder_features(model, ds, 4, cache=cache, **KW)
    raw = bytearray(_entry(cache).read_bytes())
    raw[-64:] = bytes(b ^ 0xFF for b in raw[-64:])  # the tail: feature bytes, the header still parses
    _entry(cache).write_bytes(bytes(raw))
    capsys.readouterr()
    again, _ = fc.encoder_features(model, ds, 4, cache=cache, **KW)
    assert torch.equal(again, first)
    assert "do not match the sha256" in capsys.readouterr().err
    assert fc.count_events(cache.root) == {"passes": 2, "hits": 0}


def test_an_entry_under_another_key_is_not_served(setup):
    model, ds, cache = setup
    first, _ = fc.encoder_features(model, ds, 4, cache=cache, **KW)
    path = _entry(cache)
    other = torch.ones(6, first.shape[1])
    cache.save("0" * 64, {"features": other, "labels": torch.tensor([0, 1, 2] * 2)})
    os.replace(cache.path("0" * 64), path)  # a valid entry of another key, renamed
    assert torch.equal(fc.encoder_features(model, ds, 4, cache=cache, **KW)[0], first)


def test_images_rewritten_in_place_are_computed_anew(setup):
    model, ds, cache = setup
    first, _ = fc.encoder_features(model, ds, 4, cache=cache, **KW)
    path = ds.samples[0].path
    Image.new("RGB", (32, 32), (255, 255, 255)).save(path)  # same path, other pixels
    os.utime(path, ns=(10**18, 10**18))  # and a modification time no earlier write had
    again, _ = fc.encoder_features(model, ds, 4, cache=cache, **KW)
    assert fc.count_events(cache.root) == {"passes": 2, "hits": 0}
    assert not torch.equal(again[0], first[0]) and torch.equal(again[1:], first[1:])


def test_a_folder_others_may_write_or_another_user_owns_is_refused(setup, monkeypatch):
    model, ds, cache = setup
    cache.root.mkdir(mode=0o700)
    cache.root.chmod(0o777)
    with pytest.raises(ValueError, match="writable by group or others"):
        fc.encoder_features(model, ds, 4, cache=cache, **KW)
    monkeypatch.setenv(fc.ENV_VAR, str(cache.root))
    with pytest.raises(ValueError, match="LEANCLIP_FEATURE_CACHE"):
        fc.active_cache()
    cache.root.chmod(0o700)
    assert fc.active_cache() is not None
    uid = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: uid + 1)
    with pytest.raises(ValueError, match="belongs to another user"):
        fc.encoder_features(model, ds, 4, cache=cache, **KW)
    assert not list(cache.root.iterdir())  # nothing was computed or written


def test_the_per_run_cache_checks_its_entries_too(setup, tmp_path):
    from leanclip.llu import cached_image_features

    model, ds, _ = setup
    cache = fc.FeatureCache(tmp_path / "run-features")
    first, labels = cached_image_features(model, ds, cache, 4, device="cpu", precision="fp32")
    _replant(cache, lambda t: {**t, "labels": (t["labels"] + 1) % 3})
    again, again_labels = cached_image_features(model, ds, cache, 4, device="cpu", precision="fp32")
    assert torch.equal(again, first) and torch.equal(again_labels, labels)
    assert (cache.hits, cache.misses) == (0, 2)
