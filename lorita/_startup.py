"""Ctrl-C while ``python -m lorita ...`` is still importing (torch takes seconds) ends the
command as Ctrl-C does later, with one line and exit code 130, not a traceback through
torch's import. Imported first by the package, which calls :func:`release` at its end;
an ordinary ``import lorita`` is left alone."""

import signal
import sys

_previous = None


def _interrupted(signum, frame):
    print("lorita: interrupted", file=sys.stderr)
    raise SystemExit(130)


def _running_as_command() -> bool:
    """Whether this import is ``python -m lorita`` finding its main module (Python sets
    sys.argv[0] to "-m" until then)."""
    argv = list(getattr(sys, "orig_argv", []))
    named = any(a == "-m" and b == __package__ for a, b in zip(argv, argv[1:], strict=False))
    return sys.argv[:1] == ["-m"] and named


def release(*, by_main: bool = False) -> None:
    """Give Ctrl-C back to whatever handled it before. For ``python -m lorita`` the package's
    own call leaves it held: ``lorita.__main__`` releases it (``by_main``) once the command's
    module is imported too, so no instant of the start is left to a traceback."""
    global _previous
    if _COMMAND and not by_main:
        return
    if _previous is not None:
        signal.signal(signal.SIGINT, _previous)
        _previous = None


_COMMAND = _running_as_command()
if _COMMAND and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    try:
        _previous = signal.signal(signal.SIGINT, _interrupted)
    except ValueError:  # not the main thread
        _previous = None
