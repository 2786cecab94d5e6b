"""Locators, page checks and the tiny run config shared by the browser tests."""

from __future__ import annotations

import re

# A digits run small enough to train in a couple of seconds on one core.
TINY = {
    "dataset": "digits",
    "model": "mlp",
    "model_kwargs": {"depth": 2, "width": 32},
    "n_factors": 3,
    "init": "balanced",
    "optimizer": "adam",
    "lr": 3e-3,
    "weight_decay": 5e-4,
    "epochs": 2,
    "batch_size": 64,
    "seed": 0,
    "device": "cpu",
    "spectra_every": 5,
}


def download_button(page, name: str = ""):
    """The page's st.download_button whose label starts with "Download " (then ``name``, a
    regular expression). Scoped to Streamlit's download buttons: a chart's "Download plot as
    a PNG" or a table's "Download as CSV" button (of this page, or of the page before while
    the new one draws) never matches."""
    label = re.compile(r"^Download .*" + name if name else r"^Download ")
    return page.get_by_test_id("stDownloadButton").get_by_role("button", name=label)


def no_errors(page, *, alerts: bool = True) -> None:
    """No exception element, no traceback or half-imported module in the page's text and,
    with ``alerts``, no error element (a page that shows a refusal on purpose passes False)."""
    assert page.locator('[data-testid="stException"]').count() == 0
    if alerts:
        errors = page.locator('[data-testid="stAlertContentError"]').all_inner_texts()
        assert not errors, errors
    text = page.locator("body").inner_text()
    assert "Traceback" not in text and "partially initialized" not in text


def wait_idle(page, timeout_s: float = 120) -> None:
    """Until the page's script run is over (Streamlit's status widget gone)."""
    page.wait_for_timeout(300)
    page.locator('[data-testid="stStatusWidget"]').wait_for(state="hidden", timeout=timeout_s * 1e3)
