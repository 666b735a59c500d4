"""Home: what charrnn is and where to start."""
import streamlit as st

from charrnn.device import available_devices
from pages.common import through_router

through_router()

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
