"""Bad and unusual input to the public API, as an engineer with their own model passes it: a
ValueError naming the argument, never an error from deep inside PyTorch."""

import pytest
import torch
from torch import nn

import lorita as lt
from lorita.engine import evaluate, finetune


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


class Named(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_spectra_of_a_meta_model_are_refused_by_name():
    with torch.device("meta"):
        model = mlp()
    with pytest.raises(ValueError, match="model: .*meta"):
        lt.layer_spectra(model)


def test_one_layer_name_is_taken_as_one_name():
    model = Named()
    assert list(lt.layer_spectra(model, "fc1")) == ["fc1"]
    cut = lt.truncate(model, lt.Uniform(0.5), layers="fc1")
    assert set(cut.lorita_ranks) == {"fc1"}
    for call in (
        lambda: lt.layer_spectra(model, 3),
        lambda: lt.truncate(model, lt.Uniform(0.5), layers=3),
    ):
        with pytest.raises(ValueError, match="(names|layers): expected"):
            call()


def test_an_empty_batch_is_refused_where_its_first_sample_is_repeated(tmp_path):
    x = torch.randn(0, 8)
    with pytest.raises(ValueError, match="example_input: .*no samples"):
        lt.truncate(mlp(), lt.Energy(0.5), by="latency", example_input=x)
    with pytest.raises(ValueError, match="example_input: .*no samples"):
        lt.export_onnx(mlp(), x, tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="example_input: .*no samples"):
        lt.latency_profile(mlp(), x, repeats=1)


@pytest.mark.parametrize("call", ["measure_latency", "layer_latency", "latency_profile"])
def test_latency_of_an_input_the_model_refuses_names_it(call):
    with pytest.raises(ValueError, match="example_input: the model refused it"):
        getattr(lt, call)(mlp(), torch.randn(2, 5), repeats=1, warmup=0)


@pytest.mark.parametrize("spectra", [None, "x", [torch.ones(3)]])
def test_rank_summary_names_what_it_takes(spectra):
    with pytest.raises(ValueError, match="spectra: expected a dict"):
        lt.rank_summary(spectra)


def test_layer_conversions_refuse_what_they_cannot_convert():
    with pytest.raises(ValueError, match="linear: .*meta"):
        lt.FactorLinear.from_linear(nn.Linear(4, 4, device="meta"))
    bad = nn.Linear(4, 4)
    with torch.no_grad():
        bad.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="inf or NaN"):
        lt.FactorLinear.from_linear(bad)
    with pytest.raises(ValueError, match="linear: expected"):
        lt.LowRankLinear.from_linear("fc", 2)
    with pytest.raises(ValueError, match="conv: expected"):
        lt.LowRankConv2d.from_conv(nn.Linear(3, 4), 2)
    with pytest.raises(ValueError, match="num_heads"):
        lt.LowRankMultiheadAttention(8, 0, 2)


def test_evaluate_and_finetune_name_bad_options():
    splits = lt.load_dataset("digits")
    model = lt.create_model("mlp", in_channels=1, image_size=8, num_classes=10)
    with pytest.raises(ValueError, match="device: "):
        evaluate(model, splits.val, device="gpu0")
    with pytest.raises(ValueError, match="amp: "):
        evaluate(model, splits.val, amp=1)
    with pytest.raises(ValueError, match="dataset: the model refused"):
        evaluate(nn.Linear(3, 3), splits.val)
    few = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))  # 3 outputs for 10 classes
    with pytest.raises(ValueError, match="dataset: it has class"):
        evaluate(few, splits.val)
    with pytest.raises(ValueError, match="dataset: it has class"):
        finetune(few, splits, epochs=1)
    for kw, field in (
        ({"seed": "x"}, "seed"),
        ({"label_smoothing": 1.5}, "label_smoothing"),
        ({"callback": 3}, "callback"),
        ({"weight_decay": -1.0}, "weight_decay"),
    ):
        with pytest.raises(ValueError, match=f"{field}: "):
            finetune(model, splits, epochs=1, **kw)


def test_an_empty_example_batch_and_a_sweep_too_long_to_run_are_refused():
    """A batch of 0 costs nothing: a budget planned on it said 'kept 0 %, met'. A sweep of
    10**7 points is 10**7 cuts."""
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match=r"^example_input: it holds no samples"):
        lt.count_cost(model, torch.randn(0, 8))
    with pytest.raises(ValueError, match=r"^example_input: it holds no samples"):
        lt.count_cost(model, (torch.randn(2, 8)[:0],))
    with pytest.raises(ValueError, match=r"^points: expected an integer in \[2, 10000\]"):
        lt.Budget.sweep(10**7)
    assert len(lt.Uniform.sweep(100)) == 100


@pytest.mark.parametrize(
    "make",
    [
        lambda: lt.FactorLinear(-1, 4),
        lambda: lt.FactorLinear(True, 4),
        lambda: lt.FactorConv2d(3, 0, 3),
        lambda: lt.LowRankLinear(8, "4", 2),
        lambda: lt.LowRankConv2d(3.5, 8, 3, 2),
    ],
)
def test_a_layer_width_that_is_not_an_integer_of_one_or_more_is_named(make):
    with pytest.raises(ValueError, match=r"^(in|out)_(features|channels): expected an integer"):
        make()
