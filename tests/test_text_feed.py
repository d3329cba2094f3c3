"""`Engine.read_aloud_feed`: read-aloud of text that arrives piece by piece (omnivox/engine/text_feed.py)."""

from __future__ import annotations

import threading
import time

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


def test_speaks_before_the_input_is_done(engine):
    feed = TextFeed()
    stream = engine.read_aloud_feed(feed, seed=0, forced_words_per_second=2.5)
    feed.append("The quick")
    for word in TEXT.split(" ")[2:]:
        feed.append(" " + word)
    first = next(stream)  # arrives although the input is still open
    assert len(first.pcm) > 0 and not feed.is_done and feed.sufficient_at is not None
    threading.Timer(0.2, feed.done).start()
    chunks = [first, *stream]
    assert chunks[-1].is_last
    total = sum(len(c.pcm) for c in chunks)
    assert total == round(len(TEXT.split()) / 2.5 * 46.875) * SAMPLES_PER_AUDIO_TOKEN  # forced end of speech
    assert "".join(c.text for c in chunks) == TEXT == stream.metrics.reply_text
    assert stream.metrics.finish_reason == "eos" and engine.wait_idle() and engine.live_requests == 0
    with pytest.raises(InvalidRequest, match="done"):
        feed.append("more")


def test_waits_for_text_then_cancels(engine):
    feed = TextFeed()
    stream = engine.read_aloud_feed(feed, seed=0, forced_words_per_second=2.5)
    feed.append("Two words")  # not a 10-token text chunk: nothing to say yet
    time.sleep(0.3)
    assert not stream._queue and feed.sufficient_at is None  # no audio, no end: the request waits
    feed.append(" " + TEXT)
    assert len(next(stream).pcm) > 0
    stream.close()
    assert engine.wait_idle() and engine.live_requests == 0 and engine.stats()["cache_bytes"] == 0
    assert stream.metrics.finish_reason == "cancelled"


def test_empty_feed_ends_with_an_empty_last_chunk(engine):
    feed = TextFeed()
    feed.done()
    chunks = list(engine.read_aloud_feed(feed))
    assert len(chunks) == 1 and chunks[0].is_last and len(chunks[0].pcm) == 0
