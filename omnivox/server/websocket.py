"""The WebSocket conversation at `/v1/stream`: one connection, one engine session, one reply at a time.

Client → server, JSON text frames: `{"type": "speak", "text": ..., "mode": "chat" | "read", "seed"?, ...}` and
`{"type": "cancel"}`. Server → client: a JSON `start` event, then per chunk a JSON `transcript` event (when the chunk
first speaks new text) followed by one binary frame of PCM16 little-endian mono at 24 kHz, then a JSON `done` event
with the request's metrics, or an `error` event. Cancel and disconnect stop the reply within one chunk and free its
caches; mode "chat" keeps the conversation's LLM cache in this connection's session between turns.

The connection owns what it acquires: its engine session (taken at the first chat turn) is entered on the
connection's exit stack, so it is closed in exactly one place, when `run` returns, however the connection ended.
At server shutdown the reply in flight ends with its `done` or `error` event (idle connections get an `error`
event), then the server sends the close frame (1001).

Incremental read-aloud: `{"type": "input.append", "text": ...}` pieces (the first one starts the reply) and one
`{"type": "input.done"}`; speech starts once the TTS has its first 10-token text chunk, and the `done` event's
metrics carry `first_audio_after_text_s` (first audio sent minus the append that made the text sufficient).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Annotated, Any

from pydantic import BaseModel, Field, TypeAdapter, ValidationError
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from omnivox.audio import float_to_pcm16
from omnivox.engine.text_feed import TextFeed
from omnivox.engine.types import SAMPLE_RATE
from omnivox.errors import OmnivoxError
from omnivox.server.protocol import (
    ErrorInfo,
    WsCancel,
    WsDone,
    WsError,
    WsInputAppend,
    WsInputDone,
    WsSpeak,
    WsStart,
    WsTranscript,
)
from omnivox.server.stream import ManagedStream

logger = logging.getLogger(__name__)

class ClientGone(Exception):
    """The client closed the connection (or it broke) while we were sending."""


ClientMessage = TypeAdapter(Annotated[WsSpeak | WsCancel | WsInputAppend | WsInputDone, Field(discriminator="type")])


class WebSocketConversation:
    def __init__(self, websocket: WebSocket, service: Any):
        self.ws = websocket
        self.service = service
        self.session: Any = None  # the engine session of mode "chat", owned by `_owned` (closed when run returns)
        self._owned: contextlib.AsyncExitStack | None = None
        self._task: asyncio.Task | None = None
        self._busy = False  # a reply has started and its done/error event is not sent yet
        self._stream: ManagedStream | None = None
        self._cancel = asyncio.Event()
        self._send_lock = asyncio.Lock()
        self._feed: TextFeed | None = None  # the incremental read-aloud's text, while its input is open

    async def run(self) -> None:
        await self.ws.accept()
        async with contextlib.AsyncExitStack() as owned:  # closes the session after the reply has stopped
            self._owned = owned
            owned.enter_context(self.service.tracked_conversation(self))
            try:
                while True:
                    message = await self.ws.receive()
                    if message["type"] == "websocket.disconnect":
                        break
                    await self._handle(message)
            except WebSocketDisconnect:
                pass
            finally:
                await self._stop_reply()

    async def shut_down(self) -> None:
        """Server shutdown: wait for the reply in flight to send its last event (the server has already ended its
        stream if it outlived the shutdown bound), tell an idle client, then close with 1001 (going away)."""
        idle = not self._busy
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        if idle:
            await self._send_error_info(ErrorInfo(
                message="the server is shutting down; reconnect to another instance or after it restarts",
                type="service_unavailable", code="server_shutting_down"))
        async with self._send_lock:
            with contextlib.suppress(Exception):  # already closed or gone
                if self.ws.application_state == WebSocketState.CONNECTED:
                    await self.ws.close(1001, "server shutting down")

    # ------------------------------------------------------------------------------------ client messages

    async def _handle(self, message: dict[str, Any]) -> None:
        text = message.get("text")
        if text is None:
            await self._send_error_info(ErrorInfo(
                message='send JSON text frames: {"type": "speak", "text": "..."} or {"type": "cancel"}',
                type="invalid_request_error", code="binary_not_supported"))
            return
        try:
            request = ClientMessage.validate_python(json.loads(text))
        except json.JSONDecodeError as e:
            await self._send_error_info(ErrorInfo(
                message=f"message is not valid JSON ({e.msg} at column {e.colno}); send a JSON object",
                type="invalid_request_error", code="json_invalid"))
            return
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            await self._send_error_info(ErrorInfo(
                message=f"{where}: {first['msg']}" if where else first["msg"],
                type="invalid_request_error", param=where or None, code="invalid_value"))
            return
        if isinstance(request, WsCancel):
            self._cancel.set()
            if self._stream is not None:
                self._stream.close_soon()  # runs right after the chunk in flight
            return
        if isinstance(request, WsInputAppend | WsInputDone) and self._feed is not None and not self._feed.is_done:
            await self._feed_input(request)
            return
        if isinstance(request, WsInputDone):
            await self._send_error_info(ErrorInfo(
                message="no read-aloud input is open; start one with input.append", type="invalid_request_error",
                code="no_input"))
            return
        if self._busy:
            await self._send_error_info(ErrorInfo(
                message="a reply is still streaming on this connection; wait for its done event or send a cancel",
                type="invalid_request_error", code="request_in_flight"))
            return
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)  # its last event is out; it is returning
        self._busy = True
        self._cancel = asyncio.Event()
        if isinstance(request, WsInputAppend):
            self._feed = TextFeed()
            if not await self._feed_input(request):
                self._busy, self._feed = False, None
                return
            self._task = asyncio.create_task(self._reply_feed(self._feed, request.seed))
            return
        self._task = asyncio.create_task(self._reply(request))

    async def _feed_input(self, request: WsInputAppend | WsInputDone) -> bool:
        """Append to (or end) the open read-aloud input; False (and an error event) when the text is too long."""
        if isinstance(request, WsInputDone):
            self._feed.done()
        else:
            total = len(self._feed.text) + len(request.text)
            if total > self.service.config.max_input_chars:
                await self._send_error_info(ErrorInfo(
                    message=f"the read-aloud input would have {total} characters, more than this server's limit "
                            f"of {self.service.config.max_input_chars}; send input.done and start a new one",
                    type="invalid_request_error", param="text", code="string_above_max_length"))
                return False
            self._feed.append(request.text)
        return True

    async def _stop_reply(self) -> None:
        if self._task is None:
            return
        self._cancel.set()
        if self._stream is not None:
            self._stream.close_soon()
        await asyncio.gather(self._task, return_exceptions=True)

    # ------------------------------------------------------------------------------------ one reply

    async def _reply(self, speak: WsSpeak) -> None:
        try:
            if speak.mode == "chat" and self.session is None:
                self.session = await self._owned.enter_async_context(self.service.ws_session())
            stream = await self.service.open_ws(speak, self.session)
        except Exception as exc:
            self._busy = False
            await self._send_error(exc, None)
            return
        await self._play(stream)

    async def _reply_feed(self, feed: TextFeed, seed: int | None) -> None:
        try:
            stream = await self.service.open_ws_feed(feed, seed)
        except Exception as exc:
            self._busy, self._feed = False, None
            await self._send_error(exc, None)
            return
        await self._play(stream, feed)

    async def _play(self, stream: ManagedStream, feed: TextFeed | None = None) -> None:
        """Stream a reply's chunks to the client (with a feed, they come as the client's text allows)."""
        self._stream = stream
        failure: Exception | None = None
        first_audio_at: float | None = None
        try:
            await self._send_json(WsStart(request_id=stream.request_id, seed=stream.seed, sample_rate=SAMPLE_RATE))
            async for chunk in stream:
                if self._cancel.is_set():
                    break
                if first_audio_at is None and len(chunk.pcm):
                    first_audio_at = time.monotonic()
                if chunk.text:
                    await self._send_json(WsTranscript(request_id=stream.request_id, delta=chunk.text,
                                                       chunk_index=chunk.index, audio_start_s=chunk.audio_start_s))
                await self._send(bytes=float_to_pcm16(chunk.pcm))
                stream.mark_sent(len(chunk.pcm))
        except ClientGone:
            self._cancel.set()
        except Exception as exc:  # generation failed after `start`: in-band, once the stream is closed
            failure = exc
        finally:
            await stream.aclose()
            self._stream = None
            self._feed = None
            self._busy = False  # the next speak may start as soon as the client has our last event
        metrics = stream.metrics_dict()
        if feed is not None:
            ready = feed.sufficient_at is not None and first_audio_at is not None
            metrics["first_audio_after_text_s"] = first_audio_at - feed.sufficient_at if ready else None
        with contextlib.suppress(ClientGone):
            if failure is not None:
                await self._send_error(failure, stream.request_id)
            else:
                await self._send_json(WsDone(request_id=stream.request_id, finish_reason=stream.metrics.finish_reason,
                                             metrics=metrics))

    # ------------------------------------------------------------------------------------ sending

    async def _send(self, **frame: Any) -> None:
        """Send one frame (frames of the reply task and of the receive loop never interleave mid-send);
        raises ClientGone when the client has left."""
        async with self._send_lock:
            if self.ws.application_state != WebSocketState.CONNECTED:
                raise ClientGone()
            try:
                if "bytes" in frame:
                    await self.ws.send_bytes(frame["bytes"])
                else:
                    await self.ws.send_text(frame["text"])
            except (WebSocketDisconnect, OSError, RuntimeError) as exc:  # Starlette/uvicorn: closed or gone
                raise ClientGone() from exc

    async def _send_json(self, event: BaseModel) -> None:
        await self._send(text=event.model_dump_json())

    async def _send_error_info(self, info: ErrorInfo, request_id: str | None = None) -> None:
        with contextlib.suppress(ClientGone):
            await self._send_json(WsError(request_id=request_id, error=info))

    async def _send_error(self, exc: BaseException, request_id: str | None) -> None:
        if not isinstance(exc, OmnivoxError):
            logger.error("WebSocket reply failed", exc_info=exc)
        await self._send_error_info(self.service.describe_error(exc), request_id)
