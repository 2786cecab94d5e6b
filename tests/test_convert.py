import pytest
import torch
from torch import nn
from torch.testing import assert_close

import lorita as lt


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
        (
            lambda: lt.overparameterize(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), 3),
            "groups|grouped",
        ),
        (lambda: lt.overparameterize(lt.overparameterize(small_cnn(), 2), 2), "already"),
    ],
)
def test_bad_arguments(call, field):
    with pytest.raises(ValueError, match=field):
        call()
