"""Deterministic, batch-invariant GEMM for linear layers: y = x @ weight.T (+ bias).

Why it is batch-invariant: every output element y[m, n] is a fixed sum over K that one program
computes: K is cut into `split_k` chunks that depend only on (K, split_k) (`k_chunk`), each
chunk is one fp32 dot product walked from its start in BLOCK_K steps, and the chunks' sums are
added in chunk order (split_k = 1: one dot product over the whole K). No stream-K, no atomics,
nothing whose grouping depends on M, on the other rows, or on which program computes a tile.
Rows of a tile never mix: row m of the result reads only row m of x.

Three kernels compute that same sum (`MatmulConfig.kind`):
- "plain": one program per output tile, pointer loads, the chunks one after the other.
- "split_k": one program per (tile, chunk) writes the chunk's fp32 sum; a second small kernel
  adds the chunks in order. More programs for small M on narrow layers; its sum is the
  "plain"/"tma_persistent" sum with the same split_k, so a shape keeps one split_k for all M.
- "tma_persistent" (sm_90+): one program per SM walks the output tiles (grouped for L2),
  loading x and weight tiles with TMA tensor descriptors (the K, M and N tails come back as
  zeros); same per-tile sum as "plain".

The tile shape and kind are chosen per M and weight shape (`config_for`). That is safe because
they do not change any row's result: on H100/H200 `tl.dot` accumulates K in the same order
into the fp32 accumulator whatever BLOCK_M/BLOCK_N/BLOCK_K, warps or loads are, which
`test_matmul_every_config_bitwise_equal` checks for every config of the same split_k rather
than assumes. Different split_k give different (equally accurate) bits.
"""

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

KINDS = ("plain", "split_k", "tma_persistent")


class MatmulConfig(NamedTuple):
    """One row of a tile table: used for every M <= max_m not taken by an earlier row."""

    max_m: int
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    kind: str = "plain"
    # K chunks summed in order; the bits depend on it (and on K), never on the rest.
    split_k: int = 1
    # "tma_persistent" only: tl.range(warp_specialize=True) over the tiles.
    warp_specialize: bool = False


_ANY_M = 2**62

# The portable table: every GPU family, any weight shape without a table of its own.
# Chosen per M bucket (an entry serves every M <= max_m not taken by an earlier one) from
# `benchmarks/gemm.py --sweep` on an H200 (benchmarks/results/gemm_sweep_h200.json): for each
# bucket, the tile with the best geometric-mean time over the Llama-3-8B and Qwen3-32B shapes.
# Picked by the real M at each launch (under CUDA graph capture, the padded batch size).
# "plain" kind and split_k = 1 only: it must run on any GPU and serve any shape.
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

# K chunks are multiples of the largest BLOCK_K, so no BLOCK_K step straddles two chunks
# (TMA loads cannot be masked at a chunk's end) and every BLOCK_K walks a chunk the same way.
_K_CHUNK_MULTIPLE = 256

# The tile tables are per GPU family. MATMUL_TABLE is the sm_90 (H100/H200) family's: per
# weight shape (N, K), the fastest config at each M: M < 128 from the H200 sweep, M >= 128 from
# the H100 re-sweep with the TMA kind ("tma_persistent", sm_90 only; `gemm_table.py
# --keep-below 128`, results gemm_sweep_tma_*_h100.json). Other GPUs (and the CPU interpreter)
# use MATMUL_CONFIGS for every shape: tables measured on one family say nothing about another.
# Every config of every table gives the same bits as every other with the same split_k (the
# sweep checks it at every point; tests/test_matmul.py checks all_configs()), and all entries
# of one shape share one split_k (tests check it), so a table only moves time.
SM90 = "sm90"
PORTABLE = "portable"
MATMUL_TABLE: dict[tuple[int, int], tuple[MatmulConfig, ...]] = {
    # llama-3-8b qkv
    (6144, 4096): (
        MatmulConfig(2, 16, 64, 256, 8, 4, 3),
        MatmulConfig(16, 16, 32, 256, 8, 4, 3),
        MatmulConfig(32, 16, 64, 256, 8, 4, 3),
        MatmulConfig(64, 64, 64, 128, 8, 4, 4),
        MatmulConfig(128, 64, 128, 128, 8, 4, 3),
        MatmulConfig(256, 128, 128, 128, 8, 8, 3, "tma_persistent"),
        MatmulConfig(512, 128, 256, 64, 8, 8, 3, "tma_persistent"),
        MatmulConfig(1024, 128, 128, 64, 8, 4, 4, "tma_persistent"),
        MatmulConfig(_ANY_M, 128, 256, 64, 8, 8, 3, "tma_persistent"),
    ),
    # llama-3-8b o
    (4096, 4096): (
        MatmulConfig(1, 16, 64, 256, 8, 4, 3),
        MatmulConfig(16, 16, 32, 256, 8, 4, 3),
        MatmulConfig(32, 16, 64, 256, 8, 4, 3),
        MatmulConfig(128, 64, 64, 128, 8, 4, 4),
        MatmulConfig(256, 64, 128, 128, 8, 4, 3),
        MatmulConfig(512, 128, 128, 128, 8, 8, 3, "tma_persistent"),
        MatmulConfig(_ANY_M, 128, 256, 64, 8, 8, 3, "tma_persistent"),
    ),
    # llama-3-8b gate_up
    (28672, 4096): (
        MatmulConfig(2, 16, 128, 128, 8, 4, 4),
        MatmulConfig(8, 16, 64, 256, 8, 4, 3),
        MatmulConfig(16, 16, 128, 128, 8, 4, 4),
        MatmulConfig(32, 32, 128, 128, 8, 4, 3),
        MatmulConfig(64, 64, 128, 128, 8, 4, 3),
        MatmulConfig(128, 128, 128, 128, 8, 8, 3, "tma_persistent"),
        MatmulConfig(2048, 128, 256, 64, 8, 8, 3, "tma_persistent"),
        MatmulConfig(4096, 128, 128, 64, 8, 4, 4, "tma_persistent"),
        MatmulConfig(_ANY_M, 128, 256, 64, 8, 8, 3, "tma_persistent"),
    ),
    # llama-3-8b down
    (4096, 14336): (
        MatmulConfig(2, 16, 64, 256, 8, 4, 3),
        MatmulConfig(16, 16, 32, 256, 8, 4, 3),
        MatmulConfig(32, 16, 64, 256, 8, 4, 3),
        MatmulConfig(128, 64, 64, 128, 8, 4, 4),
        MatmulConfig(256, 64, 128, 128, 8, 4, 3),
        MatmulConfig(512, 128, 128, 64, 8, 4, 4, "tma_persistent"),
        MatmulConfig(2048, 128, 256, 64, 8, 8, 3, "tma_persistent"),
        MatmulConfig(4096, 128, 128, 64, 8, 4, 4, "tma_persistent"),
        MatmulConfig(_ANY_M, 128, 256, 64, 8, 8, 3, "tma_persistent"),
    ),
    # llama-3-8b lm_head
    (128256, 4096): (
        MatmulConfig(1, 16, 128, 128, 8, 4, 4),
        MatmulConfig(8, 16, 64, 256, 8, 4, 3),
        MatmulConfig(16, 16, 64, 128, 8, 4, 4),
        MatmulConfig(32, 32, 128, 128, 8, 4, 3),
        MatmulConfig(64, 64, 128, 64, 8, 4, 4),
        MatmulConfig(128, 128, 128, 128, 8, 8, 3, "tma_persistent"),
        MatmulConfig(1024, 128, 256, 64, 8, 8, 3, "tma_persistent"),
        MatmulConfig(4096, 128, 128, 64, 8, 4, 4, "tma_persistent"),
        MatmulConfig(_ANY_M, 128, 256, 64, 8, 8, 3, "tma_persistent"),
    ),
    # qwen3-32b qkv
    (10240, 5120): (
        MatmulConfig(2, 16, 128, 128, 8, 4, 4),
        MatmulConfig(4, 16, 32, 128, 8, 4, 4),
        MatmulConfig(8, 16, 64, 256, 8, 4, 3),
        MatmulConfig(16, 16, 32, 256, 8, 4, 3),
        MatmulConfig(32, 16, 64, 128, 8, 4, 4),
        MatmulConfig(64, 64, 128, 128, 8, 4, 3),
        MatmulConfig(128, 128, 128, 128, 8, 8, 3, "tma_persistent"),
        MatmulConfig(256, 128, 256, 64, 8, 8, 3, "tma_persistent"),
        MatmulConfig(1024, 128, 128, 64, 8, 4, 4, "tma_persistent"),
        MatmulConfig(4096, 256, 128, 64, 8, 8, 3, "tma_persistent"),
        MatmulConfig(_ANY_M, 128, 128, 64, 8, 4, 4, "tma_persistent"),
    ),
    # qwen3-32b o
    (5120, 8192): (
        MatmulConfig(16, 16, 64, 256, 8, 4, 3),
        MatmulConfig(32, 16, 32, 256, 8, 4, 3),
        MatmulConfig(64, 64, 64, 128, 8, 4, 4),
        MatmulConfig(128, 64, 128, 128, 8, 4, 3),
        MatmulConfig(256, 128, 128, 128, 8, 8, 3, "tma_persistent"),
        MatmulConfig(512, 128, 256, 64, 8, 8, 3, "tma_persistent"),
        MatmulConfig(2048, 128, 128, 64, 8, 4, 4, "tma_persistent"),
        MatmulConfig(_ANY_M, 128, 256, 64, 8, 8, 3, "tma_persistent"),
    ),
    # qwen3-32b gate_up
    (51200, 5120): (
        MatmulConfig(1, 16, 64, 256, 8, 4, 3),
        MatmulConfig(4, 16, 128, 128, 8, 4, 4),
        MatmulConfig(16, 16, 32, 256, 8, 4, 3),
        MatmulConfig(32, 32, 128, 128, 8, 4, 3),
        MatmulConfig(64, 64, 128, 64, 8, 4, 4),
        MatmulConfig(128, 128, 128, 64, 8, 8, 3),
        MatmulConfig(256, 128, 128, 128, 8, 8, 3, "tma_persistent"),
        MatmulConfig(2048, 128, 256, 64, 8, 8, 3, "tma_persistent"),
        MatmulConfig(4096, 256, 128, 64, 8, 8, 3, "tma_persistent"),
        MatmulConfig(_ANY_M, 128, 256, 64, 8, 8, 3, "tma_persistent"),
    ),
    # qwen3-32b down
    (5120, 25600): (
        MatmulConfig(16, 16, 64, 256, 8, 4, 3),
        MatmulConfig(32, 32, 64, 128, 8, 4, 4),
        MatmulConfig(64, 64, 64, 128, 8, 4, 4),
        MatmulConfig(128, 64, 128, 128, 8, 4, 3),
        MatmulConfig(256, 128, 128, 64, 8, 4, 4, "tma_persistent"),
        MatmulConfig(512, 128, 256, 64, 8, 8, 3, "tma_persistent"),
        MatmulConfig(2048, 128, 128, 64, 8, 4, 4, "tma_persistent"),
        MatmulConfig(_ANY_M, 128, 256, 64, 8, 8, 3, "tma_persistent"),
    ),
}

# What `benchmarks/gemm.py --sweep` times at every point (max_m unused). Listed here so the
# tests check every one of them: a sweep can only promote a config that is already tested.
_C = MatmulConfig
MATMUL_CANDIDATES: tuple[MatmulConfig, ...] = (
    # plain, split_k = 1: the tiles of the first sweep
    _C(0, 16, 32, 128, 8, 4, 4),
    _C(0, 16, 32, 256, 8, 4, 3),
    _C(0, 16, 64, 128, 8, 4, 4),
    _C(0, 16, 64, 256, 8, 4, 3),
    _C(0, 16, 128, 128, 8, 4, 4),
    _C(0, 32, 64, 128, 8, 4, 4),
    _C(0, 32, 128, 128, 8, 4, 3),
    _C(0, 64, 64, 128, 8, 4, 4),
    _C(0, 64, 128, 64, 8, 4, 4),
    _C(0, 64, 128, 128, 8, 4, 3),
    _C(0, 64, 256, 64, 8, 8, 3),
    _C(0, 128, 128, 64, 8, 4, 4),
    _C(0, 128, 128, 64, 8, 8, 3),
    _C(0, 128, 256, 64, 8, 8, 3),
    _C(0, 128, 128, 128, 8, 8, 3),
    _C(0, 256, 128, 64, 8, 8, 3),
    # TMA + persistent tile loop, split_k = 1 (large M)
    _C(0, 64, 128, 64, 8, 4, 4, "tma_persistent"),
    _C(0, 128, 128, 64, 8, 4, 4, "tma_persistent"),
    _C(0, 128, 128, 64, 8, 8, 4, "tma_persistent"),
    _C(0, 128, 256, 64, 8, 8, 3, "tma_persistent"),
    _C(0, 128, 128, 128, 8, 8, 3, "tma_persistent"),
    _C(0, 256, 128, 64, 8, 8, 3, "tma_persistent"),
    # No warp_specialize=True candidate: the H100 sweep that reached the two listed here never
    # ended its first point (2026-11-26); Triton's tutorial uses it on Blackwell only. GPU first.
    # split_k = 2 and 4: parallel chunks for small M on narrow layers, and the in-program
    # versions with the same bits for the larger M of the same shape (8 warps: two fp32
    # accumulators, the running sum and the chunk's, must fit in registers)
    *(
        _C(0, *tile, kind, split_k)
        for split_k in (2, 4)
        for *tile, kind in (
            (16, 64, 256, 8, 4, 3, "split_k"),
            (16, 128, 128, 8, 8, 4, "split_k"),
            (32, 64, 128, 8, 4, 4, "split_k"),
            (64, 64, 128, 8, 4, 4, "split_k"),
            (64, 128, 64, 8, 4, 4, "split_k"),
            (64, 128, 64, 8, 4, 4, "plain"),
            (128, 128, 64, 8, 8, 3, "plain"),
            (64, 128, 64, 8, 4, 4, "tma_persistent"),
            (128, 128, 64, 8, 8, 3, "tma_persistent"),
        )
    ),
)
del _C


def _first_fitting(table: tuple[MatmulConfig, ...], m: int) -> MatmulConfig:
    for config in table:
        if m <= config.max_m:
            return config
    raise ValueError(f"det_backend: no matmul config for M={m}")


def config_for_m(m: int) -> MatmulConfig:
    """The first entry of MATMUL_CONFIGS whose max_m is >= m."""
    return _first_fitting(MATMUL_CONFIGS, m)


def config_for(m: int, n: int, k: int, family: str, full_k: bool = False) -> MatmulConfig:
    """The config for an [m, k] x [k, n] product on a GPU of `family` (`gpu_family`): the
    shape's own table on sm_90, else MATMUL_CONFIGS.

    full_k: only split_k = 1 configs (one fp32 dot over the whole K), so that a column's bits
    do not depend on N: a column-parallel layer at TP = t has N / t columns, and a table for
    one of (N, K), (N / t, K) may name another split_k than the other's. A shape whose table
    splits K then uses MATMUL_CONFIGS (all split_k = 1)."""
    table = MATMUL_TABLE.get((n, k)) if family == SM90 else None
    if table and full_k and table[0].split_k != 1:  # one split_k per table (tested)
        table = None
    return _first_fitting(table or MATMUL_CONFIGS, m)


def gpu_family(device: torch.device) -> str:
    """SM90 for H100/H200 (compute capability 9.x), PORTABLE for other GPUs and the CPU."""
    if device.type != "cuda":
        return PORTABLE
    return SM90 if _device_info(device.index)[0][0] == 9 else PORTABLE


def all_configs() -> dict[int, list[MatmulConfig]]:
    """Every distinct config a table can pick or the sweep can propose (max_m aside), grouped
    by split_k: within a group every config gives the same bits."""
    tables = (MATMUL_CONFIGS, *MATMUL_TABLE.values(), MATMUL_CANDIDATES)
    configs = sorted({c._replace(max_m=0) for t in tables for c in t})
    return {s: [c for c in configs if c.split_k == s] for s in sorted({c.split_k for c in configs})}


def k_chunk(k: int, split_k: int) -> int:
    """The length of each of split_k K chunks (the last one may be shorter or empty):
    cdiv(K, split_k) rounded up to a multiple of 256. Depends on nothing but (K, split_k)."""
    return triton.cdiv(triton.cdiv(k, split_k), _K_CHUNK_MULTIPLE) * _K_CHUNK_MULTIPLE


@functools.cache
def _device_info(index: int) -> tuple[tuple[int, int], int]:
    """(compute capability, multiprocessor count) of CUDA device `index`."""
    props = torch.cuda.get_device_properties(index)
    return (props.major, props.minor), props.multi_processor_count


def _num_stages(config: MatmulConfig, element_size: int) -> int:
    # The table is sized for 16-bit inputs; fp32 tiles need twice the shared memory per stage,
    # so fewer stages. Pipelining depth never changes the K order, only the overlap.
    stage_bytes = (config.block_m + config.block_n) * config.block_k * element_size
    return max(1, min(config.num_stages, _SMEM_BUDGET_BYTES // stage_bytes))


def _matmul_launch_metadata(grid, kernel, args) -> dict:
    m, n, k = args["M"], args["N"], args["K"]
    x = args["x_ptr"] if "x_ptr" in args else args["x_desc"].base
    return {
        "name": f"{kernel.name} [M={m}, N={n}, K={k}]",
        "flops": 2.0 * m * n * k,
        "bytes": x.element_size() * (m * k + n * k + m * n),
    }


@triton.jit
def _tile_coords(
    tile_id, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr
):
    # Grouped ordering (Triton tutorial 03): GROUP_M row-tiles share each column-tile of the
    # weight while it is in L2. It only changes which program computes a tile, not how.
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = tile_id // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((tile_id % num_pid_in_group) % group_size_m)
    pid_n = (tile_id % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _chunk_len(K, K_CHUNK, chunk):
    # Chunk `chunk` covers K from chunk * K_CHUNK for this many elements (0 past the end).
    return tl.maximum(tl.minimum(K_CHUNK, K - chunk * K_CHUNK), 0)


@triton.jit
def _store_tile(acc, bias_ptr, y_ptr, offs_m, offs_n, M, N, stride_ym, stride_yn, HAS_BIAS):
    # The epilogue every kind shares, so their outputs are rounded the same way.
    if HAS_BIAS:
        # Bias joins the fp32 accumulator, so the output is rounded once.
        bias = tl.load(bias_ptr + (offs_n % N)).to(tl.float32)
        acc += bias[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
    y_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


@triton.jit
def _dot_chunk(
    x_ptr,
    w_ptr,
    offs_xm,
    offs_wn,
    k_start,
    k_len,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    # fp32 sum of x[m, k] * w[n, k] over k_start <= k < k_start + k_len, walked in BLOCK_K
    # steps from k_start into one accumulator that starts at zero.
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_xm[:, None] * stride_xm + (k_start + offs_k)[None, :] * stride_xk
    w_ptrs = w_ptr + (k_start + offs_k)[:, None] * stride_wk + offs_wn[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(k_len, BLOCK_K)):
        if EVEN_K:
            x = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
        else:
            # The tail is padded with zeros, which add nothing to the sum.
            k_mask = offs_k < k_len - k * BLOCK_K
            x = tl.load(x_ptrs, mask=k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_mask[:, None], other=0.0)
        # "ieee": fp32 inputs must not be rounded to TF32; 16-bit inputs are unaffected.
        acc = tl.dot(x, w, acc, input_precision="ieee")
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    return acc


@triton.jit(launch_metadata=_matmul_launch_metadata)
def _matmul_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [N, K], read as its transpose [K, N] through its strides
    bias_ptr,  # [N] or a dummy when HAS_BIAS is False
    y_ptr,  # [M, N]; with PARTIALS, fp32 [SPLIT_K, M, N]
    M,
    N,
    K,
    K_CHUNK,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_ys,
    stride_ym,
    stride_yn,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    PARTIALS: tl.constexpr,
):
    pid_m, pid_n = _tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    # Rows/columns past the edge wrap around (% M, % N) instead of being masked: they compute
    # throw-away values that are never stored, and the loads need no M/N mask. int64 offsets:
    # M * stride_ym passes 2**31 for lm_head at a few thousand rows.
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_xm = (offs_m % M).to(tl.int64)
    offs_wn = (offs_n % N).to(tl.int64)

    if PARTIALS:
        # This program sums chunk program_id(1) only, into its fp32 slice of the partials;
        # _split_k_reduce_kernel adds the slices in chunk order.
        chunk = tl.program_id(1)
        acc = _dot_chunk(
            x_ptr, w_ptr, offs_xm, offs_wn, chunk * K_CHUNK, _chunk_len(K, K_CHUNK, chunk),
            stride_xm, stride_xk, stride_wn, stride_wk, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K,
        )  # fmt: skip
        p_ptrs = (
            y_ptr
            + chunk.to(tl.int64) * stride_ys
            + offs_m.to(tl.int64)[:, None] * stride_ym
            + offs_n[None, :] * stride_yn
        )
        tl.store(p_ptrs, acc, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))
    else:
        # fp32 accumulators only: bf16 partial sums would round differently per tile.
        if SPLIT_K == 1:
            acc = _dot_chunk(
                x_ptr, w_ptr, offs_xm, offs_wn, 0, K,
                stride_xm, stride_xk, stride_wn, stride_wk, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K,
            )  # fmt: skip
        else:
            # The chunks one after the other, each from zero, added in chunk order to a zero
            # sum: the same additions as the partials kernel plus _split_k_reduce_kernel.
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for chunk in range(0, SPLIT_K):
                acc += _dot_chunk(
                    x_ptr, w_ptr, offs_xm, offs_wn, chunk * K_CHUNK,
                    _chunk_len(K, K_CHUNK, chunk),
                    stride_xm, stride_xk, stride_wn, stride_wk, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K,
                )  # fmt: skip
        _store_tile(acc, bias_ptr, y_ptr, offs_m, offs_n, M, N, stride_ym, stride_yn, HAS_BIAS)


@triton.jit
def _split_k_reduce_kernel(
    p_ptr,  # fp32 [SPLIT_K, M, N], contiguous
    bias_ptr,
    y_ptr,  # [M, N]
    M,
    N,
    stride_ps,  # M * N: from one chunk's partials to the next
    stride_ym,
    stride_yn,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    p_ptrs = p_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    # Chunk order, into a zero sum: the in-program kernels add the same way.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in tl.static_range(SPLIT_K):
        acc += tl.load(p_ptrs, mask=mask, other=0.0)
        p_ptrs += stride_ps
    _store_tile(acc, bias_ptr, y_ptr, offs_m, offs_n, M, N, stride_ym, stride_yn, HAS_BIAS)


@triton.jit
def _tma_dot_chunk(
    x_desc,
    w_desc,
    off_m,
    off_n,
    k_start,
    k_len,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # _dot_chunk through TMA descriptors: [BLOCK_M, BLOCK_K] x tiles, [BLOCK_N, BLOCK_K] weight
    # tiles read transposed.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(k_len, BLOCK_K)):
        x = x_desc.load([off_m, k_start + k * BLOCK_K])
        w = w_desc.load([off_n, k_start + k * BLOCK_K])
        acc = tl.dot(x, w.T, acc, input_precision="ieee")
    return acc


@triton.jit(launch_metadata=_matmul_launch_metadata)
def _matmul_tma_kernel(
    x_desc,  # TMA descriptor of x [M, K], blocks [BLOCK_M, BLOCK_K]
    w_desc,  # TMA descriptor of weight [N, K], blocks [BLOCK_N, BLOCK_K]
    bias_ptr,
    y_ptr,  # [M, N]
    M,
    N,
    K,
    K_CHUNK,
    stride_ym,
    stride_yn,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
):
    # Persistent: NUM_PROGRAMS programs (one per SM) take tiles tile_id, tile_id +
    # NUM_PROGRAMS, ... in grouped order. Which program computes a tile never changes how.
    # flatten lets the pipeliner load the next tile's first K steps during this tile's
    # epilogue; Triton 3.6 warp-specializes on sm_90 only an unflattened loop.
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile_id in tl.range(
        tl.program_id(0),
        num_tiles,
        NUM_PROGRAMS,
        flatten=not WARP_SPECIALIZE,
        warp_specialize=WARP_SPECIALIZE,
    ):
        pid_m, pid_n = _tile_coords(tile_id, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        # The same sums as _matmul_kernel: each chunk walked in BLOCK_K steps from zero into
        # fp32, the chunks added in order to a zero sum. TMA returns zeros past K, M and N:
        # no masks, and padded rows and columns are never stored. Chunks are multiples of
        # BLOCK_K (k_chunk), so a step never reads into the next chunk.
        if SPLIT_K == 1:
            acc = _tma_dot_chunk(x_desc, w_desc, off_m, off_n, 0, K, BLOCK_M, BLOCK_N, BLOCK_K)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for chunk in range(0, SPLIT_K):
                acc += _tma_dot_chunk(
                    x_desc, w_desc, off_m, off_n, chunk * K_CHUNK,
                    _chunk_len(K, K_CHUNK, chunk), BLOCK_M, BLOCK_N, BLOCK_K,
                )  # fmt: skip
        offs_m = off_m + tl.arange(0, BLOCK_M)
        offs_n = off_n + tl.arange(0, BLOCK_N)
        _store_tile(acc, bias_ptr, y_ptr, offs_m, offs_n, M, N, stride_ym, stride_yn, HAS_BIAS)


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


def _check_config(config: MatmulConfig, x: torch.Tensor) -> None:
    if config.kind not in KINDS:
        raise ValueError(f"det_backend: matmul config kind {config.kind!r} not in {KINDS}")
    if config.split_k < 1:
        raise ValueError(f"det_backend: matmul config {config}: split_k must be >= 1")
    if config.kind == "split_k" and config.split_k < 2:
        raise ValueError(f"det_backend: matmul config {config}: kind 'split_k' needs split_k >= 2")
    if _K_CHUNK_MULTIPLE % config.block_k:
        raise ValueError(
            f"det_backend: matmul config {config}: block_k must divide {_K_CHUNK_MULTIPLE}"
        )
    if config.warp_specialize and config.kind != "tma_persistent":
        raise ValueError(
            f"det_backend: matmul config {config}: warp_specialize is for 'tma_persistent' only"
        )
    if config.kind == "tma_persistent" and x.is_cuda and _device_info(x.device.index)[0] < (9, 0):
        major, minor = _device_info(x.device.index)[0]
        raise RuntimeError(
            f"det_backend: matmul config kind 'tma_persistent' needs TMA (sm_90 or newer); "
            f"{torch.cuda.get_device_name(x.device)} is sm_{major}{minor}. Only the sm_90 "
            "table (MATMUL_TABLE) names this kind; pass a 'plain' config on other GPUs."
        )


def _tma_fits(t: torch.Tensor) -> bool:
    # TMA reads rows of a 16-byte aligned base, with a unit inner stride and 16-byte row pitch.
    row_bytes = t.stride(0) * t.element_size()
    return not (t.stride(1) != 1 or row_bytes % 16 or t.data_ptr() % 16 or t.shape[1] == 0)


def _check_tma_operand(t: torch.Tensor, name: str) -> None:
    if not _tma_fits(t):
        raise ValueError(
            f"det_backend: matmul kind 'tma_persistent' needs {name} with unit column stride, "
            f"rows 16-byte aligned and K > 0; got shape {tuple(t.shape)}, strides {t.stride()}, "
            f"data_ptr % 16 = {t.data_ptr() % 16}. Use a 'plain' config for this layout."
        )


def launch_matmul_kernel(x, weight, bias, out, cfg: MatmulConfig, chunk: int, partials: bool):
    """One launch of _matmul_kernel. partials: out is fp32 [cfg.split_k, M, N] and receives
    each K chunk's fp32 sum (chunk `c` covers K from c * chunk, `chunk` long, walked from
    zero in BLOCK_K steps); else out is [M, N] and receives the chunks added in order, plus
    bias, rounded once. `chunk` must be a multiple of cfg.block_k."""
    M, K = x.shape
    N = weight.shape[0]
    grid = (
        triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),
        cfg.split_k if partials else 1,
    )
    _matmul_kernel[grid](
        x,
        weight,
        bias if bias is not None else x,
        out,
        M,
        N,
        K,
        chunk,
        x.stride(0),
        x.stride(1),
        weight.stride(0),
        weight.stride(1),
        out.stride(0) if partials else 0,
        out.stride(-2),
        out.stride(-1),
        HAS_BIAS=bias is not None,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m,
        # Chunks are multiples of BLOCK_K: only K itself can leave a tail.
        EVEN_K=K % cfg.block_k == 0,
        SPLIT_K=cfg.split_k,
        PARTIALS=partials,
        num_warps=cfg.num_warps,
        num_stages=_num_stages(cfg, x.element_size()),
    )


def _launch_plain(x, weight, bias, y, cfg: MatmulConfig) -> None:
    M, K = x.shape
    N = weight.shape[0]
    chunk = k_chunk(K, cfg.split_k)
    partials = cfg.kind == "split_k"
    # Partials: fp32 [split_k, M, N], every element written by the first kernel.
    out = torch.empty((cfg.split_k, M, N), dtype=torch.float32, device=x.device) if partials else y
    launch_matmul_kernel(x, weight, bias, out, cfg, chunk, partials)
    if partials:
        block_m, block_n = 16, 128
        _split_k_reduce_kernel[(triton.cdiv(M, block_m), triton.cdiv(N, block_n))](
            out,
            bias if bias is not None else x,
            y,
            M,
            N,
            out.stride(0),
            y.stride(0),
            y.stride(1),
            HAS_BIAS=bias is not None,
            SPLIT_K=cfg.split_k,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            num_warps=4,
        )


# Under TRITON_INTERPRET=1 (CPU): a few programs, so each walks several tiles.
_INTERPRETER_PROGRAMS = 3


def _launch_tma(x, weight, bias, y, cfg: MatmulConfig) -> None:
    # x and weight were checked by matmul() (_tma_fits).
    M, K = x.shape
    N = weight.shape[0]
    num_programs = _device_info(x.device.index)[1] if x.is_cuda else _INTERPRETER_PROGRAMS
    num_tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
    # Host-side descriptors: the launcher encodes each TMA map and passes it by value, so
    # nothing is allocated on the device and CUDA graphs capture it like a pointer.
    x_desc = TensorDescriptor(x, list(x.shape), list(x.stride()), [cfg.block_m, cfg.block_k])
    w_desc = TensorDescriptor(
        weight, list(weight.shape), list(weight.stride()), [cfg.block_n, cfg.block_k]
    )
    _matmul_tma_kernel[(min(num_programs, num_tiles),)](
        x_desc,
        w_desc,
        bias if bias is not None else x,
        y,
        M,
        N,
        K,
        k_chunk(K, cfg.split_k),
        y.stride(0),
        y.stride(1),
        HAS_BIAS=bias is not None,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m,
        SPLIT_K=cfg.split_k,
        NUM_PROGRAMS=num_programs,
        WARP_SPECIALIZE=cfg.warp_specialize,
        num_warps=cfg.num_warps,
        num_stages=_num_stages(cfg, x.element_size()),
    )


def matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: MatmulConfig | None = None,
    full_k: bool = False,
) -> torch.Tensor:
    """y = x @ weight.T (+ bias) for x [M, K], weight [N, K] (torch.nn.Linear layout), bias [N].

    Returns a new [M, N] tensor in x.dtype. `config` forces one config instead of
    `config_for(M, N, K, gpu_family(x.device), full_k)`; any config with the same split_k
    gives bitwise the same result. full_k: split_k = 1 only, so each column's bits are the same
    whatever N (column-parallel layers in TP-invariant mode).
    """
    _check_inputs(x, weight, bias)
    M, K = x.shape
    N = weight.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    cfg = config_for(M, N, K, gpu_family(x.device), full_k) if config is None else config
    if cfg.kind == "tma_persistent" and not (_tma_fits(x) and _tma_fits(weight)):
        if config is not None:  # forced: refuse, naming the operand
            _check_tma_operand(x, "x")
            _check_tma_operand(weight, "weight")
        # From the table, a layout TMA cannot read (an unaligned view): the plain kernel with
        # the same tile and split_k, which gives the same bits (every config of a split_k
        # does: tested).
        cfg = cfg._replace(kind="plain")
    _check_config(cfg, x)
    if cfg.kind == "tma_persistent":
        _launch_tma(x, weight, bias, y, cfg)
    else:
        _launch_plain(x, weight, bias, y, cfg)
    return y


def matmul_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x @ weight.T (+ bias) in float64, on x's device."""
    y = x.double() @ weight.double().T
    if bias is not None:
        y = y + bias.double()
    return y
