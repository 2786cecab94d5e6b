"""Ctrl-C at the instants a busy machine makes likely: while ``python -m lorita`` is inside an
import that a library guards (torch imports numpy from its C code and carries on, with a
warning, when that import fails)."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Sends Ctrl-C to the process itself the moment numpy's import begins, once lorita has started
# importing: the instant at which torch's own import of numpy would receive it.
_CTRL_C_IN_NUMPY_IMPORT = textwrap.dedent(
    """
    import os, signal, sys

    class _CtrlCAtNumpy:
        fired = False

        def find_spec(self, name, path=None, target=None):
            if name == "numpy" and "lorita._startup" in sys.modules and not self.fired:
                _CtrlCAtNumpy.fired = True
                os.kill(os.getpid(), signal.SIGINT)
            return None

    sys.meta_path.insert(0, _CtrlCAtNumpy())
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_inside_an_import_torch_guards_still_ends_the_command(tmp_path):
    """The Ctrl-C is not lost in torch's guard around numpy: before, the command went on
    (a compress --out with 1000 fine-tuning epochs ran to its end, or failed on the
    half-imported numpy) after saying 'lorita: interrupted'."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_CTRL_C_IN_NUMPY_IMPORT)
    proc = subprocess.run(
        [sys.executable, "-m", "lorita", "runs", "--runs-dir", str(tmp_path / "none")],
        env={**os.environ, "PYTHONPATH": f"{hook}:{ROOT}", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip() == "lorita: interrupted", proc.stderr
    assert proc.stdout == ""
