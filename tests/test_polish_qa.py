"""Small things a user meets: the Train page's "also train N=1" box kept over a refresh, and
``lorita --help`` (and ``import lorita``) answering without loading torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "tests" / "app") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests" / "app"))


def _python(code: str, *args: str, importtime: bool = False) -> subprocess.CompletedProcess:
    flags = ["-X", "importtime"] if importtime else []
    return subprocess.run(
        [sys.executable, *flags, *(["-c", code] if code else []), *args],
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


def _imported(stderr: str) -> set[str]:
    """The modules ``-X importtime`` says were imported."""
    return {line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines() if "|" in line}


# --- the "also train N=1" box over a refresh --------------------------------------------------


def _box(at) -> bool:
    return at.checkbox(key="train.baseline").value


def test_an_unticked_baseline_box_survives_a_refresh(empty_runs):
    """Before, the address did not keep the box: a refresh ticked it again, and the next
    Start trained an N=1 run the user had said no to."""
    from app_seed import assert_clean, open_page

    at = open_page("train")
    assert_clean(at)
    assert _box(at) is True and "baseline" not in at.query_params  # the default: not written
    at.checkbox(key="train.baseline").uncheck().run()
    assert_clean(at)
    assert at.query_params["baseline"] == "0"
    fresh = open_page("train", **dict(at.query_params))
    assert_clean(fresh)
    assert _box(fresh) is False
    fresh.checkbox(key="train.baseline").check().run()  # back to the default: dropped
    assert "baseline" not in fresh.query_params


def test_the_baseline_box_and_an_edited_preset_survive_a_refresh_together(empty_runs):
    from app_seed import assert_clean, open_page

    at = open_page("train", preset="planted")
    at.number_input(key="train.epochs.planted").set_value(4).run()
    at.checkbox(key="train.baseline").uncheck().run()
    assert_clean(at)
    params = dict(at.query_params)
    assert params["preset"] == "planted" and params["epochs"] == "4"
    assert params["baseline"] == "0"
    fresh = open_page("train", **params)
    assert_clean(fresh)
    assert _box(fresh) is False
    assert fresh.number_input(key="train.epochs.planted").value == 4


@pytest.mark.parametrize("hostile", ["yes", "2", "-1", "1" * 5000, "0\x00", "true"])
def test_a_hand_edited_baseline_in_the_address_falls_back_to_the_default(empty_runs, hostile):
    from app_seed import assert_clean, open_page

    at = open_page("train", baseline=hostile, epochs="6")
    assert_clean(at)
    assert _box(at) is True  # the form's own choice
    assert at.number_input(key="train.epochs.classroom").value == 6  # the rest still read
    assert "baseline" not in at.query_params  # rewritten as the form has it


def test_baseline_address_text_round_trips_and_refuses_anything_else():
    from app import train_url

    assert train_url.baseline_text(True, True) is None
    assert train_url.baseline_text(False, False) is None
    for ticked, default in ((False, True), (True, False)):
        text = train_url.baseline_text(ticked, default)
        assert text is not None and train_url.read_baseline(text) is ticked
    for raw in (None, "", " ", "on", "01", "1.0", "True", "0" * 100, "１", 1, ["1"]):
        assert train_url.read_baseline(raw) is None, raw


# --- import lorita and lorita --help without torch -------------------------------------------


def test_lorita_help_does_not_import_torch():
    """Before, ``python -m lorita --help`` imported torch (3 to 5 s): the package imported
    every module, and the parser read TrainConfig and the policies for every command."""
    proc = _python("", "-m", "lorita", "--help", importtime=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: lorita")
    for command in ("train", "compress", "compare", "export", "models", "datasets"):
        assert command in proc.stdout
    loaded = _imported(proc.stderr)
    assert "lorita.cli" in loaded and "torch" not in loaded and "numpy" not in loaded


def test_the_console_script_help_does_not_import_torch():
    """The ``lorita`` console script (lorita.cli:main), as its entry point runs it."""
    code = (
        "import sys; sys.argv = ['lorita', '--help']\n"
        "from lorita.cli import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
        "assert code == 0, code\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n"
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.rstrip().endswith("NO-TORCH"), proc.stdout[-300:]


def test_import_lorita_is_cheap_and_every_public_name_resolves():
    code = (
        "import sys, lorita\n"
        "assert 'torch' not in sys.modules, 'torch on import'\n"
        "assert set(lorita.__all__) <= set(dir(lorita))\n"
        "missing = [n for n in lorita.__all__ if getattr(lorita, n, None) is None]\n"
        "assert not missing, missing\n"
        "print('OK')\n"
    )
    proc = _python(code)
    assert proc.returncode == 0 and proc.stdout.strip() == "OK", proc.stderr[-2000:]


def test_public_names_are_the_modules_own_and_star_import_works():
    import lorita as lt
    from lorita import Energy, TrainConfig, functional, truncate
    from lorita.engine import TrainConfig as engine_config
    from lorita.truncation import Energy as truncation_energy

    assert Energy is truncation_energy and TrainConfig is engine_config
    assert truncate is lt.truncate and functional is lt.functional
    assert lt.truncation.truncate is lt.truncate  # a module of the package, as before
    namespace: dict = {}
    exec("from lorita import *", namespace)
    assert set(lt.__all__) <= set(namespace)
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        lt.not_a_name  # noqa: B018
    with pytest.raises(AttributeError):
        lt._private_thing  # noqa: B018
    assert not hasattr(lt, "__wrapped__")


def test_a_command_still_imports_the_library_while_ctrl_c_is_held():
    """``python -m lorita runs`` imports the library before it gives Ctrl-C back (what
    lorita._startup is for); only the command list skips it."""
    from lorita.cli import needs_library

    assert needs_library(["runs"]) and needs_library(["train", "--help"])
    assert not needs_library([]) and not needs_library(["--help"]) and not needs_library(["-h"])


@pytest.mark.parametrize("command", ["train", "compress", "compare", "export", "runs", "models"])
def test_a_lazy_parser_says_and_takes_what_the_full_one_does(command, monkeypatch):
    from lorita.cli import build_parser

    monkeypatch.setenv("COLUMNS", "100")
    full, lazy = build_parser(), build_parser(lazy=True)

    def help_of(parser) -> str:
        sub = next(a for a in parser._actions if a.dest == "command")
        return sub.choices[command].format_help()

    assert help_of(lazy) == help_of(full)
    if command == "train":
        argv = ["train", "--epochs", "2", "--factors", "1"]
        assert vars(build_parser(lazy=True).parse_args(argv)) == vars(full.parse_args(argv))
