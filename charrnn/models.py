"""The models: the seed's from-scratch RNN and its concise nn.RNN / nn.GRU / nn.LSTM relative.

Every model has one interface (the seed's):

    Y, state = model(X, state)      X: (batch, steps) token ids  ->  Y: (steps*batch, vocab) logits
    state = model.begin_state(batch_size, device)

and splits it in two, so the Inspect page can look at the hidden states themselves:

    Hs, state = model.features(X, state)    Hs: (steps, batch, directions*hidden), top layer
    Y = model.head(Hs)                      Y:  (steps*batch, vocab)

`fused=True` (the default) runs the tanh recurrence through `tanh_recurrence`, one autograd op
with a hand-written backward; `fused=False` runs the seed's loop over one-hot inputs step by step.
Both give the same outputs and gradients (tests/test_models.py holds them to it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

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
            raise ValueError(f"Unknown model {self.kind!r}; choose one of {', '.join(KINDS)}.")
        if not 1 <= self.hidden_size <= MAX_HIDDEN:
            raise ValueError(f"Hidden size must be between 1 and {MAX_HIDDEN}, not {self.hidden_size}.")
        if not 1 <= self.num_layers <= MAX_LAYERS:
            raise ValueError(f"Layers must be between 1 and {MAX_LAYERS}, not {self.num_layers}.")
        if self.vocab_size < 2:
            raise ValueError("The vocabulary needs at least two tokens.")
        if self.kind == "scratch" and (self.num_layers != 1 or self.bidirectional):
            raise ValueError("The from-scratch RNN has one unidirectional layer, as in the seed; "
                             "use rnn, gru or lstm for more.")

    @property
    def can_generate(self) -> bool:
        """A bidirectional model sees the future while training, so its text is not honest."""
        return not self.bidirectional


# -----------------------------------------------------------------------------
# the fused recurrence

class TanhRecurrence(torch.autograd.Function):
    """H_t = tanh(XW_t + H_{t-1} @ W) for every step t, as one autograd op.

    Autograd through the step loop records ~4 ops per step and runs the weight gradient as
    `steps` small matmuls. Here the backward walks the steps once for dH (one (batch, h) @ (h, h)
    matmul per step) and then gets dW with one large (h, steps*batch) @ (steps*batch, h) matmul,
    the way cuDNN does.
    """

    @staticmethod
    def forward(ctx, XW, H0, W):
        # XW: (steps, batch, h) input projections with the bias; H0: (batch, h); W: (h, h)
        Hs = torch.empty_like(XW)                        # (steps, batch, h)
        H = H0
        for t in range(XW.shape[0]):
            torch.addmm(XW[t], H, W, out=Hs[t])          # (batch, h)
            H = Hs[t].tanh_()
        ctx.save_for_backward(Hs, H0, W)
        return Hs

    @staticmethod
    def backward(ctx, dHs):
        Hs, H0, W = ctx.saved_tensors
        steps, batch, h = Hs.shape
        dA = torch.empty_like(Hs)                        # grad at the pre-activations
        D = 1 - Hs * Hs                                  # tanh' for every step at once
        Wt = W.t().contiguous()
        carry = torch.zeros_like(H0)                     # grad flowing into H_t from step t+1
        for t in range(steps - 1, -1, -1):
            torch.add(dHs[t], carry, out=dA[t])
            dA[t].mul_(D[t])
            carry = dA[t] @ Wt                           # (batch, h)
        dW = None
        if ctx.needs_input_grad[2]:
            H_prev = torch.cat([H0.unsqueeze(0), Hs[:-1]]).reshape(-1, h)  # (steps*batch, h)
            dW = H_prev.t() @ dA.reshape(-1, h)          # (h, h), one large matmul
        return dA, carry, dW


def tanh_recurrence(XW: torch.Tensor, H0: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """All hidden states (steps, batch, h) of a tanh RNN layer, given XW = x_t W_xh + b per step."""
    return TanhRecurrence.apply(XW, H0, W)


# -----------------------------------------------------------------------------
# the seed's from-scratch RNN

class RNNScratch(nn.Module):
    """The seed's RNN with explicit parameters: H_t = tanh(X_t W_xh + H_{t-1} W_hh + b_h),
    O_t = H_t W_hq + b_q. Its state is a tuple (H,), as the seed's init_rnn_state returns."""

    def __init__(self, config: ModelConfig, fused: bool = True):
        super().__init__()
        self.config, self.fused = config, fused
        V, h = config.vocab_size, config.hidden_size
        normal = lambda *shape: nn.Parameter(torch.randn(*shape) * 0.01)
        self.W_xh = normal(V, h)                         # (vocab, h)
        self.W_hh = normal(h, h)                         # (h, h)
        self.b_h = nn.Parameter(torch.zeros(h))          # (h,)
        self.W_hq = normal(h, V)                         # (h, vocab)
        self.b_q = nn.Parameter(torch.zeros(V))          # (vocab,)

    def begin_state(self, batch_size: int, device=None) -> tuple[torch.Tensor]:
        return (torch.zeros(batch_size, self.config.hidden_size, device=device),)

    def features(self, X, state):
        if self.fused:
            # one-hot(x_t) @ W_xh is row x_t of W_xh: one lookup for all steps, not `steps` matmuls
            XW = F.embedding(X.T, self.W_xh) + self.b_h          # (steps, batch, h)
            Hs = tanh_recurrence(XW, state[0], self.W_hh)         # (steps, batch, h)
            return Hs, (Hs[-1],)
        return self.features_seed(X, state)

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
        return Hs.reshape(-1, Hs.shape[-1]) @ self.W_hq + self.b_q  # (steps*batch, vocab)

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
        return self.fused and self.config.kind == "rnn" and not self.config.bidirectional

    def features(self, X, state):
        if self.uses_fused:
            return self._features_fused(X, state)
        inputs = F.one_hot(X.T, self.config.vocab_size).float()  # (steps, batch, vocab)
        Y, state = self.rnn(inputs, state)                       # Y: (steps, batch, D*h)
        return Y, state

    def _features_fused(self, X, state):
        """nn.RNN's own parameters through tanh_recurrence, layer by layer."""
        finals, Hs = [], None
        for layer in range(self.config.num_layers):
            W_ih = getattr(self.rnn, f"weight_ih_l{layer}")       # (h, in)
            W_hh = getattr(self.rnn, f"weight_hh_l{layer}")       # (h, h)
            b = getattr(self.rnn, f"bias_ih_l{layer}") + getattr(self.rnn, f"bias_hh_l{layer}")
            if layer == 0:
                XW = F.embedding(X.T, W_ih.t()) + b               # (steps, batch, h)
            else:
                XW = Hs @ W_ih.t() + b                            # (steps, batch, h)
            Hs = tanh_recurrence(XW, state[layer], W_hh.t())
            finals.append(Hs[-1])
        return Hs, torch.stack(finals)                            # state: (layers, batch, h)

    def head(self, Hs):
        return self.linear(Hs.reshape(-1, Hs.shape[-1]))          # (steps*batch, vocab)

    def forward(self, X, state):
        Hs, state = self.features(X, state)
        return self.head(Hs), state


MODELS = {"scratch": RNNScratch, "rnn": RNNModel, "gru": RNNModel, "lstm": RNNModel}


def build_model(config: ModelConfig, fused: bool = True) -> nn.Module:
    return MODELS[config.kind](config, fused=fused)


def detach_state(state):
    """Cut the graph at a minibatch boundary (sequential partitioning keeps the values)."""
    if isinstance(state, tuple):
        return tuple(s.detach() for s in state)
    return state.detach()


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
