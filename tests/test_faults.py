"""Crash safety: kill -9 a real training process anywhere, resume, get the same run.

Each case starts ``python -m lorita train`` (digits, a tiny MLP, 3 epochs, one thread) and
kills it with SIGKILL, either at a named instant through the engine's fault hook
(``LORITA_FAULT=<point>:<n>``: between the files of a checkpoint, before and after its
rename, in the middle of a log line, after the final test pass, while queued, ...) or at a
random time. After every kill each file of the run folder must still be readable; then
``lorita train --resume`` must finish the run with results identical to the uninterrupted
run: the same metrics lines (all but wall time), spectra, result.json and the same bytes in
best.safetensors and last.safetensors.

The training processes are forked from a server process that has imported torch and the
command line once (``multiprocessing``'s forkserver): each is a real process running
``lorita train`` that the kill ends, without paying torch's import time (seconds) per case.
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.connection
import os
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import lorita as lt
from lorita.cli import main as cli_main
from lorita.engine import checkpoint
from lorita.runs import RunStore

ROOT = Path(__file__).resolve().parents[1]
FLAGS = [
    "--quiet", "--threads", "1", "--model-arg", "width=16", "--model-arg", "depth=2",
    "--epochs", "3", "--batch-size", "64", "--spectra-every", "0", "--log-every", "4",
]  # fmt: skip
# 20 steps an epoch, 60 in all; 20 metrics lines and 2 spectra lines (22 appends)
POINTS = [
    "created:1",  # killed while queued (right after the run folder was made)
    "open:1",  # killed after claiming the folder, before the first step
    "step:1", "step:20", "step:21", "step:60",  # first, an epoch's last and next, the last
    "append:1", "append:12", "append:22",  # mid-line
    "validate:1", "validate:3",  # after a validation line and the best model
    "ckpt_between_files:1", "ckpt_between_files:3",  # model written, state not yet
    "ckpt_before_rename:2",  # checkpoint complete under its temporary name
    "ckpt_after_rename:1", "ckpt_after_rename:3",  # renamed, last.safetensors not published
    "ckpt_before_prune:2",  # two checkpoints on disk
    "ckpt_prune_renamed:1",  # the older one renamed away, not yet deleted
    "test:1",  # after the final test pass, before its lines and result.json
    "result:1",  # result.json written, status not yet completed
]  # fmt: skip
N_RANDOM = 3
# the same run with its first epoch plain (composed into N=3 at step 20): kills around the switch
PLAIN = ["--plain-epochs", "1"]
PLAIN_POINTS = [
    "step:20",  # the last plain step
    "validate:1",  # the plain network's validation and best published, not yet composed
    "compose:1",  # composed, the plain best dropped, the switch's checkpoint not yet written
    "ckpt_between_files:1", "ckpt_before_rename:1", "ckpt_after_rename:1",  # that checkpoint
    "step:21",  # the first composed step
    "validate:2",  # the composed network's first best
]  # fmt: skip
N_RANDOM_PLAIN = 2
WORKERS = max(1, min(4, (os.cpu_count() or 2)))


def _env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("LORITA_FAULT", None)
    return env


def _argv(root: Path, extra: tuple[str, ...] = ()) -> list[str]:
    return ["train", "--runs-dir", str(root), "--name", "r", *FLAGS, *extra]


_FORK = multiprocessing.get_context("forkserver")  # its preload: tests/conftest.py


def _train_child(argv: list[str], fault: str | None) -> None:
    """``lorita train`` in a forked child, output discarded; exits with its status."""
    os.environ.pop("LORITA_FAULT", None)
    if fault:
        os.environ["LORITA_FAULT"] = fault
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    sys.exit(cli_main(argv))


def _train_process(
    root: Path, fault: str | None = None, *, resume: bool = False, extra: tuple[str, ...] = ()
):
    argv = (
        _argv(root, extra)
        if not resume
        else [*_argv(root)[:5], "--resume", "--quiet", "--threads", "1"]
    )
    return _Child(argv, fault)


class _Child:
    """A training process that worker threads may start, watch and kill side by side.

    multiprocessing's Process is not thread-safe: every ``start()`` polls all children of this
    process, and two threads polling one child race on reading its exit status from the fork
    server (the loser reads nothing and takes exit code 255). So every poll happens under one
    lock, and waiting is done on the process's sentinel, which reads nothing."""

    _lock = threading.Lock()

    def __init__(self, argv: list[str], fault: str | None) -> None:
        self._proc = _FORK.Process(target=_train_child, args=(argv, fault), daemon=True)
        with self._lock:
            self._proc.start()

    def wait(self, timeout: float) -> int | None:
        """The exit code once the process has ended (None if still running after ``timeout``)."""
        multiprocessing.connection.wait([self._proc.sentinel], timeout)
        with self._lock:
            return self._proc.exitcode

    def alive(self) -> bool:
        with self._lock:
            return self._proc.is_alive()

    def kill(self) -> None:
        with self._lock:
            if self._proc.is_alive():
                self._proc.kill()


def _resume(root: Path) -> int:
    return cli_main(
        ["train", "--runs-dir", str(root), "--name", "r", "--resume", "--quiet", "--threads", "1"]
    )


# --------------------------------------------------------------------------- checks


def _strict_json(path: Path) -> dict:
    obj = json.loads(path.read_text())
    assert isinstance(obj, dict), path
    return obj


def _assert_readable(folder: Path) -> None:
    """Every file the run folder holds reads cleanly (a torn last log line is allowed)."""
    _strict_json(folder / "config.json")
    _strict_json(folder / "status.json")
    if (folder / "result.json").exists():
        _strict_json(folder / "result.json")
    for name in ("metrics.jsonl", "spectra.jsonl"):
        p = folder / name
        if p.exists():
            lines = p.read_bytes().split(b"\n")
            for line in lines[:-1]:
                assert isinstance(json.loads(line), dict), (p, line)
    ckpts = folder / "checkpoints"
    for which in ("best", "last"):
        if (ckpts / f"{which}.safetensors").exists():
            lt.load(ckpts / f"{which}.safetensors")
    for p in ckpts.glob("ckpt-*"):
        assert checkpoint._complete(p) is not None, p
    run = RunStore(folder.parent).get("r")
    assert run.summary()["name"] == "r" and run.status()["state"] in ("failed", "completed")


def _no_temp_files(folder: Path) -> None:
    left = [p for p in folder.rglob(".*") if p.name != ".slots"]
    assert not left, left


def _fingerprint(folder: Path) -> dict:
    """What a resumed run must reproduce exactly (everything but wall-clock times)."""
    run = RunStore(folder.parent).get("r")
    result = _strict_json(folder / "result.json")
    for k in ("time", "timings"):
        result.pop(k)
    ck = folder / "checkpoints"
    return {
        "metrics": [{k: v for k, v in r.items() if k != "time"} for r in run.metrics()],
        "spectra": (folder / "spectra.jsonl").read_text(),
        "result": result,
        "best": (ck / "best.safetensors").read_bytes(),
        "last": (ck / "last.safetensors").read_bytes(),
        "state": _strict_json(folder / "status.json")["state"],
        "checkpoints": sorted(p.name for p in ck.iterdir() if p.name.startswith("ckpt-")),
    }


# --------------------------------------------------------------------------- the runs


def _killed_at(root: Path, point: str, extra: tuple[str, ...] = ()) -> int:
    proc = _train_process(root, point, extra=extra)
    return proc.wait(300)


def _killed_at_random(root: Path, delay: float, extra: tuple[str, ...] = ()) -> int:
    proc = _train_process(root, extra=extra)
    status = root / "r" / "status.json"
    deadline = time.time() + 120
    while proc.alive() and time.time() < deadline:
        if status.exists() and '"running"' in status.read_text(errors="replace"):
            break
        time.sleep(0.01)
    time.sleep(delay)
    proc.kill()
    return proc.wait(60)


def _reference(root: Path, extra: tuple[str, ...] = ()) -> dict:
    t0 = time.perf_counter()
    proc = _train_process(root, extra=extra)
    assert proc.wait(300) == 0, (root / "r" / "status.json").read_text()
    fp = _fingerprint(root / "r")
    assert fp["state"] == "completed" and fp["result"]["step"] == 60
    assert len(fp["metrics"]) == 15 + 3 + 2  # train, validation and test lines
    fp["wall"] = time.perf_counter() - t0
    fp["train_s"] = _strict_json(root / "r" / "result.json")["time"]
    return fp


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    return _reference(tmp_path_factory.mktemp("reference"))


@pytest.fixture(scope="module")
def reference_plain(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("reference_plain")
    fp = _reference(root, tuple(PLAIN))
    events = [r for r in RunStore(root).get("r").metrics() if r.get("split") == "val"]
    assert [r["epoch"] for r in events] == [0, 1, 2]
    return fp


def _kill_cases(tmp_path, points, n_random, seed, reference, extra=()) -> tuple[int, int, int]:
    """Kill a run at each named point and at ``n_random`` random times (in parallel), resume
    each; (kills, resumes identical to the reference, random kills after the end)."""
    rng = random.Random(seed)
    delays = [rng.uniform(0.0, 1.5 * reference["train_s"] + 0.2) for _ in range(n_random)]
    cases = [(p, None) for p in points] + [(f"random:{d:.2f}s", d) for d in delays]
    killed, identical, after_end = 0, 0, 0
    with ThreadPoolExecutor(WORKERS) as pool:
        jobs = []
        for i, (label, delay) in enumerate(cases):
            root = tmp_path / f"case{i}"
            root.mkdir()
            jobs.append(pool.submit(_kill_then_resume, root, label, delay, reference, extra))
        for job in jobs:
            outcome = job.result()
            if outcome == "after the end":
                after_end += 1
                continue
            killed += 1
            identical += outcome == "identical"
    return killed, identical, after_end


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_kill_at_any_instant_then_resume_gives_the_same_run(tmp_path, reference, capsys):
    t0 = time.perf_counter()
    killed, identical, after_end = _kill_cases(tmp_path, POINTS, N_RANDOM, 8, reference)
    wall = time.perf_counter() - t0
    with capsys.disabled():
        print(
            f"\nfault injection: {killed} kill points ({len(POINTS)} named instants, "
            f"{killed - len(POINTS)} random times), {identical}/{killed} resumes identical to "
            f"the uninterrupted run, {after_end} random kills after the end; {wall:.0f} s"
        )
    assert killed >= 20 and identical == killed


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_kill_around_the_plain_to_composed_switch_then_resume_gives_the_same_run(
    tmp_path, reference_plain
):
    """A run whose first epoch trains the plain network: killed as it composes (the plain
    best dropped, the switch's checkpoint half written) or just before or after, the resume
    rebuilds the network the checkpoint holds and ends as the uninterrupted run did."""
    killed, identical, _ = _kill_cases(
        tmp_path, PLAIN_POINTS, N_RANDOM_PLAIN, 9, reference_plain, tuple(PLAIN)
    )
    assert killed >= len(PLAIN_POINTS) and identical == killed
    best = lt.load(tmp_path / "case2" / "r" / "checkpoints" / "best.safetensors").state_dict()
    assert "fc1.factors.2" in best  # the published best is a composed model


def _kill_then_resume(
    root: Path, label: str, delay: float | None, reference: dict, extra: tuple[str, ...] = ()
) -> str:
    """One case, in a worker thread: kill, check the files, resume in another process, compare."""
    rc = _killed_at(root, label, extra) if delay is None else _killed_at_random(root, delay, extra)
    folder = root / "r"
    if delay is not None and _strict_json(folder / "status.json")["state"] == "completed":
        proc = _train_process(root, resume=True)  # the kill came after the run had ended
        rc = proc.wait(300)
        # refused (nothing to resume), or, killed while it kept the trade-off curves, those
        # kept now and nothing else changed
        assert rc in (0, 2), (label, rc)
        got = _fingerprint(folder)
        for key in ("metrics", "result", "best", "last", "state", "checkpoints"):
            assert got[key] == reference[key], (label, key)
        return "after the end"
    assert rc == -signal.SIGKILL, (label, rc)
    _check_resume(folder, label, reference)
    return "identical"


def _check_resume(folder: Path, label: str, reference: dict) -> None:
    _assert_readable(folder)
    proc = _train_process(folder.parent, resume=True)
    assert proc.wait(300) == 0, label
    _no_temp_files(folder)
    _assert_readable(folder)
    got = _fingerprint(folder)
    for key in ("metrics", "spectra", "result", "best", "last", "state", "checkpoints"):
        assert got[key] == reference[key], (label, key)


def test_resume_of_a_completed_run_is_refused_and_changes_nothing(tmp_path, capsys):
    assert cli_main(["train", "--runs-dir", str(tmp_path), "--name", "r", *FLAGS]) == 0
    folder = tmp_path / "r"
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert _resume(tmp_path) == 2
    err = capsys.readouterr().err.strip()
    assert "already completed" in err and len(err.splitlines()) == 1
    after = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert after == before


def test_resume_of_a_completed_run_whose_curves_were_cut_short_keeps_them(
    tmp_path, capsys, curves_on
):
    """A process ended while it kept the curves (after the run completed): --resume keeps
    them then, and changes nothing else; once they are all there it is refused as above."""
    assert cli_main(["train", "--runs-dir", str(tmp_path), "--name", "r", *FLAGS]) == 0
    folder = tmp_path / "r"
    kept = sorted(p.name for p in (folder / "extra").iterdir())
    assert kept
    for p in (folder / "extra").iterdir():
        p.unlink()
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert _resume(tmp_path) == 0  # (--quiet: nothing said)
    assert sorted(p.name for p in (folder / "extra").iterdir()) == kept
    after = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and "extra" not in p.parts}
    assert after == before
    assert _resume(tmp_path) == 2


def test_a_live_run_cannot_be_resumed_or_trained_by_a_second_process(tmp_path, capsys):
    assert _killed_at(tmp_path, "step:5") == -signal.SIGKILL
    run = RunStore(tmp_path).get("r")
    # another process holds the writer lock, as a live training process does
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)], env=_env(), stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "holding"
    capsys.readouterr()
    assert _resume(tmp_path) == 2
    assert "still running" in capsys.readouterr().err
    with pytest.raises(ValueError, match="in use by another process"):
        lt.train(run.config, run, resume=True)
    holder.send_signal(signal.SIGKILL)  # the OS releases the lock with the process
    holder.wait(timeout=30)
    assert _resume(tmp_path) == 0
    assert run.status()["state"] == "completed"


HOLD = """
import sys, time
from lorita.runs import RunStore
run = RunStore(sys.argv[1]).get("r")
run.hold()
run.update_status(state="running", message="", **__import__("lorita.runs").runs._me())
print("holding", flush=True)
time.sleep(120)
"""


def test_stop_asked_while_a_resume_starts_is_not_lost(tmp_path):
    store = RunStore(tmp_path)
    cfg = lt.TrainConfig(model_kwargs={"width": 16}, epochs=2, spectra_every=0)
    run = store.create(cfg.to_dict(), name="s")
    torch.set_num_threads(1)

    def stopper(ev):
        if ev["event"] == "step" and ev["step"] == 5:
            run.request_stop()

    assert lt.train(cfg, run, callback=stopper)["state"] == "stopped"
    assert not run.stop_requested()  # the request was acted on, and consumed
    run.request_stop()  # asked again while the resume is starting
    res = lt.train(cfg, run, resume=True)
    assert res["state"] == "stopped" and res["step"] == 7  # one step, then the stop holds
    assert not run.stop_requested()
    assert lt.train(cfg, run, resume=True)["state"] == "completed"


_RETRAIN = """
import sys, lorita as lt
run = lt.RunStore(sys.argv[1]).get("r")
cfg = lt.TrainConfig(**{**run.config, "seed": 7})
lt.train(cfg, run, threads=1)
"""


def test_a_run_trained_again_and_killed_as_it_starts_over_holds_one_attempt(tmp_path):
    """lt.train(config, run) on a finished run, by another process: its status names that
    process while it trains (not "process died"), and killed between forgetting the first
    attempt and writing the new config, the folder holds the first attempt's config and
    checkpoints, readable, and resumes to the end."""
    assert cli_main(["train", "--runs-dir", str(tmp_path), "--name", "r", *FLAGS]) == 0
    folder = tmp_path / "r"
    config = (folder / "config.json").read_bytes()
    env = {**_env(), "LORITA_FAULT": "start_over:1"}
    proc = subprocess.run(
        [sys.executable, "-c", _RETRAIN, str(tmp_path)], env=env, capture_output=True, timeout=300
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    run = RunStore(tmp_path).get("r")
    assert (folder / "config.json").read_bytes() == config
    assert run.status()["state"] == "failed" and "died" in run.status()["message"]
    assert checkpoint.latest(folder / "checkpoints") is not None
    assert _resume(tmp_path) == 0
    assert run.status()["state"] == "completed"

    seen: list[str] = []

    def watch(event: dict) -> None:
        if event.get("event") in ("start", "step") and len(seen) < 3:
            seen.append(RunStore(tmp_path).get("r").status()["state"])

    # made by another process (the CLI above), trained here: live while it trains
    lt.train(lt.TrainConfig(**{**run.config, "seed": 7}), run, callback=watch, threads=1)
    assert seen == ["running"] * 3
    assert json.loads((folder / "config.json").read_bytes())["seed"] == 7
