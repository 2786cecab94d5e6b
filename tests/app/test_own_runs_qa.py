"""The app as a person uses it with a model and images of their own: a torchvision network
trained on a folder of images (3 classes), shown on the Compress, Export and Runs pages; the
folder moved or its classes changed after training; bad folders typed on the Train page; and
addresses nobody picked for such a run."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from app_seed import assert_clean, open_page

import lorita as lt
from lorita.runs import RunStore

CLASSES = ("cat", "dog", "owl")
MOBILE = "mnv3"  # a torchvision:mobilenet_v3_small run on the folder (43 layers)
START = "FormSubmitter:train.form-Start training"


def _images(root: Path, classes=CLASSES, n: int = 12, side: int = 20) -> Path:
    """One sub-folder of ``n`` small PNG images per class, each class a brightness of its own."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = rng.random((side, side, 3)) * 80 + 60 * k
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i}.png")
    return root


def _train(runs: Path, name: str, dataset: str, **config):
    cfg = lt.TrainConfig(dataset=dataset, epochs=1, spectra_every=0, device="cpu",
                         **config).to_dict()  # fmt: skip
    run = RunStore(runs).create(cfg, name=name)
    assert lt.train(cfg, run)["state"] == "completed"
    return run


@pytest.fixture(scope="module")
def own_store(tmp_path_factory) -> dict:
    """A runs folder holding a finished torchvision:mobilenet_v3_small run trained on a folder of
    images (16 px), and the folder (kept in place: tests that change a folder make their own)."""
    base = tmp_path_factory.mktemp("own")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORITA_DATA", str(base / "data"))
        images = _images(base / "images")
        _train(base / "runs", MOBILE, f"folder:{images}", model="torchvision:mobilenet_v3_small",
               dataset_kwargs={"size": 16})  # fmt: skip
    return {"runs": base / "runs", "images": images, "data": base / "data"}


@pytest.fixture
def own_runs(own_store, monkeypatch) -> Path:
    """The own-model store as $LORITA_RUNS, shared by the tests that only read it (a page's
    compress session and trade-off curve are then made once)."""
    monkeypatch.setenv("LORITA_RUNS", str(own_store["runs"]))
    monkeypatch.setenv("LORITA_DATA", str(own_store["data"]))
    return own_store["runs"]


@pytest.fixture
def own_runs_copy(own_store, tmp_path, monkeypatch) -> Path:
    """A private copy of the own-model store as $LORITA_RUNS (the test deletes runs in it)."""
    root = tmp_path / "runs"
    shutil.copytree(own_store["runs"], root, ignore=shutil.ignore_patterns(".slots"))
    monkeypatch.setenv("LORITA_RUNS", str(root))
    monkeypatch.setenv("LORITA_DATA", str(own_store["data"]))
    return root


@pytest.fixture
def folder_run(empty_runs, tmp_path, monkeypatch):
    """(image folder, finished run) of a tiny MLP on 3 classes of 8 px images, both the test's
    own (the folder may be moved or changed)."""
    monkeypatch.setenv("LORITA_DATA", str(tmp_path / "data"))
    images = _images(tmp_path / "pics", n=6, side=8)
    run = _train(empty_runs, "pics", f"folder:{images}", dataset_kwargs={"size": 8},
                 model_kwargs={"width": 8})  # fmt: skip
    return images, run


def _downloads(monkeypatch) -> dict[str, bytes]:
    """The bytes of every file a page offers for download while the test runs, by file name."""
    from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage

    got: dict[str, bytes] = {}
    keep = MemoryMediaFileStorage.load_and_get_id

    def record(self, path_or_data, mimetype, kind, filename=None):
        if filename and isinstance(path_or_data, bytes):
            got[filename] = path_or_data
        return keep(self, path_or_data, mimetype, kind, filename)

    monkeypatch.setattr(MemoryMediaFileStorage, "load_and_get_id", record)
    return got


def _said(at) -> str:
    return " | ".join(
        str(e.value) for kind in ("error", "warning", "info") for e in getattr(at, kind)
    )


# --- a torchvision network on your own images ----------------------------------------------------


def test_compress_a_torchvision_run_on_own_images(own_runs):
    """Its 43 layers: the spectra chart shows a pick of them (every layer the cut reaches can be
    picked), the ranks kept are one row per stage that adds up to every layer, a slider move cuts more,
    and the per-layer rank policy puts the table in one expander per stage."""
    from app import live

    at = open_page("compress", run=MOBILE)
    assert_clean(at)
    (pick,) = at.multiselect
    assert len(pick.options) > live.MAX_LAYERS_SHOWN >= len(pick.value) > 0
    (kept,) = [df.value for df in at.dataframe if "stage" in df.value.columns]
    assert len(kept) <= live.MAX_LAYERS_SHOWN
    assert kept["layers"].sum() == len(pick.options) + 1  # and the head, left whole
    params = {m.label: m.value for m in at.metric}["Parameters"]
    at.slider(key="compress.value.global").set_value(0.1).run()
    assert_clean(at)
    assert {m.label: m.value for m in at.metric}["Parameters"] != params
    assert at.query_params["value"] == "0.1"
    at.multiselect(key=pick.key).set_value(pick.options[-2:]).run()  # the deepest two
    assert_clean(at)

    at = open_page("compress", run=MOBILE, policy="ranks")
    assert_clean(at)
    stages = [e.label for e in at.expander if e.label.startswith("stage ")]
    assert 1 < len(stages) <= live.MAX_LAYERS_SHOWN, stages


def test_export_a_torchvision_run_in_every_format_loads_back(own_runs, tmp_path, monkeypatch):
    """Each format's download is a file that loads back to the model the run trained: the
    safetensors into torchvision's own architecture (``lt.load(path, model=...)``), ONNX in
    onnxruntime; the cut as much as the model as trained."""
    import torchvision

    got = _downloads(monkeypatch)
    at = open_page("compress", run=MOBILE)
    at.slider(key="compress.value.global").set_value(0.3).run()
    at.switch_page("pages/export.py").run()
    assert_clean(at)
    assert at.radio(key="export.model").value == "compressed"
    for fmt in ("low_rank", "dense", "onnx"):
        at.radio(key="export.format").set_value(fmt).run()
        assert_clean(at)
        assert any("Reloaded from the file" in s.value for s in at.success), fmt
    at.radio(key="export.model").set_value("full").run()
    at.radio(key="export.format").set_value("low_rank").run()
    assert_clean(at)
    want = {f"{MOBILE}-global0.30-{f}.safetensors" for f in ("lowrank", "dense")}
    want |= {f"{MOBILE}-global0.30.onnx", f"{MOBILE}-lowrank.safetensors"}
    assert want <= set(got), sorted(got)
    x = torch.rand(2, 3, 16, 16)
    trained = lt.merge_model(RunStore(own_runs).get(MOBILE).load_model("best")).eval()
    outputs = {}
    for name, data in got.items():
        path = tmp_path / name
        path.write_bytes(data)
        if name.endswith(".onnx"):
            ort = pytest.importorskip("onnxruntime")
            sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            outputs[name] = torch.from_numpy(
                sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
            )
            continue
        net = lt.load(path, model=torchvision.models.mobilenet_v3_small(num_classes=3)).eval()
        with torch.no_grad():
            outputs[name] = net(x)
        assert outputs[name].shape == (2, 3)
    with torch.no_grad():
        torch.testing.assert_close(outputs[f"{MOBILE}-lowrank.safetensors"], trained(x),
                                   rtol=1e-4, atol=1e-5)  # fmt: skip
    cut = outputs[f"{MOBILE}-global0.30-lowrank.safetensors"]
    for other in (f"{MOBILE}-global0.30-dense.safetensors", f"{MOBILE}-global0.30.onnx"):
        torch.testing.assert_close(outputs[other], cut, rtol=1e-3, atol=1e-4)


def test_runs_page_lists_and_deletes_a_torchvision_run(own_runs_copy):
    at = open_page("runs")
    assert_clean(at)
    table = at.dataframe[0].value
    (row,) = table[table["run"] == MOBILE].to_dict("records")
    assert row["model"] == "torchvision:mobilenet_v3_small" and row["dataset"].startswith("folder:")
    assert at.multiselect(key="runs.pick").value == [MOBILE]
    at.selectbox(key="runs.delete").set_value(MOBILE).run()
    at.button(key="runs.delete_ask").click().run()
    at.button(key="runs.delete_yes").click().run()
    assert_clean(at)
    assert not (own_runs_copy / MOBILE).exists()
    assert any("No runs yet" in i.value for i in at.info)


def test_a_timm_run_on_own_images_on_every_page(own_store, empty_runs, tmp_path, monkeypatch):
    """timm (when installed): a small ViT on the folder. The Train page following it shows the
    timm family, the model and its options; Compress cuts it; Export writes a file that loads
    into timm's own architecture and gives the model's outputs."""
    timm = pytest.importorskip("timm")
    monkeypatch.setenv("LORITA_DATA", str(own_store["data"]))
    options = {"img_size": 16, "patch_size": 4}
    _train(empty_runs, "vit", f"folder:{own_store['images']}", model="timm:test_vit",
           model_kwargs=options, dataset_kwargs={"size": 16})  # fmt: skip
    at = open_page("train", run="vit")
    assert_clean(at)
    assert at.selectbox(key="train.family.classroom.vit").value == "timm"
    assert at.selectbox(key="train.model.classroom.vit.timm").value == "timm:test_vit"
    assert (
        at.text_input(key="train.model_kwargs.classroom.vit").value == "img_size=16, patch_size=4"
    )

    got = _downloads(monkeypatch)
    at = open_page("compress", run="vit")
    assert_clean(at)
    at.slider(key="compress.value.global").set_value(0.3).run()
    assert_clean(at)
    at.switch_page("pages/export.py").run()
    assert_clean(at)
    (name,) = [n for n in got if n.endswith(".safetensors")]
    path = tmp_path / name
    path.write_bytes(got[name])
    net = lt.load(path, model=timm.create_model("test_vit", num_classes=3, **options)).eval()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(net(x), lt.load(path).eval()(x))
        assert net(x).shape == (2, 3)


# --- the folder moved, or its classes changed, after training -----------------------------------


def test_compress_a_run_whose_images_were_moved_says_so_and_points_to_export(folder_run, tmp_path):
    """The images moved after training: the Compress page says which folder is gone, that cutting
    needs it back and that the Export page still writes the run as trained, as a warning (it
    showed the dataset's raw error, telling the user to make a folder of images); the Export
    page refreshed on a cut (its address names one) offers the run as trained (it showed that
    error too)."""
    images, _ = folder_run
    images.rename(tmp_path / "elsewhere")
    at = open_page("compress", run="pics")
    assert not at.exception and not at.error, _said(at)
    (warning,) = [w.value for w in at.warning]
    assert str(images) in warning and "does not exist" in warning
    assert "put the images back" in warning and "Export page" in warning
    at = open_page("export", run="pics", policy="global", value="0.5")
    assert not at.exception and not at.error, _said(at)
    assert any("as trained" in w.value for w in at.warning), _said(at)
    assert at.get("download_button")


@pytest.mark.parametrize("change", ["added", "removed", "renamed"])
def test_a_run_whose_class_folders_changed_is_not_scored_against_other_labels(folder_run, change):
    """A class folder added, removed or renamed after training: the model's outputs are the
    classes it trained on, in their order, so the folder's labels now mean other classes. The
    compress session refuses (naming both class lists), the Compress page says so and the Export
    page offers the run as trained (before: a class added failed with 'build it with
    num_classes=', one removed or renamed was scored against the wrong labels)."""
    from lorita.data import DatasetUnavailable

    images, run = folder_run
    if change == "added":
        shutil.copytree(images / "owl", images / "zebra")
    elif change == "removed":
        shutil.rmtree(images / "dog")
    else:
        (images / "dog").rename(images / "wolf")
    with pytest.raises(DatasetUnavailable, match=r"classes .*cat, dog, owl") as info:
        lt.Compressor(run)
    assert "pics" in str(info.value) and "put the class folders back" in str(info.value)
    at = open_page("compress", run="pics")
    assert not at.exception and not at.error, _said(at)
    assert any("cat, dog, owl" in w.value for w in at.warning), _said(at)
    at = open_page("export", run="pics")
    assert not at.exception and not at.error, _said(at)
    assert any("as trained" in w.value for w in at.warning), _said(at)
    assert at.get("download_button")


def test_a_run_whose_folder_holds_the_same_classes_again_compresses(folder_run):
    """Images added to the classes it has (no class changed): scored, with the note that the
    folder changed (the class check refuses only other classes)."""
    from PIL import Image

    images, run = folder_run
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(images / "cat" / "new.png")
    with pytest.warns(UserWarning, match="the folder changed"):
        session = lt.Compressor(run)
    assert session.base["val_acc"] is not None


# --- the Train page with folders that cannot be trained on ------------------------------------


def _bad_folder(tmp_path: Path, kind: str) -> tuple[Path, str]:
    """(a path typed in the image folder box, what the error must say)."""
    from PIL import Image

    root = tmp_path / kind
    if kind == "a file":
        root.write_text("not a folder")
        return root, "is not a folder"
    root.mkdir()
    if kind == "no class folders":
        return root, "has no class folders"
    if kind == "one class":
        (root / "a").mkdir()
        Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(root / "a" / "0.png")
        return root, "only one class folder"
    for c in "ab":
        (root / c).mkdir()
        if kind == "no images":
            (root / c / "notes.txt").write_text("x")
        else:  # an unreadable image
            (root / c / "0.png").write_bytes(b"not a png")
    return root, "no images" if kind == "no images" else "is not a readable image"


@pytest.mark.parametrize(
    "kind", ["a file", "no class folders", "one class", "no images", "an unreadable image"]
)
def test_train_a_folder_that_cannot_be_trained_on_is_named(empty_runs, tmp_path, kind, monkeypatch):
    """With a torchvision model picked: one error naming the dataset and the folder, what is
    wrong with it, no traceback, nothing started."""
    from app import jobs

    monkeypatch.setenv("LORITA_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(jobs, "start_pair", lambda c, b: pytest.fail("started"))
    path, said = _bad_folder(tmp_path, kind)
    at = open_page("train")
    at.selectbox(key="train.family.classroom").set_value("torchvision").run()
    at.selectbox(key="train.model.classroom.torchvision").set_value("torchvision:resnet18")
    at.selectbox(key="train.dataset.classroom").set_value("folder")
    at.text_input(key="train.dataset_path.classroom").set_value(str(path))
    at.button(key=START).click().run()
    assert not at.exception
    (error,) = [e.value for e in at.error]
    assert error.startswith("Cannot start: dataset 'folder:") and said in error, error
    assert str(path) in error and "Traceback" not in error
    assert not any(p.name[0] != "." for p in empty_runs.iterdir())


# --- addresses nobody picked -----------------------------------------------------------------


@pytest.mark.parametrize("page", ["compress", "export"])
def test_a_hand_edited_address_for_a_torchvision_run_falls_back(own_runs, page):
    """A checkpoint, policy, slider value and format no page writes: the page opens the run
    with its own defaults, says nothing alarming and keeps the address true to what it shows."""
    at = open_page(page, run=MOBILE, which="../../etc", policy="ranks\x00", value="1e999",
                   format="<b>x</b>", compare="yes")  # fmt: skip
    assert_clean(at)
    assert at.query_params["run"] == MOBILE and at.query_params["which"] == "best"
    if page == "compress":
        assert at.query_params["policy"] == "global" and at.query_params["value"] == "0.5"
    else:
        assert at.query_params["format"] == "low_rank" and at.get("download_button")


def test_train_with_the_image_folder_box_left_empty_names_the_box(empty_runs, monkeypatch):
    """``folder`` chosen and its box left empty: one error, naming the box the user sees
    (not the config's ``folder:`` text), nothing started."""
    from app import jobs

    monkeypatch.setattr(jobs, "start_pair", lambda c, b: pytest.fail("started"))
    at = open_page("train")
    at.selectbox(key="train.dataset.classroom").set_value("folder")
    at.text_input(key="train.dataset_path.classroom").set_value("  ")
    at.button(key=START).click().run()
    assert not at.exception
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and "image folder" in errors[0].lower(), errors
    assert "folder:'" not in errors[0] and "one sub-folder" in errors[0], errors
    assert not any(p.name[0] != "." for p in empty_runs.iterdir())


def test_a_link_naming_a_model_of_another_family_shows_no_preset_options(empty_runs):
    """``/train?model=torchvision:resnet18`` (no options in the link): the ResNet's options box
    is empty, not the preset MLP's width, which Start would only drop."""
    at = open_page("train", model="torchvision:resnet18")
    assert_clean(at)
    assert at.selectbox(key="train.family.classroom").value == "torchvision"
    boxes = [t for t in at.text_input if t.key.startswith("train.model_kwargs")]
    assert [t.value for t in boxes] == [""], [(t.key, t.value) for t in boxes]
