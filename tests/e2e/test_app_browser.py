"""The app in a real browser: train live, compress with the slider, download an export."""

from __future__ import annotations

import re
import time

import pytest
from e2e_helpers import download_button

pytestmark = pytest.mark.e2e


def sidebar(page, name: str) -> None:
    page.locator('[data-testid="stSidebarNav"] a', has_text=name).first.click()


def metric_value(page, label: str) -> str:
    box = page.locator('[data-testid="stMetric"]').filter(has=page.get_by_text(label, exact=True))
    return box.locator('[data-testid="stMetricValue"]').first.inner_text()


def no_tracebacks(page) -> None:
    assert page.locator('[data-testid="stException"]').count() == 0


def spectra_title(page) -> str:
    title = page.locator("text.gtitle", has_text="Singular values of every layer at step")
    return title.first.text_content(timeout=60_000)


def test_train_watch_compress_export(app_server, page, tmp_path):  # noqa: PLR0915
    url, runs = app_server["url"], app_server["runs"]

    # --- Train: the classroom preset, with its N=1 baseline queued behind it
    page.goto(f"{url}/train")  # the first visit after start-up, straight to a page
    page.get_by_role("button", name="Start training").wait_for()
    nav = page.locator('[data-testid="stSidebarNav"] a')
    nav.filter(has_text=re.compile("Theory")).first.wait_for(timeout=30_000)  # not "theory"
    assert nav.filter(has_text="streamlit app").count() == 0  # navigation, not folder listing
    before = {p.name for p in runs.iterdir()} if runs.exists() else set()  # other tests' runs
    page.get_by_role("button", name="Start training").click()

    def started(url: str) -> bool:  # the page follows the run it just started
        found = re.search(r"[?&]run=([^&]+)", url)
        return found is not None and found.group(1) not in before

    page.wait_for_url(started, timeout=60_000)
    name = re.search(r"[?&]run=([^&]+)", page.url).group(1)
    deadline = time.time() + 240  # the training child makes its folder once torch is imported
    while not (runs / name).exists():
        assert time.time() < deadline, f"run folder {name} never appeared"
        time.sleep(0.2)

    # the spectra chart updates while the run is going
    first = spectra_title(page)
    deadline = time.time() + 90
    while spectra_title(page) == first:
        assert time.time() < deadline, f"spectra chart stuck at {first!r}"
        time.sleep(0.5)
    assert page.get_by_text("queued", exact=False).count() > 0 or (runs / name).exists()

    # a refresh comes back to the same run
    page.reload()
    page.get_by_role("heading", name=name).wait_for(timeout=30_000)

    page.get_by_text("Completed.", exact=False).first.wait_for(timeout=300_000)
    no_tracebacks(page)

    # --- Compress: the slider changes the numbers
    sidebar(page, "Compress")
    page.get_by_text("Original validation accuracy").wait_for(timeout=60_000)
    page.locator("text.gtitle", has_text="Trade-off").first.wait_for(timeout=120_000)
    before = metric_value(page, "Parameters")
    slider = page.locator('[data-testid="stSlider"] input[type="range"]').first
    slider.focus()
    slider.press("End")
    deadline = time.time() + 30
    while metric_value(page, "Parameters") == before:
        assert time.time() < deadline, "the slider did not change the parameter count"
        time.sleep(0.3)
    after = metric_value(page, "Parameters")
    assert after != before
    no_tracebacks(page)

    # --- Export: download the compressed model and load it with the library
    sidebar(page, "Export")
    button = download_button(page)
    button.wait_for(timeout=120_000)
    alerts = page.locator('[data-testid="stAlert"]')
    try:
        page.get_by_text("identical to the model in memory", exact=False).wait_for(timeout=30_000)
    except Exception as exc:  # noqa: BLE001 - say what the page showed instead
        raise AssertionError(f"Export page says: {alerts.all_inner_texts()}") from exc
    with page.expect_download() as info:
        button.click()
    path = tmp_path / info.value.suggested_filename
    info.value.save_as(path)
    assert path.suffix == ".safetensors" and path.stat().st_size > 0

    import torch

    import lorita as lt

    model = lt.load(path).eval()
    meta = lt.read_spec(path)["metadata"]
    assert meta["run"] == name and meta["truncation"]["policy"] == "global"
    x = torch.zeros(2, *meta["input_shape"])
    assert model(x).shape == (2, 10)
    no_tracebacks(page)
