"""Checks of the built extension: setup.py's guard against compilers that link libstdc++ statically
(two libstdc++ copies in one process crash on the first error message that formats a number), and
where AVX/AVX-512 instructions may sit in the library."""
from __future__ import annotations

import importlib.util
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GXX = shutil.which("g++")


def _setup_module():
    spec = importlib.util.spec_from_file_location("cadk_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: defines the helpers, builds nothing
    return module


@pytest.mark.skipif(GXX is None, reason="no g++ here")
def test_static_libstdcxx_compiler_is_detected_and_replaced(tmp_path, monkeypatch):
    setup = _setup_module()
    wrapper = tmp_path / "g++-static"
    wrapper.write_text(f'#!/bin/sh\nexec {GXX} "$@" -static-libstdc++\n')
    wrapper.chmod(0o755)
    assert setup._links_libstdcxx_statically(str(wrapper))
    assert not setup._links_libstdcxx_statically(GXX)

    monkeypatch.setenv("CXX", str(wrapper))
    monkeypatch.setenv("CC", str(wrapper))
    try:
        setup._use_compatible_compiler()
    except SystemExit as e:  # no dynamically linking system compiler: the error must say what to do
        assert "Set CXX and CC" in str(e)
        return
    assert os.environ["CXX"] != str(wrapper)
    assert not setup._links_libstdcxx_statically(os.environ["CXX"])


def test_compiler_that_does_not_build_is_left_alone(monkeypatch):
    setup = _setup_module()
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    setup._use_compatible_compiler()  # the build itself reports a missing compiler
    assert os.environ["CXX"] == "/nonexistent/c++"


# Functions allowed to hold AVX/AVX-512 instructions: the AVX-512 builds of the passes
# (csrc/cpu/avx512.cpp) and the kernels with their own target attributes, all reached only after a
# CPU feature check.
VECTOR_ISA_FUNCTIONS = ("cadk::cpu::avx512::", "philox_block", "philox_gates_avx", "compress_run", "expand_run",
                        "zero_run", "mulhilo", "xor3")


@pytest.mark.skipif(shutil.which("objdump") is None or platform.machine() != "x86_64",
                    reason="needs objdump on x86-64")
def test_avx_code_only_in_functions_behind_a_cpu_check():
    """A header inline or template function compiled inside the AVX-512 build would be shared with the
    baseline path (the linker keeps one copy) and crash CPUs without AVX-512. csrc/cpu/avx512.cpp
    includes every header before its target pragma to rule that out; this checks the built library."""
    import torch

    from cadk.kernels import cpp_backend
    if not cpp_backend.AVAILABLE or torch.version.cuda:
        pytest.skip("needs the CPU-only build of cadk._C (a CUDA build links code cadk does not compile)")
    import cadk._C as ext
    dump = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", ext.__file__], capture_output=True,
                          text=True, check=True).stdout
    offenders, name = set(), ""
    vector = re.compile(r"\tv[a-z0-9]+ |%[yz]mm")
    for line in dump.splitlines():
        if line.endswith(">:"):
            name = line.split("<", 1)[1][:-2]
        elif vector.search(line) and not any(f in name for f in VECTOR_ISA_FUNCTIONS):
            offenders.add(name)
    assert not offenders, f"AVX/AVX-512 code outside the CPU-checked kernels: {sorted(offenders)[:5]}"
