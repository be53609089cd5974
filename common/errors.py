"""User errors and the one-line way every command line reports them.

Bad input (a config key, a file, a checkpoint) raises a subclass of
`UserError` whose message names what is wrong and what was expected. Each
entry point catches `UserError` once and exits through `fail`: one line on
stderr, exit status 2, nothing else printed.
"""

from __future__ import annotations

import sys
from typing import NoReturn

# Exit statuses every entry point and job script agrees on.
EXIT_BAD_INPUT = 2
# A run aborted because its loss or gradients stayed non-finite.
EXIT_DIVERGED = 3
# A run stopped by SIGTERM after saving a checkpoint: sysexits.h's EX_TEMPFAIL,
# "temporary failure, the user is invited to retry". A scheduler or job script
# that sees it requeues the job; the rerun resumes.
EXIT_PREEMPTED = 75


class UserError(Exception):
    """Input the user can fix; the message names the key, file or value."""


class TrainingDiverged(RuntimeError):
    """Training cannot continue: the message says at which step and why (exit status 3)."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, or its type when it has none."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def fail(prog: str, message: str) -> NoReturn:
    """`prog: error: message` on stderr, then exit with status 2."""
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_BAD_INPUT)
