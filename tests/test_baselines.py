"""LoRITa against the SVD cut and L1 structured pruning of the N=1 run, at the same budget."""

import dataclasses
import json

import pytest
import torch
from torch import nn

import lorita as lt
from lorita.baselines import METHODS, compare, prune_to_budget, run_method
from lorita.compress import Compressor


@pytest.fixture(scope="module")
def digits():
    return lt.load_dataset("digits")


def _trained(splits, n):
    torch.manual_seed(0)
    plain = lt.create_model("mlp", in_channels=1, image_size=8, num_classes=10, depth=2, width=40)
    model = lt.overparameterize(plain, n)
    return lt.finetune(model, splits, epochs=3, lr=1e-2, weight_decay=1e-3, batch_size=64)


@pytest.fixture(scope="module")
def models(digits):
    return _trained(digits, 3), _trained(digits, 1)


def mlp():
    torch.manual_seed(0)
    return lt.create_model("mlp", in_channels=1, image_size=8, num_classes=10, depth=2, width=48)


@pytest.mark.parametrize("percent", [10, 25, 50, 80])
def test_pruned_baseline_has_the_budgets_parameter_count(percent):
    """Counted independently: at most the budget, and short of it by less than one neuron of
    every hidden layer. A uniform pruning ratio moves every hidden layer by whole neurons, and
    the search stops at one neuron of the widest layer, so no pruned model gets nearer."""
    net = mlp().eval()
    x = torch.randn(1, 1, 8, 8)
    full = lt.count_cost(net, x).params
    pruned, facts = prune_to_budget(net, x, percent)
    target = percent / 100 * full
    got = lt.count_cost(pruned, x).params
    assert got == facts["params"] <= target and facts["met"]
    # one hidden neuron of fc_i: its weight row, bias, BatchNorm scale and shift, and its
    # column in the next layer
    one_neuron = (64 + 1 + 2 + 48) + (48 + 1 + 2 + 10)
    assert target - got < one_neuron
    assert facts["above"] > target  # one step less pruned misses the budget
    assert pruned.head.out_features == 10 and facts["ignored_layers"] == ["head"]
    assert pruned(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    assert net.fc1.out_features == 48  # the input model is left as it was


def test_pruning_to_a_flops_budget_on_a_cnn():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 10),
    ).eval()  # fmt: skip
    x = torch.randn(1, 3, 8, 8)
    full = lt.count_cost(net, x).flops
    pruned, facts = prune_to_budget(net, x, 30, measure="flops")
    assert lt.count_cost(pruned, x).flops == facts["flops"] <= 0.3 * full
    assert facts["above"] > 0.3 * full and pruned[6].out_features == 10


def test_every_method_meets_the_budget(models, digits):
    n3, n1 = models
    ours, theirs = Compressor(n3, digits), Compressor(n1, digits)
    for method, session in (("lorita", ours), ("svd", theirs), ("prune", theirs)):
        res = run_method(method, session, 30)
        assert res.params <= 0.3 * session.base["params"] and res.extra["budget"]["met"]
        assert 0 <= res.val_acc <= 1 and 0 <= res.test_acc <= 1
    svd = run_method("svd", theirs, 30)
    assert svd.ranks == theirs.apply(lt.Budget(30)).ranks


def _scrambled(splits):
    test = splits.test
    g = torch.Generator().manual_seed(1)
    y = test.y[torch.randperm(len(test.y), generator=g)]
    return dataclasses.replace(
        splits, test=lt.data.TensorDataset(test.x, y, mean=test.mean, std=test.std)
    )


def test_compare_selects_on_validation_and_reports_on_test(models, digits):
    n3, n1 = models
    ours, theirs = Compressor(n3, digits), Compressor(n1, digits)
    seen = []
    rows = compare(
        ours, theirs, budgets=(40,), finetune_epochs=1, progress=lambda *a: seen.append(a)
    )
    assert len(rows) == len(METHODS) * 2 == len(seen) and seen[-1][:2] == (6, 6)
    json.dumps(rows)
    assert [(r["budget"], r["method"], r["finetune_epochs"]) for r in rows[:4]] == [
        (40, "lorita", 0), (40, "lorita", 1), (40, "svd", 0), (40, "svd", 1),
    ]  # fmt: skip
    assert all(r["met"] and r["params_pct"] <= r["budget"] for r in rows)
    assert [r["policy"]["policy"] for r in rows[::2]] == ["budget", "budget", "l1-prune"]
    for s in (ours, theirs):  # the test split was read only to report
        assert s.data.uses[("test", "select")] == 0 and s.data.uses[("val", "select")] > 0
    # scrambling the test labels changes the reported test numbers and nothing else
    again = compare(
        Compressor(n3, _scrambled(digits)), Compressor(n1, _scrambled(digits)),
        budgets=(40,), finetune_epochs=1,
    )  # fmt: skip
    chosen = ("params", "flops", "val_acc", "val_loss", "ranks", "method", "budget")
    assert [{k: r[k] for k in chosen} for r in again] == [{k: r[k] for k in chosen} for r in rows]
    assert [r["test_acc"] for r in again] != [r["test_acc"] for r in rows]


def test_compare_uses_one_recipe_for_every_method(models, digits, monkeypatch):
    import lorita.compress as compress_mod

    seen = []
    real = compress_mod._finetune

    def spy(model, splits, **kw):
        seen.append(kw)
        return real(model, splits, **kw)

    monkeypatch.setattr(compress_mod, "_finetune", spy)
    n3, n1 = models
    compare(Compressor(n3, digits), Compressor(n1, digits), budgets=(50,), finetune_epochs=1,
            lr=2e-3)  # fmt: skip
    assert len(seen) == 3 and all(kw == seen[0] for kw in seen) and seen[0]["lr"] == 2e-3


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"budgets": (0,)}, "budget"),
        ({"budgets": (120,)}, "budget"),
        ({"measure": "latency"}, "measure"),
        ({"methods": ("magnitude",)}, "methods"),
        ({"finetune_epochs": -1}, "finetune_epochs"),
        ({"finetune_epochs": 1.5}, "finetune_epochs"),
        ({"momentum": 0.9}, "recipe"),
    ],
)
def test_compare_refuses_bad_arguments(kw, field, models, digits):
    n3, n1 = models
    with pytest.raises(ValueError, match=field):
        compare(Compressor(n3, digits), Compressor(n1, digits), **kw)


def test_compare_refuses_a_baseline_that_is_not_the_runs_twin(models, digits):
    n3, n1 = models
    ours, theirs = Compressor(n3, digits), Compressor(n1, digits)
    ours.config = {"dataset": "digits", "n_factors": 3, "val_fraction": 0.1}
    theirs.config = {"dataset": "digits", "n_factors": 3, "val_fraction": 0.1}
    with pytest.raises(ValueError, match="N=1"):
        compare(ours, theirs, budgets=(50,))
    theirs.config = {"dataset": "mnist", "n_factors": 1, "val_fraction": 0.1}
    with pytest.raises(ValueError, match="dataset"):
        compare(ours, theirs, budgets=(50,))
    with pytest.raises(ValueError, match="method"):
        run_method("magnitude", ours, 50)
