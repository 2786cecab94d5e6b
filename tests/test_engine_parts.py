"""The engine's pieces on their own: config metadata and bounds, init_from, the checkpoint
transaction, the spectra worker."""

import dataclasses
import math
import pickle

import pytest
import torch
from torch import nn

import lorita as lt
from lorita.engine import checkpoint
from lorita.engine.config import TrainConfig
from lorita.engine.optim import make_optimizer, make_scheduler
from lorita.engine.spectra_worker import SpectraWorker
from lorita.spectra import layer_matrix

KINDS = {"int", "float", "bool", "str", "dict", "list"}
WITH = {"plain_epochs": {"epochs": 10_000}}  # its bound depends on another field


def test_every_field_carries_help_kind_and_bounds():
    for f in dataclasses.fields(TrainConfig):
        md = f.metadata
        assert md["help"] and md["kind"] in KINDS, f.name
        if md["kind"] in ("int", "float"):
            assert math.isfinite(md["min"]) and math.isfinite(md["max"]), f.name


@pytest.mark.parametrize(
    "name",
    [f.name for f in dataclasses.fields(TrainConfig) if f.metadata["kind"] in ("int", "float")],
)
def test_numeric_fields_refuse_out_of_range_values_by_name(name):
    md = next(f.metadata for f in dataclasses.fields(TrainConfig) if f.name == name)
    for bad in (md["max"] * 10 + 1, md["min"] - 1, float("nan"), float("inf"), True, "3"):
        with pytest.raises(ValueError, match=f"^{name}: ") as err:
            TrainConfig(**{name: bad})
        if md["kind"] == "int":  # the range in whole numbers, not 4.29497e+09
            assert f"{md['min']}, {md['max']}" in str(err.value)
    top = md["max"] if not md.get("max_open") else md["min"] + 1e-3
    TrainConfig(**{name: top, **WITH.get(name, {})})


def test_strings_and_lists_are_checked():
    for kw, field in [
        ({"device": ""}, "device"),
        ({"init": ""}, "init"),
        ({"init_from": ""}, "init_from"),
        ({"skip": [""]}, "skip"),
        ({"model_kwargs": {str(i): i for i in range(100)}}, "model_kwargs"),
        ({"dataset_kwargs": [1]}, "dataset_kwargs"),
    ]:
        with pytest.raises(ValueError, match=f"^{field}: "):
            TrainConfig(**kw)
    assert TrainConfig(skip="fc1").skip == ["fc1"]


def test_init_from_loads_the_plain_weights_before_composing(tmp_path):
    base = TrainConfig(model_kwargs={"width": 16}, epochs=1, n_factors=1, seed=5)
    splits = lt.load_splits(base)
    plain = lt.build_model(base, splits)  # N=1: the plain model itself
    sd = {k: v.clone() for k, v in plain.state_dict().items()}
    torch.save(sd, tmp_path / "w.pt")
    lt.save(plain, tmp_path / "w.safetensors")
    from safetensors.torch import save_file

    save_file(sd, str(tmp_path / "raw.safetensors"))
    for path in (tmp_path / "w.pt", tmp_path / "raw.safetensors"):
        cfg = TrainConfig(model_kwargs={"width": 16}, n_factors=3, seed=0, init_from=str(path))
        merged = lt.merge_model(lt.build_model(cfg, splits))
        for k, v in merged.state_dict().items():
            torch.testing.assert_close(v, sd[k], rtol=1e-4, atol=1e-5)
    wrong = TrainConfig(model_kwargs={"width": 8}, init_from=str(tmp_path / "w.pt"))
    with pytest.raises(ValueError, match="init_from: .*shape"):
        lt.build_model(wrong, splits)
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(_Boom(), protocol=2))
    for path in (evil, tmp_path / "missing.pt"):
        with pytest.raises(ValueError, match="init_from"):
            lt.build_model(TrainConfig(model_kwargs={"width": 16}, init_from=str(path)), splits)


def test_init_from_reads_the_checkpoints_people_have(tmp_path):
    """A DistributedDataParallel or torch.compile state_dict, a checkpoint dict, and a model
    saved by lorita.save (composed and cut) all start the run from their weights; a whole
    pickled model and a file saved with BatchNorm folded are refused with what to do."""
    base = TrainConfig(model_kwargs={"width": 16}, epochs=1, n_factors=1, seed=5)
    splits = lt.load_splits(base)
    plain = lt.build_model(base, splits)
    sd = {k: v.clone() for k, v in plain.state_dict().items()}
    files = {
        "ddp.pt": {f"module.{k}": v for k, v in sd.items()},
        "compiled.pt": {f"_orig_mod.{k}": v for k, v in sd.items()},
        "ckpt.pt": {"model": sd, "epoch": torch.tensor(3)},
        "ckpt2.pt": {"model_state_dict": sd, "optimizer": {"lr": 0.1}},
    }
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)

    def start(path, n=3):
        cfg = TrainConfig(model_kwargs={"width": 16}, n_factors=n, seed=0, init_from=str(path))
        return lt.merge_model(lt.build_model(cfg, splits)).state_dict()

    for name in files:
        got = start(tmp_path / name)
        for k, v in sd.items():
            torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-5, msg=name)
    # a LoRITa file: composed, then cut to thin layers; the run starts from the cut's function
    composed = lt.overparameterize(plain, 3)
    cut = lt.truncate(composed, lt.Uniform(0.25))
    lt.save(cut, tmp_path / "cut.safetensors")
    want = lt.merge_model(cut).state_dict()
    got = start(tmp_path / "cut.safetensors", n=1)
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-5)
    lt.save(cut, tmp_path / "folded.safetensors", fold_bn=True, input_shape=[1, 8, 8])
    torch.save(plain, tmp_path / "whole.pt")
    torch.save({"weights": [1, 2]}, tmp_path / "odd.pt")
    refusals = {
        "folded.safetensors": "--no-fold-bn",
        "whole.pt": "model.state_dict()",
        "odd.pt": "keys: weights",
    }
    for name, needle in refusals.items():
        with pytest.raises(ValueError, match="init_from") as e:
            start(tmp_path / name)
        assert needle in str(e.value), str(e.value)
    torch.save({f"x.{k}": v for k, v in sd.items()}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="missing from the file: 'fc1.*not in the model: 'x.fc1"):
        start(tmp_path / "other.pt")


def test_init_from_pretrained_for_other_classes_starts_only_the_output_layer_fresh(tmp_path):
    """An ImageNet-style checkpoint (another number of classes): every layer but the output
    layer starts from the file, which the run says; a different hidden shape is refused."""
    from lorita.engine.preflight import check_model

    base = TrainConfig(model_kwargs={"width": 16}, epochs=1, n_factors=1, seed=5)
    splits = lt.load_splits(base)
    plain = lt.build_model(base, splits)
    sd = {k: v.clone() for k, v in plain.state_dict().items()}
    head = [k for k in sd if k.endswith(".weight")][-1].rsplit(".", 1)[0]
    pretrained = dict(sd)
    pretrained[f"{head}.weight"] = torch.randn(1000, sd[f"{head}.weight"].shape[1])
    pretrained[f"{head}.bias"] = torch.randn(1000)
    torch.save(pretrained, tmp_path / "imagenet.pt")
    cfg = TrainConfig(
        model_kwargs={"width": 16}, n_factors=3, init_from=str(tmp_path / "imagenet.pt")
    )
    check_model(cfg)  # the check before a run passes too
    model = lt.build_model(cfg, splits)
    assert f"{head!r} has 1000 outputs in the file and 10" in model.lorita_init_note
    got = lt.merge_model(model).state_dict()
    for k, v in sd.items():
        if not k.startswith(head + "."):
            torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-5)
    assert got[f"{head}.weight"].shape == (10, sd[f"{head}.weight"].shape[1])
    wider = dict(pretrained)
    wider[f"{head}.weight"] = torch.randn(1000, 7)  # its inputs differ too: not a new head
    torch.save(wider, tmp_path / "wider.pt")
    with pytest.raises(ValueError, match="init_from: .*shape"):
        check_model(TrainConfig(model_kwargs={"width": 16}, init_from=str(tmp_path / "wider.pt")))
    plain_cfg = TrainConfig(model_kwargs={"width": 16}, n_factors=1)
    assert lt.build_model(plain_cfg, splits).lorita_init_note is None
    # a run keeps the note in its status (the Train page shows it)
    run = lt.RunStore(tmp_path / "runs").create(
        {**cfg.to_dict(), "max_steps": 1, "spectra_every": 0}, name="pre"
    )
    lt.train(run.config, run, threads=1)
    assert "starts from a fresh init" in run.status()["note"]


def test_init_from_a_lorita_file_for_other_classes_starts_only_the_output_layer_fresh(
    tmp_path,
):
    """A composed or cut model saved by lorita (a run's checkpoint, an export) for another
    number of classes: its merged weights start every layer but the output layer, as a plain
    state_dict does."""
    base = TrainConfig(model_kwargs={"width": 16}, epochs=1, n_factors=1, seed=5)
    splits = lt.load_splits(base)
    other = lt.create_model("mlp", in_channels=1, image_size=8, num_classes=3, width=16)
    composed = lt.overparameterize(other, 3)
    for name, model in (("composed", composed), ("cut", lt.truncate(composed, lt.Uniform(0.5)))):
        path = lt.save(model, tmp_path / f"{name}.safetensors")
        cfg = TrainConfig(model_kwargs={"width": 16}, n_factors=3, init_from=str(path))
        built = lt.build_model(cfg, splits)
        assert "has 3 outputs in the file and 10" in built.lorita_init_note, name
        got = lt.merge_model(built).state_dict()
        want = lt.merge_model(model).state_dict()
        for k, v in want.items():
            if not k.startswith("head."):  # the MLP's output layer
                torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-5)


class _Boom:
    def __reduce__(self):
        return (print, ("code ran",))


def _model_and_opt():
    torch.manual_seed(0)
    model = lt.overparameterize(
        torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3)), 2
    )
    opt = make_optimizer("adam", model.parameters(), 1e-2, 1e-3, 0.9)
    sched = make_scheduler("cosine", opt, 10)
    for _ in range(3):
        model(torch.randn(4, 6)).sum().backward()
        opt.step()
        sched.step()
    return model, opt, sched


def test_checkpoint_round_trip_and_only_complete_folders_count(tmp_path):
    model, opt, sched = _model_and_opt()
    counters = {"step": 3, "epoch": 0}
    rng = {"torch": torch.get_rng_state()}
    first = checkpoint.save(tmp_path, model, opt, sched, counters=counters, rng=rng, meta={})
    second = checkpoint.save(
        tmp_path, model, opt, sched, counters={"step": 4}, rng=rng, meta={"step": 4}
    )
    assert not first.exists() and checkpoint.latest(tmp_path) == second  # pruned after
    assert lt.read_spec(tmp_path / "last.safetensors")["metadata"]["step"] == 4

    fresh, opt2, sched2 = _model_and_opt()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    got, rng2 = checkpoint.load(second, fresh, opt2, sched2)
    assert got == {"step": 4} and torch.equal(rng2["torch"], rng["torch"])
    for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    a, b = opt2.state_dict(), opt.state_dict()
    assert a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys()
    for i, st in b["state"].items():
        assert all(torch.equal(a["state"][i][k], v) for k, v in st.items())
    assert sched2.state_dict() == sched.state_dict()

    # a folder whose files do not match its manifest (or with none) is never resumed from
    (tmp_path / "ckpt-000009").mkdir()
    (tmp_path / "ckpt-000010").mkdir()
    for name in ("model.safetensors", "state.safetensors", "manifest.json"):
        (tmp_path / "ckpt-000010" / name).write_bytes((second / name).read_bytes())
    with open(tmp_path / "ckpt-000010" / "state.safetensors", "ab") as f:
        f.write(b"x")
    assert checkpoint.latest(tmp_path) == second


def test_spectra_worker_gives_each_layers_singular_values_in_order():
    model, _, _ = _model_and_opt()
    worker = SpectraWorker()
    try:
        for step in range(4):
            worker.submit(model, step, 0)
        out = worker.results(wait=True)
    finally:
        worker.close()
    assert [r[0] for r in out] == [0, 1, 2, 3]
    for name, layer in lt.iter_layers(model):
        want = torch.linalg.svdvals(layer_matrix(layer).float())
        torch.testing.assert_close(out[-1][2][name], want)


def test_model_options_default_to_the_models_own():
    """The classroom MLP's width is not forced on another model (a form that switches model)."""
    from lorita.engine import TrainConfig
    from lorita.engine.config import CLASSROOM_MODEL_KWARGS

    assert TrainConfig().model_kwargs == CLASSROOM_MODEL_KWARGS["mlp"]
    for name in ("vgg", "resnet20", "vit"):
        assert TrainConfig(model=name).model_kwargs == {}
        assert TrainConfig.from_dict({"model": name}).model_kwargs == {}
    assert TrainConfig(model="mlp", model_kwargs={}).model_kwargs == {}  # given: kept as given


def test_side_classifier_outputs_train_and_evaluate_on_the_main_logits():
    from collections import namedtuple

    from lorita.engine.evaluate import evaluate
    from lorita.engine.optim import AUX_WEIGHT, loss_fn, main_output

    Out = namedtuple("Out", "logits aux2 aux1")  # GoogLeNet's outputs in train mode
    torch.manual_seed(0)
    main, a2, a1, y = (
        torch.randn(4, 3),
        torch.randn(4, 3),
        torch.randn(4, 3),
        torch.tensor([0, 1, 2, 0]),
    )
    ce = torch.nn.functional.cross_entropy
    want = ce(main, y) + AUX_WEIGHT * (ce(a2, y) + ce(a1, y))
    loss = loss_fn("classification")
    torch.testing.assert_close(loss(Out(main, a2, a1), y), want)
    torch.testing.assert_close(loss(Out(main, None, a1), y), ce(main, y) + AUX_WEIGHT * ce(a1, y))
    torch.testing.assert_close(
        loss({"aux": a1, "logits": main}, y), ce(main, y) + AUX_WEIGHT * ce(a1, y)
    )
    torch.testing.assert_close(loss((main, torch.randn(4, 7)), y), ce(main, y))  # not a classifier
    assert main_output(main) is main and main_output({"out": a1, "x": a2}) is a1
    with pytest.raises(ValueError, match="model output: expected a tensor"):
        loss("logits", y)

    class Dict(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(64, 10)

        def forward(self, x):
            return {"logits": self.fc(x.flatten(1)), "features": x}

    splits = lt.load_splits(TrainConfig())
    assert 0 <= evaluate(Dict(), splits.val)["acc"] <= 1


def _image_folder(root):
    from PIL import Image

    rng = torch.Generator().manual_seed(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(6):
            arr = torch.randint(0, 255, (20, 20, 3), generator=rng, dtype=torch.uint8).numpy()
            Image.fromarray(arr).save(root / c / f"{i}.png")
    return root


def test_googlenet_trains_with_its_side_classifiers(tmp_path):
    cfg = TrainConfig(
        model="torchvision:googlenet", dataset=f"folder:{_image_folder(tmp_path / 'imgs')}",
        dataset_kwargs={"size": 32}, n_factors=1, batch_size=4, epochs=1, spectra_every=0,
    )  # fmt: skip
    run = lt.RunStore(tmp_path / "runs").create(cfg.to_dict(), name="g")
    lt.train(run.config, run, threads=1)
    assert run.status()["state"] == "completed"


def test_a_model_too_big_for_the_images_is_refused_before_the_run_with_the_size_it_needs(
    tmp_path,
):
    from lorita.engine.preflight import check_start

    folder = f"folder:{_image_folder(tmp_path / 'imgs')}"
    cfg = TrainConfig(model="torchvision:alexnet", dataset=folder, dataset_kwargs={"size": 32})
    with pytest.raises(ValueError, match=r"^model: 'torchvision:alexnet' does not run on the "
                       r"3x32x32 images of .*it runs from 64 px: .*size=64"):  # fmt: skip
        check_start(cfg)
    check_start(dataclasses.replace(cfg, dataset_kwargs={"size": 64}))
    with pytest.raises(ValueError, match="1x8x8 images of 'digits'.*pick a model built for"):
        check_start(TrainConfig(model="torchvision:alexnet"))
    check_start(TrainConfig(model="torchvision:resnet18"))  # runs on 8 px digits


def test_init_from_refuses_files_that_would_train_nothing_with_the_reason(tmp_path):
    from lorita.engine.build import check_weights, read_weights

    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    sd = net.state_dict()
    floats = {k: v for k, v in sd.items() if v.is_floating_point()}
    files = {
        "nan.pt": (
            {**sd, **{k: v * float("nan") for k, v in floats.items()}},
            "holds NaN or infinity",
        ),
        "int.pt": ({**sd, **{k: v.long() for k, v in floats.items()}}, "holds int64 values"),
        "sparse.pt": ({**sd, "0.weight": sd["0.weight"].to_sparse()}, "is not a dense tensor"),
    }
    for name, (state, why) in files.items():
        torch.save(state, tmp_path / name)
        with pytest.raises(ValueError, match=f"init_from: '0.weight'.*{why}"):
            check_weights(net, read_weights(tmp_path / name, net))
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("hello")
    lt.export_onnx(net.eval(), torch.randn(2, 4), tmp_path / "m.onnx")
    for name, why in (
        ("empty.pt", "is empty"),
        ("notes.txt", "is neither a safetensors file nor a PyTorch state_dict"),
        ("m.onnx", "is an ONNX model, which cannot be trained from"),
    ):
        with pytest.raises(ValueError, match=f"init_from: '.*{name}' {why}"):
            read_weights(tmp_path / name, net)


def test_an_unreadable_starting_weights_file_is_described_in_plain_words(tmp_path):
    """A text file renamed .pt, a torch.save archive or a legacy pickle cut in half, a broken
    safetensors header, random bytes: each says what the file looks like, in one line."""
    from safetensors.torch import save_file

    from lorita.engine.build import read_weights

    sd = {"w": torch.randn(64, 64)}
    torch.save(sd, tmp_path / "zip.pt")
    torch.save(sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    save_file(sd, str(tmp_path / "w.safetensors"))
    (tmp_path / "text.pt").write_text("hello\n")
    (tmp_path / "random.pt").write_bytes(bytes(range(256)) * 4)
    for name in ("zip.pt", "legacy.pt", "w.safetensors"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / f"cut-{name}").write_bytes(
            data[: len(data) // 2 if "safet" not in name else 60]
        )
    for name, why in (
        ("text.pt", "its first bytes are those of neither format$"),
        ("random.pt", "its first bytes are those of neither format$"),
        ("cut-zip.pt", r"a zip archive \(torch.save's format\) that is damaged or cut short \("),
        ("cut-legacy.pt", r"a pickle stream that is damaged or cut short \(RuntimeError: "),
        ("cut-w.safetensors", "its safetensors header is damaged or the file is cut short"),
    ):
        with pytest.raises(ValueError, match=f"nor a PyTorch state_dict: {why}") as got:
            read_weights(tmp_path / name)
        assert "\n" not in str(got.value) and len(str(got.value)) < 300


def test_options_text_reads_back_what_it_writes_and_names_its_field():
    from lorita.engine.config import format_options, parse_options

    cases = [
        {},
        {"size": 64, "channels": 1},
        {"layers": [1, 2], "cfg": {"k": [1, 2]}, "on": True, "none": None, "p": 0.5},
        {"name": "hello world", "digits": "12", "comma": "a,b", "quote": 'say "x"', "s": "it's"},
    ]
    for options in cases:
        assert parse_options(format_options(options), "x") == options
    assert parse_options("a=1\nb=[1, 2], c=x", "x") == {"a": 1, "b": [1, 2], "c": "x"}
    assert parse_options(["a=1", "b=two words"], "x") == {"a": 1, "b": "two words"}
    for text, said in [
        ("a", "model options: expected key=value, got 'a'"),
        ("1a=2", "'1a' is not an option name"),
        ("a=", "a= has an empty value"),
        (",".join(f"k{i}=1" for i in range(65)), "65 options given; at most 64"),
        ("a=" + "[" * 5000 + "]" * 5000, "nested too deeply"),
        ("a=" + "1" * 30_000, "characters; at most"),
    ]:
        with pytest.raises(ValueError, match="model options: ") as err:
            parse_options(text, "model options")
        assert said in str(err.value)


def test_check_start_refuses_skip_patterns_and_plain_epochs_a_run_would_find_too_late():
    """The check before any run folder exists (the command line's and the Train page's):
    a skip pattern that names no layer, plain epochs that max_steps would cut short."""
    from lorita.engine.preflight import check_start

    with pytest.raises(ValueError, match="^skip: pattern 'zzz' matches no layer"):
        check_start(TrainConfig(skip=["zzz"]))
    check_start(TrainConfig(skip=["fc1"], n_factors=3))
    with pytest.raises(ValueError, match=r"^plain_epochs: 1 plain epoch takes \d+ steps, but "):
        check_start(TrainConfig(n_factors=3, epochs=2, plain_epochs=1, max_steps=5))
    check_start(TrainConfig(n_factors=3, epochs=2, plain_epochs=1, max_steps=1000))
    assert TrainConfig(batch_size=0).batch_for(cuda=False) == 128
    assert TrainConfig(batch_size=0).batch_for(cuda=True) == 512
    assert TrainConfig(batch_size=32).batch_for(cuda=True) == 32


def test_a_model_whose_builder_cannot_run_on_the_meta_device_passes_the_start_check():
    """torchvision's RegNets compute their widths with tensors: the size check's meta build
    cannot tell, and the check leaves them to the real build instead of refusing them."""
    from lorita.engine import preflight

    cfg = TrainConfig(model="torchvision:regnet_y_400mf", dataset="digits", max_steps=1)
    preflight.check_start(cfg)


def test_init_from_files_people_have(tmp_path):
    """Files as engineers really have them: a torch.save file named .safetensors (torch.load
    itself would read the name), a lorita file named otherwise, BatchNorm step counts left
    out (torch's strict load fills them in), float8 values; a file of meta tensors is named."""
    from safetensors.torch import save_file

    from lorita.engine.build import read_weights
    from lorita.engine.preflight import check_model

    base = TrainConfig(model_kwargs={"width": 16}, n_factors=1, seed=3)
    splits = lt.load_splits(base)
    plain = lt.build_model(base, splits)
    sd = {k: v.clone().contiguous() for k, v in plain.state_dict().items()}
    assert any(k.endswith("num_batches_tracked") for k in sd)

    def starts(path):
        cfg = TrainConfig(model_kwargs={"width": 16}, n_factors=3, init_from=str(path))
        check_model(cfg)
        got = lt.merge_model(lt.build_model(cfg, splits)).state_dict()
        torch.testing.assert_close(got["fc1.weight"], sd["fc1.weight"], rtol=1e-4, atol=1e-5)

    torch.save(sd, tmp_path / "pt_named.safetensors")
    starts(tmp_path / "pt_named.safetensors")
    lt.save(lt.overparameterize(plain, 3), tmp_path / "composed.st")
    starts(tmp_path / "composed.st")
    torch.save({k: v for k, v in sd.items() if "num_batches_tracked" not in k}, tmp_path / "nbt.pt")
    starts(tmp_path / "nbt.pt")
    eight = {k: v.to(torch.float8_e4m3fn) if v.is_floating_point() else v for k, v in sd.items()}
    save_file(eight, str(tmp_path / "fp8.safetensors"))
    assert read_weights(tmp_path / "fp8.safetensors")["fc1.weight"].dtype == torch.float8_e4m3fn
    torch.save({k: torch.empty_like(v, device="meta") for k, v in sd.items()}, tmp_path / "m.pt")
    with pytest.raises(ValueError, match=r"init_from: .* is a tensor without values"):
        read_weights(tmp_path / "m.pt")


def test_init_from_refuses_independent_factors_that_would_discard_it():
    with pytest.raises(
        ValueError, match=r"init: 'independent' is not allowed; expected 'balanced'"
    ):
        TrainConfig(n_factors=3, init="independent", init_from="x.pt")
    TrainConfig(n_factors=3, init="independent", init_from="x.pt", plain_epochs=1, epochs=2)
    TrainConfig(n_factors=1, init="independent", init_from="x.pt")


def test_init_from_an_imagenet_googlenet_refits_its_side_classifiers_too():
    """GoogLeNet's (and Inception v3's) side classifiers also end in 1000 outputs: they start
    fresh with the main one, named in the note."""
    import torchvision

    from lorita.engine.build import check_weights, fit_head

    model = torchvision.models.googlenet(num_classes=3, aux_logits=True, init_weights=False)
    imagenet = torchvision.models.googlenet(num_classes=1000, aux_logits=True, init_weights=False)
    kept, note = fit_head(model, imagenet.state_dict())
    check_weights(model, kept)
    assert "'fc', 'aux1.fc2', 'aux2.fc2' have 1000 outputs in the file and 3" in note
    sd = imagenet.state_dict()
    sd["conv1.conv.weight"] = sd["conv1.conv.weight"][:32]  # a hidden layer differs: refused
    assert fit_head(model, sd)[1] is None


def test_init_from_a_lightning_file_with_other_tensors_names_only_those(tmp_path):
    """``model.*`` keys beside a loss's ``criterion.weight``: the prefix is stripped from the
    keys that carry it, and the error names the one tensor that is not the model's (before,
    every key was listed as missing or extra)."""
    from lorita.engine.build import check_weights, read_weights

    base = TrainConfig(model_kwargs={"width": 16}, n_factors=1)
    plain = lt.build_model(base, lt.load_splits(base))
    sd = {f"model.{k}": v for k, v in plain.state_dict().items()}
    torch.save({"state_dict": {**sd, "criterion.weight": torch.ones(10)}}, tmp_path / "l.ckpt")
    got = read_weights(tmp_path / "l.ckpt", plain)
    with pytest.raises(ValueError, match=r"\(not in the model: 'criterion.weight'\)$"):
        check_weights(plain, got)
    torch.save({"state_dict": sd}, tmp_path / "clean.ckpt")
    check_weights(plain, read_weights(tmp_path / "clean.ckpt", plain))


def test_init_from_names_the_python_object_beside_the_weights_and_takes_an_ema_alone(tmp_path):
    import argparse

    from lorita.engine.build import read_weights

    w = {"w": torch.zeros(2)}
    torch.save({"state_dict": w, "args": argparse.Namespace(lr=0.1)}, tmp_path / "timm.pth")
    with pytest.raises(ValueError, match=r"holds Python objects \(argparse.Namespace\)"):
        read_weights(tmp_path / "timm.pth")
    torch.save({"state_dict_ema": w}, tmp_path / "ema.pth")
    assert set(read_weights(tmp_path / "ema.pth")) == {"w"}
    torch.save({"state_dict": w, "state_dict_ema": {"v": torch.ones(2)}}, tmp_path / "both.pth")
    assert set(read_weights(tmp_path / "both.pth")) == {"w"}  # the trained weights first


def test_init_from_a_backbone_without_its_head_starts_the_head_fresh(tmp_path):
    """A file without the output layer (a backbone saved headless) loads every other layer;
    the head starts fresh and the note says so. Any other missing layer is still refused."""
    from lorita.engine.preflight import check_model

    base = TrainConfig(model_kwargs={"width": 16}, n_factors=1, seed=2)
    splits = lt.load_splits(base)
    sd = lt.build_model(base, splits).state_dict()
    head = [k for k in sd if k.endswith(".weight")][-1].rsplit(".", 1)[0]
    torch.save({k: v for k, v in sd.items() if not k.startswith(head + ".")}, tmp_path / "bb.pt")
    cfg = TrainConfig(model_kwargs={"width": 16}, n_factors=3, init_from=str(tmp_path / "bb.pt"))
    assert f"{head!r} is not in the file" in check_model(cfg)
    got = lt.merge_model(lt.build_model(cfg, splits)).state_dict()
    torch.testing.assert_close(got["fc1.weight"], sd["fc1.weight"], rtol=1e-4, atol=1e-5)
    torch.save({k: v for k, v in sd.items() if not k.startswith("fc1.")}, tmp_path / "no1.pt")
    with pytest.raises(ValueError, match=r"missing from the file: 'fc1.weight'"):
        check_model(TrainConfig(model_kwargs={"width": 16}, init_from=str(tmp_path / "no1.pt")))


def test_a_resumed_optimizer_holds_no_view_of_its_checkpoint_file(tmp_path):
    """safetensors maps a file into memory: the optimizer's state read from it was a view of
    the file, so a file rewritten in place (same size here; shorter, and the next step ends
    the process with a bus error) changed the resumed optimizer's moments under it."""
    model, opt, sched = _model_and_opt()
    saved = checkpoint.save(tmp_path, model, opt, sched, counters={"step": 3}, rng={}, meta={})
    fresh, opt2, sched2 = _model_and_opt()
    checkpoint.load(saved, fresh, opt2, sched2)
    state = saved / "state.safetensors"
    raw = state.read_bytes()
    head = 8 + int.from_bytes(raw[:8], "little")
    with open(state, "r+b") as f:  # the tensors' bytes zeroed in place, the header kept
        f.seek(head)
        f.write(bytes(len(raw) - head))
    for i, st in opt.state_dict()["state"].items():
        got = opt2.state_dict()["state"][i]
        assert all(torch.equal(got[k], v) for k, v in st.items() if torch.is_tensor(v))
