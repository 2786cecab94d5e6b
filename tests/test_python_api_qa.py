"""Training and compressing from Python, as a notebook user does: one process, several calls,
data and models of the user's own."""

import dataclasses
import json
import random
import signal
import threading

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset
from torch.utils.data import TensorDataset as TorchTensorDataset

import lorita as lt

TINY = {
    "model_kwargs": {"depth": 2, "width": 16},
    "epochs": 1,
    "max_steps": 3,
    "spectra_every": 0,
    "device": "cpu",
}


@pytest.fixture(scope="module")
def digits():
    return lt.load_dataset("digits")


def _streams():
    return random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()


def _same_streams(a, b) -> bool:
    return a[0] == b[0] and np.array_equal(a[1], b[1]) and torch.equal(a[2], b[2])


def test_two_trainings_in_two_threads_leave_the_callers_random_streams_as_they_were():
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    before = _streams()
    in_a, b_started = threading.Event(), threading.Event()

    def hold(event):  # the first run waits (a while) for the second to start
        if event["event"] == "step" and not in_a.is_set():
            in_a.set()
            b_started.wait(timeout=3)

    def mark(event):
        b_started.set()

    results = {}

    def go(name, callback, seed):
        if name == "b":
            in_a.wait(timeout=60)
        results[name] = lt.train({**TINY, "seed": seed}, callback=callback)["state"]

    threads = [
        threading.Thread(target=go, args=("a", hold, 0)),
        threading.Thread(target=go, args=("b", mark, 1)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == {"a": "completed", "b": "completed"}
    assert _same_streams(before, _streams())


def test_training_again_after_a_keyboard_interrupt_leaves_nothing_behind(tmp_path):
    torch.manual_seed(3)
    before = _streams()
    threads = torch.get_num_threads()
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    store = lt.RunStore(tmp_path)
    cfg = lt.TrainConfig(**TINY)
    run = store.create(cfg.to_dict(), name="stopped-by-hand")

    def interrupt(event):  # what a notebook's stop button raises, mid-run
        if event["event"] == "step":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        lt.train(cfg, run, callback=interrupt, threads=1)
    status = store.get("stopped-by-hand").raw_status()
    # stopped, as Ctrl-C stops a command-line run, and said how to go on
    assert status["state"] == "stopped" and "KeyboardInterrupt" in status["message"]
    assert "resume=True" in status["message"]
    assert torch.get_num_threads() == threads and torch.get_default_dtype() == torch.float32
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    assert _same_streams(before, _streams())
    again = lt.train(cfg, store.get("stopped-by-hand"), resume=True)  # the lock was let go
    assert again["state"] == "completed" and again["step"] == 3
    assert store.get("stopped-by-hand").raw_status()["state"] == "completed"


@pytest.mark.parametrize("model", [[], {}, 3, None])
def test_a_model_that_is_not_a_name_is_refused_by_name(model):
    for build in (lambda d: lt.TrainConfig(**d), lt.TrainConfig.from_dict):
        with pytest.raises(ValueError, match=r"^model: .* expected a non-empty string"):
            build({"model": model})


@pytest.mark.parametrize(
    ("name", "value", "allowed"),
    [
        ("epochs", "3", "an integer"),
        ("epochs", True, "an integer"),
        ("batch_size", -1, "an integer"),
        ("lr", float("nan"), "a finite number"),
        ("lr", None, "a finite number"),
        ("weight_decay", "0.1", "a finite number"),
        ("augment", 1, "true or false"),
        ("dataset_kwargs", [], "a JSON object"),
        ("skip", [""], "a list of layer names"),
        ("optimizer", None, "one of sgd, adam, adamw"),
        ("device", 0, "a non-empty string"),
    ],
)
def test_a_wrong_type_is_refused_naming_the_field_and_what_is_allowed(name, value, allowed):
    for build in (lambda d: lt.TrainConfig(**d), lt.TrainConfig.from_dict):
        with pytest.raises(ValueError, match=rf"^{name}: ") as e:
            build({name: value})
        assert allowed in str(e.value)


class OneAtATime(Dataset):
    """A plain map-style Dataset: one example per integer position."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def _net():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


def test_data_read_one_example_at_a_time_is_refused_saying_what_is_taken(digits):
    x, y = digits.val[torch.arange(len(digits.val))]
    plain = OneAtATime(x, y)
    with pytest.raises(ValueError, match=r"^dataset: .*takes a tensor of positions"):
        lt.evaluate(_net(), plain)
    with pytest.raises(ValueError, match=r"^dataset: "):
        lt.evaluate(_net(), (x, y))
    with pytest.raises(ValueError, match=r"^splits\.train: .*OneAtATime"):
        lt.finetune(_net(), dataclasses.replace(digits, train=plain), epochs=1)
    with pytest.raises(ValueError, match=r"^splits\.val: .*OneAtATime"):
        lt.Compressor(_net(), dataclasses.replace(digits, val=plain))
    with pytest.raises(ValueError, match=r"^splits: expected the train/val/test Splits"):
        lt.Compressor(_net(), TorchTensorDataset(x, y))
    # torch's own TensorDataset takes a tensor of positions: it works as it is
    res = lt.Compressor(_net(), dataclasses.replace(digits, val=TorchTensorDataset(x, y)))
    assert 0 <= res.base["val_acc"] <= 1


def test_the_compressor_on_a_model_in_memory_in_an_unexpected_order(digits):
    torch.manual_seed(0)
    model = lt.overparameterize(_net(), 2).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cz = lt.Compressor(model, digits)
    uncut = cz.finetune(cz.model, 1)  # fine-tune before any cut: a new model
    assert uncut.model is not cz.model and not uncut.model.training
    first = cz.curve("uniform", [0.5, 1.0])
    cut = cz.apply(lt.Uniform(0.5))
    tuned = cz.finetune(cut, 1)
    again = cz.apply(lt.Uniform(0.5))  # a cut after fine-tuning: from the same merged model
    assert cz.curve("uniform", [0.5, 1.0]) == first  # curve twice: the same points
    assert again.to_dict()["val_acc"] == cut.to_dict()["val_acc"]
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for res in (uncut, cut, tuned, again, cz.smallest_within(0, "energy")):
        assert not res.model.training
        assert {p.device.type for p in res.model.parameters()} == {"cpu"}
        assert json.loads(json.dumps(res.to_dict())) == res.to_dict()
    assert json.loads(json.dumps(first)) == first


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"threads": 0}, "threads"),
        ({"threads": "AUTO"}, "threads"),
        ({"callback": 3}, "callback"),
        ({"stop": "yes"}, "stop"),
        ({"on_complete": 1}, "on_complete"),
        ({"resume": "no"}, "resume"),
    ],
)
def test_a_bad_argument_to_train_is_named_and_leaves_the_run_as_it_was(tmp_path, kw, field):
    store = lt.RunStore(tmp_path)
    cfg = lt.TrainConfig(**TINY)
    run = store.create(cfg.to_dict(), name="typo")
    with pytest.raises(ValueError, match=rf"^{field}: "):
        lt.train(cfg, run, **kw)
    assert store.get("typo").raw_status()["state"] == "queued"
    assert lt.train(cfg, store.get("typo"), threads=1)["state"] == "completed"


def test_numpy_numbers_in_model_options_are_kept_as_json_numbers(tmp_path):
    options = {"depth": np.int64(2), "width": np.int32(16), "batchnorm": np.bool_(True)}
    cfg = lt.TrainConfig(**{**TINY, "model_kwargs": options})
    assert json.loads(json.dumps(cfg.to_dict()))["model_kwargs"] == {
        "depth": 2,
        "width": 16,
        "batchnorm": True,
    }
    run = lt.RunStore(tmp_path).create(cfg.to_dict(), name="np")
    assert lt.train(cfg, run, threads=1)["state"] == "completed"
    with pytest.raises(ValueError, match=r"^model_kwargs: .*numbers, text"):
        lt.TrainConfig(model_kwargs={"width": torch.tensor(16)})


def test_fine_tuning_takes_numpy_counts(digits):
    cz = lt.Compressor(_net(), digits)
    cut = cz.apply(lt.Uniform(0.5))
    tuned = cz.finetune(cut, np.int64(1), batch_size=np.int64(64), seed=np.int64(1))
    assert tuned.finetune_epochs == 1 and not tuned.model.training
    assert json.loads(json.dumps(tuned.to_dict())) == tuned.to_dict()
