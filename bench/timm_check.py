"""timm models through LoRITa with no options: ``overparameterize(model, 3)`` keeps the
function, what is left is left for a reason (depthwise, or a layer whose own forward does more
with its weight), a ``Uniform(0.25)`` cut lowers the counted FLOPs, and ``save`` ->
``load(model=fresh)`` gives the same outputs. One family member each, across timm's
convolutional, attention, MLP and hybrid families, at a small input side.

    python bench/timm_check.py [--models resnet10t levit_128s:224] [--out docs/timm.md]

Needs timm (``pip install timm``; an optional extra of the project). Prints one line per model;
``--out`` writes the table as markdown.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lorita as lt  # noqa: E402
from lorita.convert import composition_summary  # noqa: E402

#: name:side; vit/deit-style models are built for the side (img_size), the rest take it as is
MODELS = (
    "resnet10t:32 regnety_002:32 regnetz_b16:64 resnest14d:64 res2net50_14w_8s:64 dla34:64 "
    "dpn48b:64 cspresnet50:64 vovnet39a:64 selecsls42b:64 hrnet_w18_small:64 tresnet_m:224 "
    "densenet121:32 inception_v3:299 xception41:64 repvgg_a0:32 mobileone_s0:64 "
    "efficientnet_b0:32 tinynet_e:64 mobilenetv4_conv_small:64 ghostnet_050:32 "
    "ghostnetv2_100:64 rexnet_100:32 hgnetv2_b0:64 repvit_m0_9:64 fastvit_t8:64 "
    "convnext_atto:32 inception_next_tiny:64 edgenext_xx_small:64 convmixer_768_32:32 "
    "poolformer_s12:32 efficientformer_l1:224 efficientvit_b0:64 efficientvit_m0:224 "
    "mobilevit_xxs:64 levit_128s:224 nfnet_l0:32 nf_resnet26:32 eca_nfnet_l0:32 "
    "vit_tiny_patch16_224:32 deit_tiny_patch16_224:32 beit_base_patch16_224:224 "
    "eva02_tiny_patch14_224:224 cait_xxs24_224:224 pit_ti_224:224 crossvit_tiny_240:240 "
    "xcit_nano_12_p16_224:224 convit_tiny:224 tnt_s_patch16_224:224 volo_d1_224:224 "
    "visformer_tiny:224 coat_lite_tiny:224 nest_tiny:224 twins_svt_small:64 pvt_v2_b0:64 "
    "mvitv2_tiny:224 gcvit_xxtiny:224 davit_tiny:64 focalnet_tiny_srf:64 "
    "coatnet_nano_rw_224:224 maxvit_nano_rw_256:256 mixer_s16_224:224 resmlp_12_224:224 "
    "gmlp_ti16_224:224 sequencer2d_s:224"
).split()
TOL = 1e-4


def _build(timm, name: str, side: int):
    kw = {"img_size": side} if name.startswith(("vit_", "deit_")) else {}
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=10, **kw).eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) / max(1.0, float(b.abs().max()))


def check(timm, spec: str) -> dict:
    name, side = spec.split(":")[0], int(spec.split(":")[1])
    t0 = time.perf_counter()
    row = {"model": name, "side": side}
    try:
        net = _build(timm, name, side)
        x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            want = net(x)
        model = lt.overparameterize(net, 3, example_input=x).eval()
        with torch.no_grad():
            row["function"] = _rel(model(x), want)
        rows = composition_summary(model)["layers"]
        left = [r for r in rows if r["action"] == "left"]
        row["composed"] = sum(r["action"] == "composed" for r in rows)
        row["left"] = {}
        for r in left:
            row["left"][r["kind"]] = row["left"].get(r["kind"], 0) + 1
        cut = lt.truncate(model, lt.Uniform(0.25), example_input=x)
        row["flops_kept"] = lt.count_cost(cut, x).flops / lt.count_cost(net, x).flops
        with tempfile.TemporaryDirectory() as d:
            lt.save(cut, os.path.join(d, "m.safetensors"))
            again = lt.load(os.path.join(d, "m.safetensors"), model=_build(timm, name, side))
        with torch.no_grad():
            row["load"] = _rel(again(x), cut(x))
        bad = [r["name"] for r in left if r["kind"] not in ("depthwise", "own_forward")]
        ok = row["function"] < TOL and row["load"] < TOL and not bad
        row["result"] = "ok" if ok else f"left without a reason: {bad[:3]}" if bad else "differs"
    except Exception as e:  # one model's failure is a row, not the end of the run
        row["result"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    row["seconds"] = time.perf_counter() - t0
    return row


def _line(r: dict) -> str:
    if "load" not in r:
        return f"| {r['model']} | {r['side']} | - | - | - | - | - | {r['result']} |"
    left = ", ".join(f"{k} {v}" for k, v in r["left"].items()) or "-"
    return (
        f"| {r['model']} | {r['side']} | {r['composed']} | {left} | {r['function']:.1e} | "
        f"{100 * r['flops_kept']:.0f}% | {r['load']:.1e} | {r['result']} |"
    )


def write(rows: list[dict], path: Path, command: str) -> None:
    ok = sum(r["result"] == "ok" for r in rows)
    load = os.getloadavg()
    text = [
        "# timm models: what LoRITa composes, what a cut keeps",
        "",
        f"Written by `{command}` (timm {rows[0].get('timm', '?')}, torch {torch.__version__}, "
        f"{platform.machine()}, {sum(r['seconds'] for r in rows):.0f} s in all; load average "
        f"{load[0]:.2f} at the end).",
        "",
        "Each model (timm's `create_model`, random weights, 10 classes) at a small input side: "
        "`overparameterize(model, 3)` with only `example_input`; the output compared with the "
        "plain model's (largest difference relative to the output's scale); the layers left as "
        "they are, by kind (`depthwise`: nothing to gain; `own_forward`: a Linear/Conv2d "
        "subclass whose forward does more with its weight, e.g. NFNet's weight-standardised "
        "`ScaledStdConv2d`, which no composition or cut may replace); the FLOPs a "
        "`Uniform(0.25)` cut keeps; `save` -> `load(model=fresh instance)` against the cut.",
        "",
        f"**{ok} of {len(rows)} models pass.**",
        "",
        "| model | side (px) | composed | left as is | function diff | FLOPs kept | "
        "load diff | result |",
        "|---|---:|---:|---|---:|---:|---:|---|",
        *[_line(r) for r in rows],
        "",
    ]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(text))
    tmp.replace(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="*", help="name:side (default: the list in the script)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    try:
        import timm
    except ImportError:
        print("timm is not installed: pip install timm", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    rows = []
    for spec in args.models or MODELS:
        row = check(timm, spec if ":" in spec else f"{spec}:224")
        row["timm"] = timm.__version__
        rows.append(row)
        print(_line(row), f"{row['seconds']:.0f} s", flush=True)
    if args.out:
        write(rows, args.out, "python " + " ".join(["bench/timm_check.py", *sys.argv[1:]]))
    return 0 if all(r["result"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
