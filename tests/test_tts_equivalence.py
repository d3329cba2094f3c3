"""ConditionalChatTTS against transformers' LlamaModel (the TTS backbone oracle) and torch's weight norm.

Tolerances: fp32 hidden atol/rtol 1e-5; bf16 hidden atol 0.05 / rtol 0.02 (post-norm values O(1), bf16 ulp at 1 is
0.0078); attention vs an explicit masked softmax 1e-6 (fp32); folded heads, head logits and the codebook sum are
exact (atol 0) because they run the same kernels as the official code.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaModel

from omnivox.config import TTSConfig
from omnivox.models.chattts import ConditionalChatTTS, fold_weight_norm
from omnivox.models.kv_cache import KVPool
from omnivox.models.layers import SHORT_QUERY_ROWS, attend, short_queries_by_products

SEQ_LEN = 24
PREFILL_LEN = 10
CAPACITY = 32


def tiny_config() -> TTSConfig:
    return TTSConfig(
        llm_dim=32,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_hidden_layers=2,
        num_text_tokens=100,
    )


def build_ours(seed: int = 0) -> ConditionalChatTTS:
    """Seeded random weights, norm weights included."""
    torch.manual_seed(seed)
    ours = ConditionalChatTTS(tiny_config()).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return ours


def build_pair(seed: int = 0) -> tuple[ConditionalChatTTS, LlamaModel]:
    """Ours plus a LlamaModel holding the same backbone weights (its unused embed_tokens left random)."""
    ours = build_ours(seed)
    cfg = ours.cfg
    oracle_cfg = LlamaConfig(
        vocab_size=256,  # the real 32000 only sizes the unused embed_tokens; inputs_embeds are fed instead
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        rms_norm_eps=cfg.rms_norm_eps,
        attn_implementation="sdpa",
    )
    theirs = LlamaModel(oracle_cfg).eval()
    missing, unexpected = theirs.load_state_dict(ours.model.state_dict(), strict=False)
    assert unexpected == [] and missing == ["embed_tokens.weight"], (missing, unexpected)
    return ours, theirs


def streaming_like_mask() -> torch.Tensor:
    """bool [1, 1, T, T]: causal, key 7 never visible from query 7 on (like [Ptts]), keys 3..5 hidden from queries
    10..15 (text not yet released); key 0 stays visible so no row is empty."""
    rows, keys = torch.arange(SEQ_LEN)[:, None], torch.arange(SEQ_LEN)[None, :]
    mask = keys <= rows
    mask &= ~((keys == 7) & (rows >= 7))
    mask &= ~((keys >= 3) & (keys <= 5) & (rows >= 10) & (rows <= 15))
    return mask[None, None]


def additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The official form of a mask: 0 where visible, finfo.min elsewhere."""
    return torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)


def at_capacity(mask: torch.Tensor) -> torch.Tensor:
    return F.pad(mask, (0, CAPACITY - mask.shape[-1]), value=False)


def random_embeds(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(1, SEQ_LEN, 64, generator=torch.Generator().manual_seed(1)).to(dtype)


def test_state_dict_names_are_official_keys_minus_prefix():
    names = set(ConditionalChatTTS(tiny_config()).state_dict())
    expected = {"projector.linear1.weight", "projector.linear2.bias", "emb_text.weight", "emb_code.3.weight"}
    expected |= {
        "head_code.0.weight",
        "head_code.3.weight",
        "model.layers.1.self_attn.q_proj.weight",
        "model.norm.weight",
    }
    assert expected <= names, expected - names
    assert "model.embed_tokens.weight" not in names and "model.layers.0.self_attn.q_proj.bias" not in names
    assert not any("parametrizations" in n or "rope" in n for n in names)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_backbone_custom_mask_matches_llama(dtype):
    ours, theirs = build_pair()
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    embeds, mask = random_embeds(dtype), streaming_like_mask()
    hidden = ours(embeds, torch.arange(SEQ_LEN), None, mask)
    expected = theirs(inputs_embeds=embeds, attention_mask=additive(mask, dtype), use_cache=False).last_hidden_state
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.05, "rtol": 0.02}
    torch.testing.assert_close(hidden, expected, **tol, msg=lambda m: f"{dtype} hidden, {tol}: {m}")


@pytest.mark.parametrize("cache_kind", ["full", "window"])
@torch.no_grad()
def test_incremental_with_cache_matches_whole_sequence(cache_kind):
    """Prefill then one query at a time with the mask built at capacity equals the oracle's whole-sequence rows."""
    ours, theirs = build_pair()
    cfg = ours.cfg
    embeds, mask = random_embeds(), at_capacity(streaming_like_mask())
    args = (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim)
    width = CAPACITY if cache_kind == "full" else SEQ_LEN  # the keys attention reads: all, or a narrower window
    cache = KVPool(*args, capacity=CAPACITY, dtype=torch.float32, device="cpu", slots=2).view(1, 1, width)
    chunks = [(0, PREFILL_LEN)] + [(t, t + 1) for t in range(PREFILL_LEN, SEQ_LEN)]
    hidden = torch.cat([ours(embeds[:, a:b], torch.arange(a, b), cache, mask[:, :, a:b]) for a, b in chunks], dim=1)
    expected = theirs(
        inputs_embeds=embeds, attention_mask=additive(streaming_like_mask(), torch.float32)
    ).last_hidden_state
    torch.testing.assert_close(hidden, expected, atol=1e-5, rtol=1e-5, msg=lambda m: f"fp32 hidden, 1e-5: {m}")


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("mask_batch", [1, 2, None])
def test_attend_matches_explicit_masked_softmax(kv_heads, mask_batch):
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 4, 8, generator=gen)
    k, v = torch.randn(2, kv_heads, 9, 8, generator=gen), torch.randn(2, kv_heads, 9, 8, generator=gen)
    mask = None
    if mask_batch is not None:
        mask = torch.rand(mask_batch, 1, 4, 9, generator=gen) > 0.4
        mask[..., 0] = True
    k_rep, v_rep = (t.repeat_interleave(4 // kv_heads, dim=1) for t in (k, v))  # [2, 4, 9, 8]
    scores = q @ k_rep.transpose(-1, -2) * 8**-0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    expected = scores.softmax(-1) @ v_rep
    torch.testing.assert_close(attend(q, k, v, mask, 8**-0.5), expected, atol=1e-6, rtol=1e-6)
    assert 4 * (4 // kv_heads) <= SHORT_QUERY_ROWS  # 4 query rows x up to 4 groups: the products run below
    with short_queries_by_products():
        torch.testing.assert_close(attend(q, k, v, mask, 8**-0.5), expected, atol=1e-6, rtol=1e-6)
        compiled = attend(q, k, v, mask, 8**-0.5, compiled=True)  # scale, mask and softmax as one compiled kernel
        torch.testing.assert_close(compiled, expected, atol=1e-6, rtol=1e-6)


def test_products_take_decode_shapes_only(monkeypatch):
    """Inside `short_queries_by_products` a step's few query rows skip SDPA; a long prefill still uses it."""
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append(a[0].shape[2]) or real(*a, **kw))
    k = v = torch.randn(1, 1, 20, 8)
    with short_queries_by_products():
        attend(torch.randn(1, 4, 1, 8), k, v, None, 1.0)  # 4 rows per kv head: products
        attend(torch.randn(1, 4, 17, 8), k, v, None, 1.0)  # 68 rows: SDPA
    attend(torch.randn(1, 4, 1, 8), k, v, None, 1.0)  # outside the block: SDPA
    assert calls == [68, 4]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_folded_heads_equal_weight_norm(dtype):
    ours = build_ours()
    ours = ours.to(dtype)
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 3, 64, generator=gen).to(dtype)
    expected = []
    for head in ours.head_code:
        g, v = (torch.rand(626, 1, generator=gen) + 0.5).to(dtype), torch.randn(626, 64, generator=gen).to(dtype)
        reference = torch.nn.utils.parametrizations.weight_norm(nn.Linear(64, 626, bias=False).to(dtype))
        reference.parametrizations.weight.original0.copy_(g)
        reference.parametrizations.weight.original1.copy_(v)
        folded = fold_weight_norm(g, v)
        assert folded.dtype == dtype and torch.equal(folded, reference.weight), f"{dtype} folded weight, atol 0"
        head.weight.copy_(folded)
        expected.append(reference(hidden).float())  # official: each head in model dtype into an fp32 buffer
    logits = ours.compute_logits(hidden)
    assert logits.shape == (2, 3, 4, 626) and logits.dtype == torch.float32
    assert torch.equal(logits, torch.stack(expected, dim=2)), f"{dtype} head logits, atol 0"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_project_speaker_is_unit_norm_mlp(dtype):
    ours = build_ours()
    ours = ours.to(dtype)
    h = torch.randn(2, 32, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)  # LLM state, bf16
    projector = ours.projector
    manual = projector.linear2(torch.relu(projector.linear1(h.to(dtype))))
    expected = manual / manual.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    spk = ours.project_speaker(h)
    assert spk.shape == (2, 64) and spk.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # bf16: one ulp near 0.1..1
    torch.testing.assert_close(spk, expected, atol=tol, rtol=tol, msg=lambda m: f"{dtype} speaker, {tol}: {m}")
    torch.testing.assert_close(spk.float().norm(dim=-1), torch.ones(2), atol=tol * 10, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_embed_codes_sums_codebooks_like_official(dtype):
    ours = build_ours()
    ours = ours.to(dtype)
    codes = torch.randint(0, 626, (2, 5, 4), generator=torch.Generator().manual_seed(5))
    per_codebook = [ours.emb_code[q](codes[:, :, q]) for q in range(4)]
    official = torch.stack(per_codebook, 3).sum(3)
    assert torch.equal(ours.embed_codes(codes), official), f"{dtype} code embedding sum, atol 0"
    if dtype == torch.float32:
        torch.testing.assert_close(official, sum(per_codebook), atol=1e-6, rtol=1e-6)
    text_ids = codes[:, :, 0] % ours.cfg.num_text_tokens
    assert torch.equal(ours.embed_text(text_ids), ours.emb_text(text_ids))
