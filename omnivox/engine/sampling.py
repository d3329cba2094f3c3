"""Token sampling for a batch of rows, each with its own parameters and its own random numbers.

Every parameter is a per-row tensor, so one captured step serves rows with different settings. Random numbers are
counter-based: a row's uniform for candidate `i` is a hash of (its seed, its step counter, i), so a request draws
the same numbers whatever else shares its batch, and a graph replays without generator state. A draw is the
exponential race `argmax(p / E)` (what `torch.multinomial` does for one sample), with E = -log(u) from the hash.

The order of operations follows the official run (fact sheet 4.7 and 4.14):
* LLM: repetition penalty over the call's window -> temperature -> top-k -> top-p (min_keep 1) -> draw.
  `greedy` rows take the argmax of the raw logits.
* TTS: per-codebook temperature -> (not on a segment's first audio step) top-p then top-k, both min_keep 3 ->
  EOS banned (the first 10 steps of every call, and before a forced end) -> draw; a forced end writes EOS.
Nothing here reads a tensor back to the host. `compiled` gives either sampler as a few fused kernels (eager, the
TTS sampler is about fifty small kernels a step, the LLM's about forty).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

LLM_TOP_K_MAX = 256  # candidates the LLM sampler keeps before top-p (top_k 0 means this many)
TTS_MIN_KEEP = 3
_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32) on int64 tensors holding values < 2**32."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def counter_uniform(seeds: torch.Tensor, counters: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """seeds, counters: long [B]; index: long [B, ...] -> float32 uniforms in (0, 1), same shape as `index`."""
    extra = index.dim() - 1
    seed = _mix32(_mix32(seeds >> 32) ^ seeds)
    key = _mix32(seed + _mix32(counters)).view(-1, *([1] * extra))
    bits = _mix32(key + _mix32(index)) >> 8  # 24 random bits
    return (bits.float() + 0.5) / float(1 << 24)


def _race(probs: torch.Tensor, seeds: torch.Tensor, counters: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """One draw per row over the last dim of `probs`, keyed by `index` (the candidates' ids)."""
    noise = -torch.log(counter_uniform(seeds, counters, index))
    return (probs / noise).argmax(dim=-1)


def apply_repetition_penalty(logits: torch.Tensor, window: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """Hugging Face's rule per row: logits of ids in the row's window are divided by the penalty when positive,
    multiplied when negative. window: long [B, W] (pad by repeating an id); penalty: [B] (1.0 leaves it as is)."""
    seen = torch.gather(logits, -1, window)
    pen = penalty[:, None]
    return logits.scatter(-1, window, torch.where(seen < 0, seen * pen, seen / pen))


def sample_llm(
    logits: torch.Tensor,
    window: torch.Tensor,
    *,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    repetition_penalty: torch.Tensor,
    greedy: torch.Tensor,
    seeds: torch.Tensor,
    counters: torch.Tensor,
) -> torch.Tensor:
    """logits [B, V] float32, window [B, W] long, per-row params [B] -> tokens long [B]."""
    logits = logits.float()
    argmax = logits.argmax(dim=-1)
    scaled = apply_repetition_penalty(logits, window, repetition_penalty) / temperature[:, None]
    values, ids = torch.topk(scaled, min(LLM_TOP_K_MAX, scaled.shape[-1]), dim=-1)  # descending
    rank = torch.arange(values.shape[-1], device=values.device)
    values = values.masked_fill(rank >= top_k[:, None], -float("inf"))
    probs = values.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability of the candidates ranked above
    values = values.masked_fill(before >= top_p[:, None], -float("inf"))
    choice = _race(values.softmax(dim=-1), seeds, counters, ids)
    return torch.where(greedy, argmax, ids.gather(-1, choice[:, None])[:, 0])


def sample_tts(
    logits: torch.Tensor,
    *,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    first_audio_step: torch.Tensor,
    ban_eos: torch.Tensor,
    force_eos: torch.Tensor,
    greedy: torch.Tensor,
    eos_id: int,
    seeds: torch.Tensor,
    counters: torch.Tensor,
) -> torch.Tensor:
    """logits [B, Q, C] float32, temperature [B, Q], other params [B] -> codes long [B, Q]."""
    batch, num_vq, num_codes = logits.shape
    logits = logits.float() / temperature[..., None]
    values, ids = torch.sort(logits, dim=-1, descending=True)
    probs = values.softmax(dim=-1)
    rank = torch.arange(num_codes, device=logits.device)
    keep = ((probs.cumsum(dim=-1) - probs) < top_p[:, None, None]) | (rank < TTS_MIN_KEEP)
    keep &= rank < top_k.clamp(min=TTS_MIN_KEEP)[:, None, None]
    keep |= (first_audio_step | greedy)[:, None, None]
    kept = torch.zeros_like(keep).scatter(-1, ids, keep)
    logits = logits.masked_fill(~kept, -float("inf"))
    eos = logits[..., eos_id]
    logits[..., eos_id] = torch.where(ban_eos[:, None], -float("inf"), eos)
    index = torch.arange(num_vq * num_codes, device=logits.device).view(1, num_vq, num_codes).expand(batch, -1, -1)
    codes = torch.where(greedy[:, None], logits.argmax(dim=-1), _race(logits.softmax(dim=-1), seeds, counters, index))
    codes[:, 0] = torch.where(force_eos, eos_id, codes[:, 0])
    return codes


@functools.cache
def compiled(sampler: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """`sample_llm` or `sample_tts` through torch.compile (made on first use; dynamic shapes: one compile for every
    batch size)."""
    return torch.compile(sampler, dynamic=True, fullgraph=True)
