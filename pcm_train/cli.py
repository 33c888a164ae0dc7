"""The frame every ``python -m pcm_train.*`` command shares.

``-h``/``--help`` prints the command's docstring (flag-style commands: argparse's help, which
starts with it); bad input ends with one ``error: ...`` line on stderr and exit status 2; Ctrl-C
exits with 130. The caught errors are ``INPUT_ERRORS`` for every command; ``PCM_TRACEBACK=1`` lets
them propagate with their traceback instead (for debugging).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional, Sequence

# ConfigError, RunDirError and CheckpointError are ValueErrors; FileNotFoundError is an OSError.
INPUT_ERRORS = (ValueError, OSError, KeyError, RuntimeError)


def run_command(doc: str, body: Callable[[list[str]], int], argv: Optional[Sequence[str]] = None, *,
                own_help: bool = True, interrupted: str = "interrupted") -> int:
    """Runs ``body(argv)`` in the frame; returns its exit status (2 on an input error, 130 on Ctrl-C).

    ``own_help=False`` leaves ``-h`` to the body (an ``argument_parser``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if own_help and any(arg in ("-h", "--help") for arg in argv):
        print(doc)
        return 0
    try:
        return body(argv)
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    except INPUT_ERRORS as error:
        if os.environ.get("PCM_TRACEBACK") == "1":
            raise
        print("error: " + " ".join(str(error).split()), file=sys.stderr)
        return 2


def argument_parser(module: str, doc: str) -> argparse.ArgumentParser:
    """argparse for a flag-style command: ``-h`` shows ``doc`` as written, a bad flag gives
    ``python -m module: error: ...`` and exit status 2, as the frame does."""
    return argparse.ArgumentParser(prog=f"python -m {module}", description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
