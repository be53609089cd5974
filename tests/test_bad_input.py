"""Bad input that used to end in a traceback: each is one line (`prog: error: ...`), exit status 2,
nothing half-written. And `pretrain-generate`'s note when `--max-new-tokens` does not fit.

  - a tokenizer vocabulary the corpus cannot fill (`pretrain`, plain and streaming data);
  - a `trainer.run_dir` that is a file, or lies below one;
  - a file that is no SentencePiece model, given to `pretrain-generate` or `pretrain-data`.

The parametrised suite of bad inputs across all eight commands is in
tests/test_bad_input_pretrain.py and tests/test_bad_input_tools.py (shared set-up:
tests/test_bad_input_setup.py).
"""

import sys
from pathlib import Path

import pytest

from common.errors import UserError
from data_pipeline.tokenizer import Tokenizer, TokenizerError, train_tokenizer

TEXT = ("def add(a, b):\n    return a + b\n\n"
        "The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs.\n")


def write_corpus(directory: Path, files: int = 3) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        (directory / f"doc{i}.txt").write_text(f"# document {i}\n" + TEXT * (i + 2))
    return directory


def garbage_files(directory: Path) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    files = {"binary": b"\x00\x01garbage\xff" * 10, "text": b"hello, not a tokenizer\n", "empty": b"",
             "proto without pieces": b"\xf8\x3e\x01"}  # parses as a protobuf, but holds no model
    paths = {}
    for name, data in files.items():
        paths[name] = directory / f"{name.replace(' ', '_')}.model"
        paths[name].write_bytes(data)
    return paths


def one_line_error(capsys, exit_, prog: str) -> str:
    """The single stderr line of a command that failed with bad input; its message."""
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), lines
    return lines[0].removeprefix(f"{prog}: error: ")


# --- 1. a vocabulary the corpus cannot fill ---------------------------------------------------

@pytest.mark.parametrize("streaming", [False, True], ids=["shards", "streaming"])
def test_unfillable_vocabulary_is_one_line_naming_the_key(tmp_path, streaming):
    """The path `pretrain` takes (`training/run.py` → `load_training_data`), in this process."""
    from data_pipeline.config import DataConfig, TokenizerConfig
    from data_pipeline.training_data import load_training_data

    cache = tmp_path / "cache" / "data"
    cfg = DataConfig(sources=[str(write_corpus(tmp_path / "corpus"))], cache_dir=str(cache),
                     streaming=streaming, tokenizer=TokenizerConfig(vocab_size=200000))
    with pytest.raises(UserError) as err:
        load_training_data(cfg, rank=0, log=lambda *_: None)
    message = str(err.value)
    assert isinstance(err.value, TokenizerError) and "\n" not in message
    assert message.startswith("data.tokenizer.vocab_size=200000: SentencePiece training on "), message
    assert f"sampled from data.sources=['{tmp_path / 'corpus'}'] failed: Vocabulary size too high (200000). " \
           "Please set it to a value <= " in message
    assert not (tmp_path / "cache").exists()  # nothing half-written, data.cache_dir's parents included


def test_pretrain_data_tokenizer_names_its_output(tmp_path, monkeypatch, capsys):
    from data_pipeline import cli

    output = tmp_path / "out" / "tok.model"
    monkeypatch.setattr(sys, "argv", ["pretrain-data", "tokenizer", str(write_corpus(tmp_path / "corpus")),
                                      "--output", str(output), "--vocab-size", "200000"])
    with pytest.raises(SystemExit) as exit_:
        cli.cli()
    message = one_line_error(capsys, exit_, "pretrain-data")
    assert message.startswith(f"{output}: SentencePiece training failed: Vocabulary size too high (200000)")
    assert not output.exists()


# --- 2. trainer.run_dir that is a file, or lies below one --------------------------------------

def test_check_run_dir(tmp_path):
    from pretrain.checkpoint.files import RunDirError, check_run_dir

    check_run_dir(tmp_path)  # a directory
    check_run_dir(tmp_path / "new" / "deeper")  # not there yet: made by the run
    file = tmp_path / "notes.txt"
    file.write_text("x")
    with pytest.raises(RunDirError) as err:
        check_run_dir(file)
    assert str(err.value) == f"trainer.run_dir={file}: a file, expected a directory"
    with pytest.raises(RunDirError) as err:
        check_run_dir(file / "run" / "a")
    assert str(err.value) == f"trainer.run_dir={file / 'run' / 'a'}: lies below the file {file}; expected a directory"
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "gone")
    with pytest.raises(RunDirError, match="a broken symbolic link, expected a directory"):
        check_run_dir(dangling)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "notes.txt"]  # wrote nothing


@pytest.mark.parametrize("below", [False, True], ids=["is-a-file", "below-a-file"])
def test_pretrain_refuses_a_run_dir_file_before_writing(tmp_path, monkeypatch, capsys, below):
    """`pretrain`'s own validation (its Hydra task, given the composed tree), in this process:
    refused there, before the heavy imports, process groups and the run's lock (`training/run.py`)."""
    import types

    from pretrain.hydra_config import compose_raw
    from pretrain.main import hydra_main

    def run(*_):
        raise AssertionError("pretrain's validation let the run directory through to training/run.py")

    monkeypatch.setitem(sys.modules, "pretrain.training.run", types.SimpleNamespace(run=run))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK"):
        monkeypatch.delenv(key, raising=False)
    file = tmp_path / "runs"
    file.write_text("not a directory\n")
    run_dir = file / "default" if below else file
    raw = compose_raw([f"trainer.run_dir={run_dir}", f"data.cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(SystemExit) as exit_:
        hydra_main(raw)
    message = one_line_error(capsys, exit_, "pretrain")
    expected = (f"lies below the file {file}; expected a directory" if below
                else "a file, expected a directory")
    assert message == f"trainer.run_dir={run_dir}: {expected}"
    assert [p.name for p in tmp_path.iterdir()] == ["runs"] and file.read_text() == "not a directory\n"


# --- 3. a file that is no SentencePiece model ---------------------------------------------------

def test_loading_a_file_that_is_no_model_is_one_line(tmp_path):
    from pretrain.checkpoint.consolidate import Checkpoint, CheckpointError, load_tokenizer
    from pretrain.model.config import ModelConfig

    checkpoint = Checkpoint(path=tmp_path, run_dir=None, step=None, model=ModelConfig(), train_config={},
                            state_dict={}, tokenizer_hash=None)
    for name, path in garbage_files(tmp_path / "bad").items():
        with pytest.raises(TokenizerError) as err:
            Tokenizer(path)
        assert str(err.value).startswith(f"{path}: not a SentencePiece model ("), name
        assert "\n" not in str(err.value) and "src/" not in str(err.value), name
        with pytest.raises(CheckpointError) as err:  # what pretrain-generate, -eval and -export get
            load_tokenizer(checkpoint, str(path))
        assert str(err.value).startswith(f"{path}: not a SentencePiece model ("), name


def test_pretrain_data_preprocess_refuses_a_file_that_is_no_model(tmp_path, monkeypatch, capsys):
    from data_pipeline import cli

    corpus = write_corpus(tmp_path / "corpus")
    bad = garbage_files(tmp_path / "bad")["binary"]
    output = tmp_path / "shards"
    monkeypatch.setattr(sys, "argv", ["pretrain-data", "preprocess", str(corpus), "--tokenizer", str(bad),
                                      "--output", str(output), "--workers", "1"])
    with pytest.raises(SystemExit) as exit_:
        cli.cli()
    message = one_line_error(capsys, exit_, "pretrain-data")
    assert message == (f"{bad}: not a SentencePiece model (it does not parse as a SentencePiece model proto)")
    assert not output.exists()


# --- pretrain-generate: a tokenizer that is no model, and --max-new-tokens past max_seq_len --------

MAX_SEQ_LEN = 48


@pytest.fixture
def small_run(tmp_path, single_process_groups) -> Path:
    """A run directory as `pretrain` lays it out: a tiny model's checkpoint and its tokenizer."""
    import dataclasses

    import torch
    from test_generate import SHAPE, llama

    from data_pipeline.config import DataConfig
    from data_pipeline.corpus import Document
    from pretrain.config import Config
    from pretrain.model.config import ModelConfig

    run_dir = tmp_path / "run"
    docs = [Document("doc", TEXT * 3), Document("doc2", TEXT.upper() * 3)]
    tokenizer = train_tokenizer(docs, run_dir / "tokenizer.model", vocab_size=100, byte_fallback=False)
    assert tokenizer.vocab_size == 100
    cfg = ModelConfig(**SHAPE, max_seq_len=MAX_SEQ_LEN)
    checkpoint = run_dir / "checkpoints" / "step_0000007"
    checkpoint.mkdir(parents=True)
    config = dataclasses.asdict(Config(model=cfg, data=DataConfig(seq_len=MAX_SEQ_LEN)))
    torch.save({"module": llama(cfg, vocab=128).state_dict(), "config": config, "trainer": {"step": 7},
                "tokenizer_hash": tokenizer.hash}, checkpoint / "mp_rank_00_model_states.pt")
    (run_dir / "checkpoints" / "latest").write_text("step_0000007")
    return run_dir


def test_generate_refuses_a_tokenizer_that_is_no_model(small_run, tmp_path, capsys):
    from pretrain.tools.generate import main

    bad = garbage_files(tmp_path / "bad")["text"]
    with pytest.raises(SystemExit) as exit_:
        main([str(small_run), "--tokenizer", str(bad), "--prompt", "def"])
    assert one_line_error(capsys, exit_, "pretrain-generate").startswith(f"{bad}: not a SentencePiece model (")


def test_generate_notes_when_max_new_tokens_is_cut(small_run, capsys):
    from pretrain.tools.generate import main

    prompt = "def add"
    tokenizer = Tokenizer(small_run / "tokenizer.model")
    prompt_tokens = 1 + len(tokenizer.encode([prompt])[0])  # EOS first: a new document
    room = MAX_SEQ_LEN - prompt_tokens
    # Generation may still end early at an EOS, so the cap is checked, not the exact length.
    text = main([str(small_run), "--prompt", prompt, "--max-new-tokens", "500", "--temperature", "0"])
    assert text.startswith(prompt)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"pretrain-generate: note: --max-new-tokens=500 cut to {room} "
                   f"(model.max_seq_len={MAX_SEQ_LEN} minus the prompt's {prompt_tokens} tokens)"]
    assert len(tokenizer.encode([text])[0]) <= MAX_SEQ_LEN

    main([str(small_run), "--prompt", prompt, "--max-new-tokens", str(room), "--temperature", "0"])
    assert capsys.readouterr().err == ""  # fits: no note


# --- the whole `pretrain` process ---------------------------------------------------------------

@pytest.mark.slow  # a `pretrain` process
def test_pretrain_process_unfillable_vocabulary_is_one_line(tmp_path):
    from conftest import TINY, run_pretrain

    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    overrides = [o for o in TINY if not o.startswith("data.tokenizer.vocab_size=")]
    result = run_pretrain(*overrides, "data.tokenizer.vocab_size=200000", "data.max_corpus_bytes=200000",
                          f"trainer.run_dir={run_dir}", f"data.cache_dir={cache}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("pretrain: error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("pretrain: error: data.tokenizer.vocab_size=200000: SentencePiece training "), lines[0]
    assert "failed: Vocabulary size too high (200000). Please set it to a value <= " in lines[0]
    assert not cache.exists()
