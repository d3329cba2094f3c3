"""Load the MiniCPM-o 2.6 speech path from an official snapshot (or build it with seeded random weights).

Only what text-to-speech needs is read: `llm.*`, the speech part of `tts.*`, `assets/Vocos.pt` and the two
tokenizers. Vision, audio-input and encode-only tensors are never read from disk: each shard is memory-mapped and
`get_tensor` is called for needed keys only (the shard files themselves are whole, so a hub download still fetches
every shard that holds an LLM tensor, which is all of them).

Order of work: resolve the snapshot -> config.json -> index -> build modules on `meta` -> check every key and shape
against the shard headers (nothing read yet) -> stream tensors (a few reader threads read the memory-mapped bytes:
on CUDA into pinned memory, which the main thread copies to the device converting dtype on the way; on the CPU
straight into the parameters) -> fold the weight-norm heads -> Vocos.pt -> tokenizers. Any problem is one
`CheckpointError` that names the file, the key and the shapes.

Checkpoint keys are module attribute names plus a prefix (`llm.`, `tts.`, `tts.dvae.`; none for Vocos.pt), so
the loader is a table. Renames: `tts.head_code.{i}.parametrizations.weight.original0/1` (g, v) -> folded
`head_code.{i}.weight`. Skipped: see `is_skipped_key`.
"""

from __future__ import annotations

import json
import re
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm.auto import tqdm

from omnivox.config import ModelConfig, full_config
from omnivox.errors import CheckpointError
from omnivox.models.chattts import ConditionalChatTTS, fold_weight_norm
from omnivox.models.dvae import DVAE
from omnivox.models.qwen2 import Qwen2LM
from omnivox.models.vocos import UNUSED_CHECKPOINT_KEYS, Vocos
from omnivox.tokenizer import LLMTokenizer, TTSTokenizer, build_chattts_standin_tokenizer, build_qwen_tokenizer

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
VOCOS_FILE = "assets/Vocos.pt"
LLM_TOKENIZER_FILE = "tokenizer.json"
TTS_TOKENIZER_FILE = "assets/chattts_tokenizer/tokenizer.json"
# Everything a text-to-speech load reads; a hub download fetches these plus the shards that hold needed keys.
HUB_METADATA_PATTERNS = [
    "config.json", INDEX_FILE, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
    "merges.txt", "added_tokens.json", VOCOS_FILE, "assets/chattts_tokenizer/*",
]  # fmt: skip
SKIPPED_PREFIXES = (
    "vpm.", "resampler.", "apm.", "audio_projection_layer.",  # vision / audio input: not on the speech path
    "tts.model.embed_tokens.",  # the TTS Llama's own token embedding: the TTS embeds with emb_text/emb_code
    "tts.dvae.encoder.", "tts.dvae.downsample_conv.",  # DVAE encode side
)  # fmt: skip
_SKIPPED_PATTERN = re.compile(r"tts\.dvae\.vq_layer\.quantizer\.rvqs\.\d+\.project_in\.")
_HEAD_PREFIX = "tts.head_code.{}.parametrizations.weight.original"
READ_THREADS = 4  # parallel page-faulting reads keep an NVMe queue busy; many more only thrash a slow disk
READ_WINDOW = 8  # tensors staged ahead of the device copies (bounds the pinned host memory in flight)


def is_skipped_key(key: str) -> bool:
    """Checkpoint keys the speech path never reads (vision, audio input, unused TTS embedding, DVAE encoder)."""
    return key.startswith(SKIPPED_PREFIXES) or bool(_SKIPPED_PATTERN.match(key))


def is_speech_key(key: str) -> bool:
    """Keys the loader must account for: every non-skipped `llm.*` / `tts.*` key."""
    return key.startswith(("llm.", "tts.")) and not is_skipped_key(key)


@dataclass
class SpeechModel:
    """The four modules and two tokenizers of the speech path, plus where they came from and what loading cost."""

    config: ModelConfig
    llm: Qwen2LM
    tts: ConditionalChatTTS
    dvae: DVAE
    vocos: Vocos
    tokenizer: LLMTokenizer
    tts_tokenizer: TTSTokenizer
    source: str  # "dummy" or the snapshot directory
    dtype: torch.dtype  # of LLM, TTS and DVAE; Vocos is always float32
    device: torch.device
    load_times: dict[str, float] = field(default_factory=dict)  # read_s, h2d_s, prepare_s, total_s

    def modules(self) -> dict[str, nn.Module]:
        return {"llm": self.llm, "tts": self.tts, "dvae": self.dvae, "vocos": self.vocos}

    def param_counts(self) -> dict[str, int]:
        return {name: sum(p.numel() for p in m.parameters()) for name, m in self.modules().items()}

    def fuse_projections(self) -> None:
        """q/k/v and gate/up as one product each in every decoder layer (`DecoderStack.fuse_projections`). On a GPU
        the projections' old storage goes back to the driver, so the free memory that sizes the caches counts it."""
        self.llm.model.fuse_projections()
        self.tts.model.fuse_projections()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def memory_bytes(self) -> int:
        """Bytes held by parameters and buffers (each storage counted once)."""
        seen: dict[int, int] = {}
        for module in self.modules().values():
            for t in (*module.parameters(), *module.buffers()):
                seen[t.data_ptr()] = t.numel() * t.element_size()
        return sum(seen.values())


# --- module construction ----------------------------------------------------------------------------------------


def _build_modules(config: ModelConfig, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, ...]:
    """LLM and TTS are built on `meta` and given uninitialised storage in `dtype` on `device` (no init, no host
    copy); their rotary tables are rebuilt in fp32. DVAE and Vocos are small and built directly on `device`."""
    with torch.device("meta"):
        llm, tts = Qwen2LM(config.llm), ConditionalChatTTS(config.tts)
    for module in (llm, tts):
        module.to(dtype).to_empty(device=device)
        module.model.reset_rotary(device)
    with torch.device(device):
        dvae = DVAE(config.dvae).to(dtype)
        vocos = Vocos(config.vocos)
    dvae.init_buffers(device)
    for module in (llm, tts, dvae, vocos):
        module.eval().requires_grad_(False)
    return llm, tts, dvae, vocos


def _safetensors_targets(llm: nn.Module, tts: nn.Module, dvae: nn.Module) -> tuple[dict[str, torch.Tensor], list]:
    """Checkpoint key -> destination tensor, plus (head weight, g, v) triples to fold after loading."""
    targets: dict[str, torch.Tensor] = {}
    for prefix, module in (("llm.", llm), ("tts.", tts), ("tts.dvae.", dvae)):
        targets.update({prefix + name: t for name, t in module.state_dict().items()})
    folds = []
    for i, head in enumerate(tts.head_code):
        del targets[f"tts.head_code.{i}.weight"]
        weight = head.weight
        g = torch.empty(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
        v = torch.empty_like(weight)
        targets[_HEAD_PREFIX.format(i) + "0"], targets[_HEAD_PREFIX.format(i) + "1"] = g, v
        folds.append((weight, g, v))
    return targets, folds


# --- snapshot files ---------------------------------------------------------------------------------------------


def _resolve_snapshot(model: str | Path) -> Path:
    """A local directory as is; otherwise a hub id, downloaded with only the speech-path files."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(model).count("/") != 1:
        raise CheckpointError(f"{model}: not a snapshot directory nor a hub id like 'openbmb/MiniCPM-o-2_6'")
    from huggingface_hub import snapshot_download

    try:
        root = Path(snapshot_download(str(model), allow_patterns=HUB_METADATA_PATTERNS))
        index = root / INDEX_FILE
        shards = sorted(set(_read_index(index).values())) if index.is_file() else [SINGLE_FILE]
        return Path(snapshot_download(str(model), allow_patterns=[*HUB_METADATA_PATTERNS, *shards]))
    except CheckpointError:
        raise
    except Exception as e:  # network, auth, missing repo
        raise CheckpointError(f"{model}: download failed ({e}); pass a local snapshot directory instead") from e


def _read_index(path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors index ({e}); re-download it") from e
    return weight_map


def _weight_map(root: Path) -> dict[str, str]:
    """key -> shard file name, from the index (or the single-file header)."""
    if (root / INDEX_FILE).is_file():
        return _read_index(root / INDEX_FILE)
    if (root / SINGLE_FILE).is_file():
        return dict.fromkeys(_open_shard(root / SINGLE_FILE).keys(), SINGLE_FILE)
    raise CheckpointError(
        f"missing file {root / INDEX_FILE}: a MiniCPM-o 2.6 snapshot has sharded safetensors and their index; "
        "re-download the snapshot"
    )


def _open_shard(path: Path):
    if not path.is_file():
        raise CheckpointError(f"missing file {path}: listed in {INDEX_FILE}; re-download the snapshot")
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path.name}: truncated or corrupt safetensors file ({e}); re-download it") from e


def _fmt(shape) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def _check_keys(weight_map: dict[str, str], targets: dict[str, torch.Tensor], root: Path) -> dict[str, list[str]]:
    """Strict key and shape check against the shard headers; returns shard -> needed keys (in file order)."""
    missing = [k for k in targets if k not in weight_map]
    if missing:
        hint = " (config.json says tie_word_embeddings is false)" if missing[0] == "llm.lm_head.weight" else ""
        raise CheckpointError(
            f"{INDEX_FILE}: {missing[0]} is missing{hint}, expected shape {_fmt(targets[missing[0]].shape)}"
            + (f" ({len(missing) - 1} more keys missing)" if len(missing) > 1 else "")
        )
    unexpected = sorted(k for k in weight_map if is_speech_key(k) and k not in targets)
    if unexpected:
        raise CheckpointError(
            f"{weight_map[unexpected[0]]}: unexpected key {unexpected[0]} (not part of the speech path as configured"
            f" by config.json; {len(unexpected)} unexpected in total)"
        )
    plan: dict[str, list[str]] = {}
    for shard in sorted({weight_map[k] for k in targets}):
        handle = _open_shard(root / shard)
        present = set(handle.keys())
        plan[shard] = [k for k in handle.keys() if k in targets and weight_map[k] == shard]
        for key in (k for k in targets if weight_map[k] == shard):
            if key not in present:
                raise CheckpointError(f"{shard}: {key} is listed in {INDEX_FILE} but not stored in this shard")
            found = tuple(handle.get_slice(key).get_shape())
            if found != tuple(targets[key].shape):
                raise CheckpointError(f"{shard}: {key} has shape {_fmt(found)}, expected {_fmt(targets[key].shape)}")
    return plan


def _read_tensors(root: Path, plan: dict[str, list[str]], stage: Callable, timing: dict[str, float]) -> Iterator:
    """Yield (key, stage(key, tensor)) in file order while a few threads read ahead (a bounded window), so disk
    reads overlap each other and the device copies. `get_tensor` only maps the bytes; `stage` is where they are
    read (into pinned memory, or straight into the CPU parameter). `timing["read_s"]` sums the readers' busy time."""
    handles = {shard: _open_shard(root / shard) for shard in plan}

    def read(shard: str, key: str) -> tuple[str, torch.Tensor | None, float]:
        start = time.perf_counter()
        try:
            staged = stage(key, handles[shard].get_tensor(key))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{shard}: cannot read {key} ({e}); re-download it") from e
        return key, staged, time.perf_counter() - start

    todo = iter([(shard, key) for shard, keys in plan.items() for key in keys])
    pending: deque[Future] = deque()
    with ThreadPoolExecutor(READ_THREADS, thread_name_prefix="omnivox-read") as pool:
        try:
            while True:
                pending.extend(pool.submit(read, *job) for job in islice(todo, READ_WINDOW - len(pending)))
                if not pending:
                    return
                key, staged, seconds = pending.popleft().result()
                timing["read_s"] += seconds
                yield key, staged
        finally:
            for future in pending:
                future.cancel()


def _load_vocos(root: Path, vocos: Vocos) -> None:
    """Strict load of assets/Vocos.pt (float32), ignoring the feature-extractor buffers decoding never reads."""
    path = root / VOCOS_FILE
    if not path.is_file():
        raise CheckpointError(
            f"missing file {path}: MiniCPM-o 2.6 keeps the vocoder in {VOCOS_FILE}; re-download the snapshot"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises RuntimeError / pickle errors for damaged files
        raise CheckpointError(f"{path}: truncated or corrupt ({e}); re-download it") from e
    targets = vocos.state_dict()
    found = {k: v for k, v in state.items() if k not in UNUSED_CHECKPOINT_KEYS}
    for key, dest in targets.items():
        if key not in found:
            raise CheckpointError(f"{VOCOS_FILE}: {key} is missing, expected shape {_fmt(dest.shape)}")
        if found[key].shape != dest.shape:
            raise CheckpointError(
                f"{VOCOS_FILE}: {key} has shape {_fmt(found[key].shape)}, expected {_fmt(dest.shape)}"
            )
    extra = sorted(set(found) - set(targets))
    if extra:
        raise CheckpointError(f"{VOCOS_FILE}: unexpected key {extra[0]} ({len(extra)} unexpected in total)")
    for key, dest in targets.items():
        dest.copy_(found[key])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def load_speech_model(
    model: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16, progress: bool = True
) -> SpeechModel:
    """Load a MiniCPM-o 2.6 snapshot directory (or hub id) strictly; see the module docstring for the steps."""
    start = time.perf_counter()
    device = torch.device(device)
    root = _resolve_snapshot(model)
    config = ModelConfig.from_json(root / "config.json")
    weight_map = _weight_map(root)
    llm, tts, dvae, vocos = _build_modules(config, device, dtype)
    targets, folds = _safetensors_targets(llm, tts, dvae)
    plan = _check_keys(weight_map, targets, root)

    timing = {"read_s": 0.0, "h2d_s": 0.0, "prepare_s": 0.0}
    total_bytes = sum(targets[k].numel() * targets[k].element_size() for keys in plan.values() for k in keys)

    def stage(key: str, mapped: torch.Tensor) -> torch.Tensor | None:
        """Read the mapped bytes once: into pinned memory for CUDA, straight into the parameter on the CPU."""
        if device.type == "cpu":
            targets[key].copy_(mapped)
            return None
        return mapped.pin_memory() if device.type == "cuda" else mapped

    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"loading {root.name}", disable=not progress) as bar:
        for key, host in _read_tensors(root, plan, stage, timing):
            if host is not None:
                copy_start = time.perf_counter()
                targets[key].copy_(host, non_blocking=True)
                timing["h2d_s"] += time.perf_counter() - copy_start
            bar.update(targets[key].numel() * targets[key].element_size())
        sync_start = time.perf_counter()
        _sync(device)
        timing["h2d_s"] += time.perf_counter() - sync_start

    prepare_start = time.perf_counter()
    for weight, g, v in folds:
        weight.copy_(fold_weight_norm(g, v))  # in the target dtype, as the official run evaluates it
    read_start = time.perf_counter()
    _load_vocos(root, vocos)
    vocos_s = time.perf_counter() - read_start
    tokenizer = LLMTokenizer.from_file(root / LLM_TOKENIZER_FILE, vocab_size=config.llm.vocab_size)
    tts_tokenizer = TTSTokenizer.from_file(root / TTS_TOKENIZER_FILE, tts_config=config.tts)
    _sync(device)
    timing["read_s"] += vocos_s
    timing["prepare_s"] = time.perf_counter() - prepare_start - vocos_s
    timing["total_s"] = time.perf_counter() - start
    return SpeechModel(config, llm, tts, dvae, vocos, tokenizer, tts_tokenizer, str(root), dtype, device, timing)


# --- seeded random weights --------------------------------------------------------------------------------------

INIT_STD = 0.02  # linears, convolutions and embeddings
LAYER_SCALE_INIT = 0.1  # ConvNeXt layer scales (DVAE `.coef`, Vocos `.gamma`): small and positive


def tensor_seed(seed: int, key: str) -> int:
    """Per-tensor seed from the checkpoint key, so values do not depend on creation order or on which other
    tensors exist (a synthetic checkpoint and a dummy model agree tensor by tensor on the same device)."""
    return (seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63)


def init_tensor_(tensor: torch.Tensor, key: str, seed: int) -> torch.Tensor:
    """Fill `tensor` in place by its checkpoint key: biases 0, norm gains 1, the DVAE output `coef` 1, layer scales
    0.1, everything else N(0, 0.02) from a generator on the tensor's device."""
    parts = key.split(".")
    if parts[-1] == "bias":
        return tensor.zero_()
    if key == "tts.dvae.coef" or (parts[-1] == "weight" and len(parts) > 1 and "norm" in parts[-2]):
        return tensor.fill_(1.0)
    if parts[-1] in ("coef", "gamma"):
        return tensor.fill_(LAYER_SCALE_INIT)
    generator = torch.Generator(device=tensor.device).manual_seed(tensor_seed(seed, key))
    return tensor.normal_(0.0, INIT_STD, generator=generator)


@torch.no_grad()
def build_dummy_model(
    config: ModelConfig | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> SpeechModel:
    """The released architecture (or `config`) with seeded random weights made in place on `device`.

    Same init as `omnivox.models.synthetic.write_checkpoint`, so a dummy model behaves like one loaded from a
    synthetic checkpoint. Tokenizers are the offline builds (`build_qwen_tokenizer`, the ChatTTS stand-in).
    """
    start = time.perf_counter()
    config = full_config() if config is None else config
    device = torch.device(device)
    llm, tts, dvae, vocos = _build_modules(config, device, dtype)
    for prefix, module in (("llm.", llm), ("tts.", tts), ("tts.dvae.", dvae), ("", vocos)):
        for name, param in module.named_parameters():
            init_tensor_(param, prefix + name, seed)
    tokenizer = LLMTokenizer(build_qwen_tokenizer(), "build_qwen_tokenizer()", vocab_size=config.llm.vocab_size)
    tts_tokenizer = TTSTokenizer(build_chattts_standin_tokenizer(), "ChatTTS stand-in", tts_config=config.tts)
    _sync(device)
    elapsed = time.perf_counter() - start
    times = {"read_s": 0.0, "h2d_s": 0.0, "prepare_s": elapsed, "total_s": elapsed}
    return SpeechModel(config, llm, tts, dvae, vocos, tokenizer, tts_tokenizer, "dummy", dtype, device, times)
