"""nn.MultiheadAttention written out in ops fx can see, so its projections and matmuls quantize.

``nn.MultiheadAttention`` runs as one opaque call (``F.multi_head_attention_forward``); the
quantize pass replaces each call it can by ``AttentionParts`` with the same weights, whose
four ``nn.Linear`` projections become quantized layers and whose two matmuls get quantized
inputs. ``why_not_inlined`` says which calls keep the opaque module, and why.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn as nn


def why_not_inlined(mha: nn.MultiheadAttention, node: fx.Node) -> str | None:
    """None when ``AttentionParts`` computes exactly what this call computes; else the reason."""
    if not mha._qkv_same_embed_dim:
        return "key/value sizes differ from the embedding size (kdim/vdim)"
    if mha.bias_k is not None or mha.add_zero_attn:
        return "add_bias_kv / add_zero_attn"
    if len(node.args) != 3:
        return "called without query, key and value as positional arguments"
    allowed = {"need_weights", "average_attn_weights", "key_padding_mask", "attn_mask", "is_causal"}
    if set(node.kwargs) - allowed:
        return f"called with {', '.join(sorted(set(node.kwargs) - allowed))}"
    for mask in ("key_padding_mask", "attn_mask"):
        if node.kwargs.get(mask) is not None:
            return f"called with a {mask} (masks are not written out)"
    if node.kwargs.get("is_causal", False):
        return "called with is_causal=True"
    if node.kwargs.get("need_weights", True) and not node.kwargs.get("average_attn_weights", True):
        return "per-head attention weights requested (average_attn_weights=False)"
    return None


class AttentionParts(nn.Module):
    """Multi-head attention as projections, matmuls and a softmax (eval-mode semantics of
    ``nn.MultiheadAttention``: no dropout); returns ``(output, weights or None)`` like it."""

    def __init__(self, mha: nn.MultiheadAttention, need_weights: bool = True):
        super().__init__()
        e, bias = mha.embed_dim, mha.in_proj_bias is not None
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(e, e, bias=bias) for _ in range(3))
        with torch.no_grad():
            for i, proj in enumerate((self.q_proj, self.k_proj, self.v_proj)):
                proj.weight.copy_(mha.in_proj_weight[i * e : (i + 1) * e])
                if bias:
                    proj.bias.copy_(mha.in_proj_bias[i * e : (i + 1) * e])
        self.out_proj = nn.Linear(e, e, bias=mha.out_proj.bias is not None)
        self.out_proj.load_state_dict(mha.out_proj.state_dict())
        self.num_heads, self.head_dim = mha.num_heads, mha.head_dim
        self.batch_first, self.need_weights = mha.batch_first, need_weights

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, length, embed) -> (batch, heads, length, head_dim)."""
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        q = self._heads(self.q_proj(query)) * (1.0 / math.sqrt(self.head_dim))
        k = self._heads(self.k_proj(key))
        v = self._heads(self.v_proj(value))
        weights = torch.softmax(torch.matmul(q, k.transpose(-2, -1)), dim=-1)
        out = self.out_proj(torch.matmul(weights, v).transpose(1, 2).flatten(-2))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights.mean(1) if self.need_weights else None
