"""The fast path's one-token decode forward, with the linears that read the same input fused.

In a batch-1 decode step every linear reads its whole weight to produce one row, so a step costs its weight bytes
plus a fixed cost per kernel. Measured inside CUDA graphs on an H100 (bench/NOTES-fast-path.md), a 512-row LLM
k/v projection reads at 0.48 TB/s and a 768 x 768 TTS projection at 0.3 TB/s, while q, k and v read as one
4608-row product reach 2.3 TB/s. So q/k/v, gate/up and the TTS's 4 code heads are fused: their weights are moved,
once, into one buffer with their rows stacked, and each module's parameters become views of it (same values, same
memory: the reference path, which calls the modules, computes exactly what it computed before).

`FusedDecoder` is a DecoderStack's forward for one token over those buffers, built from the stack's own modules
and `omnivox.models.layers`' rotary and attention functions: the same math as `DecoderLayer.forward`, one product
per fused group (a different kernel, so a different summation order: the fast path uses it for bf16/fp16; fp32
calls the modules and stays bit-identical to the reference). Being a plain module, it compiles as one graph.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from omnivox.models.layers import apply_rotary, attend


@dataclass(eq=False)
class FusedGroup:
    weight: torch.Tensor  # [sum of rows, K]
    bias: torch.Tensor | None
    sizes: list[int]  # rows of each member, in order


_GROUPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # first member module -> its FusedGroup


@torch.no_grad()
def fuse(linears: list[nn.Linear]) -> FusedGroup:
    """Stack the members' weights (and biases) into one buffer; the members' parameters become views of it.
    Idempotent: fusing the same modules again returns the first fusion."""
    if linears[0] in _GROUPS:
        return _GROUPS[linears[0]]
    weight = torch.cat([m.weight for m in linears])  # the old weights are freed below: peak + one group
    has_bias = all(m.bias is not None for m in linears)
    bias = torch.cat([m.bias for m in linears]) if has_bias else None
    sizes = [m.weight.shape[0] for m in linears]
    for i, (m, rows) in enumerate(zip(linears, weight.split(sizes), strict=True)):
        m.weight = nn.Parameter(rows, requires_grad=False)
        if has_bias:
            m.bias = nn.Parameter(bias.split(sizes)[i], requires_grad=False)
    group = _GROUPS[linears[0]] = FusedGroup(weight, bias, sizes)
    return group


def linear(x: torch.Tensor, group: FusedGroup) -> tuple[torch.Tensor, ...]:
    """x [..., K] -> one output per member, [..., rows_i] each (views of one product)."""
    return F.linear(x, group.weight, group.bias).split(group.sizes, dim=-1)


class FusedDecoder(nn.Module):
    """A DecoderStack's forward with q/k/v and gate/up fused; holds no weights of its own."""

    def __init__(self, stack: nn.Module):
        super().__init__()
        self.stack = [stack]  # a list, so the stack's parameters are not registered twice
        self.qkv = [fuse([la.self_attn.q_proj, la.self_attn.k_proj, la.self_attn.v_proj]) for la in stack.layers]
        self.gate_up = [fuse([la.mlp.gate_proj, la.mlp.up_proj]) for la in stack.layers]

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache, mask: torch.Tensor | None) -> torch.Tensor:
        """Same contract as DecoderStack.forward: x [B, T, C] -> post-norm hidden [B, T, C]."""
        stack = self.stack[0]
        batch, q_len, _ = x.shape
        rope = (stack.rope_cos[positions].to(x.dtype), stack.rope_sin[positions].to(x.dtype))  # [T, D] each
        for layer, qkv, gate_up in zip(stack.layers, self.qkv, self.gate_up, strict=True):
            attn = layer.self_attn
            q, k, v = linear(layer.input_layernorm(x), qkv)
            q = q.reshape(batch, q_len, attn.num_heads, attn.head_dim).transpose(1, 2)  # [B, H, T, D]
            k = k.reshape(batch, q_len, attn.num_kv_heads, attn.head_dim).transpose(1, 2)  # [B, KV, T, D]
            v = v.reshape(batch, q_len, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
            q, k = apply_rotary(q, rope), apply_rotary(k, rope)
            k, v = cache.update(attn.layer_idx, positions, k, v)
            out = attend(q, k, v, None if mask is None else mask[..., : k.shape[2]], attn.scale)
            x = x + attn.o_proj(out.transpose(1, 2).reshape(batch, q_len, attn.num_heads * attn.head_dim))
            gate, up = linear(layer.post_attention_layernorm(x), gate_up)
            x = x + layer.mlp.down_proj(F.silu(gate) * up)
        return stack.norm(x)


class FusedHeads(nn.Module):
    """ConditionalChatTTS.compute_logits with the 4 code heads as one product: hidden -> float32 [B, T, 4, codes]."""

    def __init__(self, heads: nn.ModuleList):
        super().__init__()
        self.group = fuse(list(heads))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.group.weight)  # [B, T, 4 * codes] in the model dtype
        return logits.view(*hidden.shape[:-1], len(self.group.sizes), -1).float()
