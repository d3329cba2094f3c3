"""Thin handlers: parse (FastAPI + protocol.py), ask the SpeechService, wrap the answer. Errors are raised, and
build_app's handlers turn them into the OpenAI error envelope."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request, WebSocket
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response

from omnivox.server.audio_formats import FORMATS
from omnivox.server.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
    SpeechRequest,
    VoiceList,
)
from omnivox.server.serving import SpeechService
from omnivox.server.stream import ChatSSEEncoder, EngineStreamResponse, RawAudioEncoder, SpeechSSEEncoder
from omnivox.server.text_chat import TextChatSSEEncoder, complete_text_chat, open_text_chat
from omnivox.server.websocket import WebSocketConversation

STATIC = Path(__file__).parent / "static"
ERRORS = {code: {"model": ErrorResponse} for code in (400, 404, 429, 500, 503)}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

router = APIRouter()


def _service(request: Request | WebSocket) -> SpeechService:
    return request.app.state.service


def _stream_headers(stream, extra: dict[str, str] | None = None) -> dict[str, str]:
    return {"X-Request-Id": stream.request_id, "X-Omnivox-Seed": str(stream.seed), **(extra or {})}


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html")


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "alive"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    service = _service(request)
    body = {"status": service.status, "model": service.config.served_model_name}
    if service.status != "ready":
        body["error"] = service.failure
        return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})
    return JSONResponse({**body, "engine": service.stats()})


@router.get("/metrics", response_class=PlainTextResponse,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                             "description": "Prometheus text exposition format"}})
async def metrics(request: Request) -> Response:
    service = _service(request)
    service.refresh_gauges()
    m = service.metrics
    return Response(m.render(), media_type=m.content_type)


@router.get("/v1/models", response_model=ModelList)
async def models(request: Request) -> ModelList:
    return _service(request).models()


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses={404: {"model": ErrorResponse}})
async def model(model_id: str, request: Request) -> ModelCard:
    return _service(request).model(model_id)


@router.get("/v1/audio/voices", response_model=VoiceList)
async def voices(request: Request) -> VoiceList:
    return _service(request).voices()


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses=ERRORS)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    service = _service(request)
    if not body.wants_audio:
        return await _text_chat(service, body, request)
    if not body.stream:
        return await service.complete_chat(body, request.is_disconnected)
    stream = await service.open_chat(body)
    encoder = ChatSSEEncoder(stream.request_id, f"audio_{stream.request_id}", service.config.served_model_name,
                             bool(body.stream_options and body.stream_options.include_usage), stream.created,
                             service.remember_transcript)
    return EngineStreamResponse(stream, encoder, "text/event-stream", service.describe_error,
                                _stream_headers(stream, SSE_HEADERS))


async def _text_chat(service: SpeechService, body: ChatCompletionRequest, request: Request):
    """modalities ["text"] (or no `audio`): an ordinary chat completion from the LLM alone."""
    if not body.stream:
        return await complete_text_chat(service, body, request.is_disconnected)
    stream = await open_text_chat(service, body)
    encoder = TextChatSSEEncoder(stream.request_id, service.config.served_model_name,
                                 bool(body.stream_options and body.stream_options.include_usage), stream.created)
    return EngineStreamResponse(stream, encoder, "text/event-stream", service.describe_error,
                                _stream_headers(stream, SSE_HEADERS))


@router.post("/v1/audio/speech", responses={200: {"content": {f.media_type: {} for f in FORMATS.values()}}, **ERRORS})
async def audio_speech(body: SpeechRequest, request: Request) -> EngineStreamResponse:
    service = _service(request)
    stream = await service.open_speech(body)
    if body.stream_format == "sse":
        return EngineStreamResponse(stream, SpeechSSEEncoder(body.response_format, body.sample_rate),
                                    "text/event-stream", service.describe_error, _stream_headers(stream, SSE_HEADERS))
    encoder = RawAudioEncoder(body.response_format, body.sample_rate)
    headers = _stream_headers(stream, {"X-Sample-Rate": str(encoder.writer.sample_rate)})
    return EngineStreamResponse(stream, encoder, encoder.writer.media_type, service.describe_error, headers)


@router.websocket("/v1/stream")
async def stream_socket(websocket: WebSocket) -> None:
    await WebSocketConversation(websocket, _service(websocket)).run()
