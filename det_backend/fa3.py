"""The `fa3` attention variant: vLLM's bundled FlashAttention-3, called so that a query token's
bits depend only on its own request (ATTENTION_VARIANTS.md has the source references).

Per query row, FA3's arithmetic is fixed by its kernel instantiation (tile kBlockN, warpgroup
layout, split or not) and, within one instantiation, does not depend on the other rows of its
tile: KV blocks are aligned to position 0, and the fully masked blocks a tile visits for its
later rows are exact no-ops for earlier ones (probability 0, rescale by 0 of a zero state).
So everything that picks the instantiation from the batch is pinned here:

- num_splits=1: no split-KV (whose count FA3 derives from the batch and the SM count);
- at head sizes 64 and 256, max_seqlen_q is raised to at least 64 // (q heads per kv head)
  + 1. FA3 picks a one-warpgroup decode kernel when max_seqlen_q * G <= 64 (kBlockM 64;
  kBlockN 192 instead of 128 at head_size 64) and drops the causal flag when
  max_seqlen_q == 1 (head sizes 64 and 256), so a token computed in decode would not match
  the same token in a prefill. max_seqlen_q is only an upper bound for FA3 (tiles come from
  cu_seqlens_q on the device). Not at 128: there the one-warpgroup kernel keeps kBlockN 128
  and gives every row the two-warpgroup kernel's bits (a GPU test shows both, other kernel
  names and the same bits), and it runs decode in 64-row tiles instead of 128. Not at 80/96:
  neither heuristic applies there;
- pages of at most 64 positions: FA3's TMA paged-KV path, chosen when the page size is a
  multiple of kBlockN (>= 80 here) and the batch's max_seqlen_q is large, is never taken;
- scheduler_metadata=None: FA3 prepares the tile schedule inside the call; the schedule
  orders tiles over SMs and does not change a tile's arithmetic;
- PackGQA is always on in vLLM's build (FLASHATTENTION_PACKGQA_ONLY) for equal q/v head sizes.

The launcher is check, then one call to vLLM's `flash_attn_varlen_func`.
"""

from __future__ import annotations

import torch

# FA3 has kernels for 64, 96, 128, 192, 256 (80 runs the 96 one); 192 is untested here.
SUPPORTED_HEAD_SIZES = (64, 80, 96, 128, 256)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
# heuristics.h use_one_mma_wg: max_seqlen_q * (q heads / kv heads) <= 64 picks the
# one-warpgroup kernel; at these head sizes we always want the other one (see the docstring).
ONE_MMA_WG_MAX_ROWS = 64
PINNED_HEAD_SIZES = (64, 256)
# FA3's kBlockN is >= 80 for every head size above (causal, bf16/fp16); a smaller page can
# never be a multiple of it, so FA3 always takes its non-TMA paged-KV path.
MAX_BLOCK_SIZE = 64
BLOCK_SIZES = (16, 32, 64)


def pinned_max_seqlen_q(
    max_query_len: int, num_q_heads: int, num_kv_heads: int, head_size: int
) -> int:
    """The max_seqlen_q FA3 is told: the batch's; at PINNED_HEAD_SIZES at least large enough
    that FA3's host heuristics choose its prefill kernel for every batch, decode-only ones
    included."""
    if head_size not in PINNED_HEAD_SIZES:
        return max_query_len
    g = num_q_heads // num_kv_heads
    return max(max_query_len, ONE_MMA_WG_MAX_ROWS // g + 1)


def _check(q, key_cache, value_cache, out, cu_seqlens_q, seq_lens, block_table) -> None:
    if q.dim() != 3 or key_cache.dim() != 4:
        raise ValueError(
            "det_backend fa3: expects q [tokens, heads, head_size] and caches "
            f"[blocks, block_size, kv_heads, head_size]; got q {tuple(q.shape)}, "
            f"key_cache {tuple(key_cache.shape)}."
        )
    head_size, block_size = q.shape[2], key_cache.shape[1]
    if head_size not in SUPPORTED_HEAD_SIZES:
        raise ValueError(
            f"det_backend fa3: head_size={head_size} unsupported (supported: "
            f"{SUPPORTED_HEAD_SIZES})."
        )
    if block_size > MAX_BLOCK_SIZE:
        raise ValueError(
            f"det_backend fa3: block_size={block_size} > {MAX_BLOCK_SIZE}: FA3 would pick its "
            "TMA paged-KV kernel for some batches and not others."
        )
    if value_cache.shape != key_cache.shape or key_cache.shape[3] != head_size:
        raise ValueError(
            f"det_backend fa3: key_cache {tuple(key_cache.shape)} and value_cache "
            f"{tuple(value_cache.shape)} must match, with head_size {head_size} last."
        )
    if q.shape[1] % key_cache.shape[2] != 0:
        raise ValueError(
            f"det_backend fa3: num_q_heads={q.shape[1]} is not a multiple of "
            f"num_kv_heads={key_cache.shape[2]}."
        )
    dtypes = {t.dtype for t in (q, key_cache, value_cache, out)}
    if len(dtypes) != 1 or q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            "det_backend fa3: q, caches and out must share one dtype among "
            f"{SUPPORTED_DTYPES}; got {sorted(map(str, dtypes))}."
        )
    if out.shape != q.shape:
        raise ValueError(f"det_backend fa3: out {tuple(out.shape)} must match q {tuple(q.shape)}.")
    for name, t in (
        ("cu_seqlens_q", cu_seqlens_q),
        ("seq_lens", seq_lens),
        ("block_table", block_table),
    ):
        if t.dtype != torch.int32:
            raise ValueError(f"det_backend fa3: {name} must be int32, got {t.dtype}.")


def fa3_paged_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    out: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    scale: float,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Causal attention of q over the paged KV cache with FA3, pinned; writes and returns out.

    Same arguments as kernels.attention.paged_attention (q, out: [tokens, q_heads, head_size];
    caches: [blocks, block_size, kv_heads, head_size]; seq_lens include this step's tokens),
    plus max_seqlen_k (an upper bound of seq_lens) and softcap (0 = off). Rows of out past
    cu_seqlens_q[-1] are left untouched.
    """
    _check(q, key_cache, value_cache, out, cu_seqlens_q, seq_lens, block_table)
    if q.shape[0] == 0 or seq_lens.shape[0] == 0:
        return out
    from vllm.utils.torch_utils import canonicalize_singleton_dim_strides
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    flash_attn_varlen_func(
        q,
        # As vLLM's FlashAttention backend passes them (strides of size-1 dims made regular).
        canonicalize_singleton_dim_strides(key_cache),
        canonicalize_singleton_dim_strides(value_cache),
        max_seqlen_q=pinned_max_seqlen_q(max_seqlen_q, q.shape[1], key_cache.shape[2], q.shape[2]),
        cu_seqlens_q=cu_seqlens_q,
        max_seqlen_k=max_seqlen_k,
        seqused_k=seq_lens,
        softmax_scale=scale,
        causal=True,
        softcap=softcap,
        block_table=block_table,
        out=out,
        scheduler_metadata=None,
        num_splits=1,
        fa_version=3,
    )
    return out
