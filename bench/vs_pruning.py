"""LoRITa against the baselines an engineer would use instead, at the same parameter budget.

    python bench/vs_pruning.py [--setups mlp mlp-from-start cnn] [--seeds 0 1 2]
                               [--budgets 5 10 20 35 50] [--finetune-epochs 2]
                               [--work DIR] [--doc docs/vs_pruning.md]

For each setup and seed: train the N=3 run and its N=1 twin (same config otherwise), then
``lorita.baselines.compare``: LoRITa's Budget cut of the N=3 run, the SVD cut of the N=1 run and
Torch-Pruning's L1 structured pruning of the N=1 run, each at every budget, with and without
fine-tuning (same recipe for all three). Selection (checkpoint, fine-tuned epoch) reads
validation only; the tables report test accuracy, mean and range over the seeds. Results of
each (setup, seed) are cached as JSON in ``--work`` so an interrupted run picks up where it
stopped; a cached result is used only if its runs were trained with the setup's config.

Setups: ``mlp`` is the app's Fashion-MNIST preset (the plain network for its first
``plain_epochs``, then composed into N=3 factors), ``mlp-from-start`` the same with N=3
composed from the start (``plain_epochs`` 0), ``cnn`` VGG-11 x0.25 on digits.
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
SETUPS = ("mlp", "mlp-from-start", "cnn")
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import lorita as lt  # noqa: E402
from app.presets import config as preset_config  # noqa: E402
from lorita.baselines import METHODS, compare  # noqa: E402
from lorita.engine import TrainConfig  # noqa: E402
from lorita.runs import RunStore  # noqa: E402


def _overrides(pairs: list[str]) -> dict:
    """``KEY=VALUE`` pairs (VALUE as JSON, else a string) for the MLP's training config."""
    out = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or key not in TrainConfig.__dataclass_fields__:
            sys.exit(f"--mlp-set: {pair!r} is not KEY=VALUE with KEY a TrainConfig field")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def _setups(mlp_set: dict | None = None) -> dict[str, dict]:
    mlp = {**TrainConfig().to_dict(), **preset_config("fashion"), **(mlp_set or {})}
    mlp.update(device="cpu", spectra_every=0)
    try:
        TrainConfig.from_dict(mlp)
    except (TypeError, ValueError) as e:
        sys.exit(f"--mlp-set: {e}")
    plain = mlp.get("plain_epochs", 0)
    scale = mlp.get("composed_lr_scale", 1.0)
    slow = f", the composed epochs at {scale:g} x lr" if scale != 1 else ""
    cnn = {
        **TrainConfig().to_dict(),
        "dataset": "digits",
        "model": "vgg11",
        "model_kwargs": {"width_mult": 0.25},
        "device": "cpu",
        "spectra_every": 0,
        "epochs": 15,
    }
    return {
        "mlp": {
            "title": "Fashion-MNIST MLP, the preset ("
            + (f"{plain} plain epochs, then N=3" if plain else "N=3 from the start")
            + slow
            + (f"; with {mlp_set}" if mlp_set else "")
            + ")",
            "config": mlp,
        },
        "mlp-from-start": {
            "title": "Fashion-MNIST MLP, N=3 from the start (the preset with plain_epochs 0"
            + slow
            + (f"; with {mlp_set}" if mlp_set else "")
            + ")",
            "config": {**mlp, "plain_epochs": 0},
        },
        "cnn": {"title": "Small CNN: VGG-11 (channels x0.25) on digits", "config": cnn},
    }


def describe(cfg: dict) -> str:
    model = cfg["model"] + (f" {cfg['model_kwargs']}" if cfg.get("model_kwargs") else "")
    warm = cfg.get("warmup", 0.0)
    return (
        f"{cfg['dataset']}, {model}; {cfg['optimizer']} lr {cfg['lr']:g}"
        + (f" (linear warm-up over {100 * warm:g}% of the steps)" if warm else "")
        + f", weight decay {cfg['weight_decay']:g}, {cfg['schedule']} schedule, "
        f"{cfg['epochs']} epochs of batch {cfg['batch_size']}"
        + (f" (N=3: the first {cfg['plain_epochs']} plain)" if cfg.get("plain_epochs") else "")
        + (
            f"; N=3's composed epochs at {cfg['composed_lr_scale']:g} x lr"
            if cfg.get("composed_lr_scale", 1.0) != 1
            else ""
        )
    )


def train_pair(cfg: dict, seed: int, store: RunStore, tag: str) -> dict:
    """Train N=3 and N=1 (same config and seed); their run folders and wall times."""
    out = {}
    for n in (3, 1):
        c = {**cfg, "n_factors": n, "seed": seed}
        t0 = time.perf_counter()
        name = f"{tag}-s{seed}-n{n}"
        shutil.rmtree(store.root / name, ignore_errors=True)  # an interrupted or stale try
        run = store.create(c, name=name)
        res = lt.train(c, run, threads="auto")
        out[n] = {
            "run": str(run.path),
            "seconds": time.perf_counter() - t0,
            "test_acc": res["test_acc"],
            "best_val_acc": res["best_val_acc"],
        }
    return out


def _trained_with(res: dict, cfg: dict, seed: int) -> bool:
    """Whether a cached result's N=3 run was trained with ``cfg`` at ``seed`` (the fields
    a config file lacks read as their defaults)."""
    try:
        had = json.loads((Path(res["train"]["3"]["run"]) / "config.json").read_text())
    except (OSError, KeyError, ValueError):
        return False
    want = TrainConfig.from_dict({**cfg, "n_factors": 3, "seed": seed}).to_dict()
    return TrainConfig.from_dict(had).to_dict() == want


def one_seed(name: str, setup: dict, seed: int, args, store: RunStore) -> dict:
    cache = Path(args.work) / f"{name}-seed{seed}.json"
    if cache.is_file():
        res = json.loads(cache.read_text())
        if _trained_with(res, setup["config"], seed):
            return res
        print(f"{name} seed {seed}: the cached runs used another config; training again")
        for old in Path(args.work).glob(f"{name}-seed{seed}-ftlr*.json"):
            old.unlink()
    t0 = time.perf_counter()
    runs = train_pair(setup["config"], seed, store, name)
    rows = compare(
        runs[3]["run"],
        runs[1]["run"],
        budgets=args.budgets,
        finetune_epochs=args.finetune_epochs,
    )
    for r in rows:
        r.pop("ranks", None)
    out = {"train": runs, "rows": rows, "seconds": time.perf_counter() - t0}
    cache.write_text(json.dumps(out))
    out = json.loads(cache.read_text())  # the same (string) keys as a cached result
    print(f"{name} seed {seed}: done in {out['seconds']:.0f} s", flush=True)
    return out


def other_lrs(name: str, setup: dict, seed: int, res: dict, args) -> dict:
    """Fine-tuned rows at other fine-tuning learning rates (x the run's lr), cached beside."""
    out = {}
    for scale in args.finetune_lr_scales:
        cache = Path(args.work) / f"{name}-seed{seed}-ftlr{scale:g}.json"
        if not cache.is_file():
            rows = compare(
                res["train"]["3"]["run"],
                res["train"]["1"]["run"],
                budgets=args.budgets,
                finetune_epochs=args.finetune_epochs,
                finetune_lr=setup["config"]["lr"] * scale,
            )
            rows = [{k: v for k, v in r.items() if k != "ranks"} for r in rows]
            cache.write_text(json.dumps(rows))
        out[scale] = json.loads(cache.read_text())
    return out


def lr_table(results: list[dict], per_lr: list[dict], args) -> list[str]:
    """LoRITa minus the best baseline after fine-tuning, per budget and fine-tuning lr."""
    k, scales = args.finetune_epochs, [0.1, *args.finetune_lr_scales]
    lines = [
        "| fine-tuning lr (x the run's) | "
        + " | ".join(f"{b:g}%" for b in args.budgets)
        + " | budgets won |",
        "|---" * (len(args.budgets) + 2) + "|",
    ]
    for scale in scales:
        if scale == 0.1:
            res = results
        else:
            res = [{"rows": d[scale]} for d in per_lr]
        margins = [winner(res, b, k)[1] for b in args.budgets]
        lines.append(
            f"| {scale:g} | "
            + " | ".join(f"{m:+.2f}" for m in margins)
            + f" | {sum(m >= 0 for m in margins)} of {len(margins)} |"
        )
    return lines


def stats(values: list[float]) -> str:
    """Mean (min-max) in percent."""
    v = [100 * x for x in values]
    if len(v) == 1:
        return f"{v[0]:.2f}"
    return f"{statistics.fmean(v):.2f} ({min(v):.2f}-{max(v):.2f})"


def cell(results: list[dict], budget: float, method: str, ft: int) -> list[float]:
    return [
        r["test_acc"]
        for res in results
        for r in res["rows"]
        if r["budget"] == budget and r["method"] == method and r["finetune_epochs"] == ft
    ]


def params_pct(results: list[dict], budget: float, method: str) -> float:
    v = [
        r["params_pct"]
        for res in results
        for r in res["rows"]
        if r["budget"] == budget and r["method"] == method and r["finetune_epochs"] == 0
    ]
    return statistics.fmean(v)


def winner(results: list[dict], budget: float, ft: int) -> tuple[str, float]:
    """The method with the best mean test accuracy, and LoRITa's margin over the best other."""
    mean = {m: statistics.fmean(cell(results, budget, m, ft)) for m in METHODS}
    best = max(mean, key=mean.get)
    other = max(v for m, v in mean.items() if m != "lorita")
    return best, 100 * (mean["lorita"] - other)


def table(results: list[dict], budgets, ft: int) -> tuple[list[str], int]:
    head = " | ".join(METHODS[m] for m in METHODS)
    lines = [
        f"| budget (params) | {head} | best | LoRITa minus best baseline (points) |",
        "|---" * (len(METHODS) + 3) + "|",
    ]
    wins = 0
    for b in budgets:
        cells = []
        for m in METHODS:
            cells.append(f"{stats(cell(results, b, m, ft))} [{params_pct(results, b, m):.1f}%]")
        best, margin = winner(results, b, ft)
        wins += margin >= 0
        lines.append(f"| {b:g}% | " + " | ".join(cells) + f" | {METHODS[best]} | {margin:+.2f} |")
    return lines, wins


def _tried_label(res: list[dict], seeds: list[str]) -> str:
    cfg = json.loads((Path(res[0]["train"]["3"]["run"]) / "config.json").read_text())
    twin = json.loads((Path(res[0]["train"]["1"]["run"]) / "config.json").read_text())
    if cfg.get("init_from"):  # two runs: the plain run's best checkpoint, then N=3
        start = f" (N=3 from the plain network after {twin['epochs'] - cfg['epochs']}, two runs)"
    elif cfg.get("plain_epochs"):
        start = f" (plain for {cfg['plain_epochs']}, then N=3)"
    else:
        start = ""
    return (
        f"{cfg['optimizer']} lr {cfg['lr']:g}, warm-up {cfg.get('warmup', 0.0):g}, "
        f"weight decay {cfg['weight_decay']:g}, {twin['epochs']} epochs{start}; "
        f"seeds {', '.join(seeds)}"
    )


TRIED_HEAD = "| MLP training config |"
EARLIER = "an earlier version of this doc: "


def earlier_rows(doc: Path) -> list[str]:
    """The tried table's lines of the doc this run replaces, kept as measured then (their
    work folders need not exist any more); its own first lines are marked as earlier."""
    if not doc.is_file():
        return []
    lines, rows = doc.read_text().splitlines(), []
    start = next((i for i, line in enumerate(lines) if line.startswith(TRIED_HEAD)), None)
    if start is None:
        return []
    for line in lines[start + 2 :]:
        if not line.startswith("| "):
            break
        rows.append(line.replace("| the tables above: ", f"| {EARLIER}", 1))
    return rows


def tried_table(
    main: dict[str, list[dict]], dirs: list[str], args, earlier: list[str]
) -> list[str]:
    """One line per MLP training config: the uncut gap and the budgets LoRITa wins, from the
    per-seed results cached in each ``--tried`` work folder (the first lines: this doc's),
    then the ``earlier`` doc's lines whose config no line here repeats."""
    k = args.finetune_epochs
    lines = [
        "| MLP training config | N=3 minus N=1, uncut (points) | budgets won without "
        f"fine-tuning | budgets won after {k} epochs | margins after fine-tuning "
        f"({', '.join(f'{b:g}%' for b in args.budgets)}) |",
        "|---|---|---|---|---|",
    ]
    sets = [(f"the tables above: {title}", res) for title, res in main.items()]
    for d in dirs:
        for name in ("mlp", "mlp-from-plain", "mlp-from-start"):
            files = sorted(Path(d).glob(f"{name}-seed[0-9]*.json"))
            seeds = [f.stem.removeprefix(f"{name}-seed") for f in files]
            files = [f for f, s in zip(files, seeds, strict=True) if s.isdigit()]
            res = [json.loads(f.read_text()) for f in files]
            if res:
                sets.append((_tried_label(res, [s for s in seeds if s.isdigit()]), res))
    for label, res in sets:
        gap = 100 * statistics.fmean(
            r["train"]["3"]["test_acc"] - r["train"]["1"]["test_acc"] for r in res
        )
        won = [sum(winner(res, b, ft)[1] >= 0 for b in args.budgets) for ft in (0, k)]
        margins = ", ".join(f"{winner(res, b, k)[1]:+.2f}" for b in args.budgets)
        lines.append(f"| {label} | {gap:+.2f} | {won[0]} | {won[1]} | {margins} |")
    labels = {line.split(" | ")[0] for line in lines[2:]}
    labels |= {line.replace("| the tables above: ", f"| {EARLIER}", 1) for line in labels}
    return lines + [line for line in earlier if line.split(" | ")[0] not in labels]


def dense_lines(results: list[dict]) -> list[str]:
    lines = [
        "| N | test acc (%), uncut | best val acc (%) | training wall time (s) |",
        "|---|---|---|---|",
    ]
    for n in ("3", "1"):
        tr = [res["train"][n] for res in results]
        lines.append(
            f"| {n} | {stats([t['test_acc'] for t in tr])} | "
            f"{stats([t['best_val_acc'] for t in tr])} | "
            + ", ".join(f"{t['seconds']:.0f}" for t in tr)
            + " |"
        )
    return lines


def _cli_flags(cfg: dict) -> str:
    """The ``lorita train`` flags that give ``cfg`` (where it differs from TrainConfig's)."""
    default = TrainConfig().to_dict()
    flags = [
        f"--{key.replace('_', '-')} {cfg[key]:g}"
        if isinstance(cfg[key], float)
        else f"--{key.replace('_', '-')} {cfg[key]}"
        for key in (
            "dataset",
            "optimizer",
            "lr",
            "warmup",
            "weight_decay",
            "epochs",
            "plain_epochs",
            "composed_lr_scale",
            "batch_size",
        )  # fmt: skip
        if cfg[key] != default[key]
    ]
    flags += [f"--model-arg {k}={v}" for k, v in (cfg.get("model_kwargs") or {}).items()]
    return " ".join(flags)


def _recipe_lines(setup: dict) -> list[str]:
    cfg = setup["config"]
    k = cfg.get("plain_epochs", 0)
    if not k:
        return []
    return [
        f"One run: the plain network (N=1) trains the first {k} epochs (its own warm-up and "
        "cosine schedule), is composed into N=3 factors with the balanced init (the same "
        f"function), and trains the remaining {cfg['epochs'] - k} epochs with a new optimizer "
        "and schedule; its N=1 twin trains all epochs plain. From the command line:",
        "",
        "```",
        f"python -m lorita train {_cli_flags(cfg)}",
        "```",
        "",
    ]


def verdict_lines(setups: dict, all_results: dict[str, list[dict]], args) -> list[str]:
    """One line per setup: the uncut gap and the budgets LoRITa wins, against the targets."""
    k = args.finetune_epochs
    lines = [
        "In short (test accuracy; targets: N=3 uncut within 0.3 points of N=1, LoRITa at or "
        f"above both baselines at every budget without fine-tuning and at 3 or more after {k} "
        "epochs of it):",
        "",
        "| setup | N=3 minus N=1, uncut (points) | budgets won without fine-tuning | "
        f"budgets won after {k} epochs |",
        "|---|---:|---:|---:|",
    ]
    for name, res in all_results.items():
        gap = 100 * statistics.fmean(
            r["train"]["3"]["test_acc"] - r["train"]["1"]["test_acc"] for r in res
        )
        won = [sum(winner(res, b, ft)[1] >= 0 for b in args.budgets) for ft in (0, k)]
        n = len(args.budgets)
        lines.append(
            f"| {setups[name]['title']} | {gap:+.2f} | {won[0]} of {n} | {won[1]} of {n} |"
        )
    return [*lines, ""]


def section(name: str, setup: dict, results: list[dict], args) -> list[str]:
    k = args.finetune_epochs
    lines = [
        f"## {setup['title']}",
        "",
        f"{describe(setup['config'])}; seeds {', '.join(map(str, args.seeds))}. "
        f"Fine-tuning: {k} epochs, the recipe `Compressor.recipe()` gives all three "
        "(the run's optimizer and batch size, a tenth of its learning rate, no weight decay), "
        "the epoch kept chosen on validation.",
        "",
        *_recipe_lines(setup),
        "Uncut models (test accuracy of the best-validation checkpoint):",
        "",
        *dense_lines(results),
        "",
    ]
    targets = {0: len(args.budgets), k: 3}  # the bar: all without, >= 3 of 5 with
    for ft in (0, k) if k else (0,):
        body, wins = table(results, args.budgets, ft)
        what = f"after {ft} epochs of fine-tuning" if ft else "without fine-tuning"
        bar = targets[ft] if len(args.budgets) == 5 else len(args.budgets)
        lost = [(b, winner(results, b, ft)[1]) for b in args.budgets]
        lost = ", ".join(f"{b:g}% by {-m:.2f} points" for b, m in lost if m < 0)
        verdict = "met" if wins >= bar else f"missed by {bar - wins} budget(s)"
        verdict += f"; lost at {lost}" if lost else ""
        lines += [
            f"Test accuracy (%) {what}: mean (min-max) over the seeds, [params kept, mean].",
            "",
            *body,
            "",
            f"LoRITa at or above both baselines {what}: {wins} of {len(args.budgets)} budgets "
            f"(target {bar}: {verdict}).",
            "",
        ]
    gap = 100 * statistics.fmean(
        res["train"]["3"]["test_acc"] - res["train"]["1"]["test_acc"] for res in results
    )
    lines += [
        f"Uncut, N=3 minus N=1: {gap:+.2f} points of test accuracy (target: within 0.3"
        + ("; met). " if abs(gap) <= 0.3 else f"; missed by {abs(gap) - 0.3:.2f}). ")
        + "Fine-tuning starts every method from its cut, so at the large budgets, where "
        "every cut keeps about its uncut accuracy, the uncut gap is what decides. What was "
        "tried to close the gap, and what it gave: docs/training_recipe.md"
        + (" and the table of other training configs below." if name.startswith("mlp") else "."),
        "",
    ]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setups", nargs="+", default=list(SETUPS), choices=SETUPS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--budgets", nargs="+", type=float, default=[5, 10, 20, 35, 50])
    ap.add_argument("--finetune-epochs", type=int, default=2)
    ap.add_argument("--work", default=None, help="folder for runs and per-seed JSON results")
    ap.add_argument("--doc", default=str(ROOT / "docs" / "vs_pruning.md"))
    ap.add_argument(
        "--finetune-lr-scales",
        nargs="*",
        type=float,
        default=[0.3, 1.0],
        help="for the MLP, also fine-tune at these multiples of the run's lr (0.1 is the recipe)",
    )
    ap.add_argument(
        "--tried",
        nargs="*",
        default=[],
        metavar="WORK",
        help="work folders of earlier --mlp-set runs to summarise beside the MLP's results",
    )
    ap.add_argument(
        "--mlp-set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="train the MLP with these TrainConfig fields instead of the preset's (use a new --work)",
    )
    args = ap.parse_args()
    args.work = args.work or tempfile.mkdtemp(prefix="lorita-vs-pruning-")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    store = RunStore(Path(args.work) / "runs")
    load0, t_all = os.getloadavg(), time.perf_counter()
    setups = _setups(_overrides(args.mlp_set))
    earlier = earlier_rows(Path(args.doc))
    sections, spent, mlp_results, all_results = [], 0.0, {}, {}
    for name in args.setups:
        results = [one_seed(name, setups[name], s, args, store) for s in args.seeds]
        spent += sum(r["seconds"] for r in results)
        sections += section(name, setups[name], results, args)
        if name == "mlp-from-start" and args.finetune_lr_scales and args.finetune_epochs:
            per_lr = [
                other_lrs(name, setups[name], s, r, args) for s, r in zip(args.seeds, results)
            ]
            sections += [
                "Fine-tuning at other learning rates (the same for all three methods, "
                f"{args.finetune_epochs} epochs, cosine to 0, no weight decay): LoRITa minus "
                "the best baseline after fine-tuning, test accuracy points, mean over the seeds.",
                "",
                *lr_table(results, per_lr, args),
                "",
            ]
        all_results[name] = results
        if name.startswith("mlp"):
            mlp_results[setups[name]["title"]] = results
        last_mlp = [s for s in args.setups if s.startswith("mlp")][-1:]
        if [name] == last_mlp and (args.tried or earlier):
            sections += [
                "Other training configs tried for the MLP (the same comparison, its N=1 twin "
                "trained with the same config; from `--tried` work folders of this script run "
                "with `--mlp-set`, and the lines of the doc this run replaced, as measured then: "
                f"*{EARLIER.rstrip(': ')}* marks that doc's own setups, trained with the preset "
                "of that time). Rows marked *two runs* trained the plain network as a run of "
                "its own and started N=3 from its best checkpoint (`--init-from`): the recipe "
                "`plain_epochs` runs in one, with other random draws (the composition's and the "
                "data order's), so the spread between such rows is the seeds' spread. Before "
                "`composed_lr_scale`, every composed epoch trained at the run's lr:",
                "",
                *tried_table(mlp_results, args.tried, args, earlier),
                "",
            ]
    head = [
        "# LoRITa versus SVD and structured pruning at the same budget",
        "",
        "Written by `python bench/vs_pruning.py` (rerun it to refresh; "
        f"{spent:.0f} s of trainings and comparisons in all, {time.perf_counter() - t_all:.0f} s "
        "in the last invocation, the rest read from its cache). Machine: "
        f"{platform.machine()}, {os.cpu_count()} CPU cores shared with other work (load average "
        f"{load0[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end), torch "
        f"{torch.__version__}; every run on one thread.",
        "",
        "Methods, each at a budget of the uncut model's parameters: **LoRITa cut** = the N=3 run "
        "merged and cut by the Budget policy (singular values dropped in the global policy's "
        "order until the parameter count fits; cut layers stored as two thin layers); **SVD cut** "
        "= the same cut of the N=1 run; **L1 pruning** = Torch-Pruning's magnitude (L1) "
        "structured pruning of the N=1 run, whole neurons/channels removed at one uniform ratio "
        "(the output layer kept), the smallest ratio that fits. The classifier head is left "
        "uncut by every method, as in the paper. Budgets count the whole deployed network "
        "(BatchNorm and biases included). Training: the MLP as the app's Fashion-MNIST preset "
        f"({setups['mlp']['config']['epochs']} epochs; N=3 once after "
        f"{setups['mlp']['config'].get('plain_epochs', 0)} plain epochs as the preset does, once "
        "from the start), the CNN 15 epochs on digits, chosen so that every seed, "
        "setup and fine-tuning takes about 30 minutes of this 2-core CPU; other work shared "
        "the cores while the cached runs trained, so the wall times here are inflated by it.",
        "",
        *verdict_lines(setups, all_results, args),
    ]
    text = "\n".join(head + sections)
    Path(args.doc).parent.mkdir(parents=True, exist_ok=True)
    Path(args.doc).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
