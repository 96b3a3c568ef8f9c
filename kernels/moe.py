"""Mixture-of-experts feed-forward, batch-invariant: routing, two grouped GEMMs, combine.

For each token t, with its top_k experts e = ids[t, k] and weights w[t, k]:
    out[t] = sum_k  w[t, k] * (silu(x[t] @ W1[e].T) * (x[t] @ W3[e].T)) @ W2[e].T
Weights in vLLM's FusedMoE layout: w13 [E, 2I, H] (gate rows [0, I), up rows [I, 2I)),
w2 [E, H, I].

Why a token's output does not depend on the batch:
- routing: each token is one row of a [16, E] tile and every reduction runs along a row: fp32
  softmax over the token's E logits; top-k by repeated argmax over the fp32 probabilities,
  equal probabilities going to the lower expert id; the renormalising sum adds the k weights
  in rank order. The logits pointer is not specialized on alignment, so the register layout,
  and with it the reduction order, is the same for every call and every row.
- grouped GEMMs: the (token, k) pairs are sorted by expert (stably) and each expert's rows
  padded to BLOCK_M, so a tile multiplies rows of one expert by that expert's weights. Every
  output element is one dot product over the whole K, in one program, into one fp32
  accumulator: no split-K, no atomics, and rows of a tile never mix. The batch decides which
  tile, and which row of it, a pair lands in; that does not change the pair's bits (tl.dot
  rows are independent and their bits do not depend on the tile shape on H100/H200, as
  kernels/matmul.py measured; tests/test_moe.py checks every MOE_CONFIGS entry).
- combine: element-wise; each output element adds its token's top_k expert outputs, kept in
  fp32, in rank order k = 0..top_k-1, and rounds once.

The tile is picked by the mean number of rows per expert, ceil(T * top_k / E), so it changes
with the batch; that moves time only (see above). Numerics, all fp32 inside a kernel: the
gate/up accumulators go through SiLU-and-mul before one rounding to the activation dtype (vLLM
rounds gate and up first); the down projection stays fp32 until the combine (vLLM rounds each
weighted expert output, then sums in the activation dtype).
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl


class MoEConfig(NamedTuple):
    """One row of the tile table, used while ceil(T * top_k / E) <= max_rows_per_expert.

    block_m is also the padding of each expert's rows; block_n is the width of each
    accumulator (the gate/up kernel keeps two: a gate and an up column block).
    """

    max_rows_per_expert: int
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


_ANY = 2**62

# Not tuned yet (benchmarks/moe.py --sweep is the tool): short tiles with a long K step for
# decode, where an expert sees a few rows; tall tiles for prefill. The gate/up kernel keeps two
# BLOCK_M x BLOCK_N fp32 accumulators, hence 8 warps once BLOCK_M >= 64 (64 registers each).
# Any entry gives the same bits.
MOE_CONFIGS: tuple[MoEConfig, ...] = (
    MoEConfig(4, 16, 64, 128, 4, 4),
    MoEConfig(32, 16, 128, 128, 4, 3),
    MoEConfig(128, 64, 128, 64, 8, 4),
    MoEConfig(_ANY, 128, 64, 64, 8, 3),
)

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# H100/H200 allow 227 KiB of shared memory per block; keep a margin for the epilogue.
_SMEM_BUDGET_BYTES = 192 * 1024

# Tokens per routing program (its tile is [_ROUTE_BLOCK_T, next_power_of_2(E)]).
_ROUTE_BLOCK_T = 16
# Tokens x columns per combine program; the combine has no reduction across lanes.
_COMBINE_BLOCK_T = 8
_COMBINE_BLOCK_H = 256


def config_for(num_tokens: int, top_k: int, num_experts: int) -> MoEConfig:
    """The first MOE_CONFIGS entry whose max_rows_per_expert covers ceil(T * top_k / E)."""
    rows = triton.cdiv(num_tokens * top_k, num_experts)
    for config in MOE_CONFIGS:
        if rows <= config.max_rows_per_expert:
            return config
    raise ValueError(f"det_backend: no MoE config for {rows} rows per expert")


def all_configs() -> list[MoEConfig]:
    """Every distinct tile the launcher can pick."""
    return sorted({c._replace(max_rows_per_expert=0) for c in MOE_CONFIGS})


def _num_stages(config: MoEConfig, element_size: int, gated: bool) -> int:
    # Sized for 16-bit inputs; the gate/up kernel streams two weight tiles and fp32 needs twice
    # the bytes, so fewer stages. Pipelining depth never changes the K order, only the overlap.
    weight_tiles = 2 if gated else 1
    stage_bytes = (config.block_m + weight_tiles * config.block_n) * config.block_k * element_size
    return max(1, min(config.num_stages, _SMEM_BUDGET_BYTES // stage_bytes))


# --- routing -------------------------------------------------------------------------------


# T varies with the batch: unspecialized, so T == 1 compiles the same code as T == 1000. The
# logits pointer is not specialized on alignment: Triton picks the register layout, and so the
# order of tl.max / tl.sum, from what it can prove about the pointer.
@triton.jit(do_not_specialize=["T"], do_not_specialize_on_alignment=["logits_ptr"])
def _moe_route_kernel(
    logits_ptr,  # [T, E]
    weights_ptr,  # [T, TOP_K] fp32
    ids_ptr,  # [T, TOP_K] int32
    T,
    E,
    stride_lt,
    stride_le,
    stride_wt,
    stride_it,
    TOP_K: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # BLOCK_T tokens per program, one per row of the tile; every reduction is along a row, and
    # each row is laid out across the threads alike, so a token's result does not depend on
    # which row of which program holds it. Rows past T redo token 0 and are not stored.
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    is_token = tokens < T
    rows = tl.where(is_token, tokens, 0).to(tl.int64)
    experts = tl.arange(0, BLOCK_E)
    in_row = experts < E
    logits = tl.load(
        logits_ptr + rows[:, None] * stride_lt + experts[None, :] * stride_le,
        mask=in_row[None, :],
        other=-float("inf"),
    ).to(tl.float32)
    z = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    prob = z / tl.sum(z, axis=1)[:, None]

    # Probabilities are >= 0, so -1 marks padding lanes and experts already taken.
    remaining = tl.where(in_row[None, :], prob, -1.0)
    ranks = tl.arange(0, BLOCK_K)
    top_w = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    top_id = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    for k in tl.static_range(TOP_K):
        best = tl.max(remaining, axis=1)
        # Equal probabilities: the lowest expert id wins, whatever the lanes' layout.
        winner = tl.min(tl.where(remaining == best[:, None], experts[None, :], BLOCK_E), axis=1)
        # A NaN logit equals nothing: keep the id in range so the expert GEMMs stay in bounds.
        winner = tl.minimum(winner, E - 1)
        top_w = tl.where(ranks[None, :] == k, best[:, None], top_w)
        top_id = tl.where(ranks[None, :] == k, winner[:, None], top_id)
        # The renormalising sum, in rank order.
        if k == 0:
            total = best
        else:
            total = total + best
        remaining = tl.where(experts[None, :] == winner[:, None], -1.0, remaining)
    if RENORMALIZE:
        top_w = top_w / total[:, None]

    mask = is_token[:, None] & (ranks[None, :] < TOP_K)
    tl.store(weights_ptr + rows[:, None] * stride_wt + ranks[None, :], top_w, mask=mask)
    tl.store(ids_ptr + rows[:, None] * stride_it + ranks[None, :], top_id, mask=mask)


def moe_route(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax routing: (topk_weights fp32 [T, top_k], topk_ids int32 [T, top_k]).

    Experts are ranked by their fp32 softmax probability, ties to the lower expert id; rank 0
    is the largest. With renormalize the k weights are divided by their sum (Mixtral,
    Qwen3-MoE's norm_topk_prob).
    """
    if router_logits.dim() != 2:
        raise ValueError(
            f"det_backend: moe_route needs 2-D router_logits [T, E], got "
            f"{tuple(router_logits.shape)}"
        )
    T, E = router_logits.shape
    if not 1 <= top_k <= E:
        raise ValueError(f"det_backend: moe_route top_k={top_k} must be in [1, E={E}]")
    if router_logits.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(
            f"det_backend: moe_route dtype {router_logits.dtype} unsupported "
            f"(supported: {_SUPPORTED_DTYPES})"
        )
    device = router_logits.device
    weights = torch.empty((T, top_k), dtype=torch.float32, device=device)
    ids = torch.empty((T, top_k), dtype=torch.int32, device=device)
    if T == 0:
        return weights, ids
    _moe_route_kernel[(triton.cdiv(T, _ROUTE_BLOCK_T),)](
        router_logits,
        weights,
        ids,
        T,
        E,
        router_logits.stride(0),
        router_logits.stride(1),
        weights.stride(0),
        ids.stride(0),
        TOP_K=top_k,
        RENORMALIZE=renormalize,
        BLOCK_T=_ROUTE_BLOCK_T,
        BLOCK_E=triton.next_power_of_2(E),
        BLOCK_K=triton.next_power_of_2(top_k),
    )
    return weights, ids


# --- expert sort ---------------------------------------------------------------------------


def sort_by_expert(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group the (token, k) pairs by expert, each group padded to a multiple of block_m.

    Returns sorted_pairs int32 [num_blocks * block_m], the pair index t * top_k + k of each
    row or num_pairs for padding, and block_expert int32 [num_blocks], the expert of each
    block_m rows or -1 past the last. Stable: within an expert, pairs keep ascending order.
    Sizes depend only on (num_pairs, num_experts, block_m), and nothing is read back to the
    host, so a CUDA graph can capture it.
    """
    flat = topk_ids.reshape(-1).to(torch.int64)
    num_pairs = flat.numel()
    device = flat.device
    expert_of_row, pair_of_row = torch.sort(flat, stable=True)
    # first[e]: position in the sorted pairs of expert e's first pair; first[E] = num_pairs.
    first = torch.searchsorted(
        expert_of_row, torch.arange(num_experts + 1, device=device, dtype=torch.int64)
    )
    padded = (first[1:] - first[:-1] + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    padded_start = padded_end - padded
    dest = (
        torch.arange(num_pairs, device=device) - first[expert_of_row] + padded_start[expert_of_row]
    )
    # sum_e ceil(n_e / block_m) <= ceil(num_pairs / block_m) + (number of experts used).
    num_blocks = triton.cdiv(num_pairs, block_m) + min(num_experts, num_pairs)
    sorted_pairs = torch.full((num_blocks * block_m,), num_pairs, dtype=torch.int32, device=device)
    sorted_pairs[dest] = pair_of_row.to(torch.int32)
    block_start = torch.arange(num_blocks, device=device, dtype=torch.int64) * block_m
    block_expert = torch.searchsorted(padded_end, block_start, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return sorted_pairs, block_expert


# --- grouped GEMM ----------------------------------------------------------------------------


def _moe_gemm_launch_metadata(grid, kernel, args) -> dict:
    n, k = args["N"], args["K"]
    kind = "gate_up" if args["GATED"] else "down"
    return {"name": f"moe_{kind} [pairs={args['num_pairs']}, N={n}, K={k}]"}


# num_pairs varies with the batch: unspecialized (see _moe_route_kernel).
@triton.jit(do_not_specialize=["num_pairs"], launch_metadata=_moe_gemm_launch_metadata)
def _moe_gemm_kernel(
    a_ptr,  # hidden [T, K] (A_ROW_DIV = top_k) or activations [T * top_k, K] (A_ROW_DIV = 1)
    w_ptr,  # [E, N or 2N, K], read as [K, N] per expert through its strides
    out_ptr,  # [T * top_k, N], row = pair index
    sorted_pairs_ptr,  # [num_blocks * BLOCK_M] pair index, num_pairs for padding rows
    block_expert_ptr,  # [num_blocks] expert of each row block, -1 for unused blocks
    num_pairs,
    N,
    K,
    stride_am,
    stride_ak,
    stride_we,
    stride_wn,
    stride_wk,
    stride_om,
    stride_on,
    A_ROW_DIV: tl.constexpr,
    GATED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return

    pair = tl.load(sorted_pairs_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    is_row = pair < num_pairs
    # Padding rows read row 0 and columns past N wrap around: throw-away values, never
    # stored, so the loads need no M/N mask. int64: row * stride passes 2**31 on long batches.
    a_row = tl.where(is_row, pair // A_ROW_DIV, 0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_wn = (offs_n % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_row[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = (
        w_ptr
        + expert.to(tl.int64) * stride_we
        + offs_k[:, None] * stride_wk
        + offs_wn[None, :] * stride_wn
    )
    # GATED: the up rows sit N rows below the gate rows of the same expert.
    up_offset = N.to(tl.int64) * stride_wn

    # fp32 accumulators over the whole K in this one program: a row's sum is added in the
    # same order whatever the batch.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs)
        else:
            # The K tail is padded with zeros, which add nothing to the sum.
            k_mask = offs_k < K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_mask[:, None], other=0.0)
        # "ieee": fp32 inputs must not be rounded to TF32; 16-bit inputs are unaffected.
        acc = tl.dot(a, w, acc, input_precision="ieee")
        if GATED:
            if EVEN_K:
                u = tl.load(w_ptrs + up_offset)
            else:
                u = tl.load(w_ptrs + up_offset, mask=k_mask[:, None], other=0.0)
            acc_up = tl.dot(a, u, acc_up, input_precision="ieee")
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    if GATED:
        # SiLU(gate) * up on the fp32 sums, rounded once below.
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up

    out_ptrs = out_ptr + pair.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
    out_mask = is_row[:, None] & (offs_n[None, :] < N)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def _launch_gemm(a, w, out, sorted_pairs, block_expert, a_row_div, gated, cfg) -> None:
    num_pairs, n = out.shape
    k = a.shape[1]
    grid = (block_expert.numel(), triton.cdiv(n, cfg.block_n))
    _moe_gemm_kernel[grid](
        a,
        w,
        out,
        sorted_pairs,
        block_expert,
        num_pairs,
        n,
        k,
        a.stride(0),
        a.stride(1),
        w.stride(0),
        w.stride(1),
        w.stride(2),
        out.stride(0),
        out.stride(1),
        A_ROW_DIV=a_row_div,
        GATED=gated,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        EVEN_K=k % cfg.block_k == 0,
        num_warps=cfg.num_warps,
        num_stages=_num_stages(cfg, a.element_size(), gated),
    )


# --- combine -------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["T"])
def _moe_combine_kernel(
    y_ptr,  # [T * TOP_K, H] fp32, row t * TOP_K + k
    weights_ptr,  # [T, TOP_K]
    out_ptr,  # [T, H]
    T,
    H,
    stride_ym,
    stride_yh,
    stride_wt,
    stride_wk,
    stride_ot,
    stride_oh,
    TOP_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    is_token = tokens < T
    rows = tl.where(is_token, tokens, 0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = is_token[:, None] & (cols[None, :] < H)
    # Element-wise: each element adds its token's top_k expert outputs in fp32, in rank order.
    # No reduction across lanes, no atomics, nothing shared between tokens.
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        w = tl.load(weights_ptr + rows * stride_wt + k * stride_wk).to(tl.float32)
        y_rows = rows * TOP_K + k
        y = tl.load(
            y_ptr + y_rows[:, None] * stride_ym + cols[None, :] * stride_yh, mask=mask, other=0.0
        )
        acc += w[:, None] * y
    out_ptrs = out_ptr + rows[:, None] * stride_ot + cols[None, :] * stride_oh
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# --- launchers -----------------------------------------------------------------------------


def _check_experts(hidden, w13, w2, topk_weights, topk_ids) -> None:
    if hidden.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(
            f"det_backend: fused_moe needs hidden [T, H], w13 [E, 2I, H], w2 [E, H, I], got "
            f"{tuple(hidden.shape)}, {tuple(w13.shape)}, {tuple(w2.shape)}"
        )
    T, H = hidden.shape
    E, inter = w2.shape[0], w2.shape[2]
    if w13.shape != (E, 2 * inter, H) or w2.shape != (E, H, inter):
        raise ValueError(
            f"det_backend: fused_moe shapes disagree: hidden {tuple(hidden.shape)} is [T, H], "
            f"w13 {tuple(w13.shape)} must be [E, 2I, H], w2 {tuple(w2.shape)} must be [E, H, I]"
        )
    if hidden.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(
            f"det_backend: fused_moe dtype {hidden.dtype} unsupported "
            f"(supported: {_SUPPORTED_DTYPES})"
        )
    if w13.dtype != hidden.dtype or w2.dtype != hidden.dtype:
        raise ValueError(
            f"det_backend: fused_moe dtype mismatch: hidden {hidden.dtype}, w13 {w13.dtype}, "
            f"w2 {w2.dtype}"
        )
    if topk_ids.dim() != 2 or topk_weights.shape != topk_ids.shape or topk_ids.shape[0] != T:
        raise ValueError(
            f"det_backend: fused_moe needs topk_weights and topk_ids [T={T}, top_k], got "
            f"{tuple(topk_weights.shape)} and {tuple(topk_ids.shape)}"
        )
    if topk_ids.dtype not in (torch.int32, torch.int64) or not topk_weights.is_floating_point():
        raise ValueError(
            f"det_backend: fused_moe topk_ids must be int32/int64 and topk_weights floating, got "
            f"{topk_ids.dtype} and {topk_weights.dtype}"
        )
    if not 1 <= topk_ids.shape[1] <= E:
        raise ValueError(f"det_backend: fused_moe top_k={topk_ids.shape[1]} not in [1, E={E}]")
    devices = {t.device for t in (hidden, w13, w2, topk_weights, topk_ids)}
    if len(devices) != 1:
        raise ValueError(f"det_backend: fused_moe inputs on several devices: {devices}")


def fused_experts(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    config: MoEConfig | None = None,
) -> torch.Tensor:
    """The experts of an MoE layer for tokens already routed.

    hidden [T, H]; w13 [E, 2I, H]; w2 [E, H, I]; topk_weights [T, top_k] (any float dtype, used
    in fp32); topk_ids [T, top_k] int, each in [0, E) and distinct within a row. Returns a new
    [T, H] tensor in hidden.dtype. `config` forces one tile; any entry gives the same bits.
    """
    _check_experts(hidden, w13, w2, topk_weights, topk_ids)
    T, H = hidden.shape
    E, inter = w2.shape[0], w2.shape[2]
    top_k = topk_ids.shape[1]
    out = torch.empty((T, H), dtype=hidden.dtype, device=hidden.device)
    if T == 0:
        return out
    cfg = config_for(T, top_k, E) if config is None else config
    # act: SiLU(gate) * up per pair, in the activation dtype as vLLM keeps it; y: the down
    # projection per pair, fp32 until the combine rounds once.
    act = torch.empty((T * top_k, inter), dtype=hidden.dtype, device=hidden.device)
    y = torch.empty((T * top_k, H), dtype=torch.float32, device=hidden.device)
    sorted_pairs, block_expert = sort_by_expert(topk_ids, E, cfg.block_m)
    _launch_gemm(hidden, w13, act, sorted_pairs, block_expert, top_k, True, cfg)
    _launch_gemm(act, w2, y, sorted_pairs, block_expert, 1, False, cfg)
    block_h = min(_COMBINE_BLOCK_H, triton.next_power_of_2(H))
    _moe_combine_kernel[(triton.cdiv(T, _COMBINE_BLOCK_T), triton.cdiv(H, block_h))](
        y,
        topk_weights,
        out,
        T,
        H,
        y.stride(0),
        y.stride(1),
        topk_weights.stride(0),
        topk_weights.stride(1),
        out.stride(0),
        out.stride(1),
        TOP_K=top_k,
        BLOCK_T=_COMBINE_BLOCK_T,
        BLOCK_H=block_h,
    )
    return out


def fused_moe(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    router_logits: torch.Tensor,
    top_k: int,
    renormalize: bool = True,
    config: MoEConfig | None = None,
) -> torch.Tensor:
    """A whole MoE layer: moe_route(router_logits [T, E]) then fused_experts."""
    if router_logits.shape != (hidden.shape[0], w13.shape[0]):
        raise ValueError(
            f"det_backend: fused_moe router_logits {tuple(router_logits.shape)} must be "
            f"[T={hidden.shape[0]}, E={w13.shape[0]}]"
        )
    topk_weights, topk_ids = moe_route(router_logits, top_k, renormalize)
    return fused_experts(hidden, w13, w2, topk_weights, topk_ids, config)


# --- references ----------------------------------------------------------------------------


def moe_route_reference(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax routing in float64: (weights float64, ids int64), ties to the lower id."""
    prob = torch.softmax(router_logits.double(), dim=-1)
    # Stable descending sort: equal probabilities keep ascending expert order.
    ids = torch.sort(prob, dim=-1, descending=True, stable=True).indices[:, :top_k]
    weights = prob.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def fused_experts_reference(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """fused_experts in float64, with no intermediate rounding, on hidden's device."""
    x = hidden.double()
    inter = w2.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    for e in topk_ids.unique().tolist():
        t, k = (topk_ids == e).nonzero(as_tuple=True)
        h = x[t] @ w13[e].double().T
        act = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
        y = (act @ w2[e].double().T) * topk_weights[t, k].double()[:, None]
        # A token picks an expert at most once: the indices of one index_add_ are distinct.
        out.index_add_(0, t, y)
    return out


def fused_moe_reference(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    router_logits: torch.Tensor,
    top_k: int,
    renormalize: bool = True,
) -> torch.Tensor:
    """fused_moe in float64."""
    weights, ids = moe_route_reference(router_logits, top_k, renormalize)
    return fused_experts_reference(hidden, w13, w2, weights, ids)
