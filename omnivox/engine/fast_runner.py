"""The fast path: the reference steps over static caches from slot pools, decode steps replayed as CUDA graphs.

What differs from `EagerRunner(cache="static")`, and nothing else does:

* Caches come from two pools allocated once (`SlotPool`): one LLM cache per session, one TTS cache per live TTS
  segment (`LayerKVCache`: one buffer per layer). A cache is zeroed when handed out, so unwritten slots read as
  zeros (fact sheet 4.13).
* `llm_step` for one token is one graph replay: forward, logits and sampling (repetition penalty over a window
  padded to `LLM_WINDOW` ids by repeating its first id, which changes nothing) with token, position and window in
  device buffers. Prompt prefills and the 9-token header stay eager (`llm_forward`).
* `tts_generate` runs the segment's first audio step eagerly (bos input, no top-p/top-k), then one graph replay per
  step. Everything a step decides lives on the device: the audio mask (from the position and text-length
  scalars, by `tts_audio_mask`'s rule), the EOS ban and forced EOS, the codes (written into a device buffer) and a
  finished flag. The call's steps are queued without looking at the results and read back once at the end;
  steps after the first EOS still run and their results are discarded, and the request's generator is then set
  to where the sequential algorithm (which stops at the EOS) would have left it, so later calls draw the same.
* Attention reads the cache only up to a bucket of positions (`LLM_BUCKET`, `TTS_BUCKET`) that holds every
  position of the step (a TTS call: every position of its 25 steps), not the whole capacity; one graph per bucket.
  Keys past the bucket are masked out on the reference path anyway, so the result is the same.
* In bf16/fp16 on a GPU the decode steps run `FusedDecoder` (q/k/v, gate/up and the 4 code heads as one product
  each; fused_linears.py): same math, another summation order. fp32 runs the modules: bit-identical tokens.
* Attention on a GPU takes the memory-efficient SDPA kernel by default, never cuDNN's (`_attention` says why).
* Sampling is `omnivox.engine.sampling`, the same functions as the reference path.
* Overlap (`streams`, on a GPU): LLM, TTS and DVAE + Vocos work is queued on three CUDA streams, each with its
  own graph memory pool, so a TTS call (`tts_launch`) and a vocoder window (`decode_audio_launch`) compute while
  the host runs LLM steps; their results are taken later (overlap.py). A stream waits for the one whose tensors
  it reads (the vocoder waits for the TTS), and a released slot is handed out only after its stream's work.
  Without overlap the three are one stream. Every graph is captured on the stream it replays on (graphs.py says
  why: the cuBLAS workspace).
* Switches: `compile` (torch.compile of the decode bodies: "default" and "max-autotune" are captured in our
  graphs; "reduce-overhead" lets torch.compile own the graphs), `attention` (the PyTorch SDPA backend), graphs
  on or off. On a CPU there are no graphs: the same step functions run eagerly, one host check per TTS step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import partial

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from omnivox.engine.fused_linears import FusedDecoder, FusedHeads
from omnivox.engine.graphs import CacheWindow, LayerKVCache, Slot, SlotPool, StepGraph, bucket
from omnivox.engine.overlap import Pending, Queued, Ready
from omnivox.engine.prefill_graphs import PrefillGraphs
from omnivox.engine.runner import EagerRunner
from omnivox.engine.sampling import sample_llm_token, sample_tts_codes
from omnivox.engine.session import Session, TTSState
from omnivox.engine.types import SamplingParams
from omnivox.errors import InvalidRequest
from omnivox.models.loader import SpeechModel

COMPILE_MODES = {"none": None, "default": "default", "reduce-overhead": "reduce-overhead",
                 "max-autotune": "max-autotune-no-cudagraphs"}  # fmt: skip
ATTENTION_BACKENDS = {
    "sdpa": None,  # PyTorch picks on a CPU; on a GPU DETERMINISTIC_GPU_ATTENTION (see `_attention`)
    "flash": [SDPBackend.FLASH_ATTENTION],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION],
    "math": [SDPBackend.MATH],
    "cudnn": [SDPBackend.CUDNN_ATTENTION],
}
DETERMINISTIC_GPU_ATTENTION = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
LLM_WINDOW = 32  # repetition-penalty window in the graph (a 3-token call sees at most 9 + 2 ids)
LLM_BUCKET = 512  # attention reads the LLM cache in multiples of this many positions
TTS_BUCKET = 256  # ... and the TTS cache in multiples of this
TTS_MAX_STEPS = 32  # codes one TTS call can write (the pipeline asks for 25)
NO_FORCED_EOS = 1 << 40

# tts_audio_mask's defaults, which the official mask function uses (not the config's 25-token call size)
MASK_RESERVED, MASK_TEXT_CHUNK, MASK_AUDIO_CHUNK = 300, 10, 50

# layout of a TTS slot's long buffer: scalars, the last codes, then the call's codes
POS, STEP, NUM_TEXT, BAN_UNTIL, FORCE_AT, N_EXEC, DONE = range(7)
LAST = 8


class FastRunner(EagerRunner):
    def __init__(
        self,
        model: SpeechModel,
        llm_capacity: int = 4096,
        tts_capacity: int = 2560,
        llm_slots: int = 8,
        tts_slots: int = 8,
        compile: str = "none",
        attention: str = "sdpa",
        cuda_graphs: bool = True,
        fused: bool | None = None,
        streams: bool = True,
    ):
        """`streams`: LLM, TTS and audio on their own CUDA streams (overlap; GPU only).
        `fused`: decode steps run `FusedDecoder` (q/k/v, gate/up and the code heads as one product each; the
        model's weights are moved into fused buffers in place, values unchanged); None = on for bf16/fp16 on a
        GPU. Off, the steps call the model's modules (bit-identical to the reference path in fp32)."""
        super().__init__(model, cache="static", llm_capacity=llm_capacity, tts_capacity=tts_capacity)
        if compile not in COMPILE_MODES:
            raise InvalidRequest(f"compile mode {compile!r} is unknown: use one of {', '.join(COMPILE_MODES)}")
        if attention not in ATTENTION_BACKENDS:
            raise InvalidRequest(f"attention {attention!r} is unknown: use one of {', '.join(ATTENTION_BACKENDS)}")
        if attention == "flash":
            raise InvalidRequest(
                "attention 'flash': PyTorch's flash kernel takes no attention mask, and every attention call of "
                "this engine has one (static caches are masked by position, the TTS hides text not yet released); "
                "use sdpa, efficient, cudnn or math"
            )
        self.compile_mode = compile
        self.attention = attention
        self.cuda = self.device.type == "cuda"
        self.use_graphs = cuda_graphs and self.cuda and compile != "reduce-overhead"
        self.cuda_graphs = cuda_graphs
        if fused is None:
            fused = self.cuda and self.dtype in (torch.bfloat16, torch.float16)
        self.fused = fused
        if fused:
            self.llm_decoder = FusedDecoder(model.llm.model)
            self.tts_decoder = FusedDecoder(model.tts.model)
            self.tts_heads = FusedHeads(model.tts.head_code)
        else:
            self.llm_decoder, self.tts_decoder = model.llm.model, model.tts.model
            self.tts_heads = model.tts.compute_logits
        dev = self.device
        self.llm_keys = torch.arange(self.llm_capacity, device=dev)
        self.tts_keys = torch.arange(self.tts_capacity, device=dev)
        tts_cfg = model.config.tts
        self.vq_index = torch.arange(tts_cfg.num_vq, device=dev)
        self.tts_bos = torch.tensor([[tts_cfg.audio_bos_token_id]], device=dev)
        self.llm_pool = SlotPool("LLM session", self._make_llm_slot, llm_slots)
        self.tts_pool = SlotPool("TTS", self._make_tts_slot, tts_slots)
        self._tts_temperatures: dict[tuple, torch.Tensor] = {}
        # graphs that may run at the same time (on different streams) must not share a memory pool
        self.step_graph_pool = torch.cuda.graph_pool_handle() if self.use_graphs else None  # LLM graphs
        self.tts_graph_pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        # compile="reduce-overhead" replays torch.compile's own CUDA graphs, which are not made for work handed
        # between streams (on the H200 the two together tripped a device-side index assert): one stream then
        self.streams = streams and self.cuda and compile != "reduce-overhead"
        self.llm_stream, self.tts_stream, self.audio_stream = self._make_streams()
        # DVAE + Vocos are never compiled, so they keep their graphs under compile="reduce-overhead" too
        self.audio_graphs_on = cuda_graphs and self.cuda
        self.audio_graph_pool = torch.cuda.graph_pool_handle() if self.audio_graphs_on else None
        self.audio_graphs: dict[int, tuple[torch.Tensor, StepGraph, torch.Tensor]] = {}
        self.prefill = PrefillGraphs(  # multi-token LLM forwards, padded to buckets (prefill_graphs.py)
            self.llm_decoder, model.llm.embed, self.llm_capacity, LLM_BUCKET, dev, self.step_graph_pool,
            self.llm_stream, self.use_graphs,
        )  # fmt: skip
        # the generators graphs draw from; requests' generator states are copied in and out around replays
        self.llm_rng = torch.Generator(device=dev) if self.use_graphs else None
        self.tts_rng = torch.Generator(device=dev) if self.use_graphs else None
        mode = COMPILE_MODES[compile]
        if mode is None:
            self.llm_body, self.tts_body = self.llm_decode_body, self.tts_decode_body
        else:
            # one compiled body serves every bucket (the key length is marked dynamic, see `_keys`)
            self.llm_body = torch.compile(self.llm_decode_body, mode=mode, fullgraph=True)
            self.tts_body = torch.compile(self.tts_decode_body, mode=mode, fullgraph=True)
            limit = max(torch._dynamo.config.recompile_limit, 64)  # reduce-overhead: a variant per slot
            torch._dynamo.config.recompile_limit = limit
            if compile == "reduce-overhead":  # let torch.compile's graphs mutate the caches in place
                for slot in (*self.llm_pool.slots, *self.tts_pool.slots):
                    for t in (*slot.cache.ks, *slot.cache.vs):
                        torch._dynamo.mark_static_address(t)

    def _make_streams(self) -> tuple[torch.cuda.Stream | None, ...]:
        """LLM, TTS and audio streams: three with overlap, else one for all (graphs cannot be captured on the
        legacy default stream, and each must replay where it was captured); none on a CPU."""
        if not self.cuda:
            return None, None, None
        if not self.streams:
            work = torch.cuda.Stream(self.device)
            return work, work, work
        # the TTS is a chain of tiny kernels: a higher priority lets its blocks in between the LLM's large products
        streams = torch.cuda.Stream(self.device), torch.cuda.Stream(self.device, priority=-1)
        streams += (torch.cuda.Stream(self.device),)
        if len({s.cuda_stream for s in streams}) < 3:  # PyTorch hands out pooled streams round-robin
            raise RuntimeError("the CUDA stream pool gave the LLM, TTS and audio work the same stream")
        return streams

    # ---- pools --------------------------------------------------------------------------------------------------
    def _host_buffer(self, n: int) -> torch.Tensor:
        return torch.zeros(n, dtype=torch.long, pin_memory=self.cuda)

    def _make_llm_slot(self, index: int) -> Slot:
        c = self.model.config.llm
        cache = LayerKVCache(
            c.num_hidden_layers, c.num_key_value_heads, c.head_dim, self.llm_capacity, self.dtype, self.device
        )
        io = {
            "buf": torch.zeros(2 + LLM_WINDOW, dtype=torch.long, device=self.device),  # token, position, window
            "out": torch.zeros(1, dtype=torch.long, device=self.device),
            "stage": self._host_buffer(2 + LLM_WINDOW),
        }
        return Slot(index, cache, io)

    def _make_tts_slot(self, index: int) -> Slot:
        c = self.model.config.tts
        cache = LayerKVCache(
            c.num_hidden_layers, c.num_attention_heads, c.head_dim, self.tts_capacity, self.dtype, self.device
        )
        size = LAST + c.num_vq * (1 + TTS_MAX_STEPS)
        io = {
            "buf": torch.zeros(size, dtype=torch.long, device=self.device),
            "stage": self._host_buffer(LAST),
            "host": self._host_buffer(size),
        }
        return Slot(index, cache, io)

    def new_llm_cache(self) -> LayerKVCache:
        slot = self.llm_pool.acquire()
        slot.cache.reset()
        return slot.cache

    def release_llm_cache(self, cache: LayerKVCache) -> None:
        self._after(self.llm_stream)
        self.llm_pool.release(cache)

    def new_tts_state(self) -> TTSState:
        slot = self.tts_pool.acquire()
        slot.cache.reset()  # slots not yet written must read as zeros (the restart attends to some)
        return TTSState(cache=slot.cache)

    def release_tts_state(self, state: TTSState) -> None:
        self._after(self.tts_stream)
        self.tts_pool.release(state.cache)

    # ---- streams ------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _on(self, stream: torch.cuda.Stream | None, *reads: torch.Tensor | None) -> Iterator[None]:
        """Runs the block's work on `stream`, after everything the caller's stream already queued (e.g. a slot's
        reset). `reads` came from other streams: their memory is kept from reuse until `stream` is done with them.
        No stream (a CPU): the caller's stream."""
        if stream is None:
            yield
            return
        stream.wait_stream(torch.cuda.current_stream())
        for tensor in reads:
            if tensor is not None:
                tensor.record_stream(stream)
        with torch.cuda.stream(stream):
            yield

    def _hand_back(self, stream: torch.cuda.Stream | None, result: torch.Tensor) -> None:
        """`result` was made on `stream` for the caller, who reads it on its own stream: that one waits, and the
        memory is kept from reuse until it has read it."""
        if stream is not None:
            self._after(stream)
            result.record_stream(torch.cuda.current_stream())

    def _after(self, stream: torch.cuda.Stream | None) -> None:
        """The caller's stream (where a slot is reset when handed out again) waits for `stream`'s work."""
        if stream is not None:
            torch.cuda.current_stream().wait_stream(stream)

    def _attention(self, eager: bool = False):
        """The SDPA backends to allow, the same for prefills and steps. The default ("sdpa") on a GPU is the
        memory-efficient kernel with math as the fallback, never cuDNN's: on the H200 cuDNN attention gave other
        bf16 results from one run of the same request to the next (bench/RESULTS.md §7), and for prefills it
        builds a plan per new shape. On a CPU, PyTorch's own choice, as on the reference path."""
        backends = ATTENTION_BACKENDS[self.attention]
        if backends is None and self.cuda:
            backends = DETERMINISTIC_GPU_ATTENTION
        return contextlib.nullcontext() if backends is None else sdpa_kernel(backends)

    def _keys(self, keys: torch.Tensor, length: int) -> torch.Tensor:
        """arange(length): the key positions a step's attention reads. Compiled bodies see its length as symbolic,
        so every bucket uses one compilation."""
        keys = keys[:length]
        if self.compile_mode != "none":
            torch._dynamo.mark_dynamic(keys, 0)
        return keys

    def _mark_step(self) -> None:
        if self.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()

    def _default_generator(self, generator: torch.Generator | None) -> torch.Generator:
        if generator is not None:
            return generator
        return torch.cuda.default_generators[self.device.index or 0] if self.cuda else torch.default_generator

    def _capture(self, slot: Slot, key, fn, rng: torch.Generator | None) -> StepGraph:
        """Capture `fn` for `slot`: the warm-up runs it for real, so the slot's buffers and the generator are put
        back as they were before recording (its KV write is redone identically by the replay that follows)."""
        saved_buf = slot.io["buf"].clone()
        saved_rng = rng.get_state() if rng is not None else None

        def restore() -> None:
            slot.io["buf"].copy_(saved_buf)

        llm = key[0] == "llm"
        pool, stream = (self.step_graph_pool, self.llm_stream) if llm else (self.tts_graph_pool, self.tts_stream)
        graph = StepGraph(fn, pool, stream, (rng,) if rng is not None else (), before_capture=restore)
        if saved_rng is not None:
            rng.set_state(saved_rng)
        slot.graphs[key] = graph
        return graph

    # ---- LLM ----------------------------------------------------------------------------------------------------
    def llm_decode_body(self, cache: LayerKVCache, buf: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """buf = [token, position, window...]; keys = arange(length), the positions attention reads
        -> float32 logits [V] of the next token."""
        token, pos = buf[0:1].view(1, 1), buf[1:2]
        mask = (keys <= pos)[None, None, None]  # [1, 1, 1, length]
        hidden = self.llm_decoder(self.model.llm.embed(token), pos, CacheWindow(cache, keys.shape[0]), mask)
        return self.model.llm.compute_logits(hidden[0, -1])

    def _llm_step_fn(
        self, slot: Slot, length: int, sampling: SamplingParams, generator: torch.Generator | None
    ) -> torch.Tensor:
        buf = slot.io["buf"]
        logits = self.llm_body(slot.cache, buf, self._keys(self.llm_keys, length))
        token = sample_llm_token(
            logits,
            buf[2:],
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            repetition_penalty=sampling.repetition_penalty,
            greedy=sampling.greedy,
            generator=generator,
        )
        slot.io["out"].copy_(token)
        return slot.io["out"]

    @staticmethod
    def _llm_key(sampling: SamplingParams) -> tuple:
        if sampling.greedy:
            return ("llm", True)
        return ("llm", False, sampling.temperature, sampling.top_k, sampling.top_p, sampling.repetition_penalty)

    def _llm_cache_view(self, cache: LayerKVCache, end: int) -> tuple[CacheWindow, int]:
        """Attention reads the cache up to a bucket of positions (see CacheWindow), not its whole capacity."""
        length = bucket(end, LLM_BUCKET, self.llm_capacity)
        return CacheWindow(cache, length), length

    @torch.inference_mode()
    def llm_forward(self, session: Session, ids: list[int]) -> torch.Tensor:
        """The base contract, padded to a length bucket: one graph replay per slot, bucket and key bucket
        (prefill_graphs.py; eager on a CPU). Prompts longer than the largest bucket or too close to the capacity
        run eagerly. Runs on the LLM stream; the caller's stream waits for the result."""
        tb = self.prefill.padded_length(session.length, len(ids))
        with self._on(self.llm_stream):
            if tb is None:
                hidden = super().llm_forward(session, ids)
            else:
                slot = self.llm_pool.slot_of(session.cache)
                with self._attention():
                    hidden = self.prefill.run(slot, session.length, ids)
                session.length += len(ids)
        self._hand_back(self.llm_stream, hidden)
        return hidden

    @torch.inference_mode()
    def llm_step(
        self,
        session: Session,
        ids: list[int],
        window: list[int],
        sampling: SamplingParams,
        generator: torch.Generator | None,
        want_hidden: bool = False,
    ) -> tuple[int, torch.Tensor | None]:
        with self._on(self.llm_stream):  # the token read-back waits for this stream only
            if len(ids) != 1 or want_hidden or not 0 < len(window) <= LLM_WINDOW:
                return super().llm_step(session, ids, window, sampling, generator, want_hidden)
            return self._llm_graph_step(session, ids, window, sampling, generator), None

    def _llm_graph_step(
        self, session: Session, ids: list[int], window: list[int], sampling: SamplingParams, generator
    ) -> int:
        slot = self.llm_pool.slot_of(session.cache)
        stage = slot.io["stage"]
        stage[0], stage[1] = ids[0], session.length
        stage[2 : 2 + len(window)] = torch.tensor(window)
        stage[2 + len(window) :] = window[0]  # repeats change no logit: the penalty is applied once per id
        slot.io["buf"].copy_(stage, non_blocking=True)
        length = bucket(session.length + 1, LLM_BUCKET, self.llm_capacity)
        with self._attention():
            if self.use_graphs:
                key = (*self._llm_key(sampling), length)
                graph = slot.graphs.get(key)
                if graph is None:
                    fn = partial(self._llm_step_fn, slot, length, sampling, self.llm_rng)
                    graph = self._capture(slot, key, fn, self.llm_rng)
                gen = self._default_generator(generator)
                self.llm_rng.set_state(gen.get_state())
                out = graph.replay()
                gen.set_state(self.llm_rng.get_state())
            else:
                self._mark_step()
                out = self._llm_step_fn(slot, length, sampling, generator)
        session.length += 1
        return int(out)

    # ---- TTS ----------------------------------------------------------------------------------------------------
    def tts_audio_mask(self, pos: torch.Tensor, num_text: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """`runner.tts_audio_mask` computed on the device from position and text-length tensors, over the key
        positions `keys` (an arange): [1, 1, 1, len(keys)]."""
        chunks = torch.div(pos - MASK_RESERVED + MASK_AUDIO_CHUNK - 1, MASK_AUDIO_CHUNK, rounding_mode="floor")
        visible_text = (MASK_TEXT_CHUNK * chunks).clamp(max=MASK_RESERVED)
        text_end = torch.minimum(2 + visible_text, num_text + 3)
        visible = (keys < text_end) | ((keys >= MASK_RESERVED + 3) & (keys <= pos))
        return visible[None, None, None]

    def _tts_forward(
        self, cache: LayerKVCache, buf: torch.Tensor, keys: torch.Tensor, embeds: torch.Tensor
    ) -> torch.Tensor:
        pos = buf[POS : POS + 1].clamp(max=self.tts_capacity - 1)  # never write out of bounds
        mask = self.tts_audio_mask(pos, buf[NUM_TEXT : NUM_TEXT + 1], keys)
        hidden = self.tts_decoder(embeds, pos, CacheWindow(cache, keys.shape[0]), mask)
        return self.tts_heads(hidden)[0, -1]  # [num_vq, num_codes]

    def tts_decode_body(self, cache: LayerKVCache, buf: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """One audio step after the first: embed the last codes, forward, heads -> float32 logits [num_vq, codes]."""
        num_vq = self.vq_index.shape[0]
        embeds = self.model.tts.embed_codes(buf[LAST : LAST + num_vq].view(1, 1, num_vq))
        return self._tts_forward(cache, buf, keys, embeds)

    def tts_first_body(self, cache: LayerKVCache, buf: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return self._tts_forward(cache, buf, keys, self.model.tts.embed_text(self.tts_bos))

    def _tts_temperature(self, sampling: SamplingParams) -> torch.Tensor:
        key = tuple(sampling.tts_temperature)
        if key not in self._tts_temperatures:
            self._tts_temperatures[key] = self._temperature(sampling)
        return self._tts_temperatures[key]

    @staticmethod
    def _tts_key(sampling: SamplingParams) -> tuple:
        return ("tts", sampling.greedy, tuple(sampling.tts_temperature), sampling.tts_top_p, sampling.tts_top_k)

    def _tts_step_fn(self, slot: Slot, length: int, sampling: SamplingParams, first: bool, generator) -> None:
        """One audio step, all decisions on the device (see the module docstring)."""
        buf = slot.io["buf"]
        num_vq = self.vq_index.shape[0]
        keys = self._keys(self.tts_keys, length)
        logits = self.tts_first_body(slot.cache, buf, keys) if first else self.tts_body(slot.cache, buf, keys)
        step = buf[STEP : STEP + 1]
        codes = sample_tts_codes(
            logits,
            self._tts_temperature(sampling),
            top_p=sampling.tts_top_p,
            top_k=sampling.tts_top_k,
            first_audio_step=first,
            ban_eos=step < buf[BAN_UNTIL : BAN_UNTIL + 1],
            eos_id=self.eos_code,
            greedy=sampling.greedy,
            generator=generator,
        )
        forced = (step >= buf[FORCE_AT : FORCE_AT + 1]) & (self.vq_index == 0)
        codes = torch.where(forced, self.eos_code, codes)
        done = buf[DONE : DONE + 1]
        buf[N_EXEC : N_EXEC + 1] += 1 - done  # steps up to and including the first EOS
        done.copy_(torch.maximum(done, (codes == self.eos_code).any().long().view(1)))
        row = LAST + num_vq * (1 + step.clamp(max=TTS_MAX_STEPS - 1)) + self.vq_index
        buf.index_copy_(0, row, codes)
        buf[LAST : LAST + num_vq].copy_(codes)
        buf[POS : STEP + 1] += 1

    def tts_generate(
        self,
        state: TTSState,
        max_steps: int,
        num_text_tokens: int,
        sampling: SamplingParams,
        generator: torch.Generator | None,
        eos_after: int | None = None,
    ) -> int:
        return self.tts_launch(state, max_steps, num_text_tokens, sampling, generator, eos_after).wait()

    @torch.inference_mode()
    def tts_launch(
        self,
        state: TTSState,
        max_steps: int,
        num_text_tokens: int,
        sampling: SamplingParams,
        generator: torch.Generator | None,
        eos_after: int | None = None,
    ) -> Pending[int]:
        """Queues the call's steps on the TTS stream; the result (codes appended to `state`) is taken by `wait`.
        On a CPU the steps run at once, with one host check per step."""
        if max_steps > TTS_MAX_STEPS:
            with self._on(self.tts_stream), self._attention():
                args = (state, max_steps, num_text_tokens, sampling, generator, eos_after)
                return Ready(lambda: EagerRunner.tts_generate(self, *args))
        slot = self.tts_pool.slot_of(state.cache)
        buf, num_vq = slot.io["buf"], self.vq_index.shape[0]
        self._tts_temperature(sampling)  # made outside any capture
        first = state.num_codes == 0
        stage = slot.io["stage"]
        stage[POS], stage[STEP], stage[NUM_TEXT] = self.condition_slots + state.num_codes, 0, num_text_tokens
        stage[BAN_UNTIL] = 10 if eos_after is None else max(10, eos_after)
        stage[FORCE_AT] = NO_FORCED_EOS if eos_after is None else eos_after
        stage[N_EXEC], stage[DONE] = 0, 0
        length = bucket(self.condition_slots + state.num_codes + max_steps, TTS_BUCKET, self.tts_capacity)
        with self._on(self.tts_stream), self._attention():
            buf[:LAST].copy_(stage, non_blocking=True)
            if not first:
                buf[LAST : LAST + num_vq].copy_(state.codes[-1])
            if not self.cuda:
                return Ready(lambda: self._tts_cpu(slot, state, length, sampling, first, max_steps, generator))
            return self._tts_queue(slot, state, length, sampling, first, max_steps, generator)

    def _tts_cpu(self, slot: Slot, state: TTSState, length: int, sampling, first: bool, max_steps: int, generator):
        buf = slot.io["buf"]
        for i in range(max_steps):
            self._tts_step_fn(slot, length, sampling, first and i == 0, generator)
            if bool(buf[DONE]):
                break
        return self._tts_result(state, buf.clone(), self._call_codes(slot, max_steps))

    def _call_codes(self, slot: Slot, max_steps: int) -> torch.Tensor:
        """[max_steps, num_vq]: a copy of the codes the call wrote (rows past its first EOS are discarded)."""
        num_vq = self.vq_index.shape[0]
        return slot.io["buf"][LAST + num_vq : LAST + num_vq * (1 + max_steps)].view(max_steps, num_vq).clone()

    @staticmethod
    def _tts_result(state: TTSState, host: torch.Tensor, codes: torch.Tensor) -> int:
        n_exec, done = int(host[N_EXEC]), int(host[DONE])
        kept = n_exec - done
        if kept:
            state.codes.extend(codes[:kept].unbind(0))
        state.finished = bool(done)
        return kept

    def _tts_queue(self, slot: Slot, state: TTSState, length: int, sampling, first: bool, max_steps: int, generator):
        """All `max_steps` steps queued back to back, then one copy to the host; `wait` reads it, keeps the codes
        up to the first EOS and moves the request's generator to where stopping there would have left it."""
        gen = self._default_generator(generator)
        rng = self.tts_rng if self.use_graphs else gen
        if self.use_graphs:
            rng.set_state(gen.get_state())
        start_offset = rng.get_offset()
        began, done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        began.record()
        key = (*self._tts_key(sampling), length)
        for i in range(max_steps):
            if first and i == 0:
                self._tts_step_fn(slot, length, sampling, True, rng)
            elif self.use_graphs:
                graph = slot.graphs.get(key)
                if graph is None:
                    fn = partial(self._tts_step_fn, slot, length, sampling, False, rng)
                    graph = self._capture(slot, key, fn, rng)
                graph.replay()
            else:
                self._mark_step()
                self._tts_step_fn(slot, length, sampling, False, rng)
        codes = self._call_codes(slot, max_steps)
        host = slot.io["host"]
        host.copy_(slot.io["buf"], non_blocking=True)
        done.record()
        per_step = (rng.get_offset() - start_offset) // max_steps
        if self.use_graphs:
            gen.set_state(rng.get_state())

        def finish() -> int:
            executed = int(host[N_EXEC])
            if executed < max_steps and per_step:
                gen.set_offset(start_offset + executed * per_step)
            return self._tts_result(state, host, codes)

        return Queued(began, done, finish)

    # ---- warm-up ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def warm_up(self, llm_positions: int = 1024, tts_positions: int = 1536, sampling: SamplingParams | None = None):
        """Capture (and compile) ahead of time the step graphs the next request will use: every bucket up to
        these positions, for `sampling` (default: the official defaults), on the slot `acquire` hands out next.
        Leaves that slot's cache zeroed. Without it, a bucket's graph is captured the first time a request needs
        it (tens of ms inside that request)."""
        if not self.use_graphs:
            return
        sampling = sampling or SamplingParams()
        llm_slot = self.llm_pool.slots[self.llm_pool._free[-1]] if self.llm_pool.num_free else None
        tts_slot = self.tts_pool.slots[self.tts_pool._free[-1]] if self.tts_pool.num_free else None
        with self._attention():
            for length in range(LLM_BUCKET, min(llm_positions, self.llm_capacity) + 1, LLM_BUCKET):
                key = (*self._llm_key(sampling), length)
                if llm_slot is not None and key not in llm_slot.graphs:
                    llm_slot.io["buf"].zero_()
                    llm_slot.io["buf"][1] = length - 1
                    fn = partial(self._llm_step_fn, llm_slot, length, sampling, self.llm_rng)
                    self._capture(llm_slot, key, fn, self.llm_rng)
            if llm_slot is not None:
                self.prefill.warm_up(llm_slot, max_positions=llm_positions)  # prompt and header buckets
            self._tts_temperature(sampling)
            for length in range(2 * TTS_BUCKET, min(tts_positions, self.tts_capacity) + 1, TTS_BUCKET):
                key = (*self._tts_key(sampling), length)
                if tts_slot is not None and key not in tts_slot.graphs:
                    buf = tts_slot.io["buf"]
                    buf.zero_()
                    buf[POS], buf[NUM_TEXT], buf[BAN_UNTIL], buf[FORCE_AT] = length - 25, 10, 10, NO_FORCED_EOS
                    fn = partial(self._tts_step_fn, tts_slot, length, sampling, False, self.tts_rng)
                    self._capture(tts_slot, key, fn, self.tts_rng)
        for slot in (llm_slot, tts_slot):
            if slot is not None:
                slot.cache.reset()

    # ---- audio --------------------------------------------------------------------------------------------------
    def decode_audio(self, codes: torch.Tensor) -> np.ndarray:
        return self.decode_audio_launch(codes).wait()

    @torch.inference_mode()
    def decode_audio_launch(self, codes: torch.Tensor) -> Pending[np.ndarray]:
        """DVAE + Vocos on the audio stream, after the TTS work that made `codes`; on a GPU one graph per window
        length (25 first, 29 after, fewer at the very end), its PCM copied to pinned memory for `wait`."""
        if not self.audio_graphs_on:
            return Ready(lambda: EagerRunner.decode_audio(self, codes))
        length = codes.shape[0]
        with self._on(self.audio_stream, codes):
            self.audio_stream.wait_stream(self.tts_stream)
            entry = self.audio_graphs.get(length)
            if entry is None:
                static_codes = codes.clone()

                def run() -> torch.Tensor:
                    mel = self.model.dvae.decode(static_codes[None])
                    return self.model.vocos.decode(mel.float())[0]

                graph = StepGraph(run, self.audio_graph_pool, self.audio_stream)
                host = torch.empty(graph.output.shape, dtype=graph.output.dtype, pin_memory=True)
                entry = self.audio_graphs[length] = (static_codes, graph, host)
            static_codes, graph, host = entry
            began, done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            began.record()
            static_codes.copy_(codes)
            host.copy_(graph.replay(), non_blocking=True)
            done.record()
        return Queued(began, done, lambda: host.numpy().copy())

    # ---- TTS inputs from other streams ----------------------------------------------------------------------------
    def project_speaker(self, llm_hidden: torch.Tensor) -> torch.Tensor:
        with self._on(self.tts_stream, llm_hidden):
            return super().project_speaker(llm_hidden)

    def tts_prefill_text(self, state: TTSState, ids: list[int], begin: int, speaker: torch.Tensor | None) -> None:
        with self._on(self.tts_stream, speaker):
            super().tts_prefill_text(state, ids, begin, speaker)

    def tts_prefill_audio(self, state: TTSState, codes: torch.Tensor, num_text_tokens: int) -> None:
        with self._on(self.tts_stream, codes):
            super().tts_prefill_audio(state, codes, num_text_tokens)

    # ---- introspection ------------------------------------------------------------------------------------------
    def stats(self) -> dict:
        return {
            "llm_slots_free": self.llm_pool.num_free,
            "llm_slots": self.llm_pool.size,
            "tts_slots_free": self.tts_pool.num_free,
            "tts_slots": self.tts_pool.size,
            "cache_pool_bytes": self.llm_pool.nbytes + self.tts_pool.nbytes,
            "graphs": sum(len(s.graphs) for s in (*self.llm_pool.slots, *self.tts_pool.slots)),
            "audio_graphs": len(self.audio_graphs),
        }
