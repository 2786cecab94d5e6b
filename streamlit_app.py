"""LoRITa Explorer: `streamlit run streamlit_app.py`. Navigation over the pages, nothing else."""

import streamlit as st

from app.ui import leave_folder_mode

leave_folder_mode(rerun=False)  # see its docstring: Streamlit's start-up mode for apps with pages/
st.set_page_config(page_title="LoRITa Explorer", page_icon=":material/compress:", layout="wide")

pages = [
    st.Page("pages/home.py", title="Home", icon=":material/home:", default=True),
    st.Page("pages/train.py", title="Train", icon=":material/model_training:", url_path="train"),
    st.Page("pages/runs.py", title="Runs", icon=":material/table_view:", url_path="runs"),
    st.Page("pages/compress.py", title="Compress", icon=":material/compress:", url_path="compress"),
    st.Page("pages/export.py", title="Export", icon=":material/download:", url_path="export"),
    st.Page("pages/theory.py", title="Theory", icon=":material/functions:", url_path="theory"),
]
st.navigation(pages).run()
