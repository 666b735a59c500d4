"""Pieces the pages share: the process-wide job registry, cached corpora and checkpoints, and the
model picker of Generate and Inspect. Streamlit code only; the work happens in charrnn."""
from __future__ import annotations

import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import streamlit as st
import torch

from charrnn.checkpoint import (DEFAULT_NAME, SUFFIX, CheckpointError, checkpoint_dir, list_checkpoints,
                                load_checkpoint, read_metadata)
from charrnn.data import CorpusError, Vocab, load_corpus
from charrnn.jobs import JobRegistry
from charrnn.models import ModelConfig, build_model

UNTRAINED = "Untrained scratch RNN (random weights)"


_thread = threading.local()  # script runs happen on script threads, one run at a time each


@contextmanager
def routed():
    """app.py runs the chosen page inside this, so the page knows it came through the router."""
    _thread.routed = True
    try:
        yield
    finally:
        _thread.routed = False


def through_router() -> None:
    """Make sure the page runs inside app.py's st.navigation.

    Streamlit sees the pages/ folder beside app.py and, until some session has run st.navigation,
    serves a deep link such as /train as a page of its own (old-style multipage app, without
    app.py). Each page calls this first: in that case it switches Streamlit to app.py's routing
    and reruns, and app.py then routes the same URL to the same page.
    """
    if getattr(_thread, "routed", False) or "streamlit.testing.v1" in sys.modules:
        return  # AppTest resets Streamlit's routing before every run and runs pages directly
    from streamlit.runtime.pages_manager import PagesManager
    PagesManager.uses_pages_directory = False
    st.rerun()


@st.cache_resource
def registry() -> JobRegistry:
    """One registry per server process: every tab and every refresh sees the same jobs."""
    return JobRegistry()


@st.cache_resource(show_spinner="Loading the corpus…", max_entries=8)
def corpus_for(source: str, preprocessing: str, max_tokens: int, text: str | None = None):
    """A loaded Corpus, shared by all sessions (it is only read)."""
    return load_corpus(source, preprocessing, max_tokens, text=text)


@st.cache_data(ttl=60, show_spinner="Looking for The Time Machine…")
def timemachine_problem() -> str | None:
    """Why The Time Machine cannot be loaded, or None. A failure is remembered for a minute, so
    an offline page does not wait for the network on every rerun."""
    try:
        corpus_for("timemachine", "seed", 10_000)
    except CorpusError as e:
        return str(e)
    return None


@st.cache_resource(max_entries=16)
def _load(path: str, mtime: float):
    return load_checkpoint(path)


@dataclass
class Picked:
    """The model a page works with."""
    label: str
    model: torch.nn.Module
    vocab: Vocab
    preprocessing: str
    meta: dict | None


def seed_vocab() -> Vocab:
    """The 28 tokens of The Time Machine in the shipped checkpoint's order (read from its metadata
    alone), or the same order built in, should the file be missing."""
    try:
        return Vocab(idx_to_token=read_metadata(checkpoint_dir() / f"{DEFAULT_NAME}{SUFFIX}")["vocab"])
    except (CheckpointError, ValueError):
        return Vocab(list(" etaoinshrdlcumwfgypbvkxjqz"))


@st.cache_resource
def _untrained() -> Picked:
    """The seed's picture before training: a scratch RNN-512 with random weights over the 28 tokens
    (built once per process: the pages only read it)."""
    vocab = seed_vocab()
    model = build_model(ModelConfig("scratch", len(vocab), 512), seed=0).eval()
    return Picked(UNTRAINED, model, vocab, "seed", None)


def model_picker(key: str) -> Picked | None:
    """A selectbox over saved checkpoints (the shipped default first), this session's ended runs,
    and an untrained model. Returns the picked model, or None (with a message) if it cannot load."""
    entries = list_checkpoints()
    readable = [e for e in entries if "error" not in e]
    readable.sort(key=lambda e: e["name"] != DEFAULT_NAME)
    options: dict[str, object] = {}
    for e in readable:
        options[f"{e['name']} — {e['model']}-{e['hidden']}, {e['epochs']} epochs"] = e["path"]
    for job in reversed(registry().jobs()):
        if not job.running and job.trainer.epoch > 0:
            options[f"this session: {job.label} ({job.trainer.epoch} epochs)"] = job
    options[UNTRAINED] = None
    label = st.selectbox("Model", list(options), key=key, persist_state="session",
                         help="Saved checkpoints in checkpoints/, the runs trained in this app, "
                              "or a model before any training.")
    broken = [e for e in entries if "error" in e]
    if broken:
        st.caption("Skipped unreadable files: " + "; ".join(e["error"] for e in broken))
    choice = options[label]
    if choice is None:
        return _untrained()
    if isinstance(choice, str):
        try:
            loaded = _load(choice, Path(choice).stat().st_mtime)
        except (CheckpointError, OSError) as e:
            st.error(str(e))
            return None
        return Picked(label, loaded.model, loaded.vocab, loaded.preprocessing, loaded.meta)
    job = choice
    return Picked(label, job.trainer.model, job.corpus.vocab, job.corpus.preprocessing, None)
