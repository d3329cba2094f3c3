"""Text-only chat completions (`modalities: ["text"]`, or no `audio` field): `Engine.chat_text` behind the same
`/v1/chat/completions`, answered as an ordinary OpenAI chat completion, streamed (`chat.completion.chunk` events with
`delta.content`) or whole. Same messages, multi-turn rules, checks and engine thread as the spoken replies."""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from omnivox.engine.types import AudioChunk
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
from omnivox.server.stream import FINISH_REASONS, SSE_DONE, ManagedStream, sse

ENDPOINT = "chat_text"  # the metrics label: its TTFB is the first text, and it has no audio


class ManagedTextStream(ManagedStream):
    """A text-only reply's engine stream: its chunks carry text and no audio; it yields only the chunks with text
    (and counts no underruns). The TTFB recorded is the first text's."""

    async def __anext__(self) -> AudioChunk:
        while True:
            if self._interrupted is not None:
                raise self._interrupted
            if self._exhausted or self._closed:
                raise StopAsyncIteration
            chunk = await self._stream.next_async()
            if chunk is None:
                self._exhausted = True
                continue
            if chunk.text:
                if self.metrics.ttfb_s != self.metrics.ttfb_s:  # NaN: the first text
                    self.metrics.ttfb_s = chunk.ready_s
                return chunk


async def open_text_chat(service: Any, request: ChatCompletionRequest) -> ManagedTextStream:
    service.check_model(request.model)
    text, history = service.conversation(request)
    sampling = service._sampling(request.temperature, request.top_p, request.max_new_tokens)
    request_id, seed = f"chatcmpl-{uuid.uuid4().hex}", service._seed(request.seed)
    extension = service.check_extension(request.omnivox)
    forced_reply = service._chat_forcing(text, extension).get("forced_reply")  # random weights: the scripted reply
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
        async for chunk in stream:
            parts.append(chunk.text)
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

    def chunk(self, chunk: AudioChunk) -> bytes:
        return self._event([ChunkChoice(delta=ChunkDelta(content=chunk.text))])

    def tail(self, stream: ManagedTextStream) -> bytes:
        m = stream.metrics
        reason = FINISH_REASONS.get(m.finish_reason, m.finish_reason)
        body = self._event([ChunkChoice(delta=ChunkDelta(), finish_reason=reason)], metrics=stream.metrics_dict())
        if self.include_usage:
            body += self._event([], usage=_usage(m))
        return body + SSE_DONE

    def error(self, info: ErrorInfo) -> bytes | None:
        return sse(json.dumps({"error": info.model_dump()})) + SSE_DONE
