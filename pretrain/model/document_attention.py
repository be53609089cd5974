"""Causal attention within packed documents, in memory linear in the sequence length.

Packed sequences hold several documents; with `data.reset_attention_mask` a
token attends only to earlier tokens of its own document. A dense
[b, 1, s, s] mask says that in s^2 memory and sends SDPA to a kernel that
stores the attention probabilities. Here the documents are taken apart
instead: each is an independent causal sequence, so the documents of a batch
are gathered into padded batches by length (powers of two: padding at most
doubles a bucket), each bucket goes through one causal
`scaled_dot_product_attention` (flash or memory-efficient kernels on CUDA,
the fused kernel on CPU), and the outputs are put back in place. A padded
query's output is dropped; a padded key sits after every real query of its
document, so causality already hides it. Memory: at most twice the tokens'
queries, keys and values, whatever the number or lengths of the documents.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dense_document_mask(starts: torch.Tensor) -> torch.Tensor:
    """The same cut as a dense mask [b, 1, s, s], True where attention is cut (megatron's
    convention): causal, and never across a document start. s^2 memory: for checks."""
    doc = torch.cumsum(starts.long(), dim=1)
    s = starts.shape[1]
    allowed = torch.ones(s, s, dtype=torch.bool, device=starts.device).tril() & (doc[:, :, None] == doc[:, None, :])
    return ~allowed[:, None]


def document_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, starts: torch.Tensor,
                       scale: float | None = None) -> torch.Tensor:
    """Causal attention of query [b, heads, s, d] over key and value [b, groups, s, d] within the
    documents `starts` [b, s] marks; returns [b, heads, s, d]."""
    b, heads, s, d = query.shape
    groups = key.shape[1]
    device = query.device
    starts = starts.clone()
    starts[:, 0] = True  # every row begins a document: none spans two rows
    begins = starts.reshape(-1).nonzero().squeeze(1)  # in the flattened [b * s] positions
    lengths = torch.diff(begins, append=torch.tensor([b * s], device=device))
    buckets = torch.clamp(lengths, min=1).float().log2().ceil().long()
    # Positions first, so that a document is a run of rows.
    q, k, v = (t.transpose(1, 2).reshape(b * s, t.shape[1], d) for t in (query, key, value))
    out_rows, out_values = [], []
    for bucket in buckets.unique().tolist():
        chosen = (buckets == bucket).nonzero().squeeze(1)
        width = 1 << bucket
        offsets = torch.arange(width, device=device)
        rows = begins[chosen, None] + offsets  # [n, width]
        valid = offsets < lengths[chosen, None]
        rows = torch.where(valid, rows, begins[chosen, None])  # padding repeats the document's first row
        qb, kb, vb = (t[rows].transpose(1, 2) for t in (q, k, v))  # [n, heads or groups, width, d]
        ob = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale, enable_gqa=groups != heads)
        out_rows.append(rows[valid])
        out_values.append(ob.transpose(1, 2)[valid])
    rows, values = torch.cat(out_rows), torch.cat(out_values)
    out = values.new_empty(b * s, heads, d).index_copy(0, rows, values)
    return out.reshape(b, s, heads, d).transpose(1, 2)
