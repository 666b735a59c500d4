"""Data for the Inspect page: the seed's one-hot example, the shape of every stage of a forward
pass, the parameter table, the concatenation identity, a trained model reading a text, the
scratch RNN stepped through forward and back, and the hidden state's path through a passage.

Everything here returns plain data (dataclasses of tuples, floats, lists and tensors) so the page
only draws it and the tests check it without Streamlit:

    ex = seed_onehot_example(batch=2, steps=5)          # ex.onehot: (5, 2, 28), as the seed prints
    model = demo_model(ModelConfig("scratch", 28, 512))
    forward_shapes(model, ex.X).Y_shape                 # (10, 28) = (steps*batch, vocab)
    reading = read_text(model, vocab, "the time traveller", "seed")
    reading.perplexity, units_by_variance(reading.hidden)[:5]
    step_through(model, ex.X).dH_norm                   # (5,) ||dloss/dH_t||, the scratch RNN only
    hidden_trajectory(model, vocab, "the time machine").points   # (16, 2)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError
from .data import Vocab, normalize_prefix
from .models import ModelConfig, build_model, seeded
from .train import safe_exp

MAX_TEXT_CHARS = 2_000   # read_text reads at most this many characters (the page says so)
GATES = {"rnn": 1, "gru": 3, "lstm": 4}    # weight blocks stacked in torch.nn's weight matrices
GATE_NAMES = {"gru": "r, z, n", "lstm": "i, f, g, o"}  # their order in torch.nn's weight rows

Shape = tuple[int, ...]


def shape_of(t: torch.Tensor) -> Shape:
    return tuple(t.shape)


def describe_state(state) -> tuple[str, list[Shape]]:
    """What a model's state is, in words, and the shape of each tensor in it.

    scratch: a tuple (H,) as the seed's init_rnn_state; LSTM: a pair (h, c); nn.RNN / nn.GRU: one
    tensor (directions*layers, batch, hidden), on which len() would count its first axis.
    """
    if isinstance(state, tuple):
        if len(state) == 2:
            return "a pair (h, c)", [shape_of(s) for s in state]
        return f"a tuple of {len(state)} tensor" + "s" * (len(state) != 1), [shape_of(s) for s in state]
    return "one tensor, not a tuple", [shape_of(state)]


def demo_model(config: ModelConfig, seed: int = 0) -> nn.Module:
    """An untrained model with repeatable weights, built without touching the global RNG
    (the app serves several sessions from one process)."""
    return build_model(config, seed=seed).eval()


# -----------------------------------------------------------------------------
# the seed's worked example

@dataclass
class OneHotExample:
    """The seed's `X = torch.arange(10).reshape((2, 5)); F.one_hot(X.T, 28)`, any batch and steps."""
    X: torch.Tensor        # (batch, steps) int64 token ids
    onehot: torch.Tensor   # (steps, batch, vocab) int64, one_hot of X.T
    code: str              # the line that makes X, as the page prints it
    wrapped: bool          # batch*steps > vocab_size: ids were taken modulo the vocabulary


def seed_onehot_example(batch: int = 2, steps: int = 5, vocab_size: int = 28) -> OneHotExample:
    """X = arange(batch*steps) as a (batch, steps) batch (ids taken mod vocab_size so they stay
    valid), and its one-hot encoding, time-major because the model loops over the first axis."""
    if batch < 1 or steps < 1 or vocab_size < 2:
        raise UserError("Batch and steps must be at least 1 and the vocabulary at least 2.")
    n = batch * steps
    X = (torch.arange(n) % vocab_size).reshape(batch, steps)   # (batch, steps)
    onehot = F.one_hot(X.T, vocab_size)                         # (steps, batch, vocab)
    code = f"X = torch.arange({n}).reshape(({batch}, {steps}))"
    if n > vocab_size:
        code = f"X = (torch.arange({n}) % {vocab_size}).reshape(({batch}, {steps}))"
    return OneHotExample(X=X, onehot=onehot, code=code, wrapped=n > vocab_size)


@dataclass
class ForwardShapes:
    """What `Y, new_state = net(X, net.begin_state(batch))` gives, as the seed prints it."""
    X_shape: Shape
    Y_shape: Shape          # (steps*batch, vocab)
    state_what: str         # "a tuple of 1 tensor", "a pair (h, c)", "one tensor, not a tuple"
    state_len: int | None   # len(new_state) for a tuple; None for a bare tensor
    state_shapes: list[Shape]
    steps: int
    batch: int
    vocab_size: int


@torch.no_grad()
def forward_shapes(model: nn.Module, X: torch.Tensor) -> ForwardShapes:
    """Run X (batch, steps) through the model from a zero state and record the shapes."""
    batch, steps = X.shape
    Y, state = model(X, model.begin_state(batch, X.device))    # Y: (steps*batch, vocab)
    what, shapes = describe_state(state)
    return ForwardShapes(X_shape=shape_of(X), Y_shape=shape_of(Y), state_what=what,
                         state_len=len(state) if isinstance(state, tuple) else None,
                         state_shapes=shapes, steps=steps, batch=batch,
                         vocab_size=model.config.vocab_size)


@dataclass
class LayerExample:
    """The seed's concise example: a torch.nn recurrent layer alone on (steps, batch, vocab)."""
    code: str
    X_shape: Shape          # (steps, batch, vocab)
    Y_shape: Shape          # (steps, batch, directions*hidden): every step's top-layer state
    state_what: str
    state_shapes: list[Shape]


LAYER_CLASSES = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}


def layer_code(kind: str, vocab_size: int, hidden_size: int, num_layers: int = 1,
               bidirectional: bool = False) -> str:
    """How the seed would write the layer: nn.LSTM(28, 256, num_layers=2, bidirectional=True)."""
    extra = "".join([f", num_layers={num_layers}" if num_layers != 1 else "",
                     ", bidirectional=True" if bidirectional else ""])
    return f"nn.{LAYER_CLASSES[kind].__name__}({vocab_size}, {hidden_size}{extra})"


@torch.no_grad()
def layer_example(kind: str = "rnn", vocab_size: int = 28, hidden_size: int = 256, num_layers: int = 1,
                  bidirectional: bool = False, batch: int = 32, steps: int = 35) -> LayerExample:
    """`rnn_layer = nn.RNN(len(vocab), num_hiddens)` on `torch.rand(num_steps, batch_size, len(vocab))`:
    the layer returns every step's hidden state, not logits (the seed adds the Linear layer after)."""
    if kind not in LAYER_CLASSES:
        raise UserError(f"The concise layer is one of {', '.join(LAYER_CLASSES)}, not {kind!r}.")
    cls = LAYER_CLASSES[kind]
    with seeded(0):
        layer = cls(vocab_size, hidden_size, num_layers=num_layers, bidirectional=bidirectional)
        X = torch.rand(steps, batch, vocab_size)                # (steps, batch, vocab)
    D = 2 if bidirectional else 1
    zeros = torch.zeros(D * num_layers, batch, hidden_size)     # (D*layers, batch, hidden)
    state = (zeros, zeros.clone()) if kind == "lstm" else zeros
    Y, new_state = layer(X, state)                              # Y: (steps, batch, D*hidden)
    what, shapes = describe_state(new_state)
    return LayerExample(code=layer_code(kind, vocab_size, hidden_size, num_layers, bidirectional),
                        X_shape=shape_of(X), Y_shape=shape_of(Y), state_what=what, state_shapes=shapes)


# -----------------------------------------------------------------------------
# the shape trace and the parameter table

@dataclass
class TraceRow:
    stage: str
    shape: Shape
    dtype: str
    note: str


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


@torch.no_grad()
def shape_trace(model: nn.Module, X: torch.Tensor, Y: torch.Tensor | None = None) -> list[TraceRow]:
    """Every stage of one forward pass and the loss, with the shapes the tensors really have.

    X, Y: (batch, steps) ids; Y defaults to X shifted by one id (only its shape matters here).
    """
    cfg = model.config
    batch, steps = X.shape
    V, L = cfg.vocab_size, cfg.num_layers
    D = 2 if cfg.bidirectional else 1
    if Y is None:
        Y = (X + 1) % V
    rows = [TraceRow("input ids X", shape_of(X), _dtype(X), "(batch, steps): one row per subsequence"),
            TraceRow("X.T", shape_of(X.T), _dtype(X), "time-major (steps, batch): the loop walks the first axis")]
    onehot = F.one_hot(X.T, V).float()                          # (steps, batch, vocab)
    rows.append(TraceRow("one-hot(X.T, vocab)", shape_of(onehot), _dtype(onehot),
                         "each id becomes a row of the identity matrix: token i lights column i"))
    if cfg.kind == "scratch":
        XW = onehot @ model.W_xh + model.b_h                    # (steps, batch, h)
        rows.append(TraceRow("X_t @ W_xh + b_h, all t", shape_of(XW), _dtype(XW),
                             f"one-hot times W_xh picks row x_t of W_xh: the {model.kernel.name} kernel "
                             + ("(cuDNN, on a GPU) multiplies it" if model.W_hh.is_cuda else
                                "does this as an embedding lookup")
                             if model.kernel.fused else "the input's share of every step"))
    elif model.kernel.fused:
        W_ih, b = model.rnn.weight_ih_l0, model.rnn.bias_ih_l0 + model.rnn.bias_hh_l0
        XW = F.embedding(X.T, W_ih.t()) + b                     # (steps, batch, h)
        rows.append(TraceRow("X_t @ W_ih.T + b, all t", shape_of(XW), _dtype(XW),
                             f"the {model.kernel.name} kernel: one-hot times W_ih done as an embedding lookup"))
    state = model.begin_state(batch, X.device)
    rows.append(_state_row("state in (begin_state)", state,
                           "" if cfg.kind == "scratch" else " — (directions*layers, batch, hidden)"))
    Hs, new_state = model.features(X, state)                    # (steps, batch, D*h)
    if cfg.kind == "scratch":
        per_step = "(batch, hidden): tanh(X_t W_xh + H_{t-1} W_hh + b_h)"
    elif D == 2:
        per_step = "(batch, directions*hidden): the top layer's state after step t, forward and backward halves"
    else:
        per_step = "(batch, hidden): the top layer's state after step t"
    rows.append(TraceRow(f"H_t, each of t = 1…{steps}", shape_of(Hs[0]), _dtype(Hs), per_step))
    rows.append(TraceRow("outputs stacked", shape_of(Hs), _dtype(Hs),
                         "torch.stack(outputs): (steps, batch, hidden)" if cfg.kind == "scratch" else
                         f"nn.{LAYER_CLASSES[cfg.kind].__name__}'s Y: every step's top-layer state, "
                         "(steps, batch, directions*hidden)"))
    flat = Hs.reshape(-1, Hs.shape[-1])                        # (steps*batch, D*h)
    rows.append(TraceRow("reshape(-1, Hs.shape[-1])", shape_of(flat), _dtype(flat),
                         f"rows step-major: row t*{batch}+b is step t of sequence b"))
    logits = model.head(Hs)                                     # (steps*batch, vocab)
    rows.append(TraceRow("logits Y_hat", shape_of(logits), _dtype(logits),
                         "W_hq + b_q on every row: one score per vocabulary token" if cfg.kind == "scratch"
                         else "nn.Linear on every row: one score per vocabulary token"))
    y = Y.T.reshape(-1)                                         # (steps*batch,) in Y_hat's row order
    rows.append(TraceRow("targets Y.T.reshape(-1)", shape_of(y), _dtype(y),
                         "transposed like X so row r of Y_hat is scored against y[r]"))
    loss = F.cross_entropy(logits, y)                           # () mean over steps*batch
    rows.append(TraceRow("loss = cross_entropy(Y_hat, y)", shape_of(loss), _dtype(loss),
                         f"a scalar, the mean over {steps * batch} predictions: {loss.item():.3f} "
                         f"(an untrained model sits near log {V} = {math.log(V):.3f})"))
    rows.append(_state_row("state out", new_state,
                           "" if cfg.kind == "scratch" else f"; {D * L} = directions × layers"))
    return rows


def _state_row(stage: str, state, note: str) -> TraceRow:
    """A trace row for a state: the first tensor's shape, and what the state is in words."""
    what, shapes = describe_state(state)
    first = state[0] if isinstance(state, tuple) else state
    more = f", {len(shapes)} of this shape" if len(shapes) > 1 else ""
    return TraceRow(stage, shapes[0], _dtype(first), what + more + note)


@dataclass
class ParamRow:
    name: str
    shape: Shape
    count: int
    role: str


@dataclass
class ParamTable:
    rows: list[ParamRow]
    total: int


SCRATCH_ROLES = {
    "W_xh": "input → hidden: row i is what token i adds to the pre-activation",
    "W_hh": "hidden → hidden: the recurrence",
    "b_h": "hidden bias",
    "W_hq": "hidden → output logits",
    "b_q": "output bias",
}


def _nn_role(name: str, kind: str) -> str:
    """A few words on a torch.nn parameter name such as rnn.weight_ih_l1_reverse."""
    if name.startswith("linear."):
        return "output layer (nn.Linear stores (out, in))" if name.endswith("weight") else "output bias"
    base = name.split(".", 1)[1]                                # weight_ih_l0[_reverse]
    what, _, layer = base.partition("_l")
    layer, reverse = layer.removesuffix("_reverse"), layer.endswith("_reverse")
    role = {"weight_ih": "input → hidden", "weight_hh": "hidden → hidden",
            "bias_ih": "input bias", "bias_hh": "hidden bias"}[what]
    role += f", layer {layer}" + (", backward direction" if reverse else "")
    if kind in GATE_NAMES:
        role += f"; {GATES[kind]} blocks stacked ({GATE_NAMES[kind]})"
    return role


def parameter_table(model: nn.Module) -> ParamTable:
    """Every parameter with its shape and count, in the model's own order, and the total."""
    kind = model.config.kind
    rows = [ParamRow(name, shape_of(p), p.numel(),
                     SCRATCH_ROLES.get(name, "") if kind == "scratch" else _nn_role(name, kind))
            for name, p in model.named_parameters()]
    return ParamTable(rows=rows, total=sum(r.count for r in rows))


# -----------------------------------------------------------------------------
# the concatenation identity

@dataclass
class ConcatIdentity:
    """The seed's check that X W_xh + H W_hh = cat(X, H, 1) @ cat(W_xh, W_hh, 0)."""
    X: torch.Tensor            # (3, 1)
    W_xh: torch.Tensor         # (1, 4)
    H: torch.Tensor            # (3, 4)
    W_hh: torch.Tensor         # (4, 4)
    separate: torch.Tensor     # (3, 4) X @ W_xh + H @ W_hh
    concatenated: torch.Tensor  # (3, 4) cat((X, H), 1) @ cat((W_xh, W_hh), 0)
    max_abs_diff: float
    shapes: dict[str, Shape]


def concat_identity(seed: int = 0, n: int = 3, d: int = 1, h: int = 4) -> ConcatIdentity:
    """Two ways to compute a hidden layer's pre-activation; they agree to float rounding."""
    g = torch.Generator().manual_seed(seed)
    X, W_xh = torch.randn(n, d, generator=g), torch.randn(d, h, generator=g)   # (3, 1), (1, 4)
    H, W_hh = torch.randn(n, h, generator=g), torch.randn(h, h, generator=g)   # (3, 4), (4, 4)
    separate = X @ W_xh + H @ W_hh                              # (3, 4)
    XH, W = torch.cat((X, H), 1), torch.cat((W_xh, W_hh), 0)    # (3, 5), (5, 4)
    concatenated = XH @ W                                       # (3, 4)
    shapes = {"X": shape_of(X), "W_xh": shape_of(W_xh), "H": shape_of(H), "W_hh": shape_of(W_hh),
              "cat((X, H), 1)": shape_of(XH), "cat((W_xh, W_hh), 0)": shape_of(W),
              "result": shape_of(separate)}
    return ConcatIdentity(X=X, W_xh=W_xh, H=H, W_hh=W_hh, separate=separate, concatenated=concatenated,
                          max_abs_diff=(separate - concatenated).abs().max().item(), shapes=shapes)


# -----------------------------------------------------------------------------
# a trained model reading a text

@dataclass
class TextReading:
    """What a model makes of a text, one entry per character.

    Position t: the hidden state after reading chars[:t+1], the model's guesses for chars[t+1],
    the probability it gave to the character that actually follows, and -log of it (the loss).
    The last character has no follower, so its p_next and loss are None.
    """
    chars: list[str]                          # as the model reads them (normalised, capped)
    ids: list[int]
    unknown: list[bool]                       # per character: not in the vocabulary, read as <unk> (id 0)
    truncated: bool                           # the text was longer than max_chars
    hidden: torch.Tensor                      # (n, directions*hidden) top-layer state after each char
    top: list[list[tuple[str, float]]]        # per position: the top_k (token, probability) guesses
    p_next: list[float | None]
    loss: list[float | None]                  # nats
    mean_loss: float | None                   # over the n-1 predictions
    perplexity: float | None                  # exp(mean_loss); None under 2 characters
    vocab_size: int
    honest: bool                              # False for a bidirectional model: it saw the answer
    unknown_chars: list[str] = field(default_factory=list)

    @property
    def n_predictions(self) -> int:
        return max(len(self.chars) - 1, 0)


@torch.no_grad()
def read_text(model: nn.Module, vocab: Vocab, text: str, preprocessing: str = "seed", top_k: int = 3,
              max_chars: int = MAX_TEXT_CHARS) -> TextReading:
    """Run `text` through the model from a zero state in one call and collect, per character,
    the hidden state, the top guesses for the next character and the loss of the actual one."""
    chars = list(normalize_prefix(text, preprocessing))
    truncated = len(chars) > max_chars
    chars = chars[:max_chars]
    ids = vocab.encode(chars)
    unknown = [c not in vocab for c in chars]
    cfg = model.config
    n, D = len(chars), (2 if cfg.bidirectional else 1)
    hidden = torch.zeros(n, D * cfg.hidden_size)                # (n, D*h)
    top: list[list[tuple[str, float]]] = [[] for _ in chars]
    losses: list[float] = []
    if chars:
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            X = torch.tensor([ids], device=device)               # (1, n)
            Hs, _ = model.features(X, model.begin_state(1, device))  # (n, 1, D*h)
            logits = model.head(Hs).float()                       # (n, vocab): row t guesses char t+1
        finally:
            model.train(was_training)
        hidden = Hs[:, 0].float().cpu()                           # (n, D*h)
        logp = F.log_softmax(logits, dim=-1).cpu()                # (n, vocab)
        top_p, top_i = torch.topk(logp.exp(), min(top_k, len(vocab)), dim=-1)  # (n, k) each
        top = [[(vocab.idx_to_token[i], p) for p, i in zip(ps, is_)]
               for ps, is_ in zip(top_p.tolist(), top_i.tolist())]
        target = torch.tensor(ids[1:])                            # (n-1,) the characters that follow
        losses = (-logp[:-1].gather(1, target.unsqueeze(1))).squeeze(1).tolist()  # (n-1,) nats
    mean = sum(losses) / len(losses) if losses else None
    return TextReading(chars=chars, ids=ids, unknown=unknown, truncated=truncated, hidden=hidden, top=top,
                       p_next=[math.exp(-x) for x in losses] + [None] * (n - len(losses)),
                       loss=losses + [None] * (n - len(losses)), mean_loss=mean,
                       perplexity=safe_exp(mean) if mean is not None else None, vocab_size=len(vocab),
                       honest=not cfg.bidirectional,
                       unknown_chars=sorted({c for c, u in zip(chars, unknown) if u}))


def units_by_variance(hidden: torch.Tensor) -> list[int]:
    """Hidden units ordered by the variance of their activation over the text, largest first
    (ties by index): units that change with the text are the ones worth looking at."""
    var = unit_variances(hidden)                                # (units,)
    return torch.sort(var, descending=True, stable=True).indices.tolist()


def unit_variances(hidden: torch.Tensor) -> torch.Tensor:
    """(units,) variance of each unit over the text (0 for fewer than 2 characters)."""
    return hidden.float().var(dim=0) if hidden.shape[0] >= 2 else torch.zeros(hidden.shape[1])


def unit_profile(reading: TextReading, unit: int) -> list[tuple[str, float, int]]:
    """(character, mean activation of `unit` right after reading it, how often it occurs), most
    positive first: a first guess at what the unit responds to."""
    acts = reading.hidden[:, unit].tolist()                    # (n,) as floats
    sums: dict[str, list[float]] = {}
    for c, a in zip(reading.chars, acts):
        sums.setdefault(c, []).append(a)
    profile = [(c, sum(v) / len(v), len(v)) for c, v in sums.items()]
    return sorted(profile, key=lambda row: row[1], reverse=True)


@dataclass
class PerplexityNumbers:
    """Perplexity = exp(mean loss): the number of equally likely characters the model is as unsure as."""
    uniform: float             # a model that gives every token 1/V: perplexity V
    uniform_loss: float        # log V nats
    best: float                # always certain and right: loss 0, perplexity 1
    actual: float | None
    actual_loss: float | None
    n_predictions: int


def perplexity_numbers(reading: TextReading) -> PerplexityNumbers:
    V = reading.vocab_size
    return PerplexityNumbers(uniform=float(V), uniform_loss=math.log(V), best=1.0,
                             actual=reading.perplexity, actual_loss=reading.mean_loss,
                             n_predictions=reading.n_predictions)


# -----------------------------------------------------------------------------
# the scratch RNN, one step at a time, forward and back

@dataclass
class StepThrough:
    """Every intermediate of one forward and backward pass of the seed's scratch RNN on one batch.

    T steps, B sequences, V tokens, h hidden units; index t = 0 is the book's step 1. The state
    starts at zero (begin_state) and the loss is the training loop's: the mean cross-entropy over
    all T*B predictions.
    """
    X: torch.Tensor            # (B, T) input ids
    Y: torch.Tensor            # (B, T) target ids: the token after each input
    onehot: torch.Tensor       # (T, B, V) one_hot(X.T)
    XW: torch.Tensor           # (T, B, h) X_t W_xh: row x_t of W_xh
    HW: torch.Tensor           # (T, B, h) H_{t-1} W_hh, with H_0 = 0
    pre: torch.Tensor          # (T, B, h) X_t W_xh + H_{t-1} W_hh + b_h
    H: torch.Tensor            # (T, B, h) tanh(pre)
    O: torch.Tensor            # (T, B, V) H_t W_hq + b_q, the logits
    P: torch.Tensor            # (T, B, V) softmax(O_t) over the V tokens
    losses: torch.Tensor       # (T, B) -log P_t[y_t], nats
    loss: float                # losses.mean(): what training minimises
    dO: torch.Tensor           # (T, B, V) dloss/dO_t = (P_t - one_hot(y_t)) / (T*B)
    dH_out: torch.Tensor       # (T, B, h) the share of dH reaching H_t from its own output O_t
    dH_next: torch.Tensor      # (T, B, h) the share coming back from H_{t+1} through tanh and W_hh
    dH: torch.Tensor           # (T, B, h) dloss/dH_t = dH_out + dH_next, all later steps included
    grads: dict[str, torch.Tensor]   # dloss/dW for W_xh, W_hh, b_h, W_hq, b_q
    grad_norm: float           # ||g||: the global norm over all five gradients
    theta: float
    clip_factor: float         # min(1, theta / ||g||): what clipping multiplies every gradient by

    @property
    def dH_norm(self) -> torch.Tensor:
        """(T,) ||dloss/dH_t|| over the whole batch, step by step."""
        return self.dH.flatten(1).norm(dim=1)

    @property
    def dH_out_norm(self) -> torch.Tensor:
        return self.dH_out.flatten(1).norm(dim=1)                # (T,)

    @property
    def dH_next_norm(self) -> torch.Tensor:
        return self.dH_next.flatten(1).norm(dim=1)               # (T,) zero at step T

    @property
    def grad_norms(self) -> dict[str, float]:
        return {name: g.norm().item() for name, g in self.grads.items()}


def worked_example_targets(X: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The seed's X = arange(10).reshape(2, 5) cut from the sequence 0, 1, 2, ...: each input's
    next token is its id + 1 (mod V), which for t < T is the next input X_{t+1}."""
    return (X + 1) % vocab_size


@torch.no_grad()
def step_through(model: nn.Module, X: torch.Tensor, Y: torch.Tensor | None = None,
                 theta: float = 1.0) -> StepThrough:
    """Run the scratch RNN's recurrence by hand on X (B, T), keeping every intermediate, then
    backpropagate through time by hand, step T back to step 1, and measure clipping.

    The backward pass is written out rather than taken from autograd so each step's share can be
    shown; tests/test_inspection.py holds it to autograd. Y defaults to X's next tokens.
    """
    if model.config.kind != "scratch":
        raise UserError("The step-through follows the from-scratch RNN's W_xh, W_hh, b_h, W_hq and b_q; "
                        f"this is a {model.config.kind} model.")
    V = model.config.vocab_size
    if Y is None:
        Y = worked_example_targets(X, V)
    # float32 on the CPU whatever the model runs on: these are numbers to look at
    W_xh, W_hh, b_h, W_hq, b_q = (getattr(model, n).detach().float().cpu()
                                  for n in ("W_xh", "W_hh", "b_h", "W_hq", "b_q"))
    X, Y = X.cpu(), Y.cpu()
    B, T = X.shape
    h = W_hh.shape[0]
    onehot = F.one_hot(X.T, V).float()                          # (T, B, V)
    XW, HW, pre, H = (torch.zeros(T, B, h) for _ in range(4))   # (T, B, h) each
    H_prev = torch.zeros(B, h)                                  # H_0, as begin_state
    for t in range(T):
        XW[t] = onehot[t] @ W_xh                                # (B, h)
        HW[t] = H_prev @ W_hh                                   # (B, h)
        pre[t] = XW[t] + HW[t] + b_h
        H[t] = H_prev = torch.tanh(pre[t])
    O = H @ W_hq + b_q                                          # (T, B, V)
    logP = F.log_softmax(O, dim=-1)                             # (T, B, V)
    target = F.one_hot(Y.T, V).float()                          # (T, B, V)
    losses = -(logP * target).sum(-1)                           # (T, B)

    # backward: the mean over T*B predictions gives each one a 1/(T*B) share of the loss
    dO = (logP.exp() - target) / (T * B)                        # (T, B, V) dloss/dO_t
    dH_out = dO @ W_hq.T                                        # (T, B, h)
    dH_next, dH = torch.zeros(T, B, h), torch.zeros(T, B, h)
    grads = {"W_xh": torch.zeros_like(W_xh), "W_hh": torch.zeros_like(W_hh), "b_h": torch.zeros_like(b_h),
             "W_hq": torch.einsum("tbh,tbv->hv", H, dO), "b_q": dO.sum((0, 1))}
    from_later = torch.zeros(B, h)                              # nothing comes back from after step T
    for t in reversed(range(T)):
        dH_next[t] = from_later
        dH[t] = dH_out[t] + from_later                          # (B, h)
        dA = dH[t] * (1 - H[t] ** 2)                            # (B, h) through tanh: 1 - tanh^2
        H_before = H[t - 1] if t > 0 else torch.zeros(B, h)
        grads["W_xh"] += onehot[t].T @ dA                       # (V, h)
        grads["W_hh"] += H_before.T @ dA                        # (h, h)
        grads["b_h"] += dA.sum(0)
        from_later = dA @ W_hh.T                                # (B, h) what H_{t-1} receives
    grad_norm = torch.sqrt(sum((g ** 2).sum() for g in grads.values())).item()
    clip = min(1.0, theta / grad_norm) if grad_norm > 0 else 1.0
    return StepThrough(X=X, Y=Y, onehot=onehot, XW=XW, HW=HW, pre=pre, H=H, O=O, P=logP.exp(),
                       losses=losses, loss=losses.mean().item(), dO=dO, dH_out=dH_out, dH_next=dH_next, dH=dH,
                       grads=grads, grad_norm=grad_norm, theta=theta, clip_factor=clip)


# -----------------------------------------------------------------------------
# the hidden state's path through a passage, in two dimensions

MAX_TRAJECTORY_CHARS = 400   # a labelled point per character: more would be a blot (the page says so)


@dataclass
class PCA2:
    """The two directions along which a cloud of points varies most."""
    points: torch.Tensor       # (n, 2) each row's coordinates along them
    components: torch.Tensor   # (2, d) unit vectors, largest variance first
    explained: torch.Tensor    # (2,) the fraction of the total variance along each
    mean: torch.Tensor         # (d,) subtracted before projecting


def pca_2d(rows: torch.Tensor) -> PCA2:
    """PCA through an SVD of the centred rows: X - mean = U S V^T, points = U S (= (X - mean) V),
    variance along component k proportional to S_k^2. Each component's sign is chosen so its
    largest loading is positive (an SVD may return either sign). Fewer than two non-zero directions
    (one row, one unit, identical rows) give zero columns and zero fractions, never NaN."""
    n, d = rows.shape
    X = rows.double()
    mean = X.mean(0) if n else torch.zeros(d, dtype=torch.float64)
    centred = X - mean                                          # (n, d)
    U, S, Vh = torch.linalg.svd(centred, full_matrices=False)   # (n, k), (k,), (k, d); k = min(n, d)
    k = min(2, S.numel())
    signs = torch.sign(Vh[:k].gather(1, Vh[:k].abs().argmax(1, keepdim=True))).squeeze(1)  # (k,)
    signs[signs == 0] = 1
    points, components, explained = torch.zeros(n, 2), torch.zeros(2, d), torch.zeros(2)
    points[:, :k] = (U[:, :k] * S[:k] * signs).float()          # (n, k)
    components[:k] = (Vh[:k] * signs[:, None]).float()          # (k, d)
    total = (S ** 2).sum()
    if total > 0:
        explained[:k] = (S[:k] ** 2 / total).float()
    return PCA2(points=points, components=components, explained=explained, mean=mean.float())


@dataclass
class Trajectory:
    """The top layer's hidden state after each character of a passage, projected on its two
    principal components: the path the state takes as the model reads."""
    chars: list[str]
    ids: list[int]
    points: torch.Tensor       # (n, 2)
    explained: torch.Tensor    # (2,) fractions of the variance of H_t over the passage
    units: int                 # the width of the states the PCA read
    what: str                  # which state, in words
    truncated: bool            # the text was longer than max_chars
    unknown_chars: list[str]


def hidden_trajectory(model: nn.Module, vocab: Vocab, text: str, preprocessing: str = "seed",
                      max_chars: int = MAX_TRAJECTORY_CHARS) -> Trajectory:
    """Read `text` from a zero state (read_text does) and PCA its hidden states.

    The states are the top layer's h (for the LSTM not its cell c). A bidirectional model's
    backward half has read the passage from its end, so only the forward half is used: the path
    then means "what the model knows after reading up to here", as for the other models.
    """
    cfg = model.config
    reading = read_text(model, vocab, text, preprocessing, top_k=1, max_chars=max_chars)
    hidden = reading.hidden[:, :cfg.hidden_size]                # (n, h) forward direction first in torch.nn
    what = {"scratch": "H_t", "rnn": "h_t", "gru": "h_t", "lstm": "h_t (not the memory cell c_t)"}[cfg.kind]
    if cfg.num_layers > 1:
        what += f" of the top layer (layer {cfg.num_layers})"
    if cfg.bidirectional:
        what += ", forward direction only"
    pca = pca_2d(hidden)
    return Trajectory(chars=reading.chars, ids=reading.ids, points=pca.points, explained=pca.explained,
                      units=hidden.shape[1], what=what, truncated=reading.truncated,
                      unknown_chars=reading.unknown_chars)
