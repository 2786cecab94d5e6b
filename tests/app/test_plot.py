"""app.plot: what a chart sends to the browser, the served plotly.js, and the fallback."""

from __future__ import annotations

import json

import plotly.graph_objects as go
from app_seed import ROOT, shown_charts
from streamlit.testing.v1 import AppTest

from app import plot


def test_payload_is_the_figure_without_plotlys_template_and_with_its_key():
    fig = go.Figure(go.Scatter(x=[1, 2], y=[3, 4]), layout={"title": {"text": "t"}})
    assert fig.to_dict()["layout"].get("template")  # plotly.py puts its default look in
    data = plot._payload(fig, "k", {"staticPlot": True})
    spec = json.loads(data["figure"])
    assert "template" not in spec["layout"]  # the page's look is applied in the browser
    assert spec["data"][0]["y"] == [3, 4] and spec["layout"]["title"]["text"] == "t"
    assert data["key"] == "k" and data["config"] == {"staticPlot": True}
    assert data["src"] == plot.SCRIPT_URL


def test_plotly_js_is_copied_whole_and_again_after_an_upgrade(tmp_path, monkeypatch):
    monkeypatch.setattr(plot, "STATIC", tmp_path / "static")
    src = plot.plotly_js_source()
    assert plot.serve_plotly_js()
    copied = tmp_path / "static" / plot.SCRIPT
    assert copied.read_bytes() == src.read_bytes()
    copied.write_text("an older plotly.js")  # another size: replaced
    assert plot.serve_plotly_js() and copied.stat().st_size == src.stat().st_size
    assert [p.name for p in copied.parent.iterdir()] == [plot.SCRIPT]  # no temporary left


def test_plotly_js_that_cannot_be_copied_is_reported(tmp_path, monkeypatch):
    blocker = tmp_path / "static"
    blocker.write_text("a file where the folder should be")
    monkeypatch.setattr(plot, "STATIC", blocker)
    assert plot.serve_plotly_js() is False


def _theory(tmp_path, monkeypatch, static):
    monkeypatch.setattr(plot, "STATIC", static)
    at = AppTest.from_file(str(ROOT / "streamlit_app.py"), default_timeout=300)
    at.run()
    at.switch_page("pages/theory.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_a_page_draws_through_the_component(tmp_path, monkeypatch):
    at = _theory(tmp_path, monkeypatch, plot.STATIC)
    assert (plot.STATIC / plot.SCRIPT).is_file()  # copied at start-up
    assert len(at.get("bidi_component")) == 1 and not at.get("plotly_chart")
    (chart,) = shown_charts(at)
    assert chart.key == "theory.chart" and chart.figure["data"]


def test_without_plotly_js_to_serve_charts_fall_back_to_st_plotly_chart(tmp_path, monkeypatch):
    at = _theory(tmp_path, monkeypatch, tmp_path / "nothing-here")
    assert not at.get("bidi_component") and len(at.get("plotly_chart")) == 1
    assert [c.key for c in shown_charts(at)] == ["theory.chart"]


def test_nothing_is_served_without_static_serving(monkeypatch):
    """Started from another folder, the app's config (and its static serving) is not read."""
    import streamlit as st

    assert plot.served()  # this repository's .streamlit/config.toml turns it on
    real = st.get_option
    monkeypatch.setattr(
        st, "get_option", lambda name: False if name == "server.enableStaticServing" else real(name)
    )
    assert not plot.served()


def test_a_streamlit_without_components_v2_falls_back(monkeypatch):
    import streamlit as st

    monkeypatch.setattr(plot, "_registered", None)
    monkeypatch.setattr(st.components, "v2", None)
    assert plot._component() is False  # show() then draws with st.plotly_chart
