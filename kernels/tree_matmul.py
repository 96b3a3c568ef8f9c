"""Row-parallel GEMM whose bits do not depend on the tensor-parallel size: y = x @ weight.T
(+ bias), with K reduced in TREE_SLICES fixed slices added in a fixed binary tree.

Why it is TP-invariant: a row-parallel layer at TP = t gives rank r the K columns
[r K/t, (r+1) K/t). Here K is cut into S = TREE_SLICES contiguous slices of K/S whatever t is;
each slice is one fp32 dot product walked from zero in BLOCK_K steps (matmul's partials
kernel, with one chunk per slice), and the S slice sums are added in fp32 as the balanced
tree ((s0+s1)+(s2+s3))+((s4+s5)+(s6+s7)). With t | S, rank r holds the S/t slices of one
subtree and computes that subtree's root with the same adds (`tree_partial`); the ranks' roots
are then the leaves of the tree's top t levels, added in the same order by `tree_finish`
after an all-gather (t = 2: an fp32 all-reduce of two values is the single add r0 + r1, which
is commutative, so NCCL's order cannot change it). Bias is added to the fp32 root and the
result rounded once to the model dtype. So TP = 1, 2, 4, 8 compute the same additions on the
same values, and give the same bits.

Why it is batch-invariant: the tile config depends only on M and the slice length (never on
t), and, as in matmul.py, no config changes a slice's sum on H100/H200 (tl.dot adds K in the
same order whatever the tile); the tree adds whole [M, N] tiles element by element.

Two kernels: the slice partials go to memory (fp32 [S/t, M, N]) and `_tree_reduce_kernel`
adds them, which costs 2 (S/t) M N 4 bytes of extra traffic per layer (TP_INVARIANCE.md).
"""

import math

import torch
import triton
import triton.language as tl

from .matmul import (
    _check_inputs,
    _store_tile,
    config_for_m,
    launch_matmul_kernel,
)

# S: the largest tensor-parallel size the tree serves. Every t dividing it is supported.
TREE_SLICES = 8
# A slice must be a whole number of the smallest BLOCK_K, so that no BLOCK_K step straddles
# two slices and every TP size walks a slice in the same steps.
TREE_MIN_BLOCK_K = 64
_TREE_SIZES = (1, 2, 4, 8)


def tree_problems(k_full: int, tp_size: int, slices: int = TREE_SLICES) -> list[str]:
    """Why a row-parallel layer of full input width k_full cannot run the tree at tp_size."""
    reasons = []
    if tp_size not in _TREE_SIZES or slices % tp_size:
        reasons.append(
            f"tensor_parallel_size={tp_size} does not divide the {slices} K slices into whole "
            f"subtrees (supported: {', '.join(str(t) for t in _TREE_SIZES if slices % t == 0)})"
        )
    if k_full % (slices * TREE_MIN_BLOCK_K):
        reasons.append(
            f"K={k_full} is not {slices} slices of a multiple of {TREE_MIN_BLOCK_K} "
            f"(K must be a multiple of {slices * TREE_MIN_BLOCK_K})"
        )
    return reasons


def tree_config(m: int, slice_len: int):
    """The tile for M rows and slices of slice_len: MATMUL_CONFIGS' tile for M, with BLOCK_K
    lowered to divide the slice. Depends on (M, slice_len) only, never on the TP size."""
    cfg = config_for_m(m)
    return cfg._replace(kind="split_k", block_k=math.gcd(cfg.block_k, slice_len))


@triton.jit
def _leaf(p_ptrs, i: tl.constexpr, stride_pl, mask):
    return tl.load(p_ptrs + i * stride_pl, mask=mask, other=0.0)


@triton.jit
def _tree_reduce_kernel(
    p_ptr,  # fp32 [LEAVES, M, N]
    bias_ptr,  # [N] or a dummy when HAS_BIAS is False
    y_ptr,  # [M, N], fp32 (a subtree root) or the model dtype (the whole tree)
    M,
    N,
    stride_pl,
    stride_pm,
    stride_ym,
    stride_yn,
    HAS_BIAS: tl.constexpr,
    LEAVES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    p_ptrs = p_ptr + offs_m.to(tl.int64)[:, None] * stride_pm + offs_n[None, :]
    # The balanced tree, written out: its shape is the TP-invariance, so it is not a loop.
    if LEAVES == 1:
        acc = _leaf(p_ptrs, 0, stride_pl, mask)
    elif LEAVES == 2:
        acc = _leaf(p_ptrs, 0, stride_pl, mask) + _leaf(p_ptrs, 1, stride_pl, mask)
    elif LEAVES == 4:
        a = _leaf(p_ptrs, 0, stride_pl, mask) + _leaf(p_ptrs, 1, stride_pl, mask)
        b = _leaf(p_ptrs, 2, stride_pl, mask) + _leaf(p_ptrs, 3, stride_pl, mask)
        acc = a + b
    else:
        a = _leaf(p_ptrs, 0, stride_pl, mask) + _leaf(p_ptrs, 1, stride_pl, mask)
        b = _leaf(p_ptrs, 2, stride_pl, mask) + _leaf(p_ptrs, 3, stride_pl, mask)
        c = _leaf(p_ptrs, 4, stride_pl, mask) + _leaf(p_ptrs, 5, stride_pl, mask)
        d = _leaf(p_ptrs, 6, stride_pl, mask) + _leaf(p_ptrs, 7, stride_pl, mask)
        acc = (a + b) + (c + d)
    # Bias joins the fp32 root; one rounding to y's dtype.
    _store_tile(acc, bias_ptr, y_ptr, offs_m, offs_n, M, N, stride_ym, stride_yn, HAS_BIAS)


def tree_finish(
    leaves: torch.Tensor, bias: torch.Tensor | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The tree over leaves, fp32 [L, M, N] with L in (1, 2, 4, 8), plus bias, rounded once to
    dtype (default fp32): [M, N]. Leaf i is the root of the i-th subtree (slice or rank)."""
    if leaves.dim() != 3 or leaves.dtype != torch.float32:
        raise ValueError(
            f"det_backend: tree_finish needs fp32 leaves [L, M, N], got {leaves.dtype} "
            f"{tuple(leaves.shape)}"
        )
    num_leaves, M, N = leaves.shape
    if num_leaves not in _TREE_SIZES:
        raise ValueError(f"det_backend: tree_finish: {num_leaves} leaves, not one of {_TREE_SIZES}")
    if bias is not None and (bias.shape != (N,) or bias.device != leaves.device):
        raise ValueError(
            f"det_backend: tree_finish bias must be [N]={N} on {leaves.device}, got "
            f"{tuple(bias.shape)} on {bias.device}"
        )
    leaves = leaves.contiguous()
    y = torch.empty((M, N), dtype=dtype or torch.float32, device=leaves.device)
    if M == 0 or N == 0:
        return y
    block_m, block_n = 16, 128
    _tree_reduce_kernel[(triton.cdiv(M, block_m), triton.cdiv(N, block_n))](
        leaves,
        bias if bias is not None else leaves,
        y,
        M,
        N,
        leaves.stride(0),
        leaves.stride(1),
        y.stride(0),
        y.stride(1),
        HAS_BIAS=bias is not None,
        LEAVES=num_leaves,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=4,
    )
    return y


def slice_partials(x: torch.Tensor, weight: torch.Tensor, slices: int) -> torch.Tensor:
    """fp32 [slices, M, N]: slice i is the fp32 dot product of x and weight over K columns
    [i K/slices, (i+1) K/slices), walked from zero in BLOCK_K steps."""
    _check_inputs(x, weight, None)
    M, K = x.shape
    N = weight.shape[0]
    if slices < 1 or K % (slices * TREE_MIN_BLOCK_K):
        raise ValueError(
            f"det_backend: tree matmul: K={K} is not {slices} slices of a multiple of "
            f"{TREE_MIN_BLOCK_K}"
        )
    out = torch.empty((slices, M, N), dtype=torch.float32, device=x.device)
    if M == 0 or N == 0:
        return out
    slice_len = K // slices
    cfg = tree_config(M, slice_len)._replace(split_k=slices)
    launch_matmul_kernel(x, weight, None, out, cfg, slice_len, partials=True)
    return out


def tree_partial(x: torch.Tensor, weight: torch.Tensor, slices: int) -> torch.Tensor:
    """This rank's subtree root, fp32 [M, N]: x [M, K_local] @ weight[N, K_local].T as `slices`
    slices (TREE_SLICES / tp_size) added in tree order."""
    return tree_finish(slice_partials(x, weight, slices))


def tree_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    slices: int = TREE_SLICES,
) -> torch.Tensor:
    """The whole tree on one device (TP = 1): x @ weight.T (+ bias) in x.dtype, bitwise what
    t ranks give with tree_partial(x_r, w_r, slices // t) and tree_finish of their roots."""
    _check_inputs(x, weight, bias)
    return tree_finish(slice_partials(x, weight, slices), bias, x.dtype)
