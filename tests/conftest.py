"""Shared fixtures.

The Time Machine is found, in this order, through CHARRNN_DATA, the download cache (data/, or
CHARRNN_CACHE) and ../shared/data beside the checkout; the folder found is put in CHARRNN_DATA, so
the app servers and CLI runs the tests start see it too. The tests never touch the network.

Tests that need the book's own text ask for the `book` (or `corpus`) fixture: with no copy
anywhere they are skipped with one line that says how to fix it, and under CI=true they fail.
Every other test trains on `small_corpus`, a text the tests build. Checkpoints the tests write
go to a temporary folder.
"""
import os
import random
import shutil
from pathlib import Path

import pytest
import torch

from charrnn import data

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


def _find_book() -> Path | None:
    """The folder holding a verified timemachine.txt, or None."""
    cache = os.environ.get("CHARRNN_CACHE") or data.CACHE_DIR
    for folder in (os.environ.get(data.DATA_ENV), cache, SHARED_DATA):
        if folder and data._read_verified(Path(folder) / data.TIMEMACHINE_FILE) is not None:
            return Path(folder)
    return None


BOOK_DIR = _find_book()
if BOOK_DIR is not None:
    os.environ[data.DATA_ENV] = str(BOOK_DIR)
NO_BOOK = ("needs The Time Machine: set CHARRNN_DATA to a folder holding timemachine.txt "
           f"(SHA-1 {data.TIMEMACHINE_SHA1}), or run the app once online to cache it")

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def book() -> Path:
    """The folder holding The Time Machine; skips the test (fails it under CI=true) without one."""
    if BOOK_DIR is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true and no corpus: this test {NO_BOOK}.")
        pytest.skip(NO_BOOK)
    return BOOK_DIR


@pytest.fixture(scope="session")
def corpus(book):
    """The seed's corpus: The Time Machine, 10,000 training tokens and 2,000 held out."""
    return data.load_corpus("timemachine", "seed", max_tokens=10_000, val_tokens=2_000)


def small_text(words: int = 3_000, seed: int = 0) -> str:
    """About 15,000 characters of made-up English-looking text in which every letter occurs, so
    the seed's preprocessing gives the same 28 tokens as the book."""
    vocab = ("the time traveller machine quick brown fox jumps over lazy dog said filby "
             "psychologist medical man very young provincial mayor explained zeal of "
             "whisking waxing fourth dimension yellow jinks").split()
    rng = random.Random(seed)
    return " ".join(rng.choice(vocab) for _ in range(words))


@pytest.fixture(scope="session")
def small_corpus():
    """A built text with the book's 28 tokens and its split: 10,000 tokens to train on, 2,000 held out."""
    return data.load_corpus("small.txt", "seed", max_tokens=10_000, val_tokens=2_000, text=small_text())


@pytest.fixture(scope="session")
def small_text_file(tmp_path_factory) -> Path:
    """small_text() as a .txt file, for the CLI's --corpus and the app's upload."""
    path = tmp_path_factory.mktemp("text") / "small.txt"
    path.write_text(small_text())
    return path


@pytest.fixture
def ckpt_dir(tmp_path, monkeypatch):
    """A fresh checkpoints folder for the test."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    monkeypatch.setenv("CHARRNN_CHECKPOINTS", str(folder))
    return folder


@pytest.fixture
def jobs(ckpt_dir):
    """The app's process-wide job registry, emptied before and stopped after the test; a
    checkpoints folder holding only the shipped model."""
    shutil.copy(ROOT / "checkpoints" / "default.safetensors", ckpt_dir)
    from pages.common import registry
    reg = registry()
    reg.stop_all()
    for job in reg.jobs():
        reg.remove(job.id)
    yield reg
    reg.stop_all()
    assert reg.running() is None
