"""Deterministic, batch-invariant GEMM for linear layers: y = x @ weight.T (+ bias).

Why it is batch-invariant: every output element y[m, n] is one dot product over the whole K,
computed by one program that walks K from 0 to K in BLOCK_K steps into one fp32 accumulator.
There is no split-K, no stream-K and no atomics, so no partial sums from different programs
are ever combined, and the order in which row m's products are added does not depend on M,
on the other rows, or on which program computes the tile. Rows of a tile never mix: row m of
the result reads only row m of x.

The tile shape is chosen per M (`MATMUL_CONFIGS`). That is safe because the tile shape does not
change any row's result either: on H100/H200 `tl.dot` accumulates K in the same order into the
fp32 accumulator whatever BLOCK_M/BLOCK_N/BLOCK_K and warps are, which
`test_matmul_every_config_bitwise_equal` checks rather than assumes.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl


class MatmulConfig(NamedTuple):
    """One row of the tile table: used for every M <= max_m not taken by an earlier row."""

    max_m: int
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


_ANY_M = 2**62

# Chosen per M bucket (an entry serves every M <= max_m not taken by an earlier one) from
# `benchmarks/gemm.py --sweep` on an H200 (benchmarks/results/gemm_sweep_h200.json): for each
# bucket, the tile with the best geometric-mean time over the Llama-3-8B and Qwen3-32B shapes.
# Picked by the real M at each launch (under CUDA graph capture, the padded batch size).
MATMUL_CONFIGS: tuple[MatmulConfig, ...] = (
    MatmulConfig(4, 16, 64, 256, 8, 4, 3),
    MatmulConfig(16, 16, 32, 256, 8, 4, 3),
    MatmulConfig(32, 16, 128, 128, 8, 4, 4),
    MatmulConfig(64, 64, 64, 128, 8, 4, 4),
    MatmulConfig(128, 64, 128, 64, 8, 4, 4),
    MatmulConfig(2048, 128, 128, 64, 8, 4, 4),
    MatmulConfig(_ANY_M, 256, 128, 64, 8, 8, 3),
)

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# H100/H200 allow 227 KiB of shared memory per block; keep a margin for the epilogue.
_SMEM_BUDGET_BYTES = 192 * 1024


# Per weight shape (N, K), a table of its own: the fastest tile at each M of the same sweep.
# Shapes not listed use MATMUL_CONFIGS. Every tile of every table gives the same bits (the
# sweep checked it at every point; tests/test_matmul.py checks all_configs()), so a table
# only moves time.
MATMUL_TABLE: dict[tuple[int, int], tuple[MatmulConfig, ...]] = {
    # llama-3-8b qkv
    (6144, 4096): (
        MatmulConfig(2, 16, 64, 256, 8, 4, 3),
        MatmulConfig(16, 16, 32, 256, 8, 4, 3),
        MatmulConfig(32, 16, 64, 256, 8, 4, 3),
        MatmulConfig(64, 64, 64, 128, 8, 4, 4),
        MatmulConfig(128, 64, 128, 128, 8, 4, 3),
        MatmulConfig(256, 128, 128, 128, 8, 8, 3),
        MatmulConfig(512, 128, 128, 64, 8, 8, 3),
        MatmulConfig(2048, 128, 128, 64, 8, 4, 4),
        MatmulConfig(_ANY_M, 256, 128, 64, 8, 8, 3),
    ),
    # llama-3-8b o
    (4096, 4096): (
        MatmulConfig(1, 16, 64, 256, 8, 4, 3),
        MatmulConfig(16, 16, 32, 256, 8, 4, 3),
        MatmulConfig(32, 16, 64, 256, 8, 4, 3),
        MatmulConfig(128, 64, 64, 128, 8, 4, 4),
        MatmulConfig(256, 64, 128, 128, 8, 4, 3),
        MatmulConfig(512, 128, 128, 64, 8, 4, 4),
        MatmulConfig(1024, 128, 128, 64, 8, 8, 3),
        MatmulConfig(_ANY_M, 256, 128, 64, 8, 8, 3),
    ),
    # llama-3-8b gate_up
    (28672, 4096): (
        MatmulConfig(2, 16, 128, 128, 8, 4, 4),
        MatmulConfig(8, 16, 64, 256, 8, 4, 3),
        MatmulConfig(16, 16, 128, 128, 8, 4, 4),
        MatmulConfig(32, 32, 128, 128, 8, 4, 3),
        MatmulConfig(64, 64, 128, 128, 8, 4, 3),
        MatmulConfig(128, 128, 128, 64, 8, 8, 3),
        MatmulConfig(256, 256, 128, 64, 8, 8, 3),
        MatmulConfig(1024, 128, 128, 64, 8, 4, 4),
        MatmulConfig(_ANY_M, 256, 128, 64, 8, 8, 3),
    ),
    # llama-3-8b down
    (4096, 14336): (
        MatmulConfig(2, 16, 64, 256, 8, 4, 3),
        MatmulConfig(16, 16, 32, 256, 8, 4, 3),
        MatmulConfig(32, 16, 64, 256, 8, 4, 3),
        MatmulConfig(128, 64, 64, 128, 8, 4, 4),
        MatmulConfig(256, 64, 128, 128, 8, 4, 3),
        MatmulConfig(1024, 128, 128, 64, 8, 4, 4),
        MatmulConfig(2048, 256, 128, 64, 8, 8, 3),
        MatmulConfig(_ANY_M, 128, 128, 64, 8, 4, 4),
    ),
    # llama-3-8b lm_head
    (128256, 4096): (
        MatmulConfig(1, 16, 128, 128, 8, 4, 4),
        MatmulConfig(8, 16, 64, 256, 8, 4, 3),
        MatmulConfig(16, 16, 64, 128, 8, 4, 4),
        MatmulConfig(32, 32, 128, 128, 8, 4, 3),
        MatmulConfig(64, 64, 128, 64, 8, 4, 4),
        MatmulConfig(256, 128, 128, 64, 8, 4, 4),
        MatmulConfig(512, 256, 128, 64, 8, 8, 3),
        MatmulConfig(1024, 128, 128, 64, 8, 4, 4),
        MatmulConfig(_ANY_M, 256, 128, 64, 8, 8, 3),
    ),
    # qwen3-32b qkv
    (10240, 5120): (
        MatmulConfig(2, 16, 128, 128, 8, 4, 4),
        MatmulConfig(4, 16, 32, 128, 8, 4, 4),
        MatmulConfig(8, 16, 64, 256, 8, 4, 3),
        MatmulConfig(16, 16, 32, 256, 8, 4, 3),
        MatmulConfig(32, 16, 64, 128, 8, 4, 4),
        MatmulConfig(64, 64, 128, 128, 8, 4, 3),
        MatmulConfig(128, 128, 128, 128, 8, 8, 3),
        MatmulConfig(256, 128, 128, 64, 8, 8, 3),
        MatmulConfig(1024, 128, 128, 64, 8, 4, 4),
        MatmulConfig(4096, 256, 128, 64, 8, 8, 3),
        MatmulConfig(_ANY_M, 128, 128, 64, 8, 4, 4),
    ),
    # qwen3-32b o
    (5120, 8192): (
        MatmulConfig(16, 16, 64, 256, 8, 4, 3),
        MatmulConfig(32, 16, 32, 256, 8, 4, 3),
        MatmulConfig(64, 64, 64, 128, 8, 4, 4),
        MatmulConfig(128, 64, 128, 128, 8, 4, 3),
        MatmulConfig(256, 128, 128, 64, 8, 4, 4),
        MatmulConfig(512, 128, 128, 64, 8, 8, 3),
        MatmulConfig(2048, 128, 128, 64, 8, 4, 4),
        MatmulConfig(_ANY_M, 256, 128, 64, 8, 8, 3),
    ),
    # qwen3-32b gate_up
    (51200, 5120): (
        MatmulConfig(1, 16, 64, 256, 8, 4, 3),
        MatmulConfig(4, 16, 128, 128, 8, 4, 4),
        MatmulConfig(16, 16, 32, 256, 8, 4, 3),
        MatmulConfig(32, 32, 128, 128, 8, 4, 3),
        MatmulConfig(64, 64, 128, 64, 8, 4, 4),
        MatmulConfig(128, 128, 128, 64, 8, 8, 3),
        MatmulConfig(1024, 128, 128, 64, 8, 4, 4),
        MatmulConfig(2048, 256, 128, 64, 8, 8, 3),
        MatmulConfig(4096, 128, 128, 64, 8, 4, 4),
        MatmulConfig(_ANY_M, 256, 128, 64, 8, 8, 3),
    ),
    # qwen3-32b down
    (5120, 25600): (
        MatmulConfig(16, 16, 64, 256, 8, 4, 3),
        MatmulConfig(32, 32, 64, 128, 8, 4, 4),
        MatmulConfig(64, 64, 64, 128, 8, 4, 4),
        MatmulConfig(128, 64, 128, 128, 8, 4, 3),
        MatmulConfig(256, 128, 128, 64, 8, 4, 4),
        MatmulConfig(512, 256, 128, 64, 8, 8, 3),
        MatmulConfig(2048, 128, 128, 64, 8, 4, 4),
        MatmulConfig(4096, 256, 128, 64, 8, 8, 3),
        MatmulConfig(_ANY_M, 128, 128, 64, 8, 4, 4),
    ),
}


def _first_fitting(table: tuple[MatmulConfig, ...], m: int) -> MatmulConfig:
    for config in table:
        if m <= config.max_m:
            return config
    raise ValueError(f"det_backend: no matmul config for M={m}")


def config_for_m(m: int) -> MatmulConfig:
    """The first entry of MATMUL_CONFIGS whose max_m is >= m."""
    return _first_fitting(MATMUL_CONFIGS, m)


def config_for(m: int, n: int, k: int) -> MatmulConfig:
    """The tile for an [m, k] x [k, n] product: the shape's own table, else MATMUL_CONFIGS."""
    return _first_fitting(MATMUL_TABLE.get((n, k), MATMUL_CONFIGS), m)


def all_configs() -> list[MatmulConfig]:
    """Every distinct tile the launcher can pick (max_m aside)."""
    tiles = {c._replace(max_m=0) for t in (MATMUL_CONFIGS, *MATMUL_TABLE.values()) for c in t}
    return sorted(tiles)


def _num_stages(config: MatmulConfig, element_size: int) -> int:
    # The table is sized for 16-bit inputs; fp32 tiles need twice the shared memory per stage,
    # so fewer stages. Pipelining depth never changes the K order, only the overlap.
    stage_bytes = (config.block_m + config.block_n) * config.block_k * element_size
    return max(1, min(config.num_stages, _SMEM_BUDGET_BYTES // stage_bytes))


def _matmul_launch_metadata(grid, kernel, args) -> dict:
    m, n, k = args["M"], args["N"], args["K"]
    return {
        "name": f"matmul [M={m}, N={n}, K={k}]",
        "flops": 2.0 * m * n * k,
        "bytes": args["x_ptr"].element_size() * (m * k + n * k + m * n),
    }


@triton.jit(launch_metadata=_matmul_launch_metadata)
def _matmul_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [N, K], read as its transpose [K, N] through its strides
    bias_ptr,  # [N] or a dummy when HAS_BIAS is False
    y_ptr,  # [M, N]
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_ym,
    stride_yn,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    # Grouped ordering (Triton tutorial 03): GROUP_M row-tiles share each column-tile of the
    # weight while it is in L2. It only changes which program computes a tile, not how.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    # Rows/columns past the edge wrap around (% M, % N) instead of being masked: they compute
    # throw-away values that are never stored, and the loads need no M/N mask. int64 offsets:
    # M * stride_ym passes 2**31 for lm_head at a few thousand rows.
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_xm = (offs_m % M).to(tl.int64)
    offs_wn = (offs_n % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_xm[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_wn[None, :] * stride_wn

    # fp32 accumulator over the whole K in this one program: no partial sums from other
    # programs, so row m's sum is added in the same order whatever M is.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            x = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
        else:
            # The K tail is padded with zeros, which add nothing to the sum.
            k_mask = offs_k < K - k * BLOCK_K
            x = tl.load(x_ptrs, mask=k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_mask[:, None], other=0.0)
        # "ieee": fp32 inputs must not be rounded to TF32; 16-bit inputs are unaffected.
        acc = tl.dot(x, w, acc, input_precision="ieee")
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    if HAS_BIAS:
        # Bias joins the fp32 accumulator, so the output is rounded once.
        bias = tl.load(bias_ptr + offs_wn).to(tl.float32)
        acc += bias[None, :]

    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
    y_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


def _check_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(
            f"det_backend: matmul needs a 2-D x [M, K] and a 2-D weight [N, K], got "
            f"x {tuple(x.shape)} and weight {tuple(weight.shape)}"
        )
    if x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"det_backend: matmul K mismatch: x {tuple(x.shape)} is [M, K], weight "
            f"{tuple(weight.shape)} must be [N, K]"
        )
    if x.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(
            f"det_backend: matmul dtype {x.dtype} unsupported (supported: {_SUPPORTED_DTYPES})"
        )
    if weight.dtype != x.dtype:
        raise ValueError(f"det_backend: matmul dtype mismatch: x {x.dtype}, weight {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(
            f"det_backend: matmul device mismatch: x on {x.device}, weight on {weight.device}"
        )
    if bias is None:
        return
    if bias.shape != (weight.shape[0],):
        raise ValueError(
            f"det_backend: matmul bias must be [N]={weight.shape[0]}, got {tuple(bias.shape)}"
        )
    if bias.dtype != x.dtype or bias.device != x.device:
        raise ValueError(
            f"det_backend: matmul bias is {bias.dtype} on {bias.device}, x is {x.dtype} on "
            f"{x.device}; they must match"
        )


def matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: MatmulConfig | None = None,
) -> torch.Tensor:
    """y = x @ weight.T (+ bias) for x [M, K], weight [N, K] (torch.nn.Linear layout), bias [N].

    Returns a new [M, N] tensor in x.dtype. `config` forces one tile shape instead of
    `config_for_m(M)`; any entry gives bitwise the same result.
    """
    _check_inputs(x, weight, bias)
    M, K = x.shape
    N = weight.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    cfg = config_for(M, N, K) if config is None else config
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),)
    _matmul_kernel[grid](
        x,
        weight,
        bias if bias is not None else x,
        y,
        M,
        N,
        K,
        x.stride(0),
        x.stride(1),
        weight.stride(0),
        weight.stride(1),
        y.stride(0),
        y.stride(1),
        HAS_BIAS=bias is not None,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m,
        EVEN_K=K % cfg.block_k == 0,
        num_warps=cfg.num_warps,
        num_stages=_num_stages(cfg, x.element_size()),
    )
    return y


def matmul_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x @ weight.T (+ bias) in float64, on x's device."""
    y = x.double() @ weight.double().T
    if bias is not None:
        y = y + bias.double()
    return y
