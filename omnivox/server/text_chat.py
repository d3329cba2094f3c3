"""Text-only chat completions (`modalities: ["text"]`, or no `audio` field): `Engine.chat_text` behind the same
`/v1/chat/completions`, answered as an ordinary OpenAI chat completion, streamed (`chat.completion.chunk` events with
`delta.content`) or whole. Same messages, multi-turn rules, checks and engine thread as the spoken replies."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from typing import Any

import anyio

from omnivox.server.metrics import ServerMetrics
from omnivox.server.protocol import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatResponseMessage,
    ChunkChoice,
    ChunkDelta,
    ErrorInfo,
    Usage,
)
from omnivox.server.stream import FINISH_REASONS, SSE_DONE, EngineWorker, sse

ENDPOINT = "chat_text"  # the metrics label: its TTFB is the first text, and it has no audio


def _next_delta(stream: Any) -> str | None:
    return next(stream, None)


class ManagedTextStream:
    """An engine TextStream iterated from asyncio through the engine worker; `aclose()` always runs once."""

    def __init__(self, stream: Any, worker: EngineWorker, metrics: ServerMetrics, endpoint: str, request_id: str,
                 seed: int):
        self._stream = stream
        self._worker = worker
        self._metrics = metrics
        self.endpoint = endpoint
        self.request_id = request_id
        self.seed = seed
        self.created = int(time.time())
        self._exhausted = False
        self._close_future: Future | None = None
        metrics.active.inc()

    def __aiter__(self) -> ManagedTextStream:
        return self

    async def __anext__(self) -> str:
        if self._exhausted or self._close_future is not None:
            raise StopAsyncIteration
        delta = await self._worker.run(_next_delta, self._stream)
        if delta is None:
            self._exhausted = True
            raise StopAsyncIteration
        return delta

    @property
    def metrics(self) -> Any:
        return self._stream.metrics

    def close_soon(self) -> Future:
        if self._close_future is None:
            self._close_future = self._worker.submit(self._stream.close)
            self._close_future.add_done_callback(self._account)
        return self._close_future

    async def aclose(self) -> None:
        future = self.close_soon()
        with anyio.CancelScope(shield=True):
            await asyncio.wrap_future(future)

    def _account(self, _: Future) -> None:
        self._metrics.active.dec()
        self._metrics.observe_stream(self.endpoint, self._stream.metrics, 0)

    def metrics_dict(self) -> dict[str, Any]:
        d = self._stream.metrics.to_dict()
        d.update(seed=self.seed)
        return d


async def open_text_chat(service: Any, request: ChatCompletionRequest) -> ManagedTextStream:
    service.check_model(request.model)
    text, history = service.conversation(request)
    sampling = service._sampling(request.temperature, request.top_p, request.max_new_tokens)
    request_id, seed = f"chatcmpl-{uuid.uuid4().hex}", service._seed(request.seed)
    forced_reply = service._chat_forcing(text).get("forced_reply")  # random weights: the scripted reply
    return await service._open(ENDPOINT, request_id, seed, lambda engine: engine.chat_text(
        text, history=history or None, seed=seed, sampling=sampling, request_id=request_id,
        forced_reply=forced_reply), wrapper=ManagedTextStream)


def _usage(m: Any) -> Usage:
    return Usage(prompt_tokens=m.prompt_tokens, completion_tokens=m.llm_tokens,
                 total_tokens=m.prompt_tokens + m.llm_tokens)


async def complete_text_chat(service: Any, request: ChatCompletionRequest,
                             is_disconnected: Callable[[], Awaitable[bool]]) -> ChatCompletion:
    """The whole text reply in one chat.completion (generation stops early if the client leaves)."""
    stream = await open_text_chat(service, request)
    parts = []
    try:
        async for delta in stream:
            parts.append(delta)
            if await is_disconnected():
                break
    finally:
        await stream.aclose()
    m = stream.metrics
    return ChatCompletion(
        id=stream.request_id, created=stream.created, model=service.config.served_model_name,
        choices=[ChatChoice(message=ChatResponseMessage(content="".join(parts)),
                            finish_reason=FINISH_REASONS.get(m.finish_reason, m.finish_reason))],
        usage=_usage(m), metrics=stream.metrics_dict(),
    )


class TextChatSSEEncoder:
    """stream=true: a chunk with `delta.role`, one `delta.content` chunk per text delta, a chunk with finish_reason
    and metrics, an optional usage chunk, then `[DONE]` (OpenAI's order)."""

    def __init__(self, completion_id: str, model: str, include_usage: bool, created: int):
        self.completion_id = completion_id
        self.model = model
        self.include_usage = include_usage
        self.created = created

    def _event(self, choices: list[ChunkChoice], **fields: Any) -> bytes:
        chunk = ChatCompletionChunk(id=self.completion_id, created=self.created, model=self.model, choices=choices,
                                    **fields)
        return sse(chunk.model_dump_json(exclude_none=True))

    def head(self) -> bytes:
        return self._event([ChunkChoice(delta=ChunkDelta(role="assistant", content=""))])

    def chunk(self, delta: str) -> bytes:
        return self._event([ChunkChoice(delta=ChunkDelta(content=delta))])

    def tail(self, stream: ManagedTextStream) -> bytes:
        m = stream.metrics
        reason = FINISH_REASONS.get(m.finish_reason, m.finish_reason)
        body = self._event([ChunkChoice(delta=ChunkDelta(), finish_reason=reason)], metrics=stream.metrics_dict())
        if self.include_usage:
            body += self._event([], usage=_usage(m))
        return body + SSE_DONE

    def error(self, info: ErrorInfo) -> bytes | None:
        return sse(json.dumps({"error": info.model_dump()})) + SSE_DONE
