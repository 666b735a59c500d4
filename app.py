"""charrnn, the app: `streamlit run app.py`.

A small router over the pages in pages/. Training runs in a background thread owned by
charrnn.jobs; the pages only draw widgets and charts and call the core.
"""
import streamlit as st

from pages.common import routed

st.set_page_config(page_title="charrnn", page_icon=":material/text_fields:", layout="wide")

pages = [
    st.Page("pages/home.py", title="Home", icon=":material/home:", default=True),
    st.Page("pages/train.py", title="Train", icon=":material/monitoring:"),
    st.Page("pages/generate.py", title="Generate", icon=":material/edit_note:"),
    st.Page("pages/inspect.py", title="Inspect", icon=":material/biotech:"),
]
with routed():
    st.navigation(pages).run()
