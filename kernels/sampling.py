"""Top-k / top-p masks and a top-k with a total order, without sorting: each row's result is a
function of that row alone, whatever the batch.

Semantics, per row x of V values (any float dtype, read as fp32; -0.0 counts as +0.0; NaN is
not supported):
    top-k: keep x >= t_k, the k-th largest value (ties with it are kept); k <= 0 or k >= V: no-op.
    top-p: each token kept by top-k weighs w(x) = trunc(exp2((x - max) * log2(e)) * 2^38), an
           int64 (the exp2 and the products in fp32; w(max) = 2^38, tokens more than ~26.3
           below the max weigh 0). With Z the sum of the weights, q = 1 - p in fp32 and
           L = trunc(fp64(q) * fp64(Z)), keep x >= t_p, the largest value whose tokens and those
           above it weigh at least T = max(Z - L, 1). p >= 1 or an all -inf row: no-op.
The weights are integers, so every sum of them is exact and the same in any order: the kernel
may split, compact and re-read a row however it likes without changing a bit. This is vLLM's
sort-based definition (mask the ascending sorted prefix whose cumulative probability is <= 1 - p;
at least one token stays) with the probabilities in 38-bit fixed point instead of fp32 running
sums: the kept set is the smallest top set of whole tie groups whose mass reaches p. As in vLLM's
sort path every token tied with the threshold is kept (vLLM's positional mask keeps whichever of
them its sort put last). tests/test_sampling.py checks the kept sets against
`apply_top_k_top_p_reference` (float64): equal, except for tie groups whose cumulative mass is
within 1e-5 of 1 - p. det_backend's previous version (kernels/sampling_sort.py) summed fp32
probabilities in sorted order; the two can differ in such boundary groups.

How: one program per row finds t_k, then t_p, each as the largest key whose weight at or above
it reaches T (weight 1 per token for top-k), over the order-preserving int32 key of the value.
It keeps a bracket [lo, hi) of keys with W(lo) >= T > W(hi) and narrows it each round by
evaluating W and the token count at M cut points inside it: half equally spaced in key space
(at least a factor M/2 + 1 per round, so at most 32 / log2(M/2 + 1) rounds), half equally spaced
in value space (few rounds on real logits). Rounds read the row until the bracket holds at most
LIST_CAP tokens, which one more pass copies to a per-row list; later rounds read the list and
also snap the bracket to the nearest keys present, so they end once one distinct value is left.
The number of rounds, the cut points and the list change how much is read, never the result.
A [256, 152064] batch with top-k 50 is read 3 times (max/min, one round, the copy to the list)
and once more to write the mask, all in one launch; top-p alone takes one or two rounds more.

`topk_lowest_index_first` is torch.topk over the last dim with ties broken by the lower index:
its result is unique, and topk(x, k)[:, :n] == topk(x, n). Plain torch.topk orders tied values as
its algorithm happens to (CUDA picks the algorithm from the number of rows), and vLLM takes a
request's top logprobs as the first n of a top-k whose k is the batch's largest request. Ours:
t_k as above, then one row-local pass takes the indices above it and its lowest-index ties, and
a stable sort orders those k by value.
"""

import torch
import triton
import triton.language as tl

# Fixed point of a top-p weight: exp(x - max) in units of 2^-38, so Z <= V * 2^38 < 2^63.
_WEIGHT_ONE = tl.constexpr(float(1 << 38))
_LOG2E = tl.constexpr(1.4426950408889634)
# A thread's weights and count summed in one int64: count from bit 50, weight below it.
_COUNT_SHIFT = tl.constexpr(50)
_COUNT_ONE = tl.constexpr(1 << 50)
_WEIGHT_MASK = tl.constexpr((1 << 50) - 1)
_FLT_MAX = tl.constexpr(3.4028234663852886e38)
_INT32_MIN = tl.constexpr(-(2**31))
_INT32_MAX = tl.constexpr(2**31 - 1)
_NO_KEY = tl.constexpr(1 << 40)  # a key above every int32 key: "no list" / "list has no top"

# Launch parameters; none changes a result (tests/test_sampling.py checks). A round reads a row
# in tiles of TILE_ROW tokens against CUTS_ROW cut points, a list in tiles of TILE_LIST against
# CUTS_LIST; max/min and the copy to the list read tiles of TILE_SCAN; every loop keeps STAGES
# tiles in flight; the list holds up to LIST_CAP tokens per row. Each of the 32 * NUM_WARPS
# threads sums at most 2048 tokens in one packed int64, which bounds the vocabulary.
TILE_ROW = 2048
TILE_LIST = 1024
TILE_SCAN = 2048
CUTS_ROW = 16
CUTS_LIST = 8
LIST_CAP = 16384
NUM_WARPS = 8
STAGES = 3


@triton.jit
def _key(x):
    """fp32 -> int32 in the same order (-0.0 -> the key of +0.0)."""
    bits = tl.where(x == 0.0, 0.0, x).to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _value(key):
    """The inverse of _key (an int64 key in int32 range)."""
    key = key.to(tl.int32)
    return (key ^ ((key >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _weight(x, row_max):
    """Top-p weight, int64: every call computes it with the same fp32 operations."""
    e = tl.exp2((x - row_max) * _LOG2E)
    e = tl.where(x == row_max, 1.0, e)  # a +inf max: inf - inf
    return (e * _WEIGHT_ONE).to(tl.int64)


@triton.jit
def _row_range(row_ptr, V, TILE: tl.constexpr, STAGES: tl.constexpr):
    """max, min and smallest finite value (-FLT_MAX if none) of a row."""
    offs = tl.arange(0, TILE)
    hi = tl.full([TILE], -float("inf"), tl.float32)
    lo = tl.full([TILE], float("inf"), tl.float32)
    lo_fin = tl.full([TILE], float("inf"), tl.float32)
    for start in tl.range(0, V, TILE, num_stages=STAGES):
        valid = start + offs < V
        x = tl.load(row_ptr + start + offs, mask=valid, other=0.0).to(tl.float32)
        hi = tl.maximum(hi, tl.where(valid, x, -float("inf")))
        lo = tl.minimum(lo, tl.where(valid, x, float("inf")))
        lo_fin = tl.minimum(lo_fin, tl.where(valid & (x > -float("inf")), x, float("inf")))
    lo_fin = tl.min(lo_fin, axis=0)
    return (
        tl.max(hi, axis=0),
        tl.min(lo, axis=0),
        tl.where(lo_fin < float("inf"), lo_fin, -_FLT_MAX),
    )


@triton.jit
def _cuts(lo, hi, floor_value, with_lo, M: tl.constexpr):
    """M int32 keys in [lo, hi): M/2 equally spaced keys, M/2 keys of equally spaced values;
    with_lo: the first is lo itself (to weigh the whole bracket)."""
    HALF: tl.constexpr = M // 2
    j = tl.arange(0, M)
    i = (j % HALF) + 1
    by_key = lo + ((hi - lo) * i) // (HALF + 1)
    a = tl.maximum(tl.maximum(_value(lo), floor_value), -_FLT_MAX)
    b = tl.minimum(_value(hi - 1), _FLT_MAX)
    f = i.to(tl.float32) / (HALF + 1)
    by_value = _key(a * (1.0 - f) + b * f).to(tl.int64)
    c = tl.minimum(tl.maximum(tl.where(j < HALF, by_key, by_value), lo), hi - 1)
    return tl.where((j == 0) & with_lo, lo, c).to(tl.int32)


@triton.jit
def _stats(src, n, cuts, row_max, BY_WEIGHT: tl.constexpr, SNAP: tl.constexpr,
           TILE: tl.constexpr, THREADS: tl.constexpr, M: tl.constexpr,
           STAGES: tl.constexpr):  # fmt: skip
    """Over src[:n], per cut c: the count and (BY_WEIGHT) the weight of tokens with key >= c;
    (SNAP) the smallest key >= c and the largest key < c. Integer sums: exact in any order.

    A tile is [TILE // THREADS, THREADS] (column t: every THREADS-th token from t) against the
    cuts on a leading axis, [M, TILE // THREADS, THREADS]; summing axis 1 leaves per-column
    partials, [M, THREADS], so a thread adds up its own tokens against every cut and nothing
    crosses threads until the end. A column packs its count and weight in one int64 (weight
    below 2^50 while it sums at most 2048 tokens of weight <= 2^38)."""
    offs = tl.arange(0, TILE // THREADS)[:, None] * THREADS + tl.arange(0, THREADS)[None, :]
    cut = cuts[:, None, None]
    acc = tl.zeros([M, THREADS], tl.int64 if BY_WEIGHT else tl.int32)
    up = tl.full([M, THREADS], _INT32_MAX, tl.int32)
    down = tl.full([M, THREADS], _INT32_MIN, tl.int32)
    for start in tl.range(0, n, TILE, num_stages=STAGES):
        valid = start + offs < n
        x = tl.load(src + start + offs, mask=valid, other=0.0).to(tl.float32)
        key = _key(x)
        ge = (key[None, :, :] >= cut) & valid[None, :, :]
        if BY_WEIGHT:
            packed = (_weight(x, row_max) + _COUNT_ONE)[None, :, :]
            acc += tl.sum(tl.where(ge, packed, 0), axis=1)
        else:
            acc += tl.sum(ge.to(tl.int32), axis=1)
        if SNAP:
            up = tl.minimum(up, tl.min(tl.where(ge, key[None, :, :], _INT32_MAX), axis=1))
            below = valid[None, :, :] & ~ge
            down = tl.maximum(down, tl.max(tl.where(below, key[None, :, :], _INT32_MIN), axis=1))
    if BY_WEIGHT:
        count = tl.sum(acc >> _COUNT_SHIFT, axis=1)
        weight = tl.sum(acc & _WEIGHT_MASK, axis=1)
    else:
        count = tl.sum(acc.to(tl.int64), axis=1)
        weight = tl.zeros([M], tl.int64)
    return count, weight, tl.min(up, axis=1), tl.max(down, axis=1)


@triton.jit
def _compact(src, n, lo, hi, dst, TILE: tl.constexpr, STAGES: tl.constexpr):
    """Copies the tokens of src[:n] with lo <= key < hi to dst, in column order; returns how
    many."""
    offs = tl.arange(0, TILE)
    n_out = tl.zeros((), tl.int32)
    tl.debug_barrier()  # every thread is done reading dst's previous contents
    for start in tl.range(0, n, TILE, num_stages=STAGES):
        valid = start + offs < n
        x = tl.load(src + start + offs, mask=valid, other=0.0).to(tl.float32)
        key = _key(x).to(tl.int64)
        sel = (valid & (key >= lo) & (key < hi)).to(tl.int32)
        tl.store(dst + n_out + tl.cumsum(sel, axis=0) - 1, x, mask=sel != 0)
        n_out += tl.sum(sel, axis=0)
    tl.debug_barrier()  # dst is read by other threads next
    return n_out


@triton.jit
def _narrow(cuts, count, weight, up, down, target, lo, hi, count_lo, count_hi, weight_hi,
            BY_WEIGHT: tl.constexpr, SNAP: tl.constexpr):  # fmt: skip
    """The new bracket from one round's stats. W(cut) >= target puts the answer at or above the
    cut, else below it; count and weight fall as the key grows, so the bracket's ends take the
    smallest count (lo) and the largest count and weight (hi) of the cuts on their side."""
    w = weight if BY_WEIGHT else count
    ok = w >= target
    if SNAP:
        lo_c = tl.where(ok, up, lo).to(tl.int64)
        hi_c = tl.where(ok, hi, down.to(tl.int64) + 1)
    else:
        lo_c = tl.where(ok, cuts, lo).to(tl.int64)
        hi_c = tl.where(ok, hi, cuts).to(tl.int64)
    lo = tl.maximum(lo, tl.max(lo_c, axis=0))
    hi = tl.minimum(hi, tl.min(hi_c, axis=0))
    count_lo = tl.minimum(count_lo, tl.min(tl.where(ok, count, count_lo), axis=0))
    count_hi = tl.maximum(count_hi, tl.max(tl.where(ok, count_hi, count), axis=0))
    weight_hi = tl.maximum(weight_hi, tl.max(tl.where(ok, weight_hi, weight), axis=0))
    return lo, hi, count_lo, count_hi, weight_hi


@triton.jit
def _top_p_target(target, weight, q, first):
    """In the first top-p round the first cut is the bracket's bottom: its weight is Z."""
    z = tl.sum(tl.where(tl.arange(0, weight.shape[0]) == 0, weight, 0), axis=0)
    lim = (q.to(tl.float64) * z.to(tl.float64)).to(tl.int64)
    return tl.where(first, tl.maximum(z - lim, 1), target)


@triton.jit
def _round(src, n, base_count, base_weight, row_max, floor_value, q, target, first, lo, hi,
           count_lo, count_hi, weight_hi, BY_WEIGHT: tl.constexpr, SNAP: tl.constexpr,
           TILE: tl.constexpr, THREADS: tl.constexpr, M: tl.constexpr,
           STAGES: tl.constexpr):  # fmt: skip
    """One round on src[:n]: the row, or a list (base_*: count and weight above its top)."""
    cuts = _cuts(lo, hi, floor_value, first, M)
    count, weight, up, down = _stats(
        src, n, cuts, row_max, BY_WEIGHT, SNAP, TILE, THREADS, M, STAGES
    )  # fmt: skip
    count += base_count
    weight += base_weight
    if BY_WEIGHT:
        target = _top_p_target(target, weight, q, first)
    lo, hi, count_lo, count_hi, weight_hi = _narrow(
        cuts, count, weight, up, down, target, lo, hi, count_lo, count_hi, weight_hi,
        BY_WEIGHT, SNAP,
    )  # fmt: skip
    return target, lo, hi, count_lo, count_hi, weight_hi


@triton.jit
def _select(row_ptr, V, list_ptr, cap, row_max, floor_value, q, target, lo, hi, count_lo,
            list_lo, list_hi, list_n, base_count, base_weight, BY_WEIGHT: tl.constexpr,
            TILE_ROW: tl.constexpr, TILE_LIST: tl.constexpr, CUTS_ROW: tl.constexpr,
            CUTS_LIST: tl.constexpr, THREADS: tl.constexpr, TILE_SCAN: tl.constexpr,
            STAGES: tl.constexpr):  # fmt: skip
    """The largest key whose weight at or above it reaches target (W(lo) >= target > W(hi) on
    entry; BY_WEIGHT: target is set in the first round). The list holds the row's tokens with
    keys in [list_lo, list_hi); base_* are the count and weight at or above list_hi."""
    count_hi = tl.zeros((), tl.int64)
    weight_hi = tl.zeros((), tl.int64)
    first = tl.full((), BY_WEIGHT, tl.int1)
    while hi - lo > 1:
        if (list_lo <= lo) & (hi <= list_hi):
            target, lo, hi, count_lo, count_hi, weight_hi = _round(
                list_ptr, list_n, base_count, base_weight, row_max, floor_value, q, target,
                first, lo, hi, count_lo, count_hi, weight_hi, BY_WEIGHT, True, TILE_LIST,
                THREADS, CUTS_LIST, STAGES,
            )  # fmt: skip
        else:
            target, lo, hi, count_lo, count_hi, weight_hi = _round(
                row_ptr, V, 0, 0, row_max, floor_value, q, target, first, lo, hi, count_lo,
                count_hi, weight_hi, BY_WEIGHT, False, TILE_ROW, THREADS, CUTS_ROW, STAGES,
            )  # fmt: skip
            # Few enough tokens left: copy them to the list, all of them from lo up if they
            # fit (a later top-p select reads them too), else the bracket.
            if (hi - lo > 1) & (count_lo - count_hi <= cap):
                whole_top = count_lo <= cap
                list_lo = lo
                list_hi = tl.where(whole_top, _NO_KEY, hi)
                base_count = tl.where(whole_top, 0, count_hi)
                base_weight = tl.where(whole_top, 0, weight_hi)
                list_n = _compact(row_ptr, V, list_lo, list_hi, list_ptr, TILE_SCAN, STAGES)
        first = tl.full((), False, tl.int1)
    return lo, count_lo, list_lo, list_hi, list_n, base_count, base_weight


@triton.jit
def _top_k_top_p_select_kernel(
    x_ptr,  # [R, V], last dim contiguous
    k_ptr,  # [R] top-k per row, or a dummy when HAS_K is False
    p_ptr,  # [R] top-p per row, or a dummy when HAS_P is False
    thr_ptr,  # [R] fp32 out: the smallest value a row keeps (-inf: keep all)
    list_ptr,  # [R, cap] fp32 scratch
    V,
    cap,
    stride_x,
    HAS_K: tl.constexpr,
    HAS_P: tl.constexpr,
    TILE_ROW: tl.constexpr,
    TILE_LIST: tl.constexpr,
    CUTS_ROW: tl.constexpr,
    CUTS_LIST: tl.constexpr,
    THREADS: tl.constexpr,  # num_warps * 32
    TILE_SCAN: tl.constexpr,
    STAGES: tl.constexpr,
    MASK: tl.constexpr,  # also set x < threshold to -inf in place
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = x_ptr + row * stride_x
    list_ptr = list_ptr + row * cap
    row_max, row_min, floor_value = _row_range(row_ptr, V, TILE_SCAN, STAGES)
    bottom = _key(row_min).to(tl.int64)
    top = _key(row_max).to(tl.int64) + 1
    thr = _key(tl.full((), -float("inf"), tl.float32)).to(tl.int64)  # keep all
    count_thr = tl.zeros((), tl.int64) + V
    list_lo = tl.full((), _NO_KEY, tl.int64)
    list_hi = tl.full((), _NO_KEY, tl.int64)
    list_n = tl.zeros((), tl.int32)
    base_count = tl.zeros((), tl.int64)
    base_weight = tl.zeros((), tl.int64)
    no_q = tl.zeros((), tl.float32)
    if HAS_K:
        k = tl.load(k_ptr + row).to(tl.int64)
        if (k > 0) & (k < V):
            thr, count_thr, list_lo, list_hi, list_n, base_count, base_weight = _select(
                row_ptr, V, list_ptr, cap, row_max, floor_value, no_q, k, bottom, top,
                count_thr, list_lo, list_hi, list_n, base_count, base_weight, False,
                TILE_ROW, TILE_LIST, CUTS_ROW, CUTS_LIST, THREADS, TILE_SCAN, STAGES,
            )  # fmt: skip
    if HAS_P:
        p = tl.load(p_ptr + row).to(tl.float32)
        if (p < 1.0) & (row_max > -float("inf")):
            # A list of top-k's bracket alone has no weight above it: top-p cannot use it.
            list_lo = tl.where(list_hi == _NO_KEY, list_lo, _NO_KEY)
            thr, count_thr, list_lo, list_hi, list_n, base_count, base_weight = _select(
                row_ptr, V, list_ptr, cap, row_max, floor_value, 1.0 - p,
                tl.zeros((), tl.int64), tl.maximum(thr, bottom), top, count_thr, list_lo,
                list_hi, list_n, base_count, base_weight, True,
                TILE_ROW, TILE_LIST, CUTS_ROW, CUTS_LIST, THREADS, TILE_SCAN, STAGES,
            )  # fmt: skip
    thr_value = _value(thr)
    tl.store(thr_ptr + row, thr_value)
    if MASK:
        if thr_value > -float("inf"):
            offs = tl.arange(0, TILE_SCAN)
            for start in tl.range(0, V, TILE_SCAN, num_stages=STAGES):
                valid = start + offs < V
                x = tl.load(row_ptr + start + offs, mask=valid, other=0.0).to(tl.float32)
                ninf = tl.full([TILE_SCAN], -float("inf"), tl.float32)
                tl.store(row_ptr + start + offs, ninf, mask=valid & (x < thr_value))


def _check_row_params(name: str, t: torch.Tensor | None, rows: int, device) -> None:
    if t is None:
        return
    if t.shape != (rows,) or t.device != device:
        raise ValueError(
            f"det_backend: {name} must be [{rows}] on {device}, got {tuple(t.shape)} on {t.device}"
        )


def top_k_top_p_threshold(
    logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None, mask: bool = False
) -> torch.Tensor:
    """Per row of [R, V] logits, the smallest value top-k/top-p keep (fp32, one of the row's
    values; -inf where nothing is masked). mask: also set the logits below it to -inf, in place
    (as logits.masked_fill_(logits < thr[:, None], -inf), in the same launch)."""
    if logits.dim() != 2 or logits.stride(-1) != 1:
        raise ValueError(
            "det_backend: logits must be [rows, vocab] with a contiguous last dim, got "
            f"{tuple(logits.shape)} strides {logits.stride()}"
        )
    rows, vocab = logits.shape
    threads = 32 * NUM_WARPS
    if TILE_ROW % threads or TILE_LIST % threads or min(CUTS_ROW, CUTS_LIST) < 2:
        raise ValueError(
            f"det_backend: TILE_ROW and TILE_LIST must be multiples of {threads} and "
            "CUTS_ROW, CUTS_LIST powers of two >= 2"
        )
    if vocab > 2048 * threads:
        raise ValueError(
            f"det_backend: vocab {vocab} > {2048 * threads}: top-p weight sums could overflow"
        )
    _check_row_params("k", k, rows, logits.device)
    _check_row_params("p", p, rows, logits.device)
    thr = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return thr
    cap = min(LIST_CAP, vocab)
    scratch = torch.empty(rows, cap, dtype=torch.float32, device=logits.device)
    _top_k_top_p_select_kernel[(rows,)](
        logits,
        k.contiguous() if k is not None else thr,
        p.contiguous() if p is not None else thr,
        thr,
        scratch,
        vocab,
        cap,
        logits.stride(0),
        HAS_K=k is not None,
        HAS_P=p is not None,
        TILE_ROW=TILE_ROW,
        TILE_LIST=TILE_LIST,
        CUTS_ROW=CUTS_ROW,
        CUTS_LIST=CUTS_LIST,
        THREADS=threads,
        TILE_SCAN=TILE_SCAN,
        STAGES=STAGES,
        MASK=mask,
        num_warps=NUM_WARPS,
    )
    return thr


def apply_top_k_top_p(
    logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None
) -> torch.Tensor:
    """Sets what top-k / top-p drop to -inf, in place; returns logits. logits: [R, V] of any
    float dtype (the threshold is one of the row's own values, so the comparison is exact)."""
    if k is None and p is None:
        return logits
    if logits.dim() == 2 and logits.stride(-1) != 1:  # the kernel reads rows contiguously
        return logits.copy_(apply_top_k_top_p(logits.contiguous(), k, p))
    top_k_top_p_threshold(logits, k, p, mask=True)
    return logits


def apply_top_k_top_p_reference(
    logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None
) -> torch.Tensor:
    """The same masks in float64 (exact probabilities, a sequential running sum), one row at a
    time; returns a new tensor."""
    out = logits.clone()
    vocab = logits.shape[-1]
    for r in range(logits.shape[0]):
        x = logits[r].double()
        s = torch.sort(x).values
        thr = -torch.inf
        if k is not None and 0 < int(k[r]) < vocab:
            thr = s[vocab - int(k[r])].item()
        if p is not None and float(p[r]) < 1.0 and s[-1] > -torch.inf:
            e = torch.where(s >= thr, torch.exp(s - s[-1]), 0.0)
            cum = torch.cumsum(e / e.sum(), 0)
            below = torch.nonzero(cum <= 1.0 - float(p[r]))
            num_masked = min(int(below[-1]) + 1 if len(below) else 0, vocab - 1)
            thr = max(thr, s[num_masked].item())
        out[r].masked_fill_(x < thr, float("-inf"))
    return out


@triton.jit
def _topk_indices_kernel(
    x_ptr,  # [R, V], last dim contiguous
    thr_ptr,  # [R] fp32: each row's k-th largest value (-inf when k == V)
    out_ptr,  # [R, k] int64 out: the indices kept, ascending
    V,
    k,
    stride_x,
    stride_o,
    TILE: tl.constexpr,
    STAGES: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = x_ptr + row * stride_x
    out_ptr = out_ptr + row * stride_o
    thr = tl.load(thr_ptr + row)
    offs = tl.arange(0, TILE)
    above = tl.zeros((), tl.int32)
    for start in tl.range(0, V, TILE, num_stages=STAGES):
        valid = start + offs < V
        x = tl.load(row_ptr + start + offs, mask=valid, other=0.0).to(tl.float32)
        above += tl.sum((valid & (x > thr)).to(tl.int32), axis=0)
    # All tokens above the k-th value, then its ties in column order until there are k.
    ties_left = k - above
    n_out = tl.zeros((), tl.int32)
    ties_seen = tl.zeros((), tl.int32)
    for start in tl.range(0, V, TILE, num_stages=STAGES):
        valid = start + offs < V
        x = tl.load(row_ptr + start + offs, mask=valid, other=0.0).to(tl.float32)
        tie = (valid & (x == thr)).to(tl.int32)
        keep = (valid & (x > thr)) | (
            (tie != 0) & (ties_seen + tl.cumsum(tie, axis=0) <= ties_left)
        )
        keep = keep.to(tl.int32)
        tl.store(out_ptr + n_out + tl.cumsum(keep, axis=0) - 1, start + offs, mask=keep != 0)
        n_out += tl.sum(keep, axis=0)
        ties_seen += tl.sum(tie, axis=0)


def topk_lowest_index_first(x: torch.Tensor, k: int) -> torch.return_types.topk:
    """torch.topk(x, k, dim=-1) (largest, sorted) for [R, V] x, ties taken lowest index first."""
    if x.dim() != 2:
        raise ValueError(f"det_backend: topk needs [rows, vocab], got {tuple(x.shape)}")
    x = x if x.stride(-1) == 1 else x.contiguous()  # the kernels read rows contiguously
    rows, vocab = x.shape
    if not 0 <= k <= vocab:
        raise ValueError(f"det_backend: topk k={k} not in [0, {vocab}]")
    if k == 1:
        # One column (vLLM's logprobs=0/1 case): max reports the first of tied maxima.
        values, indices = x.max(dim=-1, keepdim=True)
        return torch.return_types.topk((values, indices))
    indices = torch.empty(rows, k, dtype=torch.int64, device=x.device)
    if rows > 0 and k > 0:
        thr = top_k_top_p_threshold(x, torch.full((rows,), k, device=x.device), None)
        _topk_indices_kernel[(rows,)](
            x, thr, indices, vocab, k, x.stride(0), indices.stride(0), TILE=TILE_SCAN,
            STAGES=STAGES, num_warps=NUM_WARPS,
        )  # fmt: skip
    # The k in column order, sorted by value: a stable sort keeps tied values lowest index first.
    values, order = x.gather(-1, indices).sort(dim=-1, descending=True, stable=True)
    return torch.return_types.topk((values, indices.gather(-1, order)))
