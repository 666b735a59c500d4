"""Platforms the tests do not run on, faked: what the native build, the CPU-thread setters and the
benchmark's memory measurement do on macOS, Windows and ARM machines. (The device without
float64 is faked in tests/test_generate.py.)"""
import os
import sys
import types

import pytest

from charrnn import bench, device
from charrnn.kernels import bf16 as native, build


# -----------------------------------------------------------------------------
# the bf16 C loops (charrnn/kernels/bf16.py): skipped cleanly, and `status()` says why

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
    monkeypatch.setattr(build.shutil, "which", refuse)
    monkeypatch.setattr(build.subprocess, "run", refuse)


@pytest.fixture
def linux_x86(monkeypatch):
    """A Linux x86-64 machine where bf16 runs, whatever this one is."""
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(build.platform, "machine", lambda: "x86_64")
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
    monkeypatch.setattr(build.platform, "machine", lambda: machine)
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
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
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


def test_status_names_the_library_it_loaded(fresh_native):
    """Where the loops load (tests/test_bf16.py says where they must), the status names the file."""
    loops = native.loops()
    status = native.status()
    if loops is None:
        assert status.startswith("Python loops: "), status
    else:
        assert status.startswith("C loops (") and "bf16_tanh-" in status and ".so" in status, status


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


# -----------------------------------------------------------------------------
# the benchmark's children (charrnn/bench.py): peak memory per OS, and failures as BenchError

def fake_psutil(peak_bytes: int) -> types.ModuleType:
    """psutil as Windows has it: memory_info() with the peak working set."""
    module = types.ModuleType("psutil")
    module.Error = type("Error", (Exception,), {})
    class Process:
        def __init__(self, pid):
            self.pid = pid
        def memory_info(self):
            return types.SimpleNamespace(rss=peak_bytes // 2, peak_wset=peak_bytes)
    module.Process = Process
    return module


@pytest.fixture
def windows(monkeypatch):
    """No os.wait4 (nor resource), as on Windows."""
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.delattr(os, "wait4", raising=False)
    monkeypatch.setitem(sys.modules, "resource", None)     # import resource: ImportError


def test_memory_method_per_platform(monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    assert bench.peak_memory_method() == "proc"
    monkeypatch.setattr(sys, "platform", "darwin")
    if hasattr(os, "wait4"):
        assert bench.peak_memory_method() == "wait4"
    monkeypatch.delattr(os, "wait4", raising=False)
    monkeypatch.setitem(sys.modules, "psutil", fake_psutil(0))
    assert bench.peak_memory_method() == "psutil"
    monkeypatch.setitem(sys.modules, "psutil", None)       # not installed
    assert bench.peak_memory_method() is None


@pytest.mark.parametrize("platform, maxrss", [("linux", 300 * 1024), ("freebsd14", 300 * 1024),
                                              ("darwin", 300 * 2**20)])
def test_maxrss_units(platform, maxrss):
    """ru_maxrss: KiB on Linux and the BSDs, bytes on macOS."""
    assert bench.maxrss_mb(maxrss, platform) == 300


# holds its 300 MiB for a second, as a training run holds its memory: the reading on Linux is
# polled while the child runs
CHILD_300_MB = [sys.executable, "-c",
                "import time; data = b'x' * (300 << 20); time.sleep(1); print('{\"tokens_per_s\": 1}')"]


@pytest.mark.skipif(bench.peak_memory_method() is None, reason="no way to measure a child's memory here")
def test_a_childs_peak_memory_here():
    """Measured for real, in this OS's units: a child that fills 300 MiB reports about that, however
    much memory this process holds (a forked copy of it must not count)."""
    result = bench.run_child(CHILD_300_MB)
    assert result["tokens_per_s"] == 1
    assert 300 <= result["peak_rss_mb"] < 450, result


def test_a_childs_peak_memory_on_windows(windows, monkeypatch):
    monkeypatch.setitem(sys.modules, "psutil", fake_psutil(123 << 20))
    assert bench.run_child(CHILD_300_MB)["peak_rss_mb"] == 123


def test_no_peak_memory_without_psutil(windows, monkeypatch):
    monkeypatch.setitem(sys.modules, "psutil", None)
    result = bench.run_child(CHILD_300_MB)
    assert result["tokens_per_s"] == 1 and result["peak_rss_mb"] is None


def bench_error(cmd) -> tuple[str, str]:
    """(the BenchError's message, the log it names); the log is removed."""
    with pytest.raises(bench.BenchError) as caught:
        bench.run_child(cmd)
    message = str(caught.value)
    log = message.rsplit(" is in ", 1)[1].rstrip(".")
    try:
        with open(log) as f:
            return message, f.read()
    finally:
        os.remove(log)


def test_a_failed_child_is_one_readable_line_with_a_log():
    script = ("import sys; print('partial'); print('Traceback (most recent call last):', file=sys.stderr); "
              "print('  File x, line 1', file=sys.stderr); print('ValueError: no corpus', file=sys.stderr); "
              "sys.exit(3)")
    message, log = bench_error([sys.executable, "-c", script])
    assert issubclass(bench.BenchError, RuntimeError)
    assert "\n" not in message
    assert "ended with exit status 3: ValueError: no corpus; its full output is in " in message, message
    assert "Traceback (most recent call last):" in log and "ValueError: no corpus" in log and "partial" in log


def test_a_child_without_a_json_result_is_a_bench_error():
    message, log = bench_error([sys.executable, "-c", "print('done, no JSON')"])
    assert "printed no JSON result" in message and "with no error output" in message
    assert "done, no JSON" in log


@pytest.mark.skipif(os.name != "posix", reason="signals")
def test_a_killed_child_says_so():
    message, _ = bench_error([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    assert "was killed by signal 9" in message


@pytest.fixture
def fresh_fp32():
    from charrnn.kernels import fp32
    fp32._load.cache_clear(), fp32._best.cache_clear()
    yield fp32
    fp32._load.cache_clear(), fp32._best.cache_clear()


@pytest.mark.parametrize("name", ["darwin", "win32"])
def test_fp32_kernels_are_skipped_cleanly_off_linux(fresh_fp32, fresh_native, no_compiler_runs, monkeypatch, name):
    """No compiler runs, nothing raises, the selector falls back to the torch op and says why."""
    from charrnn import kernels
    from charrnn.models import ModelConfig
    monkeypatch.setattr(sys, "platform", name)
    monkeypatch.delattr(os, "getuid", raising=False)        # as on Windows
    for variant in ("avx2-fp32", "generic-fp32"):
        kernel, why = fresh_fp32.load(variant)
        assert kernel is None and f"on Linux only, not {name}" in why
    config = ModelConfig("scratch", 28, 16)
    assert kernels.select(config, "cpu", "fp32").name == "torch-fp32"
    assert "Linux only" in kernels.choices(config, "cpu")["generic-fp32"]
