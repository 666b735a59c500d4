"""Generate: a prefix and a length in, text out (the seed's predict), greedy or sampled."""
from __future__ import annotations

import html

import plotly.graph_objects as go
import streamlit as st

from charrnn.checkpoint import MAX_IMPORT_BYTES, CheckpointError, import_checkpoint
from charrnn.data import printable
from charrnn.errors import UserError
from charrnn.generate import MAX_LENGTH, generate
from pages.common import model_picker, number, read_link, through_router, whole_number, write_link

through_router()

st.title("Generate")
st.caption("The model reads the prefix to warm up its hidden state, then writes one character at a "
           "time, feeding each back in as the next input.")

with st.expander("Add a checkpoint from a file"):
    upload = st.file_uploader("A charrnn checkpoint (.safetensors)", type=["safetensors"], key="gen_upload",
                              max_upload_size=MAX_IMPORT_BYTES // 2**20,
                              help="Checked like any checkpoint and saved in checkpoints/ under its file name; "
                                   "nothing in it is run or unpickled.")
    done = st.session_state.setdefault("gen_imported", {})
    if upload is not None and upload.file_id not in done:
        try:
            done[upload.file_id] = ("success", f"Added {import_checkpoint(upload.getvalue(), upload.name)}: "
                                               "pick it under Model.")
        except CheckpointError as e:
            done[upload.file_id] = ("error", str(e))
    if upload is not None:
        kind, text = done[upload.file_id]
        getattr(st, kind)(text)

LINK = {"prefix": ("gen_prefix", lambda text: text[:2000]), "length": ("gen_length", whole_number(0, MAX_LENGTH)),
        "temperature": ("gen_temperature", number(0.05, 3.0)), "top_k": ("gen_top_k", whole_number(0, 1000)),
        "seed": ("gen_seed", whole_number(0, 2**31 - 1))}
wanted = None
if not st.session_state.get("gen_link_read"):
    wanted = st.query_params.get("checkpoint")
    if any(k in st.query_params for k in ("temperature", "top_k", "seed")):
        st.session_state["gen_mode"] = "sample"        # those settings belong to sampling
read_link(LINK, "gen")
picked = model_picker("gen_model", wanted)
if picked is None:
    st.stop()
if picked.meta:
    m = picked.meta["metrics"]
    st.caption(f"Trained {m['epochs']} epochs on {picked.meta['corpus']['name']} "
               f"({picked.preprocessing} preprocessing); final perplexity {m['perplexity']:.3f}.")

c1, c2 = st.columns([3, 1])
prefix = c1.text_input("Prefix", "time traveller", key="gen_prefix", persist_state="session", max_chars=2000)
length = c2.number_input("Length", 0, MAX_LENGTH, 50, key="gen_length", persist_state="session",
                         help=f"Characters to generate after the prefix (at most {MAX_LENGTH:,}).")
c1, c2, c3, c4 = st.columns(4)
mode = c1.radio("Decoding", ["greedy", "sample"], key="gen_mode", persist_state="session", horizontal=True,
                format_func={"greedy": "Greedy (the seed)", "sample": "Sample"}.get)
temperature = c2.slider("Temperature", 0.05, 3.0, 1.0, 0.05, key="gen_temperature", persist_state="session",
                        disabled=mode == "greedy", help="Below 1: safer; above 1: wilder.")
top_k = c3.number_input("Top-k (0: all)", 0, 1000, 0, key="gen_top_k", persist_state="session", disabled=mode == "greedy")
seed = c4.number_input("Seed", 0, 2**31 - 1, 0, key="gen_seed", persist_state="session", disabled=mode == "greedy",
                       help="The same seed gives the same text.")

# the link reproduces what is shown: the checkpoint, the prefix, the length and the sampling
write_link({"checkpoint": picked.checkpoint, "prefix": prefix, "length": int(length)} |
           ({} if mode == "greedy" else {"temperature": float(temperature), "top_k": int(top_k), "seed": int(seed)}))

if st.button("Generate", type="primary", key="generate"):
    kwargs = {} if mode == "greedy" else dict(temperature=temperature, top_k=top_k or None, seed=seed)
    try:
        out = generate(picked.model, picked.vocab, prefix, int(length),
                       preprocessing=picked.preprocessing, **kwargs)
        st.session_state["gen_result"] = (picked.label, out)
    except UserError as e:
        st.session_state.pop("gen_result", None)
        st.error(str(e))

result = st.session_state.get("gen_result")
if result is not None:
    label, out = result
    if out.unknown:
        st.warning("Not in this model's vocabulary, read as <unk>: "
                   + " ".join(repr(c) for c in out.unknown))
    st.html("<div style='font-family:monospace;white-space:pre-wrap;font-size:1.05em;line-height:1.6'>"
            f"<span style='background:#dbeafe;border-radius:3px' title='prefix'>{html.escape(out.seen_prefix)}</span>"
            f"{html.escape(out.continuation)}</div>")
    loop = "the C generation loop" if out.path.endswith(" loop") else "the model, a character at a time"
    st.caption(f"Highlighted: the prefix as the model saw it. From: {label}, generated by {loop} ({out.path}).")
    st.download_button("Download the text", out.text, "generated.txt", mime="text/plain", key="download_text",
                       on_click="ignore")
    tokens = [printable(t) for t, _ in out.next_probs]
    fig = go.Figure(go.Bar(x=tokens, y=[p for _, p in out.next_probs], text=[f"{p:.2f}" for _, p in out.next_probs]))
    fig.update_layout(height=260, margin=dict(l=10, r=10, t=40, b=10), yaxis_title="probability",
                      title="Next-character guesses right after the prefix (␣ = space)")
    st.plotly_chart(fig, width="stretch", key="gen_chart_next")
