"""The files the CLI and the Export page write, used as a user uses them: the page's loading
code run as written in a fresh process, the dense file in the original architecture with plain
PyTorch, ONNX at several batch sizes, and the CLI's file against the page's download."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from safetensors.torch import load, load_file

import lorita as lt
from app import compress as cz
from app import export as ex
from lorita.cli import main

ROOT = Path(__file__).resolve().parents[1]
RUN = "m3"


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    """A digits MLP (BatchNorm after each hidden layer), composed, trained a few steps."""
    d = tmp_path_factory.mktemp("runs")
    old = torch.get_num_threads()
    argv = ["train", "--runs-dir", str(d), "--name", RUN, "--max-steps", "4", "--quiet"]
    argv += ["--model-arg", "width=32", "--model-arg", "depth=2", "--threads", "1"]
    assert main(argv) == 0
    torch.set_num_threads(old)
    return d


@pytest.fixture(scope="module")
def session(runs_dir):
    return cz.session(RUN, "best", runs_dir)


def _choice(session, policy="global", value=0.5):
    small, _ = session.cut(cz.make_policy(policy, value))
    return {"run": RUN, "which": "best", "policy": policy, "value": value,
            "ranks": cz.every_rank(session, small)}  # fmt: skip


def _download(session, choice, fmt):
    """The page's model and file for ``choice`` (None: as trained) in format ``fmt``."""
    model = ex.choose_model(session, choice, fmt)
    meta = ex.metadata(session, choice, fmt, model=model)
    return model, ex.build(session, model, fmt, base_name=ex.file_base(RUN, "best", choice),
                           meta=meta)  # fmt: skip


def _architecture(spec):
    """A fresh instance of the architecture the file records (as the run built it)."""
    arch = spec["arch"]
    return lt.create_model(arch["registry"], **arch["kwargs"])


def _load_plain(data: bytes, spec) -> torch.nn.Module:
    net = _architecture(spec)
    net.load_state_dict(load(data), strict=True)  # plain PyTorch: the architecture's own load
    return net.eval()


def run_in_fresh_process(folders, cwd) -> None:
    """Run each folder's use.py in one fresh Python, from inside that folder, with nothing of
    this process's environment but the path to the project."""
    script = (
        "import os, runpy, sys\n"
        "for folder in sys.argv[1:]:\n"
        "    os.chdir(folder)\n"
        "    runpy.run_path('use.py', run_name='__main__')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, *map(str, folders)],
        cwd=cwd, capture_output=True, text=True, timeout=300,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("cut", [False, True], ids=["as-trained", "cut"])
def test_the_dense_download_loads_into_the_original_architecture_with_plain_pytorch(
    session, tmp_path, cut
):
    """The page calls the dense file the original architecture: its BatchNorms are kept (not
    folded), so the architecture's own strict ``load_state_dict`` takes it, and the model
    gives the outputs of the model in memory; the snippet says how."""
    choice = _choice(session) if cut else None
    model, built = _download(session, choice, "dense")
    path = tmp_path / built.file_name
    path.write_bytes(built.data)
    spec = lt.read_spec(path)
    net = _load_plain(built.data, spec)
    x = torch.randn(7, *session.example_input.shape[1:])
    with torch.no_grad():
        torch.testing.assert_close(net(x), model.eval()(x), rtol=1e-5, atol=1e-6)
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in net.modules())
    # the snippet's line for loading without lorita, run as it says on the architecture
    (line,) = [ln for ln in built.snippet.splitlines() if "load_state_dict" in ln]
    scope = {"net": _architecture(spec), "safetensors": safetensors}
    exec(line.lstrip("# ").replace(f'"{built.file_name}"', f'"{path}"'), scope)  # noqa: S102
    with torch.no_grad():
        torch.testing.assert_close(scope["net"].eval()(x), net(x))


def test_the_dense_download_of_a_fine_tuned_cut_loads_with_plain_pytorch(session, tmp_path):
    choice = _choice(session)
    small, _ = session.cut(cz.make_policy("global", 0.5))
    tuned, _ = cz.finetune(session, small, epochs=1, lr=1e-3)
    model = ex.choose_model(session, choice, "dense", finetuned=tuned)
    meta = ex.metadata(session, choice, "dense", model=model)
    built = ex.build(session, model, "dense", base_name="t", meta=meta)
    assert built.same
    path = tmp_path / built.file_name
    path.write_bytes(built.data)
    net = _load_plain(built.data, lt.read_spec(path))
    x = torch.randn(5, *session.example_input.shape[1:])
    with torch.no_grad():
        torch.testing.assert_close(net(x), model.eval()(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("policy", [[], ["--global", "0.5"]], ids=["as-trained", "cut"])
def test_the_clis_dense_files_load_into_the_original_architecture(runs_dir, tmp_path, policy):
    """`export --form dense` and `compress --form dense --out` write the original architecture
    (BatchNorms kept); `--fold-bn` given explicitly still folds them."""
    base = [RUN, "--runs-dir", str(runs_dir), *policy, "--form", "dense"]
    files = {"export": tmp_path / "e.safetensors", "folded": tmp_path / "f.safetensors"}
    assert main(["export", *base, "--out", str(files["export"])]) == 0
    assert main(["export", *base, "--fold-bn", "--out", str(files["folded"])]) == 0
    if policy:
        files["compress"] = tmp_path / "c.safetensors"
        argv = ["compress", *base, "--no-latency", "--out", str(files["compress"])]
        assert main(argv) == 0
    x = torch.randn(6, 1, 8, 8)
    want = lt.load(files["folded"]).eval()
    assert lt.read_spec(files["folded"])["folded"]
    for what in ("export", "compress")[: 1 + bool(policy)]:
        spec = lt.read_spec(files[what])
        assert spec["folded"] == {}, what
        net = _load_plain(files[what].read_bytes(), spec)
        with torch.no_grad():
            torch.testing.assert_close(net(x), want(x), rtol=1e-5, atol=1e-6)


def test_the_pages_snippets_run_as_written_in_a_fresh_process(session, tmp_path):
    """Each format's download and its snippet, in a folder of its own, run in a new Python
    process started there (nothing of this one imported): the snippet's outputs are the model's
    in memory. The ONNX file takes batches of 1, 7 and 64 on ``input`` (NCHW as the snippet
    says), says how to feed it, and gives the model's outputs."""
    choice = _choice(session)
    models, folders = {}, {}
    for fmt in ex.FORMATS:
        model, built = _download(session, choice, fmt)
        assert built.same, fmt
        folder = tmp_path / fmt
        folder.mkdir()
        (folder / built.file_name).write_bytes(built.data)
        code = built.snippet + "\nimport numpy\n\nnumpy.save('x.npy', numpy.asarray(x))\n"
        code += "numpy.save('pred.npy', numpy.asarray(pred))\n"
        (folder / "use.py").write_text(code)
        models[fmt], folders[fmt] = model.eval(), folder
    run_in_fresh_process(folders.values(), tmp_path)
    for fmt, folder in folders.items():
        x = torch.from_numpy(np.load(folder / "x.npy"))
        with torch.no_grad():
            want = models[fmt](x).argmax(1).numpy()
        np.testing.assert_array_equal(np.load(folder / "pred.npy"), want, err_msg=fmt)
    import onnxruntime as ort

    (onnx_file,) = folders["onnx"].glob("*.onnx")
    runtime = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    (inp,) = runtime.get_inputs()
    assert inp.name == "input" and inp.shape[1:] == list(session.example_input.shape[1:])
    how = json.loads(runtime.get_modelmeta().custom_metadata_map["preprocess"])
    assert how == session.preprocess and how["normalize"]["std"]
    for batch in (1, 7, 64):
        x = torch.rand(batch, *session.example_input.shape[1:])
        got = runtime.run(None, {"input": x.numpy()})[0]
        with torch.no_grad():
            want = models["onnx"](x).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=f"batch {batch}")


def test_compress_out_holds_the_tensors_of_the_pages_download_of_the_same_cut(
    session, runs_dir, tmp_path
):
    out = tmp_path / "small.safetensors"
    argv = ["compress", RUN, "--runs-dir", str(runs_dir), "--global", "0.5", "--no-latency"]
    assert main([*argv, "--out", str(out)]) == 0
    _, built = _download(session, _choice(session), "low_rank")
    cli, page = load_file(out), load(built.data)
    assert cli.keys() == page.keys()
    for k in cli:
        torch.testing.assert_close(cli[k], page[k], rtol=0, atol=0, msg=k)
    assert lt.read_spec(out)["metadata"]["preprocess"] == session.preprocess
    # both files' specs record one input's shape, as the page's metadata does
    page_file = tmp_path / built.file_name
    page_file.write_bytes(built.data)
    shape = list(session.example_input.shape[1:])
    assert lt.read_spec(page_file)["input_shape"] == lt.read_spec(out)["input_shape"] == shape


def _without_preprocess(runs_dir, tmp_path):
    """A copy of the run whose checkpoints do not record how to feed the model (written
    before checkpoints recorded it)."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    root = tmp_path / "old"
    shutil.copytree(runs_dir / RUN, root / RUN)
    for f in (root / RUN / "checkpoints").glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            header = h.metadata()
        spec = json.loads(header["lorita_spec"])
        spec["metadata"].pop("preprocess", None)
        save_file(load_file(f), f, metadata={**header, "lorita_spec": json.dumps(spec)})
    return root


def test_the_snippet_of_a_file_that_does_not_record_how_to_feed_it_runs(
    session, runs_dir, tmp_path
):
    """A run whose checkpoints predate the preprocessing record, exported without its data,
    and a file built without metadata: the snippet reads no record the file does not hold (it
    failed with KeyError: 'preprocess') and gives the model's predictions."""
    from app import jobs

    old = jobs.store(_without_preprocess(runs_dir, tmp_path)).get(RUN)
    assert old.preprocess("best") is None
    model = lt.merge_model(old.load_model("best")).eval()
    folders = {}
    for fmt in ("low_rank", "onnx"):
        off = ex.build_offline(old, "best", fmt)
        built = ex.build(session, session.model, fmt, base_name="bare")  # no metadata at all
        for tag, data, name, code in (("offline", off.data, off.file_name, off.snippet),
                                      ("bare", built.data, built.file_name, built.snippet)):  # fmt: skip
            folder = tmp_path / f"{fmt}-{tag}"
            folder.mkdir()
            (folder / name).write_bytes(data)
            code += "\nimport numpy\n\nnumpy.save('x.npy', numpy.asarray(x))\n"
            (folder / "use.py").write_text(code + "numpy.save('pred.npy', numpy.asarray(pred))\n")
            folders[folder] = model if tag == "offline" else session.model.eval()
    run_in_fresh_process(folders, tmp_path)
    for folder, net in folders.items():
        x = torch.from_numpy(np.load(folder / "x.npy"))
        with torch.no_grad():
            want = net(x).argmax(1).numpy()
        np.testing.assert_array_equal(np.load(folder / "pred.npy"), want, err_msg=folder.name)
