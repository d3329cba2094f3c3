"""Soak: 200 requests over every endpoint from 6 concurrent clients, a quarter of them abandoned mid-reply.
It must end with no live request, no cache held and the server's gauges back at zero. A second, shorter soak runs
the fast path (slot pools, as `omnivox serve` runs by default) with WebSocket chat sessions: it must end with zero
sessions and every session slot free."""

from __future__ import annotations

import base64
import json
import random
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from websockets.sync.client import connect

from omnivox.engine.types import SAMPLE_RATE

pytest_plugins = ("server_fixtures",)

NUM_REQUESTS = 200
CLIENTS = 6
DISCONNECT_P = 0.25
CHAT_AUDIO = {"modalities": ["text", "audio"], "audio": {"voice": "default", "format": "pcm16"}}
CHAT_PROMPT = "Say something short."  # random weights: the server's scripted DUMMY_REPLY, 2 s of audio
KINDS = ("speech_wav", "speech_pcm", "speech_sse", "chat_sse", "chat_whole", "ws_read", "ws_chat")


def _sse_audio(response: httpx.Response, disconnect: bool) -> tuple[int, dict | None]:
    """(samples received, final metrics or None)."""
    samples, metrics = 0, None
    for line in response.iter_lines():
        if not line.startswith("data: {"):
            continue
        event = json.loads(line[6:])
        assert "error" not in event, event
        data = event.get("audio") or ((event.get("choices") or [{}])[0].get("delta", {}).get("audio") or {}).get(
            "data")
        if data:
            samples += len(base64.b64decode(data)) // 2
            if disconnect:
                return samples, None
        metrics = event.get("metrics") or metrics
    return samples, metrics


def one_request(url: str, ws_url: str, index: int) -> str:
    """Run one request; returns its outcome ("ok", "disconnected" or "busy") or raises on a contract breach."""
    rng = random.Random(index)
    kind = KINDS[index % len(KINDS)]
    disconnect = rng.random() < DISCONNECT_P
    words = rng.randint(2, 4)
    text = " ".join(rng.choice(["sea", "wind", "light", "stone", "river", "cloud", "song"]) for _ in range(words))
    seed = rng.randrange(1 << 30)
    if kind.startswith("ws_"):
        with connect(ws_url, open_timeout=30) as ws:
            mode = "read" if kind == "ws_read" else "chat"
            ws.send(json.dumps({"type": "speak", "text": text if mode == "read" else CHAT_PROMPT, "mode": mode,
                                "seed": seed}))
            samples = 0
            while True:
                message = ws.recv(timeout=60)
                if isinstance(message, bytes):
                    samples += len(message) // 2
                    if disconnect:
                        return "disconnected"
                    continue
                event = json.loads(message)
                if event["type"] == "error":
                    assert event["error"]["code"] in ("engine_busy", "too_many_sessions"), event
                    return "busy"
                if event["type"] == "done":
                    assert event["finish_reason"] == "eos", event
                    assert samples == round(event["metrics"]["audio_s"] * SAMPLE_RATE)
                    return "ok"
    if kind == "chat_whole":
        body = {"messages": [{"role": "user", "content": CHAT_PROMPT}], "seed": seed, **CHAT_AUDIO,
                "audio": {"voice": "default", "format": "wav"}}
        timeout = httpx.Timeout(60, read=0.05) if disconnect else 60
        try:
            response = httpx.post(url + "/v1/chat/completions", json=body, timeout=timeout)
        except httpx.ReadTimeout:
            return "disconnected"
        if response.status_code == 429:
            assert response.headers["retry-after"]
            return "busy"
        assert response.status_code == 200, response.text
        return "ok"
    if kind == "chat_sse":
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": CHAT_PROMPT}], "stream": True,
                                              "seed": seed, **CHAT_AUDIO}
    else:
        fmt = {"speech_wav": "wav", "speech_pcm": "pcm", "speech_sse": "pcm"}[kind]
        path, body = "/v1/audio/speech", {"input": text, "response_format": fmt, "seed": seed,
                                          "stream_format": "sse" if kind == "speech_sse" else "audio"}
    with httpx.Client(timeout=60) as client, client.stream("POST", url + path, json=body) as response:
        if response.status_code == 429:
            response.read()
            assert response.headers["retry-after"] and response.json()["error"]["code"] == "engine_busy"
            return "busy"
        assert response.status_code == 200, response.read()
        if kind in ("speech_wav", "speech_pcm"):
            received = 0
            for data in response.iter_raw():
                received += len(data)
                if disconnect:
                    return "disconnected"
            samples = (received - (44 if kind == "speech_wav" else 0)) // 2
            assert abs(samples - words / 2.5 * SAMPLE_RATE) <= 1024, (samples, words)
            return "ok"
        samples, metrics = _sse_audio(response, disconnect)
        if disconnect:
            return "disconnected"
        assert metrics is not None and samples == round(metrics["audio_s"] * SAMPLE_RATE)
        return "ok"


def _metric(text: str, name: str) -> float:
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def test_soak_mixed_endpoints_with_disconnects(server):
    engine = server.service.engine
    before = _metric(httpx.get(server.url + "/metrics").text, "omnivox_requests_total")
    started = time.monotonic()
    with ThreadPoolExecutor(CLIENTS) as pool:
        outcomes = list(pool.map(lambda i: one_request(server.url, server.ws_url, i), range(NUM_REQUESTS)))
    elapsed = time.monotonic() - started
    counts = {k: outcomes.count(k) for k in ("ok", "disconnected", "busy")}
    assert sum(counts.values()) == NUM_REQUESTS
    assert counts["ok"] >= NUM_REQUESTS // 2 and counts["disconnected"] >= NUM_REQUESTS // 8, counts
    assert counts["busy"] <= NUM_REQUESTS // 10, counts  # fewer clients than slots: 429 only while a close lags

    stats = server.wait_idle(timeout_s=15)
    assert stats["live_requests"] == 0 and stats["cache_bytes"] == 0, stats
    assert engine.live_requests == 0
    metrics = httpx.get(server.url + "/metrics").text
    assert _metric(metrics, "omnivox_streams_active") == 0
    assert _metric(metrics, "omnivox_streams_queued") == 0
    ended = _metric(metrics, "omnivox_requests_total") - before
    assert ended == counts["ok"] + counts["disconnected"], (ended, counts)
    print(f"soak: {counts} in {elapsed:.1f} s")


def test_soak_fast_path_with_websocket_chat_sessions(fast_server):
    requests, clients = 28, 3  # 3 clients on 3 streams and 2 WebSocket chat sessions: some 429s, no leak
    slots = fast_server.service.engine.stats()["max_sessions"]
    with ThreadPoolExecutor(clients) as pool:
        outcomes = list(pool.map(lambda i: one_request(fast_server.url, fast_server.ws_url, i), range(requests)))
    counts = {k: outcomes.count(k) for k in ("ok", "disconnected", "busy")}
    # on a CPU every stream runs slower than realtime, and a disconnected stream keeps its slot until the server next
    # tries to send, so with as many clients as slots most requests meet a 429; the point here is that nothing leaks
    assert sum(counts.values()) == requests and counts["ok"] >= 2 and counts["busy"] > 0, counts
    stats = fast_server.wait_idle(timeout_s=15)
    assert stats["live_requests"] == 0 and stats["cache_bytes"] == 0, stats
    assert stats["sessions_open"] == 0 and stats["session_slots_free"] == slots, stats
    metrics = httpx.get(fast_server.url + "/metrics").text
    assert _metric(metrics, "omnivox_sessions_open") == 0
    assert _metric(metrics, "omnivox_session_slots_free") == slots
    assert _metric(metrics, "omnivox_ws_sessions") == 0
    assert _metric(metrics, "omnivox_streams_active") == 0
    print(f"fast soak: {counts}")
