"""Time one optimizer step (forward, backward, SGD update) on the CPU for three versions of
the same network, all in one process so the ratios are fair on a noisy machine:

- plain:   the ordinary network (N=1)
- paper:   N=3 the authors' way: N-1 factors of the input width (C_out for convs), applied one
           after another at every call
- lorita:  N=3 as this library builds it: inner width min(in, out), and each layer chooses per
           call whether to form the product first or apply the factors in turn

Models: a VGG-style CNN on 28x28 inputs and a 4-layer 512-wide MLP, batch 128.
Targets: CNN lorita/plain <= 1.15; MLP lorita/plain at most 10% above its FLOP ratio (the limit,
counted by torch.utils.flop_counter over a whole training step).

    python bench/train_step.py [--steps 30] [--out docs/train_step.md]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lorita as lt  # noqa: E402


def vgg_cnn() -> nn.Module:
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(1, 32), *block(32, 32), nn.MaxPool2d(2),  # 14x14
        *block(32, 64), *block(64, 64), nn.MaxPool2d(2),  # 7x7
        *block(64, 128), nn.MaxPool2d(2),  # 3x3
        nn.Flatten(), nn.Linear(128 * 3 * 3, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 10),
    )  # fmt: skip


def mlp() -> nn.Module:
    layers, width = [nn.Flatten()], 28 * 28
    for _ in range(3):
        layers += [nn.Linear(width, 512), nn.BatchNorm1d(512), nn.ReLU()]
        width = 512
    return nn.Sequential(*layers, nn.Linear(512, 10))


def variants(make) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    base = make()
    return {
        "plain": base,
        "paper": lt.overparameterize(
            base, 3, init="independent", inner="paper", order="sequential"
        ),
        "lorita": lt.overparameterize(base, 3),
    }


def make_step(model: nn.Module, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return step


def step_flops(model: nn.Module, x, y) -> int:
    with FlopCounterMode(display=False) as counter:
        nn.functional.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def bench(name: str, make, steps: int, batch: int) -> list[dict]:
    x = torch.randn(batch, 1, 28, 28)
    y = torch.randint(0, 10, (batch,))
    models = variants(make)
    flops = {k: step_flops(m, x, y) for k, m in models.items()}
    steps_fn = {k: make_step(m, x, y) for k, m in models.items()}
    for fn in steps_fn.values():  # warm up
        for _ in range(3):
            fn()
    times = {k: [] for k in models}
    for _ in range(steps):  # interleave so drifts in machine speed hit every variant alike
        for k, fn in steps_fn.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return [
        {
            "model": name,
            "variant": k,
            "ms": 1000 * med[k],
            "ratio": med[k] / med["plain"],
            "flop_ratio": flops[k] / flops["plain"],
        }
        for k in models
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument(
        "--out", type=Path, default=None, help="also write the table to this markdown file"
    )
    args = ap.parse_args()
    rows = bench("vgg-cnn 28x28", vgg_cnn, args.steps, args.batch)
    rows += bench("mlp 4x512", mlp, args.steps, args.batch)
    lines = [
        f"One SGD step, batch {args.batch}, CPU ({torch.get_num_threads()} threads), torch {torch.__version__}, "
        f"median of {args.steps} interleaved steps; load average at the end "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}.",
        "",
        "| model | variant (N=3 unless plain) | ms/step | time vs plain | FLOPs vs plain |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['ms']:.1f} | {r['ratio']:.2f}x | {r['flop_ratio']:.2f}x |"
        )
    cnn = {r["variant"]: r for r in rows if r["model"].startswith("vgg")}
    mlp_ = {r["variant"]: r for r in rows if r["model"].startswith("mlp")}
    gap = mlp_["lorita"]["ratio"] / mlp_["lorita"]["flop_ratio"] - 1
    lines += [
        "",
        f"CNN target lorita <= 1.15x plain: {cnn['lorita']['ratio']:.2f}x "
        f"({'met' if cnn['lorita']['ratio'] <= 1.15 else 'NOT met'}); paper way {cnn['paper']['ratio']:.2f}x.",
        f"MLP target at most 10% above the FLOP ratio {mlp_['lorita']['flop_ratio']:.2f}x: "
        f"{mlp_['lorita']['ratio']:.2f}x ({gap:+.0%}, {'met' if gap <= 0.10 else 'NOT met'}); "
        f"paper way {mlp_['paper']['ratio']:.2f}x.",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            "# Training-step cost of composed layers\n\nWritten by `python bench/train_step.py "
            f"--out {args.out}`.\n\n{text}\n"
        )


if __name__ == "__main__":
    main()
