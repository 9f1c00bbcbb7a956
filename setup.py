"""leanclip: kernel-backed parameter-efficient fine-tuning of open_clip models.

The CUDA extension in csrc/ is optional. It is built when torch and nvcc are visible at build time
(use ``pip install --no-build-isolation``) or when LEANCLIP_CUDA=1 forces it; LEANCLIP_CUDA=0 skips it.
Without it the package installs and runs on the Triton and torch backends.
"""
import glob
import os
import runpy

from setuptools import find_packages, setup

VERSION = "0.1.0"
# folder -> package. kernels/ itself carries no __init__.py: its sources sit one level down in kernels/src, so Python
# started from the repository root never finds a regular package named `kernels` there and imports Hugging Face's
# `kernels` distribution (transformers >= 5.25 requires it) instead.
PACKAGE_DIRS = {"engine": "leanclip", "kernels/src": "leanclip.kernels", "bench": "leanclip.bench"}
PACKAGE_DIRS_BY_PACKAGE = {package: folder for folder, package in PACKAGE_DIRS.items()}


def packages() -> list[str]:
    """Every package under each mapped folder, named in the leanclip namespace."""
    return [package + ("." + sub if sub else "") for folder, package in PACKAGE_DIRS.items()
            for sub in [""] + find_packages(where=folder)]


def cuda_extensions():
    """The optional csrc/ extension ``leanclip.kernels._C``: ([ext], cmdclass), or ([], {}) for a pure-Python install.

    LEANCLIP_CUDA=1 forces it (a missing torch/nvcc or a failed compile is an error), LEANCLIP_CUDA=0 skips it;
    by default it is built when torch is importable at build time and nvcc exists, and a failed compile only warns.
    Archs: TORCH_CUDA_ARCH_LIST, default ``DEFAULT_ARCHS`` of kernels/src/_build.py (the JIT build's settings too).
    """
    flag = os.environ.get("LEANCLIP_CUDA")
    if flag == "0":
        return [], {}
    try:
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:  # isolated build env without torch: pure-Python install
        if flag == "1":
            raise RuntimeError("LEANCLIP_CUDA=1 needs torch importable at build time: use --no-build-isolation")
        return [], {}
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    header = os.path.join(CUDA_HOME, "include", "cuda_runtime.h") if CUDA_HOME else None
    # torch guesses CUDA_HOME from `which nvcc`; a bare /usr/local/bin/nvcc link gives a home without the headers
    if nvcc is None or not os.path.exists(nvcc) or not os.path.exists(header):
        if flag == "1":
            raise RuntimeError(f"LEANCLIP_CUDA=1 needs nvcc and cuda_runtime.h under CUDA_HOME ({CUDA_HOME!r}): "
                               "set CUDA_HOME to a CUDA toolkit matching torch's CUDA")
        return [], {}
    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu"))
    if not sources:
        return [], {}
    build = runpy.run_path(os.path.join(here, "kernels", "src", "_build.py"))
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", build["DEFAULT_ARCHS"])
    ext = CUDAExtension(
        "leanclip.kernels._C",
        sources,
        include_dirs=[os.path.join(here, "csrc")],
        extra_compile_args={"cxx": build["CXX_FLAGS"], "nvcc": build["CUDA_FLAGS"]},
    )

    class BuildExt(BuildExtension.with_options(use_ninja=True)):
        def build_extensions(self):
            self._failed = set()
            super().build_extensions()
            # a failed optional extension must vanish from the outputs, or the (editable) install tries to copy it
            self.extensions = [e for e in self.extensions if e.name not in self._failed]

        def build_extension(self, extension):
            try:
                super().build_extension(extension)
            except Exception as e:  # optional extension: keep the pure-Python install unless it was forced
                if flag == "1":
                    raise
                self._failed.add(extension.name)
                self.warn(f"leanclip: skipping the optional CUDA extension ({e}); the triton and torch backends work")

    return [ext], {"build_ext": BuildExt}


ext_modules, cmdclass = cuda_extensions()

setup(
    name="leanclip",
    version=VERSION,
    description="Fused-kernel, memory-lean parameter-efficient fine-tuning for open_clip models",
    # One import namespace, `leanclip`, over the repository's folders: engine/ is the package itself, kernels/src and
    # bench/ its subpackages (top-level `kernels` is Hugging Face's kernel hub and `engine` a common module name).
    packages=packages(),
    package_dir=PACKAGE_DIRS_BY_PACKAGE,
    package_data={"leanclip": ["mini_imagenet_splits.json"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        # engine/lean.py calls open_clip internals: text_global_pool(..., eos_token_id=) and the towers'
        # text_eos_id / eos_id (both first in 3.1.0; 3.0.x fails on the lean text path), plus VisionTransformer._embeds,
        # LayerNormFp32, Transformer.batch_first and ResidualAttentionBlock.ls_1/ls_2, unchanged from 3.1.0 to 3.3.0
        # (transformer.py and model.py identical). A 4.x may change the blocks: lean.lean_obstacles then names them.
        "open_clip_torch>=3.1,<4",
        "numpy",
        "safetensors",
        "tqdm",
        "matplotlib",
        "scikit-learn",
        "ftfy",
    ],
    # towers: LilT's unaligned towers (open_clip custom towers: a timm image model, a Hugging Face text model)
    extras_require={"test": ["pytest", "pytest-benchmark", "ninja", "timm", "transformers"],
                    "triton": ["triton"], "towers": ["timm", "transformers"]},
    entry_points={"console_scripts": ["leanclip=leanclip.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
