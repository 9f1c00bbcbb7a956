"""How the csrc/ extension is compiled, read by both builds: setup.py's ahead-of-time ``leanclip.kernels._C`` (which
loads this file by path, so it imports nothing) and ``_cuda_ext``'s JIT build."""

DEFAULT_ARCHS = "8.0;9.0"  # A100, H100; TORCH_CUDA_ARCH_LIST overrides
# torch adds the C++ standard it needs (C++20 for torch 2.14); no --use_fast_math: LayerNorm keeps IEEE division
CXX_FLAGS = ["-O3"]
CUDA_FLAGS = ["-O3", "-lineinfo"]
