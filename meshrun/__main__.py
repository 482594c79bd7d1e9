"""The ``meshrun`` program: ``python -m meshrun`` and the installed ``meshrun`` script
(``meshrun.__main__:program``)."""

import os
import sys

from ._cliclient import SERVED, call, enabled, start  # standard library only


def program() -> int:
    """The ``meshrun`` program (the installed script and ``python -m meshrun``). A command the warm server
    answers loads nothing of the CLI here, and this process ends the moment the answer comes: it has nothing
    left for the interpreter's teardown to do (a few milliseconds of every command). Anything else is
    ``meshrun._cli.main``."""
    argv = sys.argv[1:]
    served = bool(argv) and argv[0] in SERVED and enabled()
    if served:
        rc = call(argv)
        if rc is not None:
            _end(rc)
    from ._cli import main

    if not served:
        rc = main(argv)
        if argv and argv[0] in READING and _idle():
            _end(rc)
        return rc
    try:
        return main(argv)  # a list: not handed to the server again
    finally:
        start()  # warm for the next command


#: the everyday reading commands: what they wrote is committed (the store) or closed (files) before they return,
#: so when they answered from this machine's records alone (see _idle) they end without the teardown too
READING = frozenset({"ls", "status", "logs", "wait", "cancel", "gpus"})


def _idle() -> bool:
    """Nothing but this thread is left that a teardown would wait for or close: no backend was loaded (a
    remote one may hold a connection to close) and no other thread runs."""
    threading = sys.modules.get("threading")
    return "meshrun._registry" not in sys.modules and (threading is None or threading.active_count() == 1)


def _end(rc: object) -> None:
    """End this process with ``rc`` now: flush what it printed and skip the interpreter's teardown (a few
    milliseconds: every module's cleanup), which has nothing left to do here."""
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except (OSError, ValueError, AttributeError):
            pass
    os._exit(rc if isinstance(rc, int) and 0 <= rc < 256 else 1)


if __name__ == "__main__":
    sys.exit(program())
