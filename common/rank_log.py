"""Each rank's output, also kept in `<run_dir>/logs/rank<r>.log`.

The process's stdout and stderr file descriptors are rerouted through a
`tee -a` child, so the log holds everything the rank prints, including what
C++ code (gloo, NCCL, DeepSpeed's ops) writes, and the launcher still sees the
same stream. The child runs in its own session and ignores the signals a job
receives (SIGTERM on cancel, SIGUSR1 before a time limit): it ends when the
rank's last descriptor closes, after writing everything out, even when the
rank was killed. A restarted or requeued rank appends to the same file.

That is the verbose mode (`trainer.verbose=true`), where the console shows
everything too. By default the console shows only the project's lines and
the warnings that matter (`common.console`): the log then takes the file
descriptors themselves, no `tee` needed, and every rank keeps one, a
single-process run included.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from common import console
from common.errors import UserError

_IGNORED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def _ignore_job_signals() -> None:
    for sig in _IGNORED:
        signal.signal(sig, signal.SIG_IGN)


def rank_log_path(run_dir: str | os.PathLike, rank: int) -> Path:
    return Path(run_dir) / "logs" / f"rank{rank}.log"


@contextmanager
def rank_log(run_dir: str | os.PathLike, rank: int, launched: bool) -> Iterator[None]:
    """This rank's output in `<run_dir>/logs/rank<r>.log` for the block (and what waited for it
    since `console.quiet()`). Enter it only while the run directory's lock is held. In the
    default console mode, a run that refuses to start (bad input found under the lock, e.g. an
    empty corpus, a checkpoint of another tokenizer) before it has written anything takes the
    log back with it, leaving its directory as it found it; after any other end the log stays."""
    path = rank_log_path(run_dir, rank)
    before = _entries(run_dir)
    if console.is_quiet():
        console.keep_log(path)
    elif launched:  # verbose: a launched rank's console is a pipe; tee it
        tee_output(path)
    try:
        yield
    except (UserError, FileNotFoundError):  # what `pretrain` reports as bad input
        if _entries(run_dir) == before:
            console.forget_log()
        raise


def _entries(run_dir: str | os.PathLike) -> dict[str, int]:
    """The run directory's entries and their modification times, its log and its lock aside:
    they change when the run writes a file (config.yaml, metrics, a checkpoint)."""
    try:
        return {e.name: e.stat(follow_symlinks=False).st_mtime_ns for e in os.scandir(run_dir)
                if e.name != "logs" and not e.name.startswith(".lock")}
    except OSError:
        return {}


def tee_output(path: Path) -> bool:
    """Starts copying this process's output into `path`; False where there is no `tee`."""
    if shutil.which("tee") is None:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
        fd = stream.fileno()
        original = os.dup(fd)
        read_end, write_end = os.pipe()
        subprocess.Popen(["tee", "-a", str(path)], stdin=read_end, stdout=original,
                         start_new_session=True, preexec_fn=_ignore_job_signals)
        os.dup2(write_end, fd)
        for spare in (read_end, write_end, original):
            os.close(spare)
    # Lines reach the log (and the launcher) as they are printed, not in 8 KB blocks.
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    return True
