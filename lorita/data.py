"""Datasets: digits (embedded), lowrank (synthetic, planted rank), MNIST, Fashion-MNIST, CIFAR.

Every dataset is returned as :class:`Splits` with a train / validation / test part. The
validation part is carved from the training data with a fixed seed, so every selection
(checkpoint, ranks) can be made on validation while test is reported separately.

All parts are :class:`TensorDataset`s: the whole split lives in one tensor, normalisation and
augmentation are applied to a batch at a time (``ds[index_tensor]``), so a training step and an
evaluation pass need no per-sample Python work. The data folder is ``LORITA_DATA`` (default
``~/.cache/lorita/data``). Offline, standard local copies are used without touching the network
(for example Debian's ``dataset-fashion-mnist`` in ``/usr/share/datasets/fashion-mnist``).
"""

from __future__ import annotations

import gzip
import os
import socket
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "DatasetUnavailable",
    "Splits",
    "TensorDataset",
    "data_root",
    "list_datasets",
    "load_dataset",
]

_DATASETS = ("digits", "lowrank", "mnist", "fashion_mnist", "cifar10", "cifar100")

# Where standard copies may already sit on this machine (searched before any download).
_SYSTEM_DIRS = {
    "mnist": ["/usr/share/datasets/mnist"],
    "fashion_mnist": ["/usr/share/datasets/fashion-mnist", "/usr/share/datasets/fashion_mnist"],
    "cifar10": ["/usr/share/datasets/cifar10", "/usr/share/datasets/cifar-10"],
    "cifar100": ["/usr/share/datasets/cifar100", "/usr/share/datasets/cifar-100"],
}
_TV_FOLDER = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class DatasetUnavailable(ValueError):
    """A dataset's files are not on this machine and could not be downloaded."""


def list_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`."""
    return list(_DATASETS)


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The data folder: ``root``, else ``$LORITA_DATA``, else ``~/.cache/lorita/data``."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("LORITA_DATA")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "lorita" / "data"


class TensorDataset(Dataset):
    """A split held in memory, normalised and augmented a batch at a time.

    ``ds[i]`` gives one ``(x, y)`` pair; ``ds[index_tensor]`` gives a whole batch, which is
    what the training loop uses (a ``BatchSampler`` as the DataLoader's sampler).

    Args:
        x: inputs (N, C, H, W), uint8 (scaled by 1/255) or float.
        y: targets, int64 class indices (N,) or float regression targets (N, K).
        mean, std: per-channel normalisation (C,), or None for none.
        augment: random crop (padding 4 at 32 px) + horizontal flip, applied per batch.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        mean: torch.Tensor | None = None,
        std: torch.Tensor | None = None,
        augment: bool = False,
    ) -> None:
        assert x.ndim == 4 and len(x) == len(y)
        self.x = x  # (N, C, H, W)
        self.y = y
        self.mean = mean
        self.std = std
        self.augment = augment
        self.generator = torch.Generator().manual_seed(0)

    def __len__(self) -> int:
        return len(self.x)

    def seed(self, seed: int) -> None:
        """Reseed the augmentation randomness (the loop does this each epoch)."""
        self.generator.manual_seed(int(seed))

    def __getitem__(self, index):
        single = isinstance(index, int | np.integer)
        idx = torch.as_tensor([index] if single else index, dtype=torch.long)
        x = self.x[idx]
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        if self.mean is not None:
            x = (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)
        if self.augment:
            x = _crop_flip(x, self.generator)
        y = self.y[idx]
        return (x[0], y[0]) if single else (x, y)


def _crop_flip(x: torch.Tensor, gen: torch.Generator, pad: int | None = None) -> torch.Tensor:
    """Random crop with zero padding (4 pixels at 32 px, scaled with the image) and a random
    horizontal flip, per sample."""
    b, c, h, w = x.shape  # (B, C, H, W)
    pad = max(1, h // 8) if pad is None else pad
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    rows = (oy[:, None] + torch.arange(h)[None, :])[:, None, :, None]  # (B, 1, H, 1)
    cols = (ox[:, None] + torch.arange(w)[None, :])[:, None, None, :]  # (B, 1, 1, W)
    out = padded[
        torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols
    ]
    flip = torch.rand(b, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


@dataclass
class Splits:
    """Train / validation / test parts of one dataset and the shape facts models need."""

    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    in_channels: int
    image_size: int
    num_classes: int  # classes, or output dimension for a regression task
    name: str
    task: str = "classification"  # or "regression" (lowrank with task="regression")

    def example_input(self, batch: int = 1) -> torch.Tensor:
        """A normalised input batch of the right shape (for cost counting and export)."""
        return self.val[torch.arange(min(batch, len(self.val)))][0]


def load_dataset(
    name: str,
    *,
    root: str | os.PathLike | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    augment: bool = False,
    normalize: bool = True,
    download: bool = True,
    **kw,
) -> Splits:
    """Load a dataset as train / validation / test.

    Args:
        name: one of :func:`list_datasets`.
        root: data folder (default ``$LORITA_DATA`` or ``~/.cache/lorita/data``).
        val_fraction: share of the training data held out for validation, in (0, 0.5].
        seed: seed of the validation carve-out (the test split is always the standard one).
        augment: random crop + flip on the training part (meant for CIFAR).
        normalize: standardise each channel with the training part's mean and std.
        download: allow torchvision to download when no local copy exists.
        **kw: dataset options; for ``lowrank``: rank, dim (side of the square 1-channel input,
            default 8), num_classes, n_train, n_test, noise, task ("classification" or
            "regression"), teacher_seed.

    Raises:
        ValueError: unknown name or bad option.
        DatasetUnavailable: files missing and no download possible.
    """
    if name not in _DATASETS:
        raise ValueError(f"dataset: unknown name {name!r}; allowed: {', '.join(_DATASETS)}")
    if not isinstance(val_fraction, int | float) or not 0 < val_fraction <= 0.5:
        raise ValueError(f"val_fraction: {val_fraction!r} must be a number in (0, 0.5]")
    if name != "lowrank" and kw:
        raise ValueError(f"dataset options: {sorted(kw)} not accepted by {name!r}")
    task = "classification"
    if name == "digits":
        x, y, xt, yt = _digits()
        num_classes = 10
    elif name == "lowrank":
        x, y, xt, yt, num_classes, task = _lowrank(**kw)
    elif name in ("mnist", "fashion_mnist"):
        x, y, xt, yt = _idx_dataset(name, data_root(root), download)
        num_classes = 10
    else:
        x, y, xt, yt = _cifar(name, data_root(root), download)
        num_classes = 10 if name == "cifar10" else 100

    n_val = max(1, int(round(len(x) * val_fraction)))
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(int(seed)))
    vi, ti = perm[:n_val].sort().values, perm[n_val:].sort().values
    mean = std = None
    if normalize and task == "classification":
        xf = x[ti].float() / (255.0 if x.dtype == torch.uint8 else 1.0)
        mean = xf.mean(dim=(0, 2, 3))
        std = xf.std(dim=(0, 2, 3)).clamp_min(1e-6)
    common = {"mean": mean, "std": std}
    return Splits(
        train=TensorDataset(x[ti], y[ti], augment=augment, **common),
        val=TensorDataset(x[vi], y[vi], **common),
        test=TensorDataset(xt, yt, **common),
        in_channels=x.shape[1],
        image_size=x.shape[2],
        num_classes=num_classes,
        name=name,
        task=task,
    )


# --------------------------------------------------------------------------- digits


def _digits():
    """scikit-learn's 8x8 digits (shipped with scikit-learn); a fixed 80/20 train/test split."""
    data = None
    try:  # read the bundled CSV directly: avoids importing all of scikit-learn (~1 s)
        import importlib.util

        spec = importlib.util.find_spec("sklearn")
        if spec is not None and spec.submodule_search_locations:
            path = Path(list(spec.submodule_search_locations)[0]) / "datasets/data/digits.csv.gz"
            with gzip.open(path) as f:
                data = np.loadtxt(f, delimiter=",", dtype=np.float32)
    except (OSError, ValueError):  # layout changed: fall back to the public API
        data = None
    if data is None:
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:
            raise DatasetUnavailable(
                "dataset 'digits' needs scikit-learn: pip install scikit-learn"
            ) from e
        d = load_digits()
        data = np.concatenate([d.data, d.target[:, None]], axis=1).astype(np.float32)
    x = torch.from_numpy(data[:, :64].copy()).reshape(-1, 1, 8, 8) / 16.0  # (1797, 1, 8, 8)
    y = torch.from_numpy(data[:, 64].copy()).long()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1797))
    n_test = 360
    te, tr = perm[:n_test].sort().values, perm[n_test:].sort().values
    return x[tr], y[tr], x[te], y[te]


# --------------------------------------------------------------------------- lowrank

_LOWRANK_DEFAULTS = {
    "rank": 4,
    "dim": 8,
    "num_classes": 10,
    "n_train": 4000,
    "n_test": 1000,
    "noise": 0.1,
    "task": "classification",
    "teacher_seed": 0,
    "smooth": 0,
}


def _lowrank(**kw):
    """A teacher with a planted rank: targets from ``M x + noise`` with ``rank(M) = rank``.

    Inputs are standard normal of shape (1, dim, dim) so every model accepts them. For
    classification the label is ``argmax(M x + noise)``; for regression the target is
    ``M x + noise`` itself (an output of size ``num_classes``). With ``smooth=s`` the teacher
    reads an s x s normal latent and the input is that latent upsampled (bilinear) to
    dim x dim: images with spatial structure, which convolutional networks learn quickly.
    """
    unknown = set(kw) - set(_LOWRANK_DEFAULTS)
    if unknown:
        raise ValueError(
            f"lowrank options: unknown {sorted(unknown)}; allowed: {', '.join(_LOWRANK_DEFAULTS)}"
        )
    o = {**_LOWRANK_DEFAULTS, **kw}
    for key in ("rank", "dim", "num_classes", "n_train", "n_test"):
        if not isinstance(o[key], int) or isinstance(o[key], bool) or o[key] < 1:
            raise ValueError(f"lowrank {key}: {o[key]!r} must be a positive integer")
    sm = o["smooth"]
    if not isinstance(sm, int) or isinstance(sm, bool) or not 0 <= sm <= o["dim"]:
        raise ValueError(f"lowrank smooth: {sm!r} must be an integer in [0, dim]")
    if o["task"] not in ("classification", "regression"):
        raise ValueError(f"lowrank task: {o['task']!r}; allowed: classification, regression")
    if not isinstance(o["noise"], int | float) or o["noise"] < 0:
        raise ValueError(f"lowrank noise: {o['noise']!r} must be a number >= 0")
    side = sm or o["dim"]  # the teacher's input is side x side
    d, k, r = side * side, o["num_classes"], o["rank"]
    if r > min(d, k):
        raise ValueError(
            f"lowrank rank: {r} must be <= min({side}*{side}, num_classes) = {min(d, k)}"
        )
    g = torch.Generator().manual_seed(int(o["teacher_seed"]))
    a = _spread_rows(torch.randn(k, r, generator=g))  # (K, r) unit rows, spread apart
    b = torch.linalg.qr(torch.randn(d, r, generator=g))[0]  # (D, r) orthonormal columns
    m = a @ b.T  # (K, D), rank r; b.T x ~ N(0, I_r), so outputs are of order one

    def draw(n):
        x = torch.randn(n, d, generator=g)  # (n, D)
        z = x @ m.T + o["noise"] * torch.randn(n, k, generator=g)  # (n, K)
        y = z.argmax(1) if o["task"] == "classification" else z
        img = x.reshape(n, 1, side, side)
        if sm:
            img = torch.nn.functional.interpolate(img, size=o["dim"], mode="bilinear")
            img = img / img.std()
        return img, y

    x, y = draw(o["n_train"])
    xt, yt = draw(o["n_test"])
    return x, y, xt, yt, k, o["task"]


def _spread_rows(a: torch.Tensor, iters: int = 200) -> torch.Tensor:
    """Unit rows pushed apart on the sphere, so every class of ``argmax`` gets a fair share."""
    a = a / a.norm(dim=1, keepdim=True)
    if a.shape[1] == 1:
        return a
    eye = torch.eye(len(a))
    for _ in range(iters):
        diff = a[:, None, :] - a[None, :, :]  # (K, K, r)
        dist = diff.norm(dim=-1) + eye
        a = a + 0.01 * (diff / dist[..., None] ** 3).sum(1)
        a = a / a.norm(dim=1, keepdim=True)
    return a


# --------------------------------------------------------------------------- MNIST-format


def _read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (MNIST format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 8:
        raise DatasetUnavailable(f"{path}: not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DatasetUnavailable(f"{path}: truncated IDX file")
    return data.reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for cand in (folder / stem, folder / f"{stem}.gz"):
        if cand.is_file():
            return cand
    return None


def _idx_dataset(name: str, root: Path, download: bool):
    """MNIST / Fashion-MNIST from local IDX files, else a torchvision download."""
    tv = _TV_FOLDER[name]
    folders = [root / tv / "raw", root / name, *map(Path, _SYSTEM_DIRS[name])]
    for folder in folders:
        found = {part: [_find_idx(folder, s) for s in stems] for part, stems in _IDX_FILES.items()}
        if all(p is not None for ps in found.values() for p in ps):
            out = []
            for part in ("train", "test"):
                img, lab = (_read_idx(p) for p in found[part])
                out += [
                    torch.from_numpy(img.copy())[:, None],
                    torch.from_numpy(lab.astype(np.int64)),
                ]
            return tuple(out)
    if download:
        _tv_download(name, root)
        return _idx_dataset(name, root, download=False)
    where = ", ".join(str(f) for f in folders[:1] + folders[2:])
    hint = " (Debian: apt install dataset-fashion-mnist)" if name == "fashion_mnist" else ""
    raise DatasetUnavailable(
        f"dataset {name!r} not found and not downloadable: put the four IDX files "
        f"(train-images-idx3-ubyte[.gz], ...) in one of {where}{hint}, or run once with internet"
    )


def _tv_download(name: str, root: Path) -> None:
    """Download through torchvision into ``root``; DatasetUnavailable with a hint when offline."""
    try:
        import torchvision.datasets as tvd
    except ImportError as e:
        raise DatasetUnavailable(
            f"dataset {name!r} needs torchvision: pip install torchvision"
        ) from e
    cls = {
        "mnist": tvd.MNIST,
        "fashion_mnist": tvd.FashionMNIST,
        "cifar10": tvd.CIFAR10,
        "cifar100": tvd.CIFAR100,
    }[name]
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)
    try:
        root.mkdir(parents=True, exist_ok=True)
        for train in (True, False):
            cls(str(root), train=train, download=True)
    except Exception as e:  # noqa: BLE001 - network errors come in many types
        raise DatasetUnavailable(
            f"dataset {name!r}: download into {root} failed ({type(e).__name__}: {e}); "
            f"without internet, copy the standard files into {root} or set LORITA_DATA"
        ) from e
    finally:
        socket.setdefaulttimeout(old)


# --------------------------------------------------------------------------- CIFAR


def _cifar(name: str, root: Path, download: bool):
    """CIFAR-10/100, preferably from the binary release (no unpickling needed)."""
    ten = name == "cifar10"
    bin_dir = "cifar-10-batches-bin" if ten else "cifar-100-binary"
    archives = ["cifar-10-binary.tar.gz"] if ten else ["cifar-100-binary.tar.gz"]
    folders = [root, root / name, *map(Path, _SYSTEM_DIRS[name])]
    for folder in folders:
        if (folder / bin_dir).is_dir():
            return _cifar_bin(folder / bin_dir, ten)
        for a in archives:
            if (folder / a).is_file():
                root.mkdir(parents=True, exist_ok=True)
                with tarfile.open(folder / a) as t:
                    t.extractall(root, filter="data")
                return _cifar_bin(root / bin_dir, ten)
    py_dir = "cifar-10-batches-py" if ten else "cifar-100-python"
    for folder in folders:
        if (folder / py_dir).is_dir():
            return _cifar_tv(name, folder)
    if download:
        _tv_download(name, root)
        return _cifar_tv(name, root)
    raise DatasetUnavailable(
        f"dataset {name!r} not found and not downloadable: put {bin_dir}/ (or {archives[0]}, or "
        f"torchvision's {py_dir}/) in {root}, set LORITA_DATA, or run once with internet"
    )


def _cifar_bin(folder: Path, ten: bool):
    """Parse the CIFAR binary format: per record a label byte (two for CIFAR-100) + 3072 pixels."""
    lab_bytes = 1 if ten else 2
    train_files = [f"data_batch_{i}.bin" for i in range(1, 6)] if ten else ["train.bin"]
    test_files = ["test_batch.bin"] if ten else ["test.bin"]
    out = []
    for files in (train_files, test_files):
        recs = []
        for f in files:
            p = folder / f
            if not p.is_file():
                raise DatasetUnavailable(f"CIFAR file missing: {p}")
            recs.append(np.fromfile(p, dtype=np.uint8).reshape(-1, lab_bytes + 3072))
        r = np.concatenate(recs)
        out.append(torch.from_numpy(r[:, lab_bytes:].reshape(-1, 3, 32, 32).copy()))
        out.append(torch.from_numpy(r[:, lab_bytes - 1].astype(np.int64)))
    return tuple(out)


def _cifar_tv(name: str, root: Path):
    """Load torchvision's python release (its files are checked against known MD5s first)."""
    import torchvision.datasets as tvd

    cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
    out = []
    for train in (True, False):
        try:
            ds = cls(str(root), train=train, download=False)
        except RuntimeError as e:
            raise DatasetUnavailable(f"dataset {name!r} in {root}: {e}") from e
        out.append(torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous())  # (N, 3, 32, 32)
        out.append(torch.as_tensor(ds.targets, dtype=torch.long))
    return tuple(out)


def batch_indices(
    n: int,
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
    shuffle: bool = True,
    drop_last: bool = False,
) -> Sequence[torch.Tensor]:
    """Index batches over ``range(n)`` (shuffled with ``generator`` when asked)."""
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    batches = list(order.split(batch_size))
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return batches
