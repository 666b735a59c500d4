"""The corpus, its vocabulary and the two minibatch iterators of the seed.

    text --preprocess--> chars --Vocab--> token ids --split--> train ids | validation ids
    train ids --random_batches | sequential_batches--> (X, Y), each (batch_size, num_steps) int64

The Time Machine is read, in this order, from CHARRNN_DATA (a folder holding timemachine.txt),
from the download cache (data/ beside the package, git-ignored; CHARRNN_CACHE moves it), or
downloaded from d2l's bucket (never, with CHARRNN_OFFLINE=1). Every copy is checked against the
SHA-1 of the file d2l uses.

    python -m charrnn.data          # fetch (or find) the corpus and print what was loaded
"""
from __future__ import annotations

import collections
import hashlib
import os
import random
import re
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .errors import UserError

TIMEMACHINE_URL = "http://d2l-data.s3-accelerate.amazonaws.com/timemachine.txt"
TIMEMACHINE_SHA1 = "090b5e7e70c295757f55df93cb0a180b9691891a"
TIMEMACHINE_FILE = "timemachine.txt"
DATA_ENV = "CHARRNN_DATA"        # a folder with a local copy of timemachine.txt
OFFLINE_ENV = "CHARRNN_OFFLINE"  # 1: never try the network
CACHE_DIR = Path(__file__).resolve().parent.parent / "data"  # CHARRNN_CACHE overrides
MAX_CORPUS_BYTES = 20 * 1024 * 1024  # own texts above this are refused (the app's upload cap too)
PREPROCESSING = ("seed", "raw")


class CorpusError(UserError):
    """A corpus could not be found, fetched or used; the message is one sentence for the user."""


# -----------------------------------------------------------------------------
# fetching

def sha1_of(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def _read_verified(path: Path) -> bytes | None:
    """The bytes of `path` if it is the d2l file, None if it is absent or differs."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    return data if sha1_of(data) == TIMEMACHINE_SHA1 else None


def fetch_timemachine(cache_dir: Path | None = None, url: str = TIMEMACHINE_URL,
                      timeout: float = 10.0) -> bytes:
    """Return the bytes of The Time Machine: local copy, cache, or download (SHA-1 checked)."""
    cache_dir = Path(cache_dir or os.environ.get("CHARRNN_CACHE") or CACHE_DIR)
    local = os.environ.get(DATA_ENV)
    if local:
        path = Path(local) / TIMEMACHINE_FILE
        data = _read_verified(path)
        if data is None:
            raise CorpusError(f"{DATA_ENV} points at {local}, but {path} is missing or is not the "
                              f"expected file (SHA-1 {TIMEMACHINE_SHA1}).")
        return data
    cached = cache_dir / TIMEMACHINE_FILE
    data = _read_verified(cached)
    if data is not None:
        return data
    try:
        if os.environ.get(OFFLINE_ENV) == "1":
            raise urllib.error.URLError(f"{OFFLINE_ENV}=1")
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read()
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise CorpusError(f"Could not download The Time Machine ({reason}); set {DATA_ENV} to a "
                          f"folder holding {TIMEMACHINE_FILE}, or use your own text file.") from None
    if sha1_of(data) != TIMEMACHINE_SHA1:
        raise CorpusError(f"The downloaded {TIMEMACHINE_FILE} has SHA-1 {sha1_of(data)}, not "
                          f"{TIMEMACHINE_SHA1}; it was not kept.")
    _write_atomic(cached, data)
    return data


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def decode_text(data: bytes, name: str = "the text") -> str:
    """Bytes of a user's text file as str; one clear sentence when it is not a text."""
    if len(data) == 0:
        raise CorpusError(f"{name} is empty.")
    if len(data) > MAX_CORPUS_BYTES:
        raise CorpusError(f"{name} is {len(data) / 2**20:.1f} MB; the limit is "
                          f"{MAX_CORPUS_BYTES // 2**20} MB.")
    if b"\x00" in data[:8192]:
        raise CorpusError(f"{name} looks like a binary file, not text.")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{name} is not UTF-8 text (bad byte at position {e.start}).") from None


def read_text_file(path: str | os.PathLike) -> str:
    """The text of a user's file, with the same checks as an upload."""
    p = Path(path)
    try:
        if not p.is_file():
            raise CorpusError(f"No text file at {p}.")
        if p.stat().st_size > MAX_CORPUS_BYTES:  # refuse before reading it all
            raise CorpusError(f"{p} is {p.stat().st_size / 2**20:.1f} MB; the limit is "
                              f"{MAX_CORPUS_BYTES // 2**20} MB.")
        data = p.read_bytes()
    except OSError as e:
        raise CorpusError(f"Cannot read {p} ({e.strerror}).") from None
    return decode_text(data, name=str(p))


# -----------------------------------------------------------------------------
# preprocessing and vocabulary

def preprocess(text: str, mode: str = "seed") -> list[str]:
    """Text -> list of characters.

    seed: as d2l's read_time_machine + tokenize('char'): per line, every run of non-letters becomes
          one space, the line is stripped and lowercased, and lines are joined with nothing between.
    raw:  every character kept (case, punctuation, newlines, Unicode); only \\r\\n becomes \\n.
    """
    if mode == "seed":
        lines = [re.sub("[^A-Za-z]+", " ", line).strip().lower() for line in text.splitlines()]
        return [ch for line in lines for ch in line]
    if mode == "raw":
        return list(text.replace("\r\n", "\n"))
    raise UserError(f"Unknown preprocessing {mode!r}; choose one of {', '.join(PREPROCESSING)}.")


def normalize_prefix(prefix: str, mode: str) -> str:
    """What a typed prefix looks like to a model trained with `mode` (seed: lowercased)."""
    return prefix.lower() if mode == "seed" else prefix


class Vocab:
    """Characters <-> indices, as d2l's Vocab: <unk> at 0, then by descending frequency."""

    UNK = "<unk>"

    def __init__(self, tokens: list[str] | None = None, min_freq: int = 0,
                 idx_to_token: list[str] | None = None):
        if idx_to_token is None:
            counts = collections.Counter(tokens or [])
            ordered = sorted(counts.items(), key=lambda kv: kv[1], reverse=True)  # stable: ties keep first-seen order
            idx_to_token = [self.UNK] + [t for t, c in ordered if c >= min_freq and t != self.UNK]
        if not idx_to_token or idx_to_token[0] != self.UNK:
            raise ValueError("A vocabulary must start with <unk>.")
        self.idx_to_token = list(idx_to_token)
        self.token_to_idx = {t: i for i, t in enumerate(self.idx_to_token)}

    def __len__(self) -> int:
        return len(self.idx_to_token)

    def __getitem__(self, token: str) -> int:
        return self.token_to_idx.get(token, 0)

    def __contains__(self, token: str) -> bool:
        return token in self.token_to_idx

    def encode(self, chars) -> list[int]:
        return [self.token_to_idx.get(c, 0) for c in chars]

    def decode(self, ids) -> str:
        return "".join(self.idx_to_token[int(i)] for i in ids)

    def label(self, idx: int) -> str:
        """A printable name for token `idx` (for tables and chart axes)."""
        return printable(self.idx_to_token[idx])


def printable(token: str) -> str:
    """Whitespace tokens made visible: space -> ␣, newline -> ⏎, tab -> ⇥."""
    return {" ": "␣", "\n": "⏎", "\t": "⇥"}.get(token, token)


# -----------------------------------------------------------------------------
# the corpus as the model sees it

@dataclass
class Corpus:
    """Token ids of one text, split into a training slice and the held-out slice after it."""
    name: str                 # "timemachine" or a file name
    sha1: str                 # of the source bytes/text
    preprocessing: str
    vocab: Vocab
    train: torch.Tensor       # (n_train,) int64
    val: torch.Tensor | None  # (n_val,) int64, the tokens right after the training slice
    total_tokens: int


def load_corpus(source: str = "timemachine", preprocessing: str = "seed", max_tokens: int = 10000,
                val_tokens: int = 2000, text: str | None = None, min_freq: int = 0) -> Corpus:
    """Load a corpus: "timemachine", a path to a .txt file, or `text` given directly (an upload).

    The vocabulary is built from the whole text (as d2l does). The first `max_tokens` ids train
    and the next `val_tokens` are held out. With max_tokens <= 0, or a text no longer than that,
    all but a held-out tail trains: `val_tokens`, or a tenth of the text if that is less.
    """
    if preprocessing not in PREPROCESSING:
        raise CorpusError(f"Unknown preprocessing {preprocessing!r}; choose seed or raw.")
    if text is None:
        if source == "timemachine":
            data = fetch_timemachine()
            text, name, sha1 = data.decode("utf-8"), "timemachine", TIMEMACHINE_SHA1
        else:
            text = read_text_file(source)
            name, sha1 = Path(source).name, sha1_of(text.encode("utf-8"))
    else:
        name, sha1 = source, sha1_of(text.encode("utf-8"))
    chars = preprocess(text, preprocessing)
    if len(chars) < 2:
        raise CorpusError(f"{name} has fewer than two characters after {preprocessing} preprocessing.")
    vocab = Vocab(chars, min_freq=min_freq)
    ids = torch.tensor(vocab.encode(chars), dtype=torch.long)
    n = len(ids)
    if 0 < max_tokens < n - 1:
        n_train = max_tokens
    else:  # everything trains but a held-out tail: val_tokens, at most a tenth of a short text
        n_train = n - (min(val_tokens, n // 10) if val_tokens > 0 else 0)
    train, rest = ids[:n_train], ids[n_train:n_train + max(val_tokens, 0)]
    return Corpus(name=name, sha1=sha1, preprocessing=preprocessing, vocab=vocab, train=train,
                  val=rest if len(rest) >= 2 else None, total_tokens=n)


# -----------------------------------------------------------------------------
# minibatches

def check_batchable(n_tokens: int, batch_size: int, num_steps: int) -> None:
    """Raise a CorpusError when `n_tokens` cannot fill even one (batch_size, num_steps) minibatch."""
    if batch_size < 1 or num_steps < 1:
        raise UserError("Batch size and steps must be at least 1.")
    need = batch_size * num_steps + num_steps + 1  # the worst random offset included
    if n_tokens < need:
        raise CorpusError(f"The training text has {n_tokens} tokens, fewer than one batch of "
                          f"{batch_size} x {num_steps} needs ({need}); use a longer text or a smaller "
                          f"batch size or number of steps.")


def random_batches(corpus: torch.Tensor, batch_size: int, num_steps: int,
                   rng: random.Random) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The seed's random sampling: subsequences from a random offset, in random order.

    corpus  t0 t1 t2 | t3 t4 t5 | t6 t7 t8 | ...   (offset k in [0, num_steps), then cut)
    X row b = one subsequence, Y row b = the same shifted by one; neighbouring minibatches are
    unrelated, so the hidden state must be re-initialised for each.
    """
    corpus = corpus[rng.randint(0, num_steps - 1):]
    num_subseqs = (len(corpus) - 1) // num_steps
    starts = list(range(0, num_subseqs * num_steps, num_steps))
    rng.shuffle(starts)
    num_batches = num_subseqs // batch_size
    idx = torch.arange(num_steps)
    for i in range(0, batch_size * num_batches, batch_size):
        s = torch.tensor(starts[i:i + batch_size]).unsqueeze(1) + idx  # (batch, steps) positions
        yield corpus[s], corpus[s + 1]


def sequential_batches(corpus: torch.Tensor, batch_size: int, num_steps: int,
                       rng: random.Random) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The seed's sequential partitioning: row b of minibatch i+1 continues row b of minibatch i.

    tokens after a random offset, cut into batch_size equal rows:
        row 0: | X_0[0] (num_steps) | X_1[0] | X_2[0] | ...
        row 1: | X_0[1]             | X_1[1] | X_2[1] | ...
    so the hidden state can be carried (detached) from one minibatch to the next.
    """
    offset = rng.randint(0, num_steps)
    num_tokens = ((len(corpus) - offset - 1) // batch_size) * batch_size
    Xs = corpus[offset:offset + num_tokens].reshape(batch_size, -1)          # (batch, L)
    Ys = corpus[offset + 1:offset + 1 + num_tokens].reshape(batch_size, -1)  # (batch, L)
    num_batches = Xs.shape[1] // num_steps
    for i in range(0, num_steps * num_batches, num_steps):
        yield Xs[:, i:i + num_steps], Ys[:, i:i + num_steps]


SAMPLERS = {"random": random_batches, "sequential": sequential_batches}


if __name__ == "__main__":
    c = load_corpus()
    print(f"{c.name}: {c.total_tokens} tokens, vocab {len(c.vocab)}, train {len(c.train)}, "
          f"val {0 if c.val is None else len(c.val)}")
    print("first tokens:", c.vocab.decode(c.train[:60]))
