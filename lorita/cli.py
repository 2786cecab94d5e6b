"""The ``lorita`` command line: train | runs | compress | compare | export | stop.

    python -m lorita train --dataset digits --model mlp --factors 3 --weight-decay 5e-4
    python -m lorita train --model torchvision:resnet18 --dataset folder:~/pets --init-from r18.pt
    python -m lorita runs [--delete NAME]
    python -m lorita compress RUN --max-drop 1
    python -m lorita compare RUN --baseline RUN_N1 --budgets 5,10,20,35,50 --finetune-epochs 2
    python -m lorita export RUN --budget 10 --format onnx --out model.onnx

Everything is read from the library: the training flags, their help and their bounds from
TrainConfig's field metadata; the policies from ``lorita.truncation.POLICIES``; datasets, models
and devices from their registries. Bad input (an unknown name, a value out of its documented
bounds, an empty string, a missing or unreadable file, a model or dataset too big for this
machine) ends with exit code 2 and one line on stderr, before anything is written; a training
run that fails ends with exit code 1, one stopped before its end (Ctrl-C, SIGTERM, ``lorita
stop``) with 130. Under ``torchrun --nproc_per_node=K -m lorita train ...``
training uses DDP and rank 0 prints. ``--json`` prints one strict JSON document on stdout
(nothing there on an error); a reader that goes away (``| head``) ends no run early, and a
warning filter that makes warnings errors shows the commands' notes as warning lines.

Progress is a tqdm bar (tqdm is a dependency already; it gives the rate and time left and
redraws cleanly) on a terminal and one line per epoch otherwise. Tables are plain aligned
columns from :func:`_table`: ten lines, no extra dependency, and output that grep, awk and cut
read as they are (rich would add a run-time dependency and box drawing for two tables).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

__all__ = ["main", "build_parser", "needs_library", "UsageError"]

#: the exit code of a training run stopped before its end (Ctrl-C, SIGTERM, lorita stop), as
#: a shell's for Ctrl-C: ``lorita train ... && lorita compress ...`` goes no further
STOPPED = 130
MAX_ARG = 4096  # characters in any one argument value
MAX_MESSAGE = 500  # characters of an error line
_FLAG_NAMES = {"n_factors": ("--factors", "--n-factors")}
_NOT_FLAGS = ("dataset_kwargs", "model_kwargs")
# CLI-only numbers and their inclusive bounds
_THREADS = (1, 1024)
_CONCURRENT = (1, 1024)
#: the environment variable that sets --curves / --no-curves of ``lorita train`` (1 or 0)
CURVES_ENV = "LORITA_CURVES"
_FINETUNE_EPOCHS = (0, 1000)
_FORM_BATCH = (1, 4096)
_MAX_DROP = (0.0, 100.0)
_MAX_BUDGETS = 20


class UsageError(Exception):
    """Bad command-line input: exit 2 with one line."""


@contextlib.contextmanager
def _as_usage():
    """A ValueError raised inside (the library naming a bad value) becomes a UsageError."""
    try:
        yield
    except ValueError as e:
        raise UsageError(str(e)) from None


class _Parser(argparse.ArgumentParser):
    #: adds the rest of a command's flags when the command is first parsed or its help shown
    #: (see :func:`build_parser`); None once added
    _fill = None

    def __init__(self, *a, **kw) -> None:
        kw.setdefault("allow_abbrev", False)  # --epoch is an error, not --epochs
        super().__init__(*a, **kw)

    def filled(self) -> _Parser:
        fill, self._fill = self._fill, None
        if fill is not None:
            fill(self)
        return self

    def parse_known_args(self, args=None, namespace=None):
        return super(_Parser, self.filled()).parse_known_args(args, namespace)

    def format_usage(self) -> str:
        return super(_Parser, self.filled()).format_usage()

    def format_help(self) -> str:
        return super(_Parser, self.filled()).format_help()

    def error(self, message: str):  # one line, never the usage block
        raise UsageError(message)


# --------------------------------------------------------------------------- the library


def _engine():
    """The training engine (imported when a command needs it: ``--help`` stays quick)."""
    from . import engine

    return engine


def _config_class():
    return _engine().TrainConfig


# --------------------------------------------------------------------------- value types


def _text(flag: str, *, allow_empty: bool = False):
    """An argparse type: a string that is not empty (unless allowed) and not too long."""

    def conv(s: str) -> str:
        if not allow_empty and not s.strip():
            raise argparse.ArgumentTypeError("an empty value is not allowed")
        if len(s) > MAX_ARG:
            raise argparse.ArgumentTypeError(
                f"a value of {len(s)} characters is too long (at most {MAX_ARG})"
            )
        return s

    return conv


def _home(s: str) -> Path:
    """``s`` as a path, ``~`` expanded; an unknown ``~user`` is an argparse error naming it."""
    from .checks import expand_path

    try:
        return expand_path(s, "path")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("path: ")) from None


def _number(flag: str, kind: str, lo: float | None = None, hi: float | None = None):
    """An argparse type: an ASCII int or float, within ``[lo, hi]`` when given."""

    def conv(s: str):
        s = _text(flag)(s)
        try:
            if not s.isascii():
                raise ValueError
            v = int(s) if kind == "int" else float(s)
        except ValueError:
            expected = "an integer" if kind == "int" else "a number"
            raise argparse.ArgumentTypeError(f"{_short(s)!r} is not {expected}") from None
        if lo is not None and hi is not None and not (math.isfinite(v) and lo <= v <= hi):
            raise argparse.ArgumentTypeError(f"{_short(s)} is not in [{lo:g}, {hi:g}]")
        return v

    return conv


def _nullable(flag: str):
    """An argparse type for a field that may be null: the text ``null`` is None."""

    def conv(s: str):
        s = _text(flag)(s)
        return None if s.strip() == "null" else s

    return conv


def _short(s: str, n: int = 60) -> str:
    return s if len(s) <= n else s[: n - 3] + "..."


def _cut_middle(s: str, n: int) -> str:
    """``s`` in at most about ``n`` characters, its middle left out: a message's end is what to
    do next (a command), which a cut at the end would lose."""
    return s if len(s) <= n else f"{s[: n // 2 - 3]} ... {s[-(n // 2 - 2) :]}"


def _key_values(items: list[str] | None, flag: str) -> dict:
    from .engine.config import parse_options

    with _as_usage():
        return parse_options(items, flag)


def _out_path(flag: str):
    """An argparse type: a file path to write, whose folder exists."""

    def conv(s: str) -> Path:
        from .runs import run_folder_of

        p = _home(_text(flag)(s))
        if p.is_dir():
            raise argparse.ArgumentTypeError(f"{_short(s)!r} is a folder, not a file")
        if s.endswith(("/", os.sep)):
            raise argparse.ArgumentTypeError(f"{_short(s)!r} ends in a slash; give a file name")
        if p.is_symlink() or (p.exists() and not p.is_file()):
            # written by renaming a new file into place: a link or a device would be replaced
            raise argparse.ArgumentTypeError(
                f"{_short(s)!r} is a link or a device, not a plain file; give a file's path"
            )
        if p.parent.exists() and not p.parent.is_dir():
            raise argparse.ArgumentTypeError(f"{_short(str(p.parent))!r} is a file, not a folder")
        if not p.parent.is_dir():
            raise argparse.ArgumentTypeError(f"folder {_short(str(p.parent))!r} not found")
        if not os.access(p.parent, os.W_OK | os.X_OK):  # said now, not after the work
            raise argparse.ArgumentTypeError(
                f"folder {_short(str(p.parent))!r} is not writable; give a path you can write"
            )
        inside = run_folder_of(p.parent)
        if inside is not None:
            raise argparse.ArgumentTypeError(
                f"{_short(s)!r} is inside run folder {_short(str(inside))!r}, whose files the "
                "run store owns; write it elsewhere"
            )
        return p

    return conv


def _in_file(flag: str):
    """An argparse type: an existing readable file."""

    def conv(s: str) -> str:
        p = _home(_text(flag)(s))
        if not p.is_file():
            what = "is not a file" if p.exists() else "not found"
            raise argparse.ArgumentTypeError(f"{_short(s)!r} {what}")
        return str(p)

    return conv


def _folder_arg(flag: str):
    """An argparse type: a folder path that is not a file (it may not exist yet)."""

    def conv(s: str) -> Path:
        p = _home(_text(flag)(s))
        if p.exists() and not p.is_dir():
            raise argparse.ArgumentTypeError(f"{_short(s)!r} is not a folder")
        inside = next((a for a in p.parents if a.exists() and not a.is_dir()), None)
        if inside is not None:
            raise argparse.ArgumentTypeError(
                f"{_short(s)!r} cannot be a folder: {_short(str(inside))!r} is a file"
            )
        return p

    return conv


# --------------------------------------------------------------------------- training flags


def _field_kind(f: dataclasses.Field) -> str:
    kind = f.metadata.get("kind")
    if kind:
        return kind
    t = str(f.type)
    for k in ("bool", "int", "float", "dict", "list"):
        if t.startswith(k):
            return k
    return "str"


def _choices_text(md) -> str:
    choices = md.get("choices")
    if choices is None:
        return ""
    values = choices() if callable(choices) else choices
    shown = [str(v) for v in values if v is not None]
    if len(shown) > 12:
        shown = shown[:12] + ["..."]
    return "one of " + ", ".join(shown)


def _bounds_text(md) -> str:
    if "min" not in md and "max" not in md:
        return ""
    lo, hi = md.get("min", -math.inf), md.get("max", math.inf)
    left = "(" if md.get("min_open") else "["
    right = ")" if md.get("max_open") else "]"
    return f"in {left}{_num_text(lo)}, {_num_text(hi)}{right}"


def _num_text(v: float) -> str:
    return str(int(v)) if math.isfinite(v) and float(v).is_integer() else f"{v:g}"


def _field_help(f: dataclasses.Field, extra: str = "") -> str:
    md = f.metadata
    default = f.default if f.default is not dataclasses.MISSING else None
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        default = f.default_factory()  # type: ignore[misc]
    parts = [md.get("help", ""), extra or _choices_text(md), _bounds_text(md)]
    parts.append(f"default {json.dumps(default)}")
    return "; ".join(p for p in parts if p).replace("%", "%%")


def _families_text(name: str) -> str:
    """Help for --dataset and --model: the names the library lists, and the families."""
    if name == "dataset":
        from .data import list_dataset_families, list_datasets

        return "one of " + ", ".join(
            list_datasets() + [f"{f}:PATH" for f in list_dataset_families()]
        )
    import importlib.util

    from .models import list_models

    timm = ["timm:NAME"] if importlib.util.find_spec("timm") is not None else []
    return "one of " + ", ".join(list_models() + ["torchvision:NAME", *timm])


def _add_field(g, f: dataclasses.Field) -> None:
    flags = _FLAG_NAMES.get(f.name, ("--" + f.name.replace("_", "-"),))
    kind = _field_kind(f)
    extra = _families_text(f.name) if f.name in ("dataset", "model") else ""
    if f.name == "device":
        from .engine.devices import available_devices

        extra = "available here: " + ", ".join(available_devices())
    common = {"dest": f.name, "default": argparse.SUPPRESS, "help": _field_help(f, extra)}
    if kind == "bool":
        g.add_argument(*flags, action=argparse.BooleanOptionalAction, **common)
    elif kind == "list":
        common["help"] += "; repeat for several, 'none' composes every layer"
        g.add_argument(*flags, action="append", metavar="PATTERN", type=_text(flags[0]), **common)
    elif kind in ("int", "float"):
        g.add_argument(*flags, type=_number(flags[0], kind), metavar=kind.upper(), **common)
    else:
        choices = f.metadata.get("choices")
        shown = [c for c in choices if c is not None] if isinstance(choices, tuple) else []
        metavar = "{" + ",".join(shown) + "}" if shown else "TEXT"
        conv = _nullable(flags[0]) if f.metadata.get("nullable") else _text(flags[0])
        g.add_argument(*flags, type=conv, metavar=metavar, **common)


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training options (defaults: the classroom run; see TrainConfig)")
    for f in dataclasses.fields(_config_class()):
        if f.name not in _NOT_FLAGS:
            _add_field(g, f)
    g.add_argument(
        "--model-arg",
        dest="model_args",
        action="append",
        metavar="KEY=VALUE",
        type=_text("--model-arg"),
        help="a model option, e.g. width=128 (repeatable; values are JSON or text)",
    )
    g.add_argument(
        "--data-arg",
        dest="data_args",
        action="append",
        metavar="KEY=VALUE",
        type=_text("--data-arg"),
        help="a dataset option, e.g. rank=4 for lowrank, size=64 for folder:PATH (repeatable)",
    )


# --------------------------------------------------------------------------- the parser


def _add_runs_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--runs-dir",
        metavar="DIR",
        type=_folder_arg("--runs-dir"),
        help="runs folder (default $LORITA_RUNS or ./runs)",
    )


def _add_data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir",
        metavar="DIR",
        type=_folder_arg("--data-dir"),
        help="data folder for this command (default $LORITA_DATA)",
    )


def _add_train(sub) -> None:
    t = sub.add_parser("train", help="train a model and write a run folder")
    t.set_defaults(func=cmd_train)
    t._fill = _train_flags


def _train_flags(t: argparse.ArgumentParser) -> None:
    t.add_argument(
        "--config",
        metavar="FILE",
        type=_in_file("--config"),
        help="a JSON TrainConfig; flags override it",
    )
    _add_runs_dir(t)
    _add_data_dir(t)
    t.add_argument(
        "--name", type=_text("--name"), help="run name (default dataset-model-N<n>-<time>)"
    )
    t.add_argument("--quiet", action="store_true", help="print nothing but errors")
    t.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="RUN",
        type=_text("--resume"),
        help="continue the run RUN (or --name RUN) from its last checkpoint",
    )
    t.add_argument(
        "--max-concurrent",
        type=_number("--max-concurrent", "int", *_CONCURRENT),
        metavar="K",
        help=f"wait (state queued) until fewer than K runs of this runs folder that also take "
        f"a slot (as the app's runs do) train; in [{_CONCURRENT[0]}, {_CONCURRENT[1]}]",
    )
    t.add_argument(
        "--threads",
        type=_number("--threads", "int", *_THREADS),
        metavar="T",
        help=f"torch CPU threads (default: 1 for a small model on the CPU, else torch's); "
        f"in [{_THREADS[0]}, {_THREADS[1]}]",
    )
    t.add_argument(
        "--curves",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="when the run completes, sweep the Compress page's default trade-off curve and, "
        "for a composed run, measure the cuts its slider reaches, so the page opens on them at "
        f"once (default on; ${CURVES_ENV}=0 turns it off); --no-curves for a run nobody "
        "compresses in the app right away (the page sweeps the curve when it is opened)",
    )
    _add_train_flags(t)


def _policy_value(cls):
    def conv(s: str):
        from .truncation import make_policy

        v = _number(f"--{cls.name}", "float", cls.low, cls.high)(s)
        try:
            return make_policy(cls, v)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return conv


#: ``--policy none``: export uncut (a value of its own, so that it conflicts with a cut flag)
NO_CUT = "none"


def _policy_text(flag: str, *, allow_none: bool = False):
    def conv(s: str):
        from .truncation import parse_policy

        s = _text(flag)(s)
        if s.strip().lower() == "none":
            if not allow_none:
                raise argparse.ArgumentTypeError(
                    "none (no cut) is for export; give a policy to cut by, e.g. global:0.5"
                )
            return NO_CUT  # (not None, the default: argparse sees it given beside another)
        problem = _out_of_bounds(s)  # said as the flag says it, before the policy is made
        if problem:
            raise argparse.ArgumentTypeError(problem)
        try:
            return parse_policy(s)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return conv


def _out_of_bounds(text: str) -> str | None:
    """For ``--policy NAME:VALUE`` with a number out of the bounds of its own flag
    (``--NAME``), what the flag says of it; None otherwise."""
    from .truncation import policy_class

    name, _, value = text.strip().partition(":")
    try:
        cls, v = policy_class(name.strip().lower()), float(value)
    except ValueError:
        return None
    if cls.value_name and not cls.low <= v <= cls.high:
        return f"{cls.name}: {v:g} is not in [{cls.low:g}, {cls.high:g}] (see --{cls.name})"
    return None


def _add_policy_flags(c: argparse.ArgumentParser, *, required: bool = True) -> None:
    """One flag per policy, ``--policy NAME:VALUE`` and ``--max-drop P``; at most one given.
    ``required=False``: none given means no cut (``--policy none`` says so too)."""
    from .truncation import POLICIES

    how = c.add_mutually_exclusive_group(required=required)
    for cls in POLICIES.values():
        if cls.value_name:
            how.add_argument(
                f"--{cls.name}",
                dest="policy",
                type=_policy_value(cls),
                metavar=cls.value_name.upper(),
                help=f"{cls.label}: {cls.help} (in [{cls.low:g}, {cls.high:g}]{cls.unit})".replace(
                    "%", "%%"
                ),
            )
    how.add_argument(
        "--policy",
        dest="policy",
        type=_policy_text("--policy", allow_none=not required),
        metavar="NAME:VALUE",
        help=("" if required else "none (merged dense, the default) or ")
        + "any policy as text, e.g. global:0.8 or ranks:fc1=4,fc2=8; policies: "
        + ", ".join(POLICIES),
    )
    how.add_argument(
        "--max-drop",
        type=_number("--max-drop", "float", *_MAX_DROP),
        metavar="P",
        help="the smallest model within P points of the full one's validation score "
        "(percentage points of accuracy; for a regression, hundredths of R²) "
        f"(in [{_MAX_DROP[0]:g}, {_MAX_DROP[1]:g}])",
    )
    searches = [n for n, cls in POLICIES.items() if cls.value_name] + ["iterative"]
    c.add_argument(
        "--search",
        choices=searches,
        default=None,
        help="how --max-drop searches (default global; iterative is the paper's greedy search)",
    )


def _add_model_source(p: argparse.ArgumentParser) -> None:
    from .kinds import DECIDE_BY, FORMS

    p.add_argument("run", type=_text("RUN"))
    p.add_argument(
        "--form",
        choices=FORMS,
        default=FORMS[0],
        help="a cut layer as two thin layers where cheaper, or a dense rank-r weight",
    )
    p.add_argument(
        "--form-by",
        choices=DECIDE_BY,
        default=DECIDE_BY[0],
        help="with --form low_rank, how each cut layer's thin or dense form is chosen: "
        + " or ".join(DECIDE_BY)
        + " (latency: measured on this machine at --form-batch; never slower than dense)",
    )
    p.add_argument(
        "--form-batch",
        type=_number("--form-batch", "int", *_FORM_BATCH),
        default=64,
        metavar="B",
        help=f"batch size --form-by latency measures at, in [{_FORM_BATCH[0]}, {_FORM_BATCH[1]}]"
        " (default 64)",
    )
    p.add_argument("--which", choices=["best", "last"], default="best", help="checkpoint")
    _add_runs_dir(p)


def _add_finetune(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--finetune-epochs",
        type=_number("--finetune-epochs", "int", *_FINETUNE_EPOCHS),
        default=0,
        metavar="K",
        help=f"fine-tune each cut model K epochs (epoch kept by validation); "
        f"in [{_FINETUNE_EPOCHS[0]}, {_FINETUNE_EPOCHS[1]}]",
    )
    p.add_argument(
        "--finetune-lr",
        type=_number("--finetune-lr", "float", 1e-12, 10.0),
        metavar="LR",
        help="fine-tuning learning rate in [1e-12, 10] (default: the run's lr / 10)",
    )


def _add_compress(sub) -> None:
    c = sub.add_parser("compress", help="truncate a trained run and report accuracy and cost")
    c.set_defaults(func=cmd_compress)
    c._fill = _compress_flags


def _compress_flags(c: argparse.ArgumentParser) -> None:
    _add_data_dir(c)
    _add_model_source(c)
    _add_policy_flags(c)
    _add_finetune(c)
    c.add_argument(
        "--latency",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure CPU latency at batch 1 and 64 (median of repeats; default on), of the "
        "model before and after as they deploy: BatchNorm folded, channels_last for conv models",
    )
    c.add_argument(
        "--out", metavar="FILE", type=_out_path("--out"), help="save the model (safetensors)"
    )
    _add_fold_bn(c, "--out")
    c.add_argument("--json", action="store_true", help="print the result as JSON")


def _budgets(s: str) -> list[float]:
    items = [t.strip() for t in _text("--budgets")(s).split(",")]
    if len(items) > _MAX_BUDGETS:
        raise argparse.ArgumentTypeError(f"at most {_MAX_BUDGETS} budgets")
    from .truncation import Budget

    conv = _number("--budgets", "float", Budget.low, Budget.high)  # as --budget's
    return sorted({conv(t) for t in items})


def _methods(s: str) -> list[str]:
    from .baselines import METHODS

    items = [t.strip() for t in _text("--methods")(s).split(",")]
    unknown = [t for t in items if t not in METHODS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"{_short(', '.join(unknown))!r} not among {', '.join(METHODS)}"
        )
    return list(dict.fromkeys(items))


def _add_compare(sub) -> None:
    c = sub.add_parser(
        "compare", help="LoRITa's cut against the SVD cut and pruning of the N=1 baseline"
    )
    c.set_defaults(func=cmd_compare)
    c._fill = _compare_flags


def _compare_flags(c: argparse.ArgumentParser) -> None:
    from .baselines import METHODS

    _add_data_dir(c)
    c.add_argument("run", type=_text("RUN"))
    c.add_argument(
        "--baseline",
        type=_text("--baseline"),
        metavar="RUN_N1",
        help="the N=1 run (default: the run's paired baseline)",
    )
    c.add_argument(
        "--budgets",
        type=_budgets,
        default=[5.0, 10.0, 20.0, 35.0, 50.0],
        metavar="P,P,...",
        help="budgets in percent of --measure, each in [1, 100] (default 5,10,20,35,50)",
    )
    c.add_argument(
        "--measure",
        choices=["params", "flops"],
        default="params",
        help="what the budgets are a share of (default params)",
    )
    c.add_argument("--which", choices=["best", "last"], default="best", help="checkpoint")
    c.add_argument(
        "--methods",
        type=_methods,
        default=None,
        metavar="M,M,...",
        help="which of " + ", ".join(METHODS) + " (default all)",
    )
    _add_finetune(c)
    c.add_argument("--json", action="store_true", help="print the rows as JSON")
    _add_runs_dir(c)


def _add_export(sub) -> None:
    e = sub.add_parser("export", help="write a run's model as safetensors or ONNX")
    e.set_defaults(func=cmd_export)
    e._fill = _export_flags


def _export_flags(e: argparse.ArgumentParser) -> None:
    _add_data_dir(e)
    _add_model_source(e)
    _add_policy_flags(e, required=False)
    e.add_argument(
        "--format",
        choices=["safetensors", "onnx"],
        default=None,
        help="the file's format (default: from --out's extension, .onnx or else safetensors)",
    )
    e.add_argument(
        "--out",
        required=True,
        metavar="FILE",
        type=_out_path("--out"),
        help="the file to write (.safetensors, or .onnx; the extension picks --format)",
    )
    _add_fold_bn(e, "the file")


def _add_fold_bn(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--fold-bn",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"fold each BatchNorm into the layer before it in {what} (a file for inference: "
        "fewer layers, the same outputs; --no-fold-bn keeps them for training further; "
        "default on, except in a --form dense safetensors file: the original architecture, "
        "whose own load_state_dict takes it)",
    )


def _fold_bn(args, fmt: str = "safetensors") -> bool:
    """--fold-bn as given, else on, except for a dense safetensors file (kept the original
    architecture, BatchNorms and all, so that the architecture's own state_dict loads it)."""
    if args.fold_bn is not None:
        return bool(args.fold_bn)
    return not (args.form == "dense" and fmt != "onnx")


def build_parser(*, lazy: bool = False) -> argparse.ArgumentParser:
    """The ``lorita`` parser. The flags of train, compress, compare and export come from the
    library (TrainConfig's fields, the policies), which imports torch: with ``lazy`` they are
    added when that command is parsed or its help shown, so ``lorita --help`` stays quick."""
    p = _Parser(prog="lorita", description="LoRITa Explorer: low-rank induced training.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_train(sub)
    r = sub.add_parser("runs", help="list runs (or delete one)")
    r.set_defaults(func=cmd_runs)
    _add_runs_dir(r)
    r.add_argument("--json", action="store_true", help="print JSON summaries")
    r.add_argument(
        "--delete", metavar="NAME", type=_text("--delete"), action="append",
        help="delete a run (repeat it for several: each is checked before any is deleted)",
    )  # fmt: skip
    _add_compress(sub)
    _add_compare(sub)
    _add_export(sub)
    s = sub.add_parser("stop", help="ask a training run to stop after its current step")
    s.set_defaults(func=cmd_stop)
    s.add_argument("run", type=_text("RUN"))
    _add_runs_dir(s)

    m = sub.add_parser(
        "models", help="list the models --model takes, or one model's --model-arg options"
    )
    m.set_defaults(func=cmd_models)
    m.add_argument(
        "name", nargs="?", type=_text("NAME"),
        help="a model (mlp, torchvision:resnet18, timm:...): print its options and defaults",
    )  # fmt: skip
    d = sub.add_parser(
        "datasets", help="list the datasets --dataset takes, or one dataset's --data-arg options"
    )
    d.set_defaults(func=cmd_datasets)
    d.add_argument(
        "name", nargs="?", type=_text("NAME"),
        help="a dataset (lowrank, mnist, folder:PATH): print its options, their defaults and "
        "ranges, and where its data would come from",
    )  # fmt: skip
    _add_data_dir(d)
    if not lazy:
        for command in sub.choices.values():
            command.filled()
    return p


# --------------------------------------------------------------------------- helpers


def _store(args):
    from .runs import RunStore

    return RunStore(args.runs_dir)


def _get_run(args, name: str):
    """The run ``name`` of --runs-dir, or the run folder at the path ``name`` (what
    ``lorita train`` prints last)."""
    from .runs import RunStore, made_by_store

    where = Path(name)
    if len(where.parts) > 1:
        if not made_by_store(where):
            raise UsageError(
                f"run: {name!r} is not a run folder (no config.json, status.json and "
                "checkpoints/ there)"
            )
        return RunStore(where.parent).get(where.name)
    store = _store(args)
    if not store.root.is_dir():
        raise UsageError(f"run: no runs folder {str(store.root)!r}")
    return store.get(name)


def _scored(task):
    """(header word, formatter) of a task's score: ('acc', '93.12%') or ('R²', '0.6417')."""
    from .scores import score_of

    score = score_of(task)
    return score.short, lambda x: score.text(x, sep="")


def _print_json(value) -> None:
    """``--json``: one JSON document on stdout (strict JSON: NaN and infinities are null)."""
    from .io import clean

    print(json.dumps(clean(value), indent=1, allow_nan=False))


def _table(rows: list[list], header: list[str]) -> str:
    """Plain aligned columns (readable by eye and by grep / awk / cut)."""
    cols = [header, *rows]
    widths = [max(len(str(r[i])) for r in cols) for i in range(len(header))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- train: progress


class _Progress:
    """Training events -> a tqdm bar with rate and time left on a terminal, epoch lines else."""

    def __init__(self, stream=None, quiet: bool = False) -> None:
        self.stream, self.quiet = stream or sys.stderr, quiet
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.bar = None
        self.loss, self.val, self.total, self.epoch = math.nan, None, 0, 0
        self.score, self.fmt = _scored("classification")  # a regression's: R², as it is

    def _score(self, x) -> str:
        return f"{self.score} {self.fmt(x)}"

    def __call__(self, ev: dict) -> None:
        handler = getattr(self, f"_on_{ev.get('event')}", None)
        if not self.quiet and handler is not None:
            handler(ev)

    def _on_start(self, ev: dict) -> None:
        from tqdm import tqdm

        self.total = ev["total_steps"]
        self.score, self.fmt = _scored(ev.get("task"))
        self._line(f"training on {ev['device']}: {self.total} steps")
        if ev.get("note"):
            self._line(ev["note"])
        if self.tty:
            self.bar = tqdm(
                total=self.total,
                initial=ev["step"],
                unit="step",
                file=self.stream,
                dynamic_ncols=True,
                leave=False,
            )

    def _on_step(self, ev: dict) -> None:
        self.loss, self.epoch = ev["loss"], ev["epoch"]
        if self.bar is not None:
            self.bar.update(ev["step"] - self.bar.n)
            self._postfix()

    def _on_eval(self, ev: dict) -> None:
        self.val = ev["acc"]
        if self.bar is not None:
            self._postfix()
        else:
            self._line(
                f"epoch {ev['epoch'] + 1}  step {ev['step']}/{self.total}  train loss "
                f"{self.loss:.4f}  val loss {ev['loss']:.4f}  val {self._score(ev['acc'])}"
            )

    def _on_compose(self, ev: dict) -> None:
        self._line(
            f"step {ev['step']}: the plain epochs are over; composed into N={ev['n_factors']} "
            "factors (the same function), optimizer and schedule start again"
        )

    def _postfix(self) -> None:
        self.bar.set_postfix(
            epoch=self.epoch, loss=f"{self.loss:.4f}", val=self.fmt(self.val), refresh=False
        )

    def _on_end(self, ev: dict) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        test = ev.get("test") or {}
        self._line(
            f"{ev['state']}: step {ev['step']}, best val {self._score(ev['best_val_acc'])}, "
            f"test {self._score(test.get('acc'))}, {ev['time']:.1f} s"
            + (f" ({ev['message']})" if ev.get("message") else "")
        )

    def _line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            _say(text, self.stream)


# --------------------------------------------------------------------------- train: config


def _train_config(args):
    from .data import canonical_name

    TrainConfig = _config_class()
    base = TrainConfig.from_json(args.config).to_dict() if args.config else TrainConfig().to_dict()
    given = vars(args)
    # options belong to one model / dataset: a different one on the command line drops them
    if "model" in given and given["model"] != base["model"]:
        base["model_kwargs"] = {}
    if "dataset" in given and _as_kept(args, "dataset", given["dataset"]) != _as_kept(
        args, "dataset", base["dataset"]
    ):  # (the same folder written another way, relative or with ~, keeps them)
        base["dataset_kwargs"] = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name in given:
            base[f.name] = given[f.name]
    if "skip" in given:
        base["skip"] = [] if given["skip"] == ["none"] else given["skip"]
    given_kw = _key_values(args.model_args, "--model-arg")
    _check_model_args(base, given_kw)
    base["model_kwargs"] = {**base["model_kwargs"], **given_kw}
    base["dataset_kwargs"] = {**base["dataset_kwargs"], **_key_values(args.data_args, "--data-arg")}
    if isinstance(base.get("dataset"), str) and base["dataset"]:
        base["dataset"] = canonical_name(base["dataset"])
    if isinstance(base.get("init_from"), str):
        try:
            base["init_from"] = _init_file(args, base["init_from"])
        except UsageError as e:
            start = base["init_from"]
            if "init_from" in given or start.startswith("~") or Path(start).is_absolute():
                raise
            raise UsageError(  # the path came from the file, where it may be read otherwise
                f"{e} (from --config {args.config}: a relative path there is taken from the "
                f"working directory, {str(Path.cwd())!r})"
            ) from None
    return TrainConfig.from_dict(base)


def _as_kept(args, key: str, value):
    """``value`` of the field ``key`` as a run's config keeps it: a folder dataset's path and
    the starting weights' file absolute (``folder:imgs`` is ``folder:/home/me/imgs``); any
    other value, or one that cannot be read so (a file since removed), as it is."""
    if not isinstance(value, str) or not value:
        return value
    with contextlib.suppress(ValueError, UsageError, argparse.ArgumentTypeError, OSError):
        if key == "dataset":
            from .data import canonical_name

            return canonical_name(value)
        if key == "init_from":
            return _init_file(args, value)
    return value


def _check_model_args(base: dict, given: dict) -> None:
    """The kinds of the ``--model-arg`` options, said against the values the run takes
    without them (the config's own check names the builder's defaults: 256 for the MLP's
    width, where a run has 512)."""
    from .models import check_option_types, model_options

    name, kw = base.get("model"), base.get("model_kwargs")
    if not isinstance(name, str) or not isinstance(kw, dict):
        return  # the config says what is wrong
    try:
        options = model_options(name)
    except ValueError:
        return
    check_option_types(name, given, {**options, **kw}, "model_kwargs")


def _init_file(args, value: str) -> str:
    """--init-from: a weights file, else a run (name in --runs-dir, or folder): its best
    checkpoint, so a plain run trained first can be composed and trained on. The path kept
    in the run's config is absolute: ``--resume`` from another folder finds the same file."""
    try:
        return str(Path(_in_file("--init-from")(value)).absolute())
    except argparse.ArgumentTypeError as e:
        why = e
    try:
        where = _home(value)
    except argparse.ArgumentTypeError:  # an unknown ~user: why says so
        raise UsageError(f"init_from: {why}") from None
    if (where / "config.json").is_file():  # a run folder
        run = _get_run(args, str(where.resolve()))
    elif value and not where.exists() and len(where.parts) == 1:  # a run's name
        store = _store(args)
        if not (store.root / value / "config.json").is_file():
            raise UsageError(f"init_from: {why}; nor is it a run in {str(store.root)!r}") from None
        run = store.get(value)
    else:
        raise UsageError(f"init_from: {why}") from None
    with _as_usage():
        return run.start_file()


def _train_config_from_run(run, args):
    """The run's own config; a training flag may be repeated only with the run's value (the
    command that started it, --resume added: ``--device cpu`` under torchrun)."""
    TrainConfig = _config_class()
    had = run.config
    if not isinstance(had, dict) or "dataset" not in had:
        raise UsageError(
            f"--resume: run {run.name!r} has no training config (its config.json is missing, "
            "damaged or names no dataset); nothing was changed"
        )
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    other = [  # a path as the run keeps it: the command that started it, --resume added
        k
        for k in vars(args)
        if k in fields and _as_kept(args, k, getattr(args, k)) != run.config.get(k)
    ]
    options = _options_not_the_runs(args, had)
    if other or options:
        flags = ", ".join(_FLAG_NAMES.get(k, ("--" + k.replace("_", "-"),))[0] for k in other)
        flags = ", ".join(([flags] if flags else []) + options)
        raise UsageError(
            f"--resume takes the run's own config; drop the training flags that change it ({flags})"
        )
    return TrainConfig.from_dict(run.config)


def _options_not_the_runs(args, had: dict) -> list[str]:
    """Which of ``--config``, ``--model-arg``, ``--data-arg`` say other than the run's own
    config: each may repeat the run's values, as in the command that started it."""

    def same(key: str, value) -> bool:
        if key in ("model_kwargs", "dataset_kwargs"):  # the options given, each the run's
            kept = had.get(key)
            return isinstance(kept, dict) and all(kept.get(k, ...) == v for k, v in value.items())
        return had.get(key, ...) == _as_kept(args, key, value)

    from .engine.config import read_config_file

    changed = []
    if args.config:
        with _as_usage():  # read once: the keys it gives, and the config they make
            given = read_config_file(args.config)
            from_file = _config_class().from_dict(given).to_dict()
        if not all(same(k, from_file[k]) for k in given):
            changed.append("--config")
    for flag, key, items in (
        ("--model-arg", "model_kwargs", args.model_args),
        ("--data-arg", "dataset_kwargs", args.data_args),
    ):
        if items and not same(key, _key_values(items, flag)):
            changed.append(flag)
    return changed


def _preflight(config) -> None:
    """Everything cheap that can fail before a run folder exists (the library's check: the
    app's Train page runs the same)."""
    from .data import WILL_DOWNLOAD, fetch_dataset
    from .engine.devices import dist_info
    from .engine.preflight import check_start

    note = check_start(config)
    if note.startswith(WILL_DOWNLOAD) and dist_info().world == 1:
        # downloaded now, so that no run folder is left failed when there is no internet
        # (under torchrun the run's processes share the download as they load the data)
        _say(f"dataset {config.dataset!r}: {note}", sys.stderr)
        fetch_dataset(config.dataset, **config.dataset_kwargs)
    if "left out" in note:  # images beside a folder's class folders: in no class
        warnings.warn(f"dataset: {note}", stacklevel=2)


def _preflight_resume(run, config) -> None:
    """A resume gets the checks a new run gets, before anything in its folder changes: under
    torchrun in another number of processes its batch may no longer fill a BatchNorm in each.
    Its starting weights (init_from) are not checked: the checkpoint replaces them."""
    from .engine.devices import dist_info

    d = dist_info()
    try:
        _preflight(dataclasses.replace(config, init_from=None))
        _engine().check_batch(config, d)  # before the torchrun group starts
    except ValueError as e:
        world = d.world
        how = f"resume it in fewer than {world} processes, or " if world > 1 else ""
        raise UsageError(
            f"--resume: run {run.name!r} cannot go on: {e} (a resumed run keeps its own "
            f"config: {how}train a new run with other settings); nothing was changed"
        ) from None


# --------------------------------------------------------------------------- train: run


def _share_name(name: str | None, d) -> str:
    """Broadcast rank 0's run name to every process (as bytes in a tensor, no pickle)."""
    import torch
    import torch.distributed as dist

    buf = torch.zeros(256, dtype=torch.uint8)
    if d.main:
        raw = name.encode()
        buf[: len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
    if torch.cuda.is_available() and dist.get_backend() == "nccl":
        b = buf.cuda()
        dist.broadcast(b, 0)
        buf = b.cpu()
    else:
        dist.broadcast(buf, 0)
    return bytes(buf[buf > 0].tolist()).decode()


@contextlib.contextmanager
def _data_dir(path):
    """``--data-dir`` for this command only (the loaders read ``$LORITA_DATA``)."""
    old = os.environ.get("LORITA_DATA")
    if path is not None:
        os.environ["LORITA_DATA"] = str(path)
    try:
        yield
    finally:
        if path is not None:
            if old is None:
                os.environ.pop("LORITA_DATA", None)
            else:
                os.environ["LORITA_DATA"] = old


def cmd_train(args) -> int:
    from .runs import validate_name

    threads = args.threads if args.threads is not None else "auto"
    if args.quiet:  # nothing but errors from the start, the checks' warnings too
        warnings.simplefilter("ignore")
    store = _store(args)
    if args.resume:
        _resume_name(args)
        run = _get_run(args, args.name)
        config = _train_config_from_run(run, args)
        _preflight_resume(run, config)
    else:
        if args.name is not None:
            validate_name(args.name)
            if store.exists(args.name):
                raise UsageError(f"run: {args.name!r} already exists in {store.root}")
            _check_not_claimed(args, store)
        config = _train_config(args)
        _preflight(config)
        from .engine.devices import dist_info

        _engine().check_batch(config, dist_info())  # before a run folder is made or the
        run = None  # torchrun group starts (a resume's: in _preflight_resume)
    d = _engine().init_distributed(config.device)
    quiet = args.quiet or not d.main
    if quiet:  # nothing but errors: warnings too (main restores the filters afterwards)
        warnings.simplefilter("ignore")

    stop_event = threading.Event()
    on_signal = _StopOnSignal(stop_event)
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _run_training(args, store, run, config, d, quiet, stop_event, threads)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _check_not_claimed(args, store) -> None:
    """Refuse ``--name`` while the app has claimed it for a run it is starting (its request
    ``<runs>/.app/<name>.json``, whose process is alive), unless this is that run: the app's
    child reads its config from the request itself."""
    from .runs import live_launch_request

    request = live_launch_request(store.root, args.name)
    if request is None:
        return
    with contextlib.suppress(OSError):
        if args.config and os.path.samefile(args.config, request):
            return
    raise UsageError(
        f"run: {args.name!r} is claimed by the app, which is starting a run of that name "
        f"({str(request)!r}); choose another --name"
    )


def _resume_name(args) -> None:
    """``--resume RUN`` or ``--resume --name RUN``: the run's name in ``args.name``, and
    ``args.resume`` True."""
    named = args.resume if isinstance(args.resume, str) else None
    if named is not None and args.name is not None and named != args.name:
        raise UsageError(
            f"--resume: {_short(named)!r} and --name {_short(args.name)!r} name two runs; give one"
        )
    args.name = args.name or named
    args.resume = True
    if not args.name:
        raise UsageError("--resume needs a run: --resume RUN (or --resume --name RUN)")


class _StopOnSignal:
    """SIGTERM / Ctrl-C: the first asks the run to stop after its step, a second stops now."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, signum, frame) -> None:
        if self.event.is_set():
            signal.signal(signum, signal.SIG_DFL)
            raise KeyboardInterrupt
        self.event.set()


def _open_run(args, store, run, config, d):
    """The run to train: a new folder (rank 0 makes it, the others learn its name), or the
    resumed one marked queued."""
    from .runs import Run

    if run is None:
        try:
            if d.main:
                if args.name is not None:  # (again: the app may have claimed it meanwhile)
                    _check_not_claimed(args, store)
                run = store.create(config.to_dict(), name=args.name)
        finally:  # a refused name is shared as "" (the other processes then end, silently)
            name = _share_name(run.name if run else "", d) if d.on else None
        if not name and not d.main and d.on:
            raise SystemExit(2)  # (process 0 says why)
        return run or Run(store.root / name)
    refused = None
    if d.main:
        try:
            run.begin_resume()  # refuses a live or completed run before writing anything
        except ValueError as e:
            refused = UsageError(f"--resume: {e}")
    if d.on and not _share_name("" if refused else "ok", d):
        if not d.main:
            raise SystemExit(2)  # (process 0 says why)
    if refused:
        raise refused from None
    return run


def _wait_for_slot(args, store, run, stop_event, quiet, d):
    """A slot of ``--max-concurrent`` (None when not asked), or False if stopped while queued.
    Under torchrun process 0 waits for it and tells the others, at each look at the slots,
    whether to wait on, train or stop: none of them waits in one collective for longer than
    a look (a collective times out, after 30 minutes on gloo, and would end the run)."""
    from .runs import PREPARING, WAITING_FOR_SLOT, acquire_slot

    if not args.max_concurrent:
        return None
    if not d.main:
        while (news := _share_name(None, d)) == "wait":
            pass
        return None if news == "go" else False
    said = []

    def should_stop():  # asked each time every slot was found taken
        stop = stop_event.is_set() or run.stop_requested()
        if d.on:
            _share_name("stop" if stop else "wait", d)
        if not said:
            said.append(True)
            run.update_status(message=WAITING_FOR_SLOT)
            k = args.max_concurrent
            if not quiet:
                _say(
                    f"queued: {WAITING_FOR_SLOT} ({k} of {k} in use); Ctrl-C (or "
                    f"lorita stop {run.name}) to leave the queue",
                    sys.stderr,
                )
        return stop

    slot = acquire_slot(store.root, args.max_concurrent, should_stop=should_stop)
    if slot is not None:
        if d.on:
            _share_name("go", d)
        run.update_status(message=PREPARING)
    if slot is None:
        run.update_status(state="stopped", message="stopped while queued", ended=time.time())
        run.stop_heartbeat()
        if not quiet:
            _say(f"stopped while queued: {run.path.absolute()}")
        return False
    return slot


def _curves_kept_now(args, run, d, quiet) -> bool:
    """``--resume`` of a completed run whose trade-off curves were cut short (the process
    ended while it kept them): keep them now, instead of refusing."""
    if not (args.resume and args.curves and run is not None and not d.on):
        return False
    if run.raw_status().get("state") != "completed" or run.is_alive():
        return False
    from .curves import prepare

    done = prepare(run)
    if done and not quiet:
        _say(f"run {run.name!r} had completed; its trade-off curves, cut short, are now kept")
    return bool(done)


def _run_training(args, store, run, config, d, quiet, stop_event, threads) -> int:
    if _curves_kept_now(args, run, d, quiet):
        return 0
    before = run.raw_status() if run is not None and d.main else {}  # (a resume: put back
    run = _open_run(args, store, run, config, d)  # if the engine refuses it, unchanged)
    try:
        if d.main:
            run.start_heartbeat()
        if not quiet:
            _say(f"run folder: {run.path.absolute()}", sys.stderr)
        slot = _wait_for_slot(args, store, run, stop_event, quiet, d)
        if slot is False:
            return STOPPED
        try:
            result = _train(config, run, args, slot, d, quiet, stop_event, threads)
        except ValueError:
            _undo_resume(run, before)
            raise
    finally:
        if d.main:  # the engine stops and releases its own; these are the CLI's
            run.stop_heartbeat()
            if args.resume:
                run.release()
    if not quiet:
        _say(str(run.path.absolute()))  # a path that works from any folder
        if result["state"] == "stopped" and run.last_checkpoint_step() is not None:
            _say(f"to go on from its last checkpoint: {run.command('train --resume')}")
    if result["state"] == "failed":
        if d.main:
            _say(f"lorita: training failed: {_one_line(result['message'])}", sys.stderr)
        return 1
    return STOPPED if result["state"] == "stopped" else 0


def _undo_resume(run, before: dict) -> None:
    """A resume the engine refused before it began (a damaged checkpoint, a dataset changed
    since): the run's status as it was before this command marked it resuming, so that it
    still says why it ended (not, once this process is gone, "process died")."""
    st = run.raw_status()
    marked = (st.get("state"), st.get("message"), st.get("pid"))
    if before and marked == ("queued", "resuming", os.getpid()):
        with contextlib.suppress(OSError):
            run.update_status(**before)


def _training_ended(run) -> bool:
    """Whether the run's status says its training failed, or is running in this process (a
    status.json that could not be written since: a full disk, a failing drive)."""
    st = run.raw_status() if run is not None else {}
    return st.get("state") == "failed" or (
        st.get("state") == "running" and st.get("pid") == os.getpid()
    )


class _KeepCurves:
    """``on_complete``: the default policies' trade-off curves kept beside the finished run
    (lorita.curves); Ctrl-C or SIGTERM meanwhile ends that at once (the run is complete;
    the app sweeps a curve not kept when it is asked for). The training slot is given back
    first: a queued run (the app's N=1 baseline) starts training meanwhile."""

    def __init__(self, stop_event: threading.Event, slot=None, *, enabled: bool = True) -> None:
        self.stop_event = stop_event
        self.slot = slot
        self.enabled = enabled  # --no-curves: the slot is given back all the same

    def __call__(self, run, splits) -> None:
        if self.slot is not None:
            self.slot.close()
        if not self.enabled:
            return
        from .curves import prepare

        prepare(run, splits, stop=self.stop_event.is_set)


def _train(config, run, args, slot, d, quiet, stop_event, threads) -> dict:
    try:
        return _engine().train(
            config,
            run,
            callback=_Progress(quiet=quiet),
            stop=stop_event.is_set,
            resume=args.resume,
            threads=threads,
            on_complete=_KeepCurves(stop_event, slot, enabled=args.curves),
        )
    except _engine().PeerLost as e:  # (the run's status says the same)
        return {"state": "failed", "message": str(e)}
    except OSError as e:  # a full disk mid-run is a training failure (exit 1), said so
        if not _training_ended(run):
            raise  # (named in one line by main: the folder could not be claimed or read)
        return {"state": "failed", "message": str(e) or type(e).__name__}
    except ValueError:
        raise  # (named in one line by main)
    except Exception as e:  # the model or its data failed in a step: the run says so
        if run is None or run.raw_status().get("state") != "failed":
            raise  # (not a failure the engine recorded in the run)
        import traceback

        last = traceback.extract_tb(e.__traceback__)[-1:]
        where = f" (at {Path(last[0].filename).name}:{last[0].lineno})" if last else ""
        return {"state": "failed", "message": f"{type(e).__name__}: {e}{where}"}
    finally:
        if slot is not None:
            slot.close()
        if d.on:
            import torch.distributed as dist

            with contextlib.suppress(Exception):
                dist.destroy_process_group()


# --------------------------------------------------------------------------- runs / stop


def cmd_runs(args) -> int:
    from .runs import RunStore

    store = _store(args)
    if args.delete is not None:
        runs = [_get_run(args, name) for name in dict.fromkeys(args.delete)]
        for run in runs:
            if run.is_alive():
                raise UsageError(
                    f"run {run.name!r} is still {run.status().get('state')}; "
                    f"stop it first (lorita stop {run.name})"
                )
        for run in runs:
            RunStore(run.path.parent).delete(run.name)
            if not args.json:
                print(f"deleted {run.name}")
        if args.json:
            _print_json({"deleted": [run.name for run in runs]})
        return 0
    rows = store.summaries()
    if args.json:
        _print_json(rows)
        return 0
    if not rows:
        print(f"no runs in {store.root}")
        return 0
    energy = any(s.get("energy_ranks") for s in rows)  # where the run store provides them
    table = [_run_row(s) + ([_ranks(s.get("energy_ranks"))] if energy else []) for s in rows]
    print(_table(table, _RUN_COLUMNS + (["energy ranks"] if energy else [])))
    said = [s for s in rows if s.get("state") in ("failed", "stopped") and s.get("message")]
    if said:  # why a run ended early, which the state column has no room for
        print("\nmessages:")
        for s in said:
            print(f"  {s['name']}: {_cut_middle(str(s['message']), 600)}")
    return 0


_RUN_COLUMNS = ["name", "state", "dataset", "model", "N", "wd", "step", "best val", "test"]
_RUN_COLUMNS.append("effective ranks")


#: a run with more layers shows its first and last ranks in the runs table (--json: all)
_RANKS_SHOWN = 8


def _ranks(ranks) -> str:
    if not isinstance(ranks, dict) or not ranks:
        return "-"
    v = [str(r) for r in ranks.values()]
    if len(v) <= _RANKS_SHOWN:
        return "/".join(v)
    return "/".join([*v[:4], "...", *v[-2:]]) + f" ({len(v)} layers)"


def _dash(v) -> str:
    return "-" if v is None or v == "" else str(v)


def _run_row(s: dict) -> list:
    wd = s.get("weight_decay")
    state = s.get("state") or "-"
    if s.get("broken"):
        state = f"broken ({_short(str(s['broken']), 40)})"
    return [
        s.get("name"),
        state,
        _dash(s.get("dataset")),
        _dash(s.get("model")),
        _dash(s.get("n_factors")),
        f"{wd:g}" if isinstance(wd, int | float) else "-",
        f"{s.get('step') or 0}/{s.get('total_steps') or '?'}",
        *_run_scores(s),
        _ranks(s.get("effective_ranks")),
    ]


def _run_scores(s: dict) -> list[str]:
    """A runs-table row's best validation and test scores: '93.12%', or 'R² 0.6417'."""
    word, fmt = _scored(s.get("task"))
    cells = [fmt(s.get("best_val_acc")), fmt(s.get("test_acc"))]
    return cells if word == "acc" else [c if c == "-" else f"{word} {c}" for c in cells]


def cmd_stop(args) -> int:
    from .runs import ACTIVE

    run = _get_run(args, args.run)
    state = run.status().get("state")
    if state not in ACTIVE:
        raise UsageError(f"run {run.name!r} is not training ({state}): there is nothing to stop")
    run.request_stop()
    print(f"stop requested: {run.name} ({state})")
    return 0


def cmd_models(args) -> int:
    from .engine.config import format_options
    from .models import list_models, model_options

    if args.name is None:
        for source in ("lorita", "torchvision"):
            names = list_models(source)
            print(f"{source} ({len(names)}): {', '.join(names)}")
        timm = list_models("timm")
        print(
            f"timm ({len(timm)}): timm:NAME for any of timm.list_models()"
            if timm
            else "timm: not installed (pip install timm for timm:NAME)"
        )
        print("lorita models NAME prints the options --model-arg takes for NAME")
        return 0
    with _as_usage():
        options = model_options(args.name)
    if not options:
        print(f"{args.name}: no options (the dataset sets its input and classes)")
        return 0
    print(f"{args.name}: its --model-arg KEY=VALUE options, each with its default value")
    trained = _train_defaults(args.name, options)
    for key, default in trained.items():
        try:
            shown = format_options({key: _plain(default)})
        except TypeError:  # a function or an object the model makes: no text gives it
            shown = f"{key}=(set by the model)"
        if default != options[key]:
            shown += f"  (lorita train's; the builder alone gives {_plain(options[key])})"
        print(f"  {shown}")
    return 0


def cmd_datasets(args) -> int:
    from .data import DatasetUnavailable, check_dataset, dataset_options, list_datasets

    if args.name is None:
        print(", ".join([*list_datasets(), "folder:PATH"]))
        print("lorita datasets NAME prints the options --data-arg takes for NAME")
        return 0
    with _as_usage():
        options = dataset_options(args.name)
    if options:
        print(f"{args.name}: its --data-arg KEY=VALUE options, each with its default value")
        for key, o in options.items():
            print(f"  {key}={o.default}  {o.help}{',' if o.range() else ''}{o.range()}")
    else:
        print(f"{args.name}: no options")
    try:
        where = check_dataset(args.name, args.data_dir)
    except DatasetUnavailable as e:
        where = f"not here: {e}"
    print(f"data: {where}")
    return 0


def _train_defaults(name: str, options: dict) -> dict:
    """A model's options with the defaults a run of ``lorita train`` uses: the builder's,
    but for the classroom options a config that names none takes (the MLP is 512 wide)."""
    from .engine.config import CLASSROOM_MODEL_KWARGS

    return {**options, **CLASSROOM_MODEL_KWARGS.get(name, {})}


def _plain(value):
    """``value`` as JSON data (a tuple as a list); TypeError for anything else."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(type(value).__name__)


# --------------------------------------------------------------------------- compress


def _compressor(args, *, cut: bool = True):
    """The compress session of the run; ``cut=False`` takes no SVDs (an uncut export)."""
    from .compress import Compressor

    run = _get_run(args, args.run)
    _require_checkpoint(run, args.which)
    _say_if_unfinished(run, args.which)
    _check_rank_names(run, args)
    return Compressor(run, which=args.which, layers=None if cut else [])


def _check_rank_names(run, args) -> None:
    """``ranks:`` names checked against the checkpoint's layers at once (the session's SVDs
    and evaluation take a minute on a deep network), the output layer refused as the command
    line always leaves it whole."""
    from .kinds import find_output_layer, iter_layers
    from .truncation import Ranks

    policy = getattr(args, "policy", None)
    if not isinstance(policy, Ranks):
        return
    model = run.load_model(args.which)
    names = [n for n, _ in iter_layers(model)]
    unknown = [n for n in policy.ranks if n not in names]
    if unknown:
        shown = ", ".join(names[:10]) + (f", ... ({len(names)} in all)" if len(names) > 10 else "")
        raise UsageError(f"ranks: unknown layer name(s) {unknown}; layers are: {shown}")
    head, _ = find_output_layer(model, None)
    if head in policy.ranks:
        raise UsageError(
            f"ranks: {head!r} is the output layer, which the command line leaves out of every "
            "cut (cutting it below its number of outputs merges them)"
        )


def _say_if_unfinished(run, which: str) -> None:
    """A warning when the run did not complete (failed, stopped, still training): what is
    cut is its checkpoint so far."""
    st = run.status()
    state = st.get("state")
    broken = run.problem()
    if broken:  # (its status, not what its checkpoint is, cannot be read)
        warnings.warn(
            f"run {run.name!r}: {broken}, so whether its {which} checkpoint is its final one "
            "cannot be told",
            stacklevel=2,
        )
    elif state != "completed":
        total = f"/{st['total_steps']}" if st.get("total_steps") else ""
        then = (
            f" (to cut the run trained to its end, resume it first: {run.command('train --resume')})"
            if state in ("failed", "stopped")
            else ""
        )
        warnings.warn(
            f"run {run.name!r} is {state} at step {st.get('step') or 0}{total}: this is its "
            f"{which} checkpoint so far{then}",
            stacklevel=2,
        )


def _require_checkpoint(run, which: str) -> None:
    path = run.checkpoint(which)
    if not path.is_file() and os.path.lexists(path):  # something is there, not a model file
        what = "a folder" if path.is_dir() else "a broken link, a link loop, a pipe or a device"
        raise UsageError(
            f"run {run.name!r}: its {which} checkpoint {path} is {what}, not a model file; "
            f"remove it and resume the run ({run.command('train --resume')}) or train it again"
        )
    if not path.is_file():
        state = run.status().get("state")
        if state in ("queued", "running"):
            raise UsageError(f"run {run.name!r} has no {which} checkpoint yet (it is {state})")
        how = (
            "train it again"
            if state == "completed"
            else (f"train it again or resume it, {run.command('train --resume')}")
        )
        raise UsageError(
            f"run {run.name!r} has no {which} checkpoint (it is {state} and wrote none: {how})"
        )


def _latency(models: list, example) -> list[dict]:
    """Latency at batch 1 and 64 of each model as it deploys (the library's deploy_model:
    BatchNorm folded, channels_last for a conv model), timed paired (the models in turn,
    round by round, so that other work on the machine slows them alike), and what each
    deployment did."""
    from torch import nn

    from .convert import deploy_model
    from .cost import paired_latency, timing_threads

    deploys = [deploy_model(m, example) for m in models]
    with timing_threads() as busy:
        profiles = paired_latency(deploys, example, batches=(1, 64), fastest=busy is not None)
    out = []
    for model, deploy, profile in zip(models, deploys, profiles, strict=True):
        got = {f"latency_b{b}_ms": 1000 * t for b, t in profile.items()}
        bns = sum(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in model.modules())
        info = deploy.lorita_deploy
        got["latency_as"] = {
            "batchnorm_folded": len(info["folded"]),
            "batchnorm": bns,
            "memory_format": info["memory_format"],
            "busy": busy,
        }
        out.append(got)
    return out


def _chosen_cut(cz, args):
    """The cut the policy flags ask for: ``--max-drop`` searches, any other applies."""
    if args.max_drop is None:
        return cz.apply(args.policy, form=args.form)
    if args.search == "iterative":
        return cz.iterative_search(args.max_drop, form=args.form)
    return cz.smallest_within(args.max_drop, args.search, form=args.form)


def cmd_compress(args) -> int:
    from .truncation import Budget

    if args.out and Path(args.out).suffix.lower() == ".onnx":
        raise UsageError(
            f"--out: {_short(str(args.out))!r}: compress saves safetensors; for ONNX use "
            "lorita export RUN --format onnx with the same policy"
        )
    if args.out:
        _check_suffix(args.out, "safetensors")
    if isinstance(args.policy, Budget) and args.form == "dense":
        raise UsageError(
            "--form dense: a budget counts the thin form's size, and a dense weight keeps its "
            "size; cut with --form low_rank (the default), or write the budget's ranks dense "
            "with lorita export RUN --budget P --form dense"
        )
    cz = _compressor(args)
    res = _chosen_cut(cz, args)
    if args.finetune_epochs:
        res = cz.finetune(res, args.finetune_epochs, lr=args.finetune_lr)
    if args.form_by != "flops" and args.form == "low_rank":
        res = _forms_by(cz, res, args)
    before, after = dict(cz.base), res.to_dict()
    if args.latency:
        timed = _latency([cz.model, res.model], cz.example_input)
        before.update(timed[0])
        after.update(timed[1])
    out = {"run": cz.run, "checkpoint": args.which, "before": before, "after": after}
    out["task"] = cz.task  # a regression scores R²
    out["spectra"] = _rank_measures(cz)
    if args.out:
        from .export import save

        meta = {"run": cz.run, "policy": json.dumps(res.policy), "val_acc": res.val_acc}
        meta["preprocess"] = cz.preprocess
        with _writing("--out"):
            save(res.model, args.out, metadata=meta, fold_bn=_fold_bn(args), input_shape=_shape(cz))
        out["out"] = str(args.out)
        if _fold_bn(args):  # BatchNorm folded: fewer parameters than "after" counts
            out["out_params"] = _file_params(args.out)
    if args.json:
        _print_json(out)
        return 0
    _print_compress(out, args)
    return 0


def _forms_by(cz, res, args):
    """The result with each cut layer's form chosen by ``--form-by`` (the function is the
    same, so the metrics stand; the cost is counted again)."""
    import dataclasses

    from .clone import clone_model
    from .cost import count_cost
    from .kinds import choose_forms

    model = clone_model(res.model)
    forms = choose_forms(model, cz.example_input, by=args.form_by, batch=args.form_batch)
    cost = count_cost(model, cz.example_input)
    plan = {n: dict(p) for n, p in res.plan.items()}
    for n, p in forms.items():
        if n in plan and p["form"] == "dense" and plan[n]["form"] == "low_rank":
            plan[n].update(form="dense", note=p["why"])
    base = cz.base_cost
    shares = {"params": 100.0 * cost.params / max(1, base.params)}
    shares["flops"] = 100.0 * cost.flops / max(1, base.flops)
    return dataclasses.replace(
        res,
        extra=_budget_after_forms(res, cost, shares, args.form_by),
        model=model,
        plan=plan,
        policy={**res.policy, "form_by": args.form_by, "form_batch": args.form_batch},
        params=cost.params,
        flops=cost.flops,
        params_pct=shares["params"],
        flops_pct=shares["flops"],
    )


def _budget_after_forms(res, cost, shares: dict, form_by: str) -> dict:
    """``res.extra`` with the budget's ``met`` counted again for the model whose forms were
    chosen, and a note when the dense layers are what took it over."""
    extra = dict(res.extra)
    budget = extra.get("budget")
    if not budget:
        return extra
    measure = budget["measure"]
    met = bool(getattr(cost, measure) <= budget["target"])
    extra["budget"] = {**budget, "met": met}
    if budget["met"] and not met:
        extra["note"] = (
            f"{measure} {shares[measure]:.1f}% is over the budget of {budget['percent']:g}%: "
            f"the layers kept dense because of {form_by} carry their whole weight "
            "(--form-by flops keeps the budget)"
        )
    return extra


def _rank_measures(cz) -> dict:
    """Per cut layer: effective rank (sigma > 1% of sigma_max) and energy rank (99% of the sum
    of sigma^2), the second being the one that predicts how far a layer can be cut."""
    from .spectra import effective_rank, energy_rank

    return {
        n: {"effective": effective_rank(s), "energy": energy_rank(s)}
        for n, s in cz.svd.spectra.items()
    }


def _policy_words(policy: dict) -> str:
    name = policy.get("policy", "?")
    value = policy.get("value")
    return f"{name} {value:g}" if isinstance(value, int | float) else str(name)


#: more layers than this are listed one line per stage
_LAYERS_ON_ONE_LINE = 12


def _names(names: list[str], shown: int = 4) -> str:
    more = f", ... {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _print_layers(title: str, values: dict[str, str]) -> None:
    """``title: layer value, ...`` on one line, or one line per stage for a deep network (the
    stages the app groups its tables by, :func:`lorita.kinds.stages`)."""
    if len(values) <= _LAYERS_ON_ONE_LINE:
        print(f"{title}: " + ", ".join(f"{n} {v}" for n, v in values.items()))
        return
    from .kinds import stages

    print(f"{title}, by stage:")
    by_stage: dict[str, list[str]] = {}
    for name, stage in stages(values, _LAYERS_ON_ONE_LINE).items():
        by_stage.setdefault(stage, []).append(name)
    for stage, names in by_stage.items():
        items = [values[n] if n == stage else f"{n.removeprefix(stage + '.')} {values[n]}"
                 for n in names]  # fmt: skip
        print(f"  {stage}: " + ", ".join(items))


def _print_notes(plan: dict) -> None:
    """The plan's per-layer notes, one line per note (layers sharing it named together)."""
    notes: dict[str, list[str]] = {}
    for n, p in plan.items():
        if p.get("note"):
            notes.setdefault(p["note"], []).append(n)
    if notes:
        print("notes:")
    for note, names in notes.items():
        if len(names) > 2:
            print(f"  {len(names)} layers ({_names(names)}): {note}")
        else:
            print("\n".join(f"  {n}: {note}" for n in names))


_MEASURE_WORDS = {"params": "parameters", "flops": "FLOPs"}


def _print_compress(out: dict, args) -> None:
    before, after = out["before"], out["after"]
    k = after["finetune_epochs"]
    tuned = f", fine-tuned {k} epoch{'s' if k != 1 else ''}" if k else ""
    search = after.get("search")
    if search:
        drop = search["max_drop"]
        r2 = f" ({drop / 100:g} R²)" if out.get("task") == "regression" else ""
    how = (
        f"{search['search']} search within {drop:g} points{r2}"
        if search
        else _policy_words(after["policy"])
    )
    if not after.get("budget", {}).get("met", True):
        how += " (not met)"
    form = args.form
    if args.form_by != "flops" and args.form == "low_rank":
        form += f" (chosen by {args.form_by} at batch {args.form_batch})"
    print(f"run {out['run']} ({out['checkpoint']} checkpoint), {how}, form {form}{tuned}")
    lat = "latency_b1_ms" in after
    score, fmt = _scored(out.get("task"))  # a regression's "acc" is R²
    header = ["", "params", "FLOPs", f"val {score}", f"test {score}"]
    header += ["ms (batch 1)", "ms (batch 64)"] if lat else []

    def row(label, m):
        cells = [label, f"{m['params']:,}", f"{m['flops']:,}"]
        cells += [fmt(m.get("val_acc")), fmt(m.get("test_acc"))]
        return cells + ([f"{m['latency_b1_ms']:.3f}", f"{m['latency_b64_ms']:.3f}"] if lat else [])

    ratio = ["after/before", f"{after['params_pct']:.1f}%", f"{after['flops_pct']:.1f}%"]
    ratio += [_points(after, before, k, out.get("task")) for k in ("val_acc", "test_acc")]
    if lat:
        ratio += [
            f"{100 * after[k] / max(before[k], 1e-12):.1f}%"
            for k in ("latency_b1_ms", "latency_b64_ms")
        ]
    print(_table([row("before", before), row("after", after), ratio], header))
    if lat:
        print(_latency_words(before.get("latency_as"), after.get("latency_as")))
        busy = (after.get("latency_as") or {}).get("busy")
        if busy:
            print(f"note: {busy}")
        _say_if_slower(before, after, args)
    plan, spectra = after["plan"], out["spectra"]
    _print_layers("ranks kept", {n: f"{p['rank']}/{p['full']}" for n, p in plan.items()})
    if spectra:
        _print_layers(
            "energy rank (99% of sum sigma^2) / effective rank",
            {n: f"{v['energy']}/{v['effective']}" for n, v in spectra.items()},
        )
    if after.get("note"):
        print(f"note: {after['note']}")
    elif not after.get("budget", {}).get("met", True):
        b = after["budget"]
        print(_unmet_note(b, after[b["measure"] + "_pct"]))
    _print_notes(plan)
    if out.get("out"):
        kept = out.get("out_params")
        folded = (
            f" ({kept:,} parameters: BatchNorm folded into the layer before it; the counts "
            "above are before folding)"
            if kept is not None and kept != out["after"].get("params")
            else ""
        )
        print(f"saved {out['out']}{folded}")


def _file_params(path) -> int:
    """How many parameters the model in a file written by ``save`` has."""
    from .export import load

    return sum(p.numel() for p in load(path).parameters())


def _say_if_slower(before: dict, after: dict, args) -> None:
    """A note when the cut measured slower than the original at a batch size, with the flags
    that choose each layer's form by measured time at that batch instead."""
    from .kinds import is_faster

    if getattr(args, "form_by", "flops") == "latency":
        return
    for b in (1, 64):
        key = f"latency_b{b}_ms"
        if is_faster(before[key], after[key]):  # the original clearly faster (the 5% rule)
            print(
                f"note: at batch {b} the cut measured slower than the original "
                f"({100 * after[key] / before[key]:.0f}%): the forms were chosen by FLOPs; "
                f"--form-by latency --form-batch {b} keeps a thin layer only where it is faster"
            )


def _latency_words(before: dict | None, after: dict | None) -> str:
    """How both models were timed (the same way: as they deploy)."""
    if not before or not after:
        return "latency: both models timed the same way"
    folds = (
        f"BatchNorm folded into the layer before it ({before['batchnorm_folded']} of "
        f"{before['batchnorm']} before, {after['batchnorm_folded']} of {after['batchnorm']} "
        "after)"
        if before["batchnorm"] or after["batchnorm"]
        else "no BatchNorm to fold"
    )
    return f"latency: both models timed as they deploy: {folds}, {after['memory_format']} memory"


def _points(after: dict, before: dict, key: str, task: str | None) -> str:
    from .scores import score_of

    return score_of(task).change(after.get(key), before.get(key), unit=" pts")


# --------------------------------------------------------------------------- compare


def cmd_compare(args) -> int:
    from .baselines import compare

    store = _store(args)
    run = _get_run(args, args.run)
    _require_composed(run)
    if args.baseline is not None:
        try:
            baseline = _get_run(args, args.baseline)
        except ValueError as e:  # "run: no run named ..."
            raise UsageError(f"--baseline: {str(e).partition(': ')[2] or e}") from None
    else:
        baseline = store.pair(run)
        if baseline is None:
            raise UsageError(f"run {run.name!r} has no paired N=1 run; name one with --baseline")
    n = baseline.config.get("n_factors", 1)
    if n != 1:
        raise UsageError(
            f"--baseline: {baseline.name!r} has N={n}; the baseline is an N=1 run "
            "(trained with --factors 1)"
        )
    for r in (run, baseline):
        _require_checkpoint(r, args.which)
        _say_if_unfinished(r, args.which)
    with _CountBar(not args.json, "cuts") as bar, _as_flag("baseline_run", "--baseline"):
        rows = compare(
            run,
            baseline,
            budgets=args.budgets,
            finetune_epochs=args.finetune_epochs,
            measure=args.measure,
            which=args.which,
            **({"methods": args.methods} if args.methods else {}),
            finetune_lr=args.finetune_lr,
            progress=bar,
        )
    if args.json:
        _print_json(rows)
        return 0
    print(
        f"{run.name} against the N=1 run {baseline.name}, budgets in % of {args.measure}; "
        f"cuts chosen on validation, test reported"
    )
    word, fmt = _scored(rows[0].get("task") if rows else None)
    header = ["budget", "method", "fine-tuned", "params %", "FLOPs %", f"val {word}"]
    header.append(f"test {word}")
    table = [
        [
            f"{r['budget']:g}%" + ("" if r.get("met", True) or r.get("error") else " (not met)"),
            r["label"],
            f"{r['finetune_epochs']} epoch{'s' if r['finetune_epochs'] > 1 else ''}"
            if r["finetune_epochs"]
            else "no",
            *(
                ["failed"] * 4
                if r.get("error")
                else [
                    f"{r['params_pct']:.1f}",
                    f"{r['flops_pct']:.1f}",
                    fmt(r.get("val_acc")),
                    fmt(r.get("test_acc")),
                ]
            ),
        ]
        for r in rows
    ]
    print(_table(table, header))
    failed = {r["label"]: r["error"] for r in rows if r.get("error")}
    for label, error in failed.items():
        print(f"{label} failed: {error}")
    if any(not r.get("met", True) and not r.get("error") for r in rows):
        print(
            "(not met): the budget is below the smallest model the method makes; its row is "
            "that model (a cut keeps rank 1 in every layer, and the output layer whole)"
        )
    return 0


@contextlib.contextmanager
def _as_flag(name: str, flag: str):
    """A library error about argument ``name`` named by its command-line ``flag``."""
    try:
        yield
    except ValueError as e:
        if str(e).startswith(f"{name}:"):
            raise UsageError(f"{flag}:{str(e)[len(name) + 1 :]}") from None
        raise


def _require_composed(run) -> None:
    """RUN of ``compare`` is a composed (N > 1) run; an N=1 run is refused, its composed
    partner named when it has one."""
    from .runs import RunStore

    n = run.config.get("n_factors", 1)
    if n != 1:
        return
    partner = RunStore(run.path.parent).pair(run)
    hint = (
        f"; its composed partner is {partner.name!r}: lorita compare {partner.name} "
        f"--baseline {run.name}"
        if partner is not None
        else "; name the composed run, with this one as --baseline"
    )
    raise UsageError(f"RUN: compare takes a composed (N>1) run; {run.name!r} has N={n}{hint}")


class _CountBar:
    """A tqdm bar for ``progress(done, total, item)`` callbacks, on a terminal only."""

    def __init__(self, show: bool, unit: str) -> None:
        self.show = show and sys.stderr.isatty()
        self.unit, self.bar = unit, None

    def __enter__(self):
        return self

    def __call__(self, done: int, total: int, item=None) -> None:
        if not self.show:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit=self.unit, file=sys.stderr, leave=False)
        self.bar.update(done - self.bar.n)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------- export


def _shape(cz) -> list[int]:
    return list(cz.example_input.shape[1:])


def _export_format(args) -> str:
    """--format, else the one --out's extension names; a clash of the two is refused."""
    suffix = Path(args.out).suffix.lower()
    named = {".onnx": "onnx", ".safetensors": "safetensors"}.get(suffix)
    fmt = args.format or named or "safetensors"
    if named and named != fmt:
        raise UsageError(
            f"--out: {_short(str(args.out))!r} ends in {suffix} but --format is {fmt}; "
            f"name the file .{'onnx' if fmt == 'onnx' else 'safetensors'} or drop --format"
        )
    _check_suffix(args.out, fmt)
    return fmt


#: the suffixes of other model files (PyTorch's pickles, TensorFlow's, GGUF): a file written
#: under one of them would be opened as that format, and fail
_OTHER_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle", ".tar", ".zip", ".npz")
_OTHER_SUFFIXES += (".h5", ".keras", ".tflite", ".pb", ".gguf", ".ptl", ".torchscript")


def _check_suffix(out, fmt: str) -> None:
    """--out may not end in the suffix of another model format than the ``fmt`` written."""
    suffix = Path(out).suffix.lower()
    if suffix in _OTHER_SUFFIXES:
        raise UsageError(
            f"--out: {_short(str(out))!r} ends in {suffix}, another format's suffix, and the "
            f"file is {fmt}: name it .{fmt} (read it with "
            + ("onnxruntime)" if fmt == "onnx" else "lorita.load, not torch.load)")
        )


@contextlib.contextmanager
def _writing(flag: str):
    """A file that cannot be written (disk full, read-only folder) as an error naming ``flag``."""
    try:
        yield
    except OSError as e:
        raise UsageError(f"{flag}: {e.strerror or e}") from None


def _as_trained(args):
    """(merged model, one example input, the file's metadata) of the run's checkpoint as
    trained, read without its dataset: the model records its input shape and the checkpoint
    its validation accuracy and how to feed it. None when the shape or the accuracy is missing
    (the dataset is read instead)."""
    run = _get_run(args, args.run)
    _require_checkpoint(run, args.which)
    _say_if_unfinished(run, args.which)  # (as the cut exports say it)
    try:
        model, example, val_acc = run.as_trained(args.which)
    except ValueError:  # no input shape recorded
        return None
    if val_acc is None:
        return None
    return model, example, run.as_trained_metadata(args.which, val_acc)


def cmd_export(args) -> int:
    args.format = _export_format(args)
    if args.format == "onnx":  # before any work: what to install when it cannot be written
        from .export import check_onnx_packages

        check_onnx_packages()
    if args.policy == NO_CUT:
        args.policy = None
    cut = args.policy is not None or args.max_drop is not None
    light = None if cut else _as_trained(args)
    if light is not None:  # as trained: no dataset needed (it may be on another machine)
        _write_export(args, *light)
        return 0
    cz = _compressor(args, cut=cut)
    if not cut:
        model, words = cz.model, "none"
    else:
        if args.max_drop is None:
            model, words = _export_cut(cz, args.policy, args.form), str(args.policy)
        else:
            res = _chosen_cut(cz, args)
            model = res.model
            words = f"{_policy_words(res.policy)} ({args.search} search within {args.max_drop:g} points)"
            name, fmt = _scored(cz.task)  # which cut the search chose, said beside the file
            print(
                f"chosen: {words}: {res.params_pct:.1f}% of the parameters, "
                f"{res.flops_pct:.1f}% of the FLOPs, val {name} {fmt(res.val_acc)}",
                file=sys.stderr,
            )
        if args.form_by != "flops" and args.form == "low_rank":
            from .kinds import choose_forms

            choose_forms(model, cz.example_input, by=args.form_by, batch=args.form_batch)
            words += f", forms by {args.form_by} at batch {args.form_batch}"
    meta = {"run": cz.run, "policy": words, "preprocess": cz.preprocess}
    if args.format != "onnx":
        acc = cz.data.metrics(model, parts=("val",)) if cut else cz.base
        meta["val_acc"] = acc["val_acc"]
    _write_export(args, model, cz.example_input, meta)
    return 0


def _unmet_note(budget: dict, kept_pct: float) -> str:
    """'note: budget not met: ...' for a cut that keeps ``kept_pct`` % of the budget's measure."""
    return (
        f"note: budget not met: the cut keeps {kept_pct:.1f}% of the "
        f"{_MEASURE_WORDS[budget['measure']]}, over the budget of {budget['percent']:g}%"
    )


def _export_cut(cz, policy, form: str):
    """The cut to export. A budget with the dense form: the ranks that fit the budget (thin),
    written dense into the original architecture, as the Export page does (the budget itself
    counts the thin form; a dense weight keeps its size)."""
    from .truncation import Budget, Ranks

    if form == "dense" and isinstance(policy, Budget):
        thin, extra = cz.cut(policy, form="low_rank")
        print(
            f"note: --form dense writes the ranks of the {policy.percent:g}% budget as dense "
            "weights in the original architecture: every weight keeps its size (the budget "
            "counts the thin form, --form low_rank)",
            file=sys.stderr,
        )
        _say_if_unmet(cz, thin, extra)
        return cz.cut(Ranks(dict(thin.lorita_ranks)), form="dense")[0]
    model, extra = cz.cut(policy, form=form)
    _say_if_unmet(cz, model, extra)
    return model


def _say_if_unmet(cz, model, extra: dict) -> None:
    """On stderr, when a budget cut cannot fit its budget (every layer at rank 1 still costs
    more, say): the file is written, but it is not the size asked for."""
    budget = extra.get("budget")
    if budget and not budget["met"]:
        from .cost import count_cost

        measure = budget["measure"]
        got = getattr(count_cost(model, cz.example_input), measure)
        kept = 100.0 * got / max(getattr(cz.base_cost, measure), 1)
        print(_unmet_note(budget, kept), file=sys.stderr)


def _write_export(args, model, example, meta: dict | None) -> None:
    """``model`` to ``--out`` as ONNX or safetensors (with ``meta`` and the input shape);
    prints the file(s) written."""
    from .export import export_onnx, onnx_data_path, save

    with _writing("--out"):
        if args.format == "onnx":
            export_onnx(model, example, args.out, fold_bn=_fold_bn(args, "onnx"), metadata=meta)
        else:
            shape = list(example.shape[1:])
            save(model, args.out, input_shape=shape, metadata=meta, fold_bn=_fold_bn(args))
    print(args.out)
    data = onnx_data_path(args.out)
    if args.format == "onnx" and data.exists():  # over 2 GiB of weights: they are there
        print(f"{data} (the weights: keep it beside {Path(args.out).name})")


# --------------------------------------------------------------------------- main


def _one_line(message) -> str:
    """A message as one line of at most MAX_MESSAGE characters."""
    text = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    return _short(text, MAX_MESSAGE) if text else ""


def _fail(message) -> int:
    local = _torchrun_before_group()
    if not local:
        _say(f"lorita: error: {_one_line(message)}", sys.stderr)
    else:  # silent: ended first, it would have torchrun end the one that says why (SIGTERM)
        with contextlib.suppress(KeyboardInterrupt):  # (torchrun's SIGTERM once that one
            time.sleep(_TORCHRUN_LINGER_S)  # has ended: this one ends with 2 all the same)
    return 2


#: how long a torchrun process that does not say its error waits before it ends
_TORCHRUN_LINGER_S = 1.5


def _torchrun_before_group() -> int | None:
    """``LOCAL_RANK`` of a process torchrun started whose process group has not started (bad
    input: every process reads the same command line and fails alike, and only the first of
    each machine says why); None otherwise (what fails once the group has started may be
    this process's own, said by it). Read from the environment, no torch imported."""
    local = os.environ.get("LOCAL_RANK", "").strip()
    if not (local.isdigit() and "WORLD_SIZE" in os.environ):
        return None
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return None
    return int(local)


def _say(text: str, stream=None) -> None:
    """Print a line that a reader gone away (``lorita train 2>&1 | head -3``) does not stop:
    what follows goes nowhere, and the command goes on to its own end and exit code (a run
    trains to its end, an error keeps its code)."""
    stream = sys.stdout if stream is None else stream
    try:
        print(text, file=stream, flush=True)
    except BrokenPipeError:
        _to_devnull(stream)


def _to_devnull(stream) -> None:
    """Point ``stream``'s file at /dev/null (its reader is gone; Python's last flush too)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, stream.fileno())
        os.close(null)


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line on stderr, like the errors (no source line). Under torchrun,
    before its process group starts, the first process of each machine alone says it, as
    with errors: every process checks the same command line and would warn alike."""
    if _torchrun_before_group():
        return
    try:
        print(f"lorita: warning: {_one_line(message)}", file=sys.stderr)
    except (OSError, ValueError):
        pass


def needs_library(argv: list[str]) -> bool:
    """Whether a command line runs a command, all of which import the library (and torch),
    rather than only print the list of commands (``lorita``, ``lorita --help``)."""
    return bool(argv) and argv[0] not in ("-h", "--help")


def main(argv: list[str] | None = None) -> int:
    """Run one command; the exit code is 0, 1 (training failed), 2 (bad input) or 130
    (a training run stopped before its end, or any command interrupted)."""
    with warnings.catch_warnings(), _term_interrupts(), _text_as_given():
        warnings.showwarning = _warning_line
        _warnings_as_lines()
        return _main(argv)


def _warnings_as_lines() -> None:
    """A warning filter that makes warnings errors (``PYTHONWARNINGS=error``, ``-W error``)
    shows them as warning lines instead: a command's notes (a run cut before it completed)
    do not end it with a traceback. Other filters (``ignore``) stay as they are."""
    kept = list(warnings.filters)
    if not any(f[0] == "error" for f in kept):
        return
    warnings.resetwarnings()
    for action, message, category, module, lineno in kept:
        warnings.filterwarnings(
            "default" if action == "error" else action,
            _pattern(message),
            category,
            _pattern(module),
            lineno,
            append=True,
        )


def _pattern(match) -> str:
    """A warning filter's message or module as the text filterwarnings takes (a plain string
    there, as in Python's own default filters, matches exactly)."""
    if match is None:
        return ""
    if isinstance(match, str):
        return re.escape(match) + r"\Z"
    return match.pattern


@contextlib.contextmanager
def _text_as_given():
    """Paths printed on stdout as their bytes, even those that are not UTF-8 (a folder named
    in Latin-1): printed with Python's strict encoder they would end a command that has done
    its work (the file written) with an error."""
    stream = sys.stdout
    before = getattr(stream, "errors", None)
    try:
        stream.reconfigure(errors="surrogateescape")
    except (AttributeError, ValueError, OSError):  # not a text file (a test's StringIO)
        before = None
    try:
        yield
    finally:
        if before is not None:
            with contextlib.suppress(AttributeError, ValueError, OSError):
                stream.reconfigure(errors=before)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _term_interrupts():
    """SIGTERM ends a command as Ctrl-C does (a file being written is removed, not left
    under its temporary name); ``lorita train`` sets its own (stop after the step)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _settle(args) -> None:
    """What argparse cannot check alone: ``$LORITA_RUNS`` as --runs-dir is checked (a folder
    path, not empty, not a file), --search only goes with --max-drop, and a budget search
    not with --form dense."""
    if hasattr(args, "runs_dir") and args.runs_dir is None and "LORITA_RUNS" in os.environ:
        try:
            args.runs_dir = _folder_arg("LORITA_RUNS")(os.environ["LORITA_RUNS"])
        except argparse.ArgumentTypeError as e:
            raise UsageError(f"LORITA_RUNS (the runs folder): {e}") from None
    if hasattr(args, "curves") and args.curves is None:
        raw = os.environ.get(CURVES_ENV, "1").strip()
        if raw not in ("0", "1"):
            raise UsageError(
                f"{CURVES_ENV} (keep trade-off curves when a run completes): expected 0 or 1, "
                f"got {raw[:40]!r}"
            )
        args.curves = raw == "1"
    if hasattr(args, "search"):
        if args.search is not None and getattr(args, "max_drop", None) is None:
            raise UsageError(
                f"--search {args.search}: only with --max-drop (it is the policy the search for "
                "the smallest model within P points follows)"
            )
        from .truncation import POLICIES

        budget = args.search in POLICIES and POLICIES[args.search].needs_costs
        if budget and args.form == "dense":
            raise UsageError(
                f"--search {args.search} with --form dense: a budget counts the thin form's "
                "size, and a dense weight keeps its size; search with --search global (the "
                "budgets' own order) or cut with --form low_rank"
            )
        args.search = args.search or "global"


def _main(argv: list[str] | None) -> int:
    try:
        args = build_parser(lazy=True).parse_args(argv)
        _settle(args)
        with _data_dir(getattr(args, "data_dir", None)):
            return args.func(args)
    except BrokenPipeError:  # `lorita runs | head`: the reader has what it wanted
        _to_devnull(sys.stdout)  # and Python's last flush goes nowhere
        return 0
    except (UsageError, argparse.ArgumentTypeError) as e:
        return _fail(e)
    except (ValueError, OSError) as e:  # includes DatasetUnavailable and JSON errors
        return _fail(str(e) or type(e).__name__)
    except RecursionError:
        return _fail("input nested too deeply")
    except MemoryError:
        return _fail("not enough memory for this command")
    except KeyboardInterrupt:
        _say("lorita: interrupted", sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
