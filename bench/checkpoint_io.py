"""Checkpoint save/load bandwidth against plain sequential disk I/O, and the step stall of
a synchronous against an asynchronous save, in one run.

Builds a one-process model whose checkpoint (weights plus AdamW moments) is a
few hundred MB, then measures on this machine:

- save: `Trainer.save_checkpoint` (DeepSpeed files, RNG states, fsync, manifest,
  rename) in GB/s, against writing the same number of bytes to one file and
  fsyncing it;
- load: `Trainer.load_checkpoint` in GB/s, against reading that file back (both
  from the page cache, as a resume right after a save would);
- stall: how long the training loop waits for a synchronous save, and for an
  asynchronous one (`trainer.async_checkpoint=true`: a copy to CPU memory, the
  writing in a background thread).

    .venv/bin/python -m bench.checkpoint_io [--hidden 512] [--layers 8] [--dir /tmp/ckpt-bench]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import numpy as np
import torch

from pretrain.config import Config, from_dict

VOCAB, SEQ = 256, 64


class RandomTokens:
    def __len__(self) -> int:
        return 1_000_000

    def __getitem__(self, index: int) -> np.ndarray:
        return np.random.default_rng(index).integers(0, VOCAB, SEQ + 1)


def config(run_dir: Path, hidden: int, layers: int, background: bool) -> Config:
    return from_dict(Config, {
        "model": {"num_layers": layers, "hidden_size": hidden, "num_attention_heads": 8,
                  "ffn_hidden_size": hidden * 11 // 4 // 8 * 8, "max_seq_len": SEQ},
        "data": {"seq_len": SEQ},
        "trainer": {"run_dir": str(run_dir), "train_steps": 2, "micro_batch_size": 2, "global_batch_size": 2,
                    "eval_interval": 0, "eval_batches": 1, "log_interval": 100, "device": "cpu",
                    "keep_last_checkpoints": 1, "async_checkpoint": background},
    })


def disk_reference(directory: Path, size: int) -> tuple[float, float]:
    """Seconds to write `size` bytes to one file with fsync, and to read them back."""
    block = os.urandom(16 << 20)
    path = directory / "reference.bin"
    start = time.perf_counter()
    with open(path, "wb") as f:
        written = 0
        while written < size:
            written += f.write(block[: min(len(block), size - written)])
        f.flush()
        os.fsync(f.fileno())
    write = time.perf_counter() - start
    start = time.perf_counter()
    with open(path, "rb") as f:
        while f.read(16 << 20):
            pass
    read = time.perf_counter() - start
    path.unlink()
    return write, read


def checkpoint_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args()

    from parallel.groups import init_process_groups
    from data_pipeline.training_data import TrainingData
    from pretrain.training.build import build_trainer

    root = Path(args.dir or tempfile.mkdtemp(prefix="checkpoint-io-"))
    root.mkdir(parents=True, exist_ok=True)
    topology = init_process_groups(1, 1, torch.device("cpu"))
    data = TrainingData(train=RandomTokens(), valid=RandomTokens(), vocab_size=VOCAB)
    try:
        stalls = {}
        for background in (False, True):
            cfg = config(root / ("async" if background else "sync"), args.hidden, args.layers, background)
            trainer = build_trainer(cfg, topology, data, callbacks=[])  # the loop only; saves are timed below
            trainer.fit()  # two steps: the optimizer has its moments
            start = time.perf_counter()
            path = trainer.save_checkpoint()
            stalls[background] = time.perf_counter() - start
            if background:
                start = time.perf_counter()
                trainer.checkpointer.commit_pending(trainer.state.step)
                written = stalls[background] + time.perf_counter() - start
            else:
                size = checkpoint_bytes(path)
                save = stalls[background]
                start = time.perf_counter()
                trainer.load_checkpoint(path)
                load = time.perf_counter() - start
        write, read = disk_reference(root, size)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)

    gb = size / 1e9
    print(f"checkpoint: {size / 1e6:,.0f} MB ({trainer.num_params / 1e6:.1f}M parameters, weights and AdamW moments)")
    print(f"save   {gb / save:6.2f} GB/s   sequential write + fsync {gb / write:6.2f} GB/s   ratio {write / save:.2f}")
    print(f"load   {gb / load:6.2f} GB/s   sequential read          {gb / read:6.2f} GB/s   ratio {read / load:.2f}")
    print(f"stall  synchronous save {stalls[False]:.2f} s, asynchronous {stalls[True]:.2f} s "
          f"(written {written:.2f} s after the call)   ratio {stalls[True] / stalls[False]:.2f}")


if __name__ == "__main__":
    main()
