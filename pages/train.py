"""Train: the seed's settings, Start/Stop, and the run drawn live while it trains.

The run itself lives in charrnn.jobs (a background thread); this page only starts it, stops it,
and redraws its snapshot every LIVE_EVERY_S seconds while it runs.
"""
from __future__ import annotations

import html
import math
from datetime import datetime
from pathlib import Path

import pandas as pd
import streamlit as st

from charrnn import kernels
from charrnn.checkpoint import (CheckpointError, CheckpointExists, list_checkpoints, load_checkpoint, path_for_name,
                                read_metadata)
from charrnn.data import DATA_ENV, MAX_CORPUS_BYTES, TIMEMACHINE_FILE, CorpusError, decode_text
from charrnn.errors import UserError
from charrnn.device import available_devices, default_threads, threads_settable
from charrnn.jobs import JobBusy, Snapshot, cli_command
from charrnn.models import DEFAULT_HIDDEN, KINDS, MAX_HIDDEN, MAX_LAYERS
from charrnn.train import KERNELS, MAX_EPOCHS, MAX_THREADS, PRECISIONS, TrainConfig, preload_optimizers
from pages.common import (corpus_for, number, one_of, read_link, registry, through_router, true_or_false, whole_number,
                          timemachine_problem, write_link)
from pages import gradflow_view as gv
from pages.live_plot import live_plot, preload_plotly

through_router()

MODEL_NAMES = {"scratch": "RNN from scratch", "rnn": "nn.RNN", "gru": "GRU", "lstm": "LSTM"}
MAX_POINTS = 1000  # per curve; longer histories are thinned for drawing
# The live view's redraw period. Each redraw costs the browser about a quarter of a core-second
# (React applying the update, Plotly measuring axis labels, software painting without a GPU), and
# a browser on the same machine takes that from the run's threads: every 2 s instead of every
# second halved what Chromium took while a run trained (docs/performance.md).
LIVE_EVERY_S = 2.0
NO_TIMEMACHINE = (f"The Time Machine could not be loaded: upload a .txt file instead (Corpus: *Upload a .txt*), "
                  f"or set `{DATA_ENV}` to a folder holding `{TIMEMACHINE_FILE}` and restart the app.")
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]

st.title("Train")
jobs = registry()


# -----------------------------------------------------------------------------
# settings

# gradient-flow probes: "auto" (TrainConfig.probe_every None: by time, about 1% of it), 0 off, or
# every N epochs. Not None itself: a selectbox offers to clear a None option
PROBE_CHOICES = ("auto", 0, 1, 2, 5, 10, 25, 50, 100)


def probe_choice(text: str) -> str | int:
    if text == "auto":
        return text
    value = whole_number(0, MAX_EPOCHS)(text)
    if value not in PROBE_CHOICES:
        raise ValueError(f"one of {', '.join(map(str, PROBE_CHOICES))}")
    return value


def probe_label(every: str | int) -> str:
    return ("auto (about 1% of the training time)" if every == "auto" else "off" if every == 0
            else "every epoch" if every == 1 else f"every {every} epochs")


# the settings a link carries: the query key (the CLI's flag, '-' as '_') -> (widget key, parser)
LINK = {
    "model": ("train_model", one_of(KINDS)),
    "hidden": ("hidden", whole_number(1, MAX_HIDDEN)),   # the widget's key depends on the model: read_link's `hidden`
    "layers": ("train_layers", whole_number(1, MAX_LAYERS)),
    "bidirectional": ("train_bidirectional", true_or_false),
    "batch_size": ("train_batch", whole_number(1, 4096)),
    "num_steps": ("train_steps", whole_number(1, 1000)),
    "lr": ("train_lr", number(1e-6, 1e4)),
    "optimizer": ("train_optimizer", one_of(["sgd", "adam"])),
    "epochs": ("train_epochs", whole_number(1, MAX_EPOCHS)),
    "clip": ("train_clip", number(0.0, 1e6)),
    "sampling": ("train_sampling", one_of(["sequential", "random"])),
    "max_tokens": ("train_max_tokens", whole_number(0, 10_000_000)),
    "seed": ("train_seed", whole_number(0, 2**31 - 1)),
    "precision": ("train_precision", one_of(PRECISIONS)),
    "kernel": ("train_kernel", one_of(KERNELS)),
    "probe_every": ("train_probe_every", probe_choice),
}
# the link's names that differ from TrainConfig's (the CLI's flags); every other one is the same
CONFIG_NAME = {"hidden": "hidden_size", "layers": "num_layers"}


def settings_to_link(s: dict) -> None:
    """The page's link follows the settings, so it can be shared to reproduce them."""
    write_link({name: s[CONFIG_NAME.get(name, name)] for name in LINK})


def settings_ui() -> dict:
    """The seed's settings with its defaults; returns the widget values."""
    s = {}
    c1, c2, c3, c4 = st.columns(4)
    with c1:
        s["model"] = st.selectbox("Model", KINDS, format_func=MODEL_NAMES.get, key="train_model", persist_state="session",
                                  help="The seed's from-scratch RNN, or torch.nn's RNN, GRU, LSTM.")
        s["hidden_size"] = st.number_input(
            "Hidden size", 1, MAX_HIDDEN, DEFAULT_HIDDEN[s["model"]], key=f"train_hidden_{s['model']}", persist_state="session",
            help="Units in the hidden state (the seed: 512 from scratch, 256 concise).")
        s["num_layers"] = st.number_input("Layers", 1, MAX_LAYERS, 1, key="train_layers", persist_state="session",
                                          disabled=s["model"] == "scratch",
                                          help="Stacked recurrent layers (the scratch RNN has one).")
        s["bidirectional"] = st.checkbox("Bidirectional", False, key="train_bidirectional", persist_state="session",
                                         disabled=s["model"] == "scratch",
                                         help="Reads both ways; it sees the future, so it cannot generate.")
    with c2:
        s["batch_size"] = st.number_input("Batch size", 1, 4096, 32, key="train_batch", persist_state="session",
                                          help="Subsequences per minibatch.")
        s["num_steps"] = st.number_input("Steps per subsequence", 1, 1000, 35, key="train_steps", persist_state="session",
                                         help="Time steps unrolled for backpropagation.")
        s["lr"] = st.number_input("Learning rate", 1e-6, 1e4, 1.0, format="%g", key="train_lr", persist_state="session",
                                  help="The seed uses SGD with learning rate 1.")
        s["epochs"] = st.number_input("Epochs", 1, MAX_EPOCHS, 500, key="train_epochs", persist_state="session",
                                      help="Passes over the training tokens (the seed: 500).")
    with c3:
        s["clip"] = st.number_input("Clipping θ", 0.0, 1e6, 1.0, format="%g", key="train_clip", persist_state="session",
                                    help="Gradients with a global norm above θ are scaled down to θ (0: off).")
        s["sampling"] = st.radio("Sampling", ["sequential", "random"], key="train_sampling", persist_state="session", horizontal=True,
                                 help="Sequential keeps the hidden state across minibatches; random "
                                      "samples subsequences anywhere and starts each from zero.")
        s["max_tokens"] = st.number_input("Max tokens", 0, 10_000_000, 10_000, step=1000, key="train_max_tokens", persist_state="session",
                                          help="Training tokens from the start of the text (0: all). "
                                               "The next 2,000 are held out for validation.")
        s["probe_every"] = st.selectbox("Gradient probes", PROBE_CHOICES, format_func=probe_label,
                                        key="train_probe_every", persist_state="session",
                                        help="How often the gradient flow through time is measured for the "
                                             "heatmaps below (always at a run's first and last epoch). auto "
                                             "keeps it near 1% of the training time; a fast run then has few rows.")
        if s["probe_every"] == "auto":
            s["probe_every"] = None
    with c4:
        s["optimizer"] = st.selectbox("Optimizer", ["sgd", "adam"], key="train_optimizer", persist_state="session",
                                      format_func=str.upper, help="SGD as the seed; Adam wants lr ≈ 0.002.")
        s["seed"] = st.number_input("Seed", 0, 2**31 - 1, 0, key="train_seed", persist_state="session",
                                    help="Initial weights and minibatch order.")
        devices = available_devices()
        s["device"] = st.selectbox("Device", devices, key="train_device", persist_state="session", disabled=len(devices) == 1,
                                   help="Detected: cuda > mps > cpu.")
        s["precision"] = st.selectbox("Precision", PRECISIONS, key="train_precision", persist_state="session",
                                      help="The step matmuls while training. auto: the fastest kernel's (bf16 "
                                           "on a CPU with AMX tiles, for the scratch RNN and nn.RNN), else fp32. "
                                           "Weights, evaluation and generation stay fp32.")
        s["kernel"] = st.selectbox("Kernel", KERNELS, key="train_kernel", persist_state="session",
                                   help="How the recurrence runs. auto: the fastest on this machine (C loops "
                                        "for its CPU's vector instructions, bf16 loops, cuDNN on a GPU). "
                                        "reference: the book's loop, step by step. A forced kernel that "
                                        "cannot run this model here says why at Start.")
        cores = default_threads()
        if threads_settable():
            s["threads"] = st.number_input(
                "CPU threads", 1, MAX_THREADS, kernels.app_threads(cores), key="train_threads",
                persist_state="session",
                help=f"Threads for the run's CPU ops ({cores} cores here). The default is what trained "
                     "fastest with this page open in a browser on the same machine: every core for the "
                     "C fp32 kernels, one fewer on a CPU with AMX tiles, whose bf16 loops gain little "
                     "from a second thread. The command line uses all of them unless told (--threads).")
        else:
            s["threads"] = 0
            st.number_input("CPU threads", value=cores, disabled=True, key="train_threads_all",
                            help="This PyTorch build cannot give a run its own thread count, so runs use every core.")
    if s["model"] == "scratch":
        s["num_layers"], s["bidirectional"] = 1, False
    return s


def corpus_ui():
    """The Time Machine or an uploaded text. Returns (source, why): source is (name, preprocessing,
    text) or None, and `why` says, when it is None, why Start is off and what to do instead."""
    problem = timemachine_problem()
    timemachine_ok = problem is None
    options = ["The Time Machine", "Upload a .txt"]
    choice = st.radio("Corpus", options, index=0 if timemachine_ok else 1, key="train_corpus", persist_state="session",
                      horizontal=True)
    if choice == options[0]:
        if not timemachine_ok:
            st.warning(f"{problem} You can upload a text instead.")
            return None, NO_TIMEMACHINE
        return ("timemachine", "seed", None), None
    upload = st.file_uploader("A UTF-8 text file", type=["txt"], key="upload",  # not train_-prefixed: an uploader cannot be re-assigned
                              max_upload_size=MAX_CORPUS_BYTES // 2**20,
                              help=f"Up to {MAX_CORPUS_BYTES // 2**20} MB.")
    mode = st.radio("Preprocessing", ["raw", "seed"], key="train_preprocessing", persist_state="session", horizontal=True,
                    format_func={"raw": "raw: every character", "seed": "seed: lowercase letters and spaces"}.get)
    other = ", or choose The Time Machine" if timemachine_ok else ""
    if upload is None:
        return None, f"Upload a .txt file under Settings{other}."
    try:
        text = decode_text(upload.getvalue(), upload.name)
    except CorpusError as e:
        st.error(str(e))
        return None, f"The uploaded file cannot be used (the error under Settings says why): upload another .txt file{other}."
    st.caption(f"{upload.name}: {len(text):,} characters.")
    return (upload.name, mode, text), None


# -----------------------------------------------------------------------------
# drawing a run

def curve(xs: list, ys: list) -> tuple[list, list]:
    """A curve's points for the chart: at most MAX_POINTS, evenly spaced, always keeping the last,
    with NaN and infinity as None (a gap: JSON has no NaN, and the browser's parser rejects it)."""
    n = len(xs)
    idx = range(n) if n <= MAX_POINTS else sorted(set(range(0, n, n // MAX_POINTS + 1)) | {n - 1})
    return [xs[i] for i in idx], [ys[i] if math.isfinite(ys[i]) else None for i in idx]


def hline(y: float, color: str, text: str, left: bool) -> tuple[dict, dict]:
    """A dashed line across the plot at `y` and its label (the y axes are log: y in decades)."""
    line = dict(type="line", xref="paper", x0=0, x1=1, yref="y", y0=y, y1=y, line=dict(dash="dash", color=color))
    label = dict(x=0 if left else 1, xref="paper", y=math.log10(y), yref="y", text=text, showarrow=False,
                 xanchor="left" if left else "right", yanchor="bottom", font=dict(color=color, size=11))
    return line, label


def tick_label(v: float) -> str:
    """A log axis's tick in full: 20 as "20" (Plotly's own minor labels say "2"), 1000 as "1,000"."""
    if 1e-3 <= v < 1e6:
        return f"{v:,.0f}" if v == round(v) else f"{v:,g}"
    e = math.floor(math.log10(v))
    return f"{v / 10**e:g}e{e}"


def log_ticks(y_range: list[float], marks: list[float], px: float) -> tuple[list[float], list[str]]:
    """Tick values and labels for a log axis over 10**y_range[0] .. 10**y_range[1], drawn `px`
    pixels tall: 1, 2, 5 in each decade, or only the powers of ten (every other, ...) when the
    decades are crowded; and the `marks` (the vocabulary size), dropping a regular tick that
    would crowd one. Only values inside the range."""
    lo, hi = y_range
    per_decade = px / max(hi - lo, 1e-9)
    mantissas, every = ((1, 2, 5), 1) if per_decade >= 50 else ((1,), max(1, math.ceil(18 / per_decade)))
    regular = [float(f"{m}e{e}") for e in range(math.floor(lo), math.ceil(hi) + 1) if e % every == 0 for m in mantissas]
    marks = [m for m in marks if m > 0]
    near = lambda v: any(abs(math.log10(v) - math.log10(m)) * per_decade < 12 for m in marks)
    values = sorted({v for v in regular if not near(v)} | set(marks))
    values = [v for v in values if lo - 1e-9 <= math.log10(v) <= hi + 1e-9]
    return values, [tick_label(v) for v in values]


def epoch_ticks(traces: list[dict]) -> dict:
    """Whole epochs on the x axis: on a short run Plotly would tick every half epoch."""
    last = max((x for t in traces for x in t.get("x") or () if x is not None), default=0)
    return dict(dtick=1) if last <= 10 else {}


def log_figure(traces: list[dict], lines: list[tuple[dict, dict]], name: str, height: int, legend_y: float,
               y_title: str, y_range: list[float], marks: list[float]) -> dict:
    """A Plotly figure per epoch with a log y axis, its dashed lines (hline) and their labels. The
    y axis's ticks are given (log_ticks), each labelled in full, the `marks` among them."""
    tickvals, ticktext = log_ticks(y_range, marks, px=height - 110)   # less the margins, x axis and legend
    layout = dict(height=height, margin=dict(l=60, r=10, t=30, b=10), uirevision=name,
                  legend=dict(orientation="h", y=legend_y), shapes=[l for l, _ in lines], annotations=[a for _, a in lines],
                  xaxis=dict(title=dict(text="epoch"), **epoch_ticks(traces)),
                  yaxis=dict(title=dict(text=y_title), type="log", range=y_range,
                             tickmode="array", tickvals=tickvals, ticktext=ticktext))
    return dict(data=traces, layout=layout)


def baseline_traces(ngram: dict[int, dict], last_epoch: float) -> list[dict]:
    """The n-gram baselines as flat lines across the chart, named like "3-gram (val)" and labelled
    at their right end: the validation ones shown, the training ones (far lower at high orders:
    they memorise) one click away. One legend entry per split toggles its lines: Plotly toggles a
    legend group together, and only an empty trace of the group shows in the legend."""
    traces, top = [], max(ngram)
    for split, dash in (("val", "dot"), ("train", "dashdot")):
        orders = [n for n in sorted(ngram) if ngram[n].get(split) is not None]
        if not orders:
            continue
        group = dict(legendgroup=f"ngram-{split}", visible=True if split == "val" else "legendonly",
                     line=dict(color="#aaa", width=1, dash=dash))
        traces.append(dict(type="scatter", x=[None], y=[None], mode="lines", showlegend=True,
                           name=f"{orders[0]}–{orders[-1]}-gram ({split})", **group))
        for n in orders:
            y, name = ngram[n][split], f"{n}-gram ({split})"
            traces.append(dict(type="scatter", x=[0, last_epoch], y=[y, y], name=name, mode="lines+text",
                               # the two highest orders lie close: the top one's label goes under its line
                               text=["", name], textposition="bottom left" if n == top else "top left",
                               textfont=dict(size=10, color="#888"), showlegend=False,
                               hovertemplate=f"{name}: %{{y:.2f}}<extra></extra>", **group))
    return traces


def perplexity_figure(snaps: list[Snapshot], ngram: dict[int, dict] | None = None) -> dict:
    """Every run's training and validation perplexity per epoch; with `ngram`, the baselines of the
    watched run's text."""
    traces = []
    vocab = max(s.vocab_size for s in snaps)
    for i, s in enumerate(snaps):
        color = COLORS[i % len(COLORS)]
        ep = s.columns["epoch"]
        label = html.escape(s.label)  # Plotly reads tags in names; an uploaded file's name is the user's
        x, y = curve(ep[1:], s.columns["train_ppl"][1:])
        traces.append(dict(type="scatter", x=x, y=y, name=f"{label} · train", mode="lines", line=dict(color=color)))
        x, y = curve(ep, s.columns["val_ppl"])
        traces.append(dict(type="scatter", x=x, y=y, name=f"{label} · validation", mode="lines",
                           line=dict(color=color, dash="dot")))
    if ngram:
        traces += baseline_traces(ngram, max(max(s.epochs, 1) for s in snaps))
    lines = [hline(vocab, "gray", f"uniform guess = vocab size ({vocab})", True), hline(1, "green", "perfect = 1", True)]
    top = max([vocab] + [v for s in snaps for v in s.columns["train_ppl"] + s.columns["val_ppl"] if math.isfinite(v)])
    # the y range: from just under 1 to the worst
    return log_figure(traces, lines, "ppl", 380, -0.2, "perplexity (log)", [-0.05, math.log10(top * 1.5)], [vocab])


def decades(values: list[float]) -> list[float]:
    """A log axis's range in whole decades around the values: it changes only now and then, so a
    live chart's tick labels need not be laid out again at every redraw."""
    finite = [v for v in values if 0 < v < math.inf] or [1.0]
    return [math.floor(math.log10(min(finite))), math.ceil(math.log10(max(finite)) + 0.05)]


def grad_figure(s: Snapshot) -> dict:
    ep = s.columns["epoch"][1:]
    values = s.columns["grad_norm"][1:] + s.columns["grad_norm_max"][1:] + ([s.config.clip] if s.config.clip > 0 else [])
    traces = []
    for column, name, line in [("grad_norm", "mean ‖g‖", {}), ("grad_norm_max", "max ‖g‖", dict(dash="dot"))]:
        x, y = curve(ep, s.columns[column][1:])
        traces.append(dict(type="scatter", x=x, y=y, name=name, mode="lines", line=line))
    lines = [hline(s.config.clip, "red", f"θ = {s.config.clip:g}: above it, clipping bites", False)] if s.config.clip > 0 else []
    return log_figure(traces, lines, "grad", 220, -0.35, "‖g‖ before clipping", decades(values),
                      [s.config.clip] if s.config.clip > 0 else [])


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    m, s = divmod(int(seconds), 60)
    return f"{m // 60} h {m % 60:02d} min" if m >= 60 else f"{m} min {s:02d} s" if m else f"{s} s"


def flow_view(overlay: list[Snapshot]) -> None:
    """Gradient flow through time for the first two runs on the chart, side by side on one colour
    scale, and sigma_max(W_hh) per epoch for every run on it."""
    probed = [s for s in overlay if s.flows][:2]
    st.markdown("**Gradient flow through time** — on a fixed probe minibatch, how strongly the loss at "
                "the last step reaches back to each earlier step; the table's selection picks the runs.")
    if not probed:
        st.caption("No probe yet: the first comes after the untrained model's point (a bidirectional "
                   "model has none: its states see the future).")
        return
    which = st.radio("Gradient of the last step's loss ℓ_T with respect to", list(gv.QUANTITIES), horizontal=True,
                     key="train_flow_of", format_func=gv.quantity_label,
                     help="Bright at the right and dark at the left: the gradient vanishes going back in "
                          "time; bright at the left: it explodes. σ_max(W_hh) below 1 makes the scratch "
                          "RNN's gradient vanish; well above it, it can explode (clipping then bites).")
    rows = [[(f.h_norms if which == "h" else f.x_norms) for _, f in s.flows] for s in probed]
    z = gv.zrange(rows)
    for i, (column, s, r) in enumerate(zip(st.columns(2), probed, rows)):
        with column:
            live_plot(gv.flow_figure([e for e, _ in s.flows], r, which, s.label, z), key=f"train_flow_{i}")
    if any(math.isfinite(v) for s in overlay for v in s.columns["sigma_max"]):   # a probe can come before its epoch's row
        live_plot(gv.sigma_figure([(s.label, s.columns["epoch"], s.columns["sigma_max"]) for s in overlay]),
                  key="train_sigma")


def live_view(snap: Snapshot, overlay: list[Snapshot]) -> None:
    frac = snap.epoch / snap.epochs if snap.epochs else 0
    st.progress(min(frac, 1.0), text=f"{snap.label} — epoch {snap.epoch} / {snap.epochs} · "
                                      f"{fmt_time(snap.elapsed_s)} elapsed · ETA {fmt_time(snap.eta_s)} · {snap.kernel} · {snap.status}")
    m1, m2, m3, m4 = st.columns(4)
    ppl, val, tps, g = (snap.last(c) for c in ("train_ppl", "val_ppl", "tokens_per_s", "grad_norm"))
    m1.metric("Train perplexity", f"{ppl:.3f}" if ppl else "–")
    m2.metric("Validation perplexity", f"{val:.2f}" if val else "–")
    m3.metric("Tokens / s", f"{tps:,.0f}" if tps else "–")
    m4.metric("Gradient norm", f"{g:.3g}" if g else "–")
    live_plot(perplexity_figure(overlay, snap.ngram), key="train_chart_ppl")
    left, right = st.columns([3, 2])
    with left:
        if snap.epoch:
            live_plot(grad_figure(snap), key="train_chart_grad")
    with right:
        st.markdown("**Samples after “time traveller”**, newest first")
        rows = "".join(f"<div><code>{epoch:>5}</code> {html.escape(text)}</div>"
                       for epoch, text in reversed(snap.samples[-30:]))
        st.html(f"<div style='font-family:monospace;font-size:0.85em;max-height:230px;overflow-y:auto'>{rows}</div>")
    flow_view(overlay)
    if snap.graph_failed:
        st.warning(f"The CUDA graph could not be recorded, so this run launches its ops one by one "
                   f"(slower, same numbers): {snap.graph_failed}")
    if snap.error:
        st.error(snap.error)


def saved_at(entry: dict) -> float:
    """When a list_checkpoints entry was saved (its metadata's `created`), in seconds; 0 if unknown."""
    try:
        return datetime.fromisoformat(entry["created"]).timestamp()
    except (KeyError, TypeError, ValueError):
        return 0.0


def continue_saved(running, source, settings: dict) -> None:
    """Pick a saved checkpoint and train it further: a new run whose curve starts with the saved
    history, on this page's device and threads; every other setting is the saved run's."""
    entries = [e for e in list_checkpoints() if "error" not in e]
    # newest first: the one just saved is the one most likely to go on
    resumable = sorted((e for e in entries if e["resumable"]), key=saved_at, reverse=True)
    said = st.session_state.get("continue_said")
    if said:
        (st.success if said[0] == "success" else st.error)(said[1])
        # said again until the continued run has ended: its end redraws the page, which would
        # otherwise take the message away before a short run's reader saw it
        if not (said[0] == "success" and running is not None and running.id == said[2]):
            del st.session_state["continue_said"]
    if not resumable:
        older = [e["name"] for e in entries if not e["resumable"]]
        st.caption("No saved checkpoint can be continued yet: save a run below, and it appears here."
                   + (f" ({', '.join(older)} {'was' if len(older) == 1 else 'were'} saved without optimizer "
                      "state, so it can be read but not continued exactly.)" if older else ""))
        return
    newest = resumable[0]["name"]
    if st.session_state.get("continue_saved_newest") != newest:   # a checkpoint saved since: pick it
        st.session_state["continue_saved_newest"] = st.session_state["continue_saved_name"] = newest
    c1, c2, c3 = st.columns([4, 1, 1], vertical_alignment="bottom")
    describe = {e["name"]: (f"{e['name']} — {e['model']}-{e['hidden']}, {e['epochs']} epochs, perplexity "
                            f"{e['perplexity']:.2f}" if e.get("perplexity") else e["name"]) for e in resumable}
    name = c1.selectbox("Checkpoint", list(describe), format_func=describe.get, key="continue_saved_name",
                        help="Checkpoints saved with their optimizer state (checkpoints/*.safetensors), newest first.")
    more = c2.number_input("More epochs", 1, MAX_EPOCHS, 100, key="continue_saved_epochs")
    if not c3.button("Continue", key="continue_saved", disabled=running is not None,
                     help="Goes on exactly where the saved run ended: its weights, optimizer state, "
                          "minibatch order and curve."):
        return
    entry = next(e for e in resumable if e["name"] == name)
    try:
        loaded = load_checkpoint(entry["path"])   # not the pages' cached copy: training changes the weights
        c, train = loaded.meta["corpus"], loaded.meta["train"]
        if c["name"] == "timemachine":
            text_name, text = "timemachine", None
        elif source is not None and source[2] is not None:
            text_name, text = source[0], source[2]
        else:
            raise UserError(f"{name} trained on {c['name']}: choose *Upload a .txt* under Settings, upload "
                            "that file, and press Continue again.")
        corpus = corpus_for(text_name, loaded.preprocessing, train["max_tokens"], text, c["val_tokens"])
        job, notes = jobs.continue_saved(loaded, corpus, int(more), device=settings["device"],
                                         threads=settings["threads"])
    except (UserError, JobBusy) as e:
        st.session_state["continue_said"] = ("error", str(e), None)
    else:
        st.session_state["train_watch"] = job.id
        st.session_state["continue_said"] = ("success", f"{name} continues as {job.label}"
                                             + (f"; {'; '.join(notes)}, so it will not end exactly where an "
                                                "uninterrupted run would." if notes else "."), job.id)
    st.rerun()


def compare_row(s: Snapshot) -> dict:
    c = s.config
    speeds = [v for v in s.columns["tokens_per_s"] if math.isfinite(v)]
    return {"run": s.label, "status": s.status, "model": c.model, "hidden": c.hidden_size, "layers": c.num_layers,
            "sampling": c.sampling, "batch": c.batch_size, "steps": c.num_steps, "lr": c.lr,
            "optimizer": c.optimizer, "clip θ": c.clip, "epochs": s.epoch, "train ppl": s.last("train_ppl"),
            "val ppl": s.last("val_ppl"), "tokens/s": sum(speeds) / len(speeds) if speeds else None,
            "kernel": s.kernel, "wall time (s)": s.elapsed_s, "seed": c.seed, "max tokens": c.max_tokens}


def runs_table(snaps: list[Snapshot]) -> list[int]:
    """The runs side by side, sortable by any column; returns the positions of the rows selected
    (none selected: all), whose runs the chart shows."""
    table = pd.DataFrame([compare_row(s) for s in snaps])
    number = lambda fmt: st.column_config.NumberColumn(format=fmt)
    event = st.dataframe(table, key="train_runs", on_select="rerun", selection_mode="multi-row", hide_index=True,
                         column_config={"train ppl": number("%.3f"), "val ppl": number("%.2f"),
                                        "tokens/s": number("%,.0f"), "wall time (s)": number("%,.1f"),
                                        "lr": number("%g"), "clip θ": number("%g")})
    # a position may outlive its row (the oldest runs are forgotten): only those still in the table
    return [i for i in event.selection.rows if i < len(snaps)] or list(range(len(snaps)))


# -----------------------------------------------------------------------------
# the page

# The progress bar animates every change of its width: the browser then drew ~32 frames a second,
# in software without a GPU, on the cores the run trains on (5 without). It jumps instead.
st.html("<style>[data-testid='stProgress'] * { transition: none !important; }</style>")
running = jobs.running()
read_link(LINK, "train", hidden=lambda given: f"train_hidden_{given.get('model') if given.get('model') in KINDS else 'scratch'}")
with st.expander("Settings", expanded=running is None):
    source, why = corpus_ui()
    settings = settings_ui()
    settings_to_link(settings)
    try:
        st.caption("The same settings from the command line (the link in the address bar shares them):")
        st.code(cli_command(TrainConfig(**settings), *(source or ("timemachine", "seed"))[:2]), language="bash")
    except UserError as e:
        st.caption(f"No command line for these settings: {e}")
# Start is off for want of a text: say so, and what to do instead, never "press Start"
blocked = f"**Start** is off until there is a text to train on. {why}" if running is None and source is None else None
all_jobs = jobs.jobs()

b1, b2, b3 = st.columns([1, 1, 6], vertical_alignment="center")
start = b1.button("Start", type="primary", disabled=running is not None or source is None, key="start")
stop = b2.button("Stop", disabled=running is None, key="stop")
if running is not None:
    b3.caption(f"{running.label} is training (one run at a time on this machine); Stop it to start another.")
elif blocked and all_jobs:  # with no run yet, the box below says it
    b3.caption(blocked)

if start:
    try:
        name, mode, text = source
        config = TrainConfig(**settings)
        corpus = corpus_for(name, mode, config.max_tokens, text)
        running = jobs.start(config, corpus, settings=settings | {"corpus": name, "preprocessing": mode})
        st.session_state["train_watch"] = running.id
    except (UserError, JobBusy) as e:
        st.error(str(e))
    else:
        st.rerun()  # draw the buttons again: Start off, Stop on
if stop and running is not None:
    running.stop(timeout=2.0)
    st.rerun()

with st.expander("Continue a saved checkpoint", expanded="continue_said" in st.session_state):
    continue_saved(running, source, settings)
all_jobs = jobs.jobs()     # with a continued checkpoint's run

preload_plotly()  # fetched while the user reads the settings, not after Start
if not all_jobs:
    st.info(blocked or "Press **Start** to train with the seed's settings; the perplexity curve appears here "
                       "and falls live.")
    preload_optimizers()  # once a process, after the page is drawn (a run made before has done it)
    st.stop()

st.caption("Runs on this server, side by side (click a column's name to sort). Select rows to draw "
           "only those runs on the chart, beside the one trained last; with none selected it shows them all.")
shown = [all_jobs[i].id for i in runs_table([j.snapshot() for j in all_jobs])]
current = running or next((j for j in reversed(all_jobs) if j.id == st.session_state.get("train_watch")),
                          all_jobs[-1])


@st.fragment(run_every=LIVE_EVERY_S if running is not None else None)
def live():
    snap = current.snapshot()
    overlay = [j.snapshot() if j is not current else snap for j in all_jobs if j.id in shown or j is current]
    live_view(snap, overlay)
    if running is not None and not snap.running:
        st.rerun()  # the run ended: redraw the whole page once, with the save form and no timer


live()

# save the ended runs

def save_clicked(job, overwrite: bool) -> None:
    """Save and Overwrite call this before the page is drawn again, so the page then shows the
    outcome and only the buttons that still apply. A taken name is remembered, not replaced."""
    name = st.session_state[f"save_name_{job.id}"].strip()
    st.session_state.pop("save_taken", None)
    try:
        path = job.save(name, overwrite=overwrite)
    except CheckpointExists:
        st.session_state["save_taken"] = (job.id, name)
        return
    except (UserError, JobBusy) as e:
        st.session_state["save_said"] = ("error", str(e))
        return
    st.session_state["save_said"] = ("success", f"{'Replaced' if overwrite else 'Saved'} {path}. It is now in "
                                                 "the Generate and Inspect pages.")


def existing(path) -> str:
    """What the checkpoint at `path` holds, in a few words."""
    try:
        meta = read_metadata(path)
        m, epochs = meta["model"], meta["metrics"].get("epochs")
        return (f"It holds {m['kind']}-{m['hidden_size']} after {epochs} epoch{'' if epochs == 1 else 's'}, "
                f"saved {meta.get('created', 'at an unknown time')}.")
    except (CheckpointError, KeyError, TypeError):
        return "It is not a readable checkpoint."


ended = [j for j in all_jobs if not j.running and j.trainer.epoch > 0]
if ended:
    st.subheader("Save a run")
    c1, c2, c3 = st.columns([3, 2, 1])
    # no key: when another run ends the options change, and the newest run is selected again
    pick = c1.selectbox("Run", [j.label for j in reversed(ended)])
    job = next(j for j in ended if j.label == pick)
    # the default name carries the run's start time: job ids restart at run1 with every server start
    name = c2.text_input("Checkpoint name", job.default_name, key=f"save_name_{job.id}",
                         help="Saved as checkpoints/NAME.safetensors. A name already taken is not replaced "
                              "unless you confirm it.").strip()
    c3.write("")
    c3.button("Save", key="save", on_click=save_clicked, args=(job, False))
    said = st.session_state.pop("save_said", None)
    if said:
        (st.success if said[0] == "success" else st.error)(said[1])
    if st.session_state.get("save_taken") == (job.id, name):  # forgotten once the name or the run changes
        taken = path_for_name(name)
        st.warning(f"A checkpoint named `{name}` exists already (`{taken}`), so nothing was saved. "
                   f"{existing(taken)} **Overwrite** replaces it with this run; to keep it, type another name.")
        o1, o2, _ = st.columns([1, 1, 6])
        o1.button("Overwrite", key="save_overwrite", type="primary", on_click=save_clicked, args=(job, True))
        o2.button("Cancel", key="save_cancel", on_click=st.session_state.pop, args=("save_taken", None))
    d1, d2, _ = st.columns([2, 2, 4])
    k1, k2, _ = st.columns([1, 1, 6], vertical_alignment="bottom")
    more = k1.number_input("More epochs", 1, MAX_EPOCHS, 100, key="continue_epochs",
                           help="Continue this run where it ended: the same settings, optimizer state and "
                                "minibatch order; its curve on the chart goes on.")
    if k2.button("Continue", key="continue", disabled=running is not None):
        try:
            jobs.resume(job.id, int(more))
            st.session_state["train_watch"] = job.id
        except (UserError, JobBusy) as e:
            st.error(str(e))
        else:
            st.rerun()
    # the data is made when the button is clicked (a callable), not on every rerun
    d1.download_button("Download its history (CSV)", lambda: job.snapshot().history_csv(), f"{job.default_name}.csv",
                       mime="text/csv", key="download_history", on_click="ignore",
                       help="One row an epoch: perplexities, tokens/s, gradient norms, time.")
    saved = [p for p in job.snapshot().saved if Path(p).is_file()]
    if saved:                                    # the file as saved, for another machine
        d2.download_button("Download the checkpoint", lambda: Path(saved[-1]).read_bytes(), Path(saved[-1]).name,
                           mime="application/octet-stream", key="download_checkpoint", on_click="ignore",
                           help="safetensors weights and JSON metadata; Generate and Inspect read it from checkpoints/.")
    with st.expander("The same run from the command line"):
        st.code(job.cli_command(), language="bash")
