import pytest
import torch
from torch import nn
from torch.testing import assert_close

import lorita as lt
from lorita.convert import composition_summary
from lorita.layers import FactorConv2d, FactorMultiheadAttention


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Sequential(nn.Linear(8 * 4 * 4, 32), nn.ReLU()),
        nn.Linear(32, 10),
    )


def test_overparameterize_keeps_function_names_and_input():
    net = small_cnn().eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(3, 1, 8, 8)
    model = lt.overparameterize(net, 3).eval()
    assert_close(model(x), net(x), rtol=1e-5, atol=1e-5)
    assert set(lt.composed_layers(model)) == {"0", "3", "6.0", "7"}
    for k, v in net.state_dict().items():  # input not mutated
        assert torch.equal(v, before[k])
    assert all(type(m) in (nn.Conv2d, nn.Linear) for _, m in lt.iter_layers(net))


def test_merge_model_loads_strict_into_plain_architecture():
    net = small_cnn().eval()
    model = lt.overparameterize(net, 3, init="independent").eval()
    merged = lt.merge_model(model)
    fresh = small_cnn().eval()
    fresh.load_state_dict(merged.state_dict(), strict=True)
    x = torch.randn(2, 1, 8, 8)
    assert_close(fresh(x), model(x), rtol=1e-5, atol=1e-5)


def test_skip_patterns_and_n1():
    net = small_cnn()
    model = lt.overparameterize(net, 2, skip=("7", "6.*"))
    assert set(lt.composed_layers(model)) == {"0", "3"}
    plain = lt.overparameterize(net, 1)
    assert not lt.composed_layers(plain)
    assert plain is not net


def test_training_mode_is_kept():
    net = small_cnn().train()
    model = lt.overparameterize(net, 3)
    assert all(m.training for m in model.modules())


def test_paper_inner_widths():
    model = lt.overparameterize(small_cnn(), 3, inner="paper")
    assert model[0].inner == 8 and model[7].inner == 32


@pytest.mark.parametrize(
    "call, field",
    [
        (lambda: lt.overparameterize(small_cnn(), 0), "n_factors"),
        (lambda: lt.overparameterize(small_cnn(), 3, init="zeros"), "init"),
        (lambda: lt.overparameterize(small_cnn(), 3, skip=("head",)), "skip"),
        (lambda: lt.overparameterize(small_cnn(), 3, inner="max"), "inner"),
        (lambda: lt.overparameterize(nn.Sequential(nn.ReLU()), 3), "model"),
        (lambda: lt.overparameterize(small_cnn(), 3, order="fast"), "order"),
        (lambda: lt.overparameterize(nn.Sequential(nn.Conv2d(4, 4, 3, groups=4)), 3), "model"),
        (lambda: composition_summary(small_cnn()), "overparameterize"),
        (lambda: lt.overparameterize(lt.overparameterize(small_cnn(), 2), 2), "already"),
    ],
)
def test_bad_arguments(call, field):
    with pytest.raises(ValueError, match=field):
        call()


class Mixed(nn.Module):
    """Every kind at once: a conv, a grouped conv, a depthwise conv, an attention and a Linear
    whose weight is read directly (as torchvision's Swin does with F.linear(x, qkv.weight))."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.read = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.depthwise(self.grouped(self.stem(x))).flatten(2).transpose(1, 2)  # (B, T, 8)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        x = torch.nn.functional.linear(x, self.read.weight, self.read.bias)
        return self.head(x.mean(1))


def test_every_kind_composed_or_left_with_a_reason():
    torch.manual_seed(0)
    net = Mixed().eval()
    x = torch.randn(2, 2, 4, 4)
    model = lt.overparameterize(net, 3).eval()  # no options: input guessed and traced
    assert_close(model(x), net(x), rtol=1e-5, atol=1e-5)
    rows = {r["name"]: r for r in composition_summary(model)["layers"]}
    kinds = {n: r["kind"] for n, r in rows.items()}
    assert kinds == {
        "stem": "conv",
        "grouped": "grouped_conv",
        "depthwise": "depthwise",
        "attn": "attention",
        "attn.out_proj": "direct",
        "read": "direct",
        "head": "linear",
    }
    assert rows["depthwise"]["action"] == "left" and "depthwise" in rows["depthwise"]["why"]
    assert all(r["action"] == "composed" for n, r in rows.items() if n != "depthwise")
    assert isinstance(model.grouped, FactorConv2d) and model.grouped.groups == 2
    assert isinstance(model.attn, FactorMultiheadAttention)
    assert set(model.lorita_direct) == {"attn.out_proj", "read"}
    merged = lt.merge_model(model)
    fresh = Mixed()
    fresh.load_state_dict(merged.state_dict(), strict=True)
    assert_close(fresh.eval()(x), model(x), rtol=1e-5, atol=1e-5)


def test_find_direct_reads_needs_no_composed_model():
    from lorita.kinds import find_direct_reads

    assert find_direct_reads(Mixed(), torch.randn(1, 2, 4, 4)) == ["attn.out_proj", "read"]
    assert find_direct_reads(small_cnn(), torch.randn(1, 1, 8, 8)) == []


def test_tied_weights_are_left():
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    net[2].weight = net[0].weight
    rows = composition_summary(lt.overparameterize(net, 3))["layers"]
    assert [r["action"] for r in rows] == ["left", "left"]
    assert "shared" in rows[0]["why"]


class _Only224(nn.Module):
    """Accepts 224 px inputs only and reads its head's weight itself (F.linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 2, 32, stride=32)  # 224 px -> 7 x 7
        self.head = nn.Linear(2 * 7 * 7, 10)

    def forward(self, x):
        return nn.functional.linear(self.stem(x).flatten(1), self.head.weight, self.head.bias)


def test_direct_reads_are_traced_on_the_first_guessed_side_the_model_accepts():
    torch.manual_seed(0)
    model = _Only224().eval()
    composed = lt.overparameterize(model, 3)
    assert composed.lorita_direct == ("head",)
    assert composed.lorita_summary["direct_reads"] == "traced"
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(composed(x), model(x), rtol=1e-4, atol=1e-5)
    small = lt.truncate(composed, lt.Ranks({"head": 2}))
    assert small.lorita_plan["head"]["form"] == "dense"  # read directly: the cut stays dense


def test_a_model_no_guessed_side_fits_is_still_composed_and_says_why():
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten(), nn.Linear(2 * 5 * 5, 4))  # 7 px
    composed = lt.overparameterize(model, 3)
    note = composed.lorita_summary["direct_reads"]
    assert "could not trace" in note and "(2, 3, 299, 299)" in note and "example_input=" in note
    composed = lt.overparameterize(model, 3, example_input=torch.randn(2, 3, 7, 7))
    assert composed.lorita_summary["direct_reads"] == "traced"
