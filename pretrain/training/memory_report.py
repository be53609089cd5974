"""The memory report: each rank's measured bytes after the first step, next to the plan's."""

from __future__ import annotations

import torch.distributed as dist
from megatron.core import parallel_state as ps

from parallel.compile import resolve_compile
from parallel.memory import FirstStepMemory, PeakTrace, format_bytes
from pretrain.config import Config
from pretrain.planning.parameters import predict_rank
from pretrain.planning.peak import predict_peak
from pretrain.training.callback import Callback


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


class PeakMemoryReport(Callback):
    """The peak bytes of the second optimizer step on each rank, traced tensor by tensor
    (`parallel.memory.PeakTrace`), next to the planner's predicted peak.

    The first step is left out: DeepSpeed allocates its states lazily during it.
    The trace sees every operator, so it is for measuring, not for every run.
    A compiled model allocates inside its kernels, out of the trace's sight: then
    nothing is measured (`result` stays None).
    """

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.trace: PeakTrace | None = None
        self.result: dict | None = None

    def on_train_start(self, trainer) -> None:
        self.world_size = trainer.topology.world_size
        self.vocab_size = self.cfg.model.vocab_size or trainer.data.vocab_size
        self.compiled = resolve_compile(self.cfg.trainer.compile, trainer.topology) != "none"

    def on_step_end(self, trainer, metrics: dict) -> None:
        if self.compiled:
            return
        if self.trace is None and self.result is None:
            self.trace = PeakTrace(trainer.engine.deepspeed)
            self.trace.__enter__()
        elif self.trace is not None:
            self.trace.__exit__(None, None, None)
            pp_rank = ps.get_pipeline_model_parallel_rank()
            self.result = {"measured": self.trace.peak, "baseline": self.trace.baseline,
                           "predicted": predict_peak(self.cfg, self.world_size, pp_rank, self.vocab_size,
                                                     trainer.device.type)}
            self.trace = None

    def on_train_end(self, trainer) -> None:
        if self.trace is not None:  # the run ended before its second step did
            self.trace.__exit__(None, None, None)
            self.trace = None
