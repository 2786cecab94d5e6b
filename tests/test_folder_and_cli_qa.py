"""Hostile and unusual inputs to ``folder:PATH`` datasets and the command line: each is either
used as meant or refused with one line naming the field or file (found by a QA pass)."""

import os
import pwd
import sys
import warnings

import numpy as np
import pytest

from lorita.cli import main
from lorita.data import DatasetUnavailable, check_dataset, load_dataset

NO_USER = "lorita_qa_no_such_user"


@pytest.fixture(autouse=True)
def _data_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("LORITA_DATA", str(tmp_path / "data"))
    monkeypatch.delenv("LORITA_RUNS", raising=False)


def _image(path, mode="RGB", side=12, **save):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(len(str(path))).integers(0, 255, (side, side, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert(mode).save(path, **save)
    return path


def _folder(root, classes=("a", "b"), per_class=3):
    for c in classes:
        for i in range(per_class):
            _image(root / c / f"{i}.png")
    return root


def _one_line_error(capsys, argv, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lorita: error:") and "\n" not in err, err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err
    return err


def test_many_image_modes_and_extensions_load_without_warnings(tmp_path):
    """Grey, RGBA, LA, 1-bit, palette (with transparency), CMYK JPEG, animated GIF, WebP,
    BMP, TIFF, upper-case extensions and a nested sub-folder: all decoded, none warns."""
    from PIL import Image

    root = _folder(tmp_path / "imgs", per_class=1)
    for c in ("a", "b"):
        d = root / c
        for mode, name in [("L", "g.png"), ("RGBA", "r.png"), ("LA", "la.png"), ("1", "b.png"),
                           ("CMYK", "c.jpg"), ("RGB", "w.webp"), ("RGB", "x.BMP"),
                           ("RGB", "t.tiff"), ("RGB", "UP.JPG"), ("RGB", "sub/n.png")]:  # fmt: skip
            _image(d / name, mode)
        pal = Image.new("P", (12, 12))
        pal.putpalette(list(range(256)) * 3)
        pal.save(d / "p.png", transparency=bytes([0] * 10 + [255] * 246))
        frames = [Image.new("RGB", (12, 12), (80 * i, 0, 0)) for i in range(3)]
        frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's palette warning names no file
        s = load_dataset(f"folder:{root}", size=8)
    assert len(s.train) + len(s.val) + len(s.test) == 2 * 13


def test_pillow_warnings_about_an_image_name_the_file(tmp_path, monkeypatch):
    from PIL import Image

    root = _folder(tmp_path / "imgs")
    big = _image(root / "a" / "big.png", side=16)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)  # 256 pixels: warned, not refused
    with pytest.warns(Image.DecompressionBombWarning) as caught:
        check_dataset(f"folder:{root}")
    assert all(str(big) in str(w.message) for w in caught)


@pytest.mark.skipif(sys.platform != "linux", reason="file names as raw bytes")
def test_names_that_are_not_utf8(tmp_path):
    """A file name that is not UTF-8 is read; a class folder or the folder itself is refused
    by name (both are kept in JSON files)."""
    root = _folder(tmp_path / "imgs")
    raw = os.fsencode(root / "a") + b"/odd\xff.png"
    os.rename(os.fsencode(root / "a" / "0.png"), raw)
    s = load_dataset(f"folder:{root}", size=8)
    assert len(s.train) + len(s.val) + len(s.test) == 6
    os.rename(os.fsencode(root / "b"), os.fsencode(root) + b"/cl\xfeass")
    with pytest.raises(DatasetUnavailable, match="class folder .* is not valid UTF-8"):
        check_dataset(f"folder:{root}")
    with pytest.raises(ValueError, match="folder path .* is not valid UTF-8"):
        check_dataset("folder:" + os.fsdecode(os.fsencode(tmp_path) + b"/x\xff"))


def _no_such_user() -> None:
    try:
        pwd.getpwnam(NO_USER)
    except KeyError:
        return
    pytest.skip(f"user {NO_USER} exists")


def test_an_unknown_home_is_one_line_not_a_traceback(tmp_path, capsys, monkeypatch):
    _no_such_user()
    bad = f"~{NO_USER}/x"
    runs = ["--runs-dir", str(tmp_path / "runs")]
    for argv in (
        ["runs", "--runs-dir", bad],
        ["train", *runs, "--dataset", f"folder:{bad}"],
        ["train", *runs, "--init-from", bad],
        ["train", *runs, "--data-dir", bad],
        ["train", "--config", bad],
        ["export", "r", *runs, "--out", bad + ".safetensors"],
    ):
        _one_line_error(capsys, argv, f"'~{NO_USER}'", "no known user")
    monkeypatch.setenv("LORITA_RUNS", bad)
    _one_line_error(capsys, ["runs"], "LORITA_RUNS", "no known user")
    monkeypatch.delenv("LORITA_RUNS")
    monkeypatch.setenv("LORITA_DATA", bad)
    _one_line_error(capsys, ["train", *runs], "LORITA_DATA", "no known user")
    assert not (tmp_path / "runs").exists()


def test_a_model_option_only_its_forward_refuses_is_named_before_a_run(tmp_path, capsys):
    """timm checks drop_rate only in the forward pass: the preflight names the option rather
    than leaving a failed run whose message names nothing."""
    pytest.importorskip("timm")
    root = _folder(tmp_path / "imgs")
    runs = tmp_path / "runs"
    argv = ["train", "--runs-dir", str(runs), "--dataset", f"folder:{root}", "--data-arg",
            "size=16", "--epochs", "1", "--model", "timm:resnet18", "--model-arg",
            "drop_rate=1.5"]  # fmt: skip
    _one_line_error(capsys, argv, "model_kwargs", "['drop_rate']", "default")
    assert not runs.exists() or not any(runs.iterdir())


def test_an_init_from_file_with_no_tensors_says_so(tmp_path):
    import torch
    from safetensors.torch import save_file

    from lorita.engine.build import read_weights

    save_file({}, tmp_path / "empty.safetensors")
    torch.save({}, tmp_path / "empty.pt")
    for f in ("empty.safetensors", "empty.pt"):
        with pytest.raises(ValueError, match=r"init_from: .* \(it holds nothing\); expected"):
            read_weights(tmp_path / f)
