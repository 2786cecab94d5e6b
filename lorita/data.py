"""Datasets: a registry of named datasets (digits, lowrank, MNIST, Fashion-MNIST, CIFAR) and
``folder:PATH`` for your own images (the ImageFolder layout).

Every dataset is returned as :class:`Splits` with a train / validation / test part. The
validation part is carved from the training data with a fixed seed, so every selection
(checkpoint, ranks) can be made on validation while test is reported separately.

All parts are :class:`TensorDataset`s: the whole split lives in one tensor, normalisation and
augmentation are applied to a batch at a time (``ds[index_tensor]``), so a training step and an
evaluation pass need no per-sample Python work. The data folder is ``LORITA_DATA`` (default
``~/.cache/lorita/data``). Offline, standard local copies are used without touching the network
(for example Debian's ``dataset-fashion-mnist`` in ``/usr/share/datasets/fashion-mnist``).

Adding a dataset is one :class:`DatasetEntry` in ``_REGISTRY`` at the end of this file: a
loader, a cheap availability check, and its options with their bounds. The command line and the
app list datasets and their options from here.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import math
import os
import re
import socket
import tarfile
import warnings
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .checks import expand_path, is_int

__all__ = [
    "DatasetEntry",
    "DatasetUnavailable",
    "MAX_DATA_BYTES",
    "Option",
    "Splits",
    "TensorDataset",
    "canonical_name",
    "check_dataset",
    "data_root",
    "dataset_digest",
    "dataset_entry",
    "dataset_options",
    "dataset_shape",
    "list_dataset_families",
    "list_datasets",
    "load_dataset",
    "validate_dataset",
]

VAL_FRACTION = 0.1  # the share of the training part held out for validation, by default
SEED_LIMIT = 2**64 - 1  # the largest seed a torch.Generator takes

# The most memory one dataset may hold (inputs as stored: uint8 images or float32 tensors).
# Options that would need more are refused before anything is allocated.
MAX_DATA_BYTES = 4 << 30

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
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


class DatasetUnavailable(ValueError):
    """A dataset's files are not on this machine and could not be downloaded."""


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Option:
    """One dataset option: default, type, inclusive bounds or choices, and a help line."""

    default: Any
    help: str = ""
    lo: float | None = None
    hi: float | None = None
    choices: tuple | None = None

    def check(self, dataset: str, key: str, value: Any) -> Any:
        """``value`` if it has this option's type and lies within its bounds, else ValueError."""
        where = f"dataset option {key!r} of {dataset!r}"
        if self.choices is not None:
            # the choice itself: 3.0 picks 3 (an integral float is an int, as for ranges)
            same = [c for c in self.choices if _same_choice(c, value)]
            if not same:
                allowed = ", ".join(map(str, self.choices))
                raise ValueError(f"{where}: {value!r} is not allowed; expected one of {allowed}")
            return same[0]
        if isinstance(self.default, bool):
            if not isinstance(value, bool):
                raise ValueError(f"{where}: {value!r} is not allowed; expected true or false")
            return value
        want_int = isinstance(self.default, int)
        num = _as_number(value, want_int)
        if num is None:
            kind = "an integer" if want_int else "a finite number"
            raise ValueError(f"{where}: {value!r} is not allowed; expected {kind}{self.range()}")
        if (self.lo is not None and num < self.lo) or (self.hi is not None and num > self.hi):
            raise ValueError(f"{where}: {value!r} is out of range; expected{self.range()}")
        return num if want_int else float(num)

    def range(self) -> str:
        """`` in [lo, hi]`` (or the choices) for messages and help."""
        if self.choices is not None:
            return " one of " + ", ".join(map(str, self.choices))
        if self.lo is None and self.hi is None:
            return ""
        lo = "-inf" if self.lo is None else _bound(self.lo)
        hi = "inf" if self.hi is None else _bound(self.hi)
        return f" in [{lo}, {hi}]"


def _same_choice(choice: Any, value: Any) -> bool:
    """Whether ``value`` is ``choice``: equal, both text or both numbers, a bool only itself."""
    if isinstance(choice, bool) or isinstance(value, bool):
        return choice is value
    return isinstance(choice, str) == isinstance(value, str) and choice == value


def _bound(v: float) -> str:
    """A bound as written: integers in full (2**63 - 1, not 9.22337e+18)."""
    return str(v) if isinstance(v, int) else f"{v:g}"


def _as_number(value: Any, want_int: bool) -> int | float | None:
    """An int (or a float with an integral value) for int options, a finite number otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if want_int:
        if isinstance(value, float):
            return int(value) if value.is_integer() else None
        return value
    return value


@dataclass
class _Raw:
    """What a loader returns: train (and optional validation) and test inputs and targets."""

    x: torch.Tensor  # (N, C, H, W) uint8 or float
    y: torch.Tensor  # (N,) int64 or (N, K) float
    xt: torch.Tensor
    yt: torch.Tensor
    num_classes: int
    task: str = "classification"
    xv: torch.Tensor | None = None  # an explicit validation part (else carved from x)
    yv: torch.Tensor | None = None
    classes: list[str] | None = None


@dataclass(frozen=True)
class DatasetEntry:
    """One dataset of the registry.

    ``load(name, root, download, **options) -> _Raw``; ``check(name, root, download,
    **options) -> str`` says cheaply (no decoding) where the data will come from or raises
    :class:`DatasetUnavailable` with what to do; ``estimate(**options)`` is the memory in bytes
    the options ask for, refused above :data:`MAX_DATA_BYTES` before loading. An entry with
    ``takes_path`` is spelled ``NAME:PATH`` (``folder:~/images``). ``shape(name, **options)``
    gives ``(in_channels, image_size, num_classes)`` without loading (what a model is built
    for; a constant for a fixed dataset). ``pixels`` says how a raw input is turned into the
    values the model reads before the per-channel normalisation (written into exported files:
    :meth:`Splits.preprocess`).
    """

    name: str
    about: str
    source: str
    load: Callable[..., _Raw]
    check: Callable[..., str]
    options: Mapping[str, Option] = field(default_factory=dict)
    estimate: Callable[..., int] | None = None
    takes_path: bool = False
    shape: Callable[..., tuple[int, int, int]] | None = None
    pixels: str = ""  # how a raw input becomes the model's values, before normalisation


def list_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset` (besides ``folder:PATH``)."""
    return [n for n, e in _REGISTRY.items() if not e.takes_path]


def list_dataset_families() -> list[str]:
    """Dataset families spelled ``NAME:PATH`` (``["folder"]``)."""
    return [n for n, e in _REGISTRY.items() if e.takes_path]


#: the longest folder path a dataset name may hold (Linux's PATH_MAX)
MAX_PATH_CHARS = 4096


def dataset_entry(name: str) -> tuple[DatasetEntry, str | None]:
    """The registry entry of a dataset name and, for ``folder:PATH``, its path."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"dataset: {name!r} is not a dataset name; {_allowed_names()}")
    family, sep, path = name.partition(":")
    entry = _REGISTRY.get(family)
    if entry is None or entry.takes_path != bool(sep):
        raise ValueError(f"dataset: unknown name {name!r}; {_allowed_names()}")
    if entry.takes_path and not path.strip():
        raise ValueError(f"dataset: {name!r} needs a folder after '{family}:'")
    if entry.takes_path and "\x00" in path:
        raise ValueError(f"dataset: {name!r} is not a usable path")
    if entry.takes_path:
        _check_utf8(f"dataset: the folder path {path[:200]!r}", path)
    if entry.takes_path and len(path) > MAX_PATH_CHARS:
        raise ValueError(
            f"dataset: the folder path is {len(path)} characters long (at most {MAX_PATH_CHARS})"
        )
    return entry, (path if entry.takes_path else None)


def _check_utf8(what: str, text: str, error: type[ValueError] = ValueError) -> None:
    """``error`` naming ``what`` when ``text`` holds bytes that are not UTF-8 (a name from
    another system, decoded by Python with surrogate escapes): it could not be written to JSON."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise error(
            f"{what} is not valid UTF-8 text; rename it (letters of any language are fine)"
        ) from None


def _allowed_names() -> str:
    fams = [f"{f}:PATH" for f in list_dataset_families()]
    return "allowed: " + ", ".join(list_datasets() + fams)


def canonical_name(name: str) -> str:
    """``folder:PATH`` with PATH made absolute (``~`` expanded); other names unchanged.

    A run's config keeps the canonical name, so the run reads the same folder from any working
    directory.
    """
    entry, path = dataset_entry(name)
    if path is None:
        return name
    return f"{entry.name}:{expand_path(path, 'dataset').absolute()}"


def dataset_options(name: str) -> dict[str, Option]:
    """The options a dataset takes (``--data-arg KEY=VALUE``), with defaults and bounds."""
    return dict(dataset_entry(name)[0].options)


def validate_dataset(name: str, options: Mapping[str, Any] | None = None) -> dict:
    """Check a dataset name and its options without touching any file.

    Returns the options with defaults filled in. Raises ValueError naming the option, the value
    and what is allowed; refuses options whose data would need more than :data:`MAX_DATA_BYTES`.
    """
    entry, _ = dataset_entry(name)
    options = dict(options or {})
    unknown = sorted(set(options) - set(entry.options))
    if unknown:
        allowed = ", ".join(entry.options) or "none"
        raise ValueError(
            f"dataset options: unknown {unknown}, not accepted by {name!r}; allowed: {allowed}"
        )
    full = {k: o.default for k, o in entry.options.items()}
    wrong = []  # every bad value is named at once, not one per try
    for k, v in options.items():
        try:
            full[k] = entry.options[k].check(name, k, v)
        except ValueError as e:
            wrong.append(str(e))
    if wrong:
        raise ValueError("; ".join(wrong))
    if entry.estimate is not None:
        _refuse_if_too_big(name, entry.estimate(**full))
    return full


def _refuse_if_too_big(name: str, nbytes: int, what: str = "these options") -> None:
    if nbytes > MAX_DATA_BYTES:
        raise ValueError(
            f"dataset {name!r}: {what} would hold {nbytes / 2**30:.1f} GiB in memory, more than "
            f"the {MAX_DATA_BYTES / 2**30:.0f} GiB allowed; use fewer or smaller samples"
        )


def check_dataset(
    name: str, root: str | os.PathLike | None = None, *, download: bool = True, **options
) -> str:
    """Cheaply check that a dataset can be loaded, without reading its data (a folder is listed
    and each file's header read: empty files and files that are not images are named).

    Returns one line saying where the data will come from (``"local files in ..."``, ``"will
    download into ... (needs internet)"``, ``"folder ...: 3 classes, 120 images"``).

    Raises:
        ValueError: unknown name or bad option.
        DatasetUnavailable: the files are missing (and ``download`` is off or impossible), or
            the folder is not a usable image folder; the message says what to do.
    """
    full = validate_dataset(name, options)
    entry, _ = dataset_entry(name)
    return entry.check(name, data_root(root), download, **full)


def dataset_shape(name: str, **options) -> tuple[int, int, int]:
    """``(in_channels, image_size, num_classes)`` of a dataset without loading its data (a folder
    is listed, not read)."""
    full = validate_dataset(name, options)
    entry, _ = dataset_entry(name)
    return entry.shape(name, **full)


def dataset_digest(name: str, **options) -> str | None:
    """A digest of what a dataset holds that can change from one read to the next: a folder's
    files (path, size, modification time) and the decoding options; None for a fixed dataset.
    A folder's validation and test images are drawn at random from what it holds, so after an
    image is added or removed they are other images: a run compares this digest to tell."""
    full = validate_dataset(name, options)
    entry, _ = dataset_entry(name)
    if not entry.takes_path:
        return None
    return _cache_key(name, _scan_folder(name), full["size"], full["channels"])


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The data folder: ``root``, else ``$LORITA_DATA``, else ``~/.cache/lorita/data``."""
    if root is not None:
        return expand_path(root, "data folder")
    env = os.environ.get("LORITA_DATA")
    if env:
        return expand_path(env, "LORITA_DATA (the data folder)")
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "lorita" / "data"


class TensorDataset(Dataset):
    """A split held in memory, normalised and augmented a batch at a time.

    ``ds[i]`` gives one ``(x, y)`` pair; ``ds[index_tensor]`` gives a whole batch, which is
    what the training loop uses (a ``BatchSampler`` as the DataLoader's sampler).

    Args:
        x: inputs (N, C, H, W), uint8 (scaled by 1/255) or float; or any other (N, ...)
            tensor (features, token ids: integers other than uint8 are passed as they are)
            without ``mean``, ``std`` and ``augment``.
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
        if len(x) != len(y):
            raise ValueError(f"y: expected {len(x)} targets, one per input, got {len(y)}")
        if (augment or mean is not None) and x.ndim != 4:
            raise ValueError(
                f"x: augmentation and per-channel normalisation need images (N, C, H, W), got "
                f"shape {tuple(x.shape)}"
            )
        self.x = x  # (N, C, H, W) images, or (N, ...) other inputs
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
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        elif x.is_floating_point():
            x = x.float()  # (other integer inputs, token ids, stay as they are)
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
    classes: list[str] | None = None  # class names, where the dataset has them (folder:PATH)

    def example_input(self, batch: int = 1) -> torch.Tensor:
        """A normalised input batch of the right shape (for cost counting and export)."""
        return self.val[torch.arange(min(batch, len(self.val)))][0]

    def preprocess(self) -> dict:
        """How to feed a model trained on these splits, as written into exported files and
        checkpoints (JSON): the input shape (C, H, W) of one image (of one input: splits built
        by hand may hold features or token ids), how raw inputs become values
        (``pixels``), then per channel ``(x - mean) / std`` (``normalize``; None when the run
        did not normalise), the class names where the dataset has them, and the task.
        Splits built by hand (a name that is not a dataset here) give no ``pixels``: only
        their maker knows how raw inputs became these."""
        mean, std = getattr(self.val, "mean", None), getattr(self.val, "std", None)
        try:
            pixels = dataset_entry(self.name)[0].pixels
        except ValueError:
            pixels = None
        return {
            "dataset": self.name,
            "input_shape": list(self.example_input(1).shape[1:]),  # (C, H, W) for images
            "pixels": pixels,
            "normalize": None
            if mean is None
            else {"mean": [float(v) for v in mean], "std": [float(v) for v in std]},
            "classes": list(self.classes) if self.classes is not None else None,
            "task": self.task,
        }


def load_dataset(
    name: str,
    *,
    root: str | os.PathLike | None = None,
    val_fraction: float = VAL_FRACTION,
    seed: int = 0,
    augment: bool = False,
    normalize: bool = True,
    download: bool = True,
    **kw,
) -> Splits:
    """Load a dataset as train / validation / test.

    Args:
        name: one of :func:`list_datasets`, or ``folder:PATH`` (one sub-folder per class; or
            ``train/``, ``val/``, ``test/`` sub-folders, each with one sub-folder per class).
        root: data folder (default ``$LORITA_DATA`` or ``~/.cache/lorita/data``).
        val_fraction: share of the training data held out for validation, in (0, 0.5]
            (unused when the folder has its own ``val/``).
        seed: seed of the validation carve-out (the test split is always the same).
        augment: random crop + flip on the training part (meant for CIFAR).
        normalize: standardise each channel with the training part's mean and std.
        download: allow torchvision to download when no local copy exists.
        **kw: dataset options, :func:`dataset_options` lists them with their bounds (lowrank:
            rank, dim, num_classes, n_train, ...; folder: size, channels, test_fraction).

    Raises:
        ValueError: unknown name or bad option; for a folder, no images, one class only, a
            confusing train/ val/ test/ layout, a broken link, or a file that is not a readable
            image (the message names it).
        DatasetUnavailable: files missing and no download possible.
    """
    options = validate_dataset(name, kw)
    if not isinstance(val_fraction, int | float) or not 0 < val_fraction <= 0.5:
        raise ValueError(f"val_fraction: {val_fraction!r} must be a number in (0, 0.5]")
    if not is_int(seed) or not 0 <= seed <= SEED_LIMIT:  # (a run's config.json may say "0")
        raise ValueError(f"seed: {str(seed)[:40]!r} must be an integer in [0, 2**64 - 1]")
    entry, _ = dataset_entry(name)
    raw = entry.load(name, data_root(root), download, **options)
    if raw.xv is None:
        n_val = _held_out(len(raw.x), val_fraction)
        if len(raw.x) - n_val < 1:
            raise ValueError(
                f"dataset {name!r}: {len(raw.x)} training samples are too few to hold out "
                f"a validation part"
            )
        perm = torch.randperm(len(raw.x), generator=torch.Generator().manual_seed(int(seed)))
        vi, ti = perm[:n_val].sort().values, perm[n_val:].sort().values
        x, y, xv, yv = raw.x[ti], raw.y[ti], raw.x[vi], raw.y[vi]
    else:
        x, y, xv, yv = raw.x, raw.y, raw.xv, raw.yv
    if entry.takes_path:  # your own images: say when too few are held out to measure on
        few = few_to_measure(len(xv), len(raw.xt), raw.num_classes)
        if few:
            warnings.warn(f"dataset {name!r}: {few}", stacklevel=2)
    mean = std = None
    if normalize and raw.task == "classification":
        xf = x.float() / (255.0 if x.dtype == torch.uint8 else 1.0)
        mean = xf.mean(dim=(0, 2, 3))
        std = xf.std(dim=(0, 2, 3)).nan_to_num(1.0).clamp_min(1e-6)
    common = {"mean": mean, "std": std}
    return Splits(
        train=TensorDataset(x, y, augment=augment, **common),
        val=TensorDataset(xv, yv, **common),
        test=TensorDataset(raw.xt, raw.yt, **common),
        in_channels=x.shape[1],
        image_size=x.shape[2],
        num_classes=raw.num_classes,
        name=name,
        task=raw.task,
        classes=raw.classes,
    )


def few_to_measure(n_val: int, n_test: int, num_classes: int) -> str:
    """A warning when validation or test holds fewer images than there are classes (not one
    a class: their accuracies move in steps of many points); empty otherwise."""
    if min(n_val, n_test) >= num_classes:
        return ""
    step = 100.0 / max(1, min(n_val, n_test))
    return (
        f"validation holds {n_val} image(s) and test {n_test}, for {num_classes} classes: too "
        f"few to measure accuracy on (one image is {step:.0f} points); add images, or give "
        "val/ and test/ sub-folders"
    )


# --------------------------------------------------------------------------- digits


def _digits(name: str, root: Path, download: bool) -> _Raw:
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
    return _Raw(x[tr], y[tr], x[te], y[te], num_classes=10)


def _check_digits(name: str, root: Path, download: bool) -> str:
    import importlib.util

    if importlib.util.find_spec("sklearn") is None:
        raise DatasetUnavailable("dataset 'digits' needs scikit-learn: pip install scikit-learn")
    return "shipped with scikit-learn"


# --------------------------------------------------------------------------- lowrank

_LOWRANK_OPTIONS = {
    "rank": Option(4, "rank of the teacher matrix", 1, 1024),
    "dim": Option(8, "side of the square 1-channel input", 1, 512),
    "num_classes": Option(10, "classes (or outputs for regression)", 1, 1000),
    "n_train": Option(4000, "training samples (validation is carved from them)", 1, 10**7),
    "n_test": Option(1000, "test samples", 1, 10**7),
    "noise": Option(0.1, "noise added to the teacher's outputs", 0, 100),
    "task": Option(
        "classification", "what the targets are", choices=("classification", "regression")
    ),
    "teacher_seed": Option(0, "seed of the teacher and the samples", 0, 2**63 - 1),
    "smooth": Option(0, "upsample inputs from an s x s latent (0 = off, <= dim)", 0, 512),
}


def _lowrank_bytes(**o) -> int:
    """Inputs (float32) plus the K x K x r work of spreading the teacher's rows."""
    samples = (o["n_train"] + o["n_test"]) * (o["dim"] ** 2 + o["num_classes"]) * 4
    spread = 3 * o["num_classes"] ** 2 * min(o["rank"], o["num_classes"]) * 4
    return samples + spread


def _lowrank(name: str, root: Path, download: bool, **o) -> _Raw:
    """A teacher with a planted rank: targets from ``M x + noise`` with ``rank(M) = rank``.

    Inputs are standard normal of shape (1, dim, dim) so every model accepts them. For
    classification the label is ``argmax(M x + noise)``; for regression the target is
    ``M x + noise`` itself (an output of size ``num_classes``). With ``smooth=s`` the teacher
    reads an s x s normal latent and the input is that latent upsampled (bilinear) to
    dim x dim: images with spatial structure, which convolutional networks learn quickly.
    """
    _lowrank_check_shape(o)
    sm = o["smooth"]
    side = sm or o["dim"]  # the teacher's input is side x side
    d, k, r = side * side, o["num_classes"], o["rank"]
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
    return _Raw(x, y, xt, yt, num_classes=k, task=o["task"])


def _lowrank_check_shape(o: dict) -> None:
    """The options that depend on each other (each alone is bounded by its Option)."""
    if o["smooth"] > o["dim"]:
        raise ValueError(f"lowrank smooth: {o['smooth']!r} must be an integer in [0, dim]")
    side = o["smooth"] or o["dim"]
    d, k, r = side * side, o["num_classes"], o["rank"]
    if r > min(d, k):
        raise ValueError(
            f"lowrank rank: {r} must be <= min({side}*{side}, num_classes) = {min(d, k)}"
        )
    if k < 2 and o["task"] == "classification":
        raise ValueError(
            "lowrank num_classes: a classification needs at least 2 classes (with 1 every "
            "prediction is right); use 2 or more, or task=regression for one output"
        )


def _lowrank_shape(name: str, **o) -> tuple[int, int, int]:
    return 1, o["dim"], o["num_classes"]


def _check_lowrank(name: str, root: Path, download: bool, **o) -> str:
    _lowrank_check_shape(o)
    return "generated"


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
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # a gzip cut short or damaged
        raise DatasetUnavailable(
            f"{path}: damaged or cut short ({type(e).__name__}: {e}); replace it"
        ) from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 8:
        raise DatasetUnavailable(f"{path}: not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DatasetUnavailable(f"{path}: damaged or cut short (truncated IDX file); replace it")
    return data.reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for cand in (folder / stem, folder / f"{stem}.gz"):
        if cand.is_file():
            return cand
    return None


def _idx_folders(name: str, root: Path) -> list[Path]:
    return [root / _TV_FOLDER[name] / "raw", root / name, *map(Path, _SYSTEM_DIRS[name])]


def _idx_local(name: str, root: Path) -> dict[str, list[Path]] | None:
    """The IDX files of the first folder that has all four, or None."""
    for folder in _idx_folders(name, root):
        found = {part: [_find_idx(folder, s) for s in stems] for part, stems in _IDX_FILES.items()}
        if all(p is not None for ps in found.values() for p in ps):
            return found
    return None


_ONLINE = "or run once with internet"


def _idx_put(name: str, root: Path) -> str:
    """Which files to put where for MNIST / Fashion-MNIST (said offline)."""
    folders = _idx_folders(name, root)
    where = ", ".join(str(f) for f in folders[:1] + folders[2:])
    hint = " (Debian: apt install dataset-fashion-mnist)" if name == "fashion_mnist" else ""
    return (
        f"put the four IDX files (train-images-idx3-ubyte[.gz], ...) in one of {where} (or set "
        f"LORITA_DATA to a folder that has them){hint}" + _idx_partial(name, root)
    )


def _idx_partial(name: str, root: Path) -> str:
    """'' unless a folder holds some of the four IDX files but not all: then which are missing
    there (a copy left incomplete)."""
    for folder in _idx_folders(name, root):
        stems = [s for part in _IDX_FILES.values() for s in part]
        missing = [s for s in stems if _find_idx(folder, s) is None]
        if 0 < len(missing) < len(stems):
            return (
                f" ({folder} has {len(stems) - len(missing)} of them; missing: "
                + ", ".join(f"{m}[.gz]" for m in missing)
                + ")"
            )
    return ""


def _idx_missing(name: str, root: Path) -> DatasetUnavailable:
    return DatasetUnavailable(
        f"dataset {name!r} not found and not downloadable: {_idx_put(name, root)}, {_ONLINE}"
    )


def _idx_dataset(name: str, root: Path, download: bool) -> _Raw:
    """MNIST / Fashion-MNIST from local IDX files, else a torchvision download."""
    found = _idx_local(name, root)
    if found is not None:
        out = []
        for part in ("train", "test"):
            img, lab = (_read_idx(p) for p in found[part])
            out += [torch.from_numpy(img.copy())[:, None], torch.from_numpy(lab.astype(np.int64))]
        return _Raw(*out, num_classes=10)
    if download:
        _tv_download(name, root)
        return _idx_dataset(name, root, download=False)
    raise _idx_missing(name, root)


def _idx_whole(path: Path) -> None:
    """DatasetUnavailable naming ``path`` when it is not the size its IDX header says, read
    without decompressing it (a gzip's last 4 bytes hold its unpacked size)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            dims = f.read(4 * head[3]) if len(head) == 4 else b""
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            tail = int.from_bytes(f.read(4), "little")
    except (OSError, EOFError, zlib.error, IndexError):
        tail, dims, head = -1, b"", b""
    shape = [int.from_bytes(dims[i : i + 4], "big") for i in range(0, len(dims), 4)]
    want = len(head) + len(dims) + math.prod(shape)
    have = tail if path.suffix == ".gz" else path.stat().st_size
    if len(head) != 4 or have != want % 2**32:
        raise DatasetUnavailable(f"{path}: damaged or cut short; replace it")


def _check_idx(name: str, root: Path, download: bool) -> str:
    found = _idx_local(name, root)
    if found is not None:
        for path in (p for part in found.values() for p in part):
            _idx_whole(path)
        return f"local files in {found['train'][0].parent}"
    return _download_or_raise(name, root, download, _idx_missing(name, root))


#: how check_dataset's note begins for a dataset it would download
WILL_DOWNLOAD = "not on this machine: will download"


def _download_or_raise(name: str, root: Path, download: bool, missing: Exception) -> str:
    import importlib.util

    if download and importlib.util.find_spec("torchvision") is not None:
        return f"{WILL_DOWNLOAD} into {root} (needs internet)"
    raise missing


def fetch_dataset(name: str, root: str | os.PathLike | None = None, **options) -> str:
    """Download a dataset this machine does not have (where :func:`check_dataset` says it
    would), now rather than inside a run; returns check_dataset's note for what is there.

    Raises:
        DatasetUnavailable: the download failed; the message says which files to put where."""
    note = check_dataset(name, root, **options)
    if note.startswith(WILL_DOWNLOAD):
        _tv_download(name, data_root(root))
        note = check_dataset(name, root, download=False, **options)
    return note


def _tv_download(name: str, root: Path) -> None:
    """Download through torchvision into ``root``; DatasetUnavailable saying which files to put
    where when offline (the empty folders the attempt made are removed)."""
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
    existed = _folders_in(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        for train in (True, False):
            cls(str(root), train=train, download=True)
    except Exception as e:  # noqa: BLE001 - network errors come in many types
        for folder in sorted(_folders_in(root) - existed, key=lambda f: -len(f.parts)):
            with contextlib.suppress(OSError):  # only the empty ones go
                folder.rmdir()
        instead = _cifar_put(name, root) if name.startswith("cifar") else _idx_put(name, root)
        raise DatasetUnavailable(
            f"dataset {name!r}: download into {root} failed ({type(e).__name__}: {e}); "
            f"without internet, {instead}"
        ) from e
    finally:
        socket.setdefaulttimeout(old)


def _folders_in(root: Path) -> set[Path]:
    """``root`` and the folders under it (an empty set when it does not exist)."""
    if not root.is_dir():
        return set()
    return {root, *(p for p in root.rglob("*") if p.is_dir() and not p.is_symlink())}


# --------------------------------------------------------------------------- CIFAR


def _cifar_names(name: str) -> tuple[str, str, str]:
    """(binary folder, binary archive, torchvision's python folder) of CIFAR-10 or -100."""
    if name == "cifar10":
        return "cifar-10-batches-bin", "cifar-10-binary.tar.gz", "cifar-10-batches-py"
    return "cifar-100-binary", "cifar-100-binary.tar.gz", "cifar-100-python"


def _cifar_local(name: str, root: Path) -> tuple[str, Path] | None:
    """("bin" | "archive" | "py", path) of the first local copy, or None."""
    bin_dir, archive, py_dir = _cifar_names(name)
    folders = [root, root / name, *map(Path, _SYSTEM_DIRS[name])]
    for folder in folders:
        if (folder / bin_dir).is_dir():
            return "bin", folder / bin_dir
        if (folder / archive).is_file():
            return "archive", folder / archive
    for folder in folders:
        if (folder / py_dir).is_dir():
            return "py", folder
    return None


def _cifar_put(name: str, root: Path) -> str:
    """Which files to put where for CIFAR-10 / CIFAR-100 (said offline)."""
    bin_dir, archive, py_dir = _cifar_names(name)
    return (
        f"put {bin_dir}/ (or {archive}, or torchvision's {py_dir}/) in {root} (or set "
        "LORITA_DATA to a folder that has it)"
    )


def _cifar_missing(name: str, root: Path) -> DatasetUnavailable:
    return DatasetUnavailable(
        f"dataset {name!r} not found and not downloadable: {_cifar_put(name, root)}, {_ONLINE}"
    )


def _cifar(name: str, root: Path, download: bool) -> _Raw:
    """CIFAR-10/100, preferably from the binary release (no unpickling needed)."""
    ten = name == "cifar10"
    num_classes = 10 if ten else 100
    local = _cifar_local(name, root)
    if local is not None:
        kind, path = local
        if kind == "bin":
            return _Raw(*_cifar_bin(path, ten), num_classes=num_classes)
        if kind == "archive":
            folder = _cifar_unpack(name, path, root)
            return _Raw(*_cifar_bin(folder, ten), num_classes=num_classes)
        return _Raw(*_cifar_tv(name, path), num_classes=num_classes)
    if download:
        _tv_download(name, root)
        return _Raw(*_cifar_tv(name, root), num_classes=num_classes)
    raise _cifar_missing(name, root)


def _cifar_unpack(name: str, archive: Path, root: Path) -> Path:
    """Unpack the binary release ``archive`` into ``root``; returns its folder. Unpacked in a
    hidden folder beside it, then moved into place by one rename: a process killed while it
    unpacks leaves no half-unpacked folder that every later load would take as the dataset
    (the next load unpacks again, and removes what the killed one left)."""
    import shutil

    from .io import fault, temp_beside

    final = root / _cifar_names(name)[0]
    root.mkdir(parents=True, exist_ok=True)
    work = temp_beside(final, ".unpack")  # (the unpacking of a killed process is removed)
    shutil.rmtree(work, ignore_errors=True)
    try:
        with tarfile.open(archive) as t:
            for member in t:
                t.extract(member, work, filter="data")
                fault("cifar_unpack")
        try:
            os.rename(work / final.name, final)
        except FileNotFoundError:
            raise DatasetUnavailable(
                f"dataset {name!r}: {archive} holds no {final.name}/ folder; {_cifar_put(name, root)}"
            ) from None
        except OSError:
            if not final.is_dir():  # (else: unpacked by another process meanwhile)
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def _check_cifar(name: str, root: Path, download: bool) -> str:
    local = _cifar_local(name, root)
    if local is not None:
        return f"local files in {local[1]}"
    return _download_or_raise(name, root, download, _cifar_missing(name, root))


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
            raw = np.fromfile(p, dtype=np.uint8)
            if raw.size % (lab_bytes + 3072):  # a copy or an unpacking cut short
                raise DatasetUnavailable(
                    f"CIFAR file cut short or damaged: {p} holds {raw.size} bytes, not a whole "
                    f"number of {lab_bytes + 3072}-byte records; remove {folder} and put it "
                    "there again (or the release's archive in its place)"
                )
            recs.append(raw.reshape(-1, lab_bytes + 3072))
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


# --------------------------------------------------------------------------- folder:PATH

_FOLDER_OPTIONS = {
    "size": Option(32, "images are resized and centre-cropped to size x size", 4, 512),
    "channels": Option(3, "3 = colour (RGB), 1 = grey", choices=(1, 3)),
    "test_fraction": Option(
        0.2, "share held out for test when there is no test/ sub-folder", 0.05, 0.5
    ),
}
_TEST_SEED = 20240  # the carved test part never moves with the run's seeds


@dataclass
class _FolderScan:
    """The files of an image folder, by part, with their class index."""

    root: Path
    classes: list[str]
    parts: dict[str, list[tuple[Path, int]]]  # "train" | "val" | "test" -> [(file, label)]
    loose: tuple[Path, ...] = ()  # images beside the class folders: in no class, left out

    def count(self) -> int:
        return sum(len(v) for v in self.parts.values())


def _folder_path(name: str) -> Path:
    return expand_path(dataset_entry(name)[1], "dataset")


def _scan_folder(name: str) -> _FolderScan:
    """List the images of ``folder:PATH`` without opening them; clear errors for bad layouts."""
    root = _folder_path(name)
    try:
        if not root.is_dir():
            what = "is not a folder" if root.exists() else "does not exist"
            raise DatasetUnavailable(
                f"dataset {name!r}: {root} {what}; make a folder with one sub-folder of images "
                f"per class (or train/, val/, test/ sub-folders, each with one per class)"
            )
        top = _subdirs(root)
        splits = [p for p in _SPLITS if p in top]
        if splits:
            _check_split_layout(name, root, top, splits)
            train_dir = root / "train"
            classes = _class_dirs(name, train_dir)
            parts = {"train": _class_files(name, train_dir, classes, classes)}
            for part in ("val", "test"):
                if part in splits:
                    sub = _subdirs(root / part)
                    if not sub:
                        raise DatasetUnavailable(
                            f"dataset {name!r}: {root / part}/ has no class folders with "
                            f"images; put its images in {part}/<class>/ with the classes of "
                            f"train/ ({_some(classes)}), or remove {part}/"
                        )
                    parts[part] = _class_files(name, root / part, sub, classes)
        else:
            classes = _class_dirs(name, root)
            parts = {"train": _class_files(name, root, classes, classes)}
        holders = [root / p for p in splits] if splits else [root]
        loose = tuple(f for d in holders for f in sorted(d.iterdir()) if _is_image_file(f))
    except PermissionError as e:
        raise DatasetUnavailable(f"dataset {name!r}: {e.filename} is not readable") from None
    except OSError as e:  # a name too long, an unreachable mount...
        where = str(e.filename or root)
        where = where if len(where) <= 120 else where[:117] + "..."
        raise DatasetUnavailable(f"dataset: {where} cannot be read ({e.strerror})") from None
    return _FolderScan(root, classes, parts, loose)


def _is_image_file(path: Path) -> bool:
    return _image_name(path.name) and path.is_file()


def _image_name(name: str) -> bool:
    """Whether a file called ``name`` is taken as an image (not hidden, an image extension)."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


_SPLITS = ("train", "val", "test")


def _some(names: list[str], k: int = 10) -> str:
    return ", ".join(names[:k]) + (", ..." if len(names) > k else "")


def _check_split_layout(name: str, root: Path, top: list[str], splits: list[str]) -> None:
    """A folder with train/, val/ or test/ holds nothing else, and has a train/."""
    if "train" not in splits:
        have = " and ".join(f"{p}/" for p in splits)
        raise DatasetUnavailable(
            f"dataset {name!r}: {root} has {have} but no train/ folder; put the training "
            f"images in train/<class>/ beside {splits[0]}/ (or, without train/, val/ and "
            f"test/, use one sub-folder per class)"
        )
    others = [d for d in top if d not in _SPLITS]
    if others:
        raise DatasetUnavailable(
            f"dataset {name!r}: {root} has train/ and also other folders ({_some(others)}): "
            f"put the classes inside train/ (and val/, test/), or remove train/"
        )


def _subdirs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _class_dirs(name: str, folder: Path) -> list[str]:
    classes = _subdirs(folder)
    for c in classes:  # class names are kept in the run's files and the exported model's
        _check_utf8(f"dataset {name!r}: the class folder {folder / c}", c, DatasetUnavailable)
    if len(classes) < 2:
        found = f"only one class folder ({classes[0]!r})" if classes else "no class folders"
        raise DatasetUnavailable(
            f"dataset {name!r}: {folder} has {found}; a classifier needs at least 2: put the "
            f"images of each class in their own sub-folder"
        )
    return classes


def _images_under(name: str, folder: Path) -> list[Path]:
    """The image files under ``folder`` (sub-folders too, not followed through links), sorted;
    a link to nothing (or to something that is not a file) is refused by name."""
    out = []
    with os.scandir(folder) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        if e.name.startswith("."):
            continue
        if e.is_dir(follow_symlinks=False):
            out += _images_under(name, Path(e.path))
        elif _image_name(e.name):
            if not e.is_file():  # follows a link: false for a broken one
                if e.is_dir():
                    continue  # a linked folder is not walked (as before)
                what = "a broken link (or unreadable)"
                if os.path.exists(e.path):  # a pipe would block a reader, a device never end
                    what = "not a regular file (a pipe or a device): remove it from the folder"
                raise DatasetUnavailable(f"dataset {name!r}: {e.path} is {what}")
            out.append(Path(e.path))
    return out


def _class_files(
    name: str, folder: Path, subdirs: list[str], classes: list[str]
) -> list[tuple[Path, int]]:
    """Every image under ``folder/<class>/`` with its class index; each class must have one."""
    out = []
    for c in subdirs:
        if c not in classes:
            raise DatasetUnavailable(
                f"dataset {name!r}: {folder / c} is not a class of the training part "
                f"({_some(classes)})"
            )
        files = _images_under(name, folder / c)
        if not files:
            raise DatasetUnavailable(
                f"dataset {name!r}: {folder / c} has no images "
                f"({', '.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)})"
            )
        out += [(f, classes.index(c)) for f in files]
    return out


def _to_8bit(im):
    """A 16-bit, 32-bit integer or float grey image as an 8-bit one ("L"), its range scaled
    (``convert`` would clip every value above 255); other images unchanged. 16-bit modes are
    divided by 257; 32-bit integers the same when they fit 16 bits, else by their own maximum;
    floats in [0, 1] are multiplied by 255, others stretched from their own min..max."""
    from PIL import Image

    mode = im.mode
    if not (mode.startswith("I;16") or mode in ("I", "F")):
        return im
    w, h = im.size
    rows = max(1, (1 << 18) // max(1, w))  # a band of about 260,000 values at a time:

    def bands():  # an image at Pillow's pixel limit is never copied whole (GBs in float64)
        for i in range(0, h, rows):
            band = np.asarray(im.crop((0, i, w, min(h, i + rows)))).astype(np.float64)
            yield i, np.nan_to_num(band, nan=0.0, posinf=0.0, neginf=0.0)  # (rows, W)

    lo, hi = 0.0, 0.0
    if mode in ("I", "F") and w * h:
        ranges = [(float(b.min()), float(b.max())) for _, b in bands()]
        lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
    out = np.empty((h, w), dtype=np.uint8)
    for i, b in bands():
        if mode.startswith("I;16"):
            b = b / 257
        elif mode == "I":
            b = b / 257 if hi <= 65535 else b * (255 / hi)
        elif lo >= 0 and hi <= 1:
            b = b * 255
        else:
            b = (b - lo) * (255 / (hi - lo)) if hi > lo else np.zeros_like(b)
        out[i : i + rows] = np.clip(np.rint(b), 0, 255)
    return Image.fromarray(out, "L")


@contextlib.contextmanager
def _file_warnings(name: str, path: Path):
    """Pillow's warnings about one file (more pixels than its decompression-bomb limit, ...)
    said again with the file's name, which Pillow's own text leaves out."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        warnings.warn(f"dataset {name!r}: {path}: {w.message}", w.category, stacklevel=3)


def _read_image(name: str, path: Path, size: int, channels: int) -> np.ndarray:
    """One image as (C, size, size) uint8: resized (shorter side) and centre-cropped. 16-bit and
    float images are scaled to 8 bits first (:func:`_to_8bit`)."""
    from PIL import Image, ImageOps

    mode = "RGB" if channels == 3 else "L"
    try:
        with _file_warnings(name, path), Image.open(path) as opened:
            opened.draft(mode, (size, size))  # JPEG: decode at a reduced scale when possible
            im = _to_8bit(opened)
            if im is not opened:
                opened.close()  # (its 16 or 32 bits a pixel are not kept beside the 8)
            if im.mode == "P" and "transparency" in im.info:
                im = im.convert("RGBA")  # as Pillow asks of such a palette (else it warns)
            if im.mode == "L":  # grey resized, then made RGB: the same pixels, 4x less memory
                im = ImageOps.fit(im, (size, size), Image.Resampling.BILINEAR).convert(mode)
            else:
                im = ImageOps.fit(im.convert(mode), (size, size), Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except Exception as e:  # noqa: BLE001 - a broken or hostile file fails in many ways
        why = str(e) or ("too large to decode here" if isinstance(e, MemoryError) else "")
        raise DatasetUnavailable(
            f"dataset {name!r}: {path} is not a readable image ({type(e).__name__}: {why})"
        ) from None
    return arr.reshape(size, size, channels).transpose(2, 0, 1)


def _check_headers(name: str, scan: _FolderScan) -> None:
    """Every listed file is non-empty and opens as an image (its header only: a file whose
    pixels are cut short still fails later, at decoding, by name). About 0.1 ms a file."""
    from PIL import Image

    for files in scan.parts.values():
        for path, _ in files:
            try:
                if path.stat().st_size == 0:
                    raise DatasetUnavailable(
                        f"dataset {name!r}: {path} is empty (0 bytes), not a readable image"
                    )
                with _file_warnings(name, path), Image.open(path):
                    pass
            except DatasetUnavailable:
                raise
            except Exception as e:  # noqa: BLE001 - a broken or hostile file fails in many ways
                raise DatasetUnavailable(
                    f"dataset {name!r}: {path} is not a readable image ({type(e).__name__}: {e})"
                ) from None


def _read_part(name: str, files: list[tuple[Path, int]], size: int, channels: int):
    x = np.empty((len(files), channels, size, size), dtype=np.uint8)  # (N, C, S, S)
    for i, (path, _) in enumerate(files):
        x[i] = _read_image(name, path, size, channels)
    y = torch.tensor([label for _, label in files], dtype=torch.long)
    return torch.from_numpy(x), y


def _folder_refuse_if_too_big(name: str, scan: _FolderScan, size: int, channels: int) -> None:
    n = scan.count()
    _refuse_if_too_big(name, n * channels * size * size, f"{n} images at {size}x{size}")


def _carve(n: int, share: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(held-out indices, kept indices), each sorted; at least one held out."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = _held_out(n, share)
    return perm[:k].sort().values, perm[k:].sort().values


def _held_out(n: int, share: float) -> int:
    """How many of ``n`` samples a split holding out ``share`` of them takes (at least one)."""
    return max(1, int(round(n * share)))


_CACHE_VERSION = 2  # 2: 16-bit and float images scaled, not clipped


def _cache_key(name: str, scan: _FolderScan, size: int, channels: int) -> str:
    """A digest of every file's path, size and modification time and the decoding options."""
    import hashlib

    h = hashlib.sha256(f"{_CACHE_VERSION}|{scan.root}|{size}|{channels}".encode())
    for part, files in sorted(scan.parts.items()):
        for path, label in files:
            try:
                st = path.stat()
            except OSError:
                raise DatasetUnavailable(
                    f"dataset {name!r}: {path} is a broken link (or unreadable)"
                ) from None
            line = f"|{part}|{path}|{label}|{st.st_size}|{st.st_mtime_ns}"
            h.update(line.encode("utf-8", "surrogateescape"))  # a file name's own bytes
    return h.hexdigest()[:32]


def _read_cache(cache: Path, scan: _FolderScan, size: int, channels: int) -> dict | None:
    """The parts kept in ``cache``, or None when it is missing, damaged (cut short, emptied
    by a crash, bit rot: any failure to read it) or not of the expected shapes: decode."""
    try:
        with np.load(cache, allow_pickle=False) as z:
            parts = {
                p: (torch.from_numpy(z[f"{p}_x"]), torch.from_numpy(z[f"{p}_y"]))
                for p in scan.parts
            }
    except Exception:  # noqa: BLE001 - EOFError, BadZipFile, zlib.error, ... all mean decode
        return None
    for p, (x, y) in parts.items():
        n = len(scan.parts[p])
        if x.dtype != torch.uint8 or tuple(x.shape) != (n, channels, size, size):
            return None
        if y.dtype != torch.long or tuple(y.shape) != (n,):
            return None
    return parts


def _decoded_parts(name: str, scan: _FolderScan, size: int, channels: int, root: Path) -> dict:
    """``{part: (x, y)}``, decoded once and kept in ``<data>/folder-cache/`` (plain .npz
    arrays, read without pickle); any change to a file, or to size/channels, decodes again.
    One file is kept per folder, size and channels: writing it removes the one it replaces."""
    prefix = _cache_prefix(scan, size, channels)
    cache = root / "folder-cache" / f"{prefix}-{_cache_key(name, scan, size, channels)}.npz"
    kept = _read_cache(cache, scan, size, channels)
    if kept is not None:
        return kept
    parts = {p: _read_part(name, files, size, channels) for p, files in scan.parts.items()}
    arrays = {f"{p}_{k}": t.numpy() for p, xy in parts.items() for k, t in zip("xy", xy)}
    with contextlib.suppress(OSError):  # a read-only data folder only costs the decoding
        from .io import atomic_write_bytes, remove_dead_temps

        buf = io.BytesIO()
        np.savez(buf, **arrays)
        cache.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_temps(cache.parent)  # of a decoding killed while it wrote, any key
        atomic_write_bytes(cache, buf.getvalue(), sync=False)
        for old in cache.parent.iterdir():  # this folder's older decodings, and unnamed ones
            stale = old.name.startswith(f"{prefix}-") or _UNNAMED_CACHE.fullmatch(old.name)
            if stale and old != cache:
                old.unlink(missing_ok=True)
    return parts


_UNNAMED_CACHE = re.compile(r"[0-9a-f]{32}\.npz")  # before the folder's prefix was in the name


def _cache_prefix(scan: _FolderScan, size: int, channels: int) -> str:
    """Which folder, size and channels a cache file holds (the start of its name)."""
    import hashlib

    return hashlib.sha256(f"{scan.root}|{size}|{channels}".encode()).hexdigest()[:16]


def _folder(name: str, root: Path, download: bool, **o) -> _Raw:
    """Your own images: one sub-folder per class (or train/, val/, test/ sub-folders)."""
    scan = _scan_folder(name)
    size, channels = o["size"], o["channels"]
    _folder_refuse_if_too_big(name, scan, size, channels)
    parts = _decoded_parts(name, scan, size, channels, root)
    x, y = parts["train"]
    if "test" in scan.parts:
        xt, yt = parts["test"]
    else:
        if len(x) < 3:
            raise DatasetUnavailable(
                f"dataset {name!r}: {len(x)} images are too few for train, validation and test"
            )
        te, tr = _carve(len(x), o["test_fraction"], _TEST_SEED)
        x, y, xt, yt = x[tr], y[tr], x[te], y[te]
    xv, yv = parts.get("val", (None, None))
    return _Raw(x, y, xt, yt, len(scan.classes), xv=xv, yv=yv, classes=scan.classes)


def training_count(name: str, val_fraction: float = VAL_FRACTION, **options) -> int | None:
    """How many samples a dataset leaves for training once validation (``val_fraction``) and
    test are held out, without decoding anything: a folder's from its listing, a dataset sized
    by its ``n_train`` option from that; None for the fixed datasets, which have thousands."""
    full = validate_dataset(name, options)
    entry, _ = dataset_entry(name)
    if "n_train" in full:
        return full["n_train"] - _held_out(full["n_train"], val_fraction)
    if not entry.takes_path:
        return None
    n = {k: len(v) for k, v in _scan_folder(name).parts.items()}
    return _split_counts(n, full["test_fraction"], val_fraction)[0]


def _split_counts(
    n: dict[str, int], test_fraction: float, val_fraction: float = VAL_FRACTION
) -> tuple[int, int, int]:
    """(train, validation, test) images of a folder whose sub-folders hold ``n`` (a ``train``
    count, and ``val`` / ``test`` where it has them): what is not in a sub-folder of its own
    is carved out of train, test first, as loading does."""
    n_test = n.get("test") or _held_out(n["train"], test_fraction)
    n_val = n.get("val") or _held_out(n["train"] - (0 if "test" in n else n_test), val_fraction)
    left = n["train"] - (0 if "test" in n else n_test) - (0 if "val" in n else n_val)
    return max(0, left), n_val, n_test


def _folder_shape(name: str, **o) -> tuple[int, int, int]:
    return o["channels"], o["size"], len(_scan_folder(name).classes)


def _check_folder(name: str, root: Path, download: bool, **o) -> str:
    """The layout, the memory estimate, then every file's header (no pixels are decoded)."""
    scan = _scan_folder(name)
    _folder_refuse_if_too_big(name, scan, o["size"], o["channels"])
    _check_headers(name, scan)
    n = {k: len(v) for k, v in scan.parts.items()}
    parts = ", ".join(f"{k} {v}" for k, v in n.items())
    note = f"folder {scan.root}: {len(scan.classes)} classes, {scan.count()} images ({parts})"
    _, n_val, n_test = _split_counts(n, o["test_fraction"])
    few = few_to_measure(n_val, n_test, len(scan.classes))
    if few:
        note += "; " + few.replace("validation holds", "validation would hold about", 1)
    if scan.loose:
        note += (
            f"; {len(scan.loose)} image(s) beside the class folders (e.g. {scan.loose[0]}) are "
            "in no class and are left out"
        )
    return note


# --------------------------------------------------------------------------- the registry


def _fixed(channels: int, size: int, classes: int) -> Callable[..., tuple[int, int, int]]:
    return lambda name, **o: (channels, size, classes)


_EIGHT_BIT = "8-bit pixel values divided by 255"

_REGISTRY: dict[str, DatasetEntry] = {
    e.name: e
    for e in (
        DatasetEntry(
            "digits",
            "1,797 8x8 grey digits, 10 classes",
            "shipped with scikit-learn: no download",
            _digits,
            _check_digits,
            shape=_fixed(1, 8, 10),
            pixels="8x8 grey values 0-16 (scikit-learn's load_digits) divided by 16",
        ),
        DatasetEntry(
            "lowrank",
            "synthetic teacher with a planted rank: labels argmax(M x + noise), rank(M) = r",
            "generated",
            _lowrank,
            _check_lowrank,
            _LOWRANK_OPTIONS,
            _lowrank_bytes,
            shape=_lowrank_shape,
            pixels="synthetic vectors, used as generated",
        ),
        DatasetEntry(
            "mnist",
            "70,000 28x28 grey digits, 10 classes",
            "local IDX files, else torchvision download",
            _idx_dataset,
            _check_idx,
            shape=_fixed(1, 28, 10),
            pixels=_EIGHT_BIT,
        ),
        DatasetEntry(
            "fashion_mnist",
            "70,000 28x28 grey clothing images, 10 classes",
            "local IDX files, else torchvision download",
            _idx_dataset,
            _check_idx,
            shape=_fixed(1, 28, 10),
            pixels=_EIGHT_BIT,
        ),
        DatasetEntry(
            "cifar10",
            "60,000 32x32 colour images, 10 classes",
            "local binary files, else torchvision download",
            _cifar,
            _check_cifar,
            shape=_fixed(3, 32, 10),
            pixels=_EIGHT_BIT,
        ),
        DatasetEntry(
            "cifar100",
            "60,000 32x32 colour images, 100 classes",
            "local binary files, else torchvision download",
            _cifar,
            _check_cifar,
            shape=_fixed(3, 32, 100),
            pixels=_EIGHT_BIT,
        ),
        DatasetEntry(
            "folder",
            "your images: one sub-folder per class (or train/, val/, test/ sub-folders)",
            "the folder PATH",
            _folder,
            _check_folder,
            _FOLDER_OPTIONS,
            takes_path=True,
            shape=_folder_shape,
            pixels="each image converted to RGB (L for channels=1), resized on its shorter side "
            "to the size option (bilinear) and centre-cropped square, 8-bit values divided by 255",
        ),
    )
}


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
