import os

import pytest

# The Triton kernels run on CPU tensors only under the interpreter, which must be chosen before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


HEADER_PACKAGES = ("torch", "torchvision", "triton", "open_clip_torch", "timm", "transformers", "kernels",
                   "huggingface_hub", "numpy")


def pytest_terminal_summary(terminalreporter):
    """The versions pip resolved, at the end of every test log (also under -q): a failure then names the release."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return "-"
    terminalreporter.write_line("leanclip deps: " + ", ".join(f"{name} {installed(name)}" for name in HEADER_PACKAGES))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running, e.g. compiles the CUDA extension (deselect: -m 'not slow')")


@pytest.fixture(scope="session", autouse=True)
def _leanclip_cache(tmp_path_factory):
    """The per-user cache the CLI uses by default ($LEANCLIP_CACHE_DIR: the synthetic dataset) lives in a session
    temp folder during tests, never in the real home; child processes inherit it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LEANCLIP_CACHE_DIR", str(tmp_path_factory.mktemp("leanclip-cache")))
        yield
