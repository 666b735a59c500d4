"""Gradient flow through time: how much the loss at the last step feels each earlier step.

    X, Y = probe_batch(corpus.train, batch_size=32, num_steps=35)  # one fixed minibatch per run
    flow = gradient_flow(model, X, Y)        # flow.h_norms[t-1] = ||dl_T/dh_t||, t = 1..T
    sigma = largest_singular_value(model)    # sigma_max of W_hh: > 1 can explode, < 1 vanishes

The seed's section on gradient clipping says that backpropagation over T steps multiplies O(T)
Jacobians dh_t/dh_{t-1} = diag(1 - h_t^2) W_hh^T, so the gradient reaching an early step can
vanish or explode. gradient_flow measures it on one minibatch: the loss l_T (mean cross-entropy
over the batch at the LAST step only) differentiated with respect to

    h_t   the state the recurrence carries from step t to step t+1, from a zero state at t = 0:
          H for the scratch RNN and nn.RNN, every layer's (layers, batch, h) for stacked layers,
          (h, c) together for the LSTM;
    x_t   the one-hot input of step t, as a float tensor (input saliency).

Each norm is the Frobenius norm over the whole batch (the batch's states as one vector): the
gradient of the batch-mean loss, so a sequence contributes 1/batch of it. What the pictures read
is its shape along t (a straight line on a log axis: geometric vanishing or growth), which the
choice of norm does not change.

It runs the model's own weights in fp32 through the plain autograd path, step by step, whatever
kernel trains the model (a fused or bf16 kernel has no per-step h_t to differentiate), and leaves
the model alone: weights, their .grad and train/eval mode are untouched (torch.autograd.grad with
the h_t and x_t as inputs, never .backward()).

Both run their CPU ops on one thread. They are many small ops (a (batch, h) step at a time), which
a second thread speeds up little; and where another process holds one of the cores (the app's
server and browser beside a run, another run), every op of a two-thread team waits for the
descheduled thread, and a probe takes tens of times longer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .device import cpu_threads
from .errors import UserError


@dataclass(frozen=True)
class GradFlow:
    """One probe: plain floats, index i is step t = i + 1 (the last entry is the last step)."""
    h_norms: list[float]    # (num_steps,) ||dl_T/dh_t||, the state after step t
    x_norms: list[float]    # (num_steps,) ||dl_T/dx_t||, the one-hot input of step t
    loss: float             # l_T itself


def probe_batch(tokens: torch.Tensor, batch_size: int, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed (batch_size, num_steps) minibatch of `tokens` and its targets, the same every call.

    Row i starts at i * last // (batch_size - 1): evenly spread over the text from its start to
    the last full window, so the probe sees the whole training slice. No random numbers are drawn,
    so probing cannot change the minibatch order of training.

        tokens  t0 t1 t2 t3 t4 t5 t6 t7 t8 t9      (batch 2, steps 3: last start = 10 - 1 - 3 = 6)
        X       t0 t1 t2  /  t6 t7 t8
        Y       t1 t2 t3  /  t7 t8 t9
    """
    last = len(tokens) - 1 - num_steps                          # the last start with a full Y
    if last < 0:
        raise UserError(f"The text has {len(tokens)} tokens, fewer than one probe of {num_steps} steps needs.")
    starts = torch.tensor([i * last // max(batch_size - 1, 1) for i in range(batch_size)])
    index = starts[:, None] + torch.arange(num_steps)            # (batch, steps)
    return tokens[index], tokens[index + 1]                      # X, Y: (batch, steps) int64


def gradient_flow(model, X: torch.Tensor, Y: torch.Tensor) -> GradFlow:
    """||dl_T/dh_t|| and ||dl_T/dx_t|| for t = 1..num_steps on the minibatch X, Y (batch, steps).

    UserError for a bidirectional model: its backward direction reads the future, so no state
    formed by steps 1..t alone exists.
    """
    config = model.config
    if config.bidirectional:
        raise UserError("Gradient flow through time needs a unidirectional model: a bidirectional "
                        "layer reads the future, so no hidden state is formed by the past alone.")
    device = next(model.parameters()).device
    X, y_T = X.to(device), Y[:, -1].to(device)                   # only the last step's targets count
    # callers may hold no_grad (the app's pages)
    with torch.enable_grad(), cpu_threads(1):
        x = F.one_hot(X.T, config.vocab_size).float().requires_grad_()  # (steps, batch, vocab), a leaf
        step, head, state = _stepper(model, X.shape[0], device)
        states = []
        for x_t in x:                                            # x_t: (batch, vocab)
            # the carried state gets its own node, so dl_T/dh_t counts only the paths through later
            # steps, not (with stacked layers) through the upper layers of step t itself
            state = [s.view_as(s) for s in step(x_t, state)]
            states.append(state)
        loss = F.cross_entropy(head(state), y_T)                 # l_T, mean over the batch
        flat = [s for state in states for s in state]
        grads = torch.autograd.grad(loss, [x] + flat, allow_unused=True)
    per_step, zero = len(states[0]), torch.zeros((), device=device)
    squares = torch.stack([sum((g.square().sum() for g in grads[1 + t * per_step: 1 + (t + 1) * per_step]
                                if g is not None), zero)          # None: a part l_T does not read (c_T)
                           for t in range(len(states))])         # (steps,)
    x_norms = torch.linalg.vector_norm(grads[0].flatten(1), dim=1)  # (steps,)
    return GradFlow(squares.sqrt().tolist(), x_norms.tolist(), loss.item())


def _stepper(model, batch_size: int, device):
    """(step(x_t, state) -> state, head(state) -> logits, zero state) for `model`, on its own
    weights, detached: autograd then builds no graph for the weights and leaves their .grad alone.
    The state is a list of tensors: [H] (scratch), every layer's h (rnn, gru), h then c (lstm)."""
    if model.config.kind == "scratch":
        W_xh, W_hh, b_h, W_hq, b_q = (p.detach().float() for p in
                                      (model.W_xh, model.W_hh, model.b_h, model.W_hq, model.b_q))

        def step(x_t, state):                                    # the seed's rnn step
            H, = state                                           # (batch, h)
            return [torch.tanh(x_t @ W_xh + H @ W_hh + b_h)]

        def head(state):
            return state[0] @ W_hq + b_q                         # (batch, vocab)

        return step, head, [torch.zeros(batch_size, model.config.hidden_size, device=device)]

    rnn, layers, kind = model.rnn, model.config.num_layers, model.config.kind
    weight = lambda name: None if getattr(rnn, name, None) is None else getattr(rnn, name).detach().float()
    # (W_ih, W_hh, b_ih, b_hh) per layer, the arguments of torch's cells, which nn.RNNCell & co. call
    params = [tuple(weight(f"{n}_l{k}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
              for k in range(layers)]
    cell = {"gru": torch.gru_cell, "lstm": torch.lstm_cell,
            "rnn": torch.rnn_tanh_cell if getattr(rnn, "nonlinearity", "tanh") == "tanh" else torch.rnn_relu_cell}[kind]
    W_out, b_out = model.linear.weight.detach().float(), model.linear.bias.detach().float()

    def step(x_t, state):
        hs, cs, inp = [], [], x_t                                # the layer below feeds the one above
        for k in range(layers):
            if kind == "lstm":
                h, c = cell(inp, (state[k], state[layers + k]), *params[k])
                cs.append(c)
            else:
                h = cell(inp, state[k], *params[k])
            hs.append(h)                                         # (batch, h)
            inp = h
        return hs + cs

    def head(state):
        return state[layers - 1] @ W_out.T + b_out               # the top layer's h: (batch, vocab)

    zeros = [torch.zeros(batch_size, model.config.hidden_size, device=device)
             for _ in range(layers * (2 if kind == "lstm" else 1))]
    return step, head, zeros


def largest_singular_value(model, bases: dict | None = None, tol: float = 1e-4) -> float:
    """sigma_max of the recurrent weight, the usual test for exploding (> 1) or vanishing (< 1).

    Scratch: W_hh. torch.nn layers: weight_hh_l{k}, which for the GRU and LSTM stacks the gates'
    matrices (3h x h, 4h x h); with several layers or directions the largest over them, the
    strongest gain any recurrence of the model can apply. For the tanh RNN, ||dh_t/dh_{t-1}|| <=
    sigma_max (tanh' <= 1), so sigma_max < 1 guarantees vanishing; for gated cells the gates scale
    the Jacobian too, so it is an indication only.

    An exact SVD of a 512 x 512 matrix costs a sizeable part of a training epoch, so this runs
    subspace iteration on a few vectors instead, until sigma changes by less than `tol` (relative):
    it comes within about 1e-3 of the SVD's value, from below (tests/test_gradflow.py). `bases` (a
    dict the caller keeps between epochs) carries the vectors over: the weights move little in an
    epoch, so from the last epoch's vectors a few iterations suffice. NaN for weights that are not finite.
    """
    if model.config.kind == "scratch":
        matrices = {"W_hh": model.W_hh}
    else:
        matrices = {name: p for name, p in model.rnn.named_parameters() if name.startswith("weight_hh")}
    bases = {} if bases is None else bases
    with torch.no_grad(), cpu_threads(1):
        return max(_sigma_max(W.detach().float(), bases, name, tol) for name, W in matrices.items())


def _sigma_max(W: torch.Tensor, bases: dict, name: str, tol: float, width: int = 16,
               max_iter: int = 200) -> float:
    """sigma_max of W (m, n) by subspace iteration on W^T W: Q (n, k) orthonormal, Q <- qr(W^T W Q),
    sigma = the largest singular value of W Q, which rises to sigma_max from below."""
    if not bool(torch.isfinite(W).all()):                        # an SVD of them would fail
        return float("nan")
    Q = bases.get(name)
    if Q is None or Q.shape[0] != W.shape[1] or Q.device != W.device:
        # a fixed start from a generator of its own: the run's random numbers stay untouched
        g = torch.Generator().manual_seed(0)
        Q = torch.linalg.qr(torch.randn(W.shape[1], min(width, W.shape[1]), generator=g).to(W.device)).Q  # (n, k)
    sigma = 0.0
    for _ in range(max_iter):
        Z = W @ Q                                                # (m, k)
        new = float(torch.linalg.svdvals(Z)[0])
        Q = torch.linalg.qr(W.T @ Z).Q                           # (n, k)
        if new - sigma <= tol * new or Q.shape[1] == W.shape[1]:  # k = n: W Q holds every singular value
            sigma = max(sigma, new)
            break
        sigma = new
    bases[name] = Q
    return sigma
