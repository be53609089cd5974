"""data_pipeline: inputs, cleaning, dedup, sharded preprocessing, blending, loader state, bad input."""

import gzip
import json
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.blend import BlendedDataset
from data_pipeline.cleaning import CleaningConfig, DataError
from data_pipeline.dataset import DataParallelLoader, EodOptions, PackedSequenceDataset, eod_masks
from data_pipeline.indexed import ShardError
from data_pipeline.preprocess import PreprocessJob, preprocess
from data_pipeline.prepare import sample_documents
from data_pipeline.shards import open_corpus, split_documents
from data_pipeline.tokenizer import Tokenizer, check_fits, train_tokenizer

REPO = Path(__file__).resolve().parent.parent
WORDS = "alpha beta gamma delta épsilon zeta eta theta iota kappa lambda mu nu xi omicron".split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(3, 120))) + f" #{seed}-{i}" for i in range(n)]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    """Three formats, with duplicates across files, denormalised text and control characters."""
    root = tmp_path_factory.mktemp("raw")
    docs = make_docs(300)
    docs[5] = "cafe\u0301 au lait \x07 with a bell"  # NFD accent + BEL
    with open(root / "a.jsonl", "w") as f:
        for d in docs[:150]:
            f.write(json.dumps({"text": d}) + "\n")
    with gzip.open(root / "b.jsonl.gz", "wt") as f:
        for d in docs[150:] + docs[:20]:  # 20 exact duplicates of a.jsonl's first documents
            f.write(json.dumps({"text": d}) + "\n")
    import zstandard

    (root / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        "".join(json.dumps({"text": d}) + "\n" for d in make_docs(50, seed=1)).encode()))
    (root / "d.txt").write_text("A plain text file is one document.\nIt has two lines.")
    (root / "e.txt").write_bytes(b"\xff\xfe not utf-8")
    (root / "f.jsonl").write_text(json.dumps({"text": "   "}) + "\n" + json.dumps({"body": "no text field"}) + "\n")
    return root


@pytest.fixture(scope="module")
def tokenizer(corpus_dir, tmp_path_factory) -> Tokenizer:
    out = tmp_path_factory.mktemp("tok") / "tok.model"
    docs = sample_documents([str(corpus_dir)], CleaningConfig(), 1_000_000)
    return train_tokenizer(docs, out, vocab_size=320, user_defined_symbols=["<tool>"])


def expected_texts(corpus_dir: Path) -> list[str]:
    """What cleaning should keep, in input order: NFC, no controls, no blanks, no duplicates."""
    texts = []
    for name in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst"):
        opener = gzip.open if name.endswith(".gz") else open
        if name.endswith(".zst"):
            import zstandard

            lines = zstandard.ZstdDecompressor().decompress((corpus_dir / name).read_bytes(),
                                                            max_output_size=1 << 24).decode().splitlines()
        else:
            with opener(corpus_dir / name, "rt") as f:
                lines = f.read().splitlines()
        texts += [json.loads(line)["text"] for line in lines]
    texts.append((corpus_dir / "d.txt").read_text())
    out, seen = [], set()
    for t in texts:
        t = unicodedata.normalize("NFC", t).replace("\x07", "")
        if t.strip() and t not in seen:
            seen.add(t)
            out.append(t)
    return out


@pytest.fixture(scope="module")
def shards(corpus_dir, tokenizer, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    preprocess(PreprocessJob([str(corpus_dir)], str(tokenizer.path), str(out), num_shards=3, workers=2,
                             chunk_bytes=4096), log=lambda *_: None)
    return out


@pytest.mark.slow  # preprocess() runs its worker processes
def test_round_trip_and_report(corpus_dir, tokenizer, shards):
    corpus = open_corpus(shards, tokenizer)
    decoded = []
    for doc in range(corpus.num_documents):
        ids = corpus.get(doc)
        assert ids[-1] == tokenizer.eos_id
        decoded.append(tokenizer.decode(ids[:-1]))
    assert decoded == expected_texts(corpus_dir)
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["tokenizer_hash"] == tokenizer.hash and manifest["dtype"] == "uint16"
    assert manifest["tokens"] == corpus.num_tokens and len(manifest["shards"]) == 3
    report = manifest["report"]
    # 150 + 170 + 50 json lines, 2 text files, 2 lines in f.jsonl; e.txt is undecodable and
    # f.jsonl's second line has no text field: counted and skipped.
    assert report["decode"]["docs_in"] == 374 and report["decode"]["docs_out"] == 372
    assert report["control_chars"]["bytes_in"] - report["control_chars"]["bytes_out"] == 2  # docs[5] twice
    assert report["min_length"]["docs_in"] - report["min_length"]["docs_out"] == 1
    assert report["dedup"]["docs_in"] == 371 and report["dedup"]["docs_out"] == 351 == corpus.num_documents
    assert report["normalize"]["bytes_out"] == report["normalize"]["bytes_in"] - 2  # e + U+0301 → é, twice


@pytest.mark.slow  # preprocess() runs its worker processes
def test_same_shards_whatever_the_workers_and_rerun_skips_finished(corpus_dir, tokenizer, shards, tmp_path):
    job = PreprocessJob([str(corpus_dir)], str(tokenizer.path), str(tmp_path), num_shards=3, workers=1,
                        chunk_bytes=999_999)
    preprocess(job, log=lambda *_: None)
    for name in ("shard-00000.bin", "shard-00001.idx", "shard-00002.bin", "shard-00002.hashes.npy"):
        assert (tmp_path / name).read_bytes() == (shards / name).read_bytes()
    # A killed run: shard 1 and the manifest never finished.
    kept = (tmp_path / "shard-00000.bin").stat().st_mtime_ns
    for suffix in (".bin", ".idx", ".json"):
        (tmp_path / f"shard-00001{suffix}").unlink()
    (tmp_path / "manifest.json").unlink()
    (tmp_path / ".shard-00001.tmp99.bin").write_bytes(b"partial")
    logs = []
    preprocess(job, log=logs.append)
    assert any("2 of 3 shards already complete" in line for line in logs)
    assert (tmp_path / "shard-00000.bin").stat().st_mtime_ns == kept
    assert (tmp_path / "shard-00001.bin").read_bytes() == (shards / "shard-00001.bin").read_bytes()
    assert json.loads((tmp_path / "manifest.json").read_text())["report"] == \
        json.loads((shards / "manifest.json").read_text())["report"]
    assert not list(tmp_path.glob(".*tmp*"))


@pytest.mark.slow  # preprocess() runs its worker processes
def test_node_shares_cover_the_inputs_once(corpus_dir, tokenizer, shards, tmp_path):
    jobs = [PreprocessJob([str(corpus_dir)], str(tokenizer.path), str(tmp_path), num_shards=2,
                          workers=1, node_rank=k, num_nodes=2) for k in range(2)]
    for job in jobs:  # the hashes of every node first, so that the nodes can run one after the other
        preprocess(job, log=lambda *_: None, phase="hashes")
    for job in jobs:
        preprocess(job, log=lambda *_: None)
    manifests = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("manifest-*.json"))]
    assert len(manifests) == 2
    inputs = manifests[0]["inputs"] + manifests[1]["inputs"]
    assert sorted(inputs) == sorted(str(p) for p in corpus_dir.iterdir()) and len(set(inputs)) == len(inputs)
    corpus = open_corpus(tmp_path, tokenizer)
    assert corpus.num_documents == sum(m["documents"] for m in manifests)
    # b.jsonl.gz repeats a.jsonl's first documents from the other node: dropped there, so the
    # two nodes together keep exactly what one node keeps.
    owner = {name: k for k, m in enumerate(manifests) for name in m["inputs"]}
    assert owner[str(corpus_dir / "a.jsonl")] != owner[str(corpus_dir / "b.jsonl.gz")]
    one_node = open_corpus(shards, tokenizer)
    assert sorted(tuple(corpus.get(i)) for i in range(corpus.num_documents)) == \
        sorted(tuple(one_node.get(i)) for i in range(one_node.num_documents))


@pytest.mark.slow  # preprocess() runs its worker processes
def test_dedup_is_global_across_nodes_and_workers(tokenizer, tmp_path):
    """Duplicates spread over six inputs, three nodes and two workers per node (small chunks)."""
    docs = make_docs(120, seed=5)
    rng = np.random.default_rng(0)
    files = []
    for f in range(6):
        own = docs[f * 20:(f + 1) * 20]
        repeated = [docs[i] for i in rng.choice(120, 12)]  # from earlier, later and the same input
        lines = own + repeated
        rng.shuffle(lines)
        files.append(lines)
        (tmp_path / f"in{f}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in lines))
    first_seen = list(dict.fromkeys(d for lines in files for d in lines))  # global input order
    out = tmp_path / "out"
    jobs = [PreprocessJob([str(tmp_path / "in*.jsonl")], str(tokenizer.path), str(out), num_shards=2, workers=2,
                          node_rank=k, num_nodes=3, chunk_bytes=512) for k in range(3)]
    for job in jobs:
        preprocess(job, log=lambda *_: None, phase="hashes")
    for job in jobs:
        preprocess(job, log=lambda *_: None)
    corpus = open_corpus(out, tokenizer)  # every node's manifest
    kept = [tokenizer.decode(corpus.get(i)[:-1]) for i in range(corpus.num_documents)]
    assert sorted(kept) == sorted(first_seen) and len(kept) == 120
    # A node whose peers never wrote their hashes stops with one line naming the file.
    lonely = PreprocessJob([str(tmp_path / "in*.jsonl")], str(tokenizer.path), str(tmp_path / "lonely"),
                           workers=1, node_rank=0, num_nodes=2, node_wait_s=0.2)
    with pytest.raises(DataError, match=r"dedup-001-of-002.npz: not written by its node"):
        preprocess(lonely, log=lambda *_: None)
    assert not (tmp_path / "lonely" / "manifest-000-of-002.json").exists()


@pytest.mark.slow  # preprocess() runs its worker processes
def test_parquet_saved_dataset_and_builder_inputs(tokenizer, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = make_docs(40, seed=3)
    pq.write_table(pa.table({"content": docs[:20]}), tmp_path / "p.parquet")
    datasets.Dataset.from_dict({"content": docs[20:30]}).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "x.jsonl").write_text("".join(json.dumps({"content": d}) + "\n" for d in docs[30:]))
    out = tmp_path / "out"
    manifest = preprocess(PreprocessJob(
        [str(tmp_path / "p.parquet"), str(tmp_path / "saved"), f"builder:json:{tmp_path}/j/*.jsonl"],
        str(tokenizer.path), str(out), workers=2, cleaning=CleaningConfig(text_field="content"),
    ), log=lambda *_: None)
    corpus = open_corpus(out, tokenizer)
    assert manifest["documents"] == 40
    assert [tokenizer.decode(corpus.get(i)[:-1]) for i in range(40)] == docs


def test_tokenizer_options_and_fit(corpus_dir, tokenizer):
    sidecar = json.loads(Path(f"{tokenizer.path}.json").read_text())
    assert sidecar["sha256"] == tokenizer.hash and sidecar["vocab_size"] == 320
    sp = tokenizer.sp
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, 3)
    assert sp.piece_to_id("<tool>") != sp.unk_id()
    assert "<tool>" in [sp.id_to_piece(i) for i in sp.encode("call <tool> now")]
    assert check_fits(320, None) == 384 and check_fits(320, None, 128, tensor_parallel=4) == 512
    with pytest.raises(ValueError, match="model.vocab_size=256"):
        check_fits(320, 256, 128)


@pytest.fixture(scope="module")
def datasets_pair(shards, tokenizer):
    corpus = open_corpus(shards, tokenizer)
    train_docs, valid_docs = split_documents(corpus.num_documents, 0.1, 7)
    assert not set(train_docs) & set(valid_docs)
    assert len(train_docs) + len(valid_docs) == corpus.num_documents
    return corpus, PackedSequenceDataset(corpus, 32, seed=7, documents=train_docs)


@pytest.mark.slow  # the `shards` fixture: preprocess() runs its worker processes
def test_data_parallel_sharding_covers_every_sample_once(datasets_pair):
    _, dataset = datasets_pair
    global_batch, steps = 12, 5
    reference = None
    for dp in (1, 2, 3, 4):
        mb = global_batch // dp
        loaders = [DataParallelLoader(dataset, mb, r, dp) for r in range(dp)]
        seen = []
        for _ in range(steps):
            for loader in loaders:
                seen.extend(map(tuple, next(loader)["tokens"].tolist()))
        want = [tuple(dataset[i][:-1]) for i in range(global_batch * steps)]
        assert sorted(seen) == sorted(want)  # full coverage and, with distinct samples, no overlap
        assert len(set(want)) == len(want)
        reference = reference or sorted(seen)
        assert sorted(seen) == reference


@pytest.mark.slow  # the `shards` fixture: preprocess() runs its worker processes
def test_loader_resumes_exactly_and_across_data_parallel_sizes(datasets_pair):
    _, dataset = datasets_pair
    straight = DataParallelLoader(dataset, 4, 1, 2)
    batches = [next(straight) for _ in range(6)]
    first = DataParallelLoader(dataset, 4, 1, 2)
    for _ in range(3):
        next(first)
    resumed = DataParallelLoader(dataset, 4, 1, 2)
    resumed.load_state_dict(first.state_dict())
    for want in batches[3:]:
        assert all(np.array_equal(want[k], v) for k, v in next(resumed).items())
    # Stop at 2 steps of global batch 8 on 2 ranks, resume on 4 ranks: the samples of
    # the epoch continue where they stopped, none repeated, none skipped.
    state = {"consumed_samples": 16}
    seen = []
    for r in range(4):
        loader = DataParallelLoader(dataset, 2, r, 4)
        loader.load_state_dict(state)
        seen.extend(tuple(x) for x in next(loader)["tokens"].tolist())
    assert sorted(seen) == sorted(tuple(dataset[i][:-1]) for i in range(16, 24))


@pytest.mark.slow  # the `shards` fixture: preprocess() runs its worker processes
def test_blend_ratios_and_shuffle_is_seeded(datasets_pair, shards, tokenizer):
    corpus, a = datasets_pair
    b = PackedSequenceDataset(corpus, 32, seed=8)
    c = PackedSequenceDataset(corpus, 32, seed=9)
    blend = BlendedDataset([a, b, c], [0.5, 0.3, 0.2])
    for i in range(10_000):
        blend[i]
    counts = np.bincount(blend.corpus[:10_000], minlength=3) / 10_000
    assert np.all(np.abs(counts - [0.5, 0.3, 0.2]) < 0.01)
    assert np.array_equal(blend[123], BlendedDataset([a, b, c], [5, 3, 2])[123])
    assert not np.array_equal(a[0], b[0])  # a different seed, a different order
    assert np.array_equal(a[5], PackedSequenceDataset(corpus, 32, seed=7, documents=a.doc_order[np.argsort(a.doc_order)])[5])


def test_eod_masks():
    tokens = np.array([[5, 6, 2, 7, 8, 2, 9, 4]])
    import torch

    masks = eod_masks(torch.from_numpy(tokens), EodOptions(2, True, True, True))
    assert masks["loss_mask"].tolist() == [[1, 1, 0, 1, 1, 0, 1, 1]]
    assert masks["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 0, 1]]
    assert masks["document_starts"].tolist() == [[False, False, False, True, False, False, True, False]]
    from pretrain.model.document_attention import dense_document_mask

    blocked = dense_document_mask(masks["document_starts"])[0, 0]
    assert blocked[3, 2] and blocked[3, 0] and not blocked[4, 3] and not blocked[2, 0] and blocked[0, 1]
    plain = eod_masks(torch.from_numpy(tokens), EodOptions(2, False, False, False))
    assert plain["loss_mask"].all() and plain["position_ids"].tolist() == [list(range(8))]
    assert "document_starts" not in plain  # no attention cut: plain causal attention


# --- bad input: one line naming the file, exit 2, nothing half-written -----------------------

def cli(*args: str, cwd: Path):
    return subprocess.run([sys.executable, "-m", "data_pipeline.cli", *args], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)


def one_error(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("pretrain-data: error:")]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    return lines[0]


@pytest.mark.slow  # `pretrain-data` processes
def test_cli_end_to_end_and_missing_input(corpus_dir, tmp_path):
    ok = cli("tokenizer", str(corpus_dir), "--output", str(tmp_path / "t.model"),
             "--vocab-size", "300", "--vocab-multiple", "64", "--tensor-parallel", "2", cwd=tmp_path)
    assert ok.returncode == 0 and "embedding rows 384" in ok.stdout, ok.stderr[-2000:]
    done = cli("preprocess", str(corpus_dir / "a.jsonl"), "--tokenizer", str(tmp_path / "t.model"),
               "--output", str(tmp_path / "out"), "--num-shards", "2", cwd=tmp_path)
    assert done.returncode == 0 and "dedup" in done.stdout, done.stderr[-2000:]
    missing = cli("preprocess", str(tmp_path / "nope*.jsonl"), "--tokenizer", str(tmp_path / "t.model"),
                  "--output", str(tmp_path / "never"), cwd=tmp_path)
    assert "nope*.jsonl: no such file" in one_error(missing) and not (tmp_path / "never").exists()


@pytest.mark.slow  # preprocess() runs its worker processes
def test_empty_after_filtering_and_undecodable_as_error(corpus_dir, tokenizer, tmp_path):
    out = tmp_path / "empty"
    with pytest.raises(DataError, match="f.jsonl: no non-empty documents"):
        preprocess(PreprocessJob([str(corpus_dir / "f.jsonl")], str(tokenizer.path), str(out), workers=1),
                   log=lambda *_: None)
    assert not [p for p in out.iterdir()]
    out = tmp_path / "strict"
    with pytest.raises(DataError, match=r"e.txt: bad record \(not UTF-8"):
        preprocess(PreprocessJob([str(corpus_dir)], str(tokenizer.path), str(out), workers=2,
                                 cleaning=CleaningConfig(on_bad_record="error")), log=lambda *_: None)
    assert not (out / "manifest.json").exists() and not list(out.glob(".*tmp*"))


@pytest.mark.slow  # a `pretrain-data` process, and the `shards` fixture's workers
def test_truncated_mismatched_shards_and_foreign_tokenizer(corpus_dir, shards, tokenizer, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(shards, broken)
    with open(broken / "shard-00001.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ShardError, match="shard-00001.bin: 100 bytes, but its index describes"):
        open_corpus(broken, tokenizer)
    shutil.copy(shards / "shard-00000.idx", broken / "shard-00001.idx")
    shutil.copy(shards / "shard-00001.bin", broken / "shard-00001.bin")
    with pytest.raises(ShardError, match="shard-00001"):
        open_corpus(broken, tokenizer)
    (broken / "shard-00002.idx").write_bytes(b"garbage")
    with pytest.raises(ShardError, match="shard-00002.idx"):
        open_corpus(broken / "shard-00002")

    other = train_tokenizer(sample_documents([str(corpus_dir / "a.jsonl")], CleaningConfig(), 100_000),
                            tmp_path / "other.model", vocab_size=300)
    with pytest.raises(DataError, match="manifest.json: written with tokenizer"):
        open_corpus(shards, other)
    with pytest.raises(DataError, match="manifest.json: written with tokenizer"):
        preprocess(PreprocessJob([str(corpus_dir)], str(other.path), str(shards)), log=lambda *_: None)
    result = cli("check", str(shards), "--tokenizer", str(other.path), cwd=tmp_path)
    assert "manifest.json: written with tokenizer" in one_error(result)


def test_a_run_says_once_what_data_it_built_or_reused(corpus_dir, tmp_path):
    from data_pipeline.config import DataConfig, TokenizerConfig
    from data_pipeline.training_data import load_training_data

    cfg = DataConfig(sources=[str(corpus_dir)], cache_dir=str(tmp_path / "cache"), seq_len=32,
                     tokenizer=TokenizerConfig(vocab_size=320))
    for run in ("built", "reused"):
        lines: list[str] = []
        load_training_data(cfg, rank=0, log=lambda *args: lines.append(" ".join(map(str, args))))
        reusing = [line for line in lines if line.startswith("data: reusing")]
        assert len(reusing) == (1 if run == "reused" else 0), lines
