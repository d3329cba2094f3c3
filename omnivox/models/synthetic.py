"""Write seeded random weights in the official MiniCPM-o 2.6 snapshot layout (no download needed).

The layout is the one `load_speech_model` reads from a real snapshot: `config.json` with the official field names,
sharded `model-0000N-of-0000M.safetensors` plus `model.safetensors.index.json`, the Qwen tokenizer files at the
root, `assets/chattts_tokenizer/` and `assets/Vocos.pt`. It also holds what the loader must skip: the vision
(`vpm.`), resampler, Whisper (`apm.`) and audio-projection tensors, the TTS Llama's unused `embed_tokens`, the DVAE
encoder side, and the heads as weight-norm `original0`/`original1` (g, v). For `full` the skipped part is sized
like the release (about 0.79 B parameters, from a few plausible tensors per layer), so load timings are realistic.

Values come from `init_tensor_` keyed by checkpoint name, exactly as `build_dummy_model` makes them; heads store
v = the dummy head weight and g = its row norms, so a loaded synthetic checkpoint equals the dummy model on the same
device and dtype (heads up to the fold's rounding). Guessed config fields are listed in docs/checkpoints.md.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

import omnivox
from omnivox.config import CONFIGS, ModelConfig, TTSConfig
from omnivox.models.chattts import ConditionalChatTTS
from omnivox.models.dvae import DVAE, encoder_key_shapes
from omnivox.models.loader import INDEX_FILE, VOCOS_FILE, init_tensor_
from omnivox.models.qwen2 import Qwen2LM
from omnivox.models.vocos import Vocos, unused_checkpoint_tensors
from omnivox.tokenizer import (
    build_chattts_standin_tokenizer,
    build_qwen_tokenizer,
    save_llm_tokenizer_files,
    save_tts_tokenizer_files,
)

SYNTHETIC_FORMAT = 1  # bump when the written values or layout change, so cached tiny checkpoints are rebuilt
NUM_SHARDS = {"tiny": 2, "full": 4}
Shape = tuple[int, ...]


@dataclass(frozen=True)
class SkippedDims:
    """Sizes of the parts the speech path skips (SigLIP vision, resampler, Whisper encoder)."""

    vision_hidden: int
    vision_mlp: int
    vision_layers: int
    vision_positions: int
    audio_hidden: int
    audio_ffn: int
    audio_layers: int
    audio_positions: int
    query_num: int = 64


SKIPPED_DIMS = {
    "full": SkippedDims(1152, 4304, 27, 4900, 1024, 4096, 24, 1500),
    "tiny": SkippedDims(16, 32, 1, 16, 16, 32, 1, 8, query_num=4),
}


def _skipped_shapes(d: SkippedDims, llm_hidden: int) -> dict[str, Shape]:
    """Representative vision / resampler / Whisper / projection tensors with their release-like names."""
    shapes: dict[str, Shape] = {
        "vpm.embeddings.patch_embedding.weight": (d.vision_hidden, 3, 14, 14),
        "vpm.embeddings.position_embedding.weight": (d.vision_positions, d.vision_hidden),
    }
    for i in range(d.vision_layers):
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"vpm.encoder.layers.{i}.self_attn.{proj}.weight"] = (d.vision_hidden, d.vision_hidden)
        shapes[f"vpm.encoder.layers.{i}.layer_norm1.weight"] = (d.vision_hidden,)
        shapes[f"vpm.encoder.layers.{i}.mlp.fc1.weight"] = (d.vision_mlp, d.vision_hidden)
        shapes[f"vpm.encoder.layers.{i}.mlp.fc2.weight"] = (d.vision_hidden, d.vision_mlp)
    shapes["vpm.post_layernorm.weight"] = (d.vision_hidden,)
    shapes["resampler.query"] = (d.query_num, llm_hidden)
    shapes["resampler.kv_proj.weight"] = (llm_hidden, d.vision_hidden)
    shapes["resampler.attn.in_proj_weight"] = (3 * llm_hidden, llm_hidden)
    shapes["resampler.attn.out_proj.weight"] = (llm_hidden, llm_hidden)
    shapes["resampler.proj"] = (llm_hidden, llm_hidden)
    shapes["apm.conv1.weight"] = (d.audio_hidden, 80, 3)
    shapes["apm.conv2.weight"] = (d.audio_hidden, d.audio_hidden, 3)
    shapes["apm.embed_positions.weight"] = (d.audio_positions, d.audio_hidden)
    for i in range(d.audio_layers):
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"apm.layers.{i}.self_attn.{proj}.weight"] = (d.audio_hidden, d.audio_hidden)
        shapes[f"apm.layers.{i}.fc1.weight"] = (d.audio_ffn, d.audio_hidden)
        shapes[f"apm.layers.{i}.fc2.weight"] = (d.audio_hidden, d.audio_ffn)
    shapes["apm.layer_norm.weight"] = (d.audio_hidden,)
    shapes["audio_projection_layer.linear1.weight"] = (llm_hidden, d.audio_hidden)
    shapes["audio_projection_layer.linear1.bias"] = (llm_hidden,)
    shapes["audio_projection_layer.linear2.weight"] = (llm_hidden, llm_hidden)
    shapes["audio_projection_layer.linear2.bias"] = (llm_hidden,)
    return shapes


def checkpoint_shapes(config: ModelConfig, size: str) -> dict[str, Shape]:
    """Every safetensors key of the snapshot in save order (llm, vision, resampler, audio, tts), with its shape."""
    with torch.device("meta"):
        llm, tts, dvae = Qwen2LM(config.llm), ConditionalChatTTS(config.tts), DVAE(config.dvae)
    shapes = {f"llm.{k}": tuple(t.shape) for k, t in llm.state_dict().items()}
    shapes |= _skipped_shapes(SKIPPED_DIMS[size], config.llm.hidden_size)
    for key, t in tts.state_dict().items():
        if key.startswith("head_code."):  # weight-norm parametrisation: g [out, 1] and v [out, in]
            stem = key.removesuffix(".weight")
            shapes[f"tts.{stem}.parametrizations.weight.original0"] = (t.shape[0], 1)
            shapes[f"tts.{stem}.parametrizations.weight.original1"] = tuple(t.shape)
        else:
            shapes[f"tts.{key}"] = tuple(t.shape)
    shapes["tts.model.embed_tokens.weight"] = (config.tts.llama_vocab_size, config.tts.hidden_size)
    shapes |= {f"tts.dvae.{k}": tuple(t.shape) for k, t in dvae.state_dict().items()}
    shapes |= {f"tts.dvae.{k}": tuple(s) for k, s in encoder_key_shapes(config.dvae).items()}
    return shapes


def make_tensor(key: str, shapes: dict[str, Shape], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """The value stored under `key`: `init_tensor_`, except the heads' (g, v) pair, which folds back to the dummy
    head weight (v = that weight, g = its row norms)."""
    if ".parametrizations.weight.original" not in key:
        return init_tensor_(torch.empty(shapes[key], dtype=dtype), key, seed)
    stem = key.split(".parametrizations.")[0]
    v = init_tensor_(
        torch.empty(shapes[f"{stem}.parametrizations.weight.original1"], dtype=dtype), f"{stem}.weight", seed
    )
    return v if key.endswith("1") else v.float().norm(dim=1, keepdim=True).to(dtype)


def _shard_plan(shapes: dict[str, Shape], num_shards: int, dtype: torch.dtype) -> list[list[str]]:
    """Consecutive keys split into `num_shards` groups of roughly equal bytes (save_pretrained-style)."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    sizes = {k: math.prod(s) * itemsize for k, s in shapes.items()}
    target = sum(sizes.values()) / num_shards
    shards: list[list[str]] = [[] for _ in range(num_shards)]
    written = 0
    for key, nbytes in sizes.items():
        shards[min(int(written // target), num_shards - 1)].append(key)
        written += nbytes
    return [s for s in shards if s]


def _tts_config_fields(tts: TTSConfig) -> dict:
    """`tts_config` as released: llm_dim (its class default is 2560) plus whatever differs from the defaults."""
    official_defaults = TTSConfig()
    skip = {"rope_theta", "rms_norm_eps", "llama_vocab_size"}  # transformers defaults, not config.json fields
    changed = {
        f.name: getattr(tts, f.name)
        for f in fields(TTSConfig)
        if f.name not in skip and getattr(tts, f.name) != getattr(official_defaults, f.name)
    }
    return {"model_type": "conditional_chattts", "llm_dim": tts.llm_dim, **changed}


def official_config_dict(config: ModelConfig, size: str, dtype: torch.dtype) -> dict:
    """config.json in the official layout: Qwen2 fields at the top, `tts_config`, vision/audio configs, flags.

    Fields the speech path reads are exact; the vision/audio/slice fields follow the official config class and
    are guesses where marked in docs/checkpoints.md (e.g. drop_vision_last_layer, stream_input)."""
    llm, dims = config.llm, SKIPPED_DIMS[size]
    return {
        "_name_or_path": "openbmb/MiniCPM-o-2_6",
        "architectures": ["MiniCPMO"],
        "auto_map": {
            "AutoConfig": "configuration_minicpm.MiniCPMOConfig",
            "AutoModel": "modeling_minicpmo.MiniCPMO",
            "AutoModelForCausalLM": "modeling_minicpmo.MiniCPMO",
        },
        "model_type": "minicpmo",
        "version": float(config.version),
        "torch_dtype": str(dtype).removeprefix("torch."),
        "transformers_version": "4.44.2",
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "hidden_act": "silu",
        "hidden_size": llm.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": llm.intermediate_size,
        "max_position_embeddings": llm.max_position_embeddings,
        "max_window_layers": llm.num_hidden_layers,
        "num_attention_heads": llm.num_attention_heads,
        "num_hidden_layers": llm.num_hidden_layers,
        "num_key_value_heads": llm.num_key_value_heads,
        "rms_norm_eps": llm.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": llm.rope_theta,
        "sliding_window": 131072,
        "tie_word_embeddings": llm.tie_word_embeddings,
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": llm.vocab_size,
        "query_num": dims.query_num,
        "image_size": 448,
        "patch_size": 14,
        "drop_vision_last_layer": False,
        "batch_vision_input": True,
        "use_image_id": True,
        "vision_batch_size": 16,
        "slice_mode": True,
        "slice_config": {"max_slice_nums": 9, "model_type": "minicpmv", "patch_size": 14, "scale_resolution": 448},
        "audio_pool_step": 2,
        "audio_chunk_length": 1.0,
        "stream_input": False,
        "init_vision": True,
        "init_audio": True,
        "init_tts": True,
        "vision_config": {
            "model_type": "siglip",
            "hidden_size": dims.vision_hidden,
            "intermediate_size": dims.vision_mlp,
            "num_hidden_layers": dims.vision_layers,
            "num_attention_heads": 16 if size == "full" else 2,
            "image_size": 980,
            "patch_size": 14,
        },
        "audio_config": {
            "_name_or_path": "openai/whisper-medium",
            "architectures": ["MiniCPMWhisperEncoder"],
            "model_type": "whisper",
            "d_model": dims.audio_hidden,
            "encoder_layers": dims.audio_layers,
            "encoder_attention_heads": 16 if size == "full" else 2,
            "encoder_ffn_dim": dims.audio_ffn,
            "max_source_positions": dims.audio_positions,
            "num_mel_bins": 80,
        },
        "tts_config": _tts_config_fields(config.tts),
    }


def _write_vocos(path: Path, config: ModelConfig, seed: int) -> None:
    """Vocos.pt as the release ships it: the float32 Vocos state dict plus the feature-extractor buffers."""
    vocos = Vocos(config.vocos)
    with torch.no_grad():
        for name, param in vocos.named_parameters():
            init_tensor_(param, name, seed)
    state = {k: v.clone() for k, v in vocos.state_dict().items()} | unused_checkpoint_tensors(config.vocos)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


def write_checkpoint(
    out_dir: str | Path, size: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.bfloat16, progress: bool = True
) -> Path:
    """Write a synthetic snapshot of `size` ("tiny" or "full") into `out_dir`, one shard in memory at a time."""
    if size not in NUM_SHARDS:
        raise ValueError(f"size must be one of {sorted(NUM_SHARDS)}, got {size!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = CONFIGS[size]()
    shapes = checkpoint_shapes(config, size)
    shards = _shard_plan(shapes, NUM_SHARDS[size], dtype)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    total = sum(math.prod(s) * itemsize for s in shapes.values())
    weight_map = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {size} checkpoint", disable=not progress) as bar:
        for n, keys in enumerate(shards, start=1):
            name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for key in keys:
                tensors[key] = make_tensor(key, shapes, dtype, seed)
                bar.update(tensors[key].numel() * itemsize)
            save_file(tensors, str(out / name), metadata={"format": "pt"})
            weight_map |= dict.fromkeys(keys, name)
            del tensors
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(official_config_dict(config, size, dtype), indent=2))
    save_llm_tokenizer_files(build_qwen_tokenizer(), out)
    save_tts_tokenizer_files(build_chattts_standin_tokenizer(), out / "assets" / "chattts_tokenizer")
    _write_vocos(out / VOCOS_FILE, config, seed)
    return out


def default_tiny_checkpoint() -> Path:
    """The CLI's embedded model: a tiny synthetic snapshot written once into the cache, atomically."""
    base = Path(os.environ.get("OMNIVOX_CACHE") or "~/.cache/omnivox").expanduser()
    final = base / f"tiny-{omnivox.__version__}-{SYNTHETIC_FORMAT}"
    if (final / "config.json").is_file():
        return final
    base.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=base))
    try:
        write_checkpoint(staging, "tiny", progress=False)
        os.rename(staging, final)  # atomic; fails if another process got there first
    except OSError:
        if not (final / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final
