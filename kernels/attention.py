"""Deterministic paged attention (decoder, causal, GQA) over a paged KV cache.

What makes a query token's output depend only on its own request (not on the batch, on how
its prompt was chunked, on prefill vs decode, or on the launch mode):

- KV positions are reduced in fixed tiles of TILE_N positions aligned to position 0; TILE_N
  is a function of head_size only.
- Tiles are grouped into fixed segments of `kv_split_size` positions aligned to position 0.
  Each segment starts a fresh online softmax; segment partials (m, l, acc: unnormalised,
  fp32) are merged in increasing segment order by the one `_merge` helper, in both launch
  modes: "single pass" (a program merges its own segments) and "split" (phase 1 writes every
  segment's partials to a workspace, phase 2 merges them). Same ops, same order, same bits.
- Every multiply-add is written as `tl.fma` or as `tl.dot(p, v, acc)`, and kernels compile
  with `enable_fp_fusion=False`, so the compiler cannot contract the two kernels differently.
- Row sums go through the tensor core (`p @ ones`) instead of `tl.sum`, whose reduction tree
  follows the register layout and so the query-tile size; rows of a tile never mix, so a
  row's bits do not depend on BLOCK_Q, i.e. on which other tokens share its program.
- Positions past a row's causal limit contribute exact zeros, and a tile or segment with no
  visible position is an exact identity (alpha = 1, or beta = 0): a program that visits more
  tiles than one of its rows needs leaves that row's bits alone.
- Grid sizes depend only on tensor shapes and caller-given bounds, never on metadata values:
  no host sync, CUDA-graph capturable.
"""

import torch
import triton
import triton.language as tl

KV_SPLIT_SIZE: int = 512
SUPPORTED_HEAD_SIZES = (64, 128, 256)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
# Split mode keeps decode of a few long requests parallel; its fp32 workspace is capped so a
# large batch falls back to single pass instead of allocating gigabytes.
SPLIT_WORKSPACE_CAP_BYTES = 256 * 2**20
SPLIT_MAX_TOKENS = 64
# Rows (query tokens x query heads of one kv head) per program: 16 is the smallest tl.dot
# accepts; prefill-heavy batches use 64 to reuse each K/V tile across more rows.
DECODE_BLOCK_M = 16
PREFILL_BLOCK_M = 64
PREFILL_MIN_SEQLEN_Q = 64
LOG2E = 1.4426950408889634


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
    query blocks (cu_seqlens_q[b] // BLOCK_Q + b, an upper bound needing no host sync)."""
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
def _attend_segment(
    q,  # [BLOCK_M, HEAD_SIZE], q dtype
    q_pos,  # [BLOCK_M] absolute position of each row's token
    seg,
    kv_end,  # one past the last position any row of this program sees
    seq_len,
    k_cache_ptr,
    v_cache_ptr,
    block_table_row_ptr,
    kv_head,
    qk_scale,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    BLOCK_SIZE: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,
    TILES_PER_SEGMENT: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Online softmax over one segment's tiles, from a fresh state; returns unnormalised
    (m, l, acc) in the log2 domain, fp32."""
    offs_n = tl.arange(0, TILE_N)
    offs_d = tl.arange(0, HEAD_SIZE)
    # p @ ones: a row sum whose order is fixed by the MMA, not by the register layout.
    ones = tl.full([TILE_N, 16], 1.0, dtype=q.dtype)
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_SIZE], dtype=tl.float32)
    tile_lo = seg * TILES_PER_SEGMENT
    tile_hi = tl.minimum(tile_lo + TILES_PER_SEGMENT, tl.cdiv(kv_end, TILE_N))
    for t in range(tile_lo, tile_hi):
        pos = t * TILE_N + offs_n
        # Slots at or past seq_len are unwritten (may hold NaN, and 0 * NaN poisons acc).
        in_seq = pos < seq_len
        block = tl.load(block_table_row_ptr + pos // BLOCK_SIZE, mask=in_seq, other=0)
        slot = pos % BLOCK_SIZE
        k_off = block.to(tl.int64) * stride_kb + slot * stride_ks + kv_head * stride_kh
        v_off = block.to(tl.int64) * stride_vb + slot * stride_vs + kv_head * stride_vh
        k = tl.load(k_cache_ptr + k_off[None, :] + offs_d[:, None], mask=in_seq[None, :], other=0.0)
        v = tl.load(v_cache_ptr + v_off[:, None] + offs_d[None, :], mask=in_seq[:, None], other=0.0)
        qk = tl.dot(q, k)
        visible = (pos[None, :] <= q_pos[:, None]) & in_seq[None, :]
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
    ws_m_ptr,  # split only: [T, H, S] fp32
    ws_l_ptr,  # split only: [T, H, S] fp32
    ws_acc_ptr,  # split only: [T, H, S, D] fp32
    qk_scale,
    num_seqs,
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
    NUM_Q_HEADS: tl.constexpr,
    G: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,
    TILES_PER_SEGMENT: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """Grid (query blocks, kv heads[, segments]). One program: BLOCK_Q tokens of one request x
    the G query heads of one kv head. SPLIT: compute segment program_id(2), write partials.
    Otherwise: merge all segments the tile needs and write the output."""
    q_block = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq_idx = _find_request(cu_seqlens_q_ptr, q_block, num_seqs, BLOCK_Q, True)
    q_start = tl.load(cu_seqlens_q_ptr + seq_idx)
    q_len = tl.load(cu_seqlens_q_ptr + seq_idx + 1) - q_start
    q_block_local = q_block - (q_start // BLOCK_Q + seq_idx)
    if q_block_local * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq_idx)
    context_len = seq_len - q_len
    kv_end = context_len + tl.minimum(q_len, (q_block_local + 1) * BLOCK_Q)
    num_segments = tl.cdiv(kv_end, TILES_PER_SEGMENT * TILE_N)
    if SPLIT:
        seg = tl.program_id(2)
        if seg >= num_segments:
            return

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_SIZE)
    q_idx = q_block_local * BLOCK_Q + offs_m // G
    # Rows past BLOCK_Q * G pad BLOCK_M to a power of two when G is not one.
    row_ok = (offs_m < BLOCK_Q * G) & (q_idx < q_len)
    token = (q_start + q_idx).to(tl.int64)
    head = kv_head * G + offs_m % G
    q = tl.load(
        q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    q_pos = context_len + q_idx
    block_table_row_ptr = block_table_ptr + seq_idx.to(tl.int64) * stride_bt

    if SPLIT:
        m_s, l_s, acc_s = _attend_segment(
            q, q_pos, seg, kv_end, seq_len, k_cache_ptr, v_cache_ptr, block_table_row_ptr,
            kv_head, qk_scale, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
            BLOCK_SIZE, HEAD_SIZE, TILE_N, TILES_PER_SEGMENT, BLOCK_M,
        )  # fmt: skip
        ws_row = token * stride_wt + head * stride_wh + seg
        tl.store(ws_m_ptr + ws_row, m_s, mask=row_ok)
        tl.store(ws_l_ptr + ws_row, l_s, mask=row_ok)
        tl.store(
            ws_acc_ptr + ws_row[:, None] * HEAD_SIZE + offs_d[None, :], acc_s, mask=row_ok[:, None]
        )
    else:
        M = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        L = tl.zeros([BLOCK_M], dtype=tl.float32)
        ACC = tl.zeros([BLOCK_M, HEAD_SIZE], dtype=tl.float32)
        for seg in range(0, num_segments):
            m_s, l_s, acc_s = _attend_segment(
                q, q_pos, seg, kv_end, seq_len, k_cache_ptr, v_cache_ptr, block_table_row_ptr,
                kv_head, qk_scale, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs,
                stride_vh, BLOCK_SIZE, HEAD_SIZE, TILE_N, TILES_PER_SEGMENT, BLOCK_M,
            )  # fmt: skip
            M, L, ACC = _merge(M, L, ACC, m_s, l_s, acc_s)
        # Every real row sees position 0, so L > 0; padding rows are not stored.
        o = tl.div_rn(ACC, L[:, None])
        tl.store(
            out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
            o.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None],
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
    stride_ot,
    stride_oh,
    stride_wt,
    stride_wh,
    NUM_Q_HEADS: tl.constexpr,
    H_PAD: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    SEGMENT: tl.constexpr,
):
    """Split phase 2, one program per token (all its heads): merge the token's segments
    0..pos // SEGMENT in increasing order with the same `_merge` as single pass, normalise."""
    token = tl.program_id(0)
    # Tokens past the last request are batch padding (e.g. CUDA-graph buckets).
    if token >= tl.load(cu_seqlens_q_ptr + num_seqs):
        return
    seq_idx = _find_request(cu_seqlens_q_ptr, token, num_seqs, 1, False)
    q_start = tl.load(cu_seqlens_q_ptr + seq_idx)
    q_len = tl.load(cu_seqlens_q_ptr + seq_idx + 1) - q_start
    q_pos = tl.load(seq_lens_ptr + seq_idx) - q_len + (token - q_start)

    head = tl.arange(0, H_PAD)
    offs_d = tl.arange(0, HEAD_SIZE)
    head_ok = head < NUM_Q_HEADS
    ws_row = token.to(tl.int64) * stride_wt + head * stride_wh
    M = tl.full([H_PAD], float("-inf"), dtype=tl.float32)
    L = tl.zeros([H_PAD], dtype=tl.float32)
    ACC = tl.zeros([H_PAD, HEAD_SIZE], dtype=tl.float32)
    for seg in range(0, q_pos // SEGMENT + 1):
        m_s = tl.load(ws_m_ptr + ws_row + seg, mask=head_ok, other=float("-inf"))
        l_s = tl.load(ws_l_ptr + ws_row + seg, mask=head_ok, other=0.0)
        acc_s = tl.load(
            ws_acc_ptr + (ws_row + seg)[:, None] * HEAD_SIZE + offs_d[None, :],
            mask=head_ok[:, None],
            other=0.0,
        )
        M, L, ACC = _merge(M, L, ACC, m_s, l_s, acc_s)
    o = tl.div_rn(ACC, tl.where(head_ok, L, 1.0)[:, None])
    tl.store(
        out_ptr + token.to(tl.int64) * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
        o.to(out_ptr.dtype.element_ty),
        mask=head_ok[:, None],
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


def _use_split(num_tokens, num_q_heads, head_size, max_seqlen_q, max_num_segments) -> bool:
    workspace = num_tokens * num_q_heads * max_num_segments * (head_size + 2) * 4
    few_tokens = max_seqlen_q == 1 or num_tokens <= SPLIT_MAX_TOKENS
    return few_tokens and workspace <= SPLIT_WORKSPACE_CAP_BYTES


def _default_block_q(g: int, split: bool, max_seqlen_q: int) -> int:
    rows = PREFILL_BLOCK_M if not split and max_seqlen_q >= PREFILL_MIN_SEQLEN_Q else DECODE_BLOCK_M
    return max(1, rows // g)


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
    kv_split_size: int = KV_SPLIT_SIZE,
) -> torch.Tensor:
    """Causal attention of q over the paged KV cache; writes and returns `out`.

    q, out: [num_tokens, num_q_heads, head_size] (any token/head strides; out in q's dtype, or
    float32); key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_size] (any
    strides but the last).
    cu_seqlens_q: [num_seqs + 1]; seq_lens: [num_seqs] total KV length including this step's
    tokens, whose K/V are already cached; block_table: [num_seqs, max_blocks_per_seq].
    max_num_segments must be >= cdiv(max(seq_lens), kv_split_size) (pass
    cdiv(max_model_len, kv_split_size)); it sizes the split grid without a host sync.
    split / block_q force a launch mode / query-tile size; neither changes the bits. Rows of
    `out` past cu_seqlens_q[-1] (batch padding) are left untouched.
    """
    _check(
        q, key_cache, value_cache, out, cu_seqlens_q, seq_lens, block_table, scale,
        kv_split_size, max_num_segments,
    )  # fmt: skip
    num_tokens, num_q_heads, head_size = q.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    g = num_q_heads // num_kv_heads
    tile_n = tile_n_for(head_size)
    if split is None:
        split = _use_split(num_tokens, num_q_heads, head_size, max_seqlen_q, max_num_segments)
    if block_q is None:
        block_q = _default_block_q(g, split, max_seqlen_q)
    if block_q < 1:
        raise ValueError(f"det_backend: block_q={block_q} must be >= 1.")
    block_m = max(16, triton.next_power_of_2(block_q * g))
    num_warps = 4 if block_m * head_size <= 64 * 128 else 8
    # From shapes only: sum_b cdiv(q_len_b, BLOCK_Q) <= num_tokens // BLOCK_Q + num_seqs.
    num_q_blocks = num_tokens // block_q + num_seqs

    ws_m = ws_l = ws_acc = None
    grid = (num_q_blocks, num_kv_heads)
    if split:
        ws_shape = (num_tokens, num_q_heads, max_num_segments)
        ws_m = torch.empty(ws_shape, dtype=torch.float32, device=q.device)
        ws_l = torch.empty_like(ws_m)
        ws_acc = torch.empty((*ws_shape, head_size), dtype=torch.float32, device=q.device)
        grid = (num_q_blocks, num_kv_heads, max_num_segments)
    _paged_attention_kernel[grid](
        out, q, key_cache, value_cache, cu_seqlens_q, seq_lens, block_table,
        ws_m, ws_l, ws_acc,
        scale * LOG2E, num_seqs,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        block_table.stride(0),
        max_num_segments * num_q_heads, max_num_segments,
        NUM_Q_HEADS=num_q_heads, G=g, HEAD_SIZE=head_size, BLOCK_SIZE=block_size,
        TILE_N=tile_n, TILES_PER_SEGMENT=kv_split_size // tile_n,
        BLOCK_Q=block_q, BLOCK_M=block_m, SPLIT=split,
        num_warps=num_warps, num_stages=2, enable_fp_fusion=False,
    )  # fmt: skip
    if split:
        _merge_segments_kernel[(num_tokens,)](
            out, ws_m, ws_l, ws_acc, cu_seqlens_q, seq_lens, num_seqs,
            out.stride(0), out.stride(1), max_num_segments * num_q_heads, max_num_segments,
            NUM_Q_HEADS=num_q_heads, H_PAD=triton.next_power_of_2(num_q_heads),
            HEAD_SIZE=head_size, SEGMENT=kv_split_size,
            num_warps=4, enable_fp_fusion=False,
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
) -> torch.Tensor:
    """Plain torch in float64: gathers each request's K/V through its block table. Returns
    [num_tokens, num_q_heads, head_size] float64; rows past cu_seqlens_q[-1] are zero."""
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
        scores = (qb @ k.transpose(1, 2)) * scale
        scores = scores.masked_fill(pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        out[start:end] = (scores.softmax(-1) @ v).transpose(0, 1)
    return out
