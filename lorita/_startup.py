"""Ctrl-C while ``python -m lorita ...`` is still importing (torch takes seconds) ends the
command as Ctrl-C does later, with one line and exit code 130, not a traceback through
torch's import. Imported first by the package; ``lorita.__main__`` imports the library
(torch with it) for a command and then calls :func:`release`. An ordinary ``import lorita``
is left alone."""

import os
import signal
import sys

_previous = None


def _interrupted(signum, frame):
    """Ends the process here: an exception raised from a signal handler lands in whatever
    import is running, and some imports swallow it (torch imports numpy from its C code and
    carries on when that fails), so the command would go on. Nothing is written yet."""
    try:
        print("lorita: interrupted", file=sys.stderr, flush=True)
    finally:
        os._exit(130)


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
