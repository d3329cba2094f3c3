"""`Engine.read_aloud_feed`: read-aloud of text that arrives piece by piece (omnivox/engine/text_feed.py)."""

from __future__ import annotations

import pytest
import torch

from omnivox.config import tiny_config
from omnivox.engine.engine import Engine
from omnivox.engine.text_feed import TextFeed
from omnivox.engine.types import SAMPLES_PER_AUDIO_TOKEN
from omnivox.errors import InvalidRequest
from omnivox.models.loader import build_dummy_model

TEXT = "The quick brown fox jumps over the lazy dog and then runs far away into the green forest."


@pytest.fixture(scope="module")
def engine():
    return Engine(build_dummy_model(tiny_config(), device="cpu", dtype=torch.float32, seed=0))


def waiting(chunk) -> bool:
    return len(chunk.pcm) == 0 and not chunk.text and not chunk.is_last


def test_speaks_before_the_input_is_done_and_waits_without_blocking(engine):
    feed = TextFeed()
    stream = engine.read_aloud_feed(feed, seed=0, forced_words_per_second=2.5)
    assert waiting(next(stream))  # nothing yet: returns at once
    feed.append("The quick")
    assert waiting(next(stream)) and feed.sufficient_at is None  # 2 words: not yet a 10-token text chunk
    words = TEXT.split(" ")[2:]
    audio_before_done = []
    for word in words:
        feed.append(" " + word)
        while True:
            chunk = next(stream)
            if waiting(chunk):
                break
            audio_before_done.append(chunk)
    assert feed.sufficient_at is not None
    assert sum(len(c.pcm) for c in audio_before_done) > 0  # spoke while the text was still coming
    feed.done()
    rest = list(stream)
    assert rest[-1].is_last and not any(waiting(c) for c in rest)
    chunks = audio_before_done + rest
    total = sum(len(c.pcm) for c in chunks)
    assert total == round(len(TEXT.split()) / 2.5 * 46.875) * SAMPLES_PER_AUDIO_TOKEN  # forced end of speech
    assert "".join(c.text for c in chunks) == TEXT == stream.metrics.reply_text
    assert stream.metrics.finish_reason == "eos" and engine.live_requests == 0
    with pytest.raises(InvalidRequest, match="done"):
        feed.append("more")


def test_close_mid_way_frees(engine):
    feed = TextFeed()
    stream = engine.read_aloud_feed(feed, seed=0, forced_words_per_second=2.5)
    feed.append(TEXT)
    next(stream)
    assert engine.stats()["cache_bytes"] > 0
    stream.close()
    assert engine.live_requests == 0 and engine.stats()["cache_bytes"] == 0
    assert stream.metrics.finish_reason == "cancelled"


def test_empty_feed_ends_with_an_empty_last_chunk(engine):
    feed = TextFeed()
    feed.done()
    chunks = list(engine.read_aloud_feed(feed))
    assert len(chunks) == 1 and chunks[0].is_last and len(chunks[0].pcm) == 0
