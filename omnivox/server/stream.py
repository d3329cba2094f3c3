"""Engine streams read from asyncio, and their wire encodings (SSE, raw WAV/PCM, WebSocket frames).

The engine runs every live request in its own batched loop (omnivox/engine/scheduler.py); a stream here awaits its
next chunk without a thread (`SpeechStream.next_async`). `close()` (cancel, disconnect, normal end) marks the
request cancelled: the loop stops it and frees its cache rows within one iteration.

Once a streaming 200 has gone out, a failure is sent in-band as a last event (SSE and WebSocket); a raw audio body
has no room for one, so it is cut off without its final chunk and the client sees an incomplete transfer.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from typing import Any, Protocol

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from omnivox.audio import float_to_pcm16
from omnivox.engine.types import SAMPLE_RATE, AudioChunk, RequestMetrics
from omnivox.server.audio_formats import open_writer
from omnivox.server.metrics import ServerMetrics
from omnivox.server.protocol import (
    ChatCompletionChunk,
    ChunkChoice,
    ChunkDelta,
    DeltaAudio,
    ErrorInfo,
    SpeechDeltaEvent,
    SpeechDoneEvent,
    SpeechUsage,
    Usage,
)


class ManagedStream:
    """An engine `SpeechStream` iterated from asyncio; `aclose()` always runs once.

    It also counts server-side underruns: a chunk ready only after the audio sent before it would have finished
    playing, with playback starting when the first chunk was sent.
    """

    def __init__(self, stream: Any, metrics: ServerMetrics, endpoint: str, request_id: str, seed: int):
        self._stream = stream
        self._metrics = metrics
        self.endpoint = endpoint
        self.request_id = request_id
        self.seed = seed
        self.created = int(time.time())
        self.underruns = 0
        self.num_samples = 0
        self.sent_samples = 0  # what the client was sent (the audio metric), <= num_samples
        self._first_sent: float | None = None
        self._exhausted = False
        self._closed = False
        self._accounted = False
        self._interrupted: BaseException | None = None
        self._on_closed: list[Callable[[], None]] = []
        metrics.active.inc()

    def __aiter__(self) -> ManagedStream:
        return self

    async def __anext__(self) -> AudioChunk:
        if self._interrupted is not None:
            raise self._interrupted
        if self._exhausted or self._closed:
            raise StopAsyncIteration
        chunk = await self._stream.next_async()
        if self._interrupted is not None:
            raise self._interrupted
        if chunk is None:
            self._exhausted = True
            raise StopAsyncIteration
        now = time.monotonic()
        if self._first_sent is None:
            self._first_sent = now
        elif now > self._first_sent + self.num_samples / SAMPLE_RATE:
            self.underruns += 1
        self.num_samples += len(chunk.pcm)
        return chunk

    @property
    def metrics(self) -> RequestMetrics:
        """Complete once the stream is exhausted or closed."""
        return self._stream.metrics

    def mark_sent(self, samples: int) -> None:
        """Count audio as delivered: `omnivox_audio_seconds_total` is what clients were sent, not what was made."""
        self.sent_samples += samples

    def interrupt(self, exc: BaseException) -> None:
        """End the stream early with `exc` (shutdown): the consumer's next (or current) step raises it, so the
        response can end with an in-band error; the engine request is cancelled at once."""
        self._interrupted = exc
        self.close_soon()

    def on_closed(self, callback: Callable[[], None]) -> None:
        """Call `callback` once the stream is closed and accounted (`aclose`)."""
        self._on_closed.append(callback)

    def close_soon(self) -> None:
        """Cancel the engine request if it is still running (idempotent); the engine frees its rows at once."""
        if not self._closed:
            self._closed = True
            self._stream.close()

    async def aclose(self) -> None:
        """Close, then account once: after the consumer's last send, so the audio metric counts what went out."""
        self.close_soon()
        if not self._accounted:
            self._accounted = True
            self._metrics.active.dec()
            self._metrics.observe_stream(self.endpoint, self._stream.metrics, self.underruns,
                                         self.sent_samples / SAMPLE_RATE)
            for callback in self._on_closed:
                callback()

    def metrics_dict(self) -> dict[str, Any]:
        d = self._stream.metrics.to_dict()
        d.update(seed=self.seed, underruns=self.underruns)
        return d


# ------------------------------------------------------------------------------------------------ HTTP bodies


class Encoder(Protocol):
    """Turns a stream into body bytes: `head` before any chunk, `chunk` per chunk, `tail` after the last one,
    `error` for a failure after the 200 went out (None: the format cannot carry it, cut the body off)."""

    def head(self) -> bytes: ...
    def chunk(self, chunk: AudioChunk) -> bytes: ...
    def tail(self, stream: ManagedStream) -> bytes: ...
    def error(self, info: ErrorInfo) -> bytes | None: ...


def sse(payload: str) -> bytes:
    return f"data: {payload}\n\n".encode()


SSE_DONE = sse("[DONE]")


def _b64_pcm16(pcm) -> str:
    return base64.b64encode(float_to_pcm16(pcm)).decode("ascii")


class RawAudioEncoder:
    """`/v1/audio/speech` with stream_format "audio": the bytes of the response_format stream (audio_formats.py),
    e.g. a streaming WAV (header with unknown length), bare PCM16, mp3 or Ogg Opus, at the requested rate."""

    def __init__(self, response_format: str, sample_rate: int | None = None):
        self.response_format = response_format
        self.writer = open_writer(response_format, sample_rate)

    def head(self) -> bytes:
        return self.writer.head()

    def chunk(self, chunk: AudioChunk) -> bytes:
        return self.writer.push(chunk.pcm)

    def tail(self, stream: ManagedStream) -> bytes:
        return self.writer.finish()

    def error(self, info: ErrorInfo) -> bytes | None:
        return None


class SpeechSSEEncoder:
    """`/v1/audio/speech` with stream_format "sse": `speech.audio.delta` events, then `speech.audio.done`."""

    def __init__(self, response_format: str, sample_rate: int | None = None):
        self.raw = RawAudioEncoder(response_format, sample_rate)
        self.writer = self.raw.writer
        self._pending_head = self.raw.head()

    def head(self) -> bytes:
        return b""

    def chunk(self, chunk: AudioChunk) -> bytes:
        data, self._pending_head = self._pending_head + self.raw.chunk(chunk), b""
        return self._delta(data)

    @staticmethod
    def _delta(data: bytes) -> bytes:
        return sse(SpeechDeltaEvent(audio=base64.b64encode(data).decode("ascii")).model_dump_json()) if data else b""

    def tail(self, stream: ManagedStream) -> bytes:
        last = self._delta(self._pending_head + self.raw.tail(stream))  # what an encoder held until the end
        m = stream.metrics
        usage = SpeechUsage(input_tokens=m.prompt_tokens, output_tokens=m.tts_steps,
                            total_tokens=m.prompt_tokens + m.tts_steps)
        return last + sse(SpeechDoneEvent(usage=usage, metrics=stream.metrics_dict()).model_dump_json())

    def error(self, info: ErrorInfo) -> bytes | None:
        return sse(json.dumps({"type": "error", "error": info.model_dump()}))


FINISH_REASONS = {"eos": "stop", "length": "length"}


class ChatSSEEncoder:
    """`/v1/chat/completions` with stream=true: `chat.completion.chunk` events carrying `delta.audio` (base64
    PCM16 `data` and the `transcript` delta first spoken in it), a last chunk with finish_reason and metrics,
    an optional usage chunk, then `[DONE]`."""

    def __init__(self, completion_id: str, audio_id: str, model: str, include_usage: bool, created: int,
                 remember: Callable[[str, str], None] | None = None):
        self.completion_id = completion_id
        self.audio_id = audio_id
        self.model = model
        self.include_usage = include_usage
        self.created = created
        self.remember = remember  # keeps the transcript for multi-turn `{"role": "assistant", "audio": {"id"}}`
        self._transcript: list[str] = []

    def _event(self, delta: ChunkDelta, **fields: Any) -> bytes:
        chunk = ChatCompletionChunk(id=self.completion_id, created=self.created, model=self.model,
                                    choices=[ChunkChoice(delta=delta, finish_reason=fields.pop("finish_reason", None))],
                                    **fields)
        return sse(chunk.model_dump_json(exclude_none=True))

    def head(self) -> bytes:
        return self._event(ChunkDelta(role="assistant"))

    def chunk(self, chunk: AudioChunk) -> bytes:
        self._transcript.append(chunk.text)
        audio = DeltaAudio(id=self.audio_id, data=_b64_pcm16(chunk.pcm), transcript=chunk.text)
        return self._event(ChunkDelta(audio=audio))

    def tail(self, stream: ManagedStream) -> bytes:
        m = stream.metrics
        if self.remember is not None:
            self.remember(self.audio_id, "".join(self._transcript))
        reason = FINISH_REASONS.get(m.finish_reason, m.finish_reason)
        body = self._event(ChunkDelta(audio=DeltaAudio(id=self.audio_id, expires_at=self.created + 3600)),
                           finish_reason=reason, metrics=stream.metrics_dict())
        if self.include_usage:
            usage = Usage(prompt_tokens=m.prompt_tokens, completion_tokens=m.llm_tokens,
                          total_tokens=m.prompt_tokens + m.llm_tokens)
            chunk = ChatCompletionChunk(id=self.completion_id, created=self.created, model=self.model, choices=[],
                                        usage=usage)
            body += sse(chunk.model_dump_json(exclude_none=True))
        return body + SSE_DONE

    def error(self, info: ErrorInfo) -> bytes | None:
        return sse(json.dumps({"error": info.model_dump()})) + SSE_DONE


class EngineStreamResponse(Response):
    """A 200 whose body is produced chunk by chunk from a ManagedStream.

    It watches for the client's disconnect while streaming; a disconnect cancels the pump, and the stream is
    closed in `finally` whatever happened, so the engine request never outlives the HTTP request.
    """

    def __init__(self, stream: ManagedStream, encoder: Encoder, media_type: str,
                 describe_error: Callable[[BaseException], ErrorInfo], headers: dict[str, str] | None = None):
        self.stream = stream
        self.encoder = encoder
        self.describe_error = describe_error
        self.status_code = 200
        self.media_type = media_type
        self.background = None
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._watch_disconnect, receive, tg.cancel_scope)
                await self._pump(send)
                tg.cancel_scope.cancel()
        finally:
            await self.stream.aclose()

    @staticmethod
    async def _watch_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        scope.cancel()

    async def _pump(self, send: Send) -> None:
        async def body(data: bytes, more: bool = True) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": more})

        head = self.encoder.head()
        if head:
            await body(head)
        # an encoder that compresses (mp3, opus, aac...) runs in a thread: its tens of ms stay off the event loop
        offload = getattr(getattr(self.encoder, "writer", None), "blocking", False)

        async def encode(fn: Callable[[Any], bytes], arg: Any) -> bytes:
            return await anyio.to_thread.run_sync(fn, arg) if offload else fn(arg)

        try:
            async for chunk in self.stream:
                await body(await encode(self.encoder.chunk, chunk))
                self.stream.mark_sent(len(chunk.pcm))
            tail = await encode(self.encoder.tail, self.stream)
        except Exception as exc:  # after the 200: in-band if the format can say it, else cut the body off
            tail = self.encoder.error(self.describe_error(exc))
            if tail is None:
                raise
        await body(tail, more=False)
