"""A teacher's demo in a real browser: the Classroom preset trained live (its spectra redrawn as
it trains), a refresh and a second tab mid-run, Stop, then Runs, Compress (the slider dragged),
Export (the download loaded with the library) and Delete for that run; the keyboard alone; a
phone-wide window. Every page: no traceback and no error element, and every action says
something the user can see."""

from __future__ import annotations

import re
import time

import pytest
from e2e_helpers import TINY, download_button, no_errors, wait_idle

pytestmark = pytest.mark.e2e

START = "Start training"
BASELINE = "also train N=1"


def sidebar(page, name: str) -> None:
    page.locator('[data-testid="stSidebarNav"] a', has_text=name).first.click()


def toast(page, text: str):
    return page.get_by_test_id("stToast").filter(has_text=text).first


def run_in(url: str) -> str:
    found = re.search(r"[?&]run=([^&]+)", url)
    return found.group(1) if found else ""


def url_value(page) -> float | None:
    """The Compress page's slider value as its address keeps it."""
    found = re.search(r"[?&]value=([^&]+)", page.url)
    return float(found.group(1)) if found else None


def progress_text(page) -> str:
    bar = page.locator('[data-testid="stProgress"]').first
    bar.wait_for(timeout=60_000)
    return bar.inner_text()


def metric_value(page, label: str) -> str:
    box = page.locator('[data-testid="stMetric"]').filter(has=page.get_by_text(label, exact=True))
    return box.locator('[data-testid="stMetricValue"]').first.inner_text()


def pick(page, box: str, option: str) -> None:
    """Choose ``option`` in the selectbox labelled ``box`` (opened again if a rerun of the
    page closed it before the option showed)."""
    for _ in range(5):
        page.get_by_role("combobox", name=box).click()
        try:
            page.get_by_role("option", name=option, exact=True).click(timeout=5_000)
            return
        except Exception:  # noqa: BLE001 - the list closed under a rerun: open it again
            wait_idle(page)
    raise AssertionError(f"{option!r} is not offered in {box!r}")


def drag_slider(page, to: float) -> None:
    """Drag the page's first slider's thumb with the mouse to ``to`` (0-1) of its track."""
    track = page.locator('[data-testid="stSlider"] [role="group"] > div').first
    thumb = page.locator('[data-testid="stSlider"] input[type="range"]').first.locator("../..")
    t, h = track.bounding_box(), thumb.bounding_box()
    y = h["y"] + h["height"] / 2
    page.mouse.move(h["x"] + h["width"] / 2, y)
    page.mouse.down()
    for k in range(1, 6):
        page.mouse.move(h["x"] + (t["x"] + to * t["width"] - h["x"]) * k / 5, y)
    page.mouse.up()


def test_classroom_demo_walk(app_server, new_page, tmp_path):  # noqa: PLR0915
    url, runs = app_server["url"], app_server["runs"]
    page = new_page()

    # --- Train: the Classroom preset, long enough to be training still when Stop is clicked,
    # without its N=1 baseline
    page.goto(f"{url}/train")  # straight to a page
    page.get_by_role("button", name=START).wait_for()
    nav = page.locator('[data-testid="stSidebarNav"] a')
    nav.filter(has_text=re.compile("Theory")).first.wait_for(timeout=30_000)  # not "theory"
    assert nav.filter(has_text="streamlit app").count() == 0  # navigation, not folder listing
    wait_idle(page)
    box = page.get_by_role("checkbox", name=re.compile(BASELINE))
    if box.is_checked():
        page.get_by_text(BASELINE, exact=False).click()
    assert not box.is_checked()
    page.get_by_role("spinbutton", name="Epochs", exact=True).fill("400")
    before = {p.name for p in runs.iterdir()} if runs.exists() else set()
    before.add(run_in(page.url))
    page.get_by_role("button", name=START).click()
    page.wait_for_url(lambda u: run_in(u) not in before, timeout=60_000)
    name = run_in(page.url)
    toast(page, f"Started {name}").wait_for(timeout=30_000)  # the click is answered at once
    assert "baseline" not in toast(page, f"Started {name}").inner_text()

    # --- the live panel: progress with the time left, then the spectra of every layer
    deadline = time.time() + 120
    while " left" not in (text := progress_text(page)):
        assert time.time() < deadline, f"no time left shown: {text!r}"
        time.sleep(0.5)
    assert re.search(r"step \d+/\d+", text), text
    title = page.locator("text.gtitle", has_text="Singular values of every layer at step")
    first = title.first.text_content(timeout=120_000)
    deadline = time.time() + 90  # the spectra chart follows the run
    while title.first.text_content(timeout=60_000) == first:
        assert time.time() < deadline, f"spectra chart stuck at {first!r}"
        time.sleep(0.5)
    no_errors(page)

    # --- a refresh mid-run: the same run followed, the form as it was started
    page.reload()
    page.get_by_role("heading", name=name).wait_for(timeout=60_000)
    wait_idle(page)
    assert run_in(page.url) == name
    assert not page.get_by_role("checkbox", name=re.compile(BASELINE)).is_checked()
    assert page.get_by_role("spinbutton", name="Epochs", exact=True).input_value() == "400"
    assert page.get_by_text(f"settings of run {name}", exact=False).count() == 1
    assert "running" in progress_text(page)
    no_errors(page)

    # --- a second tab (another session) follows the same run
    other = new_page()
    other.goto(f"{url}/train?run={name}")
    other.get_by_role("heading", name=name).wait_for(timeout=60_000)
    assert "running" in progress_text(other)
    no_errors(other)

    # --- Stop: said at once, then the panel of both tabs says the run stopped
    page.get_by_role("button", name="Stop").click()
    toast(page, "Stop requested").wait_for(timeout=30_000)
    for tab in (page, other):
        tab.get_by_text("on request", exact=False).first.wait_for(timeout=90_000)
        no_errors(tab)
    assert (runs / name / "checkpoints").is_dir()

    # --- Runs: the stopped run in the table
    sidebar(page, "Runs")
    page.locator('[data-testid="stDataFrame"]').first.wait_for(timeout=60_000)
    wait_idle(page)
    no_errors(page)

    # --- Compress: drag the slider, the numbers follow
    sidebar(page, "Compress")
    page.locator("text.gtitle", has_text="Trade-off").first.wait_for(timeout=120_000)
    wait_idle(page)
    assert run_in(page.url) == name
    params = metric_value(page, "Parameters")
    drag_slider(page, 0.15)
    deadline = time.time() + 60
    while metric_value(page, "Parameters") == params:
        assert time.time() < deadline, "dragging the slider did not change the parameters"
        time.sleep(0.3)
    wait_idle(page)
    assert url_value(page) < 0.3, page.url
    no_errors(page)

    # --- Export: the cut model, verified by reloading it, downloaded
    sidebar(page, "Export")
    button = download_button(page, re.escape(f"{name}-global"))
    button.wait_for(timeout=120_000)
    page.get_by_text("identical to the model in memory", exact=False).wait_for(timeout=60_000)
    with page.expect_download() as info:
        button.click()
    path = tmp_path / info.value.suggested_filename
    info.value.save_as(path)
    assert path.suffix == ".safetensors" and path.stat().st_size > 0
    no_errors(page)

    import torch  # the download is the cut model: it loads alone and says where it came from

    import lorita as lt

    meta = lt.read_spec(path)["metadata"]
    assert meta["run"] == name and meta["truncation"]["policy"] == "global"
    assert lt.load(path).eval()(torch.zeros(2, *meta["input_shape"])).shape == (2, 10)

    # --- Delete the run: asked first, then said done
    sidebar(page, "Runs")
    page.locator('[data-testid="stDataFrame"]').first.wait_for(timeout=60_000)
    wait_idle(page)
    pick(page, "Run to delete", name)
    page.get_by_role("button", name="Delete…").click()
    page.get_by_text("cannot be undone", exact=False).wait_for()
    page.get_by_role("button", name="Yes, delete").click()
    toast(page, f"Deleted {name}").wait_for(timeout=30_000)
    assert not (runs / name).exists()
    no_errors(page)


@pytest.fixture(scope="module")
def finished(app_server):
    """A short finished digits run trained in this process straight into the app's runs."""
    from lorita.engine import train
    from lorita.runs import RunStore

    store, name = RunStore(app_server["runs"]), "e2e-demo-walk-n3"
    if not store.exists(name):
        assert train(TINY, store.create(TINY, name=name))["state"] == "completed"
    return name


READY = {  # what each page shows once drawn
    "": "h1",
    "train": f'button:has-text("{START}")',
    "runs": '[data-testid="stDataFrame"]',
    "compress": "text.gtitle >> text=Trade-off",
    "export": '[data-testid="stDownloadButton"]',
    "theory": '[data-testid="stMetric"]',
}


def test_a_phone_wide_window(app_server, new_page, finished):
    """420 px wide: every page draws without an error, and the page itself never scrolls
    sideways (a wide table or formula scrolls in its own box)."""
    page = new_page()
    page.set_viewport_size({"width": 420, "height": 900})
    for path, ready in READY.items():
        page.goto(f"{app_server['url']}/{path}?run={finished}")
        page.locator(ready).first.wait_for(timeout=120_000)
        wait_idle(page)
        wide = page.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
        assert wide[0] <= wide[1], (path, wide)
        no_errors(page)


def focused(page) -> str:
    return page.evaluate(
        "() => { const e = document.activeElement;"
        " return (e.getAttribute('aria-label') || e.innerText || '').trim(); }"
    )


def tab_to(page, label: str, limit: int = 80) -> None:
    """Press Tab until the focused element is labelled ``label``."""
    for _ in range(limit):
        page.keyboard.press("Tab")
        if focused(page).startswith(label):
            return
    raise AssertionError(f"Tab never reached {label!r}")


def test_the_keyboard_alone(app_server, new_page, finished):
    """Tab and the keys alone: untick the baseline, set one epoch, Start (said by a toast), then
    on Compress move the slider with the arrow keys."""
    url, runs = app_server["url"], app_server["runs"]
    page = new_page()
    page.goto(f"{url}/train?run={finished}")
    page.get_by_role("button", name=START).wait_for()
    wait_idle(page)
    tab_to(page, "Epochs")
    page.keyboard.press("Control+a")
    page.keyboard.type("1")
    tab_to(page, BASELINE)
    if page.get_by_role("checkbox", name=re.compile(BASELINE)).is_checked():
        page.keyboard.press("Space")
    assert not page.get_by_role("checkbox", name=re.compile(BASELINE)).is_checked()
    tab_to(page, START)
    page.keyboard.press("Enter")
    page.wait_for_url(lambda u: run_in(u) not in ("", finished), timeout=60_000)
    name = run_in(page.url)
    toast(page, f"Started {name}").wait_for(timeout=30_000)
    deadline = time.time() + 120
    while not (runs / name / "config.json").is_file():
        assert time.time() < deadline, f"run folder {name} never appeared"
        time.sleep(0.2)
    from lorita.runs import RunStore

    assert RunStore(runs).get(name).config["epochs"] == 1
    no_errors(page)

    page.goto(f"{url}/compress?run={finished}")
    page.locator(READY["compress"]).first.wait_for(timeout=120_000)
    page.get_by_text("computed in", exact=False).first.wait_for(timeout=120_000)  # drawn whole
    wait_idle(page)
    slider = page.locator('[data-testid="stSlider"] input[type="range"]').first
    before = slider.input_value()
    tab_to(page, slider.get_attribute("aria-label"))
    page.keyboard.press("ArrowRight")
    moved = f"{float(before) + 0.01:.2f}"
    assert slider.input_value() == moved
    # the page's numbers follow (said by the caption of the cut they were computed for)
    page.get_by_text(f"at {moved}: computed in", exact=False).first.wait_for(timeout=60_000)
    no_errors(page)
