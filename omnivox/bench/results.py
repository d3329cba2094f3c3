"""The results file every bench and load test writes: schema "omnivox.bench/1".

One JSON file holds the run's configuration, the machine it ran on and one sample per request, so that any two
files can be compared later (`omnivox bench --compare`) without rerunning anything. Non-finite numbers (the
TTFB of a request that produced no audio, the RTF of zero seconds of audio) are written as null: strict JSON.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omnivox import __version__
from omnivox.engine.types import RequestMetrics
from omnivox.errors import InvalidRequest

SCHEMA = "omnivox.bench/1"
KINDS = ("bench", "loadtest", "capacity", "host", "gpu_busy")  # host_bench.py, gpu_busy.py
REQUIRED_SAMPLE_KEYS = ("ttfb_s", "rtf", "total_s", "audio_s")


def _clean(value: Any) -> Any:
    """Replace NaN/inf by None anywhere in a JSON-able structure (json.dump would write invalid `NaN`)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def sample_from_metrics(m: RequestMetrics, **extra: Any) -> dict[str, Any]:
    """One request's sample. `extra` adds or overrides keys: prompt_id and trial always; underruns, error when
    they apply (a load test's playback underruns, a failed request's message)."""
    sample: dict[str, Any] = {
        "request_id": m.request_id,
        "prompt_id": None,
        "trial": None,
        "ttfb_s": m.ttfb_s,
        "ttfb_official_s": m.ttfb_official_s,
        "rtf": m.rtf,
        "total_s": m.total_s,
        "audio_s": m.audio_s,
        "generation_s": m.generation_s,
        "stages": dict(m.stages),
        "llm_tokens": m.llm_tokens,
        "tts_steps": m.tts_steps,
        "tts_calls": m.tts_calls,
        "finish_reason": m.finish_reason,
    }
    sample.update(extra)
    return _clean(sample)


def _git_commit() -> str | None:
    """$OMNIVOX_COMMIT if set (a tree unpacked from `git archive` has no history of its own), else HEAD of the
    checkout omnivox is imported from, or None (installed wheel, no git, not a repository)."""
    if os.environ.get("OMNIVOX_COMMIT"):
        return os.environ["OMNIVOX_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else None


def environment() -> dict[str, Any]:
    """Where the numbers were measured: timings only compare on the same device and software."""
    import torch  # imported here so reading and comparing results does not pay for torch

    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = platform.processor() or "cpu"
    return {
        "device": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "omnivox": __version__,
        "git_commit": _git_commit(),
    }


def build_results(samples: list[dict[str, Any]], config: dict[str, Any], kind: str = "bench",
                  dummy_weights: bool = False, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Assemble a results document (validated the same way `read_results` validates a file)."""
    results = {
        "schema": SCHEMA,
        "kind": kind,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": dict(config),
        "environment": environment(),
        "dummy_weights": bool(dummy_weights),
        "samples": list(samples),
        "extra": dict(extra or {}),
    }
    results = _clean(results)
    validate_results(results, "results")
    return results


def write_results(path: str | Path, results: dict[str, Any]) -> None:
    """Write results as indented strict JSON (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(results), indent=2, allow_nan=False) + "\n", encoding="utf-8")


def _is_number_or_null(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def validate_results(results: Any, where: str) -> None:
    """Raise InvalidRequest naming the first thing that is not schema omnivox.bench/1."""
    if not isinstance(results, dict):
        raise InvalidRequest(f"{where}: expected a JSON object, got {type(results).__name__}")
    if results.get("schema") != SCHEMA:
        raise InvalidRequest(
            f"{where}: schema is {results.get('schema')!r}, expected {SCHEMA!r}; "
            "only files written by `omnivox bench` / `omnivox loadtest` can be read"
        )
    if results.get("kind") not in KINDS:
        raise InvalidRequest(f"{where}: kind is {results.get('kind')!r}, expected one of {KINDS}")
    for key, kind in (("config", dict), ("environment", dict), ("samples", list)):
        if not isinstance(results.get(key), kind):
            raise InvalidRequest(f"{where}: field '{key}' must be a JSON {'object' if kind is dict else 'array'}")
    for index, sample in enumerate(results["samples"]):
        if not isinstance(sample, dict):
            raise InvalidRequest(f"{where}: samples[{index}] must be an object, got {type(sample).__name__}")
        for key in REQUIRED_SAMPLE_KEYS:
            if key not in sample:
                raise InvalidRequest(f"{where}: samples[{index}] lacks '{key}'; every sample needs "
                                     f"{', '.join(REQUIRED_SAMPLE_KEYS)}")
            if not _is_number_or_null(sample[key]):
                raise InvalidRequest(f"{where}: samples[{index}].{key} must be a number or null, "
                                     f"got {sample[key]!r}")


def read_results(path: str | Path) -> dict[str, Any]:
    """Load and validate a results file; every problem is an InvalidRequest that names the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise InvalidRequest(
            f"cannot read results {path}: {e.strerror}; pass a results.json from `omnivox bench`"
        ) from e
    try:
        results = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidRequest(f"{path} is not valid JSON ({e.msg}, line {e.lineno}); "
                             "was it truncated by an interrupted run?") from None
    validate_results(results, str(path))
    return results
