"""Every option list the pages offer, read from the library (never written out here).

Adding a dataset, a model, an init or a rank policy to the library makes it appear in the
app with no change to app/ or pages/ (tests/app/test_glue.py checks the lists are the
library's).
"""

from __future__ import annotations

import importlib.util
from types import ModuleType

AUTO = "auto"
FOLDER = "folder"
BUILT_IN = "built-in"


def engine() -> ModuleType:
    """The library's training engine (``lorita.engine``)."""
    import lorita.engine

    return lorita.engine


def inits() -> list[str]:
    """How a composed layer's factors start (lorita.layers.INITS)."""
    from lorita.layers import INITS

    return list(INITS)


def auto_batch() -> dict[str, int]:
    """The batch size a run with batch size 0 uses, by device (lorita.engine.config)."""
    from lorita.engine.config import AUTO_BATCH

    return dict(AUTO_BATCH)


def devices() -> list[str]:
    """``auto`` and every device a run can use here, best first."""
    return [AUTO, *engine().available_devices()]


def datasets() -> list[str]:
    """Built-in dataset names, then each path family (``folder``) the library accepts."""
    from lorita import data

    return [*data.list_datasets(), *data.list_dataset_families()]


def dataset_name(choice: str, path: str | None) -> str:
    """The library's dataset name for a form choice: ``folder`` + a path -> ``folder:PATH``."""
    if choice in datasets() and choice not in _families():
        return choice
    from lorita import data

    path = _unquoted((path or "").strip())
    if not path:
        return f"{choice}:"  # the library's check says the folder is missing
    return data.canonical_name(f"{choice}:{path}")


def _unquoted(path: str) -> str:
    """A path as pasted from a file manager or a shell (``"/data/my images"``): the quotes
    around it are not part of the folder's name."""
    if len(path) >= 2 and path[0] == path[-1] and path[0] in "'\"":
        return path[1:-1].strip()
    return path


def _families() -> list[str]:
    from lorita import data

    return data.list_dataset_families()


def is_path_family(choice: str) -> bool:
    """Whether a dataset choice needs a path (``folder``)."""
    return choice in _families()


def model_families() -> list[str]:
    """``built-in``, ``torchvision`` and, when installed, ``timm``."""
    out = [BUILT_IN, "torchvision"]
    if importlib.util.find_spec("timm") is not None:
        out.append("timm")
    return out


def models(family: str = BUILT_IN) -> list[str]:
    """Model names of one family, spelled as TrainConfig takes them (``torchvision:resnet18``)."""
    from lorita.models import list_models

    if family not in model_families():
        raise ValueError(f"model family: {family!r}; allowed: {', '.join(model_families())}")
    return list(list_models(source="lorita" if family == BUILT_IN else family))


def family_of(model: str) -> str:
    """The family of a model name (``torchvision:resnet18`` -> ``torchvision``)."""
    prefix = model.split(":", 1)[0] if ":" in model else BUILT_IN
    return prefix if prefix in model_families() else BUILT_IN


def policies() -> list[dict]:
    """Every rank policy the library has, as it describes itself for a UI (name, label,
    help, kind "scalar" or "table", slider range, step, default, format, unit)."""
    from lorita import truncation

    return list(truncation.list_policies())
