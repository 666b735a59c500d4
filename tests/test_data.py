"""The corpus, vocabulary and the seed's two minibatch iterators."""
import random
import urllib.request

import pytest
import torch
from conftest import small_text

from charrnn import data
from charrnn.data import (CorpusError, Vocab, check_batchable, decode_text, load_corpus, preprocess,
                          random_batches, sequential_batches)


def test_timemachine_as_the_seed_sees_it(corpus):
    assert len(corpus.vocab) == 28
    assert corpus.vocab.idx_to_token[:3] == ["<unk>", " ", "e"]   # <unk> first, then by frequency
    assert corpus.total_tokens == 170580                           # d2l: len(corpus) before max_tokens
    assert len(corpus.train) == 10_000 and len(corpus.val) == 2_000
    assert corpus.vocab.decode(corpus.train[:29]) == "the time machine by h g wells"
    assert corpus.sha1 == data.TIMEMACHINE_SHA1


def test_preprocess_modes():
    text = "The Time-Traveller,\r\nsaid: 'Ça!'\n\nEnd."
    assert "".join(preprocess(text, "seed")) == "the time travellersaid a" + "end"
    assert "".join(preprocess(text, "raw")) == "The Time-Traveller,\nsaid: 'Ça!'\n\nEnd."
    with pytest.raises(ValueError, match="Unknown preprocessing"):
        preprocess(text, "fancy")


def test_vocab_order_unk_and_min_freq():
    v = Vocab(list("aaabbc"))
    assert v.idx_to_token == ["<unk>", "a", "b", "c"]
    assert v["a"] == 1 and v["z"] == 0 and "z" not in v
    assert v.decode(v.encode("abz")) == "ab<unk>"
    assert Vocab(list("aaabbc"), min_freq=2).idx_to_token == ["<unk>", "a", "b"]
    with pytest.raises(ValueError):
        Vocab(idx_to_token=["a", "b"])


def _epoch(sampler, corpus, b, s, seed=0):
    return list(sampler(corpus, b, s, random.Random(seed)))


@pytest.mark.parametrize("sampler", [random_batches, sequential_batches])
def test_iterators_shapes_shift_and_coverage(sampler):
    corpus = torch.arange(1000)      # token i has id i: positions are visible in the batches
    b, s = 4, 7
    batches = _epoch(sampler, corpus, b, s)
    assert batches
    seen = []
    for X, Y in batches:
        assert X.shape == Y.shape == (b, s) and X.dtype == torch.long
        assert torch.equal(Y, X + 1)                 # targets are the inputs shifted by one
        seen += X.flatten().tolist()
    assert len(seen) == len(set(seen))               # no token is used twice in an epoch
    assert len(seen) >= 1000 - (b + 2) * s - 1      # and all but a remainder are used


def test_sequential_rows_continue():
    batches = _epoch(sequential_batches, torch.arange(1000), 4, 7)
    for (X0, _), (X1, _) in zip(batches, batches[1:]):
        assert torch.equal(X1[:, 0], X0[:, -1] + 1)  # row b of the next minibatch continues row b


def test_random_sampling_is_random_but_seeded():
    a = _epoch(random_batches, torch.arange(1000), 4, 7, seed=1)
    b = _epoch(random_batches, torch.arange(1000), 4, 7, seed=1)
    c = _epoch(random_batches, torch.arange(1000), 4, 7, seed=2)
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(a, b))
    assert not all(torch.equal(x, y) for (x, _), (y, _) in zip(a, c))
    X = a[0][0]
    assert not torch.equal(X[1, 0] - X[0, 0], torch.tensor(7 * 4))  # rows are not neighbours in order


def test_too_short_for_one_batch():
    with pytest.raises(CorpusError, match="fewer than one batch"):
        check_batchable(100, 32, 35)
    check_batchable(32 * 35 + 36, 32, 35)


@pytest.fixture
def good(monkeypatch):
    """Bytes that pass the corpus's SHA-1 check: a built text, with the expected SHA-1 set to its own."""
    text = small_text().encode()
    monkeypatch.setattr(data, "TIMEMACHINE_SHA1", data.sha1_of(text))
    return text


def test_local_copy_and_cache(tmp_path, monkeypatch, good):
    monkeypatch.delenv("CHARRNN_DATA", raising=False)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "timemachine.txt").write_bytes(good)
    assert data.fetch_timemachine(cache_dir=cache) == good          # cache hit, no network
    (cache / "timemachine.txt").write_bytes(good[:-10])             # a damaged cache is not trusted

    def offline(*a, **k):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(CorpusError, match="set CHARRNN_DATA"):
        data.fetch_timemachine(cache_dir=cache)
    monkeypatch.setenv("CHARRNN_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(CorpusError, match="missing or is not the expected file"):
        data.fetch_timemachine(cache_dir=cache)


def test_download_is_verified_and_cached(tmp_path, monkeypatch, good):
    monkeypatch.delenv("CHARRNN_DATA", raising=False)
    monkeypatch.delenv("CHARRNN_OFFLINE", raising=False)  # CI sets it; urlopen is faked here

    class Response:
        def __init__(self, payload): self.payload = payload
        def read(self): return self.payload
        def __enter__(self): return self
        def __exit__(self, *a): return False
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: Response(b"not the book"))
    with pytest.raises(CorpusError, match="not kept"):
        data.fetch_timemachine(cache_dir=tmp_path)
    assert not (tmp_path / "timemachine.txt").exists()
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: Response(good))
    assert data.fetch_timemachine(cache_dir=tmp_path) == good
    assert (tmp_path / "timemachine.txt").read_bytes() == good


@pytest.mark.parametrize("payload, message", [
    (b"", "is empty"),
    (b"\x00\x01\x02binary", "binary"),
    (b"caf\xe9 latin-1", "not UTF-8"),
    (b"x" * (data.MAX_CORPUS_BYTES + 1), "the limit is"),
])
def test_bad_texts(payload, message):
    with pytest.raises(CorpusError, match=message):
        decode_text(payload, "upload.txt")


def test_own_text_raw_keeps_everything_and_holds_out_a_tenth():
    text = "Hello, Wörld! " * 300
    c = load_corpus("mine.txt", "raw", max_tokens=10_000, text=text)
    assert "ö" in c.vocab and "H" in c.vocab and "," in c.vocab
    assert len(c.train) + len(c.val) == len(text) and len(c.val) == len(text) // 10


def test_max_tokens_zero_trains_on_all_but_the_held_out_tail():
    c = load_corpus("small.txt", "seed", max_tokens=0, val_tokens=2_000, text=small_text(5_000))
    assert len(c.train) + len(c.val) == c.total_tokens and len(c.val) == 2_000
