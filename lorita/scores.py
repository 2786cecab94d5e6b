"""How a run's score is named and written: accuracy for classification, R² for regression.

Every run is judged by one number per split, kept as ``acc`` in its metrics, results and
compress reports: the fraction of correct predictions for a classification task, the
coefficient of determination R² for a regression task (lowrank with ``task=regression``).
The command line and the app name and format it through :func:`score_of`, so a regression is
never shown as a percentage. A change of score is in *points*: percentage points of accuracy,
or hundredths of R² (``max_drop`` / ``smallest_within(points)`` read the same way).

Loads nothing heavy: the run store and the app's pages use it without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .checks import is_num

#: The tasks a dataset can pose.
TASKS = ("classification", "regression")


@dataclass(frozen=True)
class Score:
    """How one task's score is named and shown."""

    task: str
    name: str  # "accuracy" / "R²": in sentences ("validation accuracy")
    short: str  # "acc" / "R²": in table headers ("val acc")
    percent: bool  # shown as a percentage (accuracy) or as it is (R²)

    def text(self, x: Any, digits: int | None = None, *, missing: str = "-", sep: str = " ") -> str:
        """``x`` written for a reader: '93.12 %' (``sep`` before the sign) or '0.6417';
        ``missing`` for None or NaN."""
        if not is_num(x):
            return missing
        x = float(x)
        if self.percent:
            return f"{100.0 * x:.{2 if digits is None else digits}f}{sep}%"
        d = 4 if digits is None else digits + 2  # R²'s 4 places ~ accuracy's 2 in percent
        return f"{x if round(x, d) != 0 else 0.0:.{d}f}"  # never '-0.0000'

    def number(self, x: Any, digits: int | None = None) -> float | None:
        """``x`` as a table's number column holds it, the number :meth:`text` writes: accuracy
        in percent (93.12), R² as it is (0.6417); rounded to ``digits`` places of that number
        when given; None for None."""
        if x is None:
            return None
        v = 100.0 * float(x) if self.percent else float(x)
        return v if digits is None else round(v, digits)

    def change(self, after: Any, before: Any, digits: int = 2, *, unit: str = " points") -> str:
        """``after - before`` in points: '+1.23 points' (accuracy, ``unit`` after it) or
        '-0.0291' (R²)."""
        if not (is_num(after) and is_num(before)):
            return "-"
        d = float(after) - float(before)
        if self.percent:
            return f"{100.0 * d:+.{digits}f}{unit}"
        places = digits + 2
        return f"{d if round(d, places) != 0 else 0.0:+.{places}f}"

    def points(self, value: Any) -> float:
        """A score difference in points (percentage points, or hundredths of R²)."""
        return 100.0 * float(value)

    @property
    def point_words(self) -> str:
        """What one point is, for help texts."""
        return "percentage points" if self.percent else "hundredths of R² (0.01 each)"


_SCORES = {
    "classification": Score("classification", "accuracy", "acc", True),
    "regression": Score("regression", "R²", "R²", False),
}


def score_of(task: Any) -> Score:
    """The score of ``task`` (one of :data:`TASKS`; None or anything else: classification)."""
    return _SCORES.get(task if isinstance(task, str) else "", _SCORES["classification"])


def task_of_config(config: Any) -> str:
    """The task a run's configuration poses, read without loading its data: a dataset option
    ``task`` says it (the lowrank dataset's), else classification."""
    kwargs = config.get("dataset_kwargs") if isinstance(config, dict) else None
    task = kwargs.get("task") if isinstance(kwargs, dict) else None
    return task if task in TASKS else "classification"
