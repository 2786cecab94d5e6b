"""The ``lorita`` command line: train | runs | compress | export | stop.

    python -m lorita train --dataset digits --model mlp --factors 3 --weight-decay 5e-4
    python -m lorita runs
    python -m lorita compress RUN --max-drop 1
    python -m lorita export RUN --policy energy:0.99 --format onnx --out model.onnx

Bad input (unknown dataset or model, lr <= 0, N < 1, missing run, unreadable file) ends with
exit code 2 and one line on stderr; a training run that fails ends with exit code 1.
Under ``torchrun --nproc_per_node=K -m lorita train ...`` training uses DDP; rank 0 prints.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import math
import os
import re
import signal
import socket
import sys
import threading
import time
from pathlib import Path

__all__ = ["main", "build_parser"]


class UsageError(Exception):
    """Bad command-line input: exit 2 with one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, never the usage block
        raise UsageError(message)


# --------------------------------------------------------------------------- helpers


def _config_help() -> dict[str, str]:
    """Each TrainConfig field's trailing comment, used as its flag's help."""
    from .train import TrainConfig

    out = {}
    for line in inspect.getsource(TrainConfig).splitlines():
        m = re.match(r"\s{4}(\w+): [^=]+=.*?#\s*(.*)$", line)
        if m:
            out[m.group(1)] = m.group(2).replace("%", "%%")
    return out


_FLAG_ALIASES = {
    "n_factors": ["--factors", "--n-factors"],
    "dataset_kwargs": [],
    "model_kwargs": [],
}


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _key_values(items: list[str] | None, flag: str) -> dict:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise UsageError(f"{flag}: expected key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = _parse_value(v.strip())
    return out


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    from .train import TrainConfig

    helps = _config_help()
    g = p.add_argument_group("training options (default: the classroom run; see TrainConfig)")
    for f in dataclasses.fields(TrainConfig):
        flags = _FLAG_ALIASES.get(f.name, ["--" + f.name.replace("_", "-")])
        if not flags:
            continue
        h = helps.get(f.name, "")
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.type in ("bool", bool):
            g.add_argument(
                *flags,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=f"{h} (default {default})",
            )
        elif f.name == "skip":
            g.add_argument(
                *flags,
                dest="skip",
                action="append",
                default=argparse.SUPPRESS,
                metavar="PATTERN",
                help=f"{h}; repeat for several, 'none' composes all",
            )
        else:
            typ = {"int": int, "float": float}.get(str(f.type), str)
            g.add_argument(
                *flags,
                dest=f.name,
                type=typ,
                default=argparse.SUPPRESS,
                metavar=f.name.upper().split("_")[-1],
                help=f"{h} (default {default})",
            )
    g.add_argument(
        "--model-arg",
        dest="model_args",
        action="append",
        metavar="KEY=VALUE",
        help="a model option, e.g. width=128 (repeatable; values are JSON or text)",
    )
    g.add_argument(
        "--data-arg",
        dest="data_args",
        action="append",
        metavar="KEY=VALUE",
        help="a dataset option, e.g. rank=4 for lowrank (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lorita", description="LoRITa Explorer: low-rank induced training.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train a model and write a run folder")
    t.add_argument("--config", metavar="FILE", help="a JSON TrainConfig; flags override it")
    t.add_argument("--runs-dir", metavar="DIR", help="runs folder (default $LORITA_RUNS or ./runs)")
    t.add_argument("--data-dir", metavar="DIR", help="data folder (default $LORITA_DATA)")
    t.add_argument("--name", help="run name (default dataset-model-N<n>-<time>)")
    t.add_argument("--quiet", action="store_true", help="print nothing but errors")
    t.add_argument(
        "--resume", action="store_true", help="continue the run --name from its last checkpoint"
    )
    t.add_argument(
        "--max-concurrent",
        type=int,
        metavar="K",
        help="wait (state queued) until fewer than K runs of this runs folder train",
    )
    t.add_argument(
        "--threads",
        type=int,
        metavar="T",
        help="torch CPU threads (default: 1 for a small model on the CPU, else torch's)",
    )
    _add_train_flags(t)

    r = sub.add_parser("runs", help="list runs")
    r.add_argument("--runs-dir", metavar="DIR")
    r.add_argument("--json", action="store_true", help="print JSON summaries")

    c = sub.add_parser("compress", help="truncate a trained run and report accuracy and cost")
    c.add_argument("run")
    how = c.add_mutually_exclusive_group(required=True)
    how.add_argument("--ratio", type=float, help="uniform: keep this share of each layer's rank")
    how.add_argument(
        "--global",
        dest="global_",
        type=float,
        metavar="F",
        help="global: drop this fraction of all (normalised) singular values",
    )
    how.add_argument("--energy", type=float, help="per layer: keep this share of sum sigma^2")
    how.add_argument(
        "--max-drop",
        type=float,
        metavar="P",
        help="smallest model within P validation-accuracy points of the full one",
    )
    c.add_argument(
        "--search",
        choices=["global", "uniform", "energy", "iterative"],
        default="global",
        help="search used by --max-drop (default global)",
    )
    c.add_argument("--form", choices=["low_rank", "dense"], default="low_rank")
    c.add_argument("--finetune-epochs", type=int, default=0, metavar="K")
    c.add_argument(
        "--finetune-lr",
        type=float,
        metavar="LR",
        help="fine-tuning learning rate (default: the run's lr / 10)",
    )
    c.add_argument("--which", choices=["best", "last"], default="best", help="checkpoint")
    c.add_argument("--out", metavar="FILE", help="save the compressed model (safetensors)")
    c.add_argument("--json", action="store_true", help="print the result as JSON")
    c.add_argument("--runs-dir", metavar="DIR")

    e = sub.add_parser("export", help="write a run's model as safetensors or ONNX")
    e.add_argument("run")
    e.add_argument(
        "--policy",
        default="none",
        help="none (merged dense), uniform:R, global:F or energy:E (default none)",
    )
    e.add_argument("--form", choices=["low_rank", "dense"], default="low_rank")
    e.add_argument("--format", choices=["safetensors", "onnx"], default="safetensors")
    e.add_argument("--which", choices=["best", "last"], default="best")
    e.add_argument("--out", required=True, metavar="FILE")
    e.add_argument("--runs-dir", metavar="DIR")

    s = sub.add_parser("stop", help="ask a training run to stop after its current step")
    s.add_argument("run")
    s.add_argument("--runs-dir", metavar="DIR")
    return p


def _store(args):
    from .runs import RunStore

    return RunStore(args.runs_dir)


def _pct(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}%"


def _table(rows: list[list[str]], header: list[str]) -> str:
    cols = [header, *rows]
    widths = [max(len(str(r[i])) for r in cols) for i in range(len(header))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- train


class _Progress:
    """A one-line progress bar with ETA on a terminal; epoch lines otherwise."""

    def __init__(self, stream=None, quiet: bool = False) -> None:
        self.stream, self.quiet = stream or sys.stderr, quiet
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.total, self.t0, self.t_last, self.val, self.first_step = 1, time.time(), 0.0, None, 0
        self.loss = math.nan

    def __call__(self, ev: dict) -> None:
        if self.quiet:
            return
        kind = ev["event"]
        if kind == "start":
            self.total, self.first_step, self.t0 = ev["total_steps"], ev["step"], time.time()
            self.write(f"training on {ev['device']}: {self.total} steps", newline=True)
        elif kind == "step":
            self.loss = ev["loss"]
            now = time.time()
            if self.tty and (now - self.t_last > 0.1 or ev["step"] == self.total):
                self.t_last = now
                self.bar(ev["step"], ev["epoch"])
        elif kind == "eval":
            self.val = ev["acc"]
            if not self.tty:
                self.write(
                    f"epoch {ev['epoch'] + 1}  step {ev['step']}/{self.total}  train loss "
                    f"{self.loss:.4f}  val loss {ev['loss']:.4f}  val acc {_pct(ev['acc'])}",
                    newline=True,
                )
        elif kind == "end":
            if self.tty:
                self.stream.write("\n")
            test = ev.get("test") or {}
            self.write(
                f"{ev['state']}: step {ev['step']}, best val acc {_pct(ev['best_val_acc'])}, "
                f"test acc {_pct(test.get('acc'))}, {ev['time']:.1f} s"
                + (f" ({ev['message']})" if ev.get("message") else ""),
                newline=True,
            )

    def bar(self, step: int, epoch: int) -> None:
        frac = step / max(1, self.total)
        done = step - self.first_step
        eta = (time.time() - self.t0) / done * (self.total - step) if done > 0 else math.nan
        n = 24
        fill = int(frac * n)
        val = f" val {_pct(self.val)}" if self.val is not None else ""
        self.write(
            f"\r[{'#' * fill}{'.' * (n - fill)}] {100 * frac:3.0f}% {step}/{self.total} "
            f"ep {epoch} loss {self.loss:.4f}{val} ETA {eta:4.0f} s "
        )

    def write(self, text: str, newline: bool = False) -> None:
        if self.tty and newline and text and not text.startswith("\r"):
            text = "\r" + text + " " * 10
        self.stream.write(text + ("\n" if newline else ""))
        self.stream.flush()


def _train_config(args):
    from .train import TrainConfig

    base = TrainConfig.from_json(args.config).to_dict() if args.config else TrainConfig().to_dict()
    given = vars(args)
    # options belong to one model / dataset: a different one on the command line drops them
    if "model" in given and given["model"] != base["model"]:
        base["model_kwargs"] = {}
    if "dataset" in given and given["dataset"] != base["dataset"]:
        base["dataset_kwargs"] = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name in given:
            base[f.name] = given[f.name]
    if "skip" in given:
        base["skip"] = [] if given["skip"] == ["none"] else given["skip"]
    base["model_kwargs"] = {**base["model_kwargs"], **_key_values(args.model_args, "--model-arg")}
    base["dataset_kwargs"] = {**base["dataset_kwargs"], **_key_values(args.data_args, "--data-arg")}
    return TrainConfig.from_dict(base)


def _share_name(name: str | None, d) -> str:
    """Broadcast rank 0's run name to every process (as bytes in a tensor, no pickle)."""
    import torch
    import torch.distributed as dist

    buf = torch.zeros(256, dtype=torch.uint8)
    if d.main:
        raw = name.encode()
        buf[: len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
    if torch.cuda.is_available() and dist.get_backend() == "nccl":
        b = buf.cuda()
        dist.broadcast(b, 0)
        buf = b.cpu()
    else:
        dist.broadcast(buf, 0)
    return bytes(buf[buf > 0].tolist()).decode()


def cmd_train(args) -> int:
    from .train import init_distributed

    threads = "auto"
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads: {args.threads} must be >= 1")
        threads = args.threads
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise UsageError(f"--max-concurrent: {args.max_concurrent} must be >= 1")
    if args.data_dir:
        os.environ["LORITA_DATA"] = args.data_dir
    store = _store(args)
    if args.resume:
        if not args.name:
            raise UsageError("--resume needs --name RUN")
        run = store.get(args.name)
        config = _train_config_from_run(run, args)
    else:
        config = _train_config(args)
        run = None
    d = init_distributed(config.device)
    quiet = args.quiet or not d.main

    stop_event = threading.Event()

    def on_signal(signum, frame):
        if stop_event.is_set():  # a second signal: stop now
            signal.signal(signum, signal.SIG_DFL)
            raise KeyboardInterrupt
        stop_event.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _run_training(args, store, run, config, d, quiet, stop_event, threads)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run_training(args, store, run, config, d, quiet, stop_event, threads) -> int:
    from .runs import Run, acquire_slot
    from .train import train

    if run is None:
        if d.main:
            run = store.create(config.to_dict(), name=args.name)
        if d.on:
            name = _share_name(run.name if run else None, d)
            run = run or Run(store.root / name)
    elif d.main:
        if run.is_alive():
            raise UsageError(f"--resume: run {run.name!r} is still {run.raw_status().get('state')}")
        run.update_status(
            state="queued",
            message="resuming",
            pid=os.getpid(),
            host=socket.gethostname(),
            ended=None,
        )
    if d.main:
        run.start_heartbeat()
    if not quiet:
        print(f"run folder: {run.path}", file=sys.stderr)

    slot = None
    if args.max_concurrent and d.main:

        def should_stop():
            return stop_event.is_set() or run.stop_requested()

        slot = acquire_slot(store.root, args.max_concurrent, should_stop=should_stop)
        if slot is None:
            run.update_status(state="stopped", message="stopped while queued", ended=time.time())
            run.stop_heartbeat()
            if not quiet:
                print(f"stopped while queued: {run.path}")
            return 0
    try:
        result = train(
            config,
            run,
            callback=_Progress(quiet=quiet),
            stop=stop_event.is_set,
            resume=args.resume,
            threads=threads,
        )
    finally:
        if slot is not None:
            slot.close()
        if d.on:
            import torch.distributed as dist

            with contextlib.suppress(Exception):
                dist.destroy_process_group()
    if not quiet:
        print(run.path)
    if result["state"] == "failed":
        if d.main:
            print(f"lorita: training failed: {result['message']}", file=sys.stderr)
        return 1
    return 0


def _train_config_from_run(run, args):
    from .train import TrainConfig

    given = [k for k in vars(args) if k in {f.name for f in dataclasses.fields(TrainConfig)}]
    if given or args.config or args.model_args or args.data_args:
        raise UsageError("--resume takes the run's own config; drop the training flags")
    return TrainConfig.from_dict(run.config)


# --------------------------------------------------------------------------- runs


def cmd_runs(args) -> int:
    rows = _store(args).summaries()
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print(f"no runs in {_store(args).root}")
        return 0
    table = []
    for s in rows:
        ranks = s.get("effective_ranks") or {}
        table.append(
            [
                s["name"],
                s["state"] or "-",
                s["dataset"] or "-",
                s["model"] or "-",
                s["n_factors"] if s["n_factors"] is not None else "-",
                f"{s['weight_decay']:g}" if s["weight_decay"] is not None else "-",
                f"{s['step'] or 0}/{s['total_steps'] or '?'}",
                _pct(s["best_val_acc"]),
                _pct(s["test_acc"]),
                "/".join(str(v) for v in ranks.values()) or "-",
            ]
        )
    print(
        _table(
            table,
            [
                "name",
                "state",
                "dataset",
                "model",
                "N",
                "wd",
                "step",
                "best val",
                "test",
                "effective ranks",
            ],
        )
    )
    return 0


# --------------------------------------------------------------------------- compress / export


def _load_for_compress(args):
    run = _store(args).get(args.run)
    model = run.load_model(args.which)
    splits = run.load_splits()
    return run, model, splits


def _policy(name: str, value: float):
    import lorita as lt

    return lt.make_policy(name, value)


def cmd_compress(args) -> int:
    import lorita as lt

    from .train import evaluate, finetune

    if args.finetune_epochs < 0:
        raise UsageError(f"--finetune-epochs: {args.finetune_epochs} must be >= 0")
    run, model, splits = _load_for_compress(args)
    example = splits.example_input(1)
    merged = lt.merge_model(model).eval()

    def val_eval(m):
        return evaluate(m, splits.val)

    def measure(m) -> dict:
        cost = lt.count_cost(m, example)
        return {
            "val": val_eval(m),
            "test": evaluate(m, splits.test),
            "params": cost.params,
            "flops": cost.flops,
        }

    base = measure(merged)
    svd = lt.layer_svd(merged)
    full_ranks = {n: len(s) for n, s in svd.spectra.items()}
    search = None
    if args.max_drop is not None:
        if args.max_drop < 0:
            raise UsageError(f"--max-drop: {args.max_drop} must be >= 0 points")
        if args.search == "iterative":
            found = lt.iterative_search(
                merged,
                evaluate=val_eval,
                max_drop=args.max_drop,
                example_input=example,
                form=args.form,
                svd=svd,
            )
        else:
            found = lt.smallest_within(
                merged,
                args.search,
                evaluate=val_eval,
                max_drop=args.max_drop,
                example_input=example,
                form=args.form,
                svd=svd,
            )
        small = found["model"]
        search = {"search": args.search, "max_drop": args.max_drop, "value": found.get("value")}
        policy_desc = f"{args.search} search within {args.max_drop:g} points"
    else:
        name, value = (
            ("uniform", args.ratio)
            if args.ratio is not None
            else ("global", args.global_)
            if args.global_ is not None
            else ("energy", args.energy)
        )
        small = lt.truncate(merged, _policy(name, value), form=args.form, svd=svd)
        policy_desc = f"{name} {value:g}"
    ranks = dict(getattr(small, "lorita_ranks", {}) or {})
    if args.finetune_epochs:
        cfg = run.config
        lr = args.finetune_lr if args.finetune_lr is not None else float(cfg.get("lr", 1e-3)) / 10
        small = finetune(
            small,
            splits,
            epochs=args.finetune_epochs,
            lr=lr,
            optimizer=cfg.get("optimizer", "adam"),
            batch_size=int(cfg.get("batch_size") or 128),
            seed=int(cfg.get("seed", 0)),
        )
        small.lorita_ranks = ranks
    after = measure(small)
    out = {
        "run": run.name,
        "checkpoint": args.which,
        "policy": policy_desc,
        "form": args.form,
        "search": search,
        "finetune_epochs": args.finetune_epochs,
        "before": base,
        "after": after,
        "ranks": {
            n: {"kept": ranks.get(n, full_ranks.get(n)), "full": full_ranks.get(n)}
            for n in full_ranks
        },
        "params_pct": 100.0 * after["params"] / max(1, base["params"]),
        "flops_pct": 100.0 * after["flops"] / max(1, base["flops"]),
    }
    if args.out:
        lt.save(
            small,
            args.out,
            metadata={
                "run": run.name,
                "policy": policy_desc,
                "val_acc": after["val"]["acc"],
                "test_acc": after["test"]["acc"],
            },
        )
        out["out"] = str(args.out)
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print(
        f"run {run.name} ({args.which} checkpoint), {policy_desc}, form {args.form}"
        + (f", fine-tuned {args.finetune_epochs} epochs" if args.finetune_epochs else "")
    )
    rows = [
        [
            label,
            f"{m['params']:,}",
            f"{m['flops']:,}",
            _pct(m["val"]["acc"]),
            _pct(m["test"]["acc"]),
        ]
        for label, m in (("before", base), ("after", after))
    ]
    rows.append(
        [
            "after/before",
            f"{out['params_pct']:.1f}%",
            f"{out['flops_pct']:.1f}%",
            f"{100 * (after['val']['acc'] - base['val']['acc']):+.2f} pts",
            f"{100 * (after['test']['acc'] - base['test']['acc']):+.2f} pts",
        ]
    )
    print(_table(rows, ["", "params", "FLOPs", "val acc", "test acc"]))
    print(
        "ranks kept: " + ", ".join(f"{n} {v['kept']}/{v['full']}" for n, v in out["ranks"].items())
    )
    if args.out:
        print(f"saved {args.out}")
    return 0


def cmd_export(args) -> int:
    import lorita as lt

    run, model, splits = _load_for_compress(args)
    merged = lt.merge_model(model).eval()
    pol = args.policy.strip().lower()
    if pol == "none":
        out_model = merged
    else:
        name, _, value = pol.partition(":")
        try:
            v = float(value)
        except ValueError:
            raise UsageError(
                f"--policy: {args.policy!r}; expected none, uniform:R, global:F or energy:E"
            ) from None
        if name not in ("uniform", "global", "energy"):
            raise UsageError(
                f"--policy: {args.policy!r}; expected none, uniform:R, global:F or energy:E"
            )
        out_model = lt.truncate(merged, _policy(name, v), form=args.form)
    example = splits.example_input(1)
    out = Path(args.out)
    if args.format == "onnx":
        lt.export_onnx(out_model, example, out)
    else:
        acc = evaluate_quiet(out_model, splits)
        lt.save(
            out_model,
            out,
            input_shape=list(example.shape[1:]),
            metadata={"run": run.name, "policy": args.policy, **acc},
        )
    print(out)
    return 0


def evaluate_quiet(model, splits) -> dict:
    from .train import evaluate

    return {
        "val_acc": evaluate(model, splits.val)["acc"],
        "test_acc": evaluate(model, splits.test)["acc"],
    }


def cmd_stop(args) -> int:
    run = _store(args).get(args.run)
    run.request_stop()
    print(f"stop requested: {run.name} ({run.status().get('state')})")
    return 0


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return {
            "train": cmd_train,
            "runs": cmd_runs,
            "compress": cmd_compress,
            "export": cmd_export,
            "stop": cmd_stop,
        }[args.command](args)
    except UsageError as e:
        print(f"lorita: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, PermissionError, IsADirectoryError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"lorita: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lorita: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
