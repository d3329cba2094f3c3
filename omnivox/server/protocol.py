"""Wire types: OpenAI-shaped requests, responses, stream chunks and the one error envelope.

Only the default voice exists (OpenAI's voice names are accepted as its aliases, as configured); the engine makes
24 kHz mono, which audio_formats.py encodes and resamples. Unknown formats and rates are rejected here with a message
that lists what is supported. Limits that depend on the server's configuration (voices, input length) are checked in
`serving.py`; everything that depends only on the request is checked here.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from omnivox.errors import (
    ContextTooLong,
    EngineBusy,
    EngineNotReady,
    GenerationFailed,
    InvalidRequest,
    OmnivoxError,
)
from omnivox.server.audio_formats import FORMATS, SAMPLE_RATES, output_rate

logger = logging.getLogger(__name__)

VOICES = ("default",)
# OpenAI's built-in voice names: by default accepted as aliases of the default voice (ServerConfig.voice_aliases)
OPENAI_VOICES = ("alloy", "ash", "ballad", "cedar", "coral", "echo", "fable", "marin", "nova", "onyx", "sage",
                 "shimmer", "verse")
SPEECH_FORMATS = tuple(FORMATS)  # /v1/audio/speech response_format: wav, pcm, mp3, opus, aac, flac, pcm_mulaw
# /v1/chat/completions audio.format (streaming: pcm16 only, as OpenAI); pcm16 is 24 kHz s16le, as OpenAI's
CHAT_AUDIO_FORMATS = ("wav", "pcm16", "mp3", "opus", "aac", "flac")
SPEECH_STREAM_FORMATS = ("audio", "sse")


class RequestError(InvalidRequest):
    """A request error found by the server (not the engine); `param` names the field to fix."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value"):
        super().__init__(message)
        self.param = param
        self.code = code


class UnknownModel(RequestError):
    """The request names a model this server does not serve (never a path: models are chosen at start-up)."""

    def __init__(self, message: str):
        super().__init__(message, param="model", code="model_not_found")


class OpenAIModel(BaseModel):
    """Base of request models: unknown fields are accepted (OpenAI clients send many) and logged, never used."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _log_ignored_fields(self):
        if self.model_extra:
            logger.debug("%s: ignoring unsupported fields %s", type(self).__name__, sorted(self.model_extra))
        return self


# ----------------------------------------------------------------------------------------------------- errors


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# The one exception -> (HTTP status, error type, code) table; first match wins. Request validation errors
# (bad JSON, wrong field types) are RequestErrors built in app.py. Anything unlisted is a bug: 500.
ERROR_TABLE: tuple[tuple[type[BaseException], int, str, str], ...] = (
    (UnknownModel, 404, "invalid_request_error", "model_not_found"),
    (ContextTooLong, 400, "invalid_request_error", "context_length_exceeded"),
    (InvalidRequest, 400, "invalid_request_error", "invalid_value"),
    (EngineBusy, 429, "rate_limit_error", "engine_busy"),
    (EngineNotReady, 503, "service_unavailable", "engine_not_ready"),
    (GenerationFailed, 500, "server_error", "generation_failed"),
    (OmnivoxError, 500, "server_error", "engine_error"),
)
NOT_READY_RETRY_AFTER_S = 5


def describe_error(exc: BaseException) -> tuple[int, ErrorInfo, dict[str, str]]:
    """(status, error body, extra headers) for any exception; 429 and 503 carry Retry-After."""
    match = next((row for row in ERROR_TABLE if isinstance(exc, row[0])), None)
    if match is None:
        info = ErrorInfo(message="internal server error; the server log has the traceback", type="server_error",
                         code="internal_error")
        return 500, info, {}
    _, status, error_type, code = match
    info = ErrorInfo(message=str(exc) or type(exc).__name__, type=error_type, param=getattr(exc, "param", None),
                     code=getattr(exc, "code", None) or code)
    headers = {}
    if isinstance(exc, EngineBusy):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    elif isinstance(exc, EngineNotReady):
        headers["Retry-After"] = str(NOT_READY_RETRY_AFTER_S)
    return status, info, headers


# ------------------------------------------------------------------------------------ omnivox request extension

MAX_FORCED_AUDIO_S = 300.0


class OmnivoxExtension(BaseModel):
    """`"omnivox": {...}` on a chat or speech request: what random weights are made to say (see
    engine/forcing.py), so that any workload replays through the server with its own reply lengths. Honoured only
    by a server running random weights; a server with real weights refuses it (serving.py). Unknown keys are
    refused, so a misspelt field never silently falls back to the scripted default."""

    model_config = ConfigDict(extra="forbid")

    forced_reply: str | None = Field(default=None, min_length=1)
    audio_seconds: float | None = Field(default=None, gt=0.0, le=MAX_FORCED_AUDIO_S, allow_inf_nan=False)


# ------------------------------------------------------------------------------------------- chat completions


class TextPart(OpenAIModel):
    type: Literal["text"]
    text: str


class AssistantAudioRef(OpenAIModel):
    id: str  # the `audio.id` of an earlier reply from this server; its transcript stands in for the audio


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    audio: AssistantAudioRef | None = None

    def text(self) -> str | None:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content


class ChatAudioParams(OpenAIModel):
    voice: str = "default"
    format: str = "wav"

    @field_validator("format")
    @classmethod
    def _check_format(cls, v: str) -> str:
        if v not in CHAT_AUDIO_FORMATS:
            raise ValueError(f"unsupported audio format {v!r}; supported formats are {list(CHAT_AUDIO_FORMATS)}")
        return v


class StreamOptions(OpenAIModel):
    include_usage: bool = False


class ChatCompletionRequest(OpenAIModel):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    modalities: list[Literal["text", "audio"]] | None = None
    audio: ChatAudioParams | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    n: int = Field(default=1, ge=1, le=1)
    omnivox: OmnivoxExtension | None = None  # random weights only: the reply and its length

    @model_validator(mode="after")
    def _check_audio_output(self):
        if self.modalities is not None and "audio" not in self.modalities and self.audio is not None:
            raise ValueError("audio is set but modalities has no 'audio': set modalities to ['text', 'audio'] for a "
                             "spoken reply, or drop audio for a text reply")
        if self.modalities is not None and "audio" in self.modalities and self.audio is None:
            raise ValueError("audio output needs audio={'voice': 'default', 'format': 'wav' or 'pcm16'}")
        if self.stream and self.audio is not None and self.audio.format != "pcm16":
            raise ValueError("streamed audio is base64 PCM16: with stream=true set audio.format to 'pcm16'")
        if self.messages[-1].role != "user":
            raise ValueError("the last message must have role 'user': it is what the model replies to")
        return self

    @property
    def wants_audio(self) -> bool:
        """False: a text-only chat completion (modalities ["text"], or no `audio` field), from the LLM alone."""
        return self.audio is not None

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class ChatAudio(BaseModel):
    id: str
    data: str  # base64 of the whole reply in the requested format
    expires_at: int
    transcript: str


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    audio: ChatAudio | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatResponseMessage
    finish_reason: str


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    metrics: dict[str, Any]  # omnivox extension: RequestMetrics.to_dict() plus the seed


class DeltaAudio(BaseModel):
    id: str
    data: str | None = None  # base64 PCM16, 24 kHz mono
    transcript: str | None = None
    expires_at: int | None = None


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    audio: DeltaAudio | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    metrics: dict[str, Any] | None = None  # omnivox extension, on the chunk that carries finish_reason


# ----------------------------------------------------------------------------------------------- audio/speech


class SpeechRequest(OpenAIModel):
    model: str | None = None
    input: str = Field(json_schema_extra={"minLength": 1})  # "" and blank text: 400 from serving.check_text
    voice: str = "default"
    response_format: str = "wav"
    stream_format: str = "audio"
    speed: float = 1.0
    instructions: str | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    omnivox: OmnivoxExtension | None = None  # random weights only: audio_seconds
    sample_rate: int | None = None  # omnivox extension: output rate (None: 24000, pcm_mulaw 8000)

    @field_validator("response_format")
    @classmethod
    def _check_format(cls, v: str) -> str:
        if v not in SPEECH_FORMATS:
            raise ValueError(f"unsupported response_format {v!r}; supported formats are {list(SPEECH_FORMATS)}")
        return v

    @field_validator("sample_rate")
    @classmethod
    def _check_rate(cls, v: int | None) -> int | None:
        if v is not None and v not in SAMPLE_RATES:
            raise ValueError(f"unsupported sample_rate {v}; use one of {list(SAMPLE_RATES)}")
        return v

    @model_validator(mode="after")
    def _check_rate_for_format(self):
        if self.response_format in FORMATS:
            output_rate(FORMATS[self.response_format], self.sample_rate)  # ValueError: rates this format carries
        return self

    @field_validator("stream_format")
    @classmethod
    def _check_stream_format(cls, v: str) -> str:
        if v not in SPEECH_STREAM_FORMATS:
            raise ValueError(f"unsupported stream_format {v!r}; use one of {list(SPEECH_STREAM_FORMATS)}")
        return v

    @field_validator("speed")
    @classmethod
    def _check_speed(cls, v: float) -> float:
        if v != 1.0:
            raise ValueError("only speed=1.0 is supported (the model speaks at its own pace)")
        return v

    @field_validator("instructions")
    @classmethod
    def _check_instructions(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("instructions are not supported: the default voice reads the input as written")
        return v

    @field_validator("omnivox")
    @classmethod
    def _check_extension(cls, v: OmnivoxExtension | None) -> OmnivoxExtension | None:
        if v is not None and v.forced_reply is not None:
            raise ValueError("forced_reply does not apply here: /v1/audio/speech speaks `input` itself; "
                             "send only omnivox.audio_seconds")
        return v


class SpeechDeltaEvent(BaseModel):
    type: Literal["speech.audio.delta"] = "speech.audio.delta"
    audio: str  # base64 of the next bytes of the response_format stream


class SpeechUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    total_tokens: int


class SpeechDoneEvent(BaseModel):
    type: Literal["speech.audio.done"] = "speech.audio.done"
    usage: SpeechUsage
    metrics: dict[str, Any]  # omnivox extension


# ------------------------------------------------------------------------------------------------- models list


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "omnivox"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class VoiceCard(BaseModel):
    """A voice the model has, and the other names accepted for it (OpenAI's voice names, for drop-in clients)."""

    id: str
    object: Literal["voice"] = "voice"
    aliases: list[str]


class VoiceList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VoiceCard]


# --------------------------------------------------------------------------------------------------- WebSocket


class WsSpeak(OpenAIModel):
    """Client → server: start a reply. mode "chat" answers the text (multi-turn on this connection's session);
    mode "read" reads the text aloud with the default voice."""

    type: Literal["speak"]
    text: str
    mode: Literal["chat", "read"] = "chat"
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)


class WsCancel(OpenAIModel):
    type: Literal["cancel"]


class WsInputAppend(OpenAIModel):
    """Client → server: the next piece of text to read aloud, as the client's own LLM produces it. The first
    append of a reply starts it (its `seed`, if given, is the reply's); speech starts once the TTS has its first
    10-token text chunk."""

    type: Literal["input.append"]
    text: str
    seed: int | None = Field(default=None, ge=0, lt=2**63)


class WsInputDone(OpenAIModel):
    """Client → server: no more text for this reply; the rest is spoken and the reply ends with `done`."""

    type: Literal["input.done"]


class WsStart(BaseModel):
    type: Literal["start"] = "start"
    request_id: str
    seed: int
    sample_rate: int
    format: Literal["pcm16"] = "pcm16"


class WsTranscript(BaseModel):
    """Sent just before the binary PCM frame of the chunk that first speaks `delta`."""

    type: Literal["transcript"] = "transcript"
    request_id: str
    delta: str
    chunk_index: int
    audio_start_s: float


class WsDone(BaseModel):
    type: Literal["done"] = "done"
    request_id: str
    finish_reason: str
    metrics: dict[str, Any]


class WsError(BaseModel):
    type: Literal["error"] = "error"
    request_id: str | None = None
    error: ErrorInfo
