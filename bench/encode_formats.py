"""CPU micro-benchmark of the server's output encoders (omnivox/server/audio_formats.py): milliseconds of encode
time per second of audio, for each response_format and a few output rates, fed the way the server feeds them
(25-token chunks of 24 kHz float PCM, 12,800 samples each), so the numbers include resampling and muxing.

    python bench/encode_formats.py [--seconds 20] [--trials 5] [--out out/bench/encode_formats.json]

Prints a Markdown table (median over trials) and writes the raw timings as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from omnivox.server.audio_formats import open_writer

CHUNK_SAMPLES = 25 * 512  # one TTS call's audio
CASES = [  # (response_format, sample_rate)
    ("pcm", None), ("wav", None), ("wav", 16000), ("pcm", 48000), ("pcm_mulaw", None), ("flac", None),
    ("mp3", None), ("mp3", 44100), ("opus", None), ("opus", 48000), ("aac", None), ("aac", 44100),
]


def speech_like(seconds: float, seed: int = 0) -> np.ndarray:
    """Seeded test signal with speech-like spectrum and dynamics: harmonics of a gliding pitch plus noise,
    amplitude-modulated at syllable rate (encoders work harder on this than on silence or one tone)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 24000)) / 24000
    pitch = 140 + 40 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / 24000
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2
    return (0.2 * envelope * voiced + 0.02 * rng.standard_normal(len(t))).astype(np.float32)


def encode_once(pcm: np.ndarray, fmt: str, rate: int | None) -> tuple[float, float, int]:
    """(CPU seconds of this thread, wall seconds, bytes): CPU time is what the encoders cost on a shared machine."""
    cpu0, wall0 = time.thread_time(), time.perf_counter()
    writer = open_writer(fmt, rate)
    size = len(writer.head())
    for start in range(0, len(pcm), CHUNK_SAMPLES):
        size += len(writer.push(pcm[start:start + CHUNK_SAMPLES]))
    size += len(writer.finish())
    return time.thread_time() - cpu0, time.perf_counter() - wall0, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--out", default="out/bench/encode_formats.json")
    args = parser.parse_args()
    pcm = speech_like(args.seconds)
    rows = []
    for fmt, rate in CASES:
        encode_once(pcm[:CHUNK_SAMPLES], fmt, rate)  # warm-up: codec libraries loaded, tables built
        runs = [encode_once(pcm, fmt, rate) for _ in range(args.trials)]
        cpu, wall = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
        rows.append({"format": fmt, "sample_rate": rate or (8000 if fmt == "pcm_mulaw" else 24000),
                     "cpu_ms_per_audio_s": 1000 * cpu / args.seconds, "wall_ms_per_audio_s": 1000 * wall / args.seconds,
                     "kbit_per_s": 8 * runs[0][2] / args.seconds / 1000, "trials": runs})
    print(f"{args.seconds:g} s of audio, {CHUNK_SAMPLES}-sample chunks, median of {args.trials}; "
          f"{platform.processor() or platform.machine()}")
    print("| format | rate Hz | CPU ms per audio s | wall ms per audio s | one core's share of real time | kbit/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        cpu = r["cpu_ms_per_audio_s"]
        print(f"| {r['format']} | {r['sample_rate']} | {cpu:.2f} | {r['wall_ms_per_audio_s']:.2f} | {cpu / 10:.2f}% "
              f"| {r['kbit_per_s']:.0f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"seconds": args.seconds, "trials": args.trials, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
