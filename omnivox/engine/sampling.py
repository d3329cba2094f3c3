"""Token sampling for the LLM and the TTS codebooks, as tensor-only functions.

The order of operations follows the official run (fact sheet 4.7 and 4.14):
* LLM (Hugging Face generate): repetition penalty over the call's window -> temperature -> top-k -> top-p
  (min_keep 1) -> softmax -> one multinomial draw. Top-k and top-p run as one filter over the k largest logits
  (`top_k_top_p_filter`), which masks the same tokens without sorting the whole vocabulary.
* TTS: per-codebook temperature -> (not on the very first audio step) top-p then top-k, both min_keep 3 ->
  EOS banned for the first 10 steps of every call -> softmax -> one multinomial draw per codebook.
Nothing here reads a tensor back to the host, so the fast path can capture it in a CUDA graph.
"""

from __future__ import annotations

import torch


def apply_repetition_penalty(logits: torch.Tensor, window_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """Hugging Face's rule: logits of seen ids are divided by the penalty when positive, multiplied when negative."""
    seen = torch.gather(logits, -1, window_ids)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits.scatter(-1, window_ids, seen)


def top_k_filter(logits: torch.Tensor, k: int, min_keep: int = 1) -> torch.Tensor:
    k = min(max(k, min_keep), logits.shape[-1])
    kth_value = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth_value, -float("inf"))


def top_p_filter(logits: torch.Tensor, p: float, min_keep: int = 1) -> torch.Tensor:
    """Drop the low tail whose total probability is at most 1 - p (always keeping `min_keep` tokens)."""
    sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - p)
    remove_sorted[..., -min_keep:] = False
    remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
    return logits.masked_fill(remove, -float("inf"))


def top_k_top_p_filter(logits: torch.Tensor, k: int, p: float, min_keep: int = 1) -> torch.Tensor:
    """`top_p_filter(top_k_filter(logits, k, min_keep), p, min_keep)` without sorting the whole vocabulary.

    Why: after the top-k filter at most k logits (plus ties with the k-th) are finite, so the top-p cutoff only
    depends on the k largest values. `top_p_filter` sorts all V logits (151,700 for the LLM, about 0.25 ms of a
    decode step on an H100); this takes `torch.topk` once, finds the top-p cutoff among those k values (ascending,
    softmax over them, cumsum, drop where the cumulative probability is <= 1 - p, always keep the `min_keep`
    largest) and masks every logit below the smallest kept value. The result is a mask by value: logits tied
    with the cutoff are all kept (as are ties with the k-th value, as in `top_k_filter`), where `top_p_filter`
    would keep or drop tied entries by their sort position. On logits without ties at the k-th value or the
    cutoff, the -inf mask is the same as the two filters' (up to float rounding in the softmax sum, which is
    taken over k values rather than V), so the softmax and `draw` after it pick the same token.
    No host synchronisation (no `.item()`, no branching on values): safe to capture in a CUDA graph.
    Works on [..., V] (one row or a batch of rows); k is clamped to [min_keep, V] like `top_k_filter`.
    """
    k = min(max(k, min_keep), logits.shape[-1])
    top = torch.topk(logits, k, dim=-1).values.flip(-1)  # [..., k], ascending
    cumulative = top.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - p)
    remove[..., -min_keep:] = False
    cutoff = top.masked_fill(remove, float("inf")).amin(dim=-1, keepdim=True)
    return logits.masked_fill(logits < cutoff, -float("inf"))


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One multinomial draw per row: [R, V] -> [R].

    This is what `torch.multinomial(probs, 1, generator=g)` computes (its one-sample path: exponential noise from
    `g` on a tensor shaped like `probs`, probs / noise, argmax), so it draws the same ids from the same generator
    state, but without multinomial's host-side validity checks, which synchronise and cannot be captured.
    """
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / noise).argmax(dim=-1)


def sample_llm_token(
    logits: torch.Tensor,
    window_ids: torch.Tensor,
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    repetition_penalty: float,
    greedy: bool,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """logits [V] float32, window_ids [K] long (ids of the current 3-token call) -> token [1]."""
    logits = logits.float().unsqueeze(0)
    if greedy:
        return logits.argmax(dim=-1)
    if repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, window_ids.unsqueeze(0), repetition_penalty)
    logits = logits / temperature
    logits = top_k_top_p_filter(logits, top_k, top_p)
    return draw(logits.softmax(dim=-1), generator)


def sample_tts_codes(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    *,
    top_p: float,
    top_k: int,
    first_audio_step: bool,
    ban_eos: bool | torch.Tensor,
    eos_id: int,
    greedy: bool,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """logits [num_vq, num_codes] float32, temperature [num_vq, 1] -> codes [num_vq].

    `ban_eos` may be a bool tensor [1] (the fast path decides on the device whether this step bans EOS).
    """
    logits = logits.float() / temperature
    if not first_audio_step and not greedy:
        logits = top_p_filter(logits, top_p, min_keep=3)
        logits = top_k_filter(logits, top_k, min_keep=3)
    if isinstance(ban_eos, torch.Tensor):
        logits[:, eos_id] = torch.where(ban_eos, -float("inf"), logits[:, eos_id])
    elif ban_eos:
        logits[:, eos_id] = -float("inf")
    if greedy:
        return logits.argmax(dim=-1)
    return draw(logits.softmax(dim=-1), generator)
