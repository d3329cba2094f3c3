"""Request-body limits as ASGI middleware: a size cap (413) and a read timeout (408), both before any engine work.

uvicorn bounds headers, connections (`limit_concurrency`) and WebSocket messages (`ws_max_size`) itself; it reads a
request body for as long as the client takes and of any size, so those two bounds live here. The timeout applies
to each read while the body is incomplete, never to a streaming response's wait for the client's disconnect.
"""

from __future__ import annotations

import anyio
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


def too_large(max_bytes: int) -> HTTPException:
    return HTTPException(413, f"the request body is larger than this server's limit of {max_bytes} bytes; send a "
                              "smaller body (the operator sets the limit with --max-body-bytes)")


class BodyLimits:
    def __init__(self, app: ASGIApp, max_bytes: int, read_timeout_s: float):
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout_s = read_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        received, complete = 0, False

        async def limited_receive() -> Message:
            nonlocal received, complete
            if complete:
                return await receive()
            with anyio.move_on_after(self.read_timeout_s) as scope_:
                message = await receive()
            if scope_.cancelled_caught:
                raise HTTPException(408, f"the request body did not arrive within {self.read_timeout_s:g} s; send "
                                         "the whole body without pausing")
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if received > self.max_bytes:
                    raise too_large(self.max_bytes)
            return message

        async def refused() -> Message:  # declared too large: refused before reading a byte
            raise too_large(self.max_bytes)

        declared = dict(scope.get("headers", ())).get(b"content-length", b"")
        too_big = declared.isdigit() and int(declared) > self.max_bytes
        await self.app(scope, refused if too_big else limited_receive, send)
