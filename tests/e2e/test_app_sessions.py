"""The app in a real browser as a class uses it: several sessions, offline, every export,
your own images. Each page records its requests (conftest): none may leave this machine."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from e2e_helpers import TINY, download_button, no_errors, wait_idle

pytestmark = pytest.mark.e2e

PAGES = ("", "train", "runs", "compress", "export", "theory")


@pytest.fixture(scope="module")
def finished_run(app_server):
    """A short digits run trained in this process straight into the app's run store."""
    from lorita.engine import train
    from lorita.runs import RunStore

    store = RunStore(app_server["runs"])
    name = "e2e-finished-n3"
    if not store.exists(name):
        result = train(TINY, store.create(TINY, name=name))
        assert result["state"] == "completed", result
    return name


def test_every_page_offline_by_direct_link(app_server, new_page, finished_run):
    """A first visit straight to each page: navigation (not folder mode), no error, and no
    request outside localhost (the fixture checks that at the end)."""
    url = app_server["url"]
    for path in PAGES:
        page = new_page()
        page.goto(f"{url}/{path}?run={finished_run}")
        nav = page.locator('[data-testid="stSidebarNav"] a')
        # the navigation's titles (folder mode would list file names: "theory", "streamlit app")
        nav.filter(has_text=re.compile("Theory")).first.wait_for(timeout=60_000)
        wait_idle(page, 120)
        assert nav.filter(has_text=re.compile("streamlit app")).count() == 0
        no_errors(page, alerts=False)


def test_two_sessions_at_once(app_server, new_page, finished_run):
    """One person starts a run while another opens the Runs page for the first time: neither
    sees an error, and the second sees the running run."""
    url, runs = app_server["url"], app_server["runs"]
    a, b = new_page(), new_page()
    a.goto(f"{url}/train")
    b.goto(f"{url}/runs")

    def run_names() -> set[str]:
        return {p.name for p in runs.iterdir() if (p / "status.json").exists()}

    before = run_names()
    a.get_by_role("button", name="Start training").click()
    deadline = time.time() + 240  # the child makes its folder once torch is imported
    while not (new := sorted(run_names() - before)):
        assert time.time() < deadline, "Start made no run"
        time.sleep(0.2)
    name = next((n for n in new if "N3" in n), new[0])
    b.reload()
    t0 = time.perf_counter()
    b.get_by_text(f"Training now: {name}", exact=False).first.wait_for(timeout=60_000)
    assert time.perf_counter() - t0 < 60  # (a page's run, on a loaded machine)
    for pg in (a, b):
        no_errors(pg)
    for started in run_names() - before:
        (runs / started / "STOP").touch()


def test_onnx_download_after_a_plain_install(app_server, page, finished_run, tmp_path):
    """requirements.txt has onnx and onnxruntime: the Export page offers ONNX, verifies it by
    reloading the file, and the download runs in onnxruntime."""
    page.goto(f"{app_server['url']}/export?run={finished_run}")
    page.get_by_text("ONNX", exact=False).first.click()
    button = download_button(page, r"\.onnx")
    button.wait_for(timeout=120_000)
    with page.expect_download() as info:
        button.click()
    path = tmp_path / info.value.suggested_filename
    info.value.save_as(path)
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.zeros((2, *session.get_inputs()[0].shape[1:]), dtype=np.float32)
    assert session.run(None, {session.get_inputs()[0].name: x})[0].shape == (2, 10)
    no_errors(page, alerts=False)


def _image_folder(root, classes=3, per_class=24, size=12):
    import numpy as np
    from PIL import Image

    gen = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            base = np.full((size, size, 3), 60 * c, dtype=np.uint8)
            noise = gen.integers(0, 40, (size, size, 3), dtype=np.uint8)
            Image.fromarray(base + noise).save(folder / f"{i}.png")
    return root


def _log(app_server, name: str) -> str:
    """The end of the app's log of run ``name`` (what its process printed), for a failure."""
    path = Path(app_server["runs"]) / ".app" / f"{name}.log"
    return path.read_text(errors="replace")[-3000:] if path.exists() else f"no {path}"


def _state(store, name: str) -> str:
    """A run's state from its folder ("starting" until the training process made it)."""
    try:
        return store.get(name).status().get("state") or "starting"
    except ValueError:
        return "starting"


def test_train_on_an_image_folder_then_compress_and_export(app_server, page, tmp_path):
    """Your own images: the Train page's folder path, a run that completes, its Compress and
    Export pages."""
    from lorita.runs import RunStore

    folder = _image_folder(tmp_path / "images")
    url = app_server["url"]
    page.goto(f"{url}/train")
    page.get_by_role("button", name="Start training").wait_for()
    page.get_by_role("combobox", name="Dataset").click()
    page.get_by_role("option", name="folder", exact=True).click()
    page.get_by_label("Image folder (for folder)").fill(str(folder))
    epochs = page.get_by_role("spinbutton", name="Epochs", exact=True)
    epochs.fill("2")
    page.get_by_text("also train N=1", exact=False).click()  # just the composed run
    page.get_by_role("button", name="Start training").click()
    page.wait_for_url(re.compile(r"[?&]run=folder"), timeout=60_000)
    name = re.search(r"[?&]run=([^&]+)", page.url).group(1)
    # The page followed another (completed) run before Start, and its "Completed." stays on
    # screen while the page reruns: wait for this run's own folder, then for the page.
    store, deadline = RunStore(app_server["runs"]), time.time() + 240
    while (got := _state(store, name)) != "completed":
        assert got in ("starting", "queued", "running"), (
            name,
            store.get(name).status(),
            _log(app_server, name),
        )
        assert time.time() < deadline, f"{name} did not complete"
        time.sleep(0.5)
    page.get_by_text("Completed.", exact=False).first.wait_for(timeout=60_000)
    no_errors(page, alerts=False)
    page.goto(f"{url}/compress?run={name}")
    page.locator("text.gtitle", has_text="Trade-off").first.wait_for(timeout=120_000)
    no_errors(page, alerts=False)
    page.goto(f"{url}/export?run={name}")
    download_button(page).wait_for(timeout=120_000)
    no_errors(page, alerts=False)
