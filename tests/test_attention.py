"""Paged attention: accuracy against float64, and bitwise invariance to the batch, to chunked
prefill, to decode vs prefill, and to every launch choice: mode, query-tile size, programs per
segment group, and the bound on segments that sizes the grid (a batch's real max_seq_len in
an eager step, max_model_len in a CUDA graph); the same with the model features (sliding
window, logit softcap, ALiBi, sinks) and the padded head sizes (80, 96).

CPU tests run under the Triton interpreter with a small kv_split_size so that requests of a
few hundred positions span several segments. The interpreter's tl.dot on bf16 is broken, so
CPU tests use fp16; GPU tests add bf16.
"""

import math

import pytest
import torch
from attention_inputs import (
    REAL_FEATURES,
    Batch,
    alibi_slopes,
    assert_rows_equal,
    make_batch,
    model_features,
    reference,
)
from det_backend.kernels.attention import (
    KV_SPLIT_SIZE,
    PREFILL_BLOCK_M,
    PREFILL_NUM_STAGES,
    PREFILL_NUM_WARPS,
    SPLIT_TARGET_PROGRAMS,
    SPLIT_WORKSPACE_CAP_BYTES,
    _merge_segments_kernel,
    _paged_attention_kernel,
    paged_attention,
    paged_attention_mixed,
    plan,
)

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
# Pure decode, then two requests with no tokens: vLLM's padding of a CUDA-graph batch.
DECODE = [(1, 150), (1, 37), (1, 64), (1, 65), (1, 1), (1, 200), (0, 0), (0, 0)]


def run(
    batch: Batch,
    kv_split_size: int = KV_SPLIT_SIZE,
    max_model_len: int = 0,
    out_dtype=EXACT,
    max_num_segments: int | None = None,
    **kw,
):
    """The launch a backend makes; by default the grid bound comes from max_model_len (at
    least the block table's capacity), as in a CUDA graph."""
    cu, seq_lens = batch.metadata()
    max_model_len = max(max_model_len, batch.block_table.shape[1] * batch.key_cache.shape[1])
    if max_num_segments is None:
        max_num_segments = math.ceil(max_model_len / kv_split_size)
    out = torch.full(batch.q.shape, float("nan"), dtype=out_dtype, device=batch.q.device)
    return paged_attention(
        batch.q, batch.key_cache, batch.value_cache, out, cu, seq_lens, batch.block_table,
        batch.scale, max(s[0] for s in batch.specs), max_num_segments,
        kv_split_size=kv_split_size, **kw,
    )  # fmt: skip


def true_max_segments(batch: Batch, kv_split_size: int) -> int:
    """The bound an eager step passes: from the batch's real max_seq_len."""
    return max(1, math.ceil(max(s[1] for s in batch.specs) / kv_split_size))


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


# G = 4: BLOCK_M 16 (decode tile, with padding rows), 16, 64, 128 (prefill tile). G = 1:
# BLOCK_M 16 (decode tile, padding rows), 16, 64. A smaller mix keeps the interpreter fast.
@pytest.mark.parametrize(
    "num_q_heads,num_kv_heads,block_qs", [(8, 2, [1, 4, 3, 16, 32]), (2, 2, [1, 16, 5, 64])]
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


# (max_num_segments, split, block_q, segment_programs); None: plan() chooses. With
# CPU_SPLIT, DECODE needs 4 segments (seq_len 200) and its block table holds 208 positions.
DECODE_LAUNCHES = [
    (4, False, None, None),  # bound from the real max_seq_len
    (4, True, None, None),
    (4, True, None, 1),  # one program walks every segment of its pair
    (4, True, None, 3),  # programs own segments {0, 3} and {1}, {2}
    (4, True, 2, 2),  # two tokens of one request would share a program: none here
    (9, None, None, None),  # bound from a max_model_len past the block table: grid of 9
    (9, True, None, 4),
    (17, True, 1, None),  # merge chunks of 8 with identity merges past each token's last
]


@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(8, 2), (2, 2)])
def test_attention_decode_launches_equal_bits(num_q_heads, num_kv_heads, device):
    """Pure decode with CUDA-graph padding (3 tokens past the last request, two requests with
    no tokens): every launch choice, and a grid from the real max_seq_len or from
    max_model_len, gives the same bits; padding rows are never written."""
    batch = make_batch(DECODE, num_q_heads, num_kv_heads, 64, torch.float16, device, pad=3)
    n = sum(s[0] for s in DECODE)
    assert true_max_segments(batch, CPU_SPLIT) == 4
    base = run(batch, CPU_SPLIT, max_num_segments=4, split=False, block_q=1)
    assert base[n:].isnan().all()
    torch.testing.assert_close(base[:n].double(), reference(batch)[:n], **TOL[torch.float16])
    for bound, split, block_q, programs in DECODE_LAUNCHES:
        out = run(
            batch, CPU_SPLIT, max_num_segments=bound, split=split, block_q=block_q,
            segment_programs=programs,
        )  # fmt: skip
        what = f"bound={bound} split={split} block_q={block_q} segment_programs={programs}"
        assert_rows_equal(out[:n], base[:n], what)
        assert out[n:].isnan().all(), f"{what}: padding rows written"


def test_attention_grid_from_true_max_equals_max_model_len(device):
    """The bound vLLM passes an eager step (cdiv(max_seq_len, split)) and the one a CUDA graph
    is captured with (cdiv(max_model_len, split)) lead plan() to different launches with the
    same bits, for decode and mixed batches."""
    for specs, seed in ((DECODE, 4), (MIXED, 5)):
        batch = make_batch(specs, 8, 2, 64, torch.float16, device, seed=seed, pad=2)
        n = sum(s[0] for s in specs)
        true_max = true_max_segments(batch, CPU_SPLIT)
        eager = run(batch, CPU_SPLIT, max_num_segments=true_max)
        graph = run(batch, CPU_SPLIT, max_num_segments=16)
        assert_rows_equal(eager[:n], graph[:n], f"{specs}: bound {true_max} vs 16")
    # One segment: single pass; a long max_model_len would have split it.
    short = make_batch([(1, 40), (1, 64)], 8, 2, 64, torch.float16, device, seed=7)
    one = run(short, CPU_SPLIT, max_num_segments=1)
    assert_rows_equal(one, run(short, CPU_SPLIT, max_num_segments=16), "short decode")
    assert not plan(2, 2, 8, 2, 64, 1, 1).split and plan(2, 2, 8, 2, 64, 1, 16).split


def test_attention_past_the_bound_is_nan(device):
    """A bound below a request's segments (a caller error) gives NaN in split mode, not
    another request's numbers; rows within the bound are exact."""
    batch = make_batch(DECODE, 8, 2, 64, torch.float16, device)
    full = run(batch, CPU_SPLIT, max_num_segments=4, split=False)
    low = run(batch, CPU_SPLIT, max_num_segments=2, split=True)
    for b, (q_len, seq_len) in enumerate(DECODE):
        rows = batch.token_rows(b)
        if q_len and seq_len > 2 * CPU_SPLIT:
            assert low[rows].isnan().all(), f"request {b} past the bound"
        else:
            assert_rows_equal(low[rows], full[rows], f"request {b} within the bound")


# Decodes first, as vLLM orders a mixed batch (det_backend/backend.py), with contexts that
# need fewer segments than the prefills' (3 vs 5 with CPU_SPLIT); then a prefill with context,
# a pure prefill, a short chunk and a request with no tokens (vLLM's request padding).
MIXED_DECODES_FIRST = [(1, 150), (1, 37), (1, 65), (40, 260), (70, 70), (5, 90), (0, 0)]


def run_mixed(
    batch: Batch, num_decodes: int, decode_bound: int, bound: int, kv_split_size=CPU_SPLIT, **kw
):
    """The launch the backend makes for a mixed batch: the first num_decodes requests with the
    decode tile and decode_bound, the rest with the prefill tile and bound."""
    cu, seq_lens = batch.metadata()
    q_lens = [s[0] for s in batch.specs]
    out = torch.full(batch.q.shape, float("nan"), dtype=EXACT, device=batch.q.device)
    return paged_attention_mixed(
        batch.q, batch.key_cache, batch.value_cache, out, cu, seq_lens, batch.block_table,
        batch.scale, max(q_lens[num_decodes:], default=1), bound, num_decodes,
        sum(q_lens[:num_decodes]), decode_bound, kv_split_size=kv_split_size, **kw,
    )  # fmt: skip


def test_attention_mixed_launch_equals_one_launch(device):
    """A mixed batch launched as decodes + prefills (each part with its own tile and bound)
    gives the bits of one launch, wherever the split falls; padding rows are never written."""
    specs = MIXED_DECODES_FIRST
    batch = make_batch(specs, 8, 2, 64, torch.float16, device, seed=11, pad=3)
    n = sum(s[0] for s in specs)
    one = run(batch, CPU_SPLIT, split=False)  # bound from max_model_len: 5 segments
    # One launch gives the decodes the prefill tile; apart, they get one token per program.
    assert plan(n + 3, len(specs), 8, 2, 64, 70, 5).block_q == PREFILL_BLOCK_M // 4
    assert plan(3, 3, 8, 2, 64, 1, 3).block_q == 1
    cu = batch.metadata()[0]
    for what, num_decodes, decode_bound, kw in (
        ("decodes apart, own bounds, plan()'s modes (split)", 3, 3, {}),
        ("prefill offsets given", 3, 9, dict(prefill_cu_seqlens_q=cu[3:] - 3, split=False)),
        ("a decode with the prefills, 64-row tile", 2, 3, dict(prefill_block_q=16, split=False)),
        ("no decode part", 0, 1, dict(split=False)),
    ):
        out = run_mixed(batch, num_decodes, decode_bound, 5, **kw)
        assert_rows_equal(out[:n], one[:n], what)
        assert out[n:].isnan().all(), f"{what}: padding rows written"
    with pytest.raises(ValueError, match="num_decodes"):
        run_mixed(batch, len(specs) + 1, 3, 5)


def test_attention_mixed_launch_without_prefills(device):
    """Zero prefills: only the decode launch runs; CUDA-graph padding rows stay unwritten."""
    specs = MIXED_DECODES_FIRST[:3]
    batch = make_batch(specs, 8, 2, 64, torch.float16, device, seed=12, pad=2)
    out = run_mixed(batch, 3, 3, 3)
    assert_rows_equal(out[:3], run(batch, CPU_SPLIT)[:3], "decodes alone")
    assert out[3:].isnan().all()


def test_plan_decode_uses_one_program_per_token():
    p = plan(64, 64, 32, 8, 128, 1, 8)
    assert (p.block_q, p.num_q_blocks, p.block_m) == (1, 64, 16)
    # Prefill-sized query tiles leave room for each request's partial last block.
    p = plan(300, 3, 32, 8, 128, 200, 8)
    assert p.block_q == PREFILL_BLOCK_M // 4 and p.num_q_blocks == 300 // p.block_q + 3


@pytest.mark.parametrize(
    "num_tokens,max_seqlen_q,bound,split",
    [
        (1, 1, 1, False),  # one segment: nothing to split
        (1, 1, 64, True),  # one request, 32k context: 8 pairs, 64 segments
        (8, 1, 4, True),
        (SPLIT_TARGET_PROGRAMS // 16, 1, 4, True),  # pairs = target / 2: two programs each
        (SPLIT_TARGET_PROGRAMS // 16 + 1, 1, 4, False),  # one program each: single pass
        (64, 1, 2048, False),  # 1M context: workspace over the cap
        (4096, 512, 64, False),  # prefill at long context: workspace over the cap
        (40, 40, 64, True),  # a short chunk at long context: 11 query blocks
    ],
)
def test_plan_splits_only_when_it_adds_programs(num_tokens, max_seqlen_q, bound, split):
    num_seqs = max(1, num_tokens // max_seqlen_q)
    p = plan(num_tokens, num_seqs, 32, 8, 128, max_seqlen_q, bound)
    assert p.split == split
    if split:
        assert 2 <= p.segment_programs <= bound
        assert p.num_q_blocks * 8 * p.segment_programs <= SPLIT_TARGET_PROGRAMS
        assert num_tokens * 32 * bound * 130 * 4 <= SPLIT_WORKSPACE_CAP_BYTES
    else:
        assert p.segment_programs == 1


def test_plan_tiles():
    # head_size <= 128: prefill tile of PREFILL_BLOCK_M rows with the prefill warps/stages.
    p = plan(4096, 2, 32, 8, 128, 2048, 8)
    assert (p.block_m, p.num_warps, p.num_stages) == (
        PREFILL_BLOCK_M, PREFILL_NUM_WARPS, PREFILL_NUM_STAGES,
    )  # fmt: skip
    # head_size 256: half the rows, the same registers per tile; head_size 64: same rows.
    assert plan(4096, 2, 32, 8, 256, 2048, 8).block_m == PREFILL_BLOCK_M // 2
    p = plan(4096, 2, 32, 8, 64, 2048, 8)
    assert (p.block_m, p.num_warps) == (PREFILL_BLOCK_M, PREFILL_NUM_WARPS)
    # The previous prefill tile (64 rows x 128, 4 warps, 2 stages) stays reachable.
    p = plan(4096, 2, 32, 8, 128, 2048, 8, block_q=16)
    assert (p.block_m, p.num_warps, p.num_stages) == (64, 4, 2)
    with pytest.raises(ValueError, match="block_q"):
        plan(8, 8, 32, 8, 128, 1, 4, block_q=0)
    with pytest.raises(ValueError, match="segment_programs"):
        plan(8, 8, 32, 8, 128, 1, 4, segment_programs=0)


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
    q72 = torch.randn(3, 4, 72, dtype=torch.float16, device=device)
    cache72 = torch.randn(4, 16, 2, 72, dtype=torch.float16, device=device)
    with pytest.raises(ValueError, match="head_size=72"):
        paged_attention(q72, cache72, cache72, torch.empty_like(q72), *args)
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
    caches = (batch.q, batch.key_cache, batch.value_cache, out)
    for bad, match in (
        (dict(sliding_window=0), "sliding_window"),
        (dict(sliding_window=4.0), "sliding_window"),
        (dict(softcap=-1.0), "softcap"),
        (dict(alibi_slopes=torch.ones(4, dtype=torch.float64, device=device)), "float32"),
        (dict(alibi_slopes=torch.ones(2, device=device)), "alibi_slopes"),
        (dict(sinks=torch.ones(4, 1, device=device)), "sinks"),
        (dict(sinks=torch.ones(4, dtype=torch.int32, device=device)), "floating point"),
    ):
        with pytest.raises(ValueError, match=match):
            paged_attention(*caches, *args, **bad)


# Model features: a window of 80 positions spans two or three 64-position tiles, and a
# kv_split_size of 128 puts two tiles in a segment, so windows start inside tiles and segments.
FEATURE_SPLIT = 128
# (q_len, seq_len): a decode far past its window, a prefill chunk whose rows' windows start in
# different tiles, a request shorter than the window, a short chunk.
FEATURE_SPECS = [(1, 300), (50, 260), (1, 40), (6, 200)]


@pytest.mark.parametrize(
    "features,head_size",
    [(f, 64) for f in ("window", "softcap", "alibi", "sinks", "all")] + [("none", 80), ("all", 96)],
)
def test_attention_features_match_float64(features, head_size, device):
    batch = make_batch(FEATURE_SPECS, 8, 2, head_size, torch.float16, device, seed=11, pad=2)
    kw = model_features(features, 8, device)
    out = run(batch, FEATURE_SPLIT, out_dtype=torch.float16, **kw)
    n = sum(s[0] for s in FEATURE_SPECS)
    expected = reference(batch, **kw)[:n]
    torch.testing.assert_close(out[:n].double(), expected, **TOL[torch.float16])
    assert out[n:].isnan().all()
    if kw:
        # The features move the result by more than the tolerance: the check above can fail.
        plain = reference(batch)[:n]
        assert (plain - expected).abs().max() > 10 * TOL[torch.float16]["atol"]


@pytest.mark.parametrize("features", ["window+sinks", "all"])
def test_attention_features_invariant(features, device):
    """With a window (and softcap, ALiBi, sinks): the same bits alone and batched, in chunks,
    as decode, and in every launch, on a cache whose positions before each request's first
    window are NaN (blocks vLLM frees): never read. Controls: the same request with its grid
    meeting the window at another offset (what aligning tiles to the window start, as FA3's
    sliding-window n_offset does, would give a chunk) and another segment size change bits."""
    kw = model_features(features, 8, device)
    clean = make_batch(FEATURE_SPECS, 8, 2, 64, torch.float16, device, seed=12, pad=3)
    batch = clean.poisoned_before_windows(kw["sliding_window"])
    n = sum(s[0] for s in FEATURE_SPECS)
    full = run(batch, FEATURE_SPLIT, **kw)
    assert not full[:n].isnan().any() and full[n:].isnan().all()
    torch.testing.assert_close(full[:n].double(), reference(clean, **kw)[:n], **TOL[torch.float16])

    for b in range(len(FEATURE_SPECS)):
        alone = run(batch.select(b), FEATURE_SPLIT, **kw)
        assert_rows_equal(alone, full[batch.token_rows(b)], f"request {b} alone vs in batch")
    for lo, hi in ((0, 17), (17, 50), (48, 49), (49, 50)):
        chunk = run(batch.select(1, slice(lo, hi)), FEATURE_SPLIT, **kw)
        assert_rows_equal(chunk, full[batch.token_rows(1, slice(lo, hi))], f"chunk {lo}:{hi}")
    for split, block_q, programs, bound in (
        (False, 1, None, None),
        (True, 4, None, None),
        (True, 16, 1, None),
        (True, 1, 3, None),
        (None, None, None, true_max_segments(batch, FEATURE_SPLIT)),
    ):
        out = run(
            batch, FEATURE_SPLIT, split=split, block_q=block_q, segment_programs=programs,
            max_num_segments=bound, **kw,
        )  # fmt: skip
        what = f"split={split} block_q={block_q} segment_programs={programs} bound={bound}"
        assert_rows_equal(out[:n], full[:n], what)
        assert out[n:].isnan().all(), f"{what}: padding rows written"

    rows = batch.token_rows(1)
    shifted = run(batch.shifted(1, 1), FEATURE_SPLIT, **kw)
    torch.testing.assert_close(shifted, full[rows], **TOL[torch.float16])
    assert not torch.equal(shifted, full[rows]), "a shifted grid gave equal bits: control blind"
    other = run(batch, 2 * FEATURE_SPLIT, **kw)
    assert not torch.equal(other[:n], full[:n]), "another segment size gave equal bits"


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

    # As the backend launches this mixed batch: the 64 decodes apart, each part with the bound
    # from its own max_seq_len; the prefills with the prefill tile or the 64-row one.
    decode_bound = true_max_segments(batch.subset(list(range(64))), KV_SPLIT_SIZE)
    for prefill_block_q in (None, 16):
        out = run_mixed(batch, 64, decode_bound, 8, KV_SPLIT_SIZE, prefill_block_q=prefill_block_q)
        assert_rows_equal(out[:n], full[:n], f"decodes apart, prefill_block_q={prefill_block_q}")
        assert out[n:].isnan().all()

    # The decodes alone, as vLLM launches them: grid from their real max_seq_len (eager) or
    # from a max_model_len of 4096 or 32768 (CUDA graph), and programs per segment group.
    decodes = batch.subset(list(range(64)))
    expected = full[:64]
    true_max = true_max_segments(decodes, KV_SPLIT_SIZE)
    for bound, split, programs in (
        (true_max, None, None),
        (8, None, None),
        (64, None, None),
        (true_max, True, 1),
        (64, True, 3),
        (64, False, None),
    ):
        out = run(decodes, max_num_segments=bound, split=split, segment_programs=programs)
        assert_rows_equal(out, expected, f"decode bound={bound} split={split} P={programs}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("model", list(REAL_FEATURES))
def test_attention_features_invariant_real_shapes(model, dtype, device):
    """Each model's features at real sizes, default KV_SPLIT_SIZE, block_size 16: float64
    accuracy on a few requests; the same bits alone and batched, in chunks, as decode and in
    every launch; the cache before each request's first window is NaN (never read); the
    shifted-grid control differs."""
    num_q_heads, num_kv_heads, head_size, spec, scale = REAL_FEATURES[model]
    kw = dict(spec)
    gen = torch.Generator().manual_seed(6)
    if kw.pop("sinks", False):
        kw["sinks"] = (3 + 2 * torch.randn(num_q_heads, generator=gen)).to(dtype).to(device)
    if kw.pop("alibi_slopes", False):
        kw["alibi_slopes"] = alibi_slopes(num_q_heads).to(device)
    decode = [(1, int(n)) for n in torch.randint(1, 8193, (32,), generator=gen)]
    prefill = [(512, 512), (2048, 6000), (1024, 8192), (700, 1500)]
    specs = decode + prefill
    clean = make_batch(specs, num_q_heads, num_kv_heads, head_size, dtype, device, seed=7, pad=5)
    clean.scale = scale
    window = kw.get("sliding_window")
    batch = clean.poisoned_before_windows(window) if window else clean
    max_model_len = 8192
    n = sum(s[0] for s in specs)
    full = run(batch, max_model_len=max_model_len, **kw)
    assert not full[:n].isnan().any() and full[n:].isnan().all()
    native = run(batch, max_model_len=max_model_len, out_dtype=dtype, **kw)
    assert_rows_equal(native[:n], full[:n].to(dtype), f"{dtype} out vs fp32 out rounded")
    for b in (0, 1, 32, 33):
        expected = reference(clean.select(b), **kw)
        torch.testing.assert_close(native[batch.token_rows(b)].double(), expected, **TOL[dtype])

    for b in range(len(specs)):
        alone = run(batch.select(b), max_model_len=max_model_len, **kw)
        assert_rows_equal(alone, full[batch.token_rows(b)], f"request {b} alone")
    bs = list(range(len(specs) - 1, -1, -2))
    other = run(batch.subset(bs), max_model_len=max_model_len, **kw)
    expected = torch.cat([full[batch.token_rows(b)] for b in bs])
    assert_rows_equal(other, expected, "every other request as a batch")

    b = 33  # (2048, 6000): context 3952
    for bounds in ([0, 1000, 2048], [0, 300, 1111, 2048]):
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            chunk = run(batch.select(b, slice(lo, hi)), max_model_len=max_model_len, **kw)
            assert_rows_equal(chunk, full[batch.token_rows(b, slice(lo, hi))], f"chunk {lo}:{hi}")
    for i in range(2044, 2048):
        token = run(batch.select(b, slice(i, i + 1)), max_model_len=max_model_len, **kw)
        assert_rows_equal(token, full[batch.token_rows(b, slice(i, i + 1))], f"decode {i}")

    for split in (False, True):
        for block_q in (1, 4, 16):
            out = run(batch, max_model_len=max_model_len, split=split, block_q=block_q, **kw)
            assert_rows_equal(out[:n], full[:n], f"split={split} block_q={block_q}")
    decodes = batch.subset(list(range(32)))
    for bound, split, programs in ((true_max_segments(decodes, KV_SPLIT_SIZE), None, None),
                                   (64, True, 3), (64, False, None)):  # fmt: skip
        out = run(decodes, max_num_segments=bound, split=split, segment_programs=programs, **kw)
        assert_rows_equal(out, full[:32], f"decode bound={bound} split={split} P={programs}")

    # Control: the prefill request 16 positions later (a NaN block first, outside its
    # windows) when its first window starts past position 0; else another segment size.
    rows = batch.token_rows(b)
    if window is not None and window < specs[b][1] - specs[b][0]:
        control = run(batch.shifted(b, 1), max_model_len=max_model_len + 16, **kw)
    else:
        control = run(batch.select(b), 2 * KV_SPLIT_SIZE, max_model_len=max_model_len, **kw)
    torch.testing.assert_close(control.to(dtype).double(), native[rows].double(), **TOL[dtype])
    assert not torch.equal(control, full[rows]), f"{model}: the control gave equal bits"


def _compiled_variants() -> int:
    kernels = (_paged_attention_kernel, _merge_segments_kernel)
    return sum(len(cache[0]) for k in kernels for cache in k.device_caches.values())


@pytest.mark.gpu
@pytest.mark.parametrize("split", [None, True, False])
def test_attention_cuda_graph_replay(split, device):
    """vLLM's V1 flow for a full decode graph: an eager warm-up with dummy seq_lens of 1 and
    the max_model_len bound (what the backend's build() gives such a batch), then a capture
    with the same bound, which must compile nothing: loading a Triton module mid-capture is
    an error. The graph then replays batches of other lengths and block tables and gives the
    bits of eager launches sized from their real max_seq_len."""
    bound = 8192 // KV_SPLIT_SIZE
    pool_specs = [(1, 8000), (1, 4096), (1, 2000), (1, 513), (1, 100), (1, 40), (1, 1)]
    pool = make_batch(pool_specs, 32, 8, 128, torch.bfloat16, device, seed=9)
    subsets = [[1, 4, 2], [4, 2, 0], [6, 3, 5]]
    static = pool.subset(subsets[0])  # shares pool's KV cache; q and block table its own
    cu, seq_lens = static.metadata()
    out = torch.empty_like(static.q, dtype=EXACT)

    def call():
        paged_attention(
            static.q, static.key_cache, static.value_cache, out, cu, seq_lens,
            static.block_table, static.scale, 1, bound, split=split,
        )  # fmt: skip

    for kernel in (_paged_attention_kernel, _merge_segments_kernel):
        kernel.device_caches.clear()  # so that a variant only the capture needs would show
    seq_lens.fill_(1)
    call()
    torch.cuda.synchronize()
    compiled = _compiled_variants()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    assert _compiled_variants() == compiled
    for bs in subsets:
        batch = pool.subset(bs)
        static.q.copy_(batch.q)
        static.block_table.copy_(batch.block_table)
        seq_lens.copy_(batch.metadata()[1])
        graph.replay()
        eager = run(batch, max_num_segments=true_max_segments(batch, KV_SPLIT_SIZE))
        assert_rows_equal(out, eager, f"graph replay of requests {bs}, split={split}")
