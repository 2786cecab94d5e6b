"""LoRITa: low-rank induced training through composed linear layers.

Write each weight as a product of N factors, train with ordinary weight decay, merge the
factors back, and cut small singular values to get a model that is really smaller.

    import lorita as lt
    model = lt.overparameterize(net, n_factors=3)       # train it as usual, with weight decay
    small = lt.truncate(model, lt.Energy(0.99))         # merged, low-rank, cheaper
    lt.count_cost(small, x), lt.save(small, "small.safetensors")
"""

import importlib
import importlib.util
from typing import TYPE_CHECKING

from . import _startup  # first: Ctrl-C while `python -m lorita` imports the rest ends quietly

# The public names, by the module each comes from. They are imported on first use (PEP 562):
# ``import lorita`` loads no torch, so ``lorita --help`` answers at once; ``lt.truncate``,
# ``from lorita import truncate`` and ``lorita.functional`` work as before.
_EXPORTS = {
    "compress": ("Compressor", "CompressResult"),
    "convert": (
        "composed_layers",
        "composition_summary",
        "deploy_model",
        "fold_batchnorm",
        "iter_layers",
        "merge_model",
        "overparameterize",
    ),
    "cost": (
        "Cost",
        "count_cost",
        "latency_profile",
        "layer_latency",
        "measure_latency",
        "paired_latency",
    ),
    "data": ("DatasetUnavailable", "Splits", "list_datasets", "load_dataset"),
    "engine": ("TrainConfig", "build_model", "evaluate", "finetune", "load_splits", "train"),
    "export": ("export_onnx", "load", "load_bytes", "read_spec", "save", "save_bytes"),
    "layers": (
        "FactorConv2d",
        "FactorLinear",
        "FactorMultiheadAttention",
        "LowRankConv2d",
        "LowRankLinear",
        "LowRankMultiheadAttention",
    ),
    "models": ("create_model", "default_skip", "list_models", "model_options"),
    "runs": ("Run", "RunStore"),
    "spectra": (
        "effective_rank",
        "energy_rank",
        "entropy_rank",
        "layer_spectra",
        "rank_summary",
        "stable_rank",
    ),
    "truncation": (
        "POLICIES",
        "Budget",
        "Energy",
        "FlopBudget",
        "Global",
        "Policy",
        "Ranks",
        "SVDCache",
        "Uniform",
        "iterative_search",
        "layer_svd",
        "list_policies",
        "make_policy",
        "parse_policy",
        "plan_ranks",
        "smallest_within",
        "tradeoff_curve",
        "truncate",
    ),
}
_ORIGIN = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str):
    """A public name (or one of the package's modules, ``lt.truncation``), imported now and
    kept: the next look-up is an ordinary attribute."""
    if name in _ORIGIN:
        value = getattr(importlib.import_module(f".{_ORIGIN[name]}", __name__), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}"):
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def _import_all() -> None:
    """Import every public name now (``python -m lorita`` does so for a command, while
    :mod:`lorita._startup` still holds Ctrl-C)."""
    for name in __all__:
        if name not in globals():
            __getattr__(name)


if TYPE_CHECKING:  # what type checkers and editors see: the names as the lazy look-up gives them
    from . import functional
    from .compress import Compressor, CompressResult
    from .convert import (
        composed_layers,
        composition_summary,
        deploy_model,
        fold_batchnorm,
        iter_layers,
        merge_model,
        overparameterize,
    )
    from .cost import (
        Cost,
        count_cost,
        latency_profile,
        layer_latency,
        measure_latency,
        paired_latency,
    )
    from .data import DatasetUnavailable, Splits, list_datasets, load_dataset
    from .engine import TrainConfig, build_model, evaluate, finetune, load_splits, train
    from .export import export_onnx, load, load_bytes, read_spec, save, save_bytes
    from .layers import (
        FactorConv2d,
        FactorLinear,
        FactorMultiheadAttention,
        LowRankConv2d,
        LowRankLinear,
        LowRankMultiheadAttention,
    )
    from .models import create_model, default_skip, list_models, model_options
    from .runs import Run, RunStore
    from .spectra import (
        effective_rank,
        energy_rank,
        entropy_rank,
        layer_spectra,
        rank_summary,
        stable_rank,
    )
    from .truncation import (
        POLICIES,
        Budget,
        Energy,
        FlopBudget,
        Global,
        Policy,
        Ranks,
        SVDCache,
        Uniform,
        iterative_search,
        layer_svd,
        list_policies,
        make_policy,
        parse_policy,
        plan_ranks,
        smallest_within,
        tradeoff_curve,
        truncate,
    )

__version__ = "0.1.0"
_startup.release()

__all__ = [
    "functional",
    "FactorLinear",
    "FactorConv2d",
    "FactorMultiheadAttention",
    "LowRankLinear",
    "LowRankConv2d",
    "LowRankMultiheadAttention",
    "overparameterize",
    "merge_model",
    "composed_layers",
    "composition_summary",
    "deploy_model",
    "fold_batchnorm",
    "latency_profile",
    "paired_latency",
    "layer_latency",
    "iter_layers",
    "layer_spectra",
    "effective_rank",
    "stable_rank",
    "entropy_rank",
    "energy_rank",
    "rank_summary",
    "Uniform",
    "Global",
    "Energy",
    "Ranks",
    "Budget",
    "FlopBudget",
    "Policy",
    "POLICIES",
    "list_policies",
    "parse_policy",
    "Compressor",
    "CompressResult",
    "make_policy",
    "SVDCache",
    "layer_svd",
    "plan_ranks",
    "truncate",
    "tradeoff_curve",
    "smallest_within",
    "iterative_search",
    "Cost",
    "count_cost",
    "measure_latency",
    "save",
    "load",
    "save_bytes",
    "load_bytes",
    "read_spec",
    "export_onnx",
    "DatasetUnavailable",
    "Splits",
    "list_datasets",
    "load_dataset",
    "create_model",
    "default_skip",
    "list_models",
    "model_options",
    "Run",
    "RunStore",
    "train",
    "TrainConfig",
    "build_model",
    "evaluate",
    "finetune",
    "load_splits",
]
