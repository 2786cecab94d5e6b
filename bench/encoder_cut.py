"""What a rank cut saves on an nn.TransformerEncoder classifier, measured in one process.

    python bench/encoder_cut.py [--dim 256] [--layers 4] [--seq 64] [--batch 64] [--threads 1]

Builds token features -> nn.TransformerEncoder (batch_first, d x 4d feed-forward) -> mean ->
head, composes it with N=3 (balanced: the same function), merges and cuts it with
Uniform(0.25), and prints the FLOPs kept and the latency kept (eval mode, no gradients: the
inference path, where PyTorch's fused encoder kernel runs for layers with nothing thin), each
model timed in turn (paired medians) so that other work on the machine slows both alike.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import lorita as lt  # noqa: E402
from lorita.kinds import paired_medians  # noqa: E402


class EncoderClassifier(nn.Module):
    def __init__(self, dim: int, layers: int, features: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(features, dim)
        block = nn.TransformerEncoderLayer(dim, 8, 4 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(block, layers)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = EncoderClassifier(args.dim, args.layers).eval()
    x = torch.randn(args.batch, args.seq, 32)
    load0 = os.getloadavg()
    composed = lt.overparameterize(model, 3, example_input=x)
    cut = lt.truncate(composed, lt.Uniform(0.25), example_input=x).eval()
    forms: dict[str, int] = {}
    for p in cut.lorita_plan.values():
        forms[p["form"]] = forms.get(p["form"], 0) + 1
    with torch.no_grad():
        diff = (lt.merge_model(composed)(x) - model(x)).abs().max().item()
        t_uncut, t_cut = paired_medians(
            [lambda: model(x), lambda: cut(x)], repeats=args.repeats, warmup=2
        )
    flops = lt.count_cost(cut, x).flops / lt.count_cost(model, x).flops
    print(
        f"nn.TransformerEncoder d={args.dim} x {args.layers} layers, sequence {args.seq}, "
        f"batch {args.batch}, {args.threads} thread(s), torch {torch.__version__}"
    )
    print(f"composed N=3 keeps the function: max difference {diff:.1e}")
    print(f"Uniform(0.25) cut forms: {', '.join(f'{k} {v}' for k, v in sorted(forms.items()))}")
    print(
        f"FLOPs kept {100 * flops:.0f}%; latency uncut {1e3 * t_uncut:.1f} ms, cut "
        f"{1e3 * t_cut:.1f} ms: kept {100 * t_cut / t_uncut:.0f}% "
        f"(latency cut / FLOP cut {(1 - t_cut / t_uncut) / (1 - flops):.2f})"
    )
    load1 = os.getloadavg()
    print(f"load average {load0[0]:.2f} before, {load1[0]:.2f} after")


if __name__ == "__main__":
    main()
