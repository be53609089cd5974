"""Preprocessing throughput against the pipeline's ceiling, measured in one run.

Ceiling: SentencePiece's single-thread encode rate on the same documents
(already in memory as UTF-8, nothing read, cleaned or written) times the
number of cores. The rate is the faster of SentencePiece's two ways of
handing back ids, Python lists and int32 buffers (numpy): the pipeline uses
the buffers, which skip making a Python int per token, so a ceiling measured
with lists alone would be too low; the ratio against it is printed too, for
comparison with figures measured that way. Measured: `preprocess` end to end
(reading JSONL, cleaning, dedup, encoding on every core, writing shards;
megatron-core's import, a fixed start-up cost of seconds, is paid before the
clock starts). Prints both and their ratio, and the share of the pipeline's
CPU time spent encoding, which other load on the machine does not skew.

The pipeline encodes long documents in groups of whole lines, which gives the
same ids and runs about 1.3x faster on one core (`data_pipeline/line_encoding.py`).
So the single-thread rate of that encode is measured too, and the end-to-end
rate is printed against it times the cores as well: the stricter ratio, the
one that says how much the pipeline loses to reading, cleaning, writing and
parallelism. The CPU efficiency compares against the cheaper of the encodes.

Also measured: the same whole-document encode over one process per core, all
at once, with nothing else (no reading, cleaning or writing). On a machine
whose cores slow each other down (shared caches, or virtual CPUs sharing a
host) that is below the ceiling, and no pipeline encoding whole documents can
beat it; the end-to-end rate is printed against it too.

    .venv/bin/python -m bench.data_preprocess [--mbytes 24] [--workers N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import sentencepiece as spm

from data_pipeline.cleaning import CleaningConfig
from data_pipeline.corpus import iter_documents
from data_pipeline.line_encoding import LineGroupEncoder
from data_pipeline.preprocess import PreprocessJob, preprocess
from data_pipeline.tokenizer import train_tokenizer


_SHARED: dict = {}  # set before the encode processes fork


def _encode_share(k: int) -> tuple[float, float, int]:
    """Encodes every n-th document from the k-th; returns (start, end, tokens)."""
    sp = spm.SentencePieceProcessor(model_proto=_SHARED["model"])
    share = _SHARED["data"][k::_SHARED["n"]]
    sp.encode(share[:10], num_threads=1, out_type="numpy")  # warm up
    start = time.perf_counter()
    tokens = sum(len(ids) + 1 for ids in sp.encode(share, num_threads=1, out_type="numpy"))
    return start, time.perf_counter(), tokens


def parallel_encode_rate(model: bytes, data: list[bytes], processes: int) -> float:
    """Tokens/s of `processes` single-thread encodes of equal shares, side by side."""
    import multiprocessing as mp

    _SHARED.update(model=model, data=data, n=processes)
    with mp.get_context("fork").Pool(processes) as pool:
        spans = pool.map(_encode_share, range(processes))
    return sum(t for _, _, t in spans) / (max(e for _, e, _ in spans) - min(s for s, _, _ in spans))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mbytes", type=float, default=24.0, help="corpus size in MB")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--vocab-size", type=int, default=4096)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # Real text, repeated with a varying suffix so dedup keeps every copy.
        base = [d.text for d in iter_documents(["stdlib"], 12_000_000)]
        texts, size, copy = [], 0, 0
        while size < args.mbytes * 1e6:
            for text in base:
                texts.append(f"{text}\n# copy {copy}")
                size += len(texts[-1])
                if size >= args.mbytes * 1e6:
                    break
            copy += 1
        with open(root / "corpus.jsonl", "w") as f:
            for text in texts:
                f.write(json.dumps({"text": text}) + "\n")
        tokenizer = train_tokenizer((type("D", (), {"text": t}) for t in base), root / "tok.model",
                                    vocab_size=args.vocab_size, sample_bytes=4_000_000)

        sp = spm.SentencePieceProcessor(model_proto=tokenizer.model_bytes)
        data = [t.encode() for t in texts]
        rates, cpus = {}, {}
        for out_type in (int, "numpy"):
            sp.encode(data[:50], num_threads=1, out_type=out_type)  # warm up
            start, start_cpu = time.perf_counter(), time.process_time()
            tokens = sum(len(ids) + 1 for ids in sp.encode(data, num_threads=1, out_type=out_type))
            rates[out_type] = tokens / (time.perf_counter() - start)
            cpus[out_type] = time.process_time() - start_cpu
        single, encode_cpu = max(rates.values()), min(cpus.values())
        # The pipeline's own way: long documents in line groups (data_pipeline/line_encoding.py).
        grouped = LineGroupEncoder(tokenizer.model_bytes)
        grouped.encode(data[:50])
        start, start_cpu = time.perf_counter(), time.process_time()
        pieces, _ = grouped.encode(data)
        grouped_rate = (sum(len(ids) for ids in pieces) + len(data)) / (time.perf_counter() - start)
        encode_cpu = min(encode_cpu, time.process_time() - start_cpu)
        ceiling = single * args.workers
        side_by_side = parallel_encode_rate(tokenizer.model_bytes, data, args.workers)

        # A one-off start-up cost per process, not throughput: paid before the clock starts.
        import megatron.core.datasets.indexed_dataset  # noqa: F401

        before = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        start, stages = time.perf_counter(), {}
        manifest = preprocess(PreprocessJob([str(root / "corpus.jsonl")], str(tokenizer.path), str(root / "out"),
                                            num_shards=4, workers=args.workers, cleaning=CleaningConfig()),
                              log=lambda *_: None, stage_cpu=stages)
        elapsed = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = [a.ru_utime + a.ru_stime - b.ru_utime - b.ru_stime for a, b in zip(after, before)]
        measured = manifest["tokens"] / elapsed

    print(f"corpus                  {size / 1e6:.1f} MB, {len(texts):,} documents, {tokens:,} tokens")
    print(f"single-thread encode    {single:,.0f} tokens/s (ids as int32 buffers {rates['numpy']:,.0f}, "
          f"as Python lists {rates[int]:,.0f})")
    print(f"ceiling ({args.workers} cores)        {ceiling:,.0f} tokens/s")
    print(f"in line groups          {grouped_rate:,.0f} tokens/s single-thread ({grouped_rate / single:.2f}x the "
          f"whole-document encode; x {args.workers} cores: {grouped_rate * args.workers:,.0f})")
    print(f"encode alone, all cores {side_by_side:,.0f} tokens/s ({side_by_side / ceiling:.3f} of the ceiling: "
          f"{args.workers} encodes side by side, nothing else)")
    print(f"preprocess end to end   {measured:,.0f} tokens/s ({elapsed:.1f} s)")
    print(f"cpu seconds             reading process {cpu[0]:.1f}, workers {cpu[1]:.1f} "
          f"(encode alone would take {tokens / single:.1f}); machine load {os.getloadavg()[0]:.1f}")
    print(f"ratio                   {measured / ceiling:.3f}  (target >= 0.85; against the list rate alone "
          f"{measured / (rates[int] * args.workers):.3f})")
    print(f"ratio to line groups    {measured / (grouped_rate * args.workers):.3f}  (against the single-thread "
          f"encode in line groups x {args.workers} cores: the pipeline's own encode, stricter)")
    print(f"ratio to all-core encode {measured / side_by_side:.3f}  (end to end against the encode alone on all cores)")
    # Less skewed by other load on the machine than the ratio: the share of the pipeline's CPU time that is encoding.
    print(f"cpu efficiency          {encode_cpu / max(sum(cpu), 1e-9):.3f}  (encode cpu {encode_cpu:.1f} s / "
          f"pipeline cpu {sum(cpu):.1f} s)")
    # Where the workers' CPU went. Other load slows the encode itself (shared caches), so the
    # line above moves with it; the encode the workers did in this very run, against the
    # pipeline's CPU in the same run, does not.
    rest = cpu[1] - sum(stages.values())
    print(f"worker cpu by stage     " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items())
          + f", rest (start-up, task and result transfer) {rest:.2f} s")
    print(f"in-run cpu efficiency   {stages['encode'] / max(sum(cpu), 1e-9):.3f}  (the workers' encode cpu / "
          f"pipeline cpu)")


if __name__ == "__main__":
    main()
