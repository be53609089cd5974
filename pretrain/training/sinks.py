"""Where metrics go: `metrics.jsonl` always, plus W&B or TensorBoard as `logger.kind` says.

A sink is a callback with a `log(record)`; the trainer hands every record to
each sink of the logging rank.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Mapping

from common.errors import first_line
from common.typed_config import ConfigError
from pretrain.checkpoint.files import WANDB_ID_FILE, wandb_run_id, write_run_file
from pretrain.config import Config
from pretrain.training.callback import Callback


class MetricsFile(Callback):
    """Appends every logged record to `metrics.jsonl` in the run directory (rank 0).

    Three kinds of record, each with an integer `step`: a training step
    (`loss`, `lr`, `grad_norm`, `step_time`, `tokens_per_s`, `tflops`, `mfu`
    when a peak is known, `loss_scale` under fp16, `consumed_tokens`,
    `memory_bytes`, `skipped_steps`), an evaluation (`valid/loss`, `valid/ppl`) and a checkpoint
    (`checkpoint/step`, `checkpoint/path`).
    """

    def __init__(self, run_dir: str):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.file = None

    def log(self, record: dict) -> None:
        if self.file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "a", buffering=1)
        self.file.write(json.dumps(record) + "\n")

    def on_train_end(self, trainer):
        if self.file is not None:
            self.file.close()
            self.file = None


# W&B's own names for its modes (WANDB_MODE), and the mode each asks for.
WANDB_ENV_MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline",
                   "disabled": "disabled", "shared": "shared"}
# How long an online start waits for the W&B server before the run logs offline
# instead (W&B's own default is 90 s); WANDB_INIT_TIMEOUT, when set, wins.
ONLINE_INIT_TIMEOUT_S = 30.0


def wandb_mode(configured: str, environ: Mapping[str, str]) -> str:
    """The W&B mode a run starts in: `logger.mode`, unless it is `auto`.

    Under `auto`, W&B's own environment variables decide: WANDB_MODE when set
    (W&B's names: online, offline, disabled, shared, and the old dryrun and run),
    otherwise online when WANDB_API_KEY is set and offline when it is not.
    """
    if configured != "auto":
        return configured
    env = environ.get("WANDB_MODE", "").strip()
    if env:
        if env.lower() not in WANDB_ENV_MODES:
            raise ConfigError(f"WANDB_MODE={env}: expected one of {', '.join(WANDB_ENV_MODES)} "
                              "(logger.mode=auto follows it)")
        return WANDB_ENV_MODES[env.lower()]
    return "online" if environ.get("WANDB_API_KEY") else "offline"


def init_wandb(wandb, mode: str, environ: Mapping[str, str], **kwargs):
    """`wandb.init(mode=mode, **kwargs)`; an online start that fails (no server, no network,
    a refused key, or no answer within ONLINE_INIT_TIMEOUT_S) says so in one line on stderr
    and starts the same run offline instead, for `wandb sync` to upload later."""
    if mode not in ("online", "shared"):
        return wandb.init(mode=mode, **kwargs)
    settings = {} if environ.get("WANDB_INIT_TIMEOUT") else {
        "settings": wandb.Settings(init_timeout=ONLINE_INIT_TIMEOUT_S)}
    try:
        return wandb.init(mode=mode, **kwargs, **settings)
    except Exception as err:  # wandb raises CommError, UsageError, TimeoutError and others here
        print(f"pretrain: note: W&B could not start online ({type(err).__name__}: {first_line(err)}); "
              f"logging offline under {kwargs.get('dir') or '.'}/wandb instead (`wandb sync` uploads it later)",
              file=sys.stderr, flush=True)
        # W&B's service still holds the run id the failed start claimed: start a fresh service.
        wandb.teardown()
        return wandb.init(mode="offline", **kwargs)


class WandbSink(Callback):
    """Weights & Biases: online or offline files, as `wandb_mode` resolves `logger.mode`.

    The run id is kept in the run directory, so a resumed training run
    continues the same W&B run instead of starting a new one. Steps redone
    after resuming from an earlier checkpoint are already in the W&B history;
    W&B keeps the first values, which a bit-exact resume reproduces anyway.
    An online start that fails goes on offline (`init_wandb`).
    """

    def __init__(self, run_dir: str, project: str, name: str | None, mode: str, config: dict):
        self.run_dir, self.project, self.name, self.config = run_dir, project, name, config
        self.mode = wandb_mode(mode, os.environ)
        self.run = None

    def open(self) -> None:
        """Started at the first record, not when built: a run refused while resuming
        (a damaged checkpoint, another tokenizer) writes nothing into its run directory."""
        import wandb

        # W&B's own style of id (8 lowercase letters and digits), made here because
        # wandb's helper for it has moved between releases.
        run_id = wandb_run_id(self.run_dir) or uuid.uuid4().hex[:8]
        if self.mode != "disabled":
            write_run_file(self.run_dir, WANDB_ID_FILE, run_id.encode())
        self.run = init_wandb(wandb, self.mode, os.environ, project=self.project, name=self.name, id=run_id,
                              resume="allow", dir=self.run_dir, config=self.config)

    def log(self, record: dict) -> None:
        if self.run is None:
            self.open()
        values = {k: v for k, v in record.items() if k != "step"}
        self.run.log(values, step=record["step"])

    def on_train_end(self, trainer):
        if self.run is not None:
            self.run.finish()


class TensorBoardSink(Callback):
    """TensorBoard event files in `<run_dir>/tensorboard`: numbers as scalars, the rest as text."""

    def __init__(self, run_dir: str, config: dict):
        self.run_dir, self.config = run_dir, config
        self.writer = None

    def open(self) -> None:
        """At the first record, like the W&B sink (nothing is written before then)."""
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(self.run_dir) / "tensorboard"), flush_secs=30)
        self.writer.add_text("config", "```\n" + json.dumps(self.config, indent=2) + "\n```")

    def log(self, record: dict) -> None:
        if self.writer is None:
            self.open()
        step = record["step"]
        for key, value in record.items():
            if key == "step":
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, step)
            else:
                self.writer.add_text(key, str(value), step)

    def on_train_end(self, trainer):
        if self.writer is not None:
            self.writer.close()


def build_sinks(cfg: "Config") -> list[Callback]:
    """The logging rank's sinks: metrics.jsonl always, plus the configured logger."""
    run_dir, logger = cfg.trainer.run_dir, cfg.logger
    sinks: list[Callback] = [MetricsFile(run_dir)]
    if logger.kind == "wandb":
        sinks.append(WandbSink(run_dir, logger.project, logger.name, logger.mode, dataclasses.asdict(cfg)))
    elif logger.kind == "tensorboard":
        sinks.append(TensorBoardSink(run_dir, dataclasses.asdict(cfg)))
    return sinks
