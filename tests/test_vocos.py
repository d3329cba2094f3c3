"""Our Vocos against the `vocos` 0.1.0 package's own VocosBackbone + ISTFTHead, on the same random weights."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
import sys
import types
from collections.abc import Iterator

import pytest
import torch

from omnivox.config import VocosConfig
from omnivox.models.vocos import UNUSED_CHECKPOINT_KEYS, Vocos, unused_checkpoint_tensors

# Same ops in the same order, fp32: differences are float-rounding only. PCM peaks are ~0.1-1 with these weights.
ATOL = 1e-5
RTOL = 1e-4


def _is_stub_name(name: str) -> bool:
    return name.split(".")[0] in ("vocos", "torchaudio")


@contextlib.contextmanager
def _vocos_decode_modules() -> Iterator[types.ModuleType]:
    """Import vocos.models and vocos.heads without running vocos/__init__.py; undo all sys.modules changes after.

    `vocos/__init__` imports `pretrained` -> `feature_extractors`, which needs torchaudio and encodec; neither is
    installed here, and decoding never touches them. `heads.py` imports two torchaudio mel helpers at module level
    that only `IMDCTSymExpHead(sample_rate=...)` calls, so when torchaudio is missing a stand-in provides the names.
    """
    spec = importlib.util.find_spec("vocos")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the vocos package is not installed")
    saved = {name: module for name, module in sys.modules.items() if _is_stub_name(name)}
    try:
        package = types.ModuleType("vocos")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["vocos"] = package
        if importlib.util.find_spec("torchaudio") is None:
            _install_torchaudio_stand_in()
        yield types.SimpleNamespace(
            models=importlib.import_module("vocos.models"), heads=importlib.import_module("vocos.heads")
        )
    finally:
        for name in [name for name in sys.modules if _is_stub_name(name)]:
            del sys.modules[name]
        sys.modules.update(saved)


def _install_torchaudio_stand_in() -> None:
    def unavailable(*args: object, **kwargs: object) -> None:
        raise RuntimeError("torchaudio stand-in: only the vocos decode path is available in tests")

    root, functional, inner = (
        types.ModuleType(n) for n in ("torchaudio", "torchaudio.functional", "torchaudio.functional.functional")
    )
    inner._hz_to_mel = unavailable
    inner._mel_to_hz = unavailable
    root.functional = functional
    functional.functional = inner
    sys.modules.update({m.__name__: m for m in (root, functional, inner)})


class ReferenceVocos(torch.nn.Module):
    """The package's backbone and head under the Vocos.pt names (its full `Vocos` needs the feature extractor)."""

    def __init__(self, backbone: torch.nn.Module, head: torch.nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(mel))


@pytest.fixture(scope="module")
def reference() -> ReferenceVocos:
    cfg = VocosConfig()
    with _vocos_decode_modules() as vocos:
        backbone = vocos.models.VocosBackbone(
            input_channels=cfg.n_mels, dim=cfg.dim, intermediate_dim=cfg.intermediate_dim, num_layers=cfg.num_layers
        )
        head = vocos.heads.ISTFTHead(dim=cfg.dim, n_fft=cfg.n_fft, hop_length=cfg.hop_length)
    model = ReferenceVocos(backbone, head).eval()
    model.load_state_dict(_random_state(model.state_dict(), seed=0))
    return model


def _random_state(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Trained-looking scales: unit-gain weights, small biases, LayerNorm gains near 1, layer scales 0.1-0.5.

    With these, the head's log-magnitudes are about N(0, 1), so exp() neither saturates at the clip nor vanishes.
    """
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, tensor in state.items():
        randn = torch.randn(tensor.shape, generator=gen)
        if name.endswith("window"):
            out[name] = tensor.clone()
        elif name.endswith("gamma"):
            out[name] = 0.1 + 0.4 * torch.rand(tensor.shape, generator=gen)
        elif "norm" in name and name.endswith("weight"):
            out[name] = 1.0 + 0.1 * randn
        elif name.endswith("bias"):
            out[name] = 0.1 * randn
        else:
            fan_in = tensor[0].numel()
            out[name] = randn / math.sqrt(fan_in)
    return out


def _ours(reference: ReferenceVocos) -> Vocos:
    model = Vocos(VocosConfig()).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    return model


@pytest.mark.parametrize("num_frames", [1, 2, 58, 131])
def test_decode_matches_vocos_package(reference: ReferenceVocos, num_frames: int) -> None:
    ours = _ours(reference)
    mel = torch.randn(2, 100, num_frames, generator=torch.Generator().manual_seed(num_frames)) * 2.0 - 3.0
    with torch.inference_mode():
        expected = reference(mel)
        actual = ours.decode(mel)
    assert actual.shape == (2, num_frames * 256)
    assert actual.dtype == torch.float32
    assert expected.abs().max() > 1e-2  # the comparison is not between two near-silent signals
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL)


def test_state_dict_keys_match_vocos_pt_layout(reference: ReferenceVocos) -> None:
    cfg = VocosConfig()
    ours = Vocos(cfg).state_dict()
    expected_shapes = {name: tuple(t.shape) for name, t in reference.state_dict().items()}
    assert {name: tuple(t.shape) for name, t in ours.items()} == expected_shapes
    assert ours["head.istft.window"].shape == (1024,)
    assert ours["head.out.weight"].shape == (1026, 512)
    assert ours["backbone.convnext.7.gamma"].shape == (512,)
    assert len([k for k in ours if k.startswith("backbone.convnext.")]) == 8 * 9


def test_unused_checkpoint_tensors_complete_a_strict_vocos_pt() -> None:
    cfg = VocosConfig()
    extras = unused_checkpoint_tensors(cfg)
    assert tuple(extras) == UNUSED_CHECKPOINT_KEYS
    assert extras["feature_extractor.mel_spec.spectrogram.window"].shape == (1024,)
    torch.testing.assert_close(extras["feature_extractor.mel_spec.spectrogram.window"], torch.hann_window(1024))
    filterbank = extras["feature_extractor.mel_spec.mel_scale.fb"]
    assert filterbank.shape == (513, 100) and filterbank.dtype == torch.float32
    assert torch.isfinite(filterbank).all() and (filterbank >= 0).all() and (filterbank.sum(0) > 0).all()
    torch.testing.assert_close(unused_checkpoint_tensors(cfg)[UNUSED_CHECKPOINT_KEYS[1]], filterbank, rtol=0, atol=0)
    # A full Vocos.pt is our state dict plus these; our module ignores them only when told to (strict=False).
    model = Vocos(cfg)
    full = {**model.state_dict(), **extras}
    result = model.load_state_dict(full, strict=False)
    assert sorted(result.unexpected_keys) == sorted(UNUSED_CHECKPOINT_KEYS) and not result.missing_keys


def test_decode_casts_input_to_float32(reference: ReferenceVocos) -> None:
    ours = _ours(reference)
    mel = torch.randn(1, 100, 5, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        from_bf16 = ours.decode(mel.bfloat16())
        from_fp32 = ours.decode(mel.bfloat16().float())
    assert from_bf16.dtype == torch.float32
    torch.testing.assert_close(from_bf16, from_fp32, rtol=0, atol=0)
