"""Measured latency in a real browser: the Compress page's button times the cut on this
machine, and the Export page chooses each layer's form by measured latency."""

from __future__ import annotations

import re

import pytest
from e2e_helpers import TINY, download_button, no_errors, wait_idle

pytestmark = pytest.mark.e2e

NAME = "e2e-latency-n3"


@pytest.fixture(scope="module")
def tiny_run(app_server):
    """A short digits run trained in this process straight into the app's run store."""
    from lorita.engine import train
    from lorita.runs import RunStore

    store = RunStore(app_server["runs"])
    if not store.exists(NAME):
        result = train(TINY, store.create(TINY, name=NAME))
        assert result["state"] == "completed", result
    return NAME


def slider_input(page):
    """The first slider on the page (the Compress page's policy value)."""
    return page.locator('[data-testid="stSlider"] input[type="range"]').first


def nudge_slider(page) -> None:
    """Move the first slider one step to the left, as a keyboard user would."""
    slider_input(page).focus()
    page.keyboard.press("ArrowLeft")


def metric(page, label: str):
    return page.locator('[data-testid="stMetric"]').filter(has=page.get_by_text(label, exact=True))


def test_measure_latency_on_the_compress_page(app_server, page, tiny_run):
    page.goto(f"{app_server['url']}/compress?run={tiny_run}")
    page.get_by_text("Original validation accuracy").wait_for(timeout=120_000)
    page.get_by_text("Measured latency on this machine", exact=False).first.click()
    button = page.get_by_role("button", name="Measure latency on this machine")
    button.wait_for(timeout=60_000)
    assert metric(page, "Latency, batch 1").count() == 0  # nothing is timed before the press
    button.click()
    for batch in (1, 64):
        box = metric(page, f"Latency, batch {batch}")
        box.first.wait_for(timeout=120_000)
        value = box.locator('[data-testid="stMetricValue"]').first.inner_text()
        assert re.fullmatch(r"\d+\.\d{3} ms", value) and float(value.split()[0]) > 0, value
        delta = box.locator('[data-testid="stMetricDelta"]').first.inner_text()
        assert "% of original" in delta, delta
    page.locator("text.gtitle", has_text="Where the time goes").first.wait_for(timeout=60_000)
    caption = page.get_by_text("forward passes per batch size", exact=False).first
    measured = caption.inner_text()
    # another widget moves (the chart's cost axis), the cut stays: the numbers are kept, not
    # measured again (the caption's "measured in X s" is the same)
    page.get_by_text("FLOPs %", exact=True).first.click()
    wait_idle(page)
    assert metric(page, "Latency, batch 64").count() == 1
    assert page.get_by_text("forward passes per batch size", exact=False).first.inner_text() == (
        measured
    )
    no_errors(page, alerts=False)


def test_export_forms_chosen_by_measured_latency(app_server, page, tiny_run, tmp_path):
    page.goto(f"{app_server['url']}/compress?run={tiny_run}")
    page.get_by_text("Original validation accuracy").wait_for(timeout=120_000)
    page.locator('[data-testid="stSidebarNav"] a', has_text="Export").first.click()
    download_button(page).wait_for(timeout=120_000)
    page.get_by_text("Each layer's form: ", exact=False).first.wait_for(timeout=60_000)
    page.get_by_text("by measured latency on this machine", exact=False).first.click()
    forms = page.get_by_text(re.compile(r"Each layer's form: .*latency measured at batch 64"))
    forms.first.wait_for(timeout=120_000)
    wait_idle(page)  # the download button below is the one this run drew
    page.get_by_text("identical to the model in memory", exact=False).wait_for(timeout=60_000)
    button = download_button(page)
    with page.expect_download() as info:
        button.click()
    path = tmp_path / info.value.suggested_filename
    info.value.save_as(path)

    import lorita as lt

    meta = lt.read_spec(path)["metadata"]
    assert meta["truncation"]["forms_by"] == "latency"
    assert meta["truncation"]["latency_batch"] == 64
    assert set(meta["truncation"]["forms"]) == {"fc1", "fc2"}
    assert set(meta["truncation"]["forms"].values()) <= {"thin", "dense", "full"}
    no_errors(page, alerts=False)


def test_a_slider_move_redraws_the_charts_in_place(app_server, page, tiny_run):
    """The charts are the same elements after a move (Plotly.react), with the new cut."""
    page.goto(f"{app_server['url']}/compress?run={tiny_run}")
    page.get_by_text("Original validation accuracy").wait_for(timeout=120_000)
    legend = page.locator("text.legendtext", has_text="keep").first
    legend.wait_for(timeout=60_000)
    wait_idle(page)
    before = legend.text_content()
    plots = page.locator(".js-plotly-plot")
    n = plots.count()
    assert n >= 2  # the trade-off curve and the spectra with the cut
    page.evaluate("() => document.querySelectorAll('.js-plotly-plot')"
                  ".forEach((el, i) => { el.dataset.mark = String(i); })")  # fmt: skip
    nudge_slider(page)
    page.wait_for_function(
        "t => { const e = document.querySelector('text.legendtext'); "
        "return e && e.textContent !== t; }", arg=before, timeout=60_000,
    )  # fmt: skip
    wait_idle(page)
    assert plots.count() == n
    marks = page.evaluate("() => [...document.querySelectorAll('.js-plotly-plot')]"
                          ".map(el => el.dataset.mark)")  # fmt: skip
    assert marks == [str(i) for i in range(n)]  # not one chart was rebuilt
    no_errors(page, alerts=False)


def test_a_refresh_comes_back_to_the_same_cut(app_server, page, tiny_run):
    """The slider lives in a fragment; its value still reaches the URL, and a reload of that
    URL (a new session) shows the same policy and value."""
    page.goto(f"{app_server['url']}/compress?run={tiny_run}")
    page.get_by_text("Original validation accuracy").wait_for(timeout=120_000)
    wait_idle(page)
    handle = slider_input(page)
    start = handle.input_value()
    nudge_slider(page)
    page.wait_for_function(
        "v => { const e = document.querySelector('[data-testid=\"stSlider\"] input');"
        " return e && e.value !== v; }", arg=start, timeout=60_000,
    )  # fmt: skip
    wait_idle(page)
    moved = float(handle.input_value())
    page.wait_for_function(
        "v => new URL(location.href).searchParams.get('value') === v", arg=f"{moved:g}",
        timeout=30_000,
    )  # fmt: skip
    assert "policy=global" in page.url and f"run={tiny_run}" in page.url
    page.reload()
    page.get_by_text("Original validation accuracy").wait_for(timeout=120_000)
    wait_idle(page)
    assert float(slider_input(page).input_value()) == moved
    no_errors(page, alerts=False)


def test_a_refresh_of_the_export_page_keeps_the_cut(app_server, page, tiny_run):
    """Compress, then Export through the sidebar: the cut is offered, and still offered (the
    same one) after a reload of the Export page, which starts a new session."""
    page.goto(f"{app_server['url']}/compress?run={tiny_run}")
    page.get_by_text("Original validation accuracy").wait_for(timeout=120_000)
    wait_idle(page)
    nudge_slider(page)
    wait_idle(page)
    page.locator('[data-testid="stSidebarNav"] a').filter(has_text="Export").first.click()
    offered = page.get_by_text("Compressed on the Compress page", exact=False)
    offered.wait_for(timeout=120_000)
    wait_idle(page)
    text = offered.inner_text()
    page.wait_for_function(
        "() => new URL(location.href).searchParams.get('policy') === 'global'", timeout=30_000
    )
    page.reload()
    page.get_by_text("Compressed on the Compress page", exact=False).wait_for(timeout=120_000)
    assert page.get_by_text("Compressed on the Compress page", exact=False).inner_text() == text
    download_button(page).wait_for(timeout=120_000)
    no_errors(page, alerts=False)
