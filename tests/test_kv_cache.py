"""The KV cache write (omnivox/models/kv_cache.py): the compiled write of K and V (`update(..., compiled=True)`, one
kernel) leaves the same caches and returns the same views as the eager writes (an index write for K and one for V,
which equal a scatter of each), and so gives the same attention, alone and inside compiled decoder layers. On a
machine with CUDA every test also runs there (the write is then a Triton kernel)."""

from __future__ import annotations

import functools
import re
from unittest import mock

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor.graph import GraphLowering

from omnivox.models.kv_cache import KVPool, KVRows, KVView, write_kv
from omnivox.models.layers import DecoderStack, attend
from omnivox.models.layers import short_queries_by_products as by_products

LAYERS, KV_HEADS, HEAD_DIM, CAPACITY, SLOTS = 3, 2, 16, 40, 8
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pools(device: str, dtype: torch.dtype = torch.bfloat16) -> tuple[KVPool, KVPool]:
    """Two pools with the same random contents (the eager one and the compiled one)."""
    pool, twin = (KVPool(LAYERS, KV_HEADS, HEAD_DIM, CAPACITY, dtype, device, SLOTS) for _ in range(2))
    generator = torch.Generator().manual_seed(1)
    for buf, copy in zip((*pool.k, *pool.v), (*twin.k, *twin.v), strict=True):
        buf.copy_(torch.randn(buf.shape, generator=generator))
        copy.copy_(buf)
    return pool, twin


def new_kv(batch: int, steps: int, seed: int, device: str, dtype: torch.dtype = torch.bfloat16):
    """k contiguous, v a transposed view ([B, T, KV, D] memory), as `Attention.project` gives them."""
    generator = torch.Generator().manual_seed(seed)
    k = torch.randn(batch, KV_HEADS, steps, HEAD_DIM, generator=generator).to(device, dtype)
    v = torch.randn(batch, steps, KV_HEADS, HEAD_DIM, generator=generator).to(device, dtype).transpose(1, 2)
    return k, v


def distinct_positions(batch: int, steps: int, seed: int, device: str) -> torch.Tensor:
    """[batch, T] positions, distinct within each row (a repeated position's winner is unspecified). One step's are
    a column of a wider matrix, as the engine's decode steps slice theirs from their packed inputs."""
    generator = torch.Generator().manual_seed(seed)
    positions = torch.stack([torch.randperm(CAPACITY, generator=generator)[:steps] for _ in range(batch)])
    positions = positions.to(device)
    return torch.cat([positions, positions], dim=1)[:, :1] if steps == 1 else positions


def assert_same_pools(ours: KVPool, theirs: KVPool) -> None:
    for mine, other in zip((*ours.k, *ours.v), (*theirs.k, *theirs.v), strict=True):
        assert torch.equal(mine, other)


def scatter(pool: KVPool, row: int, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """The write as a scatter along the positions of rows row.. (an oracle independent of `write_kv`)."""
    batch, heads, steps, dim = k.shape
    positions = positions.expand(batch, steps) if positions.dim() == 1 else positions
    index = positions[:, None, :, None].expand(batch, heads, steps, dim)
    pool.k[layer][row:row + batch].scatter_(2, index, k)
    pool.v[layer][row:row + batch].scatter_(2, index, v)


CASES = [  # row, batch, T, per-row positions
    (0, 2, 1, True), (0, 4, 1, True), (3, 4, 1, True), (1, 2, 1, False),
    (0, 2, 7, True), (2, 5, 7, True), (0, 3, 7, False), (4, 2, 5, False),
]


@pytest.mark.parametrize("device", DEVICES)
@torch.inference_mode()
def test_compiled_view_write_matches_the_scatters(device):
    """[B, T] and [T] positions, one and several steps, any first row: the same pool bytes, the same views (of the
    pool, not copies) and the same attention over them, by products and by SDPA."""
    eager, compiled = pools(device)
    scattered = pools(device)[0]
    for seed, (row, batch, steps, per_row) in enumerate(CASES):
        key_len = 24 + seed % 3 * 8
        positions = distinct_positions(batch if per_row else 1, steps, seed, device)
        positions = positions if per_row else positions[0]
        k, v = new_kv(batch, steps, seed, device)
        q = torch.randn(batch, 2 * KV_HEADS, steps, HEAD_DIM).to(device, torch.bfloat16)
        for layer in range(LAYERS):
            theirs = eager.view(row, batch, key_len).update(layer, positions, k, v)
            ours = compiled.view(row, batch, key_len).update(layer, positions, k, v, compiled=True)
            scatter(scattered, row, layer, positions, k, v)
            assert_same_pools(compiled, eager)
            assert_same_pools(eager, scattered)
            for mine, other, buf in zip(ours, theirs, (compiled.k[layer], compiled.v[layer]), strict=True):
                assert torch.equal(mine, other) and mine.stride() == other.stride() == buf.stride()
                assert mine.data_ptr() == buf[row].data_ptr(), "a view of the pool"
            for products in (True, False):
                with by_products(products):
                    assert torch.equal(attend(q, *ours, None, HEAD_DIM**-0.5), attend(q, *theirs, None, HEAD_DIM**-0.5))


@pytest.mark.parametrize("device", DEVICES)
@torch.inference_mode()
def test_compiled_rows_write_matches_the_eager_write(device):
    """`KVRows` (rows anywhere in the pool, in any order): the same pool bytes and the same gathered keys."""
    eager, compiled = pools(device)
    for seed, (_, batch, steps, per_row) in enumerate(CASES):
        rows = torch.randperm(SLOTS, generator=torch.Generator().manual_seed(seed))[:batch].to(device)
        positions = distinct_positions(batch if per_row else 1, steps, seed, device)
        positions = positions if per_row else positions[0]
        k, v = new_kv(batch, steps, seed, device)
        for layer in range(LAYERS):
            theirs = KVRows(eager, rows, 32).update(layer, positions, k, v)
            ours = KVRows(compiled, rows, 32).update(layer, positions, k, v, compiled=True)
            assert_same_pools(compiled, eager)
            assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


@pytest.mark.parametrize("device", DEVICES)
@torch.inference_mode()
def test_the_compiled_write_is_one_kernel_in_place(device):
    """Both buffers written by one generated kernel, in place: no buffer allocated (a functional write would copy
    the whole cache and copy it back)."""
    eager, compiled = pools(device)

    def fresh(*args):  # its own code object, so its own compile, whose code we read
        write_kv(*args)

    k, v = new_kv(4, 1, 0, device)
    positions = distinct_positions(4, 1, 0, device)
    codes = []
    with mock.patch.object(GraphLowering, "save_output_code", codes.append):
        torch.compile(fresh, dynamic=True, fullgraph=True)(compiled.k[0][2:6], compiled.v[0][2:6], None, positions,
                                                           k, v)
    eager.view(2, 4).update(0, positions, k, v)
    assert_same_pools(compiled, eager)
    (code,) = codes
    launches = re.findall(r"^\s*(?:cpp_fused_|triton_)\w*(?:\.run)?\(", code, re.MULTILINE)  # not definitions
    assert len(launches) == 1, launches
    assert not re.search(r"^\s*buf\w* = empty_strided", code, re.MULTILINE), "the write allocated a buffer"


@pytest.mark.parametrize("device", DEVICES)
@torch.inference_mode()
def test_one_compile_for_every_batch_heads_and_pool(device):
    """After a first write of each kind, other batch sizes, head counts, head sizes, pool sizes and rows compile
    nothing: sizes that happen to be equal (batch 2 and 2 kv heads) are not assumed equal."""
    def write_all(batch: int, heads: int, dim: int, slots: int, steps: int) -> None:
        pool = KVPool(1, heads, dim, CAPACITY, torch.bfloat16, device, slots)
        generator = torch.Generator().manual_seed(batch)
        k, v = (torch.randn(batch, heads, steps, dim, generator=generator).to(device, torch.bfloat16)
                for _ in range(2))
        positions = distinct_positions(batch, steps, batch, device)
        pool.view(slots - batch, batch).update(0, positions, k, v, compiled=True)
        KVRows(pool, torch.arange(batch, device=device).flip(0), 8).update(0, positions, k, v, compiled=True)

    for steps in (1, 6):
        write_all(2, 2, 16, 2, steps)  # everything 2: duck sizing would tie them
        before = counters["stats"]["unique_graphs"]
        for batch, heads, dim, slots in ((4, 2, 16, 8), (3, 4, 32, 5), (8, 12, 64, 8), (2, 4, 8, 16)):
            write_all(batch, heads, dim, slots, steps)
        assert counters["stats"]["unique_graphs"] == before, "a write recompiled"


def eager_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every cache write eager (two index_puts), whatever `compiled` says."""
    for cls in (KVView, KVRows):
        monkeypatch.setattr(cls, "update", functools.partialmethod(eager_update, cls.update))


def eager_update(self, update, layer, positions, k, v, compiled=False):
    return update(self, layer, positions, k, v)


@pytest.fixture(scope="module", autouse=True)
def own_compiles():
    """This module's compiles neither count toward other modules' recompile limits (torch's 8 per function; the
    compiled decoder halves are shared by every test that compiles layers) nor meet theirs."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("device", DEVICES)
@torch.inference_mode()
def test_compiled_layers_give_the_same_caches_and_outputs_with_the_compiled_write(device, monkeypatch):
    """A compiled stack (compiled halves, compiled softmax, compiled write; Qwen2-like: GQA, q/k/v biases) against
    the same stack with the eager writes: bit-identical caches and hidden states, for prompts ([T] positions), decode
    steps ([B, 1], a column of packed inputs as the engine's) and prefills ([B, T], into a view and into rows
    anywhere in the pool)."""
    num_kv_heads = 2
    stack = DecoderStack(hidden_size=128, intermediate_size=352, num_layers=3, num_heads=8, num_kv_heads=num_kv_heads,
                         rope_theta=10000.0, rms_norm_eps=1e-6, max_positions=64, qkv_bias=True).eval()
    generator = torch.Generator().manual_seed(0)
    for param in stack.parameters():
        param.copy_(torch.randn(param.shape, generator=generator) * 0.05 + (1.0 if param.dim() == 1 else 0.0))
    stack.to(device).fuse_projections()
    steps = [  # batch, positions, rows (None: a view of rows 0..batch-1), key width
        (2, torch.arange(6), None, 16), (3, torch.arange(6) + 6, None, 16),
        (3, torch.tensor([[12, 0], [13, 0], [14, 0]])[:, :1], None, 16),
        (3, torch.tensor([[15, 0], [16, 0], [17, 0]])[:, :1], None, 32),
        (2, torch.arange(20, 30).view(2, 5), None, 32),
        (2, torch.arange(30, 38).view(2, 4), torch.tensor([3, 1]), 48),
    ]
    results = {}
    for write in ("compiled", "eager"):
        if write == "eager":  # the same compiled layers with the writes they had before
            eager_writes(monkeypatch)
        pool = KVPool(3, num_kv_heads, stack.head_dim, 48, torch.float32, device, 4)
        outs, generator = [], torch.Generator().manual_seed(0)
        with by_products():
            for batch, positions, rows, width in steps:
                x = torch.randn(batch, positions.shape[-1], 128, generator=generator).to(device)
                mask = torch.ones(1, 1, positions.shape[-1], width, dtype=torch.bool, device=device)
                cache = pool.view(0, batch, width) if rows is None else KVRows(pool, rows.to(device), width)
                outs.append(stack(x, positions.to(device), cache, mask, compiled=True))
        results[write] = pool, outs
    (ours, our_outs), (theirs, their_outs) = results["compiled"], results["eager"]
    assert_same_pools(ours, theirs)
    assert all(torch.equal(a, b) for a, b in zip(our_outs, their_outs, strict=True))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the multi-tensor kernels' fast path runs on a GPU"))])
def test_bulk_slot_operations_touch_their_slots_only(device):
    """swap_slots, move_slot, zero_slot and copy_prefix (multi-tensor copies over every layer) against the same moves
    written slot by slot."""
    def pool() -> KVPool:
        p = KVPool(num_layers=3, num_kv_heads=2, head_dim=4, capacity=5, dtype=torch.float32, device=device, slots=4)
        for i, buf in enumerate((*p.k, *p.v)):
            buf.copy_(torch.arange(buf.numel(), dtype=torch.float32, device=device).view_as(buf) + 1000 * i)
        return p

    ours, expected, other = pool(), pool(), pool()
    for buf in (*other.k, *other.v):
        buf.neg_()
    ours.swap_slots(0, 2)
    ours.move_slot(3, 1)
    ours.zero_slot(0, 2)
    ours.copy_prefix(other, 1, 3, 3)
    for exp, src in zip((*expected.k, *expected.v), (*other.k, *other.v), strict=True):
        exp[[0, 2]] = exp[[2, 0]].clone()
        exp[1] = exp[3]
        exp[0, :, :2] = 0
        exp[3, :, :3] = src[1, :, :3]
    for mine, exp in zip((*ours.k, *ours.v), (*expected.k, *expected.v), strict=True):
        assert torch.equal(mine, exp)
