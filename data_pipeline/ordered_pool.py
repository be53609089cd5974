"""Worker processes that run a function over a stream of tasks and hand the results back in task order.

Why not `multiprocessing.Pool`: its worker-handler thread also waits on the
result pipe, so it spins for as long as a large result sits half-read there
(about 1% of preprocessing's CPU, taken from the encoding workers), and a
worker that dies (killed, out of memory) leaves it waiting forever.

Here tasks go through one shared queue, so an idle worker takes the next one
and uneven tasks balance themselves; results come back on one pipe that the
calling thread reads itself, while it watches the workers, so a dead worker
is an error rather than a hang. Results are yielded in task order, with at
most `ahead` tasks sent and not yet yielded, so memory stays bounded.
"""

from __future__ import annotations

import pickle
from multiprocessing.connection import wait
from typing import Any, Callable, Iterable, Iterator

_END = object()


class WorkerDied(RuntimeError):
    """A worker process exited while tasks were outstanding."""


def _work(tasks, results, lock, initializer: Callable, initargs: tuple) -> None:
    initializer(*initargs)
    while (task := tasks.get()) is not None:
        index, fn, item = task
        try:
            message = pickle.dumps((index, True, fn(item)), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as err:  # raised again in the calling process
            try:
                message = pickle.dumps((index, False, err), protocol=pickle.HIGHEST_PROTOCOL)
            except Exception:  # an exception that does not pickle: its text does
                message = pickle.dumps((index, False, RuntimeError(f"{type(err).__name__}: {err}")))
        with lock:  # one message at a time on the shared pipe
            results.send_bytes(message)


class OrderedPool:
    def __init__(self, ctx, workers: int, initializer: Callable, initargs: tuple):
        self._tasks = ctx.Queue()  # its feeder thread writes, so putting a task never blocks
        self._stopping = False
        self._reader, writer = ctx.Pipe(duplex=False)
        lock = ctx.Lock()
        self._procs = [ctx.Process(target=_work, args=(self._tasks, writer, lock, initializer, initargs),
                                   daemon=True) for _ in range(workers)]
        for proc in self._procs:
            proc.start()
        writer.close()  # the workers hold it; this process only reads

    def imap(self, fn: Callable[[Any], Any], items: Iterable, ahead: int, last: bool = False) -> Iterator:
        """`fn(item)` of every item, computed by the workers, in item order.

        `last`: no tasks will follow these, so the workers are told to stop as
        soon as the last is sent, and exit (which takes a while for a process
        forked from a large one) while its result is still being used.
        """
        items = iter(items)
        sent = taken = 0
        arrived: dict[int, tuple[bool, Any]] = {}
        exhausted = False
        while True:
            while not exhausted and sent - taken < ahead:
                item = next(items, _END)
                if item is _END:
                    exhausted = True
                    if last:
                        self._stop()
                    break
                self._tasks.put((sent, fn, item))
                sent += 1
            if taken == sent:
                return
            while taken not in arrived:
                index, ok, value = self._receive()
                arrived[index] = ok, value
            ok, value = arrived.pop(taken)
            taken += 1
            if not ok:
                raise value
            yield value

    def _receive(self) -> tuple:
        while True:
            live = []
            for proc in self._procs:  # a worker exits by itself only once told to stop, and then with 0
                if proc.exitcode is None:
                    live.append(proc.sentinel)
                elif proc.exitcode != 0 or not self._stopping:
                    raise WorkerDied(f"a worker process (pid {proc.pid}) exited with code {proc.exitcode} "
                                     "while tasks were outstanding")
            if not live and not self._reader.poll():
                raise WorkerDied("every worker process exited while tasks were outstanding")
            if self._reader in wait([self._reader, *live]):
                try:
                    return self._reader.recv()
                except EOFError:  # every worker has gone: wait for their exit codes, which say why
                    for proc in self._procs:
                        proc.join(5.0)

    def _stop(self) -> None:
        if not self._stopping:
            self._stopping = True
            for _ in self._procs:
                self._tasks.put(None)

    def close(self) -> None:
        """Lets the workers finish their last task and exit."""
        self._stop()
        self._tasks.close()
        self._tasks.join_thread()
        for proc in self._procs:
            proc.join()
        self._reader.close()

    def terminate(self) -> None:
        """Stops the workers now, whatever they are doing."""
        for proc in self._procs:
            proc.terminate()
        for proc in self._procs:
            proc.join()
        self._tasks.cancel_join_thread()
        self._tasks.close()
        self._reader.close()
