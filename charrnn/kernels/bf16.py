"""The bf16 recurrence's step loops in C (charrnn/kernels/bf16_tanh.c), built on first use.

    loops = bf16.loops()            # None where it cannot be built: the Python loops run instead
    loops.forward(A, Hb, Wb)        # A[t] += Hb[t] @ Wb; A[t] = tanh(A[t]); Hb[t+1] = bf16(A[t])
    loops.forward(A, Hb, Wb, ids, table)  # the same, with A[t] = table[ids[t]] first
    loops.backward(dH, dA, H, dAb, Wb)  # dA[t] = (dH[t] + dAb[t+1] @ Wb^T) * (1 - H[t]^2); dAb[t] = bf16(dA[t])
    if loops.head_fits(tokens, h, vocab):    # the output layer on AMX tiles, in bf16
        Y, Hb = loops.head_forward(H, W, b)      # Y = bf16(H) @ bf16(W) + b
        dH, dW, db = loops.head_backward(dY, Hb, W)

The C file has no dependencies: it calls MKL's bf16 matmul through the function pointer that
charrnn.kernels.bf16gemm finds, so the system's C compiler (cc, or $CC) builds it in a fraction of a
second (charrnn/kernels/build.py: where it goes, when it is rebuilt). No compiler, a failed
build, or CHARRNN_NATIVE=0: `loops()` is None and the Python loops run.

Only Linux on x86-64 builds them, decided before any compiler runs: the flags are x86 ones
(-mprefer-vector-width), the library is an ELF shared object, and the matmul it calls is MKL's,
which PyTorch ships for x86 Linux. `status()` says in one line which loops run and why.
"""
from __future__ import annotations

import ctypes
import functools
import platform

import torch

from . import bf16gemm, build

# -ffast-math lets GCC call glibc's vector tanhf (16 floats at a time); NaN and inf still pass
# through tanhf and the products (tests/test_bf16.py), so divergence is still seen. It is given to
# the compile step only: linked with -ffast-math, a shared library gets GCC's crtfastmath.o, whose
# constructor would switch the loading thread to flush-to-zero for every later op.
COMPILE = ["-O3", "-march=native", "-ffast-math", "-mprefer-vector-width=512", "-fopenmp-simd", "-fPIC"]


def _expect(what: str, tensors: dict) -> None:
    """ValueError unless every tensor in {name: (x, dtype, shape)} is a contiguous CPU tensor of
    that dtype and shape: what C may take a raw pointer to."""
    for name, (x, dtype, shape) in tensors.items():
        if x.dtype != dtype or x.device.type != "cpu" or not x.is_contiguous() or tuple(x.shape) != shape:
            raise ValueError(f"{what}: {name} must be a contiguous {dtype} CPU tensor of shape "
                             f"{shape}, not {x.dtype} {tuple(x.shape)}.")


class Loops:
    """The C functions, with the checks that keep raw pointers safe."""

    def __init__(self, lib: ctypes.CDLL, gemm_address: int):
        self._gemm = gemm_address
        i, p = ctypes.c_int, ctypes.c_void_p
        lib.forward.argtypes = [p, i, i, p, i, i, i, p, p, p, p, i]
        lib.backward.argtypes = [p, i, i, p, i, i, i, p, p, p, p, p, p, i]
        lib.step_matmuls.argtypes = [p, i, i, p, i, i, p, p, i]
        lib.step_matmuls.restype = None
        lib.forward.restype = lib.backward.restype = i
        l = ctypes.c_long
        lib.head_ready.argtypes = []
        lib.head_forward.argtypes = [i, i, i, p, l, l, p, p, p, p]
        lib.head_backward.argtypes = [i, i, i, p, l, l, p, p, p, p, p]
        lib.head_ready.restype = lib.head_forward.restype = lib.head_backward.restype = i
        self._lib = lib
        self._amx = lib.head_ready() == 1     # asks Linux for the tile state once, for the process

    def step_matmuls(self, A: torch.Tensor, C: torch.Tensor, W: torch.Tensor, reps: int) -> None:
        """`reps` times C += A @ W, as the loops run their step matmul (to measure its rate)."""
        batch, h = A.shape
        self._check(1, batch, h, A=(A.unsqueeze(0), torch.bfloat16, 1), C=(C.unsqueeze(0), torch.float32, 1))
        op, ld = self._weight(W, False, h)
        self._lib.step_matmuls(self._gemm, op, ld, W.data_ptr(), batch, h, A.data_ptr(), C.data_ptr(), reps)

    @staticmethod
    def _check(steps: int, batch: int, h: int, **tensors) -> None:
        if batch * h >= 2**31 or steps >= 2**31:
            raise ValueError("native loops: batch * hidden size and steps must stay below 2**31.")
        _expect("native loops", {name: (x, dtype, (first, batch, h)) for name, (x, dtype, first) in tensors.items()})

    @staticmethod
    def _weight(W: torch.Tensor, transpose: bool, h: int) -> tuple[int, int]:
        """CBLAS op and leading dimension for op(W) with W a bf16 (h, h) row- or column-major matrix."""
        if tuple(W.shape) != (h, h):
            raise ValueError(f"native loops: W must be ({h}, {h}), not {tuple(W.shape)}.")
        return bf16gemm.operand(W, transpose, "W")

    def forward(self, A: torch.Tensor, Hb: torch.Tensor, W: torch.Tensor,
                ids: torch.Tensor | None = None, table: torch.Tensor | None = None) -> None:
        """With ids (steps, batch) int64 and table (vocab, h) fp32, A's contents are not read:
        step t starts from the rows table[ids[t]] (a lookup done step by step, in cache)."""
        steps, batch, h = A.shape
        self._check(steps, batch, h, A=(A, torch.float32, steps), Hb=(Hb, torch.bfloat16, steps + 1))
        op, ld = self._weight(W, False, h)
        lookup, vocab = (None, None), 0
        if ids is not None or table is not None:
            self._ids(ids, steps, batch)
            vocab = self._table("table", table, h)
            lookup = (ids.data_ptr(), table.data_ptr())
        if self._lib.forward(self._gemm, op, ld, W.data_ptr(), steps, batch, h, A.data_ptr(), Hb.data_ptr(),
                             *lookup, vocab) != 0:
            raise IndexError(f"native loops: a token id outside 0 .. {vocab - 1}.")

    def backward(self, dH: torch.Tensor, dA: torch.Tensor, H: torch.Tensor, dAb: torch.Tensor,
                 W: torch.Tensor, ids: torch.Tensor | None = None, G: torch.Tensor | None = None) -> None:
        """With ids (steps, batch) int64 and G (vocab + 1, h) fp32 zeros, also G[ids[t][i]] += dA[t][i]
        and G[vocab] += dA[t][i]: the gradients of the forward's lookup table and of b."""
        steps, batch, h = dA.shape
        self._check(steps, batch, h, dH=(dH, torch.float32, steps), dA=(dA, torch.float32, steps),
                    H=(H, torch.float32, steps), dAb=(dAb, torch.bfloat16, steps))
        op, ld = self._weight(W, True, h)
        scatter, vocab = (None, None), 0
        if ids is not None or G is not None:
            self._ids(ids, steps, batch)
            vocab = self._table("G", G, h) - 1
            scatter = (ids.data_ptr(), G.data_ptr())
        if self._lib.backward(self._gemm, op, ld, W.data_ptr(), steps, batch, h, dH.data_ptr(), dA.data_ptr(),
                              H.data_ptr(), dAb.data_ptr(), *scatter, vocab) != 0:
            raise IndexError(f"native loops: a token id outside 0 .. {vocab - 1}.")

    @staticmethod
    def _table(name: str, x: torch.Tensor | None, h: int) -> int:
        """The number of rows of `x`, a contiguous fp32 CPU (rows, h) table that C may index with
        32-bit row numbers; ValueError if it is not one."""
        if (x is None or x.dim() != 2 or x.dtype != torch.float32 or x.device.type != "cpu"
                or not x.is_contiguous() or x.shape[1] != h or not 2 <= x.shape[0] < 2**31 // max(h, 1)):
            got = "None" if x is None else f"{x.dtype} {tuple(x.shape)} on {x.device.type}"
            raise ValueError(f"native loops: {name} must be a contiguous float32 CPU tensor of shape "
                             f"(rows, {h}) with at least 2 rows, not {got}.")
        return x.shape[0]

    @staticmethod
    def _ids(ids: torch.Tensor | None, steps: int, batch: int) -> None:
        if (ids is None or ids.dtype != torch.long or ids.device.type != "cpu" or not ids.is_contiguous()
                or tuple(ids.shape) != (steps, batch)):
            got = "None" if ids is None else f"{ids.dtype} {tuple(ids.shape)}"
            raise ValueError(f"native loops: ids must be a contiguous int64 CPU tensor of shape "
                             f"{(steps, batch)}, not {got}.")

    # ---- the output layer (bf16_tanh.c, "the output layer on AMX tiles") ----

    def head_fits(self, tokens: int, h: int, vocab: int) -> bool:
        """Whether head_forward/head_backward run here for these sizes: AMX tiles, whole tiles of
        tokens and hidden units (vocab is padded), and every buffer's size in 32-bit integers."""
        padded = -(-vocab // 32) * 32
        return (self._amx and tokens > 0 and h > 0 and vocab > 0 and tokens % 32 == 0 and h % 32 == 0
                and tokens * max(h, padded) < 2**31 and h * padded < 2**31)

    def _head_check(self, tokens: int, h: int, W: torch.Tensor, **tensors) -> tuple[int, int]:
        """Checks the head's operands; returns W's element strides (sk, sj) for the C code."""
        if W.dim() != 2 or W.shape[0] != h:
            raise ValueError(f"native head: W must be ({h}, vocab), not {tuple(W.shape)}.")
        vocab = W.shape[1]
        if not self.head_fits(tokens, h, vocab):
            raise ValueError(f"native head: {tokens} tokens, hidden {h}, vocab {vocab} do not fit the "
                             "AMX tiles here (see head_fits).")
        _expect("native head", tensors)
        ld, column_major = bf16gemm._matrix(W, torch.float32, "W")   # dtype, device, layout
        return (1, ld) if column_major else (ld, 1)

    def head_forward(self, H: torch.Tensor, W: torch.Tensor, b: torch.Tensor,
                     Hb: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(Y, Hb): Y = Hb @ bf16(W) + b, fp32 (tokens, vocab), with Hb = bf16(H) (tokens, h),
        made here unless the caller has it. H: fp32 (tokens, h); W: fp32 (h, vocab), row- or
        column-major; b: (vocab,)."""
        tokens, h = H.shape
        given = Hb is not None
        if not given:
            Hb = torch.empty(tokens, h, dtype=torch.bfloat16)
        sk, sj = self._head_check(tokens, h, W, H=(H, torch.float32, (tokens, h)),
                                  b=(b, torch.float32, (W.shape[1],)), Hb=(Hb, torch.bfloat16, (tokens, h)))
        Y = H.new_empty(tokens, W.shape[1])
        self._status(self._lib.head_forward(tokens, h, W.shape[1], W.data_ptr(), sk, sj, b.data_ptr(),
                                            None if given else H.data_ptr(), Hb.data_ptr(), Y.data_ptr()))
        return Y, Hb

    def head_backward(self, dY: torch.Tensor, Hb: torch.Tensor, W: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(dH, dW, db) for head_forward's Y, in fp32; dW has W's layout."""
        tokens, h = Hb.shape
        vocab = W.shape[1] if W.dim() == 2 else -1
        sk, sj = self._head_check(tokens, h, W, dY=(dY, torch.float32, (tokens, vocab)),
                                  Hb=(Hb, torch.bfloat16, (tokens, h)))
        dH, db = dY.new_empty(tokens, h), dY.new_empty(vocab)
        dW = torch.empty_strided(W.shape, W.stride(), dtype=torch.float32)  # W's layout: sk, sj fit it
        self._status(self._lib.head_backward(tokens, h, vocab, W.data_ptr(), sk, sj, dY.data_ptr(),
                                             Hb.data_ptr(), dH.data_ptr(), dW.data_ptr(), db.data_ptr()))
        return dH, dW, db

    @staticmethod
    def _status(code: int) -> None:
        if code == -1:
            raise MemoryError("native head: out of memory for its packed operands.")
        if code == -2:
            raise RuntimeError("native head: this CPU or process cannot use AMX tiles.")
        if code != 0:
            raise RuntimeError(f"native head: failed ({code}).")


def _unsupported() -> str | None:
    """Why this platform cannot build or load the loops at all, or None if it may: decided
    without running a compiler."""
    reason = build.unsupported()
    if reason is not None:
        return reason
    if not build.is_x86():
        return f"the C loops are built for x86-64 CPUs only, not {platform.machine() or 'this one'}"
    if not bf16gemm.available():
        return "bf16 does not run here (it needs MKL's bf16 matmul in PyTorch and a CPU with bf16 units)"
    return None


@functools.cache
def _load() -> tuple[Loops | None, str]:
    """(the loops or None, the status line): one attempt per process, shared by both."""
    reason = _unsupported()
    if reason is not None:
        return None, f"Python loops: {reason}"
    gemm = ctypes.cast(bf16gemm._cblas_gemm_bf16(), ctypes.c_void_p).value
    try:
        found, path = build.load("bf16_tanh", COMPILE, ["-lm"], wrap=lambda lib: Loops(lib, gemm))
    except build.BuildError as e:
        return None, f"Python loops: {e}"
    tiles = "AMX tiles" if found._amx else "no AMX tiles"
    return found, f"C loops ({build.shown(path)}; {tiles})"


def loops() -> Loops | None:
    """The C loops, built if need be; None where they cannot be (see the module docstring)."""
    return _load()[0]


def status() -> str:
    """Which step loops the bf16 recurrence runs here, and why, in one line: "C loops (build/...)"
    or "Python loops: <reason>". Builds the loops if that has not been tried yet."""
    return _load()[1]


loops.cache_clear = _load.cache_clear    # one cache behind loops() and status(); tests reset it
