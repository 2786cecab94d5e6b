"""Comparing LoRITa with the baselines on pairs and budgets off the beaten path: networks
Torch-Pruning cannot prune, budgets below the smallest model, residual and concatenating
networks, and the command line's budgets and JSON rows."""

import json

import pytest
import torch
from torch import nn

import lorita as lt
from lorita.baselines import METHODS, PruneError, compare, prune_to_budget
from lorita.cli import main
from lorita.compress import Compressor

TINY_MLP = ["--model-arg", "width=32", "--model-arg", "depth=2"]
TINY_VIT = ["--model", "vit", "--model-arg", "dim=16", "--model-arg", "depth=1"]
TINY_VIT += ["--model-arg", "heads=2"]


def _train(d, name, n, model_args):
    argv = ["train", "--runs-dir", str(d), "--name", name, "--factors", str(n), "--quiet"]
    assert main([*argv, "--max-steps", "3", "--threads", "1", *model_args]) == 0


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    """Tiny digits pairs: an MLP (m3, m1) and a ViT (v3, v1), which Torch-Pruning cannot prune."""
    d = tmp_path_factory.mktemp("runs")
    old = torch.get_num_threads()
    for name, n, args in (("m3", 3, TINY_MLP), ("m1", 1, TINY_MLP)):
        _train(d, name, n, args)
    for name, n in (("v3", 3), ("v1", 1)):
        _train(d, name, n, TINY_VIT)
    torch.set_num_threads(old)
    return d


def _rows(capsys, argv):
    assert main([*argv, "--json"]) == 0
    out = capsys.readouterr().out

    def refuse(word):
        raise AssertionError(f"not strict JSON: {word}")

    return json.loads(out, parse_constant=refuse)


def test_a_network_torch_pruning_cannot_prune_fails_its_method_only(runs_dir, capsys):
    """A ViT: Torch-Pruning's graph breaks on it. The comparison goes on with the LoRITa and
    SVD cuts, and the pruning rows say why they have no numbers."""
    at = ["compare", "v3", "--baseline", "v1", "--budgets", "50", "--runs-dir", str(runs_dir)]
    rows = _rows(capsys, [*at, "--finetune-epochs", "1"])
    assert [(r["method"], r["finetune_epochs"]) for r in rows] == [
        (m, k) for m in METHODS for k in (0, 1)
    ]
    assert len({frozenset(r) for r in rows}) == 1  # every row has the same fields
    for r in rows:
        if r["method"] == "prune":
            assert "Torch-Pruning cannot prune" in r["error"] and not r["met"]
            assert r["params"] is None and r["val_acc"] is None and r["test_acc"] is None
        else:
            assert r["error"] is None and 0 <= r["test_acc"] <= 1 and r["params_pct"] <= 50
    assert main(at) == 0
    out = capsys.readouterr().out
    (line,) = [s for s in out.splitlines() if s.startswith("50%") and "pruning" in s]
    assert "failed" in line
    assert "L1 structured pruning of the N=1 run failed: prune: Torch-Pruning" in out


def test_the_compress_pages_table_says_which_method_failed(runs_dir):
    from app import compress as cz

    ours, theirs = Compressor(runs_dir / "v3"), Compressor(runs_dir / "v1")
    table = cz.at_budget(ours, theirs, 50.0, "params")
    assert [r["method"] for r in table] == list(METHODS.values())
    pruned = table[-1]
    assert pruned["params %"] is None and pruned["note"].startswith("failed: Torch-Pruning")
    assert all(r["note"] == "" and r["params %"] <= 50 for r in table[:2])
    rows = [
        {"method": "lorita", "budget": 50.0, "test_acc": 0.5, "error": None},
        {"method": "prune", "budget": 50.0, "test_acc": None, "error": "prune: cannot"},
    ]
    assert list(cz.comparison_curves(rows)) == [METHODS["lorita"]]  # nothing to plot


def test_prune_to_budget_names_what_torch_pruning_cannot_prune():
    torch.manual_seed(0)
    vit = lt.create_model("vit", in_channels=1, image_size=8, num_classes=10, dim=16, depth=1)
    with pytest.raises(PruneError, match="prune: Torch-Pruning cannot prune this network"):
        prune_to_budget(vit.eval(), torch.randn(1, 1, 8, 8), 30)


def test_a_budget_below_the_smallest_model_is_said(runs_dir, capsys):
    """1 % of an MLP is less than its uncut output layer: the cuts stop at rank 1 everywhere
    and pruning at one neuron a layer; every such row is flagged and explained."""
    at = ["compare", "m3", "--baseline", "m1", "--budgets", "1", "--runs-dir", str(runs_dir)]
    rows = _rows(capsys, at)
    assert not any(r["met"] for r in rows) and all(r["params_pct"] > 1 for r in rows)
    cut = {r["method"]: r for r in rows}
    assert set(cut["lorita"]["ranks"].values()) == {1, 10}  # rank 1, the head whole
    assert main(at) == 0
    out = capsys.readouterr().out
    assert sum(s.startswith("1% (not met)") for s in out.splitlines()) == 3
    assert "below the smallest model the method makes" in out

    from app import compress as cz

    table = cz.at_budget(Compressor(runs_dir / "m3"), Compressor(runs_dir / "m1"), 1.0, "params")
    assert all(r["note"].startswith("budget not met") for r in table)


def test_json_rows_one_per_budget_and_method(runs_dir, capsys):
    """Budgets given unsorted, repeated and spaced are each compared once, in order; with
    --measure flops the budget is a share of FLOPs."""
    at = ["compare", "m3", "--baseline", "m1", "--runs-dir", str(runs_dir)]
    rows = _rows(capsys, [*at, "--budgets", " 50, 20 ,50", "--measure", "flops"])
    assert [(r["budget"], r["method"]) for r in rows] == [
        (b, m) for b in (20.0, 50.0) for m in METHODS
    ]
    for r in rows:
        assert r["measure"] == "flops" and r["error"] is None
        assert r["met"] and r["flops_pct"] <= r["budget"]


@pytest.mark.parametrize(
    "budgets, needle",
    [
        ("50,", "an empty value"),
        ("ten", "'ten' is not a number"),
        ("0", "not in [1, 100]"),
        ("150", "not in [1, 100]"),
        (",".join(str(i) for i in range(1, 22)), "at most 20 budgets"),
    ],
)
def test_bad_budgets_are_one_line_errors(tmp_path, capsys, budgets, needle):
    assert main(["compare", "x", "--budgets", budgets, "--runs-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lorita: error: argument --budgets") and needle in err
    assert len(err.splitlines()) == 1


class _Dense(nn.Module):
    """Two densely connected blocks: each block's output is concatenated to its input."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.b2 = nn.Sequential(nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1))
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([x, self.b1(x)], 1)
        x = torch.cat([x, self.b2(x)], 1)
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("measure", ["params", "flops"])
@pytest.mark.parametrize(
    "make",
    [_Dense, lambda: lt.create_model("resnet20", in_channels=3, image_size=32, num_classes=5)],
)
def test_pruning_residual_and_concatenating_networks(make, measure):
    torch.manual_seed(0)
    net = make().eval()
    x = torch.randn(1, 3, 32, 32)
    pruned, facts = prune_to_budget(net, x, 30, measure=measure)
    full, got = lt.count_cost(net, x), lt.count_cost(pruned, x)
    assert getattr(got, measure) == facts[measure] <= 0.3 * getattr(full, measure)
    assert facts["met"] and facts["above"] > 0.3 * getattr(full, measure)
    assert pruned.fc.out_features == 5 and pruned(torch.randn(2, 3, 32, 32)).shape == (2, 5)


@pytest.mark.parametrize("budgets", [50, "50", ()])
def test_compare_names_budgets_that_are_not_a_list_of_percentages(runs_dir, budgets):
    with pytest.raises(ValueError, match="^budgets: expected"):
        compare(runs_dir / "m3", runs_dir / "m1", budgets=budgets)
