"""The models: the seed's from-scratch RNN and its concise nn.RNN / nn.GRU / nn.LSTM relative.

Every model has one interface (the seed's):

    Y, state = model(X, state)      X: (batch, steps) token ids  ->  Y: (steps*batch, vocab) logits
    state = model.begin_state(batch_size, device)

and splits it in two, so the Inspect page can look at the hidden states themselves:

    Hs, state = model.features(X, state)    Hs: (steps, batch, directions*hidden), top layer
    Y = model.head(Hs)                      Y:  (steps*batch, vocab)

`fused=True` (the default) runs each tanh layer through `tanh_rnn_layer`, one autograd op
with a hand-written backward, on a CPU, and through cuDNN's tanh RNN on a GPU (where that is
twice as fast); `fused=False` runs the seed's loop over one-hot inputs step by step. All give the
same outputs and gradients (tests/test_models.py holds them to it).
"""
from __future__ import annotations

import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError
from . import bf16gemm, native

# cuDNN says so when an RNN's weights are not one flat buffer and it copies them at every call:
# true of the scratch model on a GPU by design (its weights are its own), and a small copy.
warnings.filterwarnings("ignore", message="RNN module weights are not part of single contiguous chunk",
                        module=r"charrnn\.models")

KINDS = ("scratch", "rnn", "gru", "lstm")
DEFAULT_HIDDEN = {"scratch": 512, "rnn": 256, "gru": 256, "lstm": 256}  # the seed's sizes
MAX_HIDDEN, MAX_LAYERS = 4096, 8


@dataclass(frozen=True)
class ModelConfig:
    kind: str = "scratch"      # scratch | rnn | gru | lstm
    vocab_size: int = 28
    hidden_size: int = 512
    num_layers: int = 1
    bidirectional: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise UserError(f"Unknown model {self.kind!r}; choose one of {', '.join(KINDS)}.")
        if not 1 <= self.hidden_size <= MAX_HIDDEN:
            raise UserError(f"Hidden size must be between 1 and {MAX_HIDDEN}, not {self.hidden_size}.")
        if not 1 <= self.num_layers <= MAX_LAYERS:
            raise UserError(f"Layers must be between 1 and {MAX_LAYERS}, not {self.num_layers}.")
        if self.vocab_size < 2:
            raise UserError("The vocabulary needs at least two tokens.")
        if self.kind == "scratch" and (self.num_layers != 1 or self.bidirectional):
            raise UserError("The from-scratch RNN has one unidirectional layer, as in the seed; "
                             "use rnn, gru or lstm for more.")

    @property
    def can_generate(self) -> bool:
        """A bidirectional model sees the future while training, so its text is not honest."""
        return not self.bidirectional


# -----------------------------------------------------------------------------
# the fused recurrence

class TanhRNNLayer(torch.autograd.Function):
    """A whole tanh RNN layer as one autograd op, the way cuDNN runs one:

        A_t = x_t W_in + b + H_{t-1} W,   H_t = tanh(A_t)     for t = 0 .. steps-1

    x_t is a token id (layer 0: x_t W_in is row x_t of W_in, a lookup instead of a one-hot matmul)
    or a feature vector (deeper layers). Autograd through the step loop would record ~6 ops per
    step and run the weight gradient as `steps` small matmuls; here the forward and backward loops
    are two ops per step on views made once, and the gradients of W_in, b and W are each one
    large op over all steps. At these sizes per-op overhead is a good part of the time.

    With `bf16=True` (CPU only, see charrnn/bf16gemm.py) the step matmuls H_{t-1} W and dA_t W^T
    and the gradient of W read bf16 copies of their inputs and accumulate in fp32; the weights,
    the hidden states returned and every other op stay fp32 (W_in's and b's gradients are fp32
    sums of dA's rows). Its step loops run in C where charrnn/native.py could build them, else in
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
            W = W.contiguous()                                   # a transposed view: ~30% slower mm
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
    fp32 (charrnn/tanh_rnn.c, "the output layer on AMX tiles"); db and every output stay fp32.

    At the seed's sizes (1120 tokens, h = 512, vocab 28) MKL spends ~1.1 ms a minibatch on these
    matmuls, fp32 or bf16, because a dimension of 28 leaves it little to work with; on tiles the
    vocabulary is padded to 32 and the three take a fraction of that. `linear_head` picks it."""

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

    With `bf16` (training in bf16, see bf16_now), LinearBF16 where the C library was built, the
    CPU has AMX and the sizes fill whole tiles (tokens and h multiples of 32), reading the
    recurrence's bf16 copy of Hs where it still has one (bf16_copy); fp32 otherwise, so every
    machine trains. The fp32 path is written as linear(H, W^T, b): the same numbers as H W + b,
    but autograd then computes W's gradient as (dY^T H)^T, which MKL runs 2x faster than H^T dY here."""
    h = Hs.shape[-1]
    H = Hs.reshape(-1, h)
    loops = native.loops() if bf16 else None
    if (loops is not None and b is not None and H.device.type == "cpu"
            and H.dtype == W.dtype == b.dtype == torch.float32
            and loops.head_fits(H.shape[0], h, W.shape[1])):
        Hb = bf16_copy(Hs)
        return LinearBF16.apply(H.contiguous(), W, b, None if Hb is None else Hb.reshape(-1, h))
    return F.linear(H, W.t(), b)


# -----------------------------------------------------------------------------
# the seed's from-scratch RNN

class RNNScratch(nn.Module):
    """The seed's RNN with explicit parameters: H_t = tanh(X_t W_xh + H_{t-1} W_hh + b_h),
    O_t = H_t W_hq + b_q. Its state is a tuple (H,), as the seed's init_rnn_state returns."""

    def __init__(self, config: ModelConfig, fused: bool = True):
        super().__init__()
        self.config, self.fused = config, fused
        self.precision = "fp32"                          # "bf16": see supports_bf16
        V, h = config.vocab_size, config.hidden_size
        normal = lambda *shape: nn.Parameter(torch.randn(*shape) * 0.01)
        self.W_xh = normal(V, h)                         # (vocab, h)
        self.W_hh = normal(h, h)                         # (h, h)
        self.b_h = nn.Parameter(torch.zeros(h))          # (h,)
        self.W_hq = normal(h, V)                         # (h, vocab)
        self.b_q = nn.Parameter(torch.zeros(V))          # (vocab,)

    @property
    def supports_bf16(self) -> bool:
        return self.fused

    def begin_state(self, batch_size: int, device=None) -> tuple[torch.Tensor]:
        return (torch.zeros(batch_size, self.config.hidden_size, device=device),)

    def features(self, X, state):
        if self.fused and self.W_hh.is_cuda:
            return self._features_cudnn(X, state)
        if self.fused:
            Hs = tanh_rnn_layer(X.T, self.W_xh, self.b_h, state[0], self.W_hh, bf16_now(self))  # (steps, batch, h)
            return Hs, (Hs[-1],)
        return self.features_seed(X, state)

    def _features_cudnn(self, X, state):
        """On a GPU, the fused recurrence is cuDNN's tanh RNN, run on these same parameters: its
        weights are (out, in), the transposes of W_xh and W_hh, and its second bias is zero."""
        inputs = F.one_hot(X.T, self.config.vocab_size).float()  # (steps, batch, vocab)
        params = [self.W_xh.t().contiguous(), self.W_hh.t().contiguous(), self.b_h, torch.zeros_like(self.b_h)]
        Hs, H = torch.rnn_tanh(inputs, state[0].unsqueeze(0), params, has_biases=True, num_layers=1,
                               dropout=0.0, train=self.training, bidirectional=False, batch_first=False)
        return Hs, (H[0],)                                       # (steps, batch, h), ((batch, h),)

    def features_seed(self, X, state):
        """The seed's loop, kept as the reference the fused path is tested against."""
        inputs = F.one_hot(X.T, self.config.vocab_size).float()  # (steps, batch, vocab)
        H, = state                                               # (batch, h)
        outputs = []
        for X_t in inputs:                                       # X_t: (batch, vocab)
            H = torch.tanh(X_t @ self.W_xh + H @ self.W_hh + self.b_h)
            outputs.append(H)
        return torch.stack(outputs), (H,)                        # (steps, batch, h)

    def head(self, Hs):
        return linear_head(Hs, self.W_hq, self.b_q, bf16_now(self))  # (steps*batch, vocab)

    def forward(self, X, state):
        Hs, state = self.features(X, state)
        return self.head(Hs), state


# -----------------------------------------------------------------------------
# the seed's concise model over torch.nn's recurrent layers

class RNNModel(nn.Module):
    """The seed's RNNModel: one-hot inputs -> nn.RNN / nn.GRU / nn.LSTM -> a linear output layer.

    State: (directions*layers, batch, hidden), a pair of them for the LSTM. The output layer
    reads 2*hidden features when the layer is bidirectional, as in the seed.
    """
    LAYERS = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}

    def __init__(self, config: ModelConfig, fused: bool = True):
        super().__init__()
        self.config, self.fused = config, fused
        self.precision = "fp32"                          # "bf16": see supports_bf16
        self.num_directions = 2 if config.bidirectional else 1
        self.rnn = self.LAYERS[config.kind](config.vocab_size, config.hidden_size,
                                            num_layers=config.num_layers,
                                            bidirectional=config.bidirectional)
        self.linear = nn.Linear(self.num_directions * config.hidden_size, config.vocab_size)

    def begin_state(self, batch_size: int, device=None):
        shape = (self.num_directions * self.config.num_layers, batch_size, self.config.hidden_size)
        if self.config.kind == "lstm":
            return torch.zeros(shape, device=device), torch.zeros(shape, device=device)
        return torch.zeros(shape, device=device)

    @property
    def uses_fused(self) -> bool:
        """tanh_rnn_layer on a CPU; on a GPU cuDNN's nn.RNN is the fused one (and 2x faster)."""
        return (self.fused and self.config.kind == "rnn" and not self.config.bidirectional
                and not self.linear.weight.is_cuda)

    @property
    def supports_bf16(self) -> bool:
        return self.uses_fused

    def features(self, X, state):
        if self.uses_fused:
            return self._features_fused(X, state)
        inputs = F.one_hot(X.T, self.config.vocab_size).float()  # (steps, batch, vocab)
        Y, state = self.rnn(inputs, state)                       # Y: (steps, batch, D*h)
        return Y, state

    def _features_fused(self, X, state):
        """nn.RNN's own parameters through tanh_rnn_layer, layer by layer."""
        finals, inputs = [], X.T                                  # layer 0 reads ids (steps, batch)
        for layer in range(self.config.num_layers):
            W_ih = getattr(self.rnn, f"weight_ih_l{layer}")       # (h, in)
            W_hh = getattr(self.rnn, f"weight_hh_l{layer}")       # (h, h)
            b = getattr(self.rnn, f"bias_ih_l{layer}") + getattr(self.rnn, f"bias_hh_l{layer}")
            inputs = tanh_rnn_layer(inputs, W_ih.t(), b, state[layer], W_hh.t(), bf16_now(self))
            finals.append(inputs[-1])
        return inputs, torch.stack(finals)                        # state: (layers, batch, h)

    def head(self, Hs):
        if bf16_now(self):                                        # nn.Linear's weight is (vocab, h)
            return linear_head(Hs, self.linear.weight.t(), self.linear.bias, True)
        return self.linear(Hs.reshape(-1, Hs.shape[-1]))          # (steps*batch, vocab)

    def forward(self, X, state):
        Hs, state = self.features(X, state)
        return self.head(Hs), state


def bf16_now(model) -> bool:
    """Whether this forward pass runs its step matmuls in bf16: only while training (gradients
    on) with `model.precision == "bf16"`; evaluation and generation always run in fp32."""
    return model.precision == "bf16" and torch.is_grad_enabled()


MODELS = {"scratch": RNNScratch, "rnn": RNNModel, "gru": RNNModel, "lstm": RNNModel}


_RNG_LOCK = threading.RLock()


@contextmanager
def seeded(seed: int):
    """Random initialisation from `seed` that neither reads nor disturbs the global RNG state, and
    cannot interleave with another thread's (the app builds models in several threads)."""
    with _RNG_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_model(config: ModelConfig, fused: bool = True, seed: int | None = None) -> nn.Module:
    """The model for `config`; with `seed`, its initial weights depend on that seed alone."""
    if seed is None:
        return MODELS[config.kind](config, fused=fused)
    with seeded(seed):
        return MODELS[config.kind](config, fused=fused)


def detach_state(state):
    """Cut the graph at a minibatch boundary (sequential partitioning keeps the values)."""
    if isinstance(state, tuple):
        return tuple(s.detach() for s in state)
    return state.detach()
