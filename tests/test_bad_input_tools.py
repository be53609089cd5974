"""The other commands refusing bad input: one line, exit status 2, no file touched.

`pretrain-data`, `pretrain-eval`, `pretrain-generate`, `pretrain-export`,
`pretrain-plan`, `pretrain-launch` and `pretrain-plot`, each run in this
process through its console-script function (tests/test_bad_input_setup.py),
on bad data files, tokenizers, shards, damaged checkpoints, config values and
output paths.
"""

import os
import shutil

import pytest

from conftest import REPO

from test_bad_input_setup import (GOOD_RECORDS, RNG, STATES, World, case, check_refused, garble, jsonl,  # noqa: F401
                                  trained, truncate, world)


def shards(w: World):
    """A copy of the trained run's preprocessed shards, in the case's directory."""
    return shutil.copytree(w.trained.shards, w.tmp / "shards")


def with_metrics(w: World, data: bytes) -> None:
    (w.run / "metrics.jsonl").write_bytes(data)


def out_dir(w: World) -> None:
    """An empty output directory, as a failed `preprocess` leaves its own (to be resumed)."""
    (w.tmp / "out").mkdir()


def bad_latest(w: World) -> None:
    (w.run / "checkpoints" / "latest").write_bytes(b"\xff\xfe\x00 not a tag")


TOK = ["--vocab-size", "100", "--no-byte-fallback"]

DATA = [
    case("tokenizer-empty-input", "pretrain-data",
         lambda w: ["tokenizer", str(w.data("empty.txt")), "--output", f"{w.tmp}/out/tok.model", *TOK],
         "{tmp}/data/empty.txt: no non-empty documents left after cleaning"),
    case("tokenizer-not-utf8", "pretrain-data",
         lambda w: ["tokenizer", str(w.data("latin1.txt")), "--output", f"{w.tmp}/out/tok.model", *TOK,
                    "--on-bad-record", "error"], "{tmp}/data/latin1.txt: bad record (not UTF-8"),
    case("tokenizer-gz-truncated", "pretrain-data",
         lambda w: ["tokenizer", str(w.data("cut.jsonl.gz")), "--output", f"{w.tmp}/out/tok.model", *TOK],
         "{tmp}/data/cut.jsonl.gz: cannot decompress"),
    case("tokenizer-zst-truncated", "pretrain-data",
         lambda w: ["tokenizer", str(w.data("cut.jsonl.zst")), "--output", f"{w.tmp}/out/tok.model", *TOK],
         "{tmp}/data/cut.jsonl.zst: cannot decompress"),
    case("tokenizer-output-below-a-file", "pretrain-data",
         lambda w: ["tokenizer", str(w.trained.corpus), "--output", f"{w.file('out', 'x')}/tok.model", *TOK],
         "{tmp}/out/tok.model: lies below the file {tmp}/out"),
    case("tokenizer-vocab-out-of-range", "pretrain-data",
         lambda w: ["tokenizer", str(w.trained.corpus), "--output", f"{w.tmp}/out/tok.model", "--vocab-size", "10"],
         "--vocab-size=10: expected >= 64"),
    case("preprocess-tokenizer-garbage", "pretrain-data",
         lambda w: ["preprocess", str(w.trained.corpus), "--tokenizer", str(w.data("binary.txt")),
                    "--output", f"{w.tmp}/out", "--workers", "1"],
         "{tmp}/data/binary.txt: not a SentencePiece model", setup=out_dir),
    case("preprocess-binary", "pretrain-data",
         lambda w: ["preprocess", str(w.data("binary.txt")), "--tokenizer", str(w.run / "tokenizer.model"),
                    "--output", f"{w.tmp}/out", "--workers", "1", "--on-bad-record", "error"],
         "{tmp}/data/binary.txt: bad record (not UTF-8", setup=out_dir),
    case("preprocess-jsonl-malformed", "pretrain-data",
         lambda w: ["preprocess", str(w.data("malformed.jsonl")), "--tokenizer", str(w.run / "tokenizer.model"),
                    "--output", f"{w.tmp}/out", "--workers", "1", "--on-bad-record", "error"],
         "{tmp}/data/malformed.jsonl: bad record", setup=out_dir),
    case("preprocess-jsonl-no-text-field", "pretrain-data",
         lambda w: ["preprocess", str(w.data("no_text.jsonl")), "--tokenizer", str(w.run / "tokenizer.model"),
                    "--output", f"{w.tmp}/out", "--workers", "1", "--on-bad-record", "error"],
         "{tmp}/data/no_text.jsonl: bad record (no string field 'text')", setup=out_dir),
    case("preprocess-zst-truncated", "pretrain-data",
         lambda w: ["preprocess", str(w.data("cut.jsonl.zst")), "--tokenizer", str(w.run / "tokenizer.model"),
                    "--output", f"{w.tmp}/out", "--workers", "1"],
         "{tmp}/data/cut.jsonl.zst: cannot decompress", setup=out_dir),
    case("preprocess-nothing-left", "pretrain-data",
         lambda w: ["preprocess", str(w.data("no_text.jsonl")), "--tokenizer", str(w.run / "tokenizer.model"),
                    "--output", f"{w.tmp}/out", "--workers", "1"],
         "{tmp}/data/no_text.jsonl: no non-empty documents left after cleaning", setup=out_dir),
    case("preprocess-output-is-a-file", "pretrain-data",
         lambda w: ["preprocess", str(w.trained.corpus), "--tokenizer", str(w.run / "tokenizer.model"),
                    "--output", str(w.file("out", "x")), "--workers", "1"], "{tmp}/out: exists and is not a directory"),
    case("check-bin-truncated", "pretrain-data", lambda w: ["check", str(w.tmp / "shards")],
         "{tmp}/shards/shard-00000.bin: ", setup=lambda w: truncate(shards(w) / "shard-00000.bin")),
    case("check-idx-garbage-same-size", "pretrain-data", lambda w: ["check", str(w.tmp / "shards")],
         "{tmp}/shards/shard-00000.idx: unreadable index", setup=lambda w: garble(shards(w) / "shard-00000.idx")),
    case("check-manifest-garbage", "pretrain-data", lambda w: ["check", str(w.tmp / "shards")],
         "{tmp}/shards/manifest.json: unreadable manifest", setup=lambda w: garble(shards(w) / "manifest.json")),
    case("check-other-tokenizer", "pretrain-data",
         lambda w: ["check", str(w.tmp / "shards"), "--tokenizer", str(w.trained.other_tokenizer)],
         "{tmp}/shards/manifest.json: written with tokenizer", setup=shards),
]

EVAL = [
    case("eval-states-truncated", "pretrain-eval", lambda w: [str(w.run), "--valid"], "{states}: unreadable",
         setup=lambda w: truncate(w.ckpt / STATES)),
    case("eval-states-garbage-same-size", "pretrain-eval", lambda w: [str(w.run), "--valid"], "{states}: unreadable",
         setup=lambda w: garble(w.ckpt / STATES)),
    case("eval-latest-garbage", "pretrain-eval", lambda w: [str(w.run), "--valid"], "{run}/checkpoints/latest",
         setup=bad_latest),
    case("eval-latest-names-nothing", "pretrain-eval", lambda w: [str(w.run), "--valid"],
         "{run}/checkpoints/latest: names step_9999999, which holds no model states",
         setup=lambda w: (w.run / "checkpoints" / "latest").write_text("step_9999999")),
    case("eval-no-such-checkpoint", "pretrain-eval", lambda w: [f"{w.tmp}/nothing", "--valid"],
         "{tmp}/nothing: no such run or checkpoint directory"),
    case("eval-tokenizer-garbage", "pretrain-eval",
         lambda w: [str(w.run), "--text", f"{w.trained.corpus}/doc1.txt", "--tokenizer", str(w.data("binary.txt"))],
         "{tmp}/data/binary.txt: not a SentencePiece model"),
    case("eval-tokenizer-other-vocab", "pretrain-eval",
         lambda w: [str(w.run), "--text", f"{w.trained.corpus}/doc1.txt",
                    "--tokenizer", str(w.trained.other_tokenizer)], "{other_tokenizer}: tokenizer "),
    case("eval-text-not-utf8", "pretrain-eval", lambda w: [str(w.run), "--text", str(w.data("latin1.txt"))],
         "{tmp}/data/latin1.txt: not UTF-8 text"),
    case("eval-text-empty", "pretrain-eval", lambda w: [str(w.run), "--text", str(w.data("empty.txt"))],
         "{tmp}/data/empty.txt: no text to score"),
    case("eval-shard-garbage", "pretrain-eval", lambda w: [str(w.run), "--data", f"{w.tmp}/shards/shard-00000"],
         "{tmp}/shards/shard-00000.idx: unreadable index", setup=lambda w: garble(shards(w) / "shard-00000.idx")),
    case("eval-seq-len-out-of-range", "pretrain-eval", lambda w: [str(w.run), "--valid", "--seq-len", "1000"],
         "--seq-len=1000: expected 1..64"),
    case("eval-batch-size-zero", "pretrain-eval", lambda w: [str(w.run), "--valid", "--batch-size", "0"],
         "--batch-size=0: expected > 0"),
]

GENERATE = [
    case("generate-states-truncated", "pretrain-generate", lambda w: [str(w.run)], "{states}: unreadable",
         setup=lambda w: truncate(w.ckpt / STATES)),
    case("generate-latest-garbage", "pretrain-generate", lambda w: [str(w.run)], "{run}/checkpoints/latest",
         setup=bad_latest),
    case("generate-tokenizer-missing", "pretrain-generate", lambda w: [str(w.run)],
         "{run}/tokenizer.model: tokenizer model not found", setup=lambda w: (w.run / "tokenizer.model").unlink()),
    case("generate-tokenizer-other-vocab", "pretrain-generate",
         lambda w: [str(w.run), "--tokenizer", str(w.trained.other_tokenizer)], "{other_tokenizer}: tokenizer "),
    case("generate-top-p-out-of-range", "pretrain-generate", lambda w: [str(w.run), "--top-p", "2"],
         "--top-p=2.0: expected in (0, 1]"),
    case("generate-prompt-too-long", "pretrain-generate", lambda w: [str(w.run), "--prompt", "def add " * 100],
         "--prompt: "),
]

EXPORT = [
    case("export-states-truncated", "pretrain-export", lambda w: [str(w.run), f"{w.tmp}/hf"],
         "{states}: ", setup=lambda w: truncate(w.ckpt / STATES)),
    case("export-states-garbage-same-size", "pretrain-export", lambda w: [str(w.run), f"{w.tmp}/hf"],
         "{states}: unreadable", setup=lambda w: garble(w.ckpt / STATES)),
    case("export-rng-missing", "pretrain-export", lambda w: [str(w.run), f"{w.tmp}/hf"],
         f"{{ckpt}}/{RNG}: missing from checkpoint", setup=lambda w: (w.ckpt / RNG).unlink()),
    case("export-latest-garbage", "pretrain-export", lambda w: [str(w.run), f"{w.tmp}/hf"],
         "{run}/checkpoints/latest", setup=bad_latest),
    case("export-tokenizer-copy-garbage", "pretrain-export", lambda w: [str(w.run), f"{w.tmp}/hf"],
         "{ckpt}/tokenizer.model: the checkpoint's copy of the tokenizer is unusable",
         setup=lambda w: garble(w.ckpt / "tokenizer.model")),
    case("export-tokenizer-other-vocab", "pretrain-export",
         lambda w: [str(w.run), f"{w.tmp}/hf", "--tokenizer", str(w.trained.other_tokenizer)],
         "{other_tokenizer}: tokenizer "),
    case("export-out-is-a-file", "pretrain-export", lambda w: [str(w.run), str(w.file("hf", "x"))],
         "{tmp}/hf: exists and is not a directory"),
    case("export-out-below-a-file", "pretrain-export", lambda w: [str(w.run), str(w.file("hf", "x") / "out")],
         "{tmp}/hf/out: lies below the file {tmp}/hf; expected a directory"),
    case("export-out-not-empty", "pretrain-export", lambda w: [str(w.run), f"{w.tmp}/hf"],
         "{tmp}/hf: exists and is not empty; pass --force", setup=lambda w: w.file("hf/notes.txt", "keep me\n")),
]

PLAN = [  # `pretrain-plan` reports config errors as `pretrain` does: it reads the same tree
    case("plan-unknown-key", "pretrain-plan", lambda w: ["+model.bogus=1"], "model.bogus: unknown key",
         prefix="pretrain"),
    case("plan-bad-enum", "pretrain-plan", lambda w: ["parallel.zero_stage=9"], "parallel.zero_stage=9",
         prefix="pretrain"),
    case("plan-world-size", "pretrain-plan", lambda w: ["--world-size", "0"], "--world-size=0: expected >= 1",
         prefix="pretrain"),
    case("plan-world-not-a-multiple", "pretrain-plan", lambda w: ["parallel.tensor=3"],
         "world size 1: expected a multiple of parallel.tensor x parallel.pipeline = 3", prefix="pretrain"),
    case("plan-override-syntax", "pretrain-plan", lambda w: ["model.hidden_size"],
         "Error parsing override 'model.hidden_size'", prefix="pretrain"),
    case("plan-unknown-cluster", "pretrain-plan", lambda w: ["--cluster", "h100_8g"],
         "--cluster=h100_8g: unknown cluster; expected one of a100_40g, a100_80g, cpu_2core, h100_80g",
         prefix="pretrain"),
    case("plan-cluster-missing-field", "pretrain-plan", lambda w: ["--cluster", f"{w.tmp}/mine.yaml"],
         "{tmp}/mine.yaml: missing key inter_node.latency", prefix="pretrain", setup=lambda w: w.file(
             "mine.yaml", (REPO / "configs/cluster/h100_80g.yaml").read_text().replace("  latency: 1.0e-5\n", ""))),
    case("plan-cluster-not-yaml", "pretrain-plan", lambda w: ["--cluster", f"{w.tmp}/mine.yaml"],
         "{tmp}/mine.yaml: not valid YAML (expected ',' or ']', but got '<stream end>' at line 2)", prefix="pretrain",
         setup=lambda w: w.file("mine.yaml", "name: [unclosed\n  `")),
    case("plan-nodes-do-not-divide", "pretrain-plan",
         lambda w: ["--cluster", "h100_80g", "--nodes", "3", "model=llama_70b", "parallel.tensor=8",
                    "parallel.pipeline=2", "parallel.precision=bf16", "parallel.zero_stage=1"],
         "--nodes=3: world size 24: expected a multiple of parallel.tensor x parallel.pipeline = 16",
         prefix="pretrain"),
    case("plan-nothing-fits", "pretrain-plan",
         lambda w: ["--cluster", "h100_80g", "--search", "--device-memory", "4GiB", "model=llama_70b",
                    "parallel.precision=bf16", "data.seq_len=4096", "trainer.global_batch_size=8"],
         "no layout fits 4.0 GiB per device on 8 ranks: the smallest peak is", prefix="pretrain"),
    case("plan-memory-not-a-size", "pretrain-plan", lambda w: ["--device-memory", "eighty"],
         "--device-memory='eighty': expected a size such as 80GiB, 40GB or 512MiB", prefix="pretrain"),
    case("plan-search-without-cluster", "pretrain-plan", lambda w: ["--search"],
         "--search: expected --cluster", prefix="pretrain"),
]

LAUNCH = [
    case("launch-out-of-range", "pretrain-launch", lambda w: ["--dry-run", "launcher.nproc_per_node=0"],
         "launcher.nproc_per_node=0: expected >= 1"),
    case("launch-wrong-type", "pretrain-launch", lambda w: ["--dry-run", "launcher.nproc_per_node=two"],
         "launcher.nproc_per_node='two': expected int"),
    case("launch-unknown-key", "pretrain-launch", lambda w: ["--dry-run", "launcher.bogus=1"], "launcher.bogus"),
    case("launch-override-syntax", "pretrain-launch", lambda w: ["--dry-run", "launcher.nproc_per_node"],
         "Error parsing override 'launcher.nproc_per_node'"),
    case("launch-corpus-missing", "pretrain-launch", lambda w: ["--dry-run", f"data.sources=[{w.tmp}/none]"],
         "{tmp}/none: no such file"),
    case("launch-slurm-run-dir-is-a-file", "pretrain-launch",
         lambda w: ["--dry-run", "launcher=slurm", f"trainer.run_dir={w.file('runs', 'x')}"],
         "trainer.run_dir={tmp}/runs: a file, expected a directory"),
    case("launch-slurm-run-dir-held", "pretrain-launch",
         lambda w: ["--dry-run", "launcher=slurm", f"trainer.run_dir={w.run}"],
         f"trainer.run_dir={{run}}: in use by pid {os.getpid()}", setup=World.hold),
    case("launch-local-run-dir-is-a-file", "pretrain-launch",
         lambda w: ["--dry-run", "launcher=local", f"trainer.run_dir={w.file('runs', 'x')}"],
         "trainer.run_dir={tmp}/runs: a file, expected a directory"),
]

PLOT = [
    case("plot-no-run-dir", "pretrain-plot", lambda w: [f"{w.tmp}/nothing", "-o", f"{w.tmp}/m.png"],
         "{tmp}/nothing: no such run directory"),
    case("plot-metrics-binary", "pretrain-plot", lambda w: [str(w.run), "-o", f"{w.tmp}/m.png"],
         "{run}/metrics.jsonl:1: not a JSON record", setup=lambda w: with_metrics(w, b"\xff\xfe\x00\x01\n" * 3)),
    case("plot-metrics-malformed", "pretrain-plot", lambda w: [str(w.run), "-o", f"{w.tmp}/m.png"],
         "{run}/metrics.jsonl:2: not a JSON record",
         setup=lambda w: with_metrics(w, b'{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')),
    case("plot-metrics-no-step", "pretrain-plot", lambda w: [str(w.run), "-o", f"{w.tmp}/m.png"],
         "{run}/metrics.jsonl:1: expected a JSON object with an integer 'step'",
         setup=lambda w: with_metrics(w, b'{"loss": 2.0}\n{"step": 2, "loss": 1.0}\n')),
    case("plot-output-below-a-file", "pretrain-plot", lambda w: [str(w.run), "-o", f"{w.file('out', 'x')}/m.png"],
         "-o {tmp}/out/m.png: lies below the file {tmp}/out"),
    case("plot-output-unknown-format", "pretrain-plot", lambda w: [str(w.run), "-o", f"{w.tmp}/m.xyz"],
         "-o {tmp}/m.xyz: unknown image format .xyz"),
    case("plot-output-is-a-directory", "pretrain-plot", lambda w: [str(w.run), "-o", str(w.tmp)],
         "-o {tmp}: a directory"),
]


@pytest.mark.parametrize("c", DATA + EVAL + GENERATE + EXPORT + PLAN + LAUNCH + PLOT)
def test_command_refuses(c, world, monkeypatch, capfd):
    monkeypatch.chdir(world.tmp)  # pretrain-launch and pretrain-plot write relative to it, if at all
    check_refused(c, world, monkeypatch, capfd)


def test_zst_inputs_read_whole_or_refuse_a_cut(tmp_path):
    """`.zst` inputs: several frames, or one streamed without its size, read whole; cut
    anywhere (or not zstd at all), the input is refused rather than read in part."""
    import zstandard

    from data_pipeline.corpus import CorpusError
    from data_pipeline.sources import read_records, resolve_inputs

    data = jsonl(GOOD_RECORDS * 50)
    compressor = zstandard.ZstdCompressor()
    streamed = compressor.compressobj()
    files = {"frames.jsonl.zst": compressor.compress(data[:5000]) + compressor.compress(data[5000:]),
             "streamed.jsonl.zst": streamed.compress(data) + streamed.flush()}

    def payloads(name: str, content: bytes) -> bytes:
        (tmp_path / name).write_bytes(content)
        (item,) = resolve_inputs([str(tmp_path / name)])
        return b"".join(record.payload for record in read_records(0, item))

    for name, content in files.items():
        assert payloads(name, content) == data, name
        for cut in (1, 20, len(content) // 2, len(content) - 1):
            with pytest.raises(CorpusError, match=f"{name}: cannot decompress"):
                payloads(name, content[:cut])
    with pytest.raises(CorpusError, match="not a zstd stream"):
        payloads("garbage.jsonl.zst", bytes(range(256)))
