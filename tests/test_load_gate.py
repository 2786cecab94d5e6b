"""lorita.load as a gate: a corpus of hostile or broken model files, each refused with a
ValueError naming the field, in under 100 ms of CPU time and under 50 MB of memory, before
anything the file's tensors do not back is allocated.

    python tests/test_load_gate.py     # prints the summary (count, slowest, largest)
"""

from __future__ import annotations

import gc
import json
import resource
import struct
import sys
import time
import tracemalloc

import pytest
import torch
from safetensors.torch import save as st_save
from torch import nn

import lorita as lt
from lorita.export import model_spec

MAX_S, MAX_MB = 0.100, 50.0


def _mlp():
    torch.manual_seed(0)
    return lt.create_model("mlp", in_channels=1, image_size=4, num_classes=3, width=8, depth=2)


def _seq():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))


def _state(model):
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def _file(spec, tensors) -> bytes:
    """A safetensors file with ``spec`` (any JSON value, or raw text) as the LoRITa spec."""
    text = spec if isinstance(spec, str) else json.dumps(spec)
    return st_save(tensors, metadata={"lorita_spec": text})


def _raw(header, data: bytes = b"") -> bytes:
    """A file from a header (dict, or raw text) and data bytes, with no checks."""
    if isinstance(header, bytes):
        b = header
    else:
        b = (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(b)) + b + data


MLP_SPEC = model_spec(_mlp())
SEQ_SPEC = model_spec(_seq())
MLP_T, SEQ_T = _state(_mlp()), _state(_seq())
GOOD = _file(MLP_SPEC, MLP_T)


def mlp(**changes):
    spec = json.loads(json.dumps(MLP_SPEC))
    for path, value in changes.items():
        *keys, last = path.split("__")
        node = spec
        for k in keys:
            node = node[k]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value
    return _file(spec, MLP_T)


def seq_tree(tree, tensors=None):
    spec = dict(SEQ_SPEC, arch={"tree": tree})
    return _file(spec, SEQ_T if tensors is None else tensors)


def seq_layers(layers, tensors=None):
    return _file(dict(SEQ_SPEC, layers=layers), SEQ_T if tensors is None else tensors)


_DELETE = object()


def _deep(n: int, leaf="1") -> str:
    return "[" * n + leaf + "]" * n


def _nested_seq_file(depth: int) -> bytes:
    """A Sequential tree nested ``depth`` deep, written as text (too deep for json.dumps)."""
    tree = '{"type": "Sequential", "children": [["a", ' * depth + '{"type": "ReLU"}' + "]]}" * depth
    text = json.dumps(dict(SEQ_SPEC, arch={"tree": "@"})).replace('"@"', tree)
    return _file(text, SEQ_T)


def _header_of(data: bytes) -> dict:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n])


def _with_header(data: bytes, edit) -> bytes:
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    edit(header)
    return _raw(header, data[8 + n :])


def _set_tensor(name, **fields):
    def edit(h):
        h[name].update(fields)

    return edit


LIN = "1.weight"  # the first Linear's weight in the Sequential file
SEQ_FILE = _file(SEQ_SPEC, SEQ_T)
CONV = {"in_channels": 1, "out_channels": 2, "kernel_size": 3}

CORPUS: dict[str, bytes] = {
    # --- the container
    "empty file": b"",
    "four bytes": b"\x01\x02\x03\x04",
    "header longer than the file": struct.pack("<Q", 10_000) + b"{}",
    "header length 2**63": struct.pack("<Q", 2**63) + b"{}",
    "header not utf-8": _raw(b"\xff\xfe{}"),
    "header not JSON": _raw("{this is not json"),
    "header a JSON list": _raw("[1, 2, 3]"),
    "header nested 100000 deep": _raw(_deep(100_000)),
    "no metadata": st_save({"w": torch.zeros(2)}),
    "metadata without spec": st_save({"w": torch.zeros(2)}, metadata={"other": "x"}),
    "spec a number in raw header": _raw({"__metadata__": {"lorita_spec": 5}}),
    "truncated data": GOOD[: len(GOOD) - 7],
    "truncated header": GOOD[:20],
    # --- the spec's JSON
    "spec not JSON": _file("{not json", MLP_T),
    "spec a list": _file([1, 2], MLP_T),
    "spec null": _file("null", MLP_T),
    "spec nested 1000000 deep": _file(_deep(1_000_000), MLP_T),
    "spec of 5 MB": _file(json.dumps(dict(MLP_SPEC, metadata={"x": "a" * 5_000_000})), MLP_T),
    "format wrong": mlp(format="pickle"),
    "version a string": mlp(version="1"),
    "unknown top-level key": _file({**MLP_SPEC, "__class__": "os.system"}, MLP_T),
    "arch missing": mlp(arch=_DELETE),
    "arch a string": mlp(arch="mlp"),
    "arch empty": mlp(arch={}),
    "n_factors a string": mlp(n_factors="3"),
    "n_factors 10**9": mlp(n_factors=10**9),
    "ranks not a dict": mlp(ranks=[1, 2]),
    "ranks a string value": mlp(ranks={"fc1": "all"}),
    "input_shape wrong": mlp(input_shape=[1, -4, 4]),
    "input_shape huge": mlp(input_shape=[10**9]),
    "metadata a list": mlp(metadata=[1]),
    "direct not a list": mlp(direct="fc1"),
    "direct of numbers": mlp(direct=[1, 2]),
    # --- registry models
    "registry name a number": mlp(arch__registry=7),
    "registry unknown name": mlp(arch__registry="alexnet"),
    "registry torchvision unknown": mlp(arch__registry="torchvision:nonexistent"),
    "registry path-like name": mlp(arch__registry="../../etc/passwd"),
    "registry width 1e9": mlp(arch__kwargs__width=10**9),
    "registry depth 1e6": mlp(arch__kwargs__depth=10**6),
    "registry width a float 1e9": mlp(arch__kwargs__width=1e9),
    "registry vit dim 1e9": mlp(arch__registry="vit", arch__kwargs={"dim": 10**9}),
    "registry vit depth 1e6": _file(
        {
            **MLP_SPEC,
            "arch": {
                "registry": "vit",
                "kwargs": {"in_channels": 1, "image_size": 4, "num_classes": 3, "depth": 10**6},
            },
        },
        MLP_T,
    ),  # fmt: skip
    "registry torchvision num_classes 1e9": mlp(
        arch={"registry": "torchvision:resnet18", "kwargs": {"num_classes": 10**9}}
    ),
    "registry injected kwarg": mlp(arch__kwargs__device="cuda"),
    "registry kwarg named __init__": mlp(arch__kwargs__bad={"__init__": 1}),
    "registry kwarg a dict": mlp(arch__kwargs__width={"a": 1}),
    "registry kwarg a long list": mlp(arch__kwargs__width=list(range(100))),
    "registry kwargs a list": mlp(arch__kwargs=[1]),
    "registry model disagrees with tensors": mlp(arch__kwargs__width=9),
    # --- module trees
    "tree unknown type": seq_tree({"type": "os.system", "kwargs": {}}),
    "tree type a number": seq_tree({"type": 3}),
    "tree Linear width 1e9": seq_tree(
        {
            "type": "Sequential",
            "children": [
                [
                    "0",
                    {
                        "type": "Linear",
                        "kwargs": {"in_features": 10**9, "out_features": 10**9, "bias": True},
                    },
                ]
            ],
        }
    ),  # fmt: skip
    "tree Linear width a string": seq_tree(
        {"type": "Linear", "kwargs": {"in_features": "16", "out_features": 8}}
    ),
    "tree Linear negative width": seq_tree(
        {"type": "Linear", "kwargs": {"in_features": -16, "out_features": 8}}
    ),
    "tree injected kwarg": seq_tree(
        {"type": "Linear", "kwargs": {"in_features": 16, "out_features": 8, "device": "meta"}}
    ),
    "tree unknown key": seq_tree({"type": "ReLU", "eval": "x"}),
    "tree children not a list": seq_tree({"type": "Sequential", "children": {"a": 1}}),
    "tree child not a pair": seq_tree({"type": "Sequential", "children": [["a"]]}),
    "tree child name traversal": seq_tree(
        {"type": "Sequential", "children": [["../x", {"type": "ReLU"}]]}
    ),
    "tree nested 1000 deep": _nested_seq_file(1000),
    "tree nested 40 deep": _nested_seq_file(40),
    "tree of 6000 nodes": seq_tree(
        {"type": "Sequential", "children": [[str(i), {"type": "ReLU"}] for i in range(6000)]}
    ),
    "tree of 30000 nodes": seq_tree(
        {"type": "Sequential", "children": [[str(i), {"type": "ReLU"}] for i in range(30_000)]}
    ),
    "tree of 2000 modules for 4 tensors": seq_tree(
        {"type": "Sequential", "children": [[str(i), {"type": "ReLU"}] for i in range(2000)]}
    ),
    # --- per-layer forms
    "layers a list": seq_layers([1]),
    "layer kind unknown": seq_layers({"1": {"kind": "pickle"}}),
    "layer n_factors 1e9": seq_layers({"1": {"kind": "factor", "n_factors": 10**9}}),
    "layer n_factors a bool": seq_layers({"1": {"kind": "factor", "n_factors": True}}),
    "layer inner 1e9": seq_layers({"1": {"kind": "factor", "n_factors": 3, "inner": 10**9}}),
    "layer order unknown": seq_layers({"1": {"kind": "factor", "n_factors": 3, "order": "x"}}),
    "layer injected key": seq_layers({"1": {"kind": "low_rank", "rank": 2, "cls": "x"}}),
    "layer rank 0": seq_layers({"1": {"kind": "low_rank", "rank": 0}}),
    "layer unpacked with a key": seq_layers({"1": {"kind": "unpacked", "rank": 2}}),
    "layer unpacked not an attention": seq_layers({"1": {"kind": "unpacked"}}),
    "layer rank above full": seq_layers({"1": {"kind": "low_rank", "rank": 9}}),
    "layer not in the model": seq_layers({"9": {"kind": "low_rank", "rank": 2}}),
    "layer form disagrees with tensors": seq_layers({"1": {"kind": "low_rank", "rank": 2}}),
    # --- tensors against the spec
    "tensor missing": _file(SEQ_SPEC, {k: v for k, v in SEQ_T.items() if k != LIN}),
    "tensor extra": _file(SEQ_SPEC, {**SEQ_T, "evil": torch.zeros(3)}),
    "tensor shape disagrees": _file(SEQ_SPEC, {**SEQ_T, LIN: torch.zeros(8, 15)}),
    "tensor dtype unknown": _with_header(SEQ_FILE, _set_tensor(LIN, dtype="F128")),
    "tensor offsets beyond the file": _with_header(
        SEQ_FILE, _set_tensor(LIN, data_offsets=[0, 10**12])
    ),
    "tensor offsets disagree with shape": _with_header(SEQ_FILE, _set_tensor(LIN, shape=[8, 1000])),
    "tensor shape negative": _with_header(SEQ_FILE, _set_tensor(LIN, shape=[-8, 16])),
    "tensor shape of 100 dims": _with_header(SEQ_FILE, _set_tensor(LIN, shape=[1] * 100)),
    "tensor entry a string": _with_header(SEQ_FILE, lambda h: h.update({LIN: "x"})),
    "tree Conv2d padding_mode unknown": seq_tree(
        {"type": "Conv2d", "kwargs": {**CONV, "padding_mode": "foo"}}
    ),
    "tree Conv2d groups 0": seq_tree({"type": "Conv2d", "kwargs": {**CONV, "groups": 0}}),
    "tree duplicate child name": seq_tree(
        {"type": "Sequential", "children": [["0", {"type": "ReLU"}], ["0", {"type": "ReLU"}]]}
    ),
    "class model without model=": _file(
        dict(SEQ_SPEC, arch={"class": "torchvision.models.resnet.ResNet"}), SEQ_T
    ),
}


def _measure(data: bytes) -> tuple[BaseException | None, float, float]:
    """(exception, CPU seconds, peak MB traced) of one load_bytes call. The garbage collector
    is off while it is timed: a full collection of earlier tests' objects (hundreds of ms
    once a suite has run) would otherwise land in some file's time; the module collects once
    before its first file."""
    enabled = gc.isenabled()
    gc.disable()
    t0 = time.process_time()
    try:
        lt.load_bytes(data)
        err = None
    except BaseException as e:  # the test checks its type
        err = e
    finally:
        cpu = time.process_time() - t0
        if enabled:
            gc.enable()
    tracemalloc.start()
    try:
        lt.load_bytes(data)
    except BaseException:
        pass
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return err, cpu, peak


@pytest.fixture(scope="module", autouse=True)
def warm():
    lt.load_bytes(GOOD)  # imports and first-call costs are not the file's
    lt.list_models("torchvision")
    gc.collect()  # earlier tests' garbage, once


def test_the_good_files_load():
    x = torch.randn(2, 1, 4, 4)
    torch.testing.assert_close(lt.load_bytes(GOOD)(x), _mlp().eval()(x))
    torch.testing.assert_close(lt.load_bytes(SEQ_FILE)(x), _seq().eval()(x))
    assert len(CORPUS) >= 50


@pytest.mark.parametrize("case", list(CORPUS))
def test_hostile_file_is_refused_cheaply(case):
    err, cpu, peak = _measure(CORPUS[case])
    assert isinstance(err, ValueError), f"{case}: {type(err).__name__}: {err}"
    assert ":" in str(err)  # "field: what is wrong"
    assert cpu < MAX_S, f"{case}: {cpu * 1000:.0f} ms"
    assert peak < MAX_MB, f"{case}: {peak:.1f} MB"


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("tree Conv2d padding_mode unknown", r"^spec\.arch\.tree\.kwargs: a Conv2d cannot be "),
        ("tree Conv2d groups 0", r"^spec\.arch\.tree\.kwargs: .*groups"),
        ("tree duplicate child name", r"^spec\.arch\.tree\.children\[1\]: duplicate child"),
    ],
)
def test_options_torch_refuses_are_named_by_their_field(case, message):
    with pytest.raises(ValueError, match=message):
        lt.load_bytes(CORPUS[case])


def test_whole_corpus_stays_small_and_prints_a_summary(capsys):
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows = [(case, *_measure(data)) for case, data in CORPUS.items()]
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0
    refused = sum(isinstance(e, ValueError) for _, e, _, _ in rows)
    slowest = max(rows, key=lambda r: r[2])
    largest = max(rows, key=lambda r: r[3])
    with capsys.disabled():
        print(
            f"\nload gate: {len(rows)} hostile files, {refused} refused with ValueError, "
            f"{len(rows) - refused} unclean; slowest {slowest[2] * 1000:.1f} ms CPU "
            f"({slowest[0]}), largest {largest[3]:.1f} MB traced ({largest[0]}), "
            f"peak RSS grew {grown:.1f} MB"
        )
    assert refused == len(rows) and grown < MAX_MB


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-p", "no:cacheprovider", "-k", "summary"]))


def test_starting_weights_that_would_unpack_far_beyond_their_size_are_refused(tmp_path):
    """A few MB of deflated zeros inside a torch.save zip (torch unpacks an entry whole
    before checking its size) and a safetensors header beyond the spec's limit are refused
    from the file's directory or header alone."""
    import zipfile

    from lorita.engine.build import read_weights

    torch.save({"w": torch.zeros(4)}, tmp_path / "plain.pt")
    with (
        zipfile.ZipFile(tmp_path / "plain.pt") as src,
        zipfile.ZipFile(tmp_path / "bomb.pt", "w", compression=zipfile.ZIP_DEFLATED) as dst,
    ):
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    with pytest.raises(ValueError, match=r"init_from: .* zip archive with compressed entries"):
        read_weights(tmp_path / "bomb.pt")
    assert read_weights(tmp_path / "plain.pt")["w"].shape == (4,)
    big = tmp_path / "big.safetensors"
    big.write_bytes((2**30).to_bytes(8, "little") + b'{"a": {}}')
    with pytest.raises(ValueError, match=r"safetensors header of 1073741824 bytes"):
        read_weights(big)


def test_option_keys_given_twice_and_long_folder_paths_are_named():
    from lorita.data import DatasetUnavailable, check_dataset
    from lorita.engine.config import parse_options

    with pytest.raises(ValueError, match=r"model options: width is given twice"):
        parse_options("width=8, width=9", "model options")
    with pytest.raises(ValueError, match=r"dataset: the folder path is 5005 characters long"):
        check_dataset("folder:/tmp/" + "x" * 5000)
    with pytest.raises(DatasetUnavailable, match=r"cannot be read \(File name too long\)"):
        check_dataset("folder:/tmp/" + "x" * 300)


def test_deleting_a_run_that_is_a_link_removes_the_link_only(tmp_path):
    from lorita.runs import RunStore

    elsewhere = tmp_path / "elsewhere"
    store = RunStore(tmp_path / "runs")
    run = store.create({"dataset": "digits"}, name="real")
    run.update_status(state="stopped")
    run.path.rename(elsewhere)
    (tmp_path / "runs" / "linked").symlink_to(elsewhere, target_is_directory=True)
    store.delete("linked")
    assert not (tmp_path / "runs" / "linked").exists() and (elsewhere / "config.json").is_file()
