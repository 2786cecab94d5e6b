"""Files: atomic writes, tolerant JSON / JSON-lines readers and the fault-injection hook.

Every file a run folder holds is written here: whole files through a temporary name and one
``os.replace`` (readers see the old file or the new one, never half of one), JSON lines by one
``write`` call per line. Readers never raise on a file being written or left broken by a
crash: a missing or unreadable file reads as the given default, a broken line is skipped.

``fault(point)`` is the hook of the crash tests: with ``LORITA_FAULT=<point>:<n>`` in the
environment the process kills itself (SIGKILL, or ``os._exit(137)`` where there is no
SIGKILL) the n-th time it reaches ``point``. Unset, it costs one dictionary lookup.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import psutil

from .checks import is_num

__all__ = [
    "append_jsonl",
    "atomic_write_bytes",
    "cannot_write",
    "fault",
    "fault_due",
    "kill_now",
    "process_alive",
    "process_identity",
    "fsync_dir",
    "read_json",
    "read_jsonl",
    "read_jsonl_from",
    "read_last_jsonl",
    "read_tail_jsonl",
    "recorded_alive",
    "remove_dead_temps",
    "rewrite_jsonl",
    "temp_beside",
    "write_json",
]

FAULT_ENV = "LORITA_FAULT"
MAX_JSON_BYTES = 64 * 1024 * 1024  # a JSON file larger than this is not read (refused)
#: A JSON line longer than this is skipped, as a broken one is, without being held whole: a
#: spectra snapshot of every layer of a large model takes a few MB; an edited or damaged log
#: may hold a line of gigabytes, which a run listing would otherwise read and parse.
MAX_LINE_BYTES = 16 * 1024 * 1024
_fault_hits: dict[str, int] = {}


# --------------------------------------------------------------------------- fault hook


def _parse_fault(spec: str) -> tuple[str, int] | None:
    point, _, count = spec.partition(":")
    try:
        return point, max(1, int(count or "1"))
    except ValueError:
        return None


def fault(point: str) -> None:
    """Kill this process the n-th time it reaches ``point`` when ``LORITA_FAULT=point:n``."""
    if fault_due(point):
        kill_now()


def fault_due(point: str) -> bool:
    """Count one arrival at ``point``; True when ``LORITA_FAULT`` says to die here now."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return False
    parsed = _parse_fault(spec)
    if parsed is None or parsed[0] != point:
        return False
    _fault_hits[point] = _fault_hits.get(point, 0) + 1
    return _fault_hits[point] == parsed[1]


def kill_now() -> None:
    """End this process at once, as ``kill -9`` would (no cleanup, no flushing)."""
    if hasattr(signal, "SIGKILL"):
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(137)


# --------------------------------------------------------------------------- whole files


def process_identity(pid: int) -> dict:
    """What tells process ``pid`` from a later one given the same number: its start as
    wall-clock seconds (``pid_started``) and, where the system says, as seconds since the
    machine booted with that boot's id (``pid_since_boot``, ``boot_id``). The wall-clock
    start moves when the clock is set (a virtual machine's clock stepped by its time sync);
    the time since boot does not, so a live process never reads as gone after a clock step."""
    try:
        out: dict = {"pid_started": psutil.Process(pid).create_time()}
    except psutil.Error:
        return {"pid_started": None}
    since, boot = _since_boot(pid), _boot_id()
    if since is not None and boot is not None:
        out.update(pid_since_boot=since, boot_id=boot)
    return out


def recorded_alive(record: dict) -> bool:
    """Whether the process a record names (``pid`` and the fields of :func:`process_identity`)
    is still that process, alive on this machine."""
    return process_alive(
        record.get("pid"),
        record.get("pid_started"),
        since_boot=record.get("pid_since_boot"),
        boot_id=record.get("boot_id"),
    )


def process_alive(
    pid: Any, started: Any = None, *, since_boot: Any = None, boot_id: Any = None
) -> bool:
    """Whether process ``pid`` exists here (and, given when it started, is the one started
    then: ``since_boot`` and ``boot_id`` where recorded, else the wall-clock ``started``)."""
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        if is_num(since_boot) and isinstance(boot_id, str) and _boot_id() is not None:
            if boot_id != _boot_id():
                return False  # recorded before the machine restarted: that process is gone
            now = _since_boot(pid)
            if now is not None:
                return abs(now - since_boot) <= 0.5  # the same process, or the pid reused
        if is_num(started) and abs(proc.create_time() - started) > 1.0:
            return False  # the pid was reused by another process
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True
    return True


def _since_boot(pid: int) -> float | None:
    """Seconds from the machine's boot to process ``pid``'s start (Linux's /proc), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_bytes()
        return int(text[text.rindex(b")") + 2 :].split()[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


@functools.cache
def _boot_id() -> str | None:
    """This boot's id (Linux), the same for every process until the machine restarts."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def temp_beside(path: Path, suffix: str = ".tmp") -> Path:
    """A temporary name in the same folder, unique per process and thread (a dot-file).

    Temporary files for the same ``path`` left by a process that died mid-write (killed
    before its rename) are removed first, so a killed export or save leaves nothing behind
    once the next one runs."""
    _remove_dead_temps(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}{suffix}")


#: The names :func:`temp_beside` gives: ``.<file>.<pid>.<thread><suffix>``.
_TEMP_NAME_RE = re.compile(r"^\.(.+)\.(\d+)\.\d+\.[a-z]+$")


def dead_writers_temp(name: str, target: str | None = None) -> bool:
    """Whether ``name`` is a :func:`temp_beside` file (for the file ``target`` when given)
    whose writing process is gone."""
    m = _TEMP_NAME_RE.match(name)
    if m is None or (target is not None and m.group(1) != target):
        return False
    return not process_alive(int(m.group(2)))


def _remove_dead_temps(path: Path) -> None:
    remove_dead_temps(path.parent, path.name)


def remove_dead_temps(folder: str | os.PathLike, target: str | None = None) -> None:
    """Remove the :func:`temp_beside` files (or folders: a run folder's draft) in ``folder``
    (for the file ``target`` when given) whose writing process is gone."""
    prefix = f".{target}." if target is not None else "."
    try:
        with os.scandir(folder) as entries:
            dead = [
                e.path
                for e in entries
                if e.name.startswith(prefix) and dead_writers_temp(e.name, target)
            ]
    except OSError:
        return
    for p in dead:
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
            continue
        try:
            os.unlink(p)
        except OSError:
            pass


def remove_folder(path: Path, aside: Path, *, killed_at: str | None = None) -> list[str]:
    """Delete the folder ``path`` so that no half-deleted copy is ever seen under its name:
    one rename to ``aside`` (a hidden name beside it, whatever is already there removed
    first), then the removal there, which a kill may cut short (the leftover is a hidden
    folder, removed by whoever sweeps those). Returns the files or folders that could not be
    removed (``path (error)``); an OSError of the rename itself is raised (FileNotFoundError
    when ``path`` is gone). ``killed_at``: the fault point between the rename and the
    removal."""
    if os.path.lexists(aside):  # what an earlier try under this name left
        shutil.rmtree(aside, ignore_errors=True)
    os.rename(path, aside)
    if killed_at is not None:
        fault(killed_at)
    failed: list[str] = []

    def note(fn, where, exc) -> None:
        failed.append(f"{where} ({exc})")

    if sys.version_info >= (3, 12):
        shutil.rmtree(aside, onexc=note)
    else:
        shutil.rmtree(aside, onerror=lambda fn, where, info: note(fn, where, info[1]))
    return failed


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename in folder ``path`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, sync: bool = True) -> None:
    """Write ``data`` to ``path`` via a temporary file and a rename (never half-written).

    The file gets the usual permissions (the umask applies); ``sync`` flushes it to disk
    before the rename, so a crash leaves the old file or the new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        fault("write")  # the crash tests: the new bytes whole under the temporary name
        os.replace(tmp, path)
    except OSError as e:
        _discard(tmp)
        raise cannot_write(path, e) from e
    except BaseException:
        _discard(tmp)
        raise


def _discard(tmp: Path) -> None:
    """Remove a temporary file after a failed write (a failure here must not hide that one)."""
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        pass


def cannot_write(path: str | os.PathLike, e: OSError) -> OSError:
    """``e`` (a failed write: disk full, read-only, permission) as an error of the same kind
    naming the file meant, not the temporary name the write went through."""
    if e.errno is None:
        return e
    return OSError(e.errno, f"cannot write {str(path)!r}: {e.strerror or e}")


def _json_default(o: Any):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, tuple | set):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def clean(o: Any) -> Any:
    """Replace non-finite floats (not valid JSON) by None, recursively."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: clean(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [clean(v) for v in o]
    return o


def dumps(obj: Any, *, compact: bool = False) -> str:
    """JSON text of ``obj`` (non-finite floats as null, tensors and numpy scalars as numbers)."""
    if compact:
        return json.dumps(clean(obj), separators=(",", ":"), default=_json_default)
    return json.dumps(clean(obj), indent=1, default=_json_default)


def write_json(path: str | os.PathLike, obj: Any, *, sync: bool = False) -> None:
    """Write JSON atomically: a temporary file in the same folder, then ``os.replace``."""
    atomic_write_bytes(path, (dumps(obj) + "\n").encode(), sync=sync)


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    """The JSON in ``path``, or ``default`` when it is missing, unreadable or not JSON."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
        if len(raw) > MAX_JSON_BYTES:
            return default
        return json.loads(raw)
    except (OSError, ValueError, RecursionError):
        return default


# --------------------------------------------------------------------------- JSON lines


def append_jsonl(path: str | os.PathLike, obj: Any) -> None:
    """Append one JSON line (one ``write`` call, so a reader sees it whole or not at all)."""
    line = (dumps(obj, compact=True) + "\n").encode()
    try:
        with open(path, "ab") as f:
            if fault_due("append"):  # the crash tests: die in the middle of a line
                f.write(line[: len(line) // 2])
                f.flush()
                kill_now()
            f.write(line)
    except OSError as e:
        raise cannot_write(path, e) from e


def _loads_row(line: bytes | str) -> dict | None:
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return row if isinstance(row, dict) else None


def _rows(f, size: int, max_bytes: int | None = None) -> tuple[list[dict], int]:
    """The JSON-object rows of the complete lines from ``f``'s position up to byte ``size``,
    and the offset after the last of them; with ``max_bytes``, only the lines that start in
    the first ``max_bytes`` bytes (at least one line). A line is read at most
    :data:`MAX_LINE_BYTES` at a time: a longer one is passed over (a broken line), never held
    whole."""
    rows: list[dict] = []
    pos = done = start = f.tell()
    too_long = False
    while pos < size and (max_bytes is None or done - start < max_bytes):
        part = f.readline(min(MAX_LINE_BYTES, size - pos))
        if not part:
            break
        pos += len(part)
        if not part.endswith(b"\n"):
            too_long = too_long or len(part) == MAX_LINE_BYTES
            continue  # a line over the limit (read on to its end), or the one being written
        if not too_long:
            row = _loads_row(part)
            if row is not None:
                rows.append(row)
        too_long, done = False, pos
    return rows, done


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """All complete JSON-object lines of a file; a half-written, broken or over-long line
    (:data:`MAX_LINE_BYTES`) is skipped."""
    return read_jsonl_from(path)[0]


def read_jsonl_from(
    path: str | os.PathLike, offset: int = 0, max_bytes: int | None = None
) -> tuple[list[dict], int]:
    """The complete JSON-object lines after byte ``offset``, and the offset to read from next.

    Cheap for a live view: only the new bytes are read, with ``max_bytes`` about that many at
    a time (the lines starting in them, at least one), so that a long log is read in parts.
    A file now shorter than ``offset`` (rewritten when a run resumed) is read again from the
    start: the returned offset is then smaller than the one given.
    """
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            start = offset if 0 <= offset <= size else 0
            f.seek(start)
            return _rows(f, size, max_bytes)  # only whole lines; a line being written waits
    except OSError:
        return [], offset


def read_tail_jsonl(path: str | os.PathLike, max_bytes: int) -> tuple[list[dict], bool]:
    """The complete JSON-object lines in the last ``max_bytes`` bytes of a file (the line the
    window starts inside is left out), and whether the window held the whole file: what a
    reader needs from the end of a long log without reading all of it."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            start = max(0, size - max_bytes)
            if start:  # to the end of the line the window starts inside (its byte start-1)
                f.seek(start - 1)
                cut = f.read(size - start + 1).find(b"\n")
                if cut < 0:
                    return [], False
            f.seek(start + cut if start else 0)
            return _rows(f, size)[0], start == 0
    except OSError:
        return [], True


def read_last_jsonl(path: str | os.PathLike) -> dict | None:
    """The last complete JSON-object line, read from the end (cheap for large files)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            chunk, pos = 65536, end
            while pos > 0:
                pos = max(0, pos - chunk)
                f.seek(pos)
                lines = f.read(end - pos).split(b"\n")
                # lines[-1] is the unterminated tail; lines[0] may be cut unless pos == 0
                complete = lines[:-1] if pos == 0 else lines[1:-1]
                for line in reversed(complete):
                    row = _loads_row(line) if len(line) < MAX_LINE_BYTES else None
                    if row is not None:
                        return row
                if end - pos > 2 * MAX_LINE_BYTES:  # held a whole line (and a part-written
                    break  # one after it) and found none: the lines in reach are broken
                chunk *= 4
    except OSError:
        pass
    return None


def rewrite_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    """Replace a ``.jsonl`` file atomically (used when a resumed run drops lost lines)."""
    text = "".join(dumps(r, compact=True) + "\n" for r in rows)
    atomic_write_bytes(path, text.encode(), sync=False)
