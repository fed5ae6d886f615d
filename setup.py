"""Builds normpass._C: C++ CPU kernels always, CUDA kernels when torch and nvcc allow."""

import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -fopenmp: at::parallel_for is an inline OpenMP loop in the headers; without the flag the
    # extension's kernels run on one thread. libgomp is the one torch already loaded (same soname).
    # No -std: BuildExtension adds the standard the installed torch was built with (C++17 for 2.11,
    # C++20 for 2.13); compiling its inline headers under another one risks ODR violations.
    # -ffp-contract=off: each product rounded before it is added, as written. The backward's dx
    # takes g_i - mean(g) with mean(g) summed from rounded g_i; a g_i fused into an FMA there left
    # the rounding error of dy * w, times rstd (single-element LayerNorm rows: 2x torch's error).
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off"]
    link = ["-fopenmp"]
    with_cuda = (
        torch.version.cuda is not None
        and CUDA_HOME is not None
        and os.environ.get("NORMPASS_NO_CUDA", "0") != "1"
    )
    if not with_cuda:
        return CppExtension(
            "normpass._C",
            sources,
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
        )
    nvcc = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
    return CUDAExtension(
        "normpass._C",
        sources + sorted(glob.glob("csrc/cuda/*.cu")),
        extra_compile_args={"cxx": cxx + ["-DNORMPASS_WITH_CUDA"], "nvcc": nvcc + ["-DNORMPASS_WITH_CUDA"]},
        extra_link_args=link,
    )


setup(ext_modules=[extension()], cmdclass={"build_ext": BuildExtension})
