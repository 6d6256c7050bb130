"""Build cadk and its op extension cadk._C.

The extension holds the C++ CPU kernels (csrc/cpu) and, when PyTorch has CUDA and a CUDA toolkit is
found, the CUDA kernels (csrc/cuda). CADK_NO_EXTENSION=1 installs the pure-Python package, which
runs on the reference ops (and Triton where available).
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# Without OpenMP at::parallel_for runs serially; without -fno-trapping-math GCC will not if-convert
# (and so not vectorise) the ReLU selects of the fused passes. cadk never reads FP exception flags.
CXX_FLAGS = ["-O3", "-fopenmp", "-fno-trapping-math"]
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _cuda_toolkit_found() -> bool:
    import torch
    from torch.utils import cpp_extension

    if not torch.version.cuda:
        return False
    home = cpp_extension.CUDA_HOME
    return bool(home and os.path.exists(os.path.join(home, "bin", "nvcc"))) or shutil.which("nvcc") is not None


def _extensions():
    if os.environ.get("CADK_NO_EXTENSION") == "1":
        return [], {}
    from torch.utils import cpp_extension

    sources = ["csrc/cadk_ops.cpp"] + _sources("csrc/cpu/*.cpp")
    cuda_sources = _sources("csrc/cuda/*.cu")
    if cuda_sources and _cuda_toolkit_found():
        ext = cpp_extension.CUDAExtension(
            "cadk._C", sources + cuda_sources,
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
            extra_link_args=["-fopenmp"])
    else:
        ext = cpp_extension.CppExtension(
            "cadk._C", sources, extra_compile_args={"cxx": CXX_FLAGS}, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="cadk",
    version="0.1.0",
    description="Complexity-aware training for PyTorch: learned Bernoulli gates that prune units, "
                "filters and blocks during training, with kernels that skip pruned channels",
    packages=find_packages(include=["cadk", "cadk.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.11",
        "numpy",
        "tqdm",
        "matplotlib",
        "triton>=3.0; platform_system == 'Linux' and platform_machine == 'x86_64'",
    ],
    entry_points={"console_scripts": ["cadk = cadk.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
