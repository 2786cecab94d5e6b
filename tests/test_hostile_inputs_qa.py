"""Hostile and broken inputs that cross a trust boundary, a second pass: starting weights whose
tensors declare far more values than the file stores, safetensors headers whose offsets or
metadata lie, model options that would make timm read another file, image folders holding a
pipe or a large 16-bit image, and a run whose checkpoint is not a file. Each is refused with one
line naming the file and the field (or read within bounded memory), never a traceback."""

from __future__ import annotations

import json
import os
import struct
import tracemalloc
import zipfile

import numpy as np
import pytest
import torch

import lorita as lt
from lorita.cli import main
from lorita.data import DatasetUnavailable, load_dataset
from lorita.engine.build import read_weights


@pytest.fixture(autouse=True)
def _folders(tmp_path, monkeypatch):
    monkeypatch.setenv("LORITA_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("LORITA_RUNS", str(tmp_path / "runs"))


def _one_line_error(capsys, argv, *needles) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lorita: error:") and "\n" not in err and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


# --------------------------------------------------------------------------- starting weights


def _expanded_pt(path) -> None:
    """A torch.save file whose one tensor is a (2**20, 2**20) view with strides (0, 0) of a
    4-value storage: 16 bytes in the file, 4 TB once anything copies it."""
    plain = path.with_suffix(".plain")
    torch.save({"w": torch.zeros(4)}, plain)
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("data.pkl"):
                old = b"K\x04tq\x07QK\x00K\x04\x85q\x08K\x01\x85"  # size (4,), stride (1,)
                assert old in data
                big = b"J" + struct.pack("<i", 2**20)
                data = data.replace(
                    old, b"K\x04tq\x07QK\x00" + big + big + b"\x86q\x08K\x00K\x00\x86"
                )
            dst.writestr(info, data)


def test_a_tensor_expanded_from_a_few_stored_values_is_refused_before_any_copy(tmp_path, capsys):
    """read_weights checked every value for NaN, which made the 4 TB tensor: a RuntimeError
    from the allocator, a traceback on the command line and its text on the Train page."""
    bad = tmp_path / "expanded.pt"
    _expanded_pt(bad)
    with pytest.raises(ValueError, match=r"init_from: 'w' in .* declares 1099511627776 values "
                       r"where the file stores 4 .*\.contiguous\(\)"):  # fmt: skip
        read_weights(bad)
    net = lt.create_model("mlp", in_channels=1, image_size=8, num_classes=10, width=8)
    with pytest.raises(ValueError, match="declares 1099511627776 values"):
        read_weights(bad, net)
    torch.save({"a": torch.arange(6.0)[1:4], "b": torch.ones(3, 4)[:, 1]}, tmp_path / "views.pt")
    got = read_weights(tmp_path / "views.pt")  # views of a larger storage are stored values
    assert got["a"].tolist() == [1.0, 2.0, 3.0] and got["b"].tolist() == [1.0] * 3
    argv = ["train", "--dataset", "digits", "--model", "mlp", "--epochs", "1",
            "--init-from", str(bad)]  # fmt: skip
    _one_line_error(capsys, argv, "init_from:", "declares 1099511627776 values")


# --------------------------------------------------------------------------- safetensors headers


def _parts(path):
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _write(path, header, body) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + body)


def _edited(tmp_path, name, edit, body_edit=None):
    """A copy of a file written by lorita.save, its header changed by ``edit``."""
    src = tmp_path / "good.safetensors"
    if not src.exists():
        net = lt.create_model("mlp", in_channels=1, image_size=4, num_classes=3, width=8)
        lt.save(net, src)
    header, body = _parts(src)
    edit(header)
    out = tmp_path / name
    _write(out, header, body if body_edit is None else body_edit(body))
    return out


def _tensors(header):
    return sorted(
        (k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"]
    )


def _overlap(h):
    a, b = [k for k in _tensors(h) if h[k]["shape"] == [8]][:2]
    h[b]["data_offsets"] = list(h[a]["data_offsets"])


def _gap(h):
    for k in _tensors(h):
        h[k]["data_offsets"] = [o + 4 for o in h[k]["data_offsets"]]


@pytest.mark.parametrize(
    ("case", "edit", "body_edit", "field"),
    [
        ("overlap", _overlap, None, r"data_offsets: overlap the tensor before"),
        ("gap", _gap, lambda b: b"\0" * 4 + b, r"data_offsets: leave a gap"),
        ("trailing", lambda h: None, lambda b: b + b"\0" * 8, r"header: the tensors fill \d+ bytes"),
        ("meta int", lambda h: h["__metadata__"].update(x=5), None,
         r"header\.__metadata__\.x: expected text, got int"),
        ("meta list", lambda h: h["__metadata__"].update(x=[1]), None,
         r"header\.__metadata__\.x: expected text, got list"),
        ("meta text", lambda h: h.update(__metadata__="x"), None,
         r"header\.__metadata__: expected an object of texts, got str"),
    ],
)  # fmt: skip
def test_header_offsets_and_metadata_that_lie_are_named_alike_by_every_reader(
    tmp_path, case, edit, body_edit, field
):
    """read_spec took such a file (only load failed, with the parser's message cut mid-word:
    'expected a string at line 1 column )'); --init-from named the parser's words."""
    path = _edited(tmp_path, case.replace(" ", "_") + ".safetensors", edit, body_edit)
    for read in (lt.read_spec, lt.load):
        with pytest.raises(ValueError, match=rf"^path '.*{path.name}': .*{field}"):
            read(path)
    with pytest.raises(ValueError, match=rf"^data: .*{field}"):
        lt.load_bytes(path.read_bytes())
    with pytest.raises(ValueError, match=rf"^init_from: '.*{path.name}': .*{field}"):
        read_weights(path)


def test_a_plain_safetensors_start_file_with_non_text_metadata_names_the_field(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, p)
    header, body = _parts(p)
    header["__metadata__"] = {"epoch": 3}
    _write(p, header, body)
    with pytest.raises(ValueError, match=r"^init_from: '.*plain.safetensors': header\.__metadata__"
                       r"\.epoch: expected text, got int$"):  # fmt: skip
        read_weights(p)
    save_file({"w": torch.zeros(2)}, p, metadata={"epoch": "3"})
    assert read_weights(p)["w"].shape == (2,)


# --------------------------------------------------------------------------- model options


def test_timm_keywords_that_read_another_file_are_refused(tmp_path):
    """A spec (or --model-arg) with checkpoint_path made timm read any file it named while
    the model was built (a file reading another file at a path inside it)."""
    pytest.importorskip("timm")
    named = tmp_path / "other.pt"
    torch.save({"w": torch.zeros(2)}, named)
    for key in ("checkpoint_path", "pretrained_cfg", "cache_dir"):
        with pytest.raises(ValueError, match=rf"model options: {key} would make timm read"):
            lt.create_model("timm:resnet18", num_classes=10, **{key: str(named)})


# --------------------------------------------------------------------------- image folders


def _folder(root, per_class=3):
    from PIL import Image

    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            rgb = np.random.default_rng(i).integers(0, 255, (12, 12, 3), dtype=np.uint8)
            Image.fromarray(rgb).save(root / c / f"{i}.png")
    return root


def test_a_pipe_or_a_device_among_the_images_is_named_as_such(tmp_path):
    root = _folder(tmp_path / "imgs")
    os.mkfifo(root / "a" / "pipe.png")
    with pytest.raises(DatasetUnavailable, match=r"pipe\.png is not a regular file \(a pipe"):
        load_dataset(f"folder:{root}", size=8)
    (root / "a" / "pipe.png").unlink()
    (root / "a" / "zero.png").symlink_to("/dev/zero")
    with pytest.raises(DatasetUnavailable, match=r"zero\.png is not a regular file"):
        load_dataset(f"folder:{root}", size=8)
    (root / "a" / "zero.png").unlink()
    (root / "a" / "gone.png").symlink_to(root / "nowhere.png")
    with pytest.raises(DatasetUnavailable, match=r"gone\.png is a broken link"):
        load_dataset(f"folder:{root}", size=8)


def _old_to_8bit(a: np.ndarray, mode: str) -> np.ndarray:
    """The scaling as it was written before it went band by band (the reference)."""
    a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if mode.startswith("I;16"):
        a = a / 257
    elif mode == "I":
        a = a / 257 if hi <= 65535 else a * (255 / hi)
    elif lo >= 0 and hi <= 1:
        a = a * 255
    else:
        a = (a - lo) * (255 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def test_deep_images_are_scaled_to_8_bits_band_by_band_as_before(tmp_path):
    """A 16-bit grey image (a PNG of a few KB can hold 144 million pixels, under Pillow's
    limit) was copied whole in float64 several times: 4 GB of address space was not enough.
    Now no copy of the whole image is made beyond its 8-bit result; the values are the same."""
    from PIL import Image

    from lorita.data import _to_8bit

    rng = np.random.default_rng(0)
    cases = [
        (rng.integers(0, 65535, (700, 1500), dtype=np.uint16), "I;16"),
        (rng.integers(-5, 70000, (300, 900), dtype=np.int32), "I"),
        (rng.integers(0, 65535, (30, 40), dtype=np.int32), "I"),
        (rng.random((600, 500), dtype=np.float32), "F"),
        (rng.normal(0, 50, (40, 30)).astype(np.float32), "F"),
    ]
    nan = rng.normal(0, 1, (20, 20)).astype(np.float32)
    nan[3, 4], nan[5, 6] = np.nan, np.inf
    cases.append((nan, "F"))
    for a, mode in cases:
        im = Image.fromarray(a)
        assert im.mode == mode
        np.testing.assert_array_equal(np.asarray(_to_8bit(im)), _old_to_8bit(a, mode))
    big = Image.fromarray(rng.integers(0, 65535, (2000, 2000), dtype=np.uint16))
    tracemalloc.start()
    _to_8bit(big)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2000 * 2000 * 4, f"{peak / 2**20:.0f} MB"  # (was over 100 MB)


def test_a_grey_image_made_rgb_after_its_resize_gives_the_same_pixels(tmp_path):
    from PIL import Image, ImageOps

    from lorita.data import _read_image

    a = np.random.default_rng(1).integers(0, 255, (53, 37), dtype=np.uint8)
    Image.fromarray(a, "L").save(tmp_path / "g.png")
    ref = ImageOps.fit(Image.fromarray(a, "L").convert("RGB"), (16, 16), Image.Resampling.BILINEAR)
    got = _read_image("folder:x", tmp_path / "g.png", 16, 3)
    np.testing.assert_array_equal(got, np.asarray(ref).transpose(2, 0, 1))


def test_an_image_too_large_for_the_memory_left_says_so(tmp_path, monkeypatch):
    """A MemoryError has no text: the message ended in '(MemoryError: )'."""
    from lorita import data

    root = _folder(tmp_path / "imgs")

    def no_memory(im):
        raise MemoryError

    monkeypatch.setattr(data, "_to_8bit", no_memory)
    with pytest.raises(DatasetUnavailable, match=r"0\.png is not a readable image \(MemoryError: "
                       r"too large to decode here\)"):  # fmt: skip
        load_dataset(f"folder:{root}", size=8)


# --------------------------------------------------------------------------- run folders


def test_a_checkpoint_that_is_a_folder_or_a_pipe_is_named_on_the_command_line(tmp_path, capsys):
    """It said the run 'wrote none'; a pipe is never opened (a reader would wait forever)."""
    from lorita.runs import RunStore

    store = RunStore(tmp_path / "runs")
    run = store.create({"dataset": "digits", "model": "mlp", "n_factors": 3}, name="r")
    run.update_status(state="completed")
    run.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    run.checkpoint("best").mkdir()
    out = str(tmp_path / "m.safetensors")
    _one_line_error(capsys, ["export", "r", "--out", out], "best.safetensors is a folder")
    run.checkpoint("best").rmdir()
    os.mkfifo(run.checkpoint("best"))
    for argv in (["export", "r", "--out", out], ["compress", "r", "--global", "0.5"]):
        _one_line_error(capsys, argv, "a pipe or a device, not a model file", "--resume r")


# --------------------------------------------------------------------------- the app


def test_the_train_page_names_an_expanded_start_file_and_starts_nothing(tmp_path, monkeypatch):
    """The page showed the allocator's 'RuntimeError: [enforce fail at alloc_cpu.cpp:127]'."""
    from streamlit.testing.v1 import AppTest

    from app import jobs

    started = []
    monkeypatch.setattr(jobs, "start_pair", lambda c, b: started.append(c) or ("x", None))
    bad = tmp_path / "expanded.pt"
    _expanded_pt(bad)
    (tmp_path / "runs").mkdir()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    at = AppTest.from_file(os.path.join(root, "streamlit_app.py"), default_timeout=300).run()
    at.switch_page("pages/train.py").run()
    at.file_uploader(key="train.init_from.classroom").set_value(
        ("expanded.pt", bad.read_bytes(), "application/octet-stream")
    )
    at.button(key="FormSubmitter:train.form-Start training").click().run()
    assert not at.exception
    (error,) = [e.value for e in at.error]
    assert error.startswith("Cannot start: init_from: 'w' in 'expanded.pt' declares"), error
    assert not started
