"""The run store: names, atomic files, tolerant readers, liveness and the concurrency slots."""

import json
import os
import subprocess
import sys
import time

import pytest

from lorita.runs import (
    Run,
    RunStore,
    acquire_slot,
    append_jsonl,
    read_jsonl,
    read_last_jsonl,
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
    assert st["state"] == "failed" and st["message"] == "process died"
    assert run.raw_status()["state"] == "running"  # readers never write
    run.update_status(state="running", pid=os.getpid())
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
    time.sleep(0.3)
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
