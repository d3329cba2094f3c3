"""The LLM sampler's fused top-k/top-p filter against the two separate filters and against transformers' warpers.

`top_k_top_p_filter` finds the top-p cutoff among the k largest logits instead of sorting the whole vocabulary;
on logits without ties it must mask exactly the tokens that `top_p_filter(top_k_filter(x, k), p)` masks (and that
transformers' TopKLogitsWarper -> TopPLogitsWarper mask), so `sample_llm_token` draws the same tokens from the
same generator state. Ties are avoided by construction: rows whose k+1 largest logits are not all distinct are
dropped (ties at the cutoff are kept by value in the fused filter, by sort position in the old one).
"""

from __future__ import annotations

import itertools
import time

import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from omnivox.engine.sampling import (
    apply_repetition_penalty,
    draw,
    sample_llm_token,
    top_k_filter,
    top_k_top_p_filter,
    top_p_filter,
)

KS = (1, 2, 20, 100)
PS = (0.0, 1e-6, 0.05, 0.5, 0.8, 0.95, 1 - 1e-6, 1.0)
SCALES = (0.3, 2.0, 8.0, 40.0)  # from nearly flat to so peaked that most exps underflow


def untied_logits(gen: torch.Generator, rows: int, vocab: int, scale: float, k: int) -> torch.Tensor:
    """[rows, vocab] random float32 logits, drawn until there are `rows` whose k+1 largest values are all distinct."""
    kept: list[torch.Tensor] = []
    for _ in range(20):
        x = torch.randn(rows, vocab, generator=gen) * scale
        top = torch.topk(x, min(k + 1, vocab), dim=-1).values
        kept += list(x[(top[:, 1:] != top[:, :-1]).all(dim=-1)])
        if len(kept) >= rows:
            return torch.stack(kept[:rows])
    raise AssertionError("could not draw logits without ties")


def old_filter(x: torch.Tensor, k: int, p: float, min_keep: int = 1) -> torch.Tensor:
    return top_p_filter(top_k_filter(x, k, min_keep), p, min_keep)


def hf_filter(x: torch.Tensor, k: int, p: float, min_keep: int = 1) -> torch.Tensor:
    ids = torch.zeros(x.shape[0], 1, dtype=torch.long)
    x = TopKLogitsWarper(k, min_tokens_to_keep=min_keep)(ids, x.clone())
    return TopPLogitsWarper(p, min_tokens_to_keep=min_keep)(ids, x)


def cases(vocab: int):
    """(k, p, scale), including k >= vocab (clamped)."""
    ks = sorted({k for k in KS if k <= vocab} | {max(vocab - 1, 1), vocab, vocab + 50})
    return itertools.product(ks, PS, SCALES)


@pytest.mark.parametrize("min_keep", [1, 3])
@pytest.mark.parametrize("vocab", [1, 3, 7, 626, 4096])
def test_fused_filter_matches_old_filters_and_transformers(vocab, min_keep):
    gen = torch.Generator().manual_seed(vocab)
    checked = 0
    for k, p, scale in cases(vocab):
        x = untied_logits(gen, 24, vocab, scale, max(k, min_keep))
        fused = top_k_top_p_filter(x, k, p, min_keep)
        finite = torch.isfinite(fused)
        assert torch.equal(finite, torch.isfinite(old_filter(x, k, p, min_keep))), (k, p, scale)
        assert torch.equal(finite, torch.isfinite(hf_filter(x, k, p, min_keep))), (k, p, scale)
        assert torch.equal(fused[finite], x[finite]), "kept logits pass through unchanged"
        kept = finite.sum(-1)
        assert (kept >= min(min_keep, vocab)).all() and (kept <= min(max(k, min_keep), vocab)).all()
        checked += x.shape[0]
    assert checked == 24 * len(list(cases(vocab)))


def test_fused_filter_full_vocabulary():
    """The LLM's real vocabulary size, a few rows each (the old filter sorts 151,700 values per row)."""
    vocab, gen = 151700, torch.Generator().manual_seed(1)
    for k, p, scale in itertools.product((1, 100, 1000), (1e-6, 0.8, 0.999, 1.0), (1.0, 5.0, 30.0)):
        x = untied_logits(gen, 4, vocab, scale, k)
        finite = torch.isfinite(top_k_top_p_filter(x, k, p))
        assert torch.equal(finite, torch.isfinite(old_filter(x, k, p))), (k, p, scale)
        assert torch.equal(finite, torch.isfinite(hf_filter(x, k, p))), (k, p, scale)


def test_fused_filter_one_row_and_batch_agree():
    gen = torch.Generator().manual_seed(2)
    x = untied_logits(gen, 8, 1000, 3.0, 100)
    batch = top_k_top_p_filter(x, 100, 0.8)
    for r in range(x.shape[0]):
        assert torch.equal(top_k_top_p_filter(x[r : r + 1], 100, 0.8), batch[r : r + 1])
        assert torch.equal(top_k_top_p_filter(x[r], 100, 0.8), batch[r]), "a bare [V] vector works too"


def test_fused_filter_keeps_ties_by_value():
    """Ties at the cutoff are all kept (the old top-p keeps or drops them by sort position)."""
    x = torch.tensor([[5.0, 5.0, 5.0, 0.0, -1.0]])
    out = top_k_top_p_filter(x, k=2, p=0.1)  # top-2 values are 5, 5; the cutoff is 5; all three 5s stay
    assert torch.isfinite(out).tolist() == [[True, True, True, False, False]]


def old_sample_llm_token(logits, window_ids, *, temperature, top_k, top_p, repetition_penalty, generator):
    logits = logits.float().unsqueeze(0)
    if repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, window_ids.unsqueeze(0), repetition_penalty)
    logits = logits / temperature
    logits = old_filter(logits, top_k, top_p)
    return draw(logits.softmax(dim=-1), generator)


@pytest.mark.parametrize("vocab", [626, 151700])
def test_sample_llm_token_draws_like_old_filters(vocab):
    gen = torch.Generator().manual_seed(vocab)
    seeds = 200 if vocab < 10_000 else 40
    not_argmax = 0
    for seed in range(seeds):
        temperature, top_k, top_p, penalty = [(0.7, 100, 0.8, 1.05), (1.0, 20, 0.95, 1.0), (0.3, 1000, 0.5, 1.3)][
            seed % 3
        ]
        logits = untied_logits(gen, 4, vocab, 2.0, min(vocab, 1000))[0]
        window = torch.randint(0, vocab, (32,), generator=gen)
        args = dict(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty)
        g_new, g_old = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        new = sample_llm_token(logits, window, **args, greedy=False, generator=g_new)
        old = old_sample_llm_token(logits, window, **args, generator=g_old)
        assert torch.equal(new, old), seed
        assert torch.equal(g_new.get_state(), g_old.get_state()), "the draw consumes the same random numbers"
        not_argmax += int(new) != int(logits.argmax())
    assert not_argmax > seeds // 10, "the draws are not all the argmax"


def test_fused_filter_has_no_host_sync():
    """Dynamo with fullgraph=True refuses graph breaks (`.item()`, branching on tensor values), i.e. anything
    that would read back to the host and so could not be captured in a CUDA graph."""
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile unavailable")
    gen = torch.Generator().manual_seed(3)
    x = untied_logits(gen, 3, 2000, 3.0, 100)
    start = time.monotonic()
    compiled = torch.compile(top_k_top_p_filter, fullgraph=True, backend="aot_eager")
    for row in (x, x[:1], x[0]):
        assert torch.equal(compiled(row, 100, 0.8), top_k_top_p_filter(row, 100, 0.8))
    assert time.monotonic() - start < 60
