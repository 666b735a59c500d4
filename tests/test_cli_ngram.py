"""`train --json` reports the n-gram baselines on the run's own training and validation tokens,
for new and resumed runs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from charrnn.data import load_corpus
from charrnn.ngram import ngram_perplexities

ROOT = Path(__file__).resolve().parent.parent


def train_json(*args) -> dict:
    r = subprocess.run([sys.executable, "-m", "charrnn", "train", *args, "--json", "--quiet"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env=os.environ)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def check_baselines(reported: dict, corpus) -> None:
    """The JSON's ngram_perplexity is ngram_perplexities on the corpus, keyed by the order as a string."""
    assert set(reported) == {"1", "2", "3", "4", "5"}
    expected = ngram_perplexities(corpus.train, corpus.val, len(corpus.vocab))
    for n, r in expected.items():
        assert set(reported[str(n)]) == {"train", "val"}
        assert reported[str(n)]["train"] == pytest.approx(r["train"], abs=1e-4)
        assert reported[str(n)]["val"] == pytest.approx(r["val"], abs=1e-4)
    assert reported["3"]["train"] < reported["1"]["train"]


def test_train_json_has_ngram_perplexity(ckpt_dir, small_text_file):
    # 6,000 training tokens, not the default 10,000: the baselines must follow the run's split
    run = ("--corpus", str(small_text_file), "--model", "rnn", "--hidden", "16", "--max-tokens", "6000")
    first = train_json(*run, "--epochs", "1", "--save", "ngram-base")
    corpus = load_corpus(str(small_text_file), "seed", max_tokens=6_000, val_tokens=2_000)
    check_baselines(first["ngram_perplexity"], corpus)
    default = load_corpus(str(small_text_file), "seed", max_tokens=10_000, val_tokens=2_000)
    other = ngram_perplexities(default.train, default.val, len(default.vocab))
    assert first["ngram_perplexity"]["5"]["train"] != pytest.approx(other[5]["train"], abs=1e-3)
    resumed = train_json("--resume", "ngram-base", "--corpus", str(small_text_file), "--epochs", "1")
    assert resumed["epochs"] == 2
    assert resumed["ngram_perplexity"] == first["ngram_perplexity"]
