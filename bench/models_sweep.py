"""Engineers' own models through the whole library path, one row each.

About fifty networks: small timm models (random weights, reduced widths or input sides) across
its convolutional, attention, MLP and hybrid families, and hand-written ones with the shapes
engineers give their code (grouped, depthwise-separable and squeeze-excitation convolutions,
a weight-tied head, several inputs or outputs, a dict output, buffers, weights read by
``F.linear`` / ``F.conv2d``, recurrent and attention layers). For each:

- ``overparameterize(model, 3)`` keeps the function (largest difference relative to the
  output's scale);
- a backward pass and an SGD step (with weight decay) run and move the factors;
- ``merge_model`` gives the same function and loads strictly into a fresh instance;
- a full-rank cut (``Uniform(1.0)``) gives the merged model's function;
- ``Budget(50)`` and ``FlopBudget(50)`` cuts: the counted params / FLOPs (``count_cost``) are
  at or below the original's, within the budget when it is met, near it, and as the cut's
  ``lorita_budget`` reports;
- ``save`` -> ``load(path, model=fresh)`` gives exactly the cut's outputs;
- ``export_onnx`` of the cut runs in onnxruntime with the cut's outputs, wherever
  ``torch.onnx.export`` of the original model works.

    OMP_NUM_THREADS=1 python bench/models_sweep.py [--models NAME ...] [--list]

Prints one table row per model and the wall time; exits 1 when any row fails.
tests/test_models_nobody_picked_qa.py runs a subset of these rows.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lorita as lt  # noqa: E402

TOL = 1e-4  # relative to the output's scale (max(1, |out|_max))
NEAR = 15.0  # a budget cut that is met keeps within this many points of the budget


# --- hand-written models -------------------------------------------------------------------


class GroupedConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.grouped = nn.Conv2d(32, 64, 3, padding=1, groups=4, bias=False)
        self.bn = nn.BatchNorm2d(64)
        self.head = nn.Linear(64, 10)

    def forward(self, x):  # (B, 3, H, W)
        x = F.relu(self.bn(self.grouped(F.relu(self.stem(x)))))
        return self.head(x.mean((2, 3)))


class DepthwiseSeparable(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.pw = nn.Conv2d(32, 64, 1)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.pw(F.relu(self.dw(F.relu(self.stem(x))))))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class SE(nn.Module):
    def __init__(self, c: int, r: int = 4):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, c // r, 1), nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class SENet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.se1 = SE(32)
        self.conv2 = nn.Conv2d(32, 48, 3, stride=2, padding=1)
        self.se2 = SE(48)
        self.fc = nn.Linear(48, 10)

    def forward(self, x):
        x = self.se1(F.relu(self.conv1(x)))
        x = self.se2(F.relu(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


class TiedLM(nn.Module):
    """A token model whose output layer shares the embedding's weight (weight tying)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(100, 32)
        self.mix = nn.Linear(32, 32)
        self.head = nn.Linear(32, 100, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):  # (B, T) -> (B, T, 100)
        return self.head(torch.tanh(self.mix(self.emb(ids))))


class TiedAutoencoder(nn.Module):
    """The decoder reads the encoder's weight transposed (F.linear with enc.weight.t())."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(48, 24)
        self.dec_bias = nn.Parameter(torch.zeros(48))

    def forward(self, x):
        return F.linear(torch.relu(self.enc(x)), self.enc.weight.t(), self.dec_bias)


class TwoInputs(nn.Module):
    """An image and a vector of metadata."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.meta = nn.Linear(6, 16)
        self.head = nn.Linear(32, 5)

    def forward(self, img, meta):
        a = F.relu(self.conv(img)).mean((2, 3))
        return self.head(torch.cat([a, F.relu(self.meta(meta))], 1))


class TwoHeads(nn.Module):
    """A tuple out: class scores and a box."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 64), nn.ReLU())
        self.cls, self.box = nn.Linear(64, 10), nn.Linear(64, 4)

    def forward(self, x):
        h = self.body(x)
        return self.cls(h), self.box(h)


class DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(20, 64)
        self.a, self.b = nn.Linear(64, 3), nn.Linear(64, 7)

    def forward(self, x):
        h = F.gelu(self.trunk(x))
        return {"logits": self.a(h), "aux": self.b(h)}


class WithBuffers(nn.Module):
    """Normalises with buffers (mean, std) and counts its calls in another."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long), persistent=False)
        self.conv = nn.Conv2d(3, 24, 3, padding=1)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        self.calls += 1
        return self.fc(F.relu(self.conv((x - self.mean) / self.std)).amax((2, 3)))


class FunctionalParams(nn.Module):
    """Its own Parameters used through F.conv2d / F.linear, not through layers."""

    def __init__(self):
        super().__init__()
        self.w_conv = nn.Parameter(torch.randn(16, 3, 3, 3) * 0.2)
        self.w_fc = nn.Parameter(torch.randn(10, 16) * 0.2)
        self.b_fc = nn.Parameter(torch.zeros(10))
        self.proj = nn.Linear(10, 10)

    def forward(self, x):
        h = F.relu(F.conv2d(x, self.w_conv, padding=1)).mean((2, 3))
        return self.proj(F.linear(h, self.w_fc, self.b_fc))


class ReadsLayerWeights(nn.Module):
    """Calls F.conv2d / F.linear with its layers' own weights (as a custom kernel would)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.fc = nn.Linear(32, 32)
        self.out = nn.Linear(32, 10)

    def forward(self, x):
        h = F.relu(F.conv2d(x, self.conv.weight, self.conv.bias, padding=1)).mean((2, 3))
        return self.out(F.relu(F.linear(h, self.fc.weight, self.fc.bias)))


class ResidualMLP(nn.Module):
    def __init__(self, d: int = 64):
        super().__init__()
        self.inp = nn.Linear(32, d)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
            for _ in range(2)
        )
        self.out = nn.Linear(d, 10)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = h + b(h)
        return self.out(h)


class SharedTwice(nn.Module):
    """One Linear called twice in a forward pass."""

    def __init__(self):
        super().__init__()
        self.inp, self.shared, self.out = nn.Linear(16, 48), nn.Linear(48, 48), nn.Linear(48, 4)

    def forward(self, x):
        h = F.relu(self.inp(x))
        return self.out(F.relu(self.shared(F.relu(self.shared(h)))))


class RecurrentTagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(60, 24)
        self.rnn = nn.GRU(24, 32, batch_first=True)
        self.fc = nn.Linear(32, 32)
        self.out = nn.Linear(32, 6)

    def forward(self, ids):
        h, _ = self.rnn(self.emb(ids))
        return self.out(F.relu(self.fc(h[:, -1])))


class TinyTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(12, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.out = nn.Linear(32, 5)

    def forward(self, x):  # (B, T, 12)
        return self.out(self.enc(self.inp(x)).mean(1))


class AttentionPool(nn.Module):
    """nn.MultiheadAttention with a learned query, kdim/vdim different from embed_dim."""

    def __init__(self):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, 32) * 0.1)
        self.attn = nn.MultiheadAttention(32, 4, kdim=20, vdim=20, batch_first=True)
        self.out = nn.Linear(32, 3)

    def forward(self, tokens):  # (B, T, 20)
        q = self.query.expand(tokens.shape[0], -1, -1)
        o, _ = self.attn(q, tokens, tokens, need_weights=False)
        return self.out(o[:, 0])


class Conv1dAudio(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(1, 16, 5, stride=2)
        self.c2 = nn.Conv1d(16, 32, 5, stride=2)
        self.fc = nn.Linear(32, 8)

    def forward(self, x):  # (B, 1, T)
        return self.fc(F.relu(self.c2(F.relu(self.c1(x)))).mean(-1))


class OddConvs(nn.Module):
    """Dilated, strided, reflect-padded, rectangular-kernel convolutions without bias."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, (3, 5), padding=(1, 2), padding_mode="reflect", bias=False)
        self.b = nn.Conv2d(16, 32, 3, dilation=2, padding=2, stride=2)
        self.c = nn.Conv2d(32, 32, 1, bias=False)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(F.relu(self.c(F.relu(self.b(F.relu(self.a(x)))))).mean((2, 3)))


def _flat_mlp():
    return nn.Sequential(
        nn.Flatten(), nn.Linear(3 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
        nn.Linear(64, 10),
    )  # fmt: skip


def _img(side: int, batch: int = 2, c: int = 3):
    return lambda: torch.randn(batch, c, side, side, generator=torch.Generator().manual_seed(1))


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(1)


# --- timm models ---------------------------------------------------------------------------


def _timm(name: str, **kw) -> Callable[[], nn.Module]:
    def build():
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10, **kw)

    return build


def _timm_class(module: str, cls: str, **kw) -> Callable[[], nn.Module]:
    def build():
        import importlib

        return getattr(importlib.import_module(f"timm.models.{module}"), cls)(num_classes=10, **kw)

    return build


_SMALL_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}

#: name -> (constructor of a fresh instance, constructor of the example input)
MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], object]]] = {
    # timm: convolutional
    "timm:resnet10t": (_timm("resnet10t"), _img(32)),
    "timm:convnext_atto": (_timm("convnext_atto"), _img(32)),
    "timm:efficientnet_b0": (_timm("efficientnet_b0"), _img(32)),
    "timm:mobilenetv3_small_050": (_timm("mobilenetv3_small_050"), _img(32)),
    "timm:regnetx_002": (_timm("regnetx_002"), _img(32)),
    "timm:resnest14d": (_timm("resnest14d"), _img(64)),
    "timm:ghostnet_050": (_timm("ghostnet_050"), _img(32)),
    "timm:rexnet_100": (_timm("rexnet_100"), _img(32)),
    "timm:repvgg_a0": (_timm("repvgg_a0"), _img(32)),
    "timm:mobileone_s0": (_timm("mobileone_s0"), _img(64)),
    "timm:hgnetv2_b0": (_timm("hgnetv2_b0"), _img(64)),
    "timm:convmixer (small)": (
        _timm_class("convmixer", "ConvMixer", dim=32, depth=2, kernel_size=3, patch_size=4),
        _img(32),
    ),
    # timm: hybrids and MetaFormers
    "timm:mobilevit_xxs": (_timm("mobilevit_xxs"), _img(64)),
    "timm:edgenext_xx_small": (_timm("edgenext_xx_small"), _img(64)),
    "timm:poolformer_s12": (_timm("poolformer_s12"), _img(32)),
    "timm:fastvit_t8": (_timm("fastvit_t8"), _img(64)),
    "timm:levit_128s": (_timm("levit_128s", img_size=64), _img(64)),
    "timm:efficientvit_b0": (_timm("efficientvit_b0"), _img(64)),
    "timm:pvt_v2_b0": (_timm("pvt_v2_b0"), _img(64)),
    "timm:coat_lite_tiny": (_timm("coat_lite_tiny", img_size=64), _img(64)),
    # timm: attention
    "timm:deit_tiny": (_timm("deit_tiny_patch16_224", img_size=32), _img(32)),
    "timm:vit (small)": (_timm_class("vision_transformer", "VisionTransformer", **_SMALL_VIT), _img(32)),
    "timm:swin (small)": (
        _timm_class(
            "swin_transformer", "SwinTransformer", img_size=32, patch_size=4, window_size=4,
            embed_dim=16, depths=(1, 1), num_heads=(1, 2),
        ),
        _img(32),
    ),  # fmt: skip
    "timm:cait (small)": (_timm_class("cait", "Cait", depth_token_only=1, **_SMALL_VIT), _img(32)),
    "timm:xcit (small)": (
        _timm_class("xcit", "Xcit", cls_attn_layers=1, **_SMALL_VIT), _img(32)
    ),
    "timm:eva rope swiglu (small)": (
        _timm_class("eva", "Eva", use_rot_pos_emb=True, swiglu_mlp=True, **_SMALL_VIT), _img(32)
    ),
    "timm:beit (small)": (
        _timm_class("beit", "Beit", use_rel_pos_bias=True, **_SMALL_VIT), _img(32)
    ),
    "timm:convit (small)": (
        _timm_class("convit", "ConVit", local_up_to_layer=1, **{**_SMALL_VIT, "embed_dim": 48}),
        _img(32),
    ),
    # timm: MLPs
    "timm:mixer (small)": (
        _timm_class("mlp_mixer", "MlpMixer", img_size=32, patch_size=8, num_blocks=2, embed_dim=64),
        _img(32),
    ),
    "timm:mixer_s16_224": (_timm("mixer_s16_224", img_size=64), _img(64)),
    # hand-written
    "Sequential(Flatten, Linear...)": (_flat_mlp, _img(8)),
    "grouped conv + BN": (GroupedConvNet, _img(16)),
    "depthwise-separable": (DepthwiseSeparable, _img(16)),
    "squeeze-excitation": (SENet, _img(16)),
    "odd convs (dilated, reflect, 3x5)": (OddConvs, _img(16)),
    "weight-tied LM head": (TiedLM, lambda: torch.randint(0, 100, (2, 7), generator=_gen())),
    "tied autoencoder (W^T)": (TiedAutoencoder, lambda: torch.randn(2, 48, generator=_gen())),
    "two inputs (image, meta)": (
        TwoInputs, lambda: (_img(16)(), torch.randn(2, 6, generator=_gen()))
    ),
    "two outputs (tuple)": (TwoHeads, _img(16)),
    "dict output": (DictOut, lambda: torch.randn(2, 20, generator=_gen())),
    "buffers (mean/std, counter)": (WithBuffers, _img(16)),
    "own Parameters via F.conv2d/F.linear": (FunctionalParams, _img(16)),
    "layer weights via F.conv2d/F.linear": (ReadsLayerWeights, _img(16)),
    "residual MLP + LayerNorm": (ResidualMLP, lambda: torch.randn(2, 32, generator=_gen())),
    "one layer called twice": (SharedTwice, lambda: torch.randn(2, 16, generator=_gen())),
    "GRU tagger": (RecurrentTagger, lambda: torch.randint(0, 60, (2, 9), generator=_gen())),
    "TransformerEncoder": (TinyTransformer, lambda: torch.randn(2, 6, 12, generator=_gen())),
    "MultiheadAttention pool (kdim)": (
        AttentionPool, lambda: torch.randn(2, 5, 20, generator=_gen())
    ),
    "Conv1d audio": (Conv1dAudio, lambda: torch.randn(2, 1, 64, generator=_gen())),
}  # fmt: skip


# --- the checks ----------------------------------------------------------------------------


def fresh(name: str) -> nn.Module:
    """A new instance, seeded; a layer initialised to zero (timm's MLP-Mixer head) is given
    small random weights, or every comparison after it would be exact for no merit."""
    torch.manual_seed(0)
    model = MODELS[name][0]().eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)) and not m.weight.any():
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.02)
    return model


def example(name: str):
    return MODELS[name][1]()


def call(model: nn.Module, x):
    if isinstance(x, tuple):
        return model(*x)
    if isinstance(x, dict):
        return model(**x)
    return model(x)


def outputs(out) -> list[torch.Tensor]:
    """Every tensor of a model's output, in order (a tensor, a tuple / list, a dict)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in outputs(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in outputs(v)]
    return []


def rel(a, b) -> float:
    """Largest difference of two outputs relative to ``b``'s scale (inf if shapes differ)."""
    xs, ys = outputs(a), outputs(b)
    if len(xs) != len(ys) or any(x.shape != y.shape for x, y in zip(xs, ys)):
        return float("inf")
    worst = 0.0
    for x, y in zip(xs, ys):
        y = y.detach().float()
        d = (x.detach().float() - y).abs().max() / max(1.0, float(y.abs().max()))
        worst = max(worst, float(d))
    return worst


def _train_step(model: nn.Module, x) -> str | None:
    """One SGD step with weight decay; None when it runs, is finite and moves a factor."""
    model = copy.deepcopy(model).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, weight_decay=1e-3)
    before = {k: p.detach().clone() for k, p in model.named_parameters() if "factors" in k}
    loss = sum(o.float().pow(2).mean() for o in outputs(call(model, x)))
    loss.backward()
    if not torch.isfinite(loss):
        return "loss not finite"
    opt.step()
    moved = [
        k for k, p in model.named_parameters() if k in before and not torch.equal(p, before[k])
    ]
    if before and not moved:
        return "no factor moved"
    return None


def _budget(model, net_cost, x, policy: lt.Budget, row: dict, cuts: list) -> str | None:
    """A budget cut's counted cost (``count_cost``) against the original's and the budget."""
    measure = policy.measure
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cut = lt.truncate(model, policy, example_input=x)
    cuts.append(cut)
    cost = lt.count_cost(cut, x)
    got = cost.params if measure == "params" else cost.flops
    base = net_cost.params if measure == "params" else net_cost.flops
    facts = cut.lorita_budget
    pct = 100.0 * got / base
    problems = []
    if got > base:
        problems.append(f"bigger than the original ({pct:.1f}%)")
    if facts["met"] and pct > policy.percent + 1e-9:
        problems.append(f"reported met but counts {pct:.1f}% > {policy.percent:g}%")
    if facts["met"] and pct < policy.percent - NEAR:
        problems.append(f"far below the budget ({pct:.1f}%)")
    if abs(facts["kept_pct"] - pct) > 0.5:
        problems.append(f"reports {facts['kept_pct']:.1f}%, counts {pct:.1f}%")
    if not facts["met"] and not any("budget" in str(w.message) for w in caught):
        problems.append("unmet without a warning")
    row["budget" if measure == "params" else "flop_budget"] = {"pct": pct, "met": facts["met"]}
    return "; ".join(problems) or None


def _onnx(name: str, cuts: list[nn.Module], x, d: str, row: dict) -> str | None:
    """The cut's ONNX file in onnxruntime against the cut, where torch.onnx.export of the
    original model works."""
    import onnxruntime as ort

    if not cuts:
        return "no cut to export"
    args = x if isinstance(x, tuple) else (x,)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(fresh(name), args, f"{d}/orig.onnx", dynamo=False)
    except Exception as e:  # noqa: BLE001 - the original's own exporter failure is a fact
        row["onnx"] = f"n/a (torch.onnx.export of the original: {type(e).__name__})"
        return None
    path = lt.export_onnx(cuts[0], x, f"{d}/cut.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    flat = list(x.values()) if isinstance(x, dict) else list(args)
    feed = {i.name: t.numpy() for i, t in zip(session.get_inputs(), flat)}
    got = [torch.from_numpy(o) for o in session.run(None, feed)]
    with torch.no_grad():
        want = outputs(call(cuts[0], x))
    row["onnx"], row["onnx_diff"] = "ok", rel(got, want)
    return f"onnxruntime differs by {row['onnx_diff']:.1e}" if row["onnx_diff"] > 1e-3 else None


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"


def _compose(name: str, net: nn.Module, x, want, row: dict) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lt.overparameterize(net, 3, example_input=x).eval()
    rows = lt.composition_summary(model)["layers"]
    row["composed"] = sum(r["action"] == "composed" for r in rows)
    row["left"] = sum(r["action"] == "left" for r in rows)
    with torch.no_grad():
        row["compose"] = rel(call(model, x), want)
    return model


def check(name: str, *, onnx: bool = True) -> dict:
    """Every step of the path on one model; each step's number or its error (a step that
    raises is a row's error naming the step, and the sweep goes on)."""
    t0 = time.perf_counter()
    row: dict = {"model": name, "errors": []}
    net, x = fresh(name), example(name)
    with torch.no_grad():
        want = call(net, x)
    try:
        model = _compose(name, net, x, want, row)
    except Exception as e:  # noqa: BLE001 - a row per model, not the end of the sweep
        row["errors"].append(f"compose: {_error(e)}")
        row["seconds"] = time.perf_counter() - t0
        return row
    net_cost = lt.count_cost(net, x)
    cuts: list[nn.Module] = []
    with tempfile.TemporaryDirectory() as d:
        steps = {
            "compose": lambda: f"differs by {row['compose']:.1e}" if row["compose"] > TOL else None,
            "train": lambda: _train_step(model, x),
            "merge": lambda: _merge(name, model, x, want, row),
            "full": lambda: _full(model, x, row),
            "budget": lambda: _budget(model, net_cost, x, lt.Budget(50), row, cuts),
            "flop_budget": lambda: _budget(model, net_cost, x, lt.FlopBudget(50), row, cuts),
            "load": lambda: _load(name, cuts, x, d, row),
            "onnx": lambda: _onnx(name, cuts, x, d, row) if onnx else None,
        }
        for step, run in steps.items():
            try:
                problem = run()
            except Exception as e:  # noqa: BLE001
                problem = _error(e)
            if problem:
                row["errors"].append(f"{step}: {problem}")
    row["seconds"] = time.perf_counter() - t0
    return row


def _load(name: str, cuts: list[nn.Module], x, d: str, row: dict) -> str | None:
    if not cuts:
        return "no cut to save"
    path = lt.save(cuts[0], f"{d}/m.safetensors")
    back = lt.load(path, model=fresh(name))
    with torch.no_grad():
        row["load"] = rel(call(back, x), call(cuts[0], x))
    return f"differs by {row['load']:.1e}" if row["load"] != 0 else None


def _merge(name: str, model: nn.Module, x, want, row: dict) -> str | None:
    merged = lt.merge_model(model)
    with torch.no_grad():
        row["merge"] = rel(call(merged, x), want)
    again = fresh(name)
    again.load_state_dict(merged.state_dict(), strict=True)
    with torch.no_grad():
        strict = rel(call(again.eval(), x), want)
    worst = max(row["merge"], strict)
    return f"differs by {worst:.1e}" if worst > TOL else None


def _full(model: nn.Module, x, row: dict) -> str | None:
    full = lt.truncate(model, lt.Uniform(1.0), example_input=x)
    with torch.no_grad():
        row["full"] = rel(call(full, x), call(lt.merge_model(model), x))
    return f"differs by {row['full']:.1e}" if row["full"] > TOL else None


def _num(row: dict, key: str) -> str:
    return f"{row[key]:.0e}" if key in row else "-"


def line(r: dict) -> str:
    def pct(key):
        return f"{r[key]['pct']:.0f}%" + ("" if r[key]["met"] else " (unmet)") if key in r else "-"

    onnx = r.get("onnx", "-")
    if onnx == "ok":
        onnx = f"ok {r['onnx_diff']:.0e}"
    result = "ok" if not r["errors"] else "; ".join(r["errors"])
    return (
        f"| {r['model']} | {r.get('composed', '-')}/{r.get('left', '-')} | {_num(r, 'compose')} "
        f"| {_num(r, 'merge')} | {_num(r, 'full')} | {pct('budget')} | {pct('flop_budget')} "
        f"| {_num(r, 'load')} | {onnx} | {r['seconds']:.1f} | {result} |"
    )


HEADER = (
    "| model | composed/left | compose diff | merge diff | full-rank diff | params at Budget(50) "
    "| FLOPs at FlopBudget(50) | load diff | ONNX | s | result |\n"
    "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---|"
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="*", help="names from --list (default: all)")
    ap.add_argument("--list", action="store_true", help="list the model names and exit")
    ap.add_argument("--no-onnx", action="store_true", help="skip the ONNX step")
    args = ap.parse_args()
    if args.list:
        print("\n".join(MODELS))
        return 0
    unknown = [m for m in args.models or () if m not in MODELS]
    if unknown:
        print(f"--models: unknown {unknown}; see --list", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    t0 = time.perf_counter()
    print(HEADER, flush=True)
    rows = []
    for name in args.models or MODELS:
        row = check(name, onnx=not args.no_onnx)
        rows.append(row)
        print(line(row), flush=True)
    ok = sum(not r["errors"] for r in rows)
    print(f"\n{ok} of {len(rows)} models pass; wall time {time.perf_counter() - t0:.0f} s")
    return 0 if ok == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
