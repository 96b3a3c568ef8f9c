"""The flashinfer attention variant (det_backend/flashinfer_variant.py).

CPU: the planning arithmetic (the tile FlashInfer's planner picks, the pinned row bound, the
padded host arrays, the device page list, the work-item count) and platform refusals.
GPU (marked): accuracy against float64 and bitwise invariance to the batch, to chunked
prefill, to decode vs prefill, and to CUDA-graph replay with padding, mirroring
test_attention_fa3.py; controls plan FlashInfer the way vLLM does (default planning, and
VLLM_BATCH_INVARIANT's disable_split_kv without our tile pin) and must show differences.
"""

import math
from functools import cache
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from attention_inputs import Batch, assert_rows_equal, join, make_batch, reference

from det_backend import flashinfer_variant as fi

TOL = {
    torch.float16: dict(atol=8 * torch.finfo(torch.float16).eps, rtol=0.0),
    torch.bfloat16: dict(atol=8 * torch.finfo(torch.bfloat16).eps, rtol=0.0),
}
MIXED = [(1, 1500), (300, 1700), (1, 37), (700, 700), (5, 900), (1, 4000)]
HEADS = [(8, 8), (32, 8), (16, 2), (8, 1)]
MAX_REQS, MAX_TOKENS, MAX_MODEL_LEN = 160, 8192, 17000


# CPU: planning arithmetic ----------------------------------------------------------------


@pytest.mark.parametrize(
    "avg, head_dim, tile",
    [(1, 128, 16), (16, 128, 16), (17, 128, 64), (64, 128, 64), (65, 128, 128), (65, 256, 64),
     (4096, 256, 64), (8, 64, 16), (4096, 64, 128)],
)  # fmt: skip
def test_cta_tile_q_mirrors_flashinfer(avg, head_dim, tile):
    assert fi.cta_tile_q(avg, head_dim) == tile


@pytest.mark.parametrize("head_dim", fi.SUPPORTED_HEAD_SIZES)
@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("max_tokens, batch_size", [(256, 257), (2048, 257), (8192, 1025), (1, 2)])
def test_pinned_rows_give_the_pinned_tile(head_dim, group, max_tokens, batch_size):
    """The CUDA-graph planner's tile, from the first plan's rows and the fixed batch size
    (scheduler.cuh:534-536), is the pinned one whatever the engine's limits."""
    rows = fi.pinned_total_rows(max_tokens, batch_size)
    assert rows >= max_tokens
    tile = fi.cta_tile_q((rows - batch_size + 1) * group, head_dim)
    assert tile == fi.pinned_cta_tile_q(head_dim) == (64 if head_dim == 256 else 128)


def test_host_page_metadata_pads_with_empty_requests():
    qo, kv, last = fi.host_page_metadata([0, 1, 301, 302], [1500, 1700, 16], 16, 6)
    assert qo.tolist() == [0, 1, 301, 302, 302, 302, 302]
    assert kv.tolist() == [0, 94, 201, 202, 202, 202, 202]
    assert last.tolist() == [12, 4, 16, 0, 0, 0]
    with pytest.raises(ValueError, match="at most 2 requests"):
        fi.host_page_metadata([0, 1, 2, 3], [5, 5, 5], 16, 3)


def test_device_page_indices_follow_the_block_table():
    block_table = torch.tensor([[7, 3, 9, 0], [5, 0, 0, 0], [2, 8, 1, 6]], dtype=torch.int32)
    seq_lens = torch.tensor([33, 16, 49], dtype=torch.int32)
    got = fi.device_page_indices(seq_lens, block_table, 16, 3 + 1 + 4)
    assert got.tolist() == [7, 3, 9, 5, 2, 8, 1, 6]
    assert got.dtype == torch.int32


def test_work_items_count_query_tiles():
    # group 4, tile 128: 32 tokens per tile; decodes take one tile each.
    assert fi.num_work_items([1, 1, 32, 33, 0], 4, 128) == 1 + 1 + 1 + 2
    assert fi.num_work_items([], 4, 128) == 0


@pytest.mark.parametrize("scale", [64**-0.5, 80**-0.5, 96**-0.5, 128**-0.5, 256**-0.5,
                                   144**-0.5, 1.0, 0.0625, 3e-3, 7.5])  # fmt: skip
def test_kernel_scales_give_an_exact_power_of_two_log2_scale(scale):
    """FlashInfer's kernel computes sm_scale_log2 = fl32(sm_scale * log2e): exactly a power of
    two, and q's multiplier carries the rest of scale * log2e."""
    q_multiplier, sm_scale = fi.kernel_scales(scale)
    assert np.float32(sm_scale) == sm_scale  # passes through the kernel's float exactly
    log2_scale = float(np.float32(sm_scale) * fi.LOG2E_F32)
    assert math.frexp(log2_scale)[0] == 0.5  # a power of two
    assert math.isclose(q_multiplier * log2_scale, scale * float(fi.LOG2E_F32), rel_tol=1e-15)
    assert 2**-0.5 <= q_multiplier <= 2**0.5
    with pytest.raises(ValueError, match="must be positive"):
        fi.kernel_scales(0.0)


def _fma32(a, b, c):
    """fl32(a * b + c) with one rounding, as an FMA (the fp32 product is exact in fp64)."""
    f64 = np.float64
    return (np.asarray(a, f64) * np.asarray(b, f64) + np.asarray(c, f64)).astype(np.float32)


def _flashinfer_row(logits, values, log2_scale, tile_kv):
    """One query row through FlashInfer's online softmax (update_mdo_states, prefill.cuh:
    1188-1215), fp32, as nvcc compiles `m_prev * s - m * s` and `x * s - m * s`: an FMA
    with the rounded m * s. logits: [kv] fp32 (-inf = masked); values: [kv, d]."""
    s = np.float32(log2_scale)
    m, d = np.float32(-np.inf), np.float32(0)
    o = np.zeros(values.shape[1], np.float32)
    for lo in range(0, logits.shape[0], tile_kv):
        tile, v = logits[lo : lo + tile_kv], values[lo : lo + tile_kv]
        m_prev, m = m, max(m, tile.max())
        ms = np.float32(m * s)
        rescale = np.exp2(_fma32(m_prev, s, -ms)).astype(np.float32)
        d, o = np.float32(d * rescale), (o * rescale).astype(np.float32)
        p = np.exp2(_fma32(tile, s, -ms)).astype(np.float32)
        d = np.float32(d + p.sum(dtype=np.float32))
        o = (o + p @ v).astype(np.float32)
    return o / d


@pytest.mark.parametrize("pinned", [False, True])
def test_trailing_masked_tiles_are_no_ops_only_with_a_power_of_two_log2_scale(pinned):
    """Why kernel_scales: a row processed with one more fully masked KV tile (what a later
    position in its query tile gives it) keeps its bits only when m * s is exact. The
    control (FlashInfer's own scale * log2e) must differ for some rows."""
    rng = np.random.default_rng(0)
    scale = 128**-0.5
    log2_scale = (
        float(np.float32(fi.kernel_scales(scale)[1]) * fi.LOG2E_F32)
        if pinned
        else float(np.float32(scale) * fi.LOG2E_F32)
    )
    tile_kv, differ = 64, 0
    for _ in range(200):
        visible = int(rng.integers(1, 300))
        logits = (rng.standard_normal(visible) * 30).astype(np.float32)
        values = rng.standard_normal((visible, 16)).astype(np.float32)
        rows = []
        for extra in (0, 1):  # the kernel's full KV tiles, then one more fully masked one
            padded = (-(-visible // tile_kv) + extra) * tile_kv
            tiles = np.full(padded, -np.inf, np.float32)
            tiles[:visible] = logits
            v = np.zeros((padded, 16), np.float32)
            v[:visible] = values
            rows.append(_flashinfer_row(tiles, v, log2_scale, tile_kv))
        a, b = rows
        differ += not np.array_equal(a, b)
    if pinned:
        assert differ == 0
    else:
        assert differ > 0, "the control found no row changed by a masked tile: it cannot tell"


def test_paged_attention_runs_the_plans_rows_with_the_pinned_scales():
    """FlashInfer 0.6.14's run() wants exactly the plan's rows: padding rows are cut off (and
    left untouched), q carries kernel_scales' multiplier, k_scale its power-of-two scale."""
    calls = []

    class Wrapper:
        def run(self, q, caches, k_scale, out):
            calls.append((q.clone(), k_scale, out.data_ptr(), out.shape))
            out.fill_(1.0)

    planner = SimpleNamespace(
        shape=(4, 2, 64, 16), dtype=torch.float16, num_rows=5, wrapper=Wrapper()
    )
    q = torch.randn(8, 4, 64, dtype=torch.float16)
    cache = torch.randn(3, 16, 2, 64, dtype=torch.float16)
    out = torch.full_like(q, float("nan"))
    fi.flashinfer_paged_attention(q, cache, cache, out, planner, 64**-0.5)
    ((q_run, k_scale, out_ptr, out_shape),) = calls
    multiplier, sm_scale = fi.kernel_scales(64**-0.5)
    assert k_scale == sm_scale and out_ptr == out.data_ptr() and out_shape == (5, 4, 64)
    assert torch.equal(q_run, q[:5] * multiplier)
    assert (out[:5] == 1).all() and out[5:].isnan().all()
    planner.num_rows = 9
    with pytest.raises(ValueError, match="q has 8 rows, the plan 9"):
        fi.flashinfer_paged_attention(q, cache, cache, out, planner, 64**-0.5)


def test_flashinfer_platform_problems_name_the_variant():
    problems = fi.platform_problems()
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8:
        assert all("nvcc" in p or "FlashInfer" in p for p in problems)
    else:
        assert any("sm_80" in p for p in problems)
    assert all(p.startswith("attention variant flashinfer: ") for p in problems)


# GPU ---------------------------------------------------------------------------------------

gpu = pytest.mark.gpu


@pytest.fixture
def _needs_flashinfer():
    problems = fi.platform_problems()
    if problems:
        pytest.skip(problems[0])


@cache
def planner(num_q_heads, num_kv_heads, head_size, dtype, block_size=16) -> fi.FlashInferPlanner:
    return fi.FlashInferPlanner(
        MAX_REQS, MAX_TOKENS, MAX_REQS * math.ceil(MAX_MODEL_LEN / block_size),
        num_q_heads, num_kv_heads, head_size, block_size, dtype, torch.device("cuda"),
    )  # fmt: skip


def plan(batch: Batch) -> fi.FlashInferPlanner:
    num_q_heads, head_size = batch.q.shape[1:]
    p = planner(num_q_heads, batch.key_cache.shape[2], head_size, batch.q.dtype)
    cu, seq_lens = batch.metadata()
    p.plan(cu.cpu(), seq_lens.cpu(), seq_lens, batch.block_table)
    return p


def run(batch: Batch) -> torch.Tensor:
    out = torch.full(batch.q.shape, float("nan"), dtype=batch.q.dtype, device=batch.q.device)
    return fi.flashinfer_paged_attention(
        batch.q, batch.key_cache, batch.value_cache, out, plan(batch), batch.scale
    )


def run_as_vllm(batch: Batch, batch_invariant: bool) -> torch.Tensor:
    """FlashInfer planned as vLLM 0.26's FlashInfer backend plans a prefill (flashinfer.py:
    642-649, 1430-1447): no CUDA-graph mode, so the tile follows the batch's average query
    length; VLLM_BATCH_INVARIANT adds disable_split_kv (and split sizes it then ignores)."""
    from flashinfer import BatchPrefillWithPagedKVCacheWrapper

    num_q_heads, head_size = batch.q.shape[1:]
    page_size, num_kv_heads = batch.key_cache.shape[1:3]
    cu, seq_lens = batch.metadata()
    qo, kv, last = fi.host_page_metadata(cu.cpu(), seq_lens.cpu(), page_size, len(batch.specs) + 1)
    n = len(batch.specs)
    indices = fi.device_page_indices(seq_lens, batch.block_table, page_size, int(kv[n]))
    workspace = torch.empty(fi.WORKSPACE_BYTES * 8, dtype=torch.uint8, device=batch.q.device)
    wrapper = BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend="fa2")
    wrapper.plan(
        qo[: n + 1], kv[: n + 1], indices, last[:n], num_q_heads, num_kv_heads, head_size,
        page_size, causal=True, sm_scale=batch.scale, q_data_type=batch.q.dtype,
        fixed_split_size=4096 if batch_invariant else None, disable_split_kv=batch_invariant,
    )  # fmt: skip
    out = torch.full(batch.q.shape, float("nan"), dtype=batch.q.dtype, device=batch.q.device)
    wrapper.run(batch.q, (batch.key_cache, batch.value_cache), out=out)
    return out


@gpu
@pytest.mark.usefixtures("_needs_flashinfer")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_size", fi.SUPPORTED_HEAD_SIZES)
@pytest.mark.parametrize("num_q_heads,num_kv_heads", HEADS)
def test_flashinfer_matches_float64(dtype, head_size, num_q_heads, num_kv_heads, device):
    batch = make_batch(MIXED, num_q_heads, num_kv_heads, head_size, dtype, device, pad=3)
    out = run(batch)
    n = sum(s[0] for s in MIXED)
    torch.testing.assert_close(out[:n].double(), reference(batch)[:n], **TOL[dtype])
    assert out[n:].isnan().all(), "padding rows were written"


@gpu
@pytest.mark.usefixtures("_needs_flashinfer")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_size", fi.SUPPORTED_HEAD_SIZES)
@pytest.mark.parametrize("num_q_heads,num_kv_heads", HEADS)
def test_flashinfer_batch_invariant(dtype, head_size, num_q_heads, num_kv_heads, device):
    batch = make_batch(MIXED, num_q_heads, num_kv_heads, head_size, dtype, device, seed=1, pad=5)
    full = run(batch)
    for b in range(len(MIXED)):
        alone = run(batch.select(b))
        assert_rows_equal(alone, full[batch.token_rows(b)], f"request {b} alone vs in batch")
    bs = [5, 3, 0, 2]
    expected = torch.cat([full[batch.token_rows(b)] for b in bs])
    assert_rows_equal(run(batch.subset(bs)), expected, f"requests {bs} as their own batch")


@gpu
@pytest.mark.usefixtures("_needs_flashinfer")
@pytest.mark.parametrize("head_size", fi.SUPPORTED_HEAD_SIZES)
@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(32, 8), (8, 8)])
def test_flashinfer_chunked_prefill_invariant(head_size, num_q_heads, num_kv_heads, device):
    """One 1100-token prompt with 300 tokens of context, prefilled in chunks of many sizes
    (rows land at every offset of the 128-row tile), alone and beside decodes."""
    specs = [(1100, 1400), (1, 3000), (1, 90)]
    batch = make_batch(specs, num_q_heads, num_kv_heads, head_size, torch.bfloat16, device, seed=2)
    full = run(batch.select(0))
    decodes = batch.subset([1, 2])
    for size in (1, 7, 16, 31, 32, 33, 63, 64, 65, 100, 128, 333, 1099):
        for lo in range(0, 1100, size):
            rows = slice(lo, min(lo + size, 1100))
            chunk = batch.select(0, rows)
            assert_rows_equal(run(chunk), full[rows], f"chunk {rows} (size {size}) alone")
            if size in (7, 128, 333):
                mixed = run(join(decodes, chunk))[2:]
                assert_rows_equal(mixed, full[rows], f"chunk {rows} beside decodes")


@gpu
@pytest.mark.usefixtures("_needs_flashinfer")
def test_flashinfer_own_scale_split_changes_bits_with_the_chunking(device):
    """The control for kernel_scales: FlashInfer's own scale handling (q as it is, the layer's
    scale as k_scale) gives some 1-token chunks other bits than the whole prefill (seen on an
    H200 before the pin: chunked prefill and decode vs prefill failed by 1-2 bf16 ulps)."""
    specs = [(1100, 1400)]
    batch = make_batch(specs, 8, 8, 128, torch.bfloat16, device, seed=2)

    def run_unpinned(b: Batch) -> torch.Tensor:
        out = torch.full(b.q.shape, float("nan"), dtype=b.q.dtype, device=b.q.device)
        return fi._run(b.q, b.key_cache, b.value_cache, out, plan(b), 1.0, b.scale)

    full = run_unpinned(batch)
    differ = sum(
        not torch.equal(run_unpinned(batch.select(0, slice(i, i + 1))), full[i : i + 1])
        for i in range(1100)
    )
    assert differ > 0, "FlashInfer's own scale split gave every 1-token chunk the same bits"


@gpu
@pytest.mark.usefixtures("_needs_flashinfer")
@pytest.mark.parametrize("head_size", fi.SUPPORTED_HEAD_SIZES)
@pytest.mark.parametrize("num_q_heads,num_kv_heads", HEADS)
def test_flashinfer_decode_equals_prefill(head_size, num_q_heads, num_kv_heads, device):
    """A decoded token has the bits it gets when recomputed inside a prefill (preemption)."""
    specs = [(600, 900)] + [(1, n) for n in (2000, 50, 700, 1300)]
    batch = make_batch(specs, num_q_heads, num_kv_heads, head_size, torch.bfloat16, device, seed=3)
    prefill = run(batch.select(0))
    others = batch.subset([1, 2, 3, 4])
    for i in list(range(590, 600)) + [0, 1, 127, 128, 129]:
        token = batch.select(0, slice(i, i + 1))
        assert_rows_equal(run(token), prefill[i : i + 1], f"decode of token {i} alone")
        in_batch = run(join(others, token))[4:]
        assert_rows_equal(in_batch, prefill[i : i + 1], f"decode of token {i} in a batch of 5")


@gpu
@pytest.mark.usefixtures("_needs_flashinfer")
def test_flashinfer_invariant_where_default_flashinfer_splits(device):
    """A long decode alone (FlashInfer's default planner splits its KV by a binary search over
    the batch) and inside 128 decodes: same bits pinned; default planning differs."""
    specs = [(1, 16384)] + [(1, 1000 + 7 * i) for i in range(127)]
    batch = make_batch(specs, 32, 8, 128, torch.bfloat16, device, seed=4)
    assert_rows_equal(run(batch.select(0)), run(batch)[:1], "long decode alone vs in 128")
    default_alone = run_as_vllm(batch.select(0), batch_invariant=False)
    default_batched = run_as_vllm(batch, batch_invariant=False)[:1]
    torch.testing.assert_close(default_alone, default_batched, **TOL[torch.bfloat16])
    assert not torch.equal(default_alone, default_batched), (
        "default FlashInfer planning gave the same bits alone and batched: this control cannot tell"
    )


@gpu
@pytest.mark.usefixtures("_needs_flashinfer")
def test_vllm_batch_invariant_flashinfer_tile_follows_the_batch(device):
    """Why the tile is pinned: planned as under VLLM_BATCH_INVARIANT (no split), a decode alone
    runs the 16-row tile (1 x 4 warps, KV merged across warps) and beside a prefill the
    128-row one: different bits for the same token."""
    specs = [(1, 900), (600, 600)]
    batch = make_batch(specs, 32, 8, 128, torch.bfloat16, device, seed=5)
    alone = run_as_vllm(batch.select(0), batch_invariant=True)
    beside = run_as_vllm(batch, batch_invariant=True)[:1]
    torch.testing.assert_close(alone, beside, **TOL[torch.bfloat16])
    assert not torch.equal(alone, beside), (
        "vLLM's batch-invariant FlashInfer planning gave a decode the same bits alone and "
        "beside a prefill: the tile pin may not be needed"
    )
    assert_rows_equal(run(batch.select(0)), run(batch)[:1], "pinned: alone vs beside prefill")


@gpu
@pytest.mark.usefixtures("_needs_flashinfer")
def test_flashinfer_padding_work_items_are_inert(device):
    """After a big prefill plan, a small decode plan leaves stale work items in the padded
    grid; they must not write (NaN rows stay NaN) nor change the real rows."""
    big = make_batch([(2000, 2000), (1500, 3000)], 32, 8, 128, torch.bfloat16, device, seed=6)
    run(big)
    batch = make_batch([(1, 700), (1, 90), (1, 3000), (0, 0)], 32, 8, 128, torch.bfloat16,
                       device, pad=4)  # fmt: skip
    out = run(batch)
    assert_rows_equal(out[:3], run(batch.subset([0, 1, 2]))[:3], "with vs without padding")
    assert out[3:].isnan().all(), "padding rows were written"


@gpu
@pytest.mark.usefixtures("_needs_flashinfer")
@pytest.mark.parametrize("head_size", [64, 128])
def test_flashinfer_cuda_graph_replay(head_size, device):
    """A decode step captured once replays other lengths and block tables (plan() between
    replays, as vLLM's build() does) with the bits of the eager call."""
    specs = [[(1, 4096), (1, 100), (1, 2000)], [(1, 100), (1, 2000), (1, 4096)]]
    batches = [
        make_batch(s, 32, 8, head_size, torch.bfloat16, device, seed=i, pad=5)
        for i, s in enumerate(specs)
    ]
    static = make_batch(specs[0], 32, 8, head_size, torch.bfloat16, device, seed=9, pad=5)
    out = torch.full_like(static.q, float("nan"))
    p = plan(static)

    def call():
        fi.flashinfer_paged_attention(
            static.q, static.key_cache, static.value_cache, out, p, static.scale
        )

    call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    for i, batch in enumerate(batches):
        expected = run(batch)[:3]
        for dst, src in zip(
            (static.q, static.key_cache, static.value_cache, static.block_table),
            (batch.q, batch.key_cache, batch.value_cache, batch.block_table),
            strict=True,
        ):
            dst.copy_(src)
        static.specs = batch.specs
        plan(static)
        out.fill_(float("nan"))
        graph.replay()
        assert_rows_equal(out[:3], expected, f"graph replay of batch {i}")
        assert out[3:].isnan().all(), "padding rows were written"
