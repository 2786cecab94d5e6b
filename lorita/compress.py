"""The compress session: one model held in memory, ready to be cut again and again.

A :class:`Compressor` is built once per (run, checkpoint), or per (model, splits): it merges the
model, takes every layer's SVD once (:class:`~lorita.truncation.SVDCache`), holds the validation
and test splits in memory (normalised once), and measures the uncut model's cost and accuracy.
Then a policy is one :meth:`~Compressor.apply` (plan, cut from the cached SVD, count, evaluate),
a trade-off curve is :meth:`~Compressor.curve`, "the smallest model within X points" is
:meth:`~Compressor.smallest_within` (chosen on validation, reported on test) and
:meth:`~Compressor.finetune` trains a cut model a few epochs. The CLI's ``lorita compress`` and
the app's Compress page both use this class.

    cz = lt.Compressor(lt.RunStore("runs").get("digits-n3"))
    res = cz.apply(lt.Budget(10))             # the best model at 10% of the parameters
    res.val_acc, res.test_acc, res.plan["fc1"], res.to_dict()

By default the output layer (a classifier's head) is left out of every cut, as in the paper:
cutting it below its number of outputs merges classes; the plan says so.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import kinds
from .checks import check_flag, check_names, is_real
from .convert import iter_layers, merge_model
from .cost import Cost, count_cost
from .data import Splits, TensorDataset
from .engine import evaluate as _evaluate
from .engine import finetune as _finetune
from .engine.evaluate import as_device, check_batched
from .kinds import output_layer
from .layers import is_thin
from .truncation import (
    Budget,
    Policy,
    Ranks,
    SVDCache,
    as_policy,
    check_left_out,
    iterative_search,
    plan_ranks,
    policy_class,
    smallest_within,
    tradeoff_curve,
    truncate,
)

__all__ = ["Compressor", "CompressResult", "HeldSplits", "output_layer", "EVAL_BATCH"]

#: Batch size for evaluating the held splits (inference only, so large).
EVAL_BATCH = 2048
PURPOSES = ("select", "report")


def _materialize(dataset) -> TensorDataset:
    """The split as one normalised float tensor in memory: no per-call conversion."""
    x, y = dataset[torch.arange(len(dataset))]  # (N, C, H, W) float, normalised
    return TensorDataset(x.contiguous(), y)


class HeldSplits:
    """The validation and test splits held in memory, and a record of what each was used for.

    Selection (searching a cut, choosing a fine-tune epoch) may read only ``"val"``; ``"test"``
    is for reporting. ``uses`` counts ``(part, purpose)`` pairs, so a caller (or a test) can
    check that the test split never chose anything.
    """

    def __init__(self, splits, *, device: str | torch.device = "cpu") -> None:
        self.splits = splits
        self.device = as_device(device)
        for part in ("val", "test"):
            check_batched(getattr(splits, part), f"splits.{part}")
        self.parts = {"val": _materialize(splits.val), "test": _materialize(splits.test)}
        self.uses: Counter = Counter()

    def evaluate(self, model: nn.Module, part: str, purpose: str) -> dict[str, float]:
        """``{"acc", "loss"}`` of ``model`` on ``part`` ("val" or "test") for ``purpose``."""
        if part not in self.parts:
            raise ValueError(f"part: expected 'val' or 'test', got {part!r}")
        if purpose not in PURPOSES:
            raise ValueError(f"purpose: expected one of {PURPOSES}, got {purpose!r}")
        if purpose == "select" and part != "val":
            raise ValueError(f"part: selection reads only the validation split, got {part!r}")
        self.uses[(part, purpose)] += 1
        res = _evaluate(model, self.parts[part], batch_size=EVAL_BATCH, device=self.device)
        return {"acc": float(res["acc"]), "loss": float(res["loss"])}

    def metrics(
        self, model: nn.Module, parts: Sequence[str] = ("val", "test"), purpose: str = "report"
    ) -> dict[str, float]:
        """``{"val_acc", "val_loss", ...}`` over ``parts`` (one part's name alone will do)."""
        out = {}
        for part in (parts,) if isinstance(parts, str) else parts:
            res = self.evaluate(model, part, purpose)
            out[f"{part}_acc"], out[f"{part}_loss"] = res["acc"], res["loss"]
        return out

    def for_training(self):
        """The run's splits with validation held in memory and no test split: what fine-tuning
        gets, so it can choose its epoch on validation and cannot read test."""
        self.uses[("val", "select")] += 1
        return dataclasses.replace(self.splits, val=self.parts["val"], test=None)


@dataclass
class CompressResult:
    """One cut model, what was cut and what it costs and scores.

    ``plan`` maps every layer to ``{"rank", "full", "form", "cut", "note"}``; ``form`` is
    "low_rank" (two thin layers) or "dense". ``metrics`` holds ``val_acc``, ``val_loss``,
    ``test_acc``, ``test_loss`` (accuracy as a fraction). :meth:`to_dict` is JSON-able.
    """

    model: nn.Module
    policy: dict[str, Any]
    plan: dict[str, dict[str, Any]]
    params: int
    flops: int
    params_pct: float
    flops_pct: float
    metrics: dict[str, float]
    seconds: float = 0.0
    finetune_epochs: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ranks(self) -> dict[str, int]:
        return {n: p["rank"] for n, p in self.plan.items()}

    @property
    def val_acc(self) -> float | None:
        return self.metrics.get("val_acc")

    @property
    def test_acc(self) -> float | None:
        return self.metrics.get("test_acc")

    def to_dict(self) -> dict[str, Any]:
        """Everything but the model, as plain JSON types."""
        return {
            "policy": dict(self.policy),
            "plan": {n: dict(p) for n, p in self.plan.items()},
            "params": int(self.params),
            "flops": int(self.flops),
            "params_pct": float(self.params_pct),
            "flops_pct": float(self.flops_pct),
            **{k: float(v) for k, v in self.metrics.items()},
            "seconds": float(self.seconds),
            "finetune_epochs": int(self.finetune_epochs),
            **self.extra,
        }


def _open(source, splits, which: str):
    """(model, splits, run name, config, data note) from a Run, a run folder or a model; the
    note says why the run's validation and test results may not mean what they did (its folder
    changed since it trained), else None."""
    if isinstance(source, (str, os.PathLike)):
        from .runs import Run

        path = Path(source)
        if not (path / "config.json").is_file():
            raise ValueError(f"source: {str(source)!r} is not a run folder (no config.json)")
        source = Run(path)
    if splits is not None and not isinstance(splits, Splits):
        raise ValueError(
            f"splits: expected the train/val/test Splits (lorita.load_dataset('digits'), or "
            f"dataclasses.replace(splits, val=..., test=...) for data of your own), got "
            f"{type(splits).__name__}"
        )
    if isinstance(source, nn.Module):
        if splits is None:
            raise ValueError(
                "splits: a model needs its data splits, e.g. lorita.load_dataset('digits')"
            )
        return source, splits, None, {}, None
    if hasattr(source, "load_model") and hasattr(source, "load_splits"):
        model = source.load_model(which)
        note = source.data_changed() if splits is None and hasattr(source, "data_changed") else None
        return (
            model,
            splits if splits is not None else source.load_splits(),
            source.name,
            dict(source.config or {}),
            note,
        )
    raise ValueError(
        f"source: expected a Run, a run folder or an nn.Module, got {type(source).__name__}"
    )


class Compressor:
    """A compress session over one model (see the module docstring).

    Args:
        source: a :class:`~lorita.runs.Run`, a run folder, or an ``nn.Module`` (plain, composed
            or truncated; it is merged).
        splits: the data splits (:func:`lorita.load_dataset`); default the run's own.
        which: the run's checkpoint, "best" or "last".
        device: where the model is cut and evaluated.
        keep_head: leave the output layer out of every cut (default, as in the paper).
        layers: the layer names to cut (overrides ``keep_head``); default every layer.
    """

    def __init__(
        self,
        source,
        splits=None,
        *,
        which: str = "best",
        device: str | torch.device = "cpu",
        keep_head: bool = True,
        layers: Iterable[str] | None = None,
    ) -> None:
        t0 = time.perf_counter()
        check_flag(keep_head, "keep_head")
        device = as_device(device)  # checked before the run is loaded
        model, splits, self.run, self.config, self.data_note = _open(source, splits, which)
        if self.data_note:
            warnings.warn(self.data_note, stacklevel=2)
        self.which = which
        self.device = device
        self.splits = splits
        #: how to feed this model (input shape, pixels, normalisation, classes), for exports
        self.preprocess = splits.preprocess() if hasattr(splits, "preprocess") else None
        self.data = HeldSplits(splits, device=self.device)
        self.example_input = splits.example_input(1).to(self.device)  # (1, C, H, W)
        merged = merge_model(model).eval().to(self.device)
        every = {n: min(kinds.matrices(m).shape[-2:]) for n, m in iter_layers(merged)}
        layers = check_names(layers, "layers")  # SVDCache names any unknown one
        self.svd = SVDCache(merged, layers, example_input=self.example_input, keep_head=keep_head)
        self.left_out = {
            n: "not among the layers chosen to cut" for n in every if n not in self.svd.svd
        }
        self.left_out.update(self.svd.left_out)
        self.model = self.svd.model
        self.full_ranks = every
        self.base_cost = self.svd.base_cost(self.example_input)
        self.base = {
            "params": self.base_cost.params,
            "flops": self.base_cost.flops,
            **self.data.metrics(self.model),
        }
        self.load_seconds = time.perf_counter() - t0

    # ----------------------------------------------------------------- facts

    @property
    def task(self) -> str:
        """ "classification", or "regression": then every ``acc`` here is R² (lorita.scores)."""
        return getattr(self.splits, "task", "classification")

    @property
    def layers(self) -> list[str]:
        """The layers policies cut (the output layer and other left-out layers excluded)."""
        return list(self.svd.spectra)

    @property
    def spectra(self) -> dict[str, list[float]]:
        """Each cut layer's singular values, descending (JSON-able)."""
        return {n: [float(v) for v in s] for n, s in self.svd.spectra.items()}

    def recipe(self, **overrides) -> dict[str, Any]:
        """The fine-tuning recipe: the run's optimizer, batch size and seed, a tenth of its
        learning rate, no weight decay; ``overrides`` (not None) replace any of them."""
        cfg = self.config
        recipe = {
            "lr": float(cfg.get("lr", 1e-2)) / 10,
            "optimizer": cfg.get("optimizer", "adam"),
            "batch_size": int(cfg.get("batch_size") or 128),
            "weight_decay": 0.0,
            "seed": int(cfg.get("seed", 0)),
        }
        unknown = sorted(set(overrides) - set(recipe))
        if unknown:
            raise ValueError(f"recipe: unknown field(s) {unknown}; allowed: {', '.join(recipe)}")
        recipe.update({k: v for k, v in overrides.items() if v is not None})
        return recipe

    # ----------------------------------------------------------------- results

    def measure(
        self,
        model: nn.Module,
        *,
        policy: dict[str, Any] | None = None,
        ranks: dict[str, int] | None = None,
        parts: Sequence[str] = ("val", "test"),
        seconds: float = 0.0,
        cost: Cost | None = None,
    ) -> CompressResult:
        """Cost and val/test metrics (for reporting) of any model built from this one
        (``cost``: the model's :class:`~lorita.cost.Cost` when already counted)."""
        cost = count_cost(model, self.example_input) if cost is None else cost
        return CompressResult(
            model=model,
            policy=dict(policy or {"policy": "none"}),
            plan=self._plan(model, ranks or getattr(model, "lorita_ranks", {}) or {}),
            params=cost.params,
            flops=cost.flops,
            params_pct=100.0 * cost.params / max(1, self.base_cost.params),
            flops_pct=100.0 * cost.flops / max(1, self.base_cost.flops),
            metrics=self.data.metrics(model, parts, "report"),
            seconds=seconds,
        )

    def _plan(self, model: nn.Module, ranks: dict[str, int]) -> dict[str, dict[str, Any]]:
        why = {n: p.get("why", "") for n, p in (getattr(model, "lorita_plan", None) or {}).items()}
        plan = {}
        for n, full in self.full_ranks.items():
            try:
                module = model.get_submodule(n)
            except AttributeError:  # a layer that a baseline (pruning) removed or renamed
                continue
            r = int(ranks.get(n, full))
            plan[n] = {
                "rank": r,
                "full": full,
                "form": "low_rank" if is_thin(module) else "dense",
                "cut": r < full,
                "note": self.left_out.get(n) or (why.get(n, "") if r < full else ""),
            }
        return plan

    def _check_policy(self, policy) -> Policy:
        policy = as_policy(policy)
        check_left_out(policy, self.left_out, self.model)
        return policy

    def ranks(self, policy: Policy) -> dict[str, int] | None:
        """The ranks :meth:`cut` keeps for ``policy``, planned from the spectra without
        cutting; None for a Budget (its cut is checked against the counted cost)."""
        policy = self._check_policy(policy)
        if isinstance(policy, Budget):
            return None
        return dict(plan_ranks(self.model, policy, svd=self.svd))

    def cut(self, policy: Policy, *, form: str = "low_rank") -> tuple[nn.Module, dict]:
        """The cut model and budget facts (empty unless ``policy`` is a Budget); no evaluation.

        A Budget is checked against the counted cost; should the count exceed the budget, the
        plan is redone with the budget shrunk by the overshoot (at most 5 times).
        """
        small, extra, _ = self._cut(policy, form)
        return small, extra

    def _cut(self, policy: Policy, form: str) -> tuple[nn.Module, dict, Cost]:
        policy = self._check_policy(policy)
        small = truncate(self.model, policy, form=form, svd=self.svd)
        cost = count_cost(small, self.example_input)
        if not isinstance(policy, Budget):
            return small, {}, cost
        target = policy.percent / 100.0 * getattr(self.base_cost, policy.measure)
        tries = policy
        for _ in range(5):
            got = getattr(cost, policy.measure)
            if got <= target or all(r == 1 for r in small.lorita_ranks.values()):
                break
            tries = dataclasses.replace(tries, percent=tries.percent * target / got * 0.999)
            small = truncate(self.model, tries, form=form, svd=self.svd)
            cost = count_cost(small, self.example_input)
        budget = {"measure": policy.measure, "percent": float(policy.percent)}
        budget.update(target=float(target), met=bool(getattr(cost, policy.measure) <= target))
        return small, {"budget": budget}, cost

    def apply(self, policy: Policy, *, form: str = "low_rank") -> CompressResult:
        """Plan, cut (from the cached SVD), count the cost and evaluate val and test."""
        t0 = time.perf_counter()
        policy = self._check_policy(policy)
        small, extra, cost = self._cut(policy, form)
        spec = policy.spec() if hasattr(policy, "spec") else {"policy": str(policy)}
        res = self.measure(small, policy={**spec, "form": form}, cost=cost)
        res.extra.update(extra)
        res.seconds = time.perf_counter() - t0
        return res

    def curve(
        self,
        policy: str | type[Policy],
        values: Sequence[float] | None = None,
        *,
        form: str = "low_rank",
        parts: Sequence[str] = ("val", "test"),
        progress: Callable[[int, int, dict], object] | None = None,
    ) -> list[dict[str, Any]]:
        """Accuracy and cost over ``policy``'s range (default its sweep), one flat JSON-able
        dict per value: ``policy, value, ranks, params, flops, params_pct, flops_pct`` and
        ``val_acc, val_loss, test_acc, test_loss`` (those of ``parts``).
        ``progress(done, total, point)`` is called after each point."""
        cls = policy_class(policy)
        parts = (parts,) if isinstance(parts, str) else tuple(parts)  # "val" alone will do
        purpose = "report" if "test" in parts else "select"
        step = None
        if progress is not None:

            def step(done, total, point):
                return progress(done, total, self._flat(cls, point))

        points = tradeoff_curve(
            self.model,
            cls,
            values,
            evaluate=lambda m: self.data.metrics(m, parts, purpose),
            example_input=self.example_input,
            form=form,
            svd=self.svd,
            progress=step,
        )
        return [self._flat(cls, p) for p in points]

    @staticmethod
    def _flat(cls, point: dict) -> dict[str, Any]:
        flat = {"policy": cls.name, **{k: v for k, v in point.items() if k != "metric"}}
        flat["ranks"] = {n: int(r) for n, r in point["ranks"].items()}
        flat.update(point["metric"])
        return flat

    def smallest_within(
        self,
        points: float,
        policy: str | type[Policy] = "global",
        *,
        values: Sequence[float] | None = None,
        refine: int = 4,
        form: str = "low_rank",
        step: float | None = None,
    ) -> CompressResult:
        """The fewest-parameter cut whose *validation* accuracy stays within ``points``
        percentage points of the uncut model's; test is evaluated once, on the choice.
        ``values``, ``refine`` and ``step``: as :func:`lorita.truncation.smallest_within`."""
        t0 = time.perf_counter()
        cls = policy_class(policy)
        found = smallest_within(
            self.model,
            cls,
            evaluate=lambda m: self.data.metrics(m, ("val",), "select"),
            max_drop=points,
            example_input=self.example_input,
            key="val_acc",
            values=values,
            refine=refine,
            form=form,
            svd=self.svd,
            step=step,
        )
        value = found["value"]
        spec = {"policy": cls.name, "value": value, "form": form}
        res = self.measure(found["model"], policy=spec, seconds=time.perf_counter() - t0)
        res.extra["search"] = {
            "search": cls.name,
            "max_drop": float(points),
            "value": value,
            "evaluations": len(found["curve"]),
        }
        return res

    def drop_ranks(self, points: float = 0.5, *, form: str = "low_rank") -> dict[str, int]:
        """Per cut layer, the smallest rank it can be cut to *alone* (every other layer uncut)
        while validation accuracy stays within ``points`` percentage points of the uncut
        model's: a compressibility measure read from the model's behaviour rather than from
        its spectrum. Found by bisection on validation (about log2(rank) cuts per layer)."""
        if not is_real(points) or not points >= 0:
            raise ValueError(f"points: expected a number >= 0, got {points!r}")
        floor = self.base["val_acc"] - points / 100.0 - 1e-12
        out = {}
        for name, s in self.svd.spectra.items():
            lo, hi = 0, len(s)  # rank lo fails (or is 0), rank hi holds
            while hi - lo > 1:
                mid = (lo + hi) // 2
                small = truncate(self.model, Ranks({name: mid}), form=form, svd=self.svd)
                if self.data.evaluate(small, "val", "select")["acc"] >= floor:
                    hi = mid
                else:
                    lo = mid
            out[name] = hi
        return out

    def iterative_search(
        self, points: float, *, step: float = 0.25, max_evals: int = 400, form: str = "low_rank"
    ) -> CompressResult:
        """The paper's layer-by-layer search within ``points`` of the validation accuracy."""
        t0 = time.perf_counter()
        found = iterative_search(
            self.model,
            evaluate=lambda m: self.data.metrics(m, ("val",), "select"),
            max_drop=points,
            example_input=self.example_input,
            key="val_acc",
            step=step,
            max_evals=max_evals,
            form=form,
            svd=self.svd,
        )
        spec = {"policy": "iterative", "form": form}
        res = self.measure(found["model"], policy=spec, seconds=time.perf_counter() - t0)
        res.extra["search"] = {
            "search": "iterative",
            "max_drop": float(points),
            "evaluations": found["evaluations"],
        }
        return res

    def finetune(
        self,
        result: CompressResult | nn.Module,
        epochs: int,
        *,
        callback: Callable[[dict], Any] | None = None,
        **recipe,
    ) -> CompressResult:
        """Train a cut model ``epochs`` more epochs with :meth:`recipe` (keyword overrides:
        lr, optimizer, batch_size, weight_decay, seed); the epoch kept is chosen on validation.
        Returns a new result (the plan and policy of ``result`` kept)."""
        t0 = time.perf_counter()
        model = result.model if isinstance(result, CompressResult) else result
        ranks = dict(getattr(model, "lorita_ranks", {}) or {})
        tuned = _finetune(
            model,
            self.data.for_training(),
            epochs=epochs,
            device=self.device,
            callback=callback,
            **self.recipe(**recipe),
        ).eval()
        tuned.to(self.device)
        tuned.lorita_ranks = ranks
        policy = result.policy if isinstance(result, CompressResult) else None
        res = self.measure(tuned, policy=policy, ranks=ranks)
        if isinstance(result, CompressResult):
            res.plan = {n: dict(p) for n, p in result.plan.items()}
            res.extra.update(result.extra)
        res.finetune_epochs = int(epochs)
        res.seconds = time.perf_counter() - t0
        return res
