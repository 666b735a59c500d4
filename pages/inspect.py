"""Inspect: placeholder until the Inspect page lands."""
import streamlit as st

st.title("Inspect")
st.info("Coming soon.")
