"""The official streaming algorithm (fact sheet section 4), as one generator over a runner.

Text → LLM (3-token calls) → text re-tokenised for the TTS → text slots prefilled as they become available →
25-token TTS calls → DVAE + Vocos over each new window with 4 tokens of left context → crossfade → PCM pieces.
Long replies restart the TTS in a new segment at a sentence end. Everything here is host-side control flow; the
runner executes the steps, so the reference and fast paths share this file.

Overlap (overlap.py): TTS calls and vocoder windows are launched and their results taken later. While a TTS call
computes, the LLM produces the next chunks (up to `lookahead` ahead); in the loop of calls that ends a segment,
each window's DVAE + Vocos runs while the next TTS call computes. The order in which results are consumed is the
sequential algorithm's, so the outputs are too.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from omnivox.engine.crossfade import Framer
from omnivox.engine.overlap import Lookahead, Pending
from omnivox.engine.profiler import StageTimer
from omnivox.engine.session import Session, TTSState
from omnivox.engine.text import (
    LLMTextDecoder,
    build_tts_prompt,
    detect_language,
    normalize_for_tts,
    sentence_end,
    split_for_tts,
)
from omnivox.engine.types import SamplingParams

LLM_TOKENS_PER_CALL = 3
TTS_TOKENS_PER_CALL = 25
DECODE_LEFT_CONTEXT = 4
SEGMENT_SHIFT = 180  # a new segment may start once the text reaches 300 - 180 = 120 BERT tokens
SEGMENT_MAX_AUDIO_TOKENS = 2048
RESTART_TEXT_TOKENS = 5
RESTART_AUDIO_TOKENS = 50
READ_ALOUD_PART_TOKENS = 200
TTS_EOS = "<|tts_eos|>"
ASSISTANT_HEADER = "<|im_end|>\n<|im_start|>assistant\n<|spk_bos|><|spk|><|spk_eos|><|tts_bos|>"


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
    codes: torch.Tensor  # its last 50 audio tokens [50, num_vq]
    text_left: str  # text after the cut


@dataclass
class Forcing:
    """Dummy-weight runs: the reply tokens are teacher-forced and the end of speech is forced."""

    reply_ids: list[int]
    audio_tokens: int
    text_tokens: int = 0  # BERT tokens of the reply: a segment cut early gets its share of the audio tokens


class ReplyGenerator:
    """Generates one spoken reply for a session whose prompt is already prefilled."""

    def __init__(
        self,
        runner,
        session: Session | None,
        sampling: SamplingParams,
        generators: tuple[torch.Generator, torch.Generator] | None,
        timer: StageTimer,
        forcing: Forcing | None = None,
        early_first_chunk: bool = True,
        lookahead: int = 0,
    ):
        """`lookahead`: LLM chunks that may be produced ahead of the TTS while a TTS call computes (0: none)."""
        model = runner.model
        self.runner = runner
        self.session = session
        self.sampling = sampling
        # separate random streams for the LLM and the TTS, so running the LLM ahead of the TTS (the fast path's
        # overlap) draws exactly the same numbers as the sequential algorithm
        self.llm_generator, self.tts_generator = generators or (None, None)
        self.timer = timer
        self.forcing = forcing
        self.early = early_first_chunk
        self.tokenizer = model.tokenizer
        self.tts_tokenizer = model.tts_tokenizer
        tts_cfg = model.config.tts
        self.text_chunk = tts_cfg.streaming_text_chunk_size
        self.reserved = tts_cfg.streaming_text_reserved_len
        special = self.tokenizer.special
        self.terminators = (special.im_end, special.endoftext)
        self.audio_tokens_total = 0  # new audio tokens over all segments (forced-EOS accounting)
        self.segment_new_tokens = 0
        self.segment_budget: int | None = None  # forced audio tokens of a segment that ends at a cut
        self.cancelled = False
        self.last_restart: Restart | None = None
        self.tts_state = None  # the live TTS segment (for cache accounting)
        self.lookahead = lookahead
        self.llm: Lookahead[LLMChunk] | None = None  # the reply's LLM chunks, once started
        self.consumed_length: int | None = None  # session length after the last chunk the pipeline consumed
        self.audio_released = False  # the first PCM has been handed out (lookahead waits for it)

    def cache_bytes(self) -> int:
        """Bytes of KV cache this request holds now (its session's LLM cache and its TTS segment's cache)."""
        llm = self.session.cache_bytes if self.session is not None else 0
        return llm + (self.tts_state.cache.nbytes if self.tts_state is not None else 0)

    # ---- LLM: chunks of 3 tokens ----------------------------------------------------------------------------------
    def llm_chunks(self) -> Iterator[LLMChunk]:
        special = self.tokenizer.special
        header = self.tokenizer.encode(ASSISTANT_HEADER)
        speaker_pos = header.index(special.spk)
        forced = None
        if self.forcing is not None:
            forced = self.forcing.reply_ids + [special.tts_eos, special.im_end]
        decoder = LLMTextDecoder(self.tokenizer, bos_id=special.endoftext, terminator_ids=self.terminators)
        inputs, first, new_tokens = header, True, 0
        while True:
            speaker_hidden = None
            with self.timer.stage("llm"):
                window, chunk = list(inputs), []
                for step in range(LLM_TOKENS_PER_CALL):
                    feed = inputs if step == 0 else chunk[-1:]
                    token, hidden = self.runner.llm_step(
                        self.session, feed, window, self.sampling, self.llm_generator, want_hidden=first and step == 0
                    )
                    if hidden is not None:
                        speaker_hidden = hidden[speaker_pos]
                    if forced is not None:
                        token = forced[min(new_tokens, len(forced) - 1)]
                    chunk.append(token)
                    window.append(token)
                    new_tokens += 1
                    if token in self.terminators:
                        break
                text = decoder.push(chunk)
            ended = chunk[-1] in self.terminators
            limited = not ended and new_tokens >= self.sampling.max_new_tokens
            yield LLMChunk(text, speaker_hidden, len(chunk), self.session.length, ended, limited)
            first, inputs = False, chunk[-1:]
            if ended or limited:
                return

    # ---- TTS ------------------------------------------------------------------------------------------------------
    def _eos_after(self) -> int | None:
        if self.forcing is None:
            return None
        remaining = self.forcing.audio_tokens - self.audio_tokens_total
        if self.segment_budget is not None:
            remaining = min(remaining, self.segment_budget - self.segment_new_tokens)
        return max(remaining, 0)

    def _tts_launch(self, state: TTSState, num_text_tokens: int) -> Pending[int]:
        return self.runner.tts_launch(
            state, TTS_TOKENS_PER_CALL, num_text_tokens, self.sampling, self.tts_generator, self._eos_after()
        )

    def _tts_wait(self, pending: Pending[int], state: TTSState) -> None:
        """The LLM runs ahead while the call computes (once the first audio is out: before that, LLM work on the
        GPU would only slow the call that first audio waits for); then the call's result is taken."""
        if self.llm is not None and self.lookahead and self.audio_released:
            with self.timer.overlapped():
                self.llm.fill_while(pending.running)
        kept = pending.wait()
        self.timer.add("tts", pending.seconds)
        self.audio_tokens_total += kept
        self.segment_new_tokens += kept
        self.timer.metrics.tts_steps += kept + int(state.finished)
        self.timer.metrics.tts_calls += 1

    def _audio_launch(self, state: TTSState) -> Pending[np.ndarray] | None:
        """DVAE + Vocos over the new tokens plus 4 of left context (None when there are no new tokens)."""
        if state.num_codes == state.num_decoded:
            return None
        window = state.codes_tensor(max(state.num_decoded - DECODE_LEFT_CONTEXT, 0))
        state.num_decoded = state.num_codes
        return self.runner.decode_audio_launch(window)

    def _audio_wait(self, pending: Pending[np.ndarray] | None, framer: Framer) -> np.ndarray | None:
        """The PCM that may be released now (None when there was none or the framer holds it back)."""
        if pending is None:
            return None
        pcm = pending.wait()
        self.timer.add("audio", pending.seconds)
        released = framer.push(pcm)
        if released is not None and len(released):
            self.audio_released = True
        return released

    def _call_and_decode(self, state: TTSState, num_text_tokens: int, framer: Framer) -> np.ndarray | None:
        """One TTS call, then its audio."""
        self._tts_wait(self._tts_launch(state, num_text_tokens), state)
        return self._audio_wait(self._audio_launch(state), framer)

    def _calls_until_end(self, state: TTSState, num_text_tokens: int, framer: Framer) -> Iterator[np.ndarray | None]:
        """TTS calls on all the text there is, until EOS or the segment's audio limit; each call's audio is decoded
        while the next call computes. Yields each call's releasable PCM, in order."""
        audio = None
        while not self.cancelled:
            call = self._tts_launch(state, num_text_tokens)
            if audio is not None:
                yield self._audio_wait(audio, framer)
            self._tts_wait(call, state)
            audio = self._audio_launch(state)
            if state.finished or state.num_codes > SEGMENT_MAX_AUDIO_TOKENS:
                break
        if audio is not None:
            yield self._audio_wait(audio, framer)

    def _prefill(self, state, prompt_text: str, begin: int, end: int, speaker: torch.Tensor | None) -> list[int]:
        ids = self.tts_tokenizer.encode(prompt_text)
        with self.timer.stage("tts"):
            self.runner.tts_prefill_text(state, ids[begin:end], begin, speaker)
        return ids

    def segment(
        self, llm: Iterator[LLMChunk], gen_text: str, speaker: torch.Tensor, restart: Restart | None
    ) -> Iterator[Piece]:
        """One TTS segment (official `_generate_mel_spec_audio_streaming`). Yields Pieces; leaves in
        `self.last_restart` how the next segment must start (None: the reply is over)."""
        self.last_restart = None
        self.segment_new_tokens, self.segment_budget = 0, None
        with self.timer.stage("tts_init"):
            state = self.tts_state = self.runner.new_tts_state()
        try:
            yield from self._segment_body(state, llm, gen_text, speaker, restart)
        finally:
            self.runner.release_tts_state(state)
            self.tts_state = None

    def _segment_body(self, state, llm, gen_text, speaker, restart) -> Iterator[Piece]:
        framer = Framer(early=self.early)
        m, prev_text_len = 0, 0
        prompt, mask_len, tts_ids = None, 0, []
        if restart is not None:
            start_ids = self.tts_tokenizer.encode("[Stts][spk_emb]")
            with self.timer.stage("tts"):
                self.runner.tts_prefill_text(state, start_ids + restart.text_ids, 0, speaker)
                self.runner.tts_prefill_audio(state, restart.codes, len(restart.text_ids))
            mask_len = len(restart.text_ids)
            gen_text = self.tts_tokenizer.decode(restart.text_ids) + restart.text_left
            prev_text_len, state.num_decoded = len(gen_text), state.num_codes
        else:
            prompt = build_tts_prompt(gen_text, self.tts_tokenizer, self.reserved)
        gen_text_raw = gen_text
        language = None
        finished = cut = False
        text_left = ""
        for t, chunk in enumerate(llm, start=1):
            if self.cancelled:
                return None
            txt = chunk.text.split(TTS_EOS)[0]
            gen_text_raw += txt
            if t == 1 and txt == "" and restart is not None:
                return None
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
                tts_ids = self._prefill(state, prompt.text, begin, end, speaker if m == 0 else None)
                mask_len = num_text
                pcm = self._call_and_decode(state, mask_len, framer)
                m += 1
                if pcm is not None:
                    yield Piece(pcm, gen_text_raw[prev_text_len:])
                    prev_text_len = len(gen_text_raw)
                if state.finished:
                    finished = True
                    break
        stop = False
        end = 0
        if not finished and prompt is not None and not self.cancelled:
            num_text = prompt.num_text_tokens
            begin = 0 if m == 0 else self.text_chunk * m + 2
            end = num_text + 3
            if end > begin:
                tts_ids = self._prefill(state, prompt.text, begin, end, speaker if m == 0 else None)
                mask_len = num_text
            for pcm in self._calls_until_end(state, mask_len, framer):
                if pcm is not None:
                    yield Piece(pcm, gen_text_raw[prev_text_len:])
                    prev_text_len = len(gen_text_raw)
            stop = not state.finished and state.num_codes > SEGMENT_MAX_AUDIO_TOKENS
        restart_next = cut and not stop and not self.cancelled
        tail = framer.flush()
        if tail is not None:
            yield Piece(tail, gen_text_raw[prev_text_len:], final=not restart_next)
        if restart_next:
            self.last_restart = Restart(
                text_ids=tts_ids[end - 1 - RESTART_TEXT_TOKENS : end - 1],
                codes=state.codes_tensor(max(state.num_codes - RESTART_AUDIO_TOKENS, 0)),
                text_left=text_left,
            )

    def __iter__(self) -> Iterator[Piece]:
        self.llm = Lookahead(self.llm_chunks(), limit=self.lookahead)
        try:
            yield from self._reply(self._consumed(self.llm))
        finally:
            self.llm.close()
            self.rewind_unconsumed()

    def _reply(self, llm: Iterator[LLMChunk]) -> Iterator[Piece]:
        first = next(llm)
        with self.timer.stage("tts_init"):
            speaker = self.runner.project_speaker(first.speaker_hidden)
        gen_text, restart = first.text.split(TTS_EOS)[0], None
        final_sent = False
        while True:
            for piece in self.segment(llm, gen_text, speaker, restart):
                final_sent = final_sent or piece.final
                yield piece
            restart = self.last_restart
            if restart is None:
                break
            gen_text = ""
        if not final_sent:
            yield Piece(np.zeros(0, dtype=np.float32), "", final=True)

    def read_aloud(self, text: str, speaker: torch.Tensor) -> Iterator[Piece]:
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
            with self.timer.stage("tts_init"):
                state = self.tts_state = self.runner.new_tts_state()
            try:
                yield from self._read_part(state, part, speaker, last_part)
            finally:
                self.runner.release_tts_state(state)
                self.tts_state = None
        self.timer.metrics.reply_text = text

    def _read_part(self, state, part: str, speaker: torch.Tensor, last_part: bool) -> Iterator[Piece]:
        framer, pending_text = Framer(early=self.early), part
        prompt = build_tts_prompt(part, self.tts_tokenizer, self.reserved)
        self._prefill(state, prompt.text, 0, prompt.num_text_tokens + 3, speaker)
        for pcm in self._calls_until_end(state, prompt.num_text_tokens, framer):
            if pcm is not None:
                yield Piece(pcm, pending_text)
                pending_text = ""
        tail = framer.flush()
        if tail is not None or last_part:
            yield Piece(tail if tail is not None else np.zeros(0, np.float32), pending_text, final=last_part)

    def _consumed(self, llm: Iterator[LLMChunk]) -> Iterator[LLMChunk]:
        """Accounts for each chunk when the pipeline takes it (not when it was produced, which may be earlier):
        the metrics' reply text and token count, how the reply ended, and where a rewind goes back to."""
        reply, metrics = [], self.timer.metrics
        for chunk in llm:
            reply.append(chunk.text)
            metrics.reply_text = "".join(reply).split(TTS_EOS)[0]
            metrics.llm_tokens += chunk.num_tokens
            if chunk.hit_length_limit:
                metrics.finish_reason = "length"
            self.session.last_reply_terminated = chunk.ended
            self.consumed_length = chunk.session_length
            yield chunk

    def rewind_unconsumed(self) -> None:
        """Takes back LLM chunks produced ahead but never consumed (the speech ended first): the session's cache
        goes back to where the sequential algorithm, which would not have produced them, leaves it."""
        session = self.session
        if session is None or session.cache is None or self.consumed_length is None:
            return
        if session.length > self.consumed_length:
            session.length = self.consumed_length
            session.cache.truncate_(self.consumed_length)
