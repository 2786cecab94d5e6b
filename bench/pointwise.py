"""Pointwise (1x1) convolutions at the small spatial sizes of ImageNet nets fed small images:
as a convolution and as a matrix product on the channels-last view, dense and thin (rank 1/4).

Why the 1x1-heavy nets of docs/zoo.md keep more of their time than of their FLOPs when cut:
prints, per layer shape, each form's time against the dense convolution's, all four timed in
turn round by round (``lorita.kinds.paired_medians``), and the thin pair's time against the
dense layer's within each way of running it. Usage: ``python bench/pointwise.py [--threads 2]``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lorita.kinds import paired_medians  # noqa: E402

#: (C_in, C_out, side): pointwise layers of mobilenet_v3_small / efficientnet_b0 / regnet at
#: 64 px input, and two at larger sides
SHAPES = [
    (96, 576, 2), (576, 96, 2), (960, 160, 2), (160, 960, 2), (240, 40, 4), (40, 240, 4),
    (112, 672, 4), (64, 256, 8), (256, 64, 8), (24, 144, 16), (144, 24, 16), (32, 192, 32),
]  # fmt: skip


def as_matmul(x: torch.Tensor, layers: list[tuple[torch.Tensor, torch.Tensor | None]]):
    """1x1 convolutions run as products on the (N*H*W, C) view of a channels-last input."""
    n, c, h, w = x.shape
    y = x.permute(0, 2, 3, 1).reshape(-1, c)
    for weight, bias in layers:
        y = F.linear(y, weight, bias)
    return y.reshape(n, h, w, -1).permute(0, 3, 1, 2)


def _forms(x, w, b, w1, w2) -> list:
    """The four ways to run the layer on ``x``: dense and thin, as convolutions and products."""
    thin = [(w1[:, :, 0, 0], None), (w2[:, :, 0, 0], b)]
    return [
        lambda: F.conv2d(x, w, b),
        lambda: as_matmul(x, [(w[:, :, 0, 0], b)]),
        lambda: F.conv2d(F.conv2d(x, w1), w2, b),
        lambda: as_matmul(x, thin),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=25)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"batch {args.batch}, {args.threads} thread(s), torch {torch.__version__}, "
          f"load average before {', '.join(f'{v:.2f}' for v in os.getloadavg())}")  # fmt: skip
    print("Times against the dense convolution's; the last column: the thin pair's time against the"
          " dense layer's, both as matrix products.")  # fmt: skip
    print("| C_in -> C_out | side | thin FLOPs | dense conv (us) | dense matmul | thin conv | "
          "thin matmul | thin/dense as matmuls |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for c_in, c_out, side in SHAPES:
        r = max(1, min(c_in, c_out) // 4)
        x = torch.randn(args.batch, c_in, side, side).to(memory_format=torch.channels_last)
        w, b = torch.randn(c_out, c_in, 1, 1), torch.randn(c_out)
        w1, w2 = torch.randn(r, c_in, 1, 1), torch.randn(c_out, r, 1, 1)
        thin_mm = [(w1[:, :, 0, 0], None), (w2[:, :, 0, 0], b)]
        with torch.no_grad():
            ref, got = F.conv2d(F.conv2d(x, w1), w2, b), as_matmul(x, thin_mm)
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-3)
            dc, dm, tc, tm = paired_medians(_forms(x, w, b, w1, w2), repeats=args.repeats)
        flops = r * (c_in + c_out) / (c_in * c_out)
        print(f"| {c_in} -> {c_out} | {side} | {flops:.2f} | {dc * 1e6:.0f} | {dm / dc:.2f} | "
              f"{tc / dc:.2f} | {tm / dc:.2f} | {tm / dm:.2f} |")  # fmt: skip
    print(f"load average after {', '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
