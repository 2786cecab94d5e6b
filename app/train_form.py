"""The Train page's form: its starting values, the config it makes, and every check on Start.

Checks are the library's: each form field is validated by ``TrainConfig`` on its own (so
Start lists *every* invalid field, not just the first), then the whole config, the device
(``resolve_device``) and the dataset (``lorita.data.check_dataset``: cheap, reads no data,
says what to do when the files are missing offline).
"""

from __future__ import annotations

import hashlib
import json
import stat
import time
import warnings
from pathlib import Path
from typing import Any

from app import jobs, options, presets
from lorita.io import atomic_write_bytes, remove_dead_temps

UPLOAD_DIR = "uploads"  # <runs>/.app/uploads/<sha256>.<ext> (+ .name): --init-from files
INIT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def starting_values(preset: str, run_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the form shows: the followed run's config if given, else the preset's values (for
    each field of an edited config.json that the form cannot show, ``"epochs": "x"`` say)."""
    values = presets.form_values(preset)
    if run_config:
        values.update({k: run_config[k] for k in presets.FORM_FIELDS
                       if k in run_config and _fits(k, run_config[k])})  # fmt: skip
    return values


def field_kinds() -> dict[str, str]:
    """Each TrainConfig field's kind, as its metadata gives it (int, float, dict, str, ...)."""
    import dataclasses

    from lorita.engine.config import TrainConfig

    return {f.name: f.metadata["kind"] for f in dataclasses.fields(TrainConfig)}


def _fits(field: str, value: Any) -> bool:
    """Whether ``value`` is of the kind the form shows for ``field`` (the kind TrainConfig's
    field metadata gives: int, float, dict; the others text)."""
    from lorita.checks import is_int, is_num

    kind = field_kinds()[field]
    if kind == "int":
        return is_int(value)
    if kind == "float":
        return is_num(value)
    if kind == "dict":
        return value is None or isinstance(value, dict)  # (None: no options)
    return isinstance(value, str)


def option_text(values: dict[str, Any], field: str) -> str:
    """What an options box shows for ``values[field]`` (``"depth=2, width=64"``)."""
    from lorita.engine.config import format_options

    return format_options(values.get(field))


def seed_preset(run_config: dict[str, Any]) -> str:
    """The preset closest to a run's config (same dataset and model), else the default."""
    for name in presets.PRESETS:
        cfg = presets.config(name)
        if cfg.get("dataset") == run_config.get("dataset") and cfg.get("model") == run_config.get(
            "model"
        ):
            return name
    return presets.DEFAULT_PRESET


def split_dataset(name: str) -> tuple[str, str]:
    """``folder:/data/x`` -> ("folder", "/data/x"); ``digits`` -> ("digits", "")."""
    family, sep, path = str(name).partition(":")
    if sep and options.is_path_family(family):
        return family, path
    return str(name), ""


#: how an error about the image folder box begins (it stands for the config's dataset errors)
FOLDER_BOX = "image folder:"


def folder_errors(choice: str, path: str | None) -> list[str]:
    """An image folder typed while the dataset is not a path family: refused, not ignored
    (the run would train on the chosen built-in dataset and the folder would do nothing);
    a path family chosen with its box left empty: named as the box the page shows."""
    path = (path or "").strip()
    if not path and options.is_path_family(choice):
        return [
            f"{FOLDER_BOX} empty; type the path of your images' folder, one sub-folder of "
            f"images per class, to train on {choice!r}"
        ]
    if not path or options.is_path_family(choice):
        return []
    return [
        f"{FOLDER_BOX} {path!r} is given but the dataset is {choice!r}; pick "
        f"{options.FOLDER} as the dataset to train on the folder, or clear the image folder"
    ]


def build(
    preset: str,
    form: dict[str, Any],
    base: dict[str, Any] | None = None,
    notes: list[str] | None = None,
    typed: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The run's config: ``base`` (a followed run's config) or the preset, with the form on top.

    ``form["dataset"]`` is the dataset choice and ``form["dataset_path"]`` its folder for a
    path family; ``form["init_from"]`` an uploaded file's saved path (or None);
    ``form["model_kwargs"]`` / ``form["dataset_kwargs"]`` the options boxes' text
    (``"width_mult=0.5"``, read by :func:`lorita.engine.config.parse_options`) or dicts.
    Options the start kept for another dataset or model (the preset's MLP width, the model
    changed in the form) are left out, and ``notes`` says so; those of the fields in ``typed``
    (a box the user filled for the new choice) are the user's and stay.
    """
    from lorita.engine.config import parse_options

    form = dict(form)
    form["dataset"] = options.dataset_name(form["dataset"], form.pop("dataset_path", ""))
    init_from = form.pop("init_from", None)
    for field, label in presets.OPTION_BOXES.items():
        if isinstance(form.get(field), str):  # the box's text: "size=64, channels=1"
            form[field] = parse_options(form[field], label.lower())
    start = dict(base) if base else presets.config(preset)
    cfg = {**start, **{k: v for k, v in form.items() if k in presets.FORM_FIELDS}}
    foreign = {f: v for f, v in presets.foreign_options(cfg, start).items() if f not in typed}
    for field, value in foreign.items():
        cfg.pop(field)
        if notes is not None and value:
            owner = presets.OPTION_OWNERS[field]
            notes.append(
                f"{presets.OPTION_BOXES[field].lower()} {option_text(foreign, field)} are "
                f"{start[owner]}'s (the form's before {cfg[owner]} was chosen): left out"
            )
    cfg.pop("init_from", None)
    if init_from:
        cfg["init_from"] = str(init_from)
    return cfg


def field_errors(preset: str, config: dict[str, Any]) -> list[str]:
    """One message per invalid form field, then any problem of the whole config."""
    return _checked(preset, config)[0]


def _checked(preset: str, config: dict[str, Any]) -> tuple[list[str], dict[str, Any] | None]:
    """The messages of :func:`field_errors`, and ``config`` with each invalid field set to
    the preset's value (None when the rest is invalid too): the dataset and model checks run
    on it, so that one press of Start lists every problem, not one round at a time."""
    import lorita as lt

    good = presets.config(preset)
    errors: list[str] = []
    fixed = dict(config)
    for field in presets.FORM_FIELDS:
        if field not in config or field in ("dataset", "model", "device", *presets.OPTION_BOXES):
            continue  # checked with the whole config: they belong to its dataset and model
        try:
            lt.TrainConfig.from_dict({**good, field: config[field]})
        except (ValueError, TypeError) as exc:
            errors.append(_one_line(exc))
            fixed[field] = good[field]
    whole = []  # the options boxes' problems, each box set aside in turn to find the next
    while True:
        try:
            lt.TrainConfig.from_dict(fixed)
            break
        except (ValueError, TypeError) as exc:
            whole.append(_one_line(exc))
            box = next(  # the box the message names (by its field or its label), if any
                (f for f, label in presets.OPTION_BOXES.items()
                 if fixed.get(f) and whole[-1].startswith((f, label.lower()))),
                None,
            )  # fmt: skip
            if box is None:
                break
            fixed[box] = {}  # (each pass empties one box: this ends)
    return (errors + whole, None) if whole else (errors, fixed)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check(
    preset: str,
    config: dict[str, Any],
    notes: list[str] | None = None,
    found: dict[str, Any] | None = None,
) -> list[str]:
    """Every reason ``config`` cannot start, each naming its field; empty when it can. What
    is worth saying when it starts (a pretrained head left fresh) goes to ``notes``; what the
    dataset check said to ``found`` (:func:`dataset_errors`)."""
    errors, fixed = _checked(preset, config)
    try:
        options.engine().resolve_device(config.get("device", options.AUTO))
    except (ValueError, RuntimeError) as exc:
        errors.append(_one_line(exc))
    data = [e for e in dataset_errors(config, found) if e not in errors]
    errors += data
    if fixed is not None and not data:  # the model's checks need a config and its data
        errors += model_errors(fixed, notes if not errors else None)
    return errors


def model_errors(config: dict[str, Any], notes: list[str] | None = None) -> list[str]:
    """The library's model checks before a run exists: its size against this machine's
    memory (built on the meta device) and the uploaded starting weights against its layers.
    What is worth saying at Start (a pretrained head left fresh) goes to ``notes``."""
    import lorita as lt
    from lorita.engine import preflight

    try:
        note = preflight.check_model(lt.TrainConfig.from_dict(config))
    except ValueError as exc:  # DatasetUnavailable too
        return [_one_line(exc)]
    if note and notes is not None:
        notes.append(note)
    return []


def dataset_errors(config: dict[str, Any], found: dict[str, Any] | None = None) -> list[str]:
    """The library's cheap dataset check (no data read): missing files, empty folders.

    When it passes, ``found`` gets what it said: ``"note"`` (:func:`dataset_note`) and
    ``"warnings"``, the library's warnings about the data (an image over Pillow's pixel
    limit), each once, for the page to show: the check runs once per Start, and its warnings
    do not go to the server's terminal.
    """
    try:
        note, said = _dataset_said(config) if found is not None else (dataset_note(config), [])
    except ValueError as exc:  # DatasetUnavailable is a ValueError
        text = _one_line(exc)
        return [text if text.startswith("dataset") else f"dataset: {text}"]
    if found is not None:
        found.update(note=note, warnings=said)
    return []


def _dataset_said(config: dict[str, Any]) -> tuple[str, list[str]]:
    """:func:`dataset_note` and the warnings it raised, each once (kept, not printed)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        note = dataset_note(config)
    return note, list(dict.fromkeys(str(w.message) for w in caught))


def dataset_note(config: dict[str, Any]) -> str:
    """Where the run's data will come from (``"local files in ..."``, ``"will download into
    ... (needs internet)"``); ValueError when it cannot be had."""
    from lorita import data

    return data.check_dataset(config["dataset"], **(config.get("dataset_kwargs") or {}))


def name_upload(message: str, saved: str | Path | None, file_name: str | None) -> str:
    """``message`` naming the uploaded file as the user knows it (``'mine.safetensors'``), not
    where the app keeps it (``<runs>/.app/uploads/<sha256>.safetensors``)."""
    if not saved or not file_name:
        return message
    saved = str(saved)
    return message.replace(repr(saved), repr(file_name)).replace(saved, file_name)


def save_upload(file_name: str, data: bytes, root: str | Path | None = None) -> Path:
    """Keep an uploaded ``--init-from`` file in the runs folder; returns its path.

    The name is the content's SHA-256 (the same file uploaded twice is stored once; no user
    text reaches the path). The training child reads it: safetensors, or a PyTorch
    state_dict loaded with ``weights_only=True`` (no pickle code runs).
    """
    suffix = Path(file_name).suffix.lower()
    if suffix not in INIT_SUFFIXES:
        raise ValueError(
            f"init_from: {file_name!r} is not a weights file; allowed: {', '.join(INIT_SUFFIXES)}"
        )
    if not data:
        raise ValueError(f"init_from: {file_name!r} is empty")
    root = Path(root) if root is not None else jobs.runs_dir()
    folder = root / jobs.APP_DIR / UPLOAD_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{hashlib.sha256(data).hexdigest()}{suffix}"
    if not _kept_whole(path, len(data)):  # (one cut short since, by a full disk or by hand:
        _write(path, data)  # written again, not passed to a run as it is)
    _write(_name_file(path), Path(file_name).name.encode())  # (the last name it was given)
    return path


def _kept_whole(path: Path, size: int) -> bool:
    """Whether an upload kept under its content's name is there with all its bytes."""
    try:
        st = path.stat()
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == size


def _write(path: Path, data: bytes) -> None:
    """Each writer its own temporary file, renamed (sessions may upload one file at once:
    whole bytes whoever renames last); what a server killed while writing any upload left
    under a temporary name is removed first."""
    remove_dead_temps(path.parent)
    atomic_write_bytes(path, data, sync=False)


def _name_file(path: Path) -> Path:
    """Beside a kept upload: the name the user's file had (``<sha256>.pt.name``)."""
    return path.with_name(f"{path.name}.name")


def upload_name(path: str | Path) -> str:
    """The file name a run's ``init_from`` shows as: an upload's name as the user knows it
    (``mine.pt``, kept by :func:`save_upload`), else the file's own name."""
    path = Path(str(path).replace("\\", "/"))
    try:
        return _name_file(path).read_text(encoding="utf-8").strip() or path.name
    except (OSError, UnicodeDecodeError):
        return path.name


def forget_upload(path: str | Path | None, root: str | Path | None = None) -> None:
    """Remove an upload kept by :func:`save_upload` that no run starts from (its Start was
    refused): refused files do not pile up in the runs folder."""
    if not path:
        return
    root = Path(root) if root is not None else jobs.runs_dir()
    path = Path(path)
    if path.parent != root / jobs.APP_DIR / UPLOAD_DIR:
        return  # a finished run's checkpoint, or a file of the user's: not ours
    used = {str(run.config.get("init_from")) for run in jobs.store(root).list()}
    if str(path) not in used:
        path.unlink(missing_ok=True)
        _name_file(path).unlink(missing_ok=True)


#: a Start with the settings of one made this long ago is taken as that click run again
SAME_START_S = 20.0


def start_key(config: dict[str, Any], baseline: dict[str, Any] | None) -> str:
    """What identifies a Start's settings (the run's config and its baseline's)."""
    return json.dumps([config, baseline], sort_keys=True, default=str)


def start_record(key: str, name: str, baseline: str | None) -> dict[str, Any]:
    """What the page keeps of the Start it just made."""
    return {"key": key, "at": time.time(), "runs": (name, baseline)}


def same_start_ago(last: dict[str, Any] | None, key: str) -> float | None:
    """Seconds since ``last`` (a :func:`start_record`) when it had the settings ``key`` and is
    under :data:`SAME_START_S` old: Streamlit running the page again with Start still pressed
    (a rerun cut the run that made it), not a new press; None otherwise."""
    if not last or last.get("key") != key:
        return None
    ago = time.time() - float(last.get("at", 0.0))
    return ago if 0 <= ago < SAME_START_S else None


#: an N=1 run of a composed run's setup made within this many seconds of it was started with
#: it ("also train N=1"), for a run this server did not start (an app restarted since)
PAIRED_WITHIN_S = 120.0
#: (runs folder, run) -> whether this server started the run with its N=1 baseline
_STARTED_WITH_BASELINE: dict[tuple[str, str], bool] = {}


def remember_start(name: str, baseline: str | None, root: str | Path | None = None) -> None:
    """Keep whether run ``name`` was started with its N=1 baseline (:func:`ticks_baseline`)."""
    root = Path(root) if root is not None else jobs.runs_dir()
    _STARTED_WITH_BASELINE[(str(root), name)] = baseline is not None


def ticks_baseline(name: str | None, root: str | Path | None = None) -> bool:
    """Whether the form ticks "also train N=1" when it shows the settings of run ``name``: as
    that run was started (a refresh, a second tab or a return to the page shows the choice
    made, not the default); ticked for no run and for an N=1 run."""
    if not name:
        return True
    from lorita.checks import is_int

    n = (jobs.run_config(name, root) or {}).get("n_factors")
    if not is_int(n) or n == 1:
        return True
    root = Path(root) if root is not None else jobs.runs_dir()
    known = _STARTED_WITH_BASELINE.get((str(root), name))
    if known is not None:
        return known
    try:  # started by an app since restarted: from the folders (runs.RunStore.pair)
        return jobs.store(root).pair(name, window_s=PAIRED_WITHIN_S) is not None
    except ValueError:  # (no run folder yet)
        return True
