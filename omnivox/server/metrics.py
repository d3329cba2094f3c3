"""Prometheus metrics of one server, in a registry of its own (several apps in one process never collide)."""

from __future__ import annotations

import math

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from omnivox.engine.types import RequestMetrics

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256, 384, 512)
BATCH_STAGES = ("llm", "tts", "vocoder", "prefill")
TTFB_BUCKETS_S = (0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
RTF_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)


class ServerMetrics:
    """All the server's metrics. `endpoint` labels are "chat", "chat_text" (text-only replies: TTFB is the first
    text), "speech" and "ws"."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttfb = Histogram(
            "omnivox_ttfb_seconds", "Request start to first audio chunk ready (server side)", ["endpoint"],
            buckets=TTFB_BUCKETS_S, registry=r,
        )
        self.first_audio_milestones = Histogram(
            "omnivox_first_audio_milestone_seconds", "Request start to each milestone on the way to its first audio "
            "(admitted, decoding, text, speaking, audio: omnivox/engine/types.py)", ["endpoint", "milestone"],
            buckets=TTFB_BUCKETS_S, registry=r,
        )
        self.rtf = Histogram(
            "omnivox_rtf", "Real-time factor of finished requests: wall time / audio time", ["endpoint"],
            buckets=RTF_BUCKETS, registry=r,
        )
        self.audio_seconds = Counter("omnivox_audio_seconds", "Seconds of audio sent", ["endpoint"], registry=r)
        self.requests = Counter(
            "omnivox_requests", "Streams ended, by finish reason (eos, length, cancelled, error)",
            ["endpoint", "finish_reason"], registry=r,
        )
        self.active = Gauge("omnivox_streams_active", "Engine streams open now", registry=r)
        self.batch_size = {
            stage: Histogram(f"omnivox_{stage}_batch_size", f"Rows in each {stage} batch the engine loop ran",
                             buckets=BATCH_BUCKETS, registry=r)
            for stage in BATCH_STAGES
        }
        self.waiting = Gauge("omnivox_scheduler_waiting", "Live requests waiting on each kind of work", ["work"],
                             registry=r)
        self.buffered = Gauge("omnivox_stream_buffered_seconds",
                              "Audio delivered but not yet played, over the live streams that have audio",
                              ["stat"], registry=r)
        self.loop_seconds = Gauge("omnivox_loop_seconds", "Seconds the engine loop spent in each part of its "
                                  "iterations since start-up (host time; wait_* = waiting on the LLM's stream)",
                                  ["part"], registry=r)
        self.loop_iterations = Gauge("omnivox_loop_iterations", "Engine loop iterations since start-up", registry=r)
        self.prompts_riding = Gauge("omnivox_llm_prompts_riding", "LLM prompts run inside a decode step (not as a "
                                    "prefill of their own) since start-up", registry=r)
        self._engine = None
        self.underruns = Counter(
            "omnivox_underruns",
            "Chunks that were ready only after the audio sent before them had finished playing", ["endpoint"],
            registry=r,
        )
        self.errors = Counter("omnivox_errors", "Errors returned, by kind", ["kind"], registry=r)
        # sessions: one per stream without a conversation of its own, one per WebSocket chat connection; a leak
        # shows as sessions_open above streams_active + ws_sessions while idle
        self.sessions_open = Gauge("omnivox_sessions_open", "Engine sessions (LLM caches) held now", registry=r)
        self.session_slots_free = Gauge(
            "omnivox_session_slots_free", "Engine session slots (LLM caches) free now", registry=r
        )
        self.ws_sessions = Gauge(
            "omnivox_ws_sessions", "WebSocket chat sessions open now (capped by --max-ws-sessions)", registry=r
        )

    def watch_gpu_memory(self, device: object) -> None:
        """On a CUDA device, gauges of the memory PyTorch holds there, read at each scrape (capacity benchmarks
        report them next to the streams served). Not registered on other devices: absent means not measured."""
        import torch

        device = torch.device(device) if device is not None else torch.device("cpu")
        if device.type != "cuda":
            return
        Gauge("omnivox_gpu_memory_allocated_bytes", "GPU memory held by tensors now (torch.cuda.memory_allocated)",
              registry=self.registry).set_function(lambda: torch.cuda.memory_allocated(device))
        Gauge("omnivox_gpu_memory_reserved_bytes", "GPU memory reserved by PyTorch's allocator now "
              "(torch.cuda.memory_reserved)", registry=self.registry).set_function(
            lambda: torch.cuda.memory_reserved(device))
        Gauge("omnivox_gpu_memory_peak_allocated_bytes", "Most GPU memory held by tensors since start-up "
              "(torch.cuda.max_memory_allocated)", registry=self.registry).set_function(
            lambda: torch.cuda.max_memory_allocated(device))

    def observe_stream(self, endpoint: str, metrics: RequestMetrics, underruns: int, audio_sent_s: float) -> None:
        self.requests.labels(endpoint, metrics.finish_reason or "unknown").inc()
        self.audio_seconds.labels(endpoint).inc(audio_sent_s)
        if underruns:
            self.underruns.labels(endpoint).inc(underruns)
        if not math.isnan(metrics.ttfb_s):
            self.ttfb.labels(endpoint).observe(metrics.ttfb_s)
        for milestone, seconds in metrics.first_audio_milestones.items():
            self.first_audio_milestones.labels(endpoint, milestone).observe(seconds)
        if metrics.finish_reason in ("eos", "length") and metrics.audio_s > 0:
            self.rtf.labels(endpoint).observe(metrics.rtf)

    def bind_engine(self, engine) -> None:
        """Observe the engine loop: each batch's size as it runs, queue depths and buffers when scraped."""
        self._engine = engine
        engine.on_batch = lambda stage, size: self.batch_size[stage].observe(size) if stage in self.batch_size else None

    def render(self) -> bytes:
        if self._engine is not None:
            loop = self._engine.loop_stats()
            for work, count in loop["waiting"].items():
                self.waiting.labels(work).set(count)
            for stat, value in loop["buffered_s"].items():
                self.buffered.labels(stat).set(value)
            for part, seconds in loop.get("loop_s", {}).items():
                self.loop_seconds.labels(part).set(seconds)
            self.loop_iterations.set(loop.get("iterations", 0))
            if "prompts_riding" in loop:  # absent when the live list changed while it was read
                self.prompts_riding.set(loop["prompts_riding"])
        return generate_latest(self.registry)
