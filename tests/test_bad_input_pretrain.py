"""`pretrain` refusing bad input: one line, exit status 2, no file touched.

Config values, corpus files, tokenizers, run directories, damaged checkpoints
and mismatched resumes, and a run directory another job holds. Each case runs
`pretrain`'s console-script function in this process (see
tests/test_bad_input_setup.py); the cases that get past the config check reach
the real `training/run.py`. One real `pretrain` process closes the file,
refused by a run directory another job holds.
"""

import os
from pathlib import Path
import subprocess
import sys

import pytest

from conftest import child_env
from test_bad_input_setup import (RNG, STATES, World, case, check_refused, differences, garble, snapshot,
                                  trained, truncate, world)  # noqa: F401 (fixtures)

P = "pretrain"


CONFIG = [
    case("unknown-key", P, lambda w: w.pretrain(model__hidden_sise="64"), "model.hidden_sise"),
    case("unknown-key-added", P, lambda w: [*w.pretrain(), "+trainer.bogus=1"], "trainer.bogus: unknown key"),
    case("wrong-type-int", P, lambda w: w.pretrain(model__hidden_size="abc"), "model.hidden_size='abc': expected int"),
    case("wrong-type-float", P, lambda w: w.pretrain(trainer__train_steps="1.5"),
         "trainer.train_steps=1.5: expected int"),
    case("wrong-type-list", P, lambda w: w.pretrain(model__num_layers="[1,2]"), "model.num_layers=[1, 2]"),
    case("out-of-range-lr", P, lambda w: w.pretrain(optim__lr="-1"), "optim.lr=-1.0: expected > 0"),
    case("out-of-range-seq-len", P, lambda w: w.pretrain(data__seq_len="0"), "data.seq_len=0: expected > 0"),
    case("seq-len-past-model", P, lambda w: w.pretrain(data__seq_len="128"), "data.seq_len=128"),
    case("bad-enum", P, lambda w: w.pretrain(trainer__on_bad_steps="explode"),
         "trainer.on_bad_steps='explode': expected one of rollback, abort"),
    case("bad-enum-precision", P, lambda w: w.pretrain(parallel__precision="fp8"), "parallel.precision='fp8'"),
    # Long context: the sequence split over context-parallel ranks, the heads exchanged
    # between them, and RoPE scaling's positions.
    case("context-not-dividing-seq", P, lambda w: w.pretrain(parallel__context="3"),
         "data.seq_len=32: expected a multiple of parallel.context=3"),
    case("context-not-dividing-heads", P, lambda w: w.pretrain(parallel__context="4"),
         "model.num_attention_heads=2: expected the 2 heads per tensor-parallel rank to be a multiple of "
         "parallel.context=4"),
    case("context-below-one", P, lambda w: w.pretrain(parallel__context="0"), "parallel.context=0: expected >= 1"),
    case("rope-scaling-missing-field", P, lambda w: w.pretrain(model__rope_scaling__type="llama3",
                                                               model__rope_scaling__factor="2"),
         "model.rope_scaling.original_max_position_embeddings=None"),
    case("seq-past-scaled-positions", P, lambda w: w.pretrain(
        model__rope_scaling__type="llama3", model__rope_scaling__factor="2",
        model__rope_scaling__original_max_position_embeddings="16"), "model.max_seq_len=64: above the 32 positions"),
    # Expert parallelism: whole experts per rank, taken from the data-parallel ranks, under ZeRO 1-2.
    case("expert-without-experts", P, lambda w: w.pretrain(parallel__expert="2", parallel__zero_stage="1"),
         "parallel.expert=2: expected model.moe.num_experts > 0"),
    case("expert-not-dividing-experts", P, lambda w: w.pretrain(model__moe__num_experts="3", model__moe__top_k="2",
                                                               parallel__expert="2", parallel__zero_stage="1"),
         "model.moe.num_experts=3: expected a multiple of parallel.expert=2"),
    case("expert-not-dividing-data-parallel", P, lambda w: w.pretrain(
        model__moe__num_experts="4", model__moe__top_k="2", parallel__expert="2", parallel__zero_stage="1"),
         "parallel.expert=2: expected a divisor of the data-parallel x context-parallel size 1"),
    case("expert-without-zero", P, lambda w: w.pretrain(model__moe__num_experts="4", model__moe__top_k="2",
                                                       parallel__expert="2"),
         "parallel.zero_stage=0 with parallel.expert=2: expected parallel.zero_stage 1 or 2"),
    case("bad-config-group", P, lambda w: [*w.pretrain(), "model=nonexistent"], "model/nonexistent"),
    case("override-syntax", P, lambda w: [*w.pretrain(), "model.hidden_size==3"], "model.hidden_size==3"),
    case("override-without-value", P, lambda w: [*w.pretrain(), "model.hidden_size"], "model.hidden_size"),
]

DATA = [
    case("corpus-missing", P, lambda w: w.fresh(data__sources=f"[{w.tmp}/no_such_dir]"), "{tmp}/no_such_dir"),
    case("corpus-empty-file", P, lambda w: w.fresh(data__sources=f"[{w.data('empty.txt')}]"),
         "0 non-empty documents"),
    case("corpus-binary", P, lambda w: w.fresh(data__sources=f"[{w.data('binary.txt')}]", data__on_bad_record="error"),
         "{tmp}/data/binary.txt: bad record (not UTF-8"),
    case("corpus-not-utf8", P, lambda w: w.fresh(data__sources=f"[{w.data('latin1.txt')}]",
                                                 data__on_bad_record="error"),
         "{tmp}/data/latin1.txt: bad record (not UTF-8"),
    case("jsonl-malformed", P, lambda w: w.fresh(data__sources=f"[{w.data('malformed.jsonl')}]",
                                                 data__on_bad_record="error"),
         "{tmp}/data/malformed.jsonl: bad record"),
    case("jsonl-no-text-field", P, lambda w: w.fresh(data__sources=f"[{w.data('no_text.jsonl')}]",
                                                     data__on_bad_record="error"),
         "{tmp}/data/no_text.jsonl: bad record (no string field 'text')"),
    case("gz-truncated", P, lambda w: w.fresh(data__sources=f"[{w.data('cut.jsonl.gz')}]"),
         "{tmp}/data/cut.jsonl.gz: cannot decompress"),
    case("zst-truncated", P, lambda w: w.fresh(data__sources=f"[{w.data('cut.jsonl.zst')}]"),
         "{tmp}/data/cut.jsonl.zst: cannot decompress"),
    case("tokenizer-garbage", P, lambda w: w.fresh(data__tokenizer__model=str(w.data("binary.txt"))),
         "{tmp}/data/binary.txt: not a SentencePiece model"),
    case("tokenizer-missing", P, lambda w: w.fresh(data__tokenizer__model=f"{w.tmp}/none.model"),
         "{tmp}/none.model"),
    case("tokenizer-past-model-vocab", P,  # the trained run's data, as cached: nothing to prepare
         lambda w: w.pretrain(w.tmp / "fresh", model__vocab_size="64", model__vocab_multiple="1"),
         "model.vocab_size=64: the tokenizer has 100 pieces"),
]

RUN_DIR = [
    case("run-dir-is-a-file", P, lambda w: w.pretrain(w.file("runs", "a file\n")),
         "trainer.run_dir={tmp}/runs: a file, expected a directory"),
    case("run-dir-below-a-file", P, lambda w: w.pretrain(w.file("runs", "a file\n") / "a"),
         "trainer.run_dir={tmp}/runs/a: lies below the file {tmp}/runs"),
    # A directory no one can create in, root included (the tests run as root in CI).
    case("run-dir-uncreatable", P, lambda w: w.pretrain(Path("/proc/pretrain-run")),
         "trainer.run_dir=/proc/pretrain-run: cannot create it"),
    case("run-dir-held", P, lambda w: w.pretrain(), f"trainer.run_dir={{run}}: in use by pid {os.getpid()}",
         setup=World.hold),
    case("resume-never", P, lambda w: w.pretrain(trainer__resume="never"),
         "trainer.run_dir={run} already holds checkpoint step_0000002"),
]

CHECKPOINT = [
    case("states-truncated", P, lambda w: w.pretrain(), "{states}: ", setup=lambda w: truncate(w.ckpt / STATES)),
    case("states-garbage-same-size", P, lambda w: w.pretrain(), "{states}: ", setup=lambda w: garble(w.ckpt / STATES)),
    case("states-missing", P, lambda w: w.pretrain(), "{states}: missing from checkpoint step_0000002",
         setup=lambda w: (w.ckpt / STATES).unlink()),
    case("rng-missing", P, lambda w: w.pretrain(), f"{{ckpt}}/{RNG}: missing from checkpoint",
         setup=lambda w: (w.ckpt / RNG).unlink()),
    case("rng-garbage-same-size", P, lambda w: w.pretrain(), f"{{ckpt}}/{RNG}", setup=lambda w: garble(w.ckpt / RNG)),
    case("manifest-garbage", P, lambda w: w.pretrain(), "{ckpt}/COMPLETE: unreadable checkpoint manifest",
         setup=lambda w: garble(w.ckpt / "COMPLETE")),
    case("resume-incomplete", P, lambda w: w.pretrain(trainer__resume=str(w.ckpt)), "{ckpt}: incomplete checkpoint",
         setup=lambda w: (w.ckpt / "COMPLETE").unlink()),
    case("resume-not-a-checkpoint", P, lambda w: w.pretrain(trainer__resume=str(w.tmp / "run")),
         "trainer.resume={run}: not a checkpoint directory"),
    case("resume-other-shape", P, lambda w: w.pretrain(model__hidden_size="64"),
         "{ckpt}: written for model.hidden_size=32, but the config has model.hidden_size=64"),
    case("resume-other-tokenizer", P, lambda w: w.pretrain(data__tokenizer__model=str(w.trained.other_tokenizer)),
         "{ckpt}: written with tokenizer"),
    case("resume-other-vocab", P, lambda w: w.pretrain(data__tokenizer__vocab_size="90"),
         "{ckpt}: written with tokenizer"),
    case("checkpoint-tokenizer-garbage", P, lambda w: w.pretrain(), "{ckpt}: written with tokenizer",
         setup=lambda w: garble(w.ckpt / "tokenizer.model")),
]


@pytest.mark.parametrize("c", CONFIG + DATA + RUN_DIR + CHECKPOINT)
def test_pretrain_refuses(c, world, monkeypatch, capfd):
    check_refused(c, world, monkeypatch, capfd)


# --- a real process ---------------------------------------------------------------------------------

@pytest.mark.slow  # a `pretrain` process
def test_pretrain_process_refuses_a_held_run_dir(tmp_path, trained):
    """The whole process, in its default (quiet) console mode: the refusal is its only line on
    stderr, and the held run directory keeps every file as it was (no log either)."""
    w = World(tmp_path, trained)
    w.hold()
    try:
        before = snapshot(w.tmp)
        result = subprocess.run([sys.executable, "-m", "pretrain.main", *w.pretrain()], cwd=w.tmp,
                                env=child_env(), capture_output=True, text=True, timeout=600)
        changes = differences(before, snapshot(w.tmp))
    finally:
        w.lock.release()
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(f"pretrain: error: trainer.run_dir={w.run}: in use by pid {os.getpid()} on host ")
    assert lines[0].endswith("wait for it to end or choose another trainer.run_dir")
    assert changes == []
