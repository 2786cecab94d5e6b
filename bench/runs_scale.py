"""The run store and the app's pages at a class's scale: 300 runs against 3, and one run
with a very long log.

    python bench/runs_scale.py               # prints the tables (about 2-4 minutes)
    python bench/runs_scale.py --runs 100    # a smaller class

One tiny digits run is trained (a few steps), then copied into two runs folders: 3 runs and
``--runs`` runs, each copy's metrics.jsonl ``--lines`` lines long (one file, hard-linked). In
one process, in turn: listing the runs (``app.jobs.list_runs``) cold (as a server that has
listed nothing yet) and warm (the next rerun), and rendering the Runs, Compress and Export
pages through Streamlit's AppTest, cold and warm. Then one run whose metrics.jsonl holds
``--long-lines`` lines and whose spectra.jsonl holds 300 snapshots of 54 layers: the live
panel's first read of it and a following read (``app.live.follower``). Ratios are against
the 3-run folder timed in the same process; the load average is printed with each table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def train_one(root: Path) -> Path:
    from lorita.engine import train
    from lorita.engine.config import TrainConfig
    from lorita.runs import RunStore

    config = TrainConfig(max_steps=20, epochs=1, spectra_every=5).to_dict()
    run = RunStore(root).create(config, name="seed")
    result = train(config, run)
    if result["state"] != "completed":
        raise SystemExit(f"training the seed run failed: {result['message']}")
    return run.path


def metrics_lines(path: Path, lines: int) -> None:
    with open(path, "w") as f:
        for i in range(lines):
            split = "val" if i % 10 == 9 else "train"
            row = {"step": i, "epoch": i // 100, "split": split, "loss": 1 / (1 + i),
                   "acc": (i % 997) / 1000, "lr": 1e-3, "time": i}  # fmt: skip
            f.write(json.dumps(row) + "\n")


def fill(folder: Path, seed: Path, count: int, metrics: Path) -> None:
    folder.mkdir()
    for i in range(count):
        d = folder / f"run-{i:04d}"
        shutil.copytree(seed, d, ignore=shutil.ignore_patterns(".slots", "*.lock"))
        (d / "metrics.jsonl").unlink()
        os.link(metrics, d / "metrics.jsonl")


def forget() -> None:
    """As a server that has listed nothing yet."""
    import lorita.runs
    from app import jobs

    jobs._ROWS.clear()
    lorita.runs._VAL_SCANS.clear()


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def page(name: str):
    from streamlit.testing.v1 import AppTest

    def render() -> None:
        at = AppTest.from_file(str(ROOT / "streamlit_app.py"), default_timeout=600)
        at.run()
        at.switch_page(f"pages/{name}.py").run()
        if at.exception:
            raise SystemExit(f"{name} page failed: {at.exception[0].value}")

    return render


def scale_table(small: Path, big: Path, count: int, repeats: int) -> list[str]:
    from app import jobs

    rows = []
    work = {"list the runs": jobs.list_runs, **{f"{p} page": page(p) for p in
                                                ("runs", "compress", "export")}}  # fmt: skip
    for what, fn in work.items():
        cells = []
        for folder in (small, big):
            os.environ["LORITA_RUNS"] = str(folder)

            def cold(fn=fn) -> None:
                forget()
                fn()

            cells += [timed(cold, repeats), timed(fn, repeats)]
        s_cold, s_warm, b_cold, b_warm = cells
        rows.append(f"| {what} | {s_cold:.2f} | {s_warm:.2f} | {b_cold:.2f} | {b_warm:.2f} | "
                    f"{b_cold / s_cold:.1f}x | {b_warm / s_warm:.1f}x |")  # fmt: skip
    head = [f"| work | 3 runs cold (s) | 3 runs warm (s) | {count} runs cold (s) | "
            f"{count} runs warm (s) | cold ratio | warm ratio |", "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    return head + rows


def long_log_table(seed: Path, work: Path, lines: int) -> list[str]:
    from app import live
    from lorita.runs import Run

    d = work / "long"
    shutil.copytree(seed, d, ignore=shutil.ignore_patterns(".slots", "*.lock"))
    metrics_lines(d / "metrics.jsonl", lines)
    with open(d / "spectra.jsonl", "w") as f:
        layers = {f"layer{j}.conv": [1.0 / (1 + k) for k in range(256)] for j in range(54)}
        for i in range(300):
            f.write(json.dumps({"step": i * 10, "layers": layers}) + "\n")
    run = Run(d)
    t0 = time.perf_counter()
    f = live.follower(run)
    first = time.perf_counter() - t0
    with open(d / "metrics.jsonl", "a") as out:
        out.write(json.dumps({"step": lines, "split": "train", "loss": 0.1, "acc": 0.9}) + "\n")
    t0 = time.perf_counter()
    live.follower(run)
    after = time.perf_counter() - t0
    points = sum(len(v) for v in f.metrics.values())
    return [
        "| work | seconds | points held |",
        "|---|---:|---:|",
        f"| first read of a {lines:,}-line log and 300 snapshots of 54 layers | {first:.2f} | "
        f"{points} metrics, {len(f.snapshots)} snapshots |",
        f"| a following read (one new line) | {after:.3f} | |",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=300, help="runs in the large folder")
    ap.add_argument("--lines", type=int, default=3000, help="metrics lines of each run")
    ap.add_argument("--long-lines", type=int, default=200_000, help="metrics lines, long run")
    ap.add_argument("--repeats", type=int, default=3, help="timings per cell (median)")
    args = ap.parse_args()
    import logging

    import torch

    # (Streamlit's note on each call made outside a page: "missing ScriptRunContext")
    logging.getLogger("streamlit.runtime.scriptrunner_utils.script_run_context").addFilter(
        lambda record: "ScriptRunContext" not in record.getMessage()
    )
    torch.set_num_threads(1)  # as the app's server computes
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        seed = train_one(work / "seed-store")
        metrics = work / "metrics.jsonl"
        metrics_lines(metrics, args.lines)
        fill(work / "small", seed, 3, metrics)
        fill(work / "big", seed, args.runs, metrics)
        os.environ["LORITA_RUNS"] = str(work / "small")
        page("runs")()  # (the imports and Streamlit's first start, timed in no cell)
        print(f"load average before: {load()}\n")
        print("\n".join(scale_table(work / "small", work / "big", args.runs, args.repeats)))
        print(f"\nload average: {load()}\n")
        print("\n".join(long_log_table(seed, work, args.long_lines)))
        print(f"\nload average after: {load()}")


if __name__ == "__main__":
    main()
