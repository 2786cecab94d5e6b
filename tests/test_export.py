import numpy as np
import pytest
import torch
from torch import nn
from torch.testing import assert_close

import lorita as lt


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
