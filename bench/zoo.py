"""torchvision models through LoRITa at a small input size: what was composed, what a fixed cut
keeps (FLOPs, params, measured CPU latency at batch 1 and 64), save -> load(model=...) and ONNX
parity; and the classroom MLP, where a thin form can be slower than the dense layer it
replaces unless the form is chosen by measured latency.

Every model is built with weights=None (the weights do not change the costs), composed with
plain ``overparameterize(model, 3)``, merged and cut with ``Uniform(RATIO)``. Both the uncut
and the cut model are timed as they deploy (``lorita.convert.deploy_model``: BatchNorm folded
into the layer before it, channels_last memory format for a conv model); the contiguous format
is timed too, in the same process, to show what channels_last changes.

Each cut model is timed paired with the uncut model it came from: in every round, at each
batch size, the uncut model and each cut (and, at batch 64, their contiguous copies) are timed
one right after the other, each as it runs when deployed (warm-up calls, then the median of the
repeats, the same model over and over). This is done ROUNDS times, the order rotated each
round, and the medians of the quietest round (smallest sum) are kept, all from that one round
so the pairs stay paired: other work on the machine hits the neighbours of a round alike.
Alternating the models call by call (``lorita.kinds.paired_medians``) pairs more tightly but
times each call cold, after the other model's buffers: measured once that way, the cuts of
ConvNeXt and Swin read 10-20% slower than timed on their own, the uncut models much less. The per-layer times are timed
model by model (smallest median).

    python bench/zoo.py [--size 64] [--ratio 0.25] [--repeats 10] [--out docs/zoo.md]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lorita as lt  # noqa: E402
from lorita.convert import composition_summary, deploy_model  # noqa: E402
from lorita.cost import deployed_forward, layer_latency  # noqa: E402
from lorita.kinds import median_seconds  # noqa: E402

MODELS = (
    "resnet18",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "shufflenet_v2_x1_0",
    "regnet_x_400mf",
    "convnext_tiny",
    "swin_t",
    "vit_b_16",
)
BATCHES = (1, 64)
ROUNDS = 3  # paired timings per batch size; the quietest round's medians are kept
WARMUP = 3  # calls of each model before a round's paired timing (as latency_profile)
SWEEP = ("<!-- zoo_sweep: begin -->", "<!-- zoo_sweep: end -->")


def _counts(rows, action: str) -> str:
    out: dict[str, int] = {}
    for r in rows:
        if r["action"] == action:
            out[r["kind"]] = out.get(r["kind"], 0) + 1
    return ", ".join(f"{k} {v}" for k, v in sorted(out.items())) or "-"


def _forms(plan: dict) -> str:
    out: dict[str, int] = {}
    for p in plan.values():
        out[p["form"]] = out.get(p["form"], 0) + 1
    return ", ".join(f"{k} {v}" for k, v in sorted(out.items()))


def _parity(model, name: str, x, size: int, tmp: Path) -> tuple[float, float]:
    """Largest output difference after save(fold_bn=True) -> load(model=fresh) and through
    ONNX (BatchNorm folded too)."""
    import onnxruntime as ort

    fresh = lt.create_model(f"torchvision:{name}", num_classes=10, image_size=size)
    path = lt.save(model, tmp / "m.safetensors", input_shape=(3, size, size), fold_bn=True)
    back = lt.load(path, model=fresh)
    with torch.no_grad():
        want = model(x)
        d_load = float((back(x) - want).abs().max())
    onnx = lt.export_onnx(model, x, tmp / "m.onnx")
    (out,) = ort.InferenceSession(str(onnx)).run(None, {"input": x.numpy()})
    return d_load, float(np.abs(out - want.numpy()).max())


def _ratio(latency_kept: float, flops_kept: float) -> float:
    """The latency cut as a fraction of the FLOP cut (nan where nothing was cut)."""
    return (1 - latency_kept) / (1 - flops_kept) if flops_kept < 0.999 else float("nan")


def _layer_flops(cut, base) -> float:
    """FLOPs kept by the layers that run as layers (timed by layer_latency); a weight read
    directly is multiplied inside its parent module, so its FLOPs are not a layer's."""
    run = [n for n, c in base.per_layer.items() if c["flops"]]
    return sum(cut.per_layer[n]["flops"] for n in run) / sum(
        base.per_layer[n]["flops"] for n in run
    )


def _paired(groups: list[dict], repeats: int, rounds: int = ROUNDS) -> dict:
    """``{key: median seconds}`` of every group ``{key: forward}`` (the forwards of one batch
    size) timed paired: in each round every forward of a group is timed right after the other
    (its warm-up, then the median of ``repeats`` calls), so the models of a group share the
    machine's state of that moment. Done ``rounds`` times (the order rotated each round); each
    group keeps all its medians from its quietest round (smallest sum), never one model's best
    round against another's."""
    quietest: list[dict] = [{} for _ in groups]
    for r in range(rounds):
        for i, group in enumerate(groups):
            g = _rotated(group, r)
            ts = {k: median_seconds(f, repeats=repeats, warmup=WARMUP) for k, f in g.items()}
            if not quietest[i] or sum(ts.values()) < sum(quietest[i].values()):
                quietest[i] = ts
    return {k: v for q in quietest for k, v in q.items()}


def _rotated(group: dict, r: int) -> dict:
    """``group`` in an order rotated by ``r``: no model always runs right after the same one."""
    keys = list(group)
    r %= len(keys)
    return {k: group[k] for k in keys[r:] + keys[:r]}


def _timings(models: dict, x, repeats: int, rounds: int = ROUNDS) -> dict:
    """Each model's latency at BATCHES as it deploys, every cut timed paired with the uncut
    model (``models["base"]``) round by round (:func:`_paired`), the time inside its layers
    (model by model) and, uncut and FLOPs-cut only, its latency in the contiguous memory
    format at batch 64, paired with the batch-64 timing. Paired times come from each batch
    size's quietest round; the layer times are the smallest of ``rounds`` medians."""
    fwd = {k: deployed_forward(m, x, batches=BATCHES) for k, m in models.items()}
    groups = [{(k, b): fwd[k][b] for k in models} for b in BATCHES]
    groups[BATCHES.index(64)] |= {
        (k, "contiguous"): deployed_forward(models[k], x, batches=(64,), channels_last=False)[64]
        for k in ("base", "cut")
    }
    paired = _paired(groups, repeats, rounds)
    best: dict = {}  # (model, "per_layer"): its layer times from its quietest round
    for _ in range(rounds):
        for k, m in models.items():
            per = layer_latency(m, x, repeats=repeats, batch=64)
            if (k, "per_layer") not in best or sum(per.values()) < best[k, "layers"]:
                best[k, "per_layer"], best[k, "layers"] = per, sum(per.values())
    out = {k: {b: paired[k, b] for b in BATCHES} for k in models}
    return out | best | {key: v for key, v in paired.items() if key[1] == "contiguous"}


def _thin_ratio(plan: dict, t_base: dict, t_cut: dict, base, cut) -> float:
    """The latency cut / FLOP cut of the layers given the thin form alone (their time in the
    cut model against the same layers' time uncut, batch 64); nan if none is thin."""
    thin = [n for n, p in plan.items() if p["form"] == "thin"]
    if not thin:
        return float("nan")
    flops = sum(cut.per_layer[n]["flops"] for n in thin) / sum(
        base.per_layer[n]["flops"] for n in thin
    )
    return _ratio(sum(t_cut[n] for n in thin) / sum(t_base[n] for n in thin), flops)


def bench_model(name: str, size: int, ratio: float, repeats: int, tmp: Path) -> dict:
    t0 = time.perf_counter()
    torch.manual_seed(0)
    plain = lt.create_model(f"torchvision:{name}", num_classes=10, image_size=size).eval()
    x = torch.randn(2, 3, size, size)
    composed = lt.overparameterize(plain, 3)
    rows = composition_summary(composed)["layers"]
    merged = lt.merge_model(composed).eval()
    svd = lt.layer_svd(composed)
    cut = lt.truncate(composed, lt.Uniform(ratio), svd=svd)
    by_lat = lt.truncate(
        composed, lt.Uniform(ratio), svd=svd, by="latency", example_input=x, batch=64
    )
    base_cost, cut_cost = lt.count_cost(merged, x[:1]), lt.count_cost(cut, x[:1])
    t = _timings({"base": merged, "cut": cut, "lat": by_lat}, x, repeats)
    t_base, t_cut, t_lat = t["base"], t["cut"], t["lat"]
    layers_base, layers_cut = t["base", "layers"], t["cut", "layers"]
    contig = {k: t[k, "contiguous"] for k in ("base", "cut")}
    deploy = deploy_model(merged, x)
    n_bn = sum(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in merged.modules())
    d_load, d_onnx = _parity(cut, name, x, size, tmp)
    flops = cut_cost.flops / base_cost.flops
    lat_cost = lt.count_cost(by_lat, x[:1])
    flops_lat = lat_cost.flops / base_cost.flops
    per_base, per_lat = t["base", "per_layer"], t["lat", "per_layer"]
    lat = {b: t_cut[b] / t_base[b] for b in BATCHES}
    return {
        "model": name,
        "composed": _counts(rows, "composed"),
        "left": _counts(rows, "left"),
        "forms": _forms(cut.lorita_plan),
        "params": cut_cost.params / base_cost.params,
        "flops": flops,
        "lat": lat,
        "ms": {b: 1000 * t_base[b] for b in BATCHES},
        "ratio64": _ratio(lat[64], flops),
        "lat_by_latency": t_lat[64] / t_base[64],
        "forms_by_latency": _forms(by_lat.lorita_plan),
        "flops_by_latency": flops_lat,
        "ratio_by_latency": _ratio(t_lat[64] / t_base[64], flops_lat),
        "thin_ratio_by_latency": _thin_ratio(
            by_lat.lorita_plan, per_base, per_lat, base_cost, lat_cost
        ),
        "outside": 1 - layers_base / t_base[64],
        "layers_ratio": _ratio(layers_cut / layers_base, _layer_flops(cut_cost, base_cost)),
        "folded": f"{len(deploy.lorita_deploy['folded'])}/{n_bn}",
        "memory_format": deploy.lorita_deploy["memory_format"],
        "cl_speedup": {k: contig[k] / t for k, t in (("base", t_base[64]), ("cut", t_cut[64]))},
        "ratio64_contig": _ratio(contig["cut"] / contig["base"], flops),
        "d_load": d_load,
        "d_onnx": d_onnx,
        "seconds": time.perf_counter() - t0,
    }


def bench_mlp(width: int, repeats: int) -> list[dict]:
    """The classroom MLP (3 hidden layers on 28x28 inputs) cut to a quarter of its ranks: the
    thin form chosen by FLOPs, then by latency measured at each batch size."""
    torch.manual_seed(0)
    mlp = lt.create_model("mlp", in_channels=1, image_size=28, num_classes=10, width=width)
    composed = lt.overparameterize(mlp, 3).eval()
    x = torch.randn(2, 1, 28, 28)
    svd = lt.layer_svd(composed)
    base_flops = lt.count_cost(svd.model, x[:1]).flops
    variants = [("flops", None)] + [("latency", b) for b in BATCHES]
    cuts = {
        (by, batch): lt.truncate(
            composed, lt.Uniform(0.25), svd=svd, by=by, example_input=x, batch=batch or 64
        )
        for by, batch in variants
    }
    models = {"base": svd.model, **cuts}
    fwd = {k: deployed_forward(m, x, batches=BATCHES) for k, m in models.items()}
    groups = [{(k, b): fwd[k][b] for k in models} for b in BATCHES]
    best = _paired(groups, repeats)  # every cut paired with the uncut model (as _timings)
    return [
        {
            "width": width,
            "by": by if batch is None else f"latency @ batch {batch}",
            "forms": _forms(cut.lorita_plan),
            "flops": lt.count_cost(cut, x[:1]).flops / base_flops,
            "lat": {b: best[(by, batch), b] / best["base", b] for b in BATCHES},
        }
        for (by, batch), cut in cuts.items()
    ]


def _pct(v: float) -> str:
    return f"{100 * v:.0f}%"


def _r(v: float) -> str:
    return "-" if v != v else f"{v:.2f}"  # nan: nothing cut


def render(rows, mlp_rows, args, load) -> str:
    lines = [
        f"torchvision models (weights=None, 10 classes) at {args.size}x{args.size} px, composed "
        f"with `overparameterize(model, 3)` and cut with `Uniform({args.ratio})` (form chosen "
        f"by FLOPs unless said). CPU, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}. Latency is timed paired: in each round, at each batch size, the "
        "uncut model and each of its cuts are timed one right after the other (warm-up calls, "
        f"then the median of {args.repeats} calls of the same model, as it runs deployed), so "
        f"other work on the machine hits them alike; of {ROUNDS} such rounds (the order "
        "rotated each round) the quietest one's medians are kept, all from that one round. "
        "Both the uncut "
        "and the cut model are timed as they deploy (`lorita.convert.deploy_model`: eval mode, "
        "every BatchNorm that follows a Conv2d/Linear alone folded into it, channels_last "
        f"memory format for a convolutional model). Load average while measuring: {load}.",
        "",
        "| model | composed | left as is | cut forms | params kept | FLOPs kept "
        "| BatchNorm folded | save(fold_bn=True)->load(model=) max diff | ONNX max diff |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['composed']} | {r['left']} | {r['forms']} | "
            f"{_pct(r['params'])} | {_pct(r['flops'])} | {r['folded']} | {r['d_load']:.1e} | "
            f"{r['d_onnx']:.1e} |"
        )
    lines += [
        "",
        "Latency: the uncut model's time, the share of its batch-64 time spent outside the "
        "Linear/Conv2d layers (norms, activations, pooling, attention products: nothing a "
        "rank cut shrinks), the time kept by the FLOPs-chosen cut, the latency cut as a "
        "fraction of the FLOP cut for the whole model and for the layers alone (their time "
        "against their own FLOPs), and the cut "
        "with each layer's form chosen by latency at batch 64 (forms; FLOPs kept; latency "
        "kept; ratio) and, for that cut, the ratio of the layers given the thin form alone "
        "(their time against the same layers' time uncut, their FLOPs against theirs).",
        "",
        "| model | uncut ms b=1 | uncut ms b=64 | outside layers (b=64) | latency kept b=1 "
        "| latency kept b=64 | latency cut / FLOP cut (b=64) | layers alone | form by latency "
        "(b=64) | its thin layers alone |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['ms'][1]:.1f} | {r['ms'][64]:.0f} | {_pct(r['outside'])} | "
            f"{_pct(r['lat'][1])} | {_pct(r['lat'][64])} | {_r(r['ratio64'])} | "
            f"{_r(r['layers_ratio'])} | {r['forms_by_latency']}; {_pct(r['flops_by_latency'])}; "
            f"{_pct(r['lat_by_latency'])}; {_r(r['ratio_by_latency'])} | "
            f"{_r(r['thin_ratio_by_latency'])} |"
        )
    met = [r["model"] for r in rows if r["ratio64"] >= 0.8]
    thin = [r for r in rows if r["flops_by_latency"] < 0.999]
    met_lat = [r["model"] for r in thin if r["ratio_by_latency"] >= 0.8]
    lines += [
        "",
        "Target: where the thin form applies, the latency cut at batch 64 is at least 80% of the "
        f"FLOP cut (ratio >= 0.80). Forms by FLOPs: met by {len(met)} of {len(rows)} "
        f"({', '.join(met) or '-'}). Forms by latency: the thin form pays on this machine for "
        f"{len(thin)} of {len(rows)} ({', '.join(r['model'] for r in thin) or '-'}), of which "
        f"{len(met_lat)} meet the target ({', '.join(met_lat) or '-'}); elsewhere the cut "
        "stays dense and runs as fast as the uncut model.",
        "",
        "Memory format, measured at batch 64 paired with the deployed models, round by round "
        "(BatchNorm folded both times): how many times faster each model runs in the format it deploys in than in "
        "the contiguous format, and the latency cut / FLOP cut ratio in each.",
        "",
        "| model | deployed as | uncut: speed-up | cut: speed-up | ratio contiguous "
        "| ratio deployed |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['memory_format']} | {r['cl_speedup']['base']:.2f}x | "
            f"{r['cl_speedup']['cut']:.2f}x | {_r(r['ratio64_contig'])} | {_r(r['ratio64'])} |"
        )
    lines += [
        "",
        "Even when every thin layer runs in exactly its share of FLOPs, the latency cut is at "
        "most (1 - outside share) of the FLOP cut: the `outside layers` column bounds what a "
        "rank cut can reach at this input size, and `layers alone` is how close the thin "
        "layers themselves come. Where `its thin layers alone` is also under 0.80, the thin "
        "layers the latency choice keeps (each faster than its dense form) do not run in "
        "their share of FLOPs either: small 1x1 and grouped convolutions move about as many "
        "bytes in two thin layers as in one dense one.",
        "",
        "Dense-cut layers (`direct`: Swin's `qkv` and `proj`) keep their cost: their weight "
        "is read by the model itself, so the thin form cannot be what it calls; they stay "
        "dense with the rank-r weight and the FLOPs above are the measured ones. An "
        "nn.MultiheadAttention (a ViT's) is replaced by `LowRankMultiheadAttention`, called "
        "as it was, whose thin q, k, v projections and output projection are layers it calls.",
        "",
        "Timings come from a shared 2-core machine and are noisy (see the load average); rerun "
        "the command to check a number.",
        "",
        "## The classroom MLP: the thin or dense form chosen by latency at a batch size",
        "",
        "MLP 784 -> 3 x width -> 10, N=3 composed then cut to a quarter of its ranks "
        "(`Uniform(0.25)`); latency kept relative to the uncut merged model, both timed as "
        "they deploy (BatchNorm folded), each cut paired with it round by round "
        f"({args.repeats * 5} repeats, the quietest of {ROUNDS} rounds).",
        "",
        "| width | form chosen by | cut forms | FLOPs kept | latency kept b=1 | latency kept b=64 |",
        "|---:|---|---|---:|---:|---:|",
    ]
    for r in mlp_rows:
        lines.append(
            f"| {r['width']} | {r['by']} | {r['forms']} | {_pct(r['flops'])} | "
            f"{_pct(r['lat'][1])} | {_pct(r['lat'][64])} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    load_before = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows.append(bench_model(name, args.size, args.ratio, args.repeats, Path(tmp)))
            r = rows[-1]
            print(
                f"{name}: FLOPs {_pct(r['flops'])}, latency b=64 {_pct(r['lat'][64])}, "
                f"ratio {r['ratio64']:.2f} ({r['seconds']:.0f} s)",
                file=sys.stderr,
            )
    mlp_rows = bench_mlp(256, args.repeats * 5) + bench_mlp(512, args.repeats * 5)
    load = f"{load_before} before, " + ", ".join(f"{v:.2f}" for v in os.getloadavg()) + " after"
    text = render(rows, mlp_rows, args, load)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        cmd = " ".join(["python", "bench/zoo.py", *sys.argv[1:]])
        old = args.out.read_text() if args.out.exists() else ""
        sweep = (
            old[old.index(SWEEP[0]) : old.index(SWEEP[1]) + len(SWEEP[1])]
            if all(m in old for m in SWEEP)
            else ""
        )  # the section bench/zoo_sweep.py writes is kept
        args.out.write_text(
            f"# torchvision zoo: what LoRITa composes, what a cut keeps\n\nWritten by `{cmd}`."
            f"\n\n{text}\n" + (f"\n{sweep}\n" if sweep else "")
        )


if __name__ == "__main__":
    main()
