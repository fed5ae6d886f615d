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
    cxx = ["-O3", "-fopenmp", "-std=c++17"]
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
            py_limited_api=False,
        )
    nvcc = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr", "-std=c++17"]
    return CUDAExtension(
        "normpass._C",
        sources + sorted(glob.glob("csrc/cuda/*.cu")),
        define_macros=[("NORMPASS_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx + ["-DNORMPASS_WITH_CUDA"], "nvcc": nvcc + ["-DNORMPASS_WITH_CUDA"]},
        extra_link_args=link,
    )


setup(ext_modules=[extension()], cmdclass={"build_ext": BuildExtension})
