"""Platforms the tests do not run on, faked: what the native build, the CPU-thread setters and the
benchmark's memory measurement do on macOS, Windows and ARM machines. (The device without
float64 is faked in tests/test_generate.py.)"""
import os
import sys

import pytest

from charrnn import device, native


# -----------------------------------------------------------------------------
# the C loops (charrnn/native.py): skipped cleanly, and `status()` says why

@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """native's cache emptied before and after (the next real call builds or finds the library
    again), builds going to a temporary folder, and no CC or CHARRNN_NATIVE from outside."""
    native.loops.cache_clear()
    monkeypatch.setenv("CHARRNN_BUILD", str(tmp_path / "build"))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CHARRNN_NATIVE", raising=False)
    yield
    native.loops.cache_clear()


@pytest.fixture
def no_compiler_runs(monkeypatch):
    """Fails the test if anything looks for or runs a compiler."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a compiler was looked for or run: {args}")
    monkeypatch.setattr(native.shutil, "which", refuse)
    monkeypatch.setattr(native.subprocess, "run", refuse)


@pytest.fixture
def linux_x86(monkeypatch):
    """A Linux x86-64 machine where bf16 runs, whatever this one is."""
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(native.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(native.bf16gemm, "available", lambda: True)
    monkeypatch.setattr(native.bf16gemm, "_cblas_gemm_bf16", lambda: None)


def python_loops(expected: str) -> None:
    assert native.loops() is None
    status = native.status()
    assert status.startswith("Python loops: ") and expected in status, status


@pytest.mark.parametrize("name", ["darwin", "win32", "cygwin"])
def test_no_build_off_linux(fresh_native, no_compiler_runs, monkeypatch, name):
    monkeypatch.setattr(sys, "platform", name)
    python_loops(f"on Linux only, not {name}")


@pytest.mark.parametrize("machine", ["aarch64", "arm64", "ppc64le", ""])
def test_no_build_off_x86(fresh_native, no_compiler_runs, linux_x86, monkeypatch, machine):
    monkeypatch.setattr(native.platform, "machine", lambda: machine)
    python_loops("x86-64 CPUs only")


def test_switched_off(fresh_native, no_compiler_runs, linux_x86, monkeypatch):
    monkeypatch.setenv("CHARRNN_NATIVE", "0")
    python_loops("CHARRNN_NATIVE=0")


def test_no_bf16(fresh_native, no_compiler_runs, linux_x86, monkeypatch):
    monkeypatch.setattr(native.bf16gemm, "available", lambda: False)
    python_loops("bf16 does not run here")


@pytest.mark.parametrize("cc, expected", [(None, "cc is not on the PATH"),
                                          ("no-such-cc -O0", "no-such-cc is not on the PATH")])
def test_no_compiler(fresh_native, linux_x86, monkeypatch, cc, expected):
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    if cc:
        monkeypatch.setenv("CC", cc)
    python_loops(f"no C compiler found ({expected}; set CC)")


@pytest.mark.skipif(os.name != "posix", reason="the fake compiler is a shell script")
def test_a_failed_build_names_the_compilers_error(fresh_native, linux_x86, monkeypatch, tmp_path):
    fake = tmp_path / "fakecc"
    fake.write_text("#!/bin/sh\n"
                    'if [ "$1" = --version ]; then echo "fakecc 1.0"; exit 0; fi\n'
                    "echo \"tanh_rnn.c: In function 'forward':\" >&2\n"
                    "echo \"tanh_rnn.c:9:5: error: unknown type name 'v16bf'\" >&2\n"
                    "exit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    python_loops("the build failed: tanh_rnn.c:9:5: error: unknown type name 'v16bf'")


def test_status_agrees_with_loops_here(fresh_native):
    loops = native.loops()
    status = native.status()
    assert status.startswith("C loops (" if loops is not None else "Python loops: "), status


# -----------------------------------------------------------------------------
# per-thread CPU counts (charrnn/device.py): nothing set where the libraries cannot be reached

@pytest.fixture
def fresh_setters():
    device._thread_setters.cache_clear()
    yield
    device._thread_setters.cache_clear()


def check_threads_left_alone():
    import torch
    before = torch.get_num_threads()
    assert not device.threads_settable()
    with device.cpu_threads(before + 1):
        assert torch.get_num_threads() == before
    assert torch.get_num_threads() == before


def test_no_rtld_noload_sets_nothing(fresh_setters, monkeypatch):
    """Windows has no RTLD_NOLOAD: a plain load could bring in a second OpenMP runtime."""
    monkeypatch.delattr(os, "RTLD_NOLOAD", raising=False)
    monkeypatch.setattr(device.ctypes, "CDLL", lambda *a, **k: pytest.fail("a library was loaded"))
    check_threads_left_alone()


def test_no_gnu_openmp_sets_nothing(fresh_setters, monkeypatch):
    """macOS and conda builds: no libgomp.so.1 beside PyTorch."""
    def missing(name, *args, **kwargs):
        raise OSError(f"{name}: cannot open shared object file")
    monkeypatch.setattr(device.ctypes, "CDLL", missing)
    check_threads_left_alone()
