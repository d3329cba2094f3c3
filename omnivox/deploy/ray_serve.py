"""The omnivox server on Ray Serve: every replica is the app of `omnivox serve` around its own engine (one GPU each).

Ray does the scale-out work: its proxy sends each request to a replica with a free stream slot
(`max_ongoing_requests` = the engine's `max_concurrent_requests`), queues at most `max_queued_requests` per proxy and
answers the rest 429 with Retry-After (`BackpressureConfig`); the autoscaler aims at `TARGET_SLOT_FRACTION` of the
slots busy per replica, so new streams land where there is headroom; a dead replica is restarted by Ray's
controller. A WebSocket connection is one request to one replica for its whole life, so a conversation's caches
never move. A replica reports ready (to Ray) only once its engine is built and warmed up.

Each replica adds `X-Omnivox-Replica: <replica id>` to every response, labels its Prometheus registry with the
replica (`target_info`), and serves that registry on a port of its own (`/replica` says where), because a `GET
/metrics` through the proxy reaches whichever replica Ray picks.

Ray is an optional dependency (`pip install omnivox[ray]`): only this package imports it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray import serve
from ray.serve.config import BackpressureConfig
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from omnivox.deploy.ray_proxy import CALLBACK, CALLBACK_ENV
from omnivox.errors import OmnivoxError
from omnivox.server.app import build_app
from omnivox.server.serving import ServerConfig, SpeechService

logger = logging.getLogger(__name__)

APP_NAME = "omnivox"
DEPLOYMENT_NAME = "omnivox"
REPLICA_HEADER = b"x-omnivox-replica"
TARGET_SLOT_FRACTION = 0.7  # autoscaling target: ongoing requests per replica / its stream slots
RETRY_AFTER_S = 1.0


@dataclass(frozen=True)
class ReplicaSpec:
    """What one replica builds: the engine (as `omnivox serve` takes it) and the server's knobs. Picklable."""

    model: str | None = None
    device: str = "cpu"
    dtype: str | None = None
    dummy_weights: bool = False
    engine_config: Any = None  # an EngineConfig; None: the engine's defaults
    server_config: ServerConfig = field(default_factory=ServerConfig)
    metrics_port: int | None = 0  # each replica's own Prometheus port: 0 any free one, None none
    torch_threads: int | None = None  # CPU replicas sharing a machine: threads each (None: PyTorch's default)

    @property
    def slots(self) -> int:
        """Stream slots per replica = Ray's max_ongoing_requests, fixed when the deployment is made: the engine's
        automatic count (from free GPU memory) is known only inside a built engine, so a GPU needs it given."""
        from omnivox.engine.engine import EngineConfig

        slots = (self.engine_config or EngineConfig()).max_concurrent_requests
        if slots:
            return slots
        if self.device.startswith("cuda"):
            raise OmnivoxError("--ray on a GPU needs --max-streams N (stream slots per replica; Ray routes by it): "
                               "the plain server's /readyz engine.stream_slots shows what the memory holds")
        return 8  # the engine's own choice on a CPU

    def build_engine(self) -> Any:
        from omnivox.engine.engine import Engine

        if self.torch_threads:
            import torch

            torch.set_num_threads(self.torch_threads)
        return Engine.from_pretrained(self.model, device=self.device, dtype=self.dtype,
                                      dummy_weights=self.dummy_weights, config=self.engine_config, progress=False)


class ReplicaASGI:
    """The app as Ray runs it: its start-up completes only once the engine is ready (so Ray routes nothing to a
    warming replica, and a replica whose engine failed is rebuilt), and every response names the replica."""

    def __init__(self, app: ASGIApp, service: SpeechService, replica_id: str):
        self.app = app
        self.service = service
        self.replica = replica_id.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, self._ready_then(send))
            return

        async def tagged(message: Message) -> None:
            if message["type"] in ("http.response.start", "websocket.accept"):
                message = {**message, "headers": [*message.get("headers", ()), (REPLICA_HEADER, self.replica)]}
            await send(message)

        await self.app(scope, receive, tagged)

    def _ready_then(self, send: Send) -> Send:
        async def send_when_ready(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                while self.service.status in ("loading", "warming_up"):
                    await asyncio.sleep(0.05)
                if self.service.status != "ready":
                    message = {"type": "lifespan.startup.failed", "message": self.service.failure or "failed"}
            await send(message)

        return send_when_ready


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class OmnivoxReplica:
    """One replica: one engine and the whole omnivox app in front of it."""

    def __init__(self, spec: ReplicaSpec):
        from prometheus_client import start_http_server

        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        self.fastapi = build_app(spec.build_engine, spec.server_config)  # `app` is Ray's
        self.service: SpeechService = self.fastapi.state.service
        node = ray.get_runtime_context().get_node_id()
        registry = self.service.metrics.registry
        registry.set_target_info({"replica": self.replica_id, "deployment": context.deployment, "node": node})
        self.metrics_url = None
        self._metrics_server = None
        if spec.metrics_port is not None:
            host = ray.util.get_node_ip_address()
            self._metrics_server, _ = start_http_server(spec.metrics_port, addr=host, registry=registry)
            self.metrics_url = f"http://{host}:{self._metrics_server.server_port}/metrics"
        self.info = {"replica": self.replica_id, "actor_name": ray.get_runtime_context().get_actor_name(),
                     "node_id": node, "pid": os.getpid(), "metrics_url": self.metrics_url}
        self.fastapi.add_api_route("/replica", self.describe, methods=["GET"], include_in_schema=False)

    async def describe(self) -> dict[str, Any]:
        """Which replica answered, and where its own metrics are (scrape each replica there)."""
        return {**self.info, "status": self.service.status, "engine": self.service.stats()}

    def __serve_build_asgi_app__(self) -> ASGIApp:
        return ReplicaASGI(self.fastapi, self.service, self.replica_id)

    def check_health(self) -> None:
        """Ray's periodic health check: an engine that failed makes the replica unhealthy, and Ray replaces it."""
        if self.service.status == "failed":
            raise RuntimeError(f"engine failed: {self.service.failure}")

    def __del__(self) -> None:
        server = getattr(self, "_metrics_server", None)
        if server is not None:
            server.shutdown()
            server.server_close()


# ------------------------------------------------------------------------------------------------ building the app


def application(spec: ReplicaSpec, replicas: int = 1, autoscale: tuple[int, int] | None = None,
                num_cpus: float = 1.0, num_gpus: float | None = None, max_queued_requests: int | None = None,
                retry_after_s: float = RETRY_AFTER_S) -> Any:
    """The Serve application: `replicas` fixed replicas, or autoscaling between `autoscale` = (min, max).

    A GPU device takes one GPU per replica unless `num_gpus` says otherwise; the queue per proxy defaults to one
    replica's slots (bounded: beyond it Ray answers 429)."""
    slots = spec.slots
    if num_gpus is None:
        num_gpus = 1.0 if spec.device.startswith("cuda") else 0.0
    options: dict[str, Any] = {
        "max_ongoing_requests": slots,
        "max_queued_requests": max_queued_requests or slots,
        "backpressure_config": BackpressureConfig(status_code=429, retry_after_s=retry_after_s),
        "ray_actor_options": {"num_cpus": num_cpus, "num_gpus": num_gpus},
        "health_check_period_s": 5.0,
        "graceful_shutdown_timeout_s": 10.0,
    }
    if autoscale is not None:
        low, high = autoscale
        options["autoscaling_config"] = {"min_replicas": low, "initial_replicas": low, "max_replicas": high,
                                         "target_ongoing_requests": max(1.0, TARGET_SLOT_FRACTION * slots)}
    else:
        options["num_replicas"] = replicas
    return OmnivoxReplica.options(**options).bind(spec)


def parse_autoscale(text: str) -> tuple[int, int]:
    try:
        low, high = (int(part) for part in text.split(":"))
    except ValueError:
        raise OmnivoxError(f"--autoscale {text!r}: give MIN:MAX replicas, e.g. 1:4") from None
    if not 0 <= low <= high or high < 1:
        raise OmnivoxError(f"--autoscale {text!r}: need 0 <= MIN <= MAX and MAX >= 1")
    return low, high


def application_from_args(args: argparse.Namespace) -> Any:
    """`omnivox serve --ray ...` options -> the Serve application (the same engine options as the plain server)."""
    from omnivox.cli import engine_config

    random_weights = args.dummy_weights or args.model is None
    server_config = ServerConfig(served_model_name=args.served_model_name or ServerConfig.served_model_name,
                                 max_input_chars=args.max_input_chars, dummy_weights=random_weights)
    spec = ReplicaSpec(model=args.model, device=args.device, dtype=args.dtype, dummy_weights=args.dummy_weights,
                       engine_config=engine_config(args), server_config=server_config,
                       metrics_port=args.replica_metrics_port, torch_threads=args.torch_threads)
    autoscale = parse_autoscale(args.autoscale) if args.autoscale else None
    return application(spec, replicas=args.replicas, autoscale=autoscale, num_cpus=args.cpus_per_replica,
                       max_queued_requests=args.max_queued_requests)


def app_builder(args: dict[str, Any]) -> Any:
    """`serve run` / `serve deploy` entry point (import_path omnivox.deploy.ray_serve:app_builder): the config's
    `args` are `omnivox serve --ray` options, e.g. {"device": "cuda", "dummy-weights": true, "replicas": 2}."""
    from omnivox.cli import build_parser

    argv = ["serve", "--ray"]
    for key, value in (args or {}).items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value not in (False, None):
            argv += [flag, str(value)]
    return application_from_args(build_parser().parse_args(argv))


# ------------------------------------------------------------------------------------------------ running it


def start_ray(address: str | None, **init_kwargs: Any) -> None:
    """Join the cluster at `address` (or start a local one). A local cluster's proxy gets the omnivox middleware
    through the environment; a cluster started by `ray start` needs the variable set there (README)."""
    os.environ.setdefault(CALLBACK_ENV, CALLBACK)
    ray.init(address=address, **init_kwargs)


def run(app: Any, host: str, port: int) -> None:
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=APP_NAME, route_prefix="/")


def shutdown() -> None:
    """Delete the app, stop Serve, leave the Ray cluster (a local one stops with it)."""
    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def serve_main(args: argparse.Namespace) -> int:
    """`omnivox serve --ray`: deploy, print where, serve until interrupted, then shut everything down."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = application_from_args(args)
    # SIGTERM (and SIGINT, which a shell ignores in background jobs) end the loop below: shut down, then exit
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _interrupt)
    # a local instance without the dashboard (its agents outlived ray.shutdown here); `ray start --head` has one
    start_ray(args.ray_address, **({} if args.ray_address else {"include_dashboard": False}))
    try:
        run(app, args.host, args.port)
        logger.info("omnivox on Ray Serve at http://%s:%d (`ray status`; `serve status` needs `ray start --head`)",
                    args.host, args.port)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        shutdown()
    return 0
