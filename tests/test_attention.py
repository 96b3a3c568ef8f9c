"""Paged attention: accuracy against float64, and bitwise invariance to the batch, to chunked
prefill, to decode vs prefill, to the launch mode and to the query-tile size.

CPU tests run under the Triton interpreter with a small kv_split_size so that requests of a
few hundred positions span several segments. The interpreter's tl.dot on bf16 is broken, so
CPU tests use fp16; GPU tests add bf16.
"""

import math

import pytest
import torch
from attention_inputs import Batch, assert_rows_equal, make_batch, reference
from det_backend.kernels.attention import KV_SPLIT_SIZE, paged_attention

# Outputs are convex combinations of V (|v| ~ 1); P is rounded to the input dtype before P@V.
TOL = {
    torch.float16: dict(atol=8 * torch.finfo(torch.float16).eps, rtol=0.0),
    torch.bfloat16: dict(atol=8 * torch.finfo(torch.bfloat16).eps, rtol=0.0),
}
CPU_DTYPES = [torch.float16]
GPU_DTYPES = [torch.float16, torch.bfloat16]
DTYPES = GPU_DTYPES if torch.cuda.is_available() else CPU_DTYPES
# 256 (TILE_N 32, 8 warps) is too slow for the interpreter.
HEAD_SIZES = [64, 128, 256] if torch.cuda.is_available() else [64, 128]
CPU_SPLIT = 64  # one or a few TILE_N tiles per segment, so CPU requests span several segments
# Invariance is compared on the fp32 result before rounding: rounding to fp16 hides most fp32
# ulp differences (merging segments in reverse order passed an fp16 comparison).
EXACT = torch.float32

# The interpreter turns loop bounds loaded from memory (shape-(1,) arrays) into ints.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")

# (q_len, seq_len): decode with long and short context, prefill with context, pure prefill,
# a short chunk with context. seq_len includes the q tokens.
MIXED = [(1, 150), (40, 170), (1, 37), (70, 70), (5, 90)]


def run(
    batch: Batch, kv_split_size: int = KV_SPLIT_SIZE, max_model_len: int = 0, out_dtype=EXACT, **kw
):
    cu, seq_lens = batch.metadata()
    max_model_len = max(max_model_len, batch.block_table.shape[1] * batch.key_cache.shape[1])
    out = torch.full(batch.q.shape, float("nan"), dtype=out_dtype, device=batch.q.device)
    return paged_attention(
        batch.q, batch.key_cache, batch.value_cache, out, cu, seq_lens, batch.block_table,
        batch.scale, max(s[0] for s in batch.specs), math.ceil(max_model_len / kv_split_size),
        kv_split_size=kv_split_size, **kw,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_size", HEAD_SIZES)
@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(2, 2), (8, 2), (6, 2)])
def test_attention_matches_float64(dtype, head_size, num_q_heads, num_kv_heads, device):
    batch = make_batch(MIXED, num_q_heads, num_kv_heads, head_size, dtype, device, pad=3)
    out = run(batch, CPU_SPLIT, out_dtype=dtype)
    n = sum(s[0] for s in MIXED)
    torch.testing.assert_close(out[:n].double(), reference(batch)[:n], **TOL[dtype])
    # Padding rows are not written.
    assert out[n:].isnan().all()
    # The kernel's final rounding is torch's: fp32 results are the same numbers before it.
    assert_rows_equal(out[:n], run(batch, CPU_SPLIT)[:n].to(dtype), "fp32 out rounded")


@pytest.mark.parametrize("block_size", [16, 32])
def test_attention_batch_invariant(block_size, device):
    batch = make_batch(MIXED, 8, 2, 64, torch.float16, device, block_size=block_size, pad=5)
    full = run(batch, CPU_SPLIT)
    for b in range(len(MIXED)):
        alone = run(batch.select(b), CPU_SPLIT)
        assert_rows_equal(alone, full[batch.token_rows(b)], f"request {b} alone vs in batch")
    bs = [4, 0, 2]
    other = run(batch.subset(bs), CPU_SPLIT)
    expected = torch.cat([full[batch.token_rows(b)] for b in bs])
    assert_rows_equal(other, expected, f"requests {bs} as their own batch")


def test_attention_chunked_prefill_invariant(device):
    specs = [(90, 160)]
    batch = make_batch(specs, 8, 2, 64, torch.float16, device, seed=1)
    full = run(batch, CPU_SPLIT)
    for bounds in ([0, 30, 60, 90], [0, 17, 90]):
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            chunk = run(batch.select(0, slice(lo, hi)), CPU_SPLIT)
            assert_rows_equal(chunk, full[lo:hi], f"chunk {lo}:{hi}")
    for i in range(86, 90):
        token = run(batch.select(0, slice(i, i + 1)), CPU_SPLIT)
        assert_rows_equal(token, full[i : i + 1], f"decode of token {i}")


# G = 4: BLOCK_M 16 (launcher's decode tile, and one with padding rows), 64 (its prefill
# tile), 128. G = 1: BLOCK_M 16 (padding rows), 16, 64. A smaller mix keeps the interpreter fast.
@pytest.mark.parametrize(
    "num_q_heads,num_kv_heads,block_qs", [(8, 2, [4, 3, 16, 32]), (2, 2, [16, 5, 64])]
)
@pytest.mark.parametrize("head_size", [64, 256] if torch.cuda.is_available() else [64])
def test_attention_split_equals_single_pass(num_q_heads, num_kv_heads, block_qs, head_size, device):
    specs = [(1, 150), (1, 37), (70, 70), (9, 130)]
    batch = make_batch(specs, num_q_heads, num_kv_heads, head_size, torch.float16, device, seed=2)
    base = run(batch, CPU_SPLIT, split=False, block_q=block_qs[0])
    for split in (False, True):
        for block_q in block_qs:
            out = run(batch, CPU_SPLIT, split=split, block_q=block_q)
            assert_rows_equal(out, base, f"split={split} block_q={block_q}")


def test_attention_nondeterministic_control(device):
    """A segment size that followed the batch (as a batch-dependent split count would) changes
    bits: the equality tests above can fail."""
    batch = make_batch(MIXED, 8, 2, 64, torch.float16, device, seed=3)
    a = run(batch, CPU_SPLIT)
    b = run(batch, 2 * CPU_SPLIT)
    torch.testing.assert_close(a, b, **TOL[torch.float16])
    differs = (a != b).flatten(1).any(1)
    n_multi_segment = sum(max(0, min(ql, sl - CPU_SPLIT)) for ql, sl in MIXED)
    assert differs.any(), "different segment sizes gave equal bits: the control is blind"
    assert differs.sum() <= n_multi_segment  # rows within one segment cannot differ


def test_attention_rejects_bad_input(device):
    batch = make_batch([(3, 20)], 4, 2, 64, torch.float16, device)
    cu, seq_lens = batch.metadata()
    args = (cu, seq_lens, batch.block_table, 0.1, 3, 1)
    q96 = torch.randn(3, 4, 96, dtype=torch.float16, device=device)
    cache96 = torch.randn(4, 16, 2, 96, dtype=torch.float16, device=device)
    with pytest.raises(ValueError, match="head_size=96"):
        paged_attention(q96, cache96, cache96, torch.empty_like(q96), *args)
    q32 = batch.q.float()
    with pytest.raises(ValueError, match="share one dtype"):
        paged_attention(q32, batch.key_cache, batch.value_cache, torch.empty_like(q32), *args)
    out_bf16 = torch.empty_like(batch.q, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="out must be"):
        paged_attention(batch.q, batch.key_cache, batch.value_cache, out_bf16, *args)
    out = torch.empty_like(batch.q)
    with pytest.raises(ValueError, match="kv_split_size"):
        paged_attention(batch.q, batch.key_cache, batch.value_cache, out, *args, kv_split_size=48)
    with pytest.raises(ValueError, match="int32"):
        paged_attention(batch.q, batch.key_cache, batch.value_cache, out, cu.long(), *args[1:])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_invariant_real_shapes(dtype, device):
    """32 q heads / 8 kv heads, head 128, block_size 16, default KV_SPLIT_SIZE: a decode batch
    of 64 (contexts up to 4096) plus prefills of 512-2048 tokens, some with context."""
    gen = torch.Generator().manual_seed(4)
    decode = [(1, int(n)) for n in torch.randint(1, 4097, (64,), generator=gen)]
    prefill = [(512, 512), (2048, 3000), (1024, 4096), (700, 1500)]
    specs = decode + prefill
    batch = make_batch(specs, 32, 8, 128, dtype, device, seed=5, pad=7)
    max_model_len = 4096
    full = run(batch, max_model_len=max_model_len)
    n = sum(s[0] for s in specs)
    assert not full[:n].isnan().any()
    native = run(batch, max_model_len=max_model_len, out_dtype=dtype)
    assert_rows_equal(native[:n], full[:n].to(dtype), f"{dtype} out vs fp32 out rounded")

    # Accuracy on a few requests (float64 reference of the whole batch is slow).
    for b in (0, 1, 64, 65):
        rows = batch.token_rows(b)
        torch.testing.assert_close(native[rows].double(), reference(batch.select(b)), **TOL[dtype])

    # Batch invariance: every request alone, and every other request, reversed, as a batch.
    for b in range(len(specs)):
        alone = run(batch.select(b), max_model_len=max_model_len)
        assert_rows_equal(alone, full[batch.token_rows(b)], f"request {b} alone")
    bs = list(range(len(specs) - 1, -1, -2))
    other = run(batch.subset(bs), max_model_len=max_model_len)
    expected = torch.cat([full[batch.token_rows(b)] for b in bs])
    assert_rows_equal(other, expected, "every other request as a batch")

    # Chunked prefill and decode of the last tokens of the (2048, 3000) request.
    b = 65
    for bounds in ([0, 1000, 2048], [0, 300, 1111, 2048]):
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            chunk = run(batch.select(b, slice(lo, hi)), max_model_len=max_model_len)
            assert_rows_equal(chunk, full[batch.token_rows(b, slice(lo, hi))], f"chunk {lo}:{hi}")
    for i in range(2040, 2048):
        token = run(batch.select(b, slice(i, i + 1)), max_model_len=max_model_len)
        assert_rows_equal(token, full[batch.token_rows(b, slice(i, i + 1))], f"decode {i}")

    # Launch modes and query-tile sizes (G = 4: BLOCK_M 16, 16, 64, 128).
    for split in (False, True):
        for block_q in (1, 4, 16, 32):
            out = run(batch, max_model_len=max_model_len, split=split, block_q=block_q)
            assert_rows_equal(out[:n], full[:n], f"split={split} block_q={block_q}")


@pytest.mark.gpu
def test_attention_cuda_graph_replay(device):
    """Grids and workspace come from shapes only: a graph captured once replays batches with
    other lengths and block tables (same shapes) and gives the eager bits, in both modes."""
    specs = [[(1, 4096), (1, 100), (1, 2000)], [(1, 100), (1, 2000), (1, 4096)]]
    batches = [
        make_batch(s, 32, 8, 128, torch.bfloat16, device, seed=i) for i, s in enumerate(specs)
    ]
    static = make_batch(specs[0], 32, 8, 128, torch.bfloat16, device, seed=9)
    cu, seq_lens = static.metadata()
    out = torch.empty_like(static.q, dtype=EXACT)
    for split in (True, False):

        def call(split=split):
            paged_attention(
                static.q, static.key_cache, static.value_cache, out, cu, seq_lens,
                static.block_table, static.scale, 1, 4096 // KV_SPLIT_SIZE,
                split=split,
            )  # fmt: skip

        call()  # compile before capturing
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            call()
        for i, batch in enumerate(batches):
            sources = (batch.q, batch.key_cache, batch.value_cache, batch.block_table)
            targets = (static.q, static.key_cache, static.value_cache, static.block_table)
            for dst, src in zip(targets + (cu, seq_lens), sources + batch.metadata(), strict=True):
                dst.copy_(src)
            graph.replay()
            eager = run(batch, max_model_len=4096, split=split)
            assert_rows_equal(out, eager, f"graph replay of batch {i}, split={split}")
