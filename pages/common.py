"""Pieces the pages share: the process-wide job registry, cached corpora and checkpoints, and the
model picker of Generate and Inspect. Streamlit code only; the work happens in charrnn."""
from __future__ import annotations

import math
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
def corpus_for(source: str, preprocessing: str, max_tokens: int, text: str | None = None, val_tokens: int = 2000):
    """A loaded Corpus, shared by all sessions (it is only read)."""
    return load_corpus(source, preprocessing, max_tokens, val_tokens, text=text)


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
    checkpoint: str | None = None     # the saved checkpoint's name, when it is one
    job: object = None                # the run of this session (charrnn.jobs.Job), when it is one


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


def model_picker(key: str, wanted: str | None = None, nth: int = 0) -> Picked | None:
    """A selectbox over saved checkpoints (the shipped default first), this session's ended runs,
    and an untrained model. Returns the picked model, or None (with a message) if it cannot load.
    `wanted`: a checkpoint's name to select, once (a link's), with a warning if there is none.
    `nth`: the option shown first (0: the shipped default; past the end: the untrained model), so
    that pickers side by side start on different models."""
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
    if wanted is not None:
        match = next((label for label, path in options.items() if isinstance(path, str) and Path(path).stem == wanted), None)
        if match is None:
            st.warning(f"The link's checkpoint={wanted} is not in checkpoints/: the default model is picked.")
        else:
            st.session_state[key] = match
    label = st.selectbox("Model", list(options), index=min(nth, len(options) - 1), key=key, persist_state="session",
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
        return Picked(label, loaded.model, loaded.vocab, loaded.preprocessing, loaded.meta, Path(choice).stem)
    job = choice
    return Picked(label, job.trainer.model, job.corpus.vocab, job.corpus.preprocessing, None, job=job)


# -----------------------------------------------------------------------------
# settings in the page's link (?model=rnn&lr=0.5): parsers raise ValueError("what it must be")

def whole_number(lo: int, hi: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not lo <= value <= hi:
            raise ValueError(f"a whole number from {lo:,} to {hi:,}")
        return value
    return parse


def number(lo: float, hi: float):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not lo <= value <= hi:                # NaN fails too
            raise ValueError(f"a number from {lo:g} to {hi:g}")
        return value
    return parse


def one_of(options):
    def parse(text: str):
        if text not in options:
            raise ValueError(f"one of {', '.join(map(str, options))}")
        return text
    return parse


def true_or_false(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0"):
        raise ValueError("true or false")
    return text.lower() in ("true", "1")


def read_link(spec: dict, page: str, **key_of) -> dict | None:
    """Once per session and page: the settings in the link fill the widgets in, and the link's
    values come back (None on later runs). `spec` maps a query key to (widget key, parser);
    `key_of[name](given)` gives a widget key that depends on other settings. An invalid value is
    named in one warning and keeps its default."""
    if st.session_state.get(f"{page}_link_read"):
        return None
    st.session_state[f"{page}_link_read"] = True
    given, bad = st.query_params.to_dict(), []
    for name, (key, parse) in spec.items():
        if name not in given:
            continue
        try:
            st.session_state[key_of[name](given) if name in key_of else key] = parse(given[name])
        except ValueError as e:
            bad.append(f"{name}={given[name]} (it must be {e})")
    if bad:
        st.warning("The link's " + "; ".join(bad) + " could not be used: those settings keep their defaults.")
    return given


def write_link(values: dict) -> None:
    """The page's query string becomes `values` (booleans as true/false, floats short), if it differs."""
    text = lambda v: str(v).lower() if isinstance(v, bool) else f"{v:g}" if isinstance(v, float) else str(v)
    wanted = {name: text(v) for name, v in values.items() if v is not None}
    if st.query_params.to_dict() != wanted:
        st.query_params.from_dict(wanted)
