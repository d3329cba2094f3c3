"""Decoder building blocks shared by the LLM (Qwen2) and the TTS backbone (Llama).

Both are pre-norm decoders with RMSNorm, rotary attention and a SiLU-gated MLP; they differ only in sizes, rope
theta, GQA and whether q/k/v carry a bias. Every op mirrors transformers' Qwen2/Llama code so outputs match the
official implementation: fp32 RMSNorm, fp32 rotary tables cast to the activation dtype, explicit softmax scale.

Attention never owns state: the engine hands in a KV cache view (`cache.update(layer, positions, k, v)`,
omnivox/models/kv_cache.py) and a boolean mask `[B or 1, 1, Tq, Tk_max]`, sliced to the keys the view returns.
Positions are [T] (every row at the same positions) or [B, T] (each batch row at its own positions).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from omnivox.models.kv_cache import KVRows, KVView

Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each [T, D] or [B, 1, T, D] in the activation dtype


class RMSNorm(nn.Module):
    """Normalise in fp32, cast back, then scale: the exact op order of transformers' Qwen2/Llama RMSNorm."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(input_dtype)


def rotary_tables(
    head_dim: int, theta: float, max_positions: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin `[max_positions, head_dim]` in HF layout cat(freqs, freqs).

    inv_freq is computed on the CPU (where transformers builds it) and the angles on `device` (where transformers
    computes them each step), so gathering rows gives bit-identical values to its on-the-fly rotary embedding.
    """
    device = torch.get_default_device() if device is None else device  # honours `with torch.device(...)`
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim
    inv_freq = (1.0 / (float(theta) ** exponents)).to(device)  # [D/2]
    positions = torch.arange(max_positions, device=device).float()
    freqs = positions[:, None] * inv_freq  # [P, D/2]
    angles = torch.cat((freqs, freqs), dim=-1)  # [P, D]
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """x: [B, H, T, D]; cos/sin: [T, D] (shared by every row) or [B, 1, T, D] (per row), shared by the heads."""
    cos, sin = rope
    return (x * cos) + (rotate_half(x) * sin)


SHORT_QUERY_ROWS = 16  # query rows per kv head up to which `short_queries_by_products` applies
_SHORT_QUERY_PRODUCTS: contextvars.ContextVar[bool] = contextvars.ContextVar("short_query_products", default=False)


@contextlib.contextmanager
def short_queries_by_products(enabled: bool = True) -> Iterator[None]:
    """Within the block, attention of at most SHORT_QUERY_ROWS query rows per kv head (decode steps, TTS text
    prefills) runs as two batched matrix products instead of SDPA: SDPA's masked kernels tile 64 query rows, so a
    step's one or seven rows waste most of their work (65 % of a TTS step at batch 128 on an H200)."""
    token = _SHORT_QUERY_PRODUCTS.set(enabled)
    try:
        yield
    finally:
        _SHORT_QUERY_PRODUCTS.reset(token)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
           compiled: bool = False) -> torch.Tensor:
    """The one attention call site, so kernel choices live in one place.

    q: [B, H, Tq, D]; k, v: [B, KV, Tk, D]; mask: bool [B or 1, 1, Tq, Tk] (True = may attend) or None (all keys).
    GQA folds each kv head's query group into the query length ([B, KV, G*Tq, D]) instead of copying K/V G times;
    every query row still attends on its own, so the result is the same attention. `compiled`: the products'
    scale, mask and softmax run as one compiled kernel (`masked_softmax`).
    """
    batch, num_heads, q_len, head_dim = q.shape
    groups = num_heads // k.shape[1]
    q = q.reshape(batch, k.shape[1], groups * q_len, head_dim)  # [B, KV, G*Tq, D]
    if _SHORT_QUERY_PRODUCTS.get() and groups * q_len <= SHORT_QUERY_ROWS:
        out = _attend_by_products(q, k, v, mask, scale, groups, compiled)
    else:
        if mask is not None and groups > 1:
            mask = mask.repeat(1, 1, groups, 1)  # row g*Tq + t = mask row t
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.reshape(batch, num_heads, q_len, head_dim)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """softmax(scores * scale) over the keys `mask` shows, cast to `dtype`. scores: fp32 [B, H, Tq, Tk]; mask: bool
    [B or 1, 1, Tq, Tk], broadcast over the heads (one rank for every caller: fewer shapes to compile for)."""
    scores = scores * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1).to(dtype)


@functools.cache
def compiled_masked_softmax() -> Callable:
    """`masked_softmax` as one fused kernel (made on first use; dynamic shapes: one compile for every batch and key
    width)."""
    return torch.compile(masked_softmax, dynamic=True, fullgraph=True)


def _attend_by_products(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
                        groups: int, compiled: bool = False) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v with fp32 scores and softmax, as the fused kernels keep them; the
    probabilities go back to the value dtype for the second product, as theirs do. q: [B, KV, G*Tq, D]. Every
    query row must see at least one key (the engine's masks always show key 0): a row with none gives NaN."""
    batch, kv_heads, rows, head_dim = q.shape
    keys, values = k.flatten(0, 1), v.flatten(0, 1)  # [B*KV, Tk, D]: views for cache slices
    if q.dtype == torch.float32:
        scores = torch.bmm(q.flatten(0, 1), keys.transpose(1, 2))
    elif q.is_cuda:  # reduced-precision inputs, fp32 products (no fp32 copy of the keys)
        scores = torch.bmm(q.flatten(0, 1), keys.transpose(1, 2), out_dtype=torch.float32)
    else:  # the CPU has no mixed-dtype bmm
        scores = torch.bmm(q.flatten(0, 1).float(), keys.transpose(1, 2).float())
    softmax = compiled_masked_softmax() if compiled else masked_softmax  # five kernels a layer eager, one compiled
    probs = softmax(scores.view(batch, kv_heads * groups, rows // groups, -1), mask, scale, v.dtype)  # head-major
    probs = probs.view(batch * kv_heads, rows, -1)
    return torch.bmm(probs, values).view(batch, kv_heads, rows, head_dim)


@torch.no_grad()
def fuse_parameters(params: list[nn.Parameter]) -> torch.Tensor:
    """Concatenates `params` along dim 0 and re-points each at its rows of the result: the parameters (and so their
    state_dict keys and in-place loading) stay, backed by one storage, and their old storage is freed."""
    fused = torch.cat(params)
    for param, rows in zip(params, fused.split([p.shape[0] for p in params]), strict=True):
        param.data = rows
    return fused


class Attention(nn.Module):
    """Rotary multi-head attention with GQA over a KV cache supplied by the caller, in two calls: `project` (no
    cache: compiled with the layer's first half) and `attend_cached`; `o_proj` is applied by the layer."""

    def __init__(
        self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, layer_idx: int, qkv_bias: bool
    ):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.layer_idx = layer_idx
        self.scale = head_dim**-0.5  # the float transformers passes to SDPA
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)
        self.qkv_weight: torch.Tensor | None = None  # [q; k; v] once `fuse` has run (plain attributes: no new keys)
        self.qkv_bias: torch.Tensor | None = None

    def fuse(self) -> None:
        """q, k and v as one product: a decode step is launch-bound, and this saves two of its kernels per layer."""
        if self.qkv_weight is None:
            projections = (self.q_proj, self.k_proj, self.v_proj)
            self.qkv_weight = fuse_parameters([p.weight for p in projections])
            if self.q_proj.bias is not None:
                self.qkv_bias = fuse_parameters([p.bias for p in projections])

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        """`.to()` and friends may give the projections new storage, so they undo `fuse` (call it again after)."""
        self.qkv_weight = self.qkv_bias = None
        return super()._apply(fn, recurse)

    def project(self, x: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, C] -> rotated q [B, H, T, D], rotated k and v [B, KV, T, D]."""
        batch, q_len, _ = x.shape
        if self.qkv_weight is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            sizes = [self.num_heads * self.head_dim] + 2 * [self.num_kv_heads * self.head_dim]
            q, k, v = F.linear(x, self.qkv_weight, self.qkv_bias).split(sizes, dim=-1)
        q = q.view(batch, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, q_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, q_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rotary(q, rope), apply_rotary(k, rope), v

    def attend_cached(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
        cache: KVView | KVRows | None,
        mask: torch.Tensor | None,
        compiled: bool = False,
    ) -> torch.Tensor:
        """Writes k/v into the cache, attends over every key it returns: [B, T, H * D] before `o_proj`."""
        if cache is not None:
            k, v = cache.update(self.layer_idx, positions, k, v, compiled)  # [B, KV, Tk, D]
        if mask is not None:
            mask = mask[..., : k.shape[2]]
        out = attend(q, k, v, mask, self.scale, compiled)  # [B, H, T, D]
        batch, _, q_len, _ = q.shape
        return out.transpose(1, 2).reshape(batch, q_len, self.num_heads * self.head_dim)


@dataclass
class Segment:
    """`positions.shape` = [batch, length] tokens that attend through their own cache view and mask."""

    positions: torch.Tensor
    cache: KVView | KVRows
    mask: torch.Tensor


class Segments:
    """Several batches in one forward: the decoder's products (projections, MLP) run once over every token, laid out
    one segment after another as [1, N, C], and each segment attends through its own cache and mask. A decode step's
    rows and a few prompts' tokens then read the weights once instead of in two forwards."""

    def __init__(self, segments: list[Segment]):
        self.segments = segments

    @property
    def positions(self) -> torch.Tensor:
        """Every token's position, [1, N] (for the rotary tables)."""
        return torch.cat([s.positions.flatten() for s in self.segments])[None]

    def attend(self, attention: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               compiled: bool = False) -> torch.Tensor:
        """q [1, H, N, D], k and v [1, KV, N, D] -> [1, N, H * D]: each segment's rows attend on their own."""
        parts, start = [], 0
        for s in self.segments:
            batch, length = s.positions.shape
            end = start + batch * length
            q_s, k_s, v_s = (t[0, :, start:end].unflatten(1, (batch, length)).transpose(0, 1) for t in (q, k, v))
            out = attention.attend_cached(q_s, k_s, v_s, s.positions, s.cache, s.mask, compiled)  # [B, T, H * D]
            parts.append(out.reshape(1, end - start, -1))
            start = end
        return torch.cat(parts, dim=1)


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.gate_up_weight: torch.Tensor | None = None  # [gate; up] once `fuse` has run

    def fuse(self) -> None:
        """gate and up as one product (see `Attention.fuse`)."""
        if self.gate_up_weight is None:
            self.gate_up_weight = fuse_parameters([self.gate_proj.weight, self.up_proj.weight])

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        self.gate_up_weight = None  # see `Attention._apply`
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_weight is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = F.linear(x, self.gate_up_weight).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_heads: int,
        num_kv_heads: int,
        rms_norm_eps: float,
        layer_idx: int,
        qkv_bias: bool,
    ):
        super().__init__()
        head_dim = hidden_size // num_heads
        self.self_attn = Attention(hidden_size, num_heads, num_kv_heads, head_dim, layer_idx, qkv_bias)
        self.mlp = GatedMLP(hidden_size, intermediate_size)
        self.input_layernorm = RMSNorm(hidden_size, rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(hidden_size, rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rope: Rope,
        cache: KVView | KVRows | Segments | None,
        mask: torch.Tensor | None,
        compiled: bool = False,
    ) -> torch.Tensor:
        inputs, outputs = self.compiled_halves() if compiled else (self.attention_inputs, self.attention_outputs)
        q, k, v = inputs(x, rope)
        if isinstance(cache, Segments):
            return outputs(x, cache.attend(self.self_attn, q, k, v, compiled))
        return outputs(x, self.self_attn.attend_cached(q, k, v, positions, cache, mask, compiled))

    def attention_inputs(self, x: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """norm -> q/k/v -> rotary: no cache, so the same code for every layer (see `compiled_halves`)."""
        return self.self_attn.project(self.input_layernorm(x), rope)

    def attention_outputs(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """o_proj -> residual -> norm -> MLP -> residual."""
        x = x + self.self_attn.o_proj(attended)
        return x + self.mlp(self.post_attention_layernorm(x))

    def compiled_halves(self) -> tuple:
        """torch.compile of the two cache-free halves (dynamic shapes), made on first use: they fuse the elementwise
        work around the products. Every layer runs the same code, so the compiled code is shared and compiling a
        stack costs about one layer; the cache write and the attention stay eager (they differ per layer and view)."""
        if "_compiled" not in self.__dict__:
            self.__dict__["_compiled"] = (
                torch.compile(self.attention_inputs, dynamic=True, fullgraph=True),
                torch.compile(self.attention_outputs, dynamic=True, fullgraph=True),
            )
        return self.__dict__["_compiled"]


class DecoderStack(nn.Module):
    """`layers.N.*` + final `norm`, with rotary tables as non-persistent buffers (never in a checkpoint).

    The tables are fp32 when built; `module.to(dtype)` rounds them once, which gives the same values as rounding
    the gathered fp32 rows, so they stay exact in the model dtype. `reset_rotary` rebuilds them in fp32, e.g.
    after building on the meta device.
    """

    def __init__(
        self,
        *,
        hidden_size: int,
        intermediate_size: int,
        num_layers: int,
        num_heads: int,
        num_kv_heads: int,
        rope_theta: float,
        rms_norm_eps: float,
        max_positions: int,
        qkv_bias: bool,
    ):
        super().__init__()
        self.head_dim = hidden_size // num_heads
        self.rope_theta = rope_theta
        self.max_positions = max_positions
        self.layers = nn.ModuleList(
            DecoderLayer(hidden_size, intermediate_size, num_heads, num_kv_heads, rms_norm_eps, i, qkv_bias)
            for i in range(num_layers)
        )
        self.norm = RMSNorm(hidden_size, rms_norm_eps)
        cos, sin = rotary_tables(self.head_dim, rope_theta, max_positions)
        self.register_buffer("rope_cos", cos, persistent=False)  # [P, D]
        self.register_buffer("rope_sin", sin, persistent=False)  # [P, D]

    def fuse_projections(self) -> None:
        """Each layer's q/k/v and gate/up as one product each (`Attention.fuse`, `GatedMLP.fuse`): call once the
        weights are loaded and placed. The separate parameters become views of the fused tensors, so state_dict
        keys, in-place loading and memory stay as they were; `.to()` and friends undo it, and anything that replaces
        the parameter objects (`load_state_dict(assign=True)`, a deep copy) leaves it stale: fuse again after those.
        Calling it again changes nothing."""
        for layer in self.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()

    def reset_rotary(self, device: torch.device | str | None = None) -> None:
        device = self.norm.weight.device if device is None else device
        self.rope_cos, self.rope_sin = rotary_tables(self.head_dim, self.rope_theta, self.max_positions, device)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cache: KVView | KVRows | Segments | None,
        mask: torch.Tensor | None = None,
        compiled: bool = False,
    ) -> torch.Tensor:
        """x: [B, T, C] embeddings; positions: long [T] or [B, T]; returns post-norm hidden [B, T, C]. `compiled`:
        the layers' compiled halves (`DecoderLayer.compiled_halves`) instead of the eager ones. With `Segments` as
        the cache, x is [1, N, C], the segments' tokens one after another, and `mask` is unused."""
        cos, sin = self.rope_cos[positions].to(x.dtype), self.rope_sin[positions].to(x.dtype)  # [(B,) T, D]
        rope = (cos, sin) if positions.dim() == 1 else (cos[:, None], sin[:, None])
        for layer in self.layers:
            x = layer(x, positions, rope, cache, mask, compiled)
        return self.norm(x)
