"""The recurrence a run uses, picked in one place.

    kernel = select(config, device)                        # the fastest here, e.g. Kernel("avx512-fp32")
    kernel = select(config, device, name="avx2-fp32")      # forced: an AVX-512 machine measures the AVX2 one
    kernel = select(config, device, precision="fp32")      # the fastest fp32 one
    choices(config, device)                                # every name, with why it cannot run here

A model runs its tanh layers through `model.kernel` (charrnn/models.py); the Trainer, the
checkpoint loader and build_model set it from select(). The names:

    reference     the book's loop over one-hot inputs (scratch), torch.nn's own layer (rnn, gru, lstm)
    torch-fp32    the fused layer: one autograd op, a torch matmul per step (fused.py)
    avx512-fp32   the C loops of fp32_tanh.c on a team of threads, AVX-512 (fp32.py); the team
                  also runs the weight gradient and the output layer (run_threads)
    avx2-fp32     the same, built for AVX2 + FMA
    generic-fp32  the same C loops, built for any CPU (the compiler's default vectors); torch's matmuls
    amx-bf16      the bf16 loops of bf16_tanh.c, step matmuls on AMX tiles (bf16.py)
    mkl-bf16      the bf16 loops with MKL's bf16 matmul (CPUs with AVX512-BF16 but no AMX)
    cudnn         on a GPU: cuDNN's RNN (for scratch, on the model's own weights)

The fused and C kernels cover the tanh RNNs (scratch, and rnn without bidirectional layers); GRU,
LSTM and bidirectional layers always run torch.nn's layer. bf16 kernels train in bf16 only: in
evaluation and generation a model runs `kernel.inference`, the fastest fp32 kernel.
"""
from __future__ import annotations

import functools
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..device import cpu_threads, default_threads
from ..errors import UserError
from . import bf16, bf16gemm, fp32
from .fused import cudnn_tanh_layer, linear_head, tanh_rnn_layer

# best first, for the fused tanh RNNs on a CPU, by the measurements in docs/performance.md
CPU_ORDER = ("amx-bf16", "avx512-fp32", "avx2-fp32", "mkl-bf16", "generic-fp32", "torch-fp32", "reference")
NAMES = ("reference", "torch-fp32", "avx512-fp32", "avx2-fp32", "generic-fp32", "amx-bf16", "mkl-bf16", "cudnn")
C_FP32 = ("avx512-fp32", "avx2-fp32", "generic-fp32")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class Kernel:
    """One way to run a model's tanh layers. `layer(X, W_in, b, H0, W) -> Hs (steps, batch, h)`
    for the fused kernels (X: ids (steps, batch) or features (steps, batch, in); W_in (in, h);
    W (h, h) used as H @ W); None for `reference` and for torch.nn's layer on a GPU. `head`:
    how the output layer runs with it (bf16 tiles, the C team), None: torch's linear."""
    name: str
    precision: str = "fp32"                      # the step matmuls while training
    layer: Callable | None = field(default=None, compare=False, repr=False)
    inference: Kernel | None = field(default=None, compare=False, repr=False)  # None: itself
    # the output layer, head(Hs, W, b) -> (tokens, vocab) with W (h, vocab) (nn.Linear's weight.t());
    # None: torch's linear
    head: Callable | None = field(default=None, compare=False, repr=False)
    team: bool = False       # runs a minibatch's large matmuls on the C team (see run_threads)

    @property
    def fused(self) -> bool:
        return self.layer is not None

    def for_mode(self, training: bool) -> Kernel:
        """The kernel for a forward pass in this mode: bf16 kernels evaluate in fp32."""
        return self if training or self.inference is None else self.inference


REFERENCE = Kernel("reference")


_team = threading.local()        # .threads: the C loops' team for the calling thread's run (run_threads)


def _team_size() -> int:
    """The run's team (run_threads), else as many threads as torch's ops get on this thread."""
    return getattr(_team, "threads", 0) or default_threads()


def _c_fp32(name: str) -> Kernel:
    team = name in fp32.VECTOR_BUILDS
    return Kernel(name, "fp32",
                  lambda X, W_in, b, H0, W: fp32.tanh_rnn_layer_fp32(X, W_in, b, H0, W, variant=name, threads=_team_size()),
                  head=(lambda Hs, W, b: fp32.linear_fp32(Hs, W, b, variant=name, threads=_team_size())) if team else None,
                  team=team)


@contextmanager
def run_threads(kernel: Kernel, n: int):
    """Inside, a run on `kernel` in the calling thread uses `n` CPU threads (0: one per core);
    the process's other threads keep theirs.

    A kernel with a team (the C fp32 builds with vectors) runs its step loops and every large
    matmul of a minibatch on a team of n threads and the torch ops around them on one thread:
    after each parallel op, torch's OpenMP threads spin for milliseconds waiting for the next
    one, on the very cores the team then needs, and the ops left (lookups, loss, update) are
    small. Other kernels run torch's ops on n threads."""
    if not kernel.team:
        with cpu_threads(n):
            yield
        return
    before = getattr(_team, "threads", 0)
    _team.threads = n or default_threads()
    try:
        with cpu_threads(1):
            yield
    finally:
        _team.threads = before


def _why_not(name: str, config, device: torch.device) -> str | None:
    """Why kernel `name` cannot run `config` on `device`, or None when it can."""
    tanh = config.kind == "scratch" or (config.kind == "rnn" and not config.bidirectional)
    if name == "reference":
        return None
    if name == "cudnn":
        return None if device.type == "cuda" else "cuDNN runs on a CUDA GPU only"
    if not tanh:
        return ("it covers the tanh RNNs (scratch, and rnn without bidirectional layers); "
                f"{config.kind}{' (bidirectional)' if config.bidirectional else ''} runs torch.nn's layer")
    if name == "torch-fp32":                     # torch ops: any device (on CUDA, cuDNN comes first)
        return None
    if device.type != "cpu":
        return f"it runs on the CPU, not on {device.type}"
    if name in C_FP32:
        return fp32.load(name)[1] or None
    if not bf16gemm.available():                 # amx-bf16, mkl-bf16
        return ("this machine has no fast bf16 matmul (it needs PyTorch with MKL on an x86 CPU "
                "with AMX or AVX512-BF16)")
    loops = bf16.loops()
    has_tiles = loops is not None and loops._amx
    if name == "amx-bf16" and not has_tiles:
        return f"this CPU or build has no AMX tiles ({bf16.status()})"
    if name == "mkl-bf16" and has_tiles:
        return "this CPU has AMX tiles: amx-bf16 runs instead"
    return None


@functools.cache
def _kernel(name: str, kind: str, inference: Kernel | None) -> Kernel:
    if name in ("amx-bf16", "mkl-bf16"):
        return Kernel(name, "bf16", lambda X, W_in, b, H0, W: tanh_rnn_layer(X, W_in, b, H0, W, bf16=True),
                      inference, head=lambda Hs, W, b: linear_head(Hs, W, b, bf16=True))
    if name in C_FP32:
        return _c_fp32(name)
    if name == "torch-fp32":
        return Kernel(name, "fp32", tanh_rnn_layer)
    if name == "cudnn" and kind == "scratch":
        # cuDNN warns at every call that these weights are not one flat buffer and copies them: true
        # by design (they are the scratch model's own) and a small copy
        warnings.filterwarnings("ignore", message="RNN module weights are not part of single contiguous chunk",
                                module=r"charrnn\.kernels\.fused")
        return Kernel(name, "fp32", lambda X, W_in, b, H0, W: cudnn_tanh_layer(X, W_in, b, H0, W)[0])
    if name == "cudnn":
        return Kernel(name)                      # torch.nn's own layer, which runs cuDNN's on a GPU
    return REFERENCE


def _order(device: torch.device) -> tuple[str, ...]:
    """Every name, best first on `device`."""
    if device.type == "cuda":
        return ("cudnn", "reference") + tuple(n for n in CPU_ORDER if n != "reference")
    return CPU_ORDER + ("cudnn",)


def choices(config, device) -> dict[str, str | None]:
    """Every kernel name for `config` on `device`, best first, with why it cannot run (None: it can).
    Builds every C library that could run here, to know."""
    device = torch.device(device)
    return {name: _why_not(name, config, device) for name in _order(device)}


def select(config, device, precision: str = "auto", name: str = "auto") -> Kernel:
    """The kernel for a run of `config` (a ModelConfig) on `device`: `name`, or with "auto" the
    fastest that runs here in `precision` (auto: whichever is fastest). UserError with one
    sentence when the choice cannot run."""
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise UserError(f"Precision must be one of {', '.join(PRECISIONS)}, not {precision!r}.")
    if name != "auto" and name not in NAMES:
        raise UserError(f"Unknown kernel {name!r}; choose auto or one of {', '.join(NAMES)}.")
    if name == "auto":                           # the first that runs: later C libraries are not built
        name = next((n for n in _order(device) if precision in ("auto", _precision(n))
                     and _why_not(n, config, device) is None), None)
        if name is None:
            why = "bf16 training runs on the CPU only" if device.type != "cpu" else _why_not("amx-bf16", config, device)
            raise UserError(f"Precision bf16 is not available: {why}; choose fp32 or auto.")
    elif (why := _why_not(name, config, device)) is not None:
        raise UserError(f"Kernel {name} cannot run here: {why}.")
    elif precision != "auto" and _precision(name) != precision:
        raise UserError(f"Kernel {name} trains in {_precision(name)}, not {precision}; choose precision auto.")
    inference = select(config, device, "fp32") if _precision(name) == "bf16" else None
    return _kernel(name, config.kind, inference)


def _precision(name: str) -> str:
    return "bf16" if name.endswith("-bf16") else "fp32"


def app_threads(cores: int) -> int:
    """CPU threads for a run that the app starts while a browser may draw its page on the same
    cores, by measurement (docs/performance.md, "Training inside the app"). With AMX tiles the bf16
    loops train nearly as fast on one thread as on two, so the run leaves a core to the server and
    the browser. The C fp32 loops gain much more from a second thread, and a step
    whose thread loses its core to the browser is finished by the other, so they take every core."""
    from ..models import ModelConfig            # models imports this module
    best = select(ModelConfig("scratch"), "cpu")  # the book's scratch RNN: this machine's best kernel
    return max(1, cores - 1) if best.name == "amx-bf16" else max(1, cores)