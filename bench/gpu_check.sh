#!/usr/bin/env bash
# One prepared check for a lent CUDA machine:  bash bench/gpu_check.sh
#
# Trains VGG with N=1 and N=3 for a few hundred steps on CUDA (bf16 autocast, channels_last,
# pinned memory, the engine's defaults on CUDA) and checks:
#   1. both runs complete and their training loss falls;
#   2. the spectra at step 0 (taken from the CUDA model) match the same model built on the CPU,
#      and singular values computed on the GPU match the CPU's;
#   3. after 10 fp32 steps from the same start, CUDA and CPU runs still have matching spectra;
# then prints the step time ratio N=3/N=1 and samples/s. Exit status 0 when every check passes.
#
# Data: Fashion-MNIST when its files are found (LORITA_DATA, ./data, or Debian's
# /usr/share/datasets/fashion-mnist); otherwise the synthetic lowrank task at CIFAR size
# (32x32 images upsampled from a 4x4 latent, planted rank 8). A device machine has no internet: to use the real files there,
# copy the four fashion-mnist *.gz files into ./data/fashion_mnist/ (ignored by git) and carry
# "data" with the working tree.
#
# Environment: STEPS (300), BATCH (256), MODEL (vgg = VGG16), MODEL_ARGS (JSON model options),
# DATASET (auto; "lowrank" forces the synthetic task),
# DEVICE (cuda; "cpu" runs the script itself as a dry run), OUT (results folder; the JSON summary
# goes to $OUT/gpu_check.json).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${LORITA_DATA:-}" ] && [ -d data ]; then export LORITA_DATA="$PWD/data"; fi
python - <<'PY'
import importlib.util
import sys

missing = [m for m in ("torch", "numpy", "safetensors") if importlib.util.find_spec(m) is None]
if missing:
    print(f"FAIL: missing Python packages {missing}; install them (pip install {' '.join(missing)})")
    sys.exit(2)

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

import lorita as lt
from lorita.data import DatasetUnavailable, load_dataset
from lorita.runs import RunStore
from lorita.spectra import layer_matrix
from lorita.engine import TrainConfig, build_model, load_splits

dev = os.environ.get("DEVICE", "cuda")
steps = int(os.environ.get("STEPS", "300"))
batch = int(os.environ.get("BATCH", "256"))
model = os.environ.get("MODEL", "vgg")
model_args = json.loads(os.environ.get("MODEL_ARGS", "{}"))
out = Path(os.environ.get("OUT") or "/tmp/lorita-gpu-check")
out.mkdir(parents=True, exist_ok=True)
checks = {}
summary = {"device": dev, "steps": steps, "batch": batch, "model": model, "checks": checks}

if dev == "cuda":
    if not torch.cuda.is_available():
        print("FAIL: CUDA is not available")
        sys.exit(1)
    summary["gpu"] = torch.cuda.get_device_name(0)
    print(f"GPU: {summary['gpu']}, torch {torch.__version__}, CUDA {torch.version.cuda}")
ds, dkw = "lowrank", {"dim": 32, "smooth": 4, "rank": 8, "n_train": 50000, "n_test": 5000}
if os.environ.get("DATASET", "auto") != "lowrank":
    try:
        load_dataset("fashion_mnist", download=False)
        ds, dkw = "fashion_mnist", {}
    except DatasetUnavailable:
        pass
summary["dataset"] = ds
print(f"dataset: {ds} {dkw or ''}")

base = dict(
    dataset=ds, dataset_kwargs=dkw, model=model, model_kwargs=model_args, optimizer="sgd",
    lr=0.02, momentum=0.9, weight_decay=5e-4, schedule="cosine",
    epochs=1000, max_steps=steps, batch_size=batch, device=dev, amp="auto",
    spectra_every=100, eval_every=100, seed=0,
)
store = RunStore(Path(tempfile.mkdtemp(prefix="lorita-gpu-")))
stats = {}
for n in (1, 3):
    cfg = TrainConfig(n_factors=n, **base)
    run = store.create(cfg.to_dict(), name=f"n{n}")
    times, losses, last = [], [], [None]

    def cb(ev):
        if ev["event"] == "step":
            now = time.perf_counter()
            if last[0] is not None:
                times.append(now - last[0])
            last[0] = now
            losses.append(ev["loss"])
        elif ev["event"] in ("eval", "checkpoint"):
            last[0] = None  # time training steps only

    t0 = time.time()
    res = lt.train(cfg, run, callback=cb)
    warm = times[20:] or times
    step_s = statistics.median(warm)
    first, final = statistics.mean(losses[:20]), statistics.mean(losses[-20:])
    stats[n] = {
        "state": res["state"], "message": res["message"], "step_ms": 1000 * step_s,
        "samples_per_s": batch / step_s, "loss_first20": first, "loss_last20": final,
        "val_acc": (res["val"] or {}).get("acc"), "test_acc": res["test_acc"],
        "wall_s": time.time() - t0, "snapshots": len(run.spectra()),
    }
    checks[f"N={n} completed"] = res["state"] == "completed"
    checks[f"N={n} loss falls"] = final < 0.9 * first
    print(f"N={n}: {res['state']} in {stats[n]['wall_s']:.1f} s; step {1000 * step_s:.1f} ms, "
          f"{batch / step_s:.0f} samples/s; loss {first:.3f} -> {final:.3f}; "
          f"test acc {res['test_acc']}", flush=True)

    # spectra at step 0 (from the CUDA model) versus the same model built on the CPU
    cpu_cfg = TrainConfig.from_dict({**cfg.to_dict(), "device": "cpu"})
    splits = load_splits(cpu_cfg)
    cpu_model = build_model(cpu_cfg, splits)
    want = lt.layer_spectra(cpu_model)
    got = run.spectra()[0]
    assert got["step"] == 0
    err0 = max(
        float((torch.tensor(got["layers"][k]) - v).abs().max() / v.max()) for k, v in want.items()
    )
    gpu_err = 0.0
    if dev == "cuda":
        for name, m in list(lt.iter_layers(cpu_model))[:4]:
            w = layer_matrix(m).float()
            s_gpu = torch.linalg.svdvals(w.cuda()).cpu()
            gpu_err = max(gpu_err, float((s_gpu - want[name]).abs().max() / want[name].max()))
    stats[n]["spectra_step0_rel_err"] = err0
    stats[n]["gpu_svd_rel_err"] = gpu_err
    checks[f"N={n} spectra at step 0 match the CPU"] = err0 < 1e-4
    checks[f"N={n} GPU singular values match the CPU"] = gpu_err < 1e-4

    # 10 fp32 steps on each device from the same start: spectra still agree
    short = {**cfg.to_dict(), "max_steps": 10, "batch_size": 64, "amp": "off",
             "spectra_every": 0, "eval_every": 0}
    ends = {}
    for d in dict.fromkeys((dev, "cpu")):
        r = lt.train(TrainConfig.from_dict({**short, "device": d}), threads=None)
        ends[d] = lt.layer_spectra(r["model"].cpu())
    err10 = max(
        float((ends[dev][k] - ends["cpu"][k]).abs().max() / ends["cpu"][k].max())
        for k in ends["cpu"]
    )
    stats[n]["spectra_step10_rel_err"] = err10
    checks[f"N={n} spectra after 10 fp32 steps match the CPU"] = err10 < 2e-2
    print(f"N={n}: spectra rel. error step 0 {err0:.1e}, GPU SVD {gpu_err:.1e}, "
          f"after 10 steps {err10:.1e}", flush=True)

summary["runs"] = stats
ratio = stats[3]["step_ms"] / stats[1]["step_ms"]
summary["step_time_ratio_n3_n1"] = ratio
print()
print(f"step time N=3 / N=1: {ratio:.2f}")
for n in (1, 3):
    print(f"N={n}: {stats[n]['samples_per_s']:.0f} samples/s ({stats[n]['step_ms']:.1f} ms/step)")
for name, ok in checks.items():
    print(f"{'PASS' if ok else 'FAIL'}  {name}")
(out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
print(f"summary: {out / 'gpu_check.json'}")
sys.exit(0 if all(checks.values()) else 1)
PY
