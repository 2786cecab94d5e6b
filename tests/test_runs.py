"""The run store: names, atomic files, tolerant readers, liveness and the concurrency slots."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from lorita.cli import main
from lorita.io import dead_writers_temp
from lorita.runs import (
    Run,
    RunStore,
    acquire_slot,
    append_jsonl,
    read_jsonl,
    read_last_jsonl,
    setup_of,
    validate_name,
    write_json,
)


@pytest.mark.parametrize(
    "bad", ["", "../x", "a/b", ".hidden", "a..b", "x" * 101, "a b", "/abs", None]
)
def test_bad_names_are_refused(bad):
    with pytest.raises(ValueError, match="run name"):
        validate_name(bad)


def test_good_names():
    for good in ["a", "digits-mlp-N3", "run_1.2", "A9"]:
        assert validate_name(good) == good


def test_write_json_is_atomic_and_leaves_no_temp_files(tmp_path):
    p = tmp_path / "s.json"
    write_json(p, {"a": 1, "nan": float("nan")})
    write_json(p, {"a": 2})
    assert json.loads(p.read_text()) == {"a": 2}
    assert [f.name for f in tmp_path.iterdir()] == ["s.json"]


def test_jsonl_readers_skip_a_half_written_last_line(tmp_path):
    p = tmp_path / "m.jsonl"
    for i in range(3):
        append_jsonl(p, {"step": i})
    with open(p, "a") as f:
        f.write('{"step": 3, "lo')  # a writer caught mid-line
    assert [r["step"] for r in read_jsonl(p)] == [0, 1, 2]
    assert read_last_jsonl(p) == {"step": 2}
    assert read_jsonl(tmp_path / "missing.jsonl") == []
    assert read_last_jsonl(tmp_path / "missing.jsonl") is None
    big = tmp_path / "big.jsonl"
    for i in range(2000):
        append_jsonl(big, {"step": i, "pad": "x" * 100})
    assert read_last_jsonl(big)["step"] == 1999


def test_create_list_get_delete(tmp_path):
    store = RunStore(tmp_path)
    a = store.create({"dataset": "digits", "model": "mlp", "n_factors": 3}, name="a")
    time.sleep(0.01)
    b = store.create({"dataset": "digits", "model": "mlp", "n_factors": 1})
    assert b.name.startswith("digits-mlp-N1-")
    assert [r.name for r in store.list()] == [b.name, a.name]  # newest first
    st = a.status()
    assert st["state"] == "queued" and st["pid"] == os.getpid() and st["created"] > 0
    assert a.config["n_factors"] == 3 and (a.path / "checkpoints").is_dir()
    with pytest.raises(ValueError, match="already exists"):
        store.create({}, name="a")
    with pytest.raises(ValueError, match="no run named"):
        store.get("nope")
    with pytest.raises(ValueError, match="still queued"):
        store.delete("a")  # this very process owns it
    a.update_status(state="completed")
    store.delete("a")
    assert [r.name for r in store.list()] == [b.name]
    (tmp_path / ".slots").mkdir()  # not a run
    assert len(store.list()) == 1


def test_env_var_root(monkeypatch, tmp_path):
    monkeypatch.setenv("LORITA_RUNS", str(tmp_path / "r"))
    assert RunStore().root == tmp_path / "r"


def test_a_dead_process_reads_as_failed(tmp_path):
    store = RunStore(tmp_path)
    run = store.create({"dataset": "digits"}, name="dead")
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    run.update_status(state="running", pid=proc.pid)
    assert not run.is_alive()
    st = run.status()
    assert st["state"] == "failed" and st["message"].startswith("process died")
    assert run.raw_status()["state"] == "running"  # readers never write
    run.update_status(state="running", pid=os.getpid())
    assert run.is_alive() and run.status()["state"] == "running"
    # a paused process (Ctrl-Z) on this machine: its heartbeat stops, it still holds the run
    run.update_status(heartbeat=time.time() - 3600)
    assert run.is_alive() and run.status()["state"] == "running"
    # another machine: only the heartbeat counts
    run.update_status(host="elsewhere", heartbeat=time.time())
    assert run.is_alive()
    st = run.raw_status()
    st["heartbeat"] = time.time() - 60
    write_json(run.path / "status.json", st)
    assert Run(run.path).status()["state"] == "failed"


def test_heartbeat_thread_refreshes_status(tmp_path):
    run = RunStore(tmp_path).create({}, name="hb")
    first = run.raw_status()["heartbeat"]
    run.start_heartbeat(interval=0.05)
    deadline = time.time() + 30  # a beat or more, however loaded the machine
    while run.raw_status()["heartbeat"] <= first and time.time() < deadline:
        time.sleep(0.05)
    run.stop_heartbeat()
    assert run.raw_status()["heartbeat"] > first
    assert run.raw_status()["state"] == "queued"


def test_summary_and_stop_request(tmp_path):
    run = RunStore(tmp_path).create({"dataset": "digits", "model": "mlp", "n_factors": 3}, name="s")
    append_jsonl(run.path / "metrics.jsonl", {"step": 10, "split": "val", "acc": 0.5})
    append_jsonl(run.path / "metrics.jsonl", {"step": 20, "split": "val", "acc": 0.9})
    append_jsonl(run.path / "spectra.jsonl", {"step": 20, "layers": {"fc1": [4.0, 2.0, 1e-4]}})
    s = run.summary()
    assert s["best_val_acc"] == 0.9 and s["best_step"] == 20 and s["effective_ranks"] == {"fc1": 2}
    assert not run.stop_requested()
    run.request_stop()
    assert run.stop_requested()


def test_slots_limit_concurrency(tmp_path):
    first = acquire_slot(tmp_path, 1)
    assert acquire_slot(tmp_path, 1, poll=0.01, should_stop=lambda: True) is None
    second = acquire_slot(tmp_path, 2)  # two slots: the second is free
    first.close()
    third = acquire_slot(tmp_path, 1, poll=0.01)
    assert third is not None
    second.close()
    third.close()
    with pytest.raises(ValueError, match="max_concurrent"):
        acquire_slot(tmp_path, 0)


def test_a_broken_folder_is_listed_as_broken_and_never_breaks_the_listing(tmp_path):
    store = RunStore(tmp_path)
    good = store.create({"dataset": "digits", "model": "mlp", "n_factors": 3}, name="good")
    good.update_status(state="completed")
    cases = {
        "cfg-list": ("config.json", "[1]"),
        "status-str": ("status.json", '"x"'),
        "status-bad": ("status.json", "{not json"),
        "cfg-empty": ("config.json", ""),
        "status-types": ("status.json", '{"state": "running", "heartbeat": "x", "pid": "y"}'),
    }
    for name, (fname, text) in cases.items():
        run = store.create({"dataset": "digits"}, name=name)
        run.update_status(state="completed")
        (run.path / fname).write_text(text)
    weird = store.create({"dataset": "digits"}, name="bad-lines")
    weird.update_status(state="completed")
    (weird.path / "metrics.jsonl").write_text('{"step": 1, "split": "val", "acc": "x"}\n[1]\n{\n')
    (weird.path / "spectra.jsonl").write_text('{"step": 1, "layers": {"fc": ["a", null]}}\n')
    (weird.path / "result.json").write_text("[]")
    rows = {r["name"]: r for r in store.summaries()}
    assert set(rows) == {"good", "bad-lines", *cases}
    assert rows["good"]["broken"] is None and rows["good"]["state"] == "completed"
    for name in ("cfg-list", "status-str", "status-bad", "cfg-empty"):
        assert rows[name]["broken"] and rows[name]["state"] == "failed", rows[name]
    assert rows["status-types"]["state"] == "failed"  # a running state with no live process
    assert rows["bad-lines"]["broken"] is None and rows["bad-lines"]["best_val_acc"] is None
    assert store.get("cfg-list").config == {} and store.get("status-str").raw_status() == {}
    store.delete("cfg-list")
    assert "cfg-list" not in {r.name for r in store.list()}


def test_every_name_to_path_function_checks_the_name(tmp_path):
    store = RunStore(tmp_path)
    run = store.create({"dataset": "digits"}, name="ok")
    for bad in ("../x", "a/b", "..", "/etc"):
        for call in (store.get, store.exists, store.delete, store.path, run.read_extra):
            with pytest.raises(ValueError, match="run name"):
                call(bad)
        with pytest.raises(ValueError, match="run name"):
            store.create({}, name=bad)
        with pytest.raises(ValueError, match="run name"):
            run.write_extra(bad, {})
    with pytest.raises(ValueError, match="run name"):
        validate_name("x" * 300)
    assert len(str(_error(validate_name, "y" * 300))) < 250  # one short line


def _error(fn, *args) -> Exception:
    try:
        fn(*args)
    except ValueError as e:
        return e
    raise AssertionError("no error")


def test_new_name_pair_and_extras(tmp_path):
    store = RunStore(tmp_path)
    setup = {"dataset": "digits", "model": "mlp", "lr": 0.01, "epochs": 2}
    n3 = store.create({**setup, "n_factors": 3})
    n1 = store.create({**setup, "n_factors": 1}, name=store.new_name(setup, suffix="-base"))
    assert n1.name.endswith("-base") and n3.name.startswith("digits-mlp-N3-")
    other = store.create({**setup, "n_factors": 1, "lr": 0.1}, name="other-setup")
    assert store.pair(n3).name == n1.name and store.pair(n1.name).name == n3.name
    assert store.pair(other) is None
    assert validate_name(store.new_name({"dataset": "../../x", "model": "a b"}))
    n3.write_extra("curve-energy", {"points": [1, 2]})
    assert n3.read_extra("curve-energy") == {"points": [1, 2]}
    assert n3.read_extra("missing", default=[]) == []


def test_a_baseline_pairs_by_setup_with_options_given_as_their_defaults_and_at_any_time(tmp_path):
    """An option given as its default is the same setup as one left out; an N=1 run trained
    long after its composed run (the README's two commands) is still its baseline; of two,
    the one created closest in time; other starting weights are another setup."""
    store = RunStore(tmp_path)
    setup = {"dataset": "digits", "model": "mlp", "lr": 0.01, "epochs": 2, "model_kwargs": {}}
    n3 = store.create({**setup, "n_factors": 3}, name="n3")
    same = {**setup, "dataset_kwargs": {}, "model_kwargs": {"depth": 3, "batchnorm": True}}
    store.create({**same, "n_factors": 1, "init_from": "/w.pt"}, name="other-start")
    late = store.create({**same, "n_factors": 1}, name="late")
    st = late.raw_status()
    write_json(late.path / "status.json", {**st, "created": st["created"] + 3600})
    assert store.pair(n3).name == "late" and store.pair(late).name == "n3"
    assert store.pair(n3, window_s=60) is None
    store.create({**same, "n_factors": 1}, name="closer")
    assert RunStore(tmp_path).pair(n3, window_s=None).name in ("closer", "late")
    folder = {"dataset": "folder:/x", "model": "mlp", "n_factors": 1}
    assert setup_of({**folder, "dataset_kwargs": {"size": 32}}) == setup_of(folder)
    assert setup_of({**folder, "dataset_kwargs": {"size": 64}}) != setup_of(folder)


def test_pairing_is_kept_but_follows_new_and_deleted_runs(tmp_path, monkeypatch):
    from lorita import runs as runs_mod

    store = RunStore(tmp_path)
    setup = {"dataset": "digits", "model": "mlp", "lr": 0.01, "epochs": 2}
    n3 = store.create({**setup, "n_factors": 3}, name="a-n3")
    monkeypatch.setattr(runs_mod, "PAIR_SETTLED_S", 0.0)  # every listing counts as settled
    assert store.pair(n3) is None  # kept as "no pair" for this listing
    reads = []
    real = runs_mod.RunStore._find_pair
    monkeypatch.setattr(runs_mod.RunStore, "_find_pair",
                        lambda self, *a: reads.append(1) or real(self, *a))  # fmt: skip
    assert store.pair(n3) is None and not reads  # the listing did not change: no scan
    n1 = store.create({**setup, "n_factors": 1}, name="a-n1")  # the listing changes
    assert store.pair(n3).name == n1.name and len(reads) == 1
    assert store.pair(n3).name == n1.name and len(reads) == 1  # kept
    shutil.rmtree(n1.path)  # (delete() refuses: its queued status names this live process)
    assert store.pair(n3) is None  # the kept partner is gone: scanned again


def test_writer_lock_is_held_for_the_life_of_the_process(tmp_path):
    run = RunStore(tmp_path).create({"dataset": "digits"}, name="w")
    code = (
        "import sys, time; from lorita.runs import Run; r = Run(sys.argv[1]); r.hold(); "
        "print('held', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(run.path)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"held"
        assert run.held_elsewhere()
        with pytest.raises(ValueError, match="in use by another process"):
            Run(run.path).hold(timeout=0.1)
    finally:
        proc.kill()  # SIGKILL: the OS drops the lock
        proc.wait()
    assert not run.held_elsewhere()
    run.hold(timeout=0.1)
    run.hold(timeout=0.1)  # re-entrant for the same Run object
    run.release()
    run.release()


def test_temp_files_of_dead_writers_are_cleaned(tmp_path):
    run = RunStore(tmp_path).create({"dataset": "digits"}, name="t")
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    dead = proc.pid
    stale = [
        run.path / f".status.json.{dead}.1.tmp",
        run.checkpoint_dir / f".last.safetensors.{dead}.7.tmp",
    ]
    for p in stale:
        p.write_bytes(b"")
    (run.checkpoint_dir / f".tmp-ckpt-000002-{dead}").mkdir()
    mine = run.path / f".result.json.{os.getpid()}.1.tmp"  # a live writer's: kept
    mine.write_bytes(b"")
    run.clean_temp()
    assert not any(p.exists() for p in stale) and mine.exists()
    assert not (run.checkpoint_dir / f".tmp-ckpt-000002-{dead}").exists()


def test_a_completed_run_whose_status_cannot_be_read_is_not_trained_again(tmp_path):
    run = RunStore(tmp_path).create({"dataset": "digits"}, name="c")
    run.write_result({"state": "completed", "test_acc": 0.9})
    (run.path / "status.json").write_text("garbage{")
    with pytest.raises(ValueError, match="already completed"):
        run.begin_resume()
    run.write_result({"state": "stopped"})  # a stopped one is resumed, as before
    run.begin_resume()


def test_resume_checks_refuse_a_completed_run_before_writing(tmp_path):
    run = RunStore(tmp_path).create({"dataset": "digits"}, name="c")
    run.update_status(state="completed", pid=12345678)
    before = (run.path / "status.json").read_bytes()
    with pytest.raises(ValueError, match="already completed"):
        run.begin_resume()
    assert (run.path / "status.json").read_bytes() == before
    run.update_status(state="stopped")
    run.request_stop()  # asked of the attempt that ended: not of the resumed one
    run.begin_resume()
    assert not run.stop_requested()
    st = run.raw_status()
    assert st["state"] == "queued" and st["message"] == "resuming" and st["pid"] == os.getpid()
    run.release()


def test_import_lorita_needs_no_posix_only_module():
    code = (
        "import sys; sys.modules['fcntl'] = None; "
        "import lorita, lorita.runs, lorita.io; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_read_new_returns_only_complete_new_lines(tmp_path):
    run = RunStore(tmp_path).create({"dataset": "digits"}, name="live")
    rows, off = run.read_new("metrics", 0)
    assert rows == [] and off == 0
    run.log_metrics({"step": 1})
    run.log_metrics({"step": 2})
    with open(run.path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3')  # being written
    rows, off = run.read_new("metrics", 0)
    assert [r["step"] for r in rows] == [1, 2]
    with open(run.path / "metrics.jsonl", "a") as f:
        f.write("}\n")
    rows, off2 = run.read_new("metrics", off)
    assert [r["step"] for r in rows] == [3] and off2 > off
    run.truncate_logs(1)  # a resume rewrites the file shorter: read again from the start
    rows, off3 = run.read_new("metrics", off2)
    assert [r["step"] for r in rows] == [1] and off3 < off2
    with pytest.raises(ValueError, match="kind"):
        run.read_new("../x", 0)


def test_a_write_removes_the_temp_files_a_killed_writer_left_for_the_same_file(tmp_path):
    from lorita.io import atomic_write_bytes

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    dead, live = proc.pid, os.getpid()
    stale = [tmp_path / f".model.onnx.{dead}.140.onnx", tmp_path / f".model.onnx.{dead}.9.tmp"]
    kept = [
        tmp_path / f".model.onnx.{live}.3.tmp",  # a live writer's
        tmp_path / f".other.onnx.{dead}.1.tmp",  # another file's: its own write cleans it
    ]
    for p in stale + kept:
        p.write_bytes(b"half")
    atomic_write_bytes(tmp_path / "model.onnx", b"whole")
    assert (tmp_path / "model.onnx").read_bytes() == b"whole"
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)


def test_a_process_killed_while_making_a_run_folder_leaves_no_half_made_run(tmp_path):
    """A run folder appears whole (config.json and a queued status.json) or not at all: a
    process killed while making it leaves only a hidden draft, removed by the next create,
    and the name stays free; an empty folder of that name (made by hand) does not hold it."""
    code = (
        "import sys; from lorita.runs import RunStore; "
        "RunStore(sys.argv[1]).create({'dataset': 'digits'}, name='r')"
    )
    env = {**os.environ, "LORITA_FAULT": "draft:1"}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, timeout=120)
    assert proc.returncode != 0  # killed at the fault point
    assert not (tmp_path / "r").exists()
    assert [dead_writers_temp(p.name, "r") for p in tmp_path.iterdir()] == [True]  # its draft
    store = RunStore(tmp_path)
    assert store.list() == []
    run = store.create({"dataset": "digits"}, name="r")
    assert run.status()["state"] == "queued" and run.config == {"dataset": "digits"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]  # the dead draft is gone
    with pytest.raises(ValueError, match="already exists"):
        store.create({"dataset": "digits"}, name="r")
    (tmp_path / "by-hand").mkdir()
    assert store.create({"dataset": "digits"}, name="by-hand").status()["state"] == "queued"


def test_queued_runs_take_the_slot_in_the_order_they_came(tmp_path):
    """Waiters are served first come, first served; a ticket left by a dead process is
    passed over (and removed)."""
    import threading

    holder = acquire_slot(tmp_path, 1)
    dead = tmp_path / ".slots" / "queue" / f".{1:020d}.999999999.1.ticket"  # older than all
    dead.touch()
    order = []

    def wait(i):
        slot = acquire_slot(tmp_path, 1, poll=0.01)
        order.append(i)
        time.sleep(0.05)
        slot.close()

    queue = tmp_path / ".slots" / "queue"
    threads = []
    for i in range(4):
        t = threading.Thread(target=wait, args=(i,))
        t.start()
        threads.append(t)
        deadline = time.time() + 60  # each waiter queued (its ticket left) before the next comes
        while len([p for p in queue.iterdir() if p.name != dead.name]) < i + 1:
            assert time.time() < deadline, f"waiter {i} left no ticket"
            time.sleep(0.01)
    holder.close()
    for t in threads:
        t.join(30)
    assert order == [0, 1, 2, 3]
    assert not dead.exists() and not list((tmp_path / ".slots" / "queue").iterdir())


def _dead_run(store, name):
    """A run folder whose writer has gone (made by another process)."""
    import subprocess
    import sys

    code = (
        "import lorita as lt; from lorita.runs import RunStore; "
        f"RunStore({str(store.root)!r}).create(lt.TrainConfig().to_dict(), name={name!r})"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    return store.get(name)


def test_a_run_folder_without_config_is_listed_broken_and_can_be_deleted(tmp_path):
    store = RunStore(tmp_path)
    run = _dead_run(store, "half")
    (run.path / "config.json").unlink()
    (row,) = store.summaries()
    assert row["name"] == "half" and row["broken"] == "config.json missing"
    store.delete("half")
    assert not (tmp_path / "half").exists() and store.list() == []


def test_a_delete_that_cannot_remove_every_file_leaves_no_half_run(tmp_path, monkeypatch):
    """The folder is renamed aside before its files go: a file that cannot be removed leaves
    hidden leftovers (said in a warning), never a listed run missing half its files; a folder
    that cannot be renamed is left whole, the error naming it."""
    import shutil

    import lorita.runs as runs_mod

    store = RunStore(tmp_path)
    _dead_run(store, "a")
    real = os.rename
    monkeypatch.setattr(runs_mod.os, "rename", lambda *a: (_ for _ in ()).throw(
        PermissionError(1, "Operation not permitted")))  # fmt: skip
    with pytest.raises(OSError, match=r"cannot delete '.*a': Operation not permitted"):
        store.delete("a")
    assert [r.name for r in store.list()] == ["a"] and (tmp_path / "a" / "config.json").exists()
    monkeypatch.setattr(runs_mod.os, "rename", real)

    def stubborn(path, onexc=None, onerror=None):  # one file refuses to go
        err = PermissionError(1, "Operation not permitted")
        if onexc is not None:
            onexc(os.unlink, f"{path}/checkpoints/x", err)
        else:
            onerror(os.unlink, f"{path}/checkpoints/x", (PermissionError, err, None))

    monkeypatch.setattr(runs_mod.shutil, "rmtree", stubborn)
    with pytest.warns(UserWarning, match="run 'a' is deleted, but 1 of its files"):
        store.delete("a")
    assert store.list() == [] and not (tmp_path / "a").exists()
    monkeypatch.setattr(runs_mod.shutil, "rmtree", shutil.rmtree)


def test_a_runs_folder_whose_path_is_not_utf8_is_refused_up_front(tmp_path, capsys):
    bad = os.fsdecode(bytes(tmp_path) + b"/bad\xff\xfename")
    with pytest.raises(ValueError, match="^runs folder: .* not UTF-8 text"):
        RunStore(bad)
    assert main(["train", "--runs-dir", bad, "--epochs", "1"]) == 2
    assert "runs folder:" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_a_run_whose_folder_cannot_be_written_says_so_when_held(tmp_path, monkeypatch):
    """Resuming a run on a read-only mount: a ValueError naming the run and its folder, not
    a bare '[Errno 30] ...: writer.lock'."""
    import errno

    import filelock

    run = RunStore(tmp_path).create({"dataset": "digits", "model": "mlp"}, name="ro")

    def read_only(self, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(run.path / "writer.lock"))

    monkeypatch.setattr(filelock.FileLock, "acquire", read_only)
    with pytest.raises(ValueError, match=r"run 'ro': cannot write in its folder .*Read-only"):
        run.hold()


def test_a_fresh_name_is_never_one_a_launcher_has_claimed(tmp_path, monkeypatch):
    """The app claims a name in .app/ at Start and its child makes the folder seconds later:
    a run started from the command line in that second takes the next name, not that one."""
    from lorita import runs as runs_mod

    monkeypatch.setattr(runs_mod.time, "strftime", lambda fmt: "20261207-000000")
    store = RunStore(tmp_path)
    config = {"dataset": "digits", "model": "mlp", "n_factors": 3}
    (tmp_path / runs_mod.LAUNCH_DIR).mkdir()
    (tmp_path / runs_mod.LAUNCH_DIR / "digits-mlp-N3-20261207-000000.json").write_text("{}")
    run = store.create(config)
    assert run.name == "digits-mlp-N3-20261207-000000-2"
    claimed = store.create(config, name="digits-mlp-N3-20261207-000000")  # the app's child
    assert claimed.name == "digits-mlp-N3-20261207-000000"


def test_effective_ranks_read_plain_and_damaged_singular_values_alike():
    """The fast path (plain numbers) and the careful one (a damaged row's null, text, bool,
    an int past float's range, inf) give the same ranks, damaged values read as nothing."""
    from lorita.runs import effective_ranks

    plain = [10.0, 5, 1.0, 0.001]
    damaged = [10.0, 5, 1.0, 0.001, None, "x", True, 10**400, float("inf"), -3.0]
    ranks = effective_ranks({"a": plain, "b": damaged, "c": [], "d": "no"})
    assert ranks == {"a": 3, "b": 3}


def test_a_status_time_past_floats_range_reads_as_none(tmp_path):
    """JSON holds ints of any length; a hand-edited status.json's 400-digit heartbeat is read
    as no time, not an OverflowError in every page that lists the run."""
    from lorita.checks import is_num

    assert not is_num(10**400) and is_num(10**300)
    store = RunStore(tmp_path)
    run = store.create({"dataset": "digits"}, name="big-time")
    status = json.loads((run.path / "status.json").read_text())
    (run.path / "status.json").write_text(
        json.dumps(status)[:-1] + ', "heartbeat": 1' + "0" * 400 + "}"
    )
    assert run.status()["heartbeat"] is None
    assert run.summary()["name"] == "big-time"


def test_a_live_run_stays_alive_when_the_clock_is_set(tmp_path):
    """A virtual machine's time sync steps the wall clock: the wall-clock start of a process
    moves with it, its start since boot does not. A live run must not read as "process died";
    a reused pid (another start) or another boot must."""
    from lorita.io import process_identity, recorded_alive

    me = {"pid": os.getpid(), **process_identity(os.getpid())}
    assert recorded_alive(me)
    if "pid_since_boot" not in me:
        pytest.skip("no start-since-boot on this system")
    stepped = {**me, "pid_started": me["pid_started"] + 5.0}  # the clock set 5 s on since
    assert recorded_alive(stepped)
    assert not recorded_alive({**me, "pid_since_boot": me["pid_since_boot"] - 30.0})
    assert not recorded_alive({**me, "boot_id": "another-boot"})
    store = RunStore(tmp_path)
    run = store.create({"dataset": "digits"}, name="r")
    run.update_status(state="running", **stepped)
    assert run.status()["state"] == "running" and run.is_alive()
