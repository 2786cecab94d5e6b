"""Every torchvision classification model through LoRITa, with no options: plain
``overparameterize(model, 3)`` succeeds and keeps the function, a training step updates every
factor, ``merge_model`` loads strictly into a fresh instance, a full-rank ``truncate`` is the
identity, a real cut lowers the measured FLOPs and params, ``save`` -> ``load(model=...)`` and
ONNX give the same outputs.

Each model (weights=None, 10 classes) runs in its own process with a time limit, at the
smallest input side it accepts from SIZES (32 px where it can; a model that takes
``image_size`` / ``input_size`` is built for that side). One line per model; with ``--out`` the
result replaces the sweep section of that markdown file.

    nice -n 10 python bench/zoo_sweep.py [--models resnet18 vit_b_16] [--timeout 1800]
        [--log bench/zoo_sweep.jsonl] [--out docs/zoo.md]

With ``--log`` every result is appended as it comes and models already there are skipped, so
an interrupted sweep resumes where it stopped (``--rerun`` runs them again).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
import typing
import warnings
from pathlib import Path

import numpy as np
import torch
import torchvision.models as tvm
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lorita as lt  # noqa: E402
from lorita.convert import composition_summary  # noqa: E402

#: Input sides tried in order: the first the model accepts (eval and train mode) is used.
SIZES = (32, 28, 64, 75, 96, 112, 128, 160, 224, 299)
CHECKS = ("compose", "function", "train", "merge", "full_rank", "cut", "save_load", "onnx")
BEGIN, END = "<!-- zoo_sweep: begin -->", "<!-- zoo_sweep: end -->"
TOL = 1e-4


def _size_option(name: str) -> str | None:
    cls = typing.get_type_hints(tvm.get_model_builder(name)).get("return")
    params = inspect.signature(cls.__init__).parameters if cls else {}
    return next((k for k in ("image_size", "input_size") if k in params), None)


def build(name: str, size: int) -> nn.Module:
    """A fresh instance (seed 0), eval mode, built for ``size`` where the model takes it."""
    kw: dict = {"num_classes": 10}
    option = _size_option(name)
    if option == "image_size":
        kw["image_size"] = size
    elif option == "input_size":
        kw["input_size"] = (size, size)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tvm.get_model(name, weights=None, **kw).eval()


def _logits(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


def _loss(out) -> torch.Tensor:
    """Cross-entropy summed over every head (main and auxiliary) the model returns."""
    heads = [out] if isinstance(out, torch.Tensor) else [t for t in out if t is not None]
    target = torch.arange(heads[0].shape[0]) % 10
    return sum(nn.functional.cross_entropy(h, target) for h in heads)


def pick_size(name: str) -> tuple[int, nn.Module]:
    """The smallest side in SIZES the model runs at (eval and train mode), and the model."""
    errors = []
    for size in SIZES:
        try:
            model = build(name, size)
            with torch.no_grad():
                model(_x(size, 2))
                model.train()(_x(size, 2))
            return size, model.eval()
        except Exception as e:  # the model refuses this side: try the next
            errors.append(f"{size}: {type(e).__name__}")
    raise ValueError(f"no input side in {SIZES} runs ({'; '.join(errors[-2:])})")


def _x(size: int, batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the output's scale (at least 1)."""
    return float((a - b).abs().max()) / max(1.0, float(b.abs().max()))


def _expect(ok: bool, what: str) -> None:
    if not ok:
        raise AssertionError(what)


def _check_function(composed, want, x) -> str:
    rows = composition_summary(composed)["layers"]
    with torch.no_grad():
        d = _diff(_logits(composed(x)), want)
    _expect(d < TOL, f"composed output differs by {d:.1e}")
    done = sum(r["action"] == "composed" for r in rows)
    left = [r for r in rows if r["action"] == "left"]
    _expect(done > 0, "nothing composed")
    bad = [r["name"] for r in left if r["kind"] != "depthwise"]
    _expect(not bad, f"left as they are: {bad[:3]}")
    return f"{done} composed, {len(left)} left"


def _check_merge(name, size, composed, x) -> str:
    fresh = build(name, size)
    fresh.load_state_dict(lt.merge_model(composed).state_dict(), strict=True)
    with torch.no_grad():
        d = _diff(_logits(fresh(x)), _logits(composed(x)))
    _expect(d < TOL, f"merged output differs by {d:.1e}")
    return ""


def _check_full(composed, svd, x) -> str:
    full = lt.truncate(composed, lt.Uniform(1.0), svd=svd)
    forms = {p["form"] for p in full.lorita_plan.values()}
    _expect(forms == {"full"}, f"full-rank cut forms {forms}")
    with torch.no_grad():
        d = _diff(_logits(full(x)), _logits(composed(x)))
    _expect(d < TOL, f"full-rank cut differs by {d:.1e}")
    return ""


def _check_cut(composed, svd, x) -> tuple[str, nn.Module]:
    small = lt.truncate(composed, lt.Uniform(0.25), svd=svd)
    base, cut = lt.count_cost(composed, x[:1]), lt.count_cost(small, x[:1])
    _expect(cut.flops < base.flops, f"FLOPs {cut.flops} >= {base.flops}")
    _expect(cut.params < base.params, f"params {cut.params} >= {base.params}")
    forms = [p["form"] for p in small.lorita_plan.values()]
    _expect("thin" in forms, "no layer took the thin form")
    return f"FLOPs {cut.flops / base.flops:.0%}, params {cut.params / base.params:.0%}", small


def _check_save_load(name, size, small, x, tmp: Path) -> str:
    path = lt.save(small, tmp / "m.safetensors")
    back = lt.load(path, model=build(name, size))
    with torch.no_grad():
        d = _diff(_logits(back(x)), _logits(small(x)))
    _expect(d < 1e-5, f"loaded output differs by {d:.1e}")
    return ""


def _check_onnx(small, x, tmp: Path) -> str:
    import onnxruntime as ort

    onnx = lt.export_onnx(small, x, tmp / "m.onnx")
    x3 = torch.cat([x, x[:1]])  # another batch size: the batch axis is dynamic
    sess = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {"input": x3.numpy()})
    with torch.no_grad():
        want = _logits(small(x3)).numpy()
    d = float(np.abs(out - want).max()) / max(1.0, float(np.abs(want).max()))
    _expect(d < 1e-3, f"ONNX output differs by {d:.1e}")
    return ""


STEPS = 2  # a zero-initialised head (torchvision's ViT) or last norm (timm) learns first


def _train_steps(model: nn.Module, size: int) -> set[str]:
    """STEPS SGD steps (train mode, fixed seed for dropout and stochastic depth); the names of
    the parameters that got a gradient other than zero (one too small to move a float32
    weight still counts: what matters is that it reaches it)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    torch.manual_seed(0)
    reached: set[str] = set()
    for _ in range(STEPS):
        _loss(model(_x(size, 4))).backward()
        reached |= {
            k for k, p in model.named_parameters() if p.grad is not None and bool(p.grad.any())
        }
        opt.step()
        model.zero_grad(set_to_none=True)
    model.eval()
    return reached


def _learning_layers(composed: nn.Module, size: int) -> set[str]:
    """Layers whose plain weight gets a gradient over the same steps (a squeeze-excitation
    whose few ReLU units are all off passes none to the weight after them, composed or not)."""
    reached = _train_steps(lt.merge_model(composed), size)
    return {
        n for n in lt.composed_layers(composed) if {f"{n}.weight", f"{n}.in_proj_weight"} & reached
    }


def _check_train(composed, size) -> str:
    """Gradients reach every factor of every layer whose plain weight they reach, and the
    steps move (nearly) all of them."""
    learning = _learning_layers(composed, size)
    factors = [
        f"{n}.{k}"
        for n, m in lt.composed_layers(composed).items()
        if n in learning
        for k, _ in m.named_parameters()
        if "factors" in k
    ]
    before = {k: p.detach().clone() for k, p in composed.named_parameters() if k in factors}
    reached = _train_steps(composed, size)
    missed = [k for k in factors if k not in reached]
    _expect(bool(factors) and not missed, f"{len(missed)} factors get no gradient: {missed[:2]}")
    now = dict(composed.named_parameters())
    moved = sum(not torch.equal(now[k].detach(), before[k]) for k in factors)
    _expect(moved >= 0.9 * len(factors), f"only {moved} of {len(factors)} factors moved")
    idle = len(lt.composed_layers(composed)) - len(learning)
    note = f" ({idle} layers get no gradient plain either)" if idle else ""
    return f"{len(factors)} factors" + note


def _compose(model: nn.Module) -> tuple[str, nn.Module]:
    return "", lt.overparameterize(model, 3).eval()


def _run(results: dict, check: str, fn, *args):
    print(f"running {check}", file=sys.stderr, flush=True)  # where a killed child was
    t0 = time.perf_counter()
    try:
        out = fn(*args)
        detail, value = (out, None) if isinstance(out, str) else out
        results[check] = {"ok": True, "detail": detail}
        return value
    except Exception as e:  # recorded: the sweep reports every failure and goes on
        results[check] = {"ok": False, "detail": f"{type(e).__name__}: {str(e)[:300]}"}
        return None
    finally:
        results[check]["seconds"] = round(time.perf_counter() - t0, 1)


def check_model(name: str) -> dict:
    """Every check on one model: ``{"model", "size", "checks": {check: {ok, detail}}}``."""
    t0 = time.perf_counter()
    res: dict = {"model": name, "checks": {}}
    size, model = pick_size(name)
    res["size"] = size
    x = _x(size, 2)
    with torch.no_grad():
        want = _logits(model(x))
    checks = res["checks"]
    composed = _run(checks, "compose", _compose, model)
    del model  # the giants (vit_h_14, regnet_y_128gf) need the memory
    if composed is not None:
        _run(checks, "function", _check_function, composed, want, x)
        _run(checks, "merge", _check_merge, name, size, composed, x)
        svd = _run(checks, "svd", lambda: ("", lt.layer_svd(composed)))
        small = None
        if svd is not None:
            _run(checks, "full_rank", _check_full, composed, svd, x)
            small = _run(checks, "cut", _check_cut, composed, svd, x)
            del svd
        if small is not None:
            with tempfile.TemporaryDirectory() as tmp:
                _run(checks, "save_load", _check_save_load, name, size, small, x, Path(tmp))
                _run(checks, "onnx", _check_onnx, small, x, Path(tmp))
            del small
        _run(checks, "train", _check_train, composed, size)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


def _one_line(r: dict) -> str:
    if "error" in r:
        return f"{r['model']}: FAIL {r['error']}"
    failed = [c for c in CHECKS if not r["checks"].get(c, {}).get("ok")]
    if "svd" in r["checks"] and not r["checks"]["svd"]["ok"]:
        failed.insert(0, "svd")
    status = (
        "ok"
        if not failed
        else "FAIL "
        + ", ".join(
            f"{c} ({r['checks'][c]['detail']})" if c in r["checks"] else f"{c} (not run)"
            for c in failed
        )
    )
    return f"{r['model']} @{r['size']}px {r['seconds']:.0f}s: {status}"


def run_isolated(name: str, timeout: float) -> dict:
    """``check_model(name)`` in a child process, killed after ``timeout`` seconds."""
    cmd = [sys.executable, __file__, "--one", name]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"model": name, "error": f"timed out after {timeout:.0f} s", "seconds": timeout}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr.strip().splitlines() or ["no output"])[-1][:300]
        return {
            "model": name,
            "error": f"exit {p.returncode} after {time.perf_counter() - t0:.0f} s: {tail}",
        }
    return json.loads(lines[-1])


def _memory_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def _status(r: dict) -> str:
    """A result's line in the table: "ok", the failed checks, or why the child died (SIGKILL
    from outside a timeout: the system's out-of-memory killer, in practice)."""
    status = _one_line(r).split(": ", 1)[1]
    if r.get("error", "").startswith("exit -9 "):
        status += f" (killed by the system: out of memory on this {_memory_gib():.0f} GiB machine)"
    return status


def render(results: list[dict], args, load_before: str, load_after: str) -> str:
    passed = [r for r in results if _status(r) == "ok"]
    no_memory = [r["model"] for r in results if "out of memory" in _status(r)]
    ran = {r["model"] for r in results}
    missing = [n for n in tvm.list_models(module=tvm) if n not in ran]
    lines = [
        BEGIN,
        "## Every torchvision classification model, no options",
        "",
        f"Written by `nice -n 10 python bench/zoo_sweep.py --timeout {args.timeout:.0f} "
        f"--log bench/zoo_sweep.jsonl --out docs/zoo.md` ({len(results)} models from "
        "`torchvision.models.list_models(module=torchvision.models)`, weights=None, 10 classes, "
        "each in its own process at the smallest side it accepts in eval and train mode, from "
        f"{', '.join(map(str, SIZES))} px). Checks: plain `overparameterize(model, 3)` "
        "succeeds, keeps the function (relative difference < 1e-4) and leaves only depthwise "
        "layers; over two SGD steps (every output head in the loss) gradients reach every factor "
        "of every layer whose plain weight they reach, and move at least 90% of them; "
        "`merge_model` loads strictly into a fresh instance; `truncate` at full rank is the "
        "identity; `Uniform(0.25)` lowers measured FLOPs and params with thin layers; `save` -> "
        "`load(model=fresh)` gives the same outputs; ONNX (onnxruntime, batch 3) agrees.",
        "",
        f"**{len(passed)} of {len(results)} models run pass every check**"
        + (
            f" ({len(no_memory)} killed for memory, {', '.join(no_memory)}: its checks need "
            "more than this machine has)"
            if no_memory
            else ""
        )
        + "; "
        f"{len(missing)} of the {len(results) + len(missing)} torchvision classification "
        "models have not been run yet (listed last: the sweep resumes from its log). The models' "
        f"own times add up to {sum(r.get('seconds', 0) for r in results) / 60:.0f} min "
        f"(one thread each, {os.cpu_count()} cores shared with other work; load average "
        f"{load_before} when this run started, {load_after} at its last model).",
        "",
        "| model | side (px) | seconds | result |",
        "|---|---:|---:|---|",
    ]
    for r in results:
        status = _status(r)
        lines.append(
            f"| {r['model']} | {r.get('size', '-')} | {r.get('seconds', '-')} | {status} |"
        )
    lines += [f"| {n} | - | - | not run yet |" for n in missing]
    lines.append(END)
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    """Replace the sweep section of ``path`` (between the markers), or append it."""
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per model")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--log", type=Path, default=None, help="JSON lines: results kept, models in it skipped"
    )
    ap.add_argument("--rerun", action="store_true", help="run models already in --log again")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    if args.one:
        torch.set_num_threads(int(os.environ.get("ZOO_THREADS", "1")))
        print(json.dumps(check_model(args.one)))
        return
    names = args.models or tvm.list_models(module=tvm)
    done = _read_log(args.log) if args.log and not args.rerun else {}
    load_before = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    for name in names:
        if name in done:
            continue
        done[name] = run_isolated(name, args.timeout)
        print(_one_line(done[name]), flush=True)
        if args.log:
            with open(args.log, "a") as f:
                f.write(json.dumps(done[name]) + "\n")
        if args.out:  # after every model: a long sweep cut short still leaves its results
            _write(args, _read_log(args.log) if args.log else done, load_before)
    if args.out:  # every result in the log (another run may have added some)
        _write(args, _read_log(args.log) if args.log else done, load_before)


def _write(args, done: dict[str, dict], load_before: str) -> None:
    load_after = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    results = [done[n] for n in tvm.list_models(module=tvm) if n in done]
    write_section(args.out, render(results, args, load_before, load_after))


def _read_log(path: Path) -> dict[str, dict]:
    """Results already in the log (the last one of each model)."""
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["model"]: r for r in rows}


if __name__ == "__main__":
    main()
