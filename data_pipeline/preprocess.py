"""Raw inputs → N token shards (megatron-core `.bin`/`.idx`) + a manifest, on every core.

One process reads raw records (bytes, no parsing) and cuts them into chunks of
at most `chunk_bytes` (smaller towards the end of the input, so that the
workers finish together); worker processes decode, clean, hash and encode a
chunk each (SentencePiece with one thread per process: its own threaded batch
encode balances badly on long documents, small chunks from one shared queue
balance well; long documents are encoded in line groups where that gives the
same ids, see `line_encoding`); the reading process drops duplicate hashes and appends the rest
to the shard. At most `AHEAD_PER_WORKER` chunks per worker are in flight, so
memory stays bounded whatever the corpus size, and results are taken in input
order, so the shards are the same whatever the number of workers or chunking.

Which shard a record goes to depends only on how far through the node's inputs
it lies (by bytes on disk), so a rerun knows each shard's records without
encoding anything: a shard whose `.json` marker exists is skipped, its
hashes reloaded so that later shards deduplicate against it as before.

Deduplication is exact across the nodes of a multi-node job too (node k of
K preprocesses its share of the inputs). Two phases: each node first cleans
and hashes its share (no encoding) and writes `dedup-k-of-K.npz`, the hash of
every document it has and the first input holding it; then, once every
node's file exists, a node drops each document that another node has in an
earlier input. Every input belongs to one node, so "earlier" is the global
input order and the documents kept by all nodes together are exactly those
a single node would keep. `phase="hashes"` runs the first phase alone (e.g.
as its own job step), so that no node waits on another.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from common.paths import file_above
from data_pipeline.cleaning import (
    CleaningConfig, DataError, Deduplicator, Report, bytes_hash, clean_records,
)
from data_pipeline.indexed import ShardWriter, token_dtype
from data_pipeline.line_encoding import LineGroupEncoder
from data_pipeline.node_dedup import load_node_hashes, node_hashes_path, other_nodes_first, save_node_hashes
from data_pipeline.ordered_pool import OrderedPool
from data_pipeline.shards import read_manifest
from data_pipeline.sources import Input, node_share, read_records, resolve_inputs
from data_pipeline.tokenizer import Tokenizer

MANIFEST = "manifest.json"
WORKER_STAGES = ("clean", "hash", "encode", "pack")
# Chunks in flight per worker: enough that the others stay busy while the reading
# process waits on a chunk holding one very long document (several times the usual work).
AHEAD_PER_WORKER = 4
# The smallest chunk cut towards the end of the input, as a fraction of `chunk_bytes`.
_TAIL_FRACTION = 1 / 32


@dataclass
class PreprocessJob:
    inputs: list[str]
    tokenizer: str
    output: str
    num_shards: int = 1
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    node_rank: int = 0
    num_nodes: int = 1
    cleaning: CleaningConfig = field(default_factory=CleaningConfig)
    chunk_bytes: int = 1 << 18
    max_bytes: int | None = None  # stop after this many raw bytes (a corpus budget)
    node_wait_s: float = 7 * 24 * 3600.0  # how long to wait for the other nodes' hashes


def manifest_name(node_rank: int, num_nodes: int) -> str:
    return MANIFEST if num_nodes == 1 else f"manifest-{node_rank:03d}-of-{num_nodes:03d}.json"


def shard_prefix(output: Path, node_rank: int, num_nodes: int, index: int) -> Path:
    node = "" if num_nodes == 1 else f"{node_rank:03d}-"
    return output / f"shard-{node}{index:05d}"


# --- worker side ----------------------------------------------------------------------------

_worker: dict = {}


def _init_worker(model_bytes: bytes, cfg: CleaningConfig, names: list[str], dtype: str) -> None:
    _worker.update(encoder=LineGroupEncoder(model_bytes), cfg=cfg, names=names, dtype=np.dtype(dtype))


def _hash_chunk(chunk: tuple[int, list[int], list]) -> tuple[list[bytes], list[int]]:
    """(content hashes, input index) of the documents of a chunk that survive cleaning."""
    _, sources, records = chunk
    kept: list[int] = []
    data: list[bytes] = []
    clean_records(records, _worker["cfg"], _worker["names"], sources, Report(), kept, data)
    return [bytes_hash(d) for d in data], kept


def _process_chunk(chunk: tuple[int, list[int], list]) -> tuple:
    shard, sources, records = chunk
    clock = time.process_time
    started = clock()
    report = Report()
    data: list[bytes] = []
    clean_records(records, _worker["cfg"], _worker["names"], sources, report, kept_bytes=data)
    cleaned = clock()
    hashes = [bytes_hash(d) for d in data]
    hashed = clock()
    encoder = _worker["encoder"]
    pieces, counts = encoder.encode(data)
    encoded = clock()
    lengths, flat = pack_ids(pieces, counts, encoder.eos_id(), _worker["dtype"])
    cpu = (cleaned - started, hashed - cleaned, encoded - hashed, clock() - encoded)
    return shard, report.to_dict(), [len(d) for d in data], hashes, lengths, flat, cpu


def pack_ids(pieces: list[np.ndarray], counts: list[int], eos: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """(lengths, the documents' ids end to end with EOS after each), each cast once into place.

    `pieces` are int32 id arrays (SentencePiece hands them back as buffers, so no
    Python int is made per token); document i is the next `counts[i]` of them.
    """
    sizes = np.fromiter((len(piece) for piece in pieces), dtype=np.int64, count=len(pieces))
    starts = np.cumsum(counts) - counts
    lengths = np.add.reduceat(sizes, starts) + 1 if len(counts) else np.zeros(0, np.int64)
    end_of_document = np.array([eos], dtype=np.int32)
    parts: list[np.ndarray] = []
    first = 0
    for count in counts:
        parts.extend(pieces[first:first + count])
        parts.append(end_of_document)
        first += count
    flat = np.concatenate(parts, dtype=dtype, casting="unsafe") if parts else np.zeros(0, dtype)
    return lengths, flat


# --- reading side ---------------------------------------------------------------------------

def _chunks(
    inputs: list[Input], mine: list[int], job: PreprocessJob, finished: set[int],
) -> Iterator[tuple[int, list[int], list]]:
    """Chunks of (shard, input indices, (mode, payload) records), never spanning two shards.

    A record's shard is fixed by how far through the node's inputs it lies: by
    bytes on disk, or by raw bytes read when the corpus has a byte budget.
    A chunk is cut before the record that would take it past `chunk_bytes`,
    and past a share of what is left once little is, so that every worker has
    work until the end; chunking changes no output.
    """
    sizes = [max(inputs[i].size, 1) for i in mine]
    budget = job.max_bytes
    total = float(budget or sum(sizes))
    start, consumed = 0.0, 0
    n = job.num_shards
    share = 1.0 / (AHEAD_PER_WORKER * max(1, job.workers))
    smallest = job.chunk_bytes * _TAIL_FRACTION
    for i, size in zip(mine, sizes):
        first, last = int(start / total * n), min(n - 1, int((start + size) / total * n))
        if budget is None and all(s in finished for s in range(first, last + 1)):
            start += size
            continue  # nothing of this input needs encoding
        shard, sources, records, nbytes = -1, [], [], 0
        for record in read_records(i, inputs[i], job.cleaning.text_field):
            if budget is not None and consumed >= budget:
                break
            where = consumed if budget is not None else start + record.position * size
            length = len(record.payload)
            consumed += length
            s = min(n - 1, int(where / total * n))
            if s != shard or (records and nbytes + length > min(
                    job.chunk_bytes, max(smallest, (total - where) * share))):
                if records:
                    yield shard, sources, records
                shard, sources, records, nbytes = s, [], [], 0
            if s in finished:
                continue
            sources.append(i)
            records.append((record.mode, record.payload))
            nbytes += length
        if records:
            yield shard, sources, records
        start += size


def preprocess(job: PreprocessJob, log: Callable[[str], None] = print, phase: str = "all",
               stage_cpu: dict[str, float] | None = None) -> dict:
    """Runs (or finishes) one node's share of a preprocessing job; returns its manifest.

    `phase="hashes"` only writes this node's document hashes for cross-node
    deduplication (see the module docstring) and returns {"hashes": path}.
    `stage_cpu`, if given, receives the CPU seconds the workers spent in each
    stage of encoding, summed over workers (`WORKER_STAGES`).
    """
    if phase not in ("all", "hashes"):
        raise ValueError(f"phase={phase!r}: expected 'all' or 'hashes'")
    output = Path(job.output)
    if output.exists() and not output.is_dir():
        raise DataError(f"{output}: exists and is not a directory")
    blocking = file_above(output)
    if blocking is not None:
        raise DataError(f"{output}: lies below the file {blocking}; expected a directory")
    tokenizer = Tokenizer(job.tokenizer)
    manifest_path = output / manifest_name(job.node_rank, job.num_nodes)
    if manifest_path.is_file():
        manifest = read_manifest(manifest_path)
        check_tokenizer(manifest, manifest_path, tokenizer)
        log(f"preprocess: {manifest_path} already complete")
        return manifest
    inputs = resolve_inputs(job.inputs)
    mine = node_share(inputs, job.node_rank, job.num_nodes)
    dtype = token_dtype(tokenizer.vocab_size)
    prefixes = [shard_prefix(output, job.node_rank, job.num_nodes, s) for s in range(job.num_shards)]
    output.mkdir(parents=True, exist_ok=True)
    for stale in output.glob(f".{prefixes[0].name[:-5]}*.tmp*"):
        stale.unlink()  # left by a killed run of this node
    done = {s: json.loads(Path(f"{p}.json").read_text()) for s, p in enumerate(prefixes)
            if Path(f"{p}.json").is_file()}
    for s, meta in done.items():
        check_tokenizer(meta, Path(f"{prefixes[s]}.json"), tokenizer)
    if done:
        log(f"preprocess: {len(done)} of {job.num_shards} shards already complete")

    dedup = Deduplicator(job.cleaning.dedup)
    state = {"shard": -1, "writer": None, "report": Report(), "hashes": []}

    def advance_to(shard: int) -> None:
        """Closes the open shard and accounts for every shard up to `shard`."""
        while state["shard"] < shard:
            if state["writer"] is not None:
                _commit(state, prefixes[state["shard"]], tokenizer)
            state["shard"] += 1
            s = state["shard"]
            if s in done:
                dedup.seen.update(_load_hashes(prefixes[s]))
            elif s < job.num_shards:
                state.update(writer=ShardWriter(prefixes[s], dtype), report=Report(), hashes=[])

    # megatron-core's import (torch and all) takes seconds: done before the workers
    # start, so that it neither stalls the pipeline nor runs in every worker.
    import megatron.core.datasets.indexed_dataset  # noqa: F401

    workers = max(1, job.workers)
    ahead = AHEAD_PER_WORKER * workers
    ctx = mp.get_context("fork" if hasattr(os, "fork") else "spawn")
    pool = OrderedPool(ctx, workers, _init_worker,
                       (tokenizer.model_bytes, job.cleaning, [x.name for x in inputs], np.dtype(dtype).name))
    try:
        if job.num_nodes > 1 and job.cleaning.dedup:
            hashes_path = _write_node_hashes(job, inputs, mine, output, pool, ahead, log)
            if phase == "hashes":
                pool.close()
                return {"hashes": str(hashes_path)}
            dedup.seen.update(_other_nodes_first(job, inputs, output, log))
        stage_cpu = {} if stage_cpu is None else stage_cpu
        stage_cpu.update(dict.fromkeys(WORKER_STAGES, 0.0))
        for shard, report, sizes, hashes, lengths, flat, cpu in pool.imap(
                _process_chunk, _chunks(inputs, mine, job, set(done)), ahead, last=True):
            for stage, seconds in zip(WORKER_STAGES, cpu):
                stage_cpu[stage] += seconds
            advance_to(shard)
            _append(state, dedup, Report.from_dict(report), sizes, hashes, lengths, flat)
        advance_to(job.num_shards)
    except BaseException:
        pool.terminate()
        if state["writer"] is not None:
            state["writer"].abort()
        raise
    pool.close()

    shards = [json.loads(Path(f"{p}.json").read_text()) | {"prefix": p.name} for p in prefixes]
    total = Report()
    for meta in shards:
        total.add(Report.from_dict(meta["report"]))
    documents = sum(m["documents"] for m in shards)
    if documents == 0:
        for p in prefixes:
            for suffix in (".bin", ".idx", ".json", ".hashes.npy"):
                Path(f"{p}{suffix}").unlink(missing_ok=True)
        names = ", ".join(inputs[i].name for i in mine) or ", ".join(job.inputs)
        raise DataError(f"{names}: no non-empty documents left after cleaning")
    manifest = {
        "inputs": [inputs[i].name for i in mine],
        "node_rank": job.node_rank,
        "num_nodes": job.num_nodes,
        "documents": documents,
        "tokens": sum(m["tokens"] for m in shards),
        "dtype": np.dtype(dtype).name,
        "tokenizer": str(tokenizer.path),
        "tokenizer_hash": tokenizer.hash,
        "vocab_size": tokenizer.vocab_size,
        "cleaning": asdict(job.cleaning),
        "report": total.to_dict(),
        "shards": [{k: m[k] for k in ("prefix", "documents", "tokens")} for m in shards],
    }
    write_json(manifest_path, manifest)
    log(f"preprocess: {documents:,} documents, {manifest['tokens']:,} tokens in "
        f"{job.num_shards} shards under {output}")
    return manifest


# --- cross-node deduplication (the hash files: `node_dedup`) ----------------------------------

def _job_key(job: PreprocessJob, inputs: list[Input]) -> str:
    """What a hashes file depends on: the inputs, their split over nodes, cleaning and budget."""
    import hashlib

    key = json.dumps([[x.name for x in inputs], job.num_nodes, asdict(job.cleaning), job.max_bytes])
    return hashlib.sha256(key.encode()).hexdigest()


def _write_node_hashes(job: PreprocessJob, inputs: list[Input], mine: list[int], output: Path,
                       pool: OrderedPool, ahead: int, log: Callable[[str], None]) -> Path:
    """Phase one: every document hash of this node's share with the first input holding it."""
    path = node_hashes_path(output, job.node_rank, job.num_nodes)
    if path.is_file() and load_node_hashes(path, _job_key(job, inputs)) is not None:
        return path  # written by an earlier run of this node
    first: dict[bytes, int] = {}
    for digests, sources in pool.imap(_hash_chunk, _chunks(inputs, mine, job, set()), ahead):
        for digest, source in zip(digests, sources):
            first.setdefault(digest, source)  # chunks arrive in input order
    save_node_hashes(path, first, _job_key(job, inputs))
    log(f"preprocess: {len(first):,} document hashes of node {job.node_rank} written to {path}")
    return path


def _other_nodes_first(job: PreprocessJob, inputs: list[Input], output: Path,
                       log: Callable[[str], None]) -> set[bytes]:
    """Phase two: hashes of this node's documents that another node has in an earlier input."""
    return other_nodes_first(output, _job_key(job, inputs), job.node_rank, job.num_nodes, job.node_wait_s, log)


def _append(state: dict, dedup: Deduplicator, report: Report, sizes: list[int],
            hashes: list[bytes], lengths: np.ndarray, flat: np.ndarray) -> None:
    stage = report.stages["dedup"]
    keep = np.ones(len(hashes), dtype=bool)
    for k, digest in enumerate(hashes):
        stage.enter(sizes[k])
        if dedup.keep(digest):
            stage.leave(sizes[k])
            state["hashes"].append(digest)
        else:
            keep[k] = False
    if not keep.all():
        flat, lengths = flat[np.repeat(keep, lengths)], lengths[keep]
    state["writer"].add_documents(flat, lengths)
    state["report"].add(report)


def _commit(state: dict, prefix: Path, tokenizer: Tokenizer) -> None:
    writer: ShardWriter = state["writer"]
    hashes = np.frombuffer(b"".join(state["hashes"]), dtype=np.uint8).reshape(-1, 16)
    tmp = prefix.with_name(f".{prefix.name}.tmp{os.getpid()}.hashes.npy")
    np.save(tmp, hashes)
    writer.commit()
    os.replace(tmp, f"{prefix}.hashes.npy")
    # The marker goes last: a shard whose .json exists is complete.
    write_json(Path(f"{prefix}.json"), {"documents": writer.documents, "tokens": writer.tokens,
                                        "tokenizer_hash": tokenizer.hash,
                                        "report": state["report"].to_dict()})
    state["writer"] = None


def _load_hashes(prefix: Path) -> list[bytes]:
    path = Path(f"{prefix}.hashes.npy")
    if not path.is_file():
        raise DataError(f"{path}: missing; delete {prefix}.json to rebuild the shard")
    return [row.tobytes() for row in np.load(path)]


def check_tokenizer(meta: dict, path: Path, tokenizer: Tokenizer) -> None:
    if meta.get("tokenizer_hash") != tokenizer.hash:
        raise DataError(f"{path}: written with tokenizer {str(meta.get('tokenizer_hash'))[:12]}, "
                        f"but {tokenizer.path} is {tokenizer.hash[:12]}")


def write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)
