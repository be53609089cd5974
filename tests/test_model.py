import math

import pytest
import torch

from pretrain.config import ModelConfig
from pretrain.model.layers import SDPAttention
from pretrain.model.rotary import apply_rotary_tables, rotary_frequencies, rotary_tables
from pretrain.model.llama import LlamaModel, transformer_config

VOCAB = 256


def tiny_model(**overrides) -> LlamaModel:
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=128, max_seq_len=64, **overrides)
    torch.manual_seed(0)
    return LlamaModel(cfg, transformer_config(cfg), cfg.padded_vocab_size(VOCAB))


def test_forward_backward_shapes_and_initial_loss(single_process_groups):
    model = tiny_model()
    tokens = torch.randint(0, VOCAB, (3, 32))
    logits = model(tokens)
    assert logits.shape == (3, 32, 256)

    per_token = model(tokens, labels=torch.roll(tokens, -1, dims=1))
    assert per_token.shape == (3, 32)
    loss = per_token.mean()
    # Small initial weights give near-uniform predictions over the padded vocabulary.
    assert abs(loss.item() - math.log(256)) < 0.1
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_parameter_count_matches_formula(single_process_groups):
    for tied in (False, True):
        model = tiny_model(tie_embeddings=tied)
        counted = sum(p.numel() for p in model.parameters())
        assert counted == model.cfg.num_params(256)


def test_tied_embeddings_share_the_output_weight(single_process_groups):
    model = tiny_model(tie_embeddings=True)
    assert model.output_layer.weight is None
    tokens = torch.randint(0, VOCAB, (2, 16))
    model(tokens, labels=tokens).mean().backward()
    assert model.embedding.weight.grad is not None


def test_causal_attention_ignores_future_tokens(single_process_groups):
    model = tiny_model().eval()
    tokens = torch.randint(0, VOCAB, (1, 24))
    changed = tokens.clone()
    changed[0, 12:] = (changed[0, 12:] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_sdpa_attention_matches_explicit_grouped_attention():
    torch.manual_seed(0)
    seq, batch, heads, groups, dim = 10, 2, 4, 2, 8
    q = torch.randn(seq, batch, heads, dim)
    k = torch.randn(seq, batch, groups, dim)
    v = torch.randn(seq, batch, groups, dim)
    cfg = transformer_config(ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=4,
                                         num_query_groups=2, ffn_hidden_size=64))
    out = SDPAttention(cfg, 1, None, "self")(q, k, v, None)

    k_full = k.repeat_interleave(heads // groups, dim=2)
    v_full = v.repeat_interleave(heads // groups, dim=2)
    scores = torch.einsum("sbhd,tbhd->bhst", q, k_full) / math.sqrt(dim)
    scores = scores.masked_fill(torch.ones(seq, seq).triu(1).bool(), float("-inf"))
    expected = torch.einsum("bhst,tbhd->sbhd", scores.softmax(-1), v_full).reshape(seq, batch, -1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_rotary_frequencies_layout():
    freqs = rotary_frequencies(5, 8, 10000.0)
    assert freqs.shape == (5, 1, 1, 8)
    assert torch.equal(freqs[0], torch.zeros(1, 1, 8))
    # Both halves carry the same angles; the first channel turns one radian per position.
    torch.testing.assert_close(freqs[..., :4], freqs[..., 4:])
    torch.testing.assert_close(freqs[:, 0, 0, 0], torch.arange(5.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotation_by_tables_is_megatrons_rotation_by_angles(dtype):
    """The model passes cos/sin tables through megatron-core's fused-RoPE hook; the
    result must be what megatron-core's own rotation makes of the angles."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    t = torch.randn(6, 2, 4, 8).to(dtype)  # [s, b, heads, d]
    rotated = apply_rotary_tables(t, rotary_tables(6, 8, 10000.0))
    assert rotated.dtype == dtype
    torch.testing.assert_close(rotated, _apply_rotary_pos_emb_bshd(t, rotary_frequencies(6, 8, 10000.0)),
                               rtol=0, atol=0)


@pytest.mark.parametrize("vocab,tp,expected", [(500, 1, 512), (512, 1, 512), (513, 2, 768)])
def test_padded_vocab_size(vocab, tp, expected):
    assert ModelConfig().padded_vocab_size(vocab, tp) == expected


def test_document_masks_make_packed_documents_independent(single_process_groups):
    """With attention cut and positions restarted at EOD, the second document of a
    packed sequence gets the logits it would get on its own."""
    from data_pipeline.dataset import EodOptions, eod_masks

    model = tiny_model().eval()
    eod = 2
    first = torch.tensor([[5, 9, 17, 33, eod]])
    second = torch.tensor([[41, 7, 7, 100, 3, 12]])
    packed = torch.cat([first, second], dim=1)
    masks = eod_masks(packed, EodOptions(eod, mask_loss=True, reset_position_ids=True,
                                         reset_attention_mask=True))
    with torch.no_grad():
        together = model(packed, document_starts=masks["document_starts"],
                         position_ids=masks["position_ids"])
        alone = model(second)
    torch.testing.assert_close(together[:, first.shape[1]:], alone, rtol=1e-5, atol=1e-5)
    assert masks["loss_mask"][0, first.shape[1] - 1] == 0  # no loss for predicting after EOD


@pytest.mark.parametrize("dtype,tied", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False)])
def test_chunked_output_loss_equals_the_full_logits_loss(single_process_groups, dtype, tied):
    """The chunked output layer + cross entropy (gradients taken in forward) gives the masked mean
    loss and every parameter gradient of the unfused path, with chunks that do not divide the tokens."""
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=128, max_seq_len=64, tie_embeddings=tied)
    tokens = torch.randint(0, VOCAB, (3, 32))
    labels = torch.roll(tokens, -1, dims=1)
    loss_mask = torch.rand(3, 32) > 0.3
    results = []
    for chunk in (None, 7):
        model = LlamaModel(cfg, transformer_config(cfg, params_dtype=dtype), cfg.padded_vocab_size(VOCAB),
                           seed=3, loss_chunk_tokens=chunk)
        loss = model(tokens, labels, loss_mask=loss_mask, reduction="mean")
        (loss * 3.0).backward()  # a non-unit incoming gradient, as the loss scaling of an engine gives
        with torch.no_grad():
            evaluated = model(tokens, labels, reduction="mean")
        results.append((loss.detach(), evaluated, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (full, full_eval, full_grads), (chunked, chunked_eval, chunked_grads) = results
    assert chunked.dtype == torch.float32 and chunked.shape == ()
    # fp32: the same sums in another order; bf16: the unfused path rounds the logits gradient to bf16
    # before its matrix products, the chunked one multiplies it in fp32.
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked_eval, full_eval, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(full, full_eval)  # the mask changed the mean
    assert full_grads.keys() == chunked_grads.keys()
    for name in full_grads:
        torch.testing.assert_close(chunked_grads[name].float(), full_grads[name].float(), **tolerance, msg=name)
