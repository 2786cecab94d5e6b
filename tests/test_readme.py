"""The README's first library example runs as written and shows what its comments say."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.usefixtures("one_thread")
def test_the_library_example_runs_as_written_and_the_cut_is_smaller(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "lt.overparameterize(net, n_factors=3)" in b)
    monkeypatch.chdir(tmp_path)  # it writes small.safetensors and small.onnx
    scope: dict = {}
    exec(compile(example, "README.md", "exec"), scope)  # noqa: S102 - the README's own code
    lt, x = scope["lt"], scope["x"]
    flops = lt.count_cost(scope["model"], x).flops, lt.count_cost(scope["small"], x).flops
    assert flops[1] < 0.5 * flops[0]
    said = re.search(r"flops\)\s+# about (\d+) (\d+)", example)  # what the print's comment says
    assert said is not None and int(said[1]) == flops[0], (said, flops)
    assert abs(int(said[2]) - flops[1]) <= 0.15 * flops[1], (said[2], flops)  # ranks vary a little
    assert max(scope["ranks"].values()) < 40  # low rank after training with weight decay
    assert (tmp_path / "small.safetensors").is_file() and (tmp_path / "small.onnx").is_file()
