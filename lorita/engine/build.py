"""The data and the model of a config: splits with their validation carve-out, the plain
model (optionally started from a weights file) composed with N factors."""

from __future__ import annotations

import os
import re
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from .. import data as data_mod
from .. import models as models_mod
from ..clone import clone_model
from ..convert import overparameterize
from ..export import LIMITS, foreign_format, is_lorita_file, read_header
from ..runs import load_splits as _run_splits
from .config import TrainConfig

__all__ = [
    "build_model",
    "check_weights",
    "compose",
    "fit_head",
    "load_splits",
    "plain_phase",
    "read_weights",
]


def as_config(config) -> TrainConfig:
    """A TrainConfig from itself, its dict or a run (its config); else a ValueError naming
    ``config``."""
    if isinstance(config, TrainConfig):
        return config
    held = getattr(config, "config", None)  # a Run: the config it was trained with
    if isinstance(held, dict) and not isinstance(config, dict):
        config = held
    if not isinstance(config, dict):
        raise ValueError(
            f"config: expected a TrainConfig, its dict or a run, got {type(config).__name__}"
        )
    return TrainConfig.from_dict(config)


def load_splits(config: TrainConfig | dict) -> data_mod.Splits:
    """The dataset of a config (a TrainConfig, its dict or a run), with its validation
    carve-out."""
    return _run_splits(as_config(config).to_dict())


#: keys under which training scripts keep the weights in a checkpoint dict, tried in order
_WRAPPERS = (
    "state_dict", "model_state_dict", "model_state", "model", "net", "module",
    "state_dict_ema", "model_ema", "ema",  # a moving average: only where it is all there is
)  # fmt: skip
#: name prefixes that wrappers add (DistributedDataParallel, torch.compile, Lightning-style)
_PREFIXES = ("module.", "_orig_mod.", "model.")


def _tensors(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(torch.is_tensor(v) for v in obj.values())


def _unwrapped(obj, path) -> dict[str, torch.Tensor]:
    """The state_dict in ``obj``: itself, or under a usual checkpoint key."""
    if _tensors(obj):
        return obj
    if isinstance(obj, dict):
        for key in _WRAPPERS:
            if _tensors(obj.get(key)):
                return obj[key]
    keys = f" (keys: {', '.join(map(str, list(obj)[:6]))})" if isinstance(obj, dict) else ""
    keys = " (it holds nothing)" if isinstance(obj, dict) and not obj else keys
    raise ValueError(
        f"init_from: {str(path)!r} does not hold a state_dict of tensors{keys}; expected "
        f"a model's state_dict, alone or under one of {', '.join(_WRAPPERS)}"
    )


def _renamed(sd: dict[str, torch.Tensor], own: set[str]) -> dict[str, torch.Tensor]:
    """``sd`` with the prefixes of wrappers stripped while the model's own names do not have
    them: from every key that carries one, when that names more of the model's tensors (a
    Lightning module also keeps its loss's weights: ``model.fc.weight`` beside
    ``criterion.weight``, which stays for :func:`check_weights` to name).
    Wrappers stack: torch.compile around DistributedDataParallel writes ``_orig_mod.module.``,
    the other way round ``module._orig_mod.``; up to three prefixes are stripped, any order."""
    best, frontier = sd, [sd]
    for _ in range(3):
        if set(best) <= own:
            break
        grown = []
        for have in frontier:
            for p in _PREFIXES:
                if not any(k.startswith(p) for k in have):
                    continue
                t = {(k[len(p) :] if k.startswith(p) else k): v for k, v in have.items()}
                if len(t) != len(have):  # (no two keys made one)
                    continue
                grown.append(t)
                if len(set(t) & own) > len(set(best) & own):
                    best = t
        frontier = grown
    return best


def _from_lorita_file(p: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain weights of a model saved by ``lorita.save`` (composed or cut): rebuilt onto a
    copy of ``model``'s architecture and merged back into its plain layers. A file that does
    not fit that copy but rebuilds its own architecture (a registry or Sequential model, e.g.
    trained for another number of classes) is rebuilt so, for :func:`fit_head` to compare."""
    from ..convert import merge_model
    from ..export import load, read_spec

    try:
        folded = read_spec(p).get("folded")
    except ValueError as e:
        raise ValueError(f"init_from: {_unnamed(e, p)}") from None
    if folded:
        raise ValueError(
            f"init_from: {str(p)!r} was saved for inference with BatchNorm folded into the "
            "layers; write it with the BatchNorms kept (`lorita export RUN --no-fold-bn`, or "
            "lorita.save without fold_bn) to train from it"
        )
    arch = clone_model(model)
    if any(t.is_meta for t in arch.state_dict().values()):
        arch = arch.to_empty(device="cpu")  # the command line's size check builds on meta
    try:
        rebuilt = load(p, model=arch)
    except ValueError as e:
        try:
            rebuilt = load(p)
        except ValueError:
            raise ValueError(f"init_from: {_unnamed(e, p)}") from None
    sd = merge_model(rebuilt).state_dict()
    _check_values(sd, p)
    return sd


def _unnamed(err: ValueError, p: Path) -> str:
    """``'FILE': what`` from a loader's message, which names ``p`` once (``path 'FILE': ...``)
    or not at all."""
    text = str(err).removeprefix(f"path {str(p)!r}: ")
    return f"{str(p)!r}: {text}"


def read_weights(
    path: str | os.PathLike, model: nn.Module | None = None
) -> dict[str, torch.Tensor]:
    """A state_dict from a safetensors file or a PyTorch file read with ``weights_only=True``
    (never unpickling code). ValueError naming ``init_from`` if it cannot be read.

    A checkpoint dict is unwrapped (``{"state_dict": ...}``, ``{"model": ...}``, ...). Given
    the ``model`` it is for, names are fitted to it (the ``module.`` of DistributedDataParallel,
    ``_orig_mod.`` of torch.compile stripped) and a file written by ``lorita.save`` (composed
    or cut) is rebuilt on its architecture and merged into plain weights.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"init_from: {str(path)!r} is not a file")
    what = _not_weights(p)
    if what:
        raise ValueError(f"init_from: {str(path)!r} {what}")
    if model is not None and is_lorita_file(p):  # (by its header, whatever its name)
        return _from_lorita_file(p, model)
    bomb = _too_big(p)
    if bomb:
        raise ValueError(f"init_from: {str(path)!r} {bomb}")
    try:
        if _is_safetensors(p):
            from safetensors.torch import load_file

            obj = load_file(str(p))
            read_header(p)  # (the parser lorita.load uses: a tensor named twice is refused)
        else:
            # (a file object: given a path named .safetensors, torch.load reads it as one)
            with warnings.catch_warnings(), open(p, "rb") as f:  # torch's weights_only advice
                warnings.simplefilter("ignore")
                obj = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is one clear error
        named = _header_problem(p)
        if named:
            raise ValueError(f"init_from: {named}") from None
        if "Weights only load failed" in str(e) and _head(p).startswith((b"PK", b"\x80")):
            named = re.findall(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
            what = f" ({named[0]})" if named else ""
            raise ValueError(
                f"init_from: {str(path)!r} holds Python objects{what}, not only tensors (a "
                "whole model saved with torch.save(model), or a training script's arguments "
                "beside the weights?), and is not unpickled; save model.state_dict() alone "
                "instead, or a safetensors file"
            ) from None
        raise ValueError(
            f"init_from: {str(path)!r} is neither a safetensors file nor a PyTorch state_dict: "
            f"{_why_unreadable(p, e)}"
        ) from None
    sd = _unwrapped(obj, path)
    _check_values(sd, path)
    return sd if model is None else _renamed(sd, set(model.state_dict()))


def _too_big(p: Path) -> str:
    """Why reading ``p`` would cost far more than its size ("" when it would not): a zip
    whose entries are compressed (torch.save stores them as they are: a few MB of deflated
    zeros would unpack into GBs) or too many, a safetensors header listing too many tensors.
    Only the file's directory or header is read."""
    limit = LIMITS["tensors"]
    head = _head(p)
    if head.startswith(b"PK"):
        count = _zip_entries(p)
        if count is None:
            return ""  # damaged or cut short: torch's reader says so
        if count > limit + 16:  # (torch.save adds a few records beside the tensors)
            return f"is a zip archive of {count} entries (at most {limit})"
        with zipfile.ZipFile(p) as z:
            packed = [i.filename for i in z.infolist() if i.compress_type != zipfile.ZIP_STORED]
        if packed:
            return (
                f"is a zip archive with compressed entries ({packed[0]!r}), which torch.save "
                "does not write: save the weights again with torch.save or as safetensors"
            )
        return ""
    with open(p, "rb") as f:
        first = f.read(9)
        n = int.from_bytes(first[:8], "little") if len(first) == 9 else 0
        if head[:1] == b"\x80" or first[8:9] != b"{" or n <= 0:
            return ""  # a pickle stream, or not safetensors: read as it is
        if n > LIMITS["header_bytes"]:
            return f"has a safetensors header of {n} bytes (at most {LIMITS['header_bytes']})"
        text = b"{" + f.read(n - 1)
    count = text.count(b'"data_offsets"')  # one per tensor; no JSON parsed for a count
    if count > limit:
        return f"lists {count} tensors in its safetensors header (at most {limit})"
    return ""


def _header_problem(p: Path) -> str:
    """What :func:`lorita.load`'s checks name in a safetensors header safetensors' own reader
    refused (a field, in words, rather than its parser's message); "" for a file whose first
    bytes are not a safetensors prelude, whose header is cut short, or when those checks find
    nothing."""
    from ..export import check_header

    with open(p, "rb") as f:
        head = f.read(9)
    if head[8:9] != b"{" or 8 + int.from_bytes(head[:8], "little") > p.stat().st_size:
        return ""  # (a file cut short inside its header is said in plain words)
    try:
        check_header(p)
    except ValueError as e:
        return str(e).removeprefix("path ")
    return ""


def _zip_entries(p: Path) -> int | None:
    """The number of entries a zip file's end-of-central-directory record gives (ZIP64's
    when there are more than 65,535), read from its last 64 KiB only; None if not found."""
    size = p.stat().st_size
    with open(p, "rb") as f:
        f.seek(max(0, size - 65_557))
        tail = f.read()
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) < at + 22:
            return None
        count = int.from_bytes(tail[at + 10 : at + 12], "little")
        if count != 0xFFFF:
            return count
        loc = tail.rfind(b"PK\x06\x07", 0, at)  # the ZIP64 locator points at its record
        if loc < 0:
            return None
        f.seek(int.from_bytes(tail[loc + 8 : loc + 16], "little"))
        record = f.read(40)
    if record[:4] != b"PK\x06\x06":
        return None
    return int.from_bytes(record[32:40], "little")


def _head(p: Path) -> bytes:
    with open(p, "rb") as f:
        return f.read(8)


def _why_unreadable(p: Path, err: Exception) -> str:
    """What is wrong with a file neither safetensors nor torch could read, in plain words."""
    head = _head(p)
    if head.startswith(b"PK"):
        what = "a zip archive (torch.save's format) that is damaged or cut short"
    elif head[:1] == b"\x80":
        what = "a pickle stream that is damaged or cut short"
    elif len(head) >= 8 and int.from_bytes(head, "little") < 100_000_000:
        what = "its safetensors header is damaged or the file is cut short"
    else:
        return "its first bytes are those of neither format"
    reason = str(err).strip().split("\n")[0].split(". ")[0].strip()
    if len(reason) > 100:
        reason = reason[:100].rsplit(" ", 1)[0] + " ..."
    return f"{what} ({type(err).__name__}: {reason})" if reason else what


def _not_weights(p: Path) -> str:
    """Why a file is plainly not a weights file ("" when it may be one)."""
    with open(p, "rb") as f:
        head = f.read(64)
    if not head:
        return "is empty"
    if foreign_format(head) == "onnx":
        return (
            "is an ONNX model, which cannot be trained from; pass the run's safetensors file "
            "(lorita export RUN --no-fold-bn) or a state_dict"
        )
    return ""


def _is_safetensors(p: Path) -> bool:
    """A safetensors file, by its header (8-byte length, then a JSON object), whatever its
    name: a torch.save file named .safetensors is read as what it is."""
    with open(p, "rb") as f:
        head = f.read(9)
    if head[:2] == b"PK" or head[:1] == b"\x80":  # torch.save's zip, or a bare pickle
        return False
    return p.suffix == ".safetensors" or (len(head) == 9 and head[8:9] == b"{")


def _check_values(sd: dict[str, torch.Tensor], path) -> None:
    """Every tensor dense and finite: NaN or infinity would train nothing, and a sparse or
    quantized tensor cannot be copied into a layer."""
    for k, v in sd.items():
        if v.layout != torch.strided or v.is_quantized:
            raise ValueError(f"init_from: {k!r} in {str(path)!r} is not a dense tensor")
        if v.is_meta:
            raise ValueError(
                f"init_from: {k!r} in {str(path)!r} is a tensor without values (saved from "
                "the meta device); save the weights of a materialised model"
            )
        held = v.untyped_storage().nbytes() // v.element_size() - v.storage_offset()
        if v.numel() > held:  # (checked before any copy of it: 4 bytes can declare 4 TB)
            raise ValueError(
                f"init_from: {k!r} in {str(path)!r} declares {v.numel()} values where the file "
                f"stores {max(held, 0)} (a view that repeats values, as expand() makes); save "
                "each tensor with .contiguous(), or as safetensors"
            )
        if v.is_floating_point() and v.element_size() == 1:  # float8: no isfinite of its own
            v = v.float()
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise ValueError(f"init_from: {k!r} in {str(path)!r} holds NaN or infinity")


def _first(names: list[str]) -> str:
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return ", ".join(repr(n) for n in names[:3]) + more


def check_weights(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """ValueError naming ``init_from`` and the first names or shapes where ``sd`` and
    ``model``'s state_dict differ."""
    own = model.state_dict()
    wrong = None  # the first tensor of a shape or kind the model's cannot take
    for k, v in sd.items():
        if wrong is None and k in own and tuple(own[k].shape) != tuple(v.shape):
            shapes = f"{tuple(v.shape)} in the file but {tuple(own[k].shape)} in the model"
            wrong = f"{k!r} has shape {shapes}"
        if wrong is None and k in own and own[k].is_floating_point() and not v.is_floating_point():
            wrong = (
                f"{k!r} holds {str(v.dtype).removeprefix('torch.')} values in the file; a "
                "weight needs floating-point values"
            )
    missing = _missing(own, sd)
    extra = [k for k in sd if k not in own]
    if missing or extra:  # named first: a file of another architecture shares a few names
        parts = [f"missing from the file: {_first(missing)}"] if missing else []
        parts += [f"not in the model: {_first(extra)}"] if extra else []
        also = f"; also {wrong}" if wrong else ""
        raise ValueError(
            "init_from: the weights do not match the model (" + "; ".join(parts) + ")" + also
        )
    if wrong:
        raise ValueError(f"init_from: {wrong}")


def _missing(own: dict, sd: dict) -> list[str]:
    """The model's tensors the file lacks, in the model's order (the first layer first); a
    BatchNorm's step count is no weight (torch's own strict load fills it in): files written
    without it load."""
    return [k for k in own if k not in sd and not k.endswith(".num_batches_tracked")]


def _last_layer(model: nn.Module) -> str | None:
    """The last Linear / Conv2d in the model's order: a classifier's output layer."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return names[-1] if names else None


def fit_head(model: nn.Module, sd: dict[str, torch.Tensor]) -> tuple[dict, str | None]:
    """Pretrained weights for another number of classes (an ImageNet checkpoint, 1000 classes,
    for a 10-class dataset): when the only tensors whose shapes differ are the weights and
    biases of output layers (the last Linear / Conv2d, and the side classifiers of GoogLeNet
    or Inception v3 that end in as many outputs), and only in their number of outputs, they
    are dropped from ``sd`` so that those layers start from the model's own init; so does an
    output layer the file lacks (a backbone saved without its head). Returns the weights and a
    note saying so (None when nothing was changed); any other mismatch is left for
    :func:`check_weights`."""
    own = model.state_dict()
    differ = [k for k, v in sd.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    head = _last_layer(model)
    missing = _missing(own, sd)
    if (
        head is not None
        and not differ
        and missing
        and set(missing) <= {f"{head}.weight", f"{head}.bias"}
    ):
        # a backbone saved without its classifier (timm's num_classes=0, a head cut off)
        note = (
            f"init_from: the output layer {head!r} is not in the file: it starts from a fresh "
            "init, every other layer from the file"
        )
        return {**sd, **{k: own[k] for k in missing}}, note
    if not differ or head is None or not {f"{head}.weight", f"{head}.bias"} & set(differ):
        return sd, None
    plain = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    layers = {k.rpartition(".")[0] for k in differ}
    if not all(k.rpartition(".")[2] in ("weight", "bias") for k in differ) or not layers <= plain:
        return sd, None
    if any(sd[k].shape[1:] != own[k].shape[1:] for k in differ):
        return sd, None
    theirs, ours = {sd[k].shape[0] for k in differ}, {own[k].shape[0] for k in differ}
    if len(theirs) > 1 or len(ours) > 1:  # one number of classes on each side
        return sd, None
    kept = {k: v for k, v in sd.items() if k not in differ}
    for k in differ:
        kept[k] = own[k]  # the model's own init (on the meta device for a preflight check)
    heads = ", ".join(repr(n) for n in [head, *sorted(layers - {head})])
    one = len(layers) == 1
    note = (
        f"init_from: the output layer{'' if one else 's'} {heads} "
        f"{'has' if one else 'have'} {theirs.pop()} outputs in the file and {ours.pop()} in "
        f"this model: {'it starts' if one else 'they start'} from a fresh init, every other "
        "layer from the file"
    )
    return kept, note


def _load_into(plain: nn.Module, path: str) -> str | None:
    sd, note = fit_head(plain, read_weights(path, plain))
    check_weights(plain, sd)
    plain.load_state_dict(sd, strict=True)
    return note


def plain_phase(config: TrainConfig, epoch: int) -> bool:
    """Whether a run of ``config`` trains the plain network in ``epoch`` (its first
    ``plain_epochs`` epochs, when N > 1)."""
    return config.n_factors > 1 and epoch < config.plain_epochs


def compose(
    plain: nn.Module, config: TrainConfig, *, n_factors: int | None = None, init: str | None = None
) -> nn.Module:
    """A copy of ``plain`` written with N factors (the config's unless ``n_factors``), with the
    config's init (unless ``init``), skip list and inner width; N=1 is the plain copy."""
    skip = models_mod.default_skip(config.model) if config.skip is None else tuple(config.skip)
    n = config.n_factors if n_factors is None else n_factors
    return overparameterize(plain, n, init=init or config.init, skip=skip, inner=config.inner)


def build_model(
    config: TrainConfig, splits: data_mod.Splits, *, load_init: bool = True, epoch: int = 0
) -> nn.Module:
    """The plain model of the config, composed with N factors (seeded by ``config.seed``);
    left plain when ``epoch`` is one of the run's plain epochs (``plain_epochs``).

    With ``config.init_from`` the plain model's weights are loaded from that file first
    (``load_init=False``: not, for a model whose every weight a checkpoint will replace).
    ``config``: a TrainConfig, its dict or a run; ``splits``: :func:`load_splits`'s.
    """
    config = as_config(config)
    if not isinstance(splits, data_mod.Splits):
        raise ValueError(f"splits: expected load_splits(config)'s, got {type(splits).__name__}")
    torch.manual_seed(config.seed)
    plain = models_mod.create_model(
        config.model,
        in_channels=splits.in_channels,
        image_size=splits.image_size,
        num_classes=splits.num_classes,
        **config.model_kwargs,
    )
    start = config.init_from if load_init else None
    note = _load_into(plain, start) if start is not None else None
    model = compose(plain, config, n_factors=1 if plain_phase(config, epoch) else None)
    model.lorita_init_note = note
    return model
