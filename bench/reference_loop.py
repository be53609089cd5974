"""The plain-PyTorch training loop the product is measured against, in a process of its own.

A minimal hand-written trainer: `ReferenceLlama`, torch's AdamW, a LambdaLR
schedule, `clip_grad_norm_`. It runs in a freshly spawned process so that
nothing the product sets up for itself in the benchmark's process (its
allocator settings, compiled kernels, thread pools) carries over: it runs as
any plain script would. `ReferenceProcess` drives it step by step from the
benchmark, so the two can take turns.
"""

from __future__ import annotations

import multiprocessing as mp
import time

import torch

from bench.reference_llama import ReferenceLlama
from pretrain.config import Config


class ReferenceLoop:
    """nanoGPT-style: forward, backward, clip, AdamW step, schedule step."""

    def __init__(self, cfg: Config, weights: dict[str, torch.Tensor], padded_vocab: int):
        from data_pipeline.dataset import DataParallelLoader
        from pretrain.training.optim import learning_rate, parameter_groups
        from data_pipeline.training_data import training_data

        o, t = cfg.optim, cfg.trainer
        self.model = ReferenceLlama(cfg.model, padded_vocab)
        self.model.load_product_weights(weights)
        self.optimizer = torch.optim.AdamW(parameter_groups(self.model, o.weight_decay), lr=o.lr,
                                           betas=(o.beta1, o.beta2), eps=o.eps)
        total_steps = t.train_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: learning_rate(step, o, total_steps) / o.lr)
        # The same cached shards and sample order as the product's loader.
        self.loader = DataParallelLoader(training_data(cfg.data, log=lambda *_: None).train, t.micro_batch_size)
        self.accumulation = t.global_batch_size // t.micro_batch_size
        self.clip = o.grad_clip
        self.losses: list[float] = []

    def step(self) -> None:
        total = 0.0
        for _ in range(self.accumulation):
            batch = next(self.loader)
            loss = self.model(batch["tokens"], batch["labels"]).mean()
            (loss / self.accumulation).backward()
            total += loss.item()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.losses.append(total / self.accumulation)

    @torch.no_grad()
    def evaluate(self, batches: list[dict]) -> float:
        self.model.eval()
        loss = sum(self.model(b["tokens"], b["labels"]).mean().item() for b in batches) / len(batches)
        self.model.train()
        return loss


def timed(run, *args) -> tuple[float, float]:
    """Wall-clock and CPU seconds (all threads of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    run(*args)
    return time.perf_counter() - wall, time.process_time() - cpu


def _serve(conn, cfg: Config, weights: dict[str, torch.Tensor], padded_vocab: int) -> None:
    loop = ReferenceLoop(cfg, weights, padded_vocab)
    conn.send("ready")
    while True:
        command, argument = conn.recv()
        if command == "train":
            conn.send(timed(lambda: [loop.step() for _ in range(argument)]))
        elif command == "evaluate":
            conn.send(loop.evaluate(argument))
        elif command == "losses":
            conn.send(loop.losses)
        else:
            return


class ReferenceProcess:
    """The reference loop in a spawned process; it sleeps while the product runs."""

    def __init__(self, cfg: Config, product_model: torch.nn.Module, padded_vocab: int):
        weights = {name: tensor.detach().clone() for name, tensor in product_model.state_dict().items()
                   if isinstance(tensor, torch.Tensor)}
        context = mp.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, cfg, weights, padded_vocab), daemon=True)
        self.process.start()
        if self.conn.recv() != "ready":
            raise RuntimeError("the reference process did not start")

    def train(self, steps: int) -> tuple[float, float]:
        self.conn.send(("train", steps))
        return self.conn.recv()

    def evaluate(self, batches: list[dict]) -> float:
        self.conn.send(("evaluate", batches))
        return self.conn.recv()

    def losses(self) -> list[float]:
        self.conn.send(("losses", None))
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(("stop", None))
        self.process.join(timeout=60)
