"""bf16 matmuls that accumulate into fp32, for the recurrence's training path on CPU.

    gemm(C, A, B)                      C += A @ B      C: fp32 (m, n); A, B: bf16
    gemm(C, A, B, trans_a=True, beta=0)  C  = A.T @ B

PyTorch's own bf16 matmul returns bf16, so a step `A_t += H_{t-1} @ W` would need a matmul, a
cast and an add: three ops where the math is one. MKL's `cblas_gemm_bf16bf16f32` does it in one
call (bf16 inputs, fp32 products and output, C = alpha op(A) op(B) + beta C); PyTorch's x86 CPU
library ships MKL and exports that function, and we call it through ctypes. On a CPU with AMX or
AVX512-BF16 it runs the step faster than fp32 (docs/performance.md has the figures per CPU).

`available()` says whether this torch build and CPU have it; everything else falls back to fp32.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112


@functools.cache
def _cblas_gemm_bf16():
    """MKL's cblas_gemm_bf16bf16f32 from the loaded libtorch_cpu, or None."""
    lib = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    try:
        fn = ctypes.CDLL(str(lib)).cblas_gemm_bf16bf16f32
    except (OSError, AttributeError):         # not Linux, or a build without MKL (ARM, say)
        return None
    i, p = ctypes.c_int, ctypes.c_void_p
    fn.argtypes = [i, i, i, i, i, i, ctypes.c_float, p, i, p, i, ctypes.c_float, p, i]
    fn.restype = None
    return fn


def _cpu_has_bf16() -> bool:
    """AMX tiles or AVX512-BF16: without them MKL emulates bf16 and it is slower than fp32."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(check is not None and check() for check in checks)


@functools.cache
def available() -> bool:
    """Whether bf16 training can run here: the MKL function is there and the CPU has bf16 units."""
    return _cblas_gemm_bf16() is not None and _cpu_has_bf16()


def _matrix(x: torch.Tensor, dtype: torch.dtype, name: str) -> tuple[int, bool]:
    """(leading dimension, column-major?) of a 2-D CPU matrix stored row- or column-major.

    Row-major: element (i, j) at i*ld + j; column-major (a `.t()` view of a row-major matrix):
    at j*ld + i. A single row or column fits either, with the smallest valid ld."""
    if x.dtype != dtype or x.device.type != "cpu" or x.dim() != 2:
        raise TypeError(f"gemm: {name} must be a 2-D {dtype} CPU tensor, not {x.dtype} {tuple(x.shape)} on {x.device}.")
    (rows, cols), (s0, s1) = x.shape, x.stride()
    if (s1 == 1 or cols <= 1) and (rows <= 1 or s0 >= max(1, cols)):
        return (s0 if rows > 1 else max(1, cols)), False
    if (s0 == 1 or rows <= 1) and (cols <= 1 or s1 >= max(1, rows)):
        return (s1 if cols > 1 else max(1, rows)), True
    raise ValueError(f"gemm: {name} must be row- or column-major, not strides {x.stride()}.")


def operand(x: torch.Tensor, transpose: bool, name: str) -> tuple[int, int]:
    """(CBLAS op, leading dimension) for op(x), x a bf16 matrix. A column-major matrix is the
    row-major storage of its transpose: the op flips instead of copying."""
    ld, column_major = _matrix(x, torch.bfloat16, name)
    return (_TRANS if transpose != column_major else _NO_TRANS), ld


def _plan(C, A, B, trans_a: bool, trans_b: bool) -> tuple:
    """The cblas arguments for C = op(A) @ op(B) + beta C, after checking every shape and layout."""
    ldc, c_column_major = _matrix(C, torch.float32, "C")
    if c_column_major:                            # MKL writes C row-major
        raise ValueError(f"gemm: C must be row-major, not strides {C.stride()}.")
    op_a, lda = operand(A, trans_a, "A")
    op_b, ldb = operand(B, trans_b, "B")
    m, n = C.shape
    a_rows, k = (A.shape[1], A.shape[0]) if trans_a else A.shape
    b_rows, b_cols = (B.shape[1], B.shape[0]) if trans_b else B.shape
    if a_rows != m or b_rows != k or b_cols != n:
        raise ValueError(f"gemm: shapes {tuple(A.shape)} and {tuple(B.shape)} do not give {tuple(C.shape)}.")
    if max(m, n, k, lda, ldb, ldc) >= 2**31:
        raise ValueError("gemm: a dimension does not fit MKL's 32-bit integers.")
    return op_a, op_b, m, n, k, lda, ldb, ldc


def _function():
    fn = _cblas_gemm_bf16()
    if fn is None:
        raise RuntimeError("This PyTorch build has no MKL bf16 matmul; train in fp32.")
    return fn


def gemm(C: torch.Tensor, A: torch.Tensor, B: torch.Tensor, *, trans_a: bool = False,
         trans_b: bool = False, beta: float = 1.0) -> torch.Tensor:
    """C = op(A) @ op(B) + beta * C in place (op transposes when asked); returns C.

    C is fp32 and row-major; A and B are bf16, row- or column-major (a `.t()` view is free).
    Shapes, layouts and sizes are checked before MKL sees a pointer.
    """
    fn = _function()
    op_a, op_b, m, n, k, lda, ldb, ldc = _plan(C, A, B, trans_a, trans_b)
    fn(_ROW_MAJOR, op_a, op_b, m, n, k, 1.0, A.data_ptr(), lda, B.data_ptr(), ldb, beta, C.data_ptr(), ldc)
    return C


def step_gemm(Cs: torch.Tensor, As: torch.Tensor, B: torch.Tensor, *, trans_b: bool = False):
    """For a loop over time steps: `step(i, j)` does Cs[i] += As[j] @ op(B) in one MKL call.

    Cs: fp32 (steps, m, n) and As: bf16 (steps', m, k), both contiguous; B: bf16 (k, n), or
    (n, k) with trans_b. Everything is checked here, once, so that each step costs only the call
    (a checked `gemm` per step would spend more time in Python than MKL spends on the matmul).
    `step` holds on to the three tensors, so their memory lives as long as it does; resizing
    them in place (`resize_`, `set_`) while it lives is not allowed.
    """
    if Cs.dim() != 3 or As.dim() != 3 or not (Cs.is_contiguous() and As.is_contiguous()):
        raise ValueError("step_gemm: Cs and As must be contiguous (steps, rows, columns) buffers.")
    fn = _function()
    op_a, op_b, m, n, k, lda, ldb, ldc = _plan(Cs[0], As[0], B, False, trans_b)  # step 0's views
    c0, c_step, c_len = Cs.data_ptr(), m * n * Cs.element_size(), Cs.shape[0]
    a0, a_step, a_len = As.data_ptr(), m * k * As.element_size(), As.shape[0]
    b = B.data_ptr()
    def step(i: int, j: int) -> None:
        if not (0 <= i < c_len and 0 <= j < a_len):
            raise IndexError(f"step_gemm: step ({i}, {j}) is outside ({c_len}, {a_len}).")
        fn(_ROW_MAJOR, op_a, op_b, m, n, k, 1.0, a0 + j * a_step, lda, b, ldb, 1.0, c0 + i * c_step, ldc)
    step.buffers = (Cs, As, B)  # the pointers above point into these: keep them alive with step
    return step
