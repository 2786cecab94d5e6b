import pytest
import torch
from torch import nn
from torch.testing import assert_close

import lorita as lt


def test_spectra_of_composed_equal_spectra_of_merged():
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.Flatten(), nn.Linear(6 * 4 * 4, 5))
    model = lt.overparameterize(net, 3, init="independent")
    a, b = lt.layer_spectra(model), lt.layer_spectra(lt.merge_model(model))
    assert list(a) == ["0", "2"]
    assert a["0"].shape == (6,) and a["2"].shape == (5,)
    for k in a:
        assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
        assert torch.all(a[k][:-1] >= a[k][1:])  # descending
    conv_w = lt.merge_model(model)[0].weight.detach().reshape(6, -1)
    assert_close(a["0"], torch.linalg.svdvals(conv_w))


def test_spectra_of_truncated_model_and_names():
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    small = lt.truncate(net, lt.Ranks({"0": 2}))
    s = lt.layer_spectra(small, names=["0"])
    assert (s["0"][2:] < 1e-5).all() and (s["0"][:2] > 0).all()
    with pytest.raises(ValueError, match="names"):
        lt.layer_spectra(net, names=["9"])


def test_rank_measures():
    s = torch.tensor([4.0, 2.0, 0.01, 0.0])
    assert lt.effective_rank(s) == 2
    assert lt.effective_rank(s, tol=1e-3) == 3
    assert lt.stable_rank(s) == pytest.approx((16 + 4 + 1e-4) / 16)
    assert lt.entropy_rank(torch.ones(5)) == pytest.approx(5.0)
    assert lt.rank_summary({"a": s})["a"]["full"] == 4
    with pytest.raises(ValueError, match="tol"):
        lt.effective_rank(s, tol=2)
    with pytest.raises(ValueError, match="s:"):
        lt.stable_rank(torch.ones(2, 2))


def test_energy_rank():
    s = torch.tensor([10.0, 5.0, 1.0, 0.1])  # energies 100, 25, 1, 0.01 of 126.01
    assert lt.energy_rank(s) == 2  # 125 / 126.01 = 0.992
    assert lt.energy_rank(s, keep=0.999) == 3
    assert lt.energy_rank(s, keep=1.0) == 4
    assert lt.energy_rank(s, keep=0.5) == 1
    assert lt.energy_rank(torch.zeros(3)) == 0
    assert lt.rank_summary({"a": s})["a"]["energy"] == 2
    with pytest.raises(ValueError, match="keep"):
        lt.energy_rank(s, keep=0)
    with pytest.raises(ValueError, match="keep"):
        lt.energy_rank(s, keep=1.5)


def test_energy_rank_bounds_the_cut_error_where_effective_rank_does_not():
    """A weight with a long flat tail just above 1% of sigma_max: the effective rank counts the
    whole tail, the energy rank says how far a cut can go with a relative error <= 10%."""
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(60, 60, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(40, 40, dtype=torch.float64))
    s = torch.cat([torch.tensor([10.0, 8.0, 6.0], dtype=torch.float64), torch.full((37,), 0.2)])
    w = u[:, :40] @ torch.diag(s) @ v.T  # (60, 40)
    spec = torch.linalg.svdvals(w)
    assert lt.effective_rank(spec) == 40
    r = lt.energy_rank(spec)
    assert r < 10
    net = nn.Sequential(nn.Linear(40, 60))
    with torch.no_grad():
        net[0].weight.copy_(w.float())
    small = lt.truncate(net, lt.Ranks({"0": r}))
    err = (lt.spectra.layer_matrix(small[0]).double() - w).norm() / w.norm()
    assert err <= 0.1 + 1e-6
    assert lt.Energy(0.99).plan({"0": spec}) == {"0": r}


def test_grouped_conv_spectrum_is_the_rms_over_groups_and_matches_the_svd_cache():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(8, 12, 3, groups=4), nn.Flatten(), nn.Linear(12 * 4, 5))
    s = lt.layer_spectra(net)["0"]
    w = net[0].weight.detach().reshape(4, 3, -1)  # (groups, out per group, in per group * k*k)
    per_group = torch.linalg.svdvals(w)  # (4, 3)
    assert_close(s, per_group.pow(2).mean(0).sqrt())
    assert_close(s, lt.layer_svd(net).spectra["0"], rtol=1e-5, atol=1e-6)


def test_rank_measures_name_values_that_are_not_singular_values():
    for bad in ([1.0, float("nan")], [3.0, -2.0], [float("inf")]):
        for fn in (lt.effective_rank, lt.energy_rank):
            with pytest.raises(ValueError, match="^s: singular values are finite and >= 0"):
                fn(torch.tensor(bad))
    with pytest.raises(ValueError, match="^s: expected singular values"):
        lt.effective_rank("abc")
    with pytest.raises(ValueError, match="^tol: "):
        lt.effective_rank(torch.tensor([1.0]), tol="0.1")
