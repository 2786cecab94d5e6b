"""The command line with a user's own images and weights: a folder of mixed image files,
starting weights as training scripts save them, and the chain train -> compress -> export ->
load back (found by a QA pass; the files and paths are those people have)."""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from test_cli import _one_line_error  # (one CLI error line, as test_cli checks it)

import lorita as lt
from lorita.cli import main

pytestmark = pytest.mark.usefixtures("plain_process", "one_thread")

CLASSES = ("cat one", "chien é", "ñ")  # a space, an accent, a non-Latin-1 letter
RESNET = ["--model", "resnet20", "--model-arg", "depth=8", "--model-arg", "width=4"]
SMALL = ["--data-arg", "size=16", "--epochs", "1", "--threads", "1", "--quiet"]


def _no_curves(run, splits=None, stop=None):
    """In place of lorita.curves.prepare: the trade-off curves a finished run keeps (seconds
    of cuts) are not what these tests check."""


@pytest.fixture(autouse=True)
def _data_folder(tmp_path, monkeypatch):
    import lorita.curves

    monkeypatch.setenv("LORITA_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(lorita.curves, "prepare", _no_curves)


def _save(path, arr, mode=None, **kw):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr)
    (im.convert(mode) if mode else im).save(path, **kw)
    return path


def _mixed_folder(root):
    """Three classes of grey, RGBA, palette and 16-bit PNG, JPEG and BMP files of other sizes,
    with what such folders also hold: a Finder's .DS_Store and ._ files, notes, a nested
    sub-folder, a link to an image of another class."""
    rng = np.random.default_rng(0)
    for ci, c in enumerate(CLASSES):
        d = root / c
        for i in range(6):
            side = int(rng.integers(10, 30))
            arr = rng.integers(0, 255, (side, side + i, 3), dtype=np.uint8)
            arr[..., ci] = 250  # each class its own colour: learnable
            if i == 0:
                _save(d / "0.png", arr, "L")
            elif i == 1:
                _save(d / "1.png", arr, "RGBA")
            elif i == 2:
                _save(d / "2.png", arr, "P")
            elif i == 3:
                grey = arr.mean(axis=2).astype(np.uint16) * 257
                _save(d / "3.png", grey)  # 16 bits a pixel ("I;16")
            elif i == 4:
                _save(d / "4.jpg", arr)
            else:
                _save(d / "5.bmp", arr)
        _save(d / "sub" / "n.png", arr)
        (d / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
        (d / "._0.png").write_bytes(b"\0\5\26\7" + b"\0" * 40)  # AppleDouble: not a PNG
        (d / "notes.txt").write_text("hello")
    os.symlink(root / CLASSES[0] / "0.png", root / CLASSES[1] / "link.png")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A composed resnet20 (N=2) and its N=1 pair trained one epoch on the mixed folder."""
    tmp = tmp_path_factory.mktemp("own")
    root = _mixed_folder(tmp / "imgs")
    runs = tmp / "runs"
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        import lorita.curves

        mp.setenv("LORITA_DATA", str(tmp / "data"))
        mp.setattr(lorita.curves, "prepare", _no_curves)
        for name, n in (("c2", "2"), ("c1", "1")):
            argv = ["train", "--runs-dir", str(runs), "--dataset", f"folder:{root}", *RESNET]
            assert main([*argv, *SMALL, "--factors", n, "--name", name]) == 0
    torch.set_num_threads(threads)
    return tmp, root, runs


def _json(capsys, argv):
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def test_a_mixed_folder_trains_with_every_file_that_is_an_image(trained):
    tmp, root, runs = trained
    run = lt.RunStore(runs).get("c2")
    assert run.status()["state"] == "completed"
    assert run.config["dataset"] == f"folder:{root}"
    splits = run.load_splits()
    # 6 images, the nested one, and the link (in the second class); hidden files and notes not
    assert len(splits.train) + len(splits.val) + len(splits.test) == 3 * 7 + 1
    assert splits.preprocess()["classes"] == list(CLASSES)
    assert splits.preprocess()["input_shape"] == [3, 16, 16]


def test_compress_takes_each_policy_flag_and_prints_json(trained, capsys, monkeypatch):
    tmp, _, runs = trained
    monkeypatch.setenv("LORITA_DATA", str(tmp / "data"))
    at = ["compress", "c2", "--runs-dir", str(runs), "--no-latency", "--json"]
    for flags in (["--uniform", "0.5"], ["--global", "0.5"], ["--energy", "0.9"],
                  ["--budget", "40"], ["--flops-budget", "40"], ["--policy", "ranks:conv1=1"],
                  ["--max-drop", "50"], ["--max-drop", "50", "--search", "iterative"]):  # fmt: skip
        got = _json(capsys, [*at, *flags])
        assert got["run"] == "c2" and got["after"]["params"] <= got["before"]["params"], flags
        assert 0 <= got["after"]["val_acc"] <= 1, flags
    rows = _json(capsys, ["compare", "c2", "--runs-dir", str(runs), "--baseline", "c1",
                          "--budgets", "50", "--json"])  # fmt: skip
    assert {r["method"] for r in rows} >= {"lorita", "svd"}


def test_exported_files_load_back_and_give_the_runs_outputs(trained, capsys, monkeypatch):
    """safetensors (uncut, cut, dense) with lt.load (model= a fresh instance or not) and ONNX
    with onnxruntime: the same outputs as the model they were written from, and the class
    names of the folder in their metadata."""
    tmp, _, runs = trained
    monkeypatch.setenv("LORITA_DATA", str(tmp / "data"))
    run = lt.RunStore(runs).get("c2")
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        full = run.load_model().eval()(x)
    at = ["export", "c2", "--runs-dir", str(runs)]

    def fresh():
        return lt.create_model(
            "resnet20", in_channels=3, image_size=16, num_classes=3, depth=8, width=4
        )

    outs = {}
    for name, flags in (("full", []), ("cut", ["--budget", "50"]),
                        ("dense", ["--budget", "50", "--form", "dense"])):  # fmt: skip
        path = tmp / f"{name}.safetensors"
        assert main([*at, *flags, "--out", str(path)]) == 0, capsys.readouterr().err
        spec = lt.read_spec(path)["metadata"]
        assert spec["preprocess"]["classes"] == list(CLASSES)
        with torch.no_grad():
            a = lt.load(path).eval()(x)
            b = lt.load(path, model=fresh()).eval()(x)
        torch.testing.assert_close(a, b)
        outs[name] = a
    torch.testing.assert_close(outs["full"], full, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outs["cut"], outs["dense"], rtol=1e-4, atol=1e-5)
    ort = pytest.importorskip("onnxruntime")
    for name, flags in (("full", []), ("cut", ["--budget", "50"])):
        path = tmp / f"{name}.onnx"
        assert main([*at, *flags, "--out", str(path)]) == 0, capsys.readouterr().err
        session = ort.InferenceSession(str(path))
        meta = json.loads(session.get_modelmeta().custom_metadata_map["preprocess"])
        assert meta["classes"] == list(CLASSES)
        y = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        np.testing.assert_allclose(y, outs[name].numpy(), rtol=1e-4, atol=1e-4)


def test_init_from_the_files_training_scripts_write(trained, capsys, monkeypatch):
    """DataParallel names in a checkpoint dict start the run; a safetensors file with a tensor
    too many, one missing or of another shape, a file that is no checkpoint, and one of
    another architecture are each one line naming the layer, before any run folder."""
    from safetensors.torch import save_file

    tmp, root, _ = trained
    runs = tmp / "init-runs"
    monkeypatch.setenv("LORITA_DATA", str(tmp / "data"))
    sd = lt.create_model("resnet20", in_channels=3, image_size=16, num_classes=3, depth=8,
                         width=4).state_dict()  # fmt: skip
    sd = {k: v.contiguous() for k, v in sd.items()}
    argv = ["train", "--runs-dir", str(runs), "--dataset", f"folder:{root}", *RESNET, *SMALL,
            "--factors", "2", "--max-steps", "1"]  # fmt: skip
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp / "ddp.pt")
    still = ["--lr", "1e-12", "--weight-decay", "0", "--name", "ddp"]  # (a step changes nothing)
    assert main([*argv, *still, "--init-from", str(tmp / "ddp.pt")]) == 0, capsys.readouterr()
    got = lt.merge_model(lt.RunStore(runs).get("ddp").load_model()).state_dict()
    for k in ("conv1.weight", "layer2.0.conv2.weight", "fc.weight"):
        torch.testing.assert_close(got[k], sd[k], rtol=1e-4, atol=1e-5)
    started = len(list(runs.iterdir()))
    save_file({**sd, "extra.weight": torch.zeros(3)}, tmp / "extra.safetensors")
    save_file({k: v for k, v in sd.items() if not k.startswith("layer1.0.conv1.")},
              tmp / "missing.safetensors")  # fmt: skip
    save_file({**sd, "layer1.0.conv1.weight": torch.zeros(5, 4, 3, 3)}, tmp / "shape.safetensors")
    (tmp / "notes.pt").write_text("not weights\n")
    for name, needles in (
        ("extra.safetensors", ["not in the model: 'extra.weight'"]),
        ("missing.safetensors", ["missing from the file: 'layer1.0.conv1.weight'"]),
        ("shape.safetensors", ["'layer1.0.conv1.weight' has shape (5, 4, 3, 3) in the file"]),
        ("notes.pt", ["neither a safetensors file nor a PyTorch state_dict"]),
    ):
        _one_line_error(capsys, [*argv, "--init-from", str(tmp / name)], "init_from", *needles)
    assert len(list(runs.iterdir())) == started


def test_init_from_another_architecture_names_the_layers_it_lacks_first(tmp_path):
    """An MLP's weights offered to a resnet: they share the name 'bn1.weight' (of another
    size), but the error used to name only that shape, as if a width were wrong; it names
    the layers the file lacks and has, then that shape."""
    from lorita.engine.build import check_weights

    mlp = lt.create_model("mlp", in_channels=3, image_size=16, num_classes=3, width=16)
    net = lt.create_model("resnet20", in_channels=3, image_size=16, num_classes=3, depth=8,
                          width=4)  # fmt: skip
    with pytest.raises(ValueError) as got:
        check_weights(net, mlp.state_dict())
    said = str(got.value)
    assert said.startswith("init_from: the weights do not match the model (missing from the "
                           "file: 'conv1.weight'"), said  # fmt: skip
    assert "not in the model: 'fc1.weight'" in said
    assert said.endswith("also 'bn1.weight' has shape (16,) in the file but (4,) in the model")
    wider = lt.create_model("resnet20", in_channels=3, image_size=16, num_classes=3, depth=8,
                            width=8)  # fmt: skip
    with pytest.raises(ValueError, match=r"^init_from: 'conv1.weight' has shape \(8, 3, 3, 3\)"):
        check_weights(net, wider.state_dict())  # the same names: the shape alone, as before


@pytest.mark.parametrize("prefix", ["module._orig_mod.", "_orig_mod.module."])
def test_init_from_stacked_wrappers_strips_both_prefixes(tmp_path, prefix):
    """torch.compile of a DistributedDataParallel model saves ``_orig_mod.module.`` names,
    DDP of a compiled one ``module._orig_mod.``: each prefix alone was stripped, the two
    together refused as not the model's."""
    from lorita.engine.build import check_weights, read_weights
    from lorita.engine.preflight import check_model

    cfg = lt.TrainConfig(model_kwargs={"width": 16}, n_factors=1, seed=4)
    plain = lt.build_model(cfg, lt.load_splits(cfg))
    sd = plain.state_dict()
    torch.save({"model": {prefix + k: v for k, v in sd.items()}}, tmp_path / "w.pt")
    got = read_weights(tmp_path / "w.pt", plain)
    check_weights(plain, got)
    assert all(torch.equal(got[k], v) for k, v in sd.items())
    start = lt.TrainConfig(
        model_kwargs={"width": 16}, n_factors=3, init_from=str(tmp_path / "w.pt")
    )
    check_model(start)
    merged = lt.merge_model(lt.build_model(start, lt.load_splits(start))).state_dict()
    torch.testing.assert_close(merged["fc1.weight"], sd["fc1.weight"], rtol=1e-4, atol=1e-5)


def _small_folder(root, per_class=4):
    rng = np.random.default_rng(1)
    for ci, c in enumerate("ab"):
        for i in range(per_class):
            arr = rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)
            arr[..., ci] = 250
            _save(root / c / f"{i}.png", arr)
    return root


def test_a_config_with_the_same_folder_written_another_way_keeps_its_options(
    tmp_path, monkeypatch, capsys
):
    """``--config`` of a run (its folder kept absolute) with ``--dataset folder:imgs``, the same
    folder relative, with a slash or ``~``: its ``size=16`` used to be dropped as if another
    dataset were named, and the run trained on 32 px images instead."""
    home = tmp_path / "home"
    _small_folder(home / "imgs")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(home)
    runs = str(tmp_path / "runs")
    base = ["train", "--runs-dir", runs, "--model-arg", "width=8", "--max-steps", "1", *SMALL]
    assert main([*base, "--dataset", "folder:imgs", "--name", "first"]) == 0
    config = tmp_path / "runs" / "first" / "config.json"
    assert json.loads(config.read_text())["dataset"] == f"folder:{home / 'imgs'}"
    for i, spelled in enumerate(("folder:imgs", "folder:./imgs/", "folder:~/imgs")):
        argv = ["train", "--runs-dir", runs, "--config", str(config), "--dataset", spelled]
        assert main([*argv, "--name", f"again{i}", "--quiet"]) == 0, capsys.readouterr().err
        kept = lt.RunStore(runs).get(f"again{i}").config
        assert kept["dataset_kwargs"] == {"size": 16}, spelled
    other = _small_folder(home / "other")
    argv = ["train", "--runs-dir", runs, "--config", str(config), "--dataset", f"folder:{other}"]
    assert main([*argv, "--name", "other", "--quiet"]) == 0
    assert lt.RunStore(runs).get("other").config["dataset_kwargs"] == {}  # another dataset


def test_resume_takes_the_command_that_started_it_with_relative_paths(
    tmp_path, monkeypatch, capsys
):
    """``--resume`` accepts the training flags of the command that started the run: a folder
    and starting weights given relative were refused, the run keeping them absolute."""
    _small_folder(tmp_path / "imgs")
    monkeypatch.chdir(tmp_path)
    cfg = lt.TrainConfig(dataset=f"folder:{tmp_path / 'imgs'}", dataset_kwargs={"size": 16},
                         model_kwargs={"width": 8}, epochs=3, batch_size=2, device="cpu")  # fmt: skip
    plain = lt.build_model(dataclasses.replace(cfg, n_factors=1), lt.load_splits(cfg))
    torch.save(plain.state_dict(), tmp_path / "w.pt")
    cfg = dataclasses.replace(cfg, init_from=str(tmp_path / "w.pt"), spectra_every=0)
    store = lt.RunStore(tmp_path / "runs")
    steps = iter(range(10**6))
    stop = lambda: next(steps) >= 2  # noqa: E731
    assert lt.train(cfg.to_dict(), store.create(cfg.to_dict(), name="r"), threads=1,
                    stop=stop)["state"] == "stopped"  # fmt: skip
    argv = ["train", "--runs-dir", "runs", "--dataset", "folder:imgs", "--data-arg", "size=16",
            "--model-arg", "width=8", "--epochs", "3", "--batch-size", "2", "--device", "cpu",
            "--init-from", "w.pt", "--threads", "1", "--quiet"]  # fmt: skip
    assert main([*argv, "--resume", "r"]) == 0, capsys.readouterr().err
    assert store.get("r").status()["state"] == "completed"
    capsys.readouterr()
    _one_line_error(capsys, [*argv[:4], "folder:elsewhere", *argv[5:], "--resume", "r"],
                    "that change it (--dataset)")  # fmt: skip


def test_folder_layouts_people_have_on_the_command_line(tmp_path, capsys):
    """train/ and val/ without test/ trains; a val/ class the training part lacks, an empty
    class folder and a PNG cut short are one line naming the folder or file."""
    from PIL import Image

    runs = tmp_path / "runs"
    at = ["train", "--runs-dir", str(runs), "--model-arg", "width=8", "--max-steps", "1", *SMALL]
    ok = tmp_path / "ok"
    _small_folder(ok / "train")
    _small_folder(ok / "val", per_class=2)
    assert main([*at, "--dataset", f"folder:{ok}"]) == 0, capsys.readouterr().err
    made = len(list(runs.iterdir()))
    bad = tmp_path / "bad"
    _small_folder(bad / "train")
    _small_folder(bad / "val", per_class=1)
    (bad / "val" / "b").rename(bad / "val" / "c")
    _one_line_error(capsys, [*at, "--dataset", f"folder:{bad}"], str(bad / "val" / "c"),
                    "is not a class of the training part (a, b)")  # fmt: skip
    empty = _small_folder(tmp_path / "empty")
    (empty / "none").mkdir()
    _one_line_error(capsys, [*at, "--dataset", f"folder:{empty}"], str(empty / "none"),
                    "has no images")  # fmt: skip
    assert len(list(runs.iterdir())) == made  # refused before any run folder
    cut = _small_folder(tmp_path / "cut")
    big = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(big).save(cut / "a" / "big.png")
    data = (cut / "a" / "big.png").read_bytes()
    (cut / "a" / "big.png").write_bytes(data[: len(data) // 2])
    _one_line_error(capsys, [*at, "--dataset", f"folder:{cut}"], str(cut / "a" / "big.png"),
                    "not a readable image")  # fmt: skip
