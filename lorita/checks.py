"""Argument checks the library's public calls share: a model, a yes/no option, a number.

This module loads nothing heavy (torch only inside :func:`check_module`). Numbers from NumPy (``np.int64(3)``, ``np.float32(0.5)``: what an array's elements and many
loops give) count as numbers; a bool never does (True is not a rank).
"""

from __future__ import annotations

import math
import numbers
from pathlib import Path
from typing import Any


def is_int(v: Any) -> bool:
    """Whether ``v`` is an integer (Python's or NumPy's), not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_real(v: Any) -> bool:
    """Whether ``v`` is a real number (integer or float, Python's or NumPy's), not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def is_num(v: Any) -> bool:
    """Whether ``v`` is a finite real number (an int past float's range is not: nothing that
    reads it as a float can use it)."""
    if not is_real(v):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


def check_module(model, field: str = "model") -> None:
    """A ValueError naming ``field`` unless ``model`` is an nn.Module instance."""
    import torch  # here: the run store's modules check numbers without loading torch
    from torch import nn

    if isinstance(model, type) and issubclass(model, nn.Module):
        raise ValueError(f"{field}: pass an instance ({model.__name__}(...)), got the class")
    if not isinstance(model, nn.Module):
        raise ValueError(f"{field}: expected a torch nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise ValueError(
            f"{field}: a TorchScript module (torch.jit.script / trace) cannot be rebuilt; pass "
            "the nn.Module it was made from"
        )


def check_flag(value, field: str) -> bool:
    """``value`` when it is True or False; else a ValueError naming ``field`` (a "no" would
    read as True)."""
    if not isinstance(value, bool):
        raise ValueError(f"{field}: expected True or False, got {value!r}"[:200])
    return value


def check_optional_flag(value, field: str) -> bool | None:
    """``value`` when it is None (decided for you), True or False; else a ValueError naming
    ``field``."""
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"{field}: expected None, True or False, got {value!r}"[:200])
    return value


def check_names(names, field: str) -> list | None:
    """``names`` (layer names) as a list: None stays None, one str is one name; else a
    ValueError naming ``field`` (each name is checked against the model by the caller)."""
    if names is None:
        return None
    if isinstance(names, str):
        return [names]
    if isinstance(names, (bytes, dict)) or not hasattr(names, "__iter__"):
        raise ValueError(f"{field}: expected a layer name or a list of them, got {names!r}"[:200])
    return list(names)


def expand_path(path, field: str) -> Path:
    """``path`` with a leading ``~`` or ``~user`` expanded; a ValueError naming ``field`` when
    that home cannot be found (``Path.expanduser`` raises RuntimeError for an unknown user)."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        user = str(path).split("/", 1)[0]
        raise ValueError(
            f"{field}: {user!r} in {str(path)[:200]!r} is no known user's home folder; give the "
            "path in full (or ~/ for your own home)"
        ) from None
