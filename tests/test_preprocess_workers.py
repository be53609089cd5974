"""Preprocessing's worker pool and fast paths: order, errors, dead workers, cleaning and shard bytes as before."""

import json
import multiprocessing as mp
import os
import re
import signal
import time
import unicodedata

import numpy as np
import pytest

from data_pipeline.cleaning import CleaningConfig, Report, clean_records
from data_pipeline.indexed import ShardWriter
from data_pipeline.ordered_pool import OrderedPool, WorkerDied
from data_pipeline.sources import JSON_LINE, RAW_TEXT, STRING

CTX = mp.get_context("fork")
CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def _no_init() -> None:
    pass


def _failing_init() -> None:
    raise RuntimeError("cannot load the tokenizer")


def _square(x):
    if x == "raise":
        raise ValueError("bad record in input 7")
    if x == "exit":
        os._exit(3)
    if x == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.002 * (x % 3))  # uneven tasks finish out of order
    return x * x


@pytest.mark.slow  # forks the pool's worker processes
def test_results_come_in_task_order_across_calls():
    pool = OrderedPool(CTX, 3, _no_init, ())
    try:
        assert list(pool.imap(_square, range(40), ahead=5)) == [x * x for x in range(40)]
        assert list(pool.imap(_square, [], ahead=5)) == []
        assert list(pool.imap(_square, range(9), ahead=2, last=True)) == [x * x for x in range(9)]
    finally:
        pool.close()
    assert all(not p.is_alive() for p in pool._procs)


@pytest.mark.parametrize("item, error, message", [
    ("raise", ValueError, "bad record in input 7"),
    ("exit", WorkerDied, "exited with code 3"),
    ("kill", WorkerDied, f"exited with code -{signal.SIGKILL.value}"),
])
@pytest.mark.slow  # forks the pool's worker processes
def test_a_failing_task_or_dead_worker_is_an_error_not_a_hang(item, error, message):
    pool = OrderedPool(CTX, 2, _no_init, ())
    try:
        with pytest.raises(error, match=message):
            list(pool.imap(_square, [1, 2, item, 4, 5], ahead=4))
    finally:
        pool.terminate()


@pytest.mark.slow  # forks the pool's worker processes
def test_a_failing_initializer_is_an_error():
    pool = OrderedPool(CTX, 2, _failing_init, ())
    try:
        with pytest.raises(WorkerDied, match="exited with code 1"):
            list(pool.imap(_square, [1], ahead=2))
    finally:
        pool.terminate()


def reference_clean(text: str, form: str) -> str:
    """What cleaning did before its byte-level fast paths: normalise, then strip controls by regex."""
    if form != "none":
        text = unicodedata.normalize(form, text)
    return CONTROL.sub("", text)


@pytest.mark.parametrize("form", ["NFC", "NFKD", "none"])
def test_cleaning_fast_paths_match_the_plain_definition(form):
    singles = [chr(c) for c in range(0x300) if chr(c).strip()]  # every C0, C1, Latin-1 and combining mark
    texts = singles + [f"a{c}b" for c in singles] + [
        "plain ascii\tline\r\n", "cafe\u0301", "\ufb01 ligature \u212b", "\u00c2\u0085 x", "nbsp\u00a0\u00a9",
        "\x1b[0m colour", "\ud7ff\ue000 edge", "日本語 😀 \x7f",
    ]
    records = [(STRING, t) for t in texts] + [(RAW_TEXT, t.encode()) for t in texts] + [
        (JSON_LINE, json.dumps({"text": t}, ensure_ascii=ensure).encode()) for t in texts for ensure in (True, False)
    ]
    kept, data = [], []
    out = clean_records(records, CleaningConfig(normalize=form), ["in"], [0] * len(records), Report(), kept, data)
    expected = [c for c in (reference_clean(t, form) for t in texts) if c.strip()]
    assert out == expected * 2 + [c for c in expected for _ in range(2)]
    assert data == [t.encode() for t in out] and len(kept) == len(out)


def test_a_lone_surrogate_is_a_bad_record_not_a_crash():
    report = Report()
    records = [(JSON_LINE, b'{"text": "half \\ud800 pair"}'), (JSON_LINE, b'{"text": "fine"}')]
    assert clean_records(records, CleaningConfig(), ["in.jsonl"], [0, 0], report) == ["fine"]
    assert (report.stages["decode"].docs_in, report.stages["decode"].docs_out) == (2, 1)


def test_documents_written_at_once_are_the_same_bytes(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 60000, rng.integers(0, 50)).astype(np.uint16) for _ in range(30)]
    one = ShardWriter(tmp_path / "one", np.uint16)
    for doc in docs:
        one.add(doc)
    one.commit()
    many = ShardWriter(tmp_path / "many", np.uint16)
    many.add_documents(np.concatenate(docs[:10]), np.array([len(d) for d in docs[:10]]))
    many.add(docs[10])
    many.add_documents(np.concatenate(docs[11:]), np.array([len(d) for d in docs[11:]]))
    many.commit()
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"one{suffix}").read_bytes() == (tmp_path / f"many{suffix}").read_bytes()
    assert (many.documents, many.tokens) == (one.documents, one.tokens)
    with pytest.raises(ValueError, match="lengths add up to"):
        many.add_documents(np.zeros(3, np.uint16), np.array([1, 1]))
