"""The README from top to bottom, as a new user follows it: every command it shows parses
with the command line's own parser (the flags exist, the values are in their bounds), every
flag it names belongs to a command, its Python blocks name only lorita's public API and run,
every file it points at exists, the bench scripts it and docs/ name take the flags shown and
answer --help, and the requirement files list every package the code imports.

(tests/test_readme.py runs the first library example and checks its printed numbers.)
"""

from __future__ import annotations

import ast
import importlib
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import lorita as lt
from lorita import baselines
from lorita.cli import _train_config, build_parser
from lorita.engine.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = sorted((ROOT / "docs").glob("*.md"))
SUBCOMMANDS = ("train", "runs", "compress", "compare", "export", "stop", "models", "datasets")
# flags of other programs the README shows: torchrun's and streamlit's
OTHER_PROGRAMS = {"--nproc_per_node", "--standalone", "--server.address", "--server.headless"}


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def _shell_lines(block: str) -> list[list[str]]:
    """The block's commands, continuation lines joined and comments dropped."""
    lines = block.replace("\\\n", " ").splitlines()
    return [toks for toks in (shlex.split(line, comments=True) for line in lines) if toks]


def _lorita_args(tokens: list[str]) -> list[str] | None:
    """What follows ``-m lorita`` (python or torchrun) or a bare ``lorita``, else None."""
    for i, tok in enumerate(tokens):
        if tok == "lorita" and (i == 0 or tokens[i - 1] == "-m"):
            return tokens[i + 1 :]
    return None


def _readme_commands() -> list[list[str]]:
    """Every lorita command of the README's shell blocks, and the full inline ones
    (`lorita stop NAME`: a subcommand with arguments, nothing elided)."""
    out = []
    for block in _blocks("bash"):
        out += [a for a in map(_lorita_args, _shell_lines(block)) if a is not None]
    inline = re.findall(r"`((?:python -m )?lorita [^`]+)`", README.replace("\n", " "))
    for text in inline:
        args = _lorita_args(shlex.split(text))
        full = "..." not in text and "--help" not in text and "&&" not in text
        if args and args[0] in SUBCOMMANDS and len(args) > 1 and full:
            out.append(args)
    return out


COMMANDS = _readme_commands()


def test_the_readme_shows_every_subcommand():
    assert len(COMMANDS) >= 15, COMMANDS
    assert {a[0] for a in COMMANDS} == set(SUBCOMMANDS)


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda a: " ".join(a)[:60])
def test_each_readme_command_parses_and_a_train_line_makes_a_valid_config(
    argv, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))  # folder:~/pets
    if "--init-from" in argv:  # the example's own weights are there for a user
        lt.save(torch.nn.Sequential(torch.nn.Linear(2, 2)), argv[argv.index("--init-from") + 1])
    args = build_parser().parse_args(argv)
    assert args.command == argv[0]
    if args.command == "train" and not args.resume:
        cfg = _train_config(args)
        assert isinstance(cfg, TrainConfig)


def test_the_classroom_command_is_the_run_its_comment_describes():
    block = next(b for b in _blocks("bash") if "the classroom run" in b)
    said = re.search(r"# the classroom run: (.*)", block)[1]
    assert said == "digits, MLP 3 x 512, N=3, Adam lr 3e-3 with weight decay 5e-3, 15 epochs"
    cfg = _train_config(build_parser().parse_args(["train", "--name", "n3"]))
    assert (cfg.dataset, cfg.model, cfg.n_factors, cfg.optimizer) == ("digits", "mlp", 3, "adam")
    built = lt.model_options("mlp") | cfg.model_kwargs
    assert (built["depth"], built["width"]) == (3, 512)
    assert (cfg.lr, cfg.weight_decay, cfg.epochs) == (3e-3, 5e-3, 15)
    n1 = _train_config(build_parser().parse_args(["train", "--name", "n1", "--factors", "1"]))
    assert n1.n_factors == 1 and {**n1.to_dict(), "n_factors": 3} == cfg.to_dict()


def _lorita_flags() -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return {s for p in sub.choices.values() for a in p._actions for s in a.option_strings}


def _script_flags(path: Path) -> set[str]:
    """The flags a bench script's argparse parser declares (read from its source)."""
    flags = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            flags |= {
                a.value
                for a in node.args
                if isinstance(a, ast.Constant) and str(a.value).startswith("-")
            }
    return flags


def test_every_flag_the_readme_names_is_a_flag_of_lorita_or_of_a_named_program():
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_.-]*[a-z0-9]", README))
    bench = set().union(*(_script_flags(p) for p in (ROOT / "bench").glob("*.py")))
    unknown = named - _lorita_flags() - bench - OTHER_PROGRAMS
    assert not unknown, f"README names flags no command has: {sorted(unknown)}"


def test_train_has_a_flag_for_every_field_of_train_config_and_the_listed_ones():
    train = build_parser()._actions[-1].choices["train"]
    dests = {a.dest for a in train._actions}
    fields = {f for f in TrainConfig().to_dict()} - {"model_kwargs", "dataset_kwargs"}
    assert fields <= dests | {"n_factors"} and "n_factors" in dests | {"factors"}
    assert {"model_args", "data_args"} <= dests
    listed = re.search(r"`(--dataset --model .*?--augment)`", README.replace("\n", " "))[1]
    assert set(listed.split()) <= {s for a in train._actions for s in a.option_strings}


# --------------------------------------------------------------------------- Python blocks


def _lt_names(code: str) -> set[str]:
    """``lt.X`` attributes a block uses."""
    return {
        node.attr
        for node in ast.walk(ast.parse(code))
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "lt"
    }


def test_every_python_block_compiles_and_names_only_public_lorita_api():
    blocks = _blocks("python")
    assert len(blocks) >= 3
    for code in blocks:
        compile(code, "README.md", "exec")
        missing = _lt_names(code) - set(lt.__all__)
        assert not missing, f"a README block uses lt.{sorted(missing)}, not in lorita.__all__"


def _resolve(dotted: str) -> object:
    obj: object = lt
    for part in dotted.split(".")[1:]:
        if not hasattr(obj, part):
            obj = importlib.import_module(f"{obj.__name__}.{part}")
        else:
            obj = getattr(obj, part)
    return obj


def test_every_lorita_name_the_readme_mentions_exists():
    names = set(re.findall(r"\blorita(?:\.[A-Za-z_]\w*)+", README))
    names |= {f"lorita.{n}" for n in re.findall(r"\blt\.([A-Za-z_]\w*)", README)}
    for dotted in sorted(names):
        _resolve(dotted)
    table = README[README.index("What is in it:") : README.index("### Your own model")]
    for row in re.findall(r"^\| (.*?) \|", table, flags=re.M)[2:]:
        for name in re.findall(r"`([A-Za-z_][\w.]*)", row):
            assert name.startswith("lorita.") or name in lt.__all__, name


def test_the_training_block_follows_the_command_line_block_in_the_same_folder(
    tmp_path, monkeypatch
):
    """Followed top to bottom, the command-line block has made runs/n3 when the Training
    block runs in the same folder: its run name must be another (it once asked for n3)."""
    code = next(b for b in _blocks("python") if "lt.RunStore(" in b)
    cli_names = {a[a.index("--name") + 1] for a in COMMANDS if "--name" in a}
    block_names = set(re.findall(r'name="([^"]+)"', code))
    assert block_names and not block_names & cli_names
    monkeypatch.chdir(tmp_path)
    for name in cli_names:  # what the command-line block leaves
        lt.RunStore("runs").create(TrainConfig().to_dict(), name=name)
    quick = code.replace("weight_decay=5e-3)", "weight_decay=5e-3, epochs=1, spectra_every=0)")
    assert quick != code
    scope: dict = {}
    exec(compile(quick, "README.md", "exec"), scope)  # noqa: S102 - the README's own code
    assert set(scope["result"]) >= {"best_val_acc", "test_acc", "model"}
    assert not scope["model"].training  # "in eval mode"
    ranks = scope["run"].summary()["effective_ranks"]
    said = re.search(r"# (\{'fc1'.*\})", code)[1]
    assert set(ranks) == set(re.findall(r"'(\w+)'", said)) and ranks["head"] == 10


@pytest.mark.usefixtures("one_thread")
def test_the_own_model_block_runs_and_the_file_loads_back_into_a_fresh_instance(
    tmp_path, monkeypatch
):
    code = next(b for b in _blocks("python") if "resnet18" in b)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's own code
    small, again = scope["small"], scope["again"]
    x = torch.randn(2, 3, 32, 32)
    assert lt.count_cost(small, x[:1]).params < 0.35 * lt.count_cost(scope["net"], x[:1]).params
    torch.testing.assert_close(again.eval()(x), small.eval()(x))


# --------------------------------------------------------------------------- files and docs


def test_every_file_the_readme_points_at_exists():
    paths = set(re.findall(r"\]\((?!https?:)([^)#]+)\)", README))  # links
    paths |= set(re.findall(r"`((?:[\w.-]+/)+[\w.-]+\.(?:py|md|toml|txt|sh))`", README))
    paths |= set(re.findall(r"(?:python|bash) ((?:bench|tests)/[\w/.-]+)", README))
    assert any(p.startswith("docs/") for p in paths)
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, missing
    layout = README[README.index("\napp/ ") : README.index("\nlorita/ ")]
    for name in re.findall(r"^  ([\w. ]+?\.py)\b", layout, flags=re.M):  # app/ files
        for file in name.split():
            assert (ROOT / "app" / file).is_file(), file


def _bench_commands() -> list[tuple[str, list[str]]]:
    out = []
    for path in [ROOT / "README.md", *DOCS]:
        text = path.read_text().replace("\n", " ")
        for m in re.finditer(r"`python (bench/[\w]+\.py)([^`]*)`", text):
            out.append((m[1], shlex.split(m[2])))
    return out


def test_every_bench_command_in_readme_and_docs_uses_flags_its_script_has():
    commands = _bench_commands()
    named = {s for s, _ in commands}
    assert len(named) >= 12, named
    for script, args in commands:
        flags = {a.split("=")[0] for a in args if a.startswith("--")}
        unknown = flags - _script_flags(ROOT / script)
        assert not unknown, f"{script} has no {sorted(unknown)}"
    for doc in DOCS:  # each results page says which script writes it
        assert re.search(r"python bench/\w+\.py", doc.read_text()), doc.name


def test_every_bench_script_named_answers_help():
    """One process for all (torch imported once): each script's --help prints its usage."""
    named = sorted({s for s, _ in _bench_commands()} | set(re.findall(r"bench/\w+\.py", README)))
    driver = textwrap.dedent(
        """
        import contextlib, io, runpy, sys
        for f in sys.argv[1:]:
            sys.argv, out = [f, "--help"], io.StringIO()
            try:
                with contextlib.redirect_stdout(out):
                    runpy.run_path(f, run_name="__main__")
                code = "no exit"
            except SystemExit as e:
                code = e.code
            print(f, code, "usage:" in out.getvalue())
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", driver, *named], cwd=ROOT, capture_output=True, text=True,
        timeout=120, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.split("\n")
    assert sorted(f"{f} 0 True" for f in named) == sorted(x for x in lines if x), done.stdout
    shell = subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_check.sh")])
    assert shell.returncode == 0


# --------------------------------------------------------------------------- requirements


def _imports(paths, *, top_only: bool = False) -> set[str]:
    names: set[str] = set()
    for path in paths:
        tree = ast.parse(path.read_text())
        for node in tree.body if top_only else ast.walk(tree):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    local = {"lorita", "app", "pages", "tests", "bench", "__future__"}
    return {n for n in names - local if n not in sys.stdlib_module_names}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements(path: Path) -> set[str]:
    out = set()
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("-r "):
            out |= _requirements(path.parent / line[3:].strip())
        elif line and not line.startswith("-"):
            out.add(_norm(re.split(r"[<>=!~\[; ]", line)[0]))
    return out


#: import names whose distribution is named otherwise
DISTRIBUTION = {"PIL": "pillow", "sklearn": "scikit-learn", "torch_pruning": "torch-pruning"}
#: the tests' and benches' own helper modules, imported by name from their folder
LOCAL = {
    p.stem for d in ("tests", "tests/app", "tests/e2e", "bench") for p in (ROOT / d).glob("*.py")
}


def _dists(modules: set[str]) -> dict[str, str]:
    return {m: _norm(DISTRIBUTION.get(m, m)) for m in modules - LOCAL}


def test_every_package_the_code_imports_is_in_the_right_requirements_file():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_norm(re.split(r"[<>=!~\[; ]", d)[0]) for d in project["dependencies"]}
    extras = {
        _norm(re.split(r"[<>=!~\[; ]", d)[0])
        for ds in project["optional-dependencies"].values()
        for d in ds
    }
    runtime = _requirements(ROOT / "requirements.txt")
    dev = _requirements(ROOT / "requirements-dev.txt")
    library = list((ROOT / "lorita").rglob("*.py"))
    app = [*(ROOT / "app").glob("*.py"), *(ROOT / "pages").glob("*.py"), ROOT / "streamlit_app.py"]
    tests = list((ROOT / "tests").rglob("*.py"))
    bench = list((ROOT / "bench").glob("*.py"))
    lib = _dists(_imports(library))
    assert set(lib.values()) <= core | extras, set(lib.values()) - core - extras
    # imported when `import lorita` runs: the core dependencies alone
    top = _dists(_imports(library, top_only=True))
    assert set(top.values()) <= core, set(top.values()) - core
    # the library's own optional packages are still in requirements.txt, bar timm (dev only)
    assert set(lib.values()) - {"timm"} <= runtime, set(lib.values()) - runtime
    assert set(_dists(_imports(app)).values()) <= runtime
    assert set(_dists(_imports(tests)).values()) <= dev
    assert set(_dists(_imports(bench)).values()) <= dev
    assert "pillow" in core  # lorita/data.py reads image folders with PIL itself
    pinned = [line for line in (ROOT / "requirements.txt").read_text().splitlines() if "==" in line]
    assert any(line.startswith("torch==") for line in pinned)


def test_onnx_export_without_onnx_says_what_to_install(tmp_path, monkeypatch):
    """It once ended in torch's OnnxExporterError (a traceback from `lorita export`)."""
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if it were not installed
    out = tmp_path / "m.onnx"
    with pytest.raises(ValueError, match=r"needs the optional package onnx \(pip install onnx"):
        lt.export_onnx(torch.nn.Linear(3, 2), torch.randn(1, 3), out)
    assert not list(tmp_path.iterdir())  # nothing written


def test_onnx_export_by_torch_export_without_onnxscript_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(ValueError, match=r"needs the optional package onnxscript"):
        lt.export_onnx(torch.nn.Linear(3, 2), torch.randn(1, 3), tmp_path / "m.onnx", dynamo=True)
    assert not list(tmp_path.iterdir())


def test_cli_export_to_onnx_without_onnx_is_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    from lorita.cli import main

    monkeypatch.setitem(sys.modules, "onnx", None)
    argv = ["export", "no-such-run", "--out", str(tmp_path / "m.onnx"), "--runs-dir", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install onnx" in err, err
    assert "no-such-run" not in err  # said before the run is even looked up


def test_pruning_baseline_without_torch_pruning_says_what_to_install(monkeypatch):
    """It once raised ModuleNotFoundError from inside `lorita compare`; now the pruning rows say
    why (PruneError, as for a network Torch-Pruning cannot prune) and the cuts go on."""
    monkeypatch.setitem(sys.modules, "torch_pruning", None)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    prune = baselines._Pruner(net, torch.randn(1, 4), "params", ["2"])
    with pytest.raises(baselines.PruneError, match=r"pip install torch-pruning"):
        prune(0.5)
