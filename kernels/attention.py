"""Deterministic paged attention (decoder, causal, GQA) over a paged KV cache.

What makes a query token's output depend only on its own request (not on the batch, on how
its prompt was chunked, on prefill vs decode, or on the launch mode):

- KV positions are reduced in fixed tiles of TILE_N positions aligned to position 0; TILE_N
  is a function of head_size only.
- Tiles are grouped into fixed segments of `kv_split_size` positions aligned to position 0.
  Each segment starts a fresh online softmax; segment partials (m, l, acc: unnormalised,
  fp32) are merged in increasing segment order by the one `_merge` helper, in both launch
  modes: "single pass" (a program merges its own segments) and "split" (phase 1 programs
  each compute one or more segments, every one from a fresh state, and write the partials
  to a workspace; phase 2 merges them). Same ops, same order, same bits.
- Every multiply-add is written as `tl.fma` or as `tl.dot(p, v, acc)`, and kernels compile
  with `enable_fp_fusion=False`, so the compiler cannot contract the two kernels differently.
- Row sums go through the tensor core (`p @ ones`) instead of `tl.sum`, whose reduction tree
  follows the register layout and so the query-tile size; rows of a tile never mix, so a
  row's bits do not depend on BLOCK_Q, i.e. on which other tokens share its program.
- Positions past a row's causal limit contribute exact zeros, and a tile or segment with no
  visible position is an exact identity (alpha = 1, or beta = 0): a program that visits more
  tiles than one of its rows needs leaves that row's bits alone, and so do phase 2's
  partials past a token's last segment (m = -inf, l = 0, acc = 0).
- Model features keep all of this. Sliding window (a query at position p sees keys in
  (p - window, p], vLLM's window_left = window - 1): a program starts at the tile and segment
  holding its first row's window start; the grid stays aligned to position 0, and the tiles
  or segments it skips (or visits for another row) are exact identities for a row, so a row's
  reduction depends only on its position and the window. Keys before that start are never
  loaded (vLLM frees their blocks). Logit softcap and ALiBi (slope_h * (key - query), which
  depends on positions only) transform each score in fp32 before the mask. Attention sinks
  (one logit per head in the softmax denominator, vLLM's and FA3's `s_aux`) are the initial
  (m, l, acc) = (sink, 1, 0) of the final merge, in both launch modes.
- Head sizes that are not powers of two (80, 96) run at the next power of two, with the
  extra dims masked to zero: a fixed shape per head_size, so the same bits in every launch.
- Which program computes a segment, how many query tokens share a program (BLOCK_Q) and
  the launch mode change no bits, so `plan()` may choose them from anything: shapes and the
  caller's bound on segments per request. Grids depend only on those, never on metadata
  values: no host sync, CUDA-graph capturable. A graph captured with the bound from
  max_model_len replays any batch of its shape; an eager step passes its real max_seq_len.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

KV_SPLIT_SIZE: int = 512
SUPPORTED_HEAD_SIZES = (64, 80, 96, 128, 256)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
# Split mode gives a few (query block, kv head) pairs several programs each, one per group of
# segments; it pays a workspace and a second kernel, so it runs only when a pair would get at
# least two programs: pairs <= SPLIT_TARGET_PROGRAMS / 2. The target (~30 programs per SM of
# a 132-SM H100/H200) also bounds the programs that find no segment when the bound is
# max_model_len (CUDA graphs). Its fp32 workspace is capped; past the cap: single pass.
SPLIT_TARGET_PROGRAMS = 4096
SPLIT_WORKSPACE_CAP_BYTES = 256 * 2**20
# Rows (query tokens x query heads of one kv head) per program: 16 is the smallest tl.dot
# accepts. Decode (one query token per request) puts one token in a program; prefill-heavy
# batches use PREFILL_BLOCK_M rows to reuse each K/V tile across more rows. A mixed batch
# launches its decodes apart (paged_attention_mixed), so no decode gets a prefill tile.
DECODE_BLOCK_M = 16
PREFILL_MIN_SEQLEN_Q = 64
# Prefill tile: 128 rows (x head_size 128; 64 rows for 256), 8 warps, 3 stages, within what
# Triton's fused-attention tutorial tunes over. Against the previous 64 rows, 4 warps, 2 stages
# (benchmarks/attention.py "ours_block_m64", H200, benchmarks/results/attention.json) it ties
# at a 1k prefill (0.084 vs 0.083 ms) and wins at 4k (0.389 vs 0.423) and 16k (1.400 vs 1.558);
# it lost only where 64 decodes shared its launch (mixed 1k: 0.454 vs 0.291, 4k: 0.724 vs 0.670).
PREFILL_BLOCK_M = 128
PREFILL_NUM_WARPS = 8
PREFILL_NUM_STAGES = 3
# Split phase 2 loads this many segments' partials before merging them in order, so their
# loads overlap instead of costing one memory latency per segment.
MERGE_CHUNK = 8
LOG2E = 1.4426950408889634
# The same constant inside kernels (a jit function reads module globals only as constexprs).
_LOG2E: tl.constexpr = tl.constexpr(LOG2E)


def tile_n_for(head_size: int) -> int:
    """KV positions per tile; a function of head_size only, so never of the batch."""
    return 32 if head_size > 128 else 64


def _launch_name(grid, kernel, args) -> dict:
    return {
        "name": f"{kernel.name} [H={args['NUM_Q_HEADS']}, D={args['HEAD_SIZE']}, "
        f"BLOCK_M={args.get('BLOCK_M', '-')}, grid={tuple(grid)}]"
    }


@triton.jit
def _find_request(
    cu_seqlens_q_ptr, index, num_seqs, BLOCK_Q: tl.constexpr, IN_BLOCKS: tl.constexpr
):
    """Last request b whose start is <= index; starts count query tokens or, with IN_BLOCKS,
    query blocks (cu_seqlens_q[b] // BLOCK_Q + b: room for each request's last partial block
    without a host sync)."""
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        start = tl.load(cu_seqlens_q_ptr + mid)
        if IN_BLOCKS:
            start = start // BLOCK_Q + mid
        if start <= index:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _merge(M, L, ACC, m_s, l_s, acc_s):
    """Fold one segment's partials into the running (M, L, ACC); rows are the leading dim.

    A segment with no visible position for a row (m_s = -inf, l_s = 0, acc_s = 0) is an exact
    identity: alpha = exp2(0) = 1, beta = 0, so ACC*1 + 0."""
    M_new = tl.maximum(M, m_s)
    # -inf - (-inf) would be NaN; rows with nothing yet get a finite reference instead.
    M_ref = tl.where(M_new == float("-inf"), 0.0, M_new)
    alpha = tl.exp2(M - M_ref)
    beta = tl.exp2(m_s - M_ref)
    L = tl.fma(L, alpha, l_s * beta)
    ACC = tl.fma(ACC, alpha[:, None], acc_s * beta[:, None])
    return M_new, L, ACC


@triton.jit
def _rows_and_dims(rows, d_ok, HEAD_PAD: tl.constexpr, HEAD_SIZE: tl.constexpr):
    """A [R, 1] row mask, extended to the padded head dims only where there are any: at
    head sizes that are powers of two the masks stay what they were before padding existed."""
    if HEAD_PAD == HEAD_SIZE:
        mask = rows
    else:
        mask = rows & d_ok[None, :]
    return mask


@triton.jit
def _initial_state(sinks_ptr, head, head_ok, ROWS: tl.constexpr, HEAD_PAD: tl.constexpr,
                   USE_SINKS: tl.constexpr):  # fmt: skip
    """(M, L, ACC) before the first segment is merged, the same in both launch modes.

    A sink is one more logit in each row's softmax denominator with no value: the state
    (m, l, acc) = (sink, 1, 0), what `_merge` would make of (-inf, 0, 0) and that partial.
    It comes first, so the segments that follow merge into it in the same order whatever
    the launch; a segment a row sees nothing of stays an exact identity (alpha = 1)."""
    if USE_SINKS:
        M = tl.load(sinks_ptr + head, mask=head_ok, other=float("-inf")).to(tl.float32) * _LOG2E
        L = tl.full([ROWS], 1.0, dtype=tl.float32)
    else:
        M = tl.full([ROWS], float("-inf"), dtype=tl.float32)
        L = tl.zeros([ROWS], dtype=tl.float32)
    ACC = tl.zeros([ROWS, HEAD_PAD], dtype=tl.float32)
    return M, L, ACC


@triton.jit
def _feature_scores(
    qk, pos, q_pos, slope, qk_scale, cap_scale, cap_log2, USE_SOFTCAP: tl.constexpr,
    USE_ALIBI: tl.constexpr,
):  # fmt: skip
    """Scores in the log2 domain, fp32, in vLLM's order: scale, softcap, ALiBi (the mask
    comes after). Elementwise, so a score's bits depend only on its q, k and positions."""
    if USE_SOFTCAP:
        # softcap * tanh(scale * qk / softcap), tanh(y) = sign(y) (1 - e) / (1 + e) with
        # e = exp(-2|y|) <= 1: no overflow at any score (vLLM's exp(y) - exp(-y) overflows).
        y = qk * cap_scale
        e = tl.exp2(tl.abs(y) * (-2.0 * _LOG2E))
        t = tl.div_rn(1.0 - e, 1.0 + e)
        s = tl.where(y < 0, -t, t) * cap_log2
    else:
        s = qk * qk_scale
    if USE_ALIBI:
        # slope_h * (key - query): positions only, never the chunk's context length (vLLM's
        # Triton kernel adds slope * (key - context_len), equal after softmax, but its bits
        # would follow the chunking). Exact in fp32 below 2^24 positions.
        s = tl.fma(slope[:, None], (pos[None, :] - q_pos[:, None]).to(tl.float32), s)
    return s


@triton.jit
def _attend_segment(
    q,  # [BLOCK_M, HEAD_PAD], q dtype
    q_pos,  # [BLOCK_M] absolute position of each row's token
    seg,
    kv_start,  # first position any row of this program sees (its first row's window start)
    kv_end,  # one past the last position any row of this program sees
    seq_len,
    k_cache_ptr,
    v_cache_ptr,
    block_table_row_ptr,
    kv_head,
    qk_scale,
    slope,  # [BLOCK_M] ALiBi slope of each row's head, log2 domain
    window,
    cap_scale,
    cap_log2,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    BLOCK_SIZE: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    TILE_N: tl.constexpr,
    TILES_PER_SEGMENT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    USE_ALIBI: tl.constexpr,
):
    """Online softmax over one segment's tiles, from a fresh state; returns unnormalised
    (m, l, acc) in the log2 domain, fp32. Tiles before kv_start's are skipped: for every row
    they hold no visible position, and such a tile is an exact identity (m stays, or stays
    -inf with l = 0, acc = 0), so whether a program visits it changes no row's bits."""
    offs_n = tl.arange(0, TILE_N)
    offs_d = tl.arange(0, HEAD_PAD)
    d_ok = offs_d < HEAD_SIZE
    # p @ ones: a row sum whose order is fixed by the MMA, not by the register layout.
    ones = tl.full([TILE_N, 16], 1.0, dtype=q.dtype)
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], dtype=tl.float32)
    tile_lo = tl.maximum(seg * TILES_PER_SEGMENT, kv_start // TILE_N)
    tile_hi = tl.minimum((seg + 1) * TILES_PER_SEGMENT, tl.cdiv(kv_end, TILE_N))
    for t in range(tile_lo, tile_hi):
        pos = t * TILE_N + offs_n
        # Slots at or past seq_len are unwritten (may hold NaN, and 0 * NaN poisons acc);
        # before kv_start, vLLM may have freed a sliding-window block (null block).
        in_seq = pos < seq_len
        if USE_WINDOW:
            in_kv = in_seq & (pos >= kv_start)
        else:
            in_kv = in_seq
        block = tl.load(block_table_row_ptr + pos // BLOCK_SIZE, mask=in_kv, other=0)
        slot = pos % BLOCK_SIZE
        k_off = block.to(tl.int64) * stride_kb + slot * stride_ks + kv_head * stride_kh
        v_off = block.to(tl.int64) * stride_vb + slot * stride_vs + kv_head * stride_vh
        if HEAD_PAD == HEAD_SIZE:
            k_mask = in_kv[None, :]
            v_mask = in_kv[:, None]
        else:
            k_mask = in_kv[None, :] & d_ok[:, None]
            v_mask = in_kv[:, None] & d_ok[None, :]
        k = tl.load(k_cache_ptr + k_off[None, :] + offs_d[:, None], mask=k_mask, other=0.0)
        v = tl.load(v_cache_ptr + v_off[:, None] + offs_d[None, :], mask=v_mask, other=0.0)
        qk = tl.dot(q, k)
        visible = (pos[None, :] <= q_pos[:, None]) & in_seq[None, :]
        if USE_WINDOW:
            visible = visible & (pos[None, :] > q_pos[:, None] - window)
        if USE_SOFTCAP or USE_ALIBI:
            s = _feature_scores(
                qk, pos, q_pos, slope, qk_scale, cap_scale, cap_log2, USE_SOFTCAP, USE_ALIBI
            )
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_ref[:, None]).to(q.dtype)
        else:
            qk = tl.where(visible, qk, float("-inf"))
            # scale > 0 commutes with max, so the max can be taken before scaling.
            m_new = tl.maximum(m, tl.max(qk, 1) * qk_scale)
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(tl.fma(qk, qk_scale, -m_ref[:, None])).to(q.dtype)
        alpha = tl.exp2(m - m_ref)
        l_i = tl.fma(l_i, alpha, tl.max(tl.dot(p, ones), 1))
        acc = tl.dot(p, v, acc * alpha[:, None])
        m = m_new
    return m, l_i, acc


@triton.jit(launch_metadata=_launch_name)
def _paged_attention_kernel(
    out_ptr,
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    cu_seqlens_q_ptr,
    seq_lens_ptr,
    block_table_ptr,
    ws_m_ptr,  # split only: [T, H, S] fp32, S = max_num_segments
    ws_l_ptr,  # split only: [T, H, S] fp32
    ws_acc_ptr,  # split only: [T, H, S, D] fp32
    qk_scale,
    num_seqs,
    max_num_segments,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_bt,
    stride_wt,
    stride_wh,
    alibi_slopes_ptr,  # [H] fp32, USE_ALIBI only
    sinks_ptr,  # [H], USE_SINKS only
    window,  # sliding window, USE_WINDOW only
    cap_scale,  # scale / softcap, USE_SOFTCAP only
    cap_log2,  # softcap * log2(e), USE_SOFTCAP only
    NUM_Q_HEADS: tl.constexpr,
    G: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,
    TILES_PER_SEGMENT: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    SPLIT: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    USE_WINDOW: tl.constexpr = False,
    USE_SOFTCAP: tl.constexpr = False,
    USE_ALIBI: tl.constexpr = False,
    USE_SINKS: tl.constexpr = False,
):
    """Grid (query blocks, kv heads[, P]). One program: BLOCK_Q tokens of one request x the G
    query heads of one kv head. SPLIT: compute segments program_id(2) + k * P from the first
    one the program's window reaches, below max_num_segments, write their partials.
    Otherwise: merge all segments the tile needs and write the output."""
    q_block = tl.program_id(0)
    kv_head = tl.program_id(1)
    # BLOCK_Q 1 (decode): one program per token, program i is token i.
    seq_idx = _find_request(cu_seqlens_q_ptr, q_block, num_seqs, BLOCK_Q, BLOCK_Q > 1)
    q_start = tl.load(cu_seqlens_q_ptr + seq_idx)
    q_len = tl.load(cu_seqlens_q_ptr + seq_idx + 1) - q_start
    if BLOCK_Q > 1:
        q_block_local = q_block - (q_start // BLOCK_Q + seq_idx)
    else:
        q_block_local = q_block - q_start
    # Also true for batch padding: tokens past the last request, requests with no tokens.
    if q_block_local * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq_idx)
    context_len = seq_len - q_len
    kv_end = context_len + tl.minimum(q_len, (q_block_local + 1) * BLOCK_Q)
    num_segments = tl.cdiv(kv_end, TILES_PER_SEGMENT * TILE_N)
    if USE_WINDOW:
        # The first row's window start; later rows' windows start later. Segments before it
        # hold no position any row sees.
        kv_start = tl.maximum(context_len + q_block_local * BLOCK_Q - window + 1, 0)
    else:
        kv_start = 0
    seg_lo = kv_start // (TILES_PER_SEGMENT * TILE_N)
    if SPLIT:
        # The workspace holds max_num_segments; a request past that bound (a caller error)
        # gets NaN from phase 2, never another request's partials.
        num_segments = tl.minimum(num_segments, max_num_segments)
        if seg_lo + tl.program_id(2) >= num_segments:
            return

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_PAD)
    d_ok = offs_d < HEAD_SIZE
    q_idx = q_block_local * BLOCK_Q + offs_m // G
    # Rows past BLOCK_Q * G pad BLOCK_M to a power of two when G is not one.
    row_ok = (offs_m < BLOCK_Q * G) & (q_idx < q_len)
    token = (q_start + q_idx).to(tl.int64)
    head = kv_head * G + offs_m % G
    q = tl.load(
        q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=_rows_and_dims(row_ok[:, None], d_ok, HEAD_PAD, HEAD_SIZE),
        other=0.0,
    )
    q_pos = context_len + q_idx
    block_table_row_ptr = block_table_ptr + seq_idx.to(tl.int64) * stride_bt
    if USE_ALIBI:
        slope = tl.load(alibi_slopes_ptr + head, mask=row_ok, other=0.0) * _LOG2E
    else:
        slope = tl.zeros([BLOCK_M], dtype=tl.float32)

    if SPLIT:
        # Each segment from a fresh state: which program computes it changes no bits.
        for seg in range(seg_lo + tl.program_id(2), num_segments, tl.num_programs(2)):
            m_s, l_s, acc_s = _attend_segment(
                q, q_pos, seg, kv_start, kv_end, seq_len, k_cache_ptr, v_cache_ptr,
                block_table_row_ptr, kv_head, qk_scale, slope, window, cap_scale, cap_log2,
                stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, BLOCK_SIZE,
                HEAD_SIZE, HEAD_PAD, TILE_N, TILES_PER_SEGMENT, BLOCK_M, USE_WINDOW,
                USE_SOFTCAP, USE_ALIBI,
            )  # fmt: skip
            ws_row = token * stride_wt + head * stride_wh + seg
            tl.store(ws_m_ptr + ws_row, m_s, mask=row_ok)
            tl.store(ws_l_ptr + ws_row, l_s, mask=row_ok)
            tl.store(
                ws_acc_ptr + ws_row[:, None] * HEAD_SIZE + offs_d[None, :],
                acc_s,
                mask=_rows_and_dims(row_ok[:, None], d_ok, HEAD_PAD, HEAD_SIZE),
            )
    else:
        M, L, ACC = _initial_state(sinks_ptr, head, row_ok, BLOCK_M, HEAD_PAD, USE_SINKS)
        for seg in range(seg_lo, num_segments):
            m_s, l_s, acc_s = _attend_segment(
                q, q_pos, seg, kv_start, kv_end, seq_len, k_cache_ptr, v_cache_ptr,
                block_table_row_ptr, kv_head, qk_scale, slope, window, cap_scale, cap_log2,
                stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, BLOCK_SIZE,
                HEAD_SIZE, HEAD_PAD, TILE_N, TILES_PER_SEGMENT, BLOCK_M, USE_WINDOW,
                USE_SOFTCAP, USE_ALIBI,
            )  # fmt: skip
            M, L, ACC = _merge(M, L, ACC, m_s, l_s, acc_s)
        # Every real row sees its own position, so L > 0; padding rows are not stored.
        o = tl.div_rn(ACC, L[:, None])
        tl.store(
            out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
            o.to(out_ptr.dtype.element_ty),
            mask=_rows_and_dims(row_ok[:, None], d_ok, HEAD_PAD, HEAD_SIZE),
        )


@triton.jit(launch_metadata=_launch_name)
def _merge_segments_kernel(
    out_ptr,
    ws_m_ptr,
    ws_l_ptr,
    ws_acc_ptr,
    cu_seqlens_q_ptr,
    seq_lens_ptr,
    num_seqs,
    max_num_segments,
    stride_ot,
    stride_oh,
    stride_wt,
    stride_wh,
    sinks_ptr,  # [H], USE_SINKS only
    window,  # sliding window, USE_WINDOW only
    NUM_Q_HEADS: tl.constexpr,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    SEGMENT: tl.constexpr,
    CHUNK: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    USE_WINDOW: tl.constexpr = False,
    USE_SINKS: tl.constexpr = False,
):
    """Split phase 2, grid (tokens, kv heads): merge segments 0..pos // SEGMENT of one token's
    G query heads in increasing order with the same `_merge` as single pass, normalise.

    Segments come CHUNK at a time, so their loads overlap; past the token's last segment the
    loads give m = -inf, l = 0, acc = 0, which `_merge` folds in as an exact identity, as
    single pass does for a segment that holds no visible position of a row. With a window,
    merging starts at the token's first visible segment: single pass may merge earlier ones
    (for another row of its program), which are identities for this token."""
    token = tl.program_id(0)
    kv_head = tl.program_id(1)
    # Tokens past the last request are batch padding (e.g. CUDA-graph buckets).
    if token >= tl.load(cu_seqlens_q_ptr + num_seqs):
        return
    seq_idx = _find_request(cu_seqlens_q_ptr, token, num_seqs, 1, False)
    q_start = tl.load(cu_seqlens_q_ptr + seq_idx)
    q_len = tl.load(cu_seqlens_q_ptr + seq_idx + 1) - q_start
    q_pos = tl.load(seq_lens_ptr + seq_idx) - q_len + (token - q_start)
    num_segments = q_pos // SEGMENT + 1
    if USE_WINDOW:
        seg_lo = tl.maximum(q_pos - window + 1, 0) // SEGMENT
    else:
        seg_lo = 0

    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, HEAD_PAD)
    d_ok = offs_d < HEAD_SIZE
    head = kv_head * G + offs_g
    head_ok = offs_g < G
    ws_row = token.to(tl.int64) * stride_wt + head * stride_wh
    M, L, ACC = _initial_state(sinks_ptr, head, head_ok, G_PAD, HEAD_PAD, USE_SINKS)
    num_read = tl.minimum(num_segments, max_num_segments)
    for chunk in range(seg_lo, num_read, CHUNK):
        for j in tl.static_range(CHUNK):
            seg = chunk + j
            ok = head_ok & (seg < num_read)
            m_s = tl.load(ws_m_ptr + ws_row + seg, mask=ok, other=float("-inf"))
            l_s = tl.load(ws_l_ptr + ws_row + seg, mask=ok, other=0.0)
            acc_s = tl.load(
                ws_acc_ptr + (ws_row + seg)[:, None] * HEAD_SIZE + offs_d[None, :],
                mask=_rows_and_dims(ok[:, None], d_ok, HEAD_PAD, HEAD_SIZE),
                other=0.0,
            )
            M, L, ACC = _merge(M, L, ACC, m_s, l_s, acc_s)
    o = tl.div_rn(ACC, tl.where(head_ok, L, 1.0)[:, None])
    # Past the caller's bound the partials were never computed: NaN, not a wrong number.
    o = tl.where(num_segments > max_num_segments, float("nan"), o)
    tl.store(
        out_ptr + token.to(tl.int64) * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
        o.to(out_ptr.dtype.element_ty),
        mask=_rows_and_dims(head_ok[:, None], d_ok, HEAD_PAD, HEAD_SIZE),
    )


def _check(
    q, key_cache, value_cache, out, cu_seqlens_q, seq_lens, block_table, scale, kv_split_size,
    max_num_segments,
):  # fmt: skip
    if q.dim() != 3 or key_cache.dim() != 4:
        raise ValueError(
            "det_backend: paged_attention expects q [tokens, heads, head_size] and caches "
            f"[blocks, block_size, kv_heads, head_size]; got q {tuple(q.shape)}, "
            f"key_cache {tuple(key_cache.shape)}."
        )
    head_size = q.shape[2]
    if head_size not in SUPPORTED_HEAD_SIZES:
        raise ValueError(
            f"det_backend: head_size={head_size} unsupported (supported: "
            f"{SUPPORTED_HEAD_SIZES}); no deterministic kernel exists for it."
        )
    if value_cache.shape != key_cache.shape or key_cache.shape[3] != head_size:
        raise ValueError(
            f"det_backend: key_cache {tuple(key_cache.shape)} and value_cache "
            f"{tuple(value_cache.shape)} must match, with head_size {head_size} last."
        )
    if out.shape != q.shape:
        raise ValueError(f"det_backend: out {tuple(out.shape)} must match q {tuple(q.shape)}.")
    if q.shape[1] % key_cache.shape[2] != 0:
        raise ValueError(
            f"det_backend: num_q_heads={q.shape[1]} is not a multiple of "
            f"num_kv_heads={key_cache.shape[2]}."
        )
    dtypes = {t.dtype for t in (q, key_cache, value_cache)}
    if len(dtypes) != 1 or q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            "det_backend: q, key_cache and value_cache must share one dtype among "
            f"{SUPPORTED_DTYPES}; got {q.dtype}, {key_cache.dtype}, {value_cache.dtype}."
        )
    if out.dtype not in (q.dtype, torch.float32):
        raise ValueError(
            f"det_backend: out must be {q.dtype} (or float32, which tests use to compare the "
            f"fp32 result before rounding); got {out.dtype}."
        )
    for name, t in (("q", q), ("key_cache", key_cache), ("value_cache", value_cache), ("out", out)):
        if t.stride(-1) != 1:
            raise ValueError(f"det_backend: {name} must be contiguous in its last dim.")
    for name, t in (
        ("cu_seqlens_q", cu_seqlens_q),
        ("seq_lens", seq_lens),
        ("block_table", block_table),
    ):
        if t.dtype != torch.int32:
            raise ValueError(f"det_backend: {name} must be int32, got {t.dtype}.")
    if cu_seqlens_q.shape[0] != seq_lens.shape[0] + 1 or block_table.shape[0] != seq_lens.shape[0]:
        raise ValueError(
            f"det_backend: cu_seqlens_q {tuple(cu_seqlens_q.shape)}, seq_lens "
            f"{tuple(seq_lens.shape)} and block_table {tuple(block_table.shape)} disagree on "
            "the number of requests."
        )
    tile_n = tile_n_for(head_size)
    if kv_split_size <= 0 or kv_split_size % tile_n != 0:
        raise ValueError(
            f"det_backend: kv_split_size={kv_split_size} must be a positive multiple of "
            f"TILE_N={tile_n} (head_size {head_size})."
        )
    if max_num_segments < 1:
        raise ValueError(f"det_backend: max_num_segments={max_num_segments} must be >= 1.")
    # The kernel takes each row's max before scaling, which needs scale > 0.
    if not scale > 0:
        raise ValueError(f"det_backend: softmax scale={scale} must be positive.")


def _check_features(q, sliding_window, softcap, alibi_slopes, sinks):
    num_q_heads = q.shape[1]
    if sliding_window is not None and (type(sliding_window) is not int or sliding_window < 1):
        raise ValueError(
            f"det_backend: sliding_window={sliding_window!r} must be a positive int (keys in "
            "(p - sliding_window, p] for a query at position p), or None."
        )
    if not softcap >= 0:
        raise ValueError(f"det_backend: softcap={softcap} must be >= 0 (0: off).")
    for name, t in (("alibi_slopes", alibi_slopes), ("sinks", sinks)):
        if t is None:
            continue
        if t.shape != (num_q_heads,) or t.device != q.device or t.stride(0) != 1:
            raise ValueError(
                f"det_backend: {name} must be one contiguous value per query head "
                f"[{num_q_heads}] on {q.device}; got {tuple(t.shape)} on {t.device}."
            )
    if alibi_slopes is not None and alibi_slopes.dtype != torch.float32:
        raise ValueError(f"det_backend: alibi_slopes must be float32, got {alibi_slopes.dtype}.")
    if sinks is not None and not sinks.dtype.is_floating_point:
        raise ValueError(f"det_backend: sinks must be floating point, got {sinks.dtype}.")


class LaunchPlan(NamedTuple):
    split: bool
    block_q: int  # query tokens per program
    block_m: int  # rows per program: block_q * G padded to a power of two, >= 16
    num_q_blocks: int  # grid dim 0
    segment_programs: int  # split: programs per (query block, kv head), grid dim 2; else 1
    num_warps: int
    num_stages: int


def _default_block_q(g: int, head_size: int, max_seqlen_q: int) -> int:
    if max_seqlen_q == 1:
        return 1
    if max_seqlen_q >= PREFILL_MIN_SEQLEN_Q:
        # BLOCK_M x head_size stays <= PREFILL_BLOCK_M x 128: the registers one tile needs.
        return max(1, PREFILL_BLOCK_M * 128 // max(head_size, 128) // g)
    return max(1, DECODE_BLOCK_M // g)


def plan(
    num_tokens: int,
    num_seqs: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_size: int,
    max_seqlen_q: int,
    max_num_segments: int,
    split: bool | None = None,
    block_q: int | None = None,
    segment_programs: int | None = None,
) -> LaunchPlan:
    """Launch mode, query tile and grid for one batch, from shapes and bounds (host ints) only;
    no choice here changes a bit of the output. split / block_q / segment_programs force one.

    Split when it adds parallelism: more than one segment is possible and the (query block,
    kv head) pairs are few enough to get at least two programs each."""
    g = num_q_heads // num_kv_heads
    if block_q is None:
        block_q = _default_block_q(g, head_size, max_seqlen_q)
    if block_q < 1:
        raise ValueError(f"det_backend: block_q={block_q} must be >= 1.")
    block_m = max(16, triton.next_power_of_2(block_q * g))
    # From shapes only: sum_b cdiv(q_len_b, BLOCK_Q) <= num_tokens // BLOCK_Q + num_seqs; with
    # BLOCK_Q 1 a program is a token, so no room per request is needed.
    num_q_blocks = num_tokens if block_q == 1 else num_tokens // block_q + num_seqs
    if segment_programs is None:
        pairs = num_q_blocks * num_kv_heads
        segment_programs = min(max_num_segments, max(1, SPLIT_TARGET_PROGRAMS // pairs))
    if segment_programs < 1:
        raise ValueError(f"det_backend: segment_programs={segment_programs} must be >= 1.")
    if split is None:
        workspace = num_tokens * num_q_heads * max_num_segments * (head_size + 2) * 4
        split = segment_programs > 1 and workspace <= SPLIT_WORKSPACE_CAP_BYTES
    # Registers grow with BLOCK_M x head_size and with the BLOCK_M x TILE_N scores, hence
    # max(head_size, 128): on sm_90, 128 rows x head 64 with 4 warps spills, 8 warps do not.
    if block_m * max(head_size, 128) > 64 * 128:
        num_warps, num_stages = PREFILL_NUM_WARPS, PREFILL_NUM_STAGES
    else:
        num_warps, num_stages = 4, 2
    return LaunchPlan(
        split, block_q, block_m, num_q_blocks, segment_programs if split else 1, num_warps,
        num_stages,
    )  # fmt: skip


def _split_workspace(num_tokens, num_q_heads, num_segments, head_size, device):
    """m, l: [T, H, S]; acc: [T, H, S, D], fp32, views of one allocation (acc first, m and l
    on 16-byte boundaries: Triton specialises kernels on pointer alignment)."""
    n = num_tokens * num_q_heads * num_segments
    n_pad = -(-n // 4) * 4
    buf = torch.empty(n * head_size + 2 * n_pad, dtype=torch.float32, device=device)
    shape = (num_tokens, num_q_heads, num_segments)
    acc = buf[: n * head_size].view(*shape, head_size)
    m = buf[n * head_size : n * head_size + n].view(shape)
    l_ = buf[n * head_size + n_pad : n * head_size + n_pad + n].view(shape)
    return m, l_, acc


def paged_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    out: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    scale: float,
    max_seqlen_q: int,
    max_num_segments: int,
    split: bool | None = None,
    block_q: int | None = None,
    segment_programs: int | None = None,
    kv_split_size: int = KV_SPLIT_SIZE,
    sliding_window: int | None = None,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of q over the paged KV cache; writes and returns `out`.

    q, out: [num_tokens, num_q_heads, head_size] (any token/head strides; out in q's dtype, or
    float32); key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_size] (any
    strides but the last).
    cu_seqlens_q: [num_seqs + 1]; seq_lens: [num_seqs] total KV length including this step's
    tokens, whose K/V are already cached; block_table: [num_seqs, max_blocks_per_seq].
    max_seqlen_q >= max query length. max_num_segments >= cdiv(max(seq_lens), kv_split_size),
    a host int (no sync): the batch's real max_seq_len in an eager step; max_model_len's for a
    CUDA graph that must replay any batch of its shape. Rows that break the bound come out NaN
    in split mode. split / block_q / segment_programs force a choice of `plan`; none changes
    the bits. Rows of `out` past cu_seqlens_q[-1] (batch padding) are left untouched.
    Model features, as vLLM passes them to an attention impl: sliding_window (a query at
    position p sees keys in (p - sliding_window, p]; positions before its request's first
    query's window are never read); softcap (scores become softcap * tanh(score / softcap);
    0 is off); alibi_slopes ([num_q_heads] fp32: slope_h * (key_pos - query_pos) added to
    the scaled score); sinks ([num_q_heads]: one logit per head in the softmax denominator).
    """
    _check(
        q, key_cache, value_cache, out, cu_seqlens_q, seq_lens, block_table, scale,
        kv_split_size, max_num_segments,
    )  # fmt: skip
    softcap = float(softcap or 0.0)
    _check_features(q, sliding_window, softcap, alibi_slopes, sinks)
    num_tokens, num_q_heads, head_size = q.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    p = plan(
        num_tokens, num_seqs, num_q_heads, num_kv_heads, head_size, max_seqlen_q,
        max_num_segments, split, block_q, segment_programs,
    )  # fmt: skip
    g = num_q_heads // num_kv_heads
    tile_n = tile_n_for(head_size)
    features = dict(
        HEAD_PAD=triton.next_power_of_2(head_size),
        USE_WINDOW=sliding_window is not None,
        USE_SINKS=sinks is not None,
    )

    ws_m = ws_l = ws_acc = None
    grid = (p.num_q_blocks, num_kv_heads)
    # Single pass ignores the bound: pass 0 so that it compiles once for every bound.
    ws_segments = 0
    if p.split:
        ws_m, ws_l, ws_acc = _split_workspace(
            num_tokens, num_q_heads, max_num_segments, head_size, q.device
        )
        grid = (p.num_q_blocks, num_kv_heads, p.segment_programs)
        ws_segments = max_num_segments
    _paged_attention_kernel[grid](
        out, q, key_cache, value_cache, cu_seqlens_q, seq_lens, block_table,
        ws_m, ws_l, ws_acc,
        scale * LOG2E, num_seqs, ws_segments,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        block_table.stride(0),
        ws_segments * num_q_heads, ws_segments,
        alibi_slopes_ptr=alibi_slopes, sinks_ptr=sinks, window=sliding_window or 0,
        cap_scale=scale / softcap if softcap else 0.0, cap_log2=softcap * LOG2E,
        NUM_Q_HEADS=num_q_heads, G=g, HEAD_SIZE=head_size, BLOCK_SIZE=block_size,
        TILE_N=tile_n, TILES_PER_SEGMENT=kv_split_size // tile_n,
        BLOCK_Q=p.block_q, BLOCK_M=p.block_m, SPLIT=p.split,
        USE_SOFTCAP=softcap > 0, USE_ALIBI=alibi_slopes is not None, **features,
        num_warps=p.num_warps, num_stages=p.num_stages, enable_fp_fusion=False,
    )  # fmt: skip
    if p.split:
        _merge_segments_kernel[(num_tokens, num_kv_heads)](
            out, ws_m, ws_l, ws_acc, cu_seqlens_q, seq_lens, num_seqs, ws_segments,
            out.stride(0), out.stride(1), ws_segments * num_q_heads, ws_segments,
            sinks_ptr=sinks, window=sliding_window or 0,
            NUM_Q_HEADS=num_q_heads, G=g, G_PAD=triton.next_power_of_2(g),
            HEAD_SIZE=head_size, SEGMENT=kv_split_size,
            CHUNK=min(MERGE_CHUNK, triton.next_power_of_2(max_num_segments)), **features,
            num_warps=4, enable_fp_fusion=False,
        )  # fmt: skip
    return out


def paged_attention_mixed(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    out: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    scale: float,
    max_seqlen_q: int,
    max_num_segments: int,
    num_decodes: int,
    num_decode_tokens: int,
    decode_max_num_segments: int,
    decode_max_seqlen_q: int = 1,
    prefill_cu_seqlens_q: torch.Tensor | None = None,
    prefill_block_q: int | None = None,
    **kw,
) -> torch.Tensor:
    """`paged_attention` of a batch whose first num_decodes requests (num_decode_tokens query
    tokens: cu_seqlens_q[num_decodes], read on the host) are decodes, as two launches: the
    decodes with plan()'s decode tile (one token per program) and decode_max_num_segments,
    the rest (prefills, chunked prefills) with the prefill tile and max_num_segments. The
    launches cover disjoint requests and write disjoint rows of `out`, and a row's bits depend
    neither on the tile nor on the other requests of its launch: the same bits as one launch.
    One launch gives each decode a tile of PREFILL_BLOCK_M rows of which it fills G: the
    split removes that waste.

    Host ints only, no sync. Not for a CUDA graph, which would freeze this batch's split.
    decode_max_seqlen_q >= every decode's query length; max_seqlen_q and max_num_segments bound
    the prefill part. prefill_cu_seqlens_q = cu_seqlens_q[num_decodes:] - num_decode_tokens
    (the kernel maps programs to requests from offsets that start at 0), which a caller may
    compute once for every layer; else it is computed here. prefill_block_q forces the prefill
    launch's query tile; other keywords go to both launches.
    """
    num_seqs = seq_lens.shape[0]
    nd, ndt = num_decodes, num_decode_tokens
    if not (0 <= nd <= num_seqs and 0 <= ndt <= q.shape[0]):
        raise ValueError(
            f"det_backend: num_decodes={nd}, num_decode_tokens={ndt} outside the batch "
            f"({num_seqs} requests, {q.shape[0]} tokens)."
        )
    if nd > 0:
        paged_attention(
            q[:ndt], key_cache, value_cache, out[:ndt], cu_seqlens_q[: nd + 1], seq_lens[:nd],
            block_table[:nd], scale, decode_max_seqlen_q, decode_max_num_segments, **kw,
        )  # fmt: skip
    if nd < num_seqs:
        if nd == 0:
            prefill_cu_seqlens_q = cu_seqlens_q
        elif prefill_cu_seqlens_q is None:
            prefill_cu_seqlens_q = cu_seqlens_q[nd:] - ndt
        if prefill_block_q is not None:
            kw = {**kw, "block_q": prefill_block_q}
        paged_attention(
            q[ndt:], key_cache, value_cache, out[ndt:], prefill_cu_seqlens_q, seq_lens[nd:],
            block_table[nd:], scale, max_seqlen_q, max_num_segments, **kw,
        )  # fmt: skip
    return out


def paged_attention_reference(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain torch in float64: gathers each request's K/V through its block table. Returns
    [num_tokens, num_q_heads, head_size] float64; rows past cu_seqlens_q[-1] are zero.
    Features as `paged_attention` takes them; positions outside a query's window are never
    gathered into its result (masked before the softmax)."""
    num_tokens, num_q_heads, head_size = q.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    g = num_q_heads // num_kv_heads
    out = torch.zeros(num_tokens, num_q_heads, head_size, dtype=torch.float64, device=q.device)
    cu, lens = cu_seqlens_q.tolist(), seq_lens.tolist()
    for b, seq_len in enumerate(lens):
        start, end = cu[b], cu[b + 1]
        if end == start:
            continue
        pos = torch.arange(seq_len, device=q.device)
        blocks = block_table[b].long()[pos // block_size]
        # [seq_len, kv_heads, D] -> [q_heads, seq_len, D]
        k = key_cache[blocks, pos % block_size].double().repeat_interleave(g, 1).transpose(0, 1)
        v = value_cache[blocks, pos % block_size].double().repeat_interleave(g, 1).transpose(0, 1)
        qb = q[start:end].double().transpose(0, 1)  # [q_heads, q_len, D]
        q_pos = seq_len - (end - start) + torch.arange(end - start, device=q.device)
        scores = (qb @ k.transpose(1, 2)) * scale  # [q_heads, q_len, seq_len]
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        rel = (pos[None, :] - q_pos[:, None]).double()  # key - query: <= 0 where visible
        if alibi_slopes is not None:
            scores = scores + alibi_slopes.double()[:, None, None] * rel
        hidden = rel > 0
        if sliding_window is not None:
            hidden = hidden | (rel <= -sliding_window)
        scores = scores.masked_fill(hidden[None], float("-inf"))
        if sinks is not None:
            # One more logit per head, with no value: it only joins the denominator.
            sink = sinks.double()[:, None, None].expand(-1, end - start, 1)
            probs = torch.cat([scores, sink], -1).softmax(-1)[..., :-1]
        else:
            probs = scores.softmax(-1)
        out[start:end] = (probs @ v).transpose(0, 1)
    return out
