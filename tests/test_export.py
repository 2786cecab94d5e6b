import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.testing import assert_close

import lorita as lt
from lorita.export import is_lorita_file


def net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 24),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(24, 10),
    ).eval()


@pytest.mark.parametrize("kind", ["plain", "composed", "low_rank", "dense"])
def test_save_load_reproduces_outputs(tmp_path, kind):
    model = net()
    if kind == "composed":
        model = lt.overparameterize(model, 3, init="independent").eval()
    elif kind in ("low_rank", "dense"):
        model = lt.truncate(lt.overparameterize(model, 3), lt.Uniform(0.5), form=kind)
    x = torch.randn(3, 1, 8, 8)
    path = lt.save(model, tmp_path / "m.safetensors", input_shape=(1, 8, 8), metadata={"acc": 0.9})
    back = lt.load(path)
    assert_close(back(x), model(x))
    assert type(back[0]) is type(model[0]) and type(back[5]) is type(model[5])
    spec = lt.read_spec(path)
    assert spec["metadata"] == {"acc": 0.9} and spec["input_shape"] == [1, 8, 8]
    assert_close(lt.load_bytes(path.read_bytes())(x), model(x))
    assert not list(tmp_path.glob("*.tmp"))  # atomic write leaves no temp file


def test_onnx_reproduces_outputs(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = lt.truncate(lt.overparameterize(net(), 3), lt.Uniform(0.5))
    path = lt.export_onnx(model, torch.randn(1, 1, 8, 8), tmp_path / "m.onnx")
    x = torch.randn(5, 1, 8, 8)  # another batch size: the batch axis is dynamic
    session = ort.InferenceSession(str(path))
    (out,) = session.run(None, {"input": x.numpy()})
    np.testing.assert_allclose(out, model(x).detach().numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("inline_bytes", [None, 1000])
def test_onnx_carries_its_metadata(tmp_path, monkeypatch, inline_bytes):
    """``metadata`` reaches the file's metadata_props (JSON for what is not text), read by
    onnxruntime, in one file and with the weights beside it."""
    ort = pytest.importorskip("onnxruntime")
    import json

    import lorita.export as export

    if inline_bytes is not None:
        monkeypatch.setattr(export, "ONNX_INLINE_BYTES", inline_bytes)
    model = lt.truncate(lt.overparameterize(net(), 3), lt.Uniform(0.5))
    how = {"input_shape": [1, 8, 8], "normalize": {"mean": [0.3], "std": [0.4]}}
    path = lt.export_onnx(model, torch.randn(1, 1, 8, 8), tmp_path / "m.onnx",
                          metadata={"preprocess": how, "run": "r1"})  # fmt: skip
    props = ort.InferenceSession(str(path)).get_modelmeta().custom_metadata_map
    assert json.loads(props["preprocess"]) == how and props["run"] == "r1"
    with pytest.raises(ValueError, match="^metadata:"):
        lt.export_onnx(model, torch.randn(1, 1, 8, 8), tmp_path / "n.onnx", metadata=[1])


def test_metadata_that_is_not_a_finite_number_is_written_as_null(tmp_path):
    """NaN and inf are not JSON: a file read by another language's strict parser must parse,
    so both formats write them as null (unknown)."""
    import json

    import onnx

    model, x = net(), torch.randn(1, 1, 8, 8)
    meta = {"val_acc": float("nan"), "how": {"std": [float("inf"), 0.5]}}
    st = lt.save(model, tmp_path / "m.safetensors", metadata=meta) or tmp_path / "m.safetensors"
    assert lt.read_spec(st)["metadata"] == {"val_acc": None, "how": {"std": [None, 0.5]}}
    lt.export_onnx(model, x, tmp_path / "m.onnx", metadata=meta)
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert json.loads(props["how"], parse_constant=pytest.fail) == {"std": [None, 0.5]}


def test_a_model_too_large_for_one_onnx_file_keeps_its_weights_beside_it(tmp_path, monkeypatch):
    """ONNX files hold at most 2 GiB: a larger model's weights go to NAME.onnx.data (made so
    here by lowering the limit).
    Both files appear under their final names, no work folder is left, onnxruntime reads them;
    a later small export to the same name removes the weights file it no longer uses."""
    ort = pytest.importorskip("onnxruntime")
    import lorita.export as export

    model = lt.truncate(lt.overparameterize(net(), 3), lt.Uniform(0.5))
    x = torch.randn(4, 1, 8, 8)
    monkeypatch.setattr(export, "ONNX_INLINE_BYTES", 1000)
    path = lt.export_onnx(model, x[:1], tmp_path / "m.onnx")
    data = export.onnx_data_path(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert data.stat().st_size > 1000  # the larger weights (torch keeps tiny ones inline)
    (out,) = ort.InferenceSession(str(path)).run(None, {"input": x.numpy()})
    np.testing.assert_allclose(out, model(x).detach().numpy(), rtol=1e-4, atol=1e-5)
    monkeypatch.undo()
    lt.export_onnx(model, x[:1], path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    (out,) = ort.InferenceSession(str(path)).run(None, {"input": x.numpy()})
    np.testing.assert_allclose(out, model(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_a_killed_large_onnx_export_leaves_a_work_folder_the_next_export_removes(
    tmp_path, monkeypatch
):
    """The two-file export writes in a folder beside the file; one left by a process killed
    mid-export (it holds the whole weights) is named so that the next export removes it."""
    pytest.importorskip("onnxruntime")
    import lorita.export as export

    monkeypatch.setattr(export, "ONNX_INLINE_BYTES", 1000)
    dead = tmp_path / ".m.onnx.999999999.1.work"  # no process has that pid
    dead.mkdir()
    (dead / "m.onnx.data").write_bytes(b"0" * 4096)
    lt.export_onnx(lt.merge_model(lt.overparameterize(net(), 3)), torch.randn(1, 1, 8, 8),
                   tmp_path / "m.onnx")  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]


def test_a_kill_between_the_two_moves_of_a_large_onnx_export_leaves_no_mismatched_pair(
    tmp_path, monkeypatch
):
    """Exporting over an earlier two-file export: the weights move first, then the graph. A
    process dying between the moves (the second move fails here) must not leave the old graph
    beside the new weights, which it would read as its own."""
    pytest.importorskip("onnxruntime")
    import lorita.export as export

    monkeypatch.setattr(export, "ONNX_INLINE_BYTES", 1000)
    x = torch.randn(1, 1, 8, 8)
    path = lt.export_onnx(lt.merge_model(lt.overparameterize(net(), 3)), x, tmp_path / "m.onnx")
    moves = []
    real_replace = os.replace

    def dies_before_the_graph_moves(src, dst):
        if Path(dst).parent == tmp_path:  # the moves that publish (not the exporter's own)
            moves.append(Path(dst).name)
        if Path(dst) == path:
            raise KeyboardInterrupt  # stands in for the kill
        real_replace(src, dst)

    monkeypatch.setattr(export.os, "replace", dies_before_the_graph_moves)
    with pytest.raises(KeyboardInterrupt):
        lt.export_onnx(lt.truncate(lt.overparameterize(net(), 3), lt.Uniform(0.5)), x, path)
    assert moves == ["m.onnx.data", "m.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx.data"]  # no graph to misread


def test_onnx_export_through_torch_export_prints_nothing(tmp_path, capfd):
    """An adaptive pool whose output does not divide its input: the TorchScript exporter
    fails and torch.export takes over. Neither prints on the terminal (torch's exporter turns
    its graph log on by itself; its optimiser warns per operator it leaves)."""
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.AdaptiveAvgPool2d((4, 4)), nn.Flatten(), nn.Linear(128, 3)
    ).eval()
    model = lt.truncate(lt.overparameterize(model, 3), lt.Uniform(0.5))
    # a torch.onnx.export of the user's own before leaves torch's ONNX log switched on
    torch.onnx.export(nn.Linear(2, 2), torch.randn(1, 2), tmp_path / "own.onnx", dynamo=False)
    capfd.readouterr()
    try:
        path = lt.export_onnx(model, torch.randn(1, 1, 9, 9), tmp_path / "m.onnx")
        out, err = capfd.readouterr()
        assert torch._C._jit_is_onnx_log_enabled()  # given back as the user's export left it
    finally:
        torch._C._jit_set_onnx_log_enabled(False)
    assert out == "" and err == "", (out[:300], err[:300])
    x = torch.randn(4, 1, 9, 9)
    session = ort.InferenceSession(str(path))
    (got,) = session.run(None, {"input": x.numpy()})
    np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=1e-4, atol=1e-5)
    import logging

    assert logging.getLogger("onnxscript").level == logging.NOTSET  # given back


def test_save_refuses_unknown_modules_and_load_refuses_bad_files(tmp_path):
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            return self.fc(x)

    torch.manual_seed(0)
    custom = lt.overparameterize(Custom(), 3, example_input=torch.randn(1, 2))
    lt.save(custom, tmp_path / "c.safetensors")  # any model saves
    with pytest.raises(ValueError, match="model=") as err:
        lt.load(tmp_path / "c.safetensors")
    assert "Custom" in str(err.value)
    back = lt.load(tmp_path / "c.safetensors", model=Custom())
    x = torch.randn(3, 2)
    assert_close(back(x), custom.eval()(x))
    assert type(back.fc) is type(custom.fc)
    # a float64 model's cut loads into a fresh float64 instance in float64
    double = lt.truncate(custom.double(), lt.Ranks({"fc": 1}), example_input=x.double())
    lt.save(double, tmp_path / "d.safetensors")
    back = lt.load(tmp_path / "d.safetensors", model=Custom().double())
    assert {p.dtype for p in back.parameters()} == {torch.float64}
    assert_close(back(x.double()), double.eval()(x.double()))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="path"):
        lt.load(bad)
    with pytest.raises(ValueError, match="no such file"):
        lt.load(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a LoRITa model file"):
        lt.load(tmp_path / "plain.safetensors")


def _bn_stats(model):
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def test_save_fold_bn_records_the_folds_and_both_loads_rebuild_them(tmp_path):
    from torchvision.models import mobilenet_v3_small

    model = lt.create_model("torchvision:mobilenet_v3_small", num_classes=10, image_size=32)
    model = _bn_stats(model)
    cut = lt.truncate(model, lt.Uniform(0.25)).eval()
    x = torch.randn(2, 3, 32, 32)
    path = lt.save(cut, tmp_path / "m.safetensors", input_shape=(3, 32, 32), fold_bn=True)
    folded = lt.read_spec(path)["folded"]
    assert len(folded) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert any(layer.endswith(".second") for layer in folded.values())  # thin pairs
    for back in (lt.load(path), lt.load(path, model=mobilenet_v3_small(num_classes=10))):
        assert not any(isinstance(m, nn.BatchNorm2d) for m in back.modules())
        assert_close(back(x), cut(x), rtol=1e-4, atol=1e-5)
    assert isinstance(cut.features[0][1], nn.BatchNorm2d)  # the saved model keeps its own
    plain = lt.save(cut, tmp_path / "p.safetensors")  # default: BatchNorm kept (checkpoints)
    assert lt.read_spec(plain)["folded"] == {}


def test_save_fold_bn_sequential_and_a_bad_folded_entry(tmp_path):
    model = _bn_stats(net())
    x = torch.randn(3, 1, 8, 8)
    path = lt.save(model, tmp_path / "m.safetensors", fold_bn=True, input_shape=(1, 8, 8))
    assert lt.read_spec(path)["folded"] == {"1": "0"}
    back = lt.load(path)
    assert isinstance(back[1], nn.Identity)
    assert_close(back(x), model(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="fold_bn"):
        lt.save(model, tmp_path / "x.safetensors", fold_bn="yes")
    import json

    from safetensors.torch import load_file, save_file

    spec = lt.read_spec(path)
    fresh = lt.save(model, tmp_path / "r.safetensors")  # BatchNorm kept
    for bad, msg in (({"3": "0"}, "MaxPool2d, not a BatchNorm"), ({"1": 5}, "spec.folded")):
        spec_bad = {**lt.read_spec(fresh), "folded": bad}
        save_file(
            load_file(str(fresh)), str(tmp_path / "b.safetensors"),
            metadata={"lorita_spec": json.dumps(spec_bad)},
        )  # fmt: skip
        with pytest.raises(ValueError, match=msg):
            lt.load(tmp_path / "b.safetensors")
    assert spec["folded"] == {"1": "0"}


def test_onnx_folds_batchnorm_by_default(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    model = _bn_stats(net())
    x = torch.randn(4, 1, 8, 8)
    ops = {}
    for fold in (True, False):
        path = lt.export_onnx(model, x, tmp_path / f"m{fold}.onnx", fold_bn=fold)
        ops[fold] = {n.op_type for n in onnx.load(str(path)).graph.node}
        (out,) = ort.InferenceSession(str(path)).run(None, {"input": x.numpy()})
        np.testing.assert_allclose(out, model(x).detach().numpy(), rtol=1e-4, atol=1e-5)
    assert "BatchNormalization" not in ops[True]  # (the exporter itself folds conv + BN too)
    assert isinstance(model[1], nn.BatchNorm2d)


def test_is_lorita_file_reads_only_a_bounded_header(tmp_path):
    from safetensors.torch import save_file

    from lorita.export import is_lorita_file

    net = nn.Sequential(nn.Linear(4, 3))
    lt.save(net, tmp_path / "ours.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes((2**40).to_bytes(8, "little") + b"{}")  # a header length beyond the file
    (tmp_path / "empty.safetensors").write_bytes(b"")
    assert is_lorita_file(tmp_path / "ours.safetensors")
    for name in ("plain", "huge", "empty", "missing"):
        assert not is_lorita_file(tmp_path / f"{name}.safetensors")


def test_sequential_models_keep_every_option_of_their_plain_modules(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU6(),
        nn.MaxPool2d(2, ceil_mode=True), nn.AvgPool2d(3, 1, 1, ceil_mode=True, count_include_pad=False),
        nn.Hardswish(), nn.Dropout2d(0.1), nn.PReLU(8), nn.AdaptiveMaxPool2d(2), nn.Flatten(),
        nn.Linear(32, 4), nn.ELU(0.5), nn.Softplus(2, 10), nn.LogSoftmax(1),
    )  # fmt: skip
    small = lt.truncate(lt.overparameterize(net, 3), lt.Uniform(0.5)).eval()
    lt.save(small, tmp_path / "p.safetensors")
    again = lt.load(tmp_path / "p.safetensors").eval()
    assert again[3].ceil_mode and not again[4].count_include_pad and again[4].ceil_mode
    x = torch.randn(2, 3, 15, 15)  # odd sides: ceil_mode changes the output
    assert torch.equal(again(x), small(x))


def test_load_says_what_a_file_that_is_not_safetensors_is(tmp_path):
    net = nn.Sequential(nn.Linear(4, 4))
    torch.save(net.state_dict(), tmp_path / "sd.pt")
    with pytest.raises(ValueError, match="not a safetensors file: it looks like a torch.save"):
        lt.load(tmp_path / "sd.pt")
    lt.export_onnx(net, torch.randn(1, 4), tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="not a safetensors file: it looks like an ONNX model"):
        lt.load(tmp_path / "m.onnx")
    import pickle

    (tmp_path / "p4.pkl").write_bytes(pickle.dumps({"w": [1.0] * 300}, protocol=4))
    with pytest.raises(ValueError, match="not a safetensors file: it looks like a torch.save"):
        lt.load(tmp_path / "p4.pkl")


@pytest.mark.parametrize("header_len", [0x0480, 0x0580, 0x0408])
def test_a_safetensors_header_whose_length_bytes_look_like_another_format_still_loads(
    tmp_path, header_len
):
    """The 8-byte header length is little-endian: a 1152-byte header starts with the two bytes
    of a protocol-4 pickle (80 04), 1408 bytes those of protocol 5, 1032 bytes ONNX's first
    byte (08). Such files are safetensors all the same (their header is padded here with
    the spaces the format allows), written by save, and load reads them."""
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    path = tmp_path / "m.safetensors"
    lt.save(net, path)
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert n < header_len
    padded = header_len.to_bytes(8, "little") + raw[8 : 8 + n] + b" " * (header_len - n)
    path.write_bytes(padded + raw[8 + n :])
    assert is_lorita_file(path)
    x = torch.randn(5, 4)
    assert torch.equal(lt.load(path)(x), net(x))


def test_load_into_a_composed_model_or_another_class_says_so(tmp_path):
    """load(model=) takes the plain architecture: a composed instance is refused naming its
    layer; another class whose layers match loads, with a warning naming both classes."""
    import warnings

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 8, 3)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(self.c(x).mean((2, 3)))

    class Other(Net):
        pass

    path = lt.save(lt.overparameterize(Net(), 3), tmp_path / "n.safetensors")
    with pytest.raises(ValueError, match=r"model: layer 'c' is already a FactorConv2d.*fresh"):
        lt.load(path, model=lt.overparameterize(Net(), 3))
    with pytest.warns(UserWarning, match=r"saved from a .*Net, this is a .*Other"):
        lt.load(path, model=Other())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lt.load(path, model=Net())


def test_load_into_a_model_built_on_the_meta_device(tmp_path):
    """A model built without memory (``with torch.device("meta")``) takes the file's tensors;
    one whose own buffers are not in the file is refused with what to do."""

    class Net(nn.Module):
        def __init__(self, own_buffer: bool = False):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)
            if own_buffer:
                self.register_buffer("scale", torch.ones(8), persistent=False)

        def forward(self, x):
            h = torch.relu(self.fc1(x))
            return self.fc2(h * self.scale if hasattr(self, "scale") else h)

    torch.manual_seed(0)
    x = torch.randn(4, 6)
    for own_buffer in (False, True):
        cut = lt.truncate(lt.overparameterize(Net(own_buffer), 3), lt.Uniform(0.5))
        path = lt.save(cut, tmp_path / f"m{own_buffer}.safetensors")
        with torch.device("meta"):
            fresh = Net(own_buffer)
        if own_buffer:
            with pytest.raises(ValueError, match=r"model: built on the meta device, and 'scale'"):
                lt.load(path, model=fresh)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "copying into a meta parameter is a no-op"
            back = lt.load(path, model=fresh)
        assert not any(t.is_meta for t in back.state_dict().values())
        assert_close(back(x), cut(x))


def test_onnx_of_a_dilated_same_padded_convolution_runs_in_onnxruntime(tmp_path):
    """padding="same" with dilation exported as auto_pad is refused by onnxruntime: the file
    carries the explicit pads (the model given is left as it was)."""
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding="same", dilation=2), nn.ReLU(),
        nn.Conv2d(4, 4, (3, 5), padding="same"),
    ).eval()  # fmt: skip
    x = torch.randn(2, 3, 9, 9)
    path = lt.export_onnx(lt.overparameterize(net, 3), x, tmp_path / "same.onnx")
    out = ort.InferenceSession(str(path)).run(None, {"input": x.numpy()})[0]
    assert_close(torch.from_numpy(out), net(x), rtol=1e-4, atol=1e-5)
    assert net[0].padding == "same"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_onnx_of_weights_onnxruntime_cannot_run_on_a_cpu_warns(tmp_path, dtype):
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 7 * 7, 3)).to(dtype)
    with pytest.warns(UserWarning, match="onnxruntime's CPU provider cannot run; export model"):
        lt.export_onnx(net.eval(), torch.randn(1, 3, 9, 9, dtype=dtype), tmp_path / "m.onnx")


def test_onnx_outputs_of_a_model_returning_several_tensors_are_named_and_batched(tmp_path):
    """A dict's keys (nested ones joined) or output, output_1... name the graph's outputs,
    each with the dynamic batch axis."""
    ort = pytest.importorskip("onnxruntime")

    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 2)

        def forward(self, x):
            return {"logits": self.a(x), "aux": {"z": self.b(x)}}

    class Pair(Heads):
        def forward(self, x):
            return self.a(x), self.b(x)

    x = torch.randn(5, 4)
    for model, names in ((Heads(), ["logits", "aux_z"]), (Pair(), ["output", "output_1"])):
        path = lt.export_onnx(model.eval(), torch.randn(1, 4), tmp_path / "m.onnx")
        session = ort.InferenceSession(str(path))
        assert [o.name for o in session.get_outputs()] == names
        got = session.run(None, {"input": x.numpy()})
        assert [r.shape for r in got] == [(5, 3), (5, 2)]


def test_a_truncated_model_file_is_named_and_said_truncated(tmp_path):
    path = lt.save(nn.Sequential(nn.Linear(8, 8)), tmp_path / "m.safetensors")
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"^path '.*m\.safetensors': tensor .*is it truncated"):
        lt.load(path)


def test_onnx_leaves_out_what_is_not_a_tensor_and_says_when_the_input_has_no_batch(tmp_path):
    """A model returning {"logits": y, "loss": None} (a Hugging Face habit) or (None, y) gets
    one output for its one tensor; an input without a batch axis (which the model runs on) is
    named as such, not as a channel mismatch."""
    ort = pytest.importorskip("onnxruntime")

    class Named(nn.Module):
        def __init__(self, as_dict):
            super().__init__()
            self.fc, self.as_dict = nn.Linear(8, 4), as_dict

        def forward(self, x):
            return {"logits": self.fc(x), "loss": None} if self.as_dict else (None, self.fc(x))

    for as_dict, name in ((True, "logits"), (False, "output")):
        path = lt.export_onnx(Named(as_dict), torch.randn(2, 8), tmp_path / f"{name}.onnx")
        sess = ort.InferenceSession(str(path))
        assert [o.name for o in sess.get_outputs()] == [name]
        assert sess.run(None, {"input": np.zeros((5, 8), np.float32)})[0].shape == (5, 4)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(0), nn.Linear(8 * 6 * 6, 5))
    with pytest.raises(ValueError, match=r"example_input: the graph's first axis is the batch"):
        lt.export_onnx(net, torch.randn(3, 8, 8), tmp_path / "unbatched.onnx")


def test_a_sequential_reusing_a_module_or_parameter_needs_model(tmp_path):
    """A module tree names each module once: one ReLU at two places, one Linear called twice
    or one weight in two layers would load as something else (the last ReLU gone, the tie
    broken). load(path) says to pass the model; load(path, model=...) keeps everything."""
    act = nn.ReLU()
    lin = nn.Linear(8, 8)
    tied = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    tied[2].weight = tied[0].weight
    builds = [
        (
            "one module at '1' and '3'",
            lambda: nn.Sequential(nn.Linear(8, 8), act, nn.Linear(8, 4), act),
        ),
        ("one module at '0' and '2'", lambda: nn.Sequential(lin, nn.ReLU(), lin, nn.Linear(8, 2))),
        ("'0.weight' and '2.weight' are one Parameter", lambda: tied),
    ]
    x = torch.randn(3, 8)
    for i, (what, build) in enumerate(builds):
        net = build().eval()
        path = lt.save(net, tmp_path / f"r{i}.safetensors")
        with pytest.raises(ValueError, match=f"{what}.*load\\(path, model="):
            lt.load(path)
        back = lt.load(path, model=build())
        assert torch.equal(back(x), net(x))


def test_load_into_a_meta_model_keeps_its_tied_weights(tmp_path):
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 12)
            self.head = nn.Linear(12, 20)
            self.head.weight = self.emb.weight

        def forward(self, x):
            return self.head(self.emb(x))

    path = lt.save(LM(), tmp_path / "lm.safetensors")
    with torch.device("meta"):
        fresh = LM()
    back = lt.load(path, model=fresh)
    assert back.head.weight is back.emb.weight
    assert sum(p.numel() for p in back.parameters()) == 20 * 12 + 20
