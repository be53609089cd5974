"""Raw inputs → N token shards (megatron-core `.bin`/`.idx`) + a manifest, on every core.

One process reads raw records (bytes, no parsing) and cuts them into chunks of
about `chunk_bytes`; worker processes decode, clean, hash and encode a chunk
each (SentencePiece with one thread per process: its own threaded batch
encode balances badly on long documents, equal-sized chunks balance well);
the reading process drops duplicate hashes and appends the rest to the shard.
At most two chunks per worker are in flight, so memory stays bounded whatever
the corpus size, and results are taken in input order, so the shards are the
same whatever the number of workers.

Which shard a record goes to depends only on how far through the node's inputs
it lies (by bytes on disk), so a rerun knows each shard's records without
encoding anything: a shard whose `.json` marker exists is skipped, its
hashes reloaded so that later shards deduplicate against it as before.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from data_pipeline.cleaning import (
    CleaningConfig, DataError, Deduplicator, Report, clean_records, content_hash, nbytes,
)
from data_pipeline.indexed import ShardWriter, token_dtype
from data_pipeline.sources import Input, node_share, read_records, resolve_inputs
from data_pipeline.tokenizer import Tokenizer

MANIFEST = "manifest.json"


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


def manifest_name(node_rank: int, num_nodes: int) -> str:
    return MANIFEST if num_nodes == 1 else f"manifest-{node_rank:03d}-of-{num_nodes:03d}.json"


def shard_prefix(output: Path, node_rank: int, num_nodes: int, index: int) -> Path:
    node = "" if num_nodes == 1 else f"{node_rank:03d}-"
    return output / f"shard-{node}{index:05d}"


# --- worker side ----------------------------------------------------------------------------

_worker: dict = {}


def _init_worker(model_bytes: bytes, cfg: CleaningConfig, names: list[str], dtype: str) -> None:
    import sentencepiece as spm

    _worker.update(sp=spm.SentencePieceProcessor(model_proto=model_bytes), cfg=cfg, names=names,
                   dtype=np.dtype(dtype))


def _process_chunk(chunk: tuple[int, list[int], list]) -> tuple:
    shard, sources, records = chunk
    report = Report()
    texts = clean_records(records, _worker["cfg"], _worker["names"], sources, report)
    sizes = [nbytes(t) for t in texts]
    return (shard, report.to_dict(), sizes, *encode_texts(_worker["sp"], texts, _worker["dtype"]))


def encode_texts(sp, texts: list[str], dtype) -> tuple[list[bytes], np.ndarray, np.ndarray]:
    """(content hashes, lengths, concatenated tokens with EOS after each document)."""
    hashes = [content_hash(t) for t in texts]
    ids = sp.encode(texts, num_threads=1)
    eos = sp.eos_id()
    for doc in ids:
        doc.append(eos)
    lengths = np.fromiter((len(d) for d in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter((t for d in ids for t in d), dtype=dtype, count=int(lengths.sum()))
    return hashes, lengths, flat


# --- reading side ---------------------------------------------------------------------------

def _chunks(
    inputs: list[Input], mine: list[int], job: PreprocessJob, finished: set[int],
) -> Iterator[tuple[int, list[int], list]]:
    """Chunks of (shard, input indices, (mode, payload) records), never spanning two shards.

    A record's shard is fixed by how far through the node's inputs it lies: by
    bytes on disk, or by raw bytes read when the corpus has a byte budget.
    """
    sizes = [max(inputs[i].size, 1) for i in mine]
    budget = job.max_bytes
    total = float(budget or sum(sizes))
    start, consumed = 0.0, 0
    n = job.num_shards
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
            consumed += len(record.payload)
            s = min(n - 1, int(where / total * n))
            if s != shard or nbytes >= job.chunk_bytes:
                if records:
                    yield shard, sources, records
                shard, sources, records, nbytes = s, [], [], 0
            if s in finished:
                continue
            sources.append(i)
            records.append((record.mode, record.payload))
            nbytes += len(record.payload)
        if records:
            yield shard, sources, records
        start += size


def preprocess(job: PreprocessJob, log: Callable[[str], None] = print) -> dict:
    """Runs (or finishes) one node's share of a preprocessing job; returns its manifest."""
    output = Path(job.output)
    tokenizer = Tokenizer(job.tokenizer)
    manifest_path = output / manifest_name(job.node_rank, job.num_nodes)
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
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
    ctx = mp.get_context("fork" if hasattr(os, "fork") else "spawn")
    pool = ctx.Pool(workers, _init_worker,
                    (tokenizer.model_bytes, job.cleaning, [x.name for x in inputs], np.dtype(dtype).name))
    pending: deque = deque()
    try:
        chunks = _chunks(inputs, mine, job, set(done))
        while True:
            while len(pending) < 2 * workers:
                chunk = next(chunks, None)
                if chunk is None:
                    break
                pending.append(pool.apply_async(_process_chunk, (chunk,)))
            if not pending:
                break
            shard, report, sizes, hashes, lengths, flat = pending.popleft().get()
            advance_to(shard)
            _append(state, dedup, Report.from_dict(report), sizes, hashes, lengths, flat)
        advance_to(job.num_shards)
    except BaseException:
        pool.terminate()
        if state["writer"] is not None:
            state["writer"].abort()
        raise
    pool.close()
    pool.join()

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


def _append(state: dict, dedup: Deduplicator, report: Report, sizes: list[int],
            hashes: list[bytes], lengths: np.ndarray, flat: np.ndarray) -> None:
    writer: ShardWriter = state["writer"]
    stage = report.stages["dedup"]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    for k, digest in enumerate(hashes):
        doc = flat[offsets[k]:offsets[k + 1]]
        stage.docs_in += 1
        stage.bytes_in += sizes[k]
        if dedup.keep(digest):
            stage.docs_out += 1
            stage.bytes_out += sizes[k]
            writer.add(doc)
            state["hashes"].append(digest)
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
