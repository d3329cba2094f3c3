"""One streamed request as a load generator sees it, shared by `omnivox loadtest` and `omnivox capacity`.

Both commands must read a reply by the same rules (what counts as an error, which bytes are audio, which event
carries the server's metrics), or their figures would not be comparable. Failures are returned, never raised: a
load generator records a failed request and carries on with the others.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np


def audio_of(event: dict[str, Any]) -> bytes:
    """The PCM16 bytes of one SSE event: a speech delta or a chat delta's audio (empty for text-only events)."""
    if event.get("type") == "speech.audio.delta":
        return base64.b64decode(event["audio"])
    for choice in event.get("choices") or ():
        data = ((choice.get("delta") or {}).get("audio") or {}).get("data")
        if data:
            return base64.b64decode(data)
    return b""


async def _http_error(response: httpx.Response) -> str:
    """"HTTP <status>: <message>", the message taken from the OpenAI-shaped error body when there is one."""
    text = (await response.aread()).decode(errors="replace")
    try:
        message = json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = text[:200]
    return f"HTTP {response.status_code}: {message}"


async def stream_reply(client: httpx.AsyncClient, url: str, path: str, body: dict[str, Any],
                       on_audio: Callable[[np.ndarray], None]) -> tuple[str | None, str | None, dict[str, Any]]:
    """POST `body` to `url + path` and read the SSE reply to its end, calling `on_audio` with each event's samples
    (int16) the moment it arrives, so the caller's playback clock sees real arrival times. Returns (request id,
    error or None, the server's metrics from the last event that carried them, {} if none did)."""
    request_id: str | None = None
    server: dict[str, Any] = {}
    try:
        async with client.stream("POST", url + path, json=body) as response:
            request_id = response.headers.get("x-request-id")
            if response.status_code != 200:
                return request_id, await _http_error(response), server
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:  # the server failed after the 200: it says so in the stream
                    return request_id, f"in-band {event['error'].get('code')}: {event['error'].get('message')}", server
                on_audio(np.frombuffer(audio_of(event), dtype="<i2"))
                server = event.get("metrics") or server
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        return request_id, f"{type(e).__name__}: {e}", server
    return request_id, None, server
