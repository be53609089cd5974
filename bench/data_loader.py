"""Loader throughput against what a training step of the default model consumes, in one run.

Builds the default data (cached: `data.cache_dir`), times the loader's
micro-batches (tokens/s delivered), then times forward + backward + AdamW
steps of the default model (configs/model/tiny.yaml, default batch and
sequence length) on this machine and prints the ratio (target >= 20).

With `--streaming`, the loader is the streaming one (data.streaming=true:
raw stdlib text cleaned, tokenized and packed on the fly by
data.streaming_workers processes) instead of the indexed shards.

    .venv/bin/python -m bench.data_loader [--batches 200] [--steps 3] [--streaming]
"""

from __future__ import annotations

import argparse
import time
import warnings

warnings.filterwarnings("ignore")

import torch

from data_pipeline.dataset import DataParallelLoader, PackedSequenceDataset
from data_pipeline.prepare import prepare_data
from data_pipeline.shards import open_corpus, split_documents
from bench.product_loop import compose


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--streaming", action="store_true", help="time the streaming loader instead")
    args = parser.parse_args()
    cfg = compose([])  # the config `pretrain` runs by default
    d, t = cfg.data, cfg.trainer

    prepared = prepare_data(d, log=lambda *_: None)
    corpus = open_corpus(prepared.corpus, prepared.tokenizer)
    train_docs, _ = split_documents(corpus.num_documents, d.valid_fraction, d.seed)
    dataset = PackedSequenceDataset(corpus, d.seq_len, d.seed, documents=train_docs)
    if args.streaming:
        from data_pipeline.stream_loader import StreamingLoader
        from data_pipeline.streaming import stream_spec

        loader = StreamingLoader(stream_spec(d, prepared.tokenizer), t.micro_batch_size)
    else:
        loader = DataParallelLoader(dataset, t.micro_batch_size)
    next(loader)  # the streaming workers start here
    start = time.perf_counter()
    for _ in range(args.batches):
        batch = next(loader)
    loader_rate = args.batches * batch["tokens"].numel() / (time.perf_counter() - start)

    from parallel.groups import init_process_groups
    from pretrain.model.llama import LlamaModel, transformer_config

    init_process_groups(1, 1, torch.device("cpu"))
    model = LlamaModel(cfg.model, transformer_config(cfg.model, params_dtype=torch.float32),
                       cfg.model.padded_vocab_size(prepared.tokenizer.vocab_size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    accumulation = t.global_batch_size // t.micro_batch_size

    def step() -> None:
        for _ in range(accumulation):
            b = next(loader)
            model(b["tokens"], b["labels"]).mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    step()  # warm up
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    step_rate = args.steps * t.global_batch_size * d.seq_len / (time.perf_counter() - start)

    kind = f"streaming, {d.streaming_workers} workers" if args.streaming else "indexed"
    print(f"loader              {loader_rate:,.0f} tokens/s ({kind}, micro-batch {t.micro_batch_size} x {d.seq_len})")
    print(f"training step       {step_rate:,.0f} tokens/s (default model {cfg.model.name}, CPU)")
    print(f"ratio               {loader_rate / step_rate:.1f}x  (target >= 20)")


if __name__ == "__main__":
    main()
