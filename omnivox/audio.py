"""PCM16 and WAV helpers: the one place that turns float audio into bytes a player or a browser understands.

omnivox produces float32 mono PCM at 24 kHz. Files and the wire use 16-bit little-endian PCM in a RIFF/WAVE
container; a streamed reply has no known length when its header goes out, so `wav_header(num_samples=None)`
writes 0xFFFFFFFF sizes, which players read as "until the connection closes".
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from omnivox.errors import InvalidRequest

HEADER_BYTES = 44
STREAMING_SIZE = 0xFFFFFFFF  # RIFF and data sizes of a header written before the length is known
_PCM16_MAX = 32767


def _check_sample_rate(sample_rate: object) -> int:
    """WAV stores the rate as an unsigned 32-bit int; a float or zero would write a file no player opens."""
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or not 0 < sample_rate < 2**32:
        raise InvalidRequest(
            f"sample_rate must be a positive integer number of samples per second (omnivox produces 24000); "
            f"got {sample_rate!r}"
        )
    return int(sample_rate)


def float_to_pcm16(pcm: np.ndarray) -> bytes:
    """Float PCM in [-1, 1] -> little-endian int16 bytes. Values outside are clipped (not wrapped); NaN -> 0."""
    x = np.nan_to_num(np.asarray(pcm, dtype=np.float32).reshape(-1), nan=0.0)
    x = np.clip(x, -1.0, 1.0)
    return np.round(x * _PCM16_MAX).astype("<i2").tobytes()


def wav_header(sample_rate: int = 24000, num_samples: int | None = None) -> bytes:
    """44-byte RIFF/WAVE header for mono PCM16; `num_samples=None` writes the streaming form (0xFFFFFFFF sizes)."""
    rate = _check_sample_rate(sample_rate)
    if num_samples is None:
        riff_size = data_size = STREAMING_SIZE
    else:
        if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 0:
            raise InvalidRequest(f"num_samples must be a non-negative integer or None (streaming); got {num_samples!r}")
        data_size = 2 * int(num_samples)
        if HEADER_BYTES - 8 + data_size > 0xFFFFFFFE:
            raise InvalidRequest(f"{num_samples} samples do not fit a WAV file (4 GiB limit); write shorter audio")
        riff_size = HEADER_BYTES - 8 + data_size
    channels, bits = 1, 16
    block_align = channels * bits // 8
    return (
        struct.pack("<4sI4s", b"RIFF", riff_size, b"WAVE")
        + struct.pack("<4sIHHIIHH", b"fmt ", 16, 1, channels, rate, rate * block_align, block_align, bits)
        + struct.pack("<4sI", b"data", data_size)
    )


def write_wav(path: str | Path, pcm: np.ndarray, sample_rate: int = 24000) -> None:
    """Write float PCM as a complete (non-streaming) mono PCM16 WAV file."""
    data = float_to_pcm16(pcm)
    Path(path).write_bytes(wav_header(sample_rate, len(data) // 2) + data)


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Read a mono PCM16 WAV (complete or streaming header) -> (float32 samples in [-1, 1), sample rate).

    Chunks other than `fmt ` and `data` (LIST, fact...) are skipped. A streaming data size (0xFFFFFFFF) or one
    past the end of the file means "the rest of the file", which is what a saved stream contains.
    """
    path = Path(path)
    raw = path.read_bytes()
    if len(raw) < 12 or raw[:4] != b"RIFF" or raw[8:12] != b"WAVE":
        raise InvalidRequest(f"{path} is not a RIFF/WAVE file; omnivox reads PCM16 mono .wav files")
    pos, fmt = 12, None
    while pos + 8 <= len(raw):
        chunk_id, size = struct.unpack_from("<4sI", raw, pos)
        body = pos + 8
        if chunk_id == b"fmt ":
            fmt = struct.unpack_from("<HHIIHH", raw, body)
        elif chunk_id == b"data":
            if fmt is None:
                raise InvalidRequest(f"{path}: the data chunk comes before the fmt chunk; rewrite the file")
            audio_format, channels, rate, _, _, bits = fmt
            if audio_format != 1 or bits != 16 or channels != 1:
                raise InvalidRequest(
                    f"{path}: format {audio_format}, {channels} channel(s), {bits} bits; "
                    "omnivox reads PCM (format 1), 1 channel, 16 bits"
                )
            end = len(raw) if size == STREAMING_SIZE else min(len(raw), body + size)
            end -= (end - body) % 2  # a truncated stream may end mid-sample
            samples = np.frombuffer(raw[body:end], dtype="<i2").astype(np.float32) / 32768.0
            return samples, rate
        pos = body + size + (size & 1)  # RIFF chunks are padded to even sizes
    raise InvalidRequest(f"{path} has no {'data' if fmt else 'fmt'} chunk; it is not a complete WAV file")
