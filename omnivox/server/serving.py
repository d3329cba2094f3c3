"""The server's work behind the thin routes: engine lifetime, request checks, request → engine stream.

`SpeechService` owns the engine (built and warmed up once, off the event loop), the checks that depend on
the server's configuration (served model name, input length) and the translation of OpenAI-shaped requests into
`engine.stream` / `engine.read_aloud` calls, which only queue work for the engine's loop.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import secrets
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import numpy as np

from omnivox.audio import float_to_pcm16, wav_header
from omnivox.engine.engine import settle_heap
from omnivox.engine.forcing import DUMMY_REPLY as DUMMY_REPLY  # re-exported: clients and tests name it here
from omnivox.engine.forcing import WORDS_PER_SECOND, ReplyScript
from omnivox.engine.types import SAMPLE_RATE, SamplingParams
from omnivox.errors import EngineBusy, EngineNotReady
from omnivox.server.audio_formats import open_writer
from omnivox.server.metrics import ServerMetrics
from omnivox.server.protocol import (
    OPENAI_VOICES,
    VOICES,
    ChatAudio,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChatResponseMessage,
    ErrorInfo,
    ModelCard,
    ModelList,
    OmnivoxExtension,
    RequestError,
    SpeechRequest,
    UnknownModel,
    Usage,
    VoiceCard,
    VoiceList,
    WsSpeak,
    describe_error,
)
from omnivox.server.stream import FINISH_REASONS, ManagedStream

logger = logging.getLogger(__name__)

AUDIO_TTL_S = 3600  # how long an audio id's transcript is kept for multi-turn (`{"role": "assistant", "audio": ...}`)


@dataclass(frozen=True)
class ServerConfig:
    """Server knobs. Models are chosen here, at start-up; requests only name `served_model_name`."""

    served_model_name: str = "minicpm-o-2_6"
    max_input_chars: int = 4000  # per text field (speech input, each chat message, WebSocket text)
    max_messages: int = 64
    warmup: bool = True
    transcript_cache_size: int = 1024
    # Random weights never end a reply by themselves, so with dummy weights every reply is scripted as the bench
    # does it (engine/forcing.py): a request's own `"omnivox": {"forced_reply", "audio_seconds"}` first, else a
    # prompt of the standard workload gets its scripted reply and length, any other prompt DUMMY_REPLY;
    # read-aloud text is spoken for words / 2.5 seconds (150 words per minute).
    dummy_weights: bool = False
    # limits (README "Limits and shutdown"): each WebSocket chat session holds a full-length LLM cache until its
    # connection ends
    max_ws_sessions: int = 8
    max_body_bytes: int = 4 * 1024 * 1024  # request bodies and WebSocket messages; larger: 413
    body_timeout_s: float = 30.0  # each read of a request body must arrive within this; slower: 408
    max_connections: int = 256  # open connections + requests in progress; over it: 503
    shutdown_timeout_s: float = 30.0  # on SIGTERM streams may finish for this long, then end with an error event
    # other names accepted for the default voice (OpenAI's by default, so drop-in clients work); () turns them off
    voice_aliases: tuple[str, ...] = OPENAI_VOICES


class ServerShuttingDown(EngineNotReady):
    """The server is draining for shutdown: no new work; streams still open past the bound end with this."""

    code = "server_shutting_down"


class TooManySessions(EngineBusy):
    """All of the server's WebSocket chat sessions are open (`max_ws_sessions`)."""

    code = "too_many_sessions"


EngineSource = Any  # an Engine, or a zero-argument callable that builds one (run on the engine thread)


class SpeechService:
    def __init__(self, source: EngineSource, config: ServerConfig, metrics: ServerMetrics):
        self.config = config
        self.metrics = metrics
        self.engine: Any = None
        self.status = "loading"  # loading -> warming_up -> ready | failed
        self.failure: str | None = None
        self.created = int(time.time())
        self._source = source
        self._transcripts: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self.ws_sessions = 0  # WebSocket chat sessions open now (each holds an engine session until it closes)
        self.draining = False
        self._streams: set[ManagedStream] = set()  # open streams, ended in-band if still open at shutdown
        self._conversations: set[Any] = set()  # WebSocket conversations, told to close at shutdown
        self._script = ReplyScript() if config.dummy_weights else None

    # ------------------------------------------------------------------------------------------ lifetime

    async def start(self) -> None:
        """Build (if given a factory) and warm up the engine on the engine thread; then report ready."""
        try:
            source = self._source
            engine = source if hasattr(source, "stream") else await anyio.to_thread.run_sync(source)
            self.metrics.watch_gpu_memory(getattr(engine, "device", None))
            self.status = "warming_up"
            if self.config.warmup:
                t0 = time.perf_counter()
                await anyio.to_thread.run_sync(self._warm_up, engine)
                logger.info("engine warmed up in %.2f s", time.perf_counter() - t0)
            if hasattr(engine, "loop_stats"):
                self.metrics.bind_engine(engine)
            settle_heap()
            self.engine = engine
            self.status = "ready"
        except Exception as exc:  # reported by /readyz and every request; the process stays up to say why
            self.status = "failed"
            self.failure = f"{type(exc).__name__}: {exc}"
            logger.exception("engine start-up failed")

    def _warm_up(self, engine: Any) -> None:
        """The fast path's graphs (and compiled steps) for every cache bucket, then one short chat reply and one
        short read-aloud, to the end: pays for capture, compilation and lazy initialisation up front."""
        if hasattr(engine, "warm_up"):
            engine.warm_up()
        chat, read = "Hi, how are you?", "Hello there."
        for open_stream in (
            lambda: engine.stream(chat, seed=0, sampling=SamplingParams(max_new_tokens=16),
                                  request_id="warmup-chat", **self._chat_forcing(chat)),
            lambda: engine.read_aloud(read, seed=0, request_id="warmup-read", **self._read_forcing(read)),
        ):
            stream = open_stream()
            try:
                for _ in stream:
                    pass
            finally:
                stream.close()

    async def stop(self) -> None:
        if self.engine is not None:
            await anyio.to_thread.run_sync(self.engine.shutdown)

    def ready_engine(self) -> Any:
        if self.draining:
            raise ServerShuttingDown("the server is shutting down; retry on another instance or after it restarts")
        if self.status != "ready":
            detail = f": {self.failure}" if self.failure else "; retry in a few seconds"
            raise EngineNotReady(f"the model is not ready (status {self.status}){detail}")
        return self.engine

    def stats(self) -> dict[str, Any]:
        """The engine's stats, the WebSocket sessions, and `random_weights`: whether this server scripts replies
        and honours the `omnivox` request field (the embedded tiny model is random too)."""
        stats = dict(self.engine.stats()) if self.engine is not None else {}
        return {**stats, "ws_sessions": self.ws_sessions, "max_ws_sessions": self.config.max_ws_sessions,
                "random_weights": self.config.dummy_weights}

    def refresh_gauges(self) -> None:
        """Set the gauges read from the engine (sessions held, slots free) just before a scrape."""
        stats = self.stats()
        self.metrics.ws_sessions.set(self.ws_sessions)
        if "sessions_open" in stats:
            self.metrics.sessions_open.set(stats["sessions_open"])
            self.metrics.session_slots_free.set(stats["session_slots_free"])

    # ------------------------------------------------------------------------------------------ shutdown

    async def drain(self, timeout_s: float) -> None:
        """Graceful shutdown: take no new work, let open streams finish for up to `timeout_s`, then end the rest
        (an in-band error event where the protocol has one) and close every WebSocket after its last event."""
        self.draining = True
        self.status = "draining"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._streams and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for stream in list(self._streams):
            stream.interrupt(ServerShuttingDown(
                f"the server is shutting down and this stream outlived the {timeout_s:g} s shutdown bound; "
                "retry on another instance or after it restarts"))
        await asyncio.gather(*(c.shut_down() for c in list(self._conversations)), return_exceptions=True)
        while self._streams and loop.time() < deadline + 5:  # closes run right after the chunk in flight
            await asyncio.sleep(0.05)

    @contextlib.contextmanager
    def tracked_conversation(self, conversation: Any):
        """Registers a WebSocket conversation for the life of its connection (told to close at shutdown)."""
        self._conversations.add(conversation)
        try:
            yield
        finally:
            self._conversations.discard(conversation)

    # ------------------------------------------------------------------------------------------ checks

    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.config.served_model_name, created=self.created)])

    def model(self, model_id: str) -> ModelCard:
        self.check_model(model_id)
        return self.models().data[0]

    def voices(self) -> VoiceList:
        return VoiceList(data=[VoiceCard(id=VOICES[0], aliases=list(self.config.voice_aliases))])

    def check_voice(self, voice: str, param: str) -> str:
        """The voice the engine speaks for a requested name (the default voice, or one of its aliases)."""
        if voice in VOICES or voice in self.config.voice_aliases:
            return VOICES[0]
        aliases = f" or one of its aliases {list(self.config.voice_aliases)}" if self.config.voice_aliases else ""
        raise RequestError(f"unknown voice {voice!r}; this server has one voice, use {VOICES[0]!r}{aliases} "
                           "(see GET /v1/audio/voices)", param=param)

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.config.served_model_name:
            raise UnknownModel(
                f"model {model!r} is not served here; use {self.config.served_model_name!r} (see GET /v1/models)"
            )

    def check_text(self, text: str, param: str) -> str:
        if not text.strip():
            raise RequestError(f"{param} is empty; send the text to speak", param=param)
        if not text.isascii():  # JSON's \ud800 escapes decode to lone surrogates that no encoder takes
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise RequestError(f"{param} holds an invalid character at index {e.start} (a lone UTF-16 "
                                   "surrogate); send valid Unicode text", param=param, code="invalid_text") from None
        if len(text) > self.config.max_input_chars:
            raise RequestError(
                f"{param} has {len(text)} characters, more than this server's limit of "
                f"{self.config.max_input_chars}; send shorter text", param=param, code="string_above_max_length",
            )
        return text

    def describe_error(self, exc: BaseException) -> ErrorInfo:
        """ErrorInfo for an exception, counted in the errors metric (the one mapping lives in protocol.py)."""
        status, info, _ = describe_error(exc)
        if status == 500:
            logger.error("request failed after its response started", exc_info=exc)
        self.metrics.errors.labels(info.code or info.type).inc()
        return info

    def _chat_forcing(self, text: str, extension: OmnivoxExtension | None = None) -> dict[str, Any]:
        if self._script is None:
            return {}
        extension = extension or OmnivoxExtension()
        return self._script.chat(text, extension.forced_reply, extension.audio_seconds)

    def _read_forcing(self, text: str, extension: OmnivoxExtension | None = None) -> dict[str, Any]:
        if self._script is None:
            return {}
        return self._script.read(text, extension.audio_seconds if extension is not None else None)

    def check_extension(self, extension: OmnivoxExtension | None) -> OmnivoxExtension | None:
        """The `omnivox` request field scripts random weights; with real weights it would be silently wrong."""
        if extension is None:
            return None
        if not self.config.dummy_weights:
            raise RequestError(
                "the `omnivox` field (forced_reply, audio_seconds) is honoured only by a server running random "
                "weights (--dummy-weights or the embedded tiny model); this server runs real weights, which speak "
                "their own reply: drop the field", param="omnivox")
        if extension.forced_reply is not None:
            self.check_text(extension.forced_reply, "omnivox.forced_reply")
        return extension

    @staticmethod
    def _seed(seed: int | None) -> int:
        return secrets.randbits(31) if seed is None else seed

    @staticmethod
    def _sampling(temperature: float | None, top_p: float | None, max_tokens: int | None) -> SamplingParams:
        fields: dict[str, Any] = {}
        if temperature is not None:
            fields["temperature"] = temperature
            fields["greedy"] = temperature == 0.0
        if top_p is not None:
            fields["top_p"] = top_p
        if max_tokens is not None:
            fields["max_new_tokens"] = max_tokens
        return SamplingParams(**fields)

    # ------------------------------------------------------------------------------------------ conversations

    def _transcript_of(self, audio_id: str, param: str) -> str:
        now = time.time()
        while self._transcripts and next(iter(self._transcripts.values()))[1] < now:
            self._transcripts.popitem(last=False)
        if audio_id not in self._transcripts:
            raise RequestError(
                f"audio id {audio_id!r} is unknown or expired; send the assistant's transcript as `content` instead",
                param=param,
            )
        return self._transcripts[audio_id][0]

    def remember_transcript(self, audio_id: str, transcript: str) -> None:
        self._transcripts[audio_id] = (transcript, time.time() + AUDIO_TTL_S)
        while len(self._transcripts) > self.config.transcript_cache_size:
            self._transcripts.popitem(last=False)

    def conversation(self, request: ChatCompletionRequest) -> tuple[str, list[tuple[str, str]]]:
        """messages -> (the last user text, the earlier turns as engine history)."""
        if len(request.messages) > self.config.max_messages:
            raise RequestError(f"{len(request.messages)} messages, more than the limit of "
                               f"{self.config.max_messages}; drop the oldest turns", param="messages")
        history = []
        for i, message in enumerate(request.messages):
            param = f"messages[{i}]"
            text = message.text()
            if text is None and message.role == "assistant" and message.audio is not None:
                text = self._transcript_of(message.audio.id, f"{param}.audio.id")
            if text is None:
                raise RequestError(f"{param} has no content; give it text content", param=f"{param}.content")
            role = "system" if message.role == "developer" else message.role
            history.append((role, self.check_text(text, f"{param}.content")))
        return history.pop()[1], history

    # ------------------------------------------------------------------------------------------ opening streams

    async def _open(self, endpoint: str, request_id: str, seed: int, call: Callable[[Any], Any],
                    wrapper: type = ManagedStream) -> Any:
        """`call(engine)` validates and admits, or raises; generation runs in the engine loop. The stream is wrapped
        in `wrapper` (text_chat.ManagedTextStream for text-only replies)."""
        stream = call(self.ready_engine())
        managed = wrapper(stream, self.metrics, endpoint, request_id, seed)
        self._streams.add(managed)
        managed.on_closed(lambda: self._streams.discard(managed))
        return managed

    async def open_chat(self, request: ChatCompletionRequest) -> ManagedStream:
        self.check_model(request.model)
        if request.audio is not None:
            self.check_voice(request.audio.voice, "audio.voice")
        text, history = self.conversation(request)
        extension = self.check_extension(request.omnivox)
        sampling = self._sampling(request.temperature, request.top_p, request.max_new_tokens)
        request_id, seed = f"chatcmpl-{uuid.uuid4().hex}", self._seed(request.seed)
        return await self._open("chat", request_id, seed, lambda engine: engine.stream(
            text, history=history or None, seed=seed, sampling=sampling, request_id=request_id,
            **self._chat_forcing(text, extension)))

    async def open_speech(self, request: SpeechRequest) -> ManagedStream:
        self.check_model(request.model)
        self.check_voice(request.voice, "voice")
        text = self.check_text(request.input, "input")
        extension = self.check_extension(request.omnivox)
        request_id, seed = f"speech-{uuid.uuid4().hex}", self._seed(request.seed)
        return await self._open("speech", request_id, seed, lambda engine: engine.read_aloud(
            text, seed=seed, request_id=request_id, **self._read_forcing(text, extension)))

    @contextlib.asynccontextmanager
    async def ws_session(self) -> AsyncIterator[Any]:
        """One engine session for a WebSocket conversation, closed when the block ends however it ends; at most
        `max_ws_sessions` at once (each holds a full-length LLM cache)."""
        engine = self.ready_engine()
        if self.ws_sessions >= self.config.max_ws_sessions:
            raise TooManySessions(f"all {self.config.max_ws_sessions} WebSocket chat sessions of this server are open; "
                                  "retry later, or use mode 'read' or the HTTP endpoints", retry_after_s=5.0)
        session = engine.new_session()
        self.ws_sessions += 1
        try:
            yield session
        finally:
            self.ws_sessions -= 1
            engine.close_session(session)

    async def open_ws(self, speak: WsSpeak, session: Any) -> ManagedStream:
        text = self.check_text(speak.text, "text")
        request_id, seed = f"ws-{uuid.uuid4().hex}", self._seed(speak.seed)
        if speak.mode == "read":
            return await self._open("ws", request_id, seed, lambda engine: engine.read_aloud(
                text, seed=seed, request_id=request_id, **self._read_forcing(text)))
        sampling = self._sampling(speak.temperature, speak.top_p, speak.max_tokens)
        return await self._open("ws", request_id, seed, lambda engine: engine.stream(
            text, session=session, seed=seed, sampling=sampling, request_id=request_id, **self._chat_forcing(text)))

    async def open_ws_feed(self, feed: Any, seed: int | None) -> ManagedStream:
        """Read-aloud of text appended to `feed` (engine.text_feed.TextFeed) while it is spoken."""
        request_id, seed = f"ws-{uuid.uuid4().hex}", self._seed(seed)
        forcing = {"forced_words_per_second": WORDS_PER_SECOND} if self.config.dummy_weights else {}  # as read
        return await self._open("ws", request_id, seed, lambda engine: engine.read_aloud_feed(
            feed, seed=seed, request_id=request_id, **forcing))

    # ------------------------------------------------------------------------------------------ whole replies

    async def complete_chat(self, request: ChatCompletionRequest,
                            is_disconnected: Callable[[], Awaitable[bool]]) -> ChatCompletion:
        """Non-streaming chat: generate to the end (stopping early if the client leaves) and return one body."""
        stream = await self.open_chat(request)
        parts, transcript = [], []
        try:
            async for chunk in stream:
                parts.append(chunk.pcm)
                transcript.append(chunk.text)
                if await is_disconnected():
                    break
                stream.mark_sent(len(chunk.pcm))  # goes out in the one body
        finally:
            await stream.aclose()
        pcm = np.concatenate(parts) if parts else np.zeros(0, np.float32)
        if request.audio.format in ("wav", "pcm16"):
            data = float_to_pcm16(pcm)
            if request.audio.format == "wav":
                data = wav_header(SAMPLE_RATE, len(data) // 2) + data
        else:  # mp3, opus, aac, flac: one whole file at 24 kHz
            writer = open_writer(request.audio.format)
            data = writer.head() + writer.push(pcm) + writer.finish()
        m = stream.metrics
        audio_id = f"audio_{uuid.uuid4().hex}"
        text = "".join(transcript)
        self.remember_transcript(audio_id, text)
        audio = ChatAudio(id=audio_id, data=base64.b64encode(data).decode("ascii"),
                          expires_at=int(time.time()) + AUDIO_TTL_S, transcript=text)
        return ChatCompletion(
            id=stream.request_id, created=stream.created, model=self.config.served_model_name,
            choices=[ChatChoice(message=ChatResponseMessage(audio=audio),
                                finish_reason=FINISH_REASONS.get(m.finish_reason, m.finish_reason))],
            usage=Usage(prompt_tokens=m.prompt_tokens, completion_tokens=m.llm_tokens,
                        total_tokens=m.prompt_tokens + m.llm_tokens),
            metrics=stream.metrics_dict(),
        )
