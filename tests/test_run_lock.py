"""One job at a time in a run directory (`pretrain/checkpoint/run_lock.py`).

The rules in one process, with a fake clock where time matters: taking the
lock, refusing a live holder in one line, taking over from a dead process, a
requeue or restart of the same job, a stale heartbeat on another host, two
jobs racing for one stale lock, releasing and the heartbeat. Then two real
`pretrain` processes on one run directory: the second exits 2 and changes
nothing.
"""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import TINY, child_env, run_pretrain
from pretrain.checkpoint.files import RunDirError
from pretrain.checkpoint.run_lock import (CLAIM_FILE, HEARTBEAT_SECONDS, LOCK_FILE, MISSED_HEARTBEATS, Holder,
                                          RunDirLock, hold_run_dir, job_id, machine_id, this_process)

GRACE = MISSED_HEARTBEATS * HEARTBEAT_SECONDS
NOW = 1_800_000_000.0  # 2027-01-15 08:00:00 UTC


class FakeClock:
    """A clock that moves only when the lock sleeps (or a test moves it)."""

    def __init__(self, now: float = NOW):
        self.now, self.slept = now, 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.slept += seconds


def make_lock(run_dir: Path, clock: FakeClock | None = None, **me) -> RunDirLock:
    clock = clock or FakeClock()
    holder = this_process(clock)
    return RunDirLock(run_dir, clock=clock, sleep=clock.sleep, me=replace(holder, **me) if me else holder)


def other(host: str = "node7", pid: int = 4242, job: str = "", heartbeat: float = NOW, **fields) -> Holder:
    """Another process's holder record; by default on another host, heartbeat fresh."""
    return Holder(host=host, machine=fields.pop("machine", "other-boot/pid:[1]"), pid=pid,
                  pid_start=fields.pop("pid_start", ""), job=job, started=fields.pop("started", NOW - 3600),
                  heartbeat=heartbeat, token=fields.pop("token", f"{pid}.feedfacecafe"))


def write_holder(run_dir: Path, holder: Holder) -> bytes:
    run_dir.mkdir(parents=True, exist_ok=True)
    data = holder.encode()
    (run_dir / LOCK_FILE).write_bytes(data)
    return data


def lock_record(run_dir: Path) -> dict:
    return json.loads((run_dir / LOCK_FILE).read_text())


def dead_pid() -> int:
    """A pid no process of this machine has."""
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text()) if Path("/proc/sys/kernel/pid_max").exists() \
        else 99999
    for pid in range(pid_max - 1, 1, -1):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            continue
    raise AssertionError("no free pid")


def this_machine(pid: int, **fields) -> Holder:
    return other(host=socket.gethostname(), machine=machine_id(), pid=pid, **fields)


# --- taking, refusing, releasing -------------------------------------------------------------

def test_lock_creates_the_run_dir_names_this_process_and_release_removes_it(tmp_path):
    run_dir = tmp_path / "runs" / "new"
    lock = make_lock(run_dir)
    lock.acquire()
    record = lock_record(run_dir)
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    assert record["started"] == record["heartbeat"] == NOW
    assert [p.name for p in run_dir.iterdir()] == [LOCK_FILE]  # no temporary file left
    lock.release()
    assert list(tmp_path.iterdir()) == []  # a run that wrote nothing (bad input) leaves nothing

    lock = make_lock(run_dir)
    lock.acquire()
    (run_dir / "config.yaml").write_text("x")
    lock.release()
    assert [p.name for p in run_dir.iterdir()] == ["config.yaml"]  # the run's outputs stay


def test_a_live_holder_is_refused_in_one_line_naming_host_and_pid(tmp_path):
    first = make_lock(tmp_path, job="567")
    first.acquire()
    held = (tmp_path / LOCK_FILE).read_bytes()
    with pytest.raises(RunDirError) as refused:
        make_lock(tmp_path).acquire()
    message = str(refused.value)
    assert message == (f"trainer.run_dir={tmp_path}: in use by pid {os.getpid()} on host {socket.gethostname()} "
                       "(job 567, since 2027-01-15 08:00:00 UTC); wait for it to end or choose another "
                       "trainer.run_dir")
    assert (tmp_path / LOCK_FILE).read_bytes() == held
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]


def test_a_lock_left_by_a_dead_process_on_this_host_is_taken_over(tmp_path):
    write_holder(tmp_path, this_machine(dead_pid()))
    lock = make_lock(tmp_path)
    lock.acquire()
    assert lock_record(tmp_path)["pid"] == os.getpid()
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]


def test_a_reused_pid_is_not_the_holder(tmp_path):
    # This process's pid, but a process that started at another time held the lock.
    write_holder(tmp_path, this_machine(os.getpid(), pid_start="1"))
    lock = make_lock(tmp_path)
    lock.acquire()
    assert lock_record(tmp_path)["token"] == lock.me.token


def test_a_requeue_on_the_same_host_takes_over_at_once(tmp_path):
    clock = FakeClock()
    write_holder(tmp_path, this_machine(dead_pid(), job="567"))
    make_lock(tmp_path, clock, job="567").acquire()
    assert lock_record(tmp_path)["pid"] == os.getpid() and clock.slept == 0


def test_the_same_job_on_another_host_is_taken_over_once_its_heartbeat_stops(tmp_path):
    # A torchrun restart or Slurm requeue whose rank 0 now runs on another node.
    clock = FakeClock()
    write_holder(tmp_path, other(job="567", heartbeat=NOW - 5))
    make_lock(tmp_path, clock, job="567").acquire()
    assert lock_record(tmp_path)["pid"] == os.getpid()
    assert GRACE <= clock.slept < GRACE + HEARTBEAT_SECONDS


def test_the_same_job_on_another_host_is_refused_while_its_heartbeat_moves(tmp_path):
    clock = FakeClock()
    write_holder(tmp_path, other(job="567", heartbeat=NOW - 5))

    def heartbeat_moves(seconds):
        clock.sleep(seconds)
        write_holder(tmp_path, other(job="567", heartbeat=clock.now))

    lock = RunDirLock(tmp_path, clock=clock, sleep=heartbeat_moves, me=replace(this_process(clock), job="567"))
    with pytest.raises(RunDirError, match="in use by pid 4242 on host node7 \\(job 567"):
        lock.acquire()
    assert lock_record(tmp_path)["pid"] == 4242


def test_another_job_on_another_host_is_refused_until_its_heartbeat_is_stale(tmp_path):
    clock = FakeClock()
    write_holder(tmp_path, other(heartbeat=NOW - GRACE + 1))
    with pytest.raises(RunDirError) as refused:
        make_lock(tmp_path, clock).acquire()
    assert "in use by pid 4242 on host node7 (since " in str(refused.value) and "\n" not in str(refused.value)
    assert clock.slept == 0  # refused at once, no waiting
    clock.now += 2  # its heartbeat is now more than the grace period old
    make_lock(tmp_path, clock).acquire()
    assert lock_record(tmp_path)["pid"] == os.getpid()


def test_an_unreadable_lock_counts_by_its_age(tmp_path):
    (tmp_path / LOCK_FILE).write_text('{"host": "no')  # as a crash half way through a write leaves it
    clock = FakeClock(time.time())
    with pytest.raises(RunDirError, match="in use \\(an unreadable lock"):
        make_lock(tmp_path, clock).acquire()
    old = clock.now - GRACE - 10
    os.utime(tmp_path / LOCK_FILE, (old, old))
    make_lock(tmp_path, clock).acquire()
    assert lock_record(tmp_path)["pid"] == os.getpid()


def test_release_leaves_a_lock_that_is_no_longer_ours(tmp_path):
    lock = make_lock(tmp_path)
    lock.acquire()
    taken = write_holder(tmp_path, other())  # taken over after missed heartbeats
    assert not lock.refresh()  # and the heartbeat does not overwrite it
    lock.release()
    assert (tmp_path / LOCK_FILE).read_bytes() == taken


def test_refresh_moves_the_heartbeat_and_keeps_the_start(tmp_path):
    clock = FakeClock()
    lock = make_lock(tmp_path, clock)
    lock.acquire()
    clock.now += HEARTBEAT_SECONDS
    assert lock.refresh()
    record = lock_record(tmp_path)
    assert record["heartbeat"] == NOW + HEARTBEAT_SECONDS and record["started"] == NOW
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]
    lock.release()


def test_the_heartbeat_thread_refreshes_until_release(tmp_path):
    clock = FakeClock()
    lock = RunDirLock(tmp_path, clock=clock, sleep=clock.sleep, heartbeat_seconds=0.01)
    lock.acquire()
    clock.now += 100
    lock.start_heartbeat()
    for _ in range(10_000):  # polls until the thread has written once
        if lock_record(tmp_path)["heartbeat"] == NOW + 100:
            break
        time.sleep(0.001)
    assert lock_record(tmp_path)["heartbeat"] == NOW + 100
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists() and lock._beating is None


# --- two jobs at once ---------------------------------------------------------------------------

def test_of_two_jobs_taking_over_one_stale_lock_exactly_one_wins(tmp_path):
    stale_raw = write_holder(tmp_path, this_machine(dead_pid()))
    first, second = make_lock(tmp_path), make_lock(tmp_path)
    stale = first.read()
    assert stale.raw == stale_raw and second.read() == stale  # both judged the same dead holder
    assert first._take_over(stale)
    assert not second._take_over(stale)  # the lock it judged is gone; the new one is not touched
    assert lock_record(tmp_path)["token"] == first.me.token
    with pytest.raises(RunDirError, match=f"in use by pid {os.getpid()}"):
        second.acquire()
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]


def test_many_jobs_racing_for_a_stale_lock_leave_one_holder(tmp_path):
    write_holder(tmp_path, this_machine(dead_pid()))
    locks = [RunDirLock(tmp_path) for _ in range(8)]  # the real clock and sleep: real contention
    start, outcomes = threading.Barrier(len(locks)), {}

    def contend(lock):
        start.wait()
        try:
            lock.acquire()
            outcomes[lock.me.token] = "held"
        except RunDirError:
            outcomes[lock.me.token] = "refused"

    threads = [threading.Thread(target=contend, args=(lock,)) for lock in locks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    (winner,) = [token for token, outcome in outcomes.items() if outcome == "held"]
    assert len(outcomes) == len(locks)
    assert lock_record(tmp_path)["token"] == winner
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]


def test_a_claim_left_by_a_job_that_died_taking_over_is_cleared(tmp_path):
    clock = FakeClock()
    write_holder(tmp_path, this_machine(dead_pid()))
    (tmp_path / CLAIM_FILE).write_bytes(this_machine(dead_pid(), heartbeat=NOW - 3600).encode())
    make_lock(tmp_path, clock).acquire()
    assert lock_record(tmp_path)["pid"] == os.getpid()
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]


def test_without_hard_links_the_lock_is_created_exclusively(tmp_path, monkeypatch):
    def no_links(source, target):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    make_lock(tmp_path).acquire()
    assert lock_record(tmp_path)["pid"] == os.getpid()
    with pytest.raises(RunDirError, match=f"in use by pid {os.getpid()}"):
        make_lock(tmp_path).acquire()


# --- the run directory itself -------------------------------------------------------------------

def test_a_run_dir_that_is_a_file_or_below_one_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError) as refused:
        make_lock(tmp_path / "file").acquire()
    assert str(refused.value) == f"trainer.run_dir={tmp_path / 'file'}: a file, expected a directory"
    with pytest.raises(RunDirError) as refused:
        make_lock(tmp_path / "file" / "run").acquire()
    assert str(refused.value) == (f"trainer.run_dir={tmp_path / 'file' / 'run'}: lies below the file "
                                  f"{tmp_path / 'file'}; expected a directory")
    assert (tmp_path / "file").read_text() == "x"


def test_hold_run_dir_is_rank_0s_alone(tmp_path):
    with hold_run_dir(str(tmp_path / "run"), rank=1) as lock:
        assert lock is None and not (tmp_path / "run").exists()
    with hold_run_dir(str(tmp_path / "run"), rank=0) as lock:
        assert lock_record(tmp_path / "run")["token"] == lock.me.token
        with pytest.raises(RunDirError, match=f"in use by pid {os.getpid()}"):
            with hold_run_dir(str(tmp_path / "run"), rank=0):
                pass
    assert not (tmp_path / "run" / LOCK_FILE).exists()  # released on leaving the block
    with pytest.raises(SystemExit):
        with hold_run_dir(str(tmp_path / "run"), rank=0):
            sys.exit(75)  # the preemption exit
    assert not (tmp_path / "run" / LOCK_FILE).exists()


# --- two `pretrain` processes ---------------------------------------------------------------------

@pytest.mark.slow
def test_a_second_pretrain_on_a_busy_run_dir_exits_2_and_changes_nothing(tmp_path, tiny_data_cache):
    run_dir = tmp_path / "run"
    common = (*TINY, f"data.cache_dir={tiny_data_cache}", f"trainer.run_dir={run_dir}", "trainer.eval_interval=0",
              "trainer.log_interval=1", "trainer.checkpoint_interval=0")
    first = subprocess.Popen([sys.executable, "-m", "pretrain.main", *common, "trainer.train_steps=1000000"],
                             cwd=tmp_path, env=child_env({"OMP_NUM_THREADS": "1"}), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output = []
        for line in first.stdout:  # blocks until the run prints: config.yaml is written before step 1
            output.append(line)
            if line.startswith("step      1"):
                break
        assert first.poll() is None, "".join(output)[-3000:]
        assert lock_record(run_dir)["pid"] == first.pid
        config = (run_dir / "config.yaml").read_bytes()

        # Python warnings off: a library's import-time warnings are no part of what `pretrain` says.
        second = run_pretrain(*common, "trainer.train_steps=7", "optim.lr=0.5", cwd=tmp_path,
                              env={"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
        assert second.returncode == 2, second.stderr[-3000:]
        job = job_id(child_env())
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(lock_record(run_dir)["started"]))
        assert second.stderr.splitlines() == [
            f"pretrain: error: trainer.run_dir={run_dir}: in use by pid {first.pid} on host {socket.gethostname()} "
            f"({f'job {job}, ' if job else ''}since {since}); wait for it to end or choose another trainer.run_dir"]
        assert "step " not in second.stdout
        assert (run_dir / "config.yaml").read_bytes() == config  # not the second run's settings
        assert lock_record(run_dir)["pid"] == first.pid
        assert first.poll() is None  # undisturbed

        first.send_signal(signal.SIGTERM)  # the preemption exit releases the lock too
        output.extend(first.stdout)
        assert first.wait(timeout=600) == 75, "".join(output)[-3000:]
        assert not (run_dir / LOCK_FILE).exists()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
