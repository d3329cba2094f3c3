"""The attention masks, each one tensor function used by every path (batched or not, graphed or eager).

Masks are bool, True = may attend, shaped [B, 1, T, key_len] with one row of per-row positions per batch row, so a
batch mixes requests at different positions. They are built on the device from position tensors, so a captured
step rebuilds them on replay without the host.
"""

from __future__ import annotations

import torch

TTS_RESERVED_TEXT = 300  # text slots of a TTS segment (fact sheet 4.6)
TTS_MASK_TEXT_CHUNK = 10
TTS_MASK_AUDIO_CHUNK = 50  # the official mask function's default, not the 25-token call size
FIRST_AUDIO_SLOT = TTS_RESERVED_TEXT + 3  # [Stts] + 300 text slots + [Etts]... audio keys start at 303


def causal_mask(positions: torch.Tensor, key_len: int) -> torch.Tensor:
    """positions: long [B, T] -> [B, 1, T, key_len]: the query at position p sees keys 0..p."""
    keys = torch.arange(key_len, device=positions.device)
    return (keys <= positions[..., None])[:, None]


def tts_audio_mask(
    query_pos: torch.Tensor, num_text_tokens: torch.Tensor, audio_end: torch.Tensor, key_len: int
) -> torch.Tensor:
    """The mask of an audio query of the TTS (fact sheet 4.6): long [B] each -> [B, 1, 1, key_len].

    Text slots are visible up to 2 + 10 * ceil((p - 300) / 50), and only up to the [Etts] slot of the current text
    (num_text_tokens + 3); `[Ptts]` (slot 302) is never visible; audio keys 303 .. audio_end - 1 are.
    """
    chunks = torch.div(query_pos - TTS_RESERVED_TEXT + TTS_MASK_AUDIO_CHUNK - 1, TTS_MASK_AUDIO_CHUNK,
                       rounding_mode="floor")
    visible_text = (TTS_MASK_TEXT_CHUNK * chunks).clamp(max=TTS_RESERVED_TEXT)
    text_end = torch.minimum(2 + visible_text, num_text_tokens + 3)
    keys = torch.arange(key_len, device=query_pos.device)
    visible = (keys < text_end[:, None]) | ((keys >= FIRST_AUDIO_SLOT) & (keys < audio_end[:, None]))
    return visible[:, None, None]
