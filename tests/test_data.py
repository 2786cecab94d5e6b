"""Datasets: shapes, splits, local copies and clear errors, all without the network."""

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from lorita.data import DatasetUnavailable, data_root, list_datasets, load_dataset


@pytest.fixture(autouse=True)
def _data_folder(tmp_path, monkeypatch):
    """Every test gets its own data folder (folder datasets keep a decoding cache there)."""
    monkeypatch.setenv("LORITA_DATA", str(tmp_path / "data"))


def test_list_datasets():
    assert list_datasets() == ["digits", "lowrank", "mnist", "fashion_mnist", "cifar10", "cifar100"]


def test_digits_shapes_and_splits():
    s = load_dataset("digits")
    assert (s.in_channels, s.image_size, s.num_classes, s.task) == (1, 8, 10, "classification")
    assert (len(s.train), len(s.val), len(s.test)) == (1293, 144, 360)
    x, y = s.train[torch.arange(5)]
    assert x.shape == (5, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    x1, y1 = s.train[0]
    assert x1.shape == (1, 8, 8) and int(y1) == int(y[0])
    # normalised with the training split's statistics
    xa = s.train[torch.arange(len(s.train))][0]
    assert abs(float(xa.mean())) < 1e-4 and abs(float(xa.std()) - 1) < 0.05
    assert set(s.test.y.tolist()) == set(range(10))


def test_validation_is_carved_from_train_with_a_fixed_seed():
    a, b = load_dataset("digits", seed=0), load_dataset("digits", seed=0)
    c = load_dataset("digits", seed=1)
    assert torch.equal(a.val.x, b.val.x) and torch.equal(a.train.y, b.train.y)
    assert not torch.equal(a.val.x, c.val.x)
    assert torch.equal(a.test.x, c.test.x)  # the test split never moves
    # train and validation are disjoint and together are the whole training pool
    rows = {tuple(r.tolist()) for r in a.train.x.flatten(1)}
    overlap = sum(tuple(r.tolist()) in rows for r in a.val.x.flatten(1))
    assert overlap <= 2  # digits has a handful of exact duplicate images
    d = load_dataset("digits", val_fraction=0.25)
    assert len(d.train) + len(d.val) == 1437 and len(d.val) == round(1437 * 0.25)


def test_lowrank_classification_and_regression():
    s = load_dataset("lowrank", rank=3, n_train=500, n_test=100)
    assert (s.in_channels, s.image_size, s.num_classes) == (1, 8, 10)
    assert len(s.train) + len(s.val) == 500 and len(s.test) == 100
    counts = torch.bincount(torch.cat([s.train.y, s.val.y]), minlength=10)
    assert (counts > 0).all()  # every class occurs
    r = load_dataset("lowrank", task="regression", rank=2, num_classes=6, n_train=300)
    assert r.task == "regression" and r.train.y.shape[1] == 6 and r.train.y.dtype == torch.float32
    # the targets really have the planted rank (up to the noise)
    x, y = r.train.x.flatten(1), r.train.y
    sol = torch.linalg.lstsq(x, y).solution  # (64, 6)
    sv = torch.linalg.svdvals(sol)
    assert float(sv[2] / sv[0]) < 0.1


def test_lowrank_smooth_images():
    s = load_dataset("lowrank", dim=32, smooth=4, rank=3, n_train=200, n_test=10)
    x = s.train.x  # (N, 1, 32, 32), upsampled from 4x4: neighbouring pixels agree
    assert x.shape[1:] == (1, 32, 32)
    assert float((x[..., 1:] - x[..., :-1]).abs().mean()) < 0.3 * float(x.abs().mean())
    with pytest.raises(ValueError, match="smooth"):
        load_dataset("lowrank", dim=8, smooth=9)


def test_lowrank_bad_options():
    with pytest.raises(ValueError, match="rank"):
        load_dataset("lowrank", rank=20)
    with pytest.raises(ValueError, match="unknown"):
        load_dataset("lowrank", colour=3)
    with pytest.raises(ValueError, match="task"):
        load_dataset("lowrank", task="ranking")


def test_bad_names_and_options():
    with pytest.raises(ValueError, match="dataset: unknown name 'imagenet'"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="val_fraction"):
        load_dataset("digits", val_fraction=0.9)
    with pytest.raises(ValueError, match="not accepted"):
        load_dataset("digits", rank=3)


def test_augment_crop_flip_keeps_shape_and_changes_pixels():
    s = load_dataset("lowrank", augment=True, n_train=64, n_test=8)
    idx = torch.arange(16)
    s.train.seed(0)
    a = s.train[idx][0]
    s.train.seed(1)
    b = s.train[idx][0]
    assert a.shape == b.shape == (16, 1, 8, 8) and not torch.equal(a, b)
    s.train.seed(0)
    assert torch.equal(a, s.train[idx][0])  # reseeding repeats the augmentation
    assert torch.equal(s.val[idx[:4]][0], s.val[idx[:4]][0])  # validation is never augmented


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def _mnist_files(raw: Path, rng) -> None:
    """A small local MNIST copy: 50 training and 20 test images, gzipped IDX files."""
    raw.mkdir(parents=True)
    _write_idx(raw / "train-images-idx3-ubyte.gz", rng.integers(0, 255, (50, 28, 28)))
    _write_idx(raw / "train-labels-idx1-ubyte.gz", np.arange(50) % 10)
    _write_idx(raw / "t10k-images-idx3-ubyte.gz", rng.integers(0, 255, (20, 28, 28)))
    _write_idx(raw / "t10k-labels-idx1-ubyte.gz", np.arange(20) % 10)


def test_mnist_from_local_idx_files_without_network(tmp_path):
    _mnist_files(tmp_path / "MNIST" / "raw", np.random.default_rng(0))
    s = load_dataset("mnist", root=tmp_path, download=False, val_fraction=0.2)
    assert (len(s.train), len(s.val), len(s.test)) == (40, 10, 20)
    assert (s.in_channels, s.image_size, s.num_classes) == (1, 28, 10)


def test_a_damaged_or_incomplete_local_mnist_copy_is_named_before_anything_is_read(tmp_path):
    from lorita.data import check_dataset

    raw = tmp_path / "MNIST" / "raw"
    _mnist_files(raw, np.random.default_rng(0))
    images = raw / "t10k-images-idx3-ubyte"  # not gzipped: its size says whether it is whole
    images.write_bytes(gzip.decompress(images.with_suffix(".gz").read_bytes()))
    images.with_suffix(".gz").unlink()
    assert check_dataset("mnist", tmp_path, download=False).startswith("local files in")
    for path in (raw / "train-images-idx3-ubyte.gz", images):  # each cut short
        whole = path.read_bytes()
        path.write_bytes(whole[: len(whole) // 2])
        for call in (check_dataset, lambda name, root, **kw: load_dataset(name, root=root, **kw)):
            with pytest.raises(DatasetUnavailable, match=f"^{path}: damaged or cut short"):
                call("mnist", tmp_path, download=False)
        path.write_bytes(whole)
    images.unlink()
    with pytest.raises(DatasetUnavailable, match=r"has 3 of them; missing: t10k-images-idx3-ubyte"):
        check_dataset("mnist", tmp_path, download=False)


def test_cifar_binary_files_are_read_without_unpickling(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in [*[(f"data_batch_{i}.bin", 4) for i in range(1, 6)], ("test_batch.bin", 6)]:
        rec = np.concatenate([np.arange(n)[:, None] % 10, rng.integers(0, 255, (n, 3072))], 1)
        rec.astype(np.uint8).tofile(folder / name)
    s = load_dataset("cifar10", root=tmp_path, download=False, augment=True)
    assert (s.in_channels, s.image_size, s.num_classes) == (3, 32, 10)
    assert len(s.train) + len(s.val) == 20 and len(s.test) == 6
    assert s.train[torch.arange(3)][0].shape == (3, 3, 32, 32)


def test_missing_dataset_offline_says_where_to_put_files(tmp_path):
    with pytest.raises(DatasetUnavailable) as e:
        load_dataset("mnist", root=tmp_path, download=False)
    assert str(tmp_path) in str(e.value) and "IDX" in str(e.value)
    with pytest.raises(DatasetUnavailable, match="cifar-100"):
        load_dataset("cifar100", root=tmp_path, download=False)


def _offline(monkeypatch):
    """torchvision's dataset classes fail as they do without internet, after making their
    folders (no test reaches the network)."""
    import urllib.error

    import torchvision.datasets as tvd

    class Offline:
        def __init__(self, root, train=True, download=False):
            (Path(root) / type(self).__name__ / "raw").mkdir(parents=True, exist_ok=True)
            raise urllib.error.URLError("Name or service not known")

    for name in ("MNIST", "FashionMNIST", "CIFAR10", "CIFAR100"):
        monkeypatch.setattr(tvd, name, type(name, (Offline,), {}))


def test_a_failed_download_says_which_files_to_put_where_and_leaves_no_folders(
    tmp_path, monkeypatch
):
    from lorita.data import fetch_dataset

    _offline(monkeypatch)
    root = tmp_path / "data"
    with pytest.raises(DatasetUnavailable) as e:
        fetch_dataset("mnist", root=root)
    said = str(e.value)
    assert "download into" in said and "URLError" in said
    assert (
        "without internet, put the four IDX files" in said and str(root / "MNIST" / "raw") in said
    )
    assert not root.exists()  # the folders the attempt made are gone
    root.mkdir()
    (root / "mine.txt").write_text("kept")
    with pytest.raises(DatasetUnavailable, match=r"put cifar-10-batches-bin/ .* in .*data"):
        fetch_dataset("cifar10", root=root)
    assert sorted(p.name for p in root.iterdir()) == ["mine.txt"]


def test_train_downloads_before_the_run_folder_exists(tmp_path, monkeypatch, capsys):
    """Offline, `lorita train --dataset mnist` fails with the files to put where, and leaves
    no failed run behind."""
    from lorita.cli import main

    _offline(monkeypatch)
    monkeypatch.setenv("LORITA_DATA", str(tmp_path / "data"))
    code = main(["train", "--dataset", "mnist", "--runs-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and "will download" in err and "put the four IDX files" in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_folder_images_are_decoded_once_and_again_when_a_file_changes(tmp_path, monkeypatch):
    import lorita.data as data

    root = _folder(tmp_path / "imgs")
    first = load_dataset(f"folder:{root}", size=8)
    assert len(list((tmp_path / "data" / "folder-cache").glob("*.npz"))) == 1

    def no_decoding(*a, **kw):
        raise AssertionError("decoded although cached")

    decode = data._read_image
    monkeypatch.setattr(data, "_read_image", no_decoding)
    again = load_dataset(f"folder:{root}", size=8)
    for part in ("train", "val", "test"):
        assert torch.equal(getattr(first, part).x, getattr(again, part).x)
        assert torch.equal(getattr(first, part).y, getattr(again, part).y)
    _image(root / "cat" / "0.jpg", colour=(255, 0, 0))  # a changed file decodes again
    with pytest.raises(AssertionError, match="decoded although cached"):
        load_dataset(f"folder:{root}", size=8)
    with pytest.raises(AssertionError, match="decoded although cached"):
        load_dataset(f"folder:{root}", size=9)  # other options too
    monkeypatch.setattr(data, "_read_image", decode)
    cache = tmp_path / "data" / "folder-cache"
    (cache / ("0" * 32 + ".npz")).write_bytes(b"a cache named before prefixes")
    other = load_dataset(f"folder:{_folder(tmp_path / 'other', per_class=2)}", size=8)
    load_dataset(f"folder:{root}", size=8)  # decoded again: replaces its older decoding
    load_dataset(f"folder:{root}", size=9)
    names = sorted(p.name.split("-")[0] for p in cache.glob("*.npz"))
    assert len(names) == 3 and len(set(names)) == 3  # one per folder and size; none unnamed
    assert len(other.train) + len(other.val) + len(other.test) == 6
    (tmp_path / "not-a-folder").write_text("x")  # a data folder where no cache can be written
    monkeypatch.setenv("LORITA_DATA", str(tmp_path / "not-a-folder"))
    assert load_dataset(f"folder:{root}", size=10).image_size == 10


def test_data_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LORITA_DATA", str(tmp_path))
    assert data_root() == tmp_path
    assert data_root("/x/y") == Path("/x/y")


@pytest.mark.skipif(
    not os.path.exists("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"),
    reason="Debian's dataset-fashion-mnist is not installed",
)
def test_fashion_mnist_from_the_debian_package(tmp_path):
    s = load_dataset("fashion_mnist", root=tmp_path, download=False)
    assert (len(s.train), len(s.val), len(s.test)) == (54000, 6000, 10000)
    assert s.train.x.dtype == torch.uint8  # kept compact, scaled per batch
    assert s.train[torch.arange(2)][0].shape == (2, 1, 28, 28)


# --------------------------------------------------------------------------- bounds and checks


def test_every_numeric_option_has_bounds():
    from lorita.data import dataset_options, list_dataset_families

    names = list_datasets() + [f"{f}:/x" for f in list_dataset_families()]
    for name in names:
        for key, opt in dataset_options(name).items():
            if opt.choices is None and not isinstance(opt.default, bool | str):
                assert opt.lo is not None and opt.hi is not None, (name, key)
                assert opt.help, (name, key)


@pytest.mark.parametrize(
    "kw, needle",
    [
        ({"n_train": 10**12}, "out of range"),
        ({"n_train": 1.5}, "integer"),
        ({"n_train": True}, "integer"),
        ({"n_train": "many"}, "integer"),
        ({"noise": float("nan")}, "finite"),
        ({"noise": float("inf")}, "finite"),
        ({"dim": 0}, "out of range"),
        ({"dim": 512, "n_train": 10**7}, "GiB"),
        ({"num_classes": 1000, "rank": 1000, "dim": 32}, "GiB"),
        ({"task": 3}, "task"),
    ],
)
def test_lowrank_options_are_bounded_before_allocation(kw, needle):
    from lorita.data import validate_dataset

    with pytest.raises(ValueError, match=needle):
        validate_dataset("lowrank", kw)
    with pytest.raises(ValueError, match=needle):
        load_dataset("lowrank", **kw)


def test_integral_floats_are_integers():
    from lorita.data import validate_dataset

    assert validate_dataset("lowrank", {"n_train": 1e3})["n_train"] == 1000


def test_every_bad_dataset_option_is_named_at_once():
    from lorita.data import validate_dataset

    with pytest.raises(ValueError) as e:
        validate_dataset("lowrank", {"rank": 0, "noise": 1.0, "dim": 0, "task": "x"})
    said = str(e.value)
    for option in ("'rank'", "'dim'", "'task'"):
        assert f"dataset option {option} of 'lowrank'" in said, said
    assert "'noise'" not in said


def test_check_dataset_is_cheap_and_says_where_the_data_comes_from(tmp_path):
    from lorita.data import check_dataset

    assert "scikit-learn" in check_dataset("digits")
    assert check_dataset("lowrank", rank=2) == "generated"
    with pytest.raises(ValueError, match="rank"):
        check_dataset("lowrank", rank=20)
    with pytest.raises(DatasetUnavailable) as e:
        check_dataset("mnist", root=tmp_path, download=False)
    assert str(tmp_path) in str(e.value) and "IDX" in str(e.value)
    assert "will download into" in check_dataset("cifar10", root=tmp_path, download=True)
    with pytest.raises(DatasetUnavailable, match="cifar-10-batches-bin"):
        check_dataset("cifar10", root=tmp_path, download=False)
    (tmp_path / "cifar-10-batches-bin").mkdir()
    assert "local files" in check_dataset("cifar10", root=tmp_path, download=False)
    with pytest.raises(ValueError, match="unknown name"):
        check_dataset("imagenet")


# --------------------------------------------------------------------------- folder:PATH


def _image(path: Path, size=(20, 14), colour=(200, 30, 30), mode="RGB") -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash(str(path))) % 2**32)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    arr[..., 0] = colour[0]
    Image.fromarray(arr).convert(mode).save(path)


def _folder(root: Path, classes=("cat", "dog", "eel"), per_class=6, part="") -> Path:
    for k, c in enumerate(classes):
        for i in range(per_class):
            ext = ".png" if i % 2 else ".jpg"
            _image(root / part / c / f"{i}{ext}", colour=(40 * k, 0, 0))
    return root


def test_folder_dataset_matches_torchvision_image_folder(tmp_path):
    from torchvision.datasets import ImageFolder

    root = _folder(tmp_path / "imgs")
    (root / "cat" / "notes.txt").write_text("not an image")
    s = load_dataset(f"folder:{root}", size=16)
    assert (s.in_channels, s.image_size, s.num_classes) == (3, 16, 3)
    assert s.classes == ["cat", "dog", "eel"] == ImageFolder(str(root)).classes
    assert len(s.train) + len(s.val) + len(s.test) == 18
    assert len(s.test) == round(18 * 0.2)
    # same labels as torchvision's ImageFolder for the same files
    tv = sorted(int(t) for _, t in ImageFolder(str(root)).samples)
    ours = sorted(torch.cat([s.train.y, s.val.y, s.test.y]).tolist())
    assert ours == tv
    # the test part is fixed; the validation carve-out follows the seed
    others = [load_dataset(f"folder:{root}", size=16, seed=k) for k in range(1, 4)]
    assert all(torch.equal(o.test.x, s.test.x) for o in others)
    assert any(not torch.equal(o.val.x, s.val.x) for o in others)
    grey = load_dataset(f"folder:{root}", size=8, channels=1)
    assert grey.train.x.shape[1:] == (1, 8, 8) and grey.train.x.dtype == torch.uint8


def test_images_beside_the_class_folders_are_left_out_and_said_so(tmp_path):
    from lorita.data import check_dataset

    root = _folder(tmp_path / "imgs", per_class=2)
    assert "left out" not in check_dataset(f"folder:{root}")
    _image(root / "stray.jpg")
    (root / "notes.txt").write_text("not an image")
    note = check_dataset(f"folder:{root}")
    assert f"1 image(s) beside the class folders (e.g. {root / 'stray.jpg'})" in note
    assert "left out" in note and "6 images" in note
    assert len(load_dataset(f"folder:{root}", size=8, test_fraction=0.34).train.x) < 6
    split = _folder(tmp_path / "split", per_class=2, part="train")
    _image(split / "train" / "a.png")
    _image(split / "train" / "b.png")
    assert "2 image(s) beside the class folders" in check_dataset(f"folder:{split}")


def test_folder_pixels_are_the_resized_image(tmp_path):
    from PIL import Image

    root = tmp_path / "imgs"
    for c in ("a", "b"):
        for i in range(3):
            arr = np.full((12, 12, 3), 60 * i + (100 if c == "b" else 0), dtype=np.uint8)
            _path = root / c / f"{i}.png"
            _path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(_path)
    s = load_dataset(f"folder:{root}", size=6, normalize=False, test_fraction=0.5)
    x = torch.cat([s.train.x, s.val.x, s.test.x])
    y = torch.cat([s.train.y, s.val.y, s.test.y])
    values = sorted((int(lab), int(img[0, 0, 0])) for img, lab in zip(x, y))
    assert values == [(0, 0), (0, 60), (0, 120), (1, 100), (1, 160), (1, 220)]


def test_folder_with_train_val_test_sub_folders(tmp_path):
    root = tmp_path / "split"
    _folder(root, per_class=4, part="train")
    _folder(root, per_class=2, part="val")
    _folder(root, classes=("cat", "dog"), per_class=1, part="test")
    s = load_dataset(f"folder:{root}", size=8, val_fraction=0.5)
    assert (len(s.train), len(s.val), len(s.test)) == (12, 6, 2)  # nothing carved
    assert s.classes == ["cat", "dog", "eel"] and s.num_classes == 3
    assert sorted(s.test.y.tolist()) == [0, 1]
    no_val = tmp_path / "noval"
    _folder(no_val, per_class=4, part="train")
    _folder(no_val, per_class=1, part="test")
    t = load_dataset(f"folder:{no_val}", size=8, val_fraction=0.25)
    assert (len(t.train), len(t.val), len(t.test)) == (9, 3, 3)


def test_folder_errors_name_the_problem(tmp_path):
    from lorita.data import check_dataset

    def both(name, needle, **kw):
        with pytest.raises(DatasetUnavailable, match=needle):
            check_dataset(name, **kw)
        with pytest.raises(DatasetUnavailable, match=needle):
            load_dataset(name, **kw)

    both(f"folder:{tmp_path / 'missing'}", "does not exist")
    (tmp_path / "file").write_text("x")
    both(f"folder:{tmp_path / 'file'}", "is not a folder")
    (tmp_path / "empty").mkdir()
    both(f"folder:{tmp_path / 'empty'}", "no class folders")
    _folder(tmp_path / "one", classes=("only",))
    both(f"folder:{tmp_path / 'one'}", "only one class folder")
    _folder(tmp_path / "hole")
    (tmp_path / "hole" / "fox").mkdir()
    both(f"folder:{tmp_path / 'hole'}", "fox has no images")
    _folder(tmp_path / "odd", per_class=2, part="train")
    _folder(tmp_path / "odd", classes=("cat", "owl"), per_class=1, part="val")
    both(f"folder:{tmp_path / 'odd'}", "owl is not a class")
    with pytest.raises(ValueError, match="needs a folder"):
        load_dataset("folder:")
    with pytest.raises(ValueError, match="size"):
        load_dataset(f"folder:{tmp_path / 'hole'}", size=10**6)
    with pytest.raises(ValueError, match="channels"):
        load_dataset(f"folder:{tmp_path / 'hole'}", channels=2)


def test_an_unreadable_image_is_named(tmp_path):
    from lorita.data import check_dataset

    root = _folder(tmp_path / "imgs")
    bad = root / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(DatasetUnavailable, match="broken.png is not a readable image"):
        check_dataset(f"folder:{root}")
    with pytest.raises(DatasetUnavailable, match="broken.png is not a readable image"):
        load_dataset(f"folder:{root}")


def test_unreadable_files_are_found_before_a_run_by_their_header(tmp_path):
    """Empty files and files that do not open as images are refused by check_dataset (and so
    by the checks before a run); a file cut short after a good header fails at decoding, named."""
    from lorita.data import check_dataset
    from lorita.engine.config import TrainConfig
    from lorita.engine.preflight import check_start

    for bad, data, needle in [
        ("zero.png", b"", "zero.png is empty \\(0 bytes\\)"),
        ("junk.jpg", b"this is not a jpeg" * 5, "junk.jpg is not a readable image"),
    ]:
        root = _folder(tmp_path / bad.split(".")[0], per_class=2)
        (root / "dog" / bad).write_bytes(data)
        with pytest.raises(DatasetUnavailable, match=needle):
            check_dataset(f"folder:{root}")
        with pytest.raises(DatasetUnavailable, match=needle):
            check_start(TrainConfig(model="mlp", dataset=f"folder:{root}"))
    root = _folder(tmp_path / "cut", per_class=2)
    whole = (root / "cat" / "1.png").read_bytes()
    (root / "cat" / "1.png").write_bytes(whole[: len(whole) // 2])  # header intact
    assert "6 images" in check_dataset(f"folder:{root}")
    with pytest.raises(DatasetUnavailable, match=r"cat/1.png is not a readable image"):
        load_dataset(f"folder:{root}")


def test_a_broken_link_is_named_while_listing(tmp_path):
    from lorita.data import check_dataset, dataset_shape

    root = _folder(tmp_path / "imgs", per_class=2)
    os.symlink(tmp_path / "nowhere.png", root / "cat" / "gone.png")
    os.symlink(root / "dog" / "1.png", root / "cat" / "alias.png")  # a working link is fine
    for f in (check_dataset, dataset_shape, load_dataset):
        with pytest.raises(DatasetUnavailable, match=r"cat/gone.png is a broken link"):
            f(f"folder:{root}")
    (root / "cat" / "gone.png").unlink()
    assert "7 images" in check_dataset(f"folder:{root}")


def test_empty_val_or_test_folders_are_refused(tmp_path):
    from lorita.data import check_dataset

    for part, loose in [("val", False), ("test", False), ("val", True)]:
        root = _folder(tmp_path / f"{part}{loose}", per_class=2, part="train")
        (root / part).mkdir()
        if loose:
            _image(root / part / "stray.png")
        for f in (check_dataset, load_dataset):
            with pytest.raises(DatasetUnavailable) as e:
                f(f"folder:{root}")
            assert f"{part}/ has no class folders with images" in str(e.value)
            assert str(root / part) in str(e.value)


def test_confusing_split_layouts_are_refused(tmp_path):
    from lorita.data import check_dataset

    beside = _folder(tmp_path / "beside", per_class=2, part="train")
    _folder(beside, classes=("owl", "yak"), per_class=1)
    with pytest.raises(DatasetUnavailable) as e:
        check_dataset(f"folder:{beside}")
    want = "has train/ and also other folders (owl, yak): put the classes inside train/ (and "
    assert f"{beside} {want}val/, test/), or remove train/" in str(e.value)
    only_val = _folder(tmp_path / "onlyval", per_class=2, part="val")
    with pytest.raises(DatasetUnavailable, match="has val/ but no train/ folder.*beside val/"):
        check_dataset(f"folder:{only_val}")
    _folder(only_val, per_class=1, part="test")
    with pytest.raises(DatasetUnavailable, match="has val/ and test/ but no train/ folder"):
        load_dataset(f"folder:{only_val}")


def test_16_bit_and_float_images_are_scaled_not_clipped(tmp_path):
    from PIL import Image

    from lorita.data import _read_image

    ramp = np.linspace(0, 1, 64)[None, :].repeat(64, 0)  # dark to bright, left to right
    cases = {
        "g16.png": (ramp * 65535).astype(np.uint16),  # mode I;16
        "g32.tif": (ramp * 65535).astype(np.int32),  # mode I within 16 bits
        "big32.tif": (ramp * 10**6).astype(np.int32),  # mode I beyond 16 bits: its own max
        "unit.tif": ramp.astype(np.float32),  # mode F in [0, 1]
        "wide.tif": (ramp * 3000 - 500).astype(np.float32),  # mode F: its own min..max
    }
    for fname, arr in cases.items():
        Image.fromarray(arr).save(tmp_path / fname)
        for channels in (1, 3):
            x = _read_image("t", tmp_path / fname, 16, channels).astype(int)
            assert x.shape == (channels, 16, 16), fname
            row = x[0, 8]
            assert (np.diff(row) >= 0).all() and len(np.unique(row)) >= 12, (fname, row)
            assert row[0] <= 12 and row[-1] >= 243, (fname, row)  # the whole range, not clipped
            assert (x == x[:1]).all()  # grey replicated to every channel
    root = tmp_path / "deep"  # and through the loader, with its cache
    for c, scale in (("dim", 0.25), ("bright", 1.0)):
        for i in range(3):
            (root / c).mkdir(parents=True, exist_ok=True)
            Image.fromarray((ramp * scale * 65535).astype(np.uint16)).save(root / c / f"{i}.png")
    s = load_dataset(f"folder:{root}", size=8, channels=1, normalize=False, test_fraction=0.34)
    x = torch.cat([s.train.x, s.val.x, s.test.x]).float()
    y = torch.cat([s.train.y, s.val.y, s.test.y])
    dim = s.classes.index("dim")
    assert x.max() >= 230 and 50 <= x[y == dim].max() <= 70 and len(x.unique()) >= 10


def test_folder_memory_is_estimated_before_reading(tmp_path, monkeypatch):
    import lorita.data as data

    root = _folder(tmp_path / "imgs")
    monkeypatch.setattr(data, "MAX_DATA_BYTES", 18 * 3 * 16 * 16 - 1)
    with pytest.raises(ValueError, match="18 images at 16x16"):
        load_dataset(f"folder:{root}", size=16)
    assert load_dataset(f"folder:{root}", size=15).image_size == 15


def test_canonical_name_makes_folder_paths_absolute(tmp_path, monkeypatch):
    from lorita.data import canonical_name

    monkeypatch.chdir(tmp_path)
    assert canonical_name("folder:imgs") == f"folder:{tmp_path / 'imgs'}"
    assert canonical_name("digits") == "digits"


def test_dataset_shape_without_loading_matches_the_loaded_splits(tmp_path):
    from lorita.data import dataset_shape

    root = _folder(tmp_path / "imgs")
    for name, kw in [
        ("digits", {}),
        ("lowrank", {"dim": 12, "num_classes": 5, "n_train": 50, "n_test": 10}),
        (f"folder:{root}", {"size": 10, "channels": 1}),
    ]:
        s = load_dataset(name, **kw)
        assert dataset_shape(name, **kw) == (s.in_channels, s.image_size, s.num_classes)
    assert dataset_shape("cifar100") == (3, 32, 100)


def test_a_run_tells_when_its_folder_changed_since_it_trained(tmp_path, monkeypatch):
    """A folder's validation and test images are drawn at random from what it holds: after an
    image is added they are other images, possibly ones the run trained on. The run keeps a
    digest of the folder; compressing says so, a resume is refused, and with the folder as it
    was nothing is said."""
    import warnings

    import lorita as lt
    from lorita.runs import RunStore

    monkeypatch.setenv("LORITA_DATA", str(tmp_path / "data"))
    root = _folder(tmp_path / "imgs", per_class=8)
    store = RunStore(tmp_path / "runs")
    cfg = lt.TrainConfig(
        dataset=f"folder:{root}", dataset_kwargs={"size": 8}, model_kwargs={"width": 8},
        epochs=1, spectra_every=0,
    ).to_dict()  # fmt: skip
    run = store.create(cfg, name="r")
    assert lt.train(cfg, run)["state"] == "completed"
    assert run.data_changed() is None
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*changed since")  # (24 images: "too few")
        assert lt.Compressor(run).data_note is None

    _image(root / "dog" / "new.png")
    note = run.data_changed()
    assert f"dataset 'folder:{root}'" in note and "changed since run 'r'" in note
    with pytest.warns(UserWarning, match="changed since run 'r'"):
        assert lt.Compressor(run).data_note == note
    run.update_status(state="failed")  # as a run that stopped part-way: resumable
    with pytest.raises(ValueError, match="resume: dataset .* changed since run 'r'"):
        lt.train(cfg, run, resume=True)

    (root / "dog" / "new.png").unlink()
    assert run.data_changed() is None
    assert RunStore(tmp_path / "runs").get("r").data_changed() is None

    fixed = {**cfg, "dataset": "digits", "dataset_kwargs": {}, "max_steps": 1}  # no digest
    digits = store.create(fixed, name="d")
    assert lt.train(fixed, digits)["state"] == "completed"
    assert digits.read_extra("data") is None and digits.data_changed() is None


def test_a_folder_too_small_to_measure_on_says_so(tmp_path, recwarn):
    """Validation and test carved from 18 images of 3 classes hold 1 and 4: the accuracy
    moves by 100 points an image. Loading warns, and the check before a run says so; a folder
    with enough images says nothing."""
    from lorita.data import check_dataset

    small = _folder(tmp_path / "small")
    with pytest.warns(UserWarning, match=r"validation holds 1 image\(s\) and test 4, for 3 "):
        load_dataset(f"folder:{small}", size=8)
    assert "validation would hold about 1 image(s) and test 4" in check_dataset(f"folder:{small}")
    big = _folder(tmp_path / "big", classes=("a", "b"), per_class=30)
    recwarn.clear()
    load_dataset(f"folder:{big}", size=8)  # validation 5, test 12: one a class or more
    assert not [w for w in recwarn if "too few" in str(w.message)]
    assert "too few" not in check_dataset(f"folder:{big}")


def test_the_command_line_says_a_folder_is_too_small_unless_quiet(tmp_path, capsys, monkeypatch):
    from lorita.cli import main

    monkeypatch.setenv("LORITA_DATA", str(tmp_path / "data"))
    small = _folder(tmp_path / "small", classes=("a", "b"), per_class=3)
    argv = ["train", "--runs-dir", str(tmp_path / "runs"), "--dataset", f"folder:{small}",
            "--data-arg", "size=8", "--model-arg", "width=8", "--epochs", "1"]  # fmt: skip
    assert main([*argv, "--name", "loud"]) == 0
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "warning" in x]
    assert line.startswith("lorita: warning: dataset 'folder:") and "too few to measure" in line
    assert main([*argv, "--name", "quiet", "--quiet"]) == 0
    assert capsys.readouterr() == ("", "")  # --quiet: nothing but errors


def test_preprocess_is_a_recipe_that_reproduces_the_model_inputs(tmp_path):
    """What exported files record to say how to feed the model: following it on the image
    files (convert, resize and centre-crop, divide by 255, then (x - mean) / std) gives
    exactly the inputs the run trained and was measured on; every dataset says how its raw
    inputs become values."""
    import json

    from PIL import Image, ImageOps

    from lorita.data import _REGISTRY

    assert all(e.pixels for e in _REGISTRY.values())
    root = _folder(tmp_path / "imgs")
    s = load_dataset(f"folder:{root}", size=16)
    how = json.loads(json.dumps(s.preprocess()))  # as stored: JSON
    assert how["input_shape"] == [3, 16, 16] and how["classes"] == ["cat", "dog", "eel"]
    assert how["dataset"] == f"folder:{root}" and how["task"] == "classification"
    assert "255" in how["pixels"] and "centre-cropped" in how["pixels"]
    mean = torch.tensor(how["normalize"]["mean"]).view(-1, 1, 1)
    std = torch.tensor(how["normalize"]["std"]).view(-1, 1, 1)
    followed = []
    for f in sorted(root.glob("*/*.*")):
        im = ImageOps.fit(Image.open(f).convert("RGB"), (16, 16), Image.Resampling.BILINEAR)
        x = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255
        followed.append((x - mean) / std)
    followed = torch.stack(followed)
    for part in (s.train, s.val, s.test):
        inputs = part[torch.arange(len(part))][0]
        for x in inputs:
            assert (followed - x).abs().amax(dim=(1, 2, 3)).min() < 1e-5
    digits = load_dataset("digits").preprocess()
    assert digits["input_shape"] == [1, 8, 8] and "16" in digits["pixels"]
    assert load_dataset("digits", normalize=False).preprocess()["normalize"] is None


def test_dataset_options_take_an_integral_float_for_a_choice_and_write_bounds_in_full():
    from lorita.data import Option, dataset_options, validate_dataset

    assert validate_dataset("lowrank", {"task": "regression"})["task"] == "regression"
    opts = dataset_options("lowrank")
    assert opts["teacher_seed"].range() == f" in [0, {2**63 - 1}]"
    channels = Option(3, "3 = colour (RGB), 1 = grey", choices=(1, 3))  # as folder's
    assert channels.check("folder:x", "channels", 3.0) == 3
    assert type(channels.check("folder:x", "channels", 3.0)) is int
    for bad in ("3", True, 2, 3.5):
        with pytest.raises(ValueError, match="^dataset option 'channels' of 'folder:x': "):
            channels.check("folder:x", "channels", bad)


def test_a_planted_classification_needs_two_classes():
    with pytest.raises(ValueError, match="num_classes: a classification needs at least 2"):
        load_dataset("lowrank", num_classes=1, rank=1)
    r = load_dataset("lowrank", num_classes=1, rank=1, task="regression", n_train=50, n_test=10)
    assert r.train.y.shape[1] == 1
