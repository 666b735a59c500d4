"""charrnn, the app: `streamlit run app.py`.

A small router over the pages in pages/. Training runs in a background thread owned by
charrnn.jobs; the pages only draw widgets and charts and call the core.
"""
import streamlit as st

st.set_page_config(page_title="charrnn", page_icon="🔤", layout="wide")

pages = [
    st.Page("pages/home.py", title="Home", icon="🏠", default=True),
    st.Page("pages/train.py", title="Train", icon="📉"),
    st.Page("pages/generate.py", title="Generate", icon="✍️"),
    st.Page("pages/inspect.py", title="Inspect", icon="🔬"),
]
st.navigation(pages).run()
