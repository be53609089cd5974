"""`pretrain` as a user runs it: a short real run, resume rules, and bad input."""

import json
from pathlib import Path

import pytest

from conftest import TINY, run_pretrain


pytestmark = pytest.mark.slow  # `pretrain` processes


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pretrain")


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("pretrain: error:")]


def test_short_run_learns_checkpoints_and_never_overwrites(workdir):
    run_dir = workdir / "run"
    common = (*TINY, f"data.cache_dir={workdir / 'cache'}", f"trainer.run_dir={run_dir}",
              "trainer.eval_interval=15")

    first = run_pretrain(*common, "trainer.train_steps=30", cwd=workdir)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "── summary" in first.stdout and "steps             30" in first.stdout

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 31))
    assert all(r["grad_norm"] > 0 and r["tokens_per_s"] > 0 for r in steps)
    early = sum(r["loss"] for r in steps[:5]) / 5
    late = sum(r["loss"] for r in steps[-5:]) / 5
    assert late < early - 0.5
    valid = [(r["step"], r["valid/loss"]) for r in records if "valid/loss" in r]
    assert [s for s, _ in valid] == [0, 15, 30]
    assert valid[-1][1] < valid[0][1]

    checkpoint = run_dir / "checkpoints" / "step_0000030"
    assert (checkpoint / "mp_rank_00_model_states.pt").is_file()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_0000030"
    assert "train_steps: 30" in (run_dir / "config.yaml").read_text()
    assert (run_dir / "tokenizer.model").stat().st_size > 0
    saved = {p: p.read_bytes() for p in checkpoint.iterdir()}

    # A second start on the same directory refuses to start over...
    refused = run_pretrain(*common, "trainer.train_steps=30", "trainer.resume=never", cwd=workdir)
    assert refused.returncode == 2
    assert len(error_lines(refused)) == 1
    assert str(run_dir) in error_lines(refused)[0] and "step_0000030" in error_lines(refused)[0]
    assert {p: p.read_bytes() for p in checkpoint.iterdir()} == saved

    # ...and by default continues from the checkpoint, keeping it.
    resumed = run_pretrain(*common, "trainer.train_steps=35", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 30" in resumed.stdout
    assert (run_dir / "checkpoints" / "step_0000035" / "mp_rank_00_model_states.pt").is_file()
    assert {p: p.read_bytes() for p in checkpoint.iterdir()} == saved
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r][-5:] == [31, 32, 33, 34, 35]


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["model.hidden_sise=64"], "model.hidden_sise"),
        (["+model.hidden_sise=64"], "model.hidden_sise: unknown key"),
        (["model.hidden_size=62"], "model.hidden_size=62: expected a multiple of model.num_attention_heads=4"),
        (["model.num_query_groups=3"], "model.num_attention_heads=4: expected a multiple of model.num_query_groups=3"),
        (["data.seq_len=5000"], "data.seq_len=5000: expected at most model.max_seq_len"),
        (["data.sources=[/nonexistent/corpus.txt]"], "/nonexistent/corpus.txt: no such file"),
        (["data.sources=[{empty}]"], "non-empty documents"),
    ],
)
def test_bad_input_fails_in_one_line_and_writes_nothing(workdir, overrides, expected):
    empty = workdir / "empty_corpus"
    empty.mkdir(exist_ok=True)
    (empty / "blank.txt").write_text("   \n")
    run_dir, cache = workdir / "never_written", workdir / "cache_never_written"
    result = run_pretrain(
        *TINY, f"trainer.run_dir={run_dir}", f"data.cache_dir={cache}",
        *[o.format(empty=empty) for o in overrides], cwd=workdir,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = error_lines(result)
    assert len(lines) == 1 and expected in lines[0], result.stderr[-2000:]
    assert not run_dir.exists() and not cache.exists()
