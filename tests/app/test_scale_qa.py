"""The app and the run store at scale: a class's 300 runs, a run with a very long log, a deep
model. Boundedness is checked by counting (rows parsed, ranks worked out, points drawn, notes
shown), never by wall time."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import psutil
import pytest
from app_seed import N1, N3, ROOT, TINY, shown_charts
from streamlit.testing.v1 import AppTest

import lorita.io
import lorita.runs
from app import jobs, live
from lorita.kinds import stages
from lorita.runs import Run, RunStore

APP = str(ROOT / "streamlit_app.py")
N_RUNS = 300
LINES = 3000  # metrics lines of each of the 300 runs (one file, hard-linked into each)


def open_page(page: str, **query) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=300)
    for k, v in query.items():
        at.query_params[k] = v
    at.run()
    at.switch_page(f"pages/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def me() -> dict:
    """status.json fields that make a queued or running run this (live) process's."""
    return {"pid": os.getpid(), "pid_started": psutil.Process().create_time(),
            "host": socket.gethostname(), "heartbeat": 4e9}  # fmt: skip


def set_status(run: Path, **fields) -> None:
    st = json.loads((run / "status.json").read_text())
    (run / "status.json").write_text(json.dumps({**st, **fields}))


@pytest.fixture
def parsed(monkeypatch) -> list[int]:
    """How many JSON lines the run store has parsed (one count per line)."""
    count = [0]
    real = lorita.io._loads_row

    def counting(line):
        count[0] += 1
        return real(line)

    monkeypatch.setattr(lorita.io, "_loads_row", counting)
    return count


def points(at: AppTest) -> int:
    """Values drawn on every chart of a page (each y of a line, each cell of a heatmap)."""
    n = 0
    for chart in shown_charts(at):
        for trace in chart.figure.get("data", []):
            for key in ("y", "z"):
                v = trace.get(key)
                if isinstance(v, list):
                    n += sum(len(r) if isinstance(r, list) else 1 for r in v)
    return n


def long_metrics(path: Path, lines: int, start: int = 0) -> None:
    with open(path, "a") as f:
        for i in range(start, start + lines):
            split = "val" if i % 10 == 9 else "train"
            f.write(json.dumps({"step": i, "epoch": i // 100, "split": split, "loss": 1 / (1 + i),
                                "acc": (i % 997) / 1000, "lr": 1e-3, "time": i}) + "\n")  # fmt: skip


@pytest.fixture(scope="module")
def class_store(seeded_store, tmp_path_factory) -> Path:
    """300 runs as a class leaves them: finished, failed, queued (alive), some missing
    files, each with a metrics log of LINES lines."""
    root = tmp_path_factory.mktemp("runs-300")
    big = root.parent / "metrics-300.jsonl"
    long_metrics(big, LINES)
    for i in range(N_RUNS):
        d = root / f"run-{i:04d}"
        shutil.copytree(seeded_store / (N3 if i % 2 else N1), d,
                        ignore=shutil.ignore_patterns(".slots"))  # fmt: skip
        (d / "metrics.jsonl").unlink()
        os.link(big, d / "metrics.jsonl")
        set_status(d, created=1.7e9 + 10 * i)
        if i % 20 == 0:
            set_status(d, state="failed", message="boom")
        elif i % 20 == 1:  # queued behind a slot (newer finished runs are listed above it)
            set_status(d, state="queued", message=lorita.runs.WAITING_FOR_SLOT)
            (d / "result.json").unlink()
            (d / "metrics.jsonl").unlink()
        elif i % 20 == 2:
            (d / "spectra.jsonl").unlink()
        elif i % 20 == 3:
            (d / "result.json").unlink()
    return root


@pytest.fixture
def many_runs(class_store, monkeypatch) -> Path:
    for d in class_store.glob("run-*"):
        if json.loads((d / "status.json").read_text())["state"] == "queued":
            set_status(d, **me())
    monkeypatch.setenv("LORITA_RUNS", str(class_store))
    jobs._ROWS.clear()  # (as a server that starts: nothing listed yet)
    return class_store


# --- the run store's listing ------------------------------------------------------------------


def test_listing_300_runs_reads_the_end_of_each_log_not_all_of_it(many_runs, parsed):
    """A finished run's best is in its result.json: its row reads the last validation line
    from the end of metrics.jsonl, not 3000 lines (the listing parsed 900,000 before)."""
    rows = jobs.list_runs()
    assert len(rows) == N_RUNS
    with_result = sum((many_runs / r["name"] / "result.json").exists() for r in rows)
    assert parsed[0] < 200 * N_RUNS + (N_RUNS - with_result) * LINES  # (of 900,000)
    run = Run(many_runs / "run-0005")
    last_val = [r for r in run.metrics("val")][-1]
    row = run.summary()
    assert row["val_acc"] == last_val["acc"]
    assert row["best_val_acc"] == run.result()["best_val_acc"]
    # without a result.json the best is the log's own
    no_result = Run(many_runs / "run-0003").summary()
    assert no_result["best_val_acc"] == max(r["acc"] for r in run.metrics("val"))


def test_a_running_runs_row_reads_only_the_lines_added_since(tmp_path, parsed):
    run = RunStore(tmp_path).create(TINY, name="long")
    long_metrics(run.path / "metrics.jsonl", 20_000)
    run.update_status(state="running", **me())
    first = run.summary()
    assert parsed[0] >= 20_000
    parsed[0] = 0
    again = run.summary()
    assert parsed[0] < 10 and again["best_val_acc"] == first["best_val_acc"]
    long_metrics(run.path / "metrics.jsonl", 50, start=20_000)
    parsed[0] = 0
    later = run.summary()
    assert 50 <= parsed[0] < 60 and later["best_step"] >= first["best_step"]
    assert later["val_acc"] == run.metrics("val")[-1]["acc"]
    assert later["best_val_acc"] == max(r["acc"] for r in run.metrics("val"))


def test_tail_and_part_readers_give_every_whole_line(tmp_path):
    path = tmp_path / "m.jsonl"
    rows = [{"i": i, "pad": "x" * (i % 13)} for i in range(300)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"half')
    size = path.stat().st_size
    for window in (1, 5, 27, 500, size - 1, size, size + 10):
        got, whole = lorita.io.read_tail_jsonl(path, window)
        assert whole == (window >= size) and got == rows[len(rows) - len(got) :]
        offset, parts = 0, []
        while True:
            part, done = lorita.io.read_jsonl_from(path, offset, window)
            if done == offset:
                break
            parts += part
            offset = done
        assert parts == rows  # read in parts of about `window` bytes, at least one line each


# --- the Runs page --------------------------------------------------------------------------


def test_runs_page_with_300_runs_puts_the_live_ones_on_top_in_one_note(many_runs):
    queued = sorted((r for r in jobs.list_runs() if r["state"] == "queued"),
                    key=lambda r: -r["created"])  # fmt: skip
    assert len(queued) == N_RUNS // 20
    at = open_page("runs")
    table = at.dataframe[0].value
    assert len(table) == N_RUNS
    assert list(table["run"][: len(queued)]) == [r["name"] for r in queued]
    notes = [i.value for i in at.info if "Training now" in i.value]
    assert len(notes) == 1 and notes[0].count("Training now") == 5  # the others counted
    assert f"and {len(queued) - 5} more" in notes[0]
    pick = at.multiselect(key="runs.pick")
    assert len(pick.value) == 2 and len(pick.options) == N_RUNS
    pick.set_value(["run-0299", "run-0298"]).run()
    assert not at.exception and len(shown_charts(at)) == 4


@pytest.fixture
def long_run(runs_dir) -> Path:
    """A running composed run with a very long log: 100,000 metrics lines and 1,500 spectra
    snapshots of 60 layers."""
    d = runs_dir / "long"
    shutil.copytree(runs_dir / N3, d)
    (d / "metrics.jsonl").unlink()
    long_metrics(d / "metrics.jsonl", 100_000)
    layers = [f"blocks.{i}.fc" for i in range(60)]
    with open(d / "spectra.jsonl", "w") as f:
        for k in range(1500):
            snap = {n: [round(1 / (1 + j * (1 + k / 100)), 4) for j in range(12)] for n in layers}
            f.write(json.dumps({"step": 10 * k, "epoch": k, "layers": snap}) + "\n")
    set_status(d, state="running", step=100_000, total_steps=200_000, **me())
    (d / "result.json").unlink()
    jobs._ROWS.clear()
    return d


def test_the_train_page_follows_a_long_run_in_bounded_points_and_new_lines_only(
    long_run, parsed, monkeypatch
):
    ranked = [0]
    real = lorita.runs.effective_ranks

    def counting(layers, tol=None):
        ranked[0] += 1
        return real(layers, tol)

    monkeypatch.setattr(lorita.runs, "effective_ranks", counting)
    at = open_page("train", run="long")
    assert at.selectbox(key="train.follow").value == "long"
    drawn = points(at)
    # the heatmap and spectra of at most MAX_SNAPSHOTS snapshots, at most 600 points a split
    assert 0 < drawn < 12 * live.MAX_SNAPSHOTS + 6 * live.MAX_METRIC_POINTS + 12 * 12 * 2
    assert ranked[0] < 3 * live.MAX_SNAPSHOTS  # the kept snapshots' ranks, not 1,500
    with open(long_run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 100_001, "split": "train", "loss": 0.1, "acc": 0.9}) + "\n")
    parsed[0] = 0
    at.run()  # the next second of the live panel
    assert not at.exception
    assert parsed[0] < 50  # the new line (and status, config), not 100,000 again
    assert points(at) <= drawn + 2  # the new line on the loss and accuracy charts


def test_the_runs_overlay_of_a_long_run_is_bounded_and_rereads_nothing(long_run, parsed):
    at = open_page("runs")
    at.multiselect(key="runs.pick").set_value(["long", N1]).run()
    assert not at.exception and len(shown_charts(at)) == 4
    assert points(at) < 2 * (2 * live.MAX_METRIC_POINTS + 12 + live.MAX_SNAPSHOTS)
    parsed[0] = 0
    at.selectbox(key="runs.layer").set_value("blocks.7.fc").run()
    assert not at.exception
    assert parsed[0] < 50  # neither log read again for another layer


def test_a_long_log_is_read_in_parts_and_only_kept_snapshots_are_ranked(long_run, monkeypatch):
    biggest, ranked = [0], [0]
    run = Run(long_run)
    real_read, real_ranks = run.read_new, lorita.runs.effective_ranks

    def read(kind, offset, max_bytes=None):
        rows, done = real_read(kind, offset, max_bytes)
        biggest[0] = max(biggest[0], done - offset)
        return rows, done

    def ranks(layers, tol=None):
        ranked[0] += 1
        return real_ranks(layers, tol)

    monkeypatch.setattr(run, "read_new", read)
    monkeypatch.setattr(lorita.runs, "effective_ranks", ranks)
    f = live.RunFollower(run)
    assert f.update()
    size = (long_run / "spectra.jsonl").stat().st_size
    assert biggest[0] <= live.READ_BYTES + 10_000 < size  # never the whole log at once
    assert len(f.snapshots) <= live.MAX_SNAPSHOTS and ranked[0] == len(f.snapshots)
    assert f.snapshots[-1]["step"] == 14_990 and f.snapshots[0]["step"] == 0
    assert all(len(rows) <= live.MAX_METRIC_POINTS for rows in f.metrics.values())
    assert f.metrics["val"][-1]["step"] == 99_999
    assert not f.update()


# --- a deep model -----------------------------------------------------------------------------


def test_stages_of_a_flatly_numbered_deep_model_are_a_readable_few():
    flat = stages([*(f"fc{i}" for i in range(1, 61)), "head"], 12)
    groups = list(dict.fromkeys(flat.values()))
    assert len(groups) <= 12 and groups[0] == "fc1–fc11" and groups[-1].endswith("head")
    assert all(list(flat.values()).count(g) <= 12 for g in groups)
    vgg = [f"features.{i}" for i in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)]
    grouped = stages([*vgg, "classifier.0", "classifier.3", "classifier.6"], 12)
    assert list(dict.fromkeys(grouped.values())) == [
        "features.0–features.14", "features.17–features.28", "classifier"]  # fmt: skip
    # a ResNet-50's names are stages already: unchanged
    blocks = [f"layer2.{b}.conv{c}" for b in range(4) for c in (1, 2, 3)]
    resnet = ["conv1", *blocks[:3], "layer2.0.downsample.0", *blocks[3:], "fc"]
    grouped = stages(resnet, 12)
    assert (
        grouped["layer2.3.conv2"] == "layer2.3" and grouped["layer2.0.downsample.0"] == "layer2.0"
    )


def test_compress_page_of_a_61_layer_model_groups_its_rank_table(runs_dir):
    from lorita.engine import train

    cfg = {**TINY, "model_kwargs": {"depth": 60, "width": 8, "batchnorm": False},
           "epochs": 1, "spectra_every": 0}  # fmt: skip
    assert train(cfg, RunStore(runs_dir).create(cfg, name="deep"))["state"] == "completed"
    at = open_page("compress", run="deep", policy="ranks")
    assert not at.error, [e.value for e in at.error]
    expanders = [e for e in at.expander if e.label.startswith("stage ")]
    assert 1 < len(expanders) <= 12  # (61 one-row tables before)
    assert len(at.multiselect(key="compress.layers.deep").value) <= 6


def test_a_follower_of_a_run_whose_logs_were_cut_back_on_resume_holds_no_line_twice(runs_dir):
    """A resumed run drops the log lines after its checkpoint (the files are rewritten,
    shorter): the live panel's follower starts over rather than adding the kept lines again."""
    run = Run(runs_dir / N3)
    f = live.RunFollower(run)
    f.update()
    before = {split: len(rows) for split, rows in f.metrics.items()}
    cut = run.metrics("val")[0]["step"]
    run.truncate_logs(cut)
    f.update()
    for split, rows in f.metrics.items():
        steps = [r["step"] for r in rows]
        assert steps == sorted(steps) and max(steps) <= cut and len(rows) <= before[split]
    assert [s["step"] for s in f.snapshots] == [r["step"] for r in run.spectra()]
    steps, ranks = f.rank_series()
    assert all(len(v) == len(steps) for v in ranks.values())
