"""Fixtures for the app tests: a run store seeded with two real, short digits runs."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from app_seed import N1, N3, R1, R3, TINY, TINY_REGRESSION  # noqa: E402


def _seed(root: Path, config: dict, names: tuple[str, str]) -> Path:
    """Train the N=3 run and its N=1 baseline of ``config`` into ``root`` (same seed, setup)."""
    from lorita.engine import train
    from lorita.runs import RunStore

    store = RunStore(root)
    for name, n in zip(names, (3, 1), strict=True):
        cfg = {**config, "n_factors": n}
        result = train(cfg, store.create(cfg, name=name))
        assert result["state"] == "completed", result
    return root


def _copy(seeded: Path, root: Path, monkeypatch) -> Path:
    """A private copy of a seeded store at ``root``, as $LORITA_RUNS."""
    shutil.copytree(seeded, root, ignore=shutil.ignore_patterns(".slots"))
    monkeypatch.setenv("LORITA_RUNS", str(root))
    return root


@pytest.fixture(scope="session")
def seeded_store(tmp_path_factory) -> Path:
    """A runs folder with a finished N=3 run and its N=1 baseline (same seed and setup)."""
    return _seed(tmp_path_factory.mktemp("runs-seeded"), TINY, (N3, N1))


@pytest.fixture(scope="session")
def seeded_regression(tmp_path_factory) -> Path:
    """A runs folder with a finished N=3 regression run (R² scores) and its N=1 baseline."""
    return _seed(tmp_path_factory.mktemp("runs-regression"), TINY_REGRESSION, (R3, R1))


@pytest.fixture
def regression_runs(seeded_regression, tmp_path, monkeypatch) -> Path:
    """A private copy of the seeded regression store as $LORITA_RUNS."""
    return _copy(seeded_regression, tmp_path / "runs-regression", monkeypatch)


@pytest.fixture
def runs_dir(seeded_store, tmp_path, monkeypatch) -> Path:
    """A private copy of the seeded store as $LORITA_RUNS (tests may delete runs in it)."""
    return _copy(seeded_store, tmp_path / "runs", monkeypatch)


def pytest_configure(config):
    os.environ.setdefault("STREAMLIT_BROWSER_GATHER_USAGE_STATS", "false")
