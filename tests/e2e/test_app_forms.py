"""The Train form in a real browser with what a user may hand it: files that are not weights."""

from __future__ import annotations

import pytest
from e2e_helpers import wait_idle

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
    wait_idle(page)  # the upload's own rerun over: a click during it can be lost on a busy machine
    page.get_by_role("button", name="Start training").click()
    error = page.locator('[data-testid="stAlertContentError"]').first
    error.wait_for(timeout=60_000)
    text = error.inner_text()
    assert "init_from: 'mine.safetensors' is neither a safetensors file" in text, text
    assert "uploads" not in text and str(app_server["runs"]) not in text, text
    assert page.locator('[data-testid="stException"]').count() == 0


def test_n3_starts_from_a_finished_plain_run(app_server, page):
    """The plain network trained first, then N=3 from its best checkpoint, chosen on the page."""
    import re
    import time

    from app import presets
    from lorita.engine import train
    from lorita.runs import RunStore

    def run_in(url: str) -> str:
        m = re.search(r"[?&]run=([^&]+)", url)
        return m.group(1) if m else ""

    store, plain = RunStore(app_server["runs"]), "e2e-plain-start"
    page.goto(f"{app_server['url']}/train")
    page.get_by_role("button", name="Start training").wait_for(timeout=60_000)
    # the page may follow (and its form show) a run of an earlier test: the plain run gets
    # that run's model and data, so its weights fit what the form will start
    followed = run_in(page.url)
    cfg = dict(store.get(followed).config) if followed else presets.config("classroom")
    cfg.update(n_factors=1, epochs=1, max_steps=3, device="cpu", spectra_every=0, init_from=None)
    if store.exists(plain):
        store.delete(plain)
    assert train(cfg, store.create(cfg, name=plain))["state"] == "completed"
    page.reload()
    page.get_by_role("button", name="Start training").wait_for(timeout=60_000)
    page.get_by_role("combobox", name="…or start from a finished run").click()
    page.get_by_role("option", name=plain, exact=True).click()
    page.get_by_role("spinbutton", name="N (factors per layer)").fill("3")
    page.get_by_role("spinbutton", name="Epochs", exact=True).fill("1")
    page.get_by_text("also train N=1", exact=False).click()  # just the composed run
    before = {plain, run_in(page.url)}
    page.get_by_role("button", name="Start training").click()
    page.wait_for_url(lambda u: run_in(u) not in before, timeout=60_000)
    name = run_in(page.url)
    deadline = time.time() + 240
    while not (store.root / name / "config.json").is_file():
        assert time.time() < deadline, f"run folder {name} never appeared"
        time.sleep(0.2)
    config = store.get(name).config
    assert config["init_from"] == str(store.get(plain).checkpoint("best").resolve())
    assert config["n_factors"] == 3
    while store.get(name).status()["state"] != "completed":
        assert store.get(name).status()["state"] in ("queued", "running"), store.get(name).status()
        assert time.time() < deadline, f"{name} did not complete"
        time.sleep(0.5)
    assert page.locator('[data-testid="stException"]').count() == 0
