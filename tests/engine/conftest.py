"""Engine test fixtures. Model tests run the fused ops on the torch backend: the Triton interpreter is far too slow
for whole models (the kernels have their own tests under tests/kernels)."""
import copy
import warnings

import pytest
import torch

from leanclip import data, kernels, synthetic


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny models + a shared 2-core box: intra-op threads only add spin-waiting (10-30x slower under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _torch_backend():
    with kernels.set_backend("torch"):
        yield


@pytest.fixture(scope="session")
def tiny_name():
    from leanclip.configs import register_tiny_config

    return register_tiny_config()


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """A folder for the synthetic dataset the CLI tests read (made once per session)."""
    return str(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="session")
def weights(request, tmp_path_factory, tiny_name):
    """Path of the tiny model's weights after a short synthetic contrastive pre-training (above-chance zero-shot),
    made once and kept in pytest's cache."""
    from leanclip import cli

    try:
        folder = request.config.cache.mkdir("leanclip-tiny-pretrained")
    except Exception:  # cache provider disabled
        folder = tmp_path_factory.mktemp("tiny-pretrained")
    return cli.synthetic_pretrained_weights(folder, tiny_name, 40)


@pytest.fixture(scope="session")
def tokenizer():
    import open_clip

    return open_clip.get_tokenizer("ViT-B-16")  # open_clip's bundled BPE tokenizer (no download)


def _create(name):
    import open_clip

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return open_clip.create_model(name, pretrained=None)


@pytest.fixture(scope="session")
def tiny_base(tiny_name):
    """A randomly initialised tiny CLIP (seed 0); tests deepcopy it (use ``fresh_tiny``)."""
    torch.manual_seed(0)
    m = _create(tiny_name)
    # LayerNorms at their identity init hide bugs (weight 1 / bias 0 gradients look alike): perturb them.
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.add_(0.1 * torch.randn_like(mod.weight))
                mod.bias.add_(0.1 * torch.randn_like(mod.bias))
    return m


@pytest.fixture
def fresh_tiny(tiny_base):
    return lambda: copy.deepcopy(tiny_base)


@pytest.fixture(scope="session")
def create_model():
    return _create


@pytest.fixture(scope="session")
def tok(tiny_name):
    import open_clip

    return open_clip.get_tokenizer(tiny_name)


@pytest.fixture(scope="session")
def shapes():
    """8 synthetic classes: 8 training images per class, 16 test images per class (eval transform)."""
    classes = synthetic.make_classes(8, seed=0)
    x, y = synthetic.make_classification_set(classes, 8, size=32, seed=0)
    xt, yt = synthetic.make_classification_set(classes, 16, size=32, seed=1)
    tf = data.clip_transform(32, train=False)
    return {
        "classnames": [c.name for c in classes],
        "train": data.TensorImageDataset(x, y, tf),
        "train_aug": data.TensorImageDataset(x, y, data.clip_transform(32, train=True)),
        "test": data.TensorImageDataset(xt, yt, tf),
    }



@pytest.fixture
def batch(tok):
    """Three images and captions for feature-level checks of the in-layer methods (tests/engine/peft_checks.py)."""
    g = torch.Generator().manual_seed(3)
    return torch.randn(3, 3, 32, 32, generator=g), tok(["a photo of a cat", "a dog", "two red cubes on a table"])


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty, offline Hugging Face cache: env variables for new processes, huggingface_hub's constants (read at
    its import) for this one."""
    from huggingface_hub import constants

    home = tmp_path / "hf"
    cache = home / "hub"
    cache.mkdir(parents=True)
    for k, v in {"HF_HOME": str(home), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache
