"""The app's one-time set-up (app/boot.py) and the Streamlit internals it relies on."""

from __future__ import annotations

import ast
import inspect

from app_seed import ROOT

from app import boot


def test_folder_mode_flag_still_exists_in_this_streamlit():
    """app.boot.leave_folder_mode flips this flag; an upgrade that moves it must fail here."""
    manager = boot.folder_mode_flag()
    from streamlit.runtime.scriptrunner import script_runner

    # the script runner still chooses the legacy folder mode by this very flag
    assert "PagesManager.uses_pages_directory" in inspect.getsource(script_runner)
    assert manager.uses_pages_directory in (None, True, False)


def test_server_threads_from_the_environment(monkeypatch):
    monkeypatch.delenv(boot.THREADS_ENV, raising=False)
    assert boot.server_threads() == 1
    monkeypatch.setenv(boot.THREADS_ENV, "3")
    assert boot.server_threads() == 3
    monkeypatch.setenv(boot.THREADS_ENV, "many")
    assert boot.server_threads() == 1


def test_a_numeric_setting_says_what_is_wrong_and_what_it_uses(monkeypatch):
    monkeypatch.delenv("LORITA_X", raising=False)
    assert boot.env_int("LORITA_X", 4, 1) == (4, None)
    for raw, want in (("7", (7, None)), (" 2 ", (2, None)), ("", (4, None))):
        monkeypatch.setenv("LORITA_X", raw)
        assert boot.env_int("LORITA_X", 4, 1) == want, raw
    monkeypatch.setenv("LORITA_X", "0")
    assert boot.env_int("LORITA_X", 4, 1) == (1, "$LORITA_X='0' is not a whole number ≥ 1; using 1")
    monkeypatch.setenv("LORITA_X", "2.5")
    value, said = boot.env_int("LORITA_X", 4, 0, 19)
    assert value == 4 and said == "$LORITA_X='2.5' is not a whole number from 0 to 19; using 4"


def test_configure_threads_sets_torch(monkeypatch):
    import torch

    before = torch.get_num_threads()
    monkeypatch.setenv(boot.THREADS_ENV, "1")
    try:
        assert boot.configure_threads() == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_leave_folder_mode_is_a_no_op_outside_a_served_session():
    manager = boot.folder_mode_flag()
    before = manager.uses_pages_directory
    boot.leave_folder_mode()  # no script run context here: nothing to do, no rerun raised
    assert manager.uses_pages_directory == before


class _GoneSession:
    """A served script run whose browser session has already gone."""

    session_id = "gone"


def test_leave_folder_mode_when_the_first_session_has_gone(monkeypatch):
    """The first visitor reloads (or closes the tab) while the heavy imports run: the server
    still leaves folder mode, so the next visit straight to /train gets the navigation."""
    from streamlit import runtime
    from streamlit.runtime import Runtime
    from streamlit.runtime.scriptrunner_utils import script_run_context

    served = Runtime.__new__(Runtime)  # the server's own Runtime class, not AppTest's mock
    monkeypatch.setattr(served, "is_active_session", lambda session_id: False, raising=False)
    monkeypatch.setattr(runtime, "exists", lambda: True)
    monkeypatch.setattr(Runtime, "_instance", served)
    monkeypatch.setattr(
        script_run_context, "get_script_run_ctx", lambda suppress_warning=False: _GoneSession()
    )
    manager = boot.folder_mode_flag()
    monkeypatch.setattr(manager, "uses_pages_directory", True)
    boot.leave_folder_mode()  # no session to rerun: no RerunException either
    assert manager.uses_pages_directory is False


def _imports(path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


def test_pages_hold_no_set_up_and_import_only_app_lorita_streamlit():
    for page in sorted((ROOT / "pages").glob("*.py")):
        text = page.read_text()
        assert "leave_folder_mode" not in text and "set_page_config" not in text, page.name
        assert "state.init()" not in text, page.name
        extra = _imports(page) - {"__future__", "app", "lorita", "streamlit"}
        assert not extra, f"{page.name} imports {sorted(extra)}"


def test_freeze_heap_takes_the_imported_objects_out_of_the_collectors_walk():
    import gc

    from app import boot

    before = len(gc.get_objects())
    try:
        frozen = boot.freeze_heap()
        assert frozen >= 0.9 * before  # everything alive now is frozen...
        assert len(gc.get_objects()) < 0.1 * before  # ...so a full collection walks the rest
    finally:
        gc.unfreeze()
