"""DVAE decode: FSQ lookup against vector-quantize-pytorch, whole decode against a plain oracle from the fact sheet."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from omnivox.config import DVAEConfig
from omnivox.models.dvae import DVAE, encoder_key_shapes

NUM_CODES = 625  # 5**4 FSQ ids per codebook (626 is the TTS vocabulary incl. EOS, which never reaches the DVAE)
FP32_ATOL = 2e-5  # log-mel peaks ~4 with these weights; same math, different op order (measured max ~3e-6)
FP32_RTOL = 1e-5
BF16_MAX_REL_L2 = 3e-2  # bf16 weights+activations through 12 residual blocks vs the fp32 oracle (measured ~0.010)


def _random_state(model: DVAE, seed: int) -> dict[str, torch.Tensor]:
    """Trained-looking scales: unit-gain weights, small biases, LN gains near 1, layer scales 0.1-0.5."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in model.state_dict().items():
        randn = torch.randn(tensor.shape, generator=gen)
        if name == "coef":
            state[name] = 0.5 + torch.rand(tensor.shape, generator=gen)
        elif name.endswith(".coef"):
            state[name] = 0.1 + 0.4 * torch.rand(tensor.shape, generator=gen)
        elif ".norm." in name and name.endswith("weight"):
            state[name] = 1.0 + 0.1 * randn
        elif name.endswith("bias"):
            state[name] = 0.1 * randn
        else:
            state[name] = randn / math.sqrt(tensor[0].numel())
    return state


@pytest.fixture(scope="module")
def dvae() -> DVAE:
    model = DVAE(DVAEConfig()).eval()
    model.load_state_dict(_random_state(model, seed=0))
    return model


def _random_codes(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, NUM_CODES, (batch, length, 4), generator=torch.Generator().manual_seed(seed))


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def _oracle_decode(state: dict[str, torch.Tensor], codes: torch.Tensor) -> torch.Tensor:
    """Fact sheet 4.10, written out: codes [B, T, 4] -> log-mel [B, 100, 2T] in fp32."""
    s = {k: v.float() for k, v in state.items()}
    batch, length, _ = codes.shape
    group_outputs = []
    for group in range(2):
        summed = torch.zeros(batch, length, 4)
        for residual in range(2):
            ids = codes[:, :, 2 * group + residual]
            for j in range(4):
                digit = (ids // 5**j) % 5
                summed[:, :, j] += (digit.float() - 2.0) / 2.0 * (1.0 if residual == 0 else 0.25)
        prefix = f"vq_layer.quantizer.rvqs.{group}.project_out"
        group_outputs.append(summed @ s[f"{prefix}.weight"].T + s[f"{prefix}.bias"])  # [B, T, 512]
    features = torch.cat(group_outputs, dim=-1).transpose(1, 2)  # [B, 1024, T] as GFSQ._embed returns it
    # ChatTTS: view(B, 2, 512, T).permute(0, 2, 3, 1).flatten(2)
    x = features.reshape(batch, 2, 512, length).permute(0, 2, 3, 1).reshape(batch, 512, 2 * length)
    x = F.conv1d(x, s["decoder.conv_in.0.weight"], s["decoder.conv_in.0.bias"], padding=1)
    x = F.conv1d(_gelu(x), s["decoder.conv_in.2.weight"], s["decoder.conv_in.2.bias"], padding=1)
    for i in range(12):
        p = f"decoder.decoder_block.{i}"
        y = F.conv1d(x, s[f"{p}.dwconv.weight"], s[f"{p}.dwconv.bias"], padding=6, dilation=2, groups=256)
        y = _layer_norm(y.transpose(1, 2), s[f"{p}.norm.weight"], s[f"{p}.norm.bias"])
        y = _gelu(y @ s[f"{p}.pwconv1.weight"].T + s[f"{p}.pwconv1.bias"])
        y = (y @ s[f"{p}.pwconv2.weight"].T + s[f"{p}.pwconv2.bias"]) * s[f"{p}.coef"]
        x = x + y.transpose(1, 2)
    x = F.conv1d(x, s["decoder.conv_out.weight"])
    x = F.conv1d(x, s["out_conv.weight"], padding=1)
    return x * s["coef"]


def test_codes_to_vectors_match_grouped_residual_fsq(dvae: DVAE) -> None:
    vqp = pytest.importorskip("vector_quantize_pytorch")
    reference = vqp.GroupedResidualFSQ(dim=1024, levels=[5, 5, 5, 5], num_quantizers=2, groups=2).eval()
    # The official run pins 1.18.5, whose ResidualFSQ scales level r by (levels - 1) ** -r; newer releases (1.32
    # here) use levels ** -r and symmetric FSQ codes (identical to the old ones for odd levels). Restore the pinned
    # scales so the reference reproduces the official lookup.
    pinned_scales = torch.tensor([[1.0] * 4, [0.25] * 4])
    for rvq, ours in zip(reference.rvqs, dvae.vq_layer.quantizer.rvqs, strict=True):
        rvq.scales.copy_(pinned_scales)
        rvq.project_out.load_state_dict(ours.project_out.state_dict())
    codes = _random_codes(3, 17, seed=1)
    # GFSQ._embed: [B, T, G*R] -> view(B, T, G, R) -> permute to [G, B, T, R], the layout get_output_from_indices takes
    indices = codes.view(3, 17, 2, 2).permute(2, 0, 1, 3)
    with torch.inference_mode():
        expected = reference.get_output_from_indices(indices)  # [B, T, 1024]: group 0 then group 1
        actual = dvae.vq_layer(codes)  # [B, T, 2, 512]
    torch.testing.assert_close(actual.reshape(3, 17, 1024), expected, atol=1e-6, rtol=1e-6)


def test_every_code_id_maps_to_the_package_codebook(dvae: DVAE) -> None:
    vqp = pytest.importorskip("vector_quantize_pytorch")
    fsq = vqp.GroupedResidualFSQ(dim=1024, levels=[5, 5, 5, 5], num_quantizers=2, groups=2).rvqs[0].layers[0]
    ids = torch.arange(NUM_CODES)
    vq = dvae.vq_layer
    digits = (ids[:, None] // vq.digit_basis) % vq.levels
    values = (digits - vq.half_widths).float() / vq.half_widths.float()
    torch.testing.assert_close(values, fsq.implicit_codebook, atol=0, rtol=0)


@pytest.mark.parametrize(("batch", "length"), [(1, 1), (2, 7), (1, 29)])
def test_decode_matches_plain_oracle(dvae: DVAE, batch: int, length: int) -> None:
    codes = _random_codes(batch, length, seed=length)
    with torch.inference_mode():
        actual = dvae.decode(codes)
        expected = _oracle_decode(dvae.state_dict(), codes)
    assert actual.shape == (batch, 100, 2 * length)
    assert actual.dtype == torch.float32
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(actual, expected, atol=FP32_ATOL, rtol=FP32_RTOL)


def test_decode_bf16_close_to_fp32_oracle(dvae: DVAE) -> None:
    codes = _random_codes(2, 29, seed=3)
    model = DVAE(DVAEConfig()).eval()
    model.load_state_dict(dvae.state_dict())
    model.to(torch.bfloat16)
    with torch.inference_mode():
        actual = model.decode(codes)
        expected = _oracle_decode(dvae.state_dict(), codes)
    assert actual.dtype == torch.bfloat16 and actual.shape == (2, 100, 58)
    rel_l2 = ((actual.float() - expected).norm() / expected.norm()).item()
    assert rel_l2 < BF16_MAX_REL_L2


def test_meta_build_then_assign_load_then_init_buffers(dvae: DVAE) -> None:
    with torch.device("meta"):
        model = DVAE(DVAEConfig())
    model.load_state_dict(dvae.state_dict(), assign=True)
    model.init_buffers()
    codes = _random_codes(1, 5, seed=4)
    with torch.inference_mode():
        torch.testing.assert_close(model.decode(codes), dvae.decode(codes), atol=0, rtol=0)


def test_state_dict_is_the_official_decode_layout() -> None:
    cfg = DVAEConfig()
    shapes = {name: tuple(t.shape) for name, t in DVAE(cfg).state_dict().items()}
    assert shapes["coef"] == (1, 100, 1)
    assert shapes["decoder.conv_in.0.weight"] == (128, 512, 3)
    assert shapes["decoder.conv_in.2.weight"] == (256, 128, 3)
    assert shapes["decoder.decoder_block.11.dwconv.weight"] == (256, 1, 7)
    assert shapes["decoder.decoder_block.0.pwconv1.weight"] == (1024, 256)
    assert shapes["decoder.decoder_block.0.coef"] == (256,)
    assert shapes["decoder.conv_out.weight"] == (512, 256, 1)
    assert shapes["out_conv.weight"] == (100, 512, 3)
    assert shapes["vq_layer.quantizer.rvqs.1.project_out.weight"] == (512, 4)
    assert shapes["vq_layer.quantizer.rvqs.1.project_out.bias"] == (512,)
    assert "decoder.conv_out.bias" not in shapes and "out_conv.bias" not in shapes
    assert not any(k.endswith(("levels", "digit_basis", "half_widths", "residual_scales")) for k in shapes)
    encoder = encoder_key_shapes(cfg)
    assert not set(encoder) & set(shapes)
    assert encoder["encoder.conv_out.weight"] == (1024, 256, 1)
    assert encoder["downsample_conv.2.weight"] == (512, 512, 4)
    assert encoder["vq_layer.quantizer.rvqs.0.project_in.weight"] == (4, 512)
    # Fact sheet 1.4: the whole DVAE holds 15 031 148 parameters, its decode path about 6 925 796.
    decode_params = sum(math.prod(s) for s in shapes.values())
    assert decode_params == 6_925_796
    assert decode_params + sum(math.prod(s) for s in encoder.values()) == 15_031_148
