"""Fused projections (omnivox/models/layers.py, `DecoderStack.fuse_projections`): q/k/v and gate/up as one product
each give the separate products' outputs, keep the checkpoint's keys, values and memory, and are what an engine runs."""

from __future__ import annotations

import copy

import pytest
import torch

from omnivox.config import tiny_config
from omnivox.engine.engine import Engine, EngineConfig
from omnivox.models.layers import DecoderStack
from omnivox.models.loader import build_dummy_model

SHAPES = {  # qkv_bias, num_heads, num_kv_heads
    "qwen2-gqa-bias": (True, 8, 2),
    "llama": (False, 8, 8),
    "llama-gqa": (False, 8, 4),
}


def make_stack(qkv_bias: bool, num_heads: int, num_kv_heads: int, seed: int = 0) -> DecoderStack:
    stack = DecoderStack(hidden_size=128, intermediate_size=352, num_layers=3, num_heads=num_heads,
                         num_kv_heads=num_kv_heads, rope_theta=10000.0, rms_norm_eps=1e-6, max_positions=64,
                         qkv_bias=qkv_bias).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in stack.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05 + (1.0 if param.dim() == 1 else 0.0))
    return stack


def layers_fused(stack: DecoderStack) -> bool:
    return all(layer.self_attn.qkv_weight is not None and layer.mlp.gate_up_weight is not None
               for layer in stack.layers)


def storages(module: torch.nn.Module) -> dict[int, int]:
    return {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in module.parameters()}


@pytest.mark.parametrize("shape", SHAPES)
def test_fused_layers_give_the_separate_products_outputs(shape):
    separate = make_stack(*SHAPES[shape])
    fused = copy.deepcopy(separate)
    fused.fuse_projections()
    assert layers_fused(fused) and not layers_fused(separate)
    with torch.no_grad():
        for batch, length in ((1, 1), (4, 1), (2, 9)):
            x = torch.randn(batch, length, 128)
            per_row = torch.arange(batch * length).view(batch, length) % 50  # [B, T] positions too
            for positions in (torch.arange(3, 3 + length), per_row):
                ours, theirs = fused(x, positions, None), separate(x, positions, None)
                torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_fused_layers_compile_without_graph_breaks():
    """`compiled_halves` uses fullgraph=True: a graph break in the fused forward would raise here."""
    stack = make_stack(*SHAPES["qwen2-gqa-bias"])
    stack.fuse_projections()
    with torch.no_grad():
        for batch, length in ((2, 1), (3, 5)):
            x, positions = torch.randn(batch, length, 128), torch.arange(length)
            compiled, eager = stack(x, positions, None, compiled=True), stack(x, positions, None)
            torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_fusing_keeps_the_state_dict_and_the_parameter_memory(shape):
    stack = make_stack(*SHAPES[shape])
    before = {key: value.clone() for key, value in stack.state_dict().items()}
    bytes_before = sum(storages(stack).values())
    stack.fuse_projections()
    after = stack.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert after[key].shape == value.shape and torch.equal(after[key], value), key
    assert sum(storages(stack).values()) == bytes_before, "fusing added parameter memory"
    for layer in stack.layers:
        attn, mlp = layer.self_attn, layer.mlp
        shared = [(attn.qkv_weight, [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),
                  (mlp.gate_up_weight, [mlp.gate_proj.weight, mlp.up_proj.weight])]
        if attn.qkv_bias is not None:
            shared.append((attn.qkv_bias, [attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]))
        for fused, params in shared:
            assert all(p.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr() for p in params)
            assert torch.equal(torch.cat(params), fused)


def test_loading_after_fusing_reaches_the_fused_tensors():
    """Loading copies into the parameters in place, i.e. into the fused tensors; fusing again changes nothing."""
    fused, other = make_stack(*SHAPES["qwen2-gqa-bias"]), make_stack(*SHAPES["qwen2-gqa-bias"], seed=1)
    fused.fuse_projections()
    qkv = fused.layers[0].self_attn.qkv_weight
    fused.load_state_dict(other.state_dict())
    fused.fuse_projections()
    assert fused.layers[0].self_attn.qkv_weight is qkv
    x, positions = torch.randn(2, 4, 128), torch.arange(4)
    with torch.no_grad():
        torch.testing.assert_close(fused(x, positions, None), other(x, positions, None), rtol=0, atol=1e-5)


def test_a_conversion_undoes_the_fusing():
    """`.to()` may give the projections new storage: a stale fused tensor would be read instead of them."""
    stack = make_stack(*SHAPES["llama-gqa"])
    stack.fuse_projections()
    stack.to(torch.float64)
    assert not any(layer.self_attn.qkv_weight is not None or layer.mlp.gate_up_weight is not None
                   for layer in stack.layers)


def test_an_engine_runs_fused_layers():
    engine = Engine.from_pretrained(dummy_weights=True, dummy_size="tiny", dtype="fp32")
    assert layers_fused(engine.model.llm.model) and layers_fused(engine.model.tts.model)
    qkv = engine.model.llm.model.layers[0].self_attn.qkv_weight
    reference = engine.with_config(path="reference")  # a second engine over the same weights: fused once
    assert reference.model.llm.model.layers[0].self_attn.qkv_weight is qkv


def test_an_engine_over_a_built_model_fuses_it():
    model = build_dummy_model(tiny_config(), device="cpu", dtype=torch.float32, seed=0)
    keys = list(model.llm.state_dict()) + list(model.tts.state_dict())
    Engine(model, EngineConfig(path="reference"))
    assert layers_fused(model.llm.model) and layers_fused(model.tts.model)
    assert list(model.llm.state_dict()) + list(model.tts.state_dict()) == keys
