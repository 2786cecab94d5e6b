"""Small defects, each with the test that showed it: a safetensors header that names a key
twice, a stopped run listed without the command that goes on, bad input said by every
process under torchrun, a cut model loaded into a fresh or already changed instance, and
frozen parameters through compose, save and load."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lorita as lt
from app import jobs
from lorita.cli import main
from lorita.engine import checkpoint as ckpt
from lorita.engine import train
from lorita.engine.build import read_weights
from lorita.runs import RunStore

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("plain_process")
TINY = {"dataset": "digits", "model": "mlp", "model_kwargs": {"width": 16}, "epochs": 1,
        "device": "cpu", "spectra_every": 0}  # fmt: skip


# --------------------------------------------------------------------------- 1: a key twice


def _split(data: bytes) -> tuple[str, bytes]:
    n = int.from_bytes(data[:8], "little")
    return data[8 : 8 + n].decode().rstrip(), data[8 + n :]


def _join(header: str, rest: bytes) -> bytes:
    raw = header.encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + rest


def _twice(data: bytes, key: str, value=None) -> bytes:
    """``data`` (a safetensors file) with ``key`` given a second time in its header, as the
    last entry (its value: ``value``, else the first entry's)."""
    header, rest = _split(data)
    first = json.loads(header)[key]
    again = json.dumps(first if value is None else value)
    return _join(f"{header[:-1]}, {json.dumps(key)}: {again}}}", rest)


def _seq():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


@pytest.mark.parametrize(
    ("key", "value"),
    [("0.weight", None), ("__metadata__", {"format": "pt"})],
    ids=["a tensor", "__metadata__"],
)
def test_a_header_naming_a_key_twice_is_refused_by_every_reader(tmp_path, key, value):
    """Before: a file listing one tensor twice loaded (JSON keeps the last of the two, while
    other readers may keep the first), and one with __metadata__ twice was refused as "not a
    LoRITa model file" by load and not at all by --init-from of a plain file."""
    good = lt.save_bytes(_seq())
    bad = _twice(good, key, value)
    path = tmp_path / "twice.safetensors"
    path.write_bytes(bad)
    said = rf"the key '{key}' is given twice"
    with pytest.raises(ValueError, match=rf"^path '.*twice.safetensors' header: {said}"):
        lt.load(path)
    with pytest.raises(ValueError, match=said):
        lt.load(path, model=_seq())
    with pytest.raises(ValueError, match=rf"^data header: {said}"):
        lt.load_bytes(bad)
    with pytest.raises(ValueError, match=said):
        lt.read_spec(path)
    for model in (None, _seq()):  # --init-from: a plain state_dict, or fitted to a model
        with pytest.raises(ValueError, match=rf"^init_from: .*{said}"):
            read_weights(path, model)
    plain = tmp_path / "plain.safetensors"  # a state_dict safetensors wrote, without a spec
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in _seq().state_dict().items()}, plain)
    plain.write_bytes(_twice(plain.read_bytes(), "2.bias"))
    with pytest.raises(ValueError, match=r"^init_from: .*the key '2.bias' is given twice"):
        read_weights(plain)
    lt.load_bytes(good)  # the file as written still loads


def test_a_key_twice_inside_the_spec_is_refused_naming_it():
    data = lt.save_bytes(_seq())
    header, rest = _split(data)
    h = json.loads(header)
    spec = h["__metadata__"]["lorita_spec"]
    h["__metadata__"]["lorita_spec"] = spec[:-1] + ', "layers": {}}'
    with pytest.raises(ValueError, match=r"^data spec: the key 'layers' is given twice"):
        lt.load_bytes(_join(json.dumps(h), rest))


def test_a_checkpoint_naming_a_tensor_twice_is_refused_on_resume(tmp_path):
    run = RunStore(tmp_path).create(TINY, name="c")
    assert train(TINY, run, stop=lambda: True)["state"] == "stopped"  # one step, a checkpoint
    last = ckpt.latest(run.checkpoint_dir)
    model_file, state_file = last / "model.safetensors", last / "state.safetensors"
    assert ckpt.counters(last)["step"] == 1
    first = next(k for k in json.loads(_split(state_file.read_bytes())[0]) if k != "__metadata__")
    state_file.write_bytes(_twice(state_file.read_bytes(), first))
    with pytest.raises(ValueError, match=rf"the key '{first}' is given twice"):
        ckpt.counters(last)
    model = lt.load(model_file)
    name = next(iter(model.state_dict()))
    model_file.write_bytes(_twice(model_file.read_bytes(), name))
    with pytest.raises(ValueError, match=rf"the key '{name}' is given twice"):
        ckpt.load(last, model, torch.optim.SGD(model.parameters(), lr=0.1), None)


# --------------------------------------------------------------------------- 2: stopped


def _said(root: Path, name: str, capsys, *flags: str) -> dict[str, str]:
    """A run's message as each place that lists it shows it."""
    st = RunStore(root).get(name).status()
    row = {r["name"]: r for r in RunStore(root).summaries()}[name]
    app_row = {r["name"]: r for r in jobs.list_runs(root)}[name]
    capsys.readouterr()
    assert main(["runs", *flags]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith(f"  {name}: ")]
    assert len(lines) == 1, out
    return {
        "status": st["message"],
        "summary": row["message"],
        "app list": app_row["message"],
        "cli runs": lines[0].split(": ", 1)[1],
    }


def test_a_run_stopped_on_request_is_listed_with_the_command_that_goes_on(
    tmp_path, capsys, monkeypatch
):
    """Before: ``lorita runs`` said "stopped at step 1 on request" and nothing more, though
    the command line said how to resume when it stopped."""
    run = RunStore(tmp_path).create(TINY, name="s")
    assert train(TINY, run, stop=lambda: True)["state"] == "stopped"
    for where, message in _said(tmp_path, "s", capsys, "--runs-dir", str(tmp_path)).items():
        assert message.startswith("stopped at step 1 on request; "), (where, message)
        assert message.endswith(
            f"resume it from its last checkpoint (step 1): lorita train --resume s --runs-dir "
            f"{tmp_path}"
        ), (where, message)
    monkeypatch.setenv("LORITA_RUNS", str(tmp_path))  # the default folder: no --runs-dir
    monkeypatch.setattr(jobs, "_ROWS", {})  # (the app keeps a finished run's row)
    for where, message in _said(tmp_path, "s", capsys).items():
        assert message.endswith("(step 1): lorita train --resume s"), (where, message)
    capsys.readouterr()
    assert main(["train", "--resume", "s", "--quiet"]) == 0  # the command named works
    assert run.status()["state"] == "completed"


def test_a_run_stopped_without_a_checkpoint_or_with_its_own_advice_is_left_as_it_said(tmp_path):
    store = RunStore(tmp_path)
    queued = store.create(TINY, name="q")
    queued.update_status(state="stopped", message="stopped while queued")
    assert queued.status()["message"] == "stopped while queued"
    run = store.create(TINY, name="i")
    assert train(TINY, run, stop=lambda: True)["state"] == "stopped"
    said = "interrupted (KeyboardInterrupt); train(config, run, resume=True) goes on"
    run.update_status(message=said)
    assert run.status()["message"] == said


# --------------------------------------------------------------------------- 3: torchrun


def test_bad_input_under_torchrun_is_said_once_with_one_exit_code(tmp_path):
    """Before: each of the two processes printed the error line. (A batch that does not
    split between the processes: the last input checked, once the world size is known.)"""
    flags, said = ["--batch-size", "3"], "lorita: error: batch_size: 3 "
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "lorita", "train", "--runs-dir", str(tmp_path), "--device", "cpu", *flags]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    lines = out.stderr.splitlines()
    errors = [line for line in lines if line.startswith("lorita:")]
    assert len(errors) == 1 and errors[0].startswith(said), out.stderr
    codes = [line.split(":", 1)[1].strip() for line in lines if line.startswith("  exitcode")]
    assert len(codes) == 2 and codes[-1].startswith("2 (pid"), out.stderr  # (the first to end)
    # each ends with 2 (the silent one a moment after the first: torchrun's SIGTERM, sent
    # once one has ended, does not change its code); a process still starting when the
    # first ends (on a very busy machine) is ended by torchrun before it reads its input
    assert all(c.startswith("2 (pid") or c.endswith("(SIGTERM)") for c in codes), out.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "flags", [["--epochs", "0"], ["--model", "nope"]], ids=["a field", "an unknown model"]
)
def test_bad_input_in_a_torchrun_process_other_than_the_first_ends_silently(
    monkeypatch, tmp_path, capsys, flags
):
    """The same, without starting processes: the first process of a machine says why, the
    others end with the same code and say nothing (each a moment later: torchrun ends the
    others once one has ended)."""
    import lorita.cli as cli

    monkeypatch.setattr(cli, "_TORCHRUN_LINGER_S", 0.01)
    argv = ["train", "--runs-dir", str(tmp_path), "--device", "cpu", *flags]
    env = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29599"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for rank, lines in ((1, 0), (0, 1)):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        assert main(argv) == 2
        assert len(capsys.readouterr().err.splitlines()) == lines, rank
    monkeypatch.setenv("LOCAL_RANK", "x")  # torchrun's variables set wrong: said by each
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorita: error: ") and len(err.splitlines()) == 1, err


# --------------------------------------------------------------------------- 4: cut, loaded


class Net(nn.Module):
    """A model of the user's own (not in the registry): loaded onto an instance of it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):  # (B, 16) -> (B, 4)
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@pytest.fixture
def cut_file(tmp_path):
    """A cut Net saved: fc1 dense (rank 14 of 16 costs less dense), fc2 thin, head whole."""
    small = lt.truncate(Net(), lt.Ranks({"fc1": 14, "fc2": 2}))
    forms = {n: p["form"] for n, p in small.lorita_plan.items()}
    assert forms == {"fc1": "dense", "fc2": "thin", "head": "full"}
    return lt.save(small, tmp_path / "cut.safetensors"), small


def test_a_cut_model_with_dense_and_thin_layers_loads_onto_a_fresh_instance(cut_file):
    path, small = cut_file
    x = torch.randn(3, 16)
    loaded = lt.load(path, model=Net())
    assert (type(loaded.fc1), type(loaded.fc2).__name__) == (nn.Linear, "LowRankLinear")
    torch.testing.assert_close(loaded(x), small(x))
    pruned = Net()  # pruned where the file cut a layer to thin: the thin layer replaces it
    torch.nn.utils.prune.l1_unstructured(pruned.fc2, "weight", 0.5)
    torch.testing.assert_close(lt.load(path, model=pruned)(x), small(x))


@pytest.mark.parametrize(
    ("layer", "change", "said"),
    [
        ("fc1", lambda m: torch.nn.utils.prune.l1_unstructured(m, "weight", 0.5),
         r"torch\.nn\.utils\.prune\.remove\(module, 'weight'\)"),
        ("head", lambda m: torch.nn.utils.prune.random_unstructured(m, "bias", 0.5),
         r"torch\.nn\.utils\.prune\.remove\(module, 'bias'\)"),
        ("fc1", lambda m: torch.nn.utils.parametrizations.weight_norm(m),
         r"torch\.nn\.utils\.parametrize\.remove_parametrizations\(module, 'weight'\)"),
    ],
    ids=["pruned weight, a dense cut", "pruned bias, uncut", "parametrized"],
)  # fmt: skip
def test_a_cut_model_onto_a_pruned_instance_names_the_layer_and_what_to_pass(
    cut_file, layer, change, said
):
    """Before: "model: layer 'fc1' does not match the file: 'fc1.weight_orig' is missing from
    the file", which said neither what that tensor is nor what to do."""
    path, _ = cut_file
    model = Net()
    change(model.get_submodule(layer))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"^model: layer '{layer}' does not match") as e:
        lt.load(path, model=model)
    assert "pruned or reparametrized here" in str(e.value)
    assert "pass an instance without it" in str(e.value)
    assert len(re.findall(said, str(e.value))) == 1, str(e.value)
    assert model.state_dict().keys() == before.keys()  # refused before it was changed
    assert type(model.fc2) is nn.Linear


def test_a_pruned_model_saved_and_loaded_onto_a_plain_instance_says_what_to_pass(tmp_path):
    pruned = Net()
    torch.nn.utils.prune.l1_unstructured(pruned.fc1, "weight", 0.5)
    path = lt.save(pruned, tmp_path / "pruned.safetensors")
    x = torch.randn(3, 16)
    again = Net()
    torch.nn.utils.prune.l1_unstructured(again.fc1, "weight", 0.5)  # pruned alike: loads
    torch.testing.assert_close(lt.load(path, model=again)(x), pruned(x))
    with pytest.raises(ValueError, match=r"^model: layer 'fc1' does not match") as e:
        lt.load(path, model=Net())
    assert re.search(
        r"the file holds it pruned or reparametrized \('fc1\.weight_(mask|orig)'\)", str(e.value)
    )


def test_a_cut_model_onto_a_composed_instance_names_the_layer_and_what_to_pass(cut_file):
    path, _ = cut_file
    composed = lt.overparameterize(Net(), n_factors=3)
    with pytest.raises(ValueError, match=r"layer 'fc1' is already a FactorLinear; pass a fresh"):
        lt.load(path, model=composed)
    x = torch.randn(3, 16)
    torch.testing.assert_close(
        lt.load(path, model=lt.merge_model(composed))(x), cut_file[1](x)
    )  # the message's other way


# --------------------------------------------------------------------------- 5: frozen


def _frozen(model: nn.Module) -> list[str]:
    return sorted(n for n, p in model.named_parameters() if not p.requires_grad)


def test_frozen_parameters_stay_frozen_through_compose_cut_save_and_load():
    """Compose, merge and cut kept them frozen in memory; save dropped it (every parameter
    of the loaded model trainable). The spec now lists them, and load freezes them again."""
    net = Net()
    net.fc1.requires_grad_(False)
    net.head.bias.requires_grad_(False)
    composed = lt.overparameterize(net, n_factors=3)
    assert _frozen(composed) == ["fc1.bias", "fc1.factors.0", "fc1.factors.1", "fc1.factors.2",
                                 "head.bias"]  # fmt: skip
    assert _frozen(lt.merge_model(composed)) == ["fc1.bias", "fc1.weight", "head.bias"]
    cut = lt.truncate(composed, lt.Ranks({"fc1": 2, "fc2": 14}))
    assert _frozen(cut) == ["fc1.first.weight", "fc1.second.bias", "fc1.second.weight",
                            "head.bias"]  # fmt: skip
    for model in (net, composed, cut):
        data = lt.save_bytes(model)
        assert lt.load_bytes(data, model=Net()).training is False
        assert _frozen(lt.load_bytes(data, model=Net())) == _frozen(model)
    seq = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    seq[2].weight.requires_grad_(False)
    assert _frozen(lt.load_bytes(lt.save_bytes(seq))) == ["2.weight"]  # rebuilt from the file
    plain = lt.save_bytes(Net())  # nothing frozen: the spec as before, nothing listed
    assert "frozen" not in json.loads(json.loads(_split(plain)[0])["__metadata__"]["lorita_spec"])


@pytest.mark.parametrize(
    ("frozen", "said"),
    [
        ("fc1.weight", r"spec\.frozen: expected a list"),
        ([1], r"spec\.frozen\[0\]: expected a layer name"),
        (["nope.weight"], r"spec\.frozen\[0\]: 'nope\.weight' is not a parameter"),
    ],
)
def test_a_frozen_list_that_does_not_fit_is_refused_naming_it(frozen, said):
    header, rest = _split(lt.save_bytes(Net()))
    h = json.loads(header)
    spec = json.loads(h["__metadata__"]["lorita_spec"])
    h["__metadata__"]["lorita_spec"] = json.dumps({**spec, "frozen": frozen})
    model = Net()
    with pytest.raises(ValueError, match=said):
        lt.load_bytes(_join(json.dumps(h), rest), model=model)
    assert _frozen(model) == []
