"""Synthetic checkpoint -> loader round trip, the skipped tensors stay unread, and every failure names its cause."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from omnivox.config import tiny_config
from omnivox.errors import CheckpointError
from omnivox.models import loader
from omnivox.models.chattts import fold_weight_norm
from omnivox.models.loader import build_dummy_model, is_skipped_key, is_speech_key, load_speech_model
from omnivox.models.synthetic import default_tiny_checkpoint

INDEX = "model.safetensors.index.json"


def _weight_map(root: Path) -> dict[str, str]:
    return json.loads((root / INDEX).read_text())["weight_map"]


def _file_tensors(root: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(set(_weight_map(root).values())):
        tensors |= load_file(root / shard)
    return tensors


def _linked_copy(src: Path, dst: Path) -> Path:
    """A snapshot of symlinks to `src`'s files, so a test can replace single files without touching `src`."""
    for path in src.rglob("*"):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(path)
    return dst


def _replace(path: Path, data: bytes | str) -> None:
    path.unlink()
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)


def _module_tensor(model, key: str) -> torch.Tensor:
    """The loaded tensor that a checkpoint key lands in (prefix table of the architecture doc)."""
    for prefix, module in (("tts.dvae.", model.dvae), ("llm.", model.llm), ("tts.", model.tts)):
        if key.startswith(prefix):
            return module.state_dict()[key.removeprefix(prefix)]
    raise KeyError(key)


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint: Path):
    return load_speech_model(tiny_checkpoint, dtype=torch.bfloat16, progress=False)


@pytest.fixture
def snapshot(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    return _linked_copy(tiny_checkpoint, tmp_path / "snapshot")


def test_round_trip_every_tensor_equals_the_file(tiny_checkpoint: Path, loaded) -> None:
    written = _file_tensors(tiny_checkpoint)
    speech = [k for k in written if is_speech_key(k)]
    assert len(speech) > 50
    for key in speech:
        if ".parametrizations.weight.original" in key:
            continue
        assert torch.equal(_module_tensor(loaded, key), written[key]), key
    for i in range(loaded.config.tts.num_vq):
        stem = f"tts.head_code.{i}.parametrizations.weight.original"
        folded = fold_weight_norm(written[stem + "0"], written[stem + "1"])
        assert torch.equal(loaded.tts.head_code[i].weight, folded)
    vocos_file = torch.load(tiny_checkpoint / "assets" / "Vocos.pt", weights_only=True)
    for key, value in loaded.vocos.state_dict().items():
        assert value.dtype == torch.float32 and torch.equal(value, vocos_file[key]), key
    assert loaded.llm.model.embed_tokens.weight.dtype == torch.bfloat16
    assert set(loaded.load_times) == {"read_s", "h2d_s", "prepare_s", "total_s"}


def test_skipped_tensors_are_never_read(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    requested: list[str] = []

    class RecordingSafeOpen:
        """Wraps safetensors.safe_open and records every tensor whose bytes are requested."""

        def __init__(self, *args, **kwargs):
            self._handle = safe_open(*args, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def get_tensor(self, key: str) -> torch.Tensor:
            requested.append(key)
            return self._handle.get_tensor(key)

        def __getattr__(self, name: str):
            return getattr(self._handle, name)

    monkeypatch.setattr(loader, "safe_open", RecordingSafeOpen)
    load_speech_model(tiny_checkpoint, dtype=torch.bfloat16, progress=False)
    weight_map = _weight_map(tiny_checkpoint)
    skipped = {k for k in weight_map if is_skipped_key(k)}
    assert {"vpm.post_layernorm.weight", "tts.model.embed_tokens.weight", "tts.dvae.encoder.conv_out.weight",
            "tts.dvae.vq_layer.quantizer.rvqs.0.project_in.weight"} <= skipped  # fmt: skip
    assert len(requested) == len(set(requested))
    assert set(requested) == {k for k in weight_map if is_speech_key(k)}
    assert not skipped & set(requested)


def test_loaded_synthetic_equals_dummy_model(loaded) -> None:
    dummy = build_dummy_model(tiny_config(), dtype=torch.bfloat16, seed=0)
    for name in ("llm", "tts", "dvae", "vocos"):
        ours, theirs = getattr(loaded, name).state_dict(), getattr(dummy, name).state_dict()
        assert ours.keys() == theirs.keys()
        for key in ours:
            if key.startswith("head_code."):  # folded from (g, v): equal up to the fold's bf16 rounding
                torch.testing.assert_close(ours[key], theirs[key], atol=1e-3, rtol=1e-2)
            else:
                assert torch.equal(ours[key], theirs[key]), f"{name}.{key}"
    assert dummy.param_counts() == loaded.param_counts()


def test_dummy_model_gives_finite_outputs() -> None:
    model = build_dummy_model(tiny_config(), dtype=torch.float32, seed=1)
    with torch.no_grad():
        ids = torch.tensor([model.tokenizer.encode("<|im_start|>user\nHello 你好<|im_end|>")])
        hidden = model.llm(ids, torch.arange(ids.shape[1]), cache=None)
        logits = model.llm.compute_logits(hidden)
        assert logits.shape == (1, ids.shape[1], model.config.llm.vocab_size) and torch.isfinite(logits).all()
        speaker = model.tts.project_speaker(hidden[:, -1])
        embeds = torch.cat([model.tts.embed_text(torch.tensor([[21131, 21143]])), speaker[:, None]], dim=1)
        tts_logits = model.tts.compute_logits(model.tts(embeds, torch.arange(3), cache=None))
        assert tts_logits.shape == (1, 3, 4, 626) and torch.isfinite(tts_logits).all()
        pcm = model.vocos.decode(model.dvae.decode(torch.randint(0, 625, (1, 8, 4))))
        assert pcm.shape == (1, 16 * 256) and torch.isfinite(pcm).all()
    assert model.source == "dummy" and model.memory_bytes() >= 4 * sum(model.param_counts().values())


def test_tied_embeddings_when_lm_head_is_absent(snapshot: Path) -> None:
    config = json.loads((snapshot / "config.json").read_text())
    _replace(snapshot / "config.json", json.dumps(config | {"tie_word_embeddings": True}))
    index = json.loads((snapshot / INDEX).read_text())
    del index["weight_map"]["llm.lm_head.weight"]
    _replace(snapshot / INDEX, json.dumps(index))
    model = load_speech_model(snapshot, dtype=torch.float32, progress=False)
    assert not hasattr(model.llm, "lm_head")
    hidden = torch.randn(1, 2, model.config.llm.hidden_size)
    torch.testing.assert_close(model.llm.compute_logits(hidden), hidden @ model.llm.model.embed_tokens.weight.T)


def test_missing_lm_head_without_tying_is_an_error(snapshot: Path) -> None:
    index = json.loads((snapshot / INDEX).read_text())
    del index["weight_map"]["llm.lm_head.weight"]
    _replace(snapshot / INDEX, json.dumps(index))
    with pytest.raises(CheckpointError, match=r"llm.lm_head.weight is missing .*tie_word_embeddings is false"):
        load_speech_model(snapshot, progress=False)


def test_truncated_shard_names_the_shard(snapshot: Path) -> None:
    shard = snapshot / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    _replace(shard, data[: len(data) - 4096])
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002.safetensors: truncated or corrupt"):
        load_speech_model(snapshot, progress=False)


def test_missing_key_names_key_and_shape(snapshot: Path) -> None:
    index = json.loads((snapshot / INDEX).read_text())
    del index["weight_map"]["tts.emb_text.weight"]
    _replace(snapshot / INDEX, json.dumps(index))
    with pytest.raises(CheckpointError, match=r"tts.emb_text.weight is missing, expected shape \[21178, 64\]"):
        load_speech_model(snapshot, progress=False)


def test_wrong_shape_names_file_key_and_shapes(snapshot: Path) -> None:
    shard_name = _weight_map(snapshot)["tts.emb_text.weight"]
    tensors = load_file(snapshot / shard_name)
    tensors["tts.emb_text.weight"] = torch.zeros(100, 64, dtype=torch.bfloat16)
    (snapshot / shard_name).unlink()
    save_file(tensors, snapshot / shard_name)
    expected = f"{shard_name}: tts.emb_text.weight has shape [100, 64], expected [21178, 64]"
    with pytest.raises(CheckpointError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        load_speech_model(snapshot, progress=False)


def test_unexpected_speech_key_is_an_error(snapshot: Path) -> None:
    shard_name = _weight_map(snapshot)["tts.emb_text.weight"]
    tensors = load_file(snapshot / shard_name) | {"tts.extra_head.weight": torch.zeros(2, 2)}
    (snapshot / shard_name).unlink()
    save_file(tensors, snapshot / shard_name)
    index = json.loads((snapshot / INDEX).read_text())
    index["weight_map"]["tts.extra_head.weight"] = shard_name
    _replace(snapshot / INDEX, json.dumps(index))
    with pytest.raises(CheckpointError, match=f"{shard_name}: unexpected key tts.extra_head.weight"):
        load_speech_model(snapshot, progress=False)


def test_missing_shard_names_the_path(snapshot: Path) -> None:
    (snapshot / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"missing file .*model-00001-of-00002.safetensors"):
        load_speech_model(snapshot, progress=False)


@pytest.mark.parametrize(
    ("relative", "message"),
    [
        ("assets/Vocos.pt", r"missing file .*assets/Vocos.pt: MiniCPM-o 2.6 keeps the vocoder"),
        ("config.json", r"missing file .*config.json"),
        (INDEX, r"missing file .*model.safetensors.index.json"),
        ("tokenizer.json", r"missing tokenizer file .*tokenizer.json"),
        ("assets/chattts_tokenizer/tokenizer.json", r"missing tokenizer file .*chattts_tokenizer/tokenizer.json"),
    ],
)
def test_missing_file_names_the_path(snapshot: Path, relative: str, message: str) -> None:
    (snapshot / relative).unlink()
    with pytest.raises(CheckpointError, match=message):
        load_speech_model(snapshot, progress=False)


def test_vocos_wrong_shape_names_key_and_shapes(snapshot: Path) -> None:
    path = snapshot / "assets" / "Vocos.pt"
    state = torch.load(path, weights_only=True)
    state["head.out.weight"] = torch.zeros(10, 512)
    path.unlink()
    torch.save(state, path)
    with pytest.raises(
        CheckpointError, match=r"Vocos.pt: head.out.weight has shape \[10, 512\], expected \[1026, 512\]"
    ):
        load_speech_model(snapshot, progress=False)


def test_not_a_snapshot_or_hub_id() -> None:
    with pytest.raises(CheckpointError, match="not a snapshot directory nor a hub id"):
        load_speech_model("/no/such/dir/here", progress=False)


def test_default_tiny_checkpoint_is_written_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMNIVOX_CACHE", str(tmp_path))
    first = default_tiny_checkpoint()
    stamp = os.stat(first / "config.json").st_mtime_ns
    assert default_tiny_checkpoint() == first and os.stat(first / "config.json").st_mtime_ns == stamp
    assert first.parent == tmp_path and [p.name for p in tmp_path.iterdir()] == [first.name]  # no staging left
    assert load_speech_model(first, dtype=torch.float32, progress=False).config.llm.hidden_size == 64
