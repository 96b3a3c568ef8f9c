"""RMSNorm and fused residual-add + RMSNorm, batch-invariant, with vLLM's semantics.

Semantics follow vllm/ir/ops/layernorm.py exactly:
    s = x.float() (+ residual.float());  residual_out = s.to(x.dtype)
    y = s * rsqrt(mean(s[..., :variance_size] ** 2) + eps)          # fp32
    y = (y.to(weight.dtype) * weight).to(x.dtype)                    # when weight is given
The normalisation uses the fp32 sum s, not the rounded residual_out.

Why it is batch-invariant: one program per row; the row's sum of squares is reduced in an order
fixed by the hidden size alone. Rows up to _MAX_WHOLE_ROW columns are reduced in registers in
one tl.sum over BLOCK_N = next_power_of_2(hidden); longer rows are accumulated lane-wise over
fixed _CHUNK_BLOCK_N-column chunks, in column order, then reduced by one tl.sum. The number of
rows only sets the grid, never BLOCK_N or num_warps, and never reaches the compiler: tl.sum's
order follows the register layout, which Triton derives from what it knows of the pointers'
alignment, so an argument that changes with the row count must not be specialized (measured on
H100: compiled for R1 == 1, a row's bits changed).
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Up to this many columns the whole row lives in registers (16 warps: 32 fp32 values a thread).
_MAX_WHOLE_ROW = 16384
# Longer rows are walked in chunks of this many columns, always in the same order.
_CHUNK_BLOCK_N = 8192


@triton.jit
def _load_row_chunk(x_row, res_row, cols, mask, HAS_RESIDUAL: tl.constexpr):
    # s = x + residual in fp32, as vLLM computes it before any rounding.
    s = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        s += tl.load(res_row + cols, mask=mask, other=0.0).to(tl.float32)
    return s


@triton.jit
def _store_row_chunk(
    s,
    rstd,
    w_ptr,
    out_row,
    res_out_row,
    cols,
    mask,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
):
    if HAS_RESIDUAL:
        tl.store(res_out_row + cols, s.to(res_out_row.dtype.element_ty), mask=mask)
    y = s * rstd
    if HAS_WEIGHT:
        # vLLM: y.to(weight.dtype) * weight. The product of two values of one 16-bit type is
        # exact in fp32, so multiplying in fp32 and rounding once equals the 16-bit multiply.
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        y = (y.to(w.dtype).to(tl.float32) * w.to(tl.float32)).to(w.dtype)
    tl.store(out_row + cols, y.to(out_row.dtype.element_ty), mask=mask)


# R1 is the row count for 2-D x. Triton would specialize R1 == 1 (and R1 % 16 == 0), prove
# different row alignments, pick another register layout and so another tl.sum order.
@triton.jit(do_not_specialize=["R1"])
def _rms_norm_kernel(
    x_ptr,  # rows [R0, R1, N], last dim contiguous
    res_ptr,  # like x, or a dummy when HAS_RESIDUAL is False
    w_ptr,  # [N], or a dummy when HAS_WEIGHT is False
    out_ptr,  # like x
    res_out_ptr,  # like x, or a dummy when HAS_RESIDUAL is False
    R1,
    N,
    VAR_N,  # columns [0, VAR_N) enter the mean of squares
    stride_x0,
    stride_x1,
    stride_res0,
    stride_res1,
    stride_out0,
    stride_out1,
    stride_res_out0,
    stride_res_out1,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WHOLE_ROW: tl.constexpr,
):
    # One program per row. Rows index a [R0, R1] grid so that a [T, H, D] view of q/k inside
    # a fused qkv tensor needs no copy; int64 because R0 * stride passes 2**31 on long prompts.
    row = tl.program_id(0)
    r0 = (row // R1).to(tl.int64)
    r1 = (row % R1).to(tl.int64)
    x_row = x_ptr + r0 * stride_x0 + r1 * stride_x1
    res_row = res_ptr + r0 * stride_res0 + r1 * stride_res1
    out_row = out_ptr + r0 * stride_out0 + r1 * stride_out1
    res_out_row = res_out_ptr + r0 * stride_res_out0 + r1 * stride_res_out1
    cols = tl.arange(0, BLOCK_N)

    if WHOLE_ROW:
        mask = cols < N
        s = _load_row_chunk(x_row, res_row, cols, mask, HAS_RESIDUAL)
        sum_sq = tl.sum(tl.where(cols < VAR_N, s * s, 0.0), axis=0)
        rstd = tl.rsqrt(sum_sq / VAR_N + eps)
        _store_row_chunk(s, rstd, w_ptr, out_row, res_out_row, cols, mask, HAS_RESIDUAL, HAS_WEIGHT)
    else:
        # Lane j accumulates columns j, j + BLOCK_N, ... in order; one tl.sum at the end.
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for start in range(0, VAR_N, BLOCK_N):
            mask = start + cols < VAR_N
            s = _load_row_chunk(x_row + start, res_row + start, cols, mask, HAS_RESIDUAL)
            acc += s * s
        rstd = tl.rsqrt(tl.sum(acc, axis=0) / VAR_N + eps)
        # Second pass re-reads x and residual: with inplace=True each chunk is read before it
        # is overwritten, and the fp32 sum is recomputed exactly rather than from residual_out.
        for start in range(0, N, BLOCK_N):
            mask = start + cols < N
            s = _load_row_chunk(x_row + start, res_row + start, cols, mask, HAS_RESIDUAL)
            _store_row_chunk(
                s,
                rstd,
                w_ptr + start,
                out_row + start,
                res_out_row + start,
                cols,
                mask,
                HAS_RESIDUAL,
                HAS_WEIGHT,
            )


def _check_inputs(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    variance_size: int | None,
) -> None:
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"det_backend: rms_norm needs x [..., hidden], got {tuple(x.shape)}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(
            f"det_backend: rms_norm dtype {x.dtype} unsupported (supported: {_SUPPORTED_DTYPES})"
        )
    if x.stride(-1) != 1:
        raise ValueError(f"det_backend: rms_norm needs a contiguous last dim, strides {x.stride()}")
    hidden = x.shape[-1]
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
            raise ValueError(
                f"det_backend: residual {tuple(residual.shape)} {residual.dtype} on "
                f"{residual.device} must match x {tuple(x.shape)} {x.dtype} on {x.device}"
            )
        if residual.stride(-1) != 1:
            raise ValueError(
                f"det_backend: residual needs a contiguous last dim, strides {residual.stride()}"
            )
    if weight is not None:
        if weight.shape != (hidden,):
            raise ValueError(
                f"det_backend: rms_norm weight must be [hidden]=[{hidden}], "
                f"got {tuple(weight.shape)}"
            )
        if weight.dtype not in _SUPPORTED_DTYPES or weight.device != x.device:
            raise ValueError(
                f"det_backend: rms_norm weight is {weight.dtype} on {weight.device}; needs one of "
                f"{_SUPPORTED_DTYPES} on {x.device}"
            )
    if variance_size is not None and not 1 <= variance_size <= hidden:
        raise ValueError(
            f"det_backend: rms_norm variance_size={variance_size} must be in [1, hidden={hidden}]"
        )


def _as_rows(t: torch.Tensor) -> tuple[int, int, int]:
    """(R1, stride0, stride1) of t seen as [R0, R1, hidden] without a copy."""
    if t.dim() == 1:
        return 1, 0, 0
    if t.dim() == 2:
        return t.shape[0], 0, t.stride(0)
    try:
        rows = t.view(-1, t.shape[-2], t.shape[-1])
    except RuntimeError as e:
        raise ValueError(
            f"det_backend: rms_norm cannot see x {tuple(t.shape)} with strides {t.stride()} as "
            "rows without a copy; pass a tensor whose leading dims can be flattened"
        ) from e
    return rows.shape[1], rows.stride(0), rows.stride(1)


class LaunchConfig(NamedTuple):
    """How a row is walked: whole in registers (block_n >= hidden) or in block_n-column chunks,
    by num_warps warps. It fixes the reduction order, so it may depend on hidden alone."""

    whole_row: bool
    block_n: int
    num_warps: int


def launch_config(hidden: int) -> LaunchConfig:
    """The launch every call with rows of `hidden` columns gets (never the row count).

    A warp per 512 columns the row really has (rounded down to a power of two), not per 512 of
    the padded block: at hidden 5120 (block 8192, 3/8 of the lanes masked) 8 warps gave 1.01x
    of vLLM's op on an H100 where 16 gave 0.96x (benchmarks/results/rmsnorm_sweep_5120_h100.json).
    Powers of two keep the launch they had."""
    if hidden > _MAX_WHOLE_ROW:
        return LaunchConfig(False, _CHUNK_BLOCK_N, min(16, _CHUNK_BLOCK_N // 512))
    warps = 1 << max(0, (hidden // 512).bit_length() - 1)
    return LaunchConfig(True, triton.next_power_of_2(hidden), min(16, warps))


def launch_candidates(hidden: int) -> list[LaunchConfig]:
    """Launches the benchmark sweeps and the tests check (every one keeps a row's bits whatever
    the row count): launch_config's first, the whole row at 4-16 warps, 1024- and 2048-column
    chunks at 2-8 warps."""
    whole = triton.next_power_of_2(hidden)
    configs = [launch_config(hidden)]
    if hidden <= _MAX_WHOLE_ROW:
        configs += [LaunchConfig(True, whole, w) for w in (4, 8, 16)]
    configs += [LaunchConfig(False, b, w) for b in (1024, 2048) for w in (2, 4, 8) if b < hidden]
    return list(dict.fromkeys(configs))


def _check_config(config: LaunchConfig, hidden: int) -> None:
    if config.block_n & (config.block_n - 1) or config.num_warps not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"det_backend: rms_norm {config}: block_n and num_warps powers of two")
    if config.whole_row and config.block_n < hidden:
        raise ValueError(f"det_backend: rms_norm {config} cannot hold a row of {hidden} whole")


def _launch(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    eps: float,
    variance_size: int | None,
    out: torch.Tensor,
    residual_out: torch.Tensor | None,
    config: LaunchConfig | None,
) -> None:
    hidden = x.shape[-1]
    num_rows = x.numel() // hidden
    if num_rows == 0:
        return
    if config is None:
        config = launch_config(hidden)
    else:
        _check_config(config, hidden)
    whole_row, block_n, num_warps = config
    has_residual = residual is not None
    if not has_residual:
        # Dummies: the kernel never touches them when HAS_RESIDUAL is False.
        residual, residual_out = x, out
    r1, stride_x0, stride_x1 = _as_rows(x)
    _, stride_out0, stride_out1 = _as_rows(out)
    _, stride_res0, stride_res1 = _as_rows(residual)
    _, stride_res_out0, stride_res_out1 = _as_rows(residual_out)
    _rms_norm_kernel[(num_rows,)](
        x,
        residual,
        weight if weight is not None else x,
        out,
        residual_out,
        r1,
        hidden,
        hidden if variance_size is None else variance_size,
        stride_x0,
        stride_x1,
        stride_res0,
        stride_res1,
        stride_out0,
        stride_out1,
        stride_res_out0,
        stride_res_out1,
        eps,
        HAS_RESIDUAL=has_residual,
        HAS_WEIGHT=weight is not None,
        BLOCK_N=block_n,
        WHOLE_ROW=whole_row,
        num_warps=num_warps,
    )


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    variance_size: int | None = None,
    config: LaunchConfig | None = None,
) -> torch.Tensor:
    """vLLM's rms_norm over the last dim of x [..., hidden]; returns a new tensor like x.

    config: another fixed launch than launch_config(hidden), for benchmarks and tests."""
    _check_inputs(x, None, weight, variance_size)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x, None, weight, eps, variance_size, out, None, config)
    return out


def fused_add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    variance_size: int | None = None,
    inplace: bool = False,
    config: LaunchConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's fused_add_rms_norm: (rms_norm(x + residual), (x + residual).to(x.dtype)).

    With inplace=True the results are written into x and residual, which are returned.
    config: as for rms_norm.
    """
    _check_inputs(x, residual, weight, variance_size)
    if inplace:
        out, residual_out = x, residual
    else:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        residual_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x, residual, weight, eps, variance_size, out, residual_out, config)
    return out, residual_out


def rms_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    variance_size: int | None = None,
) -> torch.Tensor:
    """vLLM's rms_norm in float64, without the intermediate roundings; returns float64."""
    x64 = x.double()
    variance = x64[..., :variance_size].pow(2).mean(dim=-1, keepdim=True)
    y = x64 * torch.rsqrt(variance + eps)
    return y if weight is None else y * weight.double()


def fused_add_rms_norm_reference(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    variance_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's fused_add_rms_norm in float64: (normalised x + residual, x + residual)."""
    s = x.double() + residual.double()
    return rms_norm_reference(s, weight, eps, variance_size), s
