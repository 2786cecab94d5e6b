"""Hostile or damaged files that cross a trust boundary: a run folder's JSON files and model
files edited, cut short or replaced. Each is refused with a ValueError (the command line: exit
2 and one line) naming the file or field and what is allowed, never a raw traceback."""

from __future__ import annotations

import json

import pytest

import lorita as lt
from lorita.runs import RunStore

DIGITS = {"dataset": "digits", "dataset_kwargs": {}, "model": "mlp", "n_factors": 3}


def _run(tmp_path, **config):
    store = RunStore(tmp_path)
    run = store.create({**DIGITS, **config}, name="r")
    run.update_status(state="completed")
    return run


# --------------------------------------------------------------------------- run folders


@pytest.mark.parametrize("kwargs", [[1], "size=64", 3, True])
def test_dataset_options_that_are_not_an_object_are_named(tmp_path, kwargs):
    """config.json's dataset_kwargs edited into a list or text: load_dataset(**kwargs) would
    raise a TypeError; the run's data is refused naming the field instead."""
    run = _run(tmp_path, dataset_kwargs=kwargs)
    with pytest.raises(ValueError, match="dataset_kwargs"):
        run.load_splits()
    assert run.data_changed() is None  # (what it compares cannot be read: nothing to say)


@pytest.mark.parametrize("seed", [None, [1], {"a": 1}, "0", 1.5, 10**30, -1])
def test_a_split_seed_that_is_not_an_integer_is_named(tmp_path, seed):
    run = _run(tmp_path, split_seed=seed)
    with pytest.raises(ValueError, match="seed"):
        run.load_splits()
    with pytest.raises(ValueError, match="seed"):
        lt.load_dataset("digits", seed=seed)


def test_a_kept_data_digest_beside_a_config_without_a_dataset_says_nothing(tmp_path):
    """extra/data.json and config.json both without a dataset (edited, or damaged): nothing
    to compare, rather than a KeyError."""
    run = _run(tmp_path)
    (run.path / "config.json").write_text(json.dumps({"model": "mlp"}))
    run.write_extra("data", {})
    assert run.data_changed() is None


def _huge_line(n: int) -> bytes:
    """One JSON-object line of about ``n`` bytes (what an edited or damaged log may hold)."""
    return b'{"step": 1, "split": "val", "acc": 0.5, "x": [' + b"1," * (n // 2) + b"1]}"


def test_a_log_line_over_the_limit_is_skipped_without_reading_it_whole(tmp_path, monkeypatch):
    """metrics.jsonl / spectra.jsonl with an enormous line (hundreds of MB: a run listing read
    it whole, 2 GB of memory for 300 MB): a line over MAX_LINE_BYTES is skipped as a broken one
    is, by every reader, holding at most that much of it; the lines around it are read."""
    from lorita import io as lio

    monkeypatch.setattr(lio, "MAX_LINE_BYTES", 1000)
    good = b'{"step": 2, "split": "val", "acc": 0.7}\n'
    p = tmp_path / "metrics.jsonl"
    p.write_bytes(good + _huge_line(5000) + b"\n" + good)
    assert [r["step"] for r in lio.read_jsonl(p)] == [2, 2]
    rows, offset = lio.read_jsonl_from(p)
    assert [r["step"] for r in rows] == [2, 2] and offset == p.stat().st_size
    assert lio.read_last_jsonl(p) == {"step": 2, "split": "val", "acc": 0.7}
    p.write_bytes(good + _huge_line(5000) + b"\n")  # the huge line last
    assert lio.read_last_jsonl(p) is None or lio.read_last_jsonl(p)["step"] == 2
    p.write_bytes(_huge_line(5000))  # no end of line (being written, or cut short)
    assert lio.read_jsonl(p) == [] and lio.read_last_jsonl(p) is None
    assert lio.read_jsonl_from(p) == ([], 0)
    seen = []
    real_loads = lio._loads_row
    monkeypatch.setattr(lio, "_loads_row", lambda line: seen.append(len(line)) or real_loads(line))
    p.write_bytes(good + _huge_line(5000) + b"\n" + good)
    lio.read_jsonl(p), lio.read_jsonl_from(p), lio.read_last_jsonl(p)
    assert seen and max(seen) <= 1000  # never parsed whole


# --------------------------------------------------------------------------- model files


def _saved(tmp_path, edit, model=None):
    """A file written by lorita.save, its spec changed by ``edit`` (as an editor could)."""
    import struct

    model = model or lt.create_model("mlp", in_channels=1, image_size=4, num_classes=3, width=8)
    path = tmp_path / "m.safetensors"
    lt.save(model, path)
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    spec = json.loads(header["__metadata__"]["lorita_spec"])
    edit(spec)
    header["__metadata__"]["lorita_spec"] = json.dumps(spec)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n :])
    return path


def test_metadata_nested_too_deep_to_copy_is_refused_naming_it(tmp_path):
    """A spec's metadata nested 900 deep parsed, and the model loaded holding it; every later
    copy of the model (merge_model, truncate, --init-from) then died of a RecursionError."""
    path = _saved(tmp_path, lambda s: s["metadata"].update(x=json.loads("[" * 900 + "]" * 900)))
    for read in (lt.read_spec, lt.load):
        with pytest.raises(ValueError, match=r"spec\.metadata.*nested"):
            read(path)
    fine = _saved(tmp_path, lambda s: s["metadata"].update(x={"a": [[{"b": [1]}]]}))
    assert lt.read_spec(fine)["metadata"]["x"] == {"a": [[{"b": [1]}]]}


def test_an_image_size_no_weight_backs_is_refused_before_an_input_is_made(tmp_path):
    """A convolutional model's image_size shapes no weight: a file could declare 10**5 where
    one large tensor 'backed' it, and the example input made from it (zeros of 3 x size x size,
    for every export and cost count) would ask the allocator for 120 GB."""
    net = lt.create_model("resnet20", in_channels=1, image_size=8, num_classes=6000, width=4)
    path = _saved(tmp_path, lambda s: s["arch"]["kwargs"].update(image_size=6000), net)
    with pytest.raises(ValueError, match=r"image_size"):
        lt.load(path)
    ok = _saved(tmp_path, lambda s: s["arch"]["kwargs"].update(image_size=64), net)
    assert lt.load(ok).lorita_input_shape == (1, 64, 64)


def test_a_pipe_or_a_link_loop_offered_as_a_model_file_says_what_it_is(tmp_path):
    """Neither is 'no such file': a pipe would block a reader, a loop cannot be followed."""
    import os

    pipe, loop = tmp_path / "pipe.safetensors", tmp_path / "loop.safetensors"
    os.mkfifo(pipe)
    loop.symlink_to(loop)
    for read in (lt.read_spec, lt.load):
        with pytest.raises(ValueError, match=r"not a regular file \(a pipe or a device\)"):
            read(pipe)
        with pytest.raises(ValueError, match=r"cannot read .*symbolic links"):
            read(loop)
        with pytest.raises(ValueError, match=r"no such file"):
            read(tmp_path / "missing.safetensors")


def test_a_checkpoints_recorded_preprocessing_and_accuracy_of_the_wrong_kind_are_unknown(tmp_path):
    """A checkpoint edited to say preprocess "x" and val_acc "high": read as not recorded
    (None), never passed on into exported files or shown as a score."""
    net = lt.create_model("mlp", in_channels=1, image_size=8, num_classes=10, width=8)
    run = _run(tmp_path)
    run.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    lt.save(net, run.checkpoint("best"), input_shape=[1, 8, 8],
            metadata={"preprocess": "x", "val_acc": "high"})  # fmt: skip
    assert run.preprocess("best") is None
    assert run.as_trained("best")[2] is None
