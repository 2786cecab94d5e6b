"""The compression API with arguments nobody picked: odd numbers, odd callables, stale caches."""

import json

import numpy as np
import pytest
import torch
from torch import nn

import lorita as lt


@pytest.fixture(scope="module")
def digits():
    return lt.load_dataset("digits")


@pytest.fixture(scope="module")
def cz(digits):
    """An untrained small MLP's compress session (the checks here are about arguments)."""
    torch.manual_seed(0)
    plain = lt.create_model("mlp", in_channels=1, image_size=8, num_classes=10, depth=2, width=16)
    return lt.Compressor(plain, digits)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def test_policy_values_are_stored_as_plain_floats(cz):
    for policy in (lt.make_policy("uniform", np.float32(0.5)), lt.Budget(np.int64(20))):
        assert type(policy.value) is float
        json.dumps(policy.spec())
    json.dumps(cz.apply(lt.make_policy("uniform", np.float32(0.5))).to_dict())


def test_a_huge_int_value_is_refused_by_name():
    with pytest.raises(ValueError, match="percent"):
        lt.make_policy("budget", 10**400)
    with pytest.raises(ValueError, match="ratio"):
        lt.Uniform(-(10**400))


@pytest.mark.parametrize("refine", [1.5, -1, "2"])
def test_smallest_within_refine_must_be_a_count(cz, refine):
    with pytest.raises(ValueError, match="refine"):
        cz.smallest_within(1, "global", values=[0, 0.9], refine=refine)


@pytest.mark.parametrize("max_evals", [1.5, -1])
def test_iterative_search_max_evals_must_be_a_count(cz, max_evals):
    with pytest.raises(ValueError, match="max_evals"):
        cz.iterative_search(1, max_evals=max_evals)


def test_evaluate_must_be_callable_and_return_a_number():
    m, x = _mlp(), torch.randn(2, 6)
    with pytest.raises(ValueError, match="evaluate"):
        lt.tradeoff_curve(m, "global", [0.5], evaluate=None, example_input=x)
    with pytest.raises(ValueError, match="evaluate"):
        lt.iterative_search(m, evaluate=3, max_drop=1, example_input=x)
    with pytest.raises(ValueError, match="evaluate"):
        lt.smallest_within(m, "global", evaluate=lambda _: "x", max_drop=1, example_input=x)
    found = lt.smallest_within(
        m,
        "global",
        values=[0, 0.5],
        evaluate=lambda _: torch.tensor(1.0),
        max_drop=1,
        example_input=x,
    )
    assert found["value"] == 0.5


def test_rank_summary_of_a_0d_tensor_is_a_value_error():
    with pytest.raises(ValueError, match="1-D"):
        lt.rank_summary({"a": torch.tensor(1.0)})


def test_svd_cache_is_stale_after_weight_data_is_replaced():
    m = _mlp()
    cache = lt.layer_svd(m)
    m[0].weight.data = torch.randn(8, 6)
    with pytest.raises(ValueError, match="svd"):
        lt.truncate(m, lt.Uniform(0.5), svd=cache)


def test_compressor_names_a_bad_device_and_keep_head(digits):
    with pytest.raises(ValueError, match="device"):
        lt.Compressor(_mlp(), digits, device="foo")
    with pytest.raises(ValueError, match="keep_head"):
        lt.Compressor(_mlp(), digits, keep_head=0)


def test_smallest_within_refuses_a_step_too_fine_to_search(cz):
    with pytest.raises(ValueError, match="step"):  # else tens of millions of cuts
        cz.smallest_within(1, "global", values=[0, 0.9], step=1e-9)
    found = cz.smallest_within(1, "budget", values=[100, 5], refine=1, step=0.5)
    assert found.extra["search"]["value"] * 2 == int(found.extra["search"]["value"] * 2)


@pytest.mark.parametrize("text", ["ranks:fc1=²", "ranks:fc1=⑤"])
def test_parse_policy_names_the_policy_for_a_digit_int_does_not_read(text):
    with pytest.raises(ValueError, match="policy: expected ranks:LAYER=RANK"):
        lt.parse_policy(text)


def test_a_flops_budget_reads_back_as_one(cz):
    policy = lt.Budget(10, measure="flops")
    assert lt.parse_policy(str(policy)) == lt.FlopBudget(10)
    res = cz.apply(policy)
    back = lt.make_policy(res.policy["policy"], res.policy["value"])
    assert back.measure == "flops" == res.extra["budget"]["measure"]


@pytest.mark.parametrize("values", [0.5, "0.5", {0.5: 1}])
def test_curve_values_must_be_a_list(cz, values):
    with pytest.raises(ValueError, match="values"):
        cz.curve("global", values)


@pytest.mark.parametrize("scale", [1e-200, 1.0, 1e200])
def test_rank_measures_do_not_depend_on_scale(scale):
    s = [3.0 * scale, 2.0 * scale, 1.0 * scale]  # float64: its squares leave float64's range
    assert lt.stable_rank(s) == pytest.approx(14 / 9)
    assert lt.entropy_rank(s) == pytest.approx(lt.entropy_rank([3.0, 2.0, 1.0]))
    assert lt.energy_rank(s, 0.9) == 2
    assert lt.effective_rank(s) == 3


def test_a_negative_zero_is_spelled_zero():
    assert str(lt.Global(-0.0)) == "global:0"
