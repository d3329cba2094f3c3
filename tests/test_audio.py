"""WAV/PCM16 helpers: header fields byte by byte, clipping, streaming headers, round trips, bad rates."""

import struct

import numpy as np
import pytest

from omnivox.audio import float_to_pcm16, read_wav, wav_header, write_wav
from omnivox.errors import InvalidRequest


def test_header_fields():
    h = wav_header(24000, num_samples=1000)
    assert len(h) == 44
    riff, riff_size, wave = struct.unpack_from("<4sI4s", h, 0)
    assert (riff, wave) == (b"RIFF", b"WAVE") and riff_size == 36 + 2000
    fmt, fmt_size, audio_format, channels, rate, byte_rate, align, bits = struct.unpack_from("<4sIHHIIHH", h, 12)
    assert (fmt, fmt_size, audio_format, channels, rate, byte_rate, align, bits) == (
        b"fmt ", 16, 1, 1, 24000, 48000, 2, 16)
    assert struct.unpack_from("<4sI", h, 36) == (b"data", 2000)


def test_streaming_header_has_unknown_sizes():
    h = wav_header(16000)
    assert len(h) == 44
    assert struct.unpack_from("<I", h, 4)[0] == 0xFFFFFFFF
    assert struct.unpack_from("<4sI", h, 36) == (b"data", 0xFFFFFFFF)
    assert struct.unpack_from("<I", h, 24)[0] == 16000


def test_pcm16_clips_and_is_little_endian():
    data = float_to_pcm16(np.array([0.0, 1.0, -1.0, 2.0, -3.0, 0.5, np.nan], dtype=np.float32))
    assert len(data) == 14
    values = np.frombuffer(data, dtype="<i2")
    assert values.tolist() == [0, 32767, -32767, 32767, -32767, 16384, 0]
    assert data[2:4] == b"\xff\x7f"  # 32767, least significant byte first


def test_write_read_round_trip(tmp_path):
    t = np.arange(24000) / 24000
    pcm = (0.8 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    path = tmp_path / "a.wav"
    write_wav(path, pcm)
    assert path.stat().st_size == 44 + 2 * len(pcm)
    back, rate = read_wav(path)
    assert rate == 24000 and back.dtype == np.float32 and len(back) == len(pcm)
    np.testing.assert_allclose(back, pcm, atol=1e-4)


def test_read_streamed_file_with_unknown_size(tmp_path):
    pcm = np.linspace(-0.5, 0.5, 301, dtype=np.float32)
    path = tmp_path / "stream.wav"
    path.write_bytes(wav_header(24000) + float_to_pcm16(pcm))
    back, rate = read_wav(path)
    assert rate == 24000 and len(back) == 301
    np.testing.assert_allclose(back, pcm, atol=1e-4)


@pytest.mark.parametrize("rate", [0, -24000, 24000.0, "24000", None, True])
def test_bad_sample_rate(rate, tmp_path):
    with pytest.raises(InvalidRequest, match="sample_rate must be a positive integer"):
        wav_header(rate)
    with pytest.raises(InvalidRequest, match="sample_rate"):
        write_wav(tmp_path / "x.wav", np.zeros(4, np.float32), sample_rate=rate)


def test_read_rejects_non_wav(tmp_path):
    path = tmp_path / "x.wav"
    path.write_bytes(b"not a wav file at all")
    with pytest.raises(InvalidRequest, match="not a RIFF/WAVE"):
        read_wav(path)
