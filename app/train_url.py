"""The Train page's form kept in the page address, so that a refresh comes back to it.

Only the fields that differ from the form's starting values (:func:`app.train_form.
starting_values`) are written, each under its config name (``?epochs=5&lr=0.01``, the
fields of :data:`app.presets.FORM_FIELDS`). Read back, each is checked as the form checks it
(a number as Start checks it, a dataset, model or device among those the form offers, an
options box as Start reads it); one that fails (a hand-edited or stale link) is left out,
and the form shows its starting value.
"""

from __future__ import annotations

import math
import re
from typing import Any

from app import options, presets, train_form

MAX_TEXT = 2000  # a longer value in the address is not one the form wrote
_INT = re.compile(r"-?\d{1,20}")
_FLOAT = re.compile(r"-?(\d+\.?\d*|\.\d+)([eE][-+]?\d{1,3})?")


def _defaults() -> dict[str, Any]:
    """What the form shows for a field a preset leaves out (``plain_epochs``)."""
    from lorita.engine.config import TrainConfig

    return TrainConfig().to_dict()


def text(field: str, value: Any) -> str:
    """``value`` of form field ``field`` as the address keeps it (a float exactly, options as
    their box shows them)."""
    kind = train_form.field_kinds()[field]
    if kind == "dict":
        return value if isinstance(value, str) else train_form.option_text({field: value}, field)
    if kind == "float" and not isinstance(value, str):
        return repr(float(value))
    if kind == "int" and not isinstance(value, str):
        return str(int(value))
    return str(value)


def _same_options(a: str, b: str, field: str) -> bool:
    """Whether two options boxes' texts say the same options (``a=1,b=2`` and ``a=1, b=2``)."""
    from lorita.engine.config import parse_options

    if a.strip() == b.strip():
        return True
    try:
        return parse_options(a, field) == parse_options(b, field)
    except ValueError:
        return False


def changed(form: dict[str, Any], start: dict[str, Any]) -> dict[str, str]:
    """The address text of each field of ``form`` (the form's values now) that differs from
    ``start`` (its starting values), by field."""
    defaults, out = _defaults(), {}
    for field in presets.FORM_FIELDS:
        if form.get(field) is None:
            continue
        now, was = text(field, form[field]), text(field, start.get(field, defaults.get(field)))
        same = _same_options(now, was, field) if field in presets.OPTION_BOXES else now == was
        if not same:
            out[field] = now
    return out


def read(texts: dict[str, str | None], preset: str) -> dict[str, Any]:
    """The form values the address ``texts`` (by field) gives, each read and checked as the
    form of ``preset`` reads and checks it; a field that fails is left out."""
    out = {}
    for field in presets.FORM_FIELDS:
        raw = texts.get(field)
        if raw is None or len(raw) > MAX_TEXT:
            continue
        try:
            out[field] = _read_one(field, raw, preset)
        except (ValueError, TypeError):
            continue  # a hand-edited or stale value: the form's own shows
    model = out.get("model")
    if model and "model_kwargs" not in out:  # the preset's options are its own family's
        own = str(presets.config(preset).get("model", ""))
        if options.family_of(str(model)) != options.family_of(own):
            out["model_kwargs"] = {}  # (the MLP's width under a ResNet would only be dropped)
    return out


def _read_one(field: str, raw: str, preset: str) -> Any:
    """One field's value from its address text; ValueError when the form would not take it."""
    import lorita as lt
    from lorita.engine.config import parse_options

    if field in presets.OPTION_BOXES:
        return parse_options(raw, field)
    if field == "dataset":
        choice, _ = train_form.split_dataset(raw)
        return _offered(raw, choice, options.datasets())
    if field == "model":
        return _offered(raw, raw, options.models(options.family_of(raw)))
    if field == "device":
        return _offered(raw, raw, options.devices())
    kind = train_form.field_kinds()[field]
    if kind == "int":
        if not _INT.fullmatch(raw):
            raise ValueError(f"{field}: not a whole number")
        value: Any = int(raw)
    elif kind == "float":
        if not _FLOAT.fullmatch(raw) or not math.isfinite(float(raw)):
            raise ValueError(f"{field}: not a number")
        value = float(raw)
    else:
        value = raw
    lt.TrainConfig.from_dict({**presets.config(preset), field: value})  # as Start checks it
    return value


def _offered(value: str, shown: str, offered: list[str]) -> str:
    if shown not in offered:
        raise ValueError(f"{shown!r} is not offered")
    return value


# The "also train N=1" box: in the address only while it differs from what the form ticks by
# itself (:func:`app.train_form.ticks_baseline`), as ``?baseline=0`` or ``?baseline=1``.
BASELINE = "baseline"
_TICKS = {"1": True, "0": False}


def baseline_text(ticked: bool, default: bool) -> str | None:
    """The address text of the box ticked or not (``ticked``), None when that is ``default``."""
    return None if bool(ticked) == bool(default) else ("1" if ticked else "0")


def read_baseline(raw: str | None) -> bool | None:
    """Whether the address ``raw`` ticks the box; None (the form's own choice) for no value
    or any text but ``0`` and ``1`` (a hand-edited or stale link)."""
    return _TICKS.get(raw.strip()) if isinstance(raw, str) and len(raw) <= 8 else None
