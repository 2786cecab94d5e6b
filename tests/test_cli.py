"""The command line: training, listing, compressing, exporting, and one-line errors."""

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lorita as lt
from lorita.cli import main
from lorita.runs import RunStore

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model-arg", "width=32", "--model-arg", "depth=2", "--threads", "1"]


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    """One small trained digits run shared by the read-only tests below."""
    d = tmp_path_factory.mktemp("runs")
    old = torch.get_num_threads()
    for name, n in (("r1", "3"), ("r0", "1")):
        argv = ["train", "--runs-dir", str(d), "--name", name, "--factors", n, "--epochs", "3"]
        assert main([*argv, "--quiet", *TINY]) == 0
    torch.set_num_threads(old)
    return d


def _one_line_error(capsys, argv, *needles):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lorita: error:"), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["train", "--dataset", "imagenet"], ["dataset", "imagenet", "digits"]),
        (["train", "--model", "alexnet"], ["model", "alexnet", "mlp"]),
        (["train", "--lr", "0"], ["lr", "0"]),
        (["train", "--lr", "-1e-3"], ["lr"]),
        (["train", "--factors", "0"], ["n_factors", "0"]),
        (["train", "--epochs", "two"], ["--epochs", "two"]),
        (["train", "--optimizer", "rmsprop"], ["optimizer", "rmsprop", "adamw"]),
        (["train", "--model-arg", "width"], ["--model-arg", "key=value"]),
        (["train", "--model-arg", "colour=3"], ["model_kwargs", "colour"]),
        (["train", "--name", "../evil"], ["run name", "../evil"]),
        (["train", "--bogus"], ["unrecognized", "--bogus"]),
        (["train", "--resume"], ["--resume needs a run", "--resume RUN"]),
        (["frobnicate"], ["frobnicate"]),
        (["compress", "nope", "--uniform", "0.5"], ["no run named 'nope'"]),
        (["export", "nope", "--format", "onnx", "--out", "x.onnx"], ["no run named 'nope'"]),
        (["compress", "x"], ["one of the arguments"]),
        (["compress", "x", "--uniform", "0.001"], ["--uniform", "not in [0.01, 1]"]),
        (["compress", "x", "--policy", "budget:1e-300"], ["budget", "not in [1, 100]"]),
        (["compress", "x", "--policy", "ranks:fc1=4,fc1=5"], ["'fc1' is given two ranks"]),
        (["compress", "x", "--policy", "uniform:0"], ["uniform: 0 is not in [0.01, 1]"]),
        (["compress", "x", "--policy", "global:nan"], ["global: nan is not in [0, 0.99]"]),
        (["compress", "nope", "--uniform", "0.5", "--data-dir", "."], ["no run named 'nope'"]),
        (["export", "x", "--format", "onnx", "--out", "x.safetensors"], ["but --format is onnx"]),
        (["export", "nope", "--out", "x.onnx", "--data-dir", "."], ["no run named 'nope'"]),
    ],
)
def test_bad_input_exits_2_with_one_line(capsys, tmp_path, argv, needles):
    argv = [*argv, "--runs-dir", str(tmp_path)] if argv[0] != "frobnicate" else argv
    _one_line_error(capsys, argv, *needles)
    assert not any(tmp_path.iterdir())  # nothing was created


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["--skip", "zzz"], ["skip", "'zzz' matches no layer", "fc1"]),
        (["--plain-epochs", "1", "--epochs", "2", "--max-steps", "10"], ["plain_epochs", "10"]),
        (["--plain-epochs", "3", "--epochs", "5", "--max-steps", "2"], ["at least 3 steps"]),
        (["--batch-size", "1"], ["batch_size: 1 cannot train a model with BatchNorm"]),
    ],
)
def test_train_refuses_what_the_run_would_find_before_its_folder_exists(
    capsys, tmp_path, argv, needles
):
    """The skip patterns and the plain epochs against --max-steps are checked before the
    folder is made, so the refused name stays free."""
    argv = ["train", "--runs-dir", str(tmp_path), "--name", "sk1", *argv, *TINY]
    _one_line_error(capsys, argv, *needles)
    assert not (tmp_path / "sk1").exists()


def test_bad_config_files(capsys, tmp_path):
    _one_line_error(capsys, ["train", "--config", str(tmp_path / "missing.json")], "not found")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    _one_line_error(capsys, ["train", "--config", str(bad)], "not readable JSON")
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"lr": 1e-3, "colour": "red"}))
    _one_line_error(capsys, ["train", "--config", str(wrong)], "unknown field", "colour")
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    _one_line_error(capsys, ["train", "--config", str(binary)], "not readable")
    relative = tmp_path / "rel.json"  # a relative init_from: said where it was looked for
    relative.write_text(json.dumps({"init_from": "weights/start.pt"}))
    _one_line_error(
        capsys, ["train", "--config", str(relative), "--runs-dir", str(tmp_path / "runs")],
        "init_from: 'weights/start.pt' not found", "a relative path there is taken from the "
        "working directory",
    )  # fmt: skip


def test_config_file_with_flag_overrides(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"epochs": 1, "n_factors": 2, "model_kwargs": {"width": 16}}))
    code = main(
        [
            "train",
            "--config",
            str(cfg),
            "--factors",
            "1",
            "--runs-dir",
            str(tmp_path / "r"),
            "--name",
            "c",
            "--quiet",
            "--threads",
            "1",
        ]
    )
    assert code == 0
    run = RunStore(tmp_path / "r").get("c")
    assert run.config["n_factors"] == 1 and run.config["epochs"] == 1
    assert run.config["model_kwargs"] == {"width": 16}
    assert capsys.readouterr().out == ""  # --quiet


def test_init_from_a_run_starts_from_its_best_checkpoint(runs_dir, tmp_path, capsys, monkeypatch):
    """The plain network trained first, then composed and trained on: --init-from RUN."""
    base = ["train", "--runs-dir", str(runs_dir), "--epochs", "1", "--quiet", *TINY]
    base += ["--lr", "1e-9", "--weight-decay", "0"]  # the weights stay the plain run's
    for i, ref in enumerate(("r0", str(runs_dir / "r0"))):
        assert main([*base, "--name", f"from-r0-{i}", "--init-from", ref]) == 0
        run = RunStore(runs_dir).get(f"from-r0-{i}")
        best = RunStore(runs_dir).get("r0").checkpoint("best")
        assert run.config["init_from"] == str(best.resolve())
        trained = lt.merge_model(run.load_model("last")).state_dict()
        plain = RunStore(runs_dir).get("r0").load_model("best").state_dict()
        torch.testing.assert_close(trained["fc1.weight"], plain["fc1.weight"])
        shutil.rmtree(run.path)  # the shared folder keeps its two runs
    _one_line_error(
        capsys, [*base, "--init-from", "nosuch"], "init_from", "nosuch", "nor is it a run"
    )
    # a run folder beside you, named by its one-part path: read from there, not --runs-dir
    monkeypatch.chdir(runs_dir)
    here = ["--runs-dir", str(tmp_path / "elsewhere"), "--name", "from-here"]
    assert main([*base[:1], *here, *base[3:], "--init-from", "r0"]) == 0
    best = RunStore(runs_dir).get("r0").checkpoint("best").resolve()
    assert RunStore(tmp_path / "elsewhere").get("from-here").config["init_from"] == str(best)
    empty = RunStore(tmp_path).create({**lt.TrainConfig().to_dict()}, name="queued")
    _one_line_error(
        capsys,
        ["train", "--runs-dir", str(tmp_path), "--init-from", "queued", "--epochs", "1"],
        "init_from",
        "'queued' has no best checkpoint yet",
    )
    assert empty.path.is_dir()
    # a weights file named by a relative path is kept absolute: --resume from elsewhere works
    lt.save(lt.merge_model(RunStore(runs_dir).get("r0").load_model("best")), "w.safetensors")
    assert (
        main([*base[:1], *here[:2], "--name", "rel", *base[3:], "--init-from", "w.safetensors"])
        == 0
    )
    kept = RunStore(tmp_path / "elsewhere").get("rel").config["init_from"]
    assert kept == str(runs_dir / "w.safetensors")


def test_resume_does_not_need_the_start_file_any_more(tmp_path):
    """A run started from another run resumes from its own checkpoint after that run (its
    start file) was deleted, and ends as if never stopped."""
    store = RunStore(tmp_path)
    plain = {**lt.TrainConfig().to_dict(), "n_factors": 1, "epochs": 1, "spectra_every": 0}
    plain.update(model_kwargs={"width": 32, "depth": 2}, device="cpu")
    lt.train(plain, store.create(plain, name="plain"), threads=1)
    cfg = {**plain, "n_factors": 3, "epochs": 2}
    cfg["init_from"] = str(store.get("plain").checkpoint("best"))
    whole = lt.train(cfg, store.create(cfg, name="whole"), threads=1)
    steps = iter(range(10**6))
    cut = lt.train(cfg, store.create(cfg, name="cut"), threads=1, stop=lambda: next(steps) >= 25)
    assert cut["state"] == "stopped"
    shutil.rmtree(store.get("plain").path)
    assert main(["train", "--runs-dir", str(tmp_path), "--resume", "--name", "cut", "--quiet",
                 "--threads", "1"]) == 0  # fmt: skip
    a, b = (store.get(n).load_model("last").state_dict() for n in ("whole", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert store.get("cut").result()["test_acc"] == whole["test_acc"]


def test_resume_takes_the_run_after_the_flag(tmp_path, capsys):
    """``--resume RUN`` continues RUN as ``--resume --name RUN`` does; two names are refused."""
    store = RunStore(tmp_path)
    cfg = {**lt.TrainConfig().to_dict(), "epochs": 1, "spectra_every": 0, "device": "cpu"}
    cfg.update(model_kwargs={"width": 32, "depth": 2})
    steps = iter(range(10**6))
    lt.train(cfg, store.create(cfg, name="cut"), threads=1, stop=lambda: next(steps) >= 3)
    assert store.get("cut").status()["state"] == "stopped"
    at = ["--runs-dir", str(tmp_path), "--quiet", "--threads", "1"]
    _one_line_error(capsys, ["train", "--resume", "cut", "--name", "other", *at], "two runs")
    _one_line_error(
        capsys, ["train", "--resume", "cut", "--device", "auto", *at], "that change it (--device)"
    )
    # the command that started it, --resume added: flags with the run's own values are fine
    assert main(["train", "--resume", "cut", "--device", "cpu", "--epochs", "1", *at]) == 0
    assert store.get("cut").status()["state"] == "completed"


def test_train_prints_progress_and_the_run_folder(runs_dir, tmp_path, capsys):
    code = main(["train", "--runs-dir", str(tmp_path), "--name", "p", "--epochs", "1", *TINY])
    cap = capsys.readouterr()
    assert code == 0
    assert cap.out.strip() == str(tmp_path / "p")
    assert "epoch 1" in cap.err and "completed" in cap.err and "val acc" in cap.err
    _one_line_error(
        capsys,
        ["train", "--runs-dir", str(tmp_path), "--name", "p", "--epochs", "1"],
        "already exists",
    )
    _one_line_error(
        capsys,
        ["train", "--runs-dir", str(tmp_path), "--name", "p", "--resume", "--epochs", "2"],
        "drop the training flags",
    )
    # a regression's score is R², not an accuracy: said so, as a number
    argv = ["train", "--runs-dir", str(tmp_path), "--dataset", "lowrank", "--epochs", "1"]
    assert main([*argv, "--data-arg", "task=regression", *TINY]) == 0
    err = capsys.readouterr().err
    assert "val R² 0." in err and "test R² " in err and "acc" not in err


def test_runs_table_and_json(runs_dir, capsys):
    assert main(["runs", "--runs-dir", str(runs_dir)]) == 0
    out = capsys.readouterr().out
    header, _, row = out.splitlines()[:3]
    for col in ["state", "dataset", "model", "N", "wd", "best val", "test", "effective ranks"]:
        assert col in header
    assert sorted(r.split()[0] for r in out.splitlines()[2:]) == ["r0", "r1"]
    r1 = next(r for r in out.splitlines() if r.startswith("r1"))
    assert r1.split()[:5] == ["r1", "completed", "digits", "mlp", "3"]
    assert main(["runs", "--runs-dir", str(runs_dir), "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["r1"]["test_acc"] > 0.5 and rows["r0"]["n_factors"] == 1


def test_runs_table_shortens_the_ranks_of_a_deep_model():
    from lorita.cli import _ranks

    assert _ranks({"fc1": 5, "fc2": 4, "head": 10}) == "5/4/10"
    deep = {f"layer{i}": i for i in range(21)}
    assert _ranks(deep) == "0/1/2/3/.../19/20 (21 layers)"
    assert _ranks({}) == _ranks(None) == "-"


def test_runs_lists_and_marks_broken_folders(tmp_path, capsys):
    store = RunStore(tmp_path)
    store.create({"dataset": "digits"}, name="good").update_status(state="failed", pid=None)
    for name, config, status in (("list", "[1]", "{}"), ("text", "{}", '"x"')):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(config)
        (tmp_path / name / "status.json").write_text(status)
    assert main(["runs", "--runs-dir", str(tmp_path)]) == 0
    table, messages = capsys.readouterr().out.split("\n\nmessages:\n")
    rows = {line.split()[0]: line for line in table.splitlines()[2:]}
    assert set(rows) == {"good", "list", "text"}
    assert "  list: broken run folder: config.json is not a readable JSON object" in messages
    assert "broken" in rows["list"] and "broken" not in rows["good"]
    assert main(["runs", "--runs-dir", str(tmp_path), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 3
    store.get("good").update_status(message="DatasetUnavailable: dataset 'folder:x': gone")
    assert main(["runs", "--runs-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "\n  good: DatasetUnavailable: dataset 'folder:x': gone\n" in out


def test_runs_delete(tmp_path, capsys):
    store = RunStore(tmp_path)
    store.create({"dataset": "digits"}, name="gone").update_status(state="failed", pid=None)
    assert main(["runs", "--runs-dir", str(tmp_path), "--delete", "gone"]) == 0
    assert "deleted gone" in capsys.readouterr().out and not (tmp_path / "gone").exists()
    _one_line_error(capsys, ["runs", "--runs-dir", str(tmp_path), "--delete", "gone"], "gone")
    alive = store.create({"dataset": "digits"}, name="alive")
    alive.update_status(state="running", pid=os.getpid())
    _one_line_error(
        capsys, ["runs", "--runs-dir", str(tmp_path), "--delete", "alive"], "stop it first"
    )
    assert (tmp_path / "alive").exists()


def test_compare_against_the_n1_baseline(runs_dir, capsys):
    argv = ["compare", "r1", "--baseline", "r0", "--budgets", "50,20", "--runs-dir", str(runs_dir)]
    assert main([*argv, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {(r["budget"], r["method"]) for r in rows} == {
        (b, m) for b in (20.0, 50.0) for m in ("lorita", "svd", "prune")
    }
    for r in rows:
        assert r["selected_on"] == "val" and r["reported_on"] == "test"
        assert r["params_pct"] <= r["budget"] + 1e-9 or not r["met"]
        assert 0 <= r["test_acc"] <= 1
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "r1 against the N=1 run r0" in out and "params %" in out and "test acc" in out
    assert len([line for line in out.splitlines() if line.startswith(("20%", "50%"))]) == 6


def test_compare_takes_a_composed_run_and_an_n1_baseline(runs_dir, capsys):
    """An N=1 run as RUN is refused with its N and its composed partner; an N>1 --baseline
    with its N."""
    at = ["--budgets", "10", "--runs-dir", str(runs_dir)]
    _one_line_error(
        capsys, ["compare", "r0", *at], "composed (N>1) run", "'r0' has N=1", "partner is 'r1'"
    )
    _one_line_error(capsys, ["compare", "r1", "--baseline", "r1", *at], "--baseline", "N=3")
    _one_line_error(capsys, ["compare", "r1", "--baseline", "nope", *at], "--baseline: no run")
    _one_line_error(capsys, ["compare", "r1", "--budgets", "0.5", *at[2:]], "--budgets", "[1, 100]")


def test_compare_refuses_a_baseline_of_another_network(runs_dir, tmp_path, capsys):
    """The baseline is the same network trained with N=1: an N=1 run of another width (or
    model) is named, and a run that has not completed is said to be cut as it stands."""
    import shutil

    wide = tmp_path / "runs"
    shutil.copytree(runs_dir, wide)
    config = json.loads((wide / "r0" / "config.json").read_text())
    config["model_kwargs"] = {**config["model_kwargs"], "width": 48}
    (wide / "r0" / "config.json").write_text(json.dumps(config))
    _one_line_error(
        capsys,
        ["compare", "r1", "--baseline", "r0", "--budgets", "50", "--runs-dir", str(wide)],
        "--baseline: another network than the run's", "'width': 48",
    )  # fmt: skip
    (wide / "r0" / "config.json").write_text((runs_dir / "r0" / "config.json").read_text())
    status = json.loads((wide / "r0" / "status.json").read_text())
    (wide / "r0" / "status.json").write_text(json.dumps({**status, "state": "stopped"}))
    argv = ["compare", "r1", "--baseline", "r0", "--budgets", "50", "--methods", "svd"]
    assert main([*argv, "--runs-dir", str(wide), "--json"]) == 0
    assert "run 'r0' is stopped at step" in capsys.readouterr().err


def test_compress_ratio_json(runs_dir, capsys):
    assert main(["compress", "r1", "--uniform", "0.25", "--json", "--runs-dir", str(runs_dir)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["after"]["params"] < out["before"]["params"]
    assert out["after"]["flops"] < out["before"]["flops"]
    for part in ("before", "after"):
        assert 0 <= out[part]["val_acc"] <= 1 and 0 <= out[part]["test_acc"] <= 1
        assert out[part]["latency_b1_ms"] > 0 and out[part]["latency_b64_ms"] > 0
    plan = out["after"]["plan"]
    assert (plan["fc2"]["rank"], plan["fc2"]["full"]) == (8, 32)
    ranks = out["spectra"]["fc2"]
    assert 1 <= ranks["energy"] <= ranks["effective"] <= 32 and "head" not in out["spectra"]
    assert not plan["head"]["cut"] and "output layer" in plan["head"]["note"]


def test_a_run_folder_path_stands_for_its_name(runs_dir, tmp_path, capsys):
    """The path ``lorita train`` prints last is accepted wherever a run name is."""
    argv = ["compress", str(runs_dir / "r1"), "--uniform", "0.5", "--json", "--no-latency"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["after"]["params"] > 0
    _one_line_error(
        capsys, ["compress", str(tmp_path / "nowhere"), "--uniform", "0.5"], "no config"
    )
    store = RunStore(tmp_path / "other")
    store.create({"dataset": "digits"}, name="gone").update_status(state="failed", pid=None)
    assert main(["runs", "--delete", str(tmp_path / "other" / "gone")]) == 0
    assert not (tmp_path / "other" / "gone").exists()


def test_compress_max_drop_finetune_and_save(runs_dir, tmp_path, capsys):
    dest = tmp_path / "small.safetensors"
    argv = [
        "compress",
        "r1",
        "--max-drop",
        "1",
        "--finetune-epochs",
        "1",
        "--out",
        str(dest),
        "--runs-dir",
        str(runs_dir),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "params" in out and "FLOPs" in out and "val acc" in out and "test acc" in out
    assert "ranks kept" in out and f"saved {dest}" in out and "energy rank (99%" in out
    small = lt.load(dest)
    kept = sum(p.numel() for p in small.parameters())  # BatchNorm folded: the file's own count
    assert f"({kept:,} parameters: BatchNorm folded into the layer before it" in out
    assert small.lorita_spec["metadata"]["run"] == "r1"
    assert main(["compress", "r1", "--max-drop", "1", "--json", "--runs-dir", str(runs_dir)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["after"]["val_acc"] >= res["before"]["val_acc"] - 0.01 - 1e-9
    assert (
        main(
            [
                "compress",
                "r1",
                "--max-drop",
                "2",
                "--search",
                "iterative",
                "--json",
                "--runs-dir",
                str(runs_dir),
            ]
        )
        == 0
    )
    it = json.loads(capsys.readouterr().out)
    assert it["after"]["val_acc"] >= it["before"]["val_acc"] - 0.02 - 1e-9


def test_export_safetensors_and_onnx(runs_dir, tmp_path, capsys):
    st = tmp_path / "m.safetensors"
    assert (
        main(
            [
                "export",
                "r1",
                "--policy",
                "energy:0.95",
                "--format",
                "safetensors",
                "--out",
                str(st),
                "--runs-dir",
                str(runs_dir),
            ]
        )
        == 0
    )
    m = lt.load(st)
    assert not lt.composed_layers(m)
    pytest.importorskip("onnx")
    onnx_path = tmp_path / "m.onnx"
    assert (
        main(
            [
                "export",
                "r1",
                "--format",
                "onnx",
                "--out",
                str(onnx_path),
                "--runs-dir",
                str(runs_dir),
            ]
        )
        == 0
    )
    assert onnx_path.stat().st_size > 1000
    assert capsys.readouterr().out.splitlines()[-1] == str(onnx_path)
    import lorita.export as export

    with pytest.MonkeyPatch.context() as mp:  # a model over 2 GiB: its weights beside the file
        mp.setattr(export, "ONNX_INLINE_BYTES", 1000)
        args = ["export", "r1", "--format", "onnx", "--out", str(onnx_path)]
        assert main([*args, "--runs-dir", str(runs_dir)]) == 0
    data = export.onnx_data_path(onnx_path)
    assert capsys.readouterr().out.splitlines()[-2:] == [
        str(onnx_path),
        f"{data} (the weights: keep it beside m.onnx)",
    ]
    _one_line_error(
        capsys,
        ["export", "r1", "--policy", "half", "--out", str(st), "--runs-dir", str(runs_dir)],
        "--policy",
    )


def test_every_exported_file_says_how_to_feed_the_model(runs_dir, tmp_path, capsys):
    """compress --out, export as trained (read without the data), cut, and ONNX: each file
    carries the run's preprocessing (input shape, pixels, mean and std), as its checkpoint
    recorded it."""
    import json

    ort = pytest.importorskip("onnxruntime")
    run = lt.RunStore(runs_dir).get("r1")
    how = run.preprocess("best")
    assert how["input_shape"] == [1, 8, 8] and how["normalize"]["std"]
    base = ["--runs-dir", str(runs_dir)]
    files = {
        "compress": ["compress", "r1", "--budget", "30", "--no-latency", "--out"],
        "as_trained": ["export", "r1", "--out"],
        "cut": ["export", "r1", "--budget", "30", "--out"],
    }
    for name, argv in files.items():
        assert main([*argv, str(tmp_path / f"{name}.safetensors"), *base]) == 0, name
        meta = lt.read_spec(tmp_path / f"{name}.safetensors")["metadata"]
        assert meta["preprocess"] == how, name
    for name, argv in (("as_trained", []), ("cut", ["--budget", "30"])):
        path = tmp_path / f"{name}.onnx"
        assert main(["export", "r1", *argv, "--format", "onnx", "--out", str(path), *base]) == 0
        props = ort.InferenceSession(str(path)).get_modelmeta().custom_metadata_map
        assert json.loads(props["preprocess"]) == how and props["run"] == "r1", name
    capsys.readouterr()


def cz_model(runs_dir):
    return RunStore(runs_dir).get("r1").load_model("best")


def test_export_takes_the_policy_flags_of_compress(runs_dir, tmp_path, capsys):
    """``export --budget 20`` writes the model ``compress --budget 20`` reports; --max-drop too."""
    base = ["r1", "--runs-dir", str(runs_dir)]
    assert main(["compress", *base, "--budget", "20", "--json", "--no-latency"]) == 0
    reported = json.loads(capsys.readouterr().out)["after"]["params"]
    x = torch.randn(1, 1, 8, 8)
    for flags in (["--budget", "20"], ["--max-drop", "1"]):
        path = tmp_path / f"{flags[0][2:]}.safetensors"
        assert main(["export", *base, *flags, "--no-fold-bn", "--out", str(path)]) == 0
        model = lt.load(path)
        said = lt.read_spec(path)["metadata"]["policy"]
        assert said.startswith("budget") if flags[0] == "--budget" else "search within 1" in said
        if flags[0] == "--budget":
            assert lt.count_cost(model, x).params == reported
            thin_ranks = model.lorita_ranks
        else:  # the file records the cut's own validation accuracy, not the uncut model's
            from lorita.compress import Compressor

            chosen = capsys.readouterr().err  # which cut the search chose, beside the file
            assert chosen.startswith("chosen: ") and "search within 1 points" in chosen
            assert "% of the parameters" in chosen and "val acc " in chosen
            cz = Compressor(RunStore(runs_dir).get("r1"))
            stored = lt.read_spec(path)["metadata"]["val_acc"]
            assert stored == pytest.approx(cz.data.metrics(model, parts=("val",))["val_acc"])
    capsys.readouterr()
    dense = tmp_path / "dense.safetensors"  # the budget's ranks in the original architecture
    assert main(["export", *base, "--budget", "20", "--form", "dense", "--out", str(dense)]) == 0
    assert "every weight keeps its size" in capsys.readouterr().err
    _one_line_error(  # compress reports the cut's cost: a dense budget is refused at once
        capsys, ["compress", *base, "--budget", "20", "--form", "dense"], "--form dense", "export"
    )
    plain, merged = lt.load(dense), lt.merge_model(cz_model(runs_dir))
    for name, r in thin_ranks.items():  # each cut layer: its full shape, of the budget's rank
        w = plain.get_submodule(name).weight
        assert w.shape == merged.get_submodule(name).weight.shape
        assert torch.linalg.matrix_rank(w) <= r
    capsys.readouterr()
    _one_line_error(
        capsys,
        ["export", *base, "--budget", "20", "--uniform", "0.5", "--out", str(path)],
        "not allowed with",
    )


def test_compress_checks_rank_names_before_the_session_loads(runs_dir, capsys, monkeypatch):
    """A typo in ranks: (or the output layer, which the command line keeps whole) is refused
    before the SVDs and the evaluation of the uncut model."""
    import lorita.compress

    def no_session(*a, **kw):
        raise AssertionError("the session was opened before the names were checked")

    monkeypatch.setattr(lorita.compress.Compressor, "__init__", no_session)
    base = ["compress", "r1", "--runs-dir", str(runs_dir), "--no-latency", "--policy"]
    _one_line_error(capsys, [*base, "ranks:nope=4"], "unknown layer name(s) ['nope']", "fc1")
    _one_line_error(capsys, [*base, "ranks:head=1"], "'head' is the output layer")


@pytest.mark.parametrize("command", ["compress", "export"])
@pytest.mark.parametrize("search", ["budget", "flops-budget"])
def test_a_budget_search_with_the_dense_form_is_refused_before_the_session_loads(
    runs_dir, tmp_path, capsys, monkeypatch, command, search
):
    """``--max-drop P --search budget --form dense`` is refused at once, as ``compress --budget
    P --form dense`` is, in the command line's words (it said ``form: ... Ranks(cut.lorita_ranks)``
    after the SVDs and the evaluation of the uncut model)."""
    import lorita.compress

    def no_session(*a, **kw):
        raise AssertionError("the session was opened before the flags were checked")

    monkeypatch.setattr(lorita.compress.Compressor, "__init__", no_session)
    argv = [command, "r1", "--runs-dir", str(runs_dir), "--max-drop", "1", "--search", search]
    argv += ["--form", "dense", "--out", str(tmp_path / "x.safetensors")]
    _one_line_error(capsys, argv, f"--search {search}", "--form dense", "--search global")
    assert not any(tmp_path.iterdir())


def test_compress_says_when_the_cut_measured_slower(runs_dir, capsys, monkeypatch):
    """Forms chosen by FLOPs can be slower at batch 1 (two small layers cost more than one):
    the output says so and names the flags that choose by measured time."""
    import lorita.cli as cli

    as_deployed = {"batchnorm": 0, "batchnorm_folded": 0, "memory_format": "contiguous"}
    times = [(1.0, 10.0), (1.8, 5.0)]  # before, after: slower at 1, faster at 64

    def timed(models, example):
        assert len(models) == 2  # timed together, paired
        return [
            {"latency_b1_ms": b1, "latency_b64_ms": b64, "latency_as": as_deployed}
            for b1, b64 in times
        ]

    monkeypatch.setattr(cli, "_latency", timed)
    assert main(["compress", "r1", "--runs-dir", str(runs_dir), "--uniform", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "note: at batch 1 the cut measured slower than the original (180%)" in out
    assert "--form-by latency --form-batch 1" in out and "at batch 64 the cut" not in out
    assert "busy" not in out


def test_compress_times_both_models_paired_and_says_when_the_machine_was_busy(
    runs_dir, capsys, monkeypatch
):
    import lorita.cost as cost

    monkeypatch.setattr(cost, "usable_cores", lambda: 2)
    monkeypatch.setattr(cost.os, "getloadavg", lambda: (5.0, 4.0, 3.0))
    timed = []
    real = cost.paired_latency

    def paired(models, example, **kw):
        timed.append((len(models), torch.get_num_threads(), kw.get("fastest")))
        return real(models, example, **{**kw, "repeats": 2, "warmup": 1})

    monkeypatch.setattr(cost, "paired_latency", paired)
    assert main(["compress", "r1", "--runs-dir", str(runs_dir), "--uniform", "0.5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert timed == [(2, 1, True)]  # before and after paired, on one thread, the fastest kept
    assert "load average 5.0 on 2 cores" in out["after"]["latency_as"]["busy"]
    assert out["before"]["latency_b64_ms"] > 0 and out["after"]["latency_b1_ms"] > 0
    assert main(["compress", "r1", "--runs-dir", str(runs_dir), "--uniform", "0.5"]) == 0
    assert "note: the machine was busy while timing (load average 5.0" in capsys.readouterr().out


def test_compress_says_when_the_run_did_not_complete(runs_dir, capsys):
    from lorita.runs import Run

    run = Run(runs_dir / "r1")
    before = run.raw_status()
    run.update_status(state="failed", step=7, total_steps=30)
    try:
        assert main(["compress", "r1", "--runs-dir", str(runs_dir), "--uniform", "0.5",
                     "--no-latency"]) == 0  # fmt: skip
        err = capsys.readouterr().err
        assert (
            "lorita: warning: run 'r1' is failed at step 7/30: this is its best checkpoint" in err
        )
    finally:
        run.update_status(**before)


def test_stop_command_writes_the_stop_file_of_a_live_run_only(runs_dir, capsys):
    from lorita.runs import Run, _me

    _one_line_error(capsys, ["stop", "r1", "--runs-dir", str(runs_dir)], "is not training")
    assert not (runs_dir / "r1" / "STOP").exists()
    run = Run(runs_dir / "r1")
    before = run.raw_status()
    run.update_status(state="running", **_me())  # as if this process trained it
    try:
        assert main(["stop", "r1", "--runs-dir", str(runs_dir)]) == 0
        assert (runs_dir / "r1" / "STOP").exists()
    finally:
        (runs_dir / "r1" / "STOP").unlink(missing_ok=True)
        run.update_status(**before)


def _cli(*args, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "lorita", *args], env=env, **kw)


def test_module_entry_point_and_sigterm_stop_with_queue(tmp_path):
    """`python -m lorita` works; a queued run shows up at once; SIGTERM stops with a checkpoint;
    a run stopped before its end exits 130."""
    common = [
        "--runs-dir",
        str(tmp_path),
        "--quiet",
        "--max-concurrent",
        "1",
        "--epochs",
        "200",
        "--spectra-every",
        "0",
        *TINY,
    ]
    first = _cli("train", "--name", "a", *common)
    store = RunStore(tmp_path)
    deadline = time.time() + 300  # each wait its own: a loaded machine imports torch slowly
    while not (
        (tmp_path / "a" / "status.json").exists() and store.get("a").status()["state"] == "running"
    ):
        assert time.time() < deadline and first.poll() is None, "run a never ran"
        time.sleep(0.05)
    second = _cli("train", "--name", "b", *common)
    deadline = time.time() + 300
    while not (tmp_path / "b" / "status.json").exists():
        assert time.time() < deadline and second.poll() is None, "run b never made its folder"
        time.sleep(0.05)
    time.sleep(1.0)
    b = store.get("b")
    assert b.status()["state"] == "queued" and b.is_alive()  # waits for the single slot
    b.request_stop()  # stop it while queued
    assert second.wait(timeout=60) == 130  # not trained: `&& lorita compress` goes no further
    assert b.status()["state"] == "stopped" and b.status()["message"] == "stopped while queued"

    a = store.get("a")
    deadline = time.time() + 300
    while not a.checkpoint("last").exists():
        assert time.time() < deadline and first.poll() is None, "run a wrote no checkpoint"
        time.sleep(0.05)
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=60) == 130  # stopped before its end, as Ctrl-C ends a command
    st = a.status()
    assert st["state"] == "stopped" and "on request" in st["message"]
    spec = lt.read_spec(a.checkpoint("last"))
    assert spec["metadata"]["step"] == st["step"]

    bad = _cli("train", "--lr", "0", "--runs-dir", str(tmp_path), stderr=subprocess.PIPE, text=True)
    _, err = bad.communicate(timeout=60)
    assert bad.returncode == 2 and err.count("\n") == 1 and "lr" in err


def test_a_queued_run_says_it_waits(tmp_path, capsys):
    """A run that finds every --max-concurrent slot taken says so once, then trains when one
    frees."""
    import threading

    from lorita.runs import PREPARING, WAITING_FOR_SLOT, Run, acquire_slot

    held = acquire_slot(tmp_path, 1)
    seen = []

    def release():  # once the run's status says it waits (a slow start must not beat it)
        status = tmp_path / "q" / "status.json"
        deadline = time.time() + 120
        while time.time() < deadline:
            with contextlib.suppress(OSError, ValueError):
                if json.loads(status.read_text()).get("message") == WAITING_FOR_SLOT:
                    seen.append(WAITING_FOR_SLOT)
                    break
            time.sleep(0.05)
        held.close()

    threading.Thread(target=release, daemon=True).start()
    real_update = Run.update_status

    def update_status(self, **fields):
        if fields.get("state") == "running":  # the last word before training
            seen.append(self.raw_status().get("message"))
        return real_update(self, **fields)

    argv = ["train", "--runs-dir", str(tmp_path), "--name", "q", "--max-concurrent", "1"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Run, "update_status", update_status)
        assert main([*argv, "--epochs", "1", "--spectra-every", "0", *TINY]) == 0
    err = capsys.readouterr().err
    assert err.count("queued: waiting for a training slot (1 of 1 in use)") == 1, err
    assert "Ctrl-C" in err and err.index("run folder:") < err.index("queued:")
    assert seen == [WAITING_FOR_SLOT, PREPARING]  # the app tells waiting from preparing


def test_a_folder_leaving_one_training_image_for_a_batchnorm_model_is_refused_first(
    tmp_path, capsys
):
    """Three images, one per class: test and validation take two, one is left to train, and
    BatchNorm cannot train on one sample: refused before the run folder, naming the fix."""
    _image_folder(tmp_path / "one", classes=("a", "b", "c"), per_class=1)
    argv = ["train", "--runs-dir", str(tmp_path / "runs"), "--name", "one", "--epochs", "1"]
    argv += ["--dataset", f"folder:{tmp_path / 'one'}", "--threads", "1"]
    _one_line_error(capsys, argv, "dataset", "leaves 1 sample(s) for training", "batchnorm=false")
    assert not (tmp_path / "runs" / "one").exists()
    assert main([*argv, "--model-arg", "batchnorm=false", "--quiet"]) == 0


@pytest.mark.parametrize(
    ("n_train", "needles"),
    [("1", ("leaves no sample for training", "raise n_train")),
     ("2", ("leaves 1 sample(s) for training", "raise n_train", "batchnorm=false"))],
)  # fmt: skip
def test_too_few_planted_samples_are_refused_before_the_run_folder(
    tmp_path, capsys, n_train, needles
):
    argv = ["train", "--runs-dir", str(tmp_path), "--name", "few", "--dataset", "lowrank",
            "--data-arg", f"n_train={n_train}", "--epochs", "1", "--threads", "1"]  # fmt: skip
    _one_line_error(capsys, argv, "dataset option 'n_train'", *needles)
    assert not (tmp_path / "few").exists()


def test_train_says_which_images_a_folder_leaves_out(tmp_path, capsys):
    """An image beside the class folders is in no class: the run says so (as the app does)."""
    from PIL import Image

    _image_folder(tmp_path / "pets")
    Image.new("RGB", (20, 20)).save(tmp_path / "pets" / "stray.png")
    argv = ["train", "--runs-dir", str(tmp_path / "runs"), "--epochs", "1"]
    assert main([*argv, "--dataset", f"folder:{tmp_path / 'pets'}", *TINY]) == 0
    err = capsys.readouterr().err
    assert "lorita: warning: dataset:" in err and "stray.png" in err and "left out" in err
    assert main([*argv, "--quiet", "--dataset", f"folder:{tmp_path / 'pets'}", *TINY]) == 0
    assert capsys.readouterr().err == ""  # --quiet: nothing, the checks' warnings neither


def _image_folder(root: Path, classes=("cat", "dog"), per_class=8, size=20) -> None:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            noise = torch.randint(0, 60, (size, size, 3), generator=g)
            pixels = (noise + 150 * k).clamp(0, 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / c / f"{i}.png")


def _lorita(*args, cwd) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LORITA_DATA": str(cwd / "data")}
    p = subprocess.run(
        [sys.executable, "-m", "lorita", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


@pytest.mark.slow
def test_own_model_and_images_end_to_end(tmp_path, capsys):
    """A torchvision ResNet-18 started from its own weights on a folder of images: train,
    compress, export, and load back into a fresh ResNet-18, from the command line."""
    from safetensors.torch import save_file
    from torchvision.models import resnet18

    images, runs = tmp_path / "pets", tmp_path / "runs"
    _image_folder(images)
    torch.manual_seed(0)
    start = resnet18(num_classes=2)
    save_file(start.state_dict(), str(tmp_path / "start.safetensors"))
    common = ["--runs-dir", runs]
    _lorita(
        "train", "--model", "torchvision:resnet18", "--dataset", f"folder:{images}",
        "--data-arg", "size=16", "--init-from", tmp_path / "start.safetensors",
        "--skip", "layer[1234].*", "--epochs", "1", "--batch-size", "8", "--lr", "1e-9",
        "--weight-decay", "0", "--spectra-every", "0", "--threads", "1", "--quiet",
        "--name", "pets", *common, cwd=tmp_path,
    )  # fmt: skip
    run = RunStore(runs).get("pets")
    assert run.status()["state"] == "completed"
    assert run.config["dataset"] == f"folder:{images}"
    # started from the file: with a learning rate of 1e-9 the trained weights are the file's
    trained = lt.merge_model(run.load_model("last")).state_dict()
    torch.testing.assert_close(trained["conv1.weight"], start.state_dict()["conv1.weight"])
    torch.testing.assert_close(trained["fc.weight"], start.state_dict()["fc.weight"])

    small = tmp_path / "small.safetensors"
    out = _lorita("compress", "pets", "--global", "0.5", "--out", small, "--json", "--no-latency",
                  *common, cwd=tmp_path)  # fmt: skip
    res = json.loads(out)
    assert res["after"]["params"] < res["before"]["params"]
    dense = tmp_path / "dense.safetensors"
    _lorita("export", "pets", "--out", dense, *common, cwd=tmp_path)  # as trained, merged

    splits = run.load_splits()
    x = splits.val[torch.arange(len(splits.val))][0]
    for path in (small, dense):
        fresh = resnet18(num_classes=2)
        model = lt.load(path, model=fresh).eval()
        with torch.no_grad():
            acc = (model(x).argmax(1) == splits.val.y).float().mean().item()
        assert acc == pytest.approx(lt.read_spec(path)["metadata"]["val_acc"], abs=1e-6)

    # the images gone (the run copied to another machine): the model as trained still exports,
    # the same file; a cut, which measures accuracy, says which dataset it needs
    images.rename(tmp_path / "elsewhere")
    again = tmp_path / "again.safetensors"
    assert main(["export", "pets", "--out", str(again), "--runs-dir", str(runs)]) == 0
    assert again.read_bytes() == dense.read_bytes()
    assert main(["export", "pets", "--out", str(tmp_path / "m.onnx"), "--runs-dir", str(runs)]) == 0
    assert (tmp_path / "m.onnx").stat().st_size > 0
    capsys.readouterr()
    cut = ["export", "pets", "--budget", "30", "--out", str(tmp_path / "c.safetensors")]
    assert main([*cut, "--runs-dir", str(runs)]) == 2
    assert f"dataset 'folder:{images}'" in capsys.readouterr().err


def test_progress_is_a_tqdm_bar_on_a_terminal_and_lines_otherwise():
    import io

    from lorita.cli import _Progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    events = [
        {"event": "start", "total_steps": 4, "step": 0, "device": "cpu"},
        *[{"event": "step", "step": s, "epoch": 0, "loss": 1.0 / s} for s in (1, 2, 3, 4)],
        {"event": "eval", "epoch": 0, "step": 4, "loss": 0.5, "acc": 0.75},
        {"event": "end", "state": "completed", "step": 4, "best_val_acc": 0.75, "time": 1.0},
    ]
    tty, log = Tty(), io.StringIO()
    bar = _Progress(stream=tty)
    for ev in events[:-1]:
        bar(ev)
    assert (bar.bar.n, bar.bar.total) == (4, 4) and "step/s" in tty.getvalue()  # tqdm's bar
    assert bar.bar.postfix.startswith("epoch=0, loss=0.2500, val=75.00%")
    bar(events[-1])
    assert bar.bar is None and "completed: step 4, best val acc 75.00%" in tty.getvalue()
    p = _Progress(stream=log)
    for ev in events:
        p(ev)
    lines = log.getvalue().splitlines()  # no bar in a file: one line per event worth keeping
    assert lines[0] == "training on cpu: 4 steps"
    assert lines[1].startswith("epoch 1  step 4/4") and "val acc 75.00%" in lines[1]
    assert lines[2].startswith("completed") and len(lines) == 3
    quiet = io.StringIO()
    q = _Progress(stream=quiet, quiet=True)
    for ev in events:
        q(ev)
    assert quiet.getvalue() == ""
    noted = io.StringIO()
    _Progress(stream=noted)({**events[0], "note": "init_from: the output layer 'fc' ..."})
    assert noted.getvalue().splitlines()[1] == "init_from: the output layer 'fc' ..."


def test_compress_and_export_choose_forms_by_latency(runs_dir, tmp_path, capsys, monkeypatch):
    """--form-by latency: each cut layer's form measured on this machine (here every thin form
    "measures" slower, so all go dense); the function and the accuracy stay, the plan says why."""
    from lorita import kinds

    monkeypatch.setattr(kinds, "_thin_is_faster", lambda dense, layer, args: False)
    base = ["r1", "--uniform", "0.25", "--runs-dir", str(runs_dir)]
    assert main(["compress", *base, "--json", "--no-latency"]) == 0
    flops = json.loads(capsys.readouterr().out)["after"]
    argv = ["compress", *base, "--json", "--no-latency", "--form-by", "latency"]
    assert main([*argv, "--form-batch", "8"]) == 0
    out = json.loads(capsys.readouterr().out)["after"]
    thin = [n for n, p in flops["plan"].items() if p["form"] == "low_rank"]
    assert thin and all(out["plan"][n]["form"] == "dense" for n in thin)
    assert all("slower at batch 8" in out["plan"][n]["note"] for n in thin)
    assert out["flops"] > flops["flops"] and out["val_acc"] == flops["val_acc"]
    assert out["policy"]["form_by"] == "latency" and out["policy"]["form_batch"] == 8
    assert main(["compress", *base, "--no-latency", "--form-by", "latency"]) == 0
    assert "chosen by latency at batch 64" in capsys.readouterr().out
    # a budget that the dense forms break is said, not hidden
    budget = ["r1", "--budget", "30", "--runs-dir", str(runs_dir), "--no-latency"]
    assert main(["compress", *budget, "--form-by", "latency", "--json"]) == 0
    over = json.loads(capsys.readouterr().out)["after"]
    assert over["params_pct"] > 30 and "over the budget of 30%" in over["note"]
    assert main(["compress", *budget, "--form-by", "latency"]) == 0
    assert "note: params" in capsys.readouterr().out
    assert main(["compress", *budget, "--json"]) == 0
    kept = json.loads(capsys.readouterr().out)["after"]
    assert kept["params_pct"] <= 30 and "note" not in kept
    paths = {}
    for by in ("flops", "latency"):
        paths[by] = tmp_path / f"{by}.safetensors"
        argv = ["export", *base[:1], "--policy", "uniform:0.25", "--form-by", by]
        assert main([*argv, "--out", str(paths[by]), "--runs-dir", str(runs_dir)]) == 0
    a, b = lt.load(paths["flops"]), lt.load(paths["latency"])
    assert any(isinstance(m, lt.LowRankLinear) for m in a.modules())
    assert not any(isinstance(m, lt.LowRankLinear) for m in b.modules())
    x = torch.randn(3, *a.lorita_spec["input_shape"])
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), rtol=1e-4, atol=1e-5)
    _one_line_error(capsys, ["compress", *base, "--form-by", "speed"], "--form-by")
    _one_line_error(capsys, ["compress", *base, "--form-batch", "0"], "--form-batch")


def test_compress_budget_met_is_the_share_kept(runs_dir, capsys, monkeypatch):
    """``budget.met`` says whether the model printed is within the budget (also after
    --form-by latency kept layers dense), and the table says so when it is not."""
    from lorita import kinds

    base = ["compress", "r1", "--runs-dir", str(runs_dir), "--no-latency"]
    assert main([*base, "--budget", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)["after"]
    assert out["params_pct"] > 1 and out["budget"]["met"] is False
    assert main([*base, "--budget", "1"]) == 0
    text = capsys.readouterr().out
    assert "budget 1 (not met)" in text
    assert f"note: budget not met: the cut keeps {out['params_pct']:.1f}% of the parameters" in text
    assert "head: output layer (10 outputs): left out" in text
    assert "keep_head" not in text  # (the library's argument: no flag of this command)
    assert main([*base, "--budget", "30", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)["after"]
    assert out["params_pct"] <= 30 and out["budget"]["met"] is True
    monkeypatch.setattr(kinds, "_thin_is_faster", lambda dense, layer, args: False)
    assert main([*base, "--budget", "30", "--form-by", "latency", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)["after"]
    assert out["params_pct"] > 30 and out["budget"]["met"] is False
    assert main([*base, "--budget", "30", "--form-by", "latency"]) == 0
    assert "budget 30 (not met)" in capsys.readouterr().out


def test_export_says_when_its_budget_is_not_met(runs_dir, tmp_path, capsys):
    """The file is written, and stderr says it is over the budget asked for, by how much."""
    import lorita as lt

    base = ["export", "r1", "--runs-dir", str(runs_dir)]
    for form in ("low_rank", "dense"):
        out = tmp_path / f"{form}.safetensors"
        assert main([*base, "--budget", "1", "--form", form, "--out", str(out)]) == 0
        err = capsys.readouterr().err
        assert "note: budget not met: the cut keeps " in err and "over the budget of 1%" in err
        assert lt.load(out) is not None
    assert main([*base, "--budget", "30", "--out", str(tmp_path / "ok.safetensors")]) == 0
    assert "not met" not in capsys.readouterr().err


def test_export_folds_batchnorm_unless_asked_not_to_and_compress_says_how_it_timed(
    runs_dir, tmp_path, capsys
):
    base = ["r1", "--policy", "uniform:0.5", "--runs-dir", str(runs_dir)]
    paths = {fold: tmp_path / f"m_{fold}.safetensors" for fold in ("fold-bn", "no-fold-bn")}
    for flag, path in paths.items():
        assert main(["export", *base, "--out", str(path), f"--{flag}"]) == 0
    folded = lt.read_spec(paths["fold-bn"])["folded"]
    assert folded and lt.read_spec(paths["no-fold-bn"])["folded"] == {}
    a, b = lt.load(paths["fold-bn"]), lt.load(paths["no-fold-bn"])
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in a.modules())
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in b.modules())
    x = torch.randn(5, *lt.read_spec(paths["fold-bn"])["input_shape"])
    torch.testing.assert_close(a(x), b(x), rtol=1e-4, atol=1e-5)
    capsys.readouterr()
    assert main(["compress", "r1", "--global", "0.5", "--runs-dir", str(runs_dir)]) == 0
    out = capsys.readouterr().out
    n = len(folded)
    assert "latency: both models timed as they deploy: BatchNorm folded into the layer " in out
    assert f"({n} of {n} before, {n} of {n} after), contiguous memory" in out


def test_a_deep_networks_layers_are_listed_one_line_per_stage(capsys):
    """Grouped as the app's tables are (one owner: lorita.kinds.stages)."""
    from lorita.cli import _print_layers
    from lorita.kinds import stages

    few = {"fc1": "3/8", "fc2": "4/8"}
    _print_layers("ranks kept", few)
    assert capsys.readouterr().out == "ranks kept: fc1 3/8, fc2 4/8\n"
    names = ["conv1"] + [f"features.{i}.block.{j}.0" for i in range(13) for j in range(2)]
    names += ["classifier.0", "classifier.3"]
    groups = list(dict.fromkeys(stages(names, 12).values()))
    # 'features' holds 26 layers in 13 stages side by side: neighbours taken together
    assert groups[:2] == ["conv1", "features.0–features.3"] and groups[-1] == "classifier"
    _print_layers("ranks kept", dict.fromkeys(names, "2/8"))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "ranks kept, by stage:" and len(lines) == 1 + len(groups)
    assert lines[1] == "  conv1: 2/8"
    assert lines[2].startswith("  features.0–features.3: features.0.block.0.0 2/8, ")
    assert lines[-1] == "  classifier: 0 2/8, 3 2/8"
    shown = [item.split(" ")[0] for line in lines[1:] for item in line.split(": ")[1].split(", ")]
    assert len(shown) == len(names)  # every layer once


def test_a_bad_model_option_names_the_default_the_run_has(capsys, tmp_path):
    """The default said beside a --model-arg of the wrong kind is the one the run would take
    without it: the classroom MLP's 512, a config's own value, the builder's otherwise."""
    at = ["train", "--runs-dir", str(tmp_path)]
    _one_line_error(capsys, [*at, "--model-arg", "width=abc"], "width='abc'", "(default 512)")
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"model": "mlp", "model_kwargs": {"width": 64}}))
    argv = [*at, "--config", str(config), "--model-arg", "width=abc"]
    _one_line_error(capsys, argv, "(default 64)")
    _one_line_error(capsys, [*at, "--model-arg", "depth=x"], "expected a number (default 3)")


def test_a_list_option_of_the_wrong_kind_says_what_it_takes(capsys, tmp_path):
    """A list-of-numbers option given text is refused naming the option, the value and the
    kind, before the model is built (no Python formatting error)."""
    from lorita.models import check_option_types

    with pytest.raises(ValueError, match=r"channels='abc' .*expected a list of numbers"):
        check_option_types("m", {"channels": "abc"}, {"channels": (64, 128)})
    check_option_types("m", {"channels": [8, 16]}, {"channels": (64, 128)})
    if importlib.util.find_spec("timm"):
        argv = ["train", "--runs-dir", str(tmp_path), "--model", "timm:resnet18"]
        line = _one_line_error(
            capsys, [*argv, "--model-arg", "channels=abc"], "channels='abc'", "a list of numbers"
        )
        assert "string formatting" not in line and "[64, 128, 256, 512]" in line


def test_datasets_lists_the_datasets_and_one_datasets_options_and_data(capsys, tmp_path):
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("digits, lowrank, mnist") and "folder:PATH" in out
    assert main(["datasets", "lowrank"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "  task=classification  what the targets are, one of classification, regression" in lines
    assert "  rank=4  rank of the teacher matrix, in [1, 1024]" in lines
    assert lines[-1] == "data: generated"
    assert main(["datasets", "digits"]) == 0
    assert capsys.readouterr().out.startswith("digits: no options\n")
    folder = tmp_path / "none"
    assert main(["datasets", f"folder:{folder}"]) == 0
    out = capsys.readouterr().out
    assert "  size=32  " in out and f"data: not here: dataset 'folder:{folder}'" in out
    assert main(["datasets", "imagenet"]) == 2
    assert "dataset: unknown name 'imagenet'" in capsys.readouterr().err


def test_models_lists_the_models_and_one_models_options(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("lorita (") and "mlp" in out and "torchvision:resnet18" in out
    assert main(["models", "torchvision:mobilenet_v3_small"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "  width_mult=1.0" in lines and "  dropout=0.2" in lines
    assert not any(x.startswith("  last_channel") for x in lines)  # the builder's own
    assert main(["models", "mlp"]) == 0
    out = capsys.readouterr().out  # the width a run of lorita train has, not the builder's
    assert "  width=512  (lorita train's; the builder alone gives 256)" in out.splitlines()
    assert main(["models", "alexnet2"]) == 2
    assert "model: unknown name 'alexnet2'" in capsys.readouterr().err
    if importlib.util.find_spec("timm"):  # lists and texts as --model-arg reads them back
        assert main(["models", "timm:resnet10t"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert "  channels=[64, 128, 256, 512]" in lines and "  stem_type=deep_tiered" in lines


def test_a_finished_run_gives_its_slot_back_before_keeping_its_curves(
    tmp_path, monkeypatch, curves_on
):
    """With --max-concurrent, a completed run's training slot is free while it sweeps its
    trade-off curves: a queued run (the app's N=1 baseline) starts meanwhile."""
    import lorita.curves
    from lorita.runs import acquire_slot

    seen = {}

    def sweep(run, splits, stop=None):
        slot = acquire_slot(tmp_path, 1, should_stop=lambda: True)
        seen["slot free"] = slot is not None
        if slot is not None:
            slot.close()

    monkeypatch.setattr(lorita.curves, "prepare", sweep)
    argv = ["train", "--runs-dir", str(tmp_path), "--max-concurrent", "1", "--epochs", "1"]
    assert main([*argv, "--quiet", *TINY]) == 0
    assert seen == {"slot free": True}


def test_flags_that_would_be_ignored_or_misread_are_refused(runs_dir, capsys, monkeypatch):
    """--search without --max-drop, --policy none where a cut is needed, an empty ranks
    policy, and a LORITA_RUNS that is empty or a file: each a one-line error naming it."""
    base = ["compress", "r1", "--runs-dir", str(runs_dir), "--no-latency"]
    _one_line_error(capsys, [*base, "--budget", "10", "--search", "iterative"], "--search")
    _one_line_error(capsys, [*base, "--policy", "none"], "--policy", "export")
    _one_line_error(capsys, [*base, "--policy", "ranks:"], "LAYER=RANK")
    for bad, needle in (("", "empty"), (str(runs_dir / "r1" / "config.json"), "not a folder")):
        monkeypatch.setenv("LORITA_RUNS", bad)
        _one_line_error(capsys, ["runs"], "LORITA_RUNS", needle)
    monkeypatch.setenv("LORITA_RUNS", str(runs_dir))
    assert main(["compress", "r1", "--max-drop", "5", "--search", "uniform", "--no-latency"]) == 0


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/<pid>/maps")
def test_ctrl_c_while_torch_imports_ends_with_one_line():
    """Ctrl-C in the seconds `python -m lorita` spends importing torch ends the command as
    Ctrl-C does later: one line and exit 130, no traceback through torch's import."""
    for _ in range(5):  # a fast machine may finish the import before we look: try again
        proc = subprocess.Popen(
            [sys.executable, "-m", "lorita", "runs", "--runs-dir", "/nonexistent-runs"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        loading = False
        while proc.poll() is None and not loading:
            with contextlib.suppress(OSError):
                loading = "libtorch" in Path(f"/proc/{proc.pid}/maps").read_text()
        if loading and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        if loading and "no runs" not in out:
            break
    else:
        pytest.skip("torch imported before the test could interrupt it")
    assert proc.returncode == 130, err
    assert err.strip() == "lorita: interrupted", err


def test_a_folder_that_only_holds_a_config_json_is_not_a_run(tmp_path, capsys):
    """A model download (config.json beside its weights) given as a run's path: neither
    deleted nor trained into."""
    folder = tmp_path / "hf_model"
    folder.mkdir()
    (folder / "config.json").write_text('{"architectures": ["Bert"]}')
    (folder / "weights.bin").write_bytes(b"x")
    for argv in (["runs", "--delete", str(folder)], ["train", "--resume", str(folder)]):
        _one_line_error(capsys, argv, "is not a run folder")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "weights.bin"]
    store = tmp_path / "runs"
    shutil.copytree(folder, store / "hf_model")  # the same inside a runs folder, by name
    _one_line_error(capsys, ["runs", "--runs-dir", str(store), "--delete", "hf_model"],
                    "nothing was deleted")  # fmt: skip
    assert (store / "hf_model" / "weights.bin").is_file()


def test_out_never_writes_over_a_run_a_link_or_a_device(runs_dir, tmp_path, capsys):
    best = runs_dir / "r1" / "checkpoints" / "best.safetensors"
    before = best.read_bytes()
    base = ["export", "r1", "--runs-dir", str(runs_dir), "--out"]
    _one_line_error(capsys, [*base, str(best)], "inside run folder")
    _one_line_error(capsys, [*base, str(runs_dir / "r1" / "config.json")], "inside run folder")
    assert best.read_bytes() == before
    (tmp_path / "target.safetensors").write_bytes(b"keep")
    (tmp_path / "link.safetensors").symlink_to(tmp_path / "target.safetensors")
    _one_line_error(capsys, [*base, str(tmp_path / "link.safetensors")], "a link or a device")
    _one_line_error(capsys, [*base, "/dev/null"], "a link or a device")
    _one_line_error(capsys, [*base, str(tmp_path / "new") + "/"], "ends in a slash")
    _one_line_error(
        capsys, ["compress", "r1", "--runs-dir", str(runs_dir), "--global", "0.5", "--out",
                 str(tmp_path / "y.onnx")], "lorita export",
    )  # fmt: skip
    _one_line_error(capsys, [*base, str(tmp_path / "p.safetensors"), "--global", "0.9",
                             "--policy", "none"], "not allowed with")  # fmt: skip


def test_resume_of_a_folder_without_a_training_config_changes_nothing(tmp_path, capsys):
    assert main(["train", "--runs-dir", str(tmp_path), "--name", "p", "--max-steps", "2",
                 "--quiet", *TINY]) == 0  # fmt: skip
    (tmp_path / "p" / "config.json").write_text('{"epochs": 1}')
    before = {p: p.read_bytes() for p in (tmp_path / "p").rglob("*") if p.is_file()}
    _one_line_error(capsys, ["train", "--runs-dir", str(tmp_path), "--resume", "p"],
                    "has no training config")  # fmt: skip
    assert {p: p.read_bytes() for p in (tmp_path / "p").rglob("*") if p.is_file()} == before


def test_several_runs_deleted_in_one_command(tmp_path, capsys):
    for name in ("a", "b"):
        assert main(["train", "--runs-dir", str(tmp_path), "--name", name, "--max-steps", "2",
                     "--quiet", *TINY]) == 0  # fmt: skip
    _one_line_error(capsys, ["runs", "--runs-dir", str(tmp_path), "--delete", "a", "--delete",
                             "nope"], "no run named 'nope'")  # fmt: skip
    assert (tmp_path / "a").is_dir()  # each is checked before any is deleted
    capsys.readouterr()
    argv = ["runs", "--runs-dir", str(tmp_path), "--delete", "a", "--delete", "b", "--json"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out) == {"deleted": ["a", "b"]}
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_model_that_fails_in_a_step_ends_in_one_line_and_a_failed_run(
    tmp_path, capsys, monkeypatch
):
    import lorita.engine.loop as loop

    def fails(s):
        raise RuntimeError("Kernel size can't be greater than actual input size")

    monkeypatch.setattr(loop, "_loop", fails)
    code = main(["train", "--runs-dir", str(tmp_path), "--name", "f", "--quiet", *TINY])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "Traceback" not in err and len(err.splitlines()) == 1
    assert err.startswith("lorita: training failed: RuntimeError: Kernel size")
    assert RunStore(tmp_path).get("f").status()["state"] == "failed"


def test_a_regression_run_shows_r2_not_accuracy(tmp_path, capsys):
    """compress, runs and compare name a regression's score R² and write it as it is (never
    as a percentage); their --json says the task."""
    for name, n in (("reg", "3"), ("reg1", "1")):
        argv = ["train", "--runs-dir", str(tmp_path), "--name", name, "--dataset", "lowrank",
                "--data-arg", "task=regression", "--max-steps", "4", "--quiet", "--factors", n,
                *TINY]  # fmt: skip
        assert main(argv) == 0
    capsys.readouterr()
    argv = ["compress", "reg", "--runs-dir", str(tmp_path), "--global", "0.5", "--no-latency"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "val R²" in out and "test R²" in out and "acc" not in out.split("ranks kept")[0]
    assert main(["compress", "reg", "--runs-dir", str(tmp_path), "--max-drop", "5"]) == 0
    assert "within 5 points (0.05 R²)" in capsys.readouterr().out

    assert main(["runs", "--runs-dir", str(tmp_path)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("reg")]
    assert len(rows) == 2 and all(line.count(" R² ") == 2 and "%" not in line for line in rows)
    assert main(["runs", "--runs-dir", str(tmp_path), "--json"]) == 0
    assert {r["task"] for r in json.loads(capsys.readouterr().out)} == {"regression"}

    argv = ["compare", "reg", "--baseline", "reg1", "--runs-dir", str(tmp_path), "--budgets", "50"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "val R²" in out and "test R²" in out
    assert all(not line.rstrip().endswith("%") for line in out.splitlines()[3:])
    assert main([*argv, "--methods", "lorita", "--json"]) == 0
    assert [r["task"] for r in json.loads(capsys.readouterr().out)] == ["regression"]


def test_export_of_a_checkpoint_holding_nan_is_refused_naming_it(runs_dir, tmp_path, capsys):
    """A checkpoint changed to hold NaN (training never writes one: it keeps its last good
    checkpoint), exported or compressed: refused, naming the run, the checkpoint and the
    tensor, and no file is written."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    root = tmp_path / "runs"
    shutil.copytree(runs_dir / "r1", root / "r1")
    path = root / "r1" / "checkpoints" / "last.safetensors"
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    key = next(k for k, t in tensors.items() if t.dim() == 2)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(path), metadata=meta)
    out = tmp_path / "m.safetensors"
    argv = ["export", "r1", "--which", "last", "--out", str(out), "--runs-dir", str(root)]
    _one_line_error(capsys, argv, "run 'r1': its last checkpoint's", "inf or NaN")
    assert not out.exists()
    compress = ["compress", "r1", "--which", "last", "--budget", "30", "--runs-dir", str(root)]
    _one_line_error(capsys, compress, "run 'r1': its last checkpoint's", "inf or NaN")
