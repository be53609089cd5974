"""What a run shows on the console: its own lines, and third-party output only where it matters.

Before a run's first line, DeepSpeed, megatron-core, torch and the compilers
they start print plenty: the accelerator they picked, gcc command lines, op
builds, fallbacks for libraries a CPU run does not use. `quiet()` sends all of
that to the run's log (`<run_dir>/logs/rank<r>.log`) and keeps on the console

- every line this project prints (`print` in its packages, the one-line
  `prog: error: ...`), also copied into the log;
- third-party Python warnings and log records at WARNING or above, except the
  known-harmless ones listed in `HARMLESS_WARNINGS` and `HARMLESS_RECORDS`;
- tracebacks, a debugger's session, and W&B's `wandb:` lines (logger=wandb).

How: file descriptors 1 and 2, which C/C++ code and child processes (gcc,
ninja) write to, are pointed at the log, and `sys.stdout`/`sys.stderr` become
`Router`s that send each write to the console (the original descriptors,
duplicated) or only to the log, by who writes it. The log may be opened only
once the run directory's lock is held (`common.rank_log.rank_log`, entered
under the lock); until `keep_log` names it, the output waits in an anonymous
temporary file, copied to the head of the log then. A job the lock refuses
writes nothing into the run directory, and one that refuses to start before
writing anything takes its log back (`forget_log`).

`trainer.verbose=true` leaves the streams alone: everything reaches the
console as it is printed.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path
from types import FrameType
from typing import TextIO

# Top-level modules whose writes are the project's own lines.
OWN_PACKAGES = frozenset({"common", "pretrain", "parallel", "data_pipeline", "launch", "bench",
                          "__main__", "__mp_main__"})
# Modules whose writes are shown whoever calls them: error reports (a traceback,
# Hydra's report of an exception), interactive debugging, and the `wandb:` lines of the
# metrics sink a user chose with logger=wandb (where the run is, how to sync it).
SHOWN_MODULES = frozenset({"traceback", "hydra", "pdb", "bdb", "cmd", "code", "wandb"})
# Output helpers that write for their caller (W&B writes through click.echo).
HELPER_MODULES = frozenset({"click"})

# Third-party warnings known to be harmless here: they go to the log only.
HARMLESS_WARNINGS = tuple(re.compile(p) for p in (
    # megatron-core falls back to its own kernels; this project uses neither library.
    r"Transformer Engine and Apex are not installed",
    # megatron-core's TransformerConfig converting its own default for cuda_graph_scope.
    r"full scope is deprecated",
    # torch's check, tripped because DeepSpeed wraps optimizer.step after the schedule is built.
    r"Seems like `optimizer\.step\(\)` has been overridden after learning rate scheduler",
))
# Third-party log records at WARNING or above known to be harmless: (logger name, message).
HARMLESS_RECORDS = tuple((name, re.compile(p)) for name, p in (
    # DeepSpeed on a machine without a GPU: the CPU accelerator is what a CPU run wants.
    ("DeepSpeed", r"Setting accelerator to CPU"),
))

_ROOT = Path(__file__).resolve().parent.parent  # the repository, holding OWN_PACKAGES
_state: dict = {}  # set by quiet(): the console streams, the waiting output's descriptor or the log


class Router:
    """`sys.stdout` or `sys.stderr` while quiet: the project's lines to the console and the log,
    the rest to the log only (`sink`, the original stream, whose descriptor now points there)."""

    def __init__(self, console: TextIO, sink: TextIO):
        self.console = console
        self.sink = sink

    def write(self, text: str) -> int:
        if _shown(sys._getframe(1)):
            self.show(text)
        else:
            self.sink.write(text)
        return len(text)

    def show(self, text: str) -> None:
        self.console.write(text)
        if "\r" not in text:  # a line redrawn in place (the progress bar) stays off the log
            self.sink.write(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        for stream in (self.console, self.sink):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe at exit
                pass

    def isatty(self) -> bool:  # the project's progress bar is drawn where its lines go
        return self.console.isatty()

    def fileno(self) -> int:  # os.write(sys.stdout.fileno(), ...) is third-party output
        return self.sink.fileno()

    def __getattr__(self, name: str):  # encoding, errors, buffer, ...
        return getattr(self.sink, name)


class RecordHandler(logging.Handler):
    """The root logger's handler while quiet: every record into the log, through stdout's
    descriptor (DeepSpeed points stderr's elsewhere while it compiles a test program), and
    the ones that matter on the console's stderr too."""

    def __init__(self, console: TextIO, sink: TextIO):
        super().__init__()
        self.console = console
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record) + "\n"
            if record_shown(record):
                self.console.write(text)
            self.sink.write(text)
        except Exception:  # as logging.StreamHandler: report, never raise into the caller
            self.handleError(record)


def _shown(frame: FrameType | None) -> bool:
    """Whether a write made from `frame` belongs on the console."""
    # Stream wrappers pass writes on (the progress line, W&B's console capture, which
    # replaces sys.stdout.write), and so do output helpers: the writer is their caller.
    while frame is not None and (frame.f_code.co_name.lstrip("_").startswith("write")
                                 or frame.f_globals.get("__name__", "").partition(".")[0] in HELPER_MODULES):
        frame = frame.f_back
    if frame is None:  # no Python caller: the interpreter reporting an uncaught exception
        return True
    module = frame.f_globals.get("__name__", "")
    top = module.partition(".")[0]
    if top in OWN_PACKAGES or top in SHOWN_MODULES:
        return True
    if module == "logging" and frame.f_code.co_name == "emit":  # any handler writing to sys.std*
        record = frame.f_locals.get("record")
        return isinstance(record, logging.LogRecord) and record_shown(record)
    return False


def record_shown(record: logging.LogRecord) -> bool:
    if record.levelno < logging.WARNING:
        return False
    top = record.name.partition(".")[0]
    if top in OWN_PACKAGES:
        return True
    message = record.getMessage()
    return not any(record.name == name and pattern.search(message) for name, pattern in HARMLESS_RECORDS)


def warning_shown(message: Warning | str, filename: str) -> bool:
    try:
        if Path(filename).resolve().relative_to(_ROOT).parts[0] in OWN_PACKAGES:
            return True  # this project's own
    except (ValueError, IndexError):  # elsewhere (site-packages, the standard library)
        pass
    return not any(pattern.search(str(message)) for pattern in HARMLESS_WARNINGS)


def _showwarning(message, category, filename, lineno, file=None, line=None) -> None:
    text = warnings.formatwarning(message, category, filename, lineno, line)
    if file is not None:  # an explicit destination
        file.write(text)
    elif isinstance(sys.stderr, Router) and not warning_shown(message, filename):
        sys.stderr.sink.write(text)
    elif isinstance(sys.stderr, Router):
        sys.stderr.show(text)
    else:
        sys.stderr.write(text)


def is_quiet() -> bool:
    return bool(_state)


def quiet() -> None:
    """From here on, only the project's lines and the warnings that matter reach the console;
    everything else waits for `keep_log`. Idempotent. Streams someone else has replaced
    (a test harness capturing them, an application embedding this one) are left alone."""
    if _state or sys.stdout is not sys.__stdout__ or sys.stderr is not sys.__stderr__:
        return
    try:
        sys.stdout.fileno(), sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # no descriptors to take over
        return
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    consoles = [open(os.dup(stream.fileno()), "w", buffering=1, encoding=stream.encoding,
                     errors=stream.errors, closefd=True) for stream in (sys.stdout, sys.stderr)]
    buffer = _anonymous_file()
    os.dup2(buffer, 1)
    os.dup2(buffer, 2)
    originals = (sys.stdout, sys.stderr)
    for stream in originals:  # the log follows the console line by line
        stream.reconfigure(line_buffering=True)
    sys.stdout, sys.stderr = Router(consoles[0], originals[0]), Router(consoles[1], originals[1])
    _state.update(buffer=buffer, consoles=consoles)
    # Log handlers made before now (torch's) write through the routers, which look at each
    # record's level; handlers made later find the routers in sys.stdout/sys.stderr. The root
    # logger's console handler (Hydra's job logging: bare messages on stdout) becomes one that
    # names the level and the logger, on stderr: on the console, only warnings and errors.
    root = logging.getLogger()
    for handler in root.handlers[:]:
        if isinstance(handler, logging.StreamHandler) and handler.stream in originals:
            root.removeHandler(handler)
    records = RecordHandler(consoles[1], originals[0])
    records.setFormatter(logging.Formatter("[%(asctime)s] %(levelname)s %(name)s: %(message)s"))
    root.addHandler(records)
    for logger in logging.Logger.manager.loggerDict.values():
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, logging.StreamHandler) and handler.stream in originals:
                handler.setStream(sys.stdout if handler.stream is originals[0] else sys.stderr)
    warnings.showwarning = _showwarning
    # A crash in C code (a segfault, an abort) still shows where Python was.
    faulthandler.enable(file=consoles[1], all_threads=True)


def keep_log(path: str | os.PathLike) -> None:
    """Appends what waited since `quiet()` to `path`, and sends the output there from now on
    (from another run's log, for the next run of a multirun in this process)."""
    path = Path(path)
    if not _state or _state.get("log", (None,))[0] == path:
        return
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    made_dir = not path.parent.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    size = path.stat().st_size if path.exists() else None
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    buffer, offset = _state.pop("buffer", None), 0
    while buffer is not None and (chunk := os.pread(buffer, 1 << 20, offset)):
        os.write(log, chunk)
        offset += len(chunk)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    if buffer is not None:
        os.close(buffer)
    _state["log"] = (path, size, made_dir)


def forget_log() -> None:
    """Undoes `keep_log` for a run that refused to start (bad input, found once its lock was
    held): the log is removed, or cut back to what an earlier run left, and the output goes
    back to an anonymous file. The run directory is then as the run found it."""
    if "log" not in _state:
        return
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    buffer = _anonymous_file()
    os.dup2(buffer, 1)
    os.dup2(buffer, 2)
    path, size, made_dir = _state.pop("log")
    _state["buffer"] = buffer
    try:
        if size is None:
            path.unlink()
            if made_dir:
                path.parent.rmdir()
        else:
            os.truncate(path, size)
    except OSError:  # changed meanwhile (another process's output): leave it
        pass


def _anonymous_file() -> int:
    descriptor, name = tempfile.mkstemp(prefix="pretrain-output-", suffix=".log")
    os.unlink(name)  # gone with the process unless keep_log copies it
    return descriptor
