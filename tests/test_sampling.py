"""Per-row sampling with counter-based random numbers, and the attention masks every path builds.

Random numbers are a hash of (seed, step counter, candidate index), so a row's draw must not depend on the rows
around it; many different counters stand in for many independent draws when checking what can be drawn and how
often. Everything here is deterministic (no generator state), so the frequency checks cannot flake.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from omnivox.engine.masks import FIRST_AUDIO_SLOT, causal_mask, tts_audio_mask
from omnivox.engine.sampling import (
    TTS_MIN_KEEP,
    apply_repetition_penalty,
    counter_uniform,
    sample_llm,
    sample_tts,
)

DRAWS = 4000  # counters used as independent draws


def longs(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


def llm_params(batch: int, *, temperature=1.0, top_k=256, top_p=1.0, penalty=1.0, greedy=False, seed=1,
               counters: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One row's parameters repeated over `batch` rows (each row a different counter unless given)."""
    return dict(
        temperature=torch.full((batch,), temperature),
        top_k=torch.full((batch,), top_k, dtype=torch.long),
        top_p=torch.full((batch,), top_p),
        repetition_penalty=torch.full((batch,), penalty),
        greedy=torch.full((batch,), greedy),
        seeds=torch.full((batch,), seed, dtype=torch.long),
        counters=torch.arange(batch) if counters is None else counters,
    )


def draws_llm(logits: torch.Tensor, **params) -> torch.Tensor:
    """DRAWS draws from one row of logits [V] (one counter each); no repetition window effect (penalty 1)."""
    rows = logits[None].expand(DRAWS, -1).contiguous()
    window = torch.zeros(DRAWS, 4, dtype=torch.long)
    return sample_llm(rows, window, **llm_params(DRAWS, **params))


def tts_params(batch: int, num_vq: int, *, temperature=1.0, top_p=1.0, top_k=1000, first=False, ban=False,
               force=False, greedy=False, seed=5, counters: torch.Tensor | None = None) -> dict:
    temps = torch.as_tensor(temperature, dtype=torch.float32).expand(num_vq)
    return dict(
        temperature=temps[None].expand(batch, -1).contiguous(),
        top_p=torch.full((batch,), top_p),
        top_k=torch.full((batch,), top_k, dtype=torch.long),
        first_audio_step=torch.full((batch,), first),
        ban_eos=torch.full((batch,), ban),
        force_eos=torch.full((batch,), force),
        greedy=torch.full((batch,), greedy),
        seeds=torch.full((batch,), seed, dtype=torch.long),
        counters=torch.arange(batch) if counters is None else counters,
    )


def expected_llm_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """The official order, written out plainly: temperature -> top-k -> top-p (keep while the mass ranked above
    is below p) -> renormalise."""
    x = (logits.double() / temperature).numpy()
    order = np.argsort(-x)
    keep = np.zeros(len(x), bool)
    keep[order[:top_k]] = True
    p = np.exp(x - x.max()) * keep
    p /= p.sum()
    above = np.cumsum(p[order]) - p[order]
    keep[order[above >= top_p]] = False
    q = np.exp(x - x.max()) * keep
    return q / q.sum()


def frequencies(tokens: torch.Tensor, size: int) -> np.ndarray:
    return np.bincount(tokens.numpy().ravel(), minlength=size) / tokens.numel()


# ---- counter_uniform --------------------------------------------------------------------------------------------
def test_counter_uniform_range_and_determinism():
    seeds, counters = longs(0, 1, 2**40 + 7, 2**62 - 1), longs(0, 5, 10**9, 3)
    index = torch.arange(50_000).expand(4, -1)
    u = counter_uniform(seeds, counters, index)
    assert u.dtype == torch.float32 and u.shape == index.shape
    assert float(u.min()) > 0.0 and float(u.max()) < 1.0
    assert torch.equal(u, counter_uniform(seeds, counters, index))
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.01


def test_counter_uniform_differs_by_seed_counter_and_index():
    index = torch.arange(1000)[None]
    base = counter_uniform(longs(3), longs(9), index)[0]
    for other in (counter_uniform(longs(4), longs(9), index)[0],  # seed
                  counter_uniform(longs(3 + 2**32), longs(9), index)[0],  # high bits of the seed
                  counter_uniform(longs(3), longs(10), index)[0]):  # counter
        assert (other == base).float().mean() < 0.01
    assert len(set(base.tolist())) > 990, "neighbouring indices must give different numbers"


def test_counter_uniform_row_does_not_depend_on_batch_mates():
    index = torch.arange(300).expand(3, -1)
    batch = counter_uniform(longs(11, 22, 33), longs(0, 7, 1), index)
    for row, (seed, counter) in enumerate(((11, 0), (22, 7), (33, 1))):
        alone = counter_uniform(longs(seed), longs(counter), index[:1])
        assert torch.equal(batch[row], alone[0])


# ---- sample_llm -------------------------------------------------------------------------------------------------
def test_llm_greedy_takes_the_argmax_of_raw_logits():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 500, generator=gen) * 3
    window = logits.argmax(dim=-1, keepdim=True).expand(-1, 4).contiguous()  # a penalty would move the argmax
    params = llm_params(6, temperature=0.2, top_k=3, top_p=0.1, penalty=50.0, greedy=True)
    assert torch.equal(sample_llm(logits, window, **params), logits.argmax(dim=-1))


def test_llm_top_k_and_top_p_per_row():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(40, generator=gen) * 1.5
    order = torch.argsort(logits, descending=True)
    for top_k in (1, 2, 7):
        drawn = set(draws_llm(logits, top_k=top_k).tolist())
        assert drawn == set(order[:top_k].tolist()), f"top_k {top_k}: every kept token and nothing else"
    for top_p in (0.05, 0.5, 0.9):
        allowed = set(np.flatnonzero(expected_llm_probs(logits, 1.0, 256, top_p)).tolist())
        assert set(draws_llm(logits, top_p=top_p).tolist()) == allowed
    # rows with other limits in one batch (each limit on many rows, one counter each): each keeps to its own
    limits = [(1, 1.0), (3, 1.0), (40, 0.3), (5, 0.6), (40, 1.0), (2, 0.01)]
    per_limit = 500
    params = llm_params(len(limits) * per_limit)
    params["top_k"] = longs(*(k for k, _ in limits)).repeat_interleave(per_limit)
    params["top_p"] = torch.tensor([p for _, p in limits]).repeat_interleave(per_limit)
    rows = logits[None].expand(len(limits) * per_limit, -1).contiguous()
    tokens = sample_llm(rows, torch.zeros(len(rows), 2, dtype=torch.long), **params).view(len(limits), per_limit)
    seen = [set(t.tolist()) for t in tokens]
    for row, (k, p) in enumerate(limits):
        assert seen[row] <= set(np.flatnonzero(expected_llm_probs(logits, 1.0, k, p)).tolist())
    assert len(seen[4]) > 10, "an unlimited row draws widely"


def test_repetition_penalty_follows_the_hugging_face_rule():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 50, generator=gen) * 2
    window = torch.tensor([[0, 1, 2, 2], [5, 6, 7, 8], [9, 9, 9, 9]])
    penalty = torch.tensor([1.3, 1.0, 2.0])
    ours = apply_repetition_penalty(logits, window, penalty)
    for row in range(3):
        theirs = RepetitionPenaltyLogitsProcessor(float(penalty[row]))(window[row : row + 1], logits[row : row + 1])
        torch.testing.assert_close(ours[row], theirs[0], rtol=0, atol=0)
    # and sample_llm applies it before choosing: with top_k 1 the penalised favourite loses its place
    favourite = int(logits[0].argmax())
    second = int(torch.topk(logits[0], 2).indices[1])
    scores = logits[:1].clone()
    scores[0, favourite] = scores[0, second] + 0.1
    window = torch.full((1, 4), favourite)
    assert int(sample_llm(scores, window, **llm_params(1, top_k=1, penalty=1.0))[0]) == favourite
    assert int(sample_llm(scores, window, **llm_params(1, top_k=1, penalty=1.5))[0]) == second


def test_llm_draw_is_the_same_alone_and_in_a_batch():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 300, generator=gen) * 2
    window = torch.randint(0, 300, (5, 6), generator=gen)
    params = dict(
        temperature=torch.tensor([0.7, 1.0, 1.3, 0.5, 0.9]),
        top_k=longs(100, 5, 256, 20, 1),
        top_p=torch.tensor([0.8, 1.0, 0.95, 0.5, 1.0]),
        repetition_penalty=torch.tensor([1.05, 1.0, 1.5, 1.2, 1.0]),
        greedy=torch.tensor([False, False, False, True, False]),
        seeds=longs(1, 2, 3, 1, 9),
        counters=longs(0, 0, 4, 7, 2),
    )
    for counter_shift in range(20):  # many steps, so the check covers many draws
        p = dict(params, counters=params["counters"] + counter_shift)
        batch = sample_llm(logits, window, **p)
        for row in range(5):
            alone = sample_llm(logits[row : row + 1], window[row : row + 1],
                               **{k: v[row : row + 1] for k, v in p.items()})
            assert int(alone[0]) == int(batch[row])


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 256, 1.0), (0.7, 6, 1.0), (1.3, 256, 0.8),
                                                     (0.5, 4, 0.9)])
def test_llm_frequencies_match_the_filtered_softmax(temperature, top_k, top_p):
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(12, generator=gen)
    expected = expected_llm_probs(logits, temperature, top_k, top_p)
    observed = frequencies(draws_llm(logits, temperature=temperature, top_k=top_k, top_p=top_p), 12)
    assert not observed[expected == 0].any(), "a filtered-out token was drawn"
    kept = expected > 0
    if kept.sum() > 1:
        counts = observed[kept] * DRAWS
        assert chisquare(counts, expected[kept] * DRAWS).pvalue > 1e-3
    np.testing.assert_allclose(observed, expected, atol=0.03)


# ---- sample_tts -------------------------------------------------------------------------------------------------
NUM_VQ, NUM_CODES, EOS = 4, 30, 29


def tts_logits(batch: int, seed: int = 5, eos_boost: float = 0.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, NUM_VQ, NUM_CODES, generator=gen).expand(batch, -1, -1).clone()
    logits[..., EOS] += eos_boost
    return logits


def test_tts_eos_banned_and_forced():
    logits = tts_logits(DRAWS, eos_boost=10.0)  # EOS the clear favourite of every codebook
    free = sample_tts(logits, **tts_params(DRAWS, NUM_VQ), eos_id=EOS)
    assert (free == EOS).float().mean() > 0.9
    for greedy in (False, True):
        banned = sample_tts(logits, **tts_params(DRAWS, NUM_VQ, ban=True, greedy=greedy), eos_id=EOS)
        assert not (banned == EOS).any(), "a banned EOS is never drawn, greedy or not"
    forced = sample_tts(tts_logits(DRAWS, eos_boost=-50.0), **tts_params(DRAWS, NUM_VQ, force=True, ban=True),
                        eos_id=EOS)
    assert (forced[:, 0] == EOS).all(), "a forced end writes EOS in the first codebook"
    assert not (forced[:, 1:] == EOS).any()


def test_tts_top_k_top_p_min_keep_and_first_step():
    logits = tts_logits(DRAWS)
    top3 = torch.topk(logits[0], TTS_MIN_KEEP, dim=-1).indices  # [Q, 3]
    for top_k, top_p in ((1, 1.0), (100, 1e-6), (2, 0.01)):
        codes = sample_tts(logits, **tts_params(DRAWS, NUM_VQ, top_k=top_k, top_p=top_p), eos_id=EOS)
        for q in range(NUM_VQ):
            assert set(codes[:, q].tolist()) == set(top3[q].tolist()), "min_keep 3: exactly the three best"
    codes = sample_tts(logits, **tts_params(DRAWS, NUM_VQ, top_k=5, top_p=1.0), eos_id=EOS)
    top5 = torch.topk(logits[0], 5, dim=-1).indices
    for q in range(NUM_VQ):
        assert set(codes[:, q].tolist()) == set(top5[q].tolist())
    # the first audio step of a segment draws from the whole softmax: top-p/top-k are skipped
    first = sample_tts(logits, **tts_params(DRAWS, NUM_VQ, top_k=1, top_p=1e-6, first=True), eos_id=EOS)
    for q in range(NUM_VQ):
        expected = logits[0, q].double().softmax(dim=-1).numpy()
        np.testing.assert_allclose(frequencies(first[:, q], NUM_CODES), expected, atol=0.03)
    # top-p keeps the codes whose mass ranked above is below p
    p = 0.6
    codes = sample_tts(logits, **tts_params(DRAWS, NUM_VQ, top_p=p), eos_id=EOS)
    for q in range(NUM_VQ):
        allowed = np.flatnonzero(expected_llm_probs(logits[0, q], 1.0, NUM_CODES, p))
        allowed = set(allowed.tolist()) | set(top3[q].tolist())
        assert set(codes[:, q].tolist()) == allowed


def test_tts_per_codebook_temperature():
    logits = tts_logits(DRAWS)
    temps = (0.1, 0.3, 1.0, 2.0)
    mixed = sample_tts(logits, **tts_params(DRAWS, NUM_VQ, temperature=temps), eos_id=EOS)
    for q, t in enumerate(temps):
        same = sample_tts(logits, **tts_params(DRAWS, NUM_VQ, temperature=t), eos_id=EOS)
        assert torch.equal(mixed[:, q], same[:, q]), "codebook q is drawn with its own temperature only"
        expected = (logits[0, q].double() / t).softmax(dim=-1).numpy()
        np.testing.assert_allclose(frequencies(mixed[:, q], NUM_CODES), expected, atol=0.03)


def test_tts_draw_is_the_same_alone_and_in_a_batch():
    gen = torch.Generator().manual_seed(6)
    batch = 6
    logits = torch.randn(batch, NUM_VQ, NUM_CODES, generator=gen) * 2
    params = dict(
        temperature=torch.rand(batch, NUM_VQ, generator=gen) + 0.1,
        top_p=torch.tensor([0.7, 1.0, 0.2, 0.9, 0.5, 0.7]),
        top_k=longs(20, 3, 30, 1, 10, 20),
        first_audio_step=torch.tensor([False, True, False, False, True, False]),
        ban_eos=torch.tensor([True, False, False, True, False, False]),
        force_eos=torch.tensor([False, False, True, False, False, False]),
        greedy=torch.tensor([False, False, False, False, False, True]),
        seeds=longs(1, 2, 3, 4, 1, 1),
        counters=longs(0, 3, 1, 8, 0, 2),
    )
    for shift in range(8):
        p = dict(params, counters=params["counters"] + shift)
        together = sample_tts(logits, **p, eos_id=EOS)
        for row in range(batch):
            alone = sample_tts(logits[row : row + 1], **{k: v[row : row + 1] for k, v in p.items()}, eos_id=EOS)
            assert torch.equal(alone[0], together[row])


# ---- masks ------------------------------------------------------------------------------------------------------
def test_causal_mask_per_row_positions():
    positions = torch.tensor([[3, 4], [7, 8], [0, 1]])
    mask = causal_mask(positions, 10)
    assert mask.shape == (3, 1, 2, 10) and mask.dtype == torch.bool
    for row in range(3):
        for t in range(2):
            p = int(positions[row, t])
            assert mask[row, 0, t, : p + 1].all() and not mask[row, 0, t, p + 1 :].any()
        assert torch.equal(mask[row], causal_mask(positions[row : row + 1], 10)[0])


def official_audio_mask_row(p: int, num_text: int, audio_end: int, key_len: int) -> np.ndarray:
    """Fact sheet 4.6 for one query, written with plain integers."""
    chunks = -(-(p - 300) // 50)  # ceil
    text_end = min(2 + min(10 * chunks, 300), num_text + 3)
    keys = np.arange(key_len)
    return (keys < text_end) | ((keys >= FIRST_AUDIO_SLOT) & (keys < audio_end))


def test_tts_audio_mask_rows_in_one_batch_equal_each_alone():
    key_len = 1024
    queries = [(302, 40), (303, 40), (350, 40), (351, 120), (600, 7), (302 + 700, 300), (320, 0), (1000, 200)]
    pos = longs(*(p for p, _ in queries))
    num_text = longs(*(n for _, n in queries))
    batch = tts_audio_mask(pos, num_text, pos + 1, key_len)
    assert batch.shape == (len(queries), 1, 1, key_len)
    for row, (p, n) in enumerate(queries):
        alone = tts_audio_mask(longs(p), longs(n), longs(p + 1), key_len)[0, 0, 0]
        assert torch.equal(batch[row, 0, 0], alone)
        np.testing.assert_array_equal(alone.numpy(), official_audio_mask_row(p, n, p + 1, key_len))
        assert not alone[FIRST_AUDIO_SLOT - 1], "[Ptts] (slot 302) is never visible"
