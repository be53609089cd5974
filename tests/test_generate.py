"""Consolidating parallel checkpoints, the KV-cache decode path, sampling, `pretrain-generate`."""

import dataclasses
import math

import pytest
import torch

from pretrain.config import Config, ModelConfig
from pretrain.checkpoint.consolidate import CheckpointError, consolidate, load_checkpoint
from pretrain.model.decode import Decoder
from pretrain.tools.generate import filter_logits, generate, next_token

SHAPE = dict(num_layers=2, hidden_size=64, num_attention_heads=8, num_query_groups=4, ffn_hidden_size=96)


def llama(cfg: ModelConfig, vocab: int = 128, seed: int = 3):
    from pretrain.model.llama import LlamaModel, transformer_config

    model = LlamaModel(cfg, transformer_config(cfg), vocab, seed=seed).eval()
    with torch.no_grad():  # norms away from 1, so a swapped norm weight shows
        for name, param in model.named_parameters():
            if "layernorm" in name:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.2)
    return model


# --- consolidation ---------------------------------------------------------------------------

def megatron_split(name: str, full: torch.Tensor, tp: int) -> list[torch.Tensor]:
    """Each rank's shard as megatron-core's own initialiser lays it out (the independent reference).

    Column-parallel weights split dim 0, row-parallel dim 1, and SwiGLU's fc1
    with stride 2 (each rank gets its slice of the gate and of the up half).
    """
    from megatron.core.tensor_parallel.layers import _initialize_affine_weight_cpu

    if "layernorm" in name:
        return [full.clone() for _ in range(tp)]
    dim = 1 if name.endswith(("linear_proj.weight", "linear_fc2.weight")) else 0
    stride = 2 if name.endswith("linear_fc1.weight") else 1
    out_size, in_size = full.shape
    shards = []
    for rank in range(tp):
        local = torch.empty(out_size // tp if dim == 0 else out_size, in_size // tp if dim == 1 else in_size)
        _initialize_affine_weight_cpu(
            local, out_size, in_size, local.shape[dim], dim, lambda w: w.copy_(full), stride=stride,
            rank=rank, world_size=tp, skip_set_tensor_parallel_attributes=True,
        )
        shards.append(local)
    return shards


def split_state_dict(state: dict, tp: int) -> list[dict]:
    shards = [{} for _ in range(tp)]
    for name, value in state.items():
        pieces = megatron_split(name, value, tp) if isinstance(value, torch.Tensor) else [value] * tp
        for shard, piece in zip(shards, pieces):
            shard[name] = piece
    return shards


def assert_same_state(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(actual[name], value), name


@pytest.mark.parametrize("tp", [2, 4])
def test_consolidate_inverts_megatron_tensor_parallel_split(single_process_groups, tp):
    full = llama(ModelConfig(**SHAPE)).state_dict()
    shards = split_state_dict(full, tp)
    # A shard holds whole query groups: its q/k/v rows are a contiguous block of the full weight.
    qkv = "decoder.layers.0.self_attention.linear_qkv.weight"
    assert torch.equal(shards[1][qkv], full[qkv].chunk(tp)[1])
    assert_same_state(consolidate(shards), full)


def save_deepspeed_layout(directory, state: dict, cfg: ModelConfig, tp: int, pipeline: bool) -> None:
    """Files named and keyed as DeepSpeed writes them, for a TP (and optionally pipeline) run."""
    directory.mkdir(parents=True)
    meta = {"config": dataclasses.asdict(Config(model=cfg)), "trainer": {"step": 7}, "tokenizer_hash": None}
    shards = split_state_dict(state, tp)
    for rank, shard in enumerate(shards):
        module = None if pipeline else shard
        torch.save({"module": module, **meta}, directory / f"mp_rank_{rank:02d}_model_states.pt")
        if not pipeline:
            continue
        # Pipeline layers: 0 embedding, 1..L transformer layers (under `layer.`), L+1 the head.
        layers: dict[int, dict] = {}
        for name, value in shard.items():
            if name.startswith("decoder.layers."):
                index, rest = name.removeprefix("decoder.layers.").split(".", 1)
                layers.setdefault(int(index) + 1, {})["layer." + rest] = value
            elif name == "embedding.weight":
                layers.setdefault(0, {})[name] = value
            else:
                layers.setdefault(cfg.num_layers + 1, {})[name.removeprefix("decoder.")] = value
        for index, layer in layers.items():
            torch.save(layer, directory / f"layer_{index:02d}-model_{rank:02d}-model_states.pt")


@pytest.mark.parametrize("pipeline", [False, True], ids=["tp2", "tp2-pp"])
def test_load_checkpoint_reads_deepspeed_parallel_layouts(single_process_groups, tmp_path, pipeline):
    cfg = ModelConfig(**SHAPE)
    full = llama(cfg).state_dict()
    run_dir = tmp_path / "run"
    checkpoint_dir = run_dir / "checkpoints" / "step_0000007"
    save_deepspeed_layout(checkpoint_dir, full, cfg, tp=2, pipeline=pipeline)
    (run_dir / "checkpoints" / "latest").write_text("step_0000007")

    loaded = load_checkpoint(run_dir)  # a run directory resolves to its newest checkpoint
    assert loaded.path == checkpoint_dir and loaded.run_dir == run_dir and loaded.step == 7
    assert loaded.model == cfg and loaded.padded_vocab_size == 128
    assert_same_state(loaded.state_dict, full)


def test_load_checkpoint_refuses_bad_input_in_one_line(tmp_path):
    with pytest.raises(CheckpointError, match="no such run or checkpoint directory"):
        load_checkpoint(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="nor a run directory"):
        load_checkpoint(tmp_path)
    # ZeRO-3 saves parameters as empty placeholders.
    config = dataclasses.asdict(Config(model=ModelConfig(**SHAPE)))
    torch.save({"module": {"embedding.weight": torch.empty(0)}, "config": config},
               tmp_path / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match="ZeRO stage 3") as err:
        load_checkpoint(tmp_path)
    assert "\n" not in str(err.value)


# --- the decode path -----------------------------------------------------------------------

@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_decode_path_reproduces_llama_model_logits(single_process_groups, tie):
    cfg = ModelConfig(**SHAPE, tie_embeddings=tie)
    model = llama(cfg)
    tokens = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    expected = model(tokens)
    decoder = Decoder(cfg, model.state_dict())
    torch.testing.assert_close(decoder(tokens), expected, rtol=0, atol=1e-5)

    # Incrementally: a prompt chunk, a later chunk (offset causal mask), then one token at a time.
    cache = decoder.new_cache(2, 24)
    pieces = [decoder(tokens[:, :9], cache), decoder(tokens[:, 9:14], cache)]
    pieces += [decoder(tokens[:, i:i + 1], cache) for i in range(14, 24)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), expected, rtol=0, atol=1e-5)
    assert cache.length == 24


def test_kv_cache_generation_equals_full_recomputation(single_process_groups):
    cfg = ModelConfig(**SHAPE)
    decoder = Decoder(cfg, llama(cfg, seed=11).state_dict())
    prompt = [2, 17, 90, 4, 33]
    for settings in (dict(temperature=0.0), dict(temperature=1.0, top_k=20, top_p=0.9, seed=5)):
        cached = generate(decoder, prompt, 30, use_cache=True, vocab_size=100, **settings)
        recomputed = generate(decoder, prompt, 30, use_cache=False, vocab_size=100, **settings)
        assert cached == recomputed and len(cached) == 30
        assert max(cached) < 100  # padding ids of the embedding are never produced
    # Greedy decoding is deterministic; seeded sampling repeats with its seed.
    assert generate(decoder, prompt, 10, temperature=0.0) == generate(decoder, prompt, 10, temperature=0.0)
    sample = lambda seed: generate(decoder, prompt, 20, temperature=1.5, seed=seed)  # noqa: E731
    assert sample(1) == sample(1) != sample(2)


def test_top_k_and_top_p_filtering():
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]]))
    kept = lambda filtered: torch.isfinite(filtered)[0].tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [False, True, False, True]
    # Nucleus: 0.5 + 0.3 reaches 0.8, so nothing less likely is needed.
    assert kept(filter_logits(logits, top_p=0.8)) == [False, True, False, True]
    assert kept(filter_logits(logits, top_p=0.81)) == [False, True, True, True]
    assert kept(filter_logits(logits, top_p=0.01)) == [False, True, False, False]
    generator = torch.Generator().manual_seed(0)
    assert next_token(logits, 0.0, 0, 1.0, generator).item() == 1
    assert all(next_token(logits, 1.0, 1, 1.0, generator).item() == 1 for _ in range(20))
    probs = filter_logits(logits, top_p=0.8).softmax(-1)[0]
    assert math.isclose(probs[1].item(), 0.5 / 0.8, rel_tol=1e-6)


# --- `pretrain-generate` on a trained run ----------------------------------------------------

@pytest.mark.slow  # the shared `pretrain` run (test_tracking.trained_run)
def test_generate_cli_on_the_trained_run(tmp_path_factory, capsys):
    from test_tracking import trained_run

    from pretrain.tools.generate import main

    run = trained_run(tmp_path_factory)
    common = [str(run.run_dir), "--prompt", "def main(", "--max-new-tokens", "24"]
    greedy = main([*common, "--temperature", "0"])
    assert greedy.startswith("def main(") and len(greedy) > len("def main(")
    assert main([*common, "--temperature", "0", "--no-kv-cache"]) == greedy
    step6 = str(run.run_dir / "checkpoints" / "step_0000006")
    sampled = main([step6, "--prompt", "import", "--seed", "3", "--temperature", "1.0"])
    assert main([step6, "--prompt", "import", "--seed", "3", "--temperature", "1.0", "--no-kv-cache"]) == sampled
    capsys.readouterr()

    with pytest.raises(SystemExit) as exit_:
        main([*common, "--top-p", "0"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == "pretrain-generate: error: --top-p=0.0: expected in (0, 1]"
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path_factory.getbasetemp() / "nowhere"), "--prompt", "x"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().endswith("nowhere: no such run or checkpoint directory")
