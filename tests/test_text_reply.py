"""`Engine.chat_text`: text-only replies from the LLM alone (omnivox/engine/text_reply.py), on the tiny model."""

from __future__ import annotations

import pytest

from omnivox.engine.engine import Engine, EngineConfig
from omnivox.engine.text_reply import TEXT_ASSISTANT_HEADER
from omnivox.engine.types import SamplingParams
from omnivox.engine.work import LLMDecode
from omnivox.errors import ContextTooLong, EngineBusy, InvalidRequest

REPLY = "Glad to hear that! Is there anything on your mind?"


def reply_text(stream) -> tuple[str, list]:
    chunks = list(stream)
    assert all(len(c.pcm) == 0 for c in chunks) and chunks[-1].is_last  # text only: no audio at all
    return "".join(c.text for c in chunks), [c.text for c in chunks if c.text]


def test_forced_reply_comes_back_as_text_deltas(engine, monkeypatch):
    from omnivox.engine import text_reply

    asked: list[LLMDecode] = []
    original = text_reply.LLMDecode

    def spy(ids, window, hidden_at=None):
        asked.append(original(ids, window, hidden_at))
        return asked[-1]

    monkeypatch.setattr(text_reply, "LLMDecode", spy)
    stream = engine.chat_text("Hi, how are you?", seed=0, forced_reply=REPLY)
    text, deltas = reply_text(stream)
    tok = engine.model.tokenizer
    m = stream.metrics
    assert text == REPLY == m.reply_text and len(deltas) > 1  # "!" (id 0) is kept
    assert m.finish_reason == "eos" and m.llm_tokens == len(tok.encode(REPLY)) + 1  # + <|im_end|>
    assert asked[0].ids == tok.encode(TEXT_ASSISTANT_HEADER)  # one token per step after the header
    assert all(len(w.ids) == 1 for w in asked[1:]) and len(asked) == m.llm_tokens and m.audio_s == 0
    assert engine.wait_idle() and engine.live_requests == 0 and engine.stats()["cache_bytes"] == 0


def test_max_new_tokens_cuts_the_reply(engine):
    stream = engine.chat_text("Hi", forced_reply=REPLY, sampling=SamplingParams(max_new_tokens=3))
    text, _ = reply_text(stream)
    tok = engine.model.tokenizer
    assert stream.metrics.finish_reason == "length" and stream.metrics.llm_tokens == 3
    assert text == tok.decode(tok.encode(REPLY)[:3])


def test_greedy_free_reply_is_reproducible_and_bounded(engine):
    greedy = SamplingParams(greedy=True, max_new_tokens=12)
    first = engine.chat_text("Hello", sampling=greedy)
    a = reply_text(first)
    assert a == reply_text(engine.chat_text("Hello", sampling=greedy))
    assert first.metrics.llm_tokens <= 12 and first.metrics.finish_reason in ("eos", "length")


def test_session_turns_follow_the_multi_turn_rules(engine):
    tok = engine.model.tokenizer
    session = engine.new_session()
    first = engine.chat_text("Hi!", session=session, forced_reply="Hello.")
    reply_text(first)
    assert engine.wait_idle()
    header = len(tok.encode(TEXT_ASSISTANT_HEADER))
    # everything but the terminator is in the cache; the next turn closes the reply with <|im_end|>
    assert session.length == first.metrics.prompt_tokens + header + first.metrics.llm_tokens - 1
    second = engine.chat_text("And now?", session=session, forced_reply="Sure.")
    assert reply_text(second)[0] == "Sure."
    assert second.metrics.prompt_tokens == len(tok.encode("<|im_end|>\n<|im_start|>user\nAnd now?"))
    assert engine.wait_idle() and session.turns == 2
    with pytest.raises(InvalidRequest, match="history"):
        engine.chat_text("x", session=session, history=[("user", "a")])
    engine.close_session(session)
    with pytest.raises(InvalidRequest, match="closed"):
        engine.chat_text("again", session=session)


def test_close_cancels_and_frees(engine):
    stream = engine.chat_text("Hello", forced_reply=REPLY * 4)
    next(stream)
    stream.close()
    assert engine.wait_idle() and engine.live_requests == 0 and engine.stats()["cache_bytes"] == 0
    assert stream.metrics.finish_reason == "cancelled" and list(stream) == []


def test_validation_and_admission(model):
    engine = Engine(model, EngineConfig(max_concurrent_requests=1, max_session_tokens=600))
    with pytest.raises(InvalidRequest, match="empty"):
        engine.chat_text("  ")
    with pytest.raises(ContextTooLong, match="LLM positions"):
        engine.chat_text("word " * 300)
    first = engine.chat_text("one", forced_reply="a")
    with pytest.raises(EngineBusy):
        engine.chat_text("two", forced_reply="b")
    with pytest.raises(EngineBusy):  # a text reply and a spoken one share the admission limit
        engine.stream("two", forced_reply="b", forced_audio_seconds=1.0)
    first.close()
    assert engine.wait_idle()
    assert reply_text(engine.chat_text("three", forced_reply="c"))[0] == "c"
    assert engine.wait_idle() and engine.live_requests == 0
