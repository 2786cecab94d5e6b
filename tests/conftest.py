"""Shared test settings: CPU by default (TORCH_DEVICE overrides), few threads, fixed seeds."""

import multiprocessing
import os
from pathlib import Path

import pytest
import torch

# `lorita train` in tests keeps no trade-off curves when a run completes (its --curves default,
# LORITA_CURVES): most tests check other things, and the sweep was a fifth of the time of the
# tests that train; the tests of the kept curves turn them on (the `curves_on` fixture). Set
# before any test starts a process, which inherits it (the app's training children too).
os.environ.setdefault("LORITA_CURVES", "0")

# The fork server of the tests that kill processes forked from it (test_faults,
# test_faults_writers_qa): a process has one, whose preload is what the last call before it
# started set, so it is set here once for them all. Each child then pays none of these
# imports (seconds each: with another module's shorter list the kill sweep took ten times as
# long in the whole suite as alone). torch._dynamo: the first optimizer imports it;
# lorita.curves / engine.preflight: what a completed run imports (`import lorita` alone
# imports none of these); streamlit: the app's code that children run.
multiprocessing.get_context("forkserver").set_forkserver_preload(
    [
        "torch",
        "torch._dynamo",
        "lorita",
        "lorita.cli",
        "lorita.data",
        "lorita.engine",
        "lorita.engine.preflight",
        "lorita.curves",
        "sklearn.datasets",
        "streamlit",
    ]
)

# Under pytest-xdist each worker gets one thread: the workers share the machine's cores.
torch.set_num_threads(
    1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads())
)


@pytest.fixture
def device() -> torch.device:
    return torch.device(os.environ.get("TORCH_DEVICE", "cpu"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One torch thread for the test (restored after): seeded runs then repeat bit for bit, as
    the app's server and lorita.curves.prepare compute (sums in another order would change
    the losses in their last digits). A module asks for it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def plain_process():
    """The test's process as a plain ``lorita`` process: no torchrun variables and no
    ``LORITA_RUNS`` (the suite may itself run under a launcher or with a runs folder set);
    restored after. A module asks for it with
    ``pytestmark = pytest.mark.usefixtures("plain_process")``."""
    names = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
             "MASTER_PORT", "LORITA_RUNS")  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        for name in names:
            mp.delenv(name, raising=False)
        yield


@pytest.fixture
def empty_runs(tmp_path, monkeypatch) -> Path:
    """An empty runs folder as $LORITA_RUNS (beside a test's own ``tmp_path / "runs"``)."""
    root = tmp_path / "empty-runs"
    root.mkdir()
    monkeypatch.setenv("LORITA_RUNS", str(root))
    return root


@pytest.fixture
def curves_on(monkeypatch):
    """`lorita train` keeps its trade-off curves when a run completes, as it does by default
    outside the tests (the suite turns that off: LORITA_CURVES above)."""
    monkeypatch.setenv("LORITA_CURVES", "1")
