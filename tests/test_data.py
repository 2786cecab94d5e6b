"""Datasets: shapes, splits, local copies and clear errors, all without the network."""

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from lorita.data import DatasetUnavailable, data_root, list_datasets, load_dataset


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


def test_mnist_from_local_idx_files_without_network(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    _write_idx(raw / "train-images-idx3-ubyte.gz", rng.integers(0, 255, (50, 28, 28)))
    _write_idx(raw / "train-labels-idx1-ubyte.gz", np.arange(50) % 10)
    _write_idx(raw / "t10k-images-idx3-ubyte.gz", rng.integers(0, 255, (20, 28, 28)))
    _write_idx(raw / "t10k-labels-idx1-ubyte.gz", np.arange(20) % 10)
    s = load_dataset("mnist", root=tmp_path, download=False, val_fraction=0.2)
    assert (len(s.train), len(s.val), len(s.test)) == (40, 10, 20)
    assert (s.in_channels, s.image_size, s.num_classes) == (1, 28, 10)


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
