"""Encoding documents in line groups gives exactly the ids of encoding them whole."""

import numpy as np
import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from data_pipeline.corpus import Document, iter_documents
from data_pipeline.line_encoding import LineGroupEncoder, split_reason
from data_pipeline.preprocess import pack_ids
from data_pipeline.tokenizer import train_tokenizer

EDGE_CASES = [
    "", "\n", "\n\n\n", "x", " leading space", "  two\n  lines indented\n", "trailing newline\n",
    "windows\r\nline ends\r\n", "tab\tseparated\n\tand indented", "x" * 3000 + "\n" + "y" * 10,
    "unknown right after a newline\n🙂\n𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🙂🙂\n\n🙂", "<tool> at a line start\n<tool>\n<tool><tool>",
    "\n" + "word " * 400 + "\n" + "end",
]


@pytest.fixture(scope="module")
def documents() -> list[Document]:
    return list(iter_documents(["stdlib"], 1_500_000))


@pytest.fixture(scope="module")
def corpus(documents) -> list[str]:
    return [d.text for d in documents]


@pytest.fixture(scope="module")
def model_bytes(tmp_path_factory, documents) -> bytes:
    return train_tokenizer(documents, tmp_path_factory.mktemp("bpe") / "tok.model", vocab_size=600,
                           sample_bytes=400_000, user_defined_symbols=["<tool>"]).model_bytes


def whole_ids(model: bytes, texts: list[str]) -> list[np.ndarray]:
    sp = spm.SentencePieceProcessor(model_proto=model)
    return sp.encode([t.encode() for t in texts], num_threads=1, out_type="numpy")


def joined(pieces: list[np.ndarray], counts: list[int]) -> list[np.ndarray]:
    starts = np.cumsum([0, *counts])
    return [np.concatenate(pieces[a:b]) if b > a else np.zeros(0, np.int32) for a, b in zip(starts, starts[1:])]


@pytest.mark.parametrize("piece_bytes", [1, 64, 256])
def test_line_groups_give_the_ids_of_whole_documents(model_bytes, corpus, piece_bytes):
    texts = EDGE_CASES + corpus[:300]
    encoder = LineGroupEncoder(model_bytes, piece_bytes=piece_bytes)
    assert encoder.reason is None
    documents = [t.encode() for t in texts]
    pieces, counts = encoder.encode(documents)
    assert len(counts) == len(texts)
    assert sum(counts) > 4 * len(texts)  # documents really were cut
    expected = whole_ids(model_bytes, texts)
    differing = [i for i, (a, b) in enumerate(zip(joined(pieces, counts), expected)) if not np.array_equal(a, b)]
    assert differing == [], [texts[i][:80] for i in differing]

    # and packed for the shard: the ids of each document, then EOS
    lengths, flat = pack_ids(pieces, counts, encoder.eos_id(), np.uint16)
    assert lengths.tolist() == [len(e) + 1 for e in expected]
    assert np.array_equal(flat, np.concatenate([np.append(e, encoder.eos_id()) for e in expected]))


def with_spec(model_bytes: bytes, change) -> bytes:
    model = sentencepiece_model_pb2.ModelProto.FromString(model_bytes)
    change(model)
    return model.SerializeToString()


def trained_without_byte_fallback(model):
    kept = [p for p in model.pieces if p.type != p.BYTE]
    del model.pieces[:]
    model.pieces.extend(kept)
    model.trainer_spec.byte_fallback = False


@pytest.mark.parametrize("change, reason", [
    (lambda m: setattr(m.normalizer_spec, "remove_extra_whitespaces", True), "extra whitespace removed"),
    (trained_without_byte_fallback, "no byte fallback"),
    (lambda m: setattr(m.trainer_spec, "treat_whitespace_as_suffix", True), "whitespace as suffix"),
    (lambda m: setattr(m.normalizer_spec, "name", "nmt_nfkc"), "normalisation 'nmt_nfkc'"),
    (lambda m: setattr(m.pieces[-1], "piece", "a\nb"), "a piece contains a newline"),
    (lambda m: setattr(m.trainer_spec, "model_type", sentencepiece_model_pb2.TrainerSpec.UNIGRAM),
     "unigram segmentation"),
    (lambda m: setattr(m.trainer_spec, "model_type", sentencepiece_model_pb2.TrainerSpec.CHAR), "char segmentation"),
])
def test_models_where_a_cut_could_change_ids_are_encoded_whole(change, reason, tmp_path, documents, corpus):
    base = train_tokenizer(documents, tmp_path / "tok.model", vocab_size=400, sample_bytes=200_000).model_bytes
    assert split_reason(sentencepiece_model_pb2.ModelProto.FromString(base)) is None
    model = with_spec(base, change)
    encoder = LineGroupEncoder(model, piece_bytes=1)
    assert encoder.reason == reason
    texts = EDGE_CASES + corpus[:20]
    pieces, counts = encoder.encode([t.encode() for t in texts])
    assert counts == [1] * len(texts)
    assert all(np.array_equal(a, b) for a, b in zip(pieces, whole_ids(model, texts)))
