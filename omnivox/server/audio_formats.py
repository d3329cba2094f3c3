"""Output audio formats: the engine's 24 kHz float PCM -> the bytes of a wav, pcm, mp3, opus, aac, flac or mu-law
stream, at the sample rate the client asked for, written chunk by chunk so the first bytes leave with the first audio.

Everything is done by libraries: PyAV (FFmpeg's libswresample for the rate and sample format, its encoders and
muxers for the codecs and containers). wav and pcm at 24 kHz keep the project's own PCM16 path (omnivox/audio.py),
so their bytes are what they always were.

- `OutputFormat`: what a format is (media type, container, codec, the rates it can carry), one row per format.
- `Resampler`: a streaming 24 kHz float -> (rate, sample format) converter.
- `PCMWriter`: wav and pcm (headerless s16le), resampled when asked.
- `CodecWriter`: a PyAV encoder + muxer writing into memory that each push drains.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import av
import numpy as np

from omnivox.audio import float_to_pcm16, wav_header
from omnivox.engine.types import SAMPLE_RATE

SAMPLE_RATES = (8000, 16000, 22050, 24000, 44100, 48000)  # the `sample_rate` extension field's choices
OGG_PAGE_DURATION_US = 20_000  # the Ogg muxer holds a page for up to 1 s by default: flush one per 20 ms packet


@dataclass(frozen=True)
class OutputFormat:
    name: str
    media_type: str
    codec: str | None = None  # PyAV encoder; None: the PCM16 path
    container: str | None = None  # PyAV muxer
    rates: tuple[int, ...] = SAMPLE_RATES
    default_rate: int = SAMPLE_RATE
    bit_rate: int | None = None  # lossy codecs: bits per second (mono speech)
    muxer_options: tuple[tuple[str, str], ...] = ()


FORMATS: dict[str, OutputFormat] = {f.name: f for f in (
    OutputFormat("wav", "audio/wav"),
    OutputFormat("pcm", "audio/pcm"),
    OutputFormat("mp3", "audio/mpeg", "libmp3lame", "mp3", bit_rate=64_000),
    # Opus encodes at 8/16/24/48 kHz only; players decode any of them at 48 kHz
    OutputFormat("opus", "audio/ogg", "libopus", "ogg", rates=(8000, 16000, 24000, 48000), bit_rate=48_000,
                 muxer_options=(("page_duration", str(OGG_PAGE_DURATION_US)),)),
    OutputFormat("aac", "audio/aac", "aac", "adts", bit_rate=64_000),
    OutputFormat("flac", "audio/flac", "flac", "flac"),
    # telephony: G.711 mu-law, 8 kHz, headerless (Twilio and SIP media streams)
    OutputFormat("pcm_mulaw", "audio/basic", "pcm_mulaw", "mulaw", rates=(8000,), default_rate=8000),
)}


def output_rate(fmt: OutputFormat, sample_rate: int | None) -> int:
    """The rate a request gets; ValueError (a 400) names the rates the format can carry."""
    if sample_rate is None:
        return fmt.default_rate
    if sample_rate not in fmt.rates:
        raise ValueError(f"{fmt.name} cannot carry sample_rate {sample_rate}; use one of {list(fmt.rates)}")
    return sample_rate


class Resampler:
    """24 kHz mono float32 -> `rate` in the sample format an encoder wants, streaming (libswresample keeps the
    filter state between pushes; `flush` returns what it still holds)."""

    def __init__(self, rate: int, sample_format: str = "s16"):
        self._resampler = av.AudioResampler(format=sample_format, layout="mono", rate=rate)

    def push(self, pcm: np.ndarray) -> list[av.AudioFrame]:
        x = np.clip(np.nan_to_num(np.asarray(pcm, dtype=np.float32).reshape(1, -1), nan=0.0), -1.0, 1.0)
        if x.shape[1] == 0:
            return []
        frame = av.AudioFrame.from_ndarray(x, format="flt", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        return self._resampler.resample(frame)

    def flush(self) -> list[av.AudioFrame]:
        return self._resampler.resample(None)


class AudioWriter(Protocol):
    """`head()` once before any audio, `push(pcm)` per chunk, `finish()` once at the end; each returns the bytes
    that are ready to send."""

    media_type: str
    sample_rate: int

    def head(self) -> bytes: ...
    def push(self, pcm: np.ndarray) -> bytes: ...
    def finish(self) -> bytes: ...


class PCMWriter:
    """wav (a streaming header of unknown length, then PCM16) and pcm (bare s16le). At 24 kHz the bytes come from
    omnivox.audio exactly as before; at other rates the samples go through the Resampler first."""

    def __init__(self, fmt: OutputFormat, sample_rate: int):
        self.media_type = fmt.media_type
        self.sample_rate = sample_rate
        self._wav = fmt.name == "wav"
        self._resampler = Resampler(sample_rate) if sample_rate != SAMPLE_RATE else None

    def head(self) -> bytes:
        return wav_header(self.sample_rate, None) if self._wav else b""

    def push(self, pcm: np.ndarray) -> bytes:
        if self._resampler is None:
            return float_to_pcm16(pcm)
        return _frame_bytes(self._resampler.push(pcm))

    def finish(self) -> bytes:
        return _frame_bytes(self._resampler.flush()) if self._resampler is not None else b""


def _frame_bytes(frames: list[av.AudioFrame]) -> bytes:
    return b"".join(frame.to_ndarray().astype("<i2").tobytes() for frame in frames)


class _Sink:
    """The file PyAV's muxer writes into; each push takes what has been written since the last one. It has no
    `seek`, so muxers write their streaming form (no length fields patched at the end)."""

    def __init__(self):
        self._buffer = bytearray()

    def write(self, data: bytes) -> int:
        self._buffer += data
        return len(data)

    def take(self) -> bytes:
        data = bytes(self._buffer)
        self._buffer.clear()
        return data


class CodecWriter:
    """mp3, opus (Ogg), aac (ADTS), flac, mu-law: PyAV encodes and muxes each pushed chunk at once; the encoder
    re-frames samples into its own frame size, so a push returns the packets completed so far. A push costs up to
    tens of ms (bench/RESULTS.md section 8), so the server runs it off the event loop (`blocking`)."""

    blocking = True

    def __init__(self, fmt: OutputFormat, sample_rate: int):
        self.media_type = fmt.media_type
        self.sample_rate = sample_rate
        self._sink = _Sink()
        self._container = av.open(self._sink, mode="w", format=fmt.container, options=dict(fmt.muxer_options))
        self._stream = self._container.add_stream(fmt.codec, rate=sample_rate, layout="mono")
        if fmt.bit_rate is not None:
            self._stream.codec_context.bit_rate = fmt.bit_rate
        self._resampler = Resampler(sample_rate, self._stream.codec_context.format.name)
        self._closed = False

    def head(self) -> bytes:
        return b""

    def _encode(self, frames: list[av.AudioFrame | None]) -> bytes:
        for frame in frames:
            self._container.mux(self._stream.encode(frame))
        return self._sink.take()

    def push(self, pcm: np.ndarray) -> bytes:
        return self._encode(self._resampler.push(pcm))

    def finish(self) -> bytes:
        if self._closed:
            return b""
        data = self._encode([*self._resampler.flush(), None])  # None drains the encoder
        self.close()
        return data + self._sink.take()

    def close(self) -> None:
        """Frees the codec (also when the stream ended early: idempotent)."""
        if not self._closed:
            self._closed = True
            self._container.close()


def open_writer(format_name: str, sample_rate: int | None = None) -> AudioWriter:
    """The writer for a validated format name and rate (None: the format's default rate)."""
    fmt = FORMATS[format_name]
    rate = output_rate(fmt, sample_rate)
    return PCMWriter(fmt, rate) if fmt.codec is None else CodecWriter(fmt, rate)
