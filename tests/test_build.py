"""setup.py's guard against compilers that link libstdc++ statically into the extension (two
libstdc++ copies in one process crash on the first error message that formats a number)."""
from __future__ import annotations

import importlib.util
import os
import shutil
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
