"""The benchmark loop: warm up, then `trials` passes over the workload, one new session per request.

The warm-up request pays for lazy initialisation (allocator growth, kernel selection, graph capture), so it is
run first and never counted. Seeds are derived from (seed, trial, index), so a rerun samples the same way.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from omnivox.audio import write_wav
from omnivox.bench.results import build_results, sample_from_metrics, write_results
from omnivox.bench.workloads import WorkloadItem, split_warmup
from omnivox.engine.engine import settle_heap
from omnivox.engine.types import SAMPLE_RATE, RequestMetrics
from omnivox.errors import OmnivoxError


def _run_one(engine: Any, item: WorkloadItem, seed: int, request_id: str, dummy_weights: bool,
             catch_errors: bool = True) -> tuple[np.ndarray, int, RequestMetrics, str | None]:
    """Stream one reply to the end -> (pcm, sample rate, metrics, error message or None).

    With `catch_errors`, an OmnivoxError (bad input, busy, failed generation) becomes an error sample so one bad
    request does not discard a long run; any other exception is a bug and propagates. A stream left early is
    closed, which frees its caches.
    """
    parts: list[np.ndarray] = []
    rate = SAMPLE_RATE
    stream = None
    try:
        stream = engine.stream(
            item.prompt,
            seed=seed,
            forced_reply=item.reply if dummy_weights else None,
            forced_audio_seconds=item.audio_seconds if dummy_weights else None,
            request_id=request_id,
        )
        for chunk in stream:
            parts.append(np.asarray(chunk.pcm, dtype=np.float32))
            rate = chunk.sample_rate
    except OmnivoxError as e:
        if stream is not None:
            stream.close()
        if not catch_errors:
            raise
        metrics = stream.metrics if stream is not None else RequestMetrics(request_id=request_id)
        metrics.finish_reason = "error"
        return _concat(parts), rate, metrics, f"{type(e).__name__}: {e}"
    except BaseException:
        if stream is not None:
            stream.close()
        raise
    return _concat(parts), rate, stream.metrics, None


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


def run_bench(engine: Any, items: list[WorkloadItem], trials: int, out_dir: Path | None = None, *, seed: int = 0,
              dummy_weights: bool = False, progress: bool = True, config: dict[str, Any] | None = None) -> dict:
    """Run the benchmark and return the results document (also written to out_dir/results.json).

    The "warmup" item runs first and is excluded; without one, the first item is run once as the warm-up.
    Request `index` of trial `trial` uses seed `seed + trial * 1000 + index` and id `t{trial}-{item.id}`.
    `forced_reply` / `forced_audio_seconds` are passed only with dummy weights: real weights speak for themselves.
    Each reply is saved as out_dir/wav/{item.id}-t{trial}.wav.
    """
    if trials < 1:
        raise ValueError(f"trials must be at least 1, got {trials}")
    warmup, measured = split_warmup(items)
    if not measured:
        raise ValueError("the workload has no items besides the warm-up; add at least one request")
    warmup = warmup or measured[0]
    wav_dir = Path(out_dir) / "wav" if out_dir is not None else None
    if wav_dir is not None:
        wav_dir.mkdir(parents=True, exist_ok=True)

    if hasattr(engine, "warm_up"):
        engine.warm_up()  # the fast path's graphs for every bucket, before the clock starts
    settle_heap()  # as the server does before it is ready: no full garbage collection walks the start-up heap
    started = time.perf_counter()
    # a failing warm-up means every measured request would fail too: let its error stop the run
    _, _, warm_metrics, _ = _run_one(engine, warmup, seed, "warmup", dummy_weights, catch_errors=False)
    samples = []
    with tqdm(total=trials * len(measured), desc="bench", unit="req", disable=not progress) as bar:
        for trial in range(trials):
            for index, item in enumerate(measured):
                pcm, rate, metrics, error = _run_one(
                    engine, item, seed + trial * 1000 + index, f"t{trial}-{item.id}", dummy_weights
                )
                if wav_dir is not None and error is None:
                    write_wav(wav_dir / f"{item.id}-t{trial}.wav", pcm, rate)
                extra = {"error": error} if error else {}
                samples.append(sample_from_metrics(metrics, prompt_id=item.id, trial=trial, **extra))
                bar.update(1)
    run_config = dict(config or {})
    run_config.update(trials=trials, seed=seed, prompt_ids=[item.id for item in measured], warmup_id=warmup.id)
    extra = {
        "warmup": sample_from_metrics(warm_metrics, prompt_id=warmup.id, trial=None),
        "wall_s": time.perf_counter() - started,
    }
    results = build_results(samples, run_config, kind="bench", dummy_weights=dummy_weights, extra=extra)
    if out_dir is not None:
        write_results(Path(out_dir) / "results.json", results)
    return results
