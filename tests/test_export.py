"""Export to Hugging Face and continued pretraining from it (CPU).

A real one-process `pretrain` run (real data and SentencePiece tokenizer),
and TP=2 and PP=2 runs on the same data, are exported with `pretrain-export`;
transformers' `AutoModelForCausalLM` must compute our logits (fp32, 1e-4) and
`AutoTokenizer` our token ids. A run started with `trainer.init_from=<export>`
must evaluate at step 0 to the exported model's loss, and a TP=2 run started
from it must follow the one-process run's loss curve (fp32, 1e-5 relative).
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY, run_pretrain
from distributed import run_distributed

INIT_STEPS = 3
FP32_RTOL = 1e-5


pytestmark = pytest.mark.slow  # every test reads a `pretrain` run, the `pretrain-export` process or a two-rank group


def run_export(*args: str):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run([sys.executable, "-m", "pretrain.hf.export", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def error_lines(result, prog: str) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith(f"{prog}: error:")]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export")


def common(workdir: Path, run_dir: Path) -> tuple[str, ...]:
    return (*TINY, f"data.cache_dir={workdir / 'cache'}", f"trainer.run_dir={run_dir}",
            "trainer.eval_interval=0")


@pytest.fixture(scope="module")
def single_run(workdir) -> Path:
    run_dir = workdir / "single"
    result = run_pretrain(*common(workdir, run_dir), "trainer.train_steps=6", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def exported(single_run, workdir) -> Path:
    out = workdir / "hf_single"
    result = run_export(str(single_run), str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def init_run(exported, workdir) -> Path:
    """`pretrain trainer.init_from=<export>` in one process."""
    run_dir = workdir / "init_single"
    result = run_pretrain(*common(workdir, run_dir), f"trainer.train_steps={INIT_STEPS}",
                          f"trainer.init_from={exported}", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "initialised" in result.stdout and str(exported) in result.stdout
    return run_dir


def _config(run_dir: Path, changes: dict):
    from pretrain.checkpoint.files import latest_checkpoint
    from pretrain.config import Config, from_dict

    saved = torch.load(latest_checkpoint(run_dir) / "mp_rank_00_model_states.pt", map_location="cpu",
                       weights_only=False)["config"]
    for section, values in changes.items():
        saved[section].update(values)
    return from_dict(Config, saved)


def two_rank_group(init_run: str, exported: str, workdir: str) -> dict:
    """TP=2 and PP=2 runs from scratch (for export), and a TP=2 run initialised from the export."""
    from parallel.groups import init_layout_groups
    from pretrain.hf.import_weights import init_from
    from data_pipeline.training_data import load_training_data
    from pretrain.training.build import build_trainer

    losses = {}
    for name, parallel, steps, source in (("tp2", {"tensor": 2}, 4, None),
                                          ("pp2", {"pipeline": 2, "zero_stage": 1}, 4, None),
                                          ("init_tp2", {"tensor": 2}, INIT_STEPS, exported)):
        cfg = _config(Path(init_run), {"parallel": parallel, "trainer": {
            "run_dir": str(Path(workdir) / name), "train_steps": steps, "init_from": source}})
        topology = init_layout_groups(cfg.parallel, torch.device("cpu"))
        data = load_training_data(cfg.data, topology.rank, log=lambda *_: None)
        trainer = build_trainer(cfg, topology, data)
        if source:
            init_from(trainer.engine.deepspeed, source, cfg.model, cfg.parallel, data.tokenizer, data.vocab_size)
        state = trainer.fit()
        losses[name] = {"valid": state.valid_history}
    return losses


@pytest.fixture(scope="module")
def two_ranks(init_run, exported, workdir) -> dict:
    return run_distributed(two_rank_group, 2, str(init_run), str(exported), str(workdir))[0]


def our_model(run_dir: Path):
    from parallel.groups import init_process_groups
    from pretrain.checkpoint.consolidate import load_checkpoint
    from pretrain.model.llama import LlamaModel, transformer_config

    init_process_groups(1, 1, torch.device("cpu"))
    checkpoint = load_checkpoint(run_dir)
    model = LlamaModel(checkpoint.model, transformer_config(checkpoint.model), checkpoint.padded_vocab_size)
    model.load_state_dict(checkpoint.state_dict)
    return model.eval(), checkpoint


def hf_model(directory: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


@pytest.mark.parametrize("layout", ["single", "tp2", "pp2"])
def test_hugging_face_computes_our_logits(workdir, single_run, exported, two_ranks, layout):
    run_dir = workdir / layout
    out = exported if layout == "single" else workdir / f"hf_{layout}"
    if layout != "single":
        from pretrain.hf.export import main

        main([str(run_dir), str(out)])
    ours, checkpoint = our_model(run_dir)
    config = json.loads((out / "config.json").read_text())
    m = checkpoint.model
    assert config["vocab_size"] == checkpoint.padded_vocab_size == 512
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
            config["num_key_value_heads"], config["intermediate_size"]) == (64, 2, 4, 2, 128)
    assert (config["rope_theta"], config["rms_norm_eps"], config["tie_word_embeddings"]) == (
        m.rotary_base, m.norm_eps, m.tie_embeddings)
    tokens = torch.randint(0, 500, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ours(tokens)
        actual = hf_model(out)(tokens).logits
    assert actual.shape == expected.shape == (2, 64, 512)
    assert (actual - expected).abs().max().item() < 1e-4
    # The consolidated file holds the same weights under our names.
    from safetensors.torch import load_file

    consolidated = load_file(out / "consolidated.safetensors")
    assert all(torch.equal(consolidated[k], v) for k, v in checkpoint.state_dict.items()
               if isinstance(v, torch.Tensor))


def test_auto_tokenizer_encodes_as_training_did(single_run, exported):
    from transformers import AutoTokenizer

    from data_pipeline.tokenizer import Tokenizer

    ours = Tokenizer(single_run / "tokenizer.model")
    theirs = AutoTokenizer.from_pretrained(exported)
    assert (theirs.eos_token_id, theirs.bos_token_id) == (ours.eos_id, ours.bos_id)
    texts = ["def main(argv):\n    return sorted(argv, key=len)  # by length\n",
             "Return the value of x ** 2 for 12 inputs; émigré café.\n\n\tindented"]
    for text in texts:
        ids = ours.encode([text])[0]
        assert theirs.encode(text) == ids
        assert theirs.decode(ids) == text


def test_step0_validation_loss_equals_the_exported_models(init_run, exported):
    import torch.nn.functional as F

    from pretrain.tools.evaluate import validation_batches

    records = metrics(init_run)
    step0 = next(r["valid/loss"] for r in records if r["step"] == 0 and "valid/loss" in r)
    model = hf_model(exported)
    losses = []
    with torch.no_grad():
        for block in validation_batches(dataclasses.asdict(_config(init_run, {}))):
            block = torch.from_numpy(block)
            logits = model(block[:, :-1]).logits
            losses.append(F.cross_entropy(logits.flatten(0, 1), block[:, 1:].flatten()).item())
    assert step0 == pytest.approx(sum(losses) / len(losses), rel=FP32_RTOL)
    # The exported model had trained: it starts far below a fresh model's ln(512) = 6.24.
    assert step0 < 6.0


def test_tensor_parallel_run_from_the_export_matches_one_process(init_run, two_ranks):
    one = [(r["step"], r["loss"]) for r in metrics(init_run) if "loss" in r]
    one_valid = [(r["step"], r["valid/loss"]) for r in metrics(init_run) if "valid/loss" in r]
    tp2_valid = [tuple(v) for v in two_ranks["init_tp2"]["valid"]]
    assert [s for s, _ in one] == list(range(1, INIT_STEPS + 1))
    assert [s for s, _ in one_valid] == [s for s, _ in tp2_valid] == [0, INIT_STEPS]
    for (_, a), (_, b) in zip(tp2_valid, one_valid):
        assert a == pytest.approx(b, rel=FP32_RTOL)
    tp2_losses = [r["loss"] for r in metrics(Path(init_run).parent / "init_tp2") if "loss" in r]
    for a, (step, b) in zip(tp2_losses, one, strict=True):
        assert a == pytest.approx(b, rel=FP32_RTOL), f"step {step}"


def test_export_refuses_bad_input_in_one_line(workdir, single_run, exported, two_ranks, capsys):
    import shutil

    before = {p.name: p.stat().st_mtime_ns for p in exported.iterdir()}
    refused = run_export(str(single_run), str(exported))
    assert refused.returncode == 2 and len(error_lines(refused, "pretrain-export")) == 1
    assert "not empty" in refused.stderr and "--force" in refused.stderr
    assert {p.name: p.stat().st_mtime_ns for p in exported.iterdir()} == before

    from pretrain.hf.export import main

    missing = workdir / "no_such_run"
    broken = workdir / "broken" / "step_0000004"
    shutil.copytree(workdir / "tp2" / "checkpoints" / "step_0000004", broken)
    (broken / "mp_rank_01_model_states.pt").unlink()
    for source, expected in ((missing, "no such run or checkpoint"), (broken, "mp_rank_01_model_states.pt")):
        out = workdir / "never_written"
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            main([str(source), str(out)])
        assert exit_info.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("pretrain-export: error:") and expected in lines[0]
        assert not out.exists()
    # --force replaces an export wholesale, leaving no temporary directory behind.
    forced = workdir / "forced"
    shutil.copytree(exported, forced)
    (forced / "stale.txt").write_text("from an earlier export")
    main([str(workdir / "tp2"), str(forced), "--force"])
    assert not (forced / "stale.txt").exists() and (forced / "model.safetensors").is_file()
    assert not [p for p in workdir.iterdir() if p.name.startswith(".forced")]


def test_init_from_refuses_bad_input_in_one_line(workdir, exported):
    run_dir = workdir / "never_started"
    for overrides, expected in (
        (["trainer.init_from=/no/such/export"], "trainer.init_from=/no/such/export: no such file"),
        ([f"trainer.init_from={exported}", "model.hidden_size=128"], "hidden_size=64, but model.hidden_size=128"),
    ):
        result = run_pretrain(*common(workdir, run_dir), *overrides, cwd=workdir)
        assert result.returncode == 2, result.stderr[-2000:]
        lines = error_lines(result, "pretrain")
        assert len(lines) == 1 and expected in lines[0], result.stderr[-2000:]
        assert not run_dir.exists()
