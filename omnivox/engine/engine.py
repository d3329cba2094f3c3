"""The public engine: load a model once, then stream spoken replies.

`Engine.stream(text)` prefills the prompt (default-voice system prompt + user turn) and returns a `SpeechStream`
that yields `AudioChunk`s as the official streaming algorithm produces them. `read_aloud(text)` drives the TTS
directly with the cached default speaker vector. Requests are independent: each owns its caches, which are
dropped the moment its stream ends or is closed.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch

from omnivox.engine.pipeline import ASSISTANT_HEADER, Forcing, Piece, ReplyGenerator
from omnivox.engine.profiler import StageTimer
from omnivox.engine.runner import EagerRunner
from omnivox.engine.session import Session
from omnivox.engine.types import AUDIO_TOKENS_PER_SECOND, AudioChunk, RequestMetrics, SamplingParams
from omnivox.errors import ContextTooLong, EngineBusy, InvalidRequest
from omnivox.models.loader import SpeechModel

DEFAULT_SYSTEM_PROMPT = "Use the <reserved_53> voice.As an assistant, you will speak using this voice style."
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "tf32": torch.float32}


@dataclass(frozen=True)
class EngineConfig:
    """Runtime knobs (the model's own sizes come from its checkpoint)."""

    max_concurrent_requests: int = 8
    max_session_tokens: int = 4096  # LLM positions per session: prompt, history and replies
    max_text_chars: int = 4000
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    early_first_chunk: bool = True
    path: str = "reference"  # "reference": eager + growing caches; "static": eager + static caches; "fast"
    # the fast path's switches (omnivox/engine/fast_runner.py)
    # auto: "default" for the fast path on a GPU (validated equal to the plain path, ~2x faster steps, a one-off
    # compile at start-up), "none" elsewhere | none | default | reduce-overhead | max-autotune
    compile: str = "auto"
    attention: str = "sdpa"  # sdpa (GPU: efficient, math fallback) | efficient | math | cudnn (flash: refused)
    cuda_graphs: bool = True  # off: the fast path's steps run eagerly (always so on a CPU)
    max_sessions: int = 0  # LLM caches in the fast path's pool (0: max_concurrent_requests)
    # overlap (overlap.py): on a GPU the fast path runs LLM, TTS and vocoder on their own CUDA streams, the LLM up
    # to `llm_lookahead` 3-token chunks ahead of the TTS; outputs are those of the sequential algorithm either way
    overlap: bool = True
    llm_lookahead: int = 8


def resolve_compile(compile: str, device: torch.device, cuda_graphs: bool = True) -> str:
    """`auto` -> torch.compile's default mode inside our CUDA graphs on a GPU, none on a CPU (where compiling only
    costs start-up time); any other mode as given."""
    if compile != "auto":
        return compile
    return "default" if device.type == "cuda" and cuda_graphs else "none"


def resolve_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InvalidRequest(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N'") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidRequest(f"device {device!r} asked for, but this machine has no CUDA GPU: use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise InvalidRequest(f"device {device!r} is not supported: use 'cpu', 'cuda' or 'cuda:N'")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise InvalidRequest(f"unknown precision {dtype!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


class SpeechStream:
    """Iterator of AudioChunks for one request. `close()` cancels it and frees its caches at once."""

    def __init__(
        self,
        engine: Engine,
        generator: ReplyGenerator,
        pieces: Iterator[Piece],
        timer: StageTimer,
        owned_session: Session | None = None,
    ):
        self.engine = engine
        self._owned_session = owned_session  # a per-request session, released with the stream
        self.metrics = timer.metrics
        self._generator = generator
        self._pieces = pieces
        self._timer = timer
        self._index = 0
        self._audio_pieces = 0
        self._done = False

    def __iter__(self) -> SpeechStream:
        return self

    def __next__(self) -> AudioChunk:
        if self._done:
            raise StopIteration
        try:
            piece = next(self._pieces)
        except StopIteration:
            self._finish("eos")
            raise
        except BaseException:
            self._finish("error")
            raise
        ready = self._timer.mark_audio_ready(len(piece.pcm) / 24000)
        if len(piece.pcm):
            self._audio_pieces += 1
            # early framing: the official first chunk comes out with our second piece (or the last, if sooner)
            if self._audio_pieces == (2 if self.engine.config.early_first_chunk else 1) or (
                piece.final and self.metrics.ttfb_official_s != self.metrics.ttfb_official_s
            ):
                self.metrics.ttfb_official_s = ready
        chunk = AudioChunk(
            pcm=piece.pcm,
            text=piece.text,
            index=self._index,
            audio_start_s=self.metrics.audio_s - len(piece.pcm) / 24000,
            ready_s=ready,
            is_last=piece.final,
        )
        self._index += 1
        if piece.final:
            self._finish("eos")
        return chunk

    @property
    def cache_bytes(self) -> int:
        return self._generator.cache_bytes() if not self._done else 0

    def close(self) -> None:
        """Cancel: generation stops at the current step and the request's caches are released."""
        if not self._done:
            self._generator.cancelled = True
            self._finish("cancelled")

    def _finish(self, reason: str) -> None:
        if self._done:
            return
        self._done = True
        self._pieces.close()  # GeneratorExit inside the pipeline: its caches go with its frame
        self._pieces = iter(())
        if self._owned_session is not None:
            self.engine.close_session(self._owned_session)
        self.metrics.total_s = self._timer.elapsed()
        if not self.metrics.finish_reason:
            self.metrics.finish_reason = reason
        self.engine._release(self)

    def __del__(self) -> None:
        if not getattr(self, "_done", True):
            self.close()


class Engine:
    """Owns the model and the runner; hands out SpeechStreams."""

    def __init__(
        self,
        model: SpeechModel,
        config: EngineConfig | None = None,
        runner=None,
        clock: Callable[[], float] = time.perf_counter,
        model_load_s: float = 0.0,
    ):
        self.model = model
        self.config = config or EngineConfig()
        if self.config.llm_lookahead < 0:
            raise InvalidRequest(f"llm_lookahead is {self.config.llm_lookahead}: use 0 (none) or more chunks")
        self.device = model.device
        self.clock = clock
        self.model_load_s = model_load_s
        if runner is None and self.config.path == "fast":
            runner = self._fast_runner(model, self.config)
        cache = "static" if self.config.path == "static" else "growing"
        self.runner = runner or EagerRunner(model, cache=cache, llm_capacity=self.config.max_session_tokens)
        self.sample_rate = model.config.vocos.sample_rate
        self._live: set[SpeechStream] = set()
        self._lock = threading.RLock()
        self._default_speaker: torch.Tensor | None = None

    @staticmethod
    def _fast_runner(model: SpeechModel, config: EngineConfig):
        from omnivox.engine.fast_runner import FastRunner

        return FastRunner(
            model,
            llm_capacity=config.max_session_tokens,
            llm_slots=config.max_sessions or config.max_concurrent_requests,
            tts_slots=config.max_concurrent_requests,
            compile=resolve_compile(config.compile, model.device, config.cuda_graphs),
            attention=config.attention,
            cuda_graphs=config.cuda_graphs,
            streams=config.overlap,
        )

    @classmethod
    def from_pretrained(
        cls,
        model: str | None = None,
        *,
        device: str = "cpu",
        dtype: str | torch.dtype | None = None,
        dummy_weights: bool = False,
        dummy_size: str = "full",
        seed: int = 0,
        progress: bool = True,
        config: EngineConfig | None = None,
    ) -> Engine:
        """`model`: a MiniCPM-o 2.6 snapshot directory or hub id; None = the embedded tiny random-weight model."""
        from omnivox.config import CONFIGS
        from omnivox.models.loader import build_dummy_model, load_speech_model
        from omnivox.models.synthetic import default_tiny_checkpoint

        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        if dtype == "tf32":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        t0 = time.perf_counter()
        if dummy_weights:
            speech_model = build_dummy_model(CONFIGS[dummy_size](), device=dev, dtype=dt, seed=seed)
        else:
            source = model if model is not None else default_tiny_checkpoint()
            speech_model = load_speech_model(source, device=dev, dtype=dt, progress=progress)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return cls(speech_model, config=config, model_load_s=time.perf_counter() - t0)

    # ---- admission and bookkeeping ------------------------------------------------------------------------------
    @property
    def live_requests(self) -> int:
        return len(self._live)

    def warm_up(self) -> None:
        """Captures (and compiles) the fast path's step graphs for every cache bucket now rather than inside the
        first requests that need them (tens of ms each); no-op for the eager paths. Servers and benchmarks call it
        once before taking requests."""
        capture = getattr(self.runner, "warm_up", None)
        if capture is not None:
            with self._lock:
                capture()

    def stats(self) -> dict:
        with self._lock:
            live = list(self._live)
        return {
            "live_requests": len(live),
            "cache_bytes": sum(s.cache_bytes for s in live),
            "max_concurrent_requests": self.config.max_concurrent_requests,
            "device": str(self.device),
            "path": self.config.path,
            "dummy_weights": self.model.source == "dummy",
        }

    def _check_admission(self) -> None:
        if len(self._live) >= self.config.max_concurrent_requests:
            raise EngineBusy(
                f"{len(self._live)} requests are already being served (limit "
                f"{self.config.max_concurrent_requests}); retry shortly",
                retry_after_s=1.0,
            )

    def _admit(self, stream: SpeechStream) -> None:
        with self._lock:
            try:
                self._check_admission()
            except EngineBusy:
                stream.close()
                raise
            self._live.add(stream)

    def _release(self, stream: SpeechStream) -> None:
        with self._lock:
            self._live.discard(stream)

    def new_session(self) -> Session:
        """A conversation whose LLM cache is kept between turns; `close_session` when done with it."""
        return Session(cache=self.runner.new_llm_cache(), capacity=self.runner.llm_capacity)

    def close_session(self, session: Session) -> None:
        if session.cache is not None:
            self.runner.release_llm_cache(session.cache)
            session.cache = None

    # ---- requests -----------------------------------------------------------------------------------------------
    def _check_text(self, text: str) -> str:
        if not isinstance(text, str) or not text.strip():
            raise InvalidRequest("text is empty: give at least one non-space character to speak about")
        if len(text) > self.config.max_text_chars:
            raise ContextTooLong(
                f"text is {len(text)} characters; the limit is {self.config.max_text_chars}: shorten it"
            )
        return text

    def _generators(self, seed: int | None) -> tuple[torch.Generator, torch.Generator]:
        """Seeded (LLM, TTS) random streams on the device; no seed = fresh entropy."""
        base = seed if seed is not None else int.from_bytes(os.urandom(7), "little")
        llm, tts = torch.Generator(device=self.device), torch.Generator(device=self.device)
        llm.manual_seed(2 * base)
        tts.manual_seed(2 * base + 1)
        return llm, tts

    def _prompt_ids(self, session: Session | None, text: str, history: list[tuple[str, str]] | None) -> list[list[int]]:
        """The prefills for this turn, each one LLM forward (fact sheet 3.3). `session` None: a new conversation."""
        tok = self.model.tokenizer
        if session is None or not session.system_prompted:
            turns = f"<|im_start|>user\n{self.config.system_prompt}<|im_end|>\n"
            for role, content in history or []:
                if role not in ("user", "assistant", "system"):
                    raise InvalidRequest(f"unknown role {role!r} in history: use user, assistant or system")
                turns += f"<|im_start|>{role}\n{content}<|im_end|>\n"
            return [tok.encode(turns), tok.encode(f"<|im_start|>user\n{text}")]
        if history:
            raise InvalidRequest("history is only accepted for a new session; the session already holds it")
        prefix = "<|im_end|>\n" if session.last_reply_terminated else "<|tts_eos|><|im_end|>\n"
        return [tok.encode(f"{prefix}<|im_start|>user\n{text}")]

    def stream(
        self,
        text: str,
        *,
        history: list[tuple[str, str]] | None = None,
        session: Session | None = None,
        seed: int | None = None,
        sampling: SamplingParams | None = None,
        forced_reply: str | None = None,
        forced_audio_seconds: float | None = None,
        request_id: str = "",
    ) -> SpeechStream:
        """Speak the model's reply to `text`. With `forced_reply`/`forced_audio_seconds` (dummy weights) the reply
        tokens are teacher-forced and the end of speech is forced after that much audio. Everything is validated
        before any memory is taken."""
        self._check_text(text)
        sampling = sampling or SamplingParams()
        if session is not None and session.cache is None:
            raise InvalidRequest("this session was closed: start a new one with engine.new_session()")
        prefills = self._prompt_ids(session, text, history)
        prompt_len = sum(map(len, prefills))
        history_len = session.length if session is not None else 0
        needed = history_len + prompt_len + len(self.model.tokenizer.encode(ASSISTANT_HEADER)) + sampling.max_new_tokens
        if needed > self.runner.llm_capacity:
            raise ContextTooLong(
                f"this turn needs {needed} LLM positions (history {history_len}, prompt {prompt_len}, reply up to "
                f"{sampling.max_new_tokens}) but a session holds {self.runner.llm_capacity}: shorten the text or "
                "start a new session"
            )
        forcing = self._forcing(forced_reply, forced_audio_seconds)
        self._check_admission()
        owned = session is None
        session = session or self.new_session()
        metrics = RequestMetrics(request_id=request_id, prompt_tokens=prompt_len)
        timer = StageTimer(metrics, self.device, self.clock)
        reply = ReplyGenerator(
            self.runner,
            session,
            sampling,
            self._generators(seed),
            timer,
            forcing,
            self.config.early_first_chunk,
            lookahead=self.config.llm_lookahead if self.config.overlap else 0,
        )

        def pieces() -> Iterator[Piece]:
            with timer.stage("prefill"):
                for ids in prefills:
                    self.runner.llm_forward(session, ids)
                session.system_prompted = True
            session.turns += 1
            yield from reply

        stream = SpeechStream(self, reply, pieces(), timer, owned_session=session if owned else None)
        self._admit(stream)
        return stream

    def _forcing(self, forced_reply: str | None, forced_audio_seconds: float | None) -> Forcing | None:
        if forced_reply is None and forced_audio_seconds is None:
            return None
        if forced_audio_seconds is None or forced_audio_seconds <= 0:
            raise InvalidRequest("forced_audio_seconds must be a positive number of seconds when forcing a reply")
        reply = forced_reply or ""
        return Forcing(
            reply_ids=self.model.tokenizer.encode(reply),
            audio_tokens=round(forced_audio_seconds * AUDIO_TOKENS_PER_SECOND),
            text_tokens=len(self.model.tts_tokenizer.encode(reply)),
        )

    def default_speaker(self) -> torch.Tensor:
        """The default voice's speaker vector: the `<|spk|>` state after the default system prompt, computed once."""
        if self._default_speaker is None:
            session = self.new_session()
            try:
                for ids in self._prompt_ids(session, "", None):
                    self.runner.llm_forward(session, ids)
                header = self.model.tokenizer.encode(ASSISTANT_HEADER)
                hidden = self.runner.llm_forward(session, header)
                spk = hidden[header.index(self.model.tokenizer.special.spk)]
                self._default_speaker = self.runner.project_speaker(spk)
            finally:
                self.close_session(session)
        return self._default_speaker

    def read_aloud(
        self,
        text: str,
        *,
        seed: int | None = None,
        sampling: SamplingParams | None = None,
        forced_audio_seconds: float | None = None,
        request_id: str = "",
    ) -> SpeechStream:
        """Speak `text` itself with the default voice (TTS only, no LLM reply)."""
        self._check_text(text)
        sampling = sampling or SamplingParams()
        self._check_admission()
        speaker = self.default_speaker()
        forcing = self._forcing(None, forced_audio_seconds) if forced_audio_seconds is not None else None
        metrics = RequestMetrics(request_id=request_id)
        timer = StageTimer(metrics, self.device, self.clock)
        reply = ReplyGenerator(
            self.runner, None, sampling, self._generators(seed), timer, forcing, self.config.early_first_chunk
        )
        stream = SpeechStream(self, reply, reply.read_aloud(text, speaker), timer)
        self._admit(stream)
        return stream

    def with_config(self, **changes) -> Engine:
        """A second engine over the same weights with other runtime knobs (e.g. the other path, for comparisons)."""
        return Engine(self.model, replace(self.config, **changes), clock=self.clock, model_load_s=self.model_load_s)
