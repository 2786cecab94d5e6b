"""Home: what this is, where to start, the device in use."""

import streamlit as st

from app import jobs, ui

ui.page_title("LoRITa Explorer")
st.markdown(
    """
**Low-Rank Induced Training**, live. Replace each weight matrix of a network by a product of
*N* factors, `W = W_N ⋯ W_2 W_1`, train as usual with ordinary weight decay, multiply the
factors back into one matrix, and cut its small singular values. Weight decay on *N* factors
acts like a Schatten-2/N penalty on the product, so for *N ≥ 2* training itself pushes the
spectra down to a low rank, and the merged network — same architecture as the original —
compresses with little loss.
"""
)

st.subheader("Where to start")
col1, col2 = st.columns(2)
with col1:
    st.page_link("pages/theory.py", label="1 · Theory: the idea in one second", icon="📐")
    st.page_link(
        "pages/train.py",
        label="2 · Train: the classroom demo (digits, about 15 s on a CPU)",
        icon="🏋️",
    )
    st.page_link("pages/runs.py", label="3 · Runs: put N=1 beside N=3", icon="📋")
with col2:
    st.page_link("pages/compress.py", label="4 · Compress: slide the truncation", icon="🗜️")
    st.page_link("pages/export.py", label="5 · Export: safetensors or ONNX", icon="📦")

st.subheader("This machine")
with ui.guard("Reading the machine"):
    info = jobs.machine_info()
    c1, c2, c3 = st.columns(3)
    c1.metric("Device for training", info["device"])
    c2.metric("Runs", info["n_runs"], help=f"Run folder: {info['runs_dir']}")
    c3.metric("Active runs", info["n_active"], help="running or queued")
    st.caption(
        f"Runs are stored in `{info['runs_dir']}` (set `LORITA_RUNS` to change it). "
        f"At most {info['max_concurrent']} training run(s) at a time; extra runs wait as queued."
    )
