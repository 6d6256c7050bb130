"""Build cadk and its op extension cadk._C.

The extension holds the C++ CPU kernels (csrc/cpu) and, when PyTorch has CUDA and a CUDA toolkit is
found, the CUDA kernels (csrc/cuda). CADK_NO_EXTENSION=1 installs the pure-Python package, which
runs on the reference ops (and Triton where available).
"""
import glob
import os
import shutil
import subprocess
import sysconfig
import tempfile

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# Without OpenMP at::parallel_for runs serially; without -fno-trapping-math GCC will not if-convert
# (and so not vectorise) the ReLU selects of the fused passes. cadk never reads FP exception flags.
# -ffp-contract=off: the AVX-512 build of the passes (csrc/cpu/avx512.cpp) would otherwise fuse
# multiply-adds that the baseline build rounds twice, and results would depend on the CPU.
CXX_FLAGS = ["-O3", "-fopenmp", "-fno-trapping-math", "-ffp-contract=off"]
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


def _links_libstdcxx_statically(compiler: str) -> bool:
    """Whether `compiler` builds shared libraries with its own copy of libstdc++ (some toolchain
    wrappers add -static-libstdc++). Such an extension mixes that copy with the libstdc++ torch
    loads, and the first error message that formats a number crashes the process."""
    probe = "#include <sstream>\nstd::string f(long v) { std::ostringstream s; s << v; return s.str(); }\n"
    dynamic = (b"libstdc++.so", b"libc++.so", b"libc++.1.dylib")  # NEEDED entries of a dynamic C++ runtime
    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "probe.cpp"), os.path.join(tmp, "probe.so")
        with open(src, "w") as f:
            f.write(probe)
        try:
            built = subprocess.run([compiler, "-shared", "-fPIC", src, "-o", out], capture_output=True).returncode == 0
        except OSError:
            return False
        if not built:
            return False
        with open(out, "rb") as f:
            data = f.read()
        return not any(name in data for name in dynamic)


def _use_compatible_compiler() -> None:
    """Build with a compiler that links libstdc++ dynamically, as torch itself does."""
    if os.name != "posix":
        return
    # The compiler setuptools will link with: $CXX, else the one Python was built with.
    cxx = os.environ.get("CXX") or (sysconfig.get_config_var("CXX") or "c++").split()[0]
    if not _links_libstdcxx_statically(cxx):
        return
    for alt_cxx, alt_cc in (("/usr/bin/g++", "/usr/bin/gcc"), ("/usr/bin/c++", "/usr/bin/cc")):
        if os.path.exists(alt_cxx) and not _links_libstdcxx_statically(alt_cxx):
            print(f"cadk: {cxx} links libstdc++ statically into shared libraries, which crashes inside "
                  f"torch; building with {alt_cxx} instead")
            os.environ["CXX"] = alt_cxx
            if os.path.exists(alt_cc):
                os.environ["CC"] = alt_cc
            return
    raise SystemExit(f"cadk: {cxx} links libstdc++ statically into shared libraries, which crashes inside "
                     "torch (two libstdc++ copies in one process). Set CXX and CC to a compiler that links "
                     "it dynamically (e.g. the system g++) and build again.")


def _extensions():
    if os.environ.get("CADK_NO_EXTENSION") == "1":
        return [], {}
    try:
        from torch.utils import cpp_extension
    except ImportError as e:
        raise SystemExit("cadk's extension builds against the installed torch, which was not importable "
                         f"({e}). Install torch first, then build without isolation: "
                         "pip install --no-build-isolation -e .  (or set CADK_NO_EXTENSION=1 for the "
                         "pure-Python package)") from e

    _use_compatible_compiler()
    sources = ["csrc/cadk_ops.cpp", "csrc/autograd.cpp"] + _sources("csrc/cpu/*.cpp")
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


if __name__ == "__main__":  # pip's build backend runs this file as __main__; tests import its helpers
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
        extras_require={"images": ["pillow"]},  # --data imagenet / imagefolder decode images with Pillow
        entry_points={"console_scripts": ["cadk = cadk.cli:main"]},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
