"""The Train form in a real browser with what a user may hand it: files that are not weights."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.e2e


def test_a_bad_weights_upload_is_named_as_the_user_named_it(app_server, page):
    """The message names the uploaded file, not where the app keeps uploads on the server."""
    page.goto(f"{app_server['url']}/train")
    page.get_by_role("button", name="Start training").wait_for(timeout=60_000)
    page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(
        {"name": "mine.safetensors", "mimeType": "application/octet-stream",
         "buffer": b"not a weights file, just text\n"}
    )  # fmt: skip
    page.get_by_text("mine.safetensors").first.wait_for()
    page.get_by_role("button", name="Start training").click()
    error = page.locator('[data-testid="stAlertContentError"]').first
    error.wait_for(timeout=60_000)
    text = error.inner_text()
    assert "init_from: 'mine.safetensors' is neither a safetensors file" in text, text
    assert "uploads" not in text and str(app_server["runs"]) not in text, text
    assert page.locator('[data-testid="stException"]').count() == 0
