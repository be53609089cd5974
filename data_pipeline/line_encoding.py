"""SentencePiece encoding of long documents in groups of whole lines, with the same ids.

SentencePiece encodes a document as one sequence: BPE keeps a priority queue
of every symbol pair in it, unigram a lattice over all of it. On documents of
tens of kilobytes that working set outgrows the core's cache, and encoding the
same text in pieces of a few hundred bytes is about a third faster on one core
(more where two cores share a cache).

Cutting after a newline changes no id when no piece can span a newline and the
cut cannot change how the text around it is normalised or segmented. That
holds for models like the ones `train_tokenizer` writes, and `split_reason`
checks it for any model:
  - no piece contains "\\n" (so no BPE merge and no lattice path crosses one);
  - identity normalisation without whitespace collapsing (so no rule rewrites
    text across the cut);
  - byte fallback on (a newline is then always its byte piece; without it,
    consecutive unknown characters would merge into one <unk> across the cut);
  - BPE segmentation. BPE merges a pair only inside a piece, in an
    order set by the pieces' scores and, among equals, their position, so the
    merges within one line group are the same whatever surrounds it. Unigram
    is left whole: its Viterbi adds scores in floating point from the start of
    the input, so a near-tie between two segmentations of the same line can
    round the other way when the line is encoded on its own. (Char
    segmentation would be exact too, but is rare enough to be left whole.)
SentencePiece puts a dummy "▁" before every input it encodes. The pieces are
encoded with a copy of the model that does not, and the document's first piece
gets a leading space instead, which identity normalisation turns into the
same "▁". Models that fail a check are encoded whole, as before.
"""

from __future__ import annotations

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

# Pieces of about this many bytes (cut at the first newline after it) encoded fastest on one core.
PIECE_BYTES = 256



def split_reason(model: sentencepiece_model_pb2.ModelProto) -> str | None:
    """Why cutting documents after newlines could change this model's ids; None when it cannot."""
    normalizer, trainer = model.normalizer_spec, model.trainer_spec
    if trainer.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        return f"{sentencepiece_model_pb2.TrainerSpec.ModelType.Name(trainer.model_type).lower()} segmentation"
    if normalizer.precompiled_charsmap or normalizer.name not in ("identity", ""):
        return f"normalisation {normalizer.name!r}"
    if normalizer.remove_extra_whitespaces:
        return "extra whitespace removed"
    if normalizer.add_dummy_prefix and not normalizer.escape_whitespaces:
        return "dummy prefix without whitespace escaping"
    if trainer.treat_whitespace_as_suffix:
        return "whitespace as suffix"
    if not trainer.byte_fallback:
        return "no byte fallback"
    if any("\n" in piece.piece for piece in model.pieces):
        return "a piece contains a newline"
    return None


class LineGroupEncoder:
    """`encode(documents)`: every document's ids as int32 arrays, encoded in line groups where exact."""

    def __init__(self, model_bytes: bytes, piece_bytes: int = PIECE_BYTES):
        self.whole = spm.SentencePieceProcessor(model_proto=model_bytes)
        model = sentencepiece_model_pb2.ModelProto.FromString(model_bytes)
        self.reason = split_reason(model)
        self.piece_bytes = piece_bytes
        self.dummy_prefix = model.normalizer_spec.add_dummy_prefix
        model.normalizer_spec.add_dummy_prefix = False
        self.pieces = spm.SentencePieceProcessor(model_proto=model.SerializeToString())

    def eos_id(self) -> int:
        return self.whole.eos_id()

    def encode(self, documents: list[bytes]) -> tuple[list[np.ndarray], list[int]]:
        """(ids of each piece, pieces per document); a document's ids are its pieces' end to end.

        UTF-8 bytes in; a cut lands after b"\\n", which is never inside a multi-byte character.
        """
        if self.reason is not None:
            return self.whole.encode(documents, num_threads=1, out_type="numpy"), [1] * len(documents)
        pieces: list[bytes] = []
        counts: list[int] = []
        target = self.piece_bytes
        for document in documents:
            if not document:  # SentencePiece adds no dummy prefix to empty input
                pieces.append(document)
                counts.append(1)
                continue
            first = len(pieces)
            start, size = 0, len(document)
            while start < size:
                end = document.find(b"\n", start + target)
                end = size if end < 0 else end + 1
                pieces.append(document[start:end])
                start = end
            if self.dummy_prefix:
                pieces[first] = b" " + pieces[first]
            counts.append(len(pieces) - first)
        return self.pieces.encode(pieces, num_threads=1, out_type="numpy"), counts
