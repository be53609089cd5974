"""RoPE scaling (`model.rope_scaling`: linear, llama3, yarn): the frequencies transformers
computes, a Llama-3.1-shaped export that transformers runs to our logits, generation with the
same tables, imports refused when their scaling can't be reproduced, and bad values (CPU)."""

import dataclasses
import json

import pytest
import torch

from pretrain.model.config import ModelConfig, RopeScaling
from test_zloss_qknorm import VOCAB, batch, perturb_norms, tiny_model, write_hf

# Llama 3.1's scaling (its config.json), and YaRN as Qwen publishes it for long contexts.
LLAMA31 = {"type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192,
           "low_freq_factor": 1.0, "high_freq_factor": 4.0}
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
SCALINGS = {"linear": {"type": "linear", "factor": 2.0}, "llama3": LLAMA31, "yarn": YARN,
            "yarn_explicit": {**YARN, "beta_fast": 16.0, "beta_slow": 2.0, "attention_factor": 1.2}}


def cfg_with(scaling: dict, **overrides) -> ModelConfig:
    # Head size 16 and base 500000, so that llama3's three wavelength bands all occur.
    return ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                       ffn_hidden_size=128, max_seq_len=64, rotary_base=500000.0,
                       rope_scaling=RopeScaling(**scaling), **overrides)


@pytest.mark.parametrize("name", SCALINGS)
def test_frequencies_are_the_ones_transformers_computes(name):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from pretrain.hf.format import hf_config
    from pretrain.model.rotary import inverse_frequencies

    cfg = cfg_with(SCALINGS[name])
    theirs = LlamaConfig(**{k: v for k, v in hf_config(cfg, VOCAB, torch.float32, {}).items()
                            if k not in ("architectures", "model_type", "torch_dtype")})
    kind = theirs.rope_parameters["rope_type"]
    expected, expected_factor = ROPE_INIT_FUNCTIONS[kind](theirs, torch.device("cpu"))
    ours, factor = inverse_frequencies(cfg.head_dim, cfg.rotary_base, cfg.rope_scaling)
    torch.testing.assert_close(ours, expected.float(), rtol=1e-6, atol=0)
    assert factor == pytest.approx(expected_factor)
    unscaled, _ = inverse_frequencies(cfg.head_dim, cfg.rotary_base)
    assert not torch.equal(ours, unscaled)  # the scaling changes something


@pytest.mark.parametrize("name", ["llama3", "yarn"])
def test_a_scaled_export_computes_our_logits_in_transformers_and_reimports(single_process_groups, tmp_path,
                                                                             name):
    from transformers import AutoModelForCausalLM

    from pretrain.hf.import_weights import read_weights
    from pretrain.model.decode import Decoder

    cfg = cfg_with(SCALINGS[name])
    model = tiny_model(cfg).eval()
    perturb_norms(model)
    weights = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    write_hf(tmp_path / "hf", cfg, weights)
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert exported["rope_scaling"]["rope_type"] == SCALINGS[name]["type"]
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    tokens, _, _ = batch(5)
    with torch.no_grad():
        ours = model(tokens)
        assert (theirs(tokens).logits - ours).abs().max().item() < 1e-4
        # Generation rotates with the same tables, cache or not.
        decoder = Decoder(cfg, model.state_dict())
        torch.testing.assert_close(decoder(tokens), ours, rtol=1e-5, atol=1e-5)
        cache = decoder.new_cache(tokens.shape[0], tokens.shape[1])
        steps = [decoder(tokens[:, :20], cache)] + [decoder(tokens[:, i:i + 1], cache) for i in range(20, 32)]
        torch.testing.assert_close(torch.cat(steps, dim=1), ours, rtol=1e-5, atol=1e-5)

    imported = read_weights(str(tmp_path / "hf"), cfg)
    assert all(torch.equal(imported[k], weights[k]) for k in weights)


def rewrite_config(directory, change) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def test_import_refuses_a_scaling_it_cannot_reproduce(single_process_groups, tmp_path):
    from common.typed_config import ConfigError
    from pretrain.hf.import_weights import read_weights

    cfg = cfg_with(LLAMA31)
    weights = {k: v for k, v in tiny_model(cfg).state_dict().items() if not k.endswith("_extra_state")}
    write_hf(tmp_path / "hf", cfg, weights)
    source = str(tmp_path / "hf")

    plain = dataclasses.replace(cfg, rope_scaling=RopeScaling())
    with pytest.raises(ConfigError, match=r"rope_scaling llama3 \(.*factor=8.0.*\), but model.rope_scaling is none"):
        read_weights(source, plain)
    other_factor = dataclasses.replace(cfg, rope_scaling=RopeScaling(**{**LLAMA31, "factor": 4.0}))
    with pytest.raises(ConfigError, match="but model.rope_scaling is llama3 .*factor=4"):
        read_weights(source, other_factor)

    def dynamic(config):
        config["rope_scaling"] = {"rope_type": "dynamic", "factor": 2.0}
        config["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 500000.0}
    rewrite_config(tmp_path / "hf", dynamic)
    with pytest.raises(ConfigError, match="rope_scaling rope_type='dynamic': this model reproduces only "
                                          "linear, llama3 and yarn"):
        read_weights(source, cfg)

    def deepseek_yarn(config):
        config["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                                  "mscale": 1.0, "mscale_all_dim": 0.7}
    rewrite_config(tmp_path / "hf", deepseek_yarn)
    with pytest.raises(ConfigError, match="rope_scaling yarn with mscale, mscale_all_dim: this model cannot "
                                          "reproduce it"):
        read_weights(source, cfg_with(YARN))


@pytest.mark.parametrize("values,expected", [
    ({"type": "llama3", "factor": 8.0}, "model.rope_scaling.original_max_position_embeddings=None: expected "
                                        "the pretraining context length (> 0) for model.rope_scaling.type=llama3"),
    ({"type": "yarn", "factor": 0.5, "original_max_position_embeddings": 32},
     "model.rope_scaling.factor=0.5: expected >= 1 for model.rope_scaling.type=yarn"),
    ({"type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192, "low_freq_factor": 4.0,
      "high_freq_factor": 1.0}, "model.rope_scaling.low_freq_factor=4.0, high_freq_factor=1.0: expected 0 < low < high"),
    ({"type": "rope"}, "model.rope_scaling.type='rope': expected one of none, linear, llama3, yarn"),
])
def test_bad_scaling_values_are_one_line_errors(values, expected):
    from pretrain.config import Config, ConfigError, from_dict

    with pytest.raises(ConfigError) as err:
        from_dict(Config, {"model": {"rope_scaling": values}})
    assert str(err.value) == expected


def test_a_sequence_beyond_the_scaled_positions_is_refused():
    from pretrain.config import Config, ConfigError, from_dict

    with pytest.raises(ConfigError, match=r"model.max_seq_len=256: above the 128 positions model.rope_scaling "
                                          r"\(yarn, factor 4 x 32\) covers"):
        from_dict(Config, {"model": {"max_seq_len": 256, "rope_scaling": YARN}})
    fits = from_dict(Config, {"model": {"max_seq_len": 128, "rope_scaling": YARN}, "data": {"seq_len": 128}})
    assert fits.model.max_seq_len == 128
