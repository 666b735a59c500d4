"""One place that picks the device (cuda > mps > cpu, or the one asked for if it is there) and
sets how many CPU threads a run's ops use."""
from __future__ import annotations

import ctypes
import functools
import os
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import UserError

DEVICES = ("auto", "cpu", "cuda", "mps")


def available_devices() -> list[str]:
    """Devices this machine can run on, best first."""
    found = []
    if torch.cuda.is_available():
        found.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return found + ["cpu"]


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` gives the best available device; asking for one that is not there is an error."""
    if name == "auto":
        return torch.device(available_devices()[0])
    if name not in DEVICES:
        raise UserError(f"Unknown device {name!r}; choose one of {', '.join(DEVICES)}.")
    if name not in available_devices():
        raise UserError(f"Device {name} is not available on this machine "
                         f"(available: {', '.join(available_devices())}).")
    return torch.device(name)


# -----------------------------------------------------------------------------
# CPU threads, per calling thread

@functools.cache
def _thread_setters():
    """(omp_set_num_threads, MKL's per-thread setter) of the libraries PyTorch loaded, or None.

    torch.set_num_threads would change the count every thread starts from, so a run in a
    background thread would change what the app's other threads (and later runs) get. OpenMP's
    count and MKL's local count are the calling thread's own: ATen's parallel ops read the former
    (omp_get_max_threads), MKL the latter."""
    # RTLD_NOLOAD: only the copies PyTorch already loaded, never a second OpenMP runtime. Where
    # there is no such flag (Windows) a lookup could load one, so the counts are left alone.
    noload = getattr(os, "RTLD_NOLOAD", None)
    if noload is None:
        return None
    lib = Path(torch.__file__).parent / "lib"
    try:
        omp = ctypes.CDLL(str(lib / "libgomp.so.1"), mode=noload).omp_set_num_threads
        mkl = ctypes.CDLL(str(lib / "libtorch_cpu.so"), mode=noload).MKL_Set_Num_Threads_Local  # C API, by value
    except (OSError, AttributeError):      # a build without GNU OpenMP or MKL (conda's, macOS, ARM)
        return None
    omp.argtypes = mkl.argtypes = [ctypes.c_int]
    omp.restype, mkl.restype = None, ctypes.c_int
    return omp, mkl


def threads_settable() -> bool:
    """Whether a run's CPU threads can be set apart from the rest of the process here."""
    return _thread_setters() is not None


def default_threads() -> int:
    """The CPU threads PyTorch gives a thread that has not set its own: one per core it uses."""
    return torch.get_num_threads()


@contextmanager
def cpu_threads(n: int):
    """Inside, the calling thread's CPU ops run on `n` threads (0: leave the count as it is);
    other threads keep theirs. Where PyTorch has no GNU OpenMP and MKL (conda, macOS, Windows and
    ARM builds; `threads_settable()` says) it changes nothing."""
    setters = _thread_setters() if n > 0 else None
    if setters is None:
        yield
        return
    omp, mkl = setters
    before = torch.get_num_threads()  # also runs ATen's once-per-thread setup, which would undo ours
    omp(n)
    mkl_before = mkl(n)               # 0: this thread had no count of its own
    try:
        yield
    finally:
        omp(before)
        mkl(mkl_before)
