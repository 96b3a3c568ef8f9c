"""The sort-based top-k / top-p masks and packed-key topk det_backend used before the sort-free
select of kernels/sampling.py; kept as a baseline for benchmarks/sampling.py, used nowhere else.

Per row: torch.sort, then one program finds the threshold in the sorted row: top-k keeps
x >= the k-th largest value; top-p takes fp32 probs of the top-k-masked sorted row, their running
sum cum in BLOCK_V chunks (tl.cumsum plus a carry), and masks the first n positions with
cum <= 1 - p (at least one token stays); the mask is applied by value. Its fp32 sums run over the
sorted row, so they depend on the sort's output, which is unique as a sequence of values.

`topk_lowest_index_first` packs (value, V - 1 - index) into unique int64 keys and takes their
torch.topk.
"""

import torch
import triton
import triton.language as tl

# Columns per chunk; fixed, so each row's order of additions depends on V alone.
BLOCK_V = 2048
_NUM_WARPS = 4
# topk_lowest_index_first builds int64 keys for at most this many elements at a time.
_TOPK_CHUNK_ELEMENTS = 1 << 24


@triton.jit
def _top_k_top_p_threshold_kernel(
    sorted_ptr,  # [R, V], each row ascending, last dim contiguous
    k_ptr,  # [R] top-k per row, or a dummy when HAS_K is False
    p_ptr,  # [R] top-p per row, or a dummy when HAS_P is False
    thr_ptr,  # [R] fp32 out: the smallest value a row keeps (-inf: keep all)
    V,
    stride_s,
    HAS_K: tl.constexpr,
    HAS_P: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = sorted_ptr + row * stride_s
    cols = tl.arange(0, BLOCK_V)
    thr = tl.full((), -float("inf"), tl.float32)
    if HAS_K:
        k = tl.load(k_ptr + row).to(tl.int64)
        if (k > 0) & (k < V):
            thr = tl.load(row_ptr + V - k).to(tl.float32)
    if HAS_P:
        p = tl.load(p_ptr + row).to(tl.float32)
        row_max = tl.load(row_ptr + V - 1).to(tl.float32)
        if (p < 1.0) & (row_max > -float("inf")):
            # Softmax denominator over the tokens top-k kept: lane-wise, then one tl.sum.
            acc = tl.zeros((BLOCK_V,), dtype=tl.float32)
            for start in range(0, V, BLOCK_V):
                x = tl.load(row_ptr + start + cols, mask=start + cols < V, other=-float("inf"))
                x = x.to(tl.float32)
                acc += tl.where(x >= thr, tl.exp(x - row_max), 0.0)
            total = tl.sum(acc, axis=0)
            limit = 1.0 - p
            # Running sum of probs in ascending order; masked = positions [0, num_masked).
            carry = tl.zeros((), dtype=tl.float32)
            num_masked = tl.zeros((), dtype=tl.int32)
            for start in range(0, V, BLOCK_V):
                x = tl.load(row_ptr + start + cols, mask=start + cols < V, other=-float("inf"))
                x = x.to(tl.float32)
                prob = tl.where(x >= thr, tl.exp(x - row_max), 0.0) / total
                cum = tl.cumsum(prob, axis=0) + carry
                below = (cum <= limit) & (start + cols < V)
                num_masked = tl.maximum(num_masked, tl.max(tl.where(below, start + cols + 1, 0)))
                carry += tl.sum(prob, axis=0)
            # At least one token stays, as in vLLM (its last sorted position is never masked).
            num_masked = tl.minimum(num_masked, V - 1)
            thr = tl.maximum(thr, tl.load(row_ptr + num_masked).to(tl.float32))
    tl.store(thr_ptr + row, thr)


def _check_row_params(name: str, t: torch.Tensor | None, rows: int, device) -> None:
    if t is None:
        return
    if t.shape != (rows,) or t.device != device:
        raise ValueError(
            f"det_backend: {name} must be [{rows}] on {device}, got {tuple(t.shape)} on {t.device}"
        )


def top_k_top_p_threshold(
    sorted_logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None
) -> torch.Tensor:
    """Per row of an ascending-sorted [R, V] tensor, the smallest value top-k/top-p keep (fp32;
    -inf where nothing is masked)."""
    if sorted_logits.dim() != 2 or sorted_logits.stride(-1) != 1:
        raise ValueError(
            "det_backend: sorted_logits must be [rows, vocab] with a contiguous last dim, got "
            f"{tuple(sorted_logits.shape)} strides {sorted_logits.stride()}"
        )
    rows, vocab = sorted_logits.shape
    _check_row_params("k", k, rows, sorted_logits.device)
    _check_row_params("p", p, rows, sorted_logits.device)
    thr = torch.empty(rows, dtype=torch.float32, device=sorted_logits.device)
    if rows == 0:
        return thr
    _top_k_top_p_threshold_kernel[(rows,)](
        sorted_logits,
        k.contiguous() if k is not None else thr,
        p.contiguous() if p is not None else thr,
        thr,
        vocab,
        sorted_logits.stride(0),
        HAS_K=k is not None,
        HAS_P=p is not None,
        BLOCK_V=BLOCK_V,
        num_warps=_NUM_WARPS,
    )
    return thr


def apply_top_k_top_p(
    logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None
) -> torch.Tensor:
    """Sets what top-k / top-p drop to -inf, in place; returns logits. logits: [R, V] of any
    float dtype (the threshold is one of the row's own values, so the comparison is exact)."""
    if k is None and p is None:
        return logits
    if logits.dim() != 2:
        raise ValueError(f"det_backend: logits must be [rows, vocab], got {tuple(logits.shape)}")
    sorted_logits = torch.sort(logits, dim=-1).values
    thr = top_k_top_p_threshold(sorted_logits, k, p)
    return logits.masked_fill_(logits < thr.unsqueeze(1), float("-inf"))


def _order_preserving_int64(x: torch.Tensor) -> torch.Tensor:
    """Integers in the order of x's fp32 values: IEEE bits, magnitude bits flipped when negative."""
    bits = x.float().contiguous().view(torch.int32)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)


def topk_lowest_index_first(x: torch.Tensor, k: int) -> torch.return_types.topk:
    """torch.topk(x, k, dim=-1) (largest, sorted) for [R, V] x, ties taken lowest index first.

    Each element's key is (value, V - 1 - index) packed in one int64, so keys are unique and
    the k largest are one set in one order, however topk finds them. Rows go through in chunks
    of a fixed element budget, which bounds the int64 scratch and changes no row's result."""
    if x.dim() != 2:
        raise ValueError(f"det_backend: topk needs [rows, vocab], got {tuple(x.shape)}")
    rows, vocab = x.shape
    if not 0 <= k <= vocab:
        raise ValueError(f"det_backend: topk k={k} not in [0, {vocab}]")
    if k == 1 and vocab > 0:
        # One column (vLLM's logprobs=0/1 case): max reports the first of tied maxima, the
        # same choice as the packed keys below, without their int64 copy of the row.
        values, indices = x.max(dim=-1, keepdim=True)
        return torch.return_types.topk((values, indices))
    reverse_index = vocab - 1 - torch.arange(vocab, dtype=torch.int64, device=x.device)
    indices = torch.empty(rows, k, dtype=torch.int64, device=x.device)
    step = max(1, _TOPK_CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, rows, step):
        keys = (_order_preserving_int64(x[start : start + step]) << 32) | reverse_index
        indices[start : start + step] = keys.topk(k, dim=-1).indices
    return torch.return_types.topk((x.gather(-1, indices), indices))
