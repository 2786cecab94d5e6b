"""Small defects of the Python API and the command line as a new user meets them: a mistyped
TrainConfig field, the model ``train`` returns, a config file read twice on ``--resume``, a
name the app has claimed taken by a terminal, Torch-Pruning's chatter in ``compare``, and the
README's Training example."""

from __future__ import annotations

import builtins
import json
import os
import pathlib
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import lorita as lt
from lorita.cli import main
from lorita.engine.config import UnknownFieldError
from lorita.runs import RunStore, live_launch_request, write_launch_owner

pytestmark = pytest.mark.usefixtures("one_thread")

README = Path(__file__).resolve().parents[1] / "README.md"
TINY = {"model_kwargs": {"width": 16, "depth": 1}, "n_factors": 2, "epochs": 1, "max_steps": 2,
        "spectra_every": 0, "eval_every": 0}  # fmt: skip
TINY_ARGS = ["--model-arg", "width=16", "--model-arg", "depth=1", "--factors", "2"]
TINY_ARGS += ["--epochs", "1", "--max-steps", "2", "--threads", "1", "--quiet"]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# --------------------------------------------------------------------------- unknown fields


def test_an_unknown_trainconfig_field_is_named_with_the_allowed_ones():
    """``TrainConfig(unknown_field=1)`` raised the dataclass's bare TypeError ("unexpected
    keyword argument"), unlike every other bad field, which is a ValueError naming it and
    what is allowed."""
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['unknown_field'\]") as e:
        lt.TrainConfig(unknown_field=1)
    assert isinstance(e.value, TypeError) and isinstance(e.value, UnknownFieldError)
    assert "allowed: dataset, dataset_kwargs" in str(e.value) and "weight_decay" in str(e.value)
    with pytest.raises(TypeError, match=r"'epoch': did you mean 'epochs'\?"):
        lt.TrainConfig(epoch=3)  # the closest field is named
    with pytest.raises(ValueError, match=r"'weight_decy': did you mean 'weight_decay'\?"):
        lt.TrainConfig.from_dict({"weight_decy": 1e-3})
    assert lt.TrainConfig(epochs=3).epochs == 3  # (known fields as before)


def test_a_config_file_with_a_mistyped_key_is_one_line_naming_the_closest_field(tmp_path, capsys):
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"epoch": 2}))
    argv = ["train", "--config", str(cfg), "--runs-dir", str(tmp_path / "runs")]
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert "unknown field(s) ['epoch']" in line and "did you mean 'epochs'?" in line, line
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


# --------------------------------------------------------------------------- train's model


def test_the_model_train_returns_is_in_eval_mode():
    """``lt.train(cfg)["model"]`` was left in train mode: called at once it dropped units and
    normalised by the batch's own statistics, so two calls on one input differed."""
    cfg = lt.TrainConfig(**{**TINY, "model_kwargs": {"width": 16, "depth": 1, "dropout": 0.5}})
    model = lt.train(cfg)["model"]
    assert not any(m.training for m in model.modules())
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


# --------------------------------------------------------------------------- --config read once


def test_resume_with_config_reads_the_file_once(tmp_path, capsys, monkeypatch):
    """``train --resume RUN --config FILE`` read FILE twice (the config, then again for its
    keys): a file changed between the reads gave a check of one file against another."""
    root = tmp_path / "runs"
    cfg = lt.TrainConfig(**{**TINY, "max_steps": 3})
    run = RunStore(root).create(cfg.to_dict(), name="r")
    assert lt.train(cfg, run, stop=lambda: True)["state"] == "stopped"
    file = tmp_path / "same.json"
    file.write_text(json.dumps({"epochs": 1, "n_factors": 2}))  # the run's own values

    reads = []
    real_open, real_path_open = builtins.open, pathlib.Path.open

    def seen(path) -> None:
        if isinstance(path, str | os.PathLike) and Path(path).name == file.name:
            reads.append(str(path))

    def counting_open(path, *a, **kw):
        seen(path)
        return real_open(path, *a, **kw)

    def counting_path_open(self, *a, **kw):
        seen(self)
        return real_path_open(self, *a, **kw)

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(pathlib.Path, "open", counting_path_open)
    argv = ["train", "--resume", "r", "--runs-dir", str(root), "--config", str(file)]
    assert main([*argv, "--threads", "1", "--quiet"]) == 0, capsys.readouterr().err
    assert len(reads) == 1, reads
    assert run.status()["state"] == "completed"


# --------------------------------------------------------------------------- the app's claims


def _claim(root: Path, name: str, pid: int) -> Path:
    request = root / ".app" / f"{name}.json"
    request.parent.mkdir(parents=True, exist_ok=True)
    request.write_text(json.dumps({**TINY, "max_steps": 1}))
    write_launch_owner(root, name, pid)
    return request


def test_a_terminal_run_leaves_a_name_the_app_is_starting(tmp_path, capsys):
    """The app claims ``.app/X.json`` at Start and its child makes the folder seconds later;
    ``lorita train --name X`` in those seconds took the name, and the app's run never ran."""
    root = tmp_path / "runs"
    request = _claim(root, "x", os.getpid())  # a live process will make the run
    assert live_launch_request(root, "x") == request
    assert main(["train", "--runs-dir", str(root), "--name", "x", *TINY_ARGS]) == 2
    line = _one_error_line(capsys)
    assert "'x' is claimed by the app" in line and ".app/x.json" in line, line
    assert "choose another --name" in line and not (root / "x").exists()

    # the app's own child (its config is the request) makes the run
    argv = ["train", "--runs-dir", str(root), "--name", "x", "--config", str(request)]
    assert main([*argv, "--threads", "1", "--quiet"]) == 0, capsys.readouterr().err
    assert RunStore(root).get("x").status()["state"] == "completed"
    assert live_launch_request(root, "x") is None  # the folder holds the name now


def test_a_claim_whose_process_has_ended_does_not_hold_the_name(tmp_path, capsys):
    root = tmp_path / "runs"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _claim(root, "y", gone.pid)
    assert live_launch_request(root, "y") is None
    assert main(["train", "--runs-dir", str(root), "--name", "y", *TINY_ARGS]) == 0
    assert RunStore(root).get("y").status()["state"] == "completed"


def test_the_app_names_the_process_that_will_make_the_run(tmp_path, monkeypatch, capsys):
    """The app's request names its child once started (the server before): while that child
    lives a terminal cannot take the name; once it has ended without making the run, the name
    is free again, and dismissing the failed start removes the request's files."""
    from app import jobs

    root = tmp_path / "runs"
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    monkeypatch.setattr(jobs, "command", lambda *a: sleeper)
    name = jobs.start({**TINY, "max_steps": 1}, name="z", root=root, concurrent=1)
    proc = jobs._PROCS[(str(root), name)]
    try:
        owner = json.loads((root / ".app" / "z.owner").read_text())
        assert owner["pid"] == proc.pid
        assert live_launch_request(root, "z") == root / ".app" / "z.json"
        assert main(["train", "--runs-dir", str(root), "--name", "z", *TINY_ARGS]) == 2
        assert "claimed by the app" in _one_error_line(capsys)
    finally:
        proc.kill()
        proc.wait()
    assert live_launch_request(root, "z") is None
    assert jobs.view(name, root).state == "failed"
    jobs.dismiss(name, root)
    assert sorted(p.name for p in (root / ".app").iterdir()) == []


def test_a_request_is_written_with_its_owner(tmp_path):
    from app import jobs

    root = tmp_path / "runs"
    name = jobs._request(root, {**TINY}, "w")
    owner = json.loads((root / ".app" / f"{name}.owner").read_text())
    assert owner["pid"] == os.getpid()  # this server, until it starts the child


# --------------------------------------------------------------------------- compare is quiet


def test_compare_prints_no_torch_pruning_warning(tmp_path, capsys):
    """``lorita compare`` of a ViT pair printed Torch-Pruning's "Unwrapped parameters
    detected" note (its class token and position embedding) on every pruning try."""
    vit = ["--model", "vit", "--model-arg", "dim=16", "--model-arg", "depth=1"]
    vit += ["--model-arg", "heads=2", "--max-steps", "2", "--threads", "1", "--quiet"]
    for name, n in (("v3", 3), ("v1", 1)):
        argv = ["train", "--runs-dir", str(tmp_path), "--name", name, "--factors", str(n)]
        assert main([*argv, *vit]) == 0
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # every warning shown, as on a first run
        argv = ["compare", "v3", "--baseline", "v1", "--budgets", "50"]
        assert main([*argv, "--runs-dir", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert "L1 structured pruning" in out.out
    assert "nwrapped" not in out.out + out.err, out.err


# --------------------------------------------------------------------------- README


def test_the_readme_training_example_runs_and_says_what_its_model_is(tmp_path, monkeypatch):
    """The Training section's example, one epoch instead of fifteen: the ranks its comment
    names, and the model it returns ready to evaluate, as its comment says."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "lt.train(cfg, run)" in b)
    assert "eval mode" in example
    short = example.replace("weight_decay=5e-3)", "weight_decay=5e-3, epochs=1)")
    assert short != example
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(short, "README.md", "exec"), scope)  # noqa: S102 - the README's own code
    said = re.search(r"# (\{'fc1'.*\})", example)[1]
    assert set(scope["run"].summary()["effective_ranks"]) == set(re.findall(r"'(\w+)'", said))
    assert scope["result"]["state"] == "completed"
    assert not scope["model"].training
