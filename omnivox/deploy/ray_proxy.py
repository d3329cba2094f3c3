"""What Ray's HTTP proxy adds in front of the omnivox replicas: a clean end for streams whose replica died, and the
OpenAI error envelope on Ray's own back-pressure answers.

A replica that dies mid-stream cannot send its own last event. Ray's proxy then simply stops: the response is left
unfinished. This middleware runs inside the proxy (Ray loads it from `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`,
which `omnivox serve --ray` sets and the README asks `ray start` users to set) and finishes such streams the way the
server finishes a failed stream itself (stream.py): an SSE error event (+ `[DONE]` for chat), a WebSocket `error`
event and close code 1011; a raw audio body has no room for an error, so it stays cut off and the client sees an
incomplete transfer.

Ray's proxy also appends its own X-Request-ID to the replica's; the replica's one (the engine request id) is kept.
Ray answers a request that finds every slot taken and its queue full with a plain-text 429 (`BackpressureConfig`);
here it becomes the `{"error": ...}` envelope every other omnivox error has, Retry-After kept.
"""

from __future__ import annotations

import contextlib
import json

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from omnivox.server.protocol import ErrorInfo, ErrorResponse, WsError
from omnivox.server.stream import ChatSSEEncoder, SpeechSSEEncoder

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "omnivox.deploy.ray_proxy.proxy_middlewares"
WS_INTERNAL_ERROR = 1011

REPLICA_FAILED = ErrorInfo(
    message="the replica serving this stream stopped before the end (Ray restarts it); retry: new requests go to "
    "the healthy replicas",
    type="server_error", code="replica_failed",
)
REJECTED_CODES = {429: ("rate_limit_error", "all_replicas_busy"), 503: ("service_unavailable", "no_replica_ready")}
REJECTED_HINT = {429: "every stream slot of every replica is taken and the queue is full; retry after Retry-After "
                      "seconds", 503: "no replica is ready to take the request; retry in a few seconds"}


def proxy_middlewares() -> list[Middleware]:
    """The callback Ray's proxy calls at start-up (named by RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH)."""
    return [Middleware(ReplicaFaultMiddleware)]


def _header(message: Message, name: bytes) -> str:
    for key, value in message.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return ""


def _one_request_id(message: Message) -> Message:
    """Ray's proxy appends its own X-Request-ID after the replica's: keep the replica's (the engine request id)."""
    headers = message.get("headers", ())
    ids = [i for i, (key, _) in enumerate(headers) if key.lower() == b"x-request-id"]
    if len(ids) < 2:
        return message
    return {**message, "headers": [h for i, h in enumerate(headers) if i not in ids[1:]]}


class ReplicaFaultMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = {"started": False, "done": False, "sse": False, "rejected": None}

        async def watch(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                message = _one_request_id(message)
                state["started"] = True
                state["sse"] = _header(message, b"content-type").startswith("text/event-stream")
                if message["status"] in REJECTED_CODES and _header(message, b"content-type").startswith("text/"):
                    state["rejected"] = message  # Ray's own plain-text answer: replaced by the envelope below
                    return
            elif kind == "http.response.body":
                if state["rejected"] is not None:
                    if not message.get("more_body", False):
                        state["done"] = True
                        await self._send_envelope(state["rejected"], send)
                    return
                state["done"] = not message.get("more_body", False)
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            if state["started"] and not state["done"] and state["sse"]:
                with contextlib.suppress(Exception):  # the client may be gone as well
                    await send({"type": "http.response.body", "body": self._sse_error(scope["path"]),
                                "more_body": False})

    @staticmethod
    def _sse_error(path: str) -> bytes:
        if path.rstrip("/").endswith("/chat/completions"):
            return ChatSSEEncoder("", "", "", False, 0).error(REPLICA_FAILED) or b""
        return SpeechSSEEncoder("pcm").error(REPLICA_FAILED) or b""

    @staticmethod
    async def _send_envelope(start: Message, send: Send) -> None:
        status = start["status"]
        error_type, code = REJECTED_CODES[status]
        body = ErrorResponse(error=ErrorInfo(message=REJECTED_HINT[status], type=error_type, code=code))
        data = body.model_dump_json().encode()
        headers = [(k, v) for k, v in start.get("headers", ()) if k.lower() not in (b"content-type", b"content-length")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data, "more_body": False})

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = {"accepted": False, "closed": False}

        async def watch(message: Message) -> None:
            if message["type"] == "websocket.accept":
                state["accepted"] = True
            elif message["type"] == "websocket.close":
                state["closed"] = True
            await send(message)

        async def receive_watching() -> Message:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                state["closed"] = True  # the client left: nothing to finish
            return message

        try:
            await self.app(scope, receive_watching, watch)
        finally:
            if state["accepted"] and not state["closed"]:
                with contextlib.suppress(Exception):
                    await send({"type": "websocket.send", "text": json.dumps(
                        WsError(request_id=None, error=REPLICA_FAILED).model_dump())})
                    await send({"type": "websocket.close", "code": WS_INTERNAL_ERROR, "reason": "replica failed"})
