"""Attention cut at document starts (`data.reset_attention_mask`) without a dense s x s mask:
the same outputs, losses and gradients as the dense mask, and a training step at a length where
a dense mask could not fit in the memory the test allows (CPU)."""

import pytest
import torch
import torch.nn.functional as F

from pretrain.model.config import ModelConfig
from pretrain.model.document_attention import dense_document_mask, document_attention

VOCAB = 256


def dense_attention(q, k, v, starts):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=~dense_document_mask(starts),
                                          enable_gqa=k.shape[1] != q.shape[1])


@pytest.mark.parametrize("case", ["random", "none", "every_position", "one_long_many_short"])
def test_document_attention_equals_the_dense_mask_forward_and_backward(case):
    g = torch.Generator().manual_seed(1)
    b, heads, groups, s, d = 3, 4, 2, 96, 8
    q = torch.randn(b, heads, s, d, generator=g, requires_grad=True)
    k, v = (torch.randn(b, groups, s, d, generator=g, requires_grad=True) for _ in range(2))
    starts = {"random": torch.rand(b, s, generator=g) < 0.08,
              "none": torch.zeros(b, s, dtype=torch.bool),
              "every_position": torch.ones(b, s, dtype=torch.bool)}.get(case)
    if starts is None:  # a 70-token document, then documents of 1 to 4 tokens
        starts = torch.zeros(b, s, dtype=torch.bool)
        starts[:, 70::3] = True
        starts[:, 71] = True
    ours, reference = document_attention(q, k, v, starts), dense_attention(q, k, v, starts)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    cotangent = torch.randn(ours.shape, generator=g)
    for mine, theirs in zip(torch.autograd.grad(ours, (q, k, v), cotangent),
                            torch.autograd.grad(reference, (q, k, v), cotangent)):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


def tiny_model(seq: int, hidden: int = 64, layers: int = 2):
    from pretrain.model.llama import LlamaModel, transformer_config

    cfg = ModelConfig(num_layers=layers, hidden_size=hidden, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=2 * hidden, max_seq_len=seq)
    return LlamaModel(cfg, transformer_config(cfg), cfg.padded_vocab_size(VOCAB), seed=5)


def documents(b: int, s: int, seed: int):
    """Token ids with an end-of-document token (2) every 5 to 40 tokens, and the batch's masks."""
    from data_pipeline.dataset import EodOptions, eod_masks

    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, VOCAB, (b, s + 1), generator=g)
    for row in range(b):
        cuts = torch.cumsum(torch.randint(5, 40, (s,), generator=g), 0)
        tokens[row, cuts[cuts < s + 1]] = 2
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    return inputs, labels, eod_masks(inputs, EodOptions(2, mask_loss=True, reset_position_ids=True,
                                                        reset_attention_mask=True))


def test_training_losses_and_gradients_equal_the_dense_mask(single_process_groups):
    """The loss and every parameter gradient of a training step, fp32, within 1e-5."""
    model = tiny_model(128).train()
    inputs, labels, masks = documents(3, 128, seed=2)
    results = []
    for cut in (masks["document_starts"], dense_document_mask(masks["document_starts"])):
        model.zero_grad()
        loss = model(inputs, labels, cut, masks["position_ids"], masks["loss_mask"], reduction="mean")
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss, grads), (dense_loss, dense_grads) = results
    torch.testing.assert_close(loss, dense_loss, rtol=1e-5, atol=0)
    for name in grads:
        torch.testing.assert_close(grads[name], dense_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_training_step_at_16k_tokens_stays_below_what_a_dense_mask_alone_needs(single_process_groups):
    """At sequence 16384 a dense boolean mask is 256 MiB, and SDPA's masked kernel would also keep
    probabilities of 4 GiB per layer; the document path's whole step stays under 192 MiB."""
    from parallel.memory import PeakTrace

    seq, bound = 16384, 192 * 2**20
    assert seq * seq > bound  # the dense mask alone would not fit
    model = tiny_model(seq, hidden=32).train()
    inputs, labels, masks = documents(1, seq, seed=3)
    starts = masks["document_starts"]
    assert starts.sum() > 100  # hundreds of documents
    trace = PeakTrace()
    with trace:
        loss = model(inputs, labels, starts, masks["position_ids"], masks["loss_mask"], reduction="mean")
        loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters())
    print(f"peak of the step: {(trace.peak - trace.baseline) / 2**20:.0f} MiB")
    assert trace.peak - trace.baseline < bound, trace.peak - trace.baseline
