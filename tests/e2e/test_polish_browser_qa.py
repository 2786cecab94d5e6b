"""A chart's long title in a narrow chart (a phone, a narrow column), drawn by app.plot's
component in Chromium: wrapped to the chart's width, above the plot, never cut off."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.e2e

LONG = "Spectrum of every layer (σ/σ_max, log scale): kept solid, dropped faint"
NAME = "features.denseblock4.denselayer16.conv2.weight_of_a_long_layer_name_indeed"


@pytest.fixture
def chart(browser):
    """draw(title, width) -> where the title and the plot area lie, drawn as the app draws."""
    from app import charts, plot

    js = plot._JS.replace("export default function", "window.__loritaDraw = function")
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    context.route("**/*", lambda route: route.abort())  # nothing from outside
    page = context.new_page()
    page.set_content("<html><body style='margin:0'><div id=host></div></body></html>")
    page.add_script_tag(path=str(plot.plotly_js_source()))
    page.add_script_tag(content=js)

    def draw(title: str, width: int) -> dict:
        rows = [{"step": s, "split": "train", "loss": 1.0 / s} for s in (1, 2, 3)]
        fig = charts.training_curves({"r": rows}, "loss", title=title)
        page.evaluate("w => { document.getElementById('host').style.width = w + 'px'; }", width)
        page.evaluate(
            "d => window.__loritaDraw({parentElement: document.getElementById('host'), data: d})",
            plot._payload(fig, "k", None),
        )
        return _measure(page, width)

    yield draw, page
    context.close()


def _measure(page, width: int) -> dict:
    page.wait_for_function(
        "w => { const d = document.querySelector('.lorita-plot');"
        " return d && d.__loritaWidth === w && document.querySelector('.gtitle'); }",
        arg=width,
    )
    page.wait_for_timeout(100)
    return page.evaluate(
        """() => {
          const box = (s) => document.querySelector(s).getBoundingClientRect();
          const t = box('.gtitle'), bg = box('.bg'), div = box('.lorita-plot');
          return {right: t.right, left: t.left, top: t.top, bottom: t.bottom, plot_top: bg.top,
                  width: div.width, height: div.height,
                  text: document.querySelector('.gtitle').textContent,
                  lines: Math.max(1, document.querySelectorAll('.gtitle .line').length)};
        }"""
    )


@pytest.mark.parametrize("title", [LONG, f"Final spectrum of {NAME} (σ/σ_max)"])
def test_a_long_title_in_a_narrow_chart_wraps_inside_it(chart, title):
    """Before, the title ran on in one line past the chart's right edge (cut off)."""
    draw, _ = chart
    got = draw(title, 380)
    assert got["lines"] >= 2
    assert got["left"] >= 0 and got["right"] <= got["width"], got
    assert 0 <= got["top"] and got["bottom"] <= got["plot_top"], got  # above the plot
    assert got["text"].replace(" ", "") == title.replace(" ", "")  # every word still there
    assert got["height"] > 340  # the chart grew by the lines added: the plot keeps its size


def test_a_title_that_fits_stays_one_line_and_wraps_when_the_chart_narrows(chart):
    draw, page = chart
    wide = draw(LONG, 1000)
    assert wide["lines"] == 1 and wide["height"] == 340 and wide["right"] <= wide["width"]
    page.evaluate("() => { document.getElementById('host').style.width = '360px'; }")
    narrow = _measure(page, 360)  # drawn again by the chart's resize observer
    assert narrow["lines"] >= 2 and narrow["right"] <= narrow["width"], narrow
