import time

import pytest
import torch
from torch import nn

import lorita as lt


def test_linear_flops_closed_form():
    net = nn.Sequential(nn.Linear(30, 20))
    cost = lt.count_cost(net, torch.randn(8, 30))
    assert cost.flops == 2 * 8 * 30 * 20
    assert cost.params == 30 * 20 + 20
    assert cost.per_layer == {"0": {"params": 620, "flops": 9600}}


def test_conv_flops_closed_form():
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, stride=2))
    cost = lt.count_cost(net, torch.randn(2, 3, 10, 10))
    h = w = 5
    assert cost.flops == 2 * 2 * 16 * h * w * 3 * 3 * 3
    assert cost.params == 16 * 27 + 16


class _Attend(nn.Module):
    def __init__(self, e: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(e, heads, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def test_attention_projections_are_counted_in_eval_mode_and_the_fast_path_restored():
    # eval + no_grad runs MultiheadAttention as one fused kernel, which FlopCounterMode sees
    # as 0 FLOPs: the q, k, v and output projections must still be counted
    b, t, e = 2, 10, 64
    net = _Attend(e, 4).eval()
    cost = lt.count_cost(net, torch.randn(b, t, e))
    projections = 2 * b * t * e * e * 4
    products = 2 * (2 * b * t * t * e)  # q k^T and (.) v over all heads: SDPA's CPU kernel
    assert cost.flops == projections + products
    assert cost.per_layer["attn"]["flops"] == projections + products
    assert torch.backends.mha.get_fastpath_enabled()


def test_attention_counts_in_several_threads_at_once_restore_the_fast_path():
    import threading

    from lorita import cost

    inside, release = threading.Barrier(3), threading.Event()

    def count():
        with cost._counted_attention():
            inside.wait()  # both counting at once, and the test looking
            release.wait(10)

    threads = [threading.Thread(target=count) for _ in range(2)]
    for t in threads:
        t.start()
    inside.wait()
    assert not torch.backends.mha.get_fastpath_enabled()
    release.set()
    for t in threads:
        t.join()
    assert torch.backends.mha.get_fastpath_enabled()


def test_composed_model_costs_like_its_merge_and_low_rank_saves():
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    x = torch.randn(4, 64)
    plain = lt.count_cost(net, x)
    composed = lt.count_cost(lt.overparameterize(net, 3), x)
    assert (composed.params, composed.flops) == (plain.params, plain.flops)
    small = lt.count_cost(lt.truncate(net, lt.Ranks({"0": 8})), x)
    assert small.per_layer["0"]["params"] == 8 * (64 + 64) + 64
    assert small.per_layer["0"]["flops"] == 2 * 4 * 8 * (64 + 64)
    assert small.flops < plain.flops and small.params < plain.params


def test_latency_is_positive_and_mode_restored():
    net = nn.Sequential(nn.Linear(8, 8)).train()
    assert lt.measure_latency(net, torch.randn(2, 8), repeats=3) > 0
    assert net.training


def test_latency_profile_and_per_layer_latency():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)).train()
    prof = lt.cost.latency_profile(net, torch.randn(3, 32), batches=(1, 8), repeats=3)
    assert set(prof) == {1, 8} and all(t > 0 for t in prof.values())
    per = lt.cost.layer_latency(net, torch.randn(4, 32), repeats=3)
    assert set(per) == {"0", "2"} and all(t > 0 for t in per.values())
    assert net.training  # mode restored
    small = lt.truncate(net, lt.Ranks({"0": 4}))
    assert set(lt.cost.layer_latency(small, torch.randn(4, 32), repeats=2)) == {"0", "2"}
    with pytest.raises(ValueError, match="batches"):
        lt.cost.latency_profile(net, torch.randn(1, 32), batches=(0,))
    with pytest.raises(ValueError, match="repeats"):
        lt.cost.layer_latency(net, torch.randn(1, 32), repeats=0)


CALLS: list[tuple[str, int]] = []


class _Tagged(nn.Module):
    """A Linear that notes each call (its tag, the batch) and can take longer on purpose."""

    def __init__(self, tag: str, pause: float = 0.0):
        super().__init__()
        self.tag, self.pause, self.fc = tag, pause, nn.Linear(8, 8)

    def forward(self, x):
        CALLS.append((self.tag, x.shape[0]))
        if self.pause:
            time.sleep(self.pause)
        return self.fc(x)


def test_paired_latency_times_the_models_in_turn_round_by_round():
    CALLS.clear()
    fast, slow = _Tagged("fast"), _Tagged("slow", pause=0.004)
    a, b = lt.paired_latency([fast, slow], torch.randn(3, 8), batches=(1, 4), repeats=5, warmup=1)
    assert set(a) == set(b) == {1, 4}
    assert all(b[k] > a[k] + 0.003 for k in (1, 4))  # each model's own time, in order given
    timed = [c for c in CALLS if c[0] in ("fast", "slow")]
    for batch in (1, 4):
        order = [tag for tag, n in timed if n == batch]
        assert order == ["fast", "slow"] * 6  # alternating: one warm-up round, five timed
    with pytest.raises(ValueError, match="models"):
        lt.paired_latency([], torch.randn(3, 8))
    with pytest.raises(ValueError, match="repeats"):
        lt.paired_latency([fast], torch.randn(3, 8), repeats=0)


def test_paired_timing_keeps_the_median_or_the_fastest_call():
    from lorita.kinds import paired_medians

    pauses = iter([0.0, 0.03, 0.002, 0.03, 0.03])  # one warm-up, then 4 calls

    def call():
        time.sleep(next(pauses))

    (median,) = paired_medians([call], repeats=4, warmup=1)
    assert median >= 0.02  # most calls were slowed
    pauses = iter([0.0, 0.03, 0.002, 0.03, 0.03])
    (fastest,) = paired_medians([call], repeats=4, warmup=1, fastest=True)
    assert 0.002 <= fastest < 0.02  # the least disturbed call


def test_busy_note_warns_only_when_other_work_keeps_the_cores_busy(monkeypatch):
    import lorita.cost as cost

    monkeypatch.setattr(cost, "usable_cores", lambda: 2)
    monkeypatch.setattr(cost.os, "getloadavg", lambda: (0.4, 0.3, 0.2))
    assert cost.busy_note() is None
    monkeypatch.setattr(cost.os, "getloadavg", lambda: (1.4, 0.3, 0.2))
    assert cost.busy_note() is None  # one other busy process on two cores: still fair
    monkeypatch.setattr(cost.os, "getloadavg", lambda: (4.4, 3.0, 2.0))
    note = cost.busy_note()
    assert "load average 4.4 on 2 cores" in note and "noisy" in note


def test_timing_on_a_busy_machine_takes_one_thread_and_gives_them_back(monkeypatch):
    import lorita.cost as cost

    monkeypatch.setattr(cost, "usable_cores", lambda: 2)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(cost.os, "getloadavg", lambda: (0.2, 0.2, 0.2))
        with cost.timing_threads() as note:
            assert note is None and torch.get_num_threads() == 2  # quiet: as set
        monkeypatch.setattr(cost.os, "getloadavg", lambda: (4.0, 3.0, 2.0))
        with pytest.raises(RuntimeError, match="inside"):
            with cost.timing_threads() as note:
                assert torch.get_num_threads() == 1
                assert "load average 4.0" in note and "one thread instead of 2" in note
                assert "the fastest of the repeats kept" in note
                raise RuntimeError("inside")
        assert torch.get_num_threads() == 2  # given back, also after an error
    finally:
        torch.set_num_threads(before)


def test_layer_latency_at_a_batch_size_names_the_same_layers_before_and_after_a_cut():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=8), nn.Flatten(), nn.Linear(8 * 4 * 4, 10)
    )  # fmt: skip
    x = torch.randn(1, 3, 8, 8)
    per = lt.cost.layer_latency(net, x, repeats=2, batch=16)
    assert set(per) == {"0", "1", "3"}  # the depthwise conv is timed too
    small = lt.truncate(net, lt.Ranks({"3": 2}))
    assert set(lt.cost.layer_latency(small, x, repeats=2, batch=16)) == set(per)
    with pytest.raises(ValueError, match="batch"):
        lt.cost.layer_latency(net, x, batch=0)


def _cut_mlp():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
    )
    return lt.truncate(net, lt.Uniform(0.25)).eval(), torch.randn(4, 32)


def test_choose_forms_by_latency_makes_slower_thin_layers_dense_keeping_the_function(monkeypatch):
    from lorita import kinds

    small, x = _cut_mlp()
    thin = [n for n, p in small.lorita_plan.items() if p["form"] == "thin"]
    assert thin
    want = small(x)
    monkeypatch.setattr(kinds, "_thin_is_faster", lambda dense, layer, args: False)
    plan = kinds.choose_forms(small, x, by="latency", batch=8)
    assert all(plan[n]["form"] == "dense" and "slower at batch 8" in plan[n]["why"] for n in thin)
    assert small.lorita_plan is plan
    assert not any(isinstance(m, lt.LowRankLinear) for m in small.modules())
    torch.testing.assert_close(small(x), want)


def test_choose_forms_by_flops_keeps_thin_layers_and_works_without_a_plan():
    from lorita import kinds

    small, x = _cut_mlp()
    thin = {n for n, p in small.lorita_plan.items() if p["form"] == "thin"}
    assert {
        n for n, p in kinds.choose_forms(small, x, by="flops").items() if p["form"] == "thin"
    } == thin
    del small.lorita_plan  # e.g. a model loaded or fine-tuned elsewhere: found from its layers
    plan = kinds.choose_forms(small, x, by="flops")
    assert {n for n, p in plan.items() if p["form"] == "thin"} == thin
    with pytest.raises(ValueError, match="by"):
        kinds.choose_forms(small, x, by="speed")


def test_latency_times_the_deployed_model_folded_and_channels_last(monkeypatch):
    from lorita import convert, cost

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten()).train()
    x = torch.randn(2, 3, 6, 6)
    seen = []
    real = convert.deploy_model

    def spy(model, example_input=None, **kw):
        out = real(model, example_input, **kw)
        seen.append(out.lorita_deploy)
        return out

    monkeypatch.setattr(cost, "deploy_model", spy)
    assert cost.measure_latency(net, x, repeats=2) > 0
    assert set(cost.latency_profile(net, x, batches=(1, 3), repeats=2)) == {1, 3}
    assert set(cost.layer_latency(net, x, repeats=2, batch=3)) == {"0"}
    assert seen == 3 * [{"folded": ["1"], "baked": [], "memory_format": "channels_last"}]
    cost.measure_latency(net, x, repeats=2, fold_bn=False, channels_last=False)
    assert seen[-1] == {"folded": [], "baked": [], "memory_format": "contiguous"}
    assert net.training and isinstance(net[1], nn.BatchNorm2d)  # the model itself unchanged
    with pytest.raises(ValueError, match="fold_bn"):
        cost.measure_latency(net, x, fold_bn=1)
    with pytest.raises(ValueError, match="channels_last"):
        cost.latency_profile(net, x, channels_last="yes")


def test_paired_medians_time_the_candidates_in_turn(monkeypatch):
    from lorita import kinds

    clock, order = iter(range(1000)), []
    monkeypatch.setattr(kinds.time, "perf_counter", lambda: next(clock))

    def fn(name, steps):
        def call():
            order.append(name)
            for _ in range(steps - 1):  # each call lasts `steps` ticks of the fake clock
                next(clock)

        return call

    got = kinds.paired_medians([fn("a", 3), fn("b", 1)], repeats=3, warmup=1)
    assert order == ["a", "b"] * 4  # interleaved, warm-up round included
    assert got == [3, 1]


class _ClassToken(nn.Module):
    """Passes a view of a parameter to a sub-module, as timm's CaiT and PiT do with their
    class tokens: FlopCounterMode's module tracker fails on such an input."""

    def __init__(self) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, 4))
        self.block = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        token = self.block(self.cls.expand(x.shape[0], -1, -1))
        return self.head(x + token[:, 0])


def test_count_cost_of_a_model_passing_a_parameter_view_to_a_module():
    from lorita.cost import _count

    net, x = _ClassToken(), torch.randn(5, 4)
    with pytest.raises(AssertionError):
        _count(net, x)  # what count_cost works around
    cost = lt.count_cost(net, x)
    assert cost.flops == 2 * 5 * 4 * 3 + 2 * 5 * 4 * 4
    assert cost.params == 4 + 20 + 15 and all(p.requires_grad for p in net.parameters())


def test_a_parametrized_weight_counts_as_the_weight_it_deploys_as():
    """weight_norm keeps g and v while training; deployed, the layer holds one weight (baked,
    as deploy_model does): count_cost counts that, and leaves the user's model as it was."""
    from torch.nn.utils.parametrizations import weight_norm

    normed = nn.Sequential(weight_norm(nn.Linear(64, 64)), nn.ReLU(), nn.Linear(64, 10))
    plain = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    x = torch.randn(2, 64)
    assert lt.count_cost(normed, x).params == lt.count_cost(plain, x).params == 4810
    assert lt.count_cost(normed, x).flops == lt.count_cost(plain, x).flops
    assert type(normed[0]).__name__ == "ParametrizedLinear"


def test_lstm_and_bilinear_flops_are_counted():
    """FlopCounterMode has no formula for the CPU LSTM kernel nor nn.Bilinear's product: both
    used to count 0, so a model's FLOP shares left them out."""
    lstm, x = nn.LSTM(6, 8, batch_first=True, bidirectional=True), torch.randn(2, 5, 6)
    # 2 directions x 10 steps x 2 x (4H x in + 4H x H) multiply-adds
    assert lt.count_cost(nn.Sequential(lstm), x).flops == 2 * 10 * 2 * (32 * 6 + 32 * 8)
    bil = nn.Bilinear(5, 6, 8)

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.bil = bil

        def forward(self, a, b):
            return self.bil(a, b)

    flops = lt.count_cost(Two(), (torch.randn(3, 5), torch.randn(3, 6))).flops
    assert flops == 2 * 3 * 8 * 5 * 6  # the product (FlopCounterMode counts no additions)


def test_per_layer_params_count_a_tied_weight_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.head(self.b(torch.relu(self.a(x))))

    cost = lt.count_cost(Tied(), torch.randn(2, 8))
    assert cost.per_layer["a"]["params"] == 72 and cost.per_layer["b"]["params"] == 8
    assert sum(v["params"] for v in cost.per_layer.values()) == cost.params == 107
    assert cost.per_layer["b"]["flops"] == cost.per_layer["a"]["flops"] == 2 * 2 * 64
