"""Loader for the optional csrc CUDA extension. ``load()`` returns the module, or None where it is not available.

Where the module comes from, in order:

1. a copy already loaded in this process (the ``leanclip_cuda`` op namespace can be registered only once);
2. the prebuilt ``leanclip.kernels._C`` (``LEANCLIP_CUDA=1 pip install -e . --no-build-isolation``, or any install with nvcc);
3. a JIT build (``build_jit``), only when ``LEANCLIP_CUDA_JIT=1`` and a CUDA device is visible, or when
   ``LEANCLIP_CUDA_JIT=force``. ``load()`` never compiles otherwise.

``build_jit(verbose=False)`` compiles ``csrc/`` with ``torch.utils.cpp_extension.load`` (ninja, incremental: a no-op
when nothing changed) into ``build_dir()`` (``$LEANCLIP_BUILD_DIR``, else ``~/.cache/leanclip/<torch>-<cuda>-<archs>``)
and imports it. Archs: ``$TORCH_CUDA_ARCH_LIST``, else the visible GPU's, else ``8.0;9.0``.
"""
from __future__ import annotations

import glob
import os
import runpy
import threading
import warnings
from pathlib import Path

JIT_NAME = "leanclip_cuda_jit"
SOURCE_DIR = Path(__file__).resolve().parents[2] / "csrc"  # kernels/src/_cuda_ext.py -> the checkout's csrc/
# the compile settings setup.py uses too, read by path as setup.py reads them (this file also loads on its own)
_BUILD = runpy.run_path(str(Path(__file__).with_name("_build.py")))
DEFAULT_ARCHS, CXX_FLAGS, CUDA_FLAGS = _BUILD["DEFAULT_ARCHS"], _BUILD["CXX_FLAGS"], _BUILD["CUDA_FLAGS"]

_lock = threading.RLock()
_module = None
_tried = False


def source_files() -> list[str]:
    """The extension's sources (setup.py builds the same list)."""
    return sorted(glob.glob(str(SOURCE_DIR / "*.cu")) + glob.glob(str(SOURCE_DIR / "*.cpp")))


def jit_archs() -> str:
    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if env:
        return env
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return f"{major}.{minor}"
    except Exception:
        pass
    return DEFAULT_ARCHS


def build_dir(archs: str | None = None) -> str:
    env = os.environ.get("LEANCLIP_BUILD_DIR")
    if env:
        return env
    import torch

    archs = archs or jit_archs()
    tag = "".join(c if c.isalnum() or c in ".+" else "_" for c in f"torch{torch.__version__}-cu{torch.version.cuda}-sm{archs}")
    return str(Path.home() / ".cache" / "leanclip" / tag)


def _toolkit_root(torch_guess: str | None) -> str | None:
    """torch's CUDA_HOME if it is a real toolkit root, else $CUDA_HOME or /usr/local/cuda (torch resolves CUDA_HOME
    once, at import, and may take /usr/local from a wrapper script /usr/local/bin/nvcc)."""
    for home in (torch_guess, os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")) and \
                os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def build_jit(verbose: bool = False):
    """Compile csrc/ (incrementally) and return the loaded module.

    If a copy of the extension is already loaded in this process (prebuilt or JIT), that copy is returned without
    building: a second copy could not register the ``leanclip_cuda`` ops again. Raises RuntimeError
    when nvcc/ninja are missing or the build fails, ImportError when the library was built but cannot be loaded.
    """
    global _module
    import torch.utils.cpp_extension as cpp

    home = _toolkit_root(cpp.CUDA_HOME)
    if home is None:
        raise RuntimeError(f"building the leanclip CUDA extension needs a CUDA toolkit (bin/nvcc, include/cuda_runtime.h);"
                           f" torch found CUDA_HOME={cpp.CUDA_HOME}: set CUDA_HOME (e.g. /usr/local/cuda)")
    if home != cpp.CUDA_HOME:  # torch guessed from a wrapper nvcc on PATH: use the real toolkit root
        cpp.CUDA_HOME = home
    if not cpp.is_ninja_available():
        raise RuntimeError("building the leanclip CUDA extension needs ninja: pip install ninja")
    sources = source_files()
    if not sources:
        raise RuntimeError(f"no CUDA sources found under {SOURCE_DIR}")
    archs = jit_archs()
    out_dir = build_dir(archs)
    os.makedirs(out_dir, exist_ok=True)
    with _lock:
        if _module is not None:  # one copy per process: the ops registry takes the leanclip_cuda namespace once
            return _module
        previous = os.environ.get("TORCH_CUDA_ARCH_LIST")
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        try:
            try:
                mod = cpp.load(name=JIT_NAME, sources=sources, extra_cflags=CXX_FLAGS, extra_cuda_cflags=CUDA_FLAGS,
                               extra_include_paths=[str(SOURCE_DIR)], build_directory=out_dir, verbose=verbose,
                               with_cuda=True)
            except (ImportError, OSError) as e:  # compiled, but the shared library does not load
                raise ImportError(f"leanclip CUDA extension built in {out_dir} but failed to load: {e}") from e
        finally:
            if previous is None:
                os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = previous
        _module = mod
        return mod


def load():
    """The extension module, or None. Compiles only under LEANCLIP_CUDA_JIT (see the module docstring)."""
    global _module, _tried
    if _module is not None or _tried:
        return _module
    with _lock:
        if _module is not None or _tried:
            return _module
        _tried = True
        try:
            from leanclip.kernels import _C  # built by setup.py

            _module = _C
            return _module
        except ImportError as e:
            if glob.glob(str(Path(__file__).resolve().parent / "_C*.so")):
                warnings.warn(f"leanclip: kernels._C exists but failed to import: {e}", RuntimeWarning, stacklevel=2)
        mode = os.environ.get("LEANCLIP_CUDA_JIT", "0").strip().lower()
        if mode not in ("1", "force"):
            return None
        if mode != "force":
            import torch

            if not torch.cuda.is_available():
                return None
        try:
            return build_jit()
        except Exception as e:  # the backend then reports "not built" where it is requested
            warnings.warn(f"leanclip: LEANCLIP_CUDA_JIT build failed: {e}", RuntimeWarning, stacklevel=2)
            return None
