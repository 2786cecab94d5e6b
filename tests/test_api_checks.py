"""The library's public calls, fed what users really pass: a clear error naming the argument,
and nothing changed behind their back (their model, their random streams)."""

import random

import numpy as np
import pytest
import torch
from torch import nn

import lorita as lt
from lorita.engine import evaluate, finetune


def mlp(hidden: int = 32) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def test_an_svd_cache_is_refused_for_another_model_or_changed_weights():
    """truncate(model, svd=cache) used to cut the cache's model whatever ``model`` was."""
    model = lt.overparameterize(mlp(), 3)
    svd = lt.layer_svd(model, keep_head=True)
    assert lt.truncate(model, "uniform:0.5", svd=svd)[1].rank == 16
    assert lt.truncate(svd.model, "uniform:0.5", svd=svd)[1].rank == 16  # its merged copy
    for other in (lt.overparameterize(mlp(16), 3), lt.overparameterize(mlp(), 3)):
        with pytest.raises(ValueError, match="svd: the cache was computed from another model"):
            lt.truncate(other, "uniform:0.5", svd=svd)
    with torch.no_grad():
        next(model.parameters()).mul_(2)  # a training step, say
    with pytest.raises(ValueError, match="svd: .*layer_svd\\(model\\)"):
        lt.plan_ranks(model, "uniform:0.5", svd=svd)


def test_a_refused_load_leaves_the_given_model_as_it_was(tmp_path):
    class Net(nn.Module):
        def __init__(self, out=10):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(64, 32), nn.Linear(32, out)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    path = lt.save(lt.truncate(lt.overparameterize(Net(), 3), "uniform:0.5"), tmp_path / "n.st")
    wrong = Net(out=7)
    before = {k: v.clone() for k, v in wrong.state_dict().items()}
    with pytest.raises(ValueError, match="'fc2.second.weight' has shape"):
        lt.load(path, model=wrong)
    assert type(wrong.fc1) is nn.Linear and type(wrong.fc2) is nn.Linear
    assert all(torch.equal(v, before[k]) for k, v in wrong.state_dict().items())
    right = Net()
    assert lt.load(path, model=right) is right  # loaded in place, as before


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"metadata": [1, 2]}, "metadata"),
        ({"input_shape": "abc"}, "input_shape"),
        ({"input_shape": (1, -1, 8, 8)}, "input_shape"),
        ({"input_shape": (2.5,)}, "input_shape"),
    ],
)
def test_save_refuses_what_load_would_refuse(tmp_path, kw, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        lt.save(mlp(), tmp_path / "m.safetensors", **kw)
    assert not (tmp_path / "m.safetensors").exists()


def test_save_takes_an_input_shape_of_numpy_or_torch_integers(tmp_path):
    for shape in (np.array([1, 8, 8]), torch.Size([1, 8, 8])):
        path = lt.save(mlp(), tmp_path / "m.safetensors", input_shape=shape)
        assert lt.read_spec(path)["input_shape"] == [1, 8, 8]


def test_an_example_that_requires_grad_is_only_run():
    x = torch.randn(3, 64, requires_grad=True)
    model = lt.overparameterize(mlp(), 3)
    assert lt.count_cost(model, x).flops == lt.count_cost(model, x.detach()).flops
    assert lt.truncate(model, "budget:50", example_input=x).lorita_budget["met"]


def test_train_leaves_the_callers_random_streams_as_they_were():
    def draw():
        return torch.rand(1).item(), np.random.rand(), random.random()

    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    expected = draw()
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    lt.train({"dataset": "digits", "epochs": 1, "spectra_every": 0, "seed": 5}, None)
    assert draw() == expected


@pytest.mark.parametrize(
    "call",
    [
        lambda: lt.truncate("model.pt", "uniform:0.5"),
        lambda: lt.layer_svd("model.pt"),
        lambda: lt.count_cost("model.pt", torch.randn(1, 64)),
        lambda: lt.measure_latency("model.pt", torch.randn(1, 64)),
        lambda: lt.save_bytes("model.pt"),
        lambda: lt.deploy_model("model.pt"),
        lambda: lt.fold_batchnorm("model.pt"),
        lambda: lt.iter_layers("model.pt").__next__(),
        lambda: lt.layer_spectra("model.pt"),
    ],
)
def test_a_path_where_a_model_belongs_is_named(call):
    with pytest.raises(ValueError, match="^model: expected a torch nn.Module, got str"):
        call()


def test_yes_no_options_take_only_true_or_false():
    model = mlp().eval()
    for call, field in (
        (lambda: lt.fold_batchnorm(model, inplace="no"), "inplace"),
        (lambda: lt.deploy_model(model, fold_bn="no"), "fold_bn"),
        (lambda: lt.layer_svd(model, keep_head="no"), "keep_head"),
    ):
        with pytest.raises(ValueError, match=f"^{field}: expected True or False"):
            call()
    x = torch.randn(2, 1, 8, 8)
    for call in (  # None: decided by the model
        lambda: lt.deploy_model(model, channels_last="no"),
        lambda: lt.measure_latency(model, x, channels_last="no"),
    ):
        with pytest.raises(ValueError, match="^channels_last: expected None, True or False"):
            call()
    assert type(model[1]) is nn.Linear


def test_evaluate_and_finetune_name_what_they_cannot_use():
    splits = lt.load_splits({"dataset": "digits"})
    model = mlp()
    with pytest.raises(ValueError, match="^dataset: expected one split"):
        evaluate(model, splits)
    with pytest.raises(ValueError, match="^batch_size: "):
        evaluate(model, splits.val, batch_size=0)
    with pytest.raises(ValueError, match="^splits: expected"):
        finetune(model, splits.train, epochs=1)
    with pytest.raises(ValueError, match="^model: no parameter requires grad"):
        finetune(mlp().requires_grad_(False), splits, epochs=1)


def test_one_name_where_names_are_taken(tmp_path):
    store = lt.RunStore(tmp_path)
    with pytest.raises(ValueError, match="^config: expected a TrainConfig or its dict"):
        store.create("cfg", name="x")
    run = store.create({"dataset": "digits", "epochs": 1, "spectra_every": 0}, name="one")
    lt.train(run.config, run)
    assert [s["name"] for s in store.compare("one")] == ["one"]
    cz = lt.Compressor(run, layers="fc1")
    assert list(cz.svd.svd) == ["fc1"]
    point = cz.curve("uniform", [0.5], parts="val")[0]
    assert "val_acc" in point and "test_acc" not in point


def test_numpy_numbers_are_numbers():
    """What an array's elements and NumPy loops give: accepted, and stored as plain numbers."""
    model = lt.overparameterize(mlp(), np.int64(3))
    assert lt.composition_summary(model)["n_factors"] == 3
    for policy in (
        lt.Uniform(np.float32(0.5)),
        lt.Budget(np.int64(30)),
        lt.Energy(np.float64(0.9)),
    ):
        lt.truncate(model, policy, example_input=torch.randn(2, 64))
    ranks = lt.Ranks({"1": np.int64(4)})
    assert type(ranks.ranks["1"]) is int
    assert lt.truncate(model, ranks)[1].rank == 4
    assert lt.LowRankLinear(8, 4, np.int64(2)).rank == 2
    assert lt.energy_rank(torch.tensor([3.0, 1.0]), keep=np.float32(0.5)) == 1
    with pytest.raises(ValueError, match="^n_factors: expected an integer"):
        lt.overparameterize(mlp(), True)


def test_more_factors_than_a_file_holds_are_refused():
    with pytest.raises(ValueError, match=r"^n_factors: expected an integer in \[1, 64\]"):
        lt.overparameterize(mlp(), 65)


def test_a_path_argument_names_what_it_got():
    for bad, words in ((None, "expected a file name, got NoneType"), (mlp(), "got a model")):
        with pytest.raises(ValueError, match=f"^path: {words}"):
            lt.load(bad)


def test_policy_names_read_in_any_case():
    assert str(lt.make_policy("Global", 0.5)) == "global:0.5"
    assert str(lt.make_policy(" Flops_Budget ", 10)) == "flops-budget:10"


def test_engine_calls_name_a_config_or_run_they_cannot_use():
    with pytest.raises(ValueError, match="^config: expected a TrainConfig, its dict or a run"):
        lt.load_splits("digits")
    with pytest.raises(ValueError, match="^run: expected a Run"):
        lt.train({"dataset": "digits", "epochs": 1}, "runs/x")
    with pytest.raises(ValueError, match="^splits: expected"):
        lt.build_model({"dataset": "digits"}, None)
