"""The eager runner: executes the model steps the streaming pipeline asks for.

`EagerRunner(cache="growing")` is the reference path: plain modules and concatenating caches, one host round trip
per token like the original Hugging Face code. `cache="static"` runs the same steps over preallocated caches; the
CUDA-graph runner builds on that. The pipeline decides what runs; a runner only knows how.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

from omnivox.engine.kv_cache import GrowingKVCache, StaticKVCache
from omnivox.engine.overlap import Pending, Ready
from omnivox.engine.sampling import sample_llm_token, sample_tts_codes
from omnivox.engine.session import Session, TTSState
from omnivox.engine.types import SamplingParams
from omnivox.models.loader import SpeechModel


def causal_mask(start: int, length: int, key_len: int, device: torch.device) -> torch.Tensor:
    """[1, 1, length, key_len] bool: the query at position start+i sees keys 0..start+i."""
    queries = torch.arange(start, start + length, device=device)[:, None]
    keys = torch.arange(key_len, device=device)[None, :]
    return (keys <= queries)[None, None]


def tts_audio_mask(
    query_pos: int,
    num_text_tokens: int,
    key_len: int,
    audio_end: int,
    device: torch.device,
    reserved_len: int = 300,
    text_chunk: int = 10,
    audio_chunk: int = 50,
) -> torch.Tensor:
    """[1, 1, 1, key_len] bool mask of an audio query (fact sheet 4.6).

    Text slots are visible up to 2 + 10 * ceil((p - 300) / 50) (the 50 is the official function's default, not the
    config's 25-token call size) and only up to the [Etts] slot of the current text; `[Ptts]` (slot 302) is never
    visible; audio keys 303 .. audio_end - 1 are.
    """
    chunks = math.ceil((query_pos - reserved_len) / audio_chunk)
    visible_text = min(text_chunk * chunks, reserved_len)
    text_end = min(2 + visible_text, num_text_tokens + 3)
    keys = torch.arange(key_len, device=device)
    first_audio_key = reserved_len + 3
    visible = (keys < text_end) | ((keys >= first_audio_key) & (keys < audio_end))
    return visible[None, None, None]


class EagerRunner:
    """Runs each step eagerly on the modules of a SpeechModel."""

    def __init__(self, model: SpeechModel, cache: str = "growing", llm_capacity: int = 4096, tts_capacity: int = 2560):
        if cache not in ("growing", "static"):
            raise ValueError(f"cache must be 'growing' or 'static', not {cache!r}")
        self.model = model
        self.cache_kind = cache
        self.llm_capacity = min(llm_capacity, model.config.llm.max_position_embeddings)
        self.tts_capacity = min(tts_capacity, model.config.tts.max_position_embeddings)
        self.device = model.device
        self.dtype = model.dtype
        tts_cfg = model.config.tts
        self.condition_slots = tts_cfg.condition_len - 1  # 302 slots live in the cache before any audio
        self.eos_code = tts_cfg.eos_code
        self.tts_temperature: torch.Tensor | None = None

    # ---- caches -------------------------------------------------------------------------------------------------
    def new_llm_cache(self) -> GrowingKVCache | StaticKVCache:
        c = self.model.config.llm
        if self.cache_kind == "static":
            return StaticKVCache(
                c.num_hidden_layers, c.num_key_value_heads, c.head_dim, self.llm_capacity, self.dtype, self.device
            )
        return GrowingKVCache(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, self.dtype, self.device)

    def new_tts_state(self) -> TTSState:
        c = self.model.config.tts
        if self.cache_kind == "static":
            cache = StaticKVCache(
                c.num_hidden_layers, c.num_attention_heads, c.head_dim, self.tts_capacity, self.dtype, self.device
            )
        else:
            cache = GrowingKVCache(
                c.num_hidden_layers, c.num_attention_heads, c.head_dim, self.dtype, self.device, self.condition_slots
            )
        return TTSState(cache=cache)

    def release_llm_cache(self, cache: GrowingKVCache | StaticKVCache) -> None:
        """Give a session's cache back (the eager runner lets Python free it; pooled runners reuse it)."""

    def release_tts_state(self, state: TTSState) -> None:
        """Give a TTS segment's cache back when the segment ends or its request is cancelled."""

    # ---- LLM ----------------------------------------------------------------------------------------------------
    def _llm_cache_view(self, cache, end: int) -> tuple[object, int]:
        """The LLM cache as attention reads it for a write ending at `end`, and the key width masks need."""
        return cache, cache.key_len(end)

    def _attention(self, eager: bool = False) -> contextlib.AbstractContextManager:
        """SDPA backend choice around a step (the eager runner lets PyTorch pick)."""
        return contextlib.nullcontext()

    @torch.inference_mode()
    def llm_forward(self, session: Session, ids: list[int]) -> torch.Tensor:
        """Runs `ids` at the session's next positions; returns post-norm hidden [T, C]."""
        start, n = session.length, len(ids)
        ids_t = torch.tensor([ids], dtype=torch.long, device=self.device)
        positions = torch.arange(start, start + n, device=self.device)
        session.cache.seek(start)
        cache, key_len = self._llm_cache_view(session.cache, start + n)
        mask = None if (n == 1 and self.cache_kind == "growing") else causal_mask(start, n, key_len, self.device)
        with self._attention(eager=n > 1):
            hidden = self.model.llm(ids_t, positions, cache, mask)
        session.length += n
        return hidden[0]

    @torch.inference_mode()
    def llm_step(
        self,
        session: Session,
        ids: list[int],
        window: list[int],
        sampling: SamplingParams,
        generator: torch.Generator | None,
        want_hidden: bool = False,
    ) -> tuple[int, torch.Tensor | None]:
        """One generate step: forward `ids`, sample the next token with the call's repetition window."""
        hidden = self.llm_forward(session, ids)
        logits = self.model.llm.compute_logits(hidden[-1])
        window_t = torch.tensor(window, dtype=torch.long, device=self.device)
        token = sample_llm_token(
            logits,
            window_t,
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            repetition_penalty=sampling.repetition_penalty,
            greedy=sampling.greedy,
            generator=generator,
        )
        return int(token), (hidden if want_hidden else None)

    # ---- TTS ----------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def project_speaker(self, llm_hidden: torch.Tensor) -> torch.Tensor:
        return self.model.tts.project_speaker(llm_hidden[None])[0]

    @torch.inference_mode()
    def tts_prefill_text(self, state: TTSState, ids: list[int], begin: int, speaker: torch.Tensor | None) -> None:
        """Writes text slots begin..begin+len(ids)-1; text attends only to earlier text (plain causal mask)."""
        tts = self.model.tts
        ids_t = torch.tensor([ids], dtype=torch.long, device=self.device)
        embeds = tts.embed_text(ids_t)
        if speaker is not None:
            is_speaker_slot = (ids_t == self.model.config.tts.spk_emb_token_id)[..., None]
            embeds = torch.where(is_speaker_slot, speaker.to(embeds.dtype), embeds)
        n = len(ids)
        state.cache.seek(begin)
        mask = causal_mask(begin, n, state.cache.key_len(begin + n), self.device)
        with self._attention(eager=True):
            tts(embeds, torch.arange(begin, begin + n, device=self.device), state.cache, mask)

    @torch.inference_mode()
    def tts_prefill_audio(self, state: TTSState, codes: torch.Tensor, num_text_tokens: int) -> None:
        """Segment restart: feed `[Ptts]` + codes[:-1] at 302.. with ONE mask row for the whole block (so the block
        is non-causal, as in the official `prefill_audio_ids`); `codes` become this segment's first audio tokens."""
        tts = self.model.tts
        bos = tts.embed_text(torch.tensor([[self.model.config.tts.audio_bos_token_id]], device=self.device))
        embeds = torch.cat([bos, tts.embed_codes(codes[None, :-1])], dim=1)
        n, start = embeds.shape[1], self.condition_slots
        state.cache.seek(start)
        key_len = state.cache.key_len(start + n)
        mask = tts_audio_mask(start, num_text_tokens, key_len, start + n, self.device)
        with self._attention(eager=True):
            tts(embeds, torch.arange(start, start + n, device=self.device), state.cache, mask)
        state.codes = list(codes.unbind(0))

    def _temperature(self, sampling: SamplingParams) -> torch.Tensor:
        t = torch.tensor(sampling.tts_temperature, dtype=torch.float32, device=self.device)[:, None]
        return t

    @torch.inference_mode()
    def tts_generate(
        self,
        state: TTSState,
        max_steps: int,
        num_text_tokens: int,
        sampling: SamplingParams,
        generator: torch.Generator | None,
        eos_after: int | None = None,
    ) -> int:
        """Up to `max_steps` audio tokens (one official `generate` call); returns how many new tokens were kept.

        EOS is banned for the first 10 steps of every call. `eos_after` forces the end of speech after that many
        new tokens (dummy weights): EOS is banned before it and forced at it.
        """
        tts = self.model.tts
        temperature = self._temperature(sampling)
        kept = 0
        for step in range(max_steps):
            pos = self.condition_slots + state.num_codes
            first_audio_step = state.num_codes == 0
            if first_audio_step:
                ids = torch.tensor([[self.model.config.tts.audio_bos_token_id]], device=self.device)
                embeds = tts.embed_text(ids)
            else:
                embeds = tts.embed_codes(state.codes[-1][None, None])
            state.cache.seek(pos)
            key_len = state.cache.key_len(pos + 1)
            mask = tts_audio_mask(pos, num_text_tokens, key_len, pos + 1, self.device)
            hidden = tts(embeds, torch.tensor([pos], device=self.device), state.cache, mask)
            logits = tts.compute_logits(hidden)[0, -1]  # [num_vq, num_codes]
            ban_eos = step < 10 or (eos_after is not None and step < eos_after)
            codes = sample_tts_codes(
                logits,
                temperature,
                top_p=sampling.tts_top_p,
                top_k=sampling.tts_top_k,
                first_audio_step=first_audio_step,
                ban_eos=ban_eos,
                eos_id=self.eos_code,
                greedy=sampling.greedy,
                generator=generator,
            )
            if eos_after is not None and step >= eos_after:
                codes[0] = self.eos_code
            if bool((codes == self.eos_code).any()):
                state.finished = True
                break
            state.codes.append(codes)
            kept += 1
        return kept

    def tts_launch(
        self,
        state: TTSState,
        max_steps: int,
        num_text_tokens: int,
        sampling: SamplingParams,
        generator: torch.Generator | None,
        eos_after: int | None = None,
    ) -> Pending[int]:
        """`tts_generate` as a result that may still be computing (overlap.py); here it is computed at once."""
        return Ready(lambda: self.tts_generate(state, max_steps, num_text_tokens, sampling, generator, eos_after))

    # ---- audio --------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def decode_audio(self, codes: torch.Tensor) -> np.ndarray:
        """codes [T, num_vq] -> float32 PCM [T * 512] on the host (DVAE in model dtype, Vocos in float32)."""
        mel = self.model.dvae.decode(codes[None])
        pcm = self.model.vocos.decode(mel.float())
        return pcm[0].cpu().numpy()

    def decode_audio_launch(self, codes: torch.Tensor) -> Pending[np.ndarray]:
        """`decode_audio` as a result that may still be computing; here it is computed at once."""
        return Ready(lambda: self.decode_audio(codes))
