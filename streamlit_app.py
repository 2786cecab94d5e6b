"""LoRITa Explorer: `streamlit run streamlit_app.py`.

The one place for set-up: ``import app`` (threads, heavy imports, folder mode; see
app/boot.py), the page config, the session's state keys, then st.navigation over the pages.
Pages only collect input, call app/ or the library, and display. Icons are emoji: a
``:material/...:`` page icon is fetched from a font server, and the app sends nothing
outside this machine.
"""

import streamlit as st

import app  # noqa: F401  (one-time server set-up on first import)
from app import state

st.set_page_config(page_title="LoRITa Explorer", page_icon="🗜️", layout="wide")
state.init()

pages = [
    st.Page("pages/home.py", title="Home", icon="🏠", default=True),
    st.Page("pages/train.py", title="Train", icon="🏋️", url_path="train"),
    st.Page("pages/runs.py", title="Runs", icon="📋", url_path="runs"),
    st.Page("pages/compress.py", title="Compress", icon="🗜️", url_path="compress"),
    st.Page("pages/export.py", title="Export", icon="📦", url_path="export"),
    st.Page("pages/theory.py", title="Theory", icon="📐", url_path="theory"),
]
st.navigation(pages).run()
