"""Glue for the Compress and Export pages: everything a slider move needs, held in memory.

A :class:`Context` is built once per (run, checkpoint): the merged model, the SVD of every
layer (``lt.layer_svd``), the validation and test splits as tensors, the uncompressed cost and
accuracy. A slider move then only plans ranks, truncates from the cached SVD, evaluates the two
splits in large batches and counts the cost (:func:`apply`). The pages cache contexts with
``st.cache_resource``; this module itself does not need Streamlit.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app import jobs

# Slider settings per policy: label, min, max, step, default, help.
POLICY_UI: dict[str, dict[str, Any]] = {
    "uniform": {
        "label": "keep this share of every layer's rank",
        "min": 0.01, "max": 1.0, "step": 0.01, "default": 0.5, "format": "%.2f",
        "help": "Uniform: every layer keeps the top ⌊ratio·rank⌋ singular values.",
    },
    "global": {
        "label": "drop this share of all singular values (pooled, σ/σ_max)",
        "min": 0.0, "max": 0.99, "step": 0.01, "default": 0.5, "format": "%.2f",
        "help": "Global: spectra normalised by their largest value, pooled over layers, "
        "and the globally smallest fraction dropped.",
    },
    "energy": {
        "label": "keep this share of each layer's energy Σσ²",
        "min": 0.5, "max": 1.0, "step": 0.001, "default": 0.99, "format": "%.3f",
        "help": "Energy: per layer, the smallest rank that keeps this share of Σσ².",
    },
}  # fmt: skip
POLICY_NAMES = {
    "uniform": "Uniform ratio",
    "global": "Global (pooled spectra)",
    "energy": "Energy per layer",
    "ranks": "Per-layer ranks (table)",
}
EVAL_BATCH = 2048


@dataclass
class Context:
    """A finished run's checkpoint, ready for fast truncation."""

    run: str
    which: str
    config: dict[str, Any]
    model: Any  # the merged plain model (nn.Module, eval mode)
    svd: Any  # lt.SVDCache
    splits: Any  # lorita.data.Splits
    example_input: Any  # (1, C, H, W)
    base_cost: Any  # lt.Cost of the merged model
    base: dict[str, float]  # {"val_acc", "val_loss", "test_acc", "test_loss"}
    spectra: dict[str, list[float]] = field(default_factory=dict)
    load_seconds: float = 0.0
    parts: dict[str, Any] = field(default_factory=dict)  # "val"/"test": normalised, in memory

    @property
    def layers(self) -> list[str]:
        return list(self.spectra)

    @property
    def n_factors(self) -> int:
        return int(self.config.get("n_factors", 1))

    def full_ranks(self) -> dict[str, int]:
        return {n: len(s) for n, s in self.spectra.items()}


def checkpoint_path(name: str, which: str = "best", root: str | Path | None = None) -> Path:
    root = Path(root) if root is not None else jobs.runs_dir()
    return root / name / "checkpoints" / f"{which}.safetensors"


def checkpoint_mtime(name: str, which: str = "best", root: str | Path | None = None) -> float:
    """Modification time of the checkpoint (part of every cache key; 0 if missing)."""
    try:
        return checkpoint_path(name, which, root).stat().st_mtime
    except OSError:
        return 0.0


def finished_runs(root: str | Path | None = None) -> list[dict[str, Any]]:
    """Rows of runs that have a checkpoint to compress (newest first)."""
    out = []
    for row in jobs.list_runs(root):
        if checkpoint_mtime(row["name"], "best", root) or checkpoint_mtime(
            row["name"], "last", root
        ):
            out.append(row)
    return out


def materialize(dataset: Any) -> Any:
    """The split as one normalised float tensor in memory: no per-call uint8 conversion."""
    import torch

    from lorita.data import TensorDataset

    x, y = dataset[torch.arange(len(dataset))]  # (N, C, H, W) float, normalised
    return TensorDataset(x.contiguous(), y)


def default_run(rows: list[dict[str, Any]], wanted: str | None = None) -> str | None:
    """``wanted`` if it is among ``rows``, else the newest composed (N>1) run, else the newest."""
    names = [r["name"] for r in rows]
    if wanted in names:
        return wanted
    for row in rows:
        if (row.get("N") or 1) > 1:
            return row["name"]
    return names[0] if names else None


def evaluate(model: Any, splits: Any, parts: tuple[str, ...] = ("val", "test")) -> dict[str, float]:
    """Accuracy and loss of ``model`` on the given parts (library evaluate).

    ``splits`` is a :class:`Context` (its in-memory parts are used) or a lorita Splits.
    """
    from lorita.train import evaluate as lib_evaluate

    held = splits.parts if isinstance(splits, Context) else {}
    data = splits.splits if isinstance(splits, Context) else splits
    out: dict[str, float] = {}
    for part in parts:
        ds = held[part] if part in held else getattr(data, part)
        res = lib_evaluate(model, ds, batch_size=EVAL_BATCH)
        out[f"{part}_acc"] = float(res["acc"])
        out[f"{part}_loss"] = float(res["loss"])
    return out


def load_context(name: str, which: str = "best", root: str | Path | None = None) -> Context:
    """Load run ``name``'s checkpoint, merge it, take every layer's SVD, evaluate it once."""
    import lorita as lt

    t0 = time.perf_counter()
    run = jobs.store(root).get(name)
    if not checkpoint_mtime(name, which, root):
        raise ValueError(f"checkpoint: run {name!r} has no {which!r} checkpoint yet")
    composed = run.load_model(which)
    splits = run.load_splits()
    svd = lt.layer_svd(composed)
    model = svd.model  # merged, eval
    example = splits.example_input(1)
    ctx = Context(
        run=name,
        which=which,
        config=dict(run.config or {}),
        model=model,
        svd=svd,
        splits=splits,
        example_input=example,
        base_cost=lt.count_cost(model, example),
        base={},
        spectra={n: [float(v) for v in s] for n, s in svd.spectra.items()},
        parts={"val": materialize(splits.val), "test": materialize(splits.test)},
    )
    ctx.base = evaluate(model, ctx)
    ctx.load_seconds = time.perf_counter() - t0
    return ctx


def choice_token(choice: dict[str, Any]) -> tuple:
    """A hashable identity of a Compress page setting (run, checkpoint, policy, value, ranks)."""
    ranks = tuple(sorted((choice.get("ranks") or {}).items()))
    return (choice["run"], choice["which"], choice["policy"], choice.get("value"), ranks)


def make_policy(kind: str, value: float | None = None, ranks: dict[str, int] | None = None):
    """The library policy object for the page's choice."""
    import lorita as lt

    if kind == "ranks":
        return lt.Ranks({k: int(v) for k, v in (ranks or {}).items()})
    from lorita.truncation import make_policy as lib_make_policy

    return lib_make_policy(kind, float(value))


def apply(ctx: Context, policy: Any, *, form: str = "low_rank") -> dict[str, Any]:
    """The work behind one slider move: plan + truncate + evaluate val/test + count cost."""
    import lorita as lt

    t0 = time.perf_counter()
    small = lt.truncate(ctx.model, policy, form=form, svd=ctx.svd)
    metrics = evaluate(small, ctx)
    cost = lt.count_cost(small, ctx.example_input)
    return {
        "model": small,
        "ranks": dict(small.lorita_ranks),
        "params": cost.params,
        "flops": cost.flops,
        "params_pct": 100.0 * cost.params / max(1, ctx.base_cost.params),
        "flops_pct": 100.0 * cost.flops / max(1, ctx.base_cost.flops),
        "seconds": time.perf_counter() - t0,
        **metrics,
    }


def _flatten(point: dict[str, Any]) -> dict[str, Any]:
    flat = {k: v for k, v in point.items() if k != "metric"}
    metric = point.get("metric")
    if isinstance(metric, dict):
        flat.update(metric)
    return flat


def curve(ctx: Context, policy_name: str, values: list[float] | None = None) -> list[dict]:
    """Accuracy (val and test) and cost over the policy's whole range (lt.tradeoff_curve)."""
    import lorita as lt

    points = lt.tradeoff_curve(
        ctx.model,
        policy_name,
        values,
        evaluate=lambda m: evaluate(m, ctx),
        example_input=ctx.example_input,
        svd=ctx.svd,
    )
    return [_flatten(p) for p in points]


def smallest_within(ctx: Context, policy_name: str, max_drop: float) -> dict[str, Any]:
    """The smallest model within ``max_drop`` points of the full model's *validation* accuracy."""
    import lorita as lt

    res = lt.smallest_within(
        ctx.model,
        policy_name,
        evaluate=lambda m: evaluate(m, ctx, ("val",)),
        max_drop=float(max_drop),
        example_input=ctx.example_input,
        key="val_acc",
        svd=ctx.svd,
    )
    return {k: v for k, v in res.items() if k not in ("model", "curve")}


def find_baseline(name: str, root: str | Path | None = None) -> str | None:
    """The newest finished N=1 run with the same dataset, model, options and seed as ``name``."""
    run = jobs.store(root).get(name)
    cfg = run.config or {}
    if int(cfg.get("n_factors", 1)) == 1:
        return None
    paired = jobs.partner(name, root)
    if paired and checkpoint_mtime(paired, "best", root):
        return paired
    for row in finished_runs(root):
        if row["name"] == name or row.get("N") != 1:
            continue
        if jobs.same_setup(cfg, jobs.store(root).get(row["name"]).config or {}):
            return row["name"]
    return None


def finetune(ctx: Context, model: Any, *, epochs: int, lr: float) -> tuple[Any, dict[str, float]]:
    """Fine-tune a truncated model on the run's training split; returns (model, metrics)."""
    from lorita.train import finetune as lib_finetune

    tuned = lib_finetune(copy.deepcopy(model), ctx.splits, epochs=int(epochs), lr=float(lr))
    tuned.eval()
    return tuned, evaluate(tuned, ctx)
