"""The learning-rate warm-up (TrainConfig.warmup): the schedule it builds, its bounds, resume."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lorita.engine import TrainConfig
from lorita.engine.optim import make_scheduler


def _opt(lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def _trace(sched, opt, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cosine_warmup_matches_closed_form():
    total, warm, lr = 40, 8, 0.1
    opt = _opt(lr)
    got = _trace(make_scheduler("cosine", opt, total, warmup=warm / total), opt, total)
    want = [lr * (0.01 + 0.99 * s / warm) for s in range(warm)] + [
        lr * 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm))) for s in range(warm, total)
    ]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-6, atol=1e-9)


def test_no_warmup_is_the_plain_schedule():
    a, b = _opt(), _opt()
    plain = torch.optim.lr_scheduler.CosineAnnealingLR(a, T_max=30)
    ours = make_scheduler("cosine", b, 30, warmup=0.0)
    assert _trace(ours, b, 30) == _trace(plain, a, 30)


@pytest.mark.parametrize("name", ["step", "none"])
def test_warmup_then_other_schedules(name):
    opt = _opt(0.1)
    lrs = _trace(make_scheduler(name, opt, 100, warmup=0.1), opt, 100)
    assert lrs[0] == pytest.approx(0.001)
    assert lrs[10] == pytest.approx(0.1)  # warm-up done
    if name == "none":
        assert lrs[-1] == pytest.approx(0.1)
    else:  # x0.1 at 50% and 75% of the 90 steps after the warm-up
        assert lrs[10 + 45] == pytest.approx(0.01)
        assert lrs[-1] == pytest.approx(0.001)


def test_warmup_state_survives_a_json_round_trip():
    """What a checkpoint stores (JSON) restores the same schedule."""
    a = _opt()
    sa = make_scheduler("cosine", a, 50, warmup=0.2)
    _trace(sa, a, 13)
    state = json.loads(json.dumps(sa.state_dict()))
    b = _opt()
    sb = make_scheduler("cosine", b, 50, warmup=0.2)
    sb.load_state_dict(state)
    b.param_groups[0]["lr"] = a.param_groups[0]["lr"]
    assert _trace(sb, b, 37) == pytest.approx(_trace(sa, a, 37))


def test_warmup_bounds():
    assert TrainConfig(warmup=0.5).warmup == 0.5
    for bad in (-0.1, 0.6, "x", float("nan")):
        with pytest.raises(ValueError, match="warmup"):
            TrainConfig(warmup=bad)
    with pytest.raises(ValueError, match="warmup.*plateau"):
        TrainConfig(warmup=0.1, schedule="plateau")
    assert TrainConfig(warmup=0.0, schedule="plateau").warmup == 0.0
