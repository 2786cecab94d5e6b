"""Start, follow and stop training runs. A run is a child process plus a folder.

The app starts ``python -m lorita train --config ... --runs-dir RUNS --name NAME --quiet
--max-concurrent K`` as a child process in its own session and then only *reads* the run folder
through :class:`lorita.runs.RunStore`. A browser refresh, a second tab or an app restart
therefore loses nothing, and a crash in training cannot take the server down. The slots
behind ``--max-concurrent`` live in the runs folder, so the limit holds across app restarts:
extra runs wait as "queued".

This module supervises processes only: start a child, lower its priority (psutil), stop it,
tail its output. Everything about the run folder (names, summaries, liveness, pairing,
status) is asked of the run store, :class:`lorita.runs.RunStore`; every run name goes through
:func:`lorita.runs.validate_name` before it touches a path.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorita.checks import is_int
from lorita.io import write_json
from lorita.runs import (
    ACTIVE,
    LAUNCH_DIR,
    LAUNCH_OWNER,
    PROCESS_DIED,
    STATES,
    WAITING_FOR_SLOT,
    config_row,
    validate_name,
    write_launch_owner,
)
from lorita.scores import score_of, task_of_config

RUNS_ENV = "LORITA_RUNS"
MAX_CONCURRENT_ENV = "LORITA_MAX_CONCURRENT"  # training runs at once (default 1 per device)
NICE_ENV = "LORITA_TRAIN_NICE"  # scheduling niceness of training children
# The lowest priority: a training child takes every cycle the pages leave and none they want
# (bench/app_latency.py measures the pages beside a child at this priority).
DEFAULT_NICE = 19
DEFAULT_RUNS = "runs"
APP_DIR = LAUNCH_DIR  # <runs>/.app/<name>.json (the request) and <name>.log (the child's output)
#: a request's files in APP_DIR: the request, the child's output, and the process that will make
#: the run folder (``lorita train --name`` in a terminal leaves a name alone while it lives)
APP_SUFFIXES = (".json", ".log", LAUNCH_OWNER)
FINISHED = tuple(s for s in STATES if s not in ACTIVE)  # completed, failed, stopped
#: a child of this server that has not made its run folder yet (list_runs, JobView)
STARTING = "starting"
LIVE = (STARTING, *ACTIVE)  # starting, queued or training: not finished

# name -> Popen for the children this server started (lost on restart; the folder is the truth)
_PROCS: dict[tuple[str, str], subprocess.Popen] = {}
# (root, composed run) -> the N=1 baseline this server started beside it. The run store pairs
# runs by their folders, and a baseline's child creates its folder only once it has imported
# torch (seconds, at the lowest priority beside a training run): until then only this knows.
_STARTED_BASELINE: dict[tuple[str, str], str] = {}
# (root, name) -> {"stop": asked, "concurrent", "taken"} for a baseline claimed by start_pair whose child is not
# started yet (it starts once the composed run's child has made its folder)
_PENDING: dict[tuple[str, str], dict[str, Any]] = {}
_PENDING_LOCK = threading.Lock()
# (root, name) of the children this server started that ended before making their run folder
# (a dataset missing and no internet, say): listed as failed, with the message of their log,
# until the next Start in that runs folder or a dismissal (:func:`dismiss`)
_FAILED_STARTS: set[tuple[str, str]] = set()


def runs_dir() -> Path:
    """The runs folder: ``$LORITA_RUNS`` or ./runs (absolute path)."""
    return Path(os.environ.get(RUNS_ENV) or DEFAULT_RUNS).expanduser().resolve()


def runs_dir_problem(root: str | Path | None = None) -> str | None:
    """Why the runs folder cannot be used, in a sentence that says what to do (a file where
    the folder should be, a parent that cannot be written); None when it can be (it is made
    when missing)."""
    root = Path(root) if root is not None else runs_dir()
    where = f"The runs folder {root} (${RUNS_ENV}, default ./{DEFAULT_RUNS})"
    if root.exists() and not root.is_dir():
        return f"{where} is a file, not a folder: set {RUNS_ENV} to a folder (made if missing)"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        why = exc.strerror or str(exc)
        return f"{where} cannot be made ({why}): set {RUNS_ENV} to a folder you can write in"
    return None


def setting_problems() -> list[str]:
    """What is wrong with the app's environment settings (a value that is not a number, say),
    each naming the variable and what it uses instead: shown on every page."""
    from app.boot import DEFAULT_THREADS, THREADS_ENV, env_int

    checks = [
        (MAX_CONCURRENT_ENV, 1, 1, None), (NICE_ENV, DEFAULT_NICE, 0, 19),
        (THREADS_ENV, DEFAULT_THREADS, 1, None),
    ]  # fmt: skip
    return [p for var, d, lo, hi in checks if (p := env_int(var, d, lo, hi)[1])]


def max_concurrent() -> int:
    """How many runs may train at once (``$LORITA_MAX_CONCURRENT``, default 1)."""
    from app.boot import env_int

    return env_int(MAX_CONCURRENT_ENV, 1, 1)[0]


#: training children of this server that may be alive at once beyond the training slots
#: (each waiting child holds torch in memory, about 0.4 GB: Start presses must not add up)
MAX_WAITING = 8


def _check_room(wanted: int) -> None:
    """Refuse to start ``wanted`` more children when this server's live ones (starting,
    queued or training, and baselines about to start) would pass max_concurrent + MAX_WAITING."""
    live = sum(p.poll() is None for p in list(_PROCS.values())) + len(_PENDING)
    most = max_concurrent() + MAX_WAITING
    if live + wanted > most:
        raise ValueError(
            f"Start: {live} runs started here are still starting, waiting or training (at most "
            f"{most}); wait for one to end, or stop one on the Runs page"
        )


def store(root: str | Path | None = None):
    """A :class:`lorita.runs.RunStore` on ``root`` (default :func:`runs_dir`)."""
    from lorita.runs import RunStore

    root = Path(root) if root is not None else runs_dir()
    problem = runs_dir_problem(root)
    if problem:
        raise ValueError(problem)
    return RunStore(root)


def devices() -> list[str]:
    """Devices a run can use here, best first ("cuda" only where a GPU is visible)."""
    from app import options

    return options.devices()[1:]


def device_label() -> str:
    """A human description of the best device, e.g. 'NVIDIA H100 (cuda)' or 'CPU, 2 cores'
    (the cores this process may use: the server itself computes on one thread, and a training
    run picks its own number, one for a small model)."""
    import torch

    best = devices()[0]
    if best == "cuda":
        return f"{torch.cuda.get_device_name(0)} (cuda)"
    if best == "mps":
        return "Apple GPU (mps)"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"CPU, {cores} core{'' if cores == 1 else 's'}"


def machine_info(root: str | Path | None = None) -> dict[str, Any]:
    """What the Home page shows: device, runs folder, how many runs and how many active."""
    root = Path(root) if root is not None else runs_dir()
    runs = list_runs(root) if root.exists() else []
    return {
        "device": device_label(),
        "runs_dir": str(root),
        "n_runs": len(runs),
        "n_active": sum(1 for r in runs if r["state"] in LIVE),
        "max_concurrent": max_concurrent(),
    }


# --- starting -------------------------------------------------------------------------------


def validate(config: dict[str, Any]) -> dict[str, Any]:
    """Check ``config`` with the library's TrainConfig and that its device exists here.

    Raises ValueError naming the field (for example "device: 'cuda' asked for but CUDA is not
    available; use cpu or auto").
    """
    import lorita as lt
    from app import options

    config = lt.TrainConfig.from_dict(config).to_dict()
    options.engine().resolve_device(config.get("device", "auto"))
    return config


def command(config_path: Path, root: Path, name: str, k: int) -> list[str]:
    """The exact command line of a training child."""
    return [
        sys.executable, "-m", "lorita", "train",
        "--config", str(config_path),
        "--runs-dir", str(root),
        "--name", name,
        "--quiet",
        "--max-concurrent", str(k),
    ]  # fmt: skip


def start(
    config: dict[str, Any],
    *,
    name: str | None = None,
    root: str | Path | None = None,
    concurrent: int | None = None,
) -> str:
    """Validate ``config`` and start a training child; returns the run name at once.

    The child creates ``root/name`` itself (state "queued" until a slot is free); the request
    and the child's output are kept in ``root/.app/`` (the run store ignores dot-folders).
    """
    config = validate(config)
    root = Path(root) if root is not None else runs_dir()
    check_writable(root)
    _check_room(1)
    name = _request(root, config, name)
    _forget_failed_starts(root)  # another run started: the failures before it are not listed
    try:
        _spawn(name, root, concurrent)
    except OSError:
        for suffix in (".json", LAUNCH_OWNER):
            app_file(name, suffix, root).unlink(missing_ok=True)
        raise
    return name


def _request(root: Path, config: dict[str, Any], name: str | None) -> str:
    """Claim a name (:func:`_claim_name`) and write the request ``.app/<name>.json`` there;
    a request that cannot be written (a full disk) leaves no empty file holding the name."""
    name = _claim_name(root, config, name)
    try:
        write_json(app_file(name, ".json", root), config)
    except OSError:
        app_file(name, ".json", root).unlink(missing_ok=True)
        raise
    _own(root, name)  # this server, until its child starts
    return name


def _own(root: Path, name: str, pid: int | None = None) -> None:
    """Name the process that will make run ``name``'s folder (:func:`write_launch_owner`);
    unwritten (a full disk), the request holds the name for a few seconds only."""
    with contextlib.suppress(OSError):
        write_launch_owner(root, name, pid)


def check_writable(root: Path) -> None:
    """An OSError naming the runs folder when a file cannot be made in it (read-only, full):
    said on Start, before a child fails at it with no room left to say why."""
    import tempfile

    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as e:
        raise OSError(
            e.errno, f"runs folder {str(root)!r}: cannot write in it ({e.strerror})"
        ) from None


def _spawn(name: str, root: Path, concurrent: int | None) -> subprocess.Popen:
    """Start the child of the request ``name`` (:func:`_request`)."""
    config_path = app_file(name, ".json", root)
    env = dict(os.environ)
    # The child must import this checkout's `lorita` whatever the server's working directory.
    repo = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    with open(log_path(name, root), "ab") as log:
        proc = subprocess.Popen(
            command(config_path, root, name, concurrent or max_concurrent()),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=repo,
            env=env,
        )
    lower_priority(proc.pid)
    _PROCS[(str(root), name)] = proc
    _own(root, name, proc.pid)
    return proc


def _claim_name(root: Path, config: dict[str, Any], name: str | None) -> str:
    """Claim a name for a new child by creating its request file ``.app/<name>.json``
    exclusively: the child makes the run folder only seconds later, so two Starts in the same
    second (automatic names have one-second resolution) would otherwise both take one name.
    ``name`` given: ValueError if a run or another request already has it."""
    (root / APP_DIR).mkdir(parents=True, exist_ok=True)

    def claim(candidate: str) -> bool:
        if (root / candidate).exists():
            return False
        try:
            with open(app_file(candidate, ".json", root), "x"):
                return True
        except FileExistsError:
            return False

    if name is not None:
        if not claim(validate_name(name)):
            raise ValueError(f"run name: {name!r} already exists in {root}")
        return name
    claimed = store(root)  # (a fresh name is one no request in APP_DIR holds either)
    while not claim(name := claimed.new_name(config)):
        pass  # another Start claimed it between the look and the claim: the next one
    return name


def wait(name: str, root: str | Path | None = None, timeout: float | None = None) -> int | None:
    """Wait until the training child this process started for ``name`` has exited (after
    training it keeps the run's trade-off curves, :func:`lorita.curves.prepare`); its exit
    code, or None if this process did not start it. ``subprocess.TimeoutExpired`` past
    ``timeout`` seconds."""
    root_p = Path(root) if root is not None else runs_dir()
    deadline = None if timeout is None else time.time() + timeout
    while (str(root_p), name) in _PENDING:  # a baseline whose child is not started yet
        if deadline is not None and time.time() > deadline:
            raise subprocess.TimeoutExpired(name, timeout)
        time.sleep(0.05)
    proc = _PROCS.get((str(root_p), name))
    if proc is None:
        return None
    return proc.wait(None if deadline is None else max(0.0, deadline - time.time()))


def train_nice() -> int:
    """The niceness given to training children: ``$LORITA_TRAIN_NICE`` (0 leaves them at the
    server's priority), else :data:`DEFAULT_NICE`."""
    from app.boot import env_int

    return env_int(NICE_ENV, DEFAULT_NICE, 0, 19)[0]


def lower_priority(pid: int) -> None:
    """Give a training child a lower CPU priority than the server (:func:`train_nice`).

    Set right after the child starts, while it is still one thread (the threads torch starts
    later inherit it). The server's own work (pages, the Compress slider) then comes first,
    and training takes every cycle the server leaves. psutil maps the niceness to Windows'
    below-normal priority class.
    """
    import psutil

    nice = train_nice()
    if nice <= 0:
        return
    try:
        proc = psutil.Process(pid)
        if os.name == "nt":
            proc.nice(psutil.BELOW_NORMAL_PRIORITY_CLASS)
        else:
            proc.nice(nice)
    except psutil.Error:
        pass


def start_pair(
    config: dict[str, Any],
    baseline: dict[str, Any] | None,
    *,
    root: str | Path | None = None,
    concurrent: int | None = None,
    wait_s: float = 15.0,
) -> tuple[str, str | None]:
    """Start ``config`` and, if given, its N=1 ``baseline`` so that the first one trains first;
    returns both names at once.

    Both configs are validated and both names claimed before anything starts. The baseline's
    child is started by a thread once the first child has created its run folder (at most
    ``wait_s`` seconds: the first child imports torch, at the lowest priority beside a training
    run), so with one training slot the run the user asked for is the one that takes it, and
    the page that pressed Start does not wait for it. Until then the baseline is "starting".
    """
    config = validate(config)
    baseline = validate(baseline) if baseline is not None else None
    _check_room(2 if baseline is not None else 1)
    name = start(config, root=root, concurrent=concurrent)
    if baseline is None:
        return name, None
    root_p = Path(root) if root is not None else runs_dir()
    base_name = _request(root_p, baseline, None)
    with _PENDING_LOCK:
        _PENDING[(str(root_p), base_name)] = {"stop": False, "concurrent": concurrent}
    _STARTED_BASELINE[(str(root_p), name)] = base_name
    threading.Thread(
        target=_start_after,
        args=(name, base_name, root_p, concurrent, wait_s),
        daemon=True,
        name=f"start {base_name}",
    ).start()
    return name, base_name


def _start_after(first: str, name: str, root: Path, concurrent: int | None, wait_s: float) -> None:
    """Start the claimed run ``name`` once ``first`` has made its folder (or its child ended,
    or ``wait_s`` passed); a stop asked meanwhile is passed on to the new child."""
    key = (str(root), name)
    first_proc = _PROCS.get((str(root), first))
    deadline = time.time() + wait_s
    while time.time() < deadline and not (root / first / "status.json").exists():
        if first_proc is None or first_proc.poll() is not None:
            break
        time.sleep(0.1)
    with _PENDING_LOCK:  # taken by :func:`start_pending_now` when the server is exiting
        entry = _PENDING.get(key)
        if entry is None or entry.get("taken"):
            return
        entry["taken"] = True
    _spawn_pending(name, root, concurrent)


def _spawn_pending(name: str, root: Path, concurrent: int | None) -> None:
    """Start the child of the pending baseline ``name``; a stop asked meanwhile is passed on."""
    key = (str(root), name)
    try:
        proc = _spawn(name, root, concurrent)
    except (OSError, ValueError) as exc:  # no process: the page shows it failed, and why
        with contextlib.suppress(OSError), open(log_path(name, root), "a") as log:
            log.write(f"could not start the training process: {exc}\n")
        with _PENDING_LOCK:
            _PENDING.pop(key, None)
        return
    with _PENDING_LOCK:
        stop_asked = _PENDING.pop(key, {}).get("stop", False)
    if stop_asked:
        _stop_once_made(name, root, proc)


@atexit.register
def start_pending_now() -> None:
    """When the server exits (Ctrl-C): start the baselines still waiting for their run's folder
    at once, rather than lose them with the thread that waits (the children outlive the
    server). One stopped before it began is dropped with its request."""
    with _PENDING_LOCK:
        waiting = [(k, e) for k, e in _PENDING.items() if not e.get("taken")]
        for _, entry in waiting:
            entry["taken"] = True
    for (root, name), entry in waiting:
        if entry.get("stop"):
            with _PENDING_LOCK:
                _PENDING.pop((root, name), None)
            for suffix in APP_SUFFIXES:
                with contextlib.suppress(OSError):
                    app_file(name, suffix, Path(root)).unlink(missing_ok=True)
            continue
        _spawn_pending(name, Path(root), entry.get("concurrent"))


# --- following ------------------------------------------------------------------------------


@dataclass
class JobView:
    """What the Train page shows about one run, read from its folder (and our child)."""

    name: str
    state: str  # starting | queued | running | completed | stopped | failed | missing
    message: str = ""
    step: int = 0
    total_steps: int = 0
    epoch: int | None = None
    elapsed: float | None = None  # seconds since the run started training
    eta: float | None = None  # seconds left, from the pace so far
    device: str | None = None
    status: dict[str, Any] = field(default_factory=dict)
    made: bool = True  # whether the run folder exists (not for a child that failed before it)

    @property
    def fraction(self) -> float:
        if self.state == "completed":
            return 1.0
        if self.total_steps <= 0:
            return 0.0
        return min(1.0, max(0.0, self.step / self.total_steps))

    @property
    def waiting_for_slot(self) -> bool:
        """Queued behind other runs (every training slot taken), not preparing its own."""
        return self.state == "queued" and self.message == WAITING_FOR_SLOT

    @property
    def active(self) -> bool:
        return self.state in LIVE

    @property
    def finished(self) -> bool:
        return self.state in FINISHED


def app_file(name: str, suffix: str, root: str | Path | None = None) -> Path:
    """``<root>/.app/<name><suffix>``; ValueError for a name that is not a safe run name."""
    root = Path(root) if root is not None else runs_dir()
    return root / APP_DIR / f"{validate_name(name)}{suffix}"


def log_path(name: str, root: str | Path | None = None) -> Path:
    """Where the training child of run ``name`` writes its output."""
    return app_file(name, ".log", root)


def log_tail(name: str, root: str | Path | None = None, lines: int = 20) -> str:
    """The last ``lines`` lines of the child's output (empty if none)."""
    path = log_path(name, root)
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 16_384))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


CLI_ERROR = "lorita: error: "  # how `python -m lorita` begins the one line it exits 2 with
_WARNING = re.compile(r"^\S.*:\d+: \w*Warning: ")  # 'file.py:12: UserWarning: ...'


def _last_line(text: str) -> str:
    """The last meaningful line of a child's output: what it said when it failed (the command
    line's error, which says what to do, without its ``lorita: error:`` prefix, or a
    traceback's exception), past a warning, an indented line (a traceback's or a warning's
    source) and a download's progress; empty for none."""
    for line in reversed(text.splitlines()):
        shown = line.strip()
        if not shown or line[:1].isspace() or _WARNING.match(line) or "%|" in line:
            continue
        return shown.removeprefix(CLI_ERROR).strip() or shown
    return ""


def view(name: str, root: str | Path | None = None) -> JobView:
    """Everything the live page needs about run ``name``, from the run folder."""
    root = Path(root) if root is not None else runs_dir()
    validate_name(name)
    if (str(root), name) in _PENDING:
        return JobView(
            name, STARTING, "starting once the run started with it has begun…", made=False
        )
    proc = _PROCS.get((str(root), name))
    exit_code = proc.poll() if proc is not None else None
    if not (root / name / "status.json").exists():
        if proc is not None and exit_code is None:
            return JobView(name, STARTING, "starting the training process…", made=False)
        if proc is not None:  # ended before it made its run folder
            msg = _last_line(log_tail(name, root)) or _exited(root, exit_code)
            return JobView(name, "failed", msg, made=False)
        if log_path(name, root).exists():
            msg = _last_line(log_tail(name, root)) or "no status"
            return JobView(name, "failed", msg, made=False)
        return JobView(name, "missing", f"run {name!r} not found in {root}", made=False)
    run = store(root).get(name)
    st = run.status()
    state = str(st.get("state", "queued"))
    message = str(st.get("message") or "")
    now = time.time()
    ours = proc is not None and st.get("pid") in (None, proc.pid)  # not a later `lorita resume`
    if _lost_name(proc, st):
        said = _last_line(log_tail(name, root)) or f"run name: {name!r} already exists"
        return JobView(
            name, "failed", f"{said} (a run of that name was started elsewhere first; this "
            "Start did not run: start it again under another name)", status=dict(st),
        )  # fmt: skip
    if state in ACTIVE and ours and exit_code is not None:
        # our child ended without marking the run finished (killed, crashed)
        state = "failed"
        message = _last_line(log_tail(name, root)) or _exited(root, exit_code)
    elif state == "failed" and message.startswith(PROCESS_DIED):  # (what it last said, too)
        said = _last_line(log_tail(name, root))
        message = "the training " + message.replace(
            PROCESS_DIED, f"{PROCESS_DIED}{f' (its last output: {said})' if said else ''}", 1
        )
    step = int(st.get("step") or 0)
    total = int(st.get("total_steps") or 0)
    started = st.get("started")
    ended = st.get("ended")
    elapsed = None
    if started:
        elapsed = float(ended or now) - float(started)
    eta = None
    if state == "running" and elapsed and step > 0 and total > step:
        eta = elapsed * (total - step) / step
    return JobView(
        name=name,
        state=state,
        message=message,
        step=step,
        total_steps=total,
        epoch=st.get("epoch"),
        elapsed=elapsed,
        eta=eta,
        device=st.get("device"),
        status=dict(st),
    )


def _lost_name(proc: subprocess.Popen | None, st: dict[str, Any]) -> bool:
    """Whether this server's child ended refused (exit 2: a bad command line, nothing written)
    while a folder of its name belongs to another process: a run of that name started in a
    terminal in the seconds the child imported torch took the name first."""
    return proc is not None and proc.poll() == 2 and st.get("pid") not in (None, proc.pid)


def _exited(root: Path, code: int | None) -> str:
    """Why a child that said nothing ended: with its log empty, a full disk is the likely
    reason (it could not write even that)."""
    import shutil

    text = f"the training process exited ({code}) with no output"
    with contextlib.suppress(OSError):
        if shutil.disk_usage(root).free < 1 << 20:
            text += f"; the disk holding {root} is full"
    return text


def stop(name: str, root: str | Path | None = None) -> None:
    """Ask run ``name`` to stop; it finishes its current step, saves and marks itself stopped.

    A child of this server still starting (importing torch, its folder not made yet: a
    baseline just after Start) is asked once its folder appears, by a watcher thread, so it
    ends as a stopped run like any other. ValueError for a run that is nowhere.
    """
    root = Path(root) if root is not None else runs_dir()
    status = root / validate_name(name) / "status.json"
    with _PENDING_LOCK:
        if (str(root), name) in _PENDING:  # its child is not started yet: stopped once made
            _PENDING[(str(root), name)]["stop"] = True
            return
    proc = _PROCS.get((str(root), name))
    if not status.exists() and proc is not None and proc.poll() is None:
        threading.Thread(
            target=_stop_once_made, args=(name, root, proc), daemon=True, name=f"stop {name}"
        ).start()
        return
    store(root).get(name).request_stop()


def _stop_once_made(name: str, root: Path, proc: subprocess.Popen) -> None:
    """Wait for a starting child's run folder, then ask the run to stop (gives up when the
    child exits first: it never made a run)."""
    status = root / name / "status.json"
    while not status.exists():
        if proc.poll() is not None:
            return
        time.sleep(0.1)
    store(root).get(name).request_stop()


def reap() -> None:
    """Collect finished children so they do not linger as zombies; one that ended before it
    made its run folder stays listed as failed (:func:`list_runs`) until dismissed."""
    for key, proc in list(_PROCS.items()):
        if proc.poll() is not None:
            if not _made(*key):
                _FAILED_STARTS.add(key)
            elif _lost_name(proc, _raw_status(*key)):
                continue  # kept: the page says this Start did not run (until deleted)
            _PROCS.pop(key, None)


def dismiss(name: str, root: str | Path | None = None) -> None:
    """Forget a run whose training process ended before it made its run folder: it leaves the
    listings, and its request and output in ``.app/`` are removed. ValueError for a run that
    has a folder (delete it instead) or is still starting."""
    root = Path(root) if root is not None else runs_dir()
    v = view(name, root)
    if v.made or v.active:
        raise ValueError(f"run {name!r} is {v.state}; only a run that failed to start is dismissed")
    _FAILED_STARTS.discard((str(root), name))
    _PROCS.pop((str(root), name), None)
    for suffix in APP_SUFFIXES:
        app_file(name, suffix, root).unlink(missing_ok=True)


def _forget_failed_starts(root: Path) -> None:
    """Stop listing the failed starts of ``root`` (their files stay in ``.app/``)."""
    for key in [k for k in _FAILED_STARTS.copy() if k[0] == str(root)]:
        _FAILED_STARTS.discard(key)
    for key, proc in list(_PROCS.items()):  # ended before making their folder, not reaped yet
        if key[0] == str(root) and proc.poll() is not None and not _made(root, key[1]):
            _PROCS.pop(key, None)


def _raw_status(root: str | Path, name: str) -> dict[str, Any]:
    from lorita.runs import Run

    return Run(Path(root) / name).raw_status()


def _made(root: str | Path, name: str) -> bool:
    return (Path(root) / name / "status.json").exists()


def has_folder(row: dict[str, Any]) -> bool:
    """Whether a :func:`list_runs` row is of a run with a folder (not of a child still starting
    or one that failed before it made it): what the pickers offer."""
    return not row.get("no_folder")


_ROWS: dict[tuple[str, str], tuple[tuple, dict[str, Any]]] = {}


def list_runs(root: str | Path | None = None) -> list[dict[str, Any]]:
    """Every run's :meth:`lorita.runs.Run.summary`, newest first, for tables and pickers.

    A finished run's row never changes, so it is read once and kept (keyed by its state,
    last heartbeat and config.json); only active runs are read again.
    """
    root_p = Path(root) if root is not None else runs_dir()
    rows = []
    runs = store(root).list()
    for run in runs:
        st = run.raw_status()
        key = (str(run.path.parent), run.name)
        stamp = (
            st.get("state"),
            st.get("heartbeat"),
            st.get("ended"),
            _file_stamp(run, "config.json"),
        )
        hit = _ROWS.get(key)
        if hit is not None and hit[0] == stamp and stamp[0] in FINISHED:
            rows.append(hit[1])
            continue
        row = run.summary()
        _ROWS[key] = (stamp, row)
        rows.append(row)
    return _starting_rows(root_p, {run.name for run in runs}) + rows


def _file_stamp(run, fname: str) -> tuple[int, int] | None:
    """When a run's file last changed, and its size (None: not there): a finished run's kept
    row is read again once its config.json is edited or damaged (then it lists as broken)."""
    try:
        st = (run.path / fname).stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def _starting_rows(root: Path, made: set[str]) -> list[dict[str, Any]]:
    """Rows (newest first, ``no_folder`` set) for the children this server started that have
    no run folder: still starting (seconds of imports; a baseline waits for its run), so that
    a refresh or another tab sees them at once; or ended before making it (state "failed",
    the message of their output: what to do), until the next Start or a dismissal. Their
    settings come from the request."""
    keys = {k for k in [*_PROCS, *_PENDING, *_FAILED_STARTS.copy()] if k[0] == str(root)}
    rows = []
    for _, name in keys:
        if name in made:
            _FAILED_STARTS.discard((str(root), name))
            continue
        v = view(name, root)
        if v.state == "failed":
            _FAILED_STARTS.add((str(root), name))  # listed after its child is reaped too
        elif v.state != STARTING:  # its files removed meanwhile
            _FAILED_STARTS.discard((str(root), name))
            continue
        request = app_file(name, ".json", root)
        try:
            cfg = json.loads(request.read_text())
            created = request.stat().st_mtime
        except (OSError, ValueError):
            cfg, created = {}, None
        cfg = cfg if isinstance(cfg, dict) else {}
        rows.append({
            "name": name, "state": v.state, "message": v.message, **config_row(cfg),
            "task": task_of_config(cfg), "step": 0, "created": created, "no_folder": True,
        })  # fmt: skip
    return sorted(rows, key=lambda r: (r["created"] or 0, r["name"]), reverse=True)


def start_points(rows: list[dict[str, Any]], root: str | Path | None = None) -> list[str]:
    """The finished runs of ``rows`` (:func:`list_runs`) that a new run can start from: those
    with a best checkpoint, newest first."""
    runs = store(root)
    names = [r["name"] for r in rows
             if r.get("state") in FINISHED and not r.get("broken") and has_folder(r)]  # fmt: skip
    return [n for n in names if runs.get(n).checkpoint("best").is_file()]


def start_point(name: str, root: str | Path | None = None) -> str:
    """The best checkpoint of run ``name`` (what ``init_from`` names to start from it);
    ValueError naming init_from when the run is gone or has none."""
    try:
        run = store(root).get(name)
    except ValueError:
        raise ValueError(f"init_from: no run named {name!r} (deleted?)") from None
    return run.start_file()


def run_config(name: str | None, root: str | Path | None = None) -> dict[str, Any] | None:
    """The config of run ``name``; while its child has not made the run folder yet (seconds
    of imports after Start: a refresh then), the request it was started with; None if there
    is no such run."""
    if not name:
        return None
    try:
        return dict(store(root).get(name).config)
    except ValueError:
        pass
    try:
        cfg = json.loads(app_file(name, ".json", root).read_text())
    except (OSError, ValueError):  # (ValueError: not a run name, or not JSON)
        return None
    return cfg if isinstance(cfg, dict) and cfg else None


def partner(name: str, root: str | Path | None = None) -> str | None:
    """The run started together with ``name`` on the Train page (the run store's pairing)."""
    try:
        other = store(root).pair(name)
    except ValueError:
        return None
    return other.name if other is not None else None


def baseline_of(name: str, root: str | Path | None = None) -> str | None:
    """The N=1 run started beside the composed run ``name``, if any (also while its child is
    still starting and has no folder yet, when this server started it)."""
    root_p = Path(root) if root is not None else runs_dir()
    started = _STARTED_BASELINE.get((str(root_p), name))
    if started is not None and (
        (root_p / started).exists()
        or (str(root_p), started) in _PROCS
        or (str(root_p), started) in _PENDING
        or log_path(started, root_p).exists()
    ):
        return started
    n = (run_config(name, root) or {}).get("n_factors")
    if not is_int(n) or n == 1:  # an N=1 run (or an edited config.json's "x": not composed)
        return None
    return partner(name, root)


def pair_active(name: str, root: str | Path | None = None) -> bool:
    """Whether ``name`` or its N=1 baseline is starting, queued or training."""
    if view(name, root).active:
        return True
    baseline = baseline_of(name, root)
    return bool(baseline and view(baseline, root).active)


def default_follow(rows: list[dict[str, Any]]) -> str | None:
    """With nothing chosen yet (``rows`` newest first): the newest active composed (N>1) run,
    whose panel also shows its N=1 baseline (started after it, so newer, and queued behind
    it); else the newest active run; else the newest composed run."""
    active = [r for r in rows if r.get("state") in LIVE]
    composed = [r for r in rows if (r.get("n_factors") or 1) > 1]
    ordered = [r for r in active if r in composed] + active + composed
    return ordered[0]["name"] if ordered else None


def progress_text(v: JobView) -> str:
    """'running · step 50/200 · epoch 2 · 10 s elapsed · about 30 s left'."""
    from app.ui import fmt_duration

    total = f"/{v.total_steps}" if v.total_steps else ""
    said = {"queued": "waiting for a slot" if v.waiting_for_slot else "preparing"}
    parts = [said.get(v.state, v.state), f"step {v.step}{total}"]
    if v.epoch is not None:
        parts.append(f"epoch {v.epoch}")
    if v.elapsed is not None:
        parts.append(f"{fmt_duration(v.elapsed)} elapsed")
    if v.eta is not None:
        parts.append(f"about {fmt_duration(v.eta)} left")
    return " · ".join(parts)


def result_text(name: str, root: str | Path | None = None) -> str:
    """'Best validation accuracy 93.1 %, test accuracy of that checkpoint 92.8 %.' (a
    regression: 'Best validation R² 0.642, test R² of that checkpoint 0.617.')"""
    run = store(root).get(name)
    res, score = run.result(), score_of(run.task)
    parts = []
    if res.get("best_val_acc") is not None:
        parts.append(f"best validation {score.name} {score.text(res['best_val_acc'], 1)}")
    if res.get("test_acc") is not None:
        parts.append(f"test {score.name} of that checkpoint {score.text(res['test_acc'], 1)}")
    text = ", ".join(parts) + "."
    return text[:1].upper() + text[1:] if parts else ""


def delete(name: str, root: str | Path | None = None) -> None:
    """Delete a finished run's folder. ValueError if it is still queued or running."""
    root = Path(root) if root is not None else runs_dir()
    v = view(name, root)
    if v.active:
        raise ValueError(f"run {name!r} is {v.state}; stop it before deleting it")
    store(root).get(name)  # (ValueError for no such run, before anything is removed)
    # The request and log first: a server killed between the two steps then leaves the run
    # (deleted again with one more click), never a request that holds a name no run has.
    for suffix in APP_SUFFIXES:
        app_file(name, suffix, root).unlink(missing_ok=True)
    store(root).delete(name)
    _PROCS.pop((str(root), name), None)
    _ROWS.pop((str(root), name), None)
    _STARTED_BASELINE.pop((str(root), name), None)
