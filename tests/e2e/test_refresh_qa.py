"""Nothing lost on a refresh, in a real browser: each page reloaded comes back to what it showed
(the Train page's half-filled form, the Compress page's cut after quick arrow keys, the Runs
page's overlaid runs, the Export page's cut)."""

from __future__ import annotations

import re
from urllib.parse import parse_qs, urlsplit

import pytest
from e2e_helpers import TINY, no_errors, wait_idle

pytestmark = pytest.mark.e2e

RUN = "e2e-refresh-n3"
DRAWN = "computed in"  # the Compress page's caption under the cut's numbers, drawn last


def params_of(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query, keep_blank_values=True)


def params(page) -> dict[str, list[str]]:
    return params_of(page.url)


def wait_param(page, name: str, value: str) -> None:
    page.wait_for_url(lambda u: params_of(u).get(name) == [value], timeout=30_000)


@pytest.fixture(scope="module")
def finished(app_server):
    """A one-epoch digits run trained in this process straight into the app's run store."""
    from lorita.engine import train
    from lorita.runs import RunStore

    store, cfg = RunStore(app_server["runs"]), {**TINY, "epochs": 1}
    if not store.exists(RUN):
        assert train(cfg, store.create(cfg, name=RUN))["state"] == "completed"
    return RUN


def test_train_a_half_filled_form_survives_a_reload(app_server, page, finished):
    """Another preset, then epochs and N typed, not started: F5 shows the same form."""
    page.goto(f"{app_server['url']}/train")
    page.get_by_role("button", name="Start training").wait_for()
    wait_idle(page)
    page.get_by_role("combobox", name="Preset").click()
    page.get_by_role("option", name=re.compile("^Planted rank 5")).click()
    wait_param(page, "preset", "planted")
    wait_idle(page)
    for label, value in (("Epochs", "4"), ("N (factors per layer)", "2")):
        box = page.get_by_label(label, exact=True)
        box.fill(value)
        box.press("Tab")  # (a number box says its value when it loses focus)
    wait_param(page, "n_factors", "2")
    wait_idle(page)
    assert params(page)["epochs"] == ["4"]
    page.reload()
    page.get_by_role("button", name="Start training").wait_for()
    wait_idle(page)
    assert page.get_by_label("Epochs", exact=True).input_value() == "4"
    assert page.get_by_label("N (factors per layer)", exact=True).input_value() == "2"
    assert page.get_by_role("combobox", name="Preset").input_value().startswith("Planted rank 5")
    no_errors(page)


def slider_after_reload(page) -> str:
    page.reload()
    page.get_by_text(DRAWN, exact=False).first.wait_for(timeout=120_000)
    wait_idle(page)
    return page.locator('[data-testid="stSlider"] input[type="range"]').first.input_value()


def test_compress_quick_arrow_keys_then_a_reload_keep_the_cut(app_server, page, finished):
    """Five quick ArrowRight presses: the address names the slider's last value, and a reload
    comes back to it, numbers included: each press reruns the page's fragment, and one cut
    short by the next press must not leave an older ``?value=`` in the address."""
    page.goto(f"{app_server['url']}/compress?run={RUN}")
    page.get_by_text(DRAWN, exact=False).first.wait_for(timeout=120_000)
    wait_idle(page)
    slider = page.locator('[data-testid="stSlider"] input[type="range"]').first
    for key in ("ArrowRight", "ArrowLeft"):
        before = float(slider.input_value())
        slider.focus()
        for _ in range(5):
            page.keyboard.press(key)
        moved = f"{before + (0.05 if key == 'ArrowRight' else -0.05):.2f}"
        assert float(slider.input_value()) == float(moved)
        page.get_by_text(f"at {moved}: {DRAWN}", exact=False).first.wait_for(timeout=60_000)
        wait_idle(page)
        assert float(params(page)["value"][0]) == float(moved)
        assert float(slider_after_reload(page)) == float(moved)
        page.get_by_text(f"at {moved}: {DRAWN}", exact=False).first.wait_for(timeout=60_000)
        no_errors(page)


def picked(page) -> list[str]:
    """The runs the Runs page overlays (its picker's chips)."""
    chips = page.get_by_role("group", name="Selected values").locator("[data-tag]")
    return [chip.get_attribute("aria-label") for chip in chips.all()]


def test_runs_the_overlaid_runs_survive_a_reload(app_server, page, finished):
    """The run the page opened on overlaid, then taken off: a reload overlays none (before,
    the page's default pick came back)."""
    page.goto(f"{app_server['url']}/runs?run={RUN}")
    page.get_by_role("group", name="Selected values").get_by_text(RUN).wait_for()
    wait_idle(page)
    assert picked(page) == [RUN]
    page.get_by_role("button", name=f"Remove {RUN}").click()
    wait_param(page, "overlay", "")
    page.get_by_text("Pick one or more runs", exact=False).wait_for()
    wait_idle(page)
    page.reload()
    page.get_by_text("Pick one or more runs", exact=False).wait_for()
    wait_idle(page)
    assert picked(page) == []
    no_errors(page)


def test_export_the_cut_survives_a_reload(app_server, page, finished):
    """A cut set on Compress, exported: a reload of the Export page offers the same cut."""
    page.goto(f"{app_server['url']}/compress?run={RUN}")
    page.get_by_text(DRAWN, exact=False).first.wait_for(timeout=120_000)
    wait_idle(page)
    slider = page.locator('[data-testid="stSlider"] input[type="range"]').first
    slider.focus()
    page.keyboard.press("ArrowRight")
    moved = slider.input_value()
    page.get_by_text(f"at {float(moved):.2f}: {DRAWN}", exact=False).first.wait_for()
    wait_idle(page)
    page.get_by_role("link", name=re.compile("Export this model")).click()
    cut = page.get_by_role(
        "radio", name=re.compile(f"Compressed on the Compress page: .* at {float(moved):.2f}")
    )
    for _ in range(2):  # opened from Compress, then reloaded
        page.get_by_test_id("stDownloadButton").first.wait_for(timeout=120_000)
        wait_idle(page)
        assert cut.is_checked()
        assert float(params(page)["value"][0]) == float(moved)
        no_errors(page)
        page.reload()
