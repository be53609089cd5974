"""Experiment tracking: metrics.jsonl, W&B (offline), TensorBoard, console progress, FLOPs and MFU.

One short real training run (W&B offline) is shared by this file and the
generation and evaluation tests: see `trained_run`.
"""

import io
import json
import math
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import TINY, run_pretrain
from pretrain.training.callbacks import ConsoleProgress
from pretrain.training.sinks import TensorBoardSink, WandbSink
from pretrain.config import ConfigError, ModelConfig
from pretrain.model.flops import flops_per_token, matmul_params
from pretrain.training.flops import FlopsMeter, peak_for_name

STEPS, INTERVAL, PEAK = 12, 6, 1e12
TINY_MODEL = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                         ffn_hidden_size=128)


@dataclass
class TrainedRun:
    run_dir: Path
    valid_prefix: Path  # a token shard of the run's corpus
    stdout: str

    def records(self) -> list[dict]:
        return [json.loads(line) for line in (self.run_dir / "metrics.jsonl").read_text().splitlines()]


def trained_run(tmp_path_factory) -> TrainedRun:
    """A 12-step run (validation and a checkpoint every 6 steps, W&B offline), once per session."""
    root = tmp_path_factory.getbasetemp() / "trained_run"
    stdout, failed = root / "stdout.txt", root / "failed.txt"
    if failed.is_file():
        pytest.fail(f"the shared training run failed:\n{failed.read_text()}")
    if not stdout.is_file():
        root.mkdir(exist_ok=True)
        result = run_pretrain(
            *TINY, f"data.cache_dir={root / 'cache'}", f"trainer.run_dir={root / 'run'}",
            f"trainer.train_steps={STEPS}", f"trainer.eval_interval={INTERVAL}",
            f"trainer.checkpoint_interval={INTERVAL}", "logger=wandb", "logger.mode=offline",
            f"logger.peak_flops={PEAK}", cwd=root,
        )
        if result.returncode != 0:
            failed.write_text(result.stderr[-3000:])
            pytest.fail(f"the shared training run failed:\n{result.stderr[-3000:]}")
        stdout.write_text(result.stdout)
    valid_index = sorted((root / "cache").glob("*/shards/*.idx"))[0]
    return TrainedRun(root / "run", valid_index.with_suffix(""), stdout.read_text())


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> TrainedRun:
    return trained_run(tmp_path_factory)


# --- metrics.jsonl -------------------------------------------------------------------------

SCHEMAS = {
    "train": {"step": int, "loss": float, "lr": float, "grad_norm": float, "step_time": float,
              "tokens_per_s": float, "tflops": float, "mfu": float, "consumed_tokens": int,
              "memory_bytes": int, "skipped_steps": int},
    "valid": {"step": int, "valid/loss": float, "valid/ppl": float},
    "checkpoint": {"step": int, "checkpoint/step": int, "checkpoint/path": str},
}


def kind_of(record: dict) -> str:
    return "train" if "loss" in record else "valid" if "valid/loss" in record else "checkpoint"


@pytest.mark.slow  # the shared `pretrain` run (`trained_run`)
def test_metrics_jsonl_schema(run):
    by_kind: dict[str, list[dict]] = {}
    for record in run.records():
        kind = kind_of(record)
        schema = SCHEMAS[kind]
        assert record.keys() == schema.keys(), record
        for key, expected in schema.items():
            assert isinstance(record[key], expected) and not isinstance(record[key], bool), (key, record)
        by_kind.setdefault(kind, []).append(record)

    train, valid, saved = by_kind["train"], by_kind["valid"], by_kind["checkpoint"]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert [r["consumed_tokens"] for r in train] == [8 * 64 * s for s in range(1, STEPS + 1)]
    assert [r["step"] for r in valid] == [0, 6, 12]
    assert all(math.isclose(r["valid/ppl"], math.exp(r["valid/loss"]), rel_tol=1e-9) for r in valid)
    assert [(r["step"], r["checkpoint/step"]) for r in saved] == [(6, 6), (12, 12)]
    assert all(Path(r["checkpoint/path"]).name == f"step_{r['step']:07d}" for r in saved)
    assert all((Path(r["checkpoint/path"]) / "mp_rank_00_model_states.pt").is_file() for r in saved)

    # TFLOP/s and MFU follow from the throughput: one process, a 512-piece vocabulary.
    per_token = flops_per_token(TINY_MODEL, 64, 512)
    for r in train:
        assert math.isclose(r["tflops"], per_token * r["tokens_per_s"] / 1e12, rel_tol=1e-9)
        assert math.isclose(r["mfu"], r["tflops"] * 1e12 / PEAK, rel_tol=1e-9)


@pytest.mark.slow  # the shared `pretrain` run (`trained_run`)
def test_console_lines_carry_eta(run):
    lines = [line for line in run.stdout.splitlines() if line.lstrip().startswith("step") and "loss" in line
             and "validation" not in line]
    assert [line.split()[1] for line in lines] == ["5/12", "10/12", "12/12"]
    assert all(" ETA " in line for line in lines) and lines[-1].endswith("ETA 0:00:00")


# --- W&B -----------------------------------------------------------------------------------

def wandb_records(path: Path) -> list:
    """The records of an offline W&B run file, parsed with W&B's own protobuf schema.

    The file is a LevelDB-style log: a 7-byte header (":W&B", magic, version),
    then 32 KiB blocks of chunks, each with a 7-byte header (checksum,
    length, type: 1 whole record, 2 first, 3 middle, 4 last piece).
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, position, pending, records = 32 * 1024, 7, b"", []
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 2):
            pending = b""
        pending += chunk
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(pending))
    return records


def wandb_run_files(run_dir: Path) -> list[Path]:
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    # Matched by the file's name: W&B appends "-1" to the directory of a resumption that
    # starts in the same second as the run (offline-run-<time>-<id>-1).
    return sorted(run_dir.glob(f"wandb/offline-run-*/run-{run_id}.wandb"))


@pytest.mark.slow  # the shared `pretrain` run (`trained_run`)
def test_wandb_offline_run_holds_config_history_and_checkpoints(run):
    (run_file,) = wandb_run_files(run.run_dir)
    records = wandb_records(run_file)
    (header,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert header.run_id == (run.run_dir / "wandb_run_id").read_text().strip()
    config = {item.key: json.loads(item.value_json) for item in header.config.update}
    assert config["model"]["hidden_size"] == 64 and config["trainer"]["train_steps"] == STEPS
    assert config["logger"] == {"kind": "wandb", "project": "pretrain", "name": None, "mode": "offline",
                                "peak_flops": PEAK}

    history: dict[int, dict] = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            row = history.setdefault(record.history.step.num, {})
            for item in record.history.item:
                row[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    assert sorted(history) == list(range(STEPS + 1))
    for record in run.records():  # every value of metrics.jsonl, at its step
        row = history[record["step"]]
        for key, value in record.items():
            if key != "step":
                assert row[key] == value, (record["step"], key)
    assert "loss_scale" not in history[1]  # fp32: no loss scaling
    assert [s for s in sorted(history) if "valid/loss" in history[s]] == [0, 6, 12]
    assert [s for s in sorted(history) if "checkpoint/path" in history[s]] == [6, 12]


@pytest.mark.slow  # W&B starts its wandb-core service process
def test_wandb_resume_continues_the_same_run_and_disabled_writes_nothing(tmp_path):
    import wandb

    for _ in range(2):  # a run, then its resumption
        sink = WandbSink(str(tmp_path), "pretrain", None, "offline", {"seed": 1})
        assert not (tmp_path / "wandb").exists() or _ == 1  # nothing is written before the first record
        sink.log({"step": 1, "loss": 2.5})
        sink.on_train_end(None)
    # `finish` returns once the run is closed, but the service process may still be
    # writing its file; shutting the service down waits for every file to be written.
    wandb.teardown()
    files = wandb_run_files(tmp_path)
    assert len(files) == 2
    run_id = (tmp_path / "wandb_run_id").read_text()
    run_ids = {f.parent.name: [r.run.run_id for r in wandb_records(f) if r.HasField("run")] for f in files}
    assert all(ids == [run_id] for ids in run_ids.values()), (run_id, run_ids)

    disabled = tmp_path / "disabled"
    sink = WandbSink(str(disabled), "pretrain", None, "disabled", {})
    sink.log({"step": 1, "loss": 2.5})
    sink.on_train_end(None)
    assert not (disabled / "wandb_run_id").exists() and not (disabled / "wandb").exists()


# --- TensorBoard and the logger config -------------------------------------------------------

def test_tensorboard_sink_writes_scalars_and_text(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sink = TensorBoardSink(str(tmp_path), {"model": {"hidden_size": 64}})
    sink.log({"step": 1, "loss": 2.5, "consumed_tokens": 512})
    sink.log({"step": 2, "loss": 2.0, "consumed_tokens": 1024})
    sink.log({"step": 2, "checkpoint/step": 2, "checkpoint/path": "/runs/x/step_0000002"})
    sink.on_train_end(None)

    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 2.5), (2, 2.0)]
    assert [e.step for e in events.Scalars("checkpoint/step")] == [2]
    (path,) = events.Tensors("checkpoint/path/text_summary")
    assert path.step == 2 and path.tensor_proto.string_val == [b"/runs/x/step_0000002"]
    assert b"hidden_size" in events.Tensors("config/text_summary")[0].tensor_proto.string_val[0]


def compose(*overrides: str):
    from pretrain.hydra_config import compose_config

    return compose_config(list(overrides))


def test_logger_configs():
    assert compose().logger.kind == "console" and compose().logger.peak_flops is None
    tensorboard = compose("logger=tensorboard", "logger.peak_flops=989e12").logger
    assert tensorboard.kind == "tensorboard" and tensorboard.peak_flops == 989e12
    assert compose("logger=wandb").logger.mode == "auto"
    with pytest.raises(ConfigError, match=r"logger.peak_flops=0.0: expected > 0 or null"):
        compose("logger.peak_flops=0")


# --- FLOPs and MFU -------------------------------------------------------------------------

def test_flops_per_token_matches_a_hand_count():
    # hidden 64, 4 heads of 16, 2 key/value groups (32 wide), SwiGLU 128, 2 layers, vocab 512, seq 64:
    #   q/k/v 64 * (64 + 2 * 32) = 8192, output projection 64 * 64 = 4096, MLP 3 * 64 * 128 = 24576
    #   two layers: 2 * 36864 = 73728; output layer 512 * 64 = 32768  →  N = 106496
    #   6 N = 638976; attention 12 * 2 layers * 64 hidden * 64 tokens = 98304
    assert matmul_params(TINY_MODEL, 512) == 106496
    assert flops_per_token(TINY_MODEL, 64, 512) == 638976 + 98304
    # The output layer is a matmul even when tied to the embedding.
    tied = ModelConfig(**{**TINY_MODEL.__dict__, "tie_embeddings": True})
    assert flops_per_token(tied, 64, 512) == 638976 + 98304
    # Against the parameter count: everything but the input embedding and the norms.
    for cfg, vocab in ((TINY_MODEL, 512), (ModelConfig(num_layers=32, hidden_size=4096, num_attention_heads=32,
                                                        num_query_groups=8, ffn_hidden_size=14336), 128256)):
        norms = (2 * cfg.num_layers + 1) * cfg.hidden_size
        assert matmul_params(cfg, vocab) == cfg.num_params(vocab) - vocab * cfg.hidden_size - norms


def test_peak_flops_table_and_configured_peak():
    assert peak_for_name("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert peak_for_name("NVIDIA H100 PCIe", "bf16") == 756e12
    assert peak_for_name("NVIDIA H200", "bf16") == 989e12
    assert peak_for_name("NVIDIA A100-SXM4-80GB", "bf16") == 312e12
    assert peak_for_name("NVIDIA L40S", "bf16") == 362e12 and peak_for_name("NVIDIA L4", "bf16") == 121e12
    assert peak_for_name("Some Future GPU", "bf16") is None

    import torch

    cpu = torch.device("cpu")
    unknown = FlopsMeter(TINY_MODEL, 64, 512, cpu, "fp32", world_size=2)
    assert unknown(tokens=1000, seconds=0.5).keys() == {"tflops"}  # no peak: no MFU
    assert math.isclose(unknown(1000, 0.5)["tflops"], 737_280 * 1000 / 0.5 / 2 / 1e12)
    configured = FlopsMeter(TINY_MODEL, 64, 512, cpu, "fp32", world_size=2, configured_peak=1e9)
    assert math.isclose(configured(1000, 0.5)["mfu"], 737_280 * 1000 / 0.5 / 2 / 1e9)


def test_loss_scale_is_reported_for_fp16_only():
    from parallel.engine import Engine

    engine = lambda fp16, scale: Engine(SimpleNamespace(fp16_enabled=lambda: fp16,  # noqa: E731
                                                        optimizer=SimpleNamespace(loss_scale=scale)), "cpu")
    assert engine(True, 65536).loss_scale() == {"loss_scale": 65536.0}
    assert engine(False, None).loss_scale() == {}


# --- console progress ----------------------------------------------------------------------

class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def fake_trainer(steps: int):
    return SimpleNamespace(cfg=SimpleNamespace(trainer=SimpleNamespace(train_steps=steps)),
                           topology=SimpleNamespace(is_logging_rank=True),
                           print=lambda *args: print(*args, flush=True))


def step_metrics(step: int) -> dict:
    return {"step": step, "loss": 5.0 - step / 10, "lr": 1e-3, "grad_norm": 0.5, "step_time": 0.5,
            "tokens_per_s": 1024.0}


def drive(progress: ConsoleProgress, steps: int) -> None:
    trainer = fake_trainer(steps)
    progress.on_train_start(trainer)
    for step in range(1, steps + 1):
        progress.on_step_end(trainer, step_metrics(step))
        if step == 2:
            trainer.print("step      2  validation loss 4.8000")
    progress.on_train_end(trainer)


def test_console_progress_plain_lines_off_a_terminal(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    drive(ConsoleProgress(interval=2), 4)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and "\r" not in out.getvalue()
    assert lines[0].startswith("step      2/4  loss 4.8000") and lines[0].endswith("ETA 0:00:01")
    assert lines[1] == "step      2  validation loss 4.8000"
    assert lines[2].startswith("step      4/4") and lines[2].endswith("ETA 0:00:00")


def test_console_progress_bar_on_a_terminal(monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    monkeypatch.setattr(ConsoleProgress, "REDRAW_SECONDS", 0.0)
    drive(ConsoleProgress(interval=2), 4)
    assert sys.stdout is terminal  # restored at the end of training
    clear = "\r\x1b[K"
    lines = terminal.getvalue().split("\n")
    # Line 1: bars for steps 1 and 2 drawn over each other, erased for the validation message.
    draws = lines[0].split(clear)
    assert draws[1].startswith("step 1/4 █████░░░░░░░░░░░░░░░  25%  loss 4.9000")
    assert draws[2].startswith("step 2/4 ") and draws[2].endswith("ETA 0:00:01")
    assert draws[-1] == "step      2  validation loss 4.8000"
    # Line 2: the bar again below the message, then steps 3 and 4; the last bar stays.
    draws = lines[1].split(clear)
    assert [d.split()[1] for d in draws[1:]] == ["2/4", "3/4", "4/4"]
    assert draws[-1].startswith("step 4/4 ████████████████████ 100%") and draws[-1].endswith("ETA 0:00:00")
    assert lines[2:] == [""]
