"""The streaming mode's loader for one data-parallel rank: prefetching workers, exact resume.

Rank r of D with W loader workers runs streams r·W' .. r·W' + W' - 1 of
N = D·W' (W' = max(1, W); see `streaming.py` for how streams split the
records). Its micro-batches come from its streams in turn (0, 1, .., W'-1,
0, ..), each stream in its own torch DataLoader worker process (W > 0) or in
the training process (W = 0, the same batches). Every batch arrives with its
stream's state after it, and the loader keeps, per stream, the state of the
last batch it handed out: batches prefetched but not yet used are produced
again after a resume, never lost or skipped.

`state_dict()` is collective over the data-parallel group (every rank calls
it, as every rank saves a checkpoint) and returns the state of all ranks:

    {"kind": "streaming", "dp_size": D, "workers": W, "num_streams": N,
     "streams": [N stream states, by stream id],   # see streaming.fresh_state
     "batches": [micro-batches handed out, per rank],
     "frontier": null | positions of an earlier layout (see below)}

Each rank's `load_state_dict` takes its own streams from it. Guarantees:

- Same D and W: every rank's next batch is the one the uninterrupted run
  would have produced (bit-exact).
- Same N = D·W' (e.g. 2 ranks × 2 workers → 4 ranks × 1): every stream
  continues exactly; only which rank runs it changes.
- Different N: no record of the pass is trained on twice or skipped. The
  new streams start at the earliest saved position and skip every record
  an old stream had already taken (the saved positions, kept as the
  "frontier" until every stream has passed them); tokens an old stream had
  read but not yet emitted go, in stream order, to new stream j mod N.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from common.errors import first_line
from data_pipeline.cleaning import DataError, Report
from data_pipeline.corpus import CorpusError
from data_pipeline.dataset import DataParallelLoader, collate
from data_pipeline.streaming import StreamSpec, fresh_state, stream_batches

POSITION_KEYS = ("epoch", "record", "input", "in_input", "nbytes")


def _as_is(item):
    return item


class _RankStreams(torch.utils.data.IterableDataset):
    """One rank's streams; DataLoader worker k runs `roles[k]`."""

    def __init__(self, spec: StreamSpec, num_streams: int, roles: list, frontier, micro_batch_size: int):
        self.spec, self.num_streams, self.roles = spec, num_streams, roles
        self.frontier, self.micro_batch_size = frontier, micro_batch_size

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        stream, local, state = self.roles[info.id if info is not None else 0]
        try:
            for block, delta in stream_batches(self.spec, stream, self.num_streams, state, self.frontier,
                                               self.micro_batch_size):
                yield "batch", local, block, delta
        except (CorpusError, OSError) as err:  # bad input: reported by the training process
            yield "error", local, first_line(err), None


class StreamingLoader:
    """Endless micro-batches for one data-parallel rank of a stream; `state_dict` resumes exactly."""

    def __init__(self, spec: StreamSpec, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 group=None, prefetch: int = 2):
        self.spec = spec
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size, self.group = dp_rank, dp_size, group
        self.prefetch = prefetch
        self.per_rank = max(1, spec.workers)
        self.num_streams = dp_size * self.per_rank
        self._set_streams([fresh_state() for _ in range(self.per_rank)], batches=0, frontier=None)
        self._iterator = None

    def _set_streams(self, streams: list[dict], batches: int, frontier) -> None:
        self.states = [{k: v for k, v in s.items() if k != "seen"} for s in streams]
        self.seen = [[s["seen"]] for s in streams]  # chunks of 16-byte hashes, joined when saved
        self.batches, self.frontier = batches, frontier

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._iterator is None:
            self._iterator = self._start()
        kind, local, block, delta = next(self._iterator)
        if kind == "error":
            self.close()
            raise DataError(block)
        assert local == self.batches % self.per_rank, "streams must take turns"
        if delta.pop("reset_seen"):
            self.seen[local] = []
        self.seen[local].append(delta.pop("seen"))
        self.states[local] = delta
        self.batches += 1
        return collate(list(block), self.spec.eod)

    def _start(self):
        # Stream `first` is next; the new iterator's worker 0 runs it.
        first = self.batches % self.per_rank
        order = [(first + k) % self.per_rank for k in range(self.per_rank)]
        roles = [(self.dp_rank * self.per_rank + local, local, self._stream_state(local)) for local in order]
        streams = _RankStreams(self.spec, self.num_streams, roles, self.frontier, self.micro_batch_size)
        if self.spec.workers == 0:
            return iter(streams)
        import multiprocessing

        context = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        return iter(torch.utils.data.DataLoader(
            streams, batch_size=None, num_workers=self.spec.workers, collate_fn=_as_is,
            prefetch_factor=self.prefetch, multiprocessing_context=context))

    def close(self) -> None:
        """Stops the worker processes (a later batch starts them again from the kept state)."""
        shutdown = getattr(self._iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self._iterator = None

    def _stream_state(self, local: int) -> dict:
        return {**self.states[local], "seen": b"".join(self.seen[local])}

    def report(self) -> Report:
        """Cleaning counts of this rank's streams (bad records skipped, duplicates dropped, ...)."""
        total = Report()
        for state in self.states:
            total.add(Report.from_dict(state["report"]))
        return total

    def local_state(self) -> dict[str, Any]:
        return {"dp_rank": self.dp_rank, "workers": self.spec.workers, "batches": self.batches,
                "streams": [self._stream_state(k) for k in range(self.per_rank)], "frontier": self.frontier}

    def state_dict(self) -> dict[str, Any]:
        """The state of every rank (collective over the data-parallel group when there are several)."""
        ranks = [self.local_state()]
        if self.dp_size > 1:
            ranks = [None] * self.dp_size
            dist.all_gather_object(ranks, self.local_state(), group=self.group)
        return merge_rank_states(ranks)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "streaming":
            raise DataError("loader state in the checkpoint is not a streaming one; expected a checkpoint "
                            "written with data.streaming=true")
        self.close()
        mine = slice(self.dp_rank * self.per_rank, (self.dp_rank + 1) * self.per_rank)
        if state["num_streams"] == self.num_streams:
            same_ranks = state["dp_size"] == self.dp_size
            self._set_streams(state["streams"][mine], state["batches"][self.dp_rank] if same_ranks else 0,
                              state["frontier"])
        else:
            streams, frontier = reshard(state, self.num_streams)
            self._set_streams(streams[mine], 0, frontier)


def _key(stream: dict) -> tuple[int, int]:
    return (stream["epoch"], stream["record"])


def _frontier_end(frontier: dict | None) -> tuple[int, int]:
    end = (0, 0)
    while frontier is not None:
        end = max([end] + [tuple(p) for p in frontier["positions"]])
        frontier = frontier["inner"]
    return end


def merge_rank_states(ranks: list[dict]) -> dict[str, Any]:
    """The global state from every rank's `local_state()`."""
    ranks = sorted(ranks, key=lambda r: r["dp_rank"])
    streams = [s for r in ranks for s in r["streams"]]
    frontier = ranks[0]["frontier"]
    if frontier is not None and min(_key(s) for s in streams) >= _frontier_end(frontier):
        frontier = None  # every stream is past the records the earlier layout had taken
    return {"kind": "streaming", "dp_size": len(ranks), "workers": ranks[0]["workers"],
            "num_streams": len(streams), "streams": streams, "batches": [r["batches"] for r in ranks],
            "frontier": frontier}


def reshard(state: dict, num_streams: int) -> tuple[list[dict], dict]:
    """New streams for a different N: (their states, the frontier they must respect)."""
    olds = state["streams"]
    start = min(olds, key=_key)
    frontier = {"num_streams": len(olds), "positions": [list(_key(s)) for s in olds], "inner": state["frontier"]}
    seen = b"".join(s["seen"] for s in olds if s["epoch"] == start["epoch"])
    news = []
    for t in range(num_streams):
        buffer, shared = [], False
        for old in olds[t::num_streams]:
            if not old["buffer"]:
                continue
            if buffer:  # its first token was already a target when it is shared: not again
                buffer.extend(old["buffer"][1:] if old["shared"] else old["buffer"])
            else:
                buffer, shared = list(old["buffer"]), old["shared"]
        news.append({**{k: start[k] for k in POSITION_KEYS}, "buffer": buffer, "shared": shared,
                     "samples": 0, "seen": seen, "report": Report().to_dict()})
    total = Report()
    for old in olds:
        total.add(Report.from_dict(old["report"]))
    news[0].update(report=total.to_dict(), samples=sum(s["samples"] for s in olds))
    return news, frontier


def build_train_loader(train, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1, group=None):
    """The training loader of either mode: a stream, or an indexed (packed, seeded) dataset."""
    if isinstance(train, StreamSpec):
        return StreamingLoader(train, micro_batch_size, dp_rank, dp_size, group)
    return DataParallelLoader(train, micro_batch_size, dp_rank, dp_size)
