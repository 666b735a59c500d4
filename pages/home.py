"""Home: what charrnn is and where to start."""
import streamlit as st

from charrnn.checkpoint import DEFAULT_NAME, CheckpointError, path_for_name, read_metadata
from charrnn.device import available_devices
from pages.common import through_router

through_router()


@st.cache_data(show_spinner=False, max_entries=4)
def shipped_history(path: str, mtime_ns: int) -> tuple[dict, int] | None:
    """(per-epoch history, vocabulary size) of the checkpoint at `path`, None if it has none."""
    try:
        meta = read_metadata(path)
        history, vocab = meta["history"], int(meta["model"]["vocab_size"])
    except (CheckpointError, KeyError, TypeError, ValueError):
        return None
    if not (isinstance(history, dict) and history.get("epoch") and history.get("train_ppl")):
        return None
    return history, vocab


def learning_curve() -> None:
    """The shipped model's perplexity by epoch: point 3 on a real run. It also has the browser load
    the charts' code here, so the first chart on the next page draws sooner."""
    path = path_for_name(DEFAULT_NAME)
    try:
        found = shipped_history(str(path), path.stat().st_mtime_ns)
    except OSError:                                     # no shipped model here: nothing to draw
        return
    if found is None:
        return
    history, vocab = found
    traces = [dict(type="scatter", x=history["epoch"], y=history[key], name=name, mode="lines", line=line)
              for key, name, line in [("train_ppl", "training text", {}), ("val_ppl", "held-out text", dict(dash="dot"))]
              if history.get(key)]
    uniform = dict(type="line", xref="paper", x0=0, x1=1, y0=vocab, y1=vocab, line=dict(color="gray", dash="dash"))
    layout = dict(height=260, margin=dict(l=10, r=10, t=10, b=10), shapes=[uniform],
                  xaxis=dict(title="epoch"), yaxis=dict(title="perplexity (log)", type="log", tickformat="~g"),
                  legend=dict(orientation="h", y=1.1))
    st.plotly_chart(dict(data=traces, layout=layout), width="stretch", config={"displayModeBar": False}, key="home_curve")
    st.caption(f"The shipped model (`{path.name}`) learning: from a guess among the {vocab} tokens (dashed) "
               "towards 1 on the text it trains on. The dotted curve is held-out text it never trains on: where "
               "it rises while the solid one falls, the model is learning its training text by heart (overfitting).")

st.title("charrnn")
st.markdown(
    "An interactive lab for **character-level recurrent language models**, after the chapter "
    "*Recurrent Neural Networks* of *Dive into Deep Learning*. A small RNN reads H. G. Wells' "
    "*The Time Machine* one character at a time and learns to guess the next one.")

st.subheader("The idea in three sentences")
st.markdown(
    "1. **Hidden state.** At every step the network mixes the current character with a hidden "
    "state $H_{t-1}$ that summarises everything read so far: $H_t = \\tanh(X_t W_{xh} + "
    "H_{t-1} W_{hh} + b_h)$.\n"
    "2. **Next-character prediction.** From $H_t$ it scores every character of the vocabulary, "
    "$O_t = H_t W_{hq} + b_q$, and is trained so that the character that really comes next "
    "scores highest.\n"
    "3. **Perplexity.** $\\exp$ of the mean cross-entropy: how many characters the model is "
    "still hesitating between. A uniform guess over the 28 tokens scores 28; a perfect model 1.")
learning_curve()

st.subheader("Where to start")
c1, c2, c3 = st.columns(3)
with c1:
    st.page_link("pages/train.py", label="**Train** a model and watch its perplexity fall", icon=":material/monitoring:")
with c2:
    st.page_link("pages/generate.py", label="**Generate** text from a prefix", icon=":material/edit_note:")
with c3:
    st.page_link("pages/inspect.py", label="**Inspect** tensors, shapes and hidden states", icon=":material/biotech:")
st.caption(f"Training runs on: {available_devices()[0]}. The same work headless: "
           "`python -m charrnn train --help`.")
