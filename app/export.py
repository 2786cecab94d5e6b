"""Glue for the Export page: build the file in memory, reload it, compare accuracies.

The file is written with the library (``lt.save`` / ``lt.export_onnx``) to a temporary folder,
read back as bytes for the download button, and reloaded from that same file (``lt.load``, or
onnxruntime for ONNX) so the page can show that the reloaded model gives the same accuracy.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app import compress as cz
from lorita.scores import score_of

FORMATS = {
    "low_rank": "Low-rank safetensors (cut layers stored as two thin layers)",
    "dense": "Dense safetensors (original architecture, rank-r weights)",
    "onnx": "ONNX (onnxruntime and other runtimes)",
}
MIME = {"low_rank": "application/octet-stream", "dense": "application/octet-stream",
        "onnx": "application/octet-stream"}  # fmt: skip
SUFFIX = {"low_rank": "-lowrank.safetensors", "dense": "-dense.safetensors", "onnx": ".onnx"}
ONNX_NEEDS = ("onnx", "onnxruntime")  # export, and the reload that verifies the file
DECIDE_WORDS = {
    "flops": "by FLOPs (thin two layers wherever they count fewer FLOPs)",
    "latency": "by measured latency on this machine (thin only where it runs faster)",
}
DEFAULT_BATCH = 64  # the batch the latency choice measures at, unless the page says otherwise
MAX_BATCH = 4096  # the library's limit
# How far the reloaded file's score may be from the model's and still be "the same": accuracy
# counts predictions, so equal means equal; R² is continuous, and a runtime's floating-point
# rounding moves it in its last places.
SAME_WITHIN = {"classification": 1e-9, "regression": 1e-6}


def file_base(
    run: str, which: str = "best", choice: dict[str, Any] | None = None, *, finetuned: bool = False
) -> str:
    """The downloaded file's name before its format's suffix: the run, the checkpoint unless it
    is the best, then the cut and whether it was fine-tuned, so that no two exports of one run
    share a name (``digits-n3``, ``digits-n3-global0.80``, ``digits-n3-global0.80-finetuned``,
    ``digits-n3-last-budget20.0``, ``digits-n3-ranks-1a2b3c4d``)."""
    parts = [run] if which == "best" else [run, which]
    if choice:
        parts.append(cut_tag(choice))
        if finetuned:
            parts.append("finetuned")
    return "-".join(parts)


def cut_tag(choice: dict[str, Any]) -> str:
    """A Compress page setting in a file name: the policy and its slider value as the slider
    shows it (``global0.80``, ``budget20.0``), or a per-layer rank table's digest."""
    policy, value = str(choice["policy"]), choice.get("value")
    d = cz.scalar_policies().get(policy)
    if d is None or value is None:
        ranks = sorted((str(k), int(v)) for k, v in (choice.get("ranks") or {}).items())
        digest = hashlib.sha256(json.dumps(ranks).encode()).hexdigest()[:8]
        return f"{policy}-{digest}"
    return f"{policy}{d.get('format', '%g') % value}"


def formats() -> dict[str, str]:
    """The formats this installation can write *and verify* (ONNX needs onnx and onnxruntime,
    both in requirements.txt)."""
    import importlib.util

    out = dict(FORMATS)
    if any(importlib.util.find_spec(m) is None for m in ONNX_NEEDS):
        out.pop("onnx")
    return out


def missing_note() -> str | None:
    """What to install for the formats :func:`formats` leaves out, or None."""
    if "onnx" in formats():
        return None
    return "ONNX export needs `pip install onnx onnxruntime` (both are in requirements.txt)."


@dataclass
class Built:
    """A file ready to download, and the evidence that it loads back to the same model."""

    data: bytes
    file_name: str
    fmt: str
    original: dict[str, float]  # val/test score (accuracy, or R²) of the in-memory model
    reloaded: dict[str, float]  # the same, after reloading the file
    seconds: float
    snippet: str
    task: str = "classification"  # how the scores are read (lorita.scores)

    @property
    def same(self) -> bool:
        """Whether the reloaded file scores as the model did (R² within :data:`SAME_WITHIN`)."""
        return self.max_diff < SAME_WITHIN.get(self.task, SAME_WITHIN["classification"])

    @property
    def max_diff(self) -> float:
        return max(abs(self.original[k] - self.reloaded[k]) for k in ("val_acc", "test_acc"))


class OnnxModule:
    """Make an onnxruntime session callable like a module so the library can evaluate it."""

    def __init__(self, path: str | Path) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(path), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        self.input = self.session.get_inputs()[0].name
        self.training = False

    def __call__(self, x):
        import torch

        out = self.session.run(None, {self.input: x.detach().cpu().numpy()})[0]
        return torch.from_numpy(out)

    # the bits of the nn.Module interface an evaluation loop touches
    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def to(self, *args, **kwargs):
        return self

    def parameters(self):
        return iter(())


def metadata(
    session: Any,
    choice: dict[str, Any] | None,
    fmt: str,
    *,
    model: Any = None,
    by: str = "flops",
    batch: int = DEFAULT_BATCH,
) -> dict[str, Any]:
    """What goes into the file's metadata: where it came from and how to feed it, and for a
    cut, how each layer's form was chosen and which form it got."""
    meta: dict[str, Any] = {
        "run": session.run,
        "checkpoint": session.which,
        "dataset": session.config.get("dataset"),
        "n_factors_trained": int(session.config.get("n_factors") or 1),
        "input_shape": list(session.example_input.shape[1:]),
        "form": fmt,
    }
    if session.preprocess is not None:  # input shape, pixels, mean and std, class names
        meta["preprocess"] = session.preprocess
    if choice:
        meta["truncation"] = {
            "policy": choice.get("policy"),
            "value": choice.get("value"),
            "ranks": choice.get("ranks"),
            "forms_by": by if fmt != "dense" else "form='dense'",
        }
        if by == "latency" and fmt != "dense":
            meta["truncation"]["latency_batch"] = int(batch)
        if model is not None:
            meta["truncation"]["forms"] = forms_of(model)
    return meta


def decide_options() -> dict[str, str]:
    """How each cut layer's form can be chosen (the library's ``lorita.kinds.DECIDE_BY``)."""
    from lorita.kinds import DECIDE_BY

    return {b: DECIDE_WORDS.get(b, f"by {b}") for b in DECIDE_BY}


def _check_by(by: str, batch: int) -> None:
    from lorita.kinds import DECIDE_BY

    if by not in DECIDE_BY:
        raise ValueError(f"by: {by!r}; allowed: {', '.join(DECIDE_BY)}")
    if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= MAX_BATCH:
        raise ValueError(f"batch: {batch!r}; allowed: an integer from 1 to {MAX_BATCH}")


def _cut_ranks(session: Any, ranks: dict[str, int] | None) -> dict[str, int]:
    """The ranks of the layers the session cuts (the page's ranks also list the left-out head)."""
    return {n: int(r) for n, r in (ranks or {}).items() if n in session.layers}


def choose_model(
    session: Any,
    choice: dict[str, Any] | None,
    fmt: str,
    finetuned: Any = None,
    *,
    by: str = "flops",
    batch: int = DEFAULT_BATCH,
) -> Any:
    """The model to export: merged as trained, cut by ``choice``, or a fine-tuned one.

    ``by`` chooses each cut layer's form (``lorita.kinds.DECIDE_BY``): "flops" takes the thin
    two-layer form wherever it counts fewer FLOPs; "latency" keeps it only where it measured
    faster on this machine at ``batch`` rows, layer by layer and then for the whole model, so
    the exported cut is never slower than the model it came from. The dense format has no
    thin layers, so ``by`` does not apply to it.
    """
    import lorita as lt
    from lorita import truncation

    _check_by(by, batch)
    timed = by == "latency" and fmt != "dense"
    if finetuned is not None:
        if fmt == "dense":
            return lt.merge_model(finetuned)
        if not timed:
            return finetuned
        ranks = _cut_ranks(session, (choice or {}).get("ranks"))
        return truncation.truncate(
            finetuned, truncation.Ranks(ranks), layers=list(ranks),
            example_input=session.example_input, by="latency", batch=batch,
        )  # fmt: skip
    if not choice:
        return session.model
    if timed:
        return truncation.truncate(
            session.model, truncation.Ranks(_cut_ranks(session, choice.get("ranks"))),
            svd=session.svd, example_input=session.example_input, by="latency", batch=batch,
        )  # fmt: skip
    if fmt == "dense":  # the cut's own ranks in the original architecture (a budget's too)
        ranks = _cut_ranks(session, choice.get("ranks"))
        return truncation.truncate(session.model, truncation.Ranks(ranks), svd=session.svd,
                                   layers=list(ranks), form="dense")  # fmt: skip
    ranks = _cut_ranks(session, choice["ranks"]) if choice.get("ranks") is not None else None
    policy = cz.make_policy(choice["policy"], choice.get("value"), ranks)
    return session.cut(policy)[0]


def _form_of(model: Any, name: str, plan: dict[str, dict]) -> dict[str, Any] | None:
    if name in plan:
        return plan[name]
    from lorita.layers import is_thin

    try:
        module = model.get_submodule(name)
    except AttributeError:
        return None
    if is_thin(module):
        return {"rank": int(module.rank), "form": "thin", "why": ""}
    return None


def layer_forms(session: Any, model: Any) -> list[dict[str, Any]]:
    """One row per layer of the exported model: its rank and the form it got, and why."""
    from app.latency import FORM_WORDS

    plan = getattr(model, "lorita_plan", None) or {}
    rows = []
    for name, full in session.full_ranks.items():
        p = _form_of(model, name, plan)
        if p is None:
            left = session.left_out.get(name)
            form, rank, why = ("left out" if left else "full"), full, left or ""
        else:
            form, rank, why = p["form"], p.get("rank", full), p.get("why", "")
        rows.append(
            {"layer": name, "rank": f"{rank}/{full}", "form": FORM_WORDS.get(form, form),
             "why": why}
        )  # fmt: skip
    return rows


def params_note(session: Any, model: Any) -> str | None:
    """What the file's parameters are against the cut the Compress page counted, when some cut
    layers were kept dense because of their measured latency (they carry their whole weight);
    None otherwise."""
    plan = getattr(model, "lorita_plan", None) or {}
    dense = [n for n, p in plan.items() if p.get("form") == "dense" and p.get("timed")]
    if not dense:
        return None
    params = sum(p.numel() for p in model.parameters())
    pct = 100.0 * params / max(1, session.base_cost.params)
    return (
        f"This file holds {pct:.1f}% of the original parameters ({params:,}): "
        f"{len(dense)} cut layer(s) kept dense for their measured latency carry their whole "
        "weight, where the Compress page counted them thin."
    )


def forms_of(model: Any) -> dict[str, str]:
    """``{layer: "thin" | "dense" | "full"}`` of a cut model's cut layers (empty when nothing
    was cut; the layers left out of cuts, the output layer, are not among them)."""
    plan = getattr(model, "lorita_plan", None) or {}
    return {n: str(p["form"]) for n, p in plan.items() if p["form"] != "left out"}


@dataclass
class Offline:
    """A file of a checkpoint as trained, made without the run's data: the reloaded file is
    checked against the model on one input instead of on the validation and test images."""

    data: bytes
    file_name: str
    max_diff: float  # largest difference of the outputs, model against reloaded file
    val_acc: float | None  # the checkpoint's own record (accuracy, or R²)
    snippet: str
    task: str = "classification"  # how val_acc is read (lorita.scores)


def build_offline(run: Any, which: str, fmt: str) -> Offline:
    """The run's ``which`` checkpoint as trained (factors merged) in format ``fmt`` ("onnx" or
    a safetensors one: nothing is cut, so both are the same file), for a run whose data is
    not on this machine (:meth:`lorita.runs.Run.as_trained`)."""
    import torch

    model, example, val_acc = run.as_trained(which)
    file_name = file_base(run.name, which) + SUFFIX[fmt]
    x = (
        example.expand(4, *example.shape[1:])
        .clone()
        .normal_(generator=torch.Generator().manual_seed(0))
    )
    meta = run.as_trained_metadata(which, val_acc)
    with tempfile.TemporaryDirectory(prefix="lorita-export-") as tmp:
        path = Path(tmp) / file_name
        reloaded = _write_and_reload(model, example, path, fmt, meta)
        with torch.no_grad():
            diff = float((model(x) - reloaded(x)).abs().max())
        data = path.read_bytes()
    how = meta.get("preprocess")
    code = snippet(fmt, file_name, run.task, normalized=_normalized(how),
                   shape=tuple(example.shape[1:]), recorded=how is not None)  # fmt: skip
    return Offline(data, file_name, diff, val_acc, code, run.task)


def _write_and_reload(model: Any, example: Any, path: Path, fmt: str, meta: dict | None) -> Any:
    """Write ``model`` to ``path`` in format ``fmt`` and load the file back (an onnxruntime
    session for ONNX); a low-rank safetensors file is for inference, as `lorita export` writes
    one: BatchNorm folded into its layer. The dense file is the original architecture, its
    BatchNorms kept, so that the architecture's own ``load_state_dict`` takes it. The spec
    records the input's shape, as `lorita compress --out` and `lorita export` do."""
    import torch

    import lorita as lt

    if fmt == "onnx":
        from lorita.export import ONNX_INLINE_BYTES, tensor_bytes

        size = tensor_bytes(model)
        if size > ONNX_INLINE_BYTES:  # its weights would be a second file beside the graph
            raise ValueError(
                f"format onnx: the weights take {size / 2**30:.1f} GiB, more than one ONNX file "
                "holds (2 GiB); download safetensors, or run `python -m lorita export RUN "
                "--format onnx --out FILE.onnx`, which writes FILE.onnx and FILE.onnx.data"
            )
        lt.export_onnx(model, example, path, metadata=meta)
        return OnnxModule(path)
    shape = list(example.shape[1:]) if isinstance(example, torch.Tensor) else None
    lt.save(model, path, metadata=meta or {}, fold_bn=fmt != "dense", input_shape=shape,
            example_input=example)  # fmt: skip
    return lt.load(path).eval()


def _normalized(how: dict | None) -> bool:
    """Whether a file's preprocessing metadata ``how`` says how to normalise its inputs (None:
    no metadata, the snippet says what a normalised run's does)."""
    return not isinstance(how, dict) or how.get("normalize") is not None


def snippet(
    fmt: str,
    file_name: str,
    task: str | None = "classification",
    *,
    normalized: bool = True,
    shape: tuple[int, ...] | None = None,
    recorded: bool = True,
) -> str:
    """The lines that load the downloaded file and run it on inputs ``x``: a classifier's
    predicted classes (``pred``), or a regression's predicted targets themselves (``out``).
    ``normalized``: whether the file's metadata says how to normalise the inputs (a regression
    run, or one trained without normalising, has none: its inputs go in as they are).
    ``shape``: one input's shape (the model's example input less its batch): random inputs of
    it stand in for the user's, so the lines run as they are. ``recorded``: whether the file
    holds that metadata at all (a checkpoint written before runs recorded it has none: the
    lines then read nothing of it)."""
    dims = ", ".join(str(int(d)) for d in shape) if shape else "C, H, W"
    names = "how['classes'][i] names class i, where it has names"
    if not recorded:
        names = "the index of the predicted class"
        feed = (
            f"# Your inputs x, (batch, {dims}), prepared as the run's dataset prepared them (this\n"
            "# file does not record how). Random ones stand in:\n"
        )
    elif normalized:
        feed = (
            f"# Your inputs x, (batch, {dims}): how['pixels'], then per channel\n"
            "# (x - how['normalize']['mean']) / how['normalize']['std']. Random ones stand in:\n"
        )
    else:
        feed = (
            f"# Your inputs x, (batch, {dims}), as the run read them (how['normalize'] is\n"
            "# None: nothing is normalised). Random ones stand in:\n"
        )
    regression = score_of(task).task == "regression"
    if fmt == "onnx":
        head = (
            ("import json\n\n" if recorded else "")
            + "import numpy as np\n"
            "import onnxruntime as ort\n\n"
            f'session = ort.InferenceSession("{file_name}")\n'
            + ('how = json.loads(session.get_modelmeta().custom_metadata_map["preprocess"])\n'
               if recorded else "")
        )  # fmt: skip
        make = f"x = np.random.rand(1, {dims}).astype(np.float32)\n" if shape else ""
        run = 'session.run(None, {"input": x.astype(np.float32)})[0]'
        if regression:
            return head + feed + make + f"out = {run}  # (batch, outputs): the predicted targets\n"
        return head + feed + make + f"logits = {run}\npred = logits.argmax(1)  # {names}\n"
    head = (
        "import torch\n\n"
        "import lorita as lt\n\n"
        f'model = lt.load("{file_name}").eval()  # rebuilds the architecture from the file\n'
    )
    if recorded:
        head += f'how = lt.read_spec("{file_name}")["metadata"]["preprocess"]  # how to feed it\n'
    make = f"x = torch.rand(1, {dims})\n" if shape else ""
    if regression:
        body = "out = model(x)  # (batch, outputs): the predicted targets\n"
    else:
        body = f"pred = model(x).argmax(1)  # {names}\n"
    plain = ""
    if fmt == "dense":  # the original architecture's own state_dict: no lorita needed
        plain = (
            "# Without lorita: build the architecture as the run did (lt.read_spec(...)['arch']\n"
            "# names it and its options), then, with plain PyTorch and safetensors:\n"
            f'# net.load_state_dict(safetensors.torch.load_file("{file_name}"))\n'
        )
    return head + feed + make + "with torch.no_grad():\n    " + body + plain


def build(
    session: Any,
    model: Any,
    fmt: str,
    *,
    base_name: str,
    meta: dict[str, Any] | None = None,
) -> Built:
    """Write ``model`` in format ``fmt``, reload the file, evaluate both; return the bytes."""
    if fmt not in FORMATS:
        raise ValueError(f"format: {fmt!r}; allowed: {', '.join(FORMATS)}")
    t0 = time.perf_counter()
    model.eval()
    original = cz.evaluate(session, model)
    file_name = base_name + SUFFIX[fmt]
    with tempfile.TemporaryDirectory(prefix="lorita-export-") as tmp:
        path = Path(tmp) / file_name
        reloaded_model = _write_and_reload(model, session.example_input, path, fmt, meta)
        data = path.read_bytes()
        reloaded = cz.evaluate(session, reloaded_model)
    how = (meta or {}).get("preprocess") or session.preprocess
    return Built(
        data=data,
        file_name=file_name,
        fmt=fmt,
        original=original,
        reloaded=reloaded,
        seconds=time.perf_counter() - t0,
        snippet=snippet(
            fmt,
            file_name,
            session.task,
            normalized=_normalized(how),
            shape=tuple(session.example_input.shape[1:]),
            recorded=(meta or {}).get("preprocess") is not None,  # what the file holds
        ),  # fmt: skip
        task=session.task,
    )
