"""Show a plotly figure on a page, redrawn in place when it changes.

``st.plotly_chart`` (Streamlit 1.67) derives a chart's element id from the figure itself, so a
changed figure is a new element: the browser throws the old plot away and builds another
(Plotly.newPlot: the DOM, the axes, the hover layer, the toolbar). A Compress slider move
rebuilt two charts that way (about 150 ms of the browser's main thread per move, measured with
Chromium's profiler), and the live Train page rebuilt five every second. :func:`show` mounts a
small component that keeps one element per key and calls ``Plotly.react`` on it: only what
changed is redrawn, and a user's zoom survives (``layout.uirevision``).

plotly.js is the copy the plotly package ships (the version that wrote the figure), copied once
to ``static/`` beside ``streamlit_app.py`` by :func:`serve_plotly_js` and served by this same
server (``enableStaticServing`` in ``.streamlit/config.toml``): nothing comes from outside.
Where that copy cannot be made (a read-only install), or static serving is off (the app started
from another folder, so ``.streamlit/config.toml`` was not read), charts fall back to
``st.plotly_chart``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import streamlit as st

from lorita.io import fault, temp_beside

ROOT = Path(__file__).resolve().parents[1]
STATIC = ROOT / "static"  # Streamlit serves this folder at ./app/static/
SCRIPT = "plotly.min.js"
SCRIPT_URL = f"./app/static/{SCRIPT}"

# Charts follow the page: transparent backgrounds, the page's font and text colour (read in
# the browser, so a dark theme gets light text), light grid lines.
_JS = r"""
const GRID = "rgba(128, 128, 128, 0.22)";
const TEMPLATE = {layout: {
  paper_bgcolor: "rgba(0,0,0,0)", plot_bgcolor: "rgba(0,0,0,0)",
  colorway: ["#636efa", "#EF553B", "#00cc96", "#ab63fa", "#FFA15A", "#19d3f3", "#FF6692",
             "#B6E880", "#FF97FF", "#FECB52"],
  xaxis: {gridcolor: GRID, zerolinecolor: GRID, linecolor: GRID, automargin: true},
  yaxis: {gridcolor: GRID, zerolinecolor: GRID, linecolor: GRID, automargin: true},
  legend: {bgcolor: "rgba(0,0,0,0)"},
}};

// plotly.js neither wraps nor shrinks a title: one wider than its chart (a phone, a narrow
// column) was cut off at the chart's edge. fitTitle wraps it at its spaces to the chart's width
// (a word longer than a line is cut) and grows the top margin and the chart by the lines added;
// the chart is drawn again when its width changes.
const CHAR_EM = 0.56;  // a title character's average width in em (measured about 0.5)
const LINE_EM = 1.3;  // a title line's height in em

function wrapTitle(text, chars) {
  const lines = [];
  for (const part of String(text).split(/<br\s*\/?>/i)) {
    let line = "";
    for (let word of part.split(/\s+/).filter(Boolean)) {
      while (word.length > chars) {  // a long layer or run name
        if (line) { lines.push(line); line = ""; }
        lines.push(word.slice(0, chars));
        word = word.slice(chars);
      }
      if (line && line.length + 1 + word.length > chars) { lines.push(line); line = word; }
      else line = line ? line + " " + word : word;
    }
    lines.push(line);
  }
  return lines;
}

function fitTitle(layout, width) {
  const title = typeof layout.title === "string" ? {text: layout.title} : layout.title;
  if (!title || !title.text || !(width > 0)) return layout;
  const size = (title.font && title.font.size) || (layout.font && layout.font.size) || 17;
  const chars = Math.max(8, Math.floor((width - 24) / (CHAR_EM * size)));
  const lines = wrapTitle(title.text, chars);
  const extra = Math.round((lines.length - 1) * LINE_EM * size);
  if (!extra) return layout;
  // just above the plot, the top margin grown by plotly.js to what the lines take
  const above = {automargin: true, yref: "paper", y: 1, yanchor: "bottom", pad: {b: 8}};
  return Object.assign({}, layout, {
    title: Object.assign({}, title, above, {text: lines.join("<br>")}),
    height: (layout.height || 400) + extra,
  });
}

function loadPlotly(src) {
  if (!window.__loritaPlotly) {
    window.__loritaPlotly = new Promise((resolve, reject) => {
      if (window.Plotly) return resolve(window.Plotly);
      const start = () => {
        const s = document.createElement("script");
        s.src = src;
        s.onload = () => resolve(window.Plotly);
        s.onerror = () => { window.__loritaPlotly = null; reject(new Error("plotly.js")); };
        document.head.appendChild(s);
      };
      // Paint the page's text first: the 4.8 MB script is read after the next frame.
      requestAnimationFrame(() => setTimeout(start, 0));
    });
  }
  return window.__loritaPlotly;
}

export default function ({ parentElement, data }) {
  let div = parentElement.querySelector("div.lorita-plot");
  if (!div) {
    div = document.createElement("div");
    div.className = "lorita-plot";
    parentElement.appendChild(div);
  }
  const fig = JSON.parse(data.figure);
  const layout = fig.layout || {};
  const css = getComputedStyle(div);
  layout.template = TEMPLATE;
  layout.font = Object.assign({family: css.fontFamily, color: css.color}, layout.font || {});
  layout.autosize = true;
  delete layout.width;
  const config = Object.assign({displaylogo: false, responsive: true}, data.config || {});
  const draw = (Plotly) => {
    const width = div.clientWidth || parentElement.clientWidth;
    const fitted = fitTitle(layout, width);
    div.__loritaWidth = width;
    div.style.height = (fitted.height || 400) + "px";
    return Plotly.react(div, fig.data || [], fitted, config);
  };
  div.__loritaDraw = draw;
  if (!div.__loritaResize && window.ResizeObserver) {  // a title wrapped again to a new width
    div.__loritaResize = new ResizeObserver(() => {
      if (window.Plotly && div.clientWidth && div.clientWidth !== div.__loritaWidth) {
        div.__loritaDraw(window.Plotly);
      }
    });
    div.__loritaResize.observe(div);
  }
  if (window.Plotly) draw(window.Plotly);
  else loadPlotly(data.src).then(draw);
}
"""

_registered: Any = None
_register_lock = threading.Lock()


def _component() -> Any:
    """The component, registered on first use (inside a script run, where Streamlit wants it);
    False on a Streamlit without ``st.components.v2`` (charts then use ``st.plotly_chart``)."""
    global _registered
    with _register_lock:
        if _registered is None:
            try:
                _registered = st.components.v2.component(
                    "lorita_plot", js=_JS, isolate_styles=False
                )
            except (AttributeError, TypeError):  # an older Streamlit
                _registered = False
        return _registered


def plotly_js_source() -> Path:
    """The plotly.js file of the installed plotly package."""
    import plotly

    return Path(plotly.__file__).resolve().parent / "package_data" / SCRIPT


def serve_plotly_js() -> bool:
    """Put the plotly package's plotly.js in ``static/`` (once; again after an upgrade).

    Written to a temporary name and renamed, so a browser never reads half a file. False if
    the folder cannot be written: :func:`show` then falls back to ``st.plotly_chart``.
    """
    src, dst = plotly_js_source(), STATIC / SCRIPT
    tmp = temp_beside(dst)  # (a copy left by a server killed while copying is removed)
    try:
        if dst.is_file() and dst.stat().st_size == src.stat().st_size:
            return True
        STATIC.mkdir(exist_ok=True)
        shutil.copyfile(src, tmp)
        fault("write")  # the crash tests: killed with the copy whole under its temporary name
        os.replace(tmp, dst)
        return True
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        return False


def served() -> bool:
    """Whether this server can hand plotly.js to the browser: the copy is in ``static/`` and
    static serving is on (it is in ``.streamlit/config.toml``, which Streamlit reads from the
    folder ``streamlit run`` is started in)."""
    return bool(st.get_option("server.enableStaticServing")) and (STATIC / SCRIPT).is_file()


def _payload(fig: Any, key: str | None, config: dict | None) -> dict:
    from plotly.io.json import to_json_plotly

    spec = fig.to_dict()
    spec.get("layout", {}).pop("template", None)  # the page's own look is set in the browser
    return {"figure": to_json_plotly(spec), "config": config or {}, "src": SCRIPT_URL,
            "key": key}  # fmt: skip


def show(fig: Any, *, key: str | None = None, where: Any = None, config: dict | None = None):
    """Draw ``fig`` in ``where`` (a container, a column, a placeholder; the page if None).

    The same ``key`` on the next run redraws the same element in place. ``config`` is
    plotly.js's (``{"staticPlot": True}`` for a picture without hover).
    """
    mount = _component() if served() else False
    if not mount:
        return (st if where is None else where).plotly_chart(fig, key=key, config=config or {})
    if where is None:
        return mount(data=_payload(fig, key, config), key=key, width="stretch")
    with where:
        return mount(data=_payload(fig, key, config), key=key, width="stretch")
