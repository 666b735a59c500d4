"""Text from a trained model: the seed's `predict` (warm up on a prefix, then greedy argmax),
plus sampling with a temperature and top-k, repeatable with a seed.

The prefix always runs through the model in one call. The characters after it run, for the tanh
RNNs on a CPU in fp32 (scratch, and a one-layer unidirectional rnn), in one C call
(charrnn/kernels/fp32.py, GenerationLoop: the weights packed once, a matrix-vector product per
step, the picking in C); anything else (GRU, LSTM, more layers, a GPU, no C compiler) calls the
model once per character. `Generation.path` says which ran. Both give the model's own greedy
text: the C step is the model's C kernel's step for a batch of one (the same bits), and where the
C head's argmax is not certain to be torch's, the model's head decides.

Sampling draws one uniform per character from a CPU generator (torch.rand, float64, seeded by
`seed`) and picks by inverse CDF from softmax(logits / temperature) over the top_k largest, in
float64: the same algorithm on both paths.

    python -m charrnn generate --checkpoint checkpoints/default.safetensors --prefix "time traveller" --length 50
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .errors import UserError
from .data import Vocab, normalize_prefix
from .kernels import fp32

MAX_LENGTH = 10_000  # characters per call; longer requests are refused by the core, capped by the CLI/app
MIN_TEMPERATURE = 1e-3  # lower temperatures sample as this one does (practically greedy)


@dataclass
class Generation:
    prefix: str                     # as typed
    seen_prefix: str                # as the model saw it: seed preprocessing lowercases, unknowns -> <unk>
    continuation: str               # the generated characters
    unknown: list[str] = field(default_factory=list)  # prefix characters missing from the vocabulary
    next_probs: list[tuple[str, float]] = field(default_factory=list)  # top guesses after the prefix
    path: str = "python"            # what ran the characters after the prefix: "avx512-fp32 loop" (C) or "python"

    @property
    def text(self) -> str:
        """What the seed's predict returns: the prefix (through the vocabulary) and the continuation."""
        return self.seen_prefix + self.continuation


def check_sampling(length: int, temperature: float | None, top_k: int | None) -> None:
    if length < 0:
        raise UserError(f"Length must be 0 or more, not {length}.")
    if length > MAX_LENGTH:
        raise UserError(f"Length is capped at {MAX_LENGTH} characters, not {length}.")
    if temperature is not None and not temperature > 0:
        raise UserError(f"Temperature must be above 0, not {temperature} (leave it out for greedy).")
    if top_k is not None and top_k < 1:
        raise UserError(f"Top-k must be at least 1, not {top_k}.")


def generate(model, vocab: Vocab, prefix: str, length: int, device=None, preprocessing: str = "seed",
             temperature: float | None = None, top_k: int | None = None, seed: int | None = None,
             top_n: int = 10, loop: str = "auto") -> Generation:
    """Warm the state up on `prefix`, then emit `length` characters.

    Greedy argmax (the seed) when neither temperature nor top_k is given; otherwise sample from
    softmax(logits / temperature), restricted to the top_k most likely characters.
    `loop`: "auto" (the C loop where the model allows it), "python" (a model call per
    character), or a C variant ("avx2-fp32", see charrnn.kernels.fp32.VARIANTS) where it loads.
    """
    check_sampling(length, temperature, top_k)
    if loop not in ("auto", "python") and loop not in fp32.VARIANTS:
        raise UserError(f"Unknown generation loop {loop!r}; choose auto, python or one of {', '.join(fp32.VARIANTS)}.")
    if not prefix:
        raise UserError("The prefix is empty: type at least one character to start from.")
    if not model.config.can_generate:
        raise UserError("This model is bidirectional: it saw the future while training, so it "
                         "cannot generate text honestly.")
    if device is None:
        device = next(model.parameters()).device
    with torch.no_grad():
        return _generate(model, vocab, prefix, length, device, preprocessing, temperature, top_k, seed, top_n, loop)


def _native_generator(model, variant: str | None = None) -> fp32.GenerationLoop | None:
    """The C generation loop for `model`'s weights, or None where it does not apply (not a tanh
    RNN of one unidirectional layer, not fp32 on the CPU, the C library cannot be built or loaded).
    `variant`: a given C variant; by default the one the model's own kernel runs (the text is then
    the model's own, bit for bit in the states); None for a model on another kernel (the book's
    reference loop, the torch op), which keeps its own steps."""
    config = getattr(model, "config", None)
    try:
        if config.kind == "scratch":
            W_in, b, W, O, bo = model.W_xh, model.b_h, model.W_hh, model.W_hq, model.b_q
        elif (config.kind == "rnn" and not config.bidirectional and config.num_layers == 1
              and model.rnn.nonlinearity == "tanh" and model.rnn.bias and not model.rnn.batch_first):
            rnn = model.rnn
            W_in, W = rnn.weight_ih_l0.t(), rnn.weight_hh_l0.t()        # used as H @ W, as the C kernel's
            b = rnn.bias_ih_l0 + rnn.bias_hh_l0
            O, bo = model.linear.weight.t(), model.linear.bias
        else:
            return None
    except AttributeError:
        return None
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in (W_in, b, W, O, bo)):
        return None
    if variant is None:
        own = getattr(getattr(model, "kernel", None), "for_mode", None)
        name = own(False).name if own else None
        if name not in fp32.VARIANTS:           # e.g. the book's reference loop, chosen on purpose
            return None
        variant = name                          # the model's own C kernel: the same bits per step
    kernel, _ = fp32.load(variant)
    if kernel is None:
        return None
    E = (W_in + b).detach().contiguous()          # the rows the C kernel adds per token: the same bits
    try:
        return fp32.GenerationLoop(kernel, E, W.detach(), O.detach(), bo.detach().contiguous())
    except (ValueError, MemoryError):
        return None


def _generate(model, vocab, prefix, length, device, preprocessing, temperature, top_k, seed, top_n, loop):
    chars = normalize_prefix(prefix, preprocessing)
    unknown = sorted({c for c in chars if c not in vocab})
    ids = vocab.encode(chars)
    was_training = model.training
    model.eval()
    gen = None
    if seed is not None:
        gen = torch.Generator(device="cpu").manual_seed(seed)
    greedy = temperature is None and top_k is None
    u = None if greedy else torch.rand(length, dtype=torch.float64, generator=gen)  # one per character
    native = None if loop == "python" or length < 2 else _native_generator(model, None if loop == "auto" else loop)
    state = model.begin_state(1, device)
    # warm-up: the whole prefix in one call; the seed feeds it a character at a time, same state
    Y, state = model(torch.tensor([ids], device=device), state)         # Y: (len(prefix), vocab)
    logits = Y[-1]
    probs = F.softmax(logits.float(), dim=-1).cpu()
    top = torch.topk(probs, min(top_n, len(vocab)))
    next_probs = [(vocab.idx_to_token[i], float(p)) for p, i in zip(top.values, top.indices)]
    out = []
    if native is not None:
        out = _native_loop(native, model, state, logits, length, temperature, top_k, u)
    else:
        X = torch.empty((1, 1), dtype=torch.long, device=device)
        for i in range(length):
            y = _pick(logits, temperature, top_k, u, i)
            out.append(y)
            if i == length - 1:
                break                                                    # no step after the last pick
            X.fill_(y)
            Y, state = model(X, state)                                   # Y: (1, vocab)
            logits = Y[-1]
    model.train(was_training)
    return Generation(prefix=prefix, seen_prefix=vocab.decode(ids), continuation=vocab.decode(out),
                      unknown=unknown, next_probs=next_probs,
                      path=f"{native.kernel.name} loop" if native is not None else "python")


def _native_loop(native: fp32.GenerationLoop, model, state, logits, length, temperature, top_k, u) -> list[int]:
    """`length` characters from the C loop; the first is picked here from the prefix's logits, as
    on the Python path, and so is any the C loop cannot be sure of (from the model's own head)."""
    H = state[0] if isinstance(state, tuple) else state                  # scratch: (H,); rnn: (1, 1, h)
    hs = H.detach().reshape(-1).float().contiguous().clone()             # (h,): one layer, batch 1
    # top-1 keeps the largest logits only: greedy, in C with its certainty check
    t = None if temperature is None and top_k in (None, 1) else max(temperature or 1.0, MIN_TEMPERATURE)
    out = [_pick(logits, temperature, top_k, u, 0)]
    while len(out) < length:
        i = len(out)
        tokens, n = native.run(hs, None, out[-1], length - i + 1, t, top_k, None if u is None else u[i - 1:])
        out += tokens[1:]                                  # tokens[0] is out[-1], the token stepped with
        if n <= length - i:                                # stopped before token i + n - 1: the head decides
            exact = model.head(hs.view(1, 1, -1))[-1]
            out.append(_pick(exact, temperature, top_k, u, len(out)))
    return out


def _pick(logits: torch.Tensor, temperature, top_k, u: torch.Tensor | None, i: int) -> int:
    """Greedy argmax, or a draw with the uniform u[i] by inverse CDF: fp32_tanh.c's `sample`,
    step for step (a vocabulary is small: plain Python floats beat a dozen tensor ops)."""
    if temperature is None and top_k is None:
        return int(logits.argmax())
    # float64 and a floor on the temperature: dividing by a tiny one must not overflow into NaN.
    # On the CPU, and in that order: some devices have no float64 (Apple's MPS), and the sampling
    # generator is a CPU one anyway.
    t = max(temperature or 1.0, MIN_TEMPERATURE)
    z = [x / t for x in logits.cpu().double().tolist()]
    if any(math.isnan(x) for x in z):
        raise UserError("The model's logits contain NaN: nothing to sample from.")
    if top_k is not None and top_k < len(z):
        kth = sorted(z, reverse=True)[top_k - 1]
        z = [x if x >= kth else -math.inf for x in z]
    top = max(z)
    p = [math.exp(x - top) for x in z]
    target = float(u[i]) * _seq_sum(p)             # in order, as the C loop sums
    c, last = 0.0, 0
    for j, pj in enumerate(p):
        if pj > 0:
            last = j
            c += pj
            if c > target:
                return j
    return last


def _seq_sum(xs) -> float:
    s = 0.0
    for x in xs:
        s += x
    return s


def predict(prefix: str, num_preds: int, model, vocab: Vocab, device=None, **kwargs) -> str:
    """The seed's predict_ch8: prefix and `num_preds` greedy characters, as one string."""
    return generate(model, vocab, prefix, num_preds, device=device, **kwargs).text
