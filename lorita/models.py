"""Model registry: the networks of the paper, sized for 1- or 3-channel images of 8, 28 or 32 px,
plus every torchvision classification model (``"torchvision:NAME"``) and timm's (``"timm:NAME"``,
when timm is installed). This file is the one place a model family is added.

``create_model(name, in_channels=..., image_size=..., num_classes=..., **options)`` builds a
plain network (N=1); :func:`lorita.overparameterize` composes its layers afterwards, skipping
:func:`default_skip` (the ViT's patch embedding and head, as in the paper). Every model carries
``model.lorita_arch = {"name": ..., "kwargs": {...}}`` so :func:`lorita.load` can rebuild it.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import threading
import warnings
from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .checks import is_int

__all__ = ["create_model", "list_models", "default_skip", "MLP", "VGG", "ResNet", "ViT"]


# --------------------------------------------------------------------------- helpers


def _positive_int(field: str, value) -> int:
    if not is_int(value) or value < 1:
        raise ValueError(f"{field}: expected an integer >= 1, got {value!r}")
    return int(value)


def _check_input(in_channels, image_size, num_classes) -> None:
    _positive_int("in_channels", in_channels)
    _positive_int("image_size", image_size)
    _positive_int("num_classes", num_classes)


# --------------------------------------------------------------------------- MLP


class MLP(nn.Sequential):
    """The paper's fully connected network: [Linear -> BatchNorm1d -> ReLU] x depth -> Linear.

    Layers are named ``fc1 .. fc{depth}`` and ``head``.

    Args:
        depth: number of hidden blocks.
        width: hidden width.
        batchnorm: put BatchNorm1d after each hidden Linear (the paper's FCN does).
        dropout: dropout after each block (0 = none).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        image_size: int,
        num_classes: int,
        depth: int = 3,
        width: int = 256,
        batchnorm: bool = True,
        dropout: float = 0.0,
    ) -> None:
        _check_input(in_channels, image_size, num_classes)
        _positive_int("depth", depth)
        _positive_int("width", width)
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout: expected a number in [0, 1), got {dropout!r}")
        layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        d_in = in_channels * image_size * image_size
        for i in range(1, depth + 1):
            layers[f"fc{i}"] = nn.Linear(d_in, width)
            if batchnorm:
                layers[f"bn{i}"] = nn.BatchNorm1d(width)
            layers[f"relu{i}"] = nn.ReLU(inplace=True)
            if dropout:
                layers[f"drop{i}"] = nn.Dropout(dropout)
            d_in = width
        layers["head"] = nn.Linear(d_in, num_classes)
        super().__init__(layers)


# --------------------------------------------------------------------------- VGG

_VGG_CFG = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """CIFAR-style VGG with BatchNorm: 3x3 conv -> BN -> ReLU stacks, max-pools, one Linear.

    A max-pool is left out once the feature map is down to 1 pixel, so 8- and 28-pixel inputs
    work too; a global average pool before the classifier makes the head size-independent.

    Args:
        depth: 11 or 16.
        width_mult: scales every channel count (for small, fast variants).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        image_size: int,
        num_classes: int,
        depth: int = 16,
        width_mult: float = 1.0,
    ) -> None:
        super().__init__()
        _check_input(in_channels, image_size, num_classes)
        if depth not in _VGG_CFG:
            raise ValueError(f"depth: expected one of {sorted(_VGG_CFG)}, got {depth!r}")
        if not isinstance(width_mult, int | float) or not width_mult > 0:
            raise ValueError(f"width_mult: expected a number > 0, got {width_mult!r}")
        layers: list[nn.Module] = []
        c, size = in_channels, image_size
        for v in _VGG_CFG[depth]:
            if v == "M":
                if size >= 2:
                    layers.append(nn.MaxPool2d(2))
                    size //= 2
                continue
            out = max(4, int(round(v * width_mult)))
            layers += [nn.Conv2d(c, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            c = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)  # (B, C)
        return self.classifier(x)


# --------------------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN; a 1x1 conv + BN shortcut when the shape changes (option B)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet (He et al. 2016): a 3x3 stem, three stages of basic blocks, a Linear head.

    Args:
        depth: 6n+2 (20, 32, 44, 56, ...); 20 gives three blocks per stage.
        width: channels of the first stage (16 in the paper; doubled per stage).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        image_size: int,
        num_classes: int,
        depth: int = 20,
        width: int = 16,
    ) -> None:
        super().__init__()
        _check_input(in_channels, image_size, num_classes)
        if not is_int(depth) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth: expected 6n+2 with n >= 1 (20, 32, 44, ...), got {depth!r}")
        _positive_int("width", width)
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages, c = [], width
        for i, mult in enumerate((1, 2, 4)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(c, width * mult, stride))
                c = width * mult
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))  # (B, w, H, W)
        x = self.layer3(self.layer2(self.layer1(x)))  # (B, 4w, H/4, W/4)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


# --------------------------------------------------------------------------- ViT


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape  # (B, T, D)
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, H, T, D/H)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """A small Vision Transformer: conv patch embedding, class token, pre-norm blocks, head.

    The composed layers are each block's ``attn.qkv``, ``attn.proj``, ``mlp.fc1`` and
    ``mlp.fc2``; ``patch_embed`` and ``head`` stay plain (see :func:`default_skip`).

    Args:
        patch_size: side of a patch; default 4 for images of 16 px and more, else 2.
        dim, depth, heads, mlp_ratio: the usual transformer sizes (dim divisible by heads).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        image_size: int,
        num_classes: int,
        patch_size: int | None = None,
        dim: int = 128,
        depth: int = 6,
        heads: int = 4,
        mlp_ratio: float = 2.0,
    ) -> None:
        super().__init__()
        _check_input(in_channels, image_size, num_classes)
        if patch_size is None:
            patch_size = 4 if image_size >= 16 and image_size % 4 == 0 else 2
            if image_size % patch_size:
                patch_size = 1
        _positive_int("patch_size", patch_size)
        if image_size % patch_size:
            raise ValueError(f"patch_size: {patch_size} must divide image_size {image_size}")
        for field, v in (("dim", dim), ("depth", depth), ("heads", heads)):
            _positive_int(field, v)
        if dim % heads:
            raise ValueError(f"heads: {heads} must divide dim {dim}")
        if not mlp_ratio > 0:
            raise ValueError(f"mlp_ratio: expected a number > 0, got {mlp_ratio!r}")
        n_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, n_patches + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, T, D)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])  # (B, classes)


# --------------------------------------------------------------------------- registry

_REGISTRY: dict[str, tuple[type[nn.Module], dict]] = {
    "mlp": (MLP, {}),
    "vgg": (VGG, {}),
    "vgg11": (VGG, {"depth": 11}),
    "vgg16": (VGG, {"depth": 16}),
    "resnet20": (ResNet, {"depth": 20}),
    "vit": (ViT, {}),
}
_DEFAULT_SKIP = {"vit": ("patch_embed", "head")}


_SOURCES = ("lorita", "torchvision", "timm", "all")
#: Upper bound on any integer option of an external model (a width of 10^9 is a typo).
_MAX_OPTION = 1_000_000


def _torchvision_names() -> list[str]:
    import torchvision.models as tvm

    return sorted(tvm.list_models(module=tvm))


@functools.lru_cache(maxsize=1)
def _timm_available() -> bool:
    """Whether timm is installed and imports (a broken install warns once and counts as
    none: its models are left out, the rest works)."""
    import importlib.util

    if importlib.util.find_spec("timm") is None:
        return False
    try:
        import timm  # noqa: F401
    except Exception as e:  # noqa: BLE001 - whatever a broken install raises
        warnings.warn(
            f"timm is installed but cannot be imported ({type(e).__name__}: {e}); its models "
            "are left out (reinstall it: pip install --force-reinstall timm)",
            stacklevel=2,
        )
        return False
    return True


def list_models(source: str = "lorita") -> list[str]:
    """Names accepted by :func:`create_model`.

    Args:
        source: "lorita" (the built-in registry), "torchvision" (every torchvision
            classification builder, as ``"torchvision:NAME"``), "timm" (``"timm:NAME"``, when
            timm is installed) or "all".
    """
    if source not in _SOURCES:
        raise ValueError(f"source: expected one of {', '.join(_SOURCES)}, got {source!r}")
    out = list(_REGISTRY) if source in ("lorita", "all") else []
    if source in ("torchvision", "all"):
        out += [f"torchvision:{n}" for n in _torchvision_names()]
    if source in ("timm", "all") and _timm_available():
        import timm

        out += [f"timm:{n}" for n in timm.list_models()]
    return out


def _external(name: str) -> tuple[str, str] | None:
    prefix, sep, rest = name.partition(":") if isinstance(name, str) else ("", "", "")
    return (prefix, rest) if sep and prefix in ("torchvision", "timm") else None


def _check_known(name) -> None:
    if not isinstance(name, str):
        raise ValueError(f"model: expected a name (str), got {type(name).__name__}")
    ext = _external(name)
    if ext is None:
        if name not in _REGISTRY:
            raise ValueError(
                f"model: unknown name {name!r}; allowed: {', '.join(_REGISTRY)}, "
                "torchvision:NAME or timm:NAME"
            )
        return
    source, rest = ext
    if source == "torchvision" and rest not in _torchvision_names():
        raise ValueError(
            f"model: {rest!r} is not a torchvision classification model; "
            "see lorita.list_models('torchvision')"
        )
    if source == "timm":
        if not _timm_available():
            raise ValueError("model: timm models need the optional package timm (pip install timm)")
        import timm

        if not timm.is_model(rest):
            raise ValueError(f"model: {rest!r} is not a timm model; see timm.list_models()")


def default_skip(name: str) -> tuple[str, ...]:
    """Layer names (fnmatch patterns) the paper leaves plain when composing this model."""
    _check_known(name)
    return _DEFAULT_SKIP.get(name, ())


def _torchvision_class(name: str):
    import typing

    import torchvision.models as tvm

    builder = tvm.get_model_builder(name)
    return builder, typing.get_type_hints(builder).get("return")


_PROBE = "lorita_option_probe"  # a keyword no torchvision class takes
_NOT_OPTIONS = (
    "self",
    "num_classes",
    "image_size",
    "in_chans",
    "device",
    "dtype",
    "weights",
    "progress",
)


def _written_as_text(hint) -> bool:
    """Whether a value of type ``hint`` can be written in a ``key=value`` item: not a
    function, a class or a module (resnet's ``norm_layer``, vit's ``conv_stem_configs``)."""
    import collections.abc
    import types
    import typing

    origin = typing.get_origin(hint)
    if origin is not None:
        if origin in (collections.abc.Callable, type):
            return False
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        if origin in (typing.Union, types.UnionType):  # timm's act_layer: str | Callable
            return any(_written_as_text(a) for a in args if a is not type(None))
        return all(_written_as_text(a) for a in args)
    if hint in (typing.Any, type(None)) or isinstance(hint, typing.TypeVar):
        return True
    if hint is collections.abc.Callable or hint is type:
        return False
    if not isinstance(hint, type):
        return True
    named = hasattr(hint, "_fields")  # a NamedTuple: vit's ConvStemConfig
    return issubclass(hint, int | float | str | list | tuple | dict) and not named


def _params(fn) -> dict:
    """``{name: default or None}`` of ``fn``'s named parameters that could be options: not
    the shape (num_classes...), not ``*args``/``**kwargs``, and not those whose annotation
    says a value no ``key=value`` item can write (a function, a class, a module)."""
    import typing

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - unresolvable annotations: keep every parameter
        hints = {}
    return {
        k: (None if p.default is p.empty else p.default)
        for k, p in params.items()
        if k not in _NOT_OPTIONS
        and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
        and _written_as_text(hints.get(k, typing.Any))
        and not callable(p.default)
    }


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _kind_wanted(d: Any, v: Any) -> tuple[bool, str] | None:
    """(whether ``v`` is of the kind of the default ``d``, that kind in words); None when
    ``d`` says nothing of the kind."""
    if isinstance(d, bool):
        return isinstance(v, bool), "true or false"
    if _is_number(d):
        return not isinstance(v, bool | str), "a number"
    if isinstance(d, tuple | list) and d and all(_is_number(x) for x in d):
        # one number passes too: a builder may take it for every entry (a size, a stride)
        ok = _is_number(v) or (isinstance(v, tuple | list) and all(_is_number(x) for x in v))
        return ok, "a list of numbers"
    return None


def check_option_types(name: str, kw: dict, defaults: dict, field: str = "model options") -> None:
    """ValueError naming the option whose value is not of its default's kind: ``true`` or
    ``false`` for a switch (a text like ``maybe`` would count as on), a number for a number,
    numbers for a list of them (timm's resnet ``channels``)."""
    for k, v in kw.items():
        d = defaults.get(k)
        judged = _kind_wanted(d, v)
        if judged is not None and not judged[0]:
            shown = json.dumps(list(d)) if isinstance(d, tuple) else repr(d)
            raise ValueError(
                f"{field}: {k}={v!r} for {name!r}; expected {judged[1]} (default {shown})"
            )


def _kwargs_helpers(builder) -> list:
    """The functions a builder's body passes its ``**kwargs`` to (e.g. mobilenet_v3's
    ``_mobilenet_v3_conf``, which takes width_mult), found in its source."""
    import ast
    import textwrap

    fn = inspect.unwrap(builder)
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return []
    names = getattr(fn, "__globals__", {})
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or all(k.arg is not None for k in node.keywords):
            continue
        f = node.func
        if isinstance(f, ast.Name):
            target = names.get(f.id)
        elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
            target = getattr(names.get(f.value.id), f.attr, None)
        else:
            continue
        if inspect.isfunction(target) or inspect.ismethod(target):
            out.append(target)
    return out


#: Where a builder is called to learn about it: the meta device allocates nothing; the CPU
#: serves a builder that computes its settings with tensors (regnet's), which the meta device
#: cannot run.
_PROBE_DEVICES = ("meta", "cpu")


_PROBES = threading.local()


@contextlib.contextmanager
def _probing(device: str):
    """Build on ``device`` with the builder's warnings held off (a probe, not a model)."""
    _PROBES.depth = getattr(_PROBES, "depth", 0) + 1
    try:
        with warnings.catch_warnings(), torch.device(device):
            warnings.simplefilter("ignore")
            yield
    finally:
        _PROBES.depth -= 1


def probing() -> bool:
    """Whether this thread is inside a probe: a builder called with its own defaults to learn
    its class or options, not the model asked for (a bound on the modules a file may build
    leaves these out)."""
    return getattr(_PROBES, "depth", 0) > 0


def _builder_takes(builder, option: str, value) -> bool:
    """Whether a torchvision builder lets the caller set ``option``: called with it and a
    keyword no class takes, it fails binding the class's arguments (the option went through),
    or builds (a class that ignores unknown keywords); it is the builder's own when the call
    says it got the option twice or expected another value (resnext's groups). Tried on the
    meta device (nothing allocated), then on the CPU where a builder computes its settings
    with tensors (regnet's), which still stops at the class's arguments."""
    for device in _PROBE_DEVICES:
        try:
            with _probing(device):
                builder(weights=None, num_classes=10, **{option: value, _PROBE: True})
        except (TypeError, ValueError) as e:
            text = str(e)
            return _PROBE in text or f"'{option}'" not in text
        except Exception:  # noqa: BLE001 - the meta device cannot run it: try the CPU
            continue
        return True
    return True


class _Bound(Exception):
    """Raised by :func:`_class_arguments`'s stand-in ``__init__`` once it has the arguments."""


_BINDING = threading.Lock()


def _class_arguments(cls: type, build) -> dict:
    """The arguments ``build()`` passes to ``cls`` (the builder's own settings: timm's
    vit_tiny_patch16_224 gives embed_dim=192 where the class's default is 768), caught when
    ``cls.__init__`` is called and the build stopped there: nothing is built. Tried on the
    meta device, then on the CPU (a builder that computes its settings with tensors); {} if
    the build fails before reaching the class."""
    init = cls.__init__
    signature = inspect.signature(init)
    caught: dict = {}
    me = threading.get_ident()

    def stand_in(self, *args, **kwargs):
        if threading.get_ident() != me:  # another thread building one: let it
            return init(self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        for key, value in list(bound.arguments.items())[1:]:
            keywords = signature.parameters[key].kind is inspect.Parameter.VAR_KEYWORD
            caught.update(value if keywords else {key: value})
        raise _Bound

    with _BINDING:
        own = cls.__dict__.get("__init__")  # None: cls inherits its __init__
        cls.__init__ = stand_in
        try:
            for device in _PROBE_DEVICES:
                try:
                    with _probing(device):
                        build()
                except _Bound:
                    break
                except Exception:  # noqa: BLE001 - not reached on this device: try the next
                    continue
        finally:
            if own is None:
                del cls.__init__
            else:
                cls.__init__ = own
    return caught


def _with_builder_defaults(options: dict, cls: type | None, build) -> dict:
    """``options`` with each default replaced by the value the builder gives the class."""
    given = _class_arguments(cls, build) if cls is not None else {}
    return {k: given.get(k, v) for k, v in options.items()}


@functools.lru_cache(maxsize=128)
def _torchvision_options(name: str) -> dict:
    """The options of torchvision's builder ``name`` and their defaults: the parameters of the
    class it builds and of the helpers it passes ``**kwargs`` to, less those the builder sets
    itself (resnet18's block and layers, resnext's groups, vit_b_16's patch_size), each checked
    by calling the builder on the meta device (see :func:`_builder_takes`)."""
    builder, cls = _torchvision_class(name)
    candidates = _params(cls.__init__) if cls is not None else {}
    for helper in _kwargs_helpers(builder):
        for k, v in _params(helper).items():
            candidates.setdefault(k, v)
    options = {k: v for k, v in candidates.items() if _builder_takes(builder, k, v)}
    return _with_builder_defaults(options, cls, lambda: builder(weights=None, num_classes=10))


@functools.lru_cache(maxsize=64)
def _timm_class(name: str):
    """The class timm builds for ``name`` (its constructor's parameters are the model's
    options: drop_rate, drop_path_rate, img_size...), found by building it on the meta device
    (no memory, no weights); None if that fails."""
    import timm

    try:
        with _probing("meta"):
            return type(timm.create_model(name, pretrained=False))
    except Exception:  # noqa: BLE001 - a model that cannot be built so: no options listed
        return None


@functools.lru_cache(maxsize=64)
def _timm_options(name: str) -> dict:
    """The parameters of the class timm builds for ``name``, with the builder's values."""
    import timm

    cls = _timm_class(name)
    if cls is None:
        return {}
    options = _params(cls.__init__)
    return _with_builder_defaults(
        options, cls, lambda: timm.create_model(name, pretrained=False, num_classes=10)
    )


def model_options(name: str) -> dict:
    """The options of a model and their defaults (besides in_channels/image_size/num_classes)."""
    _check_known(name)
    ext = _external(name)
    if ext is not None:
        if ext[0] == "torchvision":
            return dict(_torchvision_options(ext[1]))
        return dict(_timm_options(ext[1]))
    cls, preset = _REGISTRY[name]
    params = inspect.signature(cls.__init__).parameters
    out = {
        k: p.default
        for k, p in params.items()
        if p.kind is p.KEYWORD_ONLY and k not in ("in_channels", "image_size", "num_classes")
    }
    out.update(preset)
    return out


def _check_bounded(kw: dict) -> None:
    for k, v in kw.items():
        if isinstance(v, int) and not isinstance(v, bool) and not -_MAX_OPTION <= v <= _MAX_OPTION:
            raise ValueError(f"model options: {k}={v!r} is out of range (|value| <= {_MAX_OPTION})")


def _set_in_channels(model: nn.Module, in_channels: int) -> None:
    """Replace the first 3-channel input convolution by one taking ``in_channels``."""
    from .kinds import set_module

    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            if m.in_channels != 3 or m.groups != 1:
                break
            new = nn.Conv2d(
                in_channels,
                m.out_channels,
                m.kernel_size,
                m.stride,
                m.padding,
                m.dilation,
                bias=m.bias is not None,
                padding_mode=m.padding_mode,
            )
            set_module(model, name, new)
            return
    raise ValueError(
        f"in_channels: this model's first layer is not a 3-channel Conv2d; use in_channels=3, "
        f"got {in_channels!r}"
    )


#: timm.create_model's own keywords that read a file or a pretrained configuration: not options
_LOADER_OPTIONS = frozenset(
    ("checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")
)


def _create_external(name: str, in_channels, image_size, num_classes, kw: dict) -> nn.Module:
    source, rest = _external(name)
    _check_bounded(kw)
    if "weights" in kw or "pretrained" in kw:
        raise ValueError("model options: weights are not downloaded; start from --init-from FILE")
    loaders = sorted(set(kw) & _LOADER_OPTIONS)
    if loaders:  # (a file's spec could otherwise name any file on this machine to read)
        raise ValueError(
            f"model options: {', '.join(loaders)} would make {source} read weights or settings "
            "from elsewhere; start from --init-from FILE instead"
        )
    opts = dict(kw)
    if num_classes is not None:
        opts["num_classes"] = num_classes
    try:
        if source == "timm":
            import timm

            if in_channels is not None:
                opts["in_chans"] = in_channels
            cls = _timm_class(rest)
            takes_size = cls is not None and "img_size" in inspect.signature(cls).parameters
            if image_size is not None and takes_size:
                opts.setdefault("img_size", image_size)  # a ViT's patch grid for these images
            model = timm.create_model(rest, pretrained=False, **opts)
        else:
            builder, cls = _torchvision_class(rest)
            takes_size = cls is not None and "image_size" in inspect.signature(cls).parameters
            if image_size is not None and takes_size:
                opts["image_size"] = image_size
            model = builder(weights=None, **opts)
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        if type(e) in (RuntimeError, NotImplementedError) and torch.empty(0).device.type == "meta":
            raise  # a builder that computes with tensors (regnet's): the meta device cannot tell
        given = f"the options {sorted(kw)}" if kw else "its default options"
        size = f" at {image_size}x{image_size} px" if image_size is not None else ""
        raise ValueError(f"model options: {name} refused {given}{size}: {e}") from None
    if source == "torchvision" and in_channels not in (None, 3):
        _set_in_channels(model, in_channels)
    return model


def create_model(
    name: str,
    *,
    in_channels: int | None = None,
    image_size: int | None = None,
    num_classes: int | None = None,
    **kw,
) -> nn.Module:
    """Build a plain (N=1) model: from the registry, ``"torchvision:NAME"`` (any torchvision
    classification builder, ``weights=None``) or ``"timm:NAME"`` (when timm is installed).

    Args:
        name: one of :func:`list_models` (any source).
        in_channels, image_size, num_classes: input and output shape (required for the
            registry's models; optional for torchvision / timm ones, whose defaults are 3, 224
            and 1000; image_size is passed on where the model takes it, e.g. ViT).
        **kw: model options (see each class; :func:`model_options` lists them).

    Raises:
        ValueError: unknown name or option, or an option out of range.
    """
    _check_known(name)
    if _external(name) is not None:
        for field, v in (("in_channels", in_channels), ("image_size", image_size)):
            if v is not None:
                _positive_int(field, v)
        if num_classes is not None:
            _positive_int("num_classes", num_classes)
            _check_bounded({"num_classes": num_classes})
        check_option_types(name, kw, model_options(name))
        model = _create_external(name, in_channels, image_size, num_classes, kw)
        given = {"in_channels": in_channels, "image_size": image_size, "num_classes": num_classes}
        kwargs = {k: v for k, v in given.items() if v is not None}
        model.lorita_arch = {"name": name, "kwargs": {**kwargs, **kw}}
        model.lorita_input_shape = (in_channels or 3, image_size or 224, image_size or 224)
        return model
    for field, v in (("in_channels", in_channels), ("image_size", image_size)):
        if v is None:
            raise ValueError(f"{field}: required for the built-in model {name!r}")
    if num_classes is None:
        raise ValueError(f"num_classes: required for the built-in model {name!r}")
    allowed = model_options(name)
    unknown = set(kw) - set(allowed)
    if unknown:
        raise ValueError(
            f"model options: unknown {sorted(unknown)} for {name!r}; allowed: {', '.join(allowed)}"
        )
    check_option_types(name, kw, allowed)
    cls, _ = _REGISTRY[name]
    opts = {**allowed, **kw}
    model = cls(in_channels=in_channels, image_size=image_size, num_classes=num_classes, **opts)
    model.lorita_arch = {
        "name": name,
        "kwargs": {
            "in_channels": in_channels,
            "image_size": image_size,
            "num_classes": num_classes,
            **opts,
        },
    }
    model.lorita_input_shape = (in_channels, image_size, image_size)
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
