"""Streaming mode: sharding over ranks and workers, exact resume, resizing, validation, bad input."""

import json
import pickle

import numpy as np
import pytest

from conftest import TINY, run_pretrain
from data_pipeline.cleaning import CleaningConfig, DataError, Report, content_hash
from data_pipeline.corpus import Document
from data_pipeline.dataset import DataParallelLoader, EodOptions, PackedSequenceDataset, fixed_batches
from data_pipeline.sources import resolve_inputs
from data_pipeline.stream_loader import StreamingLoader, build_train_loader, merge_rank_states
from data_pipeline.streaming import HeldOutSamples, Position, StreamSpec, is_held_out, stream_documents
from data_pipeline.tokenizer import train_tokenizer

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()
SEQ, MB = 16, 2


def make_docs(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(2, 14))) + f" doc{seed}x{i}" for i in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two JSONL files and a text file: 91 distinct documents; a tokenizer trained on them."""
    root = tmp_path_factory.mktemp("stream")
    docs = make_docs(60, 0) + make_docs(30, 1)
    (root / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:60]))
    (root / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[60:]))
    (root / "c.txt").write_text("one text file is one document")
    docs.append("one text file is one document")
    tokenizer = train_tokenizer([Document("d", d) for d in docs], root / "tok.model", vocab_size=320)
    return root, docs, tokenizer


def spec_of(corpus, workers=0, sources=None, **kw) -> StreamSpec:
    root, _, tokenizer = corpus
    sources = sources or [str(root / "a.jsonl"), str(root / "b.jsonl"), str(root / "c.txt")]
    kw.setdefault("valid_fraction", 0.1)
    return StreamSpec(tuple(resolve_inputs(sources)), tokenizer.model_bytes, SEQ, workers=workers,
                      eod=kw.pop("eod", EodOptions(tokenizer.eos_id)), **kw)


def documents(spec, stream, num_streams, start=Position(), seen=None, frontier=None, split="train"):
    return [(p, text) for p, text, _ in stream_documents(spec, stream, num_streams, start,
                                                           set() if seen is None else seen, Report(),
                                                           frontier, split)]


def packed(tokenizer, texts: list[str], buffer=(), passes: int = 1) -> list[np.ndarray]:
    """Reference packing: tokens (after `buffer`) with EOS per document, cut into micro-batches."""
    tokens = list(buffer) + [t for _ in range(passes) for d in texts for t in tokenizer.encode([d])[0] + [2]]
    samples = [tokens[i * SEQ:i * SEQ + SEQ + 1] for i in range((len(tokens) - 1) // SEQ)]
    return [np.array(samples[i:i + MB]) for i in range(0, len(samples) - MB + 1, MB)]


def take(loader, n: int) -> list[np.ndarray]:
    out = []
    for _ in range(n):
        batch = next(loader)
        out.append(np.concatenate([batch["tokens"].numpy(), batch["labels"][:, -1:].numpy()], 1))
    return out


@pytest.mark.slow  # loader worker processes
def test_streams_split_ranks_and_workers_without_overlap(corpus):
    _, docs, tokenizer = corpus
    spec = spec_of(corpus)
    train = [d for d in docs if not is_held_out(content_hash(d), 0.1)]
    held_out = [text for _, text in documents(spec, 0, 1, split="valid")]
    assert 0 < len(held_out) < 20 and sorted(held_out + train) == sorted(docs)
    for dp in (1, 2, 3, 4):
        for workers in (0, 1, 2):
            n = dp * max(1, workers)
            shares = [[text for _, text in documents(spec, s, n)] for s in range(n)]
            assert sorted(sum(shares, [])) == sorted(train), (dp, workers)  # each document once
            loaders = [StreamingLoader(spec_of(corpus, workers), MB, r, dp) for r in range(dp)]
            for r, loader in enumerate(loaders):
                # Stream k of the rank serves micro-batches k, k + W, ...: exactly its packed documents,
                # into the second pass.
                per = max(1, workers)
                want = [packed(tokenizer, shares[r * per + k], passes=2) for k in range(per)]
                count = per * min(len(w) for w in want)
                got = take(loader, count)
                for i, batch in enumerate(got):
                    assert np.array_equal(batch, want[i % per][i // per]), (dp, workers, r, i)
                loader.close()


def test_builder_stream_reads_like_the_files(corpus):
    root, docs, _ = corpus
    spec = spec_of(corpus, sources=[f"builder:json:{root}/*.jsonl"])
    assert sorted(t for s in range(3) for _, t in documents(spec, s, 3)) == \
        sorted(d for d in docs[:90] if not is_held_out(content_hash(d), 0.1))


@pytest.mark.slow  # loader worker processes
def test_resume_is_exact_with_worker_prefetch_and_across_passes(corpus):
    _, _, tokenizer = corpus
    eod = EodOptions(tokenizer.eos_id, mask_loss=True, reset_position_ids=True)
    spec = spec_of(corpus, workers=2, eod=eod)
    straight = [StreamingLoader(spec, MB, r, 2) for r in range(2)]
    want = [[next(x) for _ in range(34)] for x in straight]  # past the end of the first pass
    first = [StreamingLoader(spec, MB, r, 2) for r in range(2)]
    for loader in first:
        for _ in range(5):
            next(loader)  # the workers have prefetched further than this
    state = pickle.loads(pickle.dumps(merge_rank_states([x.local_state() for x in first])))
    assert state["kind"] == "streaming" and state["num_streams"] == 4 and state["batches"] == [5, 5]
    for r in range(2):
        resumed = StreamingLoader(spec, MB, r, 2)
        resumed.load_state_dict(state)
        for step in range(5, 34):
            got = next(resumed)
            assert got.keys() == want[r][step].keys()
            assert all(np.array_equal(got[k], want[r][step][k]) for k in got), (r, step)
        resumed.close()
    assert all(s["epoch"] >= 1 for s in merge_rank_states([x.local_state() for x in straight])["streams"])
    # Workers in the training process (0) give the same stream as one worker process.
    inline = StreamingLoader(spec_of(corpus, workers=0), MB, 1, 2)
    one = StreamingLoader(spec_of(corpus, workers=1), MB, 1, 2)
    assert all(np.array_equal(a, b) for a, b in zip(take(inline, 6), take(one, 6)))
    for loader in straight + first + [one]:
        loader.close()


@pytest.mark.slow  # preprocess() runs its worker processes
def test_indexed_resume_is_exact_and_resizes(corpus, tmp_path):
    from data_pipeline.preprocess import PreprocessJob, preprocess
    from data_pipeline.shards import open_corpus

    root, _, tokenizer = corpus
    preprocess(PreprocessJob([str(root)], str(tokenizer.path), str(tmp_path), workers=1), log=lambda *_: None)
    dataset = PackedSequenceDataset(open_corpus(tmp_path, tokenizer), SEQ, seed=3)
    loaders = [build_train_loader(dataset, 3, r, 2) for r in range(2)]
    assert isinstance(loaders[0], DataParallelLoader)
    seen = [tuple(row) for _ in range(4) for x in loaders for row in take(x, 1)[0].tolist()]
    state = loaders[0].state_dict()
    assert state == loaders[1].state_dict() == {"consumed_samples": 24, "seq_len": SEQ}
    resumed = build_train_loader(dataset, 3, 1, 2)
    resumed.load_state_dict(state)
    assert np.array_equal(take(resumed, 1)[0], take(loaders[1], 1)[0])
    # Resized to 3 ranks (same global batch of 6): the epoch goes on, nothing repeated or skipped.
    for _ in range(3):
        for r in range(3):
            x = build_train_loader(dataset, 2, r, 3)
            x.load_state_dict(state)
            seen += [tuple(row) for row in take(x, 1)[0].tolist()]
        state = {"consumed_samples": state["consumed_samples"] + 6}
    assert sorted(seen) == sorted(tuple(dataset[i]) for i in range(42))
    with pytest.raises(DataError, match="is a streaming one"):
        resumed.load_state_dict({"kind": "streaming"})
    # A long-context stage (4x the sequence length) continues at the same token position:
    # in the unshuffled order, its first sample starts where the 24 saved samples ended.
    in_order = PackedSequenceDataset(open_corpus(tmp_path, tokenizer), SEQ, seed=3, shuffle=False)
    longer = PackedSequenceDataset(open_corpus(tmp_path, tokenizer), 4 * SEQ, seed=3, shuffle=False)
    stage = build_train_loader(longer, 1, 0, 1)
    stage.load_state_dict(build_train_loader(in_order, 3, 0, 2).state_dict() | {"consumed_samples": 24})
    assert stage.consumed_samples == 6
    assert np.array_equal(take(stage, 1)[0][0, :SEQ], in_order[24][:SEQ])


@pytest.mark.slow  # loader worker processes
def test_resize_trains_every_record_once(corpus):
    _, docs, tokenizer = corpus
    spec = spec_of(corpus)
    train = sorted(d for d in docs if not is_held_out(content_hash(d), 0.1))
    old = [StreamingLoader(spec, MB, r, 2) for r in range(2)]  # N = 2 streams
    for loader, steps in zip(old, (3, 5)):  # the ranks stop at different points of their streams
        take(loader, steps)
    state = merge_rank_states([x.local_state() for x in old])
    # Same number of streams (2 ranks x 1 -> 1 rank x 2 workers): each stream goes on exactly.
    same = StreamingLoader(spec_of(corpus, workers=2), MB, 0, 1)
    same.load_state_dict(state)
    after = take(same, 4)
    assert np.array_equal(after[0], take(old[0], 1)[0]) and np.array_equal(after[1], take(old[1], 1)[0])
    same.close()

    # 2 streams -> 3 ranks x 2 workers = 6 streams: no record twice, none skipped, buffers carried.
    read = []
    for s, saved in enumerate(state["streams"]):
        read += [t for p, t in documents(spec, s, 2) if p.key <= (saved["epoch"], saved["record"])]
    new = [StreamingLoader(spec_of(corpus, workers=2), MB, r, 3) for r in range(3)]
    for loader in new:
        loader.load_state_dict(state)
    start = min(state["streams"], key=lambda s: (s["epoch"], s["record"]))
    frontier = new[0].frontier
    assert frontier["positions"] == [[s["epoch"], s["record"]] for s in state["streams"]]
    rest = [[t for _, t in documents(spec, s, 6, Position(0, start["record"], start["input"], start["in_input"],
                                                             start["nbytes"]), frontier=frontier)]
            for s in range(6)]
    assert sorted(read + sum(rest, [])) == train
    for r, loader in enumerate(new):
        got = take(loader, 4)
        for k in range(2):
            carried = state["streams"][2 * r + k]["buffer"] if 2 * r + k < 2 else []
            want = packed(tokenizer, rest[2 * r + k], buffer=carried)
            assert np.array_equal(got[k], want[0]) and np.array_equal(got[k + 2], want[1]), (r, k)
    merged = merge_rank_states([x.local_state() for x in new])
    assert merged["frontier"] is not None and merged["dp_size"] == 3 and len(merged["streams"]) == 6
    for loader in new:
        take(loader, 12)  # every stream passes the old positions: the frontier is no longer needed
        loader.close()
    assert merge_rank_states([x.local_state() for x in new])["frontier"] is None


def test_held_out_validation_batches_are_fixed(corpus):
    spec = spec_of(corpus, valid_fraction=0.3)
    held_out = {text for _, text in documents(spec, 0, 1, split="valid")}
    first = fixed_batches(HeldOutSamples(spec), 2, 3, 0, 2)
    again = fixed_batches(HeldOutSamples(spec), 2, 3, 0, 2)
    assert all(np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(first, again))
    samples = HeldOutSamples(spec)
    text = corpus[2].decode(np.concatenate([samples[i][:-1] for i in range(12)]))
    assert any(doc in text for doc in held_out)
    assert not any(doc in text for doc in corpus[1] if doc not in held_out)
    with pytest.raises(DataError, match="too few held-out documents"):
        HeldOutSamples(spec_of(corpus, valid_fraction=1e-9))[0]


@pytest.mark.slow  # loader worker processes
def test_bad_records_are_counted_or_fail_in_one_line(corpus, tmp_path):
    root, docs, _ = corpus
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe not utf-8")
    (tmp_path / "bad.jsonl").write_text("{not json\n" + json.dumps({"text": "fine words here"}) + "\n")
    sources = [str(tmp_path / "bad.jsonl"), str(tmp_path / "bad.txt"), str(root / "a.jsonl")]
    loader = StreamingLoader(spec_of(corpus, sources=sources), MB, 0, 1)
    take(loader, 12)
    decode = loader.report().stages["decode"]
    assert decode.docs_in - decode.docs_out == 2 and 3 < decode.docs_in < 63
    for workers in (0, 2):
        strict = spec_of(corpus, workers, sources=sources, cleaning=CleaningConfig(on_bad_record="error"))
        with pytest.raises(DataError, match=r"bad.jsonl: bad record") as err:
            take(StreamingLoader(strict, MB, 0, 1), 20)
        assert "\n" not in str(err.value)
    few = spec_of(corpus, sources=[str(root / "c.txt")], valid_fraction=1e-9)
    with pytest.raises(DataError, match="stream 1 of 2 has no training documents"):
        take(StreamingLoader(few, MB, 1, 2), 1)
    with pytest.raises(DataError, match="not a streaming one"):
        StreamingLoader(few, MB).load_state_dict({"consumed_samples": 3})


@pytest.mark.slow  # `pretrain` processes
def test_pretrain_streaming_resumes_exactly(tmp_path):
    common = (*TINY, f"data.cache_dir={tmp_path / 'cache'}", "data.streaming=true", "data.streaming_workers=1",
              "trainer.train_steps=6", "trainer.eval_interval=3", "trainer.checkpoint_interval=3")
    straight = run_pretrain(*common, f"trainer.run_dir={tmp_path / 'a'}", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "data: streaming" in straight.stdout and not list((tmp_path / "cache").glob("*/shards"))
    checkpoint = tmp_path / "a" / "checkpoints" / "step_0000003"
    resumed = run_pretrain(*common, f"trainer.run_dir={tmp_path / 'b'}", f"trainer.resume={checkpoint}",
                           cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    def records(run):
        return [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    losses = {r["step"]: r["loss"] for r in records("a") if "loss" in r}
    assert [r["loss"] for r in records("b") if "loss" in r] == [losses[4], losses[5], losses[6]]
    valid = [r["valid/loss"] for r in records("a") if "valid/loss" in r]
    assert len(valid) == 3 and [r["valid/loss"] for r in records("b") if "valid/loss" in r] == valid[-1:]
    import torch

    saved = torch.load(checkpoint / "mp_rank_00_model_states.pt", weights_only=False)["loader"]
    assert saved["kind"] == "streaming" and saved["batches"] == [3] and saved["streams"][0]["samples"] == 24

    missing = run_pretrain(*common, "data.sources=[/nonexistent/stream.jsonl]",
                           f"trainer.run_dir={tmp_path / 'c'}", cwd=tmp_path)
    errors = [line for line in missing.stderr.splitlines() if line.startswith("pretrain: error:")]
    assert missing.returncode == 2 and len(errors) == 1 and "/nonexistent/stream.jsonl" in errors[0]
    assert not (tmp_path / "c").exists()
