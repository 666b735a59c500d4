"""The fused tanh RNN layer and the bf16 output layer: autograd ops the kernels in this package
run the book's models through (see charrnn/kernels/__init__.py, which picks one per run).

    Hs = tanh_rnn_layer(X, W_in, b, H0, W)             # torch-fp32: one op, per-step torch matmuls
    Hs = tanh_rnn_layer(X, W_in, b, H0, W, bf16=True)  # the bf16 loops (bf16.py, bf16_tanh.c)
    Hs, H = cudnn_tanh_layer(X, W_in, b, H0, W)        # on a GPU: cuDNN's tanh RNN on these weights
    Y = linear_head(Hs, W, b, bf16)                    # the output layer (bf16 on AMX tiles where it can)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import bf16 as native, bf16gemm


class TanhRNNLayer(torch.autograd.Function):
    """A whole tanh RNN layer as one autograd op, the way cuDNN runs one:

        A_t = x_t W_in + b + H_{t-1} W,   H_t = tanh(A_t)     for t = 0 .. steps-1

    x_t is a token id (layer 0: x_t W_in is row x_t of W_in, a lookup instead of a one-hot matmul)
    or a feature vector (deeper layers). Autograd through the step loop would record ~6 ops per
    step and run the weight gradient as `steps` small matmuls; here the forward and backward loops
    are two ops per step on views made once, and the gradients of W_in, b and W are each one
    large op over all steps. At these sizes per-op overhead is a good part of the time.

    With `bf16=True` (CPU only, see bf16gemm.py) the step matmuls H_{t-1} W and dA_t W^T
    and the gradient of W read bf16 copies of their inputs and accumulate in fp32; the weights,
    the hidden states returned and every other op stay fp32 (W_in's and b's gradients are fp32
    sums of dA's rows). Its step loops run in C where bf16.py could build them, else in
    Python (the same math); the C loops also look up token-id inputs and sum their gradients per
    id step by step, while each step's rows are in cache.
    """

    @staticmethod
    def forward(ctx, X, W_in, b, H0, W, bf16=False):
        # X: (steps, batch) int64 ids or (steps, batch, in) floats; W_in: (vocab or in, h)
        # b: (h,); H0: (batch, h); W: (h, h)
        steps, batch = X.shape[:2]
        h = W.shape[0]
        lookup = None
        if X.dtype == torch.long and bf16:                       # the bf16 loop looks the rows up
            A = W_in.new_empty(steps * batch, h)                 # step by step (_forward_bf16)
            lookup = (X.contiguous(), (W_in + b).contiguous())   # ids (steps, batch); table (vocab, h)
        elif X.dtype == torch.long:                              # rows of W_in + b: (steps*batch, h), fresh
            A = (W_in + b).index_select(0, X.reshape(-1))
        else:
            A = torch.addmm(b, X.reshape(steps * batch, -1), W_in)  # (steps*batch, h)
        Hs = A.view(steps, batch, h)                             # becomes H in place
        if bf16:
            Wb = W.to(torch.bfloat16)                            # keeps a transposed view's layout
            Hb = _forward_bf16(Hs, H0, Wb, lookup)
            ctx.save_for_backward(X, W_in, Wb, Hs, Hb)
            Hs._bf16_copy = (Hb[1:], Hs._version)                # bf16(Hs), for the head (bf16_copy)
        else:
            W = W.contiguous()                                   # a transposed view makes a slower mm
            H = H0
            for H_t in Hs.unbind(0):
                H = H_t.addmm_(H, W).tanh_()                     # (batch, h)
            ctx.save_for_backward(X, W_in, W, Hs, H0)
        ctx.bf16 = bf16
        return Hs

    @staticmethod
    def backward(ctx, dHs):
        X, W_in, W, Hs, H0 = ctx.saved_tensors                   # bf16: W is Wb, H0 is Hb
        steps, batch, h = Hs.shape
        needs = ctx.needs_input_grad
        dX = dW_in = db = dH0 = dW = None
        if ctx.bf16:
            loops = native.loops()
            if loops is not None and X.dtype == torch.long and (needs[1] or needs[2]):
                # the C loop sums dA's rows per token id as it goes (fp32): W_in's and b's gradients
                G = dHs.new_zeros(W_in.shape[0] + 1, h)
                dA, dAb = _backward_bf16(dHs, Hs, W, (X.contiguous(), G))
                dW_in, db = G[:-1], G[-1]
            else:
                dA, dAb = _backward_bf16(dHs, Hs, W)
            # elsewhere (the Python loops, or X not ids) W_in's and b's gradients come from dA in
            # fp32 below, as in the fp32 path: the same sums as the C loop's
            Hb, dAb2 = H0, dAb.view(-1, h)
            if needs[3]:
                dH0 = bf16gemm.gemm(dA.new_empty(batch, h), dAb[0], W, trans_b=True, beta=0.0)
            if needs[4]:                               # sum_t H_{t-1}^T dA_t as one large matmul
                Hb2 = Hb[:-1].reshape(-1, h)
                if W.stride(0) == 1 and h > 1:         # W is a transposed view (nn.RNN's W_hh.t()):
                    # give its gradient the same layout, so autograd need not copy it into W_hh's
                    dW = bf16gemm.gemm(dA.new_empty(h, h), dAb2, Hb2, trans_a=True, beta=0.0).t()
                else:
                    dW = bf16gemm.gemm(dA.new_empty(h, h), Hb2, dAb2, trans_a=True, beta=0.0)
        else:
            dA = dHs.clone(memory_format=torch.contiguous_format)  # becomes the grads of A_t
            dA_t, D_t = dA.unbind(0), (1 - Hs * Hs).unbind(0)     # tanh'(A_t) = 1 - H_t^2, all at once
            Wt = W.t().contiguous()
            for t in range(steps - 1, -1, -1):
                # dA_t holds the grad reaching H_t (from the loss at t, and from step t+1 below)
                dA_t[t].mul_(D_t[t])
                if t > 0:
                    dA_t[t - 1].addmm_(dA_t[t], Wt)              # + grad flowing back through W
            if needs[3]:
                dH0 = dA_t[0] @ Wt
            if needs[4]:                               # sum_t H_{t-1}^T dA_t as one large matmul
                dW = torch.addmm(H0.t() @ dA_t[0], Hs[:-1].reshape(-1, h).t(), dA[1:].reshape(-1, h))
        dA2 = dA.view(steps * batch, h)
        if X.dtype == torch.long:
            if needs[1] and dW_in is None:  # rows of dA summed per token id (index_add_ contends on repeated ids)
                dW_in = torch.ops.aten.embedding_dense_backward(dA2, X.reshape(-1), W_in.shape[0], -1, False)
        else:
            X2 = X.reshape(steps * batch, -1)
            dX = (dA2 @ W_in.t()).view(X.shape) if needs[0] else None
            dW_in = X2.t() @ dA2 if needs[1] else None
        if needs[2] and db is None:
            db = dA2.sum(0)
        return dX, dW_in, db, dH0, dW, None


def _forward_bf16(Hs: torch.Tensor, H0: torch.Tensor, Wb: torch.Tensor, lookup=None) -> torch.Tensor:
    """The bf16 forward loop: Hs holds x_t W_in + b on entry and H_t on return. Returns Hb, the
    bf16 copies of H_{t-1} that step t multiplied (Hb[0] = H0), for the weight gradient.
    With lookup = (ids (steps, batch), table (vocab, h)), Hs's contents on entry are not read:
    x_t W_in + b is row ids[t] of table, looked up here (in C: step by step)."""
    steps, batch, h = Hs.shape
    Hb = torch.empty(steps + 1, batch, h, dtype=torch.bfloat16)
    Hb[0].copy_(H0)
    loops = native.loops()
    if loops is not None:
        loops.forward(Hs, Hb, Wb, *(lookup or ()))               # the loop below, in C
        return Hb
    if lookup is not None:
        ids, table = lookup
        torch.index_select(table, 0, ids.reshape(-1), out=Hs.view(-1, h))
    step = bf16gemm.step_gemm(Hs, Hb, Wb)                        # Hs[t] += Hb[t] @ Wb
    for t, (H_t, Hb_next) in enumerate(zip(Hs.unbind(0), Hb[1:].unbind(0))):
        step(t, t)
        Hb_next.copy_(H_t.tanh_())
    return Hb


def _backward_bf16(dHs: torch.Tensor, Hs: torch.Tensor, Wb: torch.Tensor,
                   scatter=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 backward loop: (dA, dAb), the grads of A_t in fp32 and their bf16 copies. With
    scatter = (ids, G), C loops only: G[ids[t][i]] += dA[t][i], G[-1] += dA[t][i] (see Loops.backward)."""
    steps, batch, h = Hs.shape
    dAb = torch.empty(steps, batch, h, dtype=torch.bfloat16)
    loops = native.loops()
    if loops is not None:                                        # the loop below, in C
        dA = torch.empty_like(Hs)
        loops.backward(dHs.contiguous(), dA, Hs, dAb, Wb, *(scatter or ()))
        return dA, dAb
    dA = dHs.clone(memory_format=torch.contiguous_format)
    dA_t, D_t, dAb_t = dA.unbind(0), (1 - Hs * Hs).unbind(0), dAb.unbind(0)
    step = bf16gemm.step_gemm(dA, dAb, Wb, trans_b=True)         # dA[t-1] += dAb[t] @ Wb^T
    for t in range(steps - 1, -1, -1):
        dAb_t[t].copy_(dA_t[t].mul_(D_t[t]))
        if t > 0:
            step(t - 1, t)
    return dA, dAb


def tanh_rnn_layer(X, W_in, b, H0, W, bf16: bool = False):
    """All hidden states (steps, batch, h) of a tanh RNN layer; see TanhRNNLayer."""
    return TanhRNNLayer.apply(X, W_in, b, H0, W, bf16)


# -----------------------------------------------------------------------------
# the output layer

class LinearBF16(torch.autograd.Function):
    """Y = H W + b with its three matmuls (forward, dH, dW) in bf16 on AMX tiles, accumulating in
    fp32 (bf16_tanh.c, "the output layer on AMX tiles"); db and every output stay fp32.

    With the vocabulary (28) as one dimension, MKL's matmuls run far below their usual rate, fp32
    or bf16, as packing dominates; on tiles the vocabulary is padded to 32 and the three take a
    fraction of that time. `linear_head` picks it."""

    @staticmethod
    def forward(ctx, H, W, b, Hb=None):
        # H: (tokens, h) fp32; W: (h, vocab), row- or column-major; b: (vocab,);
        # Hb: bf16(H) if the caller has it (the recurrence's copy, see bf16_copy), else None
        Y, Hb = native.loops().head_forward(H, W, b, Hb)           # Y: (tokens, vocab)
        ctx.save_for_backward(Hb, W)                               # Hb = bf16(H): (tokens, h)
        return Y

    @staticmethod
    def backward(ctx, dY):
        Hb, W = ctx.saved_tensors
        dH, dW, db = native.loops().head_backward(dY.contiguous(), Hb, W)
        return dH, dW, db, None


def bf16_copy(Hs: torch.Tensor) -> torch.Tensor | None:
    """bf16(Hs), exactly, if the bf16 recurrence that returned Hs still has it (the copies of
    H_t its forward loop made for the next step's matmul), and Hs was not changed since; else None."""
    copy = getattr(Hs, "_bf16_copy", None)
    if copy is None or copy[1] != Hs._version:
        return None
    return copy[0]


def linear_head(Hs, W, b, bf16: bool = False):
    """Hs W + b for the output layer: Hs (..., h), W (h, vocab), b (vocab,) -> (tokens, vocab),
    the tokens of Hs flattened in order.

    With `bf16` (a bf16 kernel, training), LinearBF16 where the C library was built, the
    CPU has AMX and the sizes fill whole tiles (tokens and h multiples of 32), reading the
    recurrence's bf16 copy of Hs where it still has one (bf16_copy); fp32 otherwise, so every
    machine trains. The fp32 path is written as linear(H, W^T, b): the same numbers as H W + b,
    but autograd then computes W's gradient as (dY^T H)^T, an orientation MKL runs faster than H^T dY."""
    h = Hs.shape[-1]
    H = Hs.reshape(-1, h)
    loops = native.loops() if bf16 else None
    if (loops is not None and b is not None and H.device.type == "cpu"
            and H.dtype == W.dtype == b.dtype == torch.float32
            and loops.head_fits(H.shape[0], h, W.shape[1])):
        Hb = bf16_copy(Hs)
        return LinearBF16.apply(H.contiguous(), W, b, None if Hb is None else Hb.reshape(-1, h))
    return F.linear(H, W.t(), b)



def cudnn_tanh_layer(X, W_in, b, H0, W):
    """A tanh layer through cuDNN (torch.rnn_tanh) on a GPU, reading ids X (steps, batch) as
    one-hot rows: cuDNN's weights are (out, in), the transposes of W_in and W, and its second bias
    is zero. Returns (Hs (steps, batch, h), H (batch, h))."""
    inputs = F.one_hot(X, W_in.shape[0]).float()                # (steps, batch, vocab)
    params = [W_in.t().contiguous(), W.t().contiguous(), b, torch.zeros_like(b)]
    Hs, H = torch.rnn_tanh(inputs, H0.unsqueeze(0), params, has_biases=True, num_layers=1,
                           dropout=0.0, train=torch.is_grad_enabled(), bidirectional=False, batch_first=False)
    return Hs, H[0]
