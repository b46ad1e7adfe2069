"""One sentence and a non-zero exit for a bad input of any command-line entry point (the CLI, tools/).

A traceback is for a bug in this code; a missing file, an unknown profile or a malformed value is the
user's to fix, and deserves the one sentence that says what and where. :func:`run_main` runs an entry
point's body and turns any exception into ``PROG: message`` on stderr with exit status 2 (the input could
not be used); ``REFUSAL_RANK_TRACEBACK=1`` shows the traceback instead, for debugging.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Callable

TRACEBACK_ENV = "REFUSAL_RANK_TRACEBACK"
EXIT_BAD_INPUT = 2


def sentence(e: BaseException) -> str:
    """The first line of an exception's message, as one sentence (its type when it has no message)."""
    text = str(e).strip()
    if isinstance(e, KeyError) and e.args:
        text = f"missing key {e.args[0]!r}"
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        text = f"{e.filename}: {e.strerror.lower()}"
    first = text.splitlines()[0] if text else type(e).__name__
    return first if first.endswith((".", "!", "?")) else first + "."


def run_main(prog: str, fn: Callable[..., Any], *args: Any) -> int:
    """``fn(*args)`` as an exit status: its return value (None: 0), or 2 with one sentence on any error."""
    try:
        rc = fn(*args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted.", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every bad input ends in one sentence
        if os.environ.get(TRACEBACK_ENV) == "1":
            raise
        known = type(e).__module__.startswith("refusal_rank") or isinstance(e, (OSError, ValueError))
        what = sentence(e) if known else f"could not run ({type(e).__name__}: {sentence(e)})"
        print(f"{prog}: {what}" + ("" if known else f" Set {TRACEBACK_ENV}=1 for the traceback."), file=sys.stderr)
        return EXIT_BAD_INPUT
    return int(rc or 0)
