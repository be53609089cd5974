"""z-loss (`model.z_loss_multiplier`) and QK-norm (`model.qk_norm`): what they compute, that they
are refused with one-line errors, that TP=2 and PP=2 give the single-process losses and
gradients, and that a QK-norm model exports as Hugging Face Qwen3, logit for logit (CPU)."""

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from distributed import run_distributed
from pretrain.model.config import ModelConfig

VOCAB = 256
# Far above the typical 1e-4, so that a z-loss mishandled under a layout shows in the losses.
Z = 1e-2


def tiny_cfg(**overrides) -> ModelConfig:
    return ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                       ffn_hidden_size=128, max_seq_len=64, **overrides)


def tiny_model(cfg: ModelConfig, chunk: int | None = None, seed: int = 3):
    from pretrain.model.llama import LlamaModel, transformer_config

    return LlamaModel(cfg, transformer_config(cfg), cfg.padded_vocab_size(VOCAB), seed=seed,
                      loss_chunk_tokens=chunk)


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (3, 32), generator=g)
    return tokens, torch.roll(tokens, -1, dims=1), torch.rand(3, 32, generator=g) > 0.3


def perturb_norms(model) -> None:
    """Norm weights start at one; moved off it, a norm weight in the wrong place shows."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("layernorm.weight"):
                param.add_(0.3 * torch.randn(param.shape, generator=g))


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


# --- z-loss -----------------------------------------------------------------------------------

def formula_loss(model, tokens, labels, mask, z: float) -> torch.Tensor:
    """mean over the counted tokens of cross entropy + z * logsumexp(logits)^2, by plain autograd."""
    logits = model(tokens).float()  # [b, s, v]
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape)
    lse = torch.logsumexp(logits, dim=-1)
    weights = mask.float() / mask.float().sum()
    return ((ce + z * lse.square()) * weights).sum()


@pytest.mark.parametrize("chunk", [None, 7])
def test_z_loss_is_the_formula_in_loss_and_gradients(single_process_groups, chunk):
    """Both loss paths (full logits, and chunked with the gradients taken in forward) add
    z * mean(logsumexp^2) and its gradient; with z = 0 they give plain cross entropy."""
    cfg = tiny_cfg(z_loss_multiplier=Z)
    tokens, labels, mask = batch()
    model = tiny_model(cfg, chunk)
    loss = model(tokens, labels, loss_mask=mask, reduction="mean")
    (2.0 * loss).backward()
    ours = grads(model)

    reference = tiny_model(cfg)
    expected = formula_loss(reference, tokens, labels, mask, Z)
    (2.0 * expected).backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for name, grad in grads(reference).items():
        torch.testing.assert_close(ours[name], grad, rtol=1e-4, atol=1e-6, msg=name)

    plain = tiny_model(tiny_cfg(), chunk)
    plain_loss = plain(tokens, labels, loss_mask=mask, reduction="mean")
    plain_loss.backward()
    with torch.no_grad():
        ce_only = formula_loss(reference, tokens, labels, mask, 0.0)
        lse_term = expected - ce_only
    torch.testing.assert_close(plain_loss, ce_only, rtol=1e-5, atol=1e-6)
    assert lse_term > 0.1  # at initialisation logsumexp ~ ln(256): the term is ~0.3
    # z-loss changes the gradients of the output layer and of everything below it.
    for name in ("output_layer.weight", "decoder.layers.0.self_attention.linear_qkv.weight"):
        assert not torch.allclose(ours[name], plain.get_parameter(name).grad, rtol=1e-3, atol=0), name


def test_z_loss_is_per_token_and_training_only(single_process_groups):
    """reduction="none" gives cross entropy + z * lse^2 per token; in eval mode (evaluation,
    perplexity) the loss is the cross entropy alone."""
    cfg = tiny_cfg(z_loss_multiplier=Z)
    tokens, labels, mask = batch(1)
    model = tiny_model(cfg)
    with torch.no_grad():
        logits = model(tokens).float()
        ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape)
        lse = torch.logsumexp(logits, dim=-1)
        torch.testing.assert_close(model(tokens, labels), ce + Z * lse.square(), rtol=1e-5, atol=1e-5)
        model.eval()
        torch.testing.assert_close(model(tokens, labels), ce, rtol=1e-5, atol=1e-5)
        for chunk in (None, 5):
            model.loss_chunk_tokens = chunk
            evaluated = model(tokens, labels, loss_mask=mask, reduction="mean")
            torch.testing.assert_close(evaluated, (ce * mask).sum() / mask.sum(), rtol=1e-5, atol=1e-6)


def test_cross_entropy_and_logsumexp_matches_megatron_and_torch(single_process_groups):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from pretrain.model.cross_entropy import cross_entropy_and_logsumexp

    g = torch.Generator().manual_seed(5)
    logits = (3 * torch.randn(6, 2, 40, generator=g)).requires_grad_()
    target = torch.randint(0, 40, (6, 2), generator=g)
    ce, lse = cross_entropy_and_logsumexp(logits, target)
    torch.testing.assert_close(ce, vocab_parallel_cross_entropy(logits.detach().clone(), target))
    torch.testing.assert_close(lse, torch.logsumexp(logits.detach(), -1))
    # Gradients of each output alone and of a mix of both.
    for mix in ((1.0, 0.0), (0.0, 1.0), (0.7, -1.3)):
        x = logits.detach().clone().requires_grad_()
        ce, lse = cross_entropy_and_logsumexp(x, target)
        (mix[0] * ce.sum() + mix[1] * lse.sum()).backward()
        y = logits.detach().clone().requires_grad_()
        (mix[0] * F.cross_entropy(y.flatten(0, 1), target.flatten(), reduction="sum")
         + mix[1] * torch.logsumexp(y, -1).sum()).backward()
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-6)


# --- QK-norm ----------------------------------------------------------------------------------

def test_qk_norm_adds_per_head_norm_weights_and_changes_the_output(single_process_groups):
    from pretrain.model.decode import Decoder

    tokens, labels, _ = batch(2)
    plain, normed = tiny_model(tiny_cfg()), tiny_model(tiny_cfg(qk_norm=True))
    state = normed.state_dict()
    for i in range(2):
        for which in "qk":
            name = f"decoder.layers.{i}.self_attention.{which}_layernorm.weight"
            assert state[name].shape == (16,), name  # head_dim, shared by the heads
    assert not any("q_layernorm" in n for n in plain.state_dict())
    # Every other weight is the same (initialisation is by name), only the norms were added.
    assert sum(p.numel() for p in normed.parameters()) == normed.cfg.num_params(VOCAB) \
        == plain.cfg.num_params(VOCAB) + 2 * 2 * 16
    with torch.no_grad():
        assert not torch.allclose(plain(tokens), normed(tokens), rtol=1e-3, atol=1e-3)
    normed(tokens, labels).mean().backward()
    for name, param in normed.named_parameters():
        if "self_attention" in name and "layernorm" in name:
            assert param.grad is not None and param.grad.abs().sum() > 0, name

    # The norm acts per head before the rotation: scaling one head's queries leaves its output unchanged.
    norm = normed.decoder.layers[0].self_attention.q_layernorm
    x = torch.randn(5, 2, 4, 16)
    scaled = x.clone()
    scaled[:, :, 1] *= 7.0
    torch.testing.assert_close(norm(x), norm(scaled), rtol=1e-5, atol=1e-5)

    # The plain-torch decoder of generation applies the same norms, with and without its cache.
    normed.eval()
    perturb_norms(normed)
    decoder = Decoder(normed.cfg, normed.state_dict())
    with torch.no_grad():
        expected = normed(tokens)
        torch.testing.assert_close(decoder(tokens), expected, rtol=1e-5, atol=1e-5)
        cache = decoder.new_cache(3, 32)
        steps = [decoder(tokens[:, :20], cache)] + [decoder(tokens[:, i:i + 1], cache) for i in range(20, 32)]
        torch.testing.assert_close(torch.cat(steps, dim=1), expected, rtol=1e-5, atol=1e-5)


# --- config -----------------------------------------------------------------------------------

@pytest.mark.parametrize("values,expected", [
    ({"z_loss_multiplier": -1e-4}, "model.z_loss_multiplier=-0.0001: expected a number >= 0"),
    ({"z_loss_multiplier": float("nan")}, "model.z_loss_multiplier=nan: expected a number >= 0"),
    ({"z_loss_multiplier": float("inf")}, "model.z_loss_multiplier=inf: expected a number >= 0"),
    ({"z_loss_multiplier": "1e-4"}, "model.z_loss_multiplier='1e-4': expected"),
    ({"z_loss_multiplier": True}, "model.z_loss_multiplier=True: expected"),
    ({"qk_norm": "yes"}, "model.qk_norm='yes': expected"),
    ({"qk_norm": 1}, "model.qk_norm=1: expected"),
])
def test_bad_values_are_refused_in_one_line(values, expected):
    from common.errors import UserError
    from pretrain.config import Config, from_dict

    # Through the config tree, as `pretrain model.<key>=...` gives them, and directly.
    for build in (lambda: from_dict(Config, {"model": values}), lambda: ModelConfig(**values)):
        with pytest.raises(UserError) as err:
            build()
        message = str(err.value)
        assert len(message.splitlines()) == 1 and message.startswith(expected), message


QK_NORM_PRESETS = ("olmoe_1b_7b", "qwen3_30b_a3b")


def test_defaults_are_off_and_documented():
    from pretrain.hydra_config import compose_config

    cfg = ModelConfig()
    assert cfg.z_loss_multiplier == 0.0 and cfg.qk_norm is False
    for path in sorted(Path(__file__).resolve().parent.parent.joinpath("configs", "model").glob("*.yaml")):
        text = path.read_text()
        assert "\nz_loss_multiplier: 0.0\n" in text, path.name
        # Off unless the preset's published shape has it (OLMoE, Qwen3-MoE).
        assert f"\nqk_norm: {'true' if path.stem in QK_NORM_PRESETS else 'false'}\n" in text, path.name
    composed = compose_config(["model.z_loss_multiplier=1e-4", "model.qk_norm=true"])
    assert (composed.model.z_loss_multiplier, composed.model.qk_norm) == (1e-4, True)


def test_resume_refuses_a_checkpoint_of_the_other_qk_norm(tmp_path):
    """QK-norm adds weights: a checkpoint written with it cannot resume without, and the reverse.
    z-loss shapes nothing, so a resume may change it."""
    from pretrain.checkpoint.files import RunDirError, check_model_shape

    saved = {"model": dataclasses.asdict(ModelConfig(qk_norm=True, z_loss_multiplier=1e-4))}
    with pytest.raises(RunDirError, match="written for model.qk_norm=True, but the config has model.qk_norm=False"):
        check_model_shape(tmp_path, saved, ModelConfig())
    check_model_shape(tmp_path, saved, ModelConfig(qk_norm=True))


# --- Hugging Face -----------------------------------------------------------------------------

def write_hf(directory: Path, cfg: ModelConfig, weights: dict) -> None:
    import json

    from safetensors.torch import save_file

    from pretrain.hf.format import hf_config, to_hf

    directory.mkdir(parents=True)
    save_file(to_hf(weights, cfg), directory / "model.safetensors")
    special = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    (directory / "config.json").write_text(json.dumps(hf_config(cfg, VOCAB, torch.float32, special)))


@pytest.mark.parametrize("qk_norm", [True, False])
def test_hugging_face_format_round_trip(single_process_groups, tmp_path, qk_norm):
    """QK-norm exports as Qwen3 (q_norm/k_norm), otherwise as Llama; transformers computes our
    logits; importing the directory gives back our weights; the wrong architecture is refused."""
    from transformers import AutoModelForCausalLM

    from common.typed_config import ConfigError
    from pretrain.hf.format import FormatError, from_hf, to_hf
    from pretrain.hf.import_weights import read_weights

    cfg = tiny_cfg(qk_norm=qk_norm, z_loss_multiplier=Z)
    model = tiny_model(cfg).eval()
    perturb_norms(model)
    weights = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    write_hf(tmp_path / "hf", cfg, weights)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(theirs).__name__ == ("Qwen3ForCausalLM" if qk_norm else "LlamaForCausalLM")
    tokens, _, _ = batch(3)
    with torch.no_grad():
        assert (theirs(tokens).logits - model(tokens)).abs().max().item() < 1e-5
    if qk_norm:
        hf_state = theirs.state_dict()
        assert torch.equal(hf_state["model.layers.1.self_attn.k_norm.weight"],
                           weights["decoder.layers.1.self_attention.k_layernorm.weight"])

    imported = read_weights(str(tmp_path / "hf"), cfg)
    assert imported.keys() == weights.keys()
    assert all(torch.equal(imported[k], weights[k]) for k in weights)
    # Nothing of z-loss, a training term, is in the exported config.
    assert "z_loss" not in (tmp_path / "hf" / "config.json").read_text()

    other = dataclasses.replace(cfg, qk_norm=not qk_norm)
    with pytest.raises(ConfigError, match=f"model_type='{'qwen3' if qk_norm else 'llama'}'; expected "):
        read_weights(str(tmp_path / "hf"), other)
    if qk_norm:  # the weights alone, as one .safetensors file under Hugging Face names
        with pytest.raises(FormatError, match="q_norm.weight belongs to a model with query/key norms; "
                                              "expected model.qk_norm=true"):
            from_hf(to_hf(weights, cfg), other, "file")
    else:
        with pytest.raises(FormatError, match="no weight model.layers.0.self_attn.q_norm.weight"):
            from_hf(to_hf(weights, cfg), other, "file")


@pytest.fixture(scope="module")
def qk_norm_run(single_process_groups, tmp_path_factory) -> Path:
    """A one-process run with both options, trained and checkpointed in this process."""
    from parity import layout_config, trainer_for

    run_dir = tmp_path_factory.mktemp("qk_norm_run")
    cfg = with_options(layout_config(run_dir))
    trainer = trainer_for(cfg)
    trainer.fit()
    return run_dir


def test_export_of_a_qk_norm_checkpoint_is_qwen3_and_logit_exact(qk_norm_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from pretrain.checkpoint.consolidate import load_checkpoint
    from pretrain.hf.export import main
    from pretrain.hf.import_weights import read_weights
    from pretrain.model.llama import LlamaModel, transformer_config

    out = tmp_path / "hf"
    main([str(qk_norm_run), str(out)])
    checkpoint = load_checkpoint(qk_norm_run)
    assert checkpoint.model.qk_norm and checkpoint.model.z_loss_multiplier == Z
    ours = LlamaModel(checkpoint.model, transformer_config(checkpoint.model), checkpoint.padded_vocab_size)
    ours.load_state_dict(checkpoint.state_dict)
    ours.eval()
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(theirs).__name__ == "Qwen3ForCausalLM"
    # Trained, the norms moved off one: the comparison sees them.
    q_norm = checkpoint.state_dict["decoder.layers.0.self_attention.q_layernorm.weight"]
    assert (q_norm - 1).abs().max() > 1e-3
    tokens, _, _ = batch(4)
    with torch.no_grad():
        assert (theirs(tokens).logits - ours(tokens)).abs().max().item() < 1e-4
    imported = read_weights(str(out), checkpoint.model)
    for name, tensor in imported.items():
        assert torch.equal(tensor, checkpoint.state_dict[name].float()), name

    # `trainer.init_from=<export>`: a fresh run's engine starts from exactly these weights.
    from parallel.engine_state import canonical_parameters
    from parity import layout_config, trainer_for
    from pretrain.hf.import_weights import init_from

    cfg = with_options(layout_config(tmp_path / "continued"))
    fresh = trainer_for(cfg)
    init_from(fresh.engine.deepspeed, str(out), cfg.model, cfg.parallel, None, VOCAB, say=lambda _: None)
    started = dict(canonical_parameters(fresh.engine.module, cfg.model.num_layers))
    assert started.keys() == imported.keys()
    for name, param in started.items():
        assert torch.equal(param.detach(), imported[name]), name


def test_export_refuses_a_garbage_tokenizer_copy_in_one_line(qk_norm_run, tmp_path, capsys):
    import shutil

    from pretrain.checkpoint.files import latest_checkpoint
    from pretrain.hf.export import TokenizerCopyError, export, main

    copy = tmp_path / "step_copy"
    shutil.copytree(latest_checkpoint(qk_norm_run), copy)
    (copy / "tokenizer.model").write_bytes(b"\x00not a sentencepiece model\x00")
    with pytest.raises(TokenizerCopyError):
        export(copy, tmp_path / "never")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([str(copy), str(tmp_path / "never")])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"pretrain-export: error: {copy / 'tokenizer.model'}: "), lines[0]
    assert "--tokenizer" in lines[0] and "note" not in captured.err
    assert not (tmp_path / "never").exists()


# --- parity over layouts (one two-rank group) ---------------------------------------------------

def with_options(cfg):
    cfg.model = dataclasses.replace(cfg.model, z_loss_multiplier=Z, qk_norm=True)
    return cfg


class Recorder:
    def __init__(self):
        self.losses, self.grad_norms = [], []

    def on_train_start(self, trainer): ...

    def on_step_end(self, trainer, metrics):
        self.losses.append(metrics["loss"])
        self.grad_norms.append(metrics["grad_norm"])

    def on_train_end(self, trainer): ...


def train_with_options(run_dir: str, layout: dict) -> dict:
    """Per-step losses and gradient norms with both options on, then the evaluation loss of
    fixed batches (cross entropy only) and the q/k norm weights the training reached."""
    from data_pipeline.dataset import fixed_batches
    from parallel.engine_state import canonical_parameters
    from parity import PatternTokens, layout_config, trainer_for

    trainer = trainer_for(with_options(layout_config(Path(run_dir), **layout)))
    recorder = Recorder()
    trainer.callbacks.append(recorder)
    trainer.fit()
    batches = fixed_batches(PatternTokens(), 2, 4, trainer.topology.dp_rank, trainer.topology.data)
    evaluated = trainer.data_parallel_mean(trainer.engine.eval_loss(batches))
    # numpy, not tensors: a tensor returned from a spawned rank would live in its shared memory.
    norms = {n: p.detach().numpy().copy() for n, p in canonical_parameters(trainer.engine.module, 4)
             if "_layernorm" in n and "self_attention" in n}
    return {"losses": recorder.losses, "grad_norms": recorder.grad_norms, "eval": float(evaluated),
            "norms": norms}


def tp2_gradients(chunk: int | None) -> dict:
    """Loss and full gradients of one forward and backward of the bare TP=2 model."""
    import torch.distributed as dist

    from parallel import sharding
    from parallel.groups import init_process_groups

    init_process_groups(2, 1, torch.device("cpu"))
    model = tiny_model(tiny_cfg(z_loss_multiplier=Z, qk_norm=True), chunk)
    perturb_norms(model)
    tokens, labels, mask = batch()
    loss = model(tokens, labels, loss_mask=mask, reduction="mean")
    loss.backward()
    full = {}
    for name, param in model.named_parameters():
        shards = [torch.empty_like(param.grad) for _ in range(2)]
        dist.all_gather(shards, param.grad.contiguous())
        full[name] = sharding.gather(name, shards).numpy()
        if sharding.split_rule(name) == "replicated":  # every rank holds the whole gradient
            torch.testing.assert_close(shards[0], shards[1], rtol=0, atol=0, msg=name)
    return {"loss": loss.item(), "grads": full}


LAYOUTS = {"tp2": {"tensor": 2}, "tp2_sp": {"tensor": 2, "sequence_parallel": True}, "pp2": {"pipeline": 2}}


def two_rank_group(root: str) -> dict:
    results = {f"grads_chunk_{chunk}": tp2_gradients(chunk) for chunk in (None, 7)}
    for name, layout in LAYOUTS.items():
        results[name] = train_with_options(str(Path(root) / name), layout)
    return results


@pytest.fixture(scope="module")
def single_reference(single_process_groups, tmp_path_factory) -> dict:
    results = {}
    for chunk in (None, 7):
        model = tiny_model(tiny_cfg(z_loss_multiplier=Z, qk_norm=True), chunk)
        perturb_norms(model)
        tokens, labels, mask = batch()
        loss = model(tokens, labels, loss_mask=mask, reduction="mean")
        loss.backward()
        results[f"grads_chunk_{chunk}"] = {"loss": loss.item(), "grads": {n: g.numpy() for n, g in grads(model).items()}}
    results["single"] = train_with_options(str(tmp_path_factory.mktemp("single_options")), {})
    return results


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    return run_distributed(two_rank_group, 2, str(tmp_path_factory.mktemp("two_options")))


@pytest.mark.slow  # the two-rank group (`two_ranks`)
def test_tensor_and_pipeline_parallel_match_one_process_with_z_loss_and_qk_norm(single_reference, two_ranks):
    single = single_reference["single"]
    # The reference trains, and the options matter to it: z-loss here is a sizeable share of the loss.
    assert max(single["losses"]) - min(single["losses"]) > 0.05
    assert all(abs(w - 1).max() > 1e-3 for w in single["norms"].values())
    for rank, result in enumerate(two_ranks):
        for chunk in (None, 7):
            key = f"grads_chunk_{chunk}"
            ours, expected = result[key], single_reference[key]
            assert ours["loss"] == pytest.approx(expected["loss"], rel=1e-6), (rank, key)
            for name, grad in expected["grads"].items():
                torch.testing.assert_close(torch.from_numpy(ours["grads"][name]), torch.from_numpy(grad),
                                           rtol=1e-5, atol=1e-7,
                                           msg=f"rank {rank}, {key}: {name}")
        for layout in LAYOUTS:
            got = result[layout]
            for step, (a, b) in enumerate(zip(got["losses"], single["losses"], strict=True), start=1):
                assert a == pytest.approx(b, rel=1e-5), f"rank {rank}, {layout}, step {step}"
            for step, (a, b) in enumerate(zip(got["grad_norms"], single["grad_norms"], strict=True), start=1):
                assert a == pytest.approx(b, rel=1e-4), f"rank {rank}, {layout}, grad norm step {step}"
            # Evaluation is the cross entropy alone in every layout, the pipeline's included.
            assert got["eval"] == pytest.approx(single["eval"], rel=1e-5), f"rank {rank}, {layout}"
            for name, weight in got["norms"].items():
                torch.testing.assert_close(torch.from_numpy(weight), torch.from_numpy(single["norms"][name]),
                                           rtol=1e-4, atol=1e-5,
                                           msg=f"rank {rank}, {layout}: {name}")
