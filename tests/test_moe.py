"""Mixture-of-experts layers (`model.moe`, pretrain/model/moe.py) on CPU, in one process.

megatron-core's MoELayer with the device-agnostic router trains inside the
DeepSpeed engine, reports its metrics, resumes bit for bit, and both ways of
balancing the load (auxiliary loss, expert bias) pull a skewed router toward
an even load.
"""

import dataclasses
import json

import pytest
import torch

from common.typed_config import ConfigError
from pretrain.model.config import ModelConfig, MoEConfig
from pretrain.model.flops import matmul_params

MOE = {"num_experts": 4, "top_k": 2, "expert_ffn_hidden_size": 64, "shared_expert_ffn_hidden_size": 32,
       "first_dense_layers": 1, "router_z_loss_coeff": 1e-3}


def test_active_parameters_count_top_k_experts_and_the_shared_one():
    dense = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128)
    moe = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                      moe=MoEConfig(**MOE))
    h = 64
    layer = h * 4 + 3 * h * (4 * 64 + 32)  # router, four experts, the shared expert
    active = h * 4 + 3 * h * (2 * 64 + 32)
    # Layer 0 stays dense (first_dense_layers=1); layer 1 trades its MLP for experts.
    assert moe.num_params(256) - dense.num_params(256) == layer - 3 * h * 128
    assert moe.num_params(256, active=True) - dense.num_params(256) == active - 3 * h * 128
    assert matmul_params(moe, 256) - matmul_params(dense, 256) == active - 3 * h * 128


@pytest.mark.parametrize("change,message", [
    ({"top_k": 5}, "model.moe.top_k=5: expected 1 to min(8, model.moe.num_experts=4)"),
    ({"num_experts": 0, "shared_expert_ffn_hidden_size": 32}, "model.moe.shared_expert_ffn_hidden_size=32"),
    ({"capacity_factor": -1.0}, "model.moe.capacity_factor=-1.0: expected > 0"),
    ({"expert_bias": True}, "model.moe.expert_bias=true: expected model.moe.score_function=sigmoid"),
    ({"score_function": "tanh"}, "model.moe.score_function='tanh'"),
    ({"top_k": 1}, "model.moe.normalize_top_k=true with model.moe.top_k=1: expected false"),
])
def test_bad_moe_settings_are_refused_in_one_line(change, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        MoEConfig(**{**MOE, **change})


@pytest.fixture(scope="module")
def moe_run(single_process_groups, tmp_path_factory):
    from parity import train_layout

    root = tmp_path_factory.mktemp("moe")
    dense = train_layout(str(root / "dense"))
    moe = train_layout(str(root / "moe"), moe=MOE)
    return dense, moe, root


def test_moe_model_trains_and_resumes_exactly(moe_run):
    dense, moe, _ = moe_run
    losses = moe["losses"]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses != dense["losses"]  # the experts are in the computation
    assert moe["resumed"] == moe["continued"]  # a fresh engine from the checkpoint: the same step


def test_moe_metrics_are_logged(moe_run):
    import json

    _, _, root = moe_run
    records = [json.loads(line) for line in (root / "moe" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    for record in steps:
        assert record["moe/aux_loss"] > 0 and record["moe/z_loss"] > 0
        assert record["moe/load_max_over_mean"] >= 1.0
        assert record["moe/dropped_fraction"] == 0.0  # dropless


def moe_layer(moe: MoEConfig, hidden: int = 32):
    from megatron.core.transformer.spec_utils import build_module

    from pretrain.model.llama import transformer_config
    from pretrain.model.moe import moe_spec

    cfg = ModelConfig(num_layers=1, hidden_size=hidden, num_attention_heads=2, ffn_hidden_size=64, moe=moe)
    layer = build_module(moe_spec(cfg), config=transformer_config(cfg), layer_number=1)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.02)
    with torch.no_grad():  # a router that sends nearly every token to expert 0
        layer.router.weight[0] += 0.3
    return layer


def load_after(layer, steps: int, optimizer=None, balance=None) -> list[float]:
    from pretrain.model.moe import set_aux_loss_scale

    set_aux_loss_scale(1)
    torch.manual_seed(0)
    x = torch.randn(64, 4, layer.router.weight.shape[1]) + 0.3
    loads = []
    for _ in range(steps):
        out, _ = layer(x)
        # No task loss: only the auxiliary loss (injected in backward) moves the router.
        (out * 0).sum().backward()
        if optimizer:
            optimizer.step()
            optimizer.zero_grad()
        tokens = layer.router.tokens_per_expert_seen
        loads.append(float(tokens.max() / tokens.mean()))
        balance() if balance else layer.router.take_load()  # each takes (and resets) the counts
    return loads


def test_aux_loss_pulls_a_skewed_router_toward_even_load(single_process_groups):
    layer = moe_layer(MoEConfig(num_experts=4, top_k=1, normalize_top_k=False, aux_loss_coeff=1.0))
    loads = load_after(layer, 30, optimizer=torch.optim.SGD(layer.router.parameters(), lr=1.0))
    assert loads[0] > 3.0  # nearly all on one expert (4.0 is all)
    assert sum(loads[-10:]) / 10 < 1.6


def test_expert_bias_pulls_a_skewed_router_toward_even_load(single_process_groups):
    from pretrain.training.moe_balance import MoEBalance

    moe = MoEConfig(num_experts=4, top_k=1, normalize_top_k=False, score_function="sigmoid", load_balancing="none",
                    expert_bias=True, expert_bias_update_rate=0.05)
    layer = moe_layer(moe)
    balance = MoEBalance(layer, micro_batches=1)
    # The bias moves the choice only: no gradient, no optimizer.
    loads = load_after(layer, 40, balance=balance)
    assert loads[0] > 3.0
    assert sum(loads[-10:]) / 10 < 2.0
    assert layer.router.expert_bias[0] < 0 < layer.router.expert_bias[1:].min()


def test_moe_and_dense_checkpoints_do_not_resume_as_each_other(moe_run):
    from pretrain.checkpoint import files

    from parity import layout_config

    _, _, root = moe_run
    dense, moe = layout_config(root).model, layout_config(root, moe=MOE).model
    for run, model, message in [
        ("moe", dense, "written for model.moe.num_experts=4, but the config has model.moe.num_experts=0"),
        ("dense", moe,
         "written for model.moe.num_experts=0, but the config has model.moe.num_experts=4"),
    ]:
        checkpoint = files.latest_checkpoint(str(root / run))
        with pytest.raises(files.RunDirError, match=message):
            files.check_model_shape(checkpoint, files.read_manifest(checkpoint), model)


def test_planner_counts_every_expert_on_each_rank():
    from parity import VOCAB, layout_config
    from pretrain.planning.parameters import stage_params

    from pathlib import Path

    cfg = layout_config(Path("unused"), moe=MOE)
    model = cfg.model
    assert stage_params(cfg, VOCAB) == [model.num_params(VOCAB)]


def test_moe_tiny_preset_is_tiny_with_experts():
    from pretrain.hydra_config import compose_config

    tiny, moe_tiny = compose_config(["model=tiny"]).model, compose_config(["model=moe_tiny"]).model
    assert (moe_tiny.moe.num_experts, moe_tiny.moe.top_k) == (8, 2) and not tiny.moe.enabled
    # Fewer active parameters per token than tiny, more in all.
    assert moe_tiny.num_params(4096, active=True) < tiny.num_params(4096) < moe_tiny.num_params(4096)


@pytest.mark.parametrize("preset,total,active", [
    ("olmoe_1b_7b", 6.9e9, 1.3e9),
    ("qwen3_30b_a3b", 30.5e9, 3.3e9),
    ("deepseek_v3", 671e9, 37e9),
])
def test_published_moe_presets_have_their_sizes(preset, total, active):
    """Total and active parameters near the published ones (Qwen3's narrower heads and
    DeepSeek-V3's attention without latent compression are said in the presets)."""
    from pretrain.hydra_config import compose_config

    model = compose_config([f"model={preset}"]).model
    vocab = model.padded_vocab_size(model.vocab_size)
    assert model.num_params(vocab) == pytest.approx(total, rel=0.10)
    assert model.num_params(vocab, active=True) == pytest.approx(active, rel=0.15)


@pytest.mark.parametrize("qk_norm,moe,architecture", [
    (False, {"num_experts": 4, "top_k": 2, "expert_ffn_hidden_size": 48}, "MixtralForCausalLM"),
    (True, {"num_experts": 4, "top_k": 2, "expert_ffn_hidden_size": 48, "first_dense_layers": 1,
            "normalize_top_k": False}, "Qwen3MoeForCausalLM"),
])
def test_moe_exports_as_mixtral_or_qwen3_moe(single_process_groups, tmp_path, qk_norm, moe, architecture):
    """transformers computes our logits from the export; importing it gives back our weights."""
    from transformers import AutoModelForCausalLM

    from pretrain.hf.format import config_mismatch, from_hf, to_hf
    from pretrain.hf.import_weights import read_weights
    from test_zloss_qknorm import batch, perturb_norms, tiny_cfg, tiny_model, write_hf

    cfg = tiny_cfg(qk_norm=qk_norm, moe=MoEConfig(**moe))
    model = tiny_model(cfg).eval()
    with torch.no_grad():  # routers that prefer different experts for different tokens
        for name, param in model.named_parameters():
            if name.endswith("router.weight"):
                param.normal_(std=0.5)
    perturb_norms(model)
    weights = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    write_hf(tmp_path / "hf", cfg, weights)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(theirs).__name__ == architecture
    tokens, _, _ = batch(3)
    with torch.no_grad():
        assert (theirs(tokens).logits - model(tokens)).abs().max().item() < 1e-4
    back = from_hf(to_hf(weights, cfg), cfg, "file")
    assert back.keys() == weights.keys() and all(torch.equal(back[k], weights[k]) for k in weights)
    # trainer.init_from reads the directory back, after checking its config.json against ours.
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config_mismatch(hf, cfg) is None
    other = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, top_k=1, normalize_top_k=False))
    assert config_mismatch(hf, other) == "num_experts_per_tok=2, but model.moe gives 1"
    imported = read_weights(str(tmp_path / "hf"), cfg)
    assert all(torch.equal(imported[k], weights[k]) for k in weights)


def test_export_refuses_what_no_transformers_family_computes():
    from pretrain.hf.format import moe_refusal

    def refusal(qk_norm=False, **moe):
        return moe_refusal(ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                                       qk_norm=qk_norm, moe=MoEConfig(num_experts=4, **moe)))

    assert refusal() is None and refusal(qk_norm=True, first_dense_layers=1) is None
    assert "shared expert" in refusal(shared_expert_ffn_hidden_size=32)
    assert "route by softmax" in refusal(score_function="sigmoid")
    assert "dropless" in refusal(capacity_factor=1.0)
    assert "Mixtral has no dense layers" in refusal(first_dense_layers=1)


def test_export_of_a_shared_expert_checkpoint_is_refused_in_one_line(moe_run, tmp_path):
    from pretrain.hf.export import export
    from pretrain.hf.format import FormatError

    _, _, root = moe_run
    with pytest.raises(FormatError, match="model.moe.shared_expert_ffn_hidden_size=32: Mixtral and Qwen3-MoE"):
        export(root / "moe", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("moe", [
    {"num_experts": 4, "top_k": 2, "expert_ffn_hidden_size": 48, "shared_expert_ffn_hidden_size": 32,
     "first_dense_layers": 1},
    {"num_experts": 4, "top_k": 2, "expert_ffn_hidden_size": 48, "normalize_top_k": False},
    {"num_experts": 4, "top_k": 2, "expert_ffn_hidden_size": 48, "score_function": "sigmoid", "expert_bias": True},
], ids=["softmax_shared", "softmax_unnormalised", "sigmoid_expert_bias"])
def test_generation_decoder_reproduces_the_moe_model(single_process_groups, moe):
    """`pretrain-generate`'s plain-torch decoder routes as megatron-core's MoE layer does."""
    from pretrain.model.decode import Decoder
    from test_zloss_qknorm import tiny_cfg, tiny_model

    cfg = tiny_cfg(moe=MoEConfig(**moe))
    model = tiny_model(cfg).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("router.weight"):
                param.normal_(std=0.5)
        for name, buffer in model.named_buffers():
            if name.endswith("expert_bias"):
                buffer.copy_(torch.tensor([0.3, -0.2, 0.1, -0.4]))
    tokens = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(tokens)
    decoder = Decoder(cfg, model.state_dict())
    torch.testing.assert_close(decoder(tokens), expected, rtol=0, atol=1e-5)
    cache = decoder.new_cache(2, 24)
    pieces = [decoder(tokens[:, :9], cache)] + [decoder(tokens[:, i:i + 1], cache) for i in range(9, 24)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), expected, rtol=0, atol=1e-5)
