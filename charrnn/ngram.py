"""Character n-gram baselines: what an RNN must beat, fitted on the same training tokens.

An order-n model predicts a token from the n-1 tokens before it. Counts are smoothed with
interpolated Kneser–Ney (Chen & Goodman 1998, section 3.5), with one fixed discount D = 0.75 at
every order ("plain" KN rather than modified KN's three discounts per order), because:
  - modified KN estimates its discounts from counts-of-counts (n1, n2, n3, n4), which are undefined
    or degenerate on tiny texts (no n-gram seen exactly twice), and the tests compute values by hand;
  - over 28 characters most contexts are seen many times, where the two differ little.

For a context h (its tail h' drops the oldest token) the top order uses raw counts c, and every
lower order uses continuation counts N1+(• h' w), the number of distinct tokens seen before h' w:

    P_k(w | h) = max(c(h w) - D, 0) / c(h •)  +  D * N1+(h •) / c(h •) * P_{k-1}(w | h')
    P_0(w)     = 1 / vocab_size                     (so no token ever has probability 0)

where c(h •) = sum over w of c(h w) and N1+(h •) = the number of w with c(h w) > 0. A context never
seen in training hands all its mass to P_{k-1}. Each P_k sums to 1 over the vocabulary.

Perplexity = exp(mean of -log P(x_t | context)) over every token after the first. The context is
up to n-1 previous tokens; near the start of a text (t < n-1) there are only t, and the token is
scored by the model of order t+1. The text is not padded with a start symbol, so the first k-gram
of the training text has no token before it and adds nothing to the continuation counts.

    python -m charrnn.ngram          # the book's n-gram perplexities, orders 1 to 5, and the time taken
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

DISCOUNT = 0.75
ORDERS = (1, 2, 3, 4, 5)

# One order's table: context (a tuple of k-1 ids) -> (counts of the next token, their sum, how many
# tokens have a count above 0).
Table = dict[tuple[int, ...], tuple[dict[int, int], int, int]]


def _table(grams: Counter) -> Table:
    """Group k-gram counts by their context (the first k-1 ids)."""
    by_context: dict[tuple[int, ...], dict[int, int]] = {}
    for gram, count in grams.items():
        by_context.setdefault(gram[:-1], {})[gram[-1]] = count
    return {h: (nexts, sum(nexts.values()), len(nexts)) for h, nexts in by_context.items()}


def _as_list(ids) -> list[int]:
    """Token ids as a list of ints: a list, a tuple, a numpy array or a torch tensor."""
    return ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]


class NGramModel:
    """Interpolated Kneser–Ney over token ids. A fitted model of order n holds the models of every
    order up to n: `prob`, `distribution` and `perplexity` take `order` to use a lower one."""

    def __init__(self, order: int, vocab_size: int, discount: float = DISCOUNT):
        if order < 1:
            raise ValueError(f"An n-gram order must be at least 1, not {order}.")
        if vocab_size < 1:
            raise ValueError(f"The vocabulary must hold at least one token, not {vocab_size}.")
        if not 0 < discount < 1:
            raise ValueError(f"The discount must lie between 0 and 1, not {discount}.")
        self.order, self.vocab_size, self.discount = order, vocab_size, discount
        self.raw: dict[int, Table] = {}    # k -> raw counts, the top of an order-k model
        self.cont: dict[int, Table] = {}   # k -> continuation counts, what order k+1 and above fall back on

    def fit(self, ids) -> NGramModel:
        """Count every k-gram of the training ids, k = 1..order."""
        ids = self._check(ids)
        grams = {k: Counter(zip(*(ids[j:] for j in range(k)))) for k in range(1, self.order + 1)}
        for k in range(1, self.order + 1):
            self.raw[k] = _table(grams[k])
            if k < self.order:   # N1+(• g): each distinct (k+1)-gram x g adds one to g
                self.cont[k] = _table(Counter(g[1:] for g in grams[k + 1]))
        return self

    def _check(self, ids) -> list[int]:
        ids = _as_list(ids)
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"Token id {bad[0]} is outside the vocabulary of {self.vocab_size}.")
        return ids

    def _order(self, order: int | None) -> int:
        if not self.raw:
            raise RuntimeError("Fit the n-gram model before using it.")
        order = self.order if order is None else order
        if not 1 <= order <= self.order:
            raise ValueError(f"This model was fitted up to order {self.order}; order {order} is not in it.")
        return order

    def _level(self, table: Table, h: tuple[int, ...], token: int, lower: float) -> float:
        """One step of the recursion: P_k(token | h) from its table and P_{k-1}(token | h') = lower."""
        entry = table.get(h)
        if entry is None:                  # context never seen: all the mass goes to the lower order
            return lower
        nexts, total, types = entry
        d = self.discount
        return (max(nexts.get(token, 0) - d, 0.0) + d * types * lower) / total

    def _probs(self, context: Sequence[int], token: int, top: int) -> list[float]:
        """[P(token | context)] under the models of order 1, 2, ..., `top`, each with as much of the
        context's tail as it takes (so `context` holds at least top-1 ids)."""
        lower, out = 1.0 / self.vocab_size, []
        n = len(context)
        for k in range(1, top + 1):
            h = tuple(context[n - k + 1:]) if k > 1 else ()
            out.append(self._level(self.raw[k], h, token, lower))
            if k < top:
                lower = self._level(self.cont[k], h, token, lower)
        return out

    def prob(self, context: Sequence[int], token: int, order: int | None = None) -> float:
        """P(token | context): its last order-1 ids, or all of a shorter context (a lower order)."""
        order = self._order(order)
        context = _as_list(context)[-(order - 1):] if order > 1 else []
        return self._probs(context, token, len(context) + 1)[-1]

    def distribution(self, context: Sequence[int], order: int | None = None) -> list[float]:
        """P(w | context) for every w in the vocabulary: vocab_size numbers that sum to 1."""
        return [self.prob(context, w, order) for w in range(self.vocab_size)]

    def perplexities(self, ids) -> dict[int, float]:
        """{k: perplexity of `ids` under the order-k model} for k = 1..order, in one pass."""
        ids = self._check(ids)
        self._order(None)
        if len(ids) < 2:
            raise ValueError("Perplexity needs at least two tokens (the first is only context).")
        n = self.order
        nll = [0.0] * n                    # nll[k-1]: the sum of -log P_k over the predicted tokens
        # Near the start (t < n-1) the context is short: order k uses the highest order that fits.
        for t in range(1, n - 1):
            probs = self._probs(ids[:t], ids[t], t + 1)
            for k in range(1, n + 1):
                nll[k - 1] -= math.log(probs[min(k, t + 1) - 1])
        # Every later token has a full context: score each distinct n-gram once, weighted by its count.
        start = max(1, n - 1)
        windows = Counter(zip(*(ids[start - n + 1 + j:] for j in range(n))))
        for gram, count in windows.items():
            probs = self._probs(gram[:-1], gram[-1], n)
            for k in range(n):
                nll[k] -= count * math.log(probs[k])
        return {k: math.exp(nll[k - 1] / (len(ids) - 1)) for k in range(1, self.order + 1)}

    def perplexity(self, ids, order: int | None = None) -> float:
        """exp(mean -log P) over every token of `ids` after the first."""
        return self.perplexities(ids)[self._order(order)]


def ngram_perplexities(train_ids, val_ids, vocab_size: int, orders: Sequence[int] = ORDERS,
                       discount: float = DISCOUNT) -> dict[int, dict]:
    """{n: {"train": perplexity, "val": perplexity or None}} for each order n, every model fitted on
    `train_ids`; "val" is None when there are no validation ids (None or fewer than two)."""
    orders = sorted(set(orders))
    if not orders:
        return {}
    model = NGramModel(orders[-1], vocab_size, discount).fit(train_ids)
    train = model.perplexities(train_ids)
    val = model.perplexities(val_ids) if val_ids is not None and len(val_ids) >= 2 else None
    return {n: {"train": train[n], "val": val[n] if val else None} for n in orders}


def corpus_ngram_perplexities(corpus, orders: Sequence[int] = ORDERS) -> dict[int, dict]:
    """ngram_perplexities on a Corpus: fitted on corpus.train, scored on it and on corpus.val."""
    return ngram_perplexities(corpus.train, corpus.val, len(corpus.vocab), orders)


if __name__ == "__main__":
    import time

    from .data import load_corpus
    c = load_corpus(max_tokens=0)
    t0 = time.perf_counter()
    result = corpus_ngram_perplexities(c)
    print(f"{c.name}: {len(c.train)} training tokens, {0 if c.val is None else len(c.val)} validation, "
          f"vocab {len(c.vocab)}, {time.perf_counter() - t0:.2f} s")
    for n, r in result.items():
        print(f"{n}-gram  train {r['train']:7.3f}  val {r['val'] or float('nan'):7.3f}")
