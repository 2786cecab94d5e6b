"""Singular values of every layer, computed off the training loop's critical path.

The loop copies each composed layer (cheap) and hands the copies to a one-worker
``concurrent.futures`` executor, which forms the merged matrices and takes their singular
values (PyTorch releases the GIL inside the SVD, so it runs on another core). Results come
back in submission order through :meth:`SpectraWorker.results`; the training thread writes
them.
"""

from __future__ import annotations

import copy
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

from ..convert import iter_layers
from ..spectra import module_spectrum

__all__ = ["SpectraWorker", "layer_singular_values"]


def layer_singular_values(layers: dict[str, nn.Module]) -> dict[str, torch.Tensor] | None:
    """Each layer's merged-weight singular values; None if any is not finite."""
    try:
        with torch.no_grad():
            return {n: module_spectrum(m) for n, m in layers.items()}
    except (RuntimeError, ValueError):  # e.g. a non-finite weight: nothing to show
        return None


class SpectraWorker:
    """At most ``depth`` snapshots in flight on one helper thread."""

    def __init__(self, depth: int = 2) -> None:
        self.depth = depth
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorita-spectra")
        self.pending: deque[tuple[int, int, Future]] = deque()

    def busy(self) -> bool:
        return sum(not f.done() for _, _, f in self.pending) >= self.depth

    def submit(self, model: nn.Module, step: int, epoch: int) -> None:
        """Copy the layers of ``model`` now; their spectra are computed in the background."""
        with torch.no_grad():
            layers = {n: copy.deepcopy(m) for n, m in iter_layers(model)}
        self.pending.append((step, epoch, self.pool.submit(layer_singular_values, layers)))

    def results(self, wait: bool = False) -> list[tuple[int, int, dict[str, torch.Tensor]]]:
        """Finished snapshots in order (all of them with ``wait``); failed ones are dropped."""
        out = []
        while self.pending and (wait or self.pending[0][2].done()):
            step, epoch, fut = self.pending.popleft()
            spec = fut.result()
            if spec is not None:
                out.append((step, epoch, spec))
        return out

    def close(self) -> None:
        self.pool.shutdown(wait=True)
