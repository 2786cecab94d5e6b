"""The compress session: one merged model, its SVD, held splits; apply, curve, search, fine-tune."""

import json

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import lorita as lt
from lorita.compress import Compressor, output_layer


@pytest.fixture(scope="module")
def digits():
    return lt.load_dataset("digits")


@pytest.fixture(scope="module")
def trained(digits):
    """A small N=3 MLP trained a few epochs on digits (about a second)."""
    torch.manual_seed(0)
    plain = lt.create_model("mlp", in_channels=1, image_size=8, num_classes=10, depth=2, width=48)
    model = lt.overparameterize(plain, 3)
    return lt.finetune(model, digits, epochs=4, lr=1e-2, weight_decay=1e-3, batch_size=64)


@pytest.fixture(scope="module")
def cz(trained, digits):
    return Compressor(trained, digits)


def test_base_is_the_merged_model(cz, trained, digits):
    merged = lt.merge_model(trained).eval()
    want = lt.evaluate(merged, digits.test)
    assert cz.base["test_acc"] == pytest.approx(want["acc"])
    assert cz.base["val_acc"] > 0.5  # it learned something
    assert cz.base["params"] == lt.count_cost(merged, digits.example_input(1)).params
    json.dumps(cz.base)


def test_head_is_left_out_by_default_and_the_plan_says_so(cz, trained, digits):
    assert cz.layers == ["fc1", "fc2"] and list(cz.left_out) == ["head"]
    res = cz.apply(lt.Uniform(0.1))
    assert res.plan["head"]["rank"] == res.plan["head"]["full"] == 10
    assert not res.plan["head"]["cut"] and "output layer" in res.plan["head"]["note"]
    assert res.plan["fc1"]["rank"] == 4 and res.plan["fc1"]["form"] == "low_rank"
    every = Compressor(trained, digits, keep_head=False)
    assert every.apply(lt.Uniform(0.1)).plan["head"]["rank"] == 1
    with pytest.raises(ValueError, match="left out"):
        cz.apply(lt.Ranks({"head": 2}))


def test_full_rank_apply_is_the_base_model(cz, digits):
    res = cz.apply(lt.Global(0.0))
    assert res.params == cz.base["params"] and res.params_pct == pytest.approx(100.0)
    assert res.metrics["test_acc"] == pytest.approx(cz.base["test_acc"])
    x = digits.example_input(5)
    assert_close(res.model(x), cz.model(x), rtol=1e-4, atol=1e-5)


def test_apply_budget_meets_it_and_is_json(cz):
    for pct in (25, 35, 50):
        res = cz.apply(lt.Budget(pct))
        assert res.params <= pct / 100 * cz.base["params"]
        assert res.extra["budget"]["met"] and res.policy == {
            "policy": "budget",
            "value": pct,
            "form": "low_rank",
        }
        row = json.loads(json.dumps(res.to_dict()))
        assert row["plan"]["fc1"]["rank"] == res.ranks["fc1"]
        assert set(row) >= {"params", "flops", "val_acc", "test_acc", "budget", "plan"}
    flops = cz.apply(lt.FlopBudget(30))
    assert flops.flops <= 0.3 * cz.base["flops"] and flops.extra["budget"]["measure"] == "flops"
    # the head, biases and norms alone are more than 5% of this tiny model: not reachable
    small = cz.apply(lt.Budget(5))
    assert not small.extra["budget"]["met"] and set(small.ranks.values()) == {1, 10}


def test_curve_calls_progress_per_point(cz):
    seen = []
    pts = cz.curve("budget", [100, 50, 30], progress=lambda d, n, p: seen.append((d, n, p)))
    assert [(d, n) for d, n, _ in seen] == [(1, 3), (2, 3), (3, 3)]
    assert [p["value"] for _, _, p in seen] == [100, 50, 30]
    assert pts[0]["params_pct"] == pytest.approx(100.0)
    assert pts[2]["params_pct"] <= 30 and {"val_acc", "test_acc", "ranks"} <= set(pts[2])
    json.dumps(pts)
    val_only = cz.curve(lt.Global, [0.5], parts=("val",))
    assert "test_acc" not in val_only[0] and val_only[0]["policy"] == "global"


def _shuffled_test(splits, seed=1):
    g = torch.Generator().manual_seed(seed)
    test = splits.test
    y = test.y[torch.randperm(len(test.y), generator=g)]
    return lt.data.TensorDataset(test.x, y, mean=test.mean, std=test.std)


def test_selection_reads_validation_only(trained, digits):
    """smallest_within and fine-tuning never choose on test: the uses record says so, and
    scrambling the test labels changes nothing but the reported test numbers."""
    import dataclasses

    a = Compressor(trained, digits)
    before = a.data.uses.copy()
    found = a.smallest_within(3.0, "global", values=[0.0, 0.4, 0.8])
    uses = a.data.uses - before
    assert uses[("test", "select")] == 0 and uses[("val", "select")] >= 3
    assert uses[("test", "report")] == 1  # only the chosen model is scored on test
    assert found.val_acc >= a.base["val_acc"] - 0.03 - 1e-9
    assert found.extra["search"]["max_drop"] == 3.0

    scrambled = dataclasses.replace(digits, test=_shuffled_test(digits))
    b = Compressor(trained, scrambled)
    other = b.smallest_within(3.0, "global", values=[0.0, 0.4, 0.8])
    assert other.ranks == found.ranks and other.val_acc == found.val_acc
    assert other.test_acc != found.test_acc

    tuned_a = a.finetune(found, 1)
    tuned_b = b.finetune(other, 1)
    assert tuned_a.val_acc == pytest.approx(tuned_b.val_acc)
    assert (a.data.uses - before)[("test", "select")] == 0


def test_finetune_keeps_plan_and_never_gets_test(cz, digits, monkeypatch):
    res = cz.apply(lt.Budget(10))
    got = {}
    import lorita.compress as compress_mod

    real = compress_mod._finetune

    def spy(model, splits, **kw):
        got["test"], got["kw"] = splits.test, kw
        return real(model, splits, **kw)

    monkeypatch.setattr(compress_mod, "_finetune", spy)
    tuned = cz.finetune(res, 2, lr=5e-3)
    assert got["test"] is None and got["kw"]["lr"] == 5e-3 and got["kw"]["epochs"] == 2
    assert tuned.finetune_epochs == 2 and tuned.plan == res.plan and tuned.params == res.params
    assert tuned.val_acc >= res.val_acc  # the starting point is a candidate epoch
    assert tuned.to_dict()["budget"] == res.extra["budget"]


def test_iterative_search_within_points(cz):
    res = cz.iterative_search(5.0, step=0.5, max_evals=12)
    assert res.val_acc >= cz.base["val_acc"] - 0.05 - 1e-9
    assert res.extra["search"]["evaluations"] <= 12


@pytest.mark.parametrize("name", ["mlp", "vgg", "resnet20", "vit"])
def test_output_layer_of_registry_models(name):
    net = lt.create_model(name, in_channels=3, image_size=16, num_classes=10)
    found = output_layer(net, torch.randn(1, 3, 16, 16))
    assert lt.spectra.layer_matrix(net.get_submodule(found)).shape[0] == 10
    assert found in ("head", "fc", "classifier") or found.endswith((".head", ".fc"))


def test_compressor_from_a_run(tmp_path, trained):
    store = lt.RunStore(tmp_path)
    run = store.create({"dataset": "digits", "model": "mlp", "n_factors": 3, "lr": 0.02})
    lt.save(trained, run.checkpoint("best"))
    cz = Compressor(store.get(run.name))
    assert cz.run == run.name and cz.recipe()["lr"] == pytest.approx(0.002)
    assert cz.recipe(lr=0.1, seed=None)["lr"] == 0.1
    assert Compressor(run.path).base == cz.base
    with pytest.raises(ValueError, match="which"):
        Compressor(run, which="worst")


@pytest.mark.parametrize(
    "call, field",
    [
        (lambda d: Compressor(nn.Sequential(nn.Linear(64, 10))), "splits"),
        (lambda d: Compressor(42, d), "source"),
        (lambda d: Compressor("/nonexistent/run", d), "source"),
        (lambda d: Compressor(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), d, layers=["x"]),
         "layers"),
    ],
)  # fmt: skip
def test_bad_arguments(call, field, digits):
    with pytest.raises(ValueError, match=field):
        call(digits)


def test_bad_recipe_and_policy(cz):
    with pytest.raises(ValueError, match="recipe"):
        cz.recipe(momentum=0.5)
    with pytest.raises(ValueError, match="policy: expected a policy"):
        cz.apply(0.5)
    assert cz.apply("global:0.5").plan == cz.apply(lt.Global(0.5)).plan  # text is a policy
    with pytest.raises(ValueError, match="policy"):
        cz.curve("magnitude")


def test_drop_ranks_are_the_smallest_single_layer_cuts_within_the_drop(cz):
    before = cz.data.uses.copy()
    ranks = cz.drop_ranks(1.0)
    assert set(ranks) == set(cz.layers)
    assert (cz.data.uses - before)[("test", "select")] == 0
    floor = cz.base["val_acc"] - 0.01 - 1e-12
    for name, r in ranks.items():
        assert 1 <= r <= cz.full_ranks[name]
        assert cz.apply(lt.Ranks({name: r})).val_acc >= floor
        if r > 1:  # the bisection ends with rank r - 1 tried and failing
            assert cz.apply(lt.Ranks({name: r - 1})).val_acc < floor
    with pytest.raises(ValueError, match="points"):
        cz.drop_ranks(-1)


def test_a_compressor_on_splits_built_by_hand(trained, digits, tmp_path):
    """Splits a user makes from their own tensors (any name) work: the session opens, cuts,
    and its exports say nothing of how raw inputs became these (only their maker knows)."""
    from torch.utils.data import TensorDataset

    x, y = digits.val[torch.arange(len(digits.val))]
    mine = TensorDataset(x, y)
    splits = lt.Splits(mine, mine, mine, 1, 8, 10, "my-data")
    cz = Compressor(trained, splits)
    assert cz.preprocess["pixels"] is None and cz.preprocess["dataset"] == "my-data"
    res = cz.apply(lt.Uniform(0.5))
    assert 0 < res.params_pct < 100 and res.val_acc > 0.3
