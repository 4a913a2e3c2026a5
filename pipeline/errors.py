"""The project's expected errors, and how a stage reports them.

An expected error is one the project raises on purpose about something the user
can fix: a params value, a corpus file, a mirror, a checkpoint, the store. Its
message names the bad value and says what to do, so a stage prints that one line
to stderr and exits non-zero; a traceback would only bury it. Anything else is a
bug and keeps its traceback.

    if __name__ == "__main__":
        run_stage(main)
"""

from __future__ import annotations

import sys
from collections.abc import Callable

EXIT_USER_ERROR = 1


class UserError(Exception):
    """Base of every error the project raises on purpose (ParamsError, CorpusError,
    DownloadError, ...): stage entry points print its message without a traceback."""


def run_stage(main: Callable[[], object]) -> None:
    """Run a stage's `main()`: a UserError becomes `error: <message>` on stderr and exit
    status 1; any other exception propagates with its traceback."""
    try:
        main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
