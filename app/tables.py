"""Tables the pages show, built from the run store's summaries (pandas lives here, not in pages).

Also the Runs page's overlay data: each run's curves against its *own* steps.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

import pandas as pd

from app import live
from lorita.kinds import stages
from lorita.scores import TASKS, Score, score_of

RUN_COLUMNS = {
    "name": "run",
    "state": "state",
    "dataset": "dataset",
    "model": "model",
    "n_factors": "N",
    "init": "init",
    "plain_epochs": "plain epochs",
    "weight_decay": "weight decay",
    "lr": "lr",
    "epochs": "epochs",
    "seed": "seed",
    "best_val_acc": "best val acc",
    "test_acc": "test acc",
    "created": "created",
}


SCORE_KEYS = {"best_val_acc": "best val", "test_acc": "test"}  # a run's scores: column prefix


def runs_table(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One line per run: setup, state, scores and when it was created.

    Each task among the runs has its own score columns, named by its score
    (:func:`lorita.scores.score_of`): "best val acc" and "test acc" in percent for
    classification, "best val R²" and "test R²" as they are for regression; a run's scores are
    in its task's columns only. :func:`run_column_formats` gives their display formats.
    """
    keys = [k for k in RUN_COLUMNS if k not in SCORE_KEYS]
    df = pd.DataFrame([{k: r.get(k) for k in keys} for r in rows], columns=keys)
    df["created"] = [_when(t) for t in df["created"]]
    at = keys.index("created")
    for score in _scores(rows):
        for key, prefix in SCORE_KEYS.items():
            values = [
                score.number(r.get(key)) if score_of(r.get("task")) == score else None for r in rows
            ]
            df.insert(at, f"{prefix} {score.short}", pd.Series(values, dtype="float64"))
            at += 1
    return df.rename(columns=RUN_COLUMNS)


def run_column_formats(rows: Sequence[dict[str, Any]]) -> dict[str, str]:
    """The printf format of each score column of :func:`runs_table` (as its task's
    :meth:`lorita.scores.Score.text` writes a score with one digit: '93.1 %' or '0.642')."""
    return {
        f"{prefix} {score.short}": score_format(score)
        for score in _scores(rows)
        for prefix in SCORE_KEYS.values()
    }


def score_format(score: Score, digits: int = 1) -> str:
    """The printf format a table column shows ``score`` with: the column holds
    :meth:`lorita.scores.Score.number` values (accuracy in percent), written as ``score.text(x, digits)`` is."""
    return f"%.{digits}f %%" if score.percent else f"%.{digits + 2}f"


def _scores(rows: Sequence[dict[str, Any]]) -> list[Score]:
    """The scores of the tasks among ``rows`` (a row without a task: classification)."""
    tasks = {score_of(r.get("task")).task for r in rows}
    return [score_of(t) for t in TASKS if t in tasks]


def _when(t) -> str:
    """A creation time as local date and time; "" for none (a broken run folder has none,
    which the table's column holds as NaN beside the others' numbers)."""
    try:
        return dt.datetime.fromtimestamp(float(t)).strftime("%Y-%m-%d %H:%M:%S")
    except (TypeError, ValueError, OverflowError, OSError):
        return ""


def ranks_table(summaries: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Effective rank per layer at each run's last snapshot; one line per run.

    With many layers the columns are the stages (the largest rank in each stage).
    """
    rows = []
    for s in summaries:
        ranks = s.get("effective_ranks") or {}
        if len(ranks) > live.MAX_LAYERS_SHOWN:
            ranks = group_by_stage(ranks)
        rows.append({"run": s["name"], "N": s.get("n_factors"), **ranks})
    return pd.DataFrame(rows)


def group_by_stage(values: dict[str, int]) -> dict[str, int]:
    """{layer: rank} -> {stage: largest rank in it} (``layer2.0.conv1`` is in ``layer2``)."""
    out: dict[str, int] = {}
    stage_of = stages(values, live.MAX_LAYERS_SHOWN)
    for name, v in values.items():
        stage = stage_of[name]
        out[stage] = max(out.get(stage, 0), int(v))
    return out


def overlay(
    spectra: dict[str, list[dict[str, Any]]], layer: str
) -> tuple[dict[str, list[float]], dict[str, list[int]], dict[str, list[int]]]:
    """For each run (label -> spectra rows): the final spectrum of ``layer``, and its
    effective rank with the steps *that run* logged it at."""
    final: dict[str, list[float]] = {}
    steps: dict[str, list[int]] = {}
    ranks: dict[str, list[int]] = {}
    for label, all_rows in spectra.items():
        # a long run logs thousands of snapshots: an evenly thinned set draws the same curve
        rows = live.thin([r for r in all_rows if r.get("layers")], live.MAX_SNAPSHOTS)
        _, vals = live.layer_series(rows, layer)
        if vals:
            final[label] = vals[-1]
        r_steps, r = live.rank_series(rows)
        if layer in r:
            ranks[label] = r[layer]
            # a run's snapshots may skip the layer: keep the steps where it was logged
            steps[label] = [s for s, row in zip(r_steps, _with_layers(rows)) if layer in row]
    return final, steps, ranks


def _with_layers(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [row.get("layers") or {} for row in rows if row.get("layers")]


def rank_table(full: dict[str, int], start: dict[str, int], *, stage: str | None) -> pd.DataFrame:
    """The Compress page's editable rank table, for one stage (or every layer with None)."""
    stage_of = stages(full, live.MAX_LAYERS_SHOWN)
    names = [n for n in full if stage is None or stage_of[n] == stage]
    return pd.DataFrame(
        {
            "layer": names,
            "full rank": [full[n] for n in names],
            "rank": [int(start.get(n, full[n])) for n in names],
        }
    )


def read_rank_table(edited: pd.DataFrame) -> dict[str, int]:
    """{layer: rank} from the edited table; ValueError naming the first empty or bad cell."""
    out = {}
    for _, row in edited.iterrows():
        r = row["rank"]
        if pd.isna(r):
            raise ValueError(
                f"rank of {row['layer']}: empty; enter an integer from 1 to {row['full rank']}"
            )
        out[str(row["layer"])] = int(r)
    return out


def kept_table(ranks: dict[str, int], full: dict[str, int]) -> pd.DataFrame:
    """Ranks kept by a cut; grouped by stage (kept / full summed) when there are many layers."""
    if len(ranks) > live.MAX_LAYERS_SHOWN:
        kept: dict[str, list[int]] = {}
        stage_of = stages(ranks, live.MAX_LAYERS_SHOWN)
        for n, r in ranks.items():
            k = kept.setdefault(stage_of[n], [0, 0, 0])
            k[0] += int(r)
            k[1] += int(full.get(n, r))
            k[2] += 1
        return pd.DataFrame(
            {
                "stage": list(kept),
                "layers": [v[2] for v in kept.values()],
                "ranks kept": [v[0] for v in kept.values()],
                "of": [v[1] for v in kept.values()],
            }
        )
    return pd.DataFrame(
        {"layer": list(ranks), "rank": list(ranks.values()), "of": [full[n] for n in ranks]}
    )
