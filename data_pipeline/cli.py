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


def _cleaning_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text-field", default="text", help="JSON/parquet/datasets field with the text")
    parser.add_argument("--normalize", default="NFC", choices=["NFC", "NFKC", "NFD", "NFKD", "none"])
    parser.add_argument("--keep-control-chars", action="store_true")
    parser.add_argument("--min-chars", type=int, default=1)
    parser.add_argument("--max-chars", type=int, default=0, help="0: no limit")
    parser.add_argument("--no-dedup", action="store_true")
    parser.add_argument("--on-bad-record", default="skip", choices=["skip", "error"],
                        help="undecodable or malformed records: count and skip, or stop")


def _cleaning(args) -> CleaningConfig:
    return CleaningConfig(text_field=args.text_field, normalize=args.normalize,
                          strip_control=not args.keep_control_chars, min_chars=args.min_chars,
                          max_chars=args.max_chars, dedup=not args.no_dedup,
                          on_bad_record=args.on_bad_record)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pretrain-data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    tok = sub.add_parser("tokenizer", help="train a SentencePiece model on a sample of the corpus")
    tok.add_argument("inputs", nargs="+")
    tok.add_argument("--output", required=True)
    tok.add_argument("--vocab-size", type=int, default=32000)
    tok.add_argument("--model-type", default="bpe", choices=["bpe", "unigram", "char"])
    tok.add_argument("--no-byte-fallback", action="store_true")
    tok.add_argument("--user-symbols", nargs="*", default=[], help="pieces never split, e.g. <tool>")
    tok.add_argument("--sample-bytes", type=int, default=100_000_000)
    tok.add_argument("--vocab-multiple", type=int, default=128)
    tok.add_argument("--tensor-parallel", type=int, default=1)
    _cleaning_args(tok)

    pre = sub.add_parser("preprocess", help="tokenize inputs into indexed shards")
    pre.add_argument("inputs", nargs="+")
    pre.add_argument("--tokenizer", required=True)
    pre.add_argument("--output", required=True)
    pre.add_argument("--num-shards", type=int, default=1)
    pre.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    pre.add_argument("--node-rank", type=int, default=int(os.environ.get("NODE_RANK", 0)))
    pre.add_argument("--num-nodes", type=int, default=int(os.environ.get("NUM_NODES", 1)))
    pre.add_argument("--chunk-bytes", type=int, default=1 << 18)
    pre.add_argument("--phase", default="all", choices=["all", "hashes"],
                     help="hashes: only write this node's document hashes for cross-node dedup, then stop")
    _cleaning_args(pre)

    chk = sub.add_parser("check", help="open every shard of a preprocessed directory")
    chk.add_argument("directory")
    chk.add_argument("--tokenizer")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "tokenizer":
        from data_pipeline.prepare import sample_documents
        from data_pipeline.tokenizer import check_fits, train_tokenizer

        if args.vocab_size < 64:
            raise ValueError(f"--vocab-size={args.vocab_size}: expected >= 64")
        docs = sample_documents(args.inputs, _cleaning(args), args.sample_bytes)
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
