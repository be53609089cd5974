"""What the bad-input suites share (tests/test_bad_input_pretrain.py, tests/test_bad_input_tools.py).

A case names a command, its arguments and what to break first. It runs the
command's console-script function in this process (as `pyproject.toml` names
it, with `sys.argv` set), and checks what every refusal must be:

- exit status 2 (`common/errors.py`);
- exactly one line on stderr, `<prog>: error: ...`, naming the key, file or value;
- no traceback;
- every file that was there before has the same SHA-256 afterwards, and nothing
  new appeared in the case's directory (its run directory, data and checkpoints).

One tiny run is trained once per session, in this process, through `pretrain`
itself; each case works on its own copy of it. `pretrain` runs here with
`trainer.verbose=true`, which leaves this process's output streams alone; the
default console mode is checked on a real process.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import json
import logging
import shutil
import signal
import sys
import tomllib
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
STEP = "step_0000002"
STATES = "mp_rank_00_model_states.pt"
RNG = "rng_state_rank00000.pt"
TEXT = ("def add(a, b):\n    return a + b\n\n"
        "The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs.\n")

# The trained run: two steps of a one-layer model, on eight small documents.
TRAINED = {
    "data.tokenizer.vocab_size": "100", "data.tokenizer.byte_fallback": "false", "data.seq_len": "32",
    "data.workers": "1", "model.num_layers": "1", "model.hidden_size": "32", "model.num_attention_heads": "2",
    "model.num_query_groups": "1", "model.ffn_hidden_size": "64", "model.max_seq_len": "64",
    "trainer.micro_batch_size": "2", "trainer.global_batch_size": "2", "trainer.train_steps": "2",
    "trainer.eval_interval": "0", "trainer.eval_batches": "1", "trainer.log_interval": "1",
    "trainer.compile": "none", "trainer.device": "cpu", "optim.warmup_steps": "1",
}


# --- bad files ---------------------------------------------------------------------------------

def jsonl(records: list) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


GOOD_RECORDS = [{"text": f"record {i}: " + TEXT * (i + 1)} for i in range(6)]


def _cut(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _zstd(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor().compress(data)


# name → bytes: each a corpus file that is bad in one way.
BAD_DATA: dict[str, Callable[[], bytes]] = {
    "empty.txt": lambda: b"",
    "binary.txt": lambda: bytes(range(256)) * 4,
    "latin1.txt": lambda: "café, naïve façade\n".encode("latin-1") * 20,  # not UTF-8
    "malformed.jsonl": lambda: jsonl(GOOD_RECORDS[:3]) + b'{"text": "cut short\n' + jsonl(GOOD_RECORDS[3:]),
    "no_text.jsonl": lambda: jsonl([{"content": r["text"]} for r in GOOD_RECORDS]),
    "cut.jsonl.gz": lambda: _cut(gzip.compress(jsonl(GOOD_RECORDS * 20))),
    "cut.jsonl.zst": lambda: _cut(_zstd(jsonl(GOOD_RECORDS * 20))),
}


# --- trees and their hashes ----------------------------------------------------------------------

def snapshot(*roots: Path) -> dict[str, str]:
    """{path: SHA-256} of every file under the roots, and {path: "dir"} of every directory."""
    found = {}
    for root in roots:
        if root.is_file():
            found[str(root)] = hashlib.sha256(root.read_bytes()).hexdigest()
            continue
        for path in [root, *root.rglob("*")] if root.is_dir() else []:
            found[str(path)] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def differences(before: dict[str, str], after: dict[str, str], new_allowed: bool = False) -> list[str]:
    changed = [f"changed: {p}" for p in before if p in after and after[p] != before[p]]
    removed = [f"removed: {p}" for p in before if p not in after]
    added = [] if new_allowed else [f"new: {p}" for p in after if p not in before]
    return sorted(changed + removed + added)


# --- one command, in this process ----------------------------------------------------------------

def run_in_process(prog: str, args: list[str], monkeypatch) -> int:
    """Runs a console script's function with `sys.argv` set; returns its exit status. An
    uncaught exception is printed as Python would print it, and counts as exit status 1."""
    module, function = SCRIPTS[prog].split(":")
    main = getattr(importlib.import_module(module), function)
    if prog == "pretrain":  # the console stays as it is: `quiet` would take over this process's descriptors
        args = [*args, "trainer.verbose=true"]
    monkeypatch.setattr(sys, "argv", [prog, *args])
    # A world of one, as a plain `pretrain` sees it, whatever process group this session started.
    for key in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("LOCAL_RANK", "0")
    if prog == "pretrain-launch":
        monkeypatch.setattr(importlib.import_module("launch.cli"), "_statuses", [])
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
    root = logging.getLogger()
    log_state = (root.handlers[:], root.level)
    try:
        main()
        status = 0
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except Exception:  # what a real process would print before exiting with status 1
        traceback.print_exc()
        sys.stderr.flush()
        status = 1
    finally:
        for signum, handler in handlers.items():  # `pretrain` takes over SIGTERM and SIGUSR1
            signal.signal(signum, handler)
        root.handlers[:], root.level = log_state  # Hydra configures logging for its job
        from hydra.core.global_hydra import GlobalHydra

        GlobalHydra.instance().clear()
    return status


# --- the trained run and each case's world ---------------------------------------------------------

@dataclass(frozen=True)
class Trained:
    root: Path
    run: Path  # never handed to a command: each case copies it
    corpus: Path
    cache: Path
    other_tokenizer: Path  # a SentencePiece model the run was not trained with
    shards: Path | None = None  # the run's preprocessed shards in the cache (cases may add others there)


_trained: dict[str, Trained] = {}  # one per session, whichever suite asks first


@pytest.fixture(scope="session")
def trained(tmp_path_factory, single_process_groups) -> Trained:
    if "run" not in _trained:
        _trained["run"] = train_once(tmp_path_factory.mktemp("bad_input_trained"))
    return _trained["run"]


def train_once(root: Path) -> Trained:
    from data_pipeline.corpus import Document
    from data_pipeline.tokenizer import train_tokenizer

    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(8):
        (corpus / f"doc{i}.txt").write_text(f"# document {i}\n" + TEXT * (i + 2))
    other = "Lorem ipsum dolor sit amet, consectetur adipiscing elit; 0123456789.\n" * 20
    other_tokenizer = root / "other" / "tokenizer.model"
    train_tokenizer([Document("a", other), Document("b", other.upper())], other_tokenizer, vocab_size=80,
                    byte_fallback=False)
    trained = Trained(root, root / "run", corpus, root / "cache", other_tokenizer)
    with pytest.MonkeyPatch.context() as monkeypatch:
        status = run_in_process("pretrain", pretrain_args(trained, trained.run), monkeypatch)
    assert status == 0, "the shared tiny run did not train"
    assert (trained.run / "checkpoints" / STEP / "COMPLETE").is_file()
    (shards,) = trained.cache.glob("*/shards")
    return replace(trained, shards=shards)


def pretrain_args(trained: Trained, run_dir: Path, **changes: str) -> list[str]:
    """`pretrain` overrides of the trained run's config, with `changes` (`data__seq_len="8"`
    for `data.seq_len=8`) and another run directory."""
    values = {"data.sources": f"[{trained.corpus}]", "data.cache_dir": str(trained.cache), **TRAINED,
              "trainer.run_dir": str(run_dir)}
    values.update({key.replace("__", "."): value for key, value in changes.items()})
    return [f"{key}={value}" for key, value in values.items()]


@dataclass
class World:
    """One case's files. Everything under `tmp` must stay as it was; so must the shared corpus
    and other tokenizer, and every file already in the shared data cache."""

    tmp: Path
    trained: Trained
    run: Path = field(init=False)
    lock: object = None  # the run directory's lock, when the case holds it

    def __post_init__(self):
        self.run = self.tmp / "run"
        shutil.copytree(self.trained.run, self.run)

    @property
    def ckpt(self) -> Path:
        return self.run / "checkpoints" / STEP

    def data(self, name: str) -> Path:
        """One of BAD_DATA's files, written into this case's directory."""
        path = self.tmp / "data" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(BAD_DATA[name]())
        return path

    def file(self, name: str, data: bytes | str) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path

    def hold(self) -> None:
        """Takes the run directory's lock in this process: a live job on this machine."""
        from pretrain.checkpoint.run_lock import RunDirLock

        self.lock = RunDirLock(self.run)
        self.lock.acquire()

    def pretrain(self, run_dir: Path | None = None, **changes: str) -> list[str]:
        return pretrain_args(self.trained, run_dir or self.run, **changes)

    def fresh(self, **changes: str) -> list[str]:
        """A first run into `tmp/fresh`, with its data cache in `tmp/cache`: neither may appear."""
        return self.pretrain(self.tmp / "fresh", data__cache_dir=str(self.tmp / "cache"), **changes)

    def names(self) -> dict[str, str]:
        return {"tmp": str(self.tmp), "run": str(self.run), "ckpt": str(self.ckpt), "states": str(self.ckpt / STATES),
                "corpus": str(self.trained.corpus), "other_tokenizer": str(self.trained.other_tokenizer)}


# --- the cases ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    prog: str
    args: Callable[[World], list[str]]
    expect: str  # part of the error line, formatted with World.names()
    setup: Callable[[World], object] | None = None
    prefix: str | None = None  # the error line's program name, when not `prog`


def case(id: str, prog: str, args, expect: str, setup=None, *, prefix=None, xfail: str | None = None,
         marks=()):
    marks = list(marks) + ([pytest.mark.xfail(reason=xfail, strict=True)] if xfail else [])
    return pytest.param(Case(prog, args, expect, setup, prefix), id=id, marks=marks)


def check_refused(c: Case, world: World, monkeypatch, capfd) -> str:
    """Runs the case and checks every property of a refusal; returns the error line."""
    if c.setup is not None:
        c.setup(world)
    args = c.args(world)  # which may write the bad files it names
    trained = world.trained
    shared, cache = snapshot(trained.corpus, trained.other_tokenizer), snapshot(trained.cache)
    before = snapshot(world.tmp)
    capfd.readouterr()
    status = run_in_process(c.prog, args, monkeypatch)
    err = capfd.readouterr().err
    if "Traceback" in err:
        pytest.fail(f"exit status {status}, with a traceback on stderr:\n{err}", pytrace=False)
    assert status == 2, f"exit status {status}, expected 2; stderr:\n{err}"
    lines = err.splitlines()
    prefix = f"{c.prefix or c.prog}: error: "
    assert len(lines) == 1 and lines[0].startswith(prefix), f"expected one line `{prefix}...`; stderr:\n{err}"
    expected = c.expect.format(**world.names())
    assert expected in lines[0], f"expected {expected!r} in the error line:\n{lines[0]}"
    assert differences(before, snapshot(world.tmp)) == []
    assert differences(shared, snapshot(trained.corpus, trained.other_tokenizer)) == []
    assert differences(cache, snapshot(trained.cache), new_allowed=True) == []
    return lines[0]


@pytest.fixture
def world(tmp_path, trained):
    w = World(tmp_path, trained)
    yield w
    if w.lock is not None:
        w.lock.release()


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garble(path: Path) -> None:
    """The same number of bytes, none of them the file's."""
    path.write_bytes(bytes((b + 101) % 256 for b in path.read_bytes()))
