"""Does N=3 compress better than N=1? Digits and Fashion-MNIST MLPs at the shipped defaults.

    python bench/fidelity.py [--datasets digits fashion_mnist] [--seeds 0 1]
                             [--doc docs/fidelity.md]

For each dataset (digits: TrainConfig's defaults, the classroom run; Fashion-MNIST: the app's
Fashion-MNIST preset) and seed, train the MLP with N=1 and N=3 (everything else equal), keep the
checkpoint with the best validation accuracy, then cut it with the Budget policy (singular values
dropped in the global policy's order until the parameter count fits; the head left whole) at
each budget and record validation and test accuracy. The paper's claim is that N=3's curve lies
above N=1's; this prints what is measured, whatever it is. Selection (checkpoint) reads
validation only; test is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import lorita as lt  # noqa: E402
from app.presets import config as preset_config  # noqa: E402
from lorita.compress import Compressor  # noqa: E402
from lorita.engine import TrainConfig, load_splits  # noqa: E402
from lorita.runs import RunStore  # noqa: E402
from lorita.truncation import Budget  # noqa: E402

BUDGETS = (5, 10, 20, 35, 50)  # % of params kept


def setups() -> dict[str, dict]:
    return {
        "digits": {**TrainConfig().to_dict(), "device": "cpu"},
        "fashion_mnist": {
            **TrainConfig().to_dict(),
            **preset_config("fashion"),
            "device": "cpu",
            "spectra_every": 0,
        },
    }


def describe(cfg: dict) -> str:
    warm = cfg.get("warmup", 0.0)
    kw = cfg.get("model_kwargs") or {}
    return (
        f"MLP ({kw.get('depth', 3)} x {kw.get('width', 256)}, BatchNorm); {cfg['optimizer']} lr "
        f"{cfg['lr']:g}"
        + (f" with a linear warm-up over {100 * warm:g}% of the steps" if warm else "")
        + f", weight decay {cfg['weight_decay']:g}, {cfg['schedule']} schedule, "
        f"{cfg['epochs']} epochs of batch {cfg['batch_size']}"
        + (
            f" (N=3: the first {cfg['plain_epochs']} plain, then composed)"
            if cfg.get("plain_epochs")
            else ""
        )
        + f", {cfg['init']} init"
    )


def _trained_with(folder: Path, cfg: dict) -> bool:
    """Whether the run in ``folder`` was trained with ``cfg`` (fields its config file lacks
    read as their defaults)."""
    try:
        had = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return TrainConfig.from_dict(had).to_dict() == TrainConfig.from_dict(cfg).to_dict()


def one(cfg: dict, n: int, seed: int, store: RunStore) -> dict:
    """Train, then cut at every budget; cached as JSON beside the runs (a rerun with the same
    --work reuses it, if its run was trained with this config)."""
    cache = store.root / f"{cfg['dataset']}-s{seed}-n{n}.json"
    if cache.is_file() and _trained_with(
        store.root / cache.stem, {**cfg, "n_factors": n, "seed": seed}
    ):
        return json.loads(cache.read_text())
    shutil.rmtree(store.root / cache.stem, ignore_errors=True)  # interrupted, or another config
    out = _one(cfg, n, seed, store)
    cache.write_text(json.dumps(out))
    return json.loads(cache.read_text())


def _one(cfg: dict, n: int, seed: int, store: RunStore) -> dict:
    c = {**cfg, "n_factors": n, "seed": seed}
    run = store.create(c, name=f"{c['dataset']}-s{seed}-n{n}")
    t0 = time.time()
    res = lt.train(c, run, threads="auto")
    seconds = time.time() - t0
    session = Compressor(run)
    spec = lt.layer_spectra(run.load_model("best"))
    cuts = {}
    for b in BUDGETS:
        r = session.apply(Budget(b))
        cuts[str(b)] = {
            "val": r.metrics["val_acc"],
            "test": r.metrics["test_acc"],
            "pct": r.params_pct,
        }
    return {
        "val": res["best_val_acc"],
        "test": res["test_acc"],
        "ranks": {k: lt.effective_rank(v) for k, v in spec.items()},
        "full": {k: len(v) for k, v in spec.items()},
        "time": seconds,
        "cuts": cuts,
    }


def pct(values) -> str:
    v = [100 * x for x in values]
    return f"{statistics.fmean(v):.2f}" + (f" ({min(v):.2f}-{max(v):.2f})" if len(v) > 1 else "")


def section(ds: str, cfg: dict, rows: dict, seeds: list[int]) -> tuple[list[str], dict]:
    lines = [
        f"## {ds}",
        "",
        f"{describe(cfg)}; seeds {', '.join(map(str, seeds))}. Checkpoint: best validation "
        "accuracy. Accuracies: mean (min-max) over the seeds.",
        "",
        "| N | best val acc (%) | test acc (%) | effective ranks, seed "
        f"{seeds[0]} (σ > 1% σ_max) | train time (s) |",
        "|---|---|---|---|---|",
    ]
    for n in (1, 3):
        r = rows[n]
        first = r[0]
        ranks = ", ".join(f"{k} {first['ranks'][k]}/{first['full'][k]}" for k in first["ranks"])
        lines.append(
            f"| {n} | {pct(x['val'] for x in r)} | {pct(x['test'] for x in r)} | {ranks} | "
            + ", ".join(f"{x['time']:.0f}" for x in r)
            + " |"
        )
    gap = 100 * (
        statistics.fmean(x["test"] for x in rows[3]) - statistics.fmean(x["test"] for x in rows[1])
    )
    lines += [
        "",
        f"Uncut, N=3 minus N=1: {gap:+.2f} points of test accuracy (mean over the seeds).",
        "",
        "Accuracy (%) of the Budget cut to at most the given share of the parameters (the whole",
        "deployed network counted, BatchNorm and the uncut head included):",
        "",
        "| params kept ≤ | N=1 val | N=1 test | N=3 val | N=3 test | N=3 ≥ N=1 on val / test |",
        "|---|---|---|---|---|---|",
    ]
    above = {"val": 0, "test": 0}
    for b in BUDGETS:
        m = {
            (n, part): statistics.fmean(x["cuts"][str(b)][part] for x in rows[n])
            for n in (1, 3)
            for part in ("val", "test")
        }
        ok = {part: m[(3, part)] >= m[(1, part)] for part in ("val", "test")}
        for part in ok:
            above[part] += ok[part]
        cells = [
            pct(x["cuts"][str(b)][part] for x in rows[n])
            for n in (1, 3)
            for part in ("val", "test")
        ]
        yes = " / ".join("yes" if ok[p] else "no" for p in ("val", "test"))
        lines.append(f"| {b}% | " + " | ".join(cells) + f" | {yes} |")
    lines += [
        "",
        f"N=3's mean accuracy is at least N=1's at {above['val']} of {len(BUDGETS)} budgets on "
        f"validation and {above['test']} of {len(BUDGETS)} on test.",
        "",
    ]
    return lines, {"gap": gap, **above}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", nargs="+", default=list(setups()), choices=list(setups()))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--doc", default=str(ROOT / "docs" / "fidelity.md"))
    ap.add_argument("--work", default=None, help="folder for the runs and cached results")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="lorita-fidelity-"))
    work.mkdir(parents=True, exist_ok=True)
    store = RunStore(work)
    t_all, load0 = time.time(), os.getloadavg()
    sections, summary, spent = [], [], 0.0
    for ds in args.datasets:
        cfg = setups()[ds]
        rows = {n: [one(cfg, n, s, store) for s in args.seeds] for n in (1, 3)}
        spent += sum(x["time"] for n in rows for x in rows[n])
        n_test = len(load_splits(TrainConfig.from_dict(cfg)).test)
        lines, facts = section(ds, cfg, rows, args.seeds)
        lines.insert(3, f"Test split: {n_test} images (one image = {100 / n_test:.2f} points). ")
        sections += lines
        summary.append(
            f"| {ds} | {facts['gap']:+.2f} | {facts['val']} of {len(BUDGETS)} | "
            f"{facts['test']} of {len(BUDGETS)} |"
        )
        print("\n".join(lines), flush=True)
    head = [
        "# Fidelity: N=1 versus N=3 under truncation",
        "",
        "Written by `python bench/fidelity.py` (rerun it to refresh; "
        f"{spent:.0f} s of training in all, {time.time() - t_all:.0f} s in the last invocation, "
        "the rest read from its --work cache). Machine: "
        f"{platform.machine()}, "
        f"{os.cpu_count()} CPU cores shared with other work (load average {load0[0]:.1f} at the "
        f"start, {os.getloadavg()[0]:.1f} at the end), torch {torch.__version__}; every run on "
        "one thread.",
        "",
        "Both runs of a seed share data split, optimizer, schedule and weight decay; only N",
        "differs. Cuts use the Budget policy on the merged model and store each cut layer as two",
        "thin layers where that is smaller.",
        "",
        "## Summary",
        "",
        "| dataset | uncut test acc, N=3 minus N=1 (points) | budgets (5-50%) where N=3 ≥ N=1, "
        "val | test |",
        "|---|---|---|---|",
        *summary,
        "",
    ]
    text = "\n".join(head + sections)
    Path(args.doc).parent.mkdir(parents=True, exist_ok=True)
    Path(args.doc).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
