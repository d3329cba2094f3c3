"""What OpenAI-style clients expect (issue 14), through the official `openai` client on loopback with the tiny
engine: models.retrieve, voices and their aliases, every output format decoded back by PyAV, resampled rates,
text-only chat, and read-aloud fed text piece by piece over the WebSocket."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import time

import av
import httpx
import openai
import pytest
from websockets.sync.client import connect

from omnivox.server.app import build_app
from omnivox.server.protocol import OPENAI_VOICES
from omnivox.server.serving import DUMMY_REPLY

pytest_plugins = ("server_fixtures",)

MODEL = "minicpm-o-2_6"
TEXT = "Hello from omnivox, this is a test."  # 7 words: 2.8 s scripted with random weights
TEXT_SECONDS = 7 / 2.5
SAMPLES_PER_TOKEN = 512
LONG_TEXT = "The quick brown fox jumps over the lazy dog, then it runs far away into the green forest to rest."


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="not-needed", max_retries=0)


def decode(data: bytes, container: str | None = None, rate: int | None = None) -> tuple[int, int]:
    """(samples, sample rate) of an encoded stream, decoded by PyAV; headerless formats need container and rate."""
    options = {"sample_rate": str(rate), "ch_layout": "mono"} if rate else {}
    with av.open(io.BytesIO(data), format=container, options=options) as source:
        stream = source.streams.audio[0]
        samples = sum(frame.samples for frame in source.decode(stream))
        return samples, stream.codec_context.sample_rate


def assert_duration(samples: int, rate: int, seconds: float) -> None:
    # scripted audio ends within a token of the target; codecs add at most ~2 frames of priming and padding
    tolerance_s = SAMPLES_PER_TOKEN / 24000 + 2 * 1152 / min(rate, 24000) + 0.01
    assert abs(samples / rate - seconds) <= tolerance_s, (samples, rate, seconds)


# ----------------------------------------------------------------------------------------------- models, voices


def test_models_retrieve_and_unknown_model(client, server):
    card = client.models.retrieve(MODEL)
    assert card.id == MODEL and card.object == "model"
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("gpt-4o-mini-tts")
    error = info.value.body
    assert error["code"] == "model_not_found" and MODEL in error["message"]
    assert [m.id for m in client.models.list()] == [MODEL]


def test_voices_list_and_aliases(client, server):
    voices = httpx.get(server.url + "/v1/audio/voices").json()
    assert voices["object"] == "list"
    assert [(v["id"], v["aliases"]) for v in voices["data"]] == [("default", list(OPENAI_VOICES))]
    default = client.audio.speech.create(model=MODEL, voice="default", input=TEXT, response_format="pcm",
                                         extra_body={"seed": 3}).content
    aliased = client.audio.speech.create(model=MODEL, voice="nova", input=TEXT, response_format="pcm",
                                         extra_body={"seed": 3}).content
    assert aliased == default and len(default) > 0  # an alias is the default voice itself
    with pytest.raises(openai.BadRequestError) as info:
        client.audio.speech.create(model=MODEL, voice="darth", input=TEXT)
    body = info.value.body
    assert body["param"] == "voice" and "default" in body["message"] and "alloy" in body["message"]


def test_voice_aliases_can_be_turned_off(server, server_engine, server_factory):
    config = dataclasses.replace(server.service.config, voice_aliases=(), warmup=False)
    with server_factory(build_app(server_engine, config)) as live:
        live.wait_ready()
        assert httpx.get(live.url + "/v1/audio/voices").json()["data"] == [
            {"id": "default", "object": "voice", "aliases": []}]
        response = httpx.post(live.url + "/v1/audio/speech", json={"input": TEXT, "voice": "alloy"})
        assert response.status_code == 400 and response.json()["error"]["param"] == "voice"


# ----------------------------------------------------------------------------------------------- formats, rates

FORMATS = [  # (response_format, sample_rate asked, container for decoding, content type, decoded rate)
    ("mp3", None, None, "audio/mpeg", 24000),
    ("opus", None, None, "audio/ogg", 48000),  # Opus is always decoded at 48 kHz
    ("aac", None, None, "audio/aac", 24000),
    ("flac", None, None, "audio/flac", 24000),
    ("wav", None, None, "audio/wav", 24000),
    ("pcm_mulaw", None, "mulaw", "audio/basic", 8000),
    ("mp3", 44100, None, "audio/mpeg", 44100),
    ("flac", 16000, None, "audio/flac", 16000),
    ("wav", 8000, None, "audio/wav", 8000),
    ("pcm", 48000, "s16le", "audio/pcm", 48000),
]


@pytest.mark.parametrize(("fmt", "rate", "container", "media_type", "decoded_rate"), FORMATS)
def test_speech_formats_decode_to_the_right_duration_and_rate(client, fmt, rate, container, media_type,
                                                              decoded_rate):
    extra = {"sample_rate": rate} if rate else {}
    response = client.audio.speech.with_raw_response.create(model=MODEL, voice="alloy", input=TEXT,
                                                            response_format=fmt, extra_body=extra)
    assert response.headers["content-type"] == media_type
    assert int(response.headers["x-sample-rate"]) == (rate or (8000 if fmt == "pcm_mulaw" else 24000))
    samples, decoded = decode(response.content, container, decoded_rate if container else None)
    assert decoded == decoded_rate
    assert_duration(samples, decoded, TEXT_SECONDS)


def test_default_wav_and_pcm_bytes_unchanged(client):
    """wav/pcm at 24 kHz stay the project's own PCM16 bytes: the wav is the streaming header + the pcm body."""
    pcm = client.audio.speech.create(model=MODEL, voice="default", input=TEXT, response_format="pcm",
                                     extra_body={"seed": 5}).content
    wav = client.audio.speech.create(model=MODEL, voice="default", input=TEXT, response_format="wav",
                                     extra_body={"seed": 5, "sample_rate": 24000}).content
    assert wav[:4] == b"RIFF" and wav[44:] == pcm


def test_mp3_streams_chunk_by_chunk_over_sse(server):
    """Each audio chunk leaves as its own delta of the mp3 stream; concatenated they are one decodable mp3."""
    with httpx.stream("POST", server.url + "/v1/audio/speech", json={
            "input": TEXT, "voice": "echo", "response_format": "mp3", "stream_format": "sse"}) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    deltas = [base64.b64decode(e["audio"]) for e in events if e["type"] == "speech.audio.delta"]
    assert events[-1]["type"] == "speech.audio.done"
    chunks = TEXT_SECONDS * 24000 / (25 * SAMPLES_PER_TOKEN)  # 25-token TTS calls
    assert len(deltas) >= int(chunks) and all(deltas)
    samples, rate = decode(b"".join(deltas))
    assert rate == 24000
    assert_duration(samples, rate, TEXT_SECONDS)


@pytest.mark.parametrize(("body", "param"), [
    ({"response_format": "ogg"}, "response_format"),
    ({"response_format": "opus", "sample_rate": 44100}, None),  # Opus has no 44.1 kHz
    ({"response_format": "pcm_mulaw", "sample_rate": 16000}, None),
    ({"sample_rate": 11025}, "sample_rate"),
])
def test_bad_format_or_rate_is_a_400_that_lists_the_choices(server, body, param):
    response = httpx.post(server.url + "/v1/audio/speech", json={"input": TEXT, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert "use one of" in error["message"] or "supported formats are" in error["message"]


def test_chat_whole_reply_in_mp3(client):
    completion = client.chat.completions.create(
        model=MODEL, modalities=["text", "audio"], audio={"voice": "shimmer", "format": "mp3"},
        messages=[{"role": "user", "content": "Hi, how are you?"}])
    audio = completion.choices[0].message.audio
    samples, rate = decode(base64.b64decode(audio.data))
    assert rate == 24000 and samples > 0 and audio.transcript


# ----------------------------------------------------------------------------------------------- text-only chat


def test_text_only_chat_whole(client, server):
    completion = client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "Hi, how are you?"}])  # no audio: a text reply
    choice = completion.choices[0]
    scripted = server.service._chat_forcing("Hi, how are you?")["forced_reply"]  # a prompt of the workload
    assert choice.message.content == scripted and "!" in scripted and choice.message.audio is None
    assert choice.finish_reason == "stop" and completion.object == "chat.completion"
    assert completion.usage.completion_tokens == completion.usage.total_tokens - completion.usage.prompt_tokens > 0
    cut = client.chat.completions.create(model=MODEL, modalities=["text"], max_tokens=2,
                                         messages=[{"role": "user", "content": "Hi"}])
    assert cut.choices[0].finish_reason == "length" and DUMMY_REPLY.startswith(cut.choices[0].message.content)
    assert server.wait_idle()["live_requests"] == 0


def test_text_only_chat_streamed_multi_turn(client, server):
    stream = client.chat.completions.create(
        model=MODEL, modalities=["text"], stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                  {"role": "user", "content": "Tell me more."}])
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) > 1 and "".join(deltas) == DUMMY_REPLY
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["stop"] and chunks[-1].usage.completion_tokens > 0
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    metrics = httpx.get(server.url + "/metrics").text
    assert 'omnivox_requests_total{endpoint="chat_text",finish_reason="eos"}' in metrics
    assert server.wait_idle()["cache_bytes"] == 0


# ----------------------------------------------------------------------------------------------- incremental read


def receive_until(ws, predicate, received: list, timeout_s: float = 20.0) -> None:
    """Receive frames into `received` until predicate(received) holds (fails after timeout_s)."""
    deadline = time.monotonic() + timeout_s
    while not predicate(received):
        assert time.monotonic() < deadline, f"gave up waiting; got {received[-3:]}"
        try:
            received.append(ws.recv(timeout=0.05))
        except TimeoutError:
            pass


def events(received: list) -> list[dict]:
    return [json.loads(m) for m in received if isinstance(m, str)]


def test_websocket_read_aloud_of_text_appended_piece_by_piece(server):
    words = LONG_TEXT.split(" ")
    received: list = []
    with connect(server.ws_url) as ws:
        ws.send(json.dumps({"type": "input.append", "text": words[0], "seed": 7}))
        for word in words[1:]:
            time.sleep(0.02)  # the client's LLM takes its time
            ws.send(json.dumps({"type": "input.append", "text": " " + word}))
        # audio must come while the input is still open: a server that waited for input.done would time out here
        receive_until(ws, lambda r: any(isinstance(m, bytes) and m for m in r), received)
        assert not any(e["type"] == "done" for e in events(received))
        ws.send(json.dumps({"type": "input.done"}))
        receive_until(ws, lambda r: any(e["type"] in ("done", "error") for e in events(r)), received)
    kinds = events(received)
    assert kinds[0]["type"] == "start" and kinds[0]["seed"] == 7
    done = kinds[-1]
    assert done["type"] == "done" and done["finish_reason"] == "eos", done
    assert "".join(e["delta"] for e in kinds if e["type"] == "transcript") == LONG_TEXT
    samples = sum(len(m) // 2 for m in received if isinstance(m, bytes))
    assert abs(samples - len(words) / 2.5 * 24000) <= 2 * SAMPLES_PER_TOKEN  # scripted: words / 2.5 s
    assert done["metrics"]["first_audio_after_text_s"] >= 0
    assert server.wait_idle()["cache_bytes"] == 0


def test_websocket_incremental_cancel_and_misuse(server):
    received: list = []
    with connect(server.ws_url) as ws:
        ws.send(json.dumps({"type": "input.done"}))  # nothing open
        receive_until(ws, lambda r: events(r), received)
        assert events(received)[0]["error"]["code"] == "no_input"
        ws.send(json.dumps({"type": "input.append", "text": LONG_TEXT}))
        receive_until(ws, lambda r: any(isinstance(m, bytes) for m in r), received)
        ws.send(json.dumps({"type": "speak", "text": "Hello", "mode": "read"}))  # one reply at a time
        ws.send(json.dumps({"type": "cancel"}))
        receive_until(ws, lambda r: any(e["type"] == "done" for e in events(r)), received)
        codes = [e["error"]["code"] for e in events(received) if e["type"] == "error"]
        assert codes == ["no_input", "request_in_flight"]
        assert events(received)[-1]["finish_reason"] == "cancelled"
        # the connection takes a new incremental reply after the cancel
        received.clear()
        ws.send(json.dumps({"type": "input.append", "text": "Short one."}))
        ws.send(json.dumps({"type": "input.done"}))
        receive_until(ws, lambda r: any(e["type"] == "done" for e in events(r)), received)
        assert events(received)[-1]["finish_reason"] == "eos"
    assert server.wait_idle()["cache_bytes"] == 0
