"""A torchvision network trained on a folder of your own images, in a real browser: what only a
browser can do with it (edit a rank in the per-stage tables, download the file that cut)."""

from __future__ import annotations

import numpy as np
import pytest
from e2e_helpers import download_button, no_errors, wait_idle

pytestmark = pytest.mark.e2e

NAME = "own-mnv3"


@pytest.fixture(scope="module")
def own_run(app_server, tmp_path_factory):
    """A finished torchvision:mobilenet_v3_small run (43 layers) on 3 classes of 16 px images,
    trained in this process straight into the app's run store."""
    from PIL import Image

    import lorita as lt
    from lorita.runs import RunStore

    store = RunStore(app_server["runs"])
    if store.exists(NAME):
        return NAME
    images = tmp_path_factory.mktemp("own-images")
    rng = np.random.default_rng(0)
    for k, name in enumerate(("cat", "dog", "owl")):
        (images / name).mkdir()
        for i in range(12):
            pixels = rng.random((20, 20, 3)) * 80 + 60 * k
            Image.fromarray(pixels.astype(np.uint8)).save(images / name / f"{i}.png")
    cfg = lt.TrainConfig(
        dataset=f"folder:{images}", dataset_kwargs={"size": 16},
        model="torchvision:mobilenet_v3_small", epochs=1, spectra_every=0, device="cpu",
    ).to_dict()  # fmt: skip
    assert lt.train(cfg, store.create(cfg, name=NAME))["state"] == "completed"
    return NAME


def _edit_rank(page, table, text: str) -> None:
    """Type ``text`` as the rank of the first row of an st.data_editor rank table (layer, full
    rank, rank: the last column), as a person does: double-click the cell, type, Enter."""
    editor = page.locator("#portal input, #portal textarea").first  # the cell's editor
    for _ in range(3):  # (a grid still being drawn takes no double-click)
        box = table.bounding_box()
        header, row = 35, 35  # Streamlit's grid: the header's and each row's height in px
        page.mouse.dblclick(box["x"] + box["width"] - 60, box["y"] + 14 + header + row / 2)
        try:
            editor.wait_for(timeout=5_000)
            break
        except Exception:  # noqa: BLE001 - playwright's TimeoutError: try again
            page.keyboard.press("Escape")
    editor.wait_for(timeout=5_000)
    editor.fill(text)
    editor.press("Enter")
    wait_idle(page)


def _metric(page, label: str):
    return page.get_by_test_id("stMetric").filter(has=page.get_by_text(label, exact=True))


def test_a_rank_typed_in_a_stage_table_cuts_and_exports(app_server, new_page, own_run, tmp_path):
    """The per-layer table of a deep network, one expander per stage: a rank typed in the
    classifier's table cuts the model (the numbers change), one over the layer's full rank is
    named with the range allowed and can be typed again; the Export page then writes that cut,
    and the downloaded file loads into torchvision's own architecture with the rank typed."""
    import torch
    import torchvision

    import lorita as lt

    page = new_page()
    page.set_viewport_size({"width": 1400, "height": 1600})  # the last stage's table on screen
    page.goto(f"{app_server['url']}/compress?run={own_run}&policy=ranks")
    params = _metric(page, "Parameters")
    params.wait_for(timeout=120_000)
    assert "100.0 % of original" in params.inner_text()
    stage = page.get_by_test_id("stExpander").filter(has_text="stage classifier")
    stage.get_by_text("stage classifier").click()
    table = stage.get_by_test_id("stDataFrame")
    table.wait_for()
    wait_idle(page)

    _edit_rank(page, table, "9999")
    errors = page.locator('[data-testid="stAlertContentError"]')
    errors.first.wait_for()
    assert "classifier.0" in errors.first.inner_text() and "576" in errors.first.inner_text()
    _edit_rank(page, table, "10")
    params.wait_for()
    assert errors.count() == 0
    kept = params.inner_text()
    assert "100.0 % of original" not in kept, kept
    no_errors(page)

    page.get_by_role("link", name="Export this model").click()
    model = page.get_by_role("radiogroup", name="Model")
    model.wait_for(timeout=120_000)
    assert model.get_by_role("radio", name="Compressed", exact=False).is_checked()
    button = download_button(page, "safetensors")
    button.wait_for(timeout=120_000)
    with page.expect_download() as info:
        button.click()
    path = tmp_path / info.value.suggested_filename
    info.value.save_as(path)
    net = lt.load(path, model=torchvision.models.mobilenet_v3_small(num_classes=3)).eval()
    with torch.no_grad():
        weight = net.get_submodule("classifier.0").weight  # (1024, 576): thin or dense, rank 10
        assert int(torch.linalg.matrix_rank(weight)) == 10
    with torch.no_grad():
        assert net(torch.rand(2, 3, 16, 16)).shape == (2, 3)
    no_errors(page)
