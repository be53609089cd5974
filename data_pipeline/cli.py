"""`pretrain-data`: train a tokenizer, preprocess a corpus into shards, inspect shards.

  pretrain-data tokenizer INPUT... --output tok.model [--vocab-size 32000 --model-type bpe
                          --no-byte-fallback --user-symbols '<tool>' '<code>' --sample-bytes N]
  pretrain-data preprocess INPUT... --tokenizer tok.model --output DIR [--num-shards N --workers W
                          --node-rank k --num-nodes K --text-field text --min-chars 1 ...]
  pretrain-data check DIR [--tokenizer tok.model]

Every bad-input error is one line naming the file, with exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from common.errors import UserError, fail, first_line
from data_pipeline.cleaning import CleaningConfig, Report


_FORMATTER = argparse.RawDescriptionHelpFormatter
INPUTS_HELP = ("files, directories or globs of .txt, .jsonl (plain, .gz, .zst) and .parquet, datasets "
               "directories saved with save_to_disk, builder:NAME:FILES or hub:NAME[:SPLIT]")
EXAMPLES = {
    "tokenizer": """examples:
  pretrain-data tokenizer 'corpus/*.jsonl.zst' --output tok.model --vocab-size 32000
  pretrain-data tokenizer docs/ code/ --output tok.model --user-symbols '<tool>' '<code>' --sample-bytes 50000000""",
    "preprocess": """examples:
  pretrain-data preprocess 'corpus/*.jsonl.zst' --tokenizer tok.model --output shards/web --num-shards 64
  # node k of K (each node its share; exact dedup across nodes):
  pretrain-data preprocess 'corpus/*.jsonl.zst' --tokenizer tok.model --output shards/web \\
      --node-rank k --num-nodes K""",
    "check": """examples:
  pretrain-data check shards/web
  pretrain-data check shards/web --tokenizer tok.model""",
}
EXAMPLES["pretrain-data"] = "\n".join([
    "examples:",
    "  pretrain-data tokenizer 'corpus/*.jsonl.zst' --output tok.model --vocab-size 32000",
    "  pretrain-data preprocess 'corpus/*.jsonl.zst' --tokenizer tok.model --output shards/web --num-shards 64",
    "  pretrain-data check shards/web",
    "  pretrain 'data.blend=[{path: shards/web, weight: 1.0}]'",
    "",
    "pretrain-data COMMAND --help shows each command's options.",
])


def _cleaning_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text-field", default="text",
                        help="the field holding the text in JSON lines, parquet and datasets inputs (default: text)")
    parser.add_argument("--normalize", default="NFC", choices=["NFC", "NFKC", "NFD", "NFKD", "none"],
                        help="Unicode normalization of every document (default: NFC)")
    parser.add_argument("--keep-control-chars", action="store_true",
                        help="keep C0/C1 control characters (default: remove all but tab, newline and CR)")
    parser.add_argument("--min-chars", type=int, default=1,
                        help="drop documents shorter than this many characters, whitespace stripped (default: 1)")
    parser.add_argument("--max-chars", type=int, default=0,
                        help="drop documents longer than this many characters (default: 0, no limit)")
    parser.add_argument("--no-dedup", action="store_true",
                        help="keep exact duplicate documents (default: keep the first of each)")
    parser.add_argument("--on-bad-record", default="skip", choices=["skip", "error"],
                        help="undecodable or malformed records: count and skip them, or stop with an error "
                             "naming the file (default: skip)")


def _cleaning(args) -> CleaningConfig:
    return CleaningConfig(text_field=args.text_field, normalize=args.normalize,
                          strip_control=not args.keep_control_chars, min_chars=args.min_chars,
                          max_chars=args.max_chars, dedup=not args.no_dedup,
                          on_bad_record=args.on_bad_record)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pretrain-data", description=__doc__.split("\n")[0],
                                     epilog=EXAMPLES["pretrain-data"], formatter_class=_FORMATTER)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="tokenizer, preprocess or check (pretrain-data COMMAND --help for its options)")

    tok = sub.add_parser("tokenizer", help="train a SentencePiece model on a sample of the corpus",
                         description="Train a SentencePiece tokenizer on a sample of the inputs, cleaned as\n"
                                     "preprocess cleans them, and print its size and hash.",
                         epilog=EXAMPLES["tokenizer"], formatter_class=_FORMATTER)
    tok.add_argument("inputs", nargs="+", metavar="INPUT", help=INPUTS_HELP)
    tok.add_argument("--output", required=True, metavar="FILE",
                     help="the SentencePiece model to write, e.g. tok.model (required)")
    tok.add_argument("--vocab-size", type=int, default=32000, help="pieces in the vocabulary, >= 64 (default: 32000)")
    tok.add_argument("--model-type", default="bpe", choices=["bpe", "unigram", "char"],
                     help="SentencePiece model type (default: bpe)")
    tok.add_argument("--no-byte-fallback", action="store_true",
                     help="no byte pieces for characters outside the vocabulary (default: byte fallback on "
                          "for bpe and unigram, so no text becomes <unk>)")
    tok.add_argument("--user-symbols", nargs="*", default=[], metavar="PIECE",
                     help="pieces never split, e.g. '<tool>' '<code>'")
    tok.add_argument("--sample-bytes", type=int, default=100_000_000,
                     help="bytes of cleaned text to train on, taken from every input in proportion to its "
                          "size (default: 100000000)")
    tok.add_argument("--vocab-multiple", type=int, default=128,
                     help="the embedding rows printed: the vocabulary padded to a multiple of this times "
                          "--tensor-parallel, as model.vocab_multiple pads it (default: 128)")
    tok.add_argument("--tensor-parallel", type=int, default=1,
                     help="the tensor-parallel size the padding must divide, as parallel.tensor (default: 1)")
    _cleaning_args(tok)

    pre = sub.add_parser("preprocess", help="tokenize inputs into indexed shards",
                         description="Clean, deduplicate and tokenize the inputs into megatron-core indexed\n"
                                     "shards (.bin/.idx) plus a manifest, on every core. A rerun skips the\n"
                                     "shards already complete. Train on them with\n"
                                     "pretrain 'data.blend=[{path: DIR, weight: 1.0}]'.",
                         epilog=EXAMPLES["preprocess"], formatter_class=_FORMATTER)
    pre.add_argument("inputs", nargs="+", metavar="INPUT", help=INPUTS_HELP)
    pre.add_argument("--tokenizer", required=True, metavar="FILE",
                     help="the SentencePiece model to encode with, e.g. from pretrain-data tokenizer (required)")
    pre.add_argument("--output", required=True, metavar="DIR",
                     help="the directory to write the shards and manifest into (required)")
    pre.add_argument("--num-shards", type=int, default=1,
                     help="shards to cut this node's inputs into, by position in the inputs (default: 1)")
    pre.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                     help="worker processes that clean and encode (default: the number of CPUs)")
    pre.add_argument("--node-rank", type=int, default=int(os.environ.get("NODE_RANK", 0)),
                     help="this node's index k in a job of --num-nodes K, each node taking its share of the "
                          "inputs (default: $NODE_RANK, else 0)")
    pre.add_argument("--num-nodes", type=int, default=int(os.environ.get("NUM_NODES", 1)),
                     help="nodes preprocessing the same inputs into the same --output; dedup stays exact "
                          "across them (default: $NUM_NODES, else 1)")
    pre.add_argument("--chunk-bytes", type=int, default=1 << 18,
                     help="raw bytes handed to a worker at a time; changes speed, never the output "
                          "(default: 262144)")
    pre.add_argument("--phase", default="all", choices=["all", "hashes"],
                     help="hashes: only write this node's document hashes for cross-node dedup, then stop "
                          "(default: all)")
    _cleaning_args(pre)

    chk = sub.add_parser("check", help="open every shard of a preprocessed directory",
                         description="Open every shard of a preprocessed directory, check it against the\n"
                                     "manifest, and print the shard, document and token counts.",
                         epilog=EXAMPLES["check"], formatter_class=_FORMATTER)
    chk.add_argument("directory", help="a directory written by pretrain-data preprocess, or one shard's "
                                        "prefix (PREFIX.bin and PREFIX.idx)")
    chk.add_argument("--tokenizer", metavar="FILE",
                     help="also check that the manifest names this SentencePiece model")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "tokenizer":
        from itertools import chain

        from data_pipeline.prepare import sample_documents
        from data_pipeline.tokenizer import check_fits, train_tokenizer

        if args.vocab_size < 64:
            raise ValueError(f"--vocab-size={args.vocab_size}: expected >= 64")
        docs = sample_documents(args.inputs, _cleaning(args), args.sample_bytes)
        first = next(docs, None)  # an input with no usable text fails here, naming the inputs
        if first is None:
            from data_pipeline.corpus import CorpusError

            raise CorpusError(f"{', '.join(args.inputs)}: no non-empty documents left after cleaning")
        docs = chain([first], docs)
        tokenizer = train_tokenizer(
            docs, args.output, vocab_size=args.vocab_size, model_type=args.model_type,
            sample_bytes=args.sample_bytes, byte_fallback=not args.no_byte_fallback and args.model_type != "char",
            user_defined_symbols=args.user_symbols,
        )
        padded = check_fits(tokenizer.vocab_size, None, args.vocab_multiple, args.tensor_parallel)
        print(f"tokenizer: {tokenizer.path} ({tokenizer.vocab_size} pieces, embedding rows {padded}, "
              f"sha256 {tokenizer.hash})")
    elif args.command == "preprocess":
        from data_pipeline.preprocess import PreprocessJob, preprocess

        if not 0 <= args.node_rank < args.num_nodes:
            raise ValueError(f"--node-rank={args.node_rank}: expected 0 <= rank < --num-nodes={args.num_nodes}")
        if args.num_shards < 1:
            raise ValueError(f"--num-shards={args.num_shards}: expected >= 1")
        job = PreprocessJob(args.inputs, args.tokenizer, args.output, args.num_shards, args.workers,
                            args.node_rank, args.num_nodes, _cleaning(args), args.chunk_bytes)
        manifest = preprocess(job, phase=args.phase)
        if args.phase == "hashes":
            print(f"preprocess: document hashes in {manifest['hashes']}")
        else:
            print(Report.from_dict(manifest["report"]).table())
    else:
        from data_pipeline.shards import open_corpus
        from data_pipeline.tokenizer import Tokenizer

        corpus = open_corpus(args.directory, Tokenizer(args.tokenizer) if args.tokenizer else None)
        print(f"{args.directory}: {len(corpus.shards)} shards, {corpus.num_documents:,} documents, "
              f"{corpus.num_tokens:,} tokens")
    return 0


def cli() -> None:
    # megatron-core warns at import that optional CUDA fusion libraries are absent.
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|apex).*")
    try:
        sys.exit(main())
    except (UserError, ValueError, OSError) as err:  # CorpusError, DataError, ShardError are UserErrors
        fail("pretrain-data", first_line(err))


if __name__ == "__main__":
    cli()
