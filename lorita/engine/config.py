"""TrainConfig: everything that defines a training run, with its help text and bounds.

Each field carries its documentation in ``dataclasses`` field metadata, so the command line and
the app build their inputs from it without reading source code::

    for f in dataclasses.fields(TrainConfig):
        f.metadata["help"], f.metadata["kind"], f.metadata.get("min"), f.metadata.get("max")

Metadata keys: ``help`` (one line), ``kind`` (int, float, bool, str, dict, list), ``min`` /
``max`` (inclusive bounds; ``min_open`` / ``max_open`` make them exclusive), ``choices`` (a
tuple, or a function returning the allowed values), ``nullable`` (None allowed). Validation
(:func:`validate`, run by ``__post_init__``) is driven by the same metadata, and every failure
is a ValueError naming the field, the value and what is allowed. The upper bounds keep a run
within a workstation's means.
"""

from __future__ import annotations

import difflib
import functools
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .. import data as data_mod
from .. import models as models_mod
from ..checks import is_int, is_num
from ..kinds import INITS
from ..kinds import INNER_CHOICES as INNER

__all__ = [
    "AMP_MODES",
    "DEVICES",
    "INITS",
    "INNER",
    "OPTIMIZERS",
    "SCHEDULES",
    "TrainConfig",
    "UnknownFieldError",
    "format_options",
    "parse_options",
    "read_config_file",
    "validate",
]

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "step", "plateau", "none")
AMP_MODES = ("auto", "bf16", "off")
DEVICES = ("auto", "cpu", "cuda", "mps")  # and "cuda:<index>"
SEED_MAX = 2**32 - 1  # numpy's seed range
MAX_JSON_OPTIONS = 64  # keys in dataset_kwargs / model_kwargs
MAX_PATH = data_mod.MAX_PATH_CHARS  # (the data module owns it: folder paths too)


def _opt(default: Any, help: str, kind: str, **meta: Any) -> Any:
    """A dataclass field with its help text, kind and bounds in the metadata."""
    md = {"help": help, "kind": kind, **meta}
    if isinstance(default, dict | list):
        return field(default_factory=lambda d=default: type(d)(d), metadata=md)
    return field(default=default, metadata=md)


# Model options when a config names none. The classroom MLP is 512 wide: at 256, BatchNorm, the
# biases and the uncut head alone take 64% of a 5% parameter budget (docs/classroom.md).
CLASSROOM_MODEL_KWARGS: dict[str, dict] = {"mlp": {"width": 512}}
#: batch_size 0 (automatic): examples per step, by the device a run trains on
AUTO_BATCH: dict[str, int] = {"cuda": 512, "cpu": 128}


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved as the run's config.json).

    The defaults are the classroom run: digits, MLP, N=3, a few seconds on a laptop CPU.
    """

    # data
    dataset: str = _opt(
        "digits", "dataset name (lorita.data.list_datasets() or folder:PATH)", "str"
    )
    dataset_kwargs: dict = _opt({}, "dataset options (lowrank: rank, ...)", "dict")
    val_fraction: float = _opt(
        data_mod.VAL_FRACTION,
        "share of the training data held out for validation",
        "float",
        min=0,
        max=0.5,
        min_open=True,
    )
    split_seed: int = _opt(0, "seed of the validation carve-out", "int", min=0, max=SEED_MAX)
    augment: bool = _opt(False, "random crop + horizontal flip on training batches", "bool")
    normalize: bool = _opt(True, "standardise channels with the training mean/std", "bool")
    # model
    model: str = _opt(
        "mlp", "model name (lorita.models.list_models(), torchvision:NAME, ...)", "str"
    )
    model_kwargs: dict = _opt(
        None,
        "model options (mlp: depth, width, ...); left out: the model's classroom options",
        "dict",
    )
    n_factors: int = _opt(
        3,
        "N: each composed weight is a product of N factors; 1 = ordinary network",
        "int",
        min=1,
        max=10,
    )
    init: str = _opt(
        "balanced",
        "factor init: balanced (same start as N=1) or independent",
        "str",
        choices=INITS,
    )
    inner: str | None = _opt(
        None,
        "factor inner width: null/min = min(in, out), paper = the authors'",
        "str",
        choices=INNER,
        nullable=True,
    )
    skip: list[str] | None = _opt(
        None,
        "layer names/patterns left uncomposed; null = the model's default",
        "list",
        nullable=True,
    )
    plain_epochs: int = _opt(
        0,
        "epochs the plain network trains before it is composed into N factors (balanced: the "
        "same function); optimizer and schedule start again for the remaining epochs; 0 = "
        "composed from the start; ignored for N=1",
        "int",
        min=0,
        max=9_999,
    )
    init_from: str | None = _opt(
        None,
        "start from these weights (safetensors or a PyTorch state_dict file; on the command "
        "line also a run, by name or folder: its best checkpoint)",
        "str",
        nullable=True,
    )
    # optimisation
    optimizer: str = _opt(
        "adam",
        "sgd or adam: decay is a true L2 penalty; adamw: decoupled",
        "str",
        choices=OPTIMIZERS,
    )
    lr: float = _opt(3e-3, "peak learning rate", "float", min=0, max=10, min_open=True)
    composed_lr_scale: float = _opt(
        1.0,
        "the composed network's peak learning rate as a multiple of lr (a product of N "
        "factors moves about N times faster than one weight; the plain epochs and N=1 train "
        "at lr)",
        "float",
        min=0,
        max=10,
        min_open=True,
    )
    momentum: float = _opt(0.9, "SGD momentum", "float", min=0, max=1, max_open=True)
    weight_decay: float = _opt(
        5e-3,
        "L2 on every parameter, every factor included (the LoRITa knob)",
        "float",
        min=0,
        max=1,
    )
    schedule: str = _opt(
        "cosine",
        "cosine (per step, to 0), step (x0.1 at 50%, 75%), plateau, none",
        "str",
        choices=SCHEDULES,
    )
    warmup: float = _opt(
        0.0,
        "share of the steps with a linear learning-rate warm-up from lr/100 (0 = none)",
        "float",
        min=0,
        max=0.5,
    )
    epochs: int = _opt(15, "passes over the training split", "int", min=1, max=10_000)
    batch_size: int = _opt(
        64,
        "global batch (split across processes under torchrun); 0 = auto",
        "int",
        min=0,
        max=65_536,
    )
    label_smoothing: float = _opt(
        0.0, "cross-entropy label smoothing", "float", min=0, max=1, max_open=True
    )
    grad_clip: float = _opt(
        0.0, "clip the gradient norm to this (0 = off)", "float", min=0, max=1e6
    )
    max_steps: int = _opt(0, "stop after this many steps (0 = all epochs)", "int", min=0, max=10**9)
    seed: int = _opt(
        0, "seeds initialisation, shuffling and augmentation", "int", min=0, max=SEED_MAX
    )
    # hardware
    device: str = _opt(
        "auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:<index>, mps", "str"
    )
    amp: str = _opt(
        "auto", "auto (bf16 autocast on CUDA only), bf16, off", "str", choices=AMP_MODES
    )
    num_workers: int = _opt(
        0, "DataLoader worker processes (0 is usually best)", "int", min=0, max=64
    )
    # logging
    spectra_every: int = _opt(
        10,
        "steps between spectra snapshots (0 = only at start and end)",
        "int",
        min=0,
        max=10**9,
    )
    spectra_budget: float = _opt(
        0.05,
        "skip a snapshot when snapshots would exceed this share of time",
        "float",
        min=0,
        max=1,
        min_open=True,
    )
    eval_every: int = _opt(
        0, "steps between validation passes (0 = once per epoch)", "int", min=0, max=10**9
    )
    log_every: int = _opt(
        10, "steps between training-loss lines in metrics.jsonl", "int", min=1, max=10**9
    )

    def __post_init__(self) -> None:
        if self.model_kwargs is None:  # not given: the options this model's classroom run uses
            classroom = (
                CLASSROOM_MODEL_KWARGS.get(self.model) if isinstance(self.model, str) else None
            )
            self.model_kwargs = dict(classroom or {})  # (a model that is not a name: validate)
        validate(self)

    def to_dict(self) -> dict:
        return asdict(self)

    def batch_for(self, cuda: bool) -> int:
        """The batch size a run uses: ``batch_size``, or with 0 :data:`AUTO_BATCH`'s for the
        device it trains on."""
        return self.batch_size or AUTO_BATCH["cuda" if cuda else "cpu"]

    def batch_per_process(self, cuda: bool, world: int) -> int:
        """Each process's share of the batch under torchrun (``world`` processes): the batch
        is the global one, so a given ``batch_size`` must split evenly (else a ValueError
        names it); the automatic one is rounded down to a multiple of ``world``."""
        batch = self.batch_for(cuda)
        if batch % world == 0 or not self.batch_size:
            return max(1, batch // world)
        lower = batch - batch % world
        some = f"{lower} or {lower + world}" if lower else str(world)
        raise ValueError(
            f"batch_size: {batch} does not split evenly between the {world} processes of this "
            f"run (torchrun); it is the global batch, each process takes an equal share: use a "
            f"multiple of {world} (e.g. {some})"
        )

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Build from a dict (e.g. config.json); unknown keys are an error."""
        if isinstance(d, TrainConfig):
            return d
        if not isinstance(d, dict):
            raise ValueError(f"config: expected a JSON object, got {type(d).__name__}")
        _check_names(d, "config")
        return cls(**d)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> TrainConfig:
        return cls.from_dict(read_config_file(path))


class UnknownFieldError(ValueError, TypeError):
    """A TrainConfig field that does not exist (``TrainConfig(lr_max=1)``, a config.json key):
    a ValueError like every other bad field, and a TypeError like any unexpected keyword."""


def _check_names(given: Any, where: str) -> None:
    """UnknownFieldError naming the keys of ``given`` that are no TrainConfig field, the
    closest field to each, and every allowed one."""
    names = [f.name for f in fields(TrainConfig)]
    unknown = sorted(str(k) for k in set(given) - set(names))
    if not unknown:
        return
    shown = unknown[:5] + (["..."] if len(unknown) > 5 else [])
    close = {k: difflib.get_close_matches(k, names, n=1) for k in unknown[:5]}
    hints = "".join(f"; {k!r}: did you mean {m[0]!r}?" for k, m in close.items() if m)
    raise UnknownFieldError(
        f"{where}: unknown field(s) {shown}{hints}; allowed: {', '.join(names)}"
    )


_dataclass_init = TrainConfig.__init__


@functools.wraps(_dataclass_init)
def _init(self: TrainConfig, *args: Any, **kwargs: Any) -> None:
    _check_names(kwargs, "TrainConfig")  # before the dataclass's bare "unexpected keyword"
    _dataclass_init(self, *args, **kwargs)


TrainConfig.__init__ = _init  # type: ignore[method-assign]


def read_config_file(path: str | os.PathLike) -> Any:
    """The JSON value of a config file (at most 1 MB), read once: a caller that wants both the
    keys the file gives and the config they make reads the file here, then builds with
    :meth:`TrainConfig.from_dict`. ValueError naming the file when it is missing or not JSON."""
    try:
        with open(path, "rb") as f:
            raw = f.read(1_000_001)
        if len(raw) > 1_000_000:
            raise ValueError(f"config: file {str(path)!r} is larger than 1 MB")
        return json.loads(raw)
    except FileNotFoundError:
        raise ValueError(f"config: file {str(path)!r} not found") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        why = type(e).__name__ if isinstance(e, RecursionError) else str(e)
        raise ValueError(f"config: file {str(path)!r} is not readable JSON ({why})") from None


# --------------------------------------------------------------------------- options as text

_OPTION_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_MAX_OPTIONS_TEXT = 20_000


def _split_items(text: str) -> list[str]:
    """``"a=1, b=[1, 2]"`` -> ``["a=1", "b=[1, 2]"]``: items end at a comma or a new line
    outside brackets and double quotes."""
    items, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote and text[i - 1] != "\\" else quote
        elif ch == '"':  # a JSON string
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth = max(0, depth - 1)
        elif ch in ",\n" and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [t.strip() for t in items if t.strip()]


def _option_value(text: str, field: str) -> Any:
    """JSON when it parses (``4``, ``0.5``, ``[1, 2]``, ``true``), else the text itself."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(f"{field}: value {text[:40]!r} is nested too deeply") from None
    except ValueError:
        return text


def parse_options(items: str | list[str] | None, field: str) -> dict[str, Any]:
    """Model or dataset options from ``key=value`` items: a list (``--model-arg`` gives one
    item per flag) or one text with the items separated by commas or new lines (the Train
    page's box; a comma inside brackets or quotes belongs to its value). ValueError naming
    ``field`` for an item that is not ``key=value``, a bad name or too many items."""
    if isinstance(items, str):
        if len(items) > _MAX_OPTIONS_TEXT:
            raise ValueError(f"{field}: {len(items)} characters; at most {_MAX_OPTIONS_TEXT}")
        items = _split_items(items)
    items = list(items or [])
    if len(items) > MAX_JSON_OPTIONS:
        raise ValueError(f"{field}: {len(items)} options given; at most {MAX_JSON_OPTIONS}")
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        shown = item if len(item) <= 60 else item[:57] + "..."
        if not sep:
            raise ValueError(f"{field}: expected key=value, got {shown!r}")
        if not _OPTION_NAME.match(key):
            raise ValueError(f"{field}: {key[:60]!r} is not an option name (letters, digits, _)")
        if not value:
            raise ValueError(f"{field}: {key}= has an empty value")
        if key in out:  # which one was meant? (the last one would win without a word)
            raise ValueError(f"{field}: {key} is given twice; give each option once")
        out[key] = _option_value(value, field)
    return out


def format_options(options: dict[str, Any] | None) -> str:
    """The text :func:`parse_options` reads back as ``options`` (``"depth=2, width=64"``)."""
    parts = []
    for key, value in (options or {}).items():
        text = value if isinstance(value, str) else json.dumps(value)
        if isinstance(value, str) and (
            _option_value(value, "") != value or _split_items(value) != [value]
        ):
            text = json.dumps(value)  # a text that would read back as a number, or as two items
        parts.append(f"{key}={text}")
    return ", ".join(parts)


# --------------------------------------------------------------------------- validation


def _bad(name: str, value: Any, allowed: str) -> ValueError:
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return ValueError(f"{name}: {shown} is not allowed; expected {allowed}")


def _range_text(md: dict) -> str:
    lo, hi = (_bound(md.get(k, d)) for k, d in (("min", -math.inf), ("max", math.inf)))
    return f"{'(' if md.get('min_open') else '['}{lo}, {hi}{')' if md.get('max_open') else ']'}"


def _bound(v: float) -> str:
    """A bound as written: an integer whole (4294967295, not 4.29497e+09), else shortest."""
    return str(v) if isinstance(v, int) and not isinstance(v, bool) else f"{v:g}"


def _in_range(v: float, md: dict) -> bool:
    lo, hi = md.get("min", -math.inf), md.get("max", math.inf)
    lo_ok = v > lo if md.get("min_open") else v >= lo
    hi_ok = v < hi if md.get("max_open") else v <= hi
    return lo_ok and hi_ok


def _check_number(name: str, v: Any, md: dict) -> int | float:
    if md["kind"] == "int":
        if not is_int(v) or not _in_range(int(v), md):
            raise _bad(name, v, f"an integer in {_range_text(md)}")
        return int(v)
    if not is_num(v) or not _in_range(float(v), md):
        raise _bad(name, v, f"a finite number in {_range_text(md)}")
    return float(v)


def _check_choice(name: str, v: Any, md: dict) -> Any:
    choices = md.get("choices")
    if choices is None:
        if not isinstance(v, str) or not v:
            raise _bad(name, v, "a non-empty string")
        return v
    allowed = tuple(choices() if callable(choices) else choices)
    if v not in allowed:
        raise _bad(name, v, "one of " + ", ".join(str(a) for a in allowed if a is not None))
    return v


def _check_field(name: str, v: Any, md: dict) -> Any:
    kind = md["kind"]
    if v is None and md.get("nullable"):
        return None
    if kind in ("int", "float"):
        return _check_number(name, v, md)
    if kind == "bool":
        if not isinstance(v, bool):
            raise _bad(name, v, "true or false")
        return v
    if kind == "dict":
        if not isinstance(v, dict) or len(v) > MAX_JSON_OPTIONS:
            raise _bad(name, v, f"a JSON object of at most {MAX_JSON_OPTIONS} options")
        v = _plain(v)
        try:  # what config.json will hold
            json.dumps(v)
        except (TypeError, ValueError, RecursionError):
            raise _bad(
                name, v, "options whose values are numbers, text, true/false or lists of them"
            ) from None
        return v
    if kind == "list":
        v = [v] if isinstance(v, str) else v
        if not isinstance(v, list | tuple) or not all(isinstance(s, str) and s for s in v):
            raise _bad(name, v, "a list of layer names or patterns, or null")
        return list(v)
    return _check_choice(name, v, md)


def _plain(v: Any) -> Any:
    """``v`` with NumPy scalars (what a loop over an array gives) as Python's own, inside
    dicts, lists and tuples too."""
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return type(v)(_plain(x) for x in v)
    return v.item() if type(v).__module__ == "numpy" and hasattr(v, "item") else v


def _check_device(dev: Any) -> None:
    ok = isinstance(dev, str) and (
        dev in DEVICES
        or (dev.startswith("cuda:") and dev[5:].isascii() and dev[5:].isdigit() and len(dev) < 10)
    )
    if not ok:
        raise _bad("device", dev, "auto, cpu, cuda, cuda:<index> or mps")


def validate(c: TrainConfig) -> None:
    """Check every field against its metadata (normalising ints/floats); ValueError if bad."""
    for f in fields(c):
        setattr(c, f.name, _check_field(f.name, getattr(c, f.name), dict(f.metadata)))
    data_mod.validate_dataset(c.dataset, c.dataset_kwargs)  # names, option bounds, memory
    allowed = models_mod.model_options(c.model)
    unknown = sorted(str(k) for k in set(c.model_kwargs) - set(allowed))
    if unknown:
        known = {"num_classes": "set by the dataset", "in_channels": "set by the dataset",
                 "image_size": "set by the dataset", "weights": "pretrained weights come "
                 "from a file: init_from (--init-from FILE) with a saved state_dict"}  # fmt: skip
        why = "; ".join(f"{k}: {known[k]}" for k in unknown if k in known)
        raise _bad(
            "model_kwargs",
            unknown,
            f"options of {c.model!r}: {', '.join(allowed)}" + (f" ({why})" if why else ""),
        )
    models_mod.check_option_types(c.model, c.model_kwargs, allowed, "model_kwargs")
    _check_device(c.device)
    if c.warmup and c.schedule == "plateau":
        raise _bad("warmup", c.warmup, "0 with schedule 'plateau' (it follows validation)")
    if c.n_factors > 1 and c.plain_epochs >= c.epochs:
        raise _bad(
            "plain_epochs",
            c.plain_epochs,
            f"fewer than epochs ({c.epochs}): the composed network needs epochs to train",
        )
    if c.init_from is not None and len(c.init_from) > MAX_PATH:
        raise _bad("init_from", c.init_from, f"a file path of at most {MAX_PATH} characters")
    if c.init_from is not None and c.n_factors > 1 and c.init != "balanced" and not c.plain_epochs:
        raise _bad(
            "init",
            c.init,
            "'balanced' with init_from (independent factors are drawn afresh: the file's "
            "weights would be thrown away)",
        )
