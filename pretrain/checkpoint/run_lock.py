"""One job at a time in a run directory: `<run_dir>/.lock`, held by rank 0.

The lock file is JSON naming its holder: host, pid, job, when it started and
its heartbeat, which a daemon thread refreshes every `HEARTBEAT_SECONDS`. It
is created atomically on local and NFS/Lustre-style file systems alike: the
record is written to a uniquely named file first, then hard-linked to `.lock`
(`link` is atomic on NFS, where `O_EXCL` was not always; a lost reply is told
from a refusal by the link count). It goes away when the run ends, however it
ends short of SIGKILL (with the run directory itself, if the lock created it
and the run wrote nothing); a lock left behind is taken over when its holder
is known to be gone:

- on this machine (same host name, boot and pid namespace), when its process
  is gone (or its pid now belongs to another process, or a zombie);
- on another machine, when its heartbeat is older than `MISSED_HEARTBEATS`
  heartbeats (by the clocks of both hosts);
- on another machine but of this same job (a Slurm requeue, a torchrun
  restart whose rank 0 moved), after watching it for that long without its
  heartbeat moving.

Anything else is refused in one line naming the holder. Take-overs are
serialised by a second, short-lived claim file, so that of two jobs finding
the same stale lock exactly one gets the run directory.
"""

from __future__ import annotations

import atexit
import errno
import json
import os
import socket
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import torch.distributed as dist

from common.errors import first_line
from pretrain.checkpoint.files import RunDirError, check_run_dir

LOCK_FILE = ".lock"
CLAIM_FILE = ".lock.claim"  # held for the moments a take-over lasts
HEARTBEAT_SECONDS = 30.0
# A heartbeat this many intervals old is a dead holder's. Four rather than three: an NFS
# client may see the lock's directory entry up to a minute late (acdirmax).
MISSED_HEARTBEATS = 4
CLAIM_SECONDS = 60.0  # a claim this old was left by a process that died taking over
ATTEMPTS = 100  # each pass takes the lock, refuses, or saw the lock change while it looked


@dataclass(frozen=True)
class Holder:
    """What a lock file says about the process that holds it."""

    host: str
    machine: str  # boot id and pid namespace: pids are comparable only where these match
    pid: int
    pid_start: str  # the process's start time in clock ticks: a reused pid is not the holder
    job: str  # the Slurm job or torchrun run that holds it; "" for none
    started: float
    heartbeat: float
    token: str  # unique to one acquisition
    raw: bytes = b""  # the file's bytes as read: a take-over removes exactly what it judged

    def encode(self) -> bytes:
        fields = asdict(self)
        del fields["raw"]
        return json.dumps(fields).encode()

    @classmethod
    def decode(cls, raw: bytes, mtime: float) -> Holder:
        try:
            fields = json.loads(raw)
            return cls(host=str(fields["host"]), machine=str(fields["machine"]), pid=int(fields["pid"]),
                       pid_start=str(fields["pid_start"]), job=str(fields["job"]),
                       started=float(fields["started"]), heartbeat=float(fields["heartbeat"]),
                       token=str(fields["token"]), raw=raw)
        except (ValueError, KeyError, TypeError):  # half written (O_EXCL fallback) or damaged
            return cls(host="", machine="", pid=0, pid_start="", job="", started=mtime, heartbeat=mtime,
                       token="", raw=raw)

    def describe(self) -> str:
        if not self.token:
            return f"in use (an unreadable lock, last changed {utc(self.heartbeat)})"
        job = f"job {self.job}, " if self.job else ""
        return f"in use by pid {self.pid} on host {self.host} ({job}since {utc(self.started)})"


def utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


def _read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def machine_id() -> str:
    """This kernel's boot and this process's pid namespace ("" where there is no /proc)."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return f"{_read_text('/proc/sys/kernel/random/boot_id')}/{namespace}".strip("/")


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks) of a process, from /proc; None where unknown."""
    text = _read_text(f"/proc/{pid}/stat")
    fields = text[text.rfind(")") + 2:].split() if text else []
    return (fields[0], fields[19]) if len(fields) > 19 else None


def process_alive(pid: int, pid_start: str) -> bool:
    """Whether process `pid` of this machine is still the one that started at `pid_start`."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's: alive
    stat = _proc_stat(pid)
    if stat is None:
        return True
    state, start = stat
    return state not in ("Z", "X") and (not pid_start or start == pid_start)


def job_id(environ=os.environ) -> str:
    """The job this process belongs to: the Slurm job, or the torchrun run when it has an id."""
    if environ.get("SLURM_JOB_ID"):
        return environ["SLURM_JOB_ID"]
    run_id = environ.get("TORCHELASTIC_RUN_ID", "")
    return f"torchrun {run_id}" if run_id and run_id != "none" else ""


def this_process(clock: Callable[[], float] = time.time) -> Holder:
    pid, now = os.getpid(), clock()
    stat = _proc_stat(pid)
    return Holder(host=socket.gethostname(), machine=machine_id(), pid=pid, pid_start=stat[1] if stat else "",
                  job=job_id(), started=now, heartbeat=now, token=f"{pid}.{uuid.uuid4().hex[:12]}")


class RunDirLock:
    """The lock of one run directory, for one process (rank 0 of a job)."""

    def __init__(self, run_dir: str | os.PathLike, *, heartbeat_seconds: float = HEARTBEAT_SECONDS,
                 clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep,
                 me: Holder | None = None):
        self.run_dir = str(run_dir)
        self.path = Path(run_dir) / LOCK_FILE
        self.claim = Path(run_dir) / CLAIM_FILE
        self.heartbeat_seconds = heartbeat_seconds
        self.grace = MISSED_HEARTBEATS * heartbeat_seconds
        self.clock, self.sleep = clock, sleep
        self.me = me or this_process(clock)
        self.held: bytes | None = None  # the bytes of our lock file while we hold it
        self.created: list[Path] = []  # directories the lock created, deepest first
        self._stop = threading.Event()
        self._beating: threading.Thread | None = None

    # --- taking and giving back ---------------------------------------------------------------

    def acquire(self) -> None:
        """Takes the lock (creating the run directory), or raises RunDirError naming its holder."""
        self._make_dir()
        for _ in range(ATTEMPTS):
            if self._create():
                return
            holder = self.read()
            if holder is None:
                continue  # released as we looked
            verdict = self._judge(holder)
            if verdict == "watch":
                verdict, holder = self._watch(holder)
            if verdict == "refuse":
                raise self.refusal(holder)
            if verdict == "stale" and self._take_over(holder):
                return
        raise RunDirError(f"trainer.run_dir={self.run_dir}: its lock {self.path} kept changing while "
                          "this job tried to take it; another job is starting on it")

    def check_free(self) -> None:
        """Raises the refusal `acquire` would when a live job holds the lock; reads only (for a
        launcher deciding whether it may write into the run directory)."""
        holder = self.read()
        if holder is not None and self._judge(holder) != "stale":
            raise self.refusal(holder)

    def refusal(self, holder: Holder) -> RunDirError:
        return RunDirError(f"trainer.run_dir={self.run_dir}: {holder.describe()}; "
                           "wait for it to end or choose another trainer.run_dir")

    def release(self) -> None:
        """Stops the heartbeat and removes the lock, if it is still ours."""
        self._stop.set()
        if self._beating is not None:
            self._beating.join()
            self._beating = None
        atexit.unregister(self.release)
        if self.held is not None and os.getpid() == self.me.pid:  # never from a forked child
            self._remove_if(self.path, self.held)
            self.held = None
            for directory in self.created:  # a run that wrote nothing leaves nothing behind
                try:
                    directory.rmdir()
                except OSError:  # not empty: the run's outputs
                    break
            self.created = []

    def start_heartbeat(self) -> None:
        """Refreshes the heartbeat from a daemon thread; the lock also goes at interpreter exit."""
        atexit.register(self.release)
        self._stop.clear()
        self._beating = threading.Thread(target=self._beat, name="run-dir-lock", daemon=True)
        self._beating.start()

    def refresh(self) -> bool:
        """Writes a new heartbeat; False (and nothing written) when the lock is no longer ours."""
        if self.held is None or self._read_bytes(self.path) != self.held:
            return False
        self.me = replace(self.me, heartbeat=self.clock())
        data = self.me.encode()
        tmp = self.path.with_name(f"{LOCK_FILE}.{self.me.token}.beat")
        _write(tmp, data)
        os.replace(tmp, self.path)
        self.held = data
        return True

    def read(self) -> Holder | None:
        """The current holder, None when there is no lock."""
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        raw = self._read_bytes(self.path)
        return None if raw is None else Holder.decode(raw, mtime)

    # --- the rules ----------------------------------------------------------------------------

    def _judge(self, holder: Holder) -> str:
        """'refuse', 'stale' (take it over) or 'watch' (ours, elsewhere: wait for its heartbeat)."""
        me = self.me
        if holder.token and holder.host == me.host and holder.machine == me.machine:
            return "refuse" if process_alive(holder.pid, holder.pid_start) else "stale"
        if self.clock() - holder.heartbeat > self.grace:
            return "stale"
        return "watch" if holder.job and holder.job == me.job else "refuse"

    def _watch(self, holder: Holder) -> tuple[str, Holder]:
        """A lock of this job on another machine: the previous attempt's rank 0, gone unless its
        heartbeat moves within the grace period (no clock comparison between hosts involved)."""
        print(f"pretrain: trainer.run_dir={self.run_dir} is locked by pid {holder.pid} on host {holder.host} "
              f"of this job ({holder.job}); waiting up to {self.grace:.0f} s for it to end", file=sys.stderr,
              flush=True)
        deadline = self.clock() + self.grace
        while self.clock() < deadline:
            self.sleep(min(5.0, self.heartbeat_seconds))
            now = self.read()
            if now is None:
                return "retry", holder
            if now.raw != holder.raw:
                return "refuse", now
        return "stale", holder

    def _take_over(self, stale: Holder) -> bool:
        """Replaces `stale` by our lock; False when another job got there first (look again)."""
        claim = replace(self.me, heartbeat=self.clock())
        tmp = self.claim.with_name(f"{CLAIM_FILE}.{self.me.token}")
        _write(tmp, claim.encode())
        try:
            claimed = _link_exclusive(tmp, self.claim)
        finally:
            tmp.unlink(missing_ok=True)
        if not claimed:  # another job is taking over: its lock is there in a moment
            other = self._read_bytes(self.claim)
            since = None if other is None else Holder.decode(other, _mtime(self.claim)).heartbeat
            if since is not None and self.clock() - since > CLAIM_SECONDS:
                self._remove_if(self.claim, other)  # left by a process that died taking over
            else:
                self.sleep(0.1)
            return False
        try:
            # Only a claim holder removes another's lock, so what it judged cannot have become
            # another job's lock in the meantime.
            if self._read_bytes(self.path) != stale.raw or not self._remove_if(self.path, stale.raw):
                return False
            return self._create()
        finally:
            self._remove_if(self.claim, claim.encode())

    # --- files --------------------------------------------------------------------------------

    def _make_dir(self) -> None:
        path = Path(self.run_dir)
        check_run_dir(path)
        missing = [d for d in (path, *path.parents) if not d.exists()]
        try:
            path.mkdir(parents=True, exist_ok=True)
            self.created = missing
        except OSError as err:
            raise RunDirError(f"trainer.run_dir={self.run_dir}: cannot create it ({err.strerror})") from None

    def _create(self) -> bool:
        """Creates our lock if there is none; True when it is ours."""
        self.me = replace(self.me, started=self.clock(), heartbeat=self.clock())
        data = self.me.encode()
        tmp = self.path.with_name(f"{LOCK_FILE}.{self.me.token}.new")
        _write(tmp, data)
        try:
            created = _link_exclusive(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        if created:
            self.held = data
        return created

    def _remove_if(self, path: Path, raw: bytes) -> bool:
        """Removes `path` if it holds exactly `raw`: moved aside under a unique name first, so
        that of two removers one wins, and put back if it turns out to be another's."""
        aside = path.with_name(f"{path.name}.{self.me.token}.gone")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return False
        try:
            if self._read_bytes(aside) == raw:
                return True
            _link_exclusive(aside, path)  # not what we judged: put back unless replaced meanwhile
            return False
        finally:
            aside.unlink(missing_ok=True)

    def _read_bytes(self, path: Path) -> bytes | None:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            try:
                if not self.refresh():
                    print(f"pretrain: warning: {self.path} is no longer this job's lock (taken over after "
                          "missed heartbeats?); another job may be using trainer.run_dir", file=sys.stderr,
                          flush=True)
                    return
            except OSError as err:  # a file system hiccup: try again at the next beat
                print(f"pretrain: warning: cannot refresh {self.path}: {first_line(err)}", file=sys.stderr,
                      flush=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return time.time()


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _link_exclusive(source: Path, target: Path) -> bool:
    """Makes `target` a hard link of `source` unless `target` exists; True when it did."""
    try:
        os.link(source, target)
        return True
    except FileExistsError:
        # NFS: when the reply to a link that happened is lost, the retried call says EEXIST.
        return os.stat(source).st_nlink == 2
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS):
            raise
    try:  # no hard links here (some FUSE file systems): O_EXCL, atomic on NFSv3 and later
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(source.read_bytes())
        f.flush()
        os.fsync(f.fileno())
    return True


@contextmanager
def hold_run_dir(run_dir: str, rank: int) -> Iterator[RunDirLock | None]:
    """Rank 0 takes the run directory's lock and holds it (heartbeat included) until the block
    ends, however it ends; every rank raises the same RunDirError when it is refused."""
    lock = RunDirLock(run_dir) if rank == 0 else None
    error, failure = None, None
    if lock is not None:
        try:
            lock.acquire()
        except RunDirError as err:
            error = str(err)
        except Exception as err:  # told to the other ranks too, so that none waits for rank 0
            error, failure = f"trainer.run_dir={run_dir}: cannot take its lock ({first_line(err)})", err
    if dist.is_initialized() and dist.get_world_size() > 1:
        agreed = [error]
        dist.broadcast_object_list(agreed, src=0)
        error = agreed[0]
    if failure is not None:
        raise failure
    if error is not None:
        raise RunDirError(error)
    try:
        if lock is not None:
            lock.start_heartbeat()
        yield lock
    finally:
        if lock is not None:
            lock.release()
