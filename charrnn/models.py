"""The models: the seed's from-scratch RNN and its concise nn.RNN / nn.GRU / nn.LSTM relative.

Every model has one interface (the seed's):

    Y, state = model(X, state)      X: (batch, steps) token ids  ->  Y: (steps*batch, vocab) logits
    state = model.begin_state(batch_size, device)

and splits it in two, so the Inspect page can look at the hidden states themselves:

    Hs, state = model.features(X, state)    Hs: (steps, batch, directions*hidden), top layer
    Y = model.head(Hs)                      Y:  (steps*batch, vocab)

How the tanh layers run is `model.kernel` (charrnn/kernels): the book's loop over one-hot inputs
(`reference`, a new model's default), or a fused kernel that takes the same weights: one autograd op
in torch, C loops per instruction set, bf16 loops, cuDNN. All give the same outputs and gradients
(tests/test_models.py and tests/test_kernels_fp32.py hold them to it). build_model picks the
fastest for the CPU; the Trainer picks one per run.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .errors import UserError
from .kernels.fused import linear_head

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
# the seed's from-scratch RNN

class RNNScratch(nn.Module):
    """The seed's RNN with explicit parameters: H_t = tanh(X_t W_xh + H_{t-1} W_hh + b_h),
    O_t = H_t W_hq + b_q. Its state is a tuple (H,), as the seed's init_rnn_state returns."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.kernel = kernels.REFERENCE                  # how features() runs (charrnn/kernels)
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
        kernel = self.kernel.for_mode(self.training)
        if not kernel.fused:
            return self.features_seed(X, state)
        # the same step as features_seed: row x_t of W_xh is one_hot(x_t) @ W_xh
        Hs = kernel.layer(X.T, self.W_xh, self.b_h, state[0], self.W_hh)  # (steps, batch, h)
        return Hs, (Hs[-1],)

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
        kernel = self.kernel.for_mode(self.training)
        if kernel.head is not None:
            return kernel.head(Hs, self.W_hq, self.b_q)          # (steps*batch, vocab)
        return linear_head(Hs, self.W_hq, self.b_q)

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

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.kernel = kernels.REFERENCE                  # reference: torch.nn's layer (charrnn/kernels)
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

    def features(self, X, state):
        kernel = self.kernel.for_mode(self.training)
        if kernel.fused:
            return self._features_fused(kernel, X, state)
        inputs = F.one_hot(X.T, self.config.vocab_size).float()  # (steps, batch, vocab)
        Y, state = self.rnn(inputs, state)                       # Y: (steps, batch, D*h)
        return Y, state

    def _features_fused(self, kernel, X, state):
        """nn.RNN's own parameters through a fused kernel, layer by layer."""
        finals, inputs = [], X.T                                  # layer 0 reads ids (steps, batch)
        for layer in range(self.config.num_layers):
            W_ih = getattr(self.rnn, f"weight_ih_l{layer}")       # (h, in)
            W_hh = getattr(self.rnn, f"weight_hh_l{layer}")       # (h, h)
            b = getattr(self.rnn, f"bias_ih_l{layer}") + getattr(self.rnn, f"bias_hh_l{layer}")
            inputs = kernel.layer(inputs, W_ih.t(), b, state[layer], W_hh.t())  # (steps, batch, h)
            finals.append(inputs[-1])
        return inputs, torch.stack(finals)                        # state: (layers, batch, h)

    def head(self, Hs):
        kernel = self.kernel.for_mode(self.training)
        if kernel.head is not None:                               # nn.Linear's weight is (vocab, h)
            return kernel.head(Hs, self.linear.weight.t(), self.linear.bias)
        return self.linear(Hs.reshape(-1, Hs.shape[-1]))          # (steps*batch, vocab)

    def forward(self, X, state):
        Hs, state = self.features(X, state)
        return self.head(Hs), state


MODELS = {"scratch": RNNScratch, "rnn": RNNModel, "gru": RNNModel, "lstm": RNNModel}


_RNG_LOCK = threading.RLock()


@contextmanager
def seeded(seed: int):
    """Random initialisation from `seed` that neither reads nor disturbs the global RNG state, and
    cannot interleave with another thread's (the app builds models in several threads)."""
    with _RNG_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_model(config: ModelConfig, seed: int | None = None, kernel: str = "auto",
                device="cpu") -> nn.Module:
    """The model for `config`, its tanh layers run by `kernel` (auto: the fastest fp32 one on
    `device`, see charrnn.kernels.select); with `seed`, its initial weights depend on that seed alone."""
    if seed is None:
        model = MODELS[config.kind](config)
    else:
        with seeded(seed):
            model = MODELS[config.kind](config)
    model.kernel = kernels.select(config, device, "fp32" if kernel == "auto" else "auto", kernel)
    return model


def detach_state(state):
    """Cut the graph at a minibatch boundary (sequential partitioning keeps the values)."""
    if isinstance(state, tuple):
        return tuple(s.detach() for s in state)
    return state.detach()
