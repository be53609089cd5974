import pytest

from pretrain.config import Config, ConfigError, ModelConfig, from_dict


def test_defaults_are_valid():
    cfg = from_dict(Config, {})
    assert cfg.model.name == "tiny" and cfg.validate_world(1) == 1


@pytest.mark.parametrize(
    "values,message",
    [
        ({"model": {"hidden_sise": 64}}, "model.hidden_sise: unknown key"),
        ({"trainer": {"train_steps": "ten"}}, "trainer.train_steps='ten': expected int"),
        ({"trainer": {"train_steps": True}}, "trainer.train_steps=True: expected int"),
        ({"data": {"sources": "stdlib"}}, "data.sources='stdlib': expected a list"),
        ({"parallel": {"precision": "fp8"}}, "parallel.precision='fp8': expected one of fp32, bf16, fp16"),
        ({"model": {"hidden_size": 100, "num_attention_heads": 8}},
         "model.hidden_size=100: expected a multiple of model.num_attention_heads=8"),
        ({"model": {"num_attention_heads": 8, "num_query_groups": 3}},
         "model.num_attention_heads=8: expected a multiple of model.num_query_groups=3"),
        ({"data": {"seq_len": 4096}, "model": {"max_seq_len": 1024}},
         "data.seq_len=4096: expected at most model.max_seq_len=1024"),
        ({"parallel": {"pipeline": 2, "zero_stage": 2}}, "DeepSpeed's pipeline engine supports ZeRO stage 0 or 1"),
    ],
)
def test_bad_values_name_the_key(values, message):
    with pytest.raises(ConfigError) as err:
        from_dict(Config, values)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_world_layout_checks():
    cfg = from_dict(Config, {"parallel": {"tensor": 2}, "trainer": {"micro_batch_size": 2, "global_batch_size": 8}})
    assert cfg.validate_world(8) == 4
    with pytest.raises(ConfigError, match="world size 3: expected a multiple of parallel.tensor"):
        cfg.validate_world(3)
    with pytest.raises(ConfigError, match="trainer.global_batch_size=8: expected a multiple of"):
        from_dict(Config, {"trainer": {"micro_batch_size": 3, "global_batch_size": 8}}).validate_world(1)
    with pytest.raises(ConfigError, match="model.num_query_groups=2: expected a multiple of parallel.tensor=4"):
        from_dict(Config, {"parallel": {"tensor": 4}, "model": {"num_query_groups": 2}}).validate_world(4)


def test_int_accepted_where_float_expected():
    cfg = from_dict(Config, {"optim": {"lr": 1, "min_lr": 0}})
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 1.0


def test_model_presets_have_published_sizes():
    import yaml
    from pathlib import Path

    presets = Path(__file__).resolve().parent.parent / "configs" / "model"
    sizes = {}
    for path in presets.glob("*.yaml"):
        cfg = from_dict(ModelConfig, yaml.safe_load(path.read_text()))
        sizes[cfg.name] = cfg.num_params(cfg.padded_vocab_size(128256 if "llama" in cfg.name else 50257))
    assert sizes["gpt2_124m"] == pytest.approx(124e6, rel=0.05)
    assert sizes["llama_1b"] == pytest.approx(1.24e9, rel=0.03)
    assert sizes["llama_8b"] == pytest.approx(8.03e9, rel=0.03)
    assert sizes["llama_70b"] == pytest.approx(70.6e9, rel=0.03)
