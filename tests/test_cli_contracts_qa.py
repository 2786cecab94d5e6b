"""The command line's contracts with scripts and shells: one strict JSON document on stdout
with ``--json``, the same exit code for the same failure in every command, a reader that goes
away (``| head``), warnings made errors, paths that are not UTF-8 or relative, Ctrl-C, and
``--out`` paths a file cannot or should not be written at."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

import lorita.compress
from lorita.cli import main
from lorita.runs import RunStore

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model-arg", "width=16", "--model-arg", "depth=2", "--threads", "1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A composed run and its N=1 baseline, one epoch each."""
    d = tmp_path_factory.mktemp("runs")
    old = torch.get_num_threads()
    for name, n in (("c3", "3"), ("c1", "1")):
        argv = ["train", "--runs-dir", str(d), "--name", name, "--factors", n, "--epochs", "1"]
        assert main([*argv, "--quiet", *TINY]) == 0
    torch.set_num_threads(old)
    return d


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


def _cpu_seconds(pid: int) -> float:
    """The CPU time process ``pid`` has used (all its threads): how far it has got, whatever
    the load of the machine (Linux's /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _strict(text: str):
    """JSON as a strict reader reads it: NaN and Infinity are refused."""

    def refuse(token):
        raise AssertionError(f"{token} is not JSON")

    return json.loads(text, parse_constant=refuse)


def _copy(runs: Path, name: str, to: Path) -> Path:
    shutil.copytree(runs / name, to / name)
    return to


# --------------------------------------------------------------------------- --json


def test_json_holds_no_nan_or_infinity_tokens(runs, tmp_path, capsys):
    """A checkpoint whose finite weights overflow in the forward pass gives a NaN loss:
    --json writes null there, not the NaN token most JSON readers refuse."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    root = _copy(runs, "c1", tmp_path)
    path = root / "c1" / "checkpoints" / "best.safetensors"
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors = {k: t * 1e25 if t.dim() == 2 else t for k, t in tensors.items()}
    save_file(tensors, str(path), metadata=meta)
    argv = ["compress", "c1", "--uniform", "0.5", "--no-latency", "--json"]
    assert main([*argv, "--runs-dir", str(root)]) == 0
    out = _strict(capsys.readouterr().out)
    assert out["before"]["val_loss"] is None and out["after"]["test_loss"] is None
    assert 0 <= out["before"]["val_acc"] <= 1  # the numbers that are finite stay numbers


@pytest.mark.parametrize(
    "argv",
    [
        ["compress", "nope", "--uniform", "0.5", "--json"],
        ["compare", "nope", "--json"],
        ["compare", "c3", "--baseline", "nope", "--json"],
        ["runs", "--delete", "nope", "--json"],
        ["compress", "c3", "--uniform", "0.5", "--json", "--bogus"],
    ],
)
def test_json_on_failure_is_nothing_on_stdout_and_one_line_on_stderr(runs, capsys, argv):
    """What a script gets on failure: exit 2, an empty stdout (no half document to parse),
    one line on stderr."""
    assert main([*argv, "--runs-dir", str(runs)]) == 2
    cap = capsys.readouterr()
    assert cap.out == ""
    assert len(cap.err.splitlines()) == 1 and cap.err.startswith("lorita: error:")


def test_json_documents_of_every_command_that_has_one(runs, capsys):
    """runs, compress (a search, fine-tuned) and compare: stdout is one
    strict JSON document and nothing else (the notes go to stderr)."""
    r = ["--runs-dir", str(runs)]
    for argv in (
        ["runs", "--json"],
        ["compress", "c3", "--max-drop", "5", "--finetune-epochs", "1", "--no-latency"],
        ["compare", "c3", "--budgets", "30"],
    ):
        if argv[0] != "runs":
            argv = [*argv, "--json"]
        assert main([*argv, *r]) == 0, capsys.readouterr().err
        doc = _strict(capsys.readouterr().out)
        assert doc  # a list of rows or an object with content


# --------------------------------------------------------------------------- exit codes


@pytest.mark.parametrize(
    "argv",
    [
        ["compress", "nope", "--uniform", "0.5"],
        ["export", "nope", "--out", "{tmp}/x.safetensors"],
        ["compare", "nope"],
        ["stop", "nope"],
        ["runs", "--delete", "nope"],
        ["train", "--resume", "nope"],
    ],
)
def test_an_unknown_run_is_exit_2_in_every_command(runs, tmp_path, capsys, argv):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main([*argv, "--runs-dir", str(runs)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no run named 'nope'" in err


# --------------------------------------------------------------------------- warnings


def test_warnings_made_errors_do_not_end_a_command(runs, tmp_path, capsys):
    """Under PYTHONWARNINGS=error (or -W error) a command's note (a run cut before it
    completed) is shown as a warning line; the command does its work and exits 0."""
    root = _copy(runs, "c3", tmp_path)
    RunStore(root).get("c3").update_status(state="stopped", message="stopped on request")
    argv = ["compress", "c3", "--uniform", "0.5", "--no-latency", "--json", "--runs-dir", str(root)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(argv) == 0
        assert warnings.filters[0][0] == "error"  # the caller's filters are left as they were
    cap = capsys.readouterr()
    assert _strict(cap.out)["after"]["params"] > 0
    assert cap.err.startswith("lorita: warning: run 'c3' is stopped at step")
    with warnings.catch_warnings():  # an ignore stays an ignore
        warnings.simplefilter("ignore")
        assert main(argv) == 0
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------- pipes


class _ReaderGone:
    """A stream whose reader has left after ``keep`` lines: every later write is a
    BrokenPipeError, as a pipe's is once ``head -1`` exits."""

    def __init__(self, keep: int = 1) -> None:
        self.lines, self.keep = [], keep

    def write(self, text: str) -> int:
        if len(self.lines) >= self.keep:
            raise BrokenPipeError(32, "Broken pipe")
        self.lines.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def test_training_goes_on_when_the_reader_of_its_lines_goes_away(tmp_path, monkeypatch):
    """``lorita train ... 2>&1 | head -1``: head leaving ends neither the run nor its exit
    code (it used to end the command at its next line, leaving the run failed, with exit 0);
    an error keeps its code 2 when stderr's reader is gone."""
    gone = _ReaderGone()
    monkeypatch.setattr(sys, "stderr", gone)
    monkeypatch.setattr(sys, "stdout", gone)
    runs = tmp_path / "runs"
    argv = ["train", "--runs-dir", str(runs), "--name", "p", "--epochs", "2", *TINY]
    assert main(argv) == 0
    assert gone.lines[0].startswith("run folder:")
    assert RunStore(runs).get("p").status()["state"] == "completed"
    assert main(["compress", "nope", "--uniform", "0.5", "--runs-dir", str(runs)]) == 2


def test_runs_into_a_closed_pipe(runs):
    """``lorita runs | head -1`` with the reader gone before the first line: exit 0, no
    traceback."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "lorita", "runs", "--runs-dir", str(runs)],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0 and err == "", err


# --------------------------------------------------------------------------- paths


def test_train_prints_a_run_path_that_works_from_another_folder(
    runs, tmp_path, capsys, monkeypatch
):
    """With a relative --runs-dir (spaces in it) the path train prints last is absolute:
    a script that keeps it and goes elsewhere still finds the run. Its lines to a file carry
    no carriage returns (no progress bar off a terminal)."""
    here, there = tmp_path / "a dir", tmp_path / "elsewhere"
    here.mkdir(), there.mkdir()
    monkeypatch.chdir(here)
    argv = ["train", "--runs-dir", "my runs", "--name", "rel", "--epochs", "1", *TINY]
    assert main(argv) == 0
    cap = capsys.readouterr()
    printed = cap.out.strip().splitlines()[-1]
    assert Path(printed).is_absolute() and Path(printed) == here / "my runs" / "rel"
    assert "\r" not in cap.err and f"run folder: {printed}" in cap.err
    monkeypatch.chdir(there)
    out = there / "m.safetensors"
    assert main(["export", printed, "--out", str(out)]) == 0
    assert out.is_file()


def test_a_path_that_is_not_utf8_is_printed_as_its_bytes(runs, tmp_path):
    """A folder named in Latin-1 under a strict UTF-8 stdout: the export is written and its
    path printed as the bytes it is (it used to write the file, then fail printing it)."""
    folder = os.fsencode(tmp_path) + b"/caf\xe9"
    os.mkdir(folder)
    out = folder + b"/m.onnx"
    proc = subprocess.run(
        [sys.executable, "-m", "lorita", "export", "c3", "--out", os.fsdecode(out)],
        env=_env(LORITA_RUNS=str(runs), PYTHONIOENCODING="utf-8", LC_ALL="C.UTF-8"),
        capture_output=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == out + b"\n" and os.path.isfile(out)


# --------------------------------------------------------------------------- --out


@pytest.mark.parametrize(
    "argv, name",
    [
        (["export", "c3"], "m.pt"),
        (["export", "c3", "--budget", "50"], "m.PTH"),
        (["export", "c3", "--format", "onnx"], "m.bin"),
        (["compress", "c3", "--uniform", "0.5", "--no-latency"], "m.pt"),
        (["compress", "c3", "--uniform", "0.5", "--no-latency"], "m.ckpt"),
    ],
)
def test_out_named_as_another_format_is_refused(runs, tmp_path, capsys, argv, name):
    """A safetensors (or ONNX) file written as ``model.pt`` would be opened with torch.load
    and fail: refused, naming the suffix to use, and nothing is written."""
    code = main([*argv, "--out", str(tmp_path / name), "--runs-dir", str(runs)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert Path(name).suffix.lower() in err and "name it ." in err
    assert not any(tmp_path.iterdir())


def test_out_that_exists_is_replaced_whole(runs, tmp_path, capsys):
    """An existing --out is replaced by the new file (no temporary file left beside it)."""
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"old")
    assert main(["export", "c3", "--out", str(out), "--runs-dir", str(runs)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert out.read_bytes() != b"old" and [p.name for p in tmp_path.iterdir()] == [out.name]


def test_out_in_a_folder_that_cannot_be_written_is_refused_before_the_work(
    runs, tmp_path, capsys, monkeypatch
):
    """A read-only folder is said at once, not after the cut, search and fine-tuning
    (``os.access``: a user without write permission there)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, m, **kw: Path(p) != locked and real(p, m, **kw))

    def never(*a, **kw):
        raise AssertionError("the session was loaded")

    monkeypatch.setattr(lorita.compress, "Compressor", never)
    for argv in (
        ["compress", "c3", "--uniform", "0.5", "--out", str(locked / "m.safetensors")],
        ["export", "c3", "--budget", "50", "--out", str(locked / "m.onnx")],
    ):
        assert main([*argv, "--runs-dir", str(runs)]) == 2
        err = capsys.readouterr().err
        assert "--out" in err and "is not writable" in err and err.count("\n") == 1


def test_out_to_a_folder_or_a_missing_folder_is_refused(runs, tmp_path, capsys):
    for out, needle in ((tmp_path, "is a folder"), (tmp_path / "no" / "m.onnx", "not found")):
        assert main(["export", "c3", "--out", str(out), "--runs-dir", str(runs)]) == 2
        assert needle in capsys.readouterr().err
    assert not (tmp_path / "no").exists()


# --------------------------------------------------------------------------- Ctrl-C


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc/<pid>")
def test_ctrl_c_while_compress_works_leaves_no_file(runs, tmp_path):
    """Ctrl-C during a long compress --out: one line, exit 130, no file (not even a
    temporary one) in the folder it was to be written in."""
    out = tmp_path / "out"
    out.mkdir()
    argv = ["compress", "c3", "--budget", "50", "--finetune-epochs", "1000", "--no-latency"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "lorita", *argv, "--out", str(out / "m.safetensors")],
        env=_env(LORITA_RUNS=str(runs)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    # Into the work (the session, the cut, the fine-tuning: 1000 epochs, some 25 s of CPU
    # time), not its imports, however loaded the machine: the run's checkpoint read (mapped
    # while it is read) or as much CPU time as the imports take several times over, then a
    # second and a half more of the command's own CPU time. (Ctrl-C during the imports ends
    # it the same way: test_interrupts_qa.py.)
    checkpoints, deadline = str(runs / "c3" / "checkpoints"), time.time() + 300
    working = False
    while proc.poll() is None and not working and time.time() < deadline:
        with contextlib.suppress(OSError):
            maps = Path(f"/proc/{proc.pid}/maps").read_text()
            working = checkpoints in maps or _cpu_seconds(proc.pid) > 8
        time.sleep(0.01)
    assert working, "the command neither read the run nor worked for 8 s of CPU time"
    into = _cpu_seconds(proc.pid) + 1.5
    while proc.poll() is None and _cpu_seconds(proc.pid) < into and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, err = proc.communicate(timeout=120)
    # 130, or ended by the SIGINT itself once the line was said (a busy machine's timing): a
    # shell's $? is 130 either way
    assert proc.returncode in (130, -signal.SIGINT), err
    assert err.strip() == "lorita: interrupted" and stdout == ""
    assert list(out.iterdir()) == []
