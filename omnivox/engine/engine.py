"""The public engine: load a model once, then stream spoken replies from one batched loop.

`Engine.stream(text)` validates a request, admits it (or raises `EngineBusy`) and returns a `SpeechStream` that
yields `AudioChunk`s as the loop produces them. The loop (omnivox/engine/scheduler.py) runs on its own thread,
started with the first request and stopped once idle; every live request's work runs there in batches. Callers
on any thread (or an asyncio loop: `SpeechStream.next_async`) read chunks as they come.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import gc
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch

from omnivox.engine.graphs import GraphCache
from omnivox.engine.live import Live, Side
from omnivox.engine.llm_executor import LLMExecutor
from omnivox.engine.prefix_cache import PrefixCache, prompt_forward
from omnivox.engine.request import ASSISTANT_HEADER, Forcing, Piece, Reply
from omnivox.engine.scheduler import Scheduler, SchedulerConfig
from omnivox.engine.session import Session
from omnivox.engine.system_prompts import DEFAULT_PRESET, SYSTEM_PROMPTS
from omnivox.engine.text import detect_language, normalize_for_tts
from omnivox.engine.text_feed import UNLIMITED_AUDIO_TOKENS, FeedReader, TextFeed, awaiting_text
from omnivox.engine.text_reply import TEXT_ASSISTANT_HEADER, text_llm, text_speech
from omnivox.engine.tts_executor import TTSExecutor
from omnivox.engine.types import AUDIO_TOKENS_PER_SECOND, SAMPLE_RATE, AudioChunk, RequestMetrics, SamplingParams
from omnivox.engine.vocoder import VocoderExecutor
from omnivox.engine.work import LLMDecode, LLMPrefill
from omnivox.errors import ContextTooLong, EngineBusy, InvalidRequest
from omnivox.models.kv_cache import KVPool
from omnivox.models.layers import short_queries_by_products
from omnivox.models.loader import SpeechModel

DEFAULT_SYSTEM_PROMPT = SYSTEM_PROMPTS[DEFAULT_PRESET]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "tf32": torch.float32}
ATTENTION = ("auto", "products", "sdpa", "efficient", "math", "cudnn")
CPU_STREAM_SLOTS = 8
MAX_AUTO_STREAM_SLOTS = 256
IDLE_STOP_S = 1.0  # the loop thread ends after this long without work (a new request starts it again)


@dataclass(frozen=True)
class EngineConfig:
    """Runtime knobs (the model's own sizes come from its checkpoint)."""

    # stream slots: requests served at once (each holds a TTS cache row; a chat request also an LLM row). 0: as many
    # as free GPU memory holds (at most 256), 8 on a CPU. Beyond them a request gets EngineBusy (HTTP 429).
    max_concurrent_requests: int = 0
    max_sessions: int = 8  # conversations kept open between turns (each holds an LLM cache row)
    max_session_tokens: int = 4096  # LLM positions per session: prompt, history and replies
    max_text_chars: int = 4000
    system_prompt: str = DEFAULT_SYSTEM_PROMPT  # "" = no system turn (system_prompts.py has the presets)
    early_first_chunk: bool = True
    # "fast": batched steps over static cache rows, replayed as CUDA graphs on a GPU; "reference": the same loop
    # with eager steps run one row at a time (the oracle every speed-up is measured and checked against)
    path: str = "fast"
    cuda_graphs: bool = True
    # torch.compile of the decoder layers on the fast path (omnivox/models/layers.py, `compiled_halves`): "auto" = on
    # a GPU (about 40 s once at start-up; a TTS step at batch 1 then takes 2.1 ms instead of 3.5), off on a CPU
    compile: str = "auto"
    # auto = products on a GPU, sdpa on a CPU; products: queries of up to 16 rows per kv head (decode steps, TTS text
    # prefills) attend through two matrix products, longer ones through sdpa; sdpa (GPU: efficient, math fallback) |
    # efficient | math | cudnn: SDPA kernels only
    attention: str = "auto"
    llm_lookahead: int = 8  # LLM chunks a reply may make ahead of its speech
    tts_capacity: int = 2560  # TTS positions per segment: 302 condition slots + up to 2048 audio tokens + scratch
    memory_fraction: float = 0.85  # share of free GPU memory the automatic slot count may use for caches


def resolve_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InvalidRequest(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N'") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidRequest(f"device {device!r} asked for, but this machine has no CUDA GPU: use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise InvalidRequest(f"device {device!r} is not supported: use 'cpu', 'cuda' or 'cuda:N'")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise InvalidRequest(f"unknown precision {dtype!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def settle_heap() -> None:
    """What start-up made (the model, tokenizers, graphs, compiled code) lives as long as the process: frozen, the
    garbage collector's full collections no longer walk it. Unfrozen, one such collection stalled the engine loop,
    and so every stream, for 0.2 s in the host benchmark (bench/RESULTS.md section 12)."""
    gc.collect()
    gc.freeze()


@contextlib.contextmanager
def attention_backends(choice: str, device: torch.device) -> Iterator[None]:
    """The attention kernels the loop may use (`choice` is one of ATTENTION, checked when the engine is built). On a
    GPU SDPA means memory-efficient with math as the fallback: cuDNN attention gave other bf16 outputs from run to
    run on the H200, and flash takes no mask. `products` adds the decode steps' matrix products
    (omnivox/models/layers.py, `short_queries_by_products`)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if choice == "auto":
        choice = "products" if device.type == "cuda" else "sdpa"
    with contextlib.ExitStack() as stack:
        if choice == "products":
            stack.enter_context(short_queries_by_products())
        if device.type == "cuda":
            kernels = {
                "efficient": [SDPBackend.EFFICIENT_ATTENTION],
                "math": [SDPBackend.MATH],
                "cudnn": [SDPBackend.CUDNN_ATTENTION],
            }.get(choice, [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
            stack.enter_context(sdpa_kernel(kernels))
        yield


_END = object()
_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()


@atexit.register
def _stop_loops() -> None:
    """Stops every engine's loop thread before the interpreter tears down: a daemon thread still inside a torch op
    at exit aborts the process."""
    for engine in list(_ENGINES):
        engine.shutdown()


def _set_all(events: list[asyncio.Event]) -> None:
    for event in events:
        event.set()


class SpeechStream:
    """AudioChunks of one request, as the engine loop makes them. `close()` cancels it; its rows are freed within
    one loop iteration."""

    def __init__(self, engine: Engine, metrics: RequestMetrics, clock: Callable[[], float], early_first_chunk: bool):
        self.engine = engine
        self.metrics = metrics
        self._clock = clock
        self.started_at = clock()  # on the engine clock, which the loop shares
        self._early = early_first_chunk
        self._queue: deque = deque()
        self._cv = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None
        self._index = 0
        self._audio_pieces = 0
        self._done = False  # the loop has ended the request
        self._closed = False
        self.cancelled = False
        self.live: Live | None = None

    # ---- producer side (the engine loop) ------------------------------------------------------------------------
    def _emit(self, item: object) -> None:
        """A Piece, an exception (the request failed) or None (the request ended)."""
        if isinstance(item, Piece):
            item = self._chunk(item)
        elif item is None:
            item = _END
        if item is _END or isinstance(item, BaseException):
            self._done = True
            self.metrics.total_s = self._clock() - self.started_at
            self.engine._ended(self)
        with self._cv:
            self._queue.append(item)
            self._cv.notify_all()
        if self._loop is not None:
            self.engine._wake(self._loop, self._event)

    def _chunk(self, piece: Piece) -> AudioChunk:
        now = self._clock() - self.started_at
        m, seconds = self.metrics, len(piece.pcm) / SAMPLE_RATE
        if m.audio_s == 0.0 and seconds > 0:
            m.ttfb_s = now
        if len(piece.pcm):
            self._audio_pieces += 1
            # early framing: the official first chunk comes out with our second piece (or the last, if sooner)
            unset = m.ttfb_official_s != m.ttfb_official_s  # NaN
            if self._audio_pieces == (2 if self._early else 1) or (piece.final and unset):
                m.ttfb_official_s = now
        m.audio_s += seconds
        m.total_s = now
        chunk = AudioChunk(pcm=piece.pcm, text=piece.text, index=self._index, audio_start_s=m.audio_s - seconds,
                           ready_s=now, is_last=piece.final)
        self._index += 1
        return chunk

    # ---- consumer side ------------------------------------------------------------------------------------------
    def _take(self, item: object) -> AudioChunk:
        if item is _END:
            self._closed = True
            raise StopIteration
        if isinstance(item, BaseException):
            self._closed = True
            raise item
        return item

    def __iter__(self) -> SpeechStream:
        return self

    def __next__(self) -> AudioChunk:
        if self._closed:
            raise StopIteration
        with self._cv:
            while not self._queue:
                self._cv.wait()
            item = self._queue.popleft()
        return self._take(item)

    async def next_async(self) -> AudioChunk | None:
        """The next chunk, awaited without a thread; None at the end."""
        if self._loop is None:
            self._loop, self._event = asyncio.get_running_loop(), asyncio.Event()
            self._event.set()
        while True:
            if self._closed:
                return None
            with self._cv:
                item = self._queue.popleft() if self._queue else _EMPTY
            if item is not _EMPTY:
                try:
                    return self._take(item)
                except StopIteration:
                    return None
            await self._event.wait()
            self._event.clear()

    @property
    def done(self) -> bool:
        return self._done

    @property
    def cache_bytes(self) -> int:
        return 0 if self._done else self.engine._request_cache_bytes(self)

    def close(self) -> None:
        """Cancel: generation stops at the current step and the request's caches are released."""
        if not self._done and not self.cancelled:
            if not self.metrics.finish_reason:
                self.metrics.finish_reason = "cancelled"
            self.metrics.total_s = self._clock() - self.started_at
            self.engine._cancel(self)
        self._closed = True

    def __del__(self) -> None:
        if not getattr(self, "_done", True):
            self.close()


_EMPTY = object()


class Engine:
    """Owns the model, the executors and the loop; hands out SpeechStreams."""

    def __init__(self, model: SpeechModel, config: EngineConfig | None = None,
                 clock: Callable[[], float] = time.perf_counter, model_load_s: float = 0.0):
        self.model = model
        self.config = config = config or EngineConfig()
        if config.llm_lookahead < 0:
            raise InvalidRequest(f"llm_lookahead is {config.llm_lookahead}: use 0 (none) or more chunks")
        if config.path not in ("fast", "reference"):
            raise InvalidRequest(f"unknown path {config.path!r}: use 'fast' or 'reference'")
        self.device = model.device
        self.clock = clock
        self.model_load_s = model_load_s
        self.sample_rate = model.config.vocos.sample_rate
        if config.attention not in ATTENTION:
            raise InvalidRequest(f"unknown attention {config.attention!r}: use one of {', '.join(ATTENTION)}")
        self._attention = config.attention
        model.fuse_projections()  # every path runs the fused layers (a no-op for a second engine over the same model)
        self.stream_slots = config.max_concurrent_requests or self._slots_from_memory()
        reference = config.path == "reference"
        cuda = self.device.type == "cuda"
        if config.compile not in ("auto", "on", "off"):
            raise InvalidRequest(f"unknown compile setting {config.compile!r}: use auto, on or off")
        self.compiled = not reference and (config.compile == "on" or (config.compile == "auto" and cuda))
        # the loop's stream runs the TTS; the vocoder's stream beside it (same priority), the LLM's own, lower-priority
        # stream beside both. Each stream has its own graphs (their memory pools must not be shared)
        self.cuda_stream = torch.cuda.Stream(self.device, priority=-1) if cuda else None
        llm_stream = torch.cuda.Stream(self.device) if cuda and not reference else None
        vocoder_stream = torch.cuda.Stream(self.device, priority=-1) if cuda and not reference else None
        use_graphs = config.cuda_graphs and not reference
        graphs = GraphCache(self.device, enabled=use_graphs, stream=self.cuda_stream)
        llm_graphs = GraphCache(self.device, enabled=use_graphs, stream=llm_stream)
        vocoder_graphs = GraphCache(self.device, enabled=use_graphs, stream=vocoder_stream)
        self.llm = LLMExecutor(model, self.stream_slots + config.max_sessions, config.max_session_tokens + 1,
                               llm_graphs, one_row_at_a_time=reference, compile=self.compiled, stream=llm_stream)
        self.tts = TTSExecutor(model, self.stream_slots, config.tts_capacity, graphs, one_row_at_a_time=reference,
                               compile=self.compiled)
        self.vocoder = VocoderExecutor(model, vocoder_graphs, max_batch=self.stream_slots, stream=vocoder_stream)
        self.graphs = (graphs, llm_graphs, vocoder_graphs)
        self._prefix: PrefixCache | None = None
        self._default_speaker: torch.Tensor | None = None
        self.scheduler = Scheduler(self.llm, self.tts, self.vocoder, None, SchedulerConfig(), clock)
        self.scheduler.after_advance = lambda: self._flush_wakeups()  # chunks out as soon as they are made
        self._cv = threading.Condition()
        self._commands: deque[Callable[[], None]] = deque()
        # admission counts live streams; a stream its caller dropped without close() leaves the set and is cancelled
        self._streams: weakref.WeakSet[SpeechStream] = weakref.WeakSet()
        self._wakeups: dict[asyncio.AbstractEventLoop, list[asyncio.Event]] = {}  # async readers to wake (_wake)
        self._sessions_open = 0
        self._thread: threading.Thread | None = None
        self._stopping = False
        _ENGINES.add(self)

    def _slots_from_memory(self) -> int:
        if self.device.type != "cuda":
            return CPU_STREAM_SLOTS
        llm, tts = self.model.config.llm, self.model.config.tts
        item = torch.finfo(self.model.dtype).bits // 8
        positions = self.config.max_session_tokens + 1
        llm_row = 2 * llm.num_hidden_layers * llm.num_key_value_heads * llm.head_dim * positions
        tts_row = 2 * tts.num_hidden_layers * tts.num_attention_heads * tts.head_dim * self.config.tts_capacity
        free, _ = torch.cuda.mem_get_info(self.device)
        # each pool keeps one slot more, the spare of its row swaps
        budget = free * self.config.memory_fraction - (self.config.max_sessions + 1) * llm_row * item - tts_row * item
        slots = int(budget // ((llm_row + tts_row) * item))
        if slots < 1:
            raise InvalidRequest("the GPU has no room for one stream's caches: lower --max-session-tokens")
        return min(slots, MAX_AUTO_STREAM_SLOTS)

    @classmethod
    def from_pretrained(cls, model: str | None = None, *, device: str = "cpu", dtype: str | torch.dtype | None = None,
                        dummy_weights: bool = False, dummy_size: str = "full", seed: int = 0, progress: bool = True,
                        config: EngineConfig | None = None) -> Engine:
        """`model`: a MiniCPM-o 2.6 snapshot directory or hub id; None = the embedded tiny random-weight model."""
        from omnivox.config import CONFIGS
        from omnivox.models.loader import build_dummy_model, load_speech_model
        from omnivox.models.synthetic import default_tiny_checkpoint

        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        if dtype == "tf32":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        t0 = time.perf_counter()
        if dummy_weights:
            speech_model = build_dummy_model(CONFIGS[dummy_size](), device=dev, dtype=dt, seed=seed)
        else:
            source = model if model is not None else default_tiny_checkpoint()
            speech_model = load_speech_model(source, device=dev, dtype=dt, progress=progress)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return cls(speech_model, config=config, model_load_s=time.perf_counter() - t0)

    def with_config(self, **changes) -> Engine:
        """A second engine over the same weights with other runtime knobs (e.g. the other path, for comparisons)."""
        return Engine(self.model, replace(self.config, **changes), clock=self.clock, model_load_s=self.model_load_s)

    # ---- the loop -----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def on_device(self) -> Iterator[None]:
        """The loop's device context (its CUDA stream, inference mode, the attention kernels): for code that drives
        the executors directly, such as the step benchmarks."""
        stream = torch.cuda.stream(self.cuda_stream) if self.cuda_stream is not None else contextlib.nullcontext()
        with torch.inference_mode(), stream, attention_backends(self._attention, self.device):
            yield

    @property
    def loop_thread(self) -> threading.Thread | None:
        """The thread running the loop (None while it is stopped): benchmarks read its CPU time."""
        return self._thread

    def _submit(self, command: Callable[[], None]) -> None:
        with self._cv:
            self._commands.append(command)
            if self._thread is None or not self._thread.is_alive():
                self._stopping = False
                self._thread = threading.Thread(target=self._run, name="omnivox-engine", daemon=True)
                self._thread.start()
            self._cv.notify_all()

    def _run(self) -> None:
        idle_since = None
        with self.on_device():
            while True:
                self.scheduler.reap()  # cancelled requests give their rows back before new ones take any
                with self._cv:
                    commands = list(self._commands)
                    self._commands.clear()
                for command in commands:
                    command()
                try:
                    moved = self.scheduler.step()
                finally:
                    self._flush_wakeups()
                if moved:
                    idle_since = None
                    continue
                with self._cv:
                    if self._commands:
                        continue
                    idle_s = self.clock() - idle_since if idle_since is not None else 0.0
                    if self._stopping or (not self.scheduler.live and idle_s > IDLE_STOP_S):
                        self._thread = None
                        return
                    idle_since = idle_since or self.clock()
                    self._cv.wait(timeout=0.1)

    def _wake(self, loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> None:
        """Wakes an async reader: on the loop thread at the next flush (once the requests have advanced, and at the
        end of the iteration), all of one event loop's readers in one call (each `call_soon_threadsafe` writes to
        that loop's wake-up socket: a few per chunk showed in the loop's profile); from any other thread at once."""
        if threading.current_thread() is self._thread:
            self._wakeups.setdefault(loop, []).append(event)
        else:
            loop.call_soon_threadsafe(event.set)

    def _flush_wakeups(self) -> None:
        pending, self._wakeups = self._wakeups, {}
        for loop, events in pending.items():
            with contextlib.suppress(RuntimeError):  # that event loop is closed: no reader is left to wake
                loop.call_soon_threadsafe(_set_all, events)

    def shutdown(self) -> None:
        """Cancels every live request and stops the loop thread."""
        for stream in list(self._streams):
            stream.close()
        with self._cv:
            self._stopping = True
            thread = self._thread
            self._cv.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=10)

    def warm_up(self) -> None:
        """Computes the shared prompt cache and the default voice, and captures every step graph (each batch size
        and key width), so that no request pays for them."""
        with self._cv, self.on_device():
            self._shared_prompt()
            self.default_speaker()
            self.llm.warm_up()
            self.tts.warm_up()
            self.vocoder.warm_up()
            if self.cuda_stream is not None:
                torch.cuda.synchronize(self.device)

    # ---- admission and bookkeeping ------------------------------------------------------------------------------
    @property
    def live_requests(self) -> int:
        return len(self._streams)

    def wait_idle(self, timeout_s: float = 10.0) -> bool:
        """Waits until no request is live and no cache row is held by one (sessions' rows excepted)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self._streams and not self.scheduler.live and not self._commands:
                return True
            time.sleep(0.005)
        return False

    def stats(self) -> dict:
        with self._cv:
            live = len(self._streams)
            sessions = self._sessions_open
        return {
            "live_requests": live,
            "stream_slots": self.stream_slots,
            "stream_slots_free": self.stream_slots - live,
            "sessions_open": sessions,
            "max_sessions": self.config.max_sessions,
            "session_slots_free": self.config.max_sessions - sessions,
            "max_concurrent_requests": self.stream_slots,
            "cache_bytes": self.llm.slots.num_used * self.llm.pool.slot_bytes
            + self.tts.slots.num_used * self.tts.pool.slot_bytes,
            "cache_bytes_allocated": self.llm.pool.nbytes + self.tts.pool.nbytes,
            "llm_rows_used": self.llm.slots.num_used,
            "tts_rows_used": self.tts.slots.num_used,
            "graphs": sum(map(len, self.graphs)),
            "compiled": self.compiled,
            "iterations": self.scheduler.iterations,
            "device": str(self.device),
            "path": self.config.path,
            "dummy_weights": self.model.source == "dummy",
        }

    @property
    def on_batch(self) -> Callable[[str, int], None] | None:
        """Called with (stage, rows) after each batch the loop runs: llm, tts, vocoder, prefill."""
        return self.scheduler.on_batch

    @on_batch.setter
    def on_batch(self, observer: Callable[[str, int], None] | None) -> None:
        self.scheduler.on_batch = observer

    def loop_stats(self) -> dict:
        """The loop's queue depths, the live streams' buffered audio and its time by part of the iteration (read
        without stopping the loop)."""
        try:
            return self.scheduler.stats(self.clock())
        except (RuntimeError, ValueError):  # the live list changed while it was read: report nothing this time
            return {"waiting": {}, "buffered_s": {}}

    def _admit(self, stream: SpeechStream) -> None:
        with self._cv:
            if len(self._streams) >= self.stream_slots:
                raise EngineBusy(f"all {self.stream_slots} stream slots are in use; retry shortly", retry_after_s=1.0)
            self._streams.add(stream)

    def _ended(self, stream: SpeechStream) -> None:
        with self._cv:
            self._streams.discard(stream)

    def _cancel(self, stream: SpeechStream) -> None:
        """The stream's slot is free for admission at once: the loop ends cancelled requests (giving their rows
        back) before it starts new ones."""
        stream.cancelled = True
        live = stream.live
        if live is not None:
            live.cancelled = True
        with self._cv:
            self._streams.discard(stream)
            self._cv.notify_all()

    def _request_cache_bytes(self, stream: SpeechStream) -> int:
        live = stream.live
        if live is None:
            return 0
        llm = self.llm.pool.slot_bytes if live.session is not None and live.session.owned_by_request else 0
        return llm + self.tts.pool.slot_bytes

    def new_session(self) -> Session:
        """A conversation whose LLM cache is kept between turns; `close_session` when done with it."""
        with self._cv:
            if self._sessions_open >= self.config.max_sessions:
                raise EngineBusy(f"all {self.config.max_sessions} sessions are open; close one or retry later",
                                 retry_after_s=1.0)
            self._sessions_open += 1
        return Session(slot=None, capacity=self.llm.usable_positions)

    def close_session(self, session: Session) -> None:
        """Gives the session's cache row back (at once if idle; when its request ends otherwise)."""
        if session.closed:
            return
        session.closed = True
        if not session.owned_by_request:
            with self._cv:
                self._sessions_open -= 1
        self._submit(lambda: self._release_session(session))

    def _release_session(self, session: Session) -> None:
        if session.slot is not None and not session.busy:
            self.llm.slots.release(session.slot)
            session.slot = None

    # ---- requests -----------------------------------------------------------------------------------------------
    def _check_text(self, text: str) -> str:
        if not isinstance(text, str) or not text.strip():
            raise InvalidRequest("text is empty: give at least one non-space character to speak about")
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise InvalidRequest(
                    f"text holds an invalid character at index {e.start} (a lone UTF-16 surrogate): send valid Unicode"
                ) from None
        if len(text) > self.config.max_text_chars:
            raise ContextTooLong(
                f"text is {len(text)} characters; the limit is {self.config.max_text_chars}: shorten it"
            )
        return text

    def _seeds(self, seed: int | None) -> tuple[int, int]:
        """(LLM, TTS) random keys; no seed = fresh entropy."""
        base = seed if seed is not None else int.from_bytes(os.urandom(7), "little")
        return (2 * base) & (2**62 - 1), (2 * base + 1) & (2**62 - 1)

    def _system_ids(self) -> list[int]:
        """The system turn (empty with no system prompt); the operator's text, so its special tokens are real."""
        if not self.config.system_prompt:
            return []
        tok = self.model.tokenizer
        return tok.encode(f"<|im_start|>user\n{self.config.system_prompt}<|im_end|>\n")

    def _prompt_ids(self, session: Session | None, text: str, history: list[tuple[str, str]] | None) -> list[list[int]]:
        """The prefills for this turn (fact sheet 3.3). `session` None or new: a new conversation.

        Only the template adds special tokens: user and history text is encoded as plain text, so a typed
        `<|im_end|>` cannot close a turn."""
        tok = self.model.tokenizer
        im_start, im_end, newline = tok.special.im_start, tok.special.im_end, tok.encode("\n")
        user_turn = [im_start, *tok.encode_plain(f"user\n{text}")]
        if session is None or not session.system_prompted:
            turns = self._system_ids()
            for role, content in history or []:
                if role not in ("user", "assistant", "system"):
                    raise InvalidRequest(f"unknown role {role!r} in history: use user, assistant or system")
                self._check_text(content)
                turns += [im_start, *tok.encode_plain(f"{role}\n{content}"), im_end, *newline]
            return [turns, user_turn] if turns else [user_turn]
        if history:
            raise InvalidRequest("history is only accepted for a new session; the session already holds it")
        prefix = [im_end, *newline] if session.last_reply_terminated else [tok.special.tts_eos, im_end, *newline]
        return [prefix + user_turn]

    def _shared_prompt(self) -> PrefixCache:
        if self._prefix is None:
            self._prefix = PrefixCache(self.model, self._system_ids())
            self.scheduler.prefix = self._prefix
        return self._prefix

    def _check_sampling(self, sampling: SamplingParams) -> SamplingParams:
        if sampling.max_new_tokens < 1:
            raise InvalidRequest("max_new_tokens must be at least 1")
        if not sampling.greedy and (sampling.temperature <= 0 or not 0 < sampling.top_p <= 1):
            raise InvalidRequest("temperature must be > 0 and top_p in (0, 1] (or use greedy)")
        return sampling

    def stream(self, text: str, *, history: list[tuple[str, str]] | None = None, session: Session | None = None,
               seed: int | None = None, sampling: SamplingParams | None = None, forced_reply: str | None = None,
               forced_audio_seconds: float | None = None, request_id: str = "") -> SpeechStream:
        """Speak the model's reply to `text`. With `forced_reply`/`forced_audio_seconds` (random weights) the reply
        tokens are teacher-forced and the end of speech is forced after that much audio. Everything is validated
        before any memory is taken."""
        sampling = self._check_sampling(sampling or SamplingParams())
        forcing = self._forcing(forced_reply, forced_audio_seconds)
        stream, session, prefills = self._open_turn(text, history, session, sampling, ASSISTANT_HEADER, request_id)
        reply = Reply(self.model, session, sampling, stream.metrics, forcing, self.config.early_first_chunk)
        self._launch_turn(stream, reply, reply.speech(), reply.llm(), session, prefills, sampling, seed)
        return stream

    def _open_turn(self, text: str, history: list[tuple[str, str]] | None, session: Session | None,
                   sampling: SamplingParams, header: str, request_id: str) -> tuple[SpeechStream, Session, list]:
        """Validates a conversation turn and admits it: (its stream, its session, the prompt prefills). Nothing is
        taken before every check passed."""
        self._check_text(text)
        if session is not None and session.closed:
            raise InvalidRequest("this session was closed: start a new one with engine.new_session()")
        if session is not None and session.busy:
            raise InvalidRequest("this session is already speaking a reply: wait for it or close it")
        prefills = self._prompt_ids(session, text, history)
        prompt_len = sum(map(len, prefills))
        history_len = session.length if session is not None else 0
        needed = history_len + prompt_len + len(self.model.tokenizer.encode(header)) + sampling.max_new_tokens
        if needed > self.llm.usable_positions:
            raise ContextTooLong(
                f"this turn needs {needed} LLM positions (history {history_len}, prompt {prompt_len}, reply up to "
                f"{sampling.max_new_tokens}) but a session holds {self.llm.usable_positions}: shorten the text or "
                "start a new session"
            )
        metrics = RequestMetrics(request_id=request_id, prompt_tokens=prompt_len)
        stream = SpeechStream(self, metrics, self.clock, self.config.early_first_chunk)
        self._admit(stream)
        if session is None:
            session = Session(slot=None, capacity=self.llm.usable_positions, owned_by_request=True)
        session.busy = True
        return stream, session, prefills

    def _launch_turn(self, stream: SpeechStream, reply: Reply, speech, reply_llm, session: Session, prefills: list,
                     sampling: SamplingParams, seed: int | None) -> None:
        """Queues a conversation turn for the loop: its prompt prefills, then the reply's LLM side and speech side.
        The prompt's last prefill runs with the reply header, the reply's first LLM work: one LLM batch, not two
        one after the other, on the way to the first audio."""

        def llm_side():
            for ids in prefills[:-1]:  # the system prompt (its shared cache is copied) and earlier turns
                yield LLMPrefill(ids)
            header = next(reply_llm)
            assert isinstance(header, LLMDecode), "a reply's LLM side starts with its header"
            hidden_at = None if header.hidden_at is None else len(prefills[-1]) + header.hidden_at
            # the session counts the turn from the launch of its last prefill on (its length does), also if the
            # request is cancelled while that batch runs
            session.system_prompted = True
            session.turns += 1
            result = yield LLMDecode(prefills[-1] + header.ids, header.window, hidden_at)
            try:
                while True:
                    result = yield reply_llm.send(result)
            except StopIteration:
                return

        def start() -> None:
            if session.slot is None:
                session.slot = self.llm.slots.acquire()
            self._shared_prompt()
            self._start(stream, reply, Side(speech), Side(llm_side()), session, sampling, seed)

        self._submit(start)

    def _start(self, stream: SpeechStream, reply: Reply, speech: Side, llm: Side | None, session: Session | None,
               sampling: SamplingParams, seed: int | None) -> None:
        llm_seed, tts_seed = self._seeds(seed)
        ref = weakref.ref(stream)  # the loop must not keep a stream alive that its caller dropped

        def emit(item: object) -> None:
            ended = not isinstance(item, Piece)
            if ended and session is not None and (session.owned_by_request or session.closed):
                session.closed = True
                self._release_session(session)
            target = ref()
            if target is not None:
                target._emit(item)

        live = Live(reply=reply, speech=speech, llm=llm, session=session, sampling=sampling, metrics=stream.metrics,
                    llm_seed=llm_seed, tts_seed=tts_seed, emit=emit, lookahead=self.config.llm_lookahead,
                    started_at=stream.started_at)
        stream.live = live
        live.cancelled = stream.cancelled  # closed before the loop took it: it ends at the next reap
        self.scheduler.add(live)

    def chat_text(self, text: str, *, history: list[tuple[str, str]] | None = None, session: Session | None = None,
                  seed: int | None = None, sampling: SamplingParams | None = None, forced_reply: str | None = None,
                  request_id: str = "") -> SpeechStream:
        """The model's reply to `text` as text only (no TTS): a SpeechStream whose chunks carry text deltas and no
        audio. Same prompt, multi-turn rules, validation and admission as `stream`; the contract is in
        omnivox/engine/text_reply.py. `forced_reply` (random weights) teacher-forces the reply's tokens."""
        sampling = self._check_sampling(sampling or SamplingParams())
        forced_ids = self.model.tokenizer.encode(forced_reply) if forced_reply is not None else None
        stream, session, prefills = self._open_turn(text, history, session, sampling, TEXT_ASSISTANT_HEADER,
                                                    request_id)
        reply = Reply(self.model, session, sampling, stream.metrics)  # the loop reads its look-ahead and rewind state
        llm = text_llm(self.model.tokenizer, session, sampling, stream.metrics, forced_ids)
        self._launch_turn(stream, reply, text_speech(), llm, session, prefills, sampling, seed)
        return stream

    def read_aloud_feed(self, feed: TextFeed, *, seed: int | None = None, sampling: SamplingParams | None = None,
                        forced_words_per_second: float | None = None, request_id: str = "") -> SpeechStream:
        """Speak text as it is appended to `feed` (TTS only, default voice), starting as soon as the first 10-token
        text chunk is there (contract in omnivox/engine/text_feed.py). `forced_words_per_second` (random weights):
        speech ends after words / rate seconds once the feed is done."""
        sampling = self._check_sampling(sampling or SamplingParams())
        if forced_words_per_second is not None and forced_words_per_second <= 0:
            raise InvalidRequest("forced_words_per_second must be a positive number")
        forcing = Forcing([], UNLIMITED_AUDIO_TOKENS) if forced_words_per_second is not None else None
        metrics = RequestMetrics(request_id=request_id)
        stream = SpeechStream(self, metrics, self.clock, self.config.early_first_chunk)
        self._admit(stream)
        reply = Reply(self.model, None, sampling, metrics, forcing, self.config.early_first_chunk)
        reader = FeedReader(feed, reply, self.model.tts_tokenizer, forced_words_per_second)

        def start() -> None:
            speaker = self.default_speaker()
            self._start(stream, reply, Side(reply.speech(speaker)), Side(awaiting_text()), None, sampling, seed)
            live = stream.live
            feed.attach(lambda: self._submit(lambda: reader.pump(live)))

        self._submit(start)
        return stream

    def _forcing(self, forced_reply: str | None, forced_audio_seconds: float | None) -> Forcing | None:
        if forced_reply is None and forced_audio_seconds is None:
            return None
        if forced_audio_seconds is None or forced_audio_seconds <= 0:
            raise InvalidRequest("forced_audio_seconds must be a positive number of seconds when forcing a reply")
        reply = forced_reply or ""
        return Forcing(
            reply_ids=self.model.tokenizer.encode(reply),
            audio_tokens=round(forced_audio_seconds * AUDIO_TOKENS_PER_SECOND),
            text_tokens=len(self.model.tts_tokenizer.encode(reply)),
        )

    def default_speaker(self) -> torch.Tensor:
        """The default voice's speaker vector: the `<|spk|>` state after the default system prompt, computed once."""
        if self._default_speaker is None:
            tok = self.model.tokenizer
            ids = self._system_ids() + tok.encode("<|im_start|>user\n")
            header = tok.encode(ASSISTANT_HEADER)
            c = self.model.config.llm
            pool = KVPool(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, len(ids) + len(header),
                          self.model.dtype, self.device)
            prompt_forward(self.model, pool, 0, ids)
            hidden = prompt_forward(self.model, pool, len(ids), header)
            self._default_speaker = self.tts.project_speaker(hidden[header.index(tok.special.spk)])
        return self._default_speaker

    def read_aloud(self, text: str, *, seed: int | None = None, sampling: SamplingParams | None = None,
                   forced_audio_seconds: float | None = None, request_id: str = "") -> SpeechStream:
        """Speak `text` itself with the default voice (TTS only, no LLM reply)."""
        self._check_text(text)
        tts_text = normalize_for_tts(text, detect_language(text))
        if not self.model.tts_tokenizer.encode(tts_text):
            raise InvalidRequest(
                "text has nothing to speak: it holds only characters the speech tokenizer drops (zero-width, "
                "control or private-use characters); send words"
            )
        sampling = self._check_sampling(sampling or SamplingParams())
        forcing = self._forcing(None, forced_audio_seconds) if forced_audio_seconds is not None else None
        metrics = RequestMetrics(request_id=request_id)
        stream = SpeechStream(self, metrics, self.clock, self.config.early_first_chunk)
        self._admit(stream)
        reply = Reply(self.model, None, sampling, metrics, forcing, self.config.early_first_chunk)

        def start() -> None:
            speaker = self.default_speaker()
            self._start(stream, reply, Side(reply.read_aloud(text, speaker)), None, None, sampling, seed)

        self._submit(start)
        return stream
