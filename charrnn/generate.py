"""Text from a trained model: the seed's `predict` (warm up on a prefix, then greedy argmax),
plus sampling with a temperature and top-k, repeatable with a seed.

    python -m charrnn generate --checkpoint checkpoints/default.safetensors --prefix "time traveller" --length 50
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .errors import UserError
from .data import Vocab, normalize_prefix

MAX_LENGTH = 10_000  # characters per call; longer requests are refused by the core, capped by the CLI/app
MIN_TEMPERATURE = 1e-3  # lower temperatures sample as this one does (practically greedy)


@dataclass
class Generation:
    prefix: str                     # as typed
    seen_prefix: str                # as the model saw it: seed preprocessing lowercases, unknowns -> <unk>
    continuation: str               # the generated characters
    unknown: list[str] = field(default_factory=list)  # prefix characters missing from the vocabulary
    next_probs: list[tuple[str, float]] = field(default_factory=list)  # top guesses after the prefix

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
             top_n: int = 10) -> Generation:
    """Warm the state up on `prefix`, then emit `length` characters.

    Greedy argmax (the seed) when neither temperature nor top_k is given; otherwise sample from
    softmax(logits / temperature), restricted to the top_k most likely characters.
    """
    check_sampling(length, temperature, top_k)
    if not prefix:
        raise UserError("The prefix is empty: type at least one character to start from.")
    if not model.config.can_generate:
        raise UserError("This model is bidirectional: it saw the future while training, so it "
                         "cannot generate text honestly.")
    if device is None:
        device = next(model.parameters()).device
    with torch.no_grad():
        return _generate(model, vocab, prefix, length, device, preprocessing, temperature, top_k, seed, top_n)


def _generate(model, vocab, prefix, length, device, preprocessing, temperature, top_k, seed, top_n):
    chars = normalize_prefix(prefix, preprocessing)
    unknown = sorted({c for c in chars if c not in vocab})
    ids = vocab.encode(chars)
    was_training = model.training
    model.eval()
    gen = None
    if seed is not None:
        gen = torch.Generator(device="cpu").manual_seed(seed)
    state = model.begin_state(1, device)
    # warm-up: the whole prefix in one call; the seed feeds it a character at a time, same state
    Y, state = model(torch.tensor([ids], device=device), state)         # Y: (len(prefix), vocab)
    logits = Y[-1]
    probs = F.softmax(logits.float(), dim=-1).cpu()
    top = torch.topk(probs, min(top_n, len(vocab)))
    next_probs = [(vocab.idx_to_token[i], float(p)) for p, i in zip(top.values, top.indices)]
    out = []
    X = torch.empty((1, 1), dtype=torch.long, device=device)
    for _ in range(length):
        y = _pick(logits, temperature, top_k, gen)
        out.append(y)
        X.fill_(y)
        Y, state = model(X, state)                                       # Y: (1, vocab)
        logits = Y[-1]
    model.train(was_training)
    return Generation(prefix=prefix, seen_prefix=vocab.decode(ids), continuation=vocab.decode(out),
                      unknown=unknown, next_probs=next_probs)


def _pick(logits: torch.Tensor, temperature, top_k, gen) -> int:
    if temperature is None and top_k is None:
        return int(logits.argmax())
    # float64 and a floor on the temperature: dividing by a tiny one must not overflow into NaN.
    # On the CPU, and in that order: some devices have no float64 (Apple's MPS), and the sampling
    # generator is a CPU one anyway.
    logits = logits.cpu().double() / max(temperature or 1.0, MIN_TEMPERATURE)
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return int(torch.multinomial(F.softmax(logits, dim=-1), 1, generator=gen))


def predict(prefix: str, num_preds: int, model, vocab: Vocab, device=None, **kwargs) -> str:
    """The seed's predict_ch8: prefix and `num_preds` greedy characters, as one string."""
    return generate(model, vocab, prefix, num_preds, device=device, **kwargs).text
