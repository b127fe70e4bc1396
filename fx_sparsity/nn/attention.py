"""``nn.MultiheadAttention``'s forward written out in plain, traceable ops.

``torch.fx.symbolic_trace`` keeps ``nn.MultiheadAttention`` as one opaque call (its functional
forward checks shapes in Python), so nothing can see its heads. Structured pruning traces this
function in its place: the packed ``in_proj_weight`` sliced into the q, k and v projections,
``view`` into heads, ``scaled_dot_product_attention`` (or the explicit softmax when attention
weights are asked for), the heads merged and ``out_proj``. It computes what the module does
(to float rounding) for every input the module takes, except ``add_bias_kv``/``add_zero_attn``
(refused with the reason).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["multi_head_attention", "PrunedMultiheadAttention"]


def _additive(mask: Any, dtype: torch.dtype) -> Any:
    """A boolean mask (True: not attended) as the additive float mask SDPA takes; a float one as it is."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def multi_head_attention(m: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                         attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                         is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``m(query, key, value, ...)`` in traceable ops (see the module docstring)."""
    if m.bias_k is not None or m.add_zero_attn:
        raise NotImplementedError(f"{type(m).__name__} with add_bias_kv or add_zero_attn is not written out; "
                                  f"its heads cannot be followed")
    if not m.batch_first:  # (L, B, E) -> (B, L, E)
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    heads, head_dim = m.num_heads, m.head_dim
    inner = heads * head_dim  # embed_dim, unless heads were cut (PrunedMultiheadAttention)
    if m._qkv_same_embed_dim:
        w_q, w_k, w_v = m.in_proj_weight[:inner], m.in_proj_weight[inner:2 * inner], m.in_proj_weight[2 * inner:]
    else:
        w_q, w_k, w_v = m.q_proj_weight, m.k_proj_weight, m.v_proj_weight
    b = m.in_proj_bias
    b_q, b_k, b_v = (None, None, None) if b is None else (b[:inner], b[inner:2 * inner], b[2 * inner:])
    batch, length, source = query.size(0), query.size(1), key.size(1)
    q = F.linear(query, w_q, b_q).view(batch, length, heads, head_dim).transpose(1, 2)
    k = F.linear(key, w_k, b_k).view(batch, source, heads, head_dim).transpose(1, 2)
    v = F.linear(value, w_v, b_v).view(batch, source, heads, head_dim).transpose(1, 2)
    mask = _additive(attn_mask, q.dtype)
    if mask is not None and mask.dim() == 3:  # (B * H, L, S)
        mask = mask.view(batch, heads, length, source)
    padding = _additive(key_padding_mask, q.dtype)
    if padding is not None:
        padding = padding.view(batch, 1, 1, source)
        mask = padding if mask is None else mask + padding
    dropout = m.dropout if m.training else 0.0
    weights = None
    if need_weights:
        scores = (q @ k.transpose(-2, -1)) * head_dim ** -0.5
        if mask is not None:
            scores = scores + mask
        attn = scores.softmax(-1)
        out = F.dropout(attn, dropout, m.training) @ v
        weights = attn.mean(1) if average_attn_weights else attn
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                             is_causal=is_causal and mask is None)
    out = m.out_proj(out.transpose(1, 2).reshape(batch, length, inner))
    if not m.batch_first:
        out = out.transpose(0, 1)
    return out, weights


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """An ``nn.MultiheadAttention`` whose heads were cut: ``num_heads`` heads of ``head_dim`` inside, while
    ``embed_dim`` (its input and output width) stays. ``nn.MultiheadAttention`` itself ties the inner width
    to ``embed_dim``; this one computes with :func:`multi_head_attention`. Same call, same outputs."""

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,  # type: ignore[override]
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        return multi_head_attention(self, query, key, value, key_padding_mask, need_weights, attn_mask,
                                    average_attn_weights, is_causal)
