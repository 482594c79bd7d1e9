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
            for f in (sys.stdout, sys.stderr):
                try:
                    f.flush()
                except (OSError, ValueError, AttributeError):
                    pass
            os._exit(rc if 0 <= rc < 256 else 1)
    from ._cli import main

    if not served:
        return main(argv)
    try:
        return main(argv)  # a list: not handed to the server again
    finally:
        start()  # warm for the next command


if __name__ == "__main__":
    sys.exit(program())
