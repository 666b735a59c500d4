"""Inspect: the seed's tensors, shapes and hidden states, live.

Widgets, tables and Plotly figures only; every number comes from charrnn.inspection.

The sections are lazy tabs: a run draws only the open tab, so a visit costs the work of one
section. A section that needs another one's settings (the shape trace: the worked example's
model; the perplexity: the model and text of "Inside a trained model") reads them from the
session, where those widgets keep their values while their tab is closed.
"""
from __future__ import annotations

import html
import math

import plotly.graph_objects as go
import streamlit as st
from plotly.colors import qualitative

from charrnn import inspection as ins
from charrnn.checkpoint import SUFFIX, checkpoint_dir
from charrnn.data import Vocab, printable
from charrnn.models import ModelConfig
from charrnn.errors import UserError
from pages.common import UNTRAINED, Picked, corpus_for, model_picker, seed_vocab, through_router

through_router()

SEED_TEXT = ("the time traveller for so it will be convenient to speak of him was expounding "
             "a recondite matter to us")
KIND_LABELS = {"scratch": "scratch RNN", "rnn": "nn.RNN", "gru": "nn.GRU", "lstm": "nn.LSTM"}
MAX_STEPS_DRAWN, MAX_BATCH_DRAWN = 6, 16   # one-hot heatmaps: a few thousand cells at most
WINDOW = 120                               # characters per heatmap of a text
MAX_UNITS_DRAWN = 64                       # hidden units in the heatmap, largest variance first
MAX_PAGE_HIDDEN = 512                      # the demo model is built and run for the page: keep it quick
TABS = ["Worked example", "Shape trace", "Concatenation", "Inside a trained model", "Perplexity",
        "Step through", "Hidden-state trajectory", "Gradient flow"]
# the worked example's widgets and their defaults (the shape trace reads them with its tab closed)
EXAMPLE = {"inspect_batch": 2, "inspect_steps": 5, "inspect_kind": "scratch", "inspect_hidden": 512,
           "inspect_layers": 1, "inspect_bidir": False}
DIGITS = 3                                 # decimals of the floats sent to a heatmap (hover shows 2)
MARGIN = dict(l=10, r=10, t=30, b=10)


def fmt(shape) -> str:
    """(5, 2, 28) as the page prints shapes; () for a scalar."""
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def md(text: str) -> str:
    """Plain text for a Markdown table cell: no emphasis from * or _ (W_xh, D*hidden)."""
    return text.replace("*", "\\*").replace("_", "\\_")


def activation_colour(a: float) -> str:
    """Karpathy's colouring: -1 red, 0 white, +1 blue; pastel at the ends so the text stays legible."""
    a = 0.7 * max(-1.0, min(1.0, a))
    fade = int(255 * (1 - abs(a)))                 # the two channels that fade out
    return f"rgb(255,{fade},{fade})" if a < 0 else f"rgb({fade},{fade},255)"


def kept(key: str, default):
    """A widget's value on a run that does not draw it (its tab is closed): the session keeps it
    (persist_state="session"); before the widget was ever drawn, its default."""
    return st.session_state.get(key, default)


def rounded(rows) -> list:
    """A tensor's values as lists of floats with DIGITS decimals: a third of the JSON of float32
    values written out in full."""
    return rows.double().mul(10 ** DIGITS).round().div(10 ** DIGITS).tolist()


# -----------------------------------------------------------------------------
# cached work: the same for every session, so built once per process

@st.cache_resource(max_entries=16, show_spinner=False)
def demo_model(kind: str, vocab_size: int, hidden: int, layers: int, bidirectional: bool):
    """The untrained model of the worked example (repeatable weights, eval mode, only read)."""
    return ins.demo_model(ModelConfig(kind, vocab_size, hidden, layers, bidirectional))


@st.cache_data(max_entries=64, show_spinner=False)
def layer_example(kind: str, vocab_size: int, hidden: int, layers: int, bidirectional: bool,
                  batch: int, steps: int) -> ins.LayerExample:
    return ins.layer_example(kind, vocab_size, hidden, layers, bidirectional, batch, steps)


@st.cache_resource(max_entries=32, show_spinner=False)
def onehot_figure(batch: int, steps: int, labels: tuple[str, ...]) -> go.Figure:
    """The worked example's one-hot heatmaps, one per drawn step, stacked, every column labelled
    with its token. Built as a dict (no make_subplots), validated once, and kept: st.plotly_chart
    only copies a Figure it is given."""
    V = len(labels)
    ex = ins.seed_onehot_example(batch, steps, V)
    n_t, n_b = min(steps, MAX_STEPS_DRAWN), min(batch, MAX_BATCH_DRAWN)
    # every step's heatmap has its own column labels, the token of each one-hot index (the bottom
    # axis alone was far from the top ones); in pixels: a row per sequence, a gap for labels and title
    row_px, gap_px = 20 + 18 * n_b, 56
    height = 40 + 30 + n_t * row_px + (n_t - 1) * gap_px     # margins, the bottom labels, the plots
    gap = gap_px / (height - 70)                              # as a fraction of the plot area
    row = (1 - (n_t - 1) * gap) / n_t
    seqs = [f"seq {b}" for b in range(n_b)]
    data, layout = [], {"height": height, "margin": MARGIN, "annotations": []}
    for t in range(n_t):
        n = "" if t == 0 else str(t + 1)                      # axis ids x, x2, ... top to bottom
        top = 1 - t * (row + gap)
        data.append({"type": "heatmap", "xaxis": f"x{n}", "yaxis": f"y{n}",
                     "z": ex.onehot[t, :n_b].tolist(), "x": list(range(V)), "y": seqs, "zmin": 0, "zmax": 1,
                     "customdata": [list(labels)] * n_b, "colorscale": [[0, "#f4f4f4"], [1, "#1f77b4"]],
                     "showscale": False, "xgap": 1, "ygap": 1,
                     "hovertemplate": "seq %{y}, token %{customdata} (id %{x}): %{z}<extra></extra>"})
        # all V labels, on every step (Plotly thins a crowded axis), upright: Plotly would turn
        # every letter on its side for the one wide label, <unk>
        layout[f"xaxis{n}"] = {"anchor": f"y{n}", "domain": [0, 1], "tickmode": "array",
                               "tickvals": list(range(V)), "ticktext": list(labels), "showticklabels": True,
                               "tickangle": 0, "tickfont": {"family": "monospace", "size": 11}}
        if t < n_t - 1:
            layout[f"xaxis{n}"]["matches"] = f"x{n_t}"        # shared x, as make_subplots(shared_xaxes)
        layout[f"yaxis{n}"] = {"anchor": f"x{n}", "domain": [max(top - row, 0), top],
                               "autorange": "reversed", "type": "category"}
        layout["annotations"].append({"text": f"t = {t}: one_hot(X.T[{t}])  ({batch}, {V})", "x": 0.5, "y": top,
                                      "xref": "paper", "yref": "paper", "xanchor": "center",
                                      "yanchor": "bottom", "showarrow": False, "font": {"size": 12}})
    return go.Figure({"data": data, "layout": layout})


def char_axis(xs: list[int], ticks: list[str]) -> dict:
    """An x axis labelled with the characters of the text window."""
    return {"tickmode": "array", "tickvals": xs, "ticktext": ticks, "tickangle": 0,
            "tickfont": {"family": "monospace"}}


# -----------------------------------------------------------------------------
# the sections

def worked_example_settings(draw: bool):
    """The worked example's batch, steps and model: its widgets when `draw`, else their kept values."""
    if draw:
        c1, c2, c3, c4, c5, c6 = st.columns([1, 1, 1.4, 1, 1, 1.3], vertical_alignment="bottom")
        batch = c1.number_input("Batch size", 1, 64, 2, key="inspect_batch", persist_state="session")
        steps = c2.number_input("Steps", 1, 64, 5, key="inspect_steps", persist_state="session")
        kind = c3.selectbox("Model", list(KIND_LABELS), format_func=KIND_LABELS.get, key="inspect_kind",
                            persist_state="session",
                            help="scratch: the seed's RNNModelScratch with explicit W_xh, W_hh, b_h, W_hq, "
                                 "b_q; the others: the seed's concise RNNModel over a torch.nn layer.")
        hidden = c4.number_input("Hidden size", 1, MAX_PAGE_HIDDEN, 512, key="inspect_hidden",
                                 persist_state="session")
        layers = c5.number_input("Layers", 1, 3, 1, key="inspect_layers", persist_state="session")
        bidirectional = c6.toggle("Bidirectional", key="inspect_bidir", persist_state="session")
    else:
        batch, steps, kind, hidden, layers, bidirectional = (kept(k, v) for k, v in EXAMPLE.items())
    if kind == "scratch" and (layers > 1 or bidirectional):
        if draw:
            st.info("The from-scratch RNN has one unidirectional layer, as in the seed, so layers and "
                    "bidirectional are ignored for it; pick nn.RNN, nn.GRU or nn.LSTM to use them.")
        layers, bidirectional = 1, False
    return int(batch), int(steps), kind, int(hidden), int(layers), bool(bidirectional)


def worked_example(vocab: Vocab) -> None:
    st.subheader("One-hot encoding of a (batch, steps) batch")
    batch, steps, kind, hidden, layers, bidirectional = worked_example_settings(draw=True)
    V = len(vocab)
    ex = ins.seed_onehot_example(batch, steps, V)
    st.code(f"{ex.code}   # X.shape = {fmt(ex.X.shape)} = (batch, steps)\n"
            f"F.one_hot(X.T, {V}).shape   # {fmt(ex.onehot.shape)} = (steps, batch, vocab)")
    st.markdown(f"One-hot shape **{fmt(ex.onehot.shape)}**: the batch is transposed so the first axis "
                f"is time; step t is a ({batch}, {V}) matrix with a single 1 per row, in the column "
                f"of that row's token." + (f" Ids above {V - 1} are taken modulo {V}." if ex.wrapped else ""))
    n_t, n_b = min(steps, MAX_STEPS_DRAWN), min(batch, MAX_BATCH_DRAWN)
    labels = tuple(vocab.label(i) for i in range(V))             # '<unk>', '␣', 'e', ...
    st.plotly_chart(onehot_figure(batch, steps, labels), width="stretch", key="inspect_onehot_fig")
    if n_t < steps or n_b < batch:
        st.caption(f"Drawn: the first {n_t} of {steps} steps and {n_b} of {batch} sequences.")

    st.subheader("Through the model")
    model = demo_model(kind, V, hidden, layers, bidirectional)
    fw = ins.forward_shapes(model, ex.X)
    if kind == "scratch":
        net = f"RNNModelScratch(vocab_size={V}, num_hiddens={hidden})"
    else:
        net = f"RNNModel({ins.layer_code(kind, V, hidden, layers, bidirectional)}, vocab_size={V})"
    lines = [f"net = {net}   # untrained: only the shapes matter",
             f"state = net.begin_state({batch})",
             "Y, new_state = net(X, state)",
             f"Y.shape              # {fmt(fw.Y_shape)}"]
    if fw.state_len is None:
        lines.append(f"new_state.shape      # {fmt(fw.state_shapes[0])}   {fw.state_what}")
    else:
        lines.append(f"len(new_state)       # {fw.state_len}   {fw.state_what}")
        lines += [f"new_state[{i}].shape   # {fmt(s)}" for i, s in enumerate(fw.state_shapes)]
    st.code("\n".join(lines))
    st.markdown(
        f"**Why is Y {fmt(fw.Y_shape)}?** The model runs {fw.steps} time steps. At each step it turns "
        f"the hidden state of the {fw.batch} sequences into a ({fw.batch}, {V}) block of logits, one "
        f"score per token. The {fw.steps} blocks are stacked one under the other, so Y has "
        f"{fw.steps * fw.batch} = {fw.steps} × {fw.batch} = steps × batch rows and {V} = vocab columns. "
        f"Row t·{fw.batch} + b is step t of sequence b, which is why the targets are flattened as "
        f"`Y.T.reshape(-1)`.")
    if kind == "scratch":
        st.markdown(f"The state is a tuple holding one tensor H of shape {fmt(fw.state_shapes[0])} = "
                    f"(batch, hidden): one hidden vector per sequence, carried from step to step.")
    elif kind == "lstm":
        st.markdown(f"An LSTM's state is a pair (h, c), each {fmt(fw.state_shapes[0])} = "
                    "(directions × layers, batch, hidden): the hidden state and the memory cell.")
    else:
        st.markdown(f"nn.{ins.LAYER_CLASSES[kind].__name__}'s state is one tensor "
                    f"{fmt(fw.state_shapes[0])} = (directions × layers, batch, hidden), not a tuple.")

    st.subheader("The concise layer on its own")
    st.caption("The seed's `nn.RNN(28, 256)` on `torch.rand(35, 32, 28)`: the recurrent layer without "
               "the output layer.")
    d1, d2, d3, d4, d5, d6 = st.columns([1.4, 1, 1, 1, 1, 1.3], vertical_alignment="bottom")
    l_kind = d1.selectbox("Layer", ["rnn", "gru", "lstm"], format_func=KIND_LABELS.get,
                          key="inspect_layer_kind", persist_state="session")
    l_hidden = d2.number_input("Hidden size", 1, MAX_PAGE_HIDDEN, 256, key="inspect_layer_hidden",
                               persist_state="session")
    l_layers = d3.number_input("Layers", 1, 3, 1, key="inspect_layer_layers", persist_state="session")
    l_batch = d4.number_input("Batch size", 1, 64, 32, key="inspect_layer_batch", persist_state="session")
    l_steps = d5.number_input("Steps", 1, 64, 35, key="inspect_layer_steps", persist_state="session")
    l_bidir = d6.toggle("Bidirectional", key="inspect_layer_bidir", persist_state="session")
    le = layer_example(l_kind, V, int(l_hidden), int(l_layers), bool(l_bidir), int(l_batch), int(l_steps))
    state_lines = ([f"state_new.shape   # {fmt(le.state_shapes[0])}"] if len(le.state_shapes) == 1 else
                   [f"state_new[{i}].shape   # {fmt(s)}" for i, s in enumerate(le.state_shapes)])
    st.code("\n".join([f"rnn_layer = {le.code}",
                       f"X = torch.rand({', '.join(map(str, le.X_shape))})   # (steps, batch, vocab)",
                       "Y, state_new = rnn_layer(X, state)",
                       f"Y.shape           # {fmt(le.Y_shape)}"] + state_lines))
    D = 2 if l_bidir else 1
    st.markdown(f"Y {fmt(le.Y_shape)} = (steps, batch, {'2 × ' if D == 2 else ''}hidden) is every step's "
                f"hidden state, not logits: the seed's RNNModel adds an nn.Linear from "
                f"{D * int(l_hidden)} to {V} features. The state is {le.state_what}"
                + (", h and c" if l_kind == "lstm" else "")
                + f", {fmt(le.state_shapes[0])} = (directions × layers, batch, hidden).")


def shape_trace(vocab: Vocab) -> None:
    import pandas as pd     # here, not at the top: the worked example, open first, needs no pandas
    st.subheader("Every stage of one forward pass")
    batch, steps, kind, hidden, layers, bidirectional = worked_example_settings(draw=False)
    V = len(vocab)
    ex = ins.seed_onehot_example(batch, steps, V)
    model = demo_model(kind, V, hidden, layers, bidirectional)
    st.caption(f"The model and batch of the worked example: {KIND_LABELS[kind]}, hidden {hidden}"
               + (f", {layers} layers" if layers > 1 else "") + (", bidirectional" if bidirectional else "")
               + f"; X = {fmt(ex.X.shape)}, targets = X shifted by one id.")
    trace = ins.shape_trace(model, ex.X)
    st.table(pd.DataFrame({"stage": [md(r.stage) for r in trace], "shape": [fmt(r.shape) for r in trace],
                           "dtype": [r.dtype for r in trace], "note": [md(r.note) for r in trace]}),
             hide_index=True)
    st.subheader("Parameters")
    params = ins.parameter_table(model)
    st.table(pd.DataFrame({"name": [md(r.name) for r in params.rows],
                           "shape": [fmt(r.shape) for r in params.rows],
                           "count": [f"{r.count:,}" for r in params.rows],
                           "role": [md(r.role) for r in params.rows]}), hide_index=True)
    st.markdown(f"**Total: {params.total:,} parameters** (= `sum(p.numel() for p in net.parameters())`).")


def concatenation() -> None:
    import pandas as pd
    st.subheader("X W_xh + H W_hh = cat(X, H) cat(W_xh, W_hh)")
    st.markdown("The seed's section *RNN with hidden state*: the input's and the hidden state's "
                "contributions can be computed as two products, or as one product of the "
                "concatenated input and hidden state with the stacked weights.")
    seed = st.number_input("Random seed", 0, 10_000, 0, key="inspect_concat_seed", persist_state="session")
    ci = ins.concat_identity(int(seed))
    s = ci.shapes
    st.code(f"X, W_xh = torch.normal(0, 1, {s['X']}), torch.normal(0, 1, {s['W_xh']})\n"
            f"H, W_hh = torch.normal(0, 1, {s['H']}), torch.normal(0, 1, {s['W_hh']})\n"
            f"torch.matmul(X, W_xh) + torch.matmul(H, W_hh)                      # {fmt(s['result'])}\n"
            f"torch.matmul(torch.cat((X, H), 1), torch.cat((W_xh, W_hh), 0))     # "
            f"{fmt(s['cat((X, H), 1)'])} @ {fmt(s['cat((W_xh, W_hh), 0)'])} -> {fmt(s['result'])}")
    left, right = st.columns(2)
    frame = lambda t: pd.DataFrame(t.tolist()).style.format("{:.4f}")
    left.markdown(f"**X @ W_xh + H @ W_hh** — {fmt(s['X'])}{fmt(s['W_xh'])} + {fmt(s['H'])}{fmt(s['W_hh'])}")
    left.dataframe(frame(ci.separate), width="stretch", key="inspect_concat_left")
    right.markdown(f"**cat(X, H, 1) @ cat(W_xh, W_hh, 0)** — {fmt(s['cat((X, H), 1)'])}"
                   f"{fmt(s['cat((W_xh, W_hh), 0)'])}")
    right.dataframe(frame(ci.concatenated), width="stretch", key="inspect_concat_right")
    st.metric("Largest absolute difference", f"{ci.max_abs_diff:.2e}")
    st.caption("Equal up to float32 rounding (about 1e-7): matrix multiplication is the same sums "
               "in another order.")


def read(picked: Picked | None, text: str) -> ins.TextReading | None:
    if picked is None:
        return None
    return ins.read_text(picked.model, picked.vocab, text or "", picked.preprocessing, top_k=3)


def inside() -> None:
    picked = model_picker("inspect_model")
    text = st.text_area(f"Text (up to {ins.MAX_TEXT_CHARS:,} characters)", SEED_TEXT,
                        max_chars=ins.MAX_TEXT_CHARS, key="inspect_text", persist_state="session")
    reading = read(picked, text)
    if reading is None:
        return
    if not reading.chars:
        st.info("Type a text above to see how the model reads it.")
        return
    if picked.preprocessing == "seed":
        st.caption("This model was trained with the seed's preprocessing (letters lowercased, every other "
                   "character a space), so it knows 26 letters and the space; the text is lowercased "
                   "before reading.")
    if reading.unknown_chars:
        st.warning("Not in this model's vocabulary, read as <unk> (id 0), which it never saw in "
                   "training: " + " ".join(repr(c) for c in reading.unknown_chars))
    if not reading.honest:
        st.warning("This model is bidirectional: its backward half has already read the character it "
                   "'predicts', so the guesses and the perplexity below are not honest predictions.")
    if reading.truncated:
        st.info(f"Only the first {ins.MAX_TEXT_CHARS:,} characters are read.")
    n = len(reading.chars)
    start = 0
    if n > WINDOW:
        start = st.slider("Heatmaps from character", 0, n - WINDOW, 0, key="inspect_window",
                          persist_state="session")
        start = min(start, n - WINDOW)  # a value kept from a longer text
        st.caption(f"The heatmaps, the guesses and the loss strip show characters {start} to "
                   f"{start + WINDOW - 1} of {n}; the coloured text below shows all of them.")
    window = range(start, min(start + WINDOW, n))
    xs, ticks = list(window), [printable(reading.chars[i]) for i in window]

    st.subheader("The text as one-hot vectors")
    V_text = len(picked.vocab)
    onehot = [[1 if reading.ids[i] == v else 0 for i in window] for v in range(V_text)]
    token_labels = [picked.vocab.label(v) for v in range(V_text)]
    # every token labelled (plotly would drop every other label of a crowded category axis)
    st.plotly_chart({"data": [{"type": "heatmap", "z": onehot, "x": xs, "y": list(range(V_text)),
                               "showscale": False, "customdata": [[t] * len(xs) for t in token_labels],
                               "colorscale": [[0, "#f4f4f4"], [1, "#1f77b4"]], "xgap": 1, "ygap": 1,
                               "hovertemplate": "token %{customdata}<extra></extra>"}],
                     "layout": {"height": 100 + 14 * min(V_text, 100), "margin": MARGIN,
                                "xaxis": char_axis(xs, ticks),
                                "yaxis": {"tickmode": "array", "tickvals": list(range(V_text)),
                                          "ticktext": token_labels, "autorange": "reversed",
                                          "tickfont": {"size": 10}}}},
                    width="stretch", key="inspect_text_onehot")

    st.subheader("Hidden state over the text")
    variances = ins.unit_variances(reading.hidden)
    order = ins.units_by_variance(reading.hidden)
    shown = order[:MAX_UNITS_DRAWN]
    z = rounded(reading.hidden[start:start + WINDOW][:, shown].T)   # (units shown, window)
    st.plotly_chart({"data": [{"type": "heatmap", "z": z, "x": xs, "y": [f"unit {u}" for u in shown],
                               "zmin": -1, "zmax": 1, "colorscale": "RdBu", "colorbar": {"thickness": 10},
                               "hovertemplate": "%{y}, char %{x}: %{z:.2f}<extra></extra>"}],
                     "layout": {"height": 120 + 9 * len(shown), "margin": MARGIN, "xaxis": char_axis(xs, ticks),
                                "yaxis": {"type": "category", "autorange": "reversed"}}},
                    width="stretch", key="inspect_hidden_fig")
    st.caption(f"Rows: the {len(shown)} of {reading.hidden.shape[1]} units whose activation varies "
               "most over this text, largest variance on top. Columns: the state after reading each "
               "character.")

    st.subheader("One unit, character by character")
    unit = st.selectbox("Unit (largest variance first; type a number to find any unit)", order,
                        format_func=lambda u: f"unit {u} — variance {variances[u]:.3f}",
                        key="inspect_unit", persist_state="session")
    acts = reading.hidden[:, unit].tolist()
    spans = "".join(
        f'<span title="{html.escape(printable(c))}: {a:+.2f}" style="background:{activation_colour(a)};'
        f'padding:1px 0;">{html.escape(c) if c != chr(10) else "⏎<br>"}</span>'
        for c, a in zip(reading.chars, acts))
    st.html(f'<div style="font-family:monospace;font-size:15px;line-height:1.9;white-space:pre-wrap;'
            f'color:#111;">{spans}</div>'
            '<div style="font-size:12px;color:#666;">each character is coloured by unit '
            f'{unit}\'s activation after reading it: <span style="background:{activation_colour(-1)}">'
            '&nbsp;−1&nbsp;</span> <span style="background:#fff">&nbsp;0&nbsp;</span> '
            f'<span style="background:{activation_colour(1)};color:#fff">&nbsp;+1&nbsp;</span></div>')
    profile = ins.unit_profile(reading, unit)
    fmt_profile = lambda rows: ", ".join(f"'{printable(c)}' {m:+.2f} (×{k})" for c, m, k in rows)
    st.markdown(f"Unit {unit} is highest after {fmt_profile(profile[:5])}; lowest after "
                f"{fmt_profile(profile[::-1][:5])}.")

    st.subheader("What the model expects next")
    if n < 2:
        st.info("One character gives guesses but nothing to score them against: type at least two.")
    cells = []
    for i in window:
        p = reading.p_next[i]
        guesses = "".join(f'<div style="color:#555">{html.escape(printable(tok))} {prob:.2f}</div>'
                          for tok, prob in reading.top[i])
        actual = ("" if p is None else
                  f'<div title="p(next = {html.escape(printable(reading.chars[i + 1]))})" style="font-weight:600;'
                  f'color:{"#1a7f37" if p >= 0.5 else "#b35900" if p >= 0.1 else "#c62828"}">{p:.2f}</div>')
        cells.append('<div style="display:inline-block;vertical-align:top;width:46px;margin:0 2px 8px 0;'
                     'font-family:monospace;font-size:11px;text-align:center;border-left:1px solid #ddd;">'
                     f'<div style="font-size:16px;font-weight:700">{html.escape(printable(reading.chars[i]))}</div>'
                     f'{guesses}{actual}</div>')
    st.html('<div style="line-height:1.3">' + "".join(cells) + "</div>")
    st.caption("Under each character: the model's three likeliest next characters after reading up to "
               "it, and (bold) the probability it gave to the character that actually follows — green "
               "≥ 0.5, orange ≥ 0.1, red below.")
    st.subheader("Loss per character")
    # drawn under the character that was predicted: how surprised the model was to see it
    losses = [None if i == 0 or reading.loss[i - 1] is None else round(reading.loss[i - 1], DIGITS)
              for i in window]
    st.plotly_chart({"data": [{"type": "heatmap", "z": [losses], "x": xs, "y": ["loss"], "zmin": 0,
                               "zmax": max(math.log(V_text) * 2, 1), "colorscale": "Reds",
                               "colorbar": {"thickness": 10, "title": {"text": "nats"}},
                               "hovertemplate": "loss %{z:.2f} nats<extra></extra>", "xgap": 1}],
                     "layout": {"height": 150, "margin": MARGIN, "xaxis": char_axis(xs, ticks)}},
                    width="stretch", key="inspect_loss_strip")
    st.caption("Under each character: −log p(this character | the text before it), the surprise of "
               "the model on seeing it; the first character has no text before it. The mean of the strip "
               "is the loss whose exp is the perplexity.")


def perplexity() -> None:
    import pandas as pd
    st.subheader("Perplexity, explained by numbers")
    picked = model_picker("inspect_model")          # the same widget as in "Inside a trained model"
    text = kept("inspect_text", SEED_TEXT)
    reading = read(picked, text)
    if reading is None or reading.perplexity is None:
        st.info("Pick a model and type at least two characters in *Inside a trained model* to see "
                "their perplexity.")
        return
    shown = text if len(text) <= 60 else text[:57] + "…"
    shown = "".join("\\" + c if c in "\\`*_[]$~#<>" else c for c in " ".join(shown.split()))  # as typed, not Markdown
    st.caption(f"Scored on the text of *Inside a trained model*: “{shown}” ({len(text):,} characters).")
    pn = ins.perplexity_numbers(reading)
    a, b, c = st.columns(3)
    a.metric("Uniform guessing", f"{pn.uniform:.0f}", border=True,
             help=f"p = 1/{pn.uniform:.0f} for every character: loss log {pn.uniform:.0f} = "
                  f"{pn.uniform_loss:.2f} nats")
    b.metric("Perfect model", f"{pn.best:.0f}", border=True, help="p = 1 for the right character: loss 0")
    c.metric("This text", f"{pn.actual:.2f}", border=True,
             help=f"exp(mean loss) = exp({pn.actual_loss:.3f})")
    st.table(pd.DataFrame({
        "": ["uniform guessing", "perfect model", "this text"],
        "probability of the right character": [f"1/{pn.uniform:.0f} = {1 / pn.uniform:.3f}", "1",
                                               f"{math.exp(-pn.actual_loss):.3f} (geometric mean)"],
        "loss = −log p (nats)": [f"log {pn.uniform:.0f} = {pn.uniform_loss:.3f}", "0",
                                 f"{pn.actual_loss:.3f} (mean)"],
        "perplexity = exp(loss)": [f"{pn.uniform:.0f}", "1", f"{pn.actual:.2f}"]}), hide_index=True)
    st.markdown(
        f"Perplexity is exp(mean loss per character). A model that spreads its bets evenly over the "
        f"{pn.uniform:.0f} tokens has loss log {pn.uniform:.0f} = {pn.uniform_loss:.2f} nats and "
        f"perplexity {pn.uniform:.0f}: it is as unsure as a {pn.uniform:.0f}-sided die. A model always "
        f"certain and right has loss 0 and perplexity 1. On this text ({pn.n_predictions} predictions) "
        f"*{picked.label}* has mean loss {pn.actual_loss:.3f} nats, perplexity **{pn.actual:.2f}**: on "
        f"average as unsure as a choice among {pn.actual:.1f} equally likely characters.")
    metrics = (picked.meta or {}).get("metrics") or {}
    if metrics.get("perplexity") is not None:
        val = metrics.get("val_perplexity")
        st.markdown(f"For comparison, this checkpoint ended training with perplexity "
                    f"{metrics['perplexity']:.2f} on its training text"
                    + (f" and {val:.1f} on the held-out text after it" if val is not None else "")
                    + ". A large gap means it memorised its training text rather than learning English.")
    ngram_comparison(picked, reading)
    if not reading.honest:
        st.caption("A bidirectional model's perplexity is not a fair score: it has seen the answers.")


@st.cache_resource(max_entries=8, show_spinner="Counting n-grams…")
def ngram_model(_corpus, key: tuple):
    """The 5-gram model (and every lower order) of a run's training tokens, and its perplexities on
    them and on the held-out ones (jobs.baselines: shared with Train). `key` names the corpus."""
    from charrnn.jobs import baselines
    from charrnn.ngram import NGramModel
    return NGramModel(5, len(_corpus.vocab)).fit(_corpus.train), baselines(_corpus)


def training_text(picked: Picked):
    """(the Corpus the picked model trained on, None) or (None, why it cannot be had)."""
    if picked.job is not None:
        return picked.job.corpus, None
    meta = picked.meta or {}
    corpus, train = meta.get("corpus") or {}, meta.get("train") or {}
    if not meta:
        return None, "this model has not trained."
    if corpus.get("name") != "timemachine" or "max_tokens" not in train:
        return None, f"{corpus.get('name', 'an unknown text')} was an upload, which the app does not keep."
    try:
        loaded = corpus_for("timemachine", meta["preprocessing"], train["max_tokens"], None, corpus.get("val_tokens", 2000))
    except UserError as e:
        return None, str(e)
    if loaded.sha1 != corpus.get("sha1"):
        return None, "this copy of The Time Machine is not the one the model trained on."
    return loaded, None


def ngram_comparison(picked: Picked, reading) -> None:
    """The model beside character n-grams fitted on the same training tokens, on this text and on
    the run's own training and held-out text."""
    import pandas as pd
    corpus, why = training_text(picked)
    if corpus is None:
        st.caption(f"N-gram baselines need the text the model trained on: {why}")
        return
    from charrnn.jobs import MAX_NGRAM_TOKENS, corpus_key
    if len(corpus.train) > MAX_NGRAM_TOKENS:
        st.caption(f"No n-gram baselines: the model trained on {len(corpus.train):,} tokens, more than the "
                   f"{MAX_NGRAM_TOKENS:,} the app counts n-grams over.")
        return
    model, on_run = ngram_model(corpus, corpus_key(corpus))
    here = model.perplexities(reading.ids)
    if picked.job is not None:
        snap = picked.job.snapshot()
        final = {"perplexity": snap.last("train_ppl"), "val_perplexity": snap.last("val_ppl")}
    else:
        final = (picked.meta or {}).get("metrics") or {}
    rows = [{"model": f"{n}-gram", "this text": here[n], "training text": on_run[n]["train"],
             "held-out text": on_run[n]["val"]} for n in sorted(on_run)]
    rows.append({"model": picked.label, "this text": reading.perplexity, "training text": final.get("perplexity"),
                 "held-out text": final.get("val_perplexity")})
    st.markdown("**Against n-gram baselines.** Character n-gram models (interpolated Kneser–Ney) fitted on "
                "the same training tokens: an n-gram guesses from the n − 1 characters before, an RNN from "
                "everything it has read. Perplexity, lower is better:")
    st.dataframe(pd.DataFrame(rows), hide_index=True, key="inspect_ngram",
                 column_config={c: st.column_config.NumberColumn(format="%.2f")
                                for c in ("this text", "training text", "held-out text")})


# -----------------------------------------------------------------------------
# the scratch RNN stepped through, and the hidden state's path

STEP_BATCH, STEP_STEPS = 2, 5        # the seed's X = arange(10).reshape(2, 5)
MAX_UNITS_STEPPED = 32               # hidden units per step-through heatmap
THETA = 1.0                          # the seed's clipping threshold
PLAY_EVERY_S = 1.0                   # Play's pace: one step a second
ROW_PX, PANEL_GAP_PX = 26, 78        # a heatmap row; room for a panel's x labels and the next title
ONEHOT_SCALE = [[0, "#f4f4f4"], [1, "#1f77b4"]]
SPACE_COLOUR, UNK_COLOUR = "#c8c8c8", "#000000"
ALPHABET = qualitative.Alphabet      # 26 distinct colours for the letters


def model_key(picked: Picked) -> tuple:
    """What names a picked model's weights in a cache: the label (a run's counts its epochs), a
    checkpoint's file time (a file replaced under the same name), and the object itself."""
    mtime = None
    if picked.checkpoint is not None:
        try:
            mtime = (checkpoint_dir() / f"{picked.checkpoint}{SUFFIX}").stat().st_mtime
        except OSError:
            pass
    return picked.label, picked.checkpoint, mtime, id(picked.model)


@st.cache_data(max_entries=16, show_spinner=False)
def stepped(key: tuple, _model) -> ins.StepThrough:
    """The worked example through a scratch model, forward and back, once per model: the slider
    and every tick of Play only draw."""
    X = ins.seed_onehot_example(STEP_BATCH, STEP_STEPS, _model.config.vocab_size).X
    return ins.step_through(_model, X, theta=THETA)


@st.cache_data(max_entries=32, show_spinner=False)
def trajectory(key: tuple, text: str, preprocessing: str, _model, _vocab) -> ins.Trajectory:
    return ins.hidden_trajectory(_model, _vocab, text, preprocessing)


def panel(title: str, z, x: list[str], zmax: float, *, zmin: float | None = None, scale="RdBu",
          text: str | None = ".2f", hover: str = ".4f", xname: str = "unit", marks=()) -> dict:
    """One (batch, columns) heatmap of panels_figure. zmin defaults to -zmax (0 white in RdBu);
    `marks`: (column, row label) cells to outline."""
    return {"title": title, "z": z.tolist(), "x": x, "zmin": -zmax if zmin is None else zmin, "zmax": zmax,
            "scale": scale, "text": text, "hover": hover, "xname": xname, "marks": list(marks)}


def panels_figure(panels: list[dict]) -> dict:
    """Heatmaps one under another, each titled and with its own labelled x axis (columns of
    different meaning: tokens, hidden units). Built as a dict, as the one-hot figure is."""
    rows = [len(p["z"]) for p in panels]
    plot_px = sum(rows) * ROW_PX + (len(panels) - 1) * PANEL_GAP_PX
    data, layout = [], {"height": plot_px + 30 + 40, "margin": dict(l=10, r=10, t=30, b=40),
                        "annotations": [], "showlegend": False}
    top = 1.0
    for i, (p, n_rows) in enumerate(zip(panels, rows)):
        a = "" if i == 0 else str(i + 1)                       # axis ids x, x2, ... top to bottom
        seqs, cols = [f"seq {b}" for b in range(n_rows)], list(range(len(p["x"])))
        trace = {"type": "heatmap", "xaxis": f"x{a}", "yaxis": f"y{a}", "z": p["z"], "x": cols, "y": seqs,
                 "zmin": p["zmin"], "zmax": p["zmax"], "colorscale": p["scale"], "showscale": False,
                 "xgap": 1, "ygap": 1, "customdata": [p["x"]] * n_rows,
                 "hovertemplate": f"%{{y}}, {p['xname']} %{{customdata}}: %{{z:{p['hover']}}}<extra></extra>"}
        if p["text"]:
            trace |= {"texttemplate": f"%{{z:{p['text']}}}", "textfont": {"size": 9}}
        data.append(trace)
        if p["marks"]:
            data.append({"type": "scatter", "mode": "markers", "xaxis": f"x{a}", "yaxis": f"y{a}",
                         "x": [c for c, _ in p["marks"]], "y": [r for _, r in p["marks"]], "hoverinfo": "skip",
                         "marker": {"symbol": "square-open", "size": 24, "color": "#111",
                                    "line": {"width": 2, "color": "#111"}}})
        layout[f"xaxis{a}"] = {"anchor": f"y{a}", "domain": [0, 1], "tickmode": "array", "tickvals": cols,
                               "ticktext": p["x"], "tickangle": 0, "range": [-0.5, len(cols) - 0.5],
                               "tickfont": {"family": "monospace", "size": 10}}
        height = n_rows * ROW_PX / plot_px
        # a fixed range, top row first: autorange would pad the rows to fit the marks' squares
        layout[f"yaxis{a}"] = {"anchor": f"x{a}", "domain": [max(top - height, 0), top],
                               "range": [n_rows - 0.5, -0.5], "type": "category"}
        layout["annotations"].append({"text": p["title"], "x": 0, "y": top, "xref": "paper", "yref": "paper",
                                      "xanchor": "left", "yanchor": "bottom", "showarrow": False,
                                      "font": {"size": 13}})
        top -= height + PANEL_GAP_PX / plot_px
    return {"data": data, "layout": layout}


def span(values) -> float:
    """A quantity's colour range, the same at every step so that colours compare across steps."""
    return max(float(values.abs().max()), 1e-12)


def toggle_play() -> None:
    """Play (from the pass's start if it stands at its end) or Pause."""
    ss = st.session_state
    if ss.get("inspect_playing"):
        ss["inspect_playing"] = False
        return
    backward = ss.get("inspect_step_pass") == "Backward"
    start, end = (STEP_STEPS, 1) if backward else (1, STEP_STEPS)
    if ss.get("inspect_step", 1) == end:
        ss["inspect_step"] = start
    ss["inspect_playing"] = True
    ss["inspect_play_fresh"] = True      # the click's own run shows the step that play starts from


def pass_changed() -> None:
    """A pass starts where it begins: the forward at step 1, the backward at step T."""
    st.session_state["inspect_playing"] = False
    st.session_state["inspect_step"] = STEP_STEPS if st.session_state["inspect_step_pass"] == "Backward" else 1


def stepper() -> None:
    st.subheader("The scratch RNN, one step at a time")
    picked = model_picker("inspect_step_model")
    if picked is None:
        return
    config = picked.model.config
    if config.kind != "scratch":
        st.info(f"*{picked.label}* is an {KIND_LABELS[config.kind]} model. The step-through follows the "
                "from-scratch RNN's own W_xh, W_hh, b_h, W_hq and b_q, so only scratch checkpoints (and the "
                "untrained model) can be stepped through; pick one of those above.")
        return
    model, key = picked.model, model_key(picked)
    if picked.label == UNTRAINED:
        hidden = st.number_input("Hidden size of the untrained model", 1, MAX_PAGE_HIDDEN, 512,
                                 key="inspect_step_hidden", persist_state="session",
                                 help="The seed's is 512. Random weights, the same every time; a few units "
                                      "fit on the screen whole.")
        model = demo_model("scratch", len(picked.vocab), int(hidden), 1, False)
        key = ("untrained", int(hidden))
    s = stepped(key, model)
    V, labels = config.vocab_size, [picked.vocab.label(i) for i in range(len(picked.vocab))]
    as_text = lambda ids: " ".join(labels[i] for i in ids)
    rows = lambda M: "   ".join(f"seq {b}: {as_text(r)}" for b, r in enumerate(M.tolist()))
    st.code(f"{ins.seed_onehot_example(STEP_BATCH, STEP_STEPS, V).code}   # {rows(s.X)}\n"
            f"Y = (X + 1) % {V}   # the targets: {rows(s.Y)}")
    st.caption(f"The targets: X is cut from the sequence of ids 0, 1, 2, …, so each input's next token is its "
               f"id + 1; for steps 1 to {STEP_STEPS - 1} that is the next input. The state starts at zero "
               "(begin_state), as in training.")
    c1, c2 = st.columns([3, 1], vertical_alignment="bottom")
    direction = c1.radio("Pass", ["Forward", "Backward"], horizontal=True, key="inspect_step_pass",
                         on_change=pass_changed, persist_state="session",
                         help=f"Forward: step 1 to {STEP_STEPS}, inputs to probabilities. Backward: step "
                              f"{STEP_STEPS} back to 1, the loss's gradient flowing back through time.")
    playing = st.session_state.get("inspect_playing", False)
    c2.button("⏸ Pause" if playing else "▶ Play", key="inspect_play", on_click=toggle_play, width="stretch",
              help="One step a second, to the end of the pass.")
    st.session_state.setdefault("inspect_step", STEP_STEPS if direction == "Backward" else 1)

    # Play: a timer reruns this fragment every PLAY_EVERY_S while playing; each tick moves one
    # step. The timer is set on a full run, so a full run (st.rerun) is what stops it.
    @st.fragment(run_every=PLAY_EVERY_S if playing else None)
    def player():
        ss = st.session_state
        if ss.get("inspect_playing"):
            end = 1 if direction == "Backward" else STEP_STEPS
            if not ss.pop("inspect_play_fresh", False):
                ss["inspect_step"] += -1 if direction == "Backward" else 1
            if ss["inspect_step"] == end:
                ss["inspect_playing"] = False   # this tick shows the last step; the next one stops
        elif playing:
            st.rerun()      # paused, or at the end: a full run drops the timer and says Play again
        if ss.get("inspect_playing"):
            # a slider that only shows the step: with no key and no input, a tick that carries the
            # browser's previous value of the keyed slider cannot move the step back
            t = ss["inspect_step"]
            st.slider("Step t", 1, STEP_STEPS, t, disabled=True)
        else:
            t = st.slider("Step t", 1, STEP_STEPS, key="inspect_step", persist_state="session")
        (backward_step if direction == "Backward" else forward_step)(s, labels, t)

    player()


def forward_step(s: ins.StepThrough, labels: list[str], t: int) -> None:
    i, (T, B, h), V = t - 1, s.H.shape, s.O.shape[-1]
    k = min(h, MAX_UNITS_STEPPED)
    units = [str(u) for u in range(k)]
    seen = [labels[x] for x in s.X[:, i].tolist()]
    wanted = [labels[y] for y in s.Y[:, i].tolist()]
    st.markdown(f"**Step {t} of {T}:** sequence 0 reads ‘{seen[0]}’ and should predict ‘{wanted[0]}’; "
                f"sequence 1 reads ‘{seen[1]}’ and should predict ‘{wanted[1]}’.")
    prev = ("H<sub>0</sub>·W<sub>hh</sub> = 0: begin_state's zeros, nothing to remember yet" if t == 1 else
            f"H<sub>{t - 1}</sub>·W<sub>hh</sub>  ({B}, {h}): what step {t - 1} passes on")
    st.plotly_chart(panels_figure([
        panel(f"X<sub>{t}</sub> = one_hot(X.T[{i}])  ({B}, {V}): a 1 in the column of each sequence's token",
              s.onehot[i], labels, 1, zmin=0, scale=ONEHOT_SCALE, text=None, hover=".0f", xname="token"),
        panel(f"X<sub>{t}</sub>·W<sub>xh</sub>  ({B}, {h}): the row of W<sub>xh</sub> for the token read",
              s.XW[i, :, :k], units, span(s.XW)),
        panel(prev, s.HW[i, :, :k], units, span(s.HW)),
        panel(f"X<sub>{t}</sub>·W<sub>xh</sub> + H<sub>{t - 1}</sub>·W<sub>hh</sub> + b<sub>h</sub>  ({B}, {h})",
              s.pre[i, :, :k], units, span(s.pre)),
        panel(f"H<sub>{t}</sub> = tanh(…)  ({B}, {h}): squashed into (−1, 1), carried to step {t + 1}"
              if t < T else f"H<sub>{t}</sub> = tanh(…)  ({B}, {h}): squashed into (−1, 1), the final state",
              s.H[i, :, :k], units, 1.0),
    ]), width="stretch", key="inspect_step_forward")
    shown = f"the first {k} of {h} hidden units" if k < h else f"all {h} hidden units"
    st.caption(f"Drawn: {shown}. Red negative, blue positive; each row keeps one colour range over all "
               "five steps, so colours compare from step to step. Hover a cell for its value.")
    marks = [(y, f"seq {b}") for b, y in enumerate(s.Y[:, i].tolist())]
    st.plotly_chart(panels_figure([
        panel(f"O<sub>{t}</sub> = H<sub>{t}</sub>·W<sub>hq</sub> + b<sub>q</sub>  ({B}, {V}): a score for every "
              "token", s.O[i], labels, span(s.O), xname="token", marks=marks),
        panel(f"softmax(O<sub>{t}</sub>)  ({B}, {V}): the probability of each next token; □ the target",
              s.P[i], labels, span(s.P), zmin=0, scale="Blues", xname="token", marks=marks),
    ]), width="stretch", key="inspect_step_output")
    p = [s.P[i, b, y].item() for b, y in enumerate(s.Y[:, i].tolist())]
    st.caption(f"□ marks the target of each sequence: p = {p[0]:.3f} and {p[1]:.3f}, a loss of −log p = "
               f"{s.losses[i, 0]:.3f} and {s.losses[i, 1]:.3f} nats (guessing among {V} tokens: "
               f"{math.log(V):.2f}). The loss of the pass is the mean over all {T * B} predictions: "
               f"{s.loss:.3f}.")


def backward_step(s: ins.StepThrough, labels: list[str], t: int) -> None:
    i, (T, B, h), V = t - 1, s.H.shape, s.O.shape[-1]
    k = min(h, MAX_UNITS_STEPPED)
    units = [str(u) for u in range(k)]
    a, b, c = st.columns(3)
    a.metric("Loss", f"{s.loss:.3f}", border=True,
             help=f"Cross-entropy, the mean over the {T * B} predictions, as training computes it.")
    b.metric("Gradient norm ‖g‖", f"{s.grad_norm:.4g}", border=True,
             help="The norm of all five parameter gradients together, before clipping.")
    c.metric(f"Clipping factor min(1, θ/‖g‖), θ = {s.theta:g}", f"{s.clip_factor:.4g}", border=True,
             help="What clipping multiplies every gradient by before the update.")
    order = list(range(T, 0, -1))                # T … 1: the order backpropagation visits the steps
    steps = [f"t = {u}" for u in order]
    bars = [("‖∂ℓ/∂H<sub>t</sub>‖", s.dH_norm, "#1f4e79"), ("from O<sub>t</sub>", s.dH_out_norm, "#6baed6"),
            ("from H<sub>t+1</sub>", s.dH_next_norm, "#fd8d3c")]
    st.plotly_chart({"data": [{"type": "bar", "name": name, "x": steps, "y": [norm[u - 1].item() for u in order],
                               "marker": {"color": colour, "opacity": [1 if u == t else 0.35 for u in order]},
                               "hovertemplate": f"{name} at %{{x}}: %{{y:.3g}}<extra></extra>"}
                              for name, norm, colour in bars],
                     "layout": {"height": 300, "margin": MARGIN, "barmode": "group",
                                "title": {"text": "The gradient flowing back: ‖∂ℓ/∂H<sub>t</sub>‖ at each step",
                                          "font": {"size": 14}},
                                "yaxis": {"type": "log", "title": {"text": "norm (log)"}},
                                "legend": {"orientation": "h", "y": -0.15}}},
                    width="stretch", key="inspect_step_norms")
    st.caption(f"From step {T} back to step 1, as backpropagation visits them: ∂ℓ/∂H_t is what reaches H_t "
               "from its own output O_t plus what comes back from H_t+1 through tanh and W_hh. Step "
               f"{T} gets nothing from later (no bar). Step {t}, the slider's, is drawn solid.")
    g = max(span(s.dH), span(s.dH_out), span(s.dH_next))
    later = (f"(∂ℓ/∂H<sub>{t + 1}</sub> ⊙ (1 − H<sub>{t + 1}</sub>²))·W<sub>hh</sub>ᵀ  ({B}, {h}): back from "
             f"step {t + 1} through tanh and W<sub>hh</sub>" if t < T else
             f"Back from a step {t + 1}: nothing, step {T} is the last")
    st.plotly_chart(panels_figure([
        panel(f"∂ℓ/∂O<sub>{t}</sub> = (softmax(O<sub>{t}</sub>) − one_hot(Y<sub>{t}</sub>)) / {T * B}  ({B}, {V}): "
              "□ the target", s.dO[i], labels, span(s.dO), text=None, hover=".3g", xname="token",
              marks=[(y, f"seq {b}") for b, y in enumerate(s.Y[:, i].tolist())]),
        panel(f"∂ℓ/∂O<sub>{t}</sub>·W<sub>hq</sub>ᵀ  ({B}, {h}): from step {t}'s own output",
              s.dH_out[i, :, :k], units, g, text=None, hover=".3g"),
        panel(later, s.dH_next[i, :, :k], units, g, text=None, hover=".3g"),
        panel(f"∂ℓ/∂H<sub>{t}</sub>: their sum  ({B}, {h})", s.dH[i, :, :k], units, g, text=None, hover=".3g"),
    ]), width="stretch", key="inspect_step_backward")
    st.caption(("Drawn: the first " + f"{k} of {h}" if k < h else f"All {h}") + " hidden units. The three "
               "hidden-state rows share one colour range over all steps: where they fade, the gradient "
               "vanishes. Hover a cell for its value.")
    st.markdown(
        f"**Clipping.** Backpropagation through the {T} steps gives a gradient for each parameter; together "
        f"they have norm ‖g‖ = √(Σ ‖∂ℓ/∂W‖²) = {s.grad_norm:.4g}. "
        + (f"That is more than θ = {s.theta:g}, so every gradient is multiplied by θ/‖g‖ = {s.clip_factor:.4g} "
           f"and the update's gradient has norm {s.theta:g}." if s.clip_factor < 1 else
           f"That is at most θ = {s.theta:g}: the factor is 1 and the gradients stay as they are."))
    import pandas as pd
    norms = s.grad_norms
    st.table(pd.DataFrame({"parameter": [md(n) for n in norms],
                           "shape": [fmt(tuple(s.grads[n].shape)) for n in norms],
                           "‖∂ℓ/∂W‖": [f"{v:.4g}" for v in norms.values()],
                           "after clipping": [f"{v * s.clip_factor:.4g}" for v in norms.values()]}),
             hide_index=True)


def char_colour(vocab: Vocab, token_id: int) -> str:
    """A colour per token: spaces light grey (they are many), <unk> black, letters from a palette."""
    token = vocab.idx_to_token[token_id]
    if token == " ":
        return SPACE_COLOUR
    if token_id == 0:
        return UNK_COLOUR
    return ALPHABET[token_id % len(ALPHABET)]


def trajectory_section() -> None:
    st.subheader("Hidden-state trajectory")
    st.caption("After each character the hidden state is a point in as many dimensions as the model has "
               "units. Principal component analysis finds the two directions along which those points "
               "spread most over the passage; the path below is the state moving in that plane as the "
               "model reads.")
    picked = model_picker("inspect_model")        # the same widget as in "Inside a trained model"
    text = st.text_area(f"Passage (up to {ins.MAX_TRAJECTORY_CHARS} characters: a labelled point for each)",
                        SEED_TEXT, max_chars=ins.MAX_TRAJECTORY_CHARS, key="inspect_traj_text",
                        persist_state="session")
    if picked is None:
        return
    if len(text or "") < 3:
        st.info("Type at least three characters: a path needs a few points to have a shape.")
        return
    config = picked.model.config
    tr = trajectory(model_key(picked), text, picked.preprocessing, picked.model, picked.vocab)
    if tr.truncated or len(text) >= ins.MAX_TRAJECTORY_CHARS:   # the text box keeps no more than this
        st.info(f"The passage is at its limit: the first {ins.MAX_TRAJECTORY_CHARS} characters are drawn, a "
                "labelled point each; more would be a blot.")
    if config.bidirectional:
        st.info("This model is bidirectional: the path uses the forward direction's half of each state. "
                "The backward half has read the passage from its end, so it does not follow the reading.")
    if tr.unknown_chars:
        st.warning("Not in this model's vocabulary, read as <unk>: " + " ".join(repr(c) for c in tr.unknown_chars))
    e1, e2 = tr.explained.tolist()
    x, y = tr.points[:, 0].tolist(), tr.points[:, 1].tolist()
    shown = [printable(ch) for ch in tr.chars]
    n = len(x)
    st.plotly_chart({
        "data": [{"type": "scatter", "mode": "lines+markers+text", "x": x, "y": y, "text": shown,
                  "textposition": "top center", "textfont": {"family": "monospace", "size": 11},
                  "line": {"color": "#bbbbbb", "width": 1},
                  "marker": {"size": 9, "color": [char_colour(picked.vocab, i) for i in tr.ids],
                             "line": {"width": 0.5, "color": "#333"}},
                  "customdata": [[j + 1, ch] for j, ch in enumerate(shown)],
                  "hovertemplate": "character %{customdata[0]}: ‘%{customdata[1]}’<br>"
                                   "PC1 %{x:.3f}, PC2 %{y:.3f}<extra></extra>"}],
        "layout": {"height": 600, "margin": dict(l=10, r=10, t=40, b=10), "showlegend": False,
                   "title": {"text": f"{tr.what.replace('_t', '<sub>t</sub>')} after each character, "
                                     "on its first two principal components",
                             "font": {"size": 14}},
                   "xaxis": {"title": {"text": f"PC1 ({e1:.0%} of the variance)"}, "zeroline": False},
                   "yaxis": {"title": {"text": f"PC2 ({e2:.0%} of the variance)"}, "zeroline": False},
                   "annotations": [{"x": x[j], "y": y[j], "text": label, "showarrow": True, "arrowhead": 2,
                                    "ax": 30, "ay": -30, "font": {"size": 11}}
                                   for j, label in ((0, "start"), (n - 1, "end"))]}},
        width="stretch", key="inspect_traj_fig")
    st.caption(f"The two components explain {e1:.1%} and {e2:.1%} of the variance of {tr.what} over these "
               f"{n} characters ({e1 + e2:.1%} together; the states have {tr.units} dimensions). Each point "
               "is the state after reading its character, coloured by that character (spaces grey); the grey "
               "line joins them in reading order."
               + (" Under a quarter of the variance: the state moves in many directions at once, and this "
                  "plane shows only a shadow of its path." if e1 + e2 < 0.25 else ""))


# -----------------------------------------------------------------------------
# gradient flow through time of a saved run

@st.cache_data(max_entries=16, show_spinner="Probing the gradient flow…")
def probe_now(_picked: Picked, key: tuple) -> tuple[list[float], list[float]] | None:
    """The gradient flow of the picked model as it is, on the probe minibatch of the seed's text
    (the book's batch 32, 35 steps): for models saved without per-epoch probes. `key` names it."""
    from charrnn.gradflow import gradient_flow, probe_batch
    corpus = corpus_for("timemachine", "seed", 10_000)
    X, Y = probe_batch(corpus.train, 32, 35)
    flow = gradient_flow(_picked.model, X, Y)
    return flow.h_norms, flow.x_norms


def run_flows(picked: Picked) -> tuple[list[int], list[list[float]], list[list[float]], list, list, str | None]:
    """(epochs probed, their ||dl_T/dh_t|| rows, ||dl_T/dx_t|| rows, epochs, sigma_max per epoch, a
    note): from the run of this session, the checkpoint's metadata, or probed now."""
    if picked.job is not None:
        snap = picked.job.snapshot()
        flows = snap.flows
        return ([e for e, _ in flows], [f.h_norms for _, f in flows], [f.x_norms for _, f in flows],
                snap.columns["epoch"], snap.columns["sigma_max"], None)
    meta = picked.meta or {}
    saved, history = meta.get("gradflow") or {}, meta.get("history") or {}
    sigmas = [math.nan if v is None else v for v in history.get("sigma_max") or []]
    if saved.get("epoch"):
        return saved["epoch"], saved["h"], saved["x"], history.get("epoch", []), sigmas, None
    if picked.model.config.bidirectional:
        return [], [], [], [], [], "A bidirectional model has no gradient flow through time: its states see the future."
    from charrnn.gradflow import largest_singular_value
    try:
        h, x = probe_now(picked, (picked.label, picked.checkpoint, (picked.meta or {}).get("created")))
    except UserError as e:
        return [], [], [], [], [], f"No probe: {e}"
    epochs = (meta.get("metrics") or {}).get("epochs") or 0
    return ([epochs], [h], [x], [epochs], [largest_singular_value(picked.model)],
            "This model was saved without per-epoch probes, so only its final state is shown, probed now "
            "on the seed's text (batch 32, 35 steps).")


def gradient_flow_section() -> None:
    from pages import gradflow_view as gv
    st.subheader("Gradient flow through time")
    st.caption("Backpropagation through T steps multiplies T Jacobians, so the gradient reaching an early "
               "step can vanish or explode. Each row is one probe of a fixed minibatch during training: "
               "how strongly the loss at the last step ℓ_T reaches back to step t. Pick two models to "
               "compare them on one colour scale (say nn.RNN and LSTM, or clipping on and off).")
    which = st.radio("Gradient of ℓ_T with respect to", list(gv.QUANTITIES), horizontal=True, key="inspect_flow_of",
                     format_func=gv.quantity_label)
    columns = st.columns(2)
    shown = []
    for i, column in enumerate(columns):
        with column:
            picked = model_picker(f"inspect_flow_model_{i}", nth=i)   # two different models to start with
            if picked is None:
                continue
            epochs, h, x, sigma_epochs, sigmas, note = run_flows(picked)
            if note:
                st.caption(note)
            if epochs:
                shown.append((i, picked.label, epochs, h if which == "h" else x, sigma_epochs, sigmas))
    z = gv.zrange([rows for _, _, _, rows, _, _ in shown])
    for i, label, epochs, rows, _, _ in shown:
        with columns[i]:
            st.plotly_chart(gv.flow_figure(epochs, rows, which, label, z), key=f"inspect_flow_{i}",
                            config={"displayModeBar": False})   # it would cover the title
    series = [(label, e, s) for _, label, _, _, e, s in shown if len(e) > 1]
    if series:
        st.plotly_chart(gv.sigma_figure(series), key="inspect_sigma", config={"displaylogo": False})


# -----------------------------------------------------------------------------
# the page

st.title("Inspect")
st.caption("The shapes the seed talks about, live: change the numbers and every shape follows.")

# lazy tabs: switching tabs reruns the page, and only the open tab's section runs
tabs = st.tabs(TABS, key="inspect_tab", on_change="rerun")
vocab = seed_vocab()     # a quarter of a millisecond: the checkpoint's header only
sections = [lambda: worked_example(vocab), lambda: shape_trace(vocab), concatenation, inside, perplexity,
            stepper,
            trajectory_section,
            gradient_flow_section]
for tab, section in zip(tabs, sections):
    if tab.open:
        with tab:
            section()
