"""The memory report: each rank's measured bytes after the first step, next to the plan's."""

from __future__ import annotations

import torch.distributed as dist
from megatron.core import parallel_state as ps

from parallel.memory import FirstStepMemory, format_bytes
from pretrain.config import Config
from pretrain.training.callback import Callback
from pretrain.training.memory_plan import predict_rank


class MemoryReport(Callback):
    """Logs, after the first step, each rank's measured bytes next to the plan's prediction.

    Every rank measures its own engine, from the hooks put on its optimizer when
    training starts; rank 0 prints one line per rank.
    """

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.first_step: FirstStepMemory | None = None
        self.reported: list[dict] | None = None

    def on_train_start(self, trainer) -> None:
        if self.first_step is None:  # once, however often the loop is entered
            self.first_step = FirstStepMemory(trainer.engine.deepspeed)
            self.world_size = trainer.topology.world_size
            self.vocab_size = self.cfg.model.vocab_size or trainer.data.vocab_size

    def on_step_end(self, trainer, metrics: dict) -> None:
        if self.reported is not None:
            return
        measured = self.first_step.result()
        if measured is None:
            return
        pp_rank = ps.get_pipeline_model_parallel_rank()
        mine = {"rank": dist.get_rank(), "tp": ps.get_tensor_model_parallel_rank(), "pp": pp_rank,
                "dp": ps.get_data_parallel_rank(), "measured": measured,
                "predicted": predict_rank(self.cfg, self.world_size, pp_rank, self.vocab_size)}
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        self.reported = everyone
        trainer.print(format_ranks(everyone))


def format_ranks(ranks: list[dict]) -> str:
    lines = ["memory per rank, measured (predicted): parameters / gradients / optimizer states / offloaded"]
    for r in ranks:
        m, p = r["measured"], r["predicted"]
        cells = "  ".join(f"{format_bytes(getattr(m, k))} ({format_bytes(getattr(p, k))})"
                          for k in ("parameters", "gradients", "optimizer", "offloaded"))
        lines.append(f"  rank {r['rank']:>3} (tp {r['tp']} pp {r['pp']} dp {r['dp']}): {cells}")
    return "\n".join(lines)
