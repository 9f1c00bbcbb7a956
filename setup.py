"""leanclip: kernel-backed parameter-efficient fine-tuning of open_clip models.

The CUDA extension in csrc/ is optional. It is built when torch and nvcc are visible at build time
(use ``pip install --no-build-isolation``) or when LEANCLIP_CUDA=1 forces it; LEANCLIP_CUDA=0 skips it.
Without it the package installs and runs on the Triton and torch backends.
"""
import glob
import os

from setuptools import find_packages, setup

VERSION = "0.1.0"


def cuda_extensions():
    flag = os.environ.get("LEANCLIP_CUDA")
    if flag == "0":
        return [], {}
    try:
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:  # isolated build env without torch: pure-Python install
        if flag == "1":
            raise RuntimeError("LEANCLIP_CUDA=1 needs torch importable at build time: use --no-build-isolation")
        return [], {}
    if CUDA_HOME is None and flag != "1":
        return [], {}
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu"))
    if not sources:
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    ext = CUDAExtension(
        "kernels._C",
        sources,
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extensions()

setup(
    name="leanclip",
    version=VERSION,
    description="Fused-kernel, memory-lean parameter-efficient fine-tuning for open_clip models",
    packages=find_packages(include=["kernels", "kernels.*", "engine", "engine.*", "bench", "bench.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "open_clip_torch>=2.24",
        "numpy",
        "safetensors",
        "tqdm",
        "matplotlib",
        "scikit-learn",
        "ftfy",
    ],
    extras_require={"test": ["pytest", "pytest-benchmark", "ninja"], "triton": ["triton"]},
    entry_points={"console_scripts": ["leanclip=engine.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
