"""Qwen2LM against transformers' Qwen2ForCausalLM (the test oracle) with identical random weights.

Tolerances: fp32 logits atol/rtol 1e-5 (same ops, different SDPA packing: observed <= 6e-7). bf16 logits
atol 0.03 / rtol 0.02 for |logit| ~ 2 (observed one bf16 ulp, 0.0078; the bound allows a few ulps).
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

from omnivox.config import LLMConfig
from omnivox.models.kv_cache import KVPool, KVRows, KVView
from omnivox.models.layers import rotary_tables
from omnivox.models.qwen2 import Qwen2LM

CAPACITY = 64
PROMPT_LEN = 12
DECODE_STEPS = 32


def tiny_config(tie: bool = False) -> LLMConfig:
    return LLMConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=512,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
    )


def oracle_config(cfg: LLMConfig, attn: str) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        attn_implementation=attn,
    )


def build_pair(cfg: LLMConfig, attn: str = "sdpa", seed: int = 0) -> tuple[Qwen2LM, Qwen2ForCausalLM]:
    """Seeded random weights in ours (norm weights and biases too), copied by name into the oracle."""
    torch.manual_seed(seed)
    ours = Qwen2LM(cfg).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1)
    theirs = Qwen2ForCausalLM(oracle_config(cfg, attn)).eval()
    missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=False)
    assert unexpected == [], f"keys only in ours: {unexpected}"
    assert missing == (["lm_head.weight"] if cfg.tie_word_embeddings else []), f"keys only in theirs: {missing}"
    if cfg.tie_word_embeddings:
        assert theirs.lm_head.weight.data_ptr() == theirs.model.embed_tokens.weight.data_ptr()
    return ours, theirs


def causal_rows(positions: torch.Tensor, capacity: int) -> torch.Tensor:
    """bool [1, 1, T, capacity]: query at position p sees keys 0..p (what the engine builds at capacity)."""
    keys = torch.arange(capacity)
    return (keys[None, :] <= positions[:, None])[None, None]


def make_cache(kind: str, cfg: LLMConfig, dtype: torch.dtype, batch: int = 1) -> KVView | KVRows:
    """"pool": rows 0..batch-1 of a pool; "rows": the same rows seen from the middle of a larger pool; "indexed":
    rows picked by index (KVRows), out of order."""
    args = (cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)
    if kind == "pool":
        return KVPool(*args, capacity=CAPACITY, dtype=dtype, device="cpu", slots=batch).view(0, batch)
    if kind == "rows":
        return KVPool(*args, capacity=CAPACITY, dtype=dtype, device="cpu", slots=batch + 3).view(2, batch)
    pool = KVPool(*args, capacity=CAPACITY, dtype=dtype, device="cpu", slots=2 * batch + 3)
    return KVRows(pool, torch.arange(2 * batch + 1, batch, -2), CAPACITY)


def prompt_ids(batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 512, (batch, PROMPT_LEN), generator=torch.Generator().manual_seed(seed))


def greedy_ours(model: Qwen2LM, prompt: torch.Tensor, cache, steps: int):
    """Prefill + `steps` greedy decode steps; returns (prompt logits, tokens [B, steps], last logits)."""
    positions = torch.arange(prompt.shape[1])
    prompt_logits = model.compute_logits(model(prompt, positions, cache, causal_rows(positions, CAPACITY)))
    last, tokens = prompt_logits[:, -1], []
    for step in range(steps):
        token = last.argmax(-1, keepdim=True)  # [B, 1]
        tokens.append(token)
        pos = torch.tensor([prompt.shape[1] + step])
        last = model.compute_logits(model(token, pos, cache, causal_rows(pos, CAPACITY)))[:, -1]
    return prompt_logits, torch.cat(tokens, dim=1), last


def greedy_theirs(model: Qwen2ForCausalLM, prompt: torch.Tensor, steps: int):
    cache = DynamicCache(config=model.config)
    prompt_logits = model(input_ids=prompt, cache=cache, use_cache=True).logits.float()
    last, tokens = prompt_logits[:, -1], []
    for _ in range(steps):
        token = last.argmax(-1, keepdim=True)
        tokens.append(token)
        last = model(input_ids=token, cache=cache, use_cache=True).logits[:, -1].float()
    return prompt_logits, torch.cat(tokens, dim=1), last


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_tables_bit_identical_to_transformers(dtype):
    cfg = tiny_config()
    theirs = Qwen2ForCausalLM(oracle_config(cfg, "sdpa"))
    cos, sin = rotary_tables(cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings)
    positions = torch.tensor([0, 1, 5, 77, 200, 255])
    their_cos, their_sin = theirs.model.rotary_emb(torch.zeros(1, dtype=dtype), positions[None])
    assert torch.equal(cos[positions].to(dtype), their_cos[0]), "rotary cos must be bit-identical (atol 0)"
    assert torch.equal(sin[positions].to(dtype), their_sin[0]), "rotary sin must be bit-identical (atol 0)"


def test_rotary_buffers_rebuild_after_meta_build():
    """A loader that builds on `meta` gets the same fp32 tables back from `reset_rotary` once weights are real."""
    cfg = tiny_config()
    with torch.device("meta"):
        model = Qwen2LM(cfg)
    model = model.to_empty(device="cpu")
    model.model.reset_rotary()
    cos, sin = rotary_tables(cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings)
    assert model.model.rope_cos.dtype == torch.float32
    assert torch.equal(model.model.rope_cos, cos) and torch.equal(model.model.rope_sin, sin)


def test_state_dict_names_are_official_keys_minus_prefix():
    names = set(Qwen2LM(tiny_config()).state_dict())
    assert "model.layers.1.self_attn.q_proj.bias" in names and "model.layers.1.self_attn.o_proj.weight" in names
    assert "model.layers.0.mlp.down_proj.weight" in names and "model.norm.weight" in names
    assert "lm_head.weight" in names and "model.layers.0.self_attn.o_proj.bias" not in names
    assert "lm_head.weight" not in set(Qwen2LM(tiny_config(tie=True)).state_dict())
    assert not any("rope" in n for n in names), "rotary tables must not be checkpoint keys"


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@torch.no_grad()
def test_prompt_logits_fp32_batch2(attn):
    ours, theirs = build_pair(tiny_config(), attn)
    prompt = prompt_ids(batch=2)
    positions = torch.arange(PROMPT_LEN)
    hidden = ours(prompt, positions, None, causal_rows(positions, PROMPT_LEN))
    torch.testing.assert_close(
        ours.compute_logits(hidden),
        theirs(input_ids=prompt).logits.float(),
        atol=1e-5,
        rtol=1e-5,
        msg=lambda m: f"fp32 prompt logits (atol/rtol 1e-5): {m}",
    )
    by_embeds = ours(None, positions, None, causal_rows(positions, PROMPT_LEN), embeds=ours.embed(prompt))
    assert torch.equal(by_embeds, hidden), "embeds= must give exactly the ids path"


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("cache_kind", ["pool", "rows", "indexed"])
@torch.no_grad()
def test_greedy_decode_fp32_matches_transformers(cache_kind, tie):
    cfg = tiny_config(tie)
    ours, theirs = build_pair(cfg)
    prompt = prompt_ids()
    cache = make_cache(cache_kind, cfg, torch.float32)
    ours_prompt, ours_tokens, ours_last = greedy_ours(ours, prompt, cache, DECODE_STEPS)
    their_prompt, their_tokens, their_last = greedy_theirs(theirs, prompt, DECODE_STEPS)
    tol = {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(ours_prompt, their_prompt, **tol, msg=lambda m: f"fp32 prompt logits, 1e-5: {m}")
    assert torch.equal(ours_tokens, their_tokens), f"32 greedy tokens differ:\n{ours_tokens}\n{their_tokens}"
    torch.testing.assert_close(ours_last, their_last, **tol, msg=lambda m: f"fp32 logits after 32 steps, 1e-5: {m}")


@pytest.mark.parametrize("cache_kind", ["pool", "rows", "indexed"])
@torch.no_grad()
def test_bf16_teacher_forced_decode_close_to_transformers(cache_kind):
    """bf16 argmax can flip on near ties, so both sides are fed the oracle's fp32 greedy tokens instead."""
    cfg = tiny_config()
    ours, theirs = build_pair(cfg)
    prompt = prompt_ids()
    _, tokens, _ = greedy_theirs(theirs, prompt, 8)
    ours, theirs = ours.to(torch.bfloat16), theirs.to(torch.bfloat16)
    sequence = torch.cat([prompt, tokens], dim=1)
    cache, their_cache = make_cache(cache_kind, cfg, torch.bfloat16), DynamicCache(config=theirs.config)
    tol = {"atol": 0.03, "rtol": 0.02}
    for start, end in [(0, PROMPT_LEN)] + [(t, t + 1) for t in range(PROMPT_LEN, sequence.shape[1])]:
        positions = torch.arange(start, end)
        hidden = ours(sequence[:, start:end], positions, cache, causal_rows(positions, CAPACITY))
        assert hidden.dtype == torch.bfloat16
        logits = ours.compute_logits(hidden)
        assert logits.dtype == torch.float32
        their_logits = theirs(input_ids=sequence[:, start:end], cache=their_cache, use_cache=True).logits.float()
        torch.testing.assert_close(
            logits, their_logits, **tol, msg=lambda m, s=start: f"bf16 logits at {s} (atol 0.03, rtol 0.02): {m}"
        )
