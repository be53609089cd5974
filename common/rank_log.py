"""Each rank's output, also kept in `<run_dir>/logs/rank<r>.log`.

The process's stdout and stderr file descriptors are rerouted through a
`tee -a` child, so the log holds everything the rank prints, including what
C++ code (gloo, NCCL, DeepSpeed's ops) writes, and the launcher still sees the
same stream. The child runs in its own session and ignores the signals a job
receives (SIGTERM on cancel, SIGUSR1 before a time limit): it ends when the
rank's last descriptor closes, after writing everything out, even when the
rank was killed. A restarted or requeued rank appends to the same file.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

_IGNORED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def _ignore_job_signals() -> None:
    for sig in _IGNORED:
        signal.signal(sig, signal.SIG_IGN)


def rank_log_path(run_dir: str | os.PathLike, rank: int) -> Path:
    return Path(run_dir) / "logs" / f"rank{rank}.log"


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
