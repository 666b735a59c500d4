"""The fp32 tanh RNN recurrence in C (charrnn/kernels/fp32_tanh.c), one build per instruction set.

    variants()                       # ["avx512-fp32", "avx2-fp32", "generic-fp32"]: what this CPU runs, best first
    kernel, why = load()             # the best variant's Loops, or (None, reason): never raises
    kernel, why = load("avx2-fp32")  # a given one (e.g. a lower one, to test it on a bigger CPU)
    kernel.forward(A, H0, W, threads, out)     # out[t] = tanh(A[t] + out[t-1] @ W), out[-1] = H0 (out=None: A)
    kernel.backward(dH, H, W, threads)         # (dA, dH0): dA[t] = (dH[t] + dA[t+1] @ W^T) * (1 - H[t]^2)
    kernel.gemm_tn(P, Q, threads)              # P^T Q: the weight gradient of a whole sequence
    kernel.matmul(P, M, bias, threads)         # P M + bias: the output layer's matmuls
    Hs = tanh_rnn_layer_fp32(X, W_in, b, H0, W, variant=None, threads=None)   # an autograd op
    Y = linear_fp32(Hs, W, b, variant=None, threads=None)                     # the output layer, one too
    loop = GenerationLoop(kernel, E, W, O, bo)  # batch-1 generation, greedy or sampled, in one C call

`TanhRNNFp32` has the interface and the gradients of charrnn.kernels.fused.TanhRNNLayer with
bf16=False: X holds token ids (steps, batch) or features (steps, batch, in), W is (h, h) used as H @ W, either
row-major (the scratch model's W_hh) or a transposed view (nn.RNN's W_hh.t()): the kernel reads it
through its strides and packs it once per call. The step loops run in C on a team of `threads`
threads (default: the CPUs this process may use); the weight gradient sum_t H_{t-1}^T dA_t is
one matmul on the same team (gemm_tn), W_in's and b's gradients one torch op each, as in
TanhRNNLayer. LinearFp32 runs the output layer's three matmuls on the team too. Only float32
CPU tensors: a selector should send anything else to TanhRNNLayer.

Each variant is the same C file compiled with its own -march (x86-64-v4 with 512-bit vectors,
x86-64-v3, or the compiler's default), built on first use (charrnn/kernels/build.py). Where a
variant cannot be built (not Linux, no compiler, not x86 for the x86 ones, CHARRNN_NATIVE=0)
`load` says why.
"""
from __future__ import annotations

import ctypes
import functools
import os
import platform

import torch

from . import build


# name: (compile flags, /proc/cpuinfo flags the CPU needs)
VARIANTS = {
    "avx512-fp32": (["-march=x86-64-v4", "-mtune=generic", "-mprefer-vector-width=512"],
                    {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx2", "fma", "bmi2"}),
    "avx2-fp32": (["-march=x86-64-v3", "-mtune=generic"],
                  {"avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe"}),
    "generic-fp32": ([], set()),
}
# no -ffast-math: the C file has its own vector tanh, and NaN must pass through it
COMPILE = ["-O3", "-fPIC"]
# the builds whose tiles run a minibatch's large matmuls (weight gradient, output layer) faster
# than a BLAS does (docs/performance.md); the generic build's tiles do not
VECTOR_BUILDS = ("avx512-fp32", "avx2-fp32")
LIBS = ["-lm", "-lpthread"]


def _cpu_flags() -> frozenset | None:
    return build.cpu_info().flags


def _supported(name: str) -> tuple[bool, str]:
    """Whether this CPU runs variant `name`, and if not why."""
    if name not in VARIANTS:
        return False, f"unknown variant {name!r} (known: {', '.join(VARIANTS)})"
    flags_needed = VARIANTS[name][1]
    if not flags_needed:
        return True, ""
    if not build.is_x86():
        return False, f"{name} needs an x86-64 CPU, this is {platform.machine()}"
    flags = _cpu_flags()
    if flags is not None:
        missing = sorted(flags_needed - flags)
        return (not missing), (f"this CPU lacks {', '.join(missing)}" if missing else "")
    # no /proc/cpuinfo: ask torch (which also checks that the OS saves the registers)
    capability = torch.backends.cpu.get_cpu_capability()
    ok = capability in (("AVX512",) if name.startswith("avx512") else ("AVX2", "AVX512"))
    return ok, "" if ok else f"torch reports CPU capability {capability}"


def variants() -> list[str]:
    """The variants this CPU can run, best first."""
    return [name for name in VARIANTS if _supported(name)[0]]


def default_threads() -> int:
    """The CPUs this process may run on (os.cpu_count() where the affinity is unknown)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


class Loops:
    """One variant's C functions, with the checks that keep raw pointers safe."""

    def __init__(self, name: str, lib: ctypes.CDLL):
        self.name, self._lib = name, lib
        i, p, l = ctypes.c_int, ctypes.c_void_p, ctypes.c_long
        lib.fp32_forward.argtypes = [i, i, i, p, p, p, p, l, l, i]
        lib.fp32_backward.argtypes = [i, i, i, p, p, p, p, p, l, l, i]
        lib.fp32_forward.restype = lib.fp32_backward.restype = i
        lib.fp32_matmul.argtypes = [i, i, i, p, l, p, l, l, p, p, l, i]
        lib.fp32_matmul.restype = i
        lib.fp32_gemm_tn.argtypes = [i, i, i, p, l, p, l, p, l, i]
        lib.fp32_gemm_tn.restype = i
        lib.fp32_tanh.argtypes, lib.fp32_tanh.restype = [p, l], None
        lib.fp32_helped.argtypes, lib.fp32_helped.restype = [], l
        lib.fp32_fma_peak.argtypes, lib.fp32_fma_peak.restype = [l], ctypes.c_double
        lib.fp32_gen_new.argtypes = [i, i, p, p, l, l, p, l, l, p]
        lib.fp32_gen_new.restype = p
        lib.fp32_gen_free.argtypes, lib.fp32_gen_free.restype = [p], None
        lib.fp32_gen_run.argtypes = [p, p, p, i, i, p, ctypes.c_double, i, p]
        lib.fp32_gen_run.restype = i
        for f in ("fp32_vector_width", "fp32_panel_width", "fp32_tile_rows"):
            getattr(lib, f).argtypes, getattr(lib, f).restype = [], i
        self.vector_width = lib.fp32_vector_width()     # floats per vector register
        self.panel_width = lib.fp32_panel_width()       # NR: columns per packed panel
        self.tile_rows = lib.fp32_tile_rows()           # MR: rows per micro-tile
        self.owns_matmuls = name in VECTOR_BUILDS

    def __repr__(self) -> str:
        return f"Loops({self.name}, {self.tile_rows}x{self.panel_width} tiles)"

    def tanh_(self, x: torch.Tensor) -> torch.Tensor:
        """x = tanh(x) in place with the kernel's own tanh (to measure its accuracy)."""
        self._check("tanh_", {"x": (x, tuple(x.shape))}, 1, 1, 1)
        self._lib.fp32_tanh(x.data_ptr(), x.numel())
        return x

    def fma_peak(self, reps: int = 2_000_000) -> float:
        """One thread's multiply-add rate in this variant's vectors, GFLOP/s (measured: ~reps x
        24 x 32 flops; the best of a few runs is the core's peak)."""
        return self._lib.fp32_fma_peak(reps)

    def helped(self) -> int:
        """How many units (a step's panel) a thread has finished for another that had claimed
        them but was slow (had lost its core), in this process so far."""
        return self._lib.fp32_helped()

    @staticmethod
    def _threads(threads: int | None) -> int:
        return max(1, int(threads if threads is not None else default_threads()))

    def _check(self, what: str, tensors: dict, steps: int, batch: int, h: int) -> None:
        # C counts a call's units (panels of every step) in 32 bits, and indexes a step in 64
        if batch * h >= 2**31 or (steps + 2) * -(-h // self.panel_width) >= 2**31:
            raise ValueError(f"fp32 kernel: sizes too large ({steps}, {batch}, {h}).")
        for name, (x, shape) in tensors.items():
            if (x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous()
                    or tuple(x.shape) != shape):
                raise ValueError(f"fp32 kernel {what}: {name} must be a contiguous float32 CPU tensor "
                                 f"of shape {shape}, not {x.dtype} {tuple(x.shape)} on {x.device.type}.")

    @staticmethod
    def _weight(W: torch.Tensor, h: int) -> tuple[int, int]:
        """W's element strides: any (h, h) float32 CPU tensor is read in place."""
        if W.dtype != torch.float32 or W.device.type != "cpu" or tuple(W.shape) != (h, h):
            raise ValueError(f"fp32 kernel: W must be a float32 CPU tensor of shape ({h}, {h}), "
                             f"not {W.dtype} {tuple(W.shape)} on {W.device.type}.")
        return W.stride(0), W.stride(1)

    def forward(self, A: torch.Tensor, H0: torch.Tensor, W: torch.Tensor, threads: int | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """H_t = tanh(A_t + H_{t-1} W), H_{-1} = H0, for A (steps, batch, h) holding x_t W_in + b:
        into `out` (steps, batch, h), or into A itself when out is None. Out of place, a step whose
        thread lost its core is finished by the others; in place it is waited for."""
        steps, batch, h = A.shape
        out = A if out is None else out
        self._check("forward", {"A": (A, (steps, batch, h)), "H0": (H0, (batch, h)),
                                "out": (out, (steps, batch, h))}, steps, batch, h)
        if out.data_ptr() != A.data_ptr() and A.numel() and _overlap(A, out):
            raise ValueError("fp32 kernel forward: out must be A itself or not overlap it.")
        sk, sj = self._weight(W, h)
        if self._lib.fp32_forward(steps, batch, h, A.data_ptr(), out.data_ptr(), H0.data_ptr(), W.data_ptr(),
                                  sk, sj, self._threads(threads)) != 0:
            raise MemoryError("fp32 kernel: out of memory for the packed weights.")
        return out

    def backward(self, dH: torch.Tensor, H: torch.Tensor, W: torch.Tensor, threads: int | None = None,
                 dH0: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(dA, dH0) for the forward's H: dA_t = (dH_t + dA_{t+1} W^T) * (1 - H_t^2), dH0 = dA_0 W^T
        (None unless asked)."""
        steps, batch, h = H.shape
        self._check("backward", {"dH": (dH, (steps, batch, h)), "H": (H, (steps, batch, h))}, steps, batch, h)
        sk, sj = self._weight(W, h)
        dA = torch.empty_like(H)
        g0 = H.new_empty(batch, h) if dH0 else None
        if self._lib.fp32_backward(steps, batch, h, dH.data_ptr(), H.data_ptr(), dA.data_ptr(),
                                   None if g0 is None else g0.data_ptr(), W.data_ptr(), sk, sj,
                                   self._threads(threads)) != 0:
            raise MemoryError("fp32 kernel: out of memory for the packed weights.")
        return dA, g0

    @staticmethod
    def _rows(what: str, x: torch.Tensor, rows: int) -> None:
        """x must be a float32 CPU matrix of `rows` rows, each contiguous."""
        if (x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 2 or x.shape[0] != rows
                or (x.shape[1] > 1 and x.stride(1) != 1) or max(x.shape) >= 2**31):
            raise ValueError(f"fp32 kernel {what} must be a float32 CPU matrix with contiguous rows "
                             f"and {rows} of them, not {x.dtype} {tuple(x.shape)} on {x.device.type}.")

    def gemm_tn(self, P: torch.Tensor, Q: torch.Tensor, threads: int | None = None) -> torch.Tensor:
        """P^T Q (h, n) for P (K, h) and Q (K, n), float32 CPU tensors with contiguous rows, on
        the team: the weight gradient of a whole sequence as one matmul."""
        K = P.shape[0] if P.dim() == 2 else -1
        self._rows("gemm_tn: P", P, K)
        self._rows("gemm_tn: Q", Q, K)
        h, n = P.shape[1], Q.shape[1]
        C = P.new_empty(h, n)
        if self._lib.fp32_gemm_tn(K, h, n, P.data_ptr(), P.stride(0), Q.data_ptr(), Q.stride(0),
                                  C.data_ptr(), n, self._threads(threads)) != 0:
            raise MemoryError("fp32 kernel: out of memory for the weight gradient.")
        return C

    def matmul(self, P: torch.Tensor, M: torch.Tensor, bias: torch.Tensor | None = None,
               threads: int | None = None) -> torch.Tensor:
        """P M (+ bias) (h, n) for P (h, K) with contiguous rows and M (K, n) read through its
        strides (packed once), on the team: the output layer's matmuls."""
        h = P.shape[0] if P.dim() == 2 else -1
        self._rows("matmul: P", P, h)
        K = P.shape[1]
        if M.dtype != torch.float32 or M.device.type != "cpu" or M.dim() != 2 or M.shape[0] != K:
            raise ValueError(f"fp32 kernel matmul: M must be a float32 CPU matrix with {K} rows, "
                             f"not {M.dtype} {tuple(M.shape)} on {M.device.type}.")
        n = M.shape[1]
        if bias is not None and (bias.dtype != torch.float32 or bias.device.type != "cpu"
                                 or tuple(bias.shape) != (n,) or not bias.is_contiguous()):
            raise ValueError(f"fp32 kernel matmul: bias must be a contiguous float32 CPU vector of {n}.")
        C = P.new_empty(h, n)
        if self._lib.fp32_matmul(h, K, n, P.data_ptr(), P.stride(0), M.data_ptr(), M.stride(0), M.stride(1),
                                 None if bias is None else bias.data_ptr(), C.data_ptr(), n,
                                 self._threads(threads)) != 0:
            raise MemoryError("fp32 kernel: out of memory for the packed matrix.")
        return C


class GenerationLoop:
    """A batch-1 tanh RNN with its output layer, packed once, that generates in one C call:

        h = tanh(E[y] + h @ W),   logits = h @ O + bo

    E (V, h) holds W_in + b by token id (the rows TanhRNNFp32 adds, the same bits), W (h, h) and
    O (h, V) are read through their strides (nn.RNN's W_hh.t() and nn.Linear's weight.t() are
    views), bo (V,). The tensors are kept, unchanged, for the loop's life.

    run(hs, logits0, first, length, temperature, top_k, u) -> (tokens, n): see fp32_gen_run.
    A step gives the same bits as Loops.forward for a batch of one."""

    def __init__(self, kernel: Loops, E: torch.Tensor, W: torch.Tensor, O: torch.Tensor, bo: torch.Tensor):
        V, h = E.shape
        kernel._check("generation", {"E": (E, (V, h)), "bo": (bo, (V,))}, 1, 1, h)
        sk, sj = kernel._weight(W, h)
        if O.dtype != torch.float32 or O.device.type != "cpu" or tuple(O.shape) != (h, V):
            raise ValueError(f"fp32 generation: O must be a float32 CPU tensor of shape ({h}, {V}).")
        self.kernel, self.h, self.V = kernel, h, V
        self._keep = (E, W, O, bo)
        self._lib = kernel._lib
        self._ptr = self._lib.fp32_gen_new(h, V, E.data_ptr(), W.data_ptr(), sk, sj,
                                           O.data_ptr(), O.stride(0), O.stride(1), bo.data_ptr())
        if not self._ptr:
            raise MemoryError("fp32 generation: out of memory for the packed weights.")

    def run(self, hs: torch.Tensor, logits0: torch.Tensor | None, first: int, length: int,
            temperature: float | None = None, top_k: int | None = None,
            u: torch.Tensor | None = None) -> tuple[list[int], int]:
        """Up to `length` tokens from state hs (h,), updated in place: the first is `first` when
        >= 0, else picked from logits0 (V,); each later one from the logits after a step with
        the one before. temperature None: greedy, else softmax(logits / temperature) over the
        top_k largest, drawn by inverse CDF with u[i] (float64, length). Returns (tokens, n):
        n < length where it stopped before token n (greedy and not certain that every fp32
        evaluation of the head has that argmax, or NaN logits); hs then holds the state whose
        logits decide it."""
        self._check_state(hs, logits0, first)
        if length <= 0:
            return [], 0
        sampling = temperature is not None
        if sampling and (u is None or u.dtype != torch.float64 or not u.is_contiguous() or u.numel() < length):
            raise ValueError("fp32 generation: sampling needs `length` float64 uniforms u.")
        out = torch.empty(length, dtype=torch.int32)
        n = self._lib.fp32_gen_run(self._ptr, hs.data_ptr(), None if logits0 is None else logits0.data_ptr(),
                                   first, length, out.data_ptr(), float(temperature) if sampling else 0.0,
                                   int(top_k or 0), u.data_ptr() if sampling else None)
        return out[:n].tolist(), n

    def _check_state(self, hs, logits0, first):
        if hs.dtype != torch.float32 or hs.device.type != "cpu" or not hs.is_contiguous() or tuple(hs.shape) != (self.h,):
            raise ValueError(f"fp32 generation: hs must be a contiguous float32 CPU tensor of shape ({self.h},).")
        if first >= self.V:
            raise ValueError(f"fp32 generation: token {first} is outside the vocabulary ({self.V}).")
        if first < 0 and (logits0 is None or logits0.dtype != torch.float32 or not logits0.is_contiguous()
                          or tuple(logits0.shape) != (self.V,)):
            raise ValueError(f"fp32 generation: logits0 must be a contiguous float32 tensor of shape ({self.V},).")

    def close(self) -> None:
        ptr, self._ptr = getattr(self, "_ptr", None), None
        if ptr:
            self._lib.fp32_gen_free(ptr)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


@functools.cache
def _load(name: str) -> tuple[Loops | None, str]:
    ok, why = _supported(name)
    if not ok:
        return None, why
    try:
        kernel, _ = build.load("fp32_tanh", VARIANTS[name][0] + COMPILE, LIBS, wrap=lambda lib: Loops(name, lib))
    except build.BuildError as e:
        return None, str(e)
    return kernel, ""


def load(variant: str | None = None) -> tuple[Loops | None, str]:
    """(Loops, "") for `variant` (default: the best this CPU runs), or (None, why not)."""
    return _load(variant) if variant is not None else _best()


@functools.cache
def _best() -> tuple[Loops | None, str]:
    reasons = []
    for name in variants():
        k, why = _load(name)
        if k is not None:
            return k, ""
        reasons.append(f"{name}: {why}")
    return None, "; ".join(reasons) or "no variant runs here"


def loops(variant: str | None = None) -> Loops:
    """The Loops for `variant`, or RuntimeError saying why it is unavailable."""
    k, why = load(variant)
    if k is None:
        raise RuntimeError(f"fp32 kernel {variant or '(best)'} unavailable: {why}")
    return k


class TanhRNNFp32(torch.autograd.Function):
    """charrnn.kernels.fused.TanhRNNLayer (bf16=False) with its step loops in C:

        A_t = x_t W_in + b + H_{t-1} W,   H_t = tanh(A_t)     for t = 0 .. steps-1

    apply(X, W_in, b, H0, W, variant=None, threads=None) -> Hs (steps, batch, h).
    X: (steps, batch) int64 ids or (steps, batch, in) floats; W_in: (vocab or in, h); b: (h,);
    H0: (batch, h); W: (h, h), row-major or a transposed view. Gradients for X (floats), W_in,
    b, H0 and W."""

    @staticmethod
    def forward(ctx, X, W_in, b, H0, W, variant=None, threads=None):
        k = loops(variant)
        steps, batch = X.shape[:2]
        h = W.shape[0]
        if X.dtype == torch.long:                                # rows of W_in + b: (steps*batch, h), fresh
            A = (W_in + b).index_select(0, X.reshape(-1))
        else:
            A = torch.addmm(b, X.reshape(steps * batch, -1), W_in)  # (steps*batch, h)
        # H_{-1} .. H_{steps-1} in one buffer: the weight gradient reads H_{t-1} for every t as
        # one matrix. Hs is its tail, written out of place, so a step's unit may run on two
        # threads (see fp32_tanh.c, wait_phase)
        H = torch.empty(steps + 1, batch, h)
        H[0].copy_(H0)
        Hs = k.forward(A.view(steps, batch, h), H[0], W, threads, out=H[1:])
        ctx.save_for_backward(X, W_in, W, H)
        ctx.kernel, ctx.threads = k, threads
        return Hs

    @staticmethod
    def backward(ctx, dHs):
        X, W_in, W, H = ctx.saved_tensors
        Hs = H[1:]
        steps, batch, h = Hs.shape
        needs = ctx.needs_input_grad
        dX = dW_in = db = dW = None
        k = ctx.kernel
        dA, dH0 = k.backward(dHs.contiguous(), Hs, W, ctx.threads, dH0=needs[3])
        if needs[4]:                                   # sum_t H_{t-1}^T dA_t as one large matmul
            Hp, dA2 = H[:-1].reshape(-1, h), dA.view(-1, h)
            # a transposed view (nn.RNN's W_hh.t()) gets its gradient in the same layout, so
            # autograd need not copy it into W_hh's
            transposed = W.stride(0) == 1 and h > 1
            if k.owns_matmuls:
                dW = k.gemm_tn(dA2, Hp, ctx.threads).t() if transposed else k.gemm_tn(Hp, dA2, ctx.threads)
            else:
                dW = (dA2.t() @ Hp).t() if transposed else Hp.t() @ dA2
        dA2 = dA.view(steps * batch, h)
        if X.dtype == torch.long:
            if needs[1]:   # rows of dA summed per token id
                dW_in = torch.ops.aten.embedding_dense_backward(dA2, X.reshape(-1), W_in.shape[0], -1, False)
        else:
            X2 = X.reshape(steps * batch, -1)
            dX = (dA2 @ W_in.t()).view(X.shape) if needs[0] else None
            dW_in = X2.t() @ dA2 if needs[1] else None
        if needs[2]:
            db = dA2.sum(0)
        return dX, dW_in, db, dH0, dW, None, None


def tanh_rnn_layer_fp32(X, W_in, b, H0, W, variant: str | None = None, threads: int | None = None):
    """All hidden states (steps, batch, h) of a tanh RNN layer; see TanhRNNFp32."""
    return TanhRNNFp32.apply(X, W_in, b, H0, W, variant, threads)


class LinearFp32(torch.autograd.Function):
    """The output layer Y = H W + b with its three matmuls on the C team: apply(H, W, b, variant,
    threads) for H (tokens, h) with contiguous rows, W (h, vocab) row-major or a transposed view
    (nn.Linear's weight.t()), b (vocab,). The same gradients as F.linear(H, W.t(), b)."""

    @staticmethod
    def forward(ctx, H, W, b, variant=None, threads=None):
        k = loops(variant)
        ctx.save_for_backward(H, W)
        ctx.kernel, ctx.threads = k, threads
        return k.matmul(H, W, None if b is None else b.contiguous(), threads)

    @staticmethod
    def backward(ctx, dY):
        H, W = ctx.saved_tensors
        k, threads, needs = ctx.kernel, ctx.threads, ctx.needs_input_grad
        dY = dY.contiguous()
        dH = k.matmul(dY, W.t(), None, threads) if needs[0] else None
        dW = db = None
        if needs[1]:          # as (dY^T H)^T: vocab rows of C are one panel's work, h columns many panels'
            dW = k.gemm_tn(dY, H, threads).t()
        if needs[2]:
            db = dY.sum(0)
        return dH, dW, db, None, None


def linear_fp32(Hs, W, b, variant: str | None = None, threads: int | None = None):
    """Hs W + b (tokens, vocab) for Hs (..., h), the tokens flattened in order; see LinearFp32."""
    H = Hs.reshape(-1, Hs.shape[-1])
    return LinearFp32.apply(H if H.stride(-1) == 1 else H.contiguous(), W, b, variant, threads)
