"""Training settings and run lifecycle moments found by QA (each test one finding)."""

import json

import pytest

import lorita as lt
from lorita.cli import main
from lorita.runs import RunStore


def _stopped_run(tmp_path, name="cut"):
    store = RunStore(tmp_path)
    cfg = {**lt.TrainConfig().to_dict(), "epochs": 1, "spectra_every": 0, "device": "cpu"}
    cfg.update(model_kwargs={"width": 32, "depth": 2})
    steps = iter(range(10**6))
    lt.train(cfg, store.create(cfg, name=name), threads=1, stop=lambda: next(steps) >= 3)
    assert store.get(name).status()["state"] == "stopped"
    return store


def _error(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    return err


def test_resume_takes_the_starting_commands_options_and_config(tmp_path, capsys):
    """``--resume`` added to the command that started a run (torchrun's way) may repeat its
    ``--model-arg`` / ``--data-arg`` / ``--config`` values; other values are refused."""
    store = _stopped_run(tmp_path)
    at = ["--runs-dir", str(tmp_path), "--quiet", "--threads", "1", "--resume", "cut"]
    err = _error(capsys, ["train", *at, "--model-arg", "width=64"])
    assert "(--model-arg)" in err
    assert "(--data-arg)" in _error(capsys, ["train", *at, "--data-arg", "rank=3"])
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"epochs": 2}))
    assert "(--config)" in _error(capsys, ["train", *at, "--config", str(other)])
    assert "(--lr, --model-arg)" in _error(
        capsys, ["train", *at, "--lr", "0.5", "--model-arg", "width=64"]
    )
    assert store.get("cut").status()["state"] == "stopped"  # refusals change nothing
    same = tmp_path / "same.json"
    same.write_text(json.dumps({"epochs": 1, "model_kwargs": {"width": 32, "depth": 2}}))
    argv = ["train", *at, "--config", str(same), "--model-arg", "width=32", "--epochs", "1"]
    assert main(argv) == 0, capsys.readouterr().err
    assert store.get("cut").status()["state"] == "completed"


@pytest.mark.parametrize("device", ["cuda:²", "cuda:٣"])
def test_a_device_index_in_other_digits_is_refused_by_name(device):
    with pytest.raises(ValueError, match="device: .* expected auto, cpu, cuda, cuda:<index>"):
        lt.TrainConfig.from_dict({"device": device})
