"""Save and load models as safetensors with a JSON spec in the file's metadata (no pickle), and
export to ONNX.

The spec says how to rebuild the module tree: either a registry model
(``{"registry": name, "kwargs": {...}}``, from ``model.lorita_arch``) or a tree of plain
``torch.nn`` modules; then which layers are composed or low-rank (``layers``). Loading builds
that model and loads the weights with ``strict=True``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load as st_load_bytes
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save as st_save_bytes
from torch import Tensor, nn

from .convert import composed_layers, iter_layers, merge_model, set_module
from .io import atomic_write_bytes
from .io import temp_beside as _temp_beside
from .layers import FactorConv2d, FactorLinear, LowRankConv2d, LowRankLinear

__all__ = [
    "save",
    "load",
    "save_bytes",
    "load_bytes",
    "read_spec",
    "model_spec",
    "export_onnx",
    "atomic_write_bytes",
]

FORMAT = "lorita"
VERSION = 1
_SPEC_KEY = "lorita_spec"


def _kw_linear(m):
    return {
        "in_features": m.in_features,
        "out_features": m.out_features,
        "bias": m.bias is not None,
    }


def _kw_conv(m):
    return {
        "in_channels": m.in_channels,
        "out_channels": m.out_channels,
        "kernel_size": list(m.kernel_size),
        "stride": list(m.stride),
        "padding": m.padding if isinstance(m.padding, str) else list(m.padding),
        "dilation": list(m.dilation),
        "groups": getattr(m, "groups", 1),
        "bias": m.bias is not None,
        "padding_mode": m.padding_mode,
    }


def _kw_bn(m):
    return {
        "num_features": m.num_features,
        "eps": m.eps,
        "momentum": m.momentum,
        "affine": m.affine,
        "track_running_stats": m.track_running_stats,
    }


def _pool(m):
    return {"kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding}


# Plain modules a spec may name, and how to read their constructor arguments.
_PLAIN = {
    "Linear": (nn.Linear, _kw_linear),
    "Conv2d": (nn.Conv2d, _kw_conv),
    "BatchNorm1d": (nn.BatchNorm1d, _kw_bn),
    "BatchNorm2d": (nn.BatchNorm2d, _kw_bn),
    "LayerNorm": (
        nn.LayerNorm,
        lambda m: {
            "normalized_shape": list(m.normalized_shape),
            "eps": m.eps,
            "elementwise_affine": m.elementwise_affine,
            "bias": getattr(m, "bias", None) is not None,
        },
    ),
    "ReLU": (nn.ReLU, lambda m: {}),
    "GELU": (nn.GELU, lambda m: {"approximate": m.approximate}),
    "SiLU": (nn.SiLU, lambda m: {}),
    "Tanh": (nn.Tanh, lambda m: {}),
    "Sigmoid": (nn.Sigmoid, lambda m: {}),
    "LeakyReLU": (nn.LeakyReLU, lambda m: {"negative_slope": m.negative_slope}),
    "Identity": (nn.Identity, lambda m: {}),
    "Flatten": (nn.Flatten, lambda m: {"start_dim": m.start_dim, "end_dim": m.end_dim}),
    "Dropout": (nn.Dropout, lambda m: {"p": m.p}),
    "MaxPool2d": (nn.MaxPool2d, _pool),
    "AvgPool2d": (nn.AvgPool2d, _pool),
    "AdaptiveAvgPool2d": (nn.AdaptiveAvgPool2d, lambda m: {"output_size": m.output_size}),
}
# The plain layer each LoRITa layer stands for in a module tree.
_AS_PLAIN = {
    FactorLinear: "Linear",
    LowRankLinear: "Linear",
    FactorConv2d: "Conv2d",
    LowRankConv2d: "Conv2d",
}


def _tree(module: nn.Module, path: str) -> dict:
    kind = _AS_PLAIN.get(type(module))
    if kind is not None:
        kw = _kw_linear(module) if kind == "Linear" else _kw_conv(module)
        return {"type": kind, "kwargs": kw}
    if type(module) is nn.Sequential:
        return {
            "type": "Sequential",
            "children": [
                [n, _tree(c, f"{path}.{n}" if path else n)] for n, c in module.named_children()
            ],
        }
    name = type(module).__name__
    if name in _PLAIN and type(module) is _PLAIN[name][0]:
        return {"type": name, "kwargs": _PLAIN[name][1](module)}
    where = f" at {path!r}" if path else ""
    raise ValueError(
        f"model: cannot describe {type(module).__name__}{where} for saving; save supports models "
        f"from lorita.create_model (they carry .lorita_arch) and nn.Sequential trees of "
        f"{', '.join(_PLAIN)}"
    )


def _build_tree(node: dict) -> nn.Module:
    kind = node.get("type")
    if kind == "Sequential":
        seq = nn.Sequential()
        for name, child in node["children"]:
            seq.add_module(name, _build_tree(child))
        return seq
    if kind not in _PLAIN:
        raise ValueError(f"spec: unknown module type {kind!r}")
    kw = dict(node.get("kwargs", {}))
    if kind == "LayerNorm" and not kw.get("bias", True) and not kw.get("elementwise_affine", True):
        kw.pop("bias")
    return _PLAIN[kind][0](**{k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()})


def model_spec(model: nn.Module, *, input_shape=None, metadata: dict | None = None) -> dict:
    """The JSON spec that :func:`save` stores: architecture, per-layer kinds, ranks, N."""
    arch = getattr(model, "lorita_arch", None)
    if arch is not None:
        arch = {"registry": arch["name"], "kwargs": arch.get("kwargs", {})}
    else:
        arch = {"tree": _tree(model, "")}
    layers = {n: m.layer_spec() for n, m in iter_layers(model) if hasattr(m, "layer_spec")}
    n_factors = max([s.get("n_factors", 1) for s in layers.values()] or [1])
    spec = {
        "format": FORMAT,
        "version": VERSION,
        "arch": arch,
        "layers": layers,
        "n_factors": n_factors,
        "ranks": getattr(model, "lorita_ranks", None),
        "input_shape": list(input_shape) if input_shape is not None else None,
        "metadata": metadata or {},
    }
    json.dumps(spec)  # fail here, not in the file, if anything is not JSON
    return spec


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def save_bytes(model: nn.Module, *, input_shape=None, metadata: dict | None = None) -> bytes:
    """The bytes of a safetensors file holding ``model`` (see :func:`save`)."""
    spec = model_spec(model, input_shape=input_shape, metadata=metadata)
    return st_save_bytes(_state(model), metadata={_SPEC_KEY: json.dumps(spec)})


def save(
    model: nn.Module, path: str | os.PathLike, *, input_shape=None, metadata: dict | None = None
) -> Path:
    """Save ``model`` as safetensors with its spec; written atomically. Returns the path.

    ``metadata``: any JSON-able dict kept in the spec (e.g. accuracy, the training config).
    """
    atomic_write_bytes(path, save_bytes(model, input_shape=input_shape, metadata=metadata))
    return Path(path)


def _parse_spec(raw: dict | None, where: str) -> dict:
    if not raw or _SPEC_KEY not in raw:
        raise ValueError(f"{where}: not a LoRITa model file (no {_SPEC_KEY!r} metadata)")
    try:
        spec = json.loads(raw[_SPEC_KEY])
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: the model spec is not valid JSON ({e})") from None
    if spec.get("format") != FORMAT or spec.get("version") != VERSION:
        raise ValueError(
            f"{where}: unsupported spec format {spec.get('format')!r} "
            f"version {spec.get('version')!r}; expected {FORMAT!r} {VERSION}"
        )
    return spec


def read_spec(path: str | os.PathLike) -> dict:
    """The spec stored in a file written by :func:`save`, without building the model."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"path: no such file {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata()
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"path: {str(path)!r} is not a readable safetensors file ({e})") from None
    return _parse_spec(raw, f"path {str(path)!r}")


def _empty_low_rank(plain: nn.Module, rank: int) -> nn.Module:
    """A low-rank layer shaped like ``plain`` (no SVD: the weights are loaded afterwards)."""
    if isinstance(plain, nn.Linear):
        return LowRankLinear(
            plain.in_features, plain.out_features, rank, bias=plain.bias is not None
        )
    return LowRankConv2d(
        plain.in_channels,
        plain.out_channels,
        plain.kernel_size,
        rank,
        plain.stride,
        plain.padding,
        plain.dilation,
        plain.bias is not None,
        plain.padding_mode,
    )


def _build(spec: dict) -> nn.Module:
    arch = spec["arch"]
    if "registry" in arch:
        from .models import create_model  # the registry lives with the training engine

        model = create_model(arch["registry"], **arch.get("kwargs", {}))
    elif "tree" in arch:
        model = _build_tree(arch["tree"])
    else:
        raise ValueError("spec: 'arch' names neither a registry model nor a module tree")
    layers = dict(iter_layers(model))
    for name, ls in spec.get("layers", {}).items():
        if name not in layers:
            raise ValueError(f"spec: layer {name!r} is not in the rebuilt model")
        plain = layers[name]
        kind = ls.get("kind")
        if kind == "factor":
            if isinstance(plain, nn.Linear):
                new = FactorLinear.from_linear(
                    plain,
                    ls["n_factors"],
                    init="independent",
                    inner=ls.get("inner"),
                    order=ls.get("order", "auto"),
                )
            else:
                new = FactorConv2d.from_conv(
                    plain,
                    ls["n_factors"],
                    init="independent",
                    inner=ls.get("inner"),
                    order=ls.get("order", "auto"),
                )
        elif kind == "low_rank":
            new = _empty_low_rank(plain, ls["rank"])  # weights come from the file
        else:
            raise ValueError(f"spec: layer {name!r} has unknown kind {kind!r}")
        set_module(model, name, new)
    if spec.get("ranks"):
        model.lorita_ranks = spec["ranks"]
    model.lorita_spec = spec
    return model


def _finish(spec: dict, tensors: dict[str, Tensor], where: str) -> nn.Module:
    model = _build(spec)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{where}: weights do not match the stored architecture ({e})") from None
    return model.eval()


def load(path: str | os.PathLike) -> nn.Module:
    """Rebuild the model saved by :func:`save` (eval mode, CPU). No pickle is involved."""
    spec = read_spec(path)
    return _finish(spec, st_load_file(str(path)), f"path {str(path)!r}")


def load_bytes(data: bytes) -> nn.Module:
    """Rebuild a model from the bytes of a file written by :func:`save` / :func:`save_bytes`."""
    try:
        tensors = st_load_bytes(data)
        header_len = int.from_bytes(data[:8], "little")
        raw = json.loads(data[8 : 8 + header_len]).get("__metadata__")
    except Exception as e:
        raise ValueError(f"data: not a readable safetensors file ({e})") from None
    return _finish(_parse_spec(raw, "data"), tensors, "data")


def export_onnx(
    model: nn.Module, example_input: Tensor, path: str | os.PathLike, *, opset: int = 18
) -> Path:
    """Export the deployable model (composed layers merged) to ONNX with a dynamic batch axis.

    Written atomically. The graph takes ``input`` and returns ``output``.
    """
    deploy = merge_model(model) if composed_layers(model) else model
    was_training = deploy.training
    deploy.eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(path, ".onnx")
    try:
        # torch.export specialises a batch of 1; trace with 2 so the batch axis stays dynamic
        x = example_input[:1].expand(2, *example_input.shape[1:]).contiguous()
        batch = torch.export.Dim("batch", min=1)
        torch.onnx.export(
            deploy,
            (x,),
            tmp,
            input_names=["input"],
            output_names=["output"],
            dynamic_shapes=({0: batch},),
            opset_version=opset,
            dynamo=True,
            external_data=False,  # one self-contained file
            verbose=False,
        )
        os.replace(tmp, path)
    finally:
        deploy.train(was_training)
        tmp.unlink(missing_ok=True)
    return path
