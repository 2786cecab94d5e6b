"""Save and load models as safetensors with a JSON spec in the file's metadata (no pickle), and
export to ONNX.

The spec says how to rebuild the module tree: a registry model (``{"registry": name,
"kwargs": {...}}``, from ``model.lorita_arch``: built-ins, ``torchvision:NAME``, ``timm:NAME``),
a tree of plain ``torch.nn`` modules, or, for any other model, only its class name (then
``load(path, model=fresh_instance)``); then which layers are composed or low-rank
(``layers``, by name, as :mod:`lorita.kinds` describes them), which read their weight
directly (``direct``) and which BatchNorms were folded into the layer before them (``folded``:
``{batchnorm: layer}``, see :func:`lorita.convert.fold_batchnorm`).

``load`` is a gate: the header and the spec are checked against a schema (types, allowed
module types and options, depth and size limits) and every tensor the rebuilt model declares
is checked against the shapes stored in the file, on the meta device, before anything is
allocated. Every refusal is a ``ValueError`` naming the field.
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import os
import re
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path

import torch
from safetensors.torch import load as st_load_bytes
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save as st_save_bytes
from torch import Tensor, nn

from . import inputs
from .checks import check_flag, check_module
from .clone import clone_model, unwrap
from .convert import (
    apply_folds,
    check_initialised,
    composed_layers,
    deploy_model,
    fold_batchnorm,
    iter_layers,
    merge_model,
)
from .io import atomic_write_bytes, cannot_write, clean
from .io import temp_beside as _temp_beside
from .kinds import ORDERS, kind_of, layer_table, like, set_module, unfuse_encoders
from .layers import MAX_FACTORS, is_thin

__all__ = [
    "save",
    "load",
    "save_bytes",
    "load_bytes",
    "read_spec",
    "model_spec",
    "export_onnx",
    "onnx_data_path",
    "atomic_write_bytes",
    "LIMITS",
]

FORMAT = "lorita"
VERSION = 1
_SPEC_KEY = "lorita_spec"

#: What a file may declare. Anything larger is refused before it is read further.
LIMITS = {
    "header_bytes": 16 * 1024 * 1024,
    "spec_bytes": 512 * 1024,
    "tensors": 100_000,
    "tree_nodes": 5_000,
    "name_chars": 512,
    "n_factors": MAX_FACTORS,
    "dim": 2**31 - 1,
}
#: The largest ``image_size`` a file may declare for a registry model.
MAX_IMAGE_SIZE = 4096
_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1,
}  # fmt: skip


# --------------------------------------------------------------------------- plain modules


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


def _kw_ln(m):
    return {
        "normalized_shape": list(m.normalized_shape),
        "eps": m.eps,
        "elementwise_affine": m.elementwise_affine,
        "bias": getattr(m, "bias", None) is not None,
    }


def _max_pool(m):
    return {
        "kernel_size": m.kernel_size,
        "stride": m.stride,
        "padding": m.padding,
        "dilation": m.dilation,
        "ceil_mode": m.ceil_mode,
    }


def _avg_pool(m):
    return {
        "kernel_size": m.kernel_size,
        "stride": m.stride,
        "padding": m.padding,
        "ceil_mode": m.ceil_mode,
        "count_include_pad": m.count_include_pad,
        "divisor_override": m.divisor_override,
    }


def _kw_gn(m):
    return {"num_groups": m.num_groups, "num_channels": m.num_channels, "eps": m.eps,
            "affine": m.affine}  # fmt: skip


def _none(m):
    return {}


# Plain modules a spec may name, and how to read their constructor arguments.
_PLAIN: dict[str, tuple[type[nn.Module], Callable]] = {
    "Linear": (nn.Linear, _kw_linear),
    "Conv2d": (nn.Conv2d, _kw_conv),
    "BatchNorm1d": (nn.BatchNorm1d, _kw_bn),
    "BatchNorm2d": (nn.BatchNorm2d, _kw_bn),
    "LayerNorm": (nn.LayerNorm, _kw_ln),
    "ReLU": (nn.ReLU, _none),
    "GELU": (nn.GELU, lambda m: {"approximate": m.approximate}),
    "SiLU": (nn.SiLU, _none),
    "Tanh": (nn.Tanh, _none),
    "Sigmoid": (nn.Sigmoid, _none),
    "LeakyReLU": (nn.LeakyReLU, lambda m: {"negative_slope": m.negative_slope}),
    "Identity": (nn.Identity, _none),
    "Flatten": (nn.Flatten, lambda m: {"start_dim": m.start_dim, "end_dim": m.end_dim}),
    "Dropout": (nn.Dropout, lambda m: {"p": m.p}),
    "Dropout2d": (nn.Dropout2d, lambda m: {"p": m.p}),
    "MaxPool2d": (nn.MaxPool2d, _max_pool),
    "AvgPool2d": (nn.AvgPool2d, _avg_pool),
    "AdaptiveAvgPool2d": (nn.AdaptiveAvgPool2d, lambda m: {"output_size": m.output_size}),
    "AdaptiveMaxPool2d": (nn.AdaptiveMaxPool2d, lambda m: {"output_size": m.output_size}),
    "GroupNorm": (nn.GroupNorm, _kw_gn),
    "ReLU6": (nn.ReLU6, _none),
    "ELU": (nn.ELU, lambda m: {"alpha": m.alpha}),
    "Hardswish": (nn.Hardswish, _none),
    "Hardsigmoid": (nn.Hardsigmoid, _none),
    "Mish": (nn.Mish, _none),
    "Softplus": (nn.Softplus, lambda m: {"beta": m.beta, "threshold": m.threshold}),
    "PReLU": (nn.PReLU, lambda m: {"num_parameters": m.num_parameters}),
    "Softmax": (nn.Softmax, lambda m: {"dim": m.dim}),
    "LogSoftmax": (nn.LogSoftmax, lambda m: {"dim": m.dim}),
}
# Option names each plain type may carry in a spec (all of them, no others).
_KWARGS = {
    "Linear": {"in_features", "out_features", "bias"},
    "Conv2d": {
        "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
        "bias", "padding_mode",
    },
    "BatchNorm1d": {"num_features", "eps", "momentum", "affine", "track_running_stats"},
    "BatchNorm2d": {"num_features", "eps", "momentum", "affine", "track_running_stats"},
    "LayerNorm": {"normalized_shape", "eps", "elementwise_affine", "bias"},
    "GELU": {"approximate"},
    "LeakyReLU": {"negative_slope"},
    "Flatten": {"start_dim", "end_dim"},
    "Dropout": {"p"},
    "Dropout2d": {"p"},
    "MaxPool2d": {"kernel_size", "stride", "padding", "dilation", "ceil_mode"},
    "AvgPool2d": {
        "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override",
    },
    "AdaptiveAvgPool2d": {"output_size"},
    "AdaptiveMaxPool2d": {"output_size"},
    "GroupNorm": {"num_groups", "num_channels", "eps", "affine"},
    "ELU": {"alpha"},
    "Softplus": {"beta", "threshold"},
    "PReLU": {"num_parameters"},
    "Softmax": {"dim"},
    "LogSoftmax": {"dim"},
}  # fmt: skip


def _as_plain_type(module: nn.Module) -> str | None:
    """The plain type a LoRITa layer stands for in a module tree (None for other modules)."""
    kind = kind_of(module)
    if kind is None or type(module) in (nn.Linear, nn.Conv2d):
        return None
    return {"linear": "Linear", "conv": "Conv2d", "grouped_conv": "Conv2d"}.get(kind.name)


#: the child names a module tree holds (what a file may add to a Sequential it builds)
_CHILD_NAME = re.compile(r"[A-Za-z0-9_]{1,64}")


def _not_plain(module: nn.Module, path: str, name: str) -> str | None:
    """Why a module of a type a tree may name is not what a tree would rebuild: a forward
    hook (which a file cannot hold, and which may change what it computes) or state kept under
    other names than the plain module's (an old-style weight_norm / spectral_norm hook or a
    pruning mask, whose weight a hook computes)."""
    who = f"its layer {path!r}" if path else "it"
    if type(module) is _PLAIN.get(name, (None,))[0]:  # (a LoRITa layer's is its layer spec)
        with torch.device("meta"):
            own = set(_construct(name, _PLAIN[name][1](module)).state_dict())
        held = set(module.state_dict())
        if held != own:
            extra = ", ".join(sorted(held - own)) or "not all of its tensors"
            return f"{who} is a {name} holding {extra}"[:200]
    if module._forward_hooks or module._forward_pre_hooks:
        return f"{who} is a {name} with a forward hook"[:200]
    return None


def _tree(module: nn.Module, path: str) -> dict | None:
    """The module tree of a Sequential model of plain modules (None when it is not one)."""
    plain = _as_plain_type(module)
    if plain is not None:
        if _not_plain(module, path, plain):
            return None
        return {"type": plain, "kwargs": _PLAIN[plain][1](module)}
    if type(module) is nn.Sequential:
        if _not_plain(module, path, "Sequential"):
            return None
        children = []
        for n, c in module.named_children():
            sub = _tree(c, f"{path}.{n}" if path else n) if _CHILD_NAME.fullmatch(n) else None
            if sub is None:
                return None
            children.append([n, sub])
        return {"type": "Sequential", "children": children}
    name = type(module).__name__
    if name in _PLAIN and type(module) is _PLAIN[name][0]:
        if getattr(module, "return_indices", False):
            return None  # a pool returning (values, indices): not a plain Sequential step
        if _not_plain(module, path, name):
            return None
        return {"type": name, "kwargs": _PLAIN[name][1](module)}
    return None


def _arch(model: nn.Module) -> dict:
    arch = getattr(model, "lorita_arch", None)
    if arch is not None:
        return {"registry": arch["name"], "kwargs": arch.get("kwargs", {})}
    repeated = _repeated(model) if type(model) is nn.Sequential else None
    tree = None if repeated else _tree(model, "")
    if tree is not None:
        return {"tree": tree}
    cls = type(model)
    arch = {"class": f"{cls.__module__}.{cls.__qualname__}"}
    blocker = repeated or (_undescribed(model, "") if cls is nn.Sequential else None)
    if blocker:
        arch["why"] = blocker
    return arch


def _repeated(model: nn.Module) -> str | None:
    """What a module tree cannot say: one module at two places (a reused ReLU or layer) or one
    Parameter held by two modules (tied weights)."""
    seen: dict[int, str] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if id(m) in seen:
            return f"it uses one module at {seen[id(m)]!r} and {name!r}"[:200]
        seen[id(m)] = name
    held: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in held:
            return f"its {held[id(p)]!r} and {name!r} are one Parameter (tied)"[:200]
        held[id(p)] = name
    return None


def _undescribed(module: nn.Module, path: str) -> str | None:
    """Which module keeps a Sequential tree from being described (for the load message)."""
    hooked = _not_plain(module, path, "Sequential")
    if hooked:
        return hooked
    for n, c in module.named_children():
        sub = f"{path}.{n}" if path else n
        if not _CHILD_NAME.fullmatch(n):
            return f"its layer name {sub!r} is not letters, digits and _"[:200]
        if _tree(c, sub) is None:
            deeper = _undescribed(c, sub) if type(c) is nn.Sequential else None
            plain = _as_plain_type(c) or type(c).__name__
            why = _not_plain(c, sub, plain) if plain in _PLAIN else None
            return deeper or why or f"its layer {sub!r} is a {type(c).__name__}"[:200]
    return None


# --------------------------------------------------------------------------- saving


def model_spec(model: nn.Module, *, input_shape=None, metadata: dict | None = None) -> dict:
    """The JSON spec that :func:`save` stores: architecture, per-layer kinds, ranks, N."""
    layers = {
        e.name: e.module.layer_spec() for e in layer_table(model) if hasattr(e.module, "layer_spec")
    }
    n_factors = max([s.get("n_factors", 1) for s in layers.values()] or [1])
    spec = {
        "format": FORMAT,
        "version": VERSION,
        "arch": _arch(model),
        "layers": layers,
        "direct": list(getattr(model, "lorita_direct", None) or []),
        "folded": dict(getattr(model, "lorita_folded", None) or {}),
        "n_factors": n_factors,
        "ranks": getattr(model, "lorita_ranks", None),
        "input_shape": _input_shape(input_shape),
        "metadata": metadata or {},
    }
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    if frozen:  # (listed only when there are some: other files stay as they were)
        spec["frozen"] = frozen
    if not isinstance(spec["metadata"], dict):
        raise ValueError(f"metadata: expected a dict, got {type(metadata).__name__}")
    spec["metadata"] = clean(spec["metadata"])  # NaN and inf are not JSON: null (unknown)
    try:
        json.dumps(spec)  # fail here, not in the file, if anything is not JSON
    except (TypeError, ValueError) as e:
        raise ValueError(f"metadata: must be JSON (numbers, strings, lists, dicts): {e}") from None
    return spec


def _input_shape(shape) -> list[int] | None:
    """``input_shape`` as the spec stores it: one example's shape (no batch axis)."""
    if shape is None:
        return None
    try:
        dims = [int(d) for d in shape if int(d) == d and not isinstance(d, (bool, str))]
        ok = len(dims) == len(shape) and 1 <= len(dims) <= 4
    except (TypeError, ValueError):
        ok = False
    if not ok or not all(1 <= d <= 1 << 16 for d in dims):
        raise ValueError(
            "input_shape: expected the shape of one example without the batch axis, 1 to 4 "
            f"integers in [1, 65536] (e.g. (3, 32, 32)), got {shape!r}"[:300]
        )
    return dims


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def _folded(model: nn.Module, input_shape, example_input) -> nn.Module:
    """A copy of ``model`` (eval mode) with its BatchNorms folded, traced on
    ``example_input``, else zeros of ``input_shape``, else a guessed input."""
    x = example_input
    if x is None and input_shape is not None:
        x = torch.zeros(2, *input_shape)
    deploy = merge_model(model) if composed_layers(model) else clone_model(model)
    return fold_batchnorm(deploy.eval(), x, inplace=True)


def _check_file_path(path) -> None:
    """A path a file can be written at (not a folder), else a ValueError naming ``path``."""
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise ValueError(f"path: expected a file name, got {path!r}")
    if Path(path).is_dir():
        raise ValueError(f"path: {str(path)!r} is a folder; give a file name in it")


def save_bytes(
    model: nn.Module,
    *,
    input_shape=None,
    metadata: dict | None = None,
    fold_bn: bool = False,
    example_input: inputs.Example | None = None,
) -> bytes:
    """The bytes of a safetensors file holding ``model`` (see :func:`save`)."""
    check_module(model)
    check_flag(fold_bn, "fold_bn")
    model = unwrap(model)
    check_initialised(model)
    if fold_bn:
        model = _folded(model, input_shape, example_input)
    spec = model_spec(model, input_shape=input_shape, metadata=metadata)
    return st_save_bytes(_state(model), metadata={_SPEC_KEY: json.dumps(spec)})


def save(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    input_shape=None,
    metadata: dict | None = None,
    fold_bn: bool = False,
    example_input: inputs.Example | None = None,
) -> Path:
    """Save any model as safetensors with its spec; written atomically. Returns the path.

    Registry and Sequential models rebuild from the file alone (``load(path)``); any other
    model rebuilds onto a fresh instance of its architecture (``load(path, model=...)``).
    ``input_shape``: one example's shape without the batch axis (``(3, 32, 32)``), kept in the
    spec. ``metadata``: any JSON-able dict kept in the spec (e.g. accuracy, the training config).
    ``fold_bn=True`` saves the model for inference: eval mode, every BatchNorm that can be
    folded into the layer before it folded (traced on ``example_input``, a tensor or a tuple
    for a model with several inputs, else on zeros of ``input_shape``, else on a guessed
    input), the folds recorded in the spec so both loads rebuild the same structure. Off by
    default: a saved model (a checkpoint) may be trained further, which needs its BatchNorms.

    What a load gets back: the structure (each layer's form, N, ranks), every parameter and
    persistent buffer, and which parameters were frozen (``requires_grad=False``, listed by
    name in the spec and frozen again). Not kept: the training mode (a model loads in eval
    mode), hooks, pruning or parametrizations as such (their tensors are saved under their
    own names: load onto an instance pruned alike) and anything held outside the state_dict.
    """
    _check_file_path(path)
    data = save_bytes(
        model,
        input_shape=input_shape,
        metadata=metadata,
        fold_bn=fold_bn,
        example_input=example_input,
    )
    atomic_write_bytes(path, data)
    return Path(path)


# --------------------------------------------------------------------------- the header gate


def _fail(field: str, msg: str) -> ValueError:
    return ValueError(f"{field}: {msg}")


class _RepeatedKey(ValueError):
    """A JSON object that names one key twice (JSON's parsers keep one of the two silently)."""


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _RepeatedKey(k)
            seen.add(k)
    return obj


def _loads(text: str, field: str):
    """Parse JSON; nesting deeper than Python's recursion limit is refused by the parser
    itself (in C, in microseconds), and the validators below bound the depth they walk. An
    object that repeats a key (two entries for one tensor, ``__metadata__`` twice) is refused,
    naming the key: readers that keep the first or the last of the two would disagree on what
    the file holds."""
    enabled = gc.isenabled()
    gc.disable()  # a hostile header of many small objects would otherwise trigger full GCs
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except _RepeatedKey as e:
        raise _fail(field, f"the key {str(e.args[0])[:80]!r} is given twice") from None
    except RecursionError:
        raise _fail(field, "nested too deep") from None
    except ValueError as e:
        raise _fail(field, f"not valid JSON ({str(e)[:80]})") from None
    finally:
        if enabled:
            gc.enable()


def foreign_format(head: bytes) -> str | None:
    """From a file's first bytes: "pickle" (torch.save, zip or plain pickle), "onnx" (an ONNX
    model: its ir_version field, then its producer), or None. A safetensors prelude (an 8-byte
    length, then a JSON object) is never foreign, whatever its length's bytes look like: a
    header of 1152 bytes starts with the same two bytes as a protocol-4 pickle."""
    if head[8:9] == b"{":
        return None
    if head[:4] == b"PK\x03\x04" or head[:2] in (b"\x80\x02", b"\x80\x04", b"\x80\x05"):
        return "pickle"
    if head[:1] == b"\x08" and any(w in head[:64].lower() for w in (b"pytorch", b"onnx")):
        return "onnx"
    return None


def _other_format(head: bytes) -> str:
    """What a file that is not safetensors looks like, from its first bytes ("" if unknown)."""
    return {
        "pickle": (
            "it looks like a torch.save / pickle file, which lorita never unpickles (save the "
            "model with lorita.save, or pass a state_dict as --init-from, read with "
            "weights_only=True)"
        ),
        "onnx": "it looks like an ONNX model (run it with onnxruntime)",
    }.get(foreign_format(head), "")


def _read_header_bytes(head: bytes, total: int, where: str) -> dict:
    """Parse the safetensors header (``head`` = its first bytes, ``total`` = file size)."""
    if total < 8 or len(head) < 8:
        raise _fail(where, "not a safetensors file (shorter than its 8-byte header length)")
    other = _other_format(head)
    if other:
        raise _fail(where, f"not a safetensors file: {other}")
    n = int.from_bytes(head[:8], "little")
    if n > LIMITS["header_bytes"] or n > total - 8:
        raise _fail(where, f"header length {n} exceeds the file or {LIMITS['header_bytes']} bytes")
    if len(head) < 8 + n:
        raise _fail(where, "truncated header")
    try:
        text = head[8 : 8 + n].decode("utf-8")
    except UnicodeDecodeError:
        raise _fail(where, "header is not UTF-8 text") from None
    header = _loads(text, f"{where} header")
    if not isinstance(header, dict):
        raise _fail(f"{where} header", f"expected a JSON object, got {type(header).__name__}")
    header["__data_bytes__"] = total - 8 - n  # what follows the header: the tensors' bytes
    return header


def _check_tensor_entry(name: str, entry, data_len: int) -> tuple[int, ...]:
    field = f"tensor {name[:80]!r}"
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise _fail(field, "expected {dtype, shape, data_offsets}")
    dtype, shape, offs = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in _DTYPE_BYTES:
        raise _fail(f"{field}.dtype", f"expected one of {', '.join(_DTYPE_BYTES)}, got {dtype!r}")
    if not isinstance(shape, list) or len(shape) > 8 or not all(_is_int(d, 0) for d in shape):
        raise _fail(f"{field}.shape", f"expected up to 8 integers >= 0, got {str(shape)[:80]}")
    if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o, 0) for o in offs)):
        raise _fail(f"{field}.data_offsets", "expected [begin, end]")
    numel = 1
    for d in shape:
        numel *= d
    if offs[1] > data_len:
        raise _fail(f"{field}.data_offsets", "lie outside the file (is it truncated?)")
    if offs[1] - offs[0] != numel * _DTYPE_BYTES[dtype]:
        raise _fail(f"{field}.data_offsets", "do not match its shape")
    return tuple(shape)


def _header_shapes(header: dict) -> dict[str, tuple[int, ...]]:
    names = [k for k in header if k not in ("__metadata__", "__data_bytes__")]
    if len(names) > LIMITS["tensors"]:
        raise _fail("header", f"{len(names)} tensors (at most {LIMITS['tensors']})")
    data_len = header["__data_bytes__"]
    shapes = {k: _check_tensor_entry(k, header[k], data_len) for k in names}
    _check_back_to_back(header, names, data_len)
    _check_metadata(header.get("__metadata__"))
    return shapes


def _check_back_to_back(header: dict, names: list[str], data_len: int) -> None:
    """The tensors' bytes follow one another in the order of their offsets and fill the data,
    as safetensors writes them and its reader demands: offsets that overlap (two tensors read
    from the same bytes), leave a gap or stop short are named here, before anything is built,
    and alike by :func:`read_spec` and :func:`load`."""
    end = 0
    for k in sorted(names, key=lambda k: header[k]["data_offsets"]):
        begin, stop = header[k]["data_offsets"]
        if begin != end:
            how = (
                "overlap the tensor before"
                if begin < end
                else "leave a gap after the tensor before"
            )
            raise _fail(
                f"tensor {k[:80]!r}.data_offsets", f"{how} (safetensors stores them back to back)"
            )
        end = stop
    if end != data_len:
        raise _fail("header", f"the tensors fill {end} bytes but {data_len} follow the header")


def _check_metadata(meta) -> None:
    """safetensors' ``__metadata__``: absent, null or an object of texts (what its reader takes)."""
    if meta is None:
        return
    if not isinstance(meta, dict):
        raise _fail(
            "header.__metadata__", f"expected an object of texts, got {type(meta).__name__}"
        )
    for k, v in meta.items():
        if not isinstance(v, str):
            raise _fail(f"header.__metadata__.{k[:40]}", f"expected text, got {type(v).__name__}")


def _spec_from_header(header: dict, where: str) -> dict:
    raw = header.get("__metadata__")
    if not isinstance(raw, dict) or _SPEC_KEY not in raw:
        raise _fail(where, f"not a LoRITa model file (no {_SPEC_KEY!r} metadata)")
    text = raw[_SPEC_KEY]
    if not isinstance(text, str) or len(text) > LIMITS["spec_bytes"]:
        raise _fail(f"{where} spec", f"expected JSON text of at most {LIMITS['spec_bytes']} bytes")
    spec = _loads(text, f"{where} spec")
    validate_spec(spec)
    return spec


# --------------------------------------------------------------------------- the spec schema


def _is_int(v, low: int = 1, high: int | None = None) -> bool:
    high = LIMITS["dim"] if high is None else high
    return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def _check_scalar(field: str, v) -> None:
    """An option value: a number, bool, short string, None or a short list of numbers."""
    if v is None or isinstance(v, (bool, str)) and len(str(v)) <= 64:
        return
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if not -LIMITS["dim"] <= v <= LIMITS["dim"]:
            raise _fail(field, f"out of range: {v!r}")
        return
    if isinstance(v, list) and len(v) <= 8:
        for i, x in enumerate(v):
            if isinstance(x, (list, dict)):
                raise _fail(f"{field}[{i}]", "expected a number")
            _check_scalar(f"{field}[{i}]", x)
        return
    raise _fail(field, f"expected a number, bool, short string or list, got {str(v)[:60]}")


def _check_kwargs(field: str, kw, allowed: set[str] | None) -> None:
    if not isinstance(kw, dict):
        raise _fail(field, f"expected an object, got {type(kw).__name__}")
    for k, v in kw.items():
        if allowed is not None and k not in allowed:
            raise _fail(
                f"{field}.{k}", f"not an option here; allowed: {', '.join(sorted(allowed))}"
            )
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", k):
            raise _fail(f"{field}.{k[:40]!r}", "not an option name")
        _check_scalar(f"{field}.{k}", v)


def _check_child(child, field: str, seen: set[str]) -> None:
    """A Sequential's child: ``[name, module]``, the name well-formed and not used before."""
    if not (isinstance(child, list) and len(child) == 2 and isinstance(child[0], str)):
        raise _fail(field, "expected [name, module]")
    if not _CHILD_NAME.fullmatch(child[0]):
        raise _fail(field, f"bad child name {child[0][:40]!r}")
    if child[0] in seen:
        raise _fail(field, f"duplicate child name {child[0]!r}")
    seen.add(child[0])


def _check_tree(node, field: str, budget: list[int], depth: int = 0) -> None:
    if depth > 32:
        raise _fail(field, "module tree nested deeper than 32 levels")
    budget[0] -= 1
    if budget[0] < 0:
        raise _fail(field, f"module tree has more than {LIMITS['tree_nodes']} nodes")
    if not isinstance(node, dict):
        raise _fail(field, f"expected an object, got {type(node).__name__}")
    kind = node.get("type")
    if kind == "Sequential":
        if set(node) != {"type", "children"} or not isinstance(node["children"], list):
            raise _fail(field, "a Sequential has exactly 'type' and 'children' (a list)")
        if len(node["children"]) > budget[0]:
            raise _fail(field, f"module tree has more than {LIMITS['tree_nodes']} nodes")
        seen: set[str] = set()
        for i, child in enumerate(node["children"]):
            f = f"{field}.children[{i}]"
            _check_child(child, f, seen)
            _check_tree(child[1], f, budget, depth + 1)
        return
    if kind not in _PLAIN:
        raise _fail(
            f"{field}.type",
            f"unknown module type {str(kind)[:40]!r}; allowed: Sequential, {', '.join(_PLAIN)}",
        )
    if not set(node) <= {"type", "kwargs"}:
        raise _fail(field, f"unexpected keys {sorted(set(node) - {'type', 'kwargs'})}")
    _check_kwargs(f"{field}.kwargs", node.get("kwargs", {}), _KWARGS.get(kind, set()))


def _check_arch(arch) -> None:
    if not isinstance(arch, dict) or len(arch) not in (1, 2):
        raise _fail("spec.arch", "expected {registry, kwargs}, {tree} or {class}")
    if "registry" in arch:
        if set(arch) - {"registry", "kwargs"} or not isinstance(arch["registry"], str):
            raise _fail("spec.arch.registry", "expected a model name and its kwargs")
        if len(arch["registry"]) > 128:
            raise _fail("spec.arch.registry", "name too long")
        _check_kwargs("spec.arch.kwargs", arch.get("kwargs", {}), None)
    elif "tree" in arch:
        _check_tree(arch["tree"], "spec.arch.tree", [LIMITS["tree_nodes"]])
    elif "class" in arch:
        if not isinstance(arch["class"], str) or len(arch["class"]) > 256:
            raise _fail("spec.arch.class", "expected a class name")
        why = arch.get("why", "")
        if set(arch) - {"class", "why"} or not isinstance(why, str) or len(why) > 256:
            raise _fail("spec.arch.why", "expected a short text")
    else:
        raise _fail("spec.arch", "names neither a registry model, a module tree nor a class")


def _check_layer_spec(field: str, ls) -> None:
    if not isinstance(ls, dict):
        raise _fail(field, f"expected an object, got {type(ls).__name__}")
    kind = ls.get("kind")
    if kind == "factor":
        if not set(ls) <= {"kind", "n_factors", "inner", "order"}:
            raise _fail(
                field,
                f"unexpected keys {sorted(set(ls) - {'kind', 'n_factors', 'inner', 'order'})}",
            )
        if not _is_int(ls.get("n_factors"), 1, LIMITS["n_factors"]):
            raise _fail(f"{field}.n_factors", f"expected an integer in [1, {LIMITS['n_factors']}]")
        if ls.get("inner") is not None and not _is_int(ls["inner"], 1, 1 << 20):
            raise _fail(f"{field}.inner", "expected None or an integer in [1, 2**20]")
        if ls.get("order", "auto") not in ORDERS:
            raise _fail(f"{field}.order", f"expected one of {', '.join(ORDERS)}")
    elif kind == "low_rank":
        if set(ls) != {"kind", "rank"} or not _is_int(ls["rank"], 1, 1 << 20):
            raise _fail(f"{field}.rank", "expected an integer in [1, 2**20]")
    elif kind == "unpacked":  # an attention with dense q, k, v that calls its (thin) out_proj
        if set(ls) != {"kind"}:
            raise _fail(field, f"unexpected keys {sorted(set(ls) - {'kind'})}")
    else:
        raise _fail(
            f"{field}.kind",
            f"expected 'factor', 'low_rank' or 'unpacked', got {str(kind)[:40]!r}",
        )


def _check_names(field: str, names, values: Callable | None = None) -> None:
    container = names if isinstance(names, (dict, list)) else None
    if container is None:
        raise _fail(field, f"expected a {'dict' if values else 'list'}, got {type(names).__name__}")
    if len(container) > LIMITS["tensors"]:
        raise _fail(field, "too many entries")
    for i, name in enumerate(container):
        if not isinstance(name, str) or not 0 < len(name) <= LIMITS["name_chars"]:
            raise _fail(f"{field}[{i}]", "expected a layer name (a short string)")
        if values is not None:
            values(f"{field}[{name[:80]!r}]", container[name])


_TOP = {
    "format", "version", "arch", "layers", "direct", "folded", "n_factors", "ranks",
    "input_shape", "metadata", "frozen",
}  # fmt: skip


def _check_layer_name(field: str, name) -> None:
    if not isinstance(name, str) or not 0 < len(name) <= LIMITS["name_chars"]:
        raise _fail(field, "expected a layer name (a short string)")


def _check_rank_value(field: str, r) -> None:
    if not _is_int(r, 1, 1 << 20):
        raise _fail(field, "expected an integer in [1, 2**20]")


def validate_spec(spec) -> None:
    """Check a spec against the schema (types, allowed keys, limits); ValueError naming the
    first field that does not fit."""
    if not isinstance(spec, dict):
        raise _fail("spec", f"expected a JSON object, got {type(spec).__name__}")
    if spec.get("format") != FORMAT or spec.get("version") != VERSION:
        raise _fail(
            "spec.format",
            f"unsupported spec format {str(spec.get('format'))[:40]!r} version "
            f"{str(spec.get('version'))[:20]!r}; expected {FORMAT!r} {VERSION}",
        )
    extra = set(spec) - _TOP
    if extra:
        raise _fail("spec", f"unexpected keys {sorted(str(k)[:40] for k in extra)[:5]}")
    _check_arch(spec.get("arch"))
    _check_names("spec.layers", spec.get("layers", {}), _check_layer_spec)
    _check_names("spec.direct", spec.get("direct", []))
    _check_names("spec.folded", spec.get("folded", {}), _check_layer_name)
    _check_names("spec.frozen", spec.get("frozen", []))
    if not _is_int(spec.get("n_factors", 1), 1, LIMITS["n_factors"]):
        raise _fail("spec.n_factors", f"expected an integer in [1, {LIMITS['n_factors']}]")
    if spec.get("ranks") is not None:
        _check_names("spec.ranks", spec["ranks"], _check_rank_value)
    shape = spec.get("input_shape")
    if shape is not None and not (
        isinstance(shape, list) and len(shape) <= 4 and all(_is_int(d, 1, 1 << 16) for d in shape)
    ):
        raise _fail("spec.input_shape", "expected null or up to 4 integers in [1, 65536]")
    if not isinstance(spec.get("metadata", {}), dict):
        raise _fail("spec.metadata", "expected an object")
    _check_depth("spec.metadata", spec.get("metadata", {}))


def _check_depth(field: str, value, limit: int = 32) -> None:
    """Lists and objects in ``value`` nested at most ``limit`` deep: the loaded model keeps
    the spec, and every copy of it (merge_model, truncate) copies it recursively, which a
    value nested hundreds deep would end in a RecursionError. Walked without recursion."""
    todo = [(value, 0)]
    while todo:
        v, depth = todo.pop()
        if isinstance(v, (dict, list)):
            if depth >= limit:
                raise _fail(field, f"nested deeper than {limit} levels")
            todo.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))


# --------------------------------------------------------------------------- building


class _GateError(ValueError):
    """A limit hit while building: never retried."""


@contextmanager
def _bounded_build(max_modules: int):
    """While building (on the meta device), refuse a model with more modules than the file
    could back (a depth of 10^6 stops after a few thousand modules, in milliseconds)."""
    owner = threading.get_ident()
    seen = {"modules": 0}

    from .models import probing

    def on_module(module, name, sub):
        if threading.get_ident() != owner or probing():  # a builder's probe of its defaults
            return
        seen["modules"] += 1
        if seen["modules"] > max_modules:
            raise _GateError(f"spec: declares more than {max_modules} modules for this file")

    from torch.nn.modules import module as M

    handles = [M.register_module_module_registration_hook(on_module)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _build_tree(node: dict, field: str = "spec.arch.tree") -> nn.Module:
    kind = node["type"]
    if kind == "Sequential":
        seq = nn.Sequential()
        for i, (name, child) in enumerate(node["children"]):
            seq.add_module(name, _build_tree(child, f"{field}.children[{i}]"))
        return seq
    try:
        return _construct(kind, node.get("kwargs", {}))
    except (ValueError, TypeError, RuntimeError) as e:  # options torch refuses together
        raise _fail(f"{field}.kwargs", f"a {kind} cannot be built so: {e}") from None


def _construct(kind: str, kwargs: dict) -> nn.Module:
    """The plain module a tree node names, built with its options."""
    kw = dict(kwargs)
    if kind == "LayerNorm" and not kw.get("bias", True) and not kw.get("elementwise_affine", True):
        kw.pop("bias")
    return _PLAIN[kind][0](**{k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()})


def _build_arch(arch: dict) -> nn.Module:
    if "registry" in arch:
        from .models import create_model

        return create_model(arch["registry"], **arch.get("kwargs", {}))
    if "tree" in arch:
        return _build_tree(arch["tree"])
    what = (
        f"a {arch['class']} ({arch['why']}, which a file cannot describe)"
        if arch.get("why")
        else f"a {arch['class']} (not a registry or Sequential model)"
    )
    raise _fail(
        "model", f"the file holds {what}: pass a freshly built instance, load(path, model=...)"
    )


def _apply_layers(model: nn.Module, spec: dict) -> nn.Module:
    """Give every layer the form the spec stores (composed / low-rank), weights empty."""
    table = {e.name: e for e in layer_table(model)}
    for name, ls in spec.get("layers", {}).items():
        if name not in table:
            raise _fail("model", f"layer {name!r} of the file is not in this model")
        e = table[name]
        if ls["kind"] == "low_rank" and ls["rank"] > e.kind.full_rank(e.module):
            raise _fail(f"spec.layers[{name!r}].rank", "exceeds the layer's full rank")
        set_module(model, name, like(e.module, e.kind.empty(e.module, ls)))
    unfuse_encoders(model)
    if spec.get("folded"):
        try:
            apply_folds(model, spec["folded"])
        except ValueError as e:
            raise _fail("spec", str(e)) from None
    if spec.get("ranks"):
        model.lorita_ranks = spec["ranks"]
    unknown = [n for n in spec.get("direct", []) if n not in table]
    if unknown:
        raise _fail("spec.direct", f"{unknown[0][:80]!r} is not a layer of this model")
    model.lorita_direct = tuple(spec.get("direct", []))
    model.lorita_spec = spec
    return model


def _first_mismatch(model: nn.Module, shapes: dict[str, tuple]) -> str | None:
    """The first tensor (in the model's order) whose name or shape the file does not match."""
    state = model.state_dict()
    for key, t in state.items():
        if key not in shapes:
            return f"{key!r} is missing from the file"
        if tuple(t.shape) != shapes[key]:
            return f"{key!r} has shape {tuple(shapes[key])} in the file, {tuple(t.shape)} here"
    extra = [k for k in shapes if k not in state]
    return f"{extra[0]!r} in the file is not in this model" if extra else None


def _layer_of(model: nn.Module, msg: str) -> str:
    """The layer (or module) a tensor named in ``msg`` belongs to."""
    key = msg.split("'")[1] if "'" in msg else msg
    owners = [e.name for e in layer_table(model) if key.startswith(e.name + ".")]
    return max(owners, key=len) if owners else key.rsplit(".", 1)[0]


def _check_against_file(model: nn.Module, shapes: dict[str, tuple], where: str) -> None:
    bad = _first_mismatch(model, shapes)
    if bad is not None:
        layer = _layer_of(model, bad)
        said = f"layer {layer!r} does not match the file: {bad}"
        raise _fail(where, said + _recomputed_hint(model, layer, shapes))


def _recomputed_hint(model: nn.Module, layer: str, shapes: dict[str, tuple]) -> str:
    """What to do when ``layer`` is pruned or reparametrized in ``model`` and not in the file
    (its tensors then have other names: ``weight_orig``, ``parametrizations.weight...``), or
    the other way round; "" when neither."""
    try:
        module = model.get_submodule(layer)
    except AttributeError:
        return ""
    calls = _undo_calls(module)
    if calls:
        return (
            "; it is pruned or reparametrized here, and the file holds its tensors as they "
            f"are: pass an instance without it, or undo it first ({'; '.join(calls)})"
        )
    theirs = [
        k
        for k in shapes
        if k.startswith(layer + ".") and re.search(r"_orig$|_mask$|\.parametrizations\.", k)
    ]
    if theirs:
        return (
            f"; the file holds it pruned or reparametrized ({theirs[0]!r}): pass an instance "
            "pruned or reparametrized alike, or save the model with that undone"
        )
    return ""


def _undo_calls(module: nn.Module) -> list[str]:
    """The calls that take off what recomputes ``module``'s tensors at every call (pruning,
    a parametrization, the old-style weight_norm / spectral_norm), as a user writes them."""
    from torch.nn.utils.prune import BasePruningMethod
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    calls = []
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, BasePruningMethod):
            calls.append(f"torch.nn.utils.prune.remove(module, {hook._tensor_name!r})")
        elif isinstance(hook, (WeightNorm, SpectralNorm)):
            what = "weight" if isinstance(hook, WeightNorm) else "spectral"
            calls.append(f"torch.nn.utils.remove_{what}_norm(module)")
    for tensor in getattr(module, "parametrizations", {}):
        calls.append(f"torch.nn.utils.parametrize.remove_parametrizations(module, {tensor!r})")
    return calls


def _check_options_backed(arch: dict, shapes: dict[str, tuple]) -> None:
    """A registry model's integer options (widths, depths, classes) must be backed by the file:
    none larger than its largest tensor dimension or its number of tensors (or 4096), and
    ``image_size`` at most :data:`MAX_IMAGE_SIZE` whatever the file holds."""
    backed = max([4096, len(shapes), *(d for s in shapes.values() for d in s)])
    for k, v in arch.get("kwargs", {}).items():
        limit = len(shapes) if "depth" in k or "layers" in k else backed  # a layer has a tensor
        if k == "image_size":  # a convolutional model's weights back no size: its example
            limit = MAX_IMAGE_SIZE  # input (zeros of C x size x size) is made from it
        for x in v if isinstance(v, list) else [v]:
            if isinstance(x, (int, float)) and not isinstance(x, bool) and abs(x) > limit:
                raise _fail(f"spec.arch.kwargs.{k}", f"{x!r} is larger than the file backs")


def _meta_build(spec: dict, shapes: dict[str, tuple], where: str) -> tuple[nn.Module, int]:
    """Build the declared model on the meta device (nothing allocated), bounded by what the
    file holds, and compare every tensor shape with the header. Returns the model and the
    number of values its plain (uncut) architecture holds."""
    if "registry" in spec["arch"]:
        _check_options_backed(spec["arch"], shapes)
    try:
        model, plain = _build_declared(spec, shapes, "meta")
    except _GateError:
        raise
    except Exception:  # a constructor that reads tensor data: built on the CPU instead
        if "registry" not in spec["arch"]:
            raise
        model, plain = _build_declared(spec, shapes, "cpu")
    _check_against_file(model, shapes, where)
    return model, plain


def _build_declared(spec: dict, shapes: dict, device: str) -> tuple[nn.Module, int]:
    with _bounded_build(4 * len(shapes) + 128), torch.device(device):
        try:
            model = _build_arch(spec["arch"])
            plain = sum(t.numel() for t in model.state_dict().values())
            return _apply_layers(model, spec), plain
        except ValueError:
            raise
        except Exception as e:  # a constructor refusing its options
            raise _fail(
                "spec.arch", f"cannot build it ({type(e).__name__}: {str(e)[:120]})"
            ) from None


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _finish(model: nn.Module, tensors: dict[str, Tensor], where: str, assign=False) -> nn.Module:
    # the module versions a state_dict carries (a file holds none): the model's own, which
    # layers that check them when loading (torchvision's MNASNet) require
    # assigned, the file's tensors become the model's own: copies, as no view of the file may
    # be (safetensors maps it into memory: a file then overwritten in place ends the process
    # with a bus error at the next forward; and a view's unaligned offsets round differently)
    state = OrderedDict((k, t.clone() if assign else t) for k, t in tensors.items())
    state._metadata = getattr(model.state_dict(), "_metadata", None)  # type: ignore[attr-defined]
    ties = _ties(model) if assign else []
    try:
        model.load_state_dict(state, strict=True, assign=assign)
    except RuntimeError as e:
        raise _fail(
            where, f"weights do not match the stored architecture ({str(e)[:300]})"
        ) from None
    for (owner, name), *others in ties:  # assigning gave each name a tensor of its own
        for mod, n in others:
            setattr(mod, n, getattr(owner, name))
    return model.eval()


def _ties(model: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    """The places (module, attribute) of each Parameter the model holds at more than one."""
    places: dict[int, list[tuple[nn.Module, str]]] = {}
    for mod in model.modules():
        for n, p in mod._parameters.items():
            if p is not None:
                places.setdefault(id(p), []).append((mod, n))
    return [g for g in places.values() if len(g) > 1]


def _on_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in [*model.parameters(), *model.buffers()])


def _rebuild(spec: dict, shapes: dict[str, tuple], where: str, read_tensors) -> nn.Module:
    """The model from the file: built on the meta device and given the file's tensors; only a
    model with non-persistent buffers is built for real, and only when the file backs it."""
    model, plain = _meta_build(spec, shapes, where)
    tensors = read_tensors()
    model = _finish(model, tensors, where, assign=True)
    if not _on_meta(model):
        return model
    held = sum(_numel(s) for s in shapes.values())
    if plain > 4 * held + (1 << 26):
        raise _fail("spec.arch", f"declares {plain} values where the file holds {held}")
    return _finish(_apply_layers(_build_arch(spec["arch"]), spec), tensors, where)


def _load(header: dict, where: str, read_tensors, model: nn.Module | None):
    shapes = _named_shapes(header, where)
    spec = _spec_from_header(header, where)
    if model is None:
        return _freeze(_rebuild(spec, shapes, where, read_tensors), spec)
    if not isinstance(model, nn.Module):
        raise _fail("model", f"expected an nn.Module, got {type(model).__name__}")
    model = unwrap(model)
    check_initialised(model, meta_ok=True)
    other_class = _check_plain(model, spec)
    try:
        skeleton = _skeleton(model)
        if skeleton is not None:  # checked on a copy first: a refusal leaves model as it was
            skeleton = _apply_layers(skeleton, spec)
            _check_against_file(skeleton, shapes, "model")
            _frozen_params(skeleton, spec)
        model = _apply_layers(model, spec)
        _check_against_file(model, shapes, "model")
        _frozen_params(model, spec)
    except ValueError as e:
        raise ValueError(f"{e} ({other_class})" if other_class else str(e)) from None
    if other_class:
        warnings.warn(f"model: {other_class}; it is loaded as its layers match", stacklevel=3)
    on_meta = _on_meta(model)  # built without memory: the file's tensors become its own
    model = _finish(model, read_tensors(), where, assign=on_meta)
    if on_meta and _on_meta(model):
        left = next(n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta)
        raise _fail(
            "model",
            f"built on the meta device, and {left!r} is not in the file (a buffer the model "
            "makes itself): build the model on the CPU",
        )
    return _freeze(model, spec)


def _frozen_params(model: nn.Module, spec: dict) -> list[nn.Parameter]:
    """The parameters the spec lists as frozen (``requires_grad=False`` when saved), each
    one of ``model``'s (else a ValueError naming it)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for i, name in enumerate(spec.get("frozen", [])):
        if name not in params:
            raise _fail(f"spec.frozen[{i}]", f"{name[:80]!r} is not a parameter of this model")
    return [params[n] for n in spec.get("frozen", [])]


def _freeze(model: nn.Module, spec: dict) -> nn.Module:
    """``model`` with the parameters saved frozen frozen again (the others as they are)."""
    for p in _frozen_params(model, spec):
        p.requires_grad_(False)
    return model


def _skeleton(model: nn.Module) -> nn.Module | None:
    """A copy of ``model`` whose parameters and buffers are on the meta device (nothing
    allocated); None for a model that cannot be copied."""
    memo: dict[int, object] = {}
    for t in [*model.parameters(), *model.buffers()]:
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
    for m in model.modules():  # a weight a hook computes (pruning): an attribute, on meta too
        for t in vars(m).values():
            if isinstance(t, Tensor) and id(t) not in memo:
                memo[id(t)] = torch.empty_like(t, device="meta")
    try:
        return copy.deepcopy(model, memo)
    except Exception:  # noqa: BLE001 (an attribute deepcopy refuses: the check runs once)
        return None


def _check_plain(model: nn.Module, spec: dict) -> str:
    """``load(path, model=...)`` takes the plain architecture the file was made from: refuse
    a model already composed or cut (naming the layer). Returns what to say when its class's
    name is not the one the file records (a warning once loaded; with the error if not)."""
    done = {**composed_layers(model), **{n: m for n, m in iter_layers(model) if is_thin(m)}}
    if done:
        name, layer = next(iter(done.items()))
        raise _fail(
            "model",
            f"layer {name!r} is already a {type(layer).__name__}; pass a freshly built "
            "instance of the plain architecture (the file gives it its form), or merge_model() "
            "this one",
        )
    recorded = spec.get("arch", {}).get("class")
    name = type(model).__qualname__  # (the module may differ: saved from a script, say)
    if recorded and not (recorded == name or recorded.endswith("." + name)):
        return f"the file was saved from a {recorded}, this is a {name}"
    return ""


def is_lorita_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a safetensors file carrying a LoRITa spec (written by :func:`save`);
    only its header is read, within the same limits as :func:`load`."""
    try:
        header, _, _ = _read_path_header(path)
    except ValueError:
        return False
    raw = header.get("__metadata__")
    return isinstance(raw, dict) and _SPEC_KEY in raw


def read_spec(path: str | os.PathLike) -> dict:
    """The spec stored in a file written by :func:`save`, validated, without building."""
    header, total, where = _read_path_header(path)
    _named_shapes(header, where)
    return _spec_from_header(header, where)


def read_header(path: str | os.PathLike) -> dict:
    """The header of safetensors file ``path`` parsed as :func:`load` parses it (its length
    within :data:`LIMITS`, its JSON, a key given twice refused), its entries not checked: every
    reader of a safetensors file in lorita parses it here first, so that none of them takes a
    file whose header names one tensor twice. ValueError naming the file."""
    return _read_path_header(path)[0]


def check_header(path: str | os.PathLike) -> None:
    """The checks :func:`load` makes of a safetensors file's header (its length, its JSON, each
    tensor's dtype, shape and offsets, the metadata's texts), for any safetensors file, with or
    without a LoRITa spec: a ValueError naming the file and the field."""
    header, _, where = _read_path_header(path)
    _named_shapes(header, where)


def _named_shapes(header: dict, where: str) -> dict[str, tuple[int, ...]]:
    """:func:`_header_shapes`, its errors naming the file (a checkpoint, an export, a start
    file...)."""
    try:
        return _header_shapes(header)
    except ValueError as e:
        raise _fail(where, str(e)) from None


def _read_path_header(path) -> tuple[dict, int, str]:
    if isinstance(path, nn.Module):
        raise _fail("path", "got a model; load a file into it with load(path, model=...)")
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise _fail("path", f"expected a file name, got {type(path).__name__}")
    path = Path(path)
    where = f"path {str(path)!r}"
    if path.is_dir():
        raise _fail("path", f"{str(path)!r} is a folder; give the file (.safetensors) in it")
    if not path.is_file():
        raise _fail("path", _not_a_file(path))
    try:
        total = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            f.seek(0)
            head = f.read(8 + min(n, LIMITS["header_bytes"]))
    except OSError as e:
        raise _fail("path", f"cannot read {str(path)!r} ({e.strerror})") from None
    return _read_header_bytes(head, total, where), total, where


def _not_a_file(path: Path) -> str:
    """Why ``path``, which is neither a folder nor a regular file, cannot be read."""
    try:
        path.stat()
    except FileNotFoundError:
        return f"no such file {str(path)!r}"
    except OSError as e:  # a symbolic link loop, no permission to look
        return f"cannot read {str(path)!r} ({e.strerror})"
    return f"{str(path)!r} is not a regular file (a pipe or a device); give a .safetensors file"


def load(path: str | os.PathLike, *, model: nn.Module | None = None) -> nn.Module:
    """Rebuild the model saved by :func:`save` (eval mode, CPU). No pickle is involved.

    Registry and Sequential models are rebuilt from the file. For any other model pass a
    freshly built instance of its architecture as ``model``: the stored structure (N, ranks,
    form per layer name) is applied to it (in place) and the weights loaded strictly; a layer
    that does not match is named in the error. Everything is checked before it is built.
    Parameters saved frozen are frozen again (see :func:`save` for what a file keeps).
    """
    header, total, where = _read_path_header(path)

    def read():
        try:
            return st_load_file(str(path))
        except Exception as e:  # safetensors' own error types
            raise _fail(where, f"not a readable safetensors file ({str(e)[:120]})") from None

    return _load(header, where, read, model)


def load_bytes(data: bytes, *, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a model from the bytes of a file written by :func:`save` / :func:`save_bytes`."""
    if not isinstance(data, (bytes, bytearray)):
        raise _fail("data", f"expected bytes, got {type(data).__name__}")
    header = _read_header_bytes(bytes(data[: 8 + LIMITS["header_bytes"]]), len(data), "data")

    def read():
        try:
            return st_load_bytes(bytes(data))
        except Exception as e:
            raise _fail("data", f"not a readable safetensors file ({str(e)[:120]})") from None

    return _load(header, "data", read, model)


# --------------------------------------------------------------------------- ONNX


def _runs_on(model: nn.Module, x: inputs.Example) -> bool:
    try:
        with torch.no_grad():
            inputs.call(model, x)
    except Exception:  # noqa: BLE001 - any refusal: it does not run on x either
        return False
    return True


@torch.no_grad()
def _check_batch_first(model: nn.Module, x: inputs.Example, out) -> None:
    """A ValueError when ``model`` returns one entry per sample (torchvision's detection models:
    a dict per image) rather than tensors whose first axis is the batch: the graph, traced on
    the 2 rows of ``x``, would refuse every other batch. ``out`` is ``model(x)``; a model whose
    every output has 2 rows is not run again."""
    from torch.utils._pytree import tree_leaves

    def count(o) -> int:
        return sum(isinstance(t, Tensor) for t in tree_leaves(o))

    if all(t.dim() and len(t) == 2 for t in tree_leaves(out) if isinstance(t, Tensor)):
        return
    try:
        one = count(inputs.call(model, inputs.rows(x, 1)))
    except Exception:  # noqa: BLE001 - a model that refuses 1 row: nothing to compare
        return
    if one != count(out):
        raise ValueError(
            f"model: it returns {count(out)} tensors for 2 samples and {one} for 1 (an entry "
            "per sample, as torchvision's detection models return a dict per image); an ONNX "
            "graph with a batch axis cannot hold that: export a module that returns batched "
            "tensors (a detector's backbone, say)"
        )


def onnx_input_names(x: inputs.Example) -> list[str]:
    """The graph's input names: ``input``, then ``input_1``, ``input_2``... for a model with
    several inputs; the argument names for keyword inputs (a dict)."""
    if isinstance(x, dict):
        return list(x)
    return ["input"] + [f"input_{i}" for i in range(1, len(inputs.as_args(x)))]


def onnx_output_names(out, taken: list[str] = ()) -> list[str]:
    """The graph's output names for what the model returns (``out``): ``output`` for one
    tensor; a dict's keys (nested ones joined by ``_``; a key that is a number, ``"0"``, as
    ``output_0``) for a dict, and a namedtuple's field names alike; ``output``, ``output_1``...
    for a tuple or list; only its tensors (a ``None`` in a dict is no output). Never one of
    the input names ``taken``."""
    from torch.utils._pytree import tree_flatten_with_path

    # what the graph outputs: the tensors (a None or a number the model returns is not one)
    leaves = [(p, v) for p, v in tree_flatten_with_path(out)[0] if isinstance(v, torch.Tensor)]
    # a dict's key (MappingKey.key) or a namedtuple's field (GetAttrKey.name) names its output
    keyed = any(hasattr(k, "key") or hasattr(k, "name") for path, _ in leaves for k in path)
    names: list[str] = []
    for i, (path, _) in enumerate(leaves):
        if keyed:
            name = "_".join(
                str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path
            )
            name = re.sub(r"\W", "_", name) or "output"
            if name.isdigit():  # a number is no name TorchScript takes (FPN's keys "0", "1")
                name = f"output_{name}"
        else:
            name = "output" if i == 0 else f"output_{i}"
        while name in names or name in taken:
            name = f"{name}_"
        names.append(name)
    return names


_ONNX_LOGS = threading.Lock()  # one ONNX export at a time while its logs are held off


@contextmanager
def _exporters_quiet():
    """Hold off what the exporters print on the terminal besides Python warnings, one export
    at a time (both are process-wide switches, given back afterwards):

    - torch's TorchScript exporter switches its C++ log on for every export (it tests the
      function ``_jit_is_onnx_log_enabled``, always true, instead of calling it): a model it
      cannot export prints its whole graph (hundreds of lines) before torch.export takes over;
      and it never switches it off again, so a ``torch.onnx.export`` called earlier in the
      process has left it on: it is off during ours, then as it was;
    - torch.export's graph optimiser (onnxscript) logs a warning per operator it leaves as it
      is ("Skipping constant folding for op Split"), printed when nothing handles it.
    """
    try:
        from torch.onnx._internal.torchscript_exporter import utils as exporter
    except ImportError:  # another torch: no such log to hold off
        exporter = None
    optimiser = logging.getLogger("onnxscript")
    is_on = getattr(torch._C, "_jit_is_onnx_log_enabled", None)
    switch = getattr(torch._C, "_jit_set_onnx_log_enabled", None)
    with _ONNX_LOGS:
        original = getattr(exporter, "setup_onnx_logging", None)
        if original is not None:
            exporter.setup_onnx_logging = lambda verbose: nullcontext()
        was_on = bool(is_on()) if is_on is not None and switch is not None else None
        if was_on:
            switch(False)
        level = optimiser.level
        optimiser.setLevel(max(level, logging.ERROR))
        try:
            yield
        finally:
            optimiser.setLevel(level)
            if was_on:
                switch(True)
            if original is not None:
                exporter.setup_onnx_logging = original


#: what each ONNX exporter needs beyond torch (optional: pyproject's extra "onnx")
ONNX_PACKAGES = {"torchscript": ("onnx",), "dynamo": ("onnx", "onnxscript")}


def check_onnx_packages(dynamo: bool = False) -> None:
    """ValueError naming what to install when ONNX export cannot run here: the TorchScript
    exporter needs ``onnx``, ``torch.export``'s (``dynamo``, and models over 2 GiB) also
    ``onnxscript``. Checked before any work, without importing them."""
    import importlib.util

    wanted = ONNX_PACKAGES["dynamo" if dynamo else "torchscript"]
    missing = [m for m in wanted if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(
            f"format onnx: ONNX export needs the optional package{'s' * (len(missing) > 1)} "
            f"{' and '.join(missing)} (pip install onnx onnxscript onnxruntime, all in "
            "requirements.txt)"
        )


def _onnx_torchscript(
    model: nn.Module, x: inputs.Example, path: Path, opset: int, outputs: list[str]
) -> None:
    names = onnx_input_names(x)
    axes = {name: {0: "batch"} for name in [*names, *outputs]}
    torch.onnx.export(
        model, inputs.as_args(x), path, kwargs=inputs.as_kwargs(x) or None, dynamic_axes=axes,
        dynamo=False, verbose=False, opset_version=opset, input_names=names,
        output_names=outputs,
    )  # fmt: skip


def _onnx_dynamo(
    model: nn.Module,
    x: inputs.Example,
    path: Path,
    opset: int,
    outputs: list[str],
    external: bool = False,
) -> None:
    check_onnx_packages(dynamo=True)  # also the fallback for what TorchScript cannot export
    batch = torch.export.Dim("batch", min=1)
    args, kwargs = inputs.as_args(x), inputs.as_kwargs(x)
    shapes = {k: {0: batch} for k in kwargs} if kwargs else tuple({0: batch} for _ in args)
    torch.onnx.export(
        model, args, path, kwargs=kwargs or None, dynamic_shapes=shapes, dynamo=True,
        external_data=external, verbose=False, opset_version=opset,
        input_names=onnx_input_names(x), output_names=outputs,
    )  # fmt: skip


# An ONNX file is one protobuf message, at most 2 GiB: a model whose tensors take more than
# this (the graph needs some room too) keeps them in one file beside it, ``NAME.onnx.data``.
ONNX_INLINE_BYTES = 2**31 - 2**27


def onnx_data_path(path: str | os.PathLike) -> Path:
    """Where :func:`export_onnx` puts the weights of a model too large for one ONNX file."""
    path = Path(path)
    return path.with_name(path.name + ".data")


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers (a tensor shared by two layers once)."""
    seen = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in seen.values())


def _onnx_metadata(path: Path, metadata: dict | None) -> None:
    """Write ``metadata`` into the ONNX file's ``metadata_props`` (a value that is not text as
    JSON; onnxruntime: ``session.get_modelmeta().custom_metadata_map``). Weights kept in a
    file beside it are not read."""
    if not metadata:
        return
    import onnx

    graph = onnx.load(str(path), load_external_data=False)
    for key, value in metadata.items():
        prop = graph.metadata_props.add()
        text = value if isinstance(value, str) else json.dumps(clean(value))  # (NaN: null)
        prop.key, prop.value = str(key), text
    onnx.save(graph, str(path))


def _onnx_external(
    model: nn.Module,
    x: inputs.Example,
    path: Path,
    opset: int,
    outputs: list[str],
    metadata: dict | None = None,
) -> None:
    """Export to ``path`` with the weights in :func:`onnx_data_path` (the graph names that
    file, so both are written under their final names in a private folder beside ``path``,
    then moved: the weights first, the graph that points at them last). An older graph of
    that name is removed before the weights move, so a process killed between the moves
    leaves no graph beside weights that are not its own."""
    import shutil

    # named as temp_beside names: a process killed meanwhile leaves a folder the next export
    # of this path removes (it holds the whole weights)
    work = _temp_beside(path, ".work")
    shutil.rmtree(work, ignore_errors=True)  # this thread's, from an export that failed
    work.mkdir()
    try:
        out = work / path.name
        _onnx_dynamo(model, x, out, opset, outputs, external=True)
        _onnx_metadata(out, metadata)
        for f in (onnx_data_path(out), out):
            _fsync_file(f)
        path.unlink(missing_ok=True)
        os.replace(onnx_data_path(out), onnx_data_path(path))
        os.replace(out, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _check_onnx_call(model, path, *, fold_bn, dynamo, metadata) -> None:
    """:func:`export_onnx`'s arguments, and the packages it needs, checked before any work."""
    check_module(model)
    check_flag(fold_bn, "fold_bn")
    check_onnx_packages(dynamo)
    check_initialised(unwrap(model))  # a meta model has no weights to write
    if metadata is not None and not isinstance(metadata, dict):
        raise ValueError(f"metadata: expected a dict or None, got {type(metadata).__name__}")
    _check_file_path(path)


def export_onnx(
    model: nn.Module,
    example_input: inputs.Example,
    path: str | os.PathLike,
    *,
    opset: int = 18,
    dynamo: bool = False,
    fold_bn: bool = True,
    metadata: dict | None = None,
) -> Path:
    """Export the deployable model (composed layers merged) to ONNX with a dynamic batch axis.

    Written atomically. A model whose weights take more than 2 GiB (the most one ONNX file
    holds) is written by ``torch.export`` with its weights in one file beside it,
    ``path`` + ``.data`` (:func:`onnx_data_path`; onnxruntime reads it from the same folder).
    The graph takes ``input`` (and ``input_1``... when ``example_input``
    is a tuple: a model with several inputs) and returns ``output`` (for a model returning
    several tensors: ``output``, ``output_1``..., or a dict's keys or a namedtuple's fields;
    :func:`onnx_output_names`). ``dynamo=False``
    (default) uses the TorchScript exporter, several times faster on CPU; ``dynamo=True`` uses
    ``torch.export``. ``fold_bn`` (default): BatchNorm folded into the layer before it, as
    :func:`lorita.convert.fold_batchnorm` does (an ONNX graph is for inference only).
    ``metadata``: written into the file's ``metadata_props``, each value that is not text as
    JSON (``lorita export`` writes ``preprocess``: how to feed the model).
    """
    _check_onnx_call(model, path, fold_bn=fold_bn, dynamo=dynamo, metadata=metadata)
    deploy = deploy_model(model, example_input, fold_bn=fold_bn, channels_last=False)
    _explicit_same_padding(deploy)
    _warn_cpu_runtime_dtype(deploy)
    was_training = deploy.training
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(path, ".onnx")
    # torch.export specialises a batch of 1; trace with 2 so the batch axis stays dynamic
    x = inputs.rows(inputs.check_example(example_input), 2)
    deploy.eval()
    try:
        with torch.no_grad(), inputs.refused():  # a clear error before the exporter's own
            out = inputs.call(deploy, x)
            outputs = onnx_output_names(out, onnx_input_names(x))
    except ValueError:
        if _runs_on(deploy, example_input):  # an input without a batch axis
            raise ValueError(
                f"example_input: the graph's first axis is the batch, and the model refuses "
                f"2 rows of this input ({inputs.shape_words(example_input)}): give it a batch "
                "axis (x[None]), or make the model accept one"
            ) from None
        raise
    _check_batch_first(deploy, x, out)
    external = tensor_bytes(deploy) > ONNX_INLINE_BYTES
    try:
        with warnings.catch_warnings(), _exporters_quiet():
            warnings.simplefilter("ignore")  # exporter chatter; failures still raise
            if external:
                _onnx_external(deploy, x, path, opset, outputs, metadata)
                return path
            if dynamo:
                _onnx_dynamo(deploy, x, tmp, opset, outputs)
            else:
                try:
                    _onnx_torchscript(deploy, x, tmp, opset, outputs)
                except (torch.onnx.errors.OnnxExporterError, TypeError, AssertionError):
                    # an operator the TorchScript exporter lacks (an adaptive pool whose
                    # output does not divide its input), or a forward with keyword-only
                    # arguments, which it passes positionally, or a BatchNorm without running
                    # statistics (its symbolic asserts a known batch size): torch.export
                    # handles them
                    tmp.unlink(missing_ok=True)
                    _onnx_dynamo(deploy, x, tmp, opset, outputs)
            _onnx_metadata(tmp, metadata)
        _fsync_file(tmp)
        os.replace(tmp, path)
        onnx_data_path(path).unlink(missing_ok=True)  # the weights of the file just replaced
    except OSError as e:  # disk full, read-only: name the file meant, not the temporary one
        raise cannot_write(path, e) from e
    finally:
        deploy.train(was_training)
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
    return path


def _warn_cpu_runtime_dtype(model: nn.Module) -> None:
    """The file keeps the model's dtype; onnxruntime's CPU provider runs no bfloat16 matrix
    product and no float64 convolution: say so before writing a file it cannot run."""
    dtypes = {p.dtype for p in model.parameters()}
    convs = any(isinstance(m, nn.Conv2d) for m in model.modules())
    if torch.bfloat16 in dtypes or (torch.float64 in dtypes and convs):
        kind = "bfloat16" if torch.bfloat16 in dtypes else "float64 convolution"
        warnings.warn(
            f"the ONNX file keeps the model's {kind} weights, which onnxruntime's CPU "
            "provider cannot run; export model.float() for a CPU deployment",
            stacklevel=3,
        )


def _explicit_same_padding(model: nn.Module) -> None:
    """Write a convolution's ``padding="same"`` as the numbers it pads: the exporter writes
    "same" as ONNX's auto_pad, which onnxruntime refuses for a dilated convolution. The same
    on both sides, they are the convolution's padding; an odd total, padded more on one side,
    is an explicit zero pad before it (a Pad node; the function is unchanged)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.padding == "same":
            total = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size, strict=True)]
            if all(t % 2 == 0 for t in total):
                m.padding = tuple(t // 2 for t in total)
            elif m.padding_mode == "zeros":  # forward: F.pad(x, the pads "same" computed)
                m.padding_mode = "constant"


def _fsync_file(path: Path) -> None:
    """Flush a written file to disk (before the rename that publishes it)."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
