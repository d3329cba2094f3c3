"""The official streaming algorithm (fact sheet section 4) as per-request state that asks for work.

Text -> LLM (3-token calls) -> text re-tokenised for the TTS -> text slots prefilled as they become available ->
25-token TTS calls -> DVAE + Vocos over each new window with 4 tokens of left context -> crossfade -> PCM pieces.
Long replies restart the TTS in a new segment at a sentence end.

A reply is two coroutines. `llm()` produces the reply's LLM chunks; `speech()` consumes them and produces audio.
Each yields work items (omnivox/engine/work.py) and is sent their results, yields its outputs (`LLMChunk`,
`Piece`), and never calls a model. The scheduler decides when each runs: the LLM may run ahead of the speech (it
reads nothing the speech makes), and the speech takes the chunks in order, so the outputs are those of the
sequential algorithm.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from omnivox.engine.crossfade import Framer
from omnivox.engine.session import Session
from omnivox.engine.text import (
    LLMTextDecoder,
    TTSPrompt,
    build_tts_prompt,
    detect_language,
    normalize_for_tts,
    sentence_end,
    split_for_tts,
)
from omnivox.engine.types import RequestMetrics, SamplingParams
from omnivox.engine.work import (
    NEXT_CHUNK,
    LLMDecode,
    NewSegment,
    ProjectSpeaker,
    TTSCall,
    TTSPrefillAudio,
    TTSPrefillText,
    Vocode,
)

LLM_TOKENS_PER_CALL = 3
TTS_TOKENS_PER_CALL = 25
TTS_EOS_BAN_STEPS = 10  # EOS is banned for the first 10 steps of every call
DECODE_LEFT_CONTEXT = 4
SEGMENT_SHIFT = 180  # a new segment may start once the text reaches 300 - 180 = 120 BERT tokens
SEGMENT_MAX_AUDIO_TOKENS = 2048
RESTART_TEXT_TOKENS = 5
RESTART_AUDIO_TOKENS = 50
READ_ALOUD_PART_TOKENS = 200
TTS_EOS = "<|tts_eos|>"
ASSISTANT_HEADER = "<|im_end|>\n<|im_start|>assistant\n<|spk_bos|><|spk|><|spk_eos|><|tts_bos|>"

Coroutine = Generator[object, object, None]


@dataclass
class LLMChunk:
    text: str
    speaker_hidden: torch.Tensor | None = None  # post-norm hidden at <|spk|>, first chunk only
    num_tokens: int = 0  # tokens this chunk generated
    session_length: int = 0  # the session's LLM positions once it was produced (where a rewind goes back to)
    ended: bool = False  # ends with a terminator
    hit_length_limit: bool = False


@dataclass
class Piece:
    """PCM ready for the caller and the raw reply text first covered by it."""

    pcm: np.ndarray
    text: str
    final: bool = False


@dataclass
class Restart:
    text_ids: list[int]  # last 5 BERT text tokens of the finished segment
    codes: np.ndarray  # its last 50 audio tokens [50, num_vq]
    text_left: str  # text after the cut


@dataclass
class Forcing:
    """Random-weight runs: the reply tokens are teacher-forced and the end of speech is forced."""

    reply_ids: list[int]
    audio_tokens: int
    text_tokens: int = 0  # BERT tokens of the reply: a segment cut early gets its share of the audio tokens


@dataclass
class Segment:
    """The audio tokens of the live TTS segment (its cache lives in the TTS executor's slot)."""

    codes: list[Sequence[int]]  # one [num_vq] per audio token
    num_decoded: int = 0  # tokens already turned into audio (the next window re-decodes 4 of them as context)
    finished: bool = False

    @property
    def num_codes(self) -> int:
        return len(self.codes)

    def window(self, start: int) -> np.ndarray:
        return np.array(self.codes[start:], dtype=np.int64)


class Reply:
    """One spoken reply: the LLM side (`llm`) and the speech side (`speech` or `read_aloud`)."""

    def __init__(
        self,
        model,
        session: Session | None,
        sampling: SamplingParams,
        metrics: RequestMetrics,
        forcing: Forcing | None = None,
        early_first_chunk: bool = True,
    ):
        self.session = session
        self.sampling = sampling
        self.metrics = metrics
        self.forcing = forcing
        self.early = early_first_chunk
        self.tokenizer = model.tokenizer
        self.tts_tokenizer = model.tts_tokenizer
        tts_cfg = model.config.tts
        self.text_chunk = tts_cfg.streaming_text_chunk_size
        self.reserved = tts_cfg.streaming_text_reserved_len
        self.condition_slots = tts_cfg.condition_len - 1  # 302 slots live in the cache before any audio
        special = self.tokenizer.special
        self.terminators = (special.im_end, special.endoftext)
        self.audio_tokens_total = 0  # new audio tokens over all segments (forced-EOS accounting)
        self.segment_new_tokens = 0
        self.segment_budget: int | None = None  # forced audio tokens of a segment that ends at a cut
        self.last_restart: Restart | None = None
        self.consumed_length: int | None = None  # session length after the last chunk the speech consumed
        self._reply_text: list[str] = []
        self.final_sent = False
        self.codes_drawn: list[Sequence[int]] = []  # every audio token the TTS drew for this reply (paths are compared)

    # ---- LLM: chunks of 3 tokens ----------------------------------------------------------------------------------
    def llm(self) -> Coroutine:
        """Yields LLMDecode work and LLMChunk outputs until a terminator or the token limit."""
        special = self.tokenizer.special
        header = self.tokenizer.encode(ASSISTANT_HEADER)
        forced = None
        if self.forcing is not None:
            forced = self.forcing.reply_ids + [special.tts_eos, special.im_end]
        decoder = LLMTextDecoder(self.tokenizer, bos_id=special.endoftext, terminator_ids=self.terminators)
        limit = self.sampling.max_new_tokens
        inputs, first, new_tokens = header, True, 0
        while True:
            speaker_hidden = None
            window, chunk = list(inputs), []
            for step in range(min(LLM_TOKENS_PER_CALL, limit - new_tokens)):
                feed = inputs if step == 0 else chunk[-1:]
                want = header.index(special.spk) if first and step == 0 else None
                token, hidden = yield LLMDecode(feed, list(window), want)
                if hidden is not None:
                    speaker_hidden = hidden
                if forced is not None:
                    token = forced[min(new_tokens, len(forced) - 1)]
                chunk.append(token)
                window.append(token)
                new_tokens += 1
                if token in self.terminators:
                    break
            ended = bool(chunk) and chunk[-1] in self.terminators
            limited = not ended and new_tokens >= limit
            yield LLMChunk(decoder.push(chunk), speaker_hidden, len(chunk), self.session.length, ended, limited)
            first, inputs = False, chunk[-1:]
            if ended or limited:
                return

    def _next_chunk(self) -> Generator[object, object, LLMChunk | None]:
        """The next LLM chunk, accounted for when the speech takes it (it may have been produced earlier): the
        reply text, the token count, how the reply ended, and where a rewind goes back to."""
        chunk = yield NEXT_CHUNK
        if chunk is not None:
            self._reply_text.append(chunk.text)
            self.metrics.reply_text = "".join(self._reply_text).split(TTS_EOS)[0]
            self.metrics.llm_tokens += chunk.num_tokens
            if chunk.hit_length_limit:
                self.metrics.finish_reason = "length"
            if self.session is not None:  # None: read-aloud fed from outside (text_feed.py)
                self.session.last_reply_terminated = chunk.ended
            self.consumed_length = chunk.session_length
        return chunk

    # ---- TTS ------------------------------------------------------------------------------------------------------
    def _eos_after(self) -> int | None:
        if self.forcing is None:
            return None
        remaining = self.forcing.audio_tokens - self.audio_tokens_total
        if self.segment_budget is not None:
            remaining = min(remaining, self.segment_budget - self.segment_new_tokens)
        return max(remaining, 0)

    def _tts_call(self, seg: Segment, num_text_tokens: int) -> Coroutine:
        """Up to 25 audio tokens (one official `generate` call); EOS is banned for its first 10 steps, and forced
        where a random-weight run's audio length ends (the call then has no steps after it)."""
        eos_after = self._eos_after()
        steps = TTS_TOKENS_PER_CALL if eos_after is None else min(TTS_TOKENS_PER_CALL, eos_after + 1)
        ban = tuple(s < TTS_EOS_BAN_STEPS or (eos_after is not None and s < eos_after) for s in range(steps))
        force = tuple(eos_after is not None and s >= eos_after for s in range(steps))
        prev = seg.codes[-1] if seg.codes else None
        result = yield TTSCall(self.condition_slots + seg.num_codes, prev, num_text_tokens, ban, force)
        seg.codes.extend(result.codes)
        self.codes_drawn.extend(result.codes)
        seg.finished = result.eos
        kept = len(result.codes)
        self.audio_tokens_total += kept
        self.segment_new_tokens += kept
        self.metrics.tts_steps += kept + int(seg.finished)
        self.metrics.tts_calls += 1

    def _decode(self, seg: Segment, framer: Framer) -> Generator[object, object, np.ndarray | None]:
        """DVAE + Vocos over the new tokens plus 4 of left context; the PCM that may be released now."""
        if seg.num_codes == seg.num_decoded:
            return None
        window = seg.window(max(seg.num_decoded - DECODE_LEFT_CONTEXT, 0))
        seg.num_decoded = seg.num_codes
        pcm = yield Vocode(window)
        return framer.push(pcm)

    def _call_and_decode(self, seg: Segment, num_text_tokens: int, framer: Framer):
        yield from self._tts_call(seg, num_text_tokens)
        return (yield from self._decode(seg, framer))

    def _prefill(self, prompt: TTSPrompt, begin: int, end: int, speaker: torch.Tensor | None):
        yield TTSPrefillText(prompt.ids[begin:end], begin, speaker)
        return prompt.ids

    # ---- the reply ------------------------------------------------------------------------------------------------
    def _piece(self, pcm: np.ndarray, text: str, final: bool = False) -> Piece:
        self.final_sent = self.final_sent or final
        return Piece(pcm, text, final)

    def speech(self, speaker: torch.Tensor | None = None) -> Coroutine:
        """Yields work and Pieces for the whole reply, segment after segment. `speaker`: a projected speaker vector
        to use instead of the first chunk's (read-aloud of text fed from outside, text_feed.py)."""
        self.final_sent = False
        first = yield from self._next_chunk()
        if first is None:  # a feed that ended without text
            yield self._piece(np.zeros(0, dtype=np.float32), "", final=True)
            return
        if speaker is None:
            speaker = yield ProjectSpeaker(first.speaker_hidden)
        gen_text, restart = first.text.split(TTS_EOS)[0], None
        while True:
            self.last_restart = None
            self.segment_new_tokens, self.segment_budget = 0, None
            yield NewSegment()
            yield from self._segment(Segment([]), gen_text, speaker, restart)
            restart = self.last_restart
            if restart is None:
                break
            gen_text = ""
        if not self.final_sent:
            yield self._piece(np.zeros(0, dtype=np.float32), "", final=True)

    def _segment(self, seg: Segment, gen_text: str, speaker: torch.Tensor, restart: Restart | None) -> Coroutine:
        """One TTS segment (official `_generate_mel_spec_audio_streaming`). Leaves in `self.last_restart` how the
        next segment must start (None: the reply is over)."""
        framer = Framer(early=self.early)
        m, prev_text_len = 0, 0
        prompt, mask_len, tts_ids = None, 0, []
        if restart is not None:
            start_ids = [self.tts_tokenizer.special.stts, self.tts_tokenizer.special.spk_emb]
            yield TTSPrefillText(start_ids + restart.text_ids, 0, speaker)
            yield TTSPrefillAudio(restart.codes, len(restart.text_ids))
            seg.codes = list(restart.codes)
            mask_len = len(restart.text_ids)
            gen_text = self.tts_tokenizer.decode(restart.text_ids) + restart.text_left
            prev_text_len, seg.num_decoded = len(gen_text), seg.num_codes
        else:
            prompt = build_tts_prompt(gen_text, self.tts_tokenizer, self.reserved)
        gen_text_raw = gen_text
        language = None
        finished = cut = False
        text_left = ""
        t = 0
        while True:
            chunk = yield from self._next_chunk()
            if chunk is None:
                break
            t += 1
            txt = chunk.text.split(TTS_EOS)[0]
            gen_text_raw += txt
            if t == 1 and txt == "" and restart is not None:
                return
            if t <= 2:
                language = detect_language(gen_text_raw)
            gen_text += normalize_for_tts(txt, language)
            prompt = build_tts_prompt(gen_text, self.tts_tokenizer, self.reserved)
            num_text = prompt.num_text_tokens
            if num_text >= self.reserved - SEGMENT_SHIFT:
                mark = sentence_end(txt)
                if mark:
                    cut_at = gen_text.rfind(mark)
                    text_left, gen_text = gen_text[cut_at + 1 :], gen_text[: cut_at + 1]
                    prompt = build_tts_prompt(gen_text, self.tts_tokenizer, self.reserved)
                    cut = True
                    if self.forcing is not None and self.forcing.text_tokens:
                        share = prompt.num_text_tokens / self.forcing.text_tokens
                        self.segment_budget = round(self.forcing.audio_tokens * share)
                    break
            if num_text >= self.text_chunk * (m + 1):
                begin = 0 if m == 0 else self.text_chunk * m + 2
                end = min(self.text_chunk * (m + 1) + 2, self.reserved + 2)
                tts_ids = yield from self._prefill(prompt, begin, end, speaker if m == 0 else None)
                mask_len = num_text
                pcm = yield from self._call_and_decode(seg, mask_len, framer)
                m += 1
                if pcm is not None:
                    yield self._piece(pcm, gen_text_raw[prev_text_len:])
                    prev_text_len = len(gen_text_raw)
                if seg.finished:
                    finished = True
                    break
        stop = False
        end = 0
        if not finished and prompt is not None:
            num_text = prompt.num_text_tokens
            begin = 0 if m == 0 else self.text_chunk * m + 2
            end = num_text + 3
            if end > begin:
                tts_ids = yield from self._prefill(prompt, begin, end, speaker if m == 0 else None)
                mask_len = num_text
            while True:
                pcm = yield from self._call_and_decode(seg, mask_len, framer)
                if pcm is not None:
                    yield self._piece(pcm, gen_text_raw[prev_text_len:])
                    prev_text_len = len(gen_text_raw)
                if seg.finished or seg.num_codes > SEGMENT_MAX_AUDIO_TOKENS:
                    break
            stop = not seg.finished and seg.num_codes > SEGMENT_MAX_AUDIO_TOKENS
        restart_next = cut and not stop
        tail = framer.flush()
        if tail is not None:
            yield self._piece(tail, gen_text_raw[prev_text_len:], final=not restart_next)
        if restart_next:
            self.last_restart = Restart(
                text_ids=tts_ids[end - 1 - RESTART_TEXT_TOKENS : end - 1],
                codes=seg.window(max(seg.num_codes - RESTART_AUDIO_TOKENS, 0)),
                text_left=text_left,
            )

    def read_aloud(self, text: str, speaker: torch.Tensor) -> Coroutine:
        """TTS only: the given text, spoken with `speaker`, in parts of at most 200 BERT tokens (each part is one
        segment: all its text prefilled at once, then 25-token calls until EOS, as the official flush loop)."""
        language = detect_language(text)
        parts = split_for_tts(normalize_for_tts(text, language), self.tts_tokenizer, READ_ALOUD_PART_TOKENS)
        total_tokens = sum(len(self.tts_tokenizer.encode(p)) for p in parts)
        forced_total = self.forcing.audio_tokens if self.forcing is not None else 0
        for index, part in enumerate(parts):
            last_part = index == len(parts) - 1
            if self.forcing is not None:
                share = len(self.tts_tokenizer.encode(part)) / total_tokens
                self.forcing, self.audio_tokens_total = Forcing([], max(round(forced_total * share), 1)), 0
            yield NewSegment()
            seg, framer, pending_text = Segment([]), Framer(early=self.early), part
            prompt = build_tts_prompt(part, self.tts_tokenizer, self.reserved)
            yield from self._prefill(prompt, 0, prompt.num_text_tokens + 3, speaker)
            while True:
                pcm = yield from self._call_and_decode(seg, prompt.num_text_tokens, framer)
                if pcm is not None:
                    yield Piece(pcm, pending_text)
                    pending_text = ""
                if seg.finished or seg.num_codes > SEGMENT_MAX_AUDIO_TOKENS:
                    break
            tail = framer.flush()
            if tail is not None or last_part:
                yield Piece(tail if tail is not None else np.zeros(0, np.float32), pending_text, final=last_part)
        self.metrics.reply_text = text
