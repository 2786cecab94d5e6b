"""A generated fuzz of the command line: every flag of every command with wrong types, negative,
zero, huge, NaN, inf, empty, unicode and very long values; unknown flags, commands and names;
traversal in names; bad ``--config`` files, weights files and folders.

Each bad invocation must end with exit code 2 and exactly one line on stderr (``lorita: error:``
naming the flag or field where there is one), no traceback, and write nothing anywhere (the runs
folder included). Cases run in-process (``main(argv)`` in a temporary working directory with a
prepared runs folder; the training loop is replaced by a sentinel, so a case that would start
training is caught), a few more as real ``python -m lorita`` subprocesses, and a
property-based fuzz (hypothesis) checks that random token soups end cleanly too. The counts
are printed as one summary line.

The cases are generated from the library itself: TrainConfig's field metadata (kind, bounds,
choices), the policies in ``lorita.truncation.POLICIES`` and every flag the parser defines, so a
new flag or field is fuzzed without touching this file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lorita.engine
from lorita.cli import build_parser, main
from lorita.engine import TrainConfig
from lorita.runs import RunStore
from lorita.truncation import POLICIES

ROOT = Path(__file__).resolve().parents[1]
LONG = "x" * 5000
TEXT_JUNK = ["", " ", "\t", LONG, "\u2028", "ü名", "../../etc/passwd", "nope", "a\nb"]
NUM_JUNK = ["", " ", "abc", "nan", "NaN", "inf", "1e999", LONG, "١", "１", "0x10", "--1", "ü"]
NAME_JUNK = ["", " ", "../fake", "a/b", "/etc", ".hidden", "..", "x" * 101, "a" * 300, "ü名", "a b"]
NAME_JUNK += ["a\nb", LONG, "fake/../fake", "~"]
COUNTS: dict[str, int] = {}


class Reached(Exception):
    """The invocation got as far as the training loop (it was valid)."""


# --------------------------------------------------------------------------- the harness


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A working directory, a runs folder with one run (no checkpoint), and files to point at."""
    base = tmp_path_factory.mktemp("fuzz")
    cwd, runs, files = base / "cwd", base / "runs", base / "files"
    for d in (cwd, runs, files, base / "home"):
        d.mkdir()
    run = RunStore(runs).create({"dataset": "digits", "model": "mlp", "n_factors": 3}, name="fake")
    run.update_status(state="failed", message="made by the fuzz", pid=None)
    (files / "text.json").write_text("{not json")
    (files / "empty.json").write_text("")
    (files / "binary.json").write_bytes(b"\xff\xfe\x00garbage\x00")
    (files / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (files / "huge.json").write_text('{"lr": 0.001, "x": "' + "y" * 2_000_000 + '"}')
    (files / "weights.pt").write_bytes(os.urandom(256))
    (files / "weights.safetensors").write_text("not safetensors at all")
    from safetensors.torch import save_file

    save_file({"fc1.weight": torch.zeros(3, 3)}, str(files / "wrong.safetensors"))
    torch.save({"a": 1, "b": "text"}, files / "notensors.pt")
    (files / "a_dir").mkdir()
    (files / "empty_dir").mkdir()
    (files / "one_class" / "cat").mkdir(parents=True)
    return {"base": base, "cwd": cwd, "runs": runs, "files": files}


def _snapshot(base: Path) -> dict:
    out = {}
    for p in base.rglob("*"):
        with contextlib.suppress(OSError):
            st = p.lstat()
            out[str(p.relative_to(base))] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def harness(world, monkeypatch):
    """``call(argv) -> (code, out, err, wrote)``, in-process; code "train" if training began."""
    monkeypatch.chdir(world["cwd"])
    monkeypatch.setenv("LORITA_RUNS", str(world["runs"]))
    monkeypatch.setenv("LORITA_DATA", str(world["base"] / "data"))
    monkeypatch.setenv("HOME", str(world["base"] / "home"))

    def sentinel(*a, **kw):
        raise Reached

    monkeypatch.setattr(lorita.engine, "train", sentinel)

    def call(argv):
        before = _snapshot(world["base"])
        out, err = io.StringIO(), io.StringIO()
        threads = torch.get_num_threads()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(argv))
            except Reached:
                code = "train"
            except SystemExit as e:
                code = f"exit {e.code}"
            except Exception as e:  # noqa: BLE001 - reported as an unclean case
                code = f"raised {type(e).__name__}: {str(e)[:200]}"
        torch.set_num_threads(threads)
        after = _snapshot(world["base"])
        wrote = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        return code, out.getvalue(), err.getvalue(), wrote

    return call


def _unclean(result, needles=()) -> str | None:
    """Why a bad invocation's result is not clean (None if it is)."""
    code, out, err, wrote = result
    lines = err.splitlines()
    if code != 2:
        return f"exit {code!r}"
    if len(lines) != 1 or not lines[0].startswith("lorita: error: "):
        return f"stderr not one error line: {err[:300]!r}"
    if "Traceback" in err:
        return "traceback"
    if wrote:
        return f"wrote {wrote[:3]}"
    if needles and not any(n in lines[0] for n in needles):
        return f"message names none of {list(needles)}: {lines[0][:200]!r}"
    return None


def _run_cases(harness, cases, label: str) -> None:
    bad = []
    for argv, needles in cases:
        why = _unclean(harness(argv), needles)
        if why:
            bad.append(f"{[a[:40] for a in argv]}: {why}")
    COUNTS[label] = len(cases)
    COUNTS[label + " unclean"] = len(bad)
    assert not bad, f"{len(bad)} of {len(cases)} unclean:\n" + "\n".join(bad[:15])


# --------------------------------------------------------------------------- generated values


def _bad_numbers(kind: str, md: dict) -> list[str]:
    """Texts that are not a valid value for a number with this metadata."""
    out = list(NUM_JUNK) + ["-" + "9" * 30, "9" * 30]
    if kind == "int":
        out += ["1.5", "1e3", "2.0"]
    if "min" in md:
        lo = md["min"]
        out.append(str(lo) if md.get("min_open") else str(lo - 1))
    if "max" in md:
        hi = md["max"]
        out.append(str(hi) if md.get("max_open") else str(hi + 1 if kind == "int" else hi * 10 + 1))
    return out


def _choices(md: dict) -> list:
    ch = md.get("choices")
    return list(ch() if callable(ch) else ch) if ch is not None else []


def _field_values(f: dataclasses.Field, world) -> list[str]:
    md = dict(f.metadata)
    files = world["files"]
    special = {
        "dataset": ["imagenet", "folder:", "folder: ", "folder:/nonexistent/x", "DIGITS"]
        + [f"folder:{files / 'text.json'}", f"folder:{files / 'empty_dir'}"]
        + [f"folder:{files / 'one_class'}", "digits:x", "lowrank:"],
        "model": ["alexnet", "torchvision:", "torchvision:nope", "timm:nope_xyz", "MLP"]
        + ["torchvision:resnet18:x", "../x"],
        "device": ["gpu", "cuda:x", "cuda:-1", "tpu", "cuda:99999999999", "CPU"]
        + ([] if torch.cuda.is_available() else ["cuda", "cuda:0"]),
        "init_from": [str(files / "missing.pt"), str(files / "a_dir"), "/dev/zero"]
        + [str(files / n) for n in ("weights.pt", "weights.safetensors", "wrong.safetensors")]
        + [str(files / "notensors.pt")],
    }
    kind = md.get("kind")
    if kind in ("int", "float"):
        return _bad_numbers(kind, md)
    if kind == "list":
        return ["", " ", LONG]
    junk = [t for t in TEXT_JUNK if t not in _choices(md)] + ["ADAM"]
    return junk + special.get(f.name, [])


def _train_field_cases(world) -> list:
    cases = []
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("dataset_kwargs", "model_kwargs"):
            continue
        flag = "--factors" if f.name == "n_factors" else "--" + f.name.replace("_", "-")
        needles = (flag, f.name, "dataset", "model", "init_from", "device")
        if f.metadata.get("kind") == "bool":
            cases += [([f"{flag}=1"], (flag,)), ([f"--no-{flag[2:]}=x"], (flag[2:],))]
            continue
        cases += [([flag, v], needles) for v in _field_values(f, world)]
        cases.append(([flag], (flag,)))  # the value missing
    return [(["train", *argv], n) for argv, n in cases]


def _train_other_cases(world) -> list:
    files, n = world["files"], None
    runs_needles = ("--runs-dir", "runs folder", "File name too long", "not a folder")
    cases = []
    for flag in ("--threads", "--max-concurrent"):
        cases += [([flag, v], (flag,)) for v in _bad_numbers("int", {"min": 1, "max": 1024})]
    cases += [(["--name", v], ("--name", "run name", "-")) for v in NAME_JUNK]
    cases += [(["--name", "fake"], ("already exists",))]
    cases += [(["--runs-dir", v], runs_needles) for v in ["", str(files / "text.json"), LONG]]
    cases += [(["--runs-dir", "/dev/null"], runs_needles)]
    cases += [(["--data-dir", v], ("--data-dir",)) for v in ["", str(files / "text.json"), LONG]]
    for item in [
        "width", "=3", "width=", "width= ", "width=-1", "width=0", "width=1e9",
        "width=1000000000", "width=10**9", "depth=100000", "depth=0", "colour=3",
        "width=" + "[" * 3000, "width=NaN", "width=Infinity", 'width="a"', "ü=1", LONG,
        "1width=3", "width=1.5", "dropout=2",
    ]:  # fmt: skip
        key = item.partition("=")[0]
        cases.append((["--model-arg", item], ("--model-arg", "model", key)))
    cases.append((["--model-arg", "width=8"] * 65, ("--model-arg",)))
    for item in [
        "rank", "rank=", "rank=20", "n_train=1e12", "n_train=-1", "n_train=0", "dim=0",
        "dim=100000", "noise=NaN", "noise=-1", "colour=1", "task=ranking", "smooth=99",
        "n_train=" + "9" * 30, "dim=512", "n_train=1.5", "rank=true",
    ]:  # fmt: skip
        needles = ("--data-arg", "dataset", "lowrank")
        extra = ["--data-arg", "n_train=10000000"] if item == "dim=512" else []
        cases.append((["--dataset", "lowrank", "--data-arg", item, *extra], needles))
    cases.append((["--data-arg", "size=32"], ("dataset",)))
    folder = files / "imgs"
    _image_folder(folder)
    for item in ["size=0", "size=100000", "channels=2", "test_fraction=0.9", "size=abc"]:
        cases.append((["--dataset", f"folder:{folder}", "--data-arg", item], ("dataset",)))
    for name in ["missing.json", "text.json", "empty.json", "binary.json", "deep.json"]:
        cases.append((["--config", str(files / name)], ("--config", "config")))
    cases += [(["--config", v], ("--config", "config")) for v in ["", " ", "/dev/zero", LONG]]
    cases += [(["--config", str(files / "huge.json")], ("config",))]
    cases += [(["--config", str(files / "a_dir")], ("--config",))]
    for i, obj in enumerate(_bad_configs()):
        p = files / f"config{i}.json"
        p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
        cases.append((["--config", str(p)], n))
    cases += [(["--resume"], ("--resume",)), (["--resume", "--name", "nope"], ("nope",))]
    cases += [(["--resume", "--name", "fake", "--lr", "0.1"], ("--resume",))]
    cases += [(["--bogus"], ("--bogus",)), (["--epoch", "3"], ("--epoch",)), (["-x"], ("-x",))]
    cases += [(["--lr="], ("--lr",)), (["extra"], ("extra",)), (["---"], ("---",))]
    cases += [(["--uniform", "0.5"], ("--uniform",)), (["--model-args", "x=1"], ("--model-args",))]
    return [(["train", *argv], nd) for argv, nd in cases]


def _bad_configs() -> list:
    return [
        [1], "x", None, 3, {"colour": 1}, {"lr": "x"}, {"lr": float("nan")}, '{"lr": NaN}',
        {"epochs": 1e20}, {"epochs": -1}, {"dataset": 5}, {"dataset": "imagenet"},
        {"model_kwargs": [1]}, {"model_kwargs": {"width": 1e9}}, {"model": None},
        {"model_kwargs": {"depth": 100000}}, {"n_factors": 30}, {"name": "x"},
        {"dataset": "lowrank", "dataset_kwargs": {"n_train": 1e12}}, {"init_from": "/nonexistent"},
        {"device": "tpu"}, {f"k{i}": i for i in range(1000)}, {"skip": [1, 2]},
        {"seed": -1}, {"batch_size": 10**9}, {"": 1}, {"lr": True}, {"dataset_kwargs": "x"},
    ]  # fmt: skip


def _image_folder(root: Path) -> None:
    from PIL import Image

    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (80 * i, 0, 0)).save(root / c / f"{i}.png")


def _policy_cases() -> list:
    """Each policy flag with bad values, and --policy with bad text (compress)."""
    cases = []
    for name, cls in POLICIES.items():
        if not cls.value_name:
            continue
        flag = f"--{name}"
        values = [v for v in NUM_JUNK if v != "--1"] + ["9" * 30, "-" + "9" * 30]
        values += [str(cls.low - 1), str(cls.high + 1), str(cls.high * 10 + 1)]
        cases += [([flag, v], (flag,)) for v in values]
    for text in [
        "", " ", "global", "global:", "global:abc", "nope:1", "ranks:fc1", "ranks:fc1=x", ":",
        "budget:1000", "global:nan", "global:inf", "GLOBAL:2", LONG, "energy:-1",
        "budget:-5", "flops-budget:0",
    ]:  # fmt: skip
        cases.append((["--policy", text], ("--policy",)))
    return cases


def _valid_policy() -> list[str]:
    cls = next(c for c in POLICIES.values() if c.value_name)
    return [f"--{cls.name}", str(cls.default)]


def _compress_cases(world) -> list:
    files, ok = world["files"], _valid_policy()
    cases = [(["compress", "fake", *c], n) for c, n in _policy_cases()]
    cases += [(["compress", name, *ok], None) for name in NAME_JUNK + ["fake"]]
    both = ["--global", "0.5", "--energy", "0.9"]
    cases += [(["compress", "fake", *both], ("not allowed with",)), (["compress", "fake"], None)]
    opts = {
        "--max-drop": _bad_numbers("float", {"min": 0, "max": 100}),
        "--search": ["", "nope", "ranks", LONG],
        "--form": ["", "thin", "LOW_RANK"],
        "--form-by": ["", "speed", "LATENCY", LONG],
        "--form-batch": _bad_numbers("int", {"min": 1, "max": 4096}),
        "--which": ["", "worst", "../best"],
        "--finetune-epochs": _bad_numbers("int", {"min": 0, "max": 1000}),
        "--finetune-lr": _bad_numbers("float", {"min": 0, "max": 10, "min_open": True}),
        "--out": ["", str(files / "a_dir"), "/nonexistent/x.safetensors", LONG],
        "--runs-dir": ["", str(files / "text.json"), LONG],
        "--data-dir": ["", str(files / "text.json"), LONG],
    }
    for flag, values in opts.items():  # the same for compress and export
        pol = [] if flag == "--max-drop" else ok
        cases += [(["compress", "fake", *pol, flag, v], (flag,)) for v in values]
    cases += [(["compress", "fake", *ok, "--latency=1"], ("--latency",))]
    out = ["--out", str(files / "m.onnx")]
    cases += [(["export", "fake", *c, *out], n) for c, n in _policy_cases()]  # compress's flags
    cases += [(["export", "fake", *both, *out], ("not allowed with",))]
    for flag in (
        "--max-drop", "--search", "--form", "--form-by", "--form-batch", "--which", "--data-dir",
    ):  # fmt: skip
        cases += [(["export", "fake", *out, flag, v], (flag,)) for v in opts[flag]]
    cases += [
        (["export", "fake", *out, "--runs-dir", v], ("--runs-dir",)) for v in opts["--runs-dir"]
    ]
    return cases


def _other_command_cases(world) -> list:
    files = world["files"]
    cases = []
    budgets = ["", "0", "101", "5,,10", "a", "nan", "inf", "-5", "5;10", "9" * 30, LONG]
    budgets.append(",".join(str(i) for i in range(1, 23)))
    cases += [(["compare", "fake", "--budgets", b], ("--budgets",)) for b in budgets]
    cases += [(["compare", n], None) for n in NAME_JUNK]
    cases += [(["compare", "fake", "--baseline", n], None) for n in NAME_JUNK + ["fake"]]
    cases += [(["compare", "fake"], ("paired", "checkpoint"))]
    for flag, values in {
        "--finetune-epochs": _bad_numbers("int", {"min": 0, "max": 1000}),
        "--finetune-lr": ["0", "-1", "11", "nan", ""],
        "--methods": ["", "nope", "lorita,nope", ",", LONG],
        "--measure": ["", "bytes", "PARAMS"],
        "--which": ["", "worst"],
        "--data-dir": ["", str(files / "text.json"), LONG],
    }.items():
        cases += [(["compare", "fake", flag, v], (flag,)) for v in values]
    out = ["--out", str(files / "m.safetensors")]
    cases += [(["export", n, *out], None) for n in NAME_JUNK + ["fake"]]
    cases += [(["export", "fake", "--policy", t, *out], ("--policy",)) for t in ["", "half"]]
    cases += [(["export", "fake", "--policy", "global:7", *out], ("--policy",))]
    cases += [(["export", "fake", "--format", f, *out], ("--format",)) for f in ["", "pt", "pkl"]]
    cases += [(["export", "fake"], ("--out",))]
    bad_out = ["", str(files / "a_dir"), "/nonexistent/dir/m.onnx", LONG]
    cases += [(["export", "fake", "--out", o], ("--out",)) for o in bad_out]
    cases += [(["runs", "--delete", n], None) for n in NAME_JUNK]
    cases += [(["runs", "--json=1"], ("--json",)), (["runs", "extra"], ("extra",))]
    cases += [(["runs", "--runs-dir", v], ("--runs-dir",)) for v in ["", str(files / "text.json")]]
    cases += [(["stop", n], None) for n in NAME_JUNK + ["nope"]]
    cases += [(["models", n], None) for n in NAME_JUNK + ["torchvision:nope", "timm:"]]
    cases += [(["datasets", n], None) for n in NAME_JUNK + ["imagenet", "folder:", "Digits"]]
    bad_data = ["", str(files / "text.json"), LONG]
    cases += [(["datasets", "mnist", "--data-dir", v], ("--data-dir",)) for v in bad_data]
    bad_dirs = ["", str(files / "text.json"), LONG]
    for cmd in ("stop", "compare"):
        cases += [([cmd, "fake", "--runs-dir", v], ("--runs-dir",)) for v in bad_dirs]
    cases += [(["stop"], ("run",)), (["stop", "fake", "more"], ("more",))]
    cases += [([], ("command",)), ([""], None), (["frobnicate"], ("frobnicate",))]
    cases += [(["TRAIN"], ("TRAIN",)), (["--version"], None), ([LONG], None), (["ü"], None)]
    return cases


# --------------------------------------------------------------------------- the tests


def test_every_training_flag_with_bad_values(harness, world):
    _run_cases(harness, _train_field_cases(world), "training flags")


def test_other_training_options_config_files_and_names(harness, world):
    _run_cases(harness, _train_other_cases(world), "train options, configs, names")


def test_compress_flags_policies_and_run_names(harness, world):
    _run_cases(harness, _compress_cases(world), "compress")


def test_compare_export_runs_stop_and_commands(harness, world):
    _run_cases(harness, _other_command_cases(world), "compare, export, runs, stop, commands")


def test_every_parser_flag_is_fuzzed(world):
    """Every value-taking flag of every command appears in some generated case."""
    covered = set()
    for argv, _ in (
        _train_field_cases(world)
        + _train_other_cases(world)
        + _compress_cases(world)
        + _other_command_cases(world)
    ):
        covered |= {(argv[0], a.split("=")[0]) for a in argv[1:] if a.startswith("--")}
    missing = []
    for cmd, p in _commands().items():
        for action in p._actions:
            takes_value = action.nargs != 0 and action.option_strings
            if takes_value and not any((cmd, s) in covered for s in action.option_strings):
                missing.append(f"{cmd} {action.option_strings[0]}")
    assert not missing, missing


def test_valid_values_reach_training(harness):
    """The generated bad values are bad: their neighbours inside the bounds start training."""
    good = [
        ["--lr", "0.01"], ["--epochs", "10000"], ["--factors", "10"], ["--momentum", "0"],
        ["--weight-decay", "1"], ["--seed", str(2**32 - 1)], ["--inner", "null"],
        ["--dataset", "lowrank", "--data-arg", "n_train=1e3"], ["--model-arg", "width=8"],
        ["--threads", "1024"], ["--skip", "none"], ["--model", "torchvision:resnet18"],
        ["--dataset", "lowrank", "--data-arg", "dim=32", "--model", "vgg11"],
    ]  # fmt: skip
    if importlib.util.find_spec("timm") is not None:
        good.append(["--model", "timm:resnet18"])
    for i, argv in enumerate(good):
        code, _, err, wrote = harness(["train", "--name", f"ok{i}", *argv])
        assert code == "train", (argv, err)
        assert all(w.startswith("runs") for w in wrote), wrote
        store = RunStore(Path(os.environ["LORITA_RUNS"]))
        store.get(f"ok{i}").update_status(state="failed", pid=None)
        store.delete(f"ok{i}")


def test_random_token_soups_end_cleanly(harness):
    """Property: any argv of known flags, junk and numbers ends with exit 2 and one line, or is
    valid (training begins, or a listing prints); nothing is written outside the runs folder."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    flags = sorted(
        {s for p in _commands().values() for a in p._actions for s in a.option_strings}
        - {"-h", "--help", "--delete", "--resume"}  # these two change the shared run
    )
    token = st.one_of(
        st.sampled_from(flags),
        st.sampled_from(["fake", "nope", "../x", "", "0", "-1", "1e999", "nan", "ü", "0.5"]),
        st.text(max_size=12).filter(lambda t: t not in ("-h", "--help")),
        st.integers(-(10**30), 10**30).map(str),
        st.floats(allow_nan=True, allow_infinity=True).map(repr),
    )
    seen = {"n": 0, "unclean": 0}

    @hypothesis.settings(max_examples=200, deadline=None, derandomize=True, database=None)
    @hypothesis.given(st.sampled_from(sorted(_commands())), st.lists(token, max_size=6))
    def prop(cmd, rest):
        seen["n"] += 1
        code, _, err, wrote = harness([cmd, *rest])
        assert "Traceback" not in err
        assert all(w.startswith("runs") for w in wrote), wrote
        if code == 2:
            assert len(err.splitlines()) == 1 and not wrote, err
        else:
            assert code in ("train", 0), (code, err)

    prop()
    COUNTS["random token soups (hypothesis)"] = seen["n"]


def _commands() -> dict:
    parser = build_parser()
    return parser._subparsers._group_actions[0].choices


def test_bad_invocations_as_real_processes(world):
    """The same contract from a real ``python -m lorita`` (fresh interpreter, real stderr)."""
    files = world["files"]
    cases = [
        ["train", "--lr", "nan"],
        ["train", "--config", "/dev/zero"],
        ["train", "--name", "a" * 300],
        ["train", "--model-arg", "width=1000000000"],
        ["runs", "--runs-dir", str(files / "text.json")],
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LORITA_RUNS": str(world["runs"])}
    before = _snapshot(world["base"])
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "lorita", *argv],
            cwd=world["cwd"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for argv in cases
    ]
    bad = []
    for argv, p in zip(cases, procs):
        out, err = p.communicate(timeout=120)
        why = _unclean((p.returncode, out, err, []))
        if why:
            bad.append(f"{[a[:40] for a in argv]}: {why}")
    assert _snapshot(world["base"]) == before
    COUNTS["real processes"] = len(cases)
    assert not bad, bad


def test_zz_summary(capsys):
    """One line with the counts (printed past pytest's capture)."""
    soups = COUNTS.get("random token soups (hypothesis)", 0)
    bad = sum(v for k, v in COUNTS.items() if not k.endswith("unclean")) - soups
    unclean = sum(v for k, v in COUNTS.items() if k.endswith("unclean"))
    parts = ", ".join(f"{k} {v}" for k, v in COUNTS.items() if not k.endswith("unclean"))
    with capsys.disabled():
        print(
            f"\nCLI fuzz: {bad} generated bad invocations, {unclean} unclean; "
            f"{soups} random token soups ({parts})"
        )
    assert unclean == 0
