"""The HTTP and WebSocket contract of `omnivox serve`, over loopback, with the real tiny engine on the CPU."""

from __future__ import annotations

import base64
import gc
import io
import json
import struct
import threading
import time
import wave

import httpx
import numpy as np
import pytest
from websockets.sync.client import connect

from omnivox.audio import STREAMING_SIZE
from omnivox.engine.types import SAMPLE_RATE, SamplingParams
from omnivox.server.app import build_app
from omnivox.server.serving import DUMMY_REPLY, ServerConfig

pytest_plugins = ("server_fixtures",)  # the engine and server fixtures

CHAT_AUDIO = {"modalities": ["text", "audio"], "audio": {"voice": "default", "format": "pcm16"}}
SAMPLES_PER_TOKEN = 512
MAX_CHUNK_SAMPLES = 25 * SAMPLES_PER_TOKEN  # a streaming chunk is at most 25 audio tokens (fact sheet)
WORDS_PER_SECOND = 2.5  # the server's scripted speaking rate with random weights
LONG_TEXT = " ".join(["the quick brown fox jumps over the lazy dog"] * 3)  # 27 words: 10.8 s scripted


def speaking_seconds(text: str) -> float:
    return max(len(text.split()), 1) / WORDS_PER_SECOND


def wait_for(predicate, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def sse_events(response: httpx.Response) -> list[tuple[float, dict | str]]:
    """(arrival time, parsed event) for each `data:` line of an SSE response."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[6:]
            events.append((time.monotonic(), payload if payload == "[DONE]" else json.loads(payload)))
    return events


def assert_error(response: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"]
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return error


def close_to_scripted(num_samples: int, text: str) -> bool:
    expected = speaking_seconds(text) * SAMPLE_RATE
    return abs(num_samples - expected) <= 2 * SAMPLES_PER_TOKEN


# ----------------------------------------------------------------------------------------------- plain endpoints


def test_health_ready_models_metrics_page(server):
    assert httpx.get(server.url + "/healthz").json() == {"status": "alive"}
    ready = httpx.get(server.url + "/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert ready.json()["engine"]["live_requests"] == 0
    models = httpx.get(server.url + "/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "minicpm-o-2_6"
    metrics = httpx.get(server.url + "/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    for name in ("omnivox_ttfb_seconds", "omnivox_rtf", "omnivox_audio_seconds_total", "omnivox_streams_active",
                 "omnivox_tts_batch_size", "omnivox_llm_batch_size", "omnivox_vocoder_batch_size",
                 "omnivox_scheduler_waiting", "omnivox_stream_buffered_seconds", "omnivox_underruns", "omnivox_errors",
                 "omnivox_loop_iterations", "omnivox_llm_prompts_riding"):
        assert name in metrics.text, name
    assert 'omnivox_loop_seconds{part="tts"}' in metrics.text, "the loop's time by part of the iteration"
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/v1/stream" in page.text and "AudioContext" in page.text


def test_not_ready_until_engine_built_and_warmed(server_engine, server_factory):
    release = threading.Event()

    def slow_factory():
        release.wait(30)
        return server_engine

    with server_factory(build_app(slow_factory, ServerConfig(dummy_weights=True))) as live:
        assert httpx.get(live.url + "/healthz").status_code == 200
        ready = httpx.get(live.url + "/readyz")
        assert ready.status_code == 503 and ready.headers["retry-after"] and ready.json()["status"] == "loading"
        response = httpx.post(live.url + "/v1/audio/speech", json={"input": "Hello there."})
        assert_error(response, 503, "engine_not_ready")
        assert response.headers["retry-after"]
        release.set()
        live.wait_ready()
        assert httpx.post(live.url + "/v1/audio/speech", json={"input": "Hello there."}).status_code == 200
        assert live.wait_idle()["live_requests"] == 0



def test_start_up_objects_are_frozen_before_ready(server_engine, server_factory):
    """Full garbage collections must not walk what start-up made (a 0.2 s stall of every stream otherwise)."""
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    with server_factory(build_app(server_engine, ServerConfig(dummy_weights=True, warmup=False))) as live:
        live.wait_ready()
        assert gc.get_freeze_count() > 0, "the heap is frozen by the time the server says it is ready"


# ----------------------------------------------------------------------------------------------- /v1/audio/speech


def test_speech_streams_wav(server):
    text = "Streaming speech comes out in several chunks before the end."
    arrivals, body = [], b""
    with httpx.stream("POST", server.url + "/v1/audio/speech",
                      json={"model": "minicpm-o-2_6", "input": text, "voice": "default", "response_format": "wav",
                            "seed": 7}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "audio/wav"
        assert response.headers["x-omnivox-seed"] == "7"
        assert response.headers["x-request-id"].startswith("speech-")
        for data in response.iter_raw():
            arrivals.append(time.monotonic())
            body += data
    riff, riff_size, wave_id = struct.unpack_from("<4sI4s", body)
    assert (riff, wave_id, riff_size) == (b"RIFF", b"WAVE", STREAMING_SIZE)  # streaming header: length unknown
    with wave.open(io.BytesIO(body[:40] + struct.pack("<I", len(body) - 44) + body[44:])) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (SAMPLE_RATE, 1, 2)
        num_samples = wav.getnframes()
    assert close_to_scripted(num_samples, text)
    assert len(arrivals) >= 3, "the body should arrive in several pieces"


def test_speech_pcm_sse_events_match_metrics(server):
    text = "Read this sentence aloud, please."
    with httpx.stream("POST", server.url + "/v1/audio/speech",
                      json={"input": text, "response_format": "pcm", "stream_format": "sse"}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [e for _, e in sse_events(response)]
    deltas, done = events[:-1], events[-1]
    assert len(deltas) >= 2 and all(e["type"] == "speech.audio.delta" for e in deltas)
    assert done["type"] == "speech.audio.done" and set(done["usage"]) == {"input_tokens", "output_tokens",
                                                                          "total_tokens"}
    pcm = b"".join(base64.b64decode(e["audio"]) for e in deltas)
    assert len(pcm) // 2 == round(done["metrics"]["audio_s"] * SAMPLE_RATE)
    assert close_to_scripted(len(pcm) // 2, text)
    assert done["metrics"]["finish_reason"] == "eos" and done["metrics"]["ttfb_s"] > 0
    milestones = done["metrics"]["first_audio_milestones"]
    assert list(milestones) == ["admitted", "speaking", "audio"] and milestones["audio"] <= done["metrics"]["ttfb_s"]
    metrics = httpx.get(server.url + "/metrics").text
    assert 'omnivox_first_audio_milestone_seconds_count{endpoint="speech",milestone="speaking"}' in metrics


def test_raw_pcm_and_same_seed_same_audio(server):
    bodies = []
    for _ in range(2):
        response = httpx.post(server.url + "/v1/audio/speech",
                              json={"input": "Same seed, same voice.", "response_format": "pcm", "seed": 3})
        assert response.status_code == 200 and response.headers["content-type"] == "audio/pcm"
        bodies.append(response.content)
    assert bodies[0] == bodies[1] and len(bodies[0]) % 2 == 0


# ----------------------------------------------------------------------------------------------- /v1/chat/completions


def test_chat_stream_chunks(server):
    body = {"messages": [{"role": "user", "content": "Hi, how are you?"}], "stream": True, "seed": 1,
            "stream_options": {"include_usage": True}, **CHAT_AUDIO}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        events = sse_events(response)
    payloads = [e for _, e in events]
    assert payloads[-1] == "[DONE]"
    first, *audio_chunks = payloads[:-3]
    finish, usage = payloads[-3], payloads[-2]
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"] == {"role": "assistant"}
    assert len(audio_chunks) >= 3
    audio_ids = {c["choices"][0]["delta"]["audio"]["id"] for c in audio_chunks}
    assert len(audio_ids) == 1 and all(c["id"] == first["id"] for c in audio_chunks)
    pcm = b"".join(base64.b64decode(c["choices"][0]["delta"]["audio"]["data"]) for c in audio_chunks)
    transcript = "".join(c["choices"][0]["delta"]["audio"]["transcript"] for c in audio_chunks)
    assert finish["choices"][0]["finish_reason"] == "stop" and finish["metrics"]["finish_reason"] == "eos"
    assert len(pcm) // 2 == round(finish["metrics"]["audio_s"] * SAMPLE_RATE)
    # the standard workload's warm-up prompt gets its scripted reply and length (4.8 s) with random weights
    assert transcript == finish["metrics"]["reply_text"] and transcript.startswith("I'm doing well")
    assert abs(len(pcm) // 2 - 4.8 * SAMPLE_RATE) <= 2 * SAMPLES_PER_TOKEN
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] > 0
    times = [t for t, _ in events]
    assert times[len(audio_chunks) // 2] < times[-1], "chunks must arrive before the response ends"
    # the streamed reply's audio id stands for its transcript in the next turn
    follow_up = {**body, "stream": False, "audio": {"voice": "default", "format": "pcm16"}, "messages": [
        *body["messages"], {"role": "assistant", "audio": {"id": audio_ids.pop()}},
        {"role": "user", "content": "Good."}]}
    assert httpx.post(server.url + "/v1/chat/completions", json=follow_up).status_code == 200


def test_chat_whole_reply_wav_and_multi_turn(server):
    body = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a joke."}],
            "modalities": ["text", "audio"], "audio": {"voice": "default", "format": "wav"}}
    response = httpx.post(server.url + "/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    reply = response.json()
    assert reply["object"] == "chat.completion" and reply["choices"][0]["finish_reason"] == "stop"
    message = reply["choices"][0]["message"]
    assert message["role"] == "assistant" and message["content"] is None
    assert message["audio"]["transcript"] == reply["metrics"]["reply_text"]
    assert message["audio"]["transcript"].split()[-1] == DUMMY_REPLY.split()[-1]
    with wave.open(io.BytesIO(base64.b64decode(message["audio"]["data"]))) as wav:
        assert wav.getframerate() == SAMPLE_RATE and close_to_scripted(wav.getnframes(), DUMMY_REPLY)
    assert reply["usage"]["total_tokens"] == reply["usage"]["prompt_tokens"] + reply["usage"]["completion_tokens"]

    follow_up = {**body, "messages": body["messages"] + [
        {"role": "assistant", "audio": {"id": message["audio"]["id"]}},
        {"role": "user", "content": [{"type": "text", "text": "Another one."}]},
    ]}
    second = httpx.post(server.url + "/v1/chat/completions", json=follow_up)
    assert second.status_code == 200, second.text
    assert second.json()["usage"]["prompt_tokens"] > reply["usage"]["prompt_tokens"]  # the history was prefilled

    follow_up["messages"][2] = {"role": "assistant", "audio": {"id": "audio_unknown"}}
    assert_error(httpx.post(server.url + "/v1/chat/completions", json=follow_up), 400,
                 param="messages[2].audio.id")
    assert server.wait_idle()["live_requests"] == 0


# ----------------------------------------------------------------------------------------------- bad input

SPEECH_BAD = [
    ({"input": ""}, "input"),
    ({"input": "   \n"}, "input"),
    ({"input": "x" * 401}, "input"),
    ({"input": "hi", "voice": "darth"}, "voice"),  # OpenAI's names (nova, ...) are aliases: test_server_api.py
    ({"input": "hi", "response_format": "ogg"}, "response_format"),
    ({"input": "hi", "stream_format": "chunks"}, "stream_format"),
    ({"input": "hi", "speed": 1.5}, "speed"),
    ({"input": "hi", "instructions": "whisper"}, "instructions"),
    ({"input": 5}, "input"),
    ({"voice": "default"}, "input"),
]


@pytest.mark.parametrize(("body", "param"), SPEECH_BAD)
def test_speech_bad_input(server, body, param):
    error = assert_error(httpx.post(server.url + "/v1/audio/speech", json=body), 400, param=param)
    if param in ("voice", "response_format"):
        assert "default" in error["message"] or "wav" in error["message"]  # names what is supported


CHAT_BAD = [
    {"messages": [], **CHAT_AUDIO},
    {"messages": [{"role": "user", "content": "hi"}], "modalities": ["text", "audio"]},  # audio without `audio`
    {"messages": [{"role": "user", "content": "hi"}], "modalities": ["text"], "audio": CHAT_AUDIO["audio"]},
    {"messages": [{"role": "user", "content": "hi"}], "stream": True, **CHAT_AUDIO,
     "audio": {"voice": "default", "format": "wav"}},
    {"messages": [{"role": "user", "content": "hi"}], **CHAT_AUDIO, "audio": {"voice": "darth", "format": "pcm16"}},
    {"messages": [{"role": "user", "content": "hi"}], **CHAT_AUDIO, "audio": {"voice": "default", "format": "ogg"}},
    {"messages": [{"role": "assistant", "content": "hi"}], **CHAT_AUDIO},
    {"messages": [{"role": "user", "content": " "}], **CHAT_AUDIO},
    {"messages": [{"role": "user", "content": "hi" * 300}], **CHAT_AUDIO},
    {"messages": [{"role": "robot", "content": "hi"}], **CHAT_AUDIO},
    {"messages": [{"role": "user", "content": "hi"}], "temperature": 9, **CHAT_AUDIO},
    {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000, **CHAT_AUDIO},  # does not fit a session
]


@pytest.mark.parametrize("body", CHAT_BAD)
def test_chat_bad_input(server, body):
    assert_error(httpx.post(server.url + "/v1/chat/completions", json=body), 400)


def test_bad_json_unknown_model_unknown_route(server):
    for raw in (b'{"input": "hi"', b"[1, 2]", b"not json"):
        response = httpx.post(server.url + "/v1/audio/speech", content=raw,
                              headers={"content-type": "application/json"})
        assert_error(response, 400)
    assert "JSON" in assert_error(httpx.post(server.url + "/v1/audio/speech", content=b'{"input": "hi"',
                                             headers={"content-type": "application/json"}), 400, "json_invalid")[
        "message"]
    error = assert_error(httpx.post(server.url + "/v1/audio/speech", json={"input": "hi", "model": "/etc/passwd"}),
                         404, "model_not_found", "model")
    assert "minicpm-o-2_6" in error["message"]
    assert_error(httpx.get(server.url + "/v1/nothing"), 404, "not_found")
    assert_error(httpx.delete(server.url + "/v1/models"), 405)


def test_busy_engine_answers_429(server):
    engine = server.service.engine
    limit = engine.stream_slots
    # forced long replies: random weights may draw EOS after a few steps, and a slot that frees itself mid-test
    # lets the "one too many" request in
    held = [engine.read_aloud("hold a slot", forced_audio_seconds=40.0) for _ in range(limit)]
    try:
        for path, body in (("/v1/audio/speech", {"input": "one too many"}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], **CHAT_AUDIO})):
            response = httpx.post(server.url + path, json=body)
            assert_error(response, 429, "engine_busy")
            assert int(response.headers["retry-after"]) >= 1
        with connect(server.ws_url) as ws:
            ws.send(json.dumps({"type": "speak", "text": "one too many"}))
            event = json.loads(ws.recv(timeout=10))
            assert event["type"] == "error" and event["error"]["code"] == "engine_busy"
    finally:
        for stream in held:
            stream.close()
    assert httpx.post(server.url + "/v1/audio/speech", json={"input": "room again"}).status_code == 200
    assert server.wait_idle()["live_requests"] == 0


# ----------------------------------------------------------------------------------------------- concurrency


def test_concurrent_streams_interleave_with_their_own_seeds(server):
    seeds = [11, 12, 13, 11]
    results: dict[int, tuple[list[float], bytes, dict]] = {}

    def run(i: int) -> None:
        with httpx.stream("POST", server.url + "/v1/audio/speech", timeout=60,
                          json={"input": "Four voices at once, each with its own seed.", "response_format": "pcm",
                                "stream_format": "sse", "seed": seeds[i]}) as response:
            assert response.status_code == 200
            events = sse_events(response)
        pcm = b"".join(base64.b64decode(e["audio"]) for _, e in events[:-1])
        results[i] = ([t for t, _ in events[:-1]], pcm, events[-1][1])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(seeds))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == list(range(len(seeds)))
    for _, pcm, done in results.values():
        assert len(pcm) // 2 == round(done["metrics"]["audio_s"] * SAMPLE_RATE)
    assert [results[i][2]["metrics"]["seed"] for i in range(4)] == seeds
    assert results[0][1] == results[3][1], "same seed, same audio, even interleaved with other requests"
    assert results[0][1] != results[1][1]
    # interleaved at chunk granularity: each stream got a chunk before some other stream had finished
    firsts = sorted(times[0] for times, _, _ in results.values())
    lasts = sorted(times[-1] for times, _, _ in results.values())
    assert firsts[-1] < lasts[0], "all four streams should have started before the first one finished"
    assert server.wait_idle()["live_requests"] == 0


# ----------------------------------------------------------------------------------------------- WebSocket


def receive_reply(ws, cancel_after: int | None = None, stop_on_error: bool = True) -> tuple[list[dict], bytes, int]:
    """(JSON events, PCM, number of binary frames) of one reply; each event notes the samples received before it."""
    events, pcm, frames = [], b"", 0
    while True:
        message = ws.recv(timeout=30)
        if isinstance(message, bytes):
            pcm += message
            frames += 1
            if cancel_after is not None and frames == cancel_after:
                ws.send(json.dumps({"type": "cancel"}))
            continue
        event = json.loads(message)
        event["_samples_before"] = len(pcm) // 2
        event["_frames_before"] = frames
        events.append(event)
        if event["type"] == "done" or (event["type"] == "error" and stop_on_error):
            return events, pcm, frames


def test_websocket_reply_and_transcript_timing(server):
    text = "The socket sends binary audio and JSON events."
    with connect(server.ws_url) as ws:
        ws.send(json.dumps({"type": "speak", "text": text, "mode": "read", "seed": 5}))
        events, pcm, frames = receive_reply(ws)
        assert events[0]["type"] == "start" and events[0]["seed"] == 5 and events[0]["sample_rate"] == SAMPLE_RATE
        done = events[-1]
        assert done["type"] == "done" and done["finish_reason"] == "eos"
        assert frames >= 3 and len(pcm) // 2 == round(done["metrics"]["audio_s"] * SAMPLE_RATE)
        assert close_to_scripted(len(pcm) // 2, text)
        transcripts = [e for e in events if e["type"] == "transcript"]
        assert "".join(e["delta"] for e in transcripts) == text
        for e in transcripts:  # each delta is announced right before the audio that starts speaking it
            assert abs(e["audio_start_s"] * SAMPLE_RATE - e["_samples_before"]) < 1

        # a second turn on the same connection continues the conversation (chat mode keeps the session)
        ws.send(json.dumps({"type": "speak", "text": "Hi, how are you?", "max_tokens": 32}))
        events, pcm, _ = receive_reply(ws)
        assert events[-1]["type"] == "done" and len(pcm) > 0
        ws.send(json.dumps({"type": "speak", "text": "And now?", "max_tokens": 32}))
        events, _, _ = receive_reply(ws)
        assert events[-1]["type"] == "done" and events[-1]["metrics"]["prompt_tokens"] < 20  # history not resent
    assert server.wait_idle()["live_requests"] == 0


def test_websocket_bad_messages_keep_the_connection(server):
    with connect(server.ws_url) as ws:
        for message, code in (("{not json", "json_invalid"), (json.dumps({"type": "dance"}), "invalid_value"),
                              (json.dumps({"type": "speak", "text": " "}), "invalid_value"), (b"\x00\x01",
                                                                                              "binary_not_supported")):
            ws.send(message)
            event = json.loads(ws.recv(timeout=10))
            assert event["type"] == "error" and event["error"]["code"] == code, event
        ws.send(json.dumps({"type": "speak", "text": LONG_TEXT, "mode": "read"}))
        ws.send(json.dumps({"type": "speak", "text": "again", "mode": "read"}))
        events, _, _ = receive_reply(ws, cancel_after=1, stop_on_error=False)
        assert [e["error"]["code"] for e in events if e["type"] == "error"] == ["request_in_flight"]
        assert events[-1]["type"] == "done"
    assert server.wait_idle()["live_requests"] == 0


def test_websocket_cancel_stops_within_a_chunk_and_frees(server):
    with connect(server.ws_url) as ws:
        ws.send(json.dumps({"type": "speak", "text": LONG_TEXT, "mode": "read"}))
        events, pcm, frames = receive_reply(ws, cancel_after=1)
        done = events[-1]
        assert done["type"] == "done" and done["finish_reason"] == "cancelled"
        assert frames <= 3
        # the engine stopped within one chunk of what was sent: at most the chunk in flight was generated unsent
        unsent = round(done["metrics"]["audio_s"] * SAMPLE_RATE) - len(pcm) // 2
        assert 0 <= unsent <= MAX_CHUNK_SAMPLES
        assert len(pcm) // 2 < speaking_seconds(LONG_TEXT) * SAMPLE_RATE / 2
        stats = server.wait_idle()
        assert stats["live_requests"] == 0 and stats["cache_bytes"] == 0
        ws.send(json.dumps({"type": "speak", "text": "Still usable after a cancel.", "mode": "read"}))
        assert receive_reply(ws)[0][-1]["finish_reason"] == "eos"


def _cancelled_total(server) -> float:
    text = httpx.get(server.url + "/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("omnivox_requests_total") and 'finish_reason="cancelled"' in line)


@pytest.mark.parametrize("endpoint", ["speech", "chat", "websocket"])
def test_disconnect_stops_generation_and_frees(server, endpoint, monkeypatch):
    engine = server.service.engine
    # the engine does not wait for the client, so the scripted chat reply is made long enough to be cut off
    monkeypatch.setattr(server.service, "_chat_forcing",
                        lambda text, extension=None: {"forced_reply": "A long story. " * 20,
                                                      "forced_audio_seconds": 30.0})
    monkeypatch.setattr(server.service, "_read_forcing", lambda text, extension=None: {"forced_audio_seconds": 30.0})
    before = _cancelled_total(server)
    if endpoint == "websocket":
        with connect(server.ws_url) as ws:
            ws.send(json.dumps({"type": "speak", "text": LONG_TEXT, "mode": "read"}))
            while not isinstance(ws.recv(timeout=30), bytes):
                pass
            assert engine.live_requests == 1
        # leaving the block closes the socket mid-reply
    else:
        path, body = (("/v1/audio/speech", {"input": LONG_TEXT, "response_format": "pcm"}) if endpoint == "speech"
                      else ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Tell me a story."}],
                                                     "stream": True, **CHAT_AUDIO}))
        with httpx.Client() as client, client.stream("POST", server.url + path, json=body) as response:
            body_chunks = response.iter_raw()  # kept: a dropped iterator closes the response at once
            next(body_chunks)
            assert engine.live_requests == 1
        # leaving the block closes the connection mid-body
    stats = server.wait_idle()
    assert stats["live_requests"] == 0 and stats["cache_bytes"] == 0
    assert wait_for(lambda: _cancelled_total(server) == before + 1), "the stream should end as cancelled"


def break_after_first_chunk(monkeypatch, engine, method: str) -> None:
    """Make the engine fail (a RuntimeError, as a lost device raises) after the first chunk of `method`'s streams:
    the vocoder raises from its second window on."""
    real, calls = engine.vocoder.decode, []

    def failing(windows):
        calls.append(len(windows))
        if len(calls) > 1:
            raise RuntimeError("device lost")
        return real(windows)

    monkeypatch.setattr(engine.vocoder, "decode", failing)


def test_generation_failure_mid_stream_is_in_band(server, monkeypatch):
    break_after_first_chunk(monkeypatch, server.service.engine, "stream")
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True, **CHAT_AUDIO}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        payloads = [e for _, e in sse_events(response)]
    assert payloads[-1] == "[DONE]" and payloads[-2]["error"]["type"] == "server_error"
    assert "internal" in payloads[-2]["error"]["message"]

    monkeypatch.undo()
    break_after_first_chunk(monkeypatch, server.service.engine, "read_aloud")
    with connect(server.ws_url) as ws:
        ws.send(json.dumps({"type": "speak", "text": "This will break.", "mode": "read"}))
        events, pcm, frames = receive_reply(ws)
        assert events[0]["type"] == "start" and frames == 1 and events[-1]["type"] == "error"
        assert events[-1]["request_id"] == events[0]["request_id"]
        monkeypatch.undo()
        ws.send(json.dumps({"type": "speak", "text": "Working again.", "mode": "read"}))
        assert receive_reply(ws)[0][-1]["type"] == "done"
    assert server.wait_idle()["live_requests"] == 0


def test_sampling_params_reach_the_engine(server, monkeypatch):
    seen = {}
    real_stream = server.service.engine.stream

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real_stream(*args, **kwargs)

    monkeypatch.setattr(server.service.engine, "stream", spy)
    body = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0.3, "top_p": 0.5, "max_tokens": 17,
            "seed": 99, **CHAT_AUDIO}
    assert httpx.post(server.url + "/v1/chat/completions", json=body).status_code == 200
    assert seen["seed"] == 99 and seen["history"] is None
    assert seen["sampling"] == SamplingParams(temperature=0.3, top_p=0.5, max_new_tokens=17)
    assert np.isclose(seen["sampling"].temperature, 0.3)
