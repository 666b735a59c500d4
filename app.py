"""charrnn, the app: `streamlit run app.py`.

A small router over the pages in pages/. Training runs in a background thread owned by
charrnn.jobs; the pages only draw widgets and charts and call the core.
"""
import streamlit as st
import torch

from pages.common import routed

# torch's thread count is per thread. Script threads do only small tensor work; keeping them at
# one thread stops their idle OpenMP workers from competing with a training job's threads (with
# them, training in the background thread ran at a fraction of the CLI's speed).
torch.set_num_threads(1)

st.set_page_config(page_title="charrnn", page_icon=":material/text_fields:", layout="wide")

pages = [
    st.Page("pages/home.py", title="Home", icon=":material/home:", default=True),
    st.Page("pages/train.py", title="Train", icon=":material/monitoring:"),
    st.Page("pages/generate.py", title="Generate", icon=":material/edit_note:"),
    st.Page("pages/inspect.py", title="Inspect", icon=":material/biotech:"),
]
with routed():
    st.navigation(pages).run()
