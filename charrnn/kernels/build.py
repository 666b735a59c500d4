"""Building this package's C files on first use, with the system's C compiler.

    lib, path = build.load("fp32_tanh", ["-O3", ...], libs=["-lm"])   # BuildError(reason) if it cannot

A library goes to build/ beside the package (CHARRNN_BUILD moves it; if that cannot be written, a
private folder in the temporary directory), named after a hash of the source, the flags, the
compiler and the CPU, so a changed file or another machine builds afresh. Only Linux builds:
the libraries are ELF shared objects loaded with ctypes, and the flags are GCC's and Clang's.
Where a library cannot be had (not Linux, CHARRNN_NATIVE=0, no compiler, a failed build) the
reason is one line, and the caller runs its Python path instead.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILD_DIR = HERE.parents[1] / "build"
LINK = ["-shared"]


class BuildError(RuntimeError):
    """No library: the message says why in a few words, for a status line."""


def unsupported() -> str | None:
    """Why no C file can be built or loaded here at all, or None: decided without a compiler."""
    if os.environ.get("CHARRNN_NATIVE") == "0":
        return "CHARRNN_NATIVE=0"
    if not sys.platform.startswith("linux"):
        return f"the C loops are built on Linux only, not {sys.platform}"
    return None


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def compiler() -> list[str]:
    """The C compiler's command ($CC may be "ccache gcc"); BuildError if there is none."""
    cc = shlex.split(os.environ.get("CC") or "cc")
    if not cc or shutil.which(cc[0]) is None:
        missing = f"{cc[0]} is not on the PATH" if cc else "CC is blank"
        raise BuildError(f"no C compiler found ({missing}; set CC)")
    return cc


@dataclass(frozen=True)
class CPUInfo:
    model: str                   # "AMD EPYC", "Intel(R) Xeon(R) ...", or the platform's word for it
    flags: frozenset | None      # the kernel's feature flags (avx2, avx512f, amx_bf16, ...); None: unknown
    mhz: float | None            # the reported clock (a VM may report it without boost)

    def summary(self) -> str:
        """The model and the features the kernels choose by, for figures that name their CPU."""
        shown = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in (self.flags or ())]
        return f"{self.model} ({', '.join(shown) or 'no AVX2'})"


@functools.cache
def cpu_info() -> CPUInfo:
    """What /proc/cpuinfo (Linux) says of the first CPU; model and machine elsewhere."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    mhz = fields.get("cpu MHz")
    return CPUInfo(model=fields.get("model name") or platform.processor() or platform.machine() or "cpu",
                   flags=frozenset(fields["flags"].split()) if "flags" in fields else None,
                   mhz=float(mhz) if mhz else None)


def _cpu_fingerprint() -> str:
    return " ".join(sorted(cpu_info().flags or ())) + platform.machine()


def build_dirs() -> list[Path]:
    """build/ (or CHARRNN_BUILD), then a folder in the temporary directory that only this user
    can write: a library is loaded and run from there, so a folder someone else made is skipped."""
    dirs = [Path(os.environ.get("CHARRNN_BUILD") or BUILD_DIR)]
    if not hasattr(os, "getuid"):          # no owner to check: no shared-folder fallback
        return dirs
    private = Path(tempfile.gettempdir()) / f"charrnn-build-{os.getuid()}"
    try:
        private.mkdir(mode=0o700, exist_ok=True)
        info = private.lstat()
        if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o022:
            dirs.append(private)
    except OSError:
        pass
    return dirs


def _first_error(err: subprocess.CalledProcessError) -> str:
    """The compiler's first error line (GCC and Clang start theirs with a location, then
    "error:"), else its first line, else the exit status."""
    output = err.stderr.decode(errors="replace") if isinstance(err.stderr, bytes) else (err.stderr or "")
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    first = lines[0] if lines else f"exit status {err.returncode}"
    return next((line for line in lines if "error" in line.lower()), first)


def _compile(cc: list[str], stem: str, flags: list[str], libs: list[str], out_dir: Path) -> Path:
    source = HERE / f"{stem}.c"
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha1("\0".join([source.read_text(), *flags, *LINK, *libs, version,
                                  _cpu_fingerprint()]).encode()).hexdigest()[:16]
    path = out_dir / f"{stem}-{key}.so"
    if not path.exists():
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=f".{stem}-") as tmp:
            obj, lib = Path(tmp) / f"{stem}.o", Path(tmp) / f"{stem}.so"
            subprocess.run([*cc, *flags, "-c", str(source), "-o", str(obj)], check=True, capture_output=True, timeout=120)
            subprocess.run([*cc, *LINK, str(obj), "-o", str(lib), *libs], check=True, capture_output=True, timeout=120)
            lib.chmod(0o755)
            os.replace(lib, path)                 # atomic: a concurrent build never sees half a file
    return path


def shown(path: Path) -> str:
    """A library's path, relative to the project when it is inside it."""
    try:
        return str(path.relative_to(BUILD_DIR.parent))
    except ValueError:
        return str(path)


def load(stem: str, flags: list[str], libs: list[str] = ("-lm",), wrap=lambda lib: lib) -> tuple[object, Path]:
    """(wrap(lib), its path) for charrnn/kernels/STEM.c compiled with `flags` and linked with
    `libs`, loaded with every symbol resolved; `wrap` may raise AttributeError for a library
    without the functions it needs (the next build folder is tried). BuildError (one line) where
    it cannot be had."""
    reason = unsupported()
    if reason is not None:
        raise BuildError(reason)
    cc = compiler()
    reason = "no build folder could be written"
    for out_dir in build_dirs():
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            path = _compile(cc, stem, list(flags), list(libs), out_dir)
            return wrap(ctypes.CDLL(str(path), mode=os.RTLD_NOW)), path
        except subprocess.CalledProcessError as err:       # the same source fails in any folder
            raise BuildError(f"the build failed: {_first_error(err)}") from None
        except subprocess.TimeoutExpired:
            raise BuildError("the build timed out") from None
        except (OSError, AttributeError) as err:
            # not writable, or a library that does not load or lacks a function: the next place
            reason = (f"{out_dir} could not be used ({err.strerror or err})" if isinstance(err, OSError)
                      else f"the library lacks a function ({err})")
    raise BuildError(reason)
