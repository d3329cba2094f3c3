"""`build_app`: the FastAPI application, its lifespan (engine built and warmed up once) and the one error mapping.

Every error leaves the server in the OpenAI envelope `{"error": {"message", "type", "param", "code"}}` with the
status from `protocol.ERROR_TABLE`: bad requests 400 (unknown model 404), too many concurrent requests 429 with
Retry-After, model not ready 503 with Retry-After, 500 only for generation failures and bugs. Bodies that are not
JSON (invalid UTF-8, nested too deep, another Content-Type) get 400/415 saying so; bodies over the size limit 413,
bodies that stall 408 (limits.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from omnivox.errors import OmnivoxError
from omnivox.server.limits import BodyLimits
from omnivox.server.metrics import ServerMetrics
from omnivox.server.protocol import ErrorInfo, ErrorResponse, RequestError, describe_error
from omnivox.server.routes import router
from omnivox.server.serving import EngineSource, ServerConfig, SpeechService

logger = logging.getLogger(__name__)


def error_response(service: SpeechService, exc: BaseException) -> JSONResponse:
    status, info, headers = describe_error(exc)
    service.metrics.errors.labels(info.code or info.type).inc()
    if status == 500 and isinstance(exc, OmnivoxError):  # other exceptions are logged by Starlette
        logger.error("request failed", exc_info=exc)
    return JSONResponse(ErrorResponse(error=info).model_dump(), status_code=status, headers=headers)


def body_parse_message(exc: StarletteHTTPException) -> RequestError | None:
    """FastAPI's bare "error parsing the body" 400 -> what was wrong with the body (None: something else)."""
    cause = exc.__cause__
    if isinstance(cause, UnicodeDecodeError):
        return RequestError(f"the request body is not valid UTF-8 (byte 0x{cause.object[cause.start]:02x} at "
                            f"offset {cause.start}); send JSON encoded as UTF-8", code="invalid_utf8")
    if isinstance(cause, RecursionError):
        return RequestError("the request body's JSON is nested too deeply to parse; send a flat JSON object",
                            code="json_too_deep")
    return None


def content_type_message(request: Request) -> RequestError | None:
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";")[0].strip().lower()
    if media == "application/json" or media.endswith("+json"):
        return None
    return RequestError(f"the request body's Content-Type is {content_type or 'missing'!r}; send JSON with "
                        "Content-Type: application/json", code="unsupported_content_type")


def validation_message(exc: RequestValidationError) -> RequestError:
    """Pydantic's errors -> one RequestError that says which field is wrong and what it should be."""
    messages, param = [], None
    for error in exc.errors():
        loc = [str(p) for p in error.get("loc", ()) if p != "body"]
        where = ".".join(loc)
        if error.get("type") == "json_invalid":
            detail = error.get("ctx", {}).get("error", "")
            return RequestError(f"the request body is not valid JSON ({detail}); send one JSON object",
                                code="json_invalid")
        msg = error.get("msg", "invalid value").removeprefix("Value error, ")
        if error.get("type") == "missing":
            msg = "required field is missing"
        messages.append(f"{where}: {msg}" if where else msg)
        param = param or where or None
    return RequestError("; ".join(messages) or "invalid request", param=param)


def build_app(engine: EngineSource, config: ServerConfig | None = None) -> FastAPI:
    """The server around `engine` (an Engine, or a zero-argument factory run once at start-up).

    /healthz answers at once; /readyz and the model endpoints answer 503 until the engine is built and warmed up.
    """
    config = config or ServerConfig()
    metrics = ServerMetrics()
    service = SpeechService(engine, config, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        start = asyncio.create_task(service.start())
        try:
            yield
        finally:
            start.cancel()
            await service.stop()

    app = FastAPI(title="omnivox", version="0.1.0", lifespan=lifespan)
    app.state.service = service

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        wrong_type = content_type_message(request)
        if wrong_type is not None:
            response = error_response(service, wrong_type)
            response.status_code = 415
            return response
        return error_response(service, validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        parse_error = body_parse_message(exc) if exc.status_code == 400 else None
        if parse_error is not None:
            return error_response(service, parse_error)
        code = {404: "not_found", 405: "method_not_allowed", 408: "request_timeout",
                413: "request_too_large"}.get(exc.status_code, "http_error")
        hint = {404: f"no route {request.url.path}; see /docs for the API",
                405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        if exc.status_code in (408, 413):  # the body was not read to its end: close the connection
            exc.headers = {**(exc.headers or {}), "Connection": "close"}
        info = ErrorInfo(message=hint, type="invalid_request_error", code=code)
        metrics.errors.labels(code).inc()
        return JSONResponse(ErrorResponse(error=info).model_dump(), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(OmnivoxError)
    async def _omnivox(request: Request, exc: OmnivoxError) -> JSONResponse:
        return error_response(service, exc)

    @app.exception_handler(Exception)  # a bug: Starlette logs the traceback after this reply
    async def _any(request: Request, exc: Exception) -> JSONResponse:
        return error_response(service, exc)

    app.include_router(router)
    app.add_middleware(BodyLimits, max_bytes=config.max_body_bytes, read_timeout_s=config.body_timeout_s)
    return app


def uvicorn_config(app: FastAPI, host: str, port: int, log_level: str = "info", **options: Any) -> Any:
    """uvicorn's own limits from the app's ServerConfig: open connections, WebSocket message size, keep-alive."""
    import uvicorn

    config: ServerConfig = app.state.service.config
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, limit_concurrency=config.max_connections,
                          ws_max_size=config.max_body_bytes, timeout_graceful_shutdown=5, **options)


def build_server(config: Any) -> Any:
    """A uvicorn server whose shutdown first drains the app's SpeechService (`ServerConfig.shutdown_timeout_s`):
    uvicorn alone would close WebSockets with 1012 at once and cut streams off without a word."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            for server in self.servers:  # stop accepting first; then let streams finish
                server.close()
            service: SpeechService = self.config.app.state.service
            await service.drain(service.config.shutdown_timeout_s)
            await super().shutdown(sockets)

    return DrainingServer(config)


def serve(model: str | None = None, host: str = "127.0.0.1", port: int = 8000, device: str | None = None,
          dtype: str | None = None, dummy_weights: bool = False, engine_config: Any = None,
          served_model_name: str | None = None, max_input_chars: int = 4000, log_level: str = "info",
          **limits: Any) -> None:
    """`omnivox serve`: answer /healthz at once, build and warm up the engine, serve until SIGTERM/SIGINT (then
    drain: see `build_server`).

    `model` None is the embedded tiny random-weight model; `engine_config` (an EngineConfig) picks the path,
    admission limit and switches; options left None take the engine's defaults. `limits` are ServerConfig fields
    (max_ws_sessions, max_body_bytes, body_timeout_s, max_connections, shutdown_timeout_s, voice_aliases)."""
    from dataclasses import replace

    from omnivox.engine.engine import EngineConfig

    # model=None is the embedded tiny model: random weights too, so its replies are scripted as well
    config = ServerConfig(served_model_name=served_model_name or ServerConfig.served_model_name,
                          max_input_chars=max_input_chars, dummy_weights=dummy_weights or model is None, **limits)
    engine_config = engine_config or EngineConfig()
    if engine_config.max_sessions < config.max_ws_sessions:  # each WebSocket chat session is an engine session
        engine_config = replace(engine_config, max_sessions=config.max_ws_sessions)

    def factory() -> Any:
        from omnivox.engine.engine import Engine

        options: dict[str, Any] = {"device": device} if device is not None else {}
        return Engine.from_pretrained(model, dtype=dtype, dummy_weights=dummy_weights, config=engine_config,
                                      **options)

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    build_server(uvicorn_config(build_app(factory, config), host, port, log_level)).run()
