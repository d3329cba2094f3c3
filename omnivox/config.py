"""Typed configuration for the MiniCPM-o 2.6 speech path.

Field names follow the official `config.json` (top level = the Qwen2 LLM, `tts_config` = ConditionalChatTTS), so
`ModelConfig.from_json` is a straight read. DVAE and Vocos sizes are hard-coded in the official code (not in the
config); they live here as frozen defaults. Runtime knobs (dtype, cache sizes, graphs) belong to `EngineConfig`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omnivox.errors import CheckpointError


@dataclass(frozen=True)
class LLMConfig:
    """Qwen2.5-7B-style decoder (`llm.*`)."""

    hidden_size: int = 3584
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    intermediate_size: int = 18944
    vocab_size: int = 151700
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class TTSConfig:
    """ConditionalChatTTS (`tts.*`). Class defaults of the official config; the release overrides only llm_dim."""

    llm_dim: int = 3584
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_attention_heads: int = 12
    num_hidden_layers: int = 20
    max_position_embeddings: int = 4096
    num_audio_tokens: int = 626
    num_text_tokens: int = 21178
    num_mel_bins: int = 100
    num_vq: int = 4
    use_speaker_embedding: bool = True
    use_llm_hidden_state: bool = False
    spk_emb_token_id: int = 21143
    num_spk_embs: int = 1
    audio_bos_token_id: int = 21132
    text_eos_token_id: int = 21133
    use_text: bool = True
    streaming: bool = True
    streaming_text_chunk_size: int = 10
    streaming_text_reserved_len: int = 300
    streaming_audio_chunk_size: int = 50
    attn_implementation: str = "sdpa"
    use_mlp: bool = True
    aug_loss_weight: bool = True
    do_sample: bool = True
    top_p: float = 0.7
    top_k: int = 20
    repetition_penalty: float = 1.0
    # Not in the official config: transformers' LlamaConfig defaults that the inner Llama inherits.
    rope_theta: float = 10_000.0
    rms_norm_eps: float = 1e-6
    llama_vocab_size: int = 32000  # size of the unused `tts.model.embed_tokens`

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def eos_code(self) -> int:
        """Audio EOS id in every codebook (625): the FSQ codes are 0..624."""
        return self.num_audio_tokens - 1

    @property
    def condition_len(self) -> int:
        """Slots before the first audio frame: [Stts] [spk_emb] 300 text slots [Ptts] = 303."""
        return self.streaming_text_reserved_len + 3


@dataclass(frozen=True)
class DVAEConfig:
    """ChatTTS DVAE decode path (hard-coded in the official code)."""

    num_mel_bins: int = 100
    idim: int = 512
    odim: int = 512
    hidden: int = 256
    num_layers: int = 12
    bn_dim: int = 128
    kernel_size: int = 7
    dilation: int = 2
    gfsq_dim: int = 1024
    levels: tuple[int, ...] = (5, 5, 5, 5)
    num_groups: int = 2
    num_residual: int = 2
    encoder_odim: int = 1024  # encoder side exists in the checkpoint but is never loaded


@dataclass(frozen=True)
class VocosConfig:
    """Vocos mel vocoder (`assets/Vocos.pt`), always run in float32."""

    sample_rate: int = 24000
    n_fft: int = 1024
    hop_length: int = 256
    n_mels: int = 100
    dim: int = 512
    intermediate_dim: int = 1536
    num_layers: int = 8

    @property
    def layer_scale_init(self) -> float:
        return 1.0 / self.num_layers


@dataclass(frozen=True)
class ModelConfig:
    """Everything the speech path needs to build its modules."""

    llm: LLMConfig = field(default_factory=LLMConfig)
    tts: TTSConfig = field(default_factory=TTSConfig)
    dvae: DVAEConfig = field(default_factory=DVAEConfig)
    vocos: VocosConfig = field(default_factory=VocosConfig)
    version: str = "2.6"

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Read the official config layout: LLM fields at the top level, TTS fields under `tts_config`."""
        llm_fields = {f.name for f in dataclasses.fields(LLMConfig)}
        tts_fields = {f.name for f in dataclasses.fields(TTSConfig)}
        missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size") if k not in raw]
        if missing:
            raise CheckpointError(f"{source}: missing field(s) {missing}; is this a MiniCPM-o 2.6 config.json?")
        llm = LLMConfig(**{k: v for k, v in raw.items() if k in llm_fields})
        tts_raw = raw.get("tts_config") or {}
        tts = TTSConfig(**{k: v for k, v in tts_raw.items() if k in tts_fields})
        version = str(raw.get("version", "2.6"))
        if version != "2.6":
            raise CheckpointError(f"{source}: version {version!r}; omnivox supports MiniCPM-o 2.6 only")
        return cls(llm=llm, tts=tts, version=version)

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"missing file {path}: a MiniCPM-o 2.6 snapshot has config.json at its root")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from e
        return cls.from_dict(raw, source=str(path))


def full_config() -> ModelConfig:
    """The released MiniCPM-o 2.6 sizes (used by --dummy-weights and `make-checkpoint --size full`)."""
    return ModelConfig()


def tiny_config() -> ModelConfig:
    """Small LLM and TTS for CPU tests and the embedded demo model.

    Vocabularies, special-token ids, DVAE and Vocos keep their released sizes: the tokenizers are real, and the
    official code hard-codes the DVAE and Vocos shapes, so a tiny snapshot stays loadable by it.
    """
    llm = LLMConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128
    )
    tts = TTSConfig(llm_dim=64, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2)
    return ModelConfig(llm=llm, tts=tts)


CONFIGS = {"full": full_config, "tiny": tiny_config}
