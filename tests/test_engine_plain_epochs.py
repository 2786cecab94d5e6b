"""Plain epochs first (TrainConfig.plain_epochs): the plain network trains, is composed into N
factors (the same function) at an epoch's end, and trains on with a new optimizer and schedule;
the best model is chosen among the composed epochs, and a run stopped before, at or after the
switch resumes to the uninterrupted run's weights."""

from __future__ import annotations

import copy

import pytest
import torch

from lorita.cli import main
from lorita.engine import TrainConfig, train
from lorita.engine.optim import make_scheduler
from lorita.runs import RunStore

CFG = {
    "dataset": "digits",
    "model": "mlp",
    "model_kwargs": {"depth": 2, "width": 16},
    "n_factors": 3,
    "plain_epochs": 1,
    "epochs": 3,
    "batch_size": 64,
    "warmup": 0.1,
    "seed": 0,
    "device": "cpu",
    "spectra_every": 0,
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _cosine(steps: int, lr: float) -> list[float]:
    """The learning rate after each of ``steps`` steps of a warmed-up cosine from ``lr``."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = make_scheduler("cosine", opt, steps, CFG["warmup"])
    out = []
    for _ in range(steps):
        opt.step()
        sched.step()
        out.append(opt.param_groups[0]["lr"])
    return out


def _steps(events: list[dict]) -> int:
    return next(e["steps_per_epoch"] for e in events if e["event"] == "start")


def test_plain_epochs_must_leave_epochs_to_the_composed_network():
    with pytest.raises(ValueError, match=r"plain_epochs: 3 is not allowed; expected fewer than"):
        TrainConfig(**{**CFG, "plain_epochs": 3})
    with pytest.raises(ValueError, match="plain_epochs"):
        TrainConfig(**{**CFG, "plain_epochs": -1})
    TrainConfig(**{**CFG, "n_factors": 1, "plain_epochs": 3})  # N=1: nothing to compose
    with pytest.raises(ValueError, match=r"plain_epochs: 1 plain epochs take \d+ steps, but"):
        train({**CFG, "max_steps": 5})  # the run would end before it composes


def test_the_switch_composes_the_same_function_and_restarts_the_schedule(tmp_path, monkeypatch):
    import lorita.engine.loop as loop

    switches = []
    compose = loop._compose

    def watched(s):  # the plain model just before the switch, the composed one just after
        before = copy.deepcopy(s.model).eval()
        compose(s)
        switches.append((before, copy.deepcopy(s.model).eval(), s.c.best_val))

    monkeypatch.setattr(loop, "_compose", watched)
    run = RunStore(tmp_path).create(CFG, name="p")
    events: list[dict] = []
    composed = []

    def stop() -> bool:
        return bool(composed)

    def keep(ev: dict) -> None:
        events.append(ev)
        if ev["event"] == "compose":
            composed.append(ev)

    res = train(CFG, run, callback=keep, stop=stop)
    spe = _steps(events)
    # stopped on the first composed step
    assert res["state"] == "stopped" and res["step"] == spe + 1
    assert [(e["step"], e["epoch"], e["n_factors"]) for e in composed] == [(spe, 1, 3)]

    # the plain epoch trained a plain network, composed into the same function
    (plain, factored, best), x = switches[0], run.load_splits().val[torch.arange(64)][0]
    assert not any(hasattr(m, "factors") for m in plain.modules())
    assert any(hasattr(m, "factors") for m in factored.modules())
    with torch.no_grad():
        torch.testing.assert_close(factored(x), plain(x), rtol=1e-4, atol=1e-4)
    # the plain epoch's best is dropped: the best is chosen among composed epochs only
    assert best is None and not run.checkpoint("best").is_file()
    assert any(".factors." in k for k in run.load_model("last").state_dict())

    # learning rates: one schedule over the plain epoch, a second over the other two
    lrs = [e["lr"] for e in events if e["event"] == "step"]
    res = train(CFG, run, callback=lambda e: lrs.append(e["lr"]) if e["event"] == "step" else 0,
                resume=True)  # fmt: skip
    assert res["state"] == "completed" and res["best_step"] > spe
    assert any(".factors." in k for k in run.load_model("best").state_dict())
    total = res["total_steps"]
    assert total == 3 * spe and len(lrs) == total

    lr = TrainConfig(**CFG).lr
    want = _cosine(spe, lr) + _cosine(total - spe, lr)
    torch.testing.assert_close(torch.tensor(lrs), torch.tensor(want), rtol=1e-9, atol=1e-12)


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("where", ["plain", "last plain step", "composed"])
def test_stop_before_at_or_after_the_switch_resumes_to_the_same_weights(tmp_path, where):
    ref = train(CFG)
    spe = ref["total_steps"] // CFG["epochs"]
    at = {"plain": spe - 5, "last plain step": spe - 1, "composed": spe + 4}[where]
    run = RunStore(tmp_path).create(CFG, name="r")

    def stopper(ev: dict) -> None:
        if ev["event"] == "step" and ev["step"] == at:
            run.request_stop()

    first = train(CFG, run, callback=stopper)
    assert first["state"] == "stopped" and first["step"] == at + 1
    res = train(CFG, run, resume=True)
    assert res["state"] == "completed" and res["step"] == ref["step"]
    got, want = _weights(res["model"]), _weights(ref["model"])
    assert got.keys() == want.keys() and any(".factors." in k for k in got)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert res["best_val_acc"] == ref["best_val_acc"]
    assert res["test_acc"] == ref["test_acc"]


def test_n1_ignores_plain_epochs():
    a = train({**CFG, "n_factors": 1, "epochs": 2})
    b = train({**CFG, "n_factors": 1, "epochs": 2, "plain_epochs": 0})
    for k, v in _weights(a["model"]).items():
        assert torch.equal(v, _weights(b["model"])[k]), k


def test_the_command_line_takes_plain_epochs_and_says_when_it_composes(tmp_path, capsys):
    code = main(
        ["train", "--runs-dir", str(tmp_path), "--name", "c", "--threads", "1",
         "--model-arg", "width=16", "--model-arg", "depth=2", "--epochs", "2",
         "--plain-epochs", "1", "--spectra-every", "0"]
    )  # fmt: skip
    assert code == 0
    err = capsys.readouterr().err
    assert "composed into N=3 factors" in err
    run = RunStore(tmp_path).get("c")
    assert run.config["plain_epochs"] == 1
    assert any(".factors." in k for k in run.load_model("best").state_dict())
    code = main(["train", "--runs-dir", str(tmp_path), "--name", "d", "--epochs", "2",
                 "--plain-epochs", "2"])  # fmt: skip
    assert code != 0
    assert "plain_epochs: 2 is not allowed" in capsys.readouterr().err


def _lrs(config: dict, run=None, **kw) -> tuple[dict, list[float]]:
    lrs: list[float] = []
    res = train(
        config, run, callback=lambda e: lrs.append(e["lr"]) if e["event"] == "step" else 0, **kw
    )
    return res, lrs


def test_the_composed_epochs_train_at_the_scaled_learning_rate_through_a_resume(tmp_path):
    cfg = {**CFG, "composed_lr_scale": 0.5}
    lr = TrainConfig(**cfg).lr
    ref, lrs = _lrs(cfg)
    spe, total = ref["total_steps"] // cfg["epochs"], ref["total_steps"]
    want = _cosine(spe, lr) + _cosine(total - spe, lr * 0.5)
    torch.testing.assert_close(torch.tensor(lrs), torch.tensor(want), rtol=1e-9, atol=1e-12)
    # stopped in the composed epochs: the resumed optimizer keeps the scaled rate
    run = RunStore(tmp_path).create(cfg, name="s")

    def stopper(ev: dict) -> None:
        if ev["event"] == "step" and ev["step"] == spe + 3:
            run.request_stop()

    first = train(cfg, run, callback=stopper)
    assert first["state"] == "stopped" and first["step"] == spe + 4
    res, after = _lrs(cfg, run, resume=True)
    assert res["state"] == "completed"
    torch.testing.assert_close(
        torch.tensor(after), torch.tensor(want[spe + 4 :]), rtol=1e-9, atol=1e-12
    )
    for k, v in _weights(ref["model"]).items():
        assert torch.equal(_weights(res["model"])[k], v), k


def test_composed_from_the_start_trains_at_the_scaled_rate_and_n1_at_lr():
    cfg = {**CFG, "plain_epochs": 0, "epochs": 1, "composed_lr_scale": 0.25}
    lr = TrainConfig(**cfg).lr
    res, lrs = _lrs(cfg)
    want = _cosine(res["total_steps"], lr * 0.25)
    torch.testing.assert_close(torch.tensor(lrs), torch.tensor(want), rtol=1e-9, atol=1e-12)
    res, lrs = _lrs({**cfg, "n_factors": 1})  # nothing composed: lr itself
    want = _cosine(res["total_steps"], lr)
    torch.testing.assert_close(torch.tensor(lrs), torch.tensor(want), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("bad", [0, -0.5, 11, "half", None])
def test_a_bad_composed_lr_scale_names_the_field(bad):
    with pytest.raises((ValueError, TypeError), match="composed_lr_scale"):
        TrainConfig(**{**CFG, "composed_lr_scale": bad})


def test_the_command_line_takes_the_composed_lr_scale(tmp_path, capsys):
    rc = main(["train", "--runs-dir", str(tmp_path), "--name", "c", "--epochs", "2",
               "--plain-epochs", "1", "--max-steps", "30", "--composed-lr-scale", "0.5",
               "--model-arg", "width=16", "--device", "cpu"])  # fmt: skip
    assert rc == 0
    assert RunStore(tmp_path).get("c").config["composed_lr_scale"] == 0.5
