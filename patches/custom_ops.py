"""Registers our kernels as torch custom ops: `torch.ops.det_backend.{linear, linear_full_k,
rms_norm, fused_add_rms_norm}` and, for TP-invariant mode (patches/row_parallel.py),
`tree_linear`, `tree_linear_partial` and `tree_finish`.

Why: torch.compile must keep each kernel whole (one opaque node with a fake impl for shape
inference) instead of tracing into the Triton launcher; CUDA graphs then capture the launch.
The launcher runs at real shapes every call, so its per-M tile choice follows the real M.
How: vLLM's `direct_register_custom_op` into our own `det_backend` library.
Checked against vLLM: 0.26.0.
"""

import torch

from ..kernels.matmul import matmul
from ..kernels.rms_norm import fused_add_rms_norm, rms_norm
from ..kernels.tree_matmul import slice_partials, tree_finish, tree_matmul

# The ops live as long as this library object: keep it at module level.
_LIB = torch.library.Library("det_backend", "FRAGMENT")
# Python-only implementations: one registration serves CUDA and the CPU (tests).
_DISPATCH_KEY = "CompositeExplicitAutograd"
_registered = False


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # vLLM hands linear layers [tokens, in] or [..., in]; the kernel takes 2-D.
    out = matmul(x.reshape(-1, x.shape[-1]), weight, bias)
    return out.view(*x.shape[:-1], weight.shape[0])


def _linear_fake(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _linear_full_k(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    # split_k = 1 whatever the shape's table says: a column's bits then do not depend on N.
    out = matmul(x.reshape(-1, x.shape[-1]), weight, bias, full_k=True)
    return out.view(*x.shape[:-1], weight.shape[0])


def _tree_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, slices: int
) -> torch.Tensor:
    out = tree_matmul(x.reshape(-1, x.shape[-1]), weight, bias, slices)
    return out.view(*x.shape[:-1], weight.shape[0])


def _tree_linear_partial(x: torch.Tensor, weight: torch.Tensor, slices: int) -> torch.Tensor:
    # This rank's subtree root, fp32 [M, N] (2-D: the all-gather stacks it along dim 0).
    return tree_finish(slice_partials(x.reshape(-1, x.shape[-1]), weight, slices))


def _tree_linear_partial_fake(x: torch.Tensor, weight: torch.Tensor, slices: int) -> torch.Tensor:
    return x.new_empty((x.numel() // x.shape[-1], weight.shape[0]), dtype=torch.float32)


def _tree_finish(
    leaves: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    return tree_finish(leaves, bias, dtype)


def _tree_finish_fake(
    leaves: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    return leaves.new_empty(leaves.shape[1:], dtype=dtype)


def _tree_linear_fake(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, slices: int
) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _rms_norm(
    x: torch.Tensor, weight: torch.Tensor | None, epsilon: float, variance_size: int | None
) -> torch.Tensor:
    return rms_norm(x, weight, epsilon, variance_size)


def _rms_norm_fake(
    x: torch.Tensor, weight: torch.Tensor | None, epsilon: float, variance_size: int | None
) -> torch.Tensor:
    return torch.empty_like(x)


def _fused_add_rms_norm(
    x: torch.Tensor,
    x_residual: torch.Tensor,
    weight: torch.Tensor | None,
    epsilon: float,
    variance_size: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return fused_add_rms_norm(x, x_residual, weight, epsilon, variance_size)


def _fused_add_rms_norm_fake(
    x: torch.Tensor,
    x_residual: torch.Tensor,
    weight: torch.Tensor | None,
    epsilon: float,
    variance_size: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), torch.empty_like(x)


def apply() -> None:
    global _registered
    if _registered:
        return
    from vllm.utils.torch_utils import direct_register_custom_op

    for name, fn, fake in (
        ("linear", _linear, _linear_fake),
        ("linear_full_k", _linear_full_k, _linear_fake),
        ("tree_linear", _tree_linear, _tree_linear_fake),
        ("tree_linear_partial", _tree_linear_partial, _tree_linear_partial_fake),
        ("tree_finish", _tree_finish, _tree_finish_fake),
        ("rms_norm", _rms_norm, _rms_norm_fake),
        ("fused_add_rms_norm", _fused_add_rms_norm, _fused_add_rms_norm_fake),
    ):
        direct_register_custom_op(
            name, fn, fake_impl=fake, target_lib=_LIB, dispatch_key=_DISPATCH_KEY
        )
    _registered = True


OPS = (
    "linear",
    "linear_full_k",
    "tree_linear",
    "tree_linear_partial",
    "tree_finish",
    "rms_norm",
    "fused_add_rms_norm",
)


def problems() -> list[str]:
    missing = [n for n in OPS if not hasattr(torch.ops.det_backend, n)]
    return [f"torch.ops.det_backend.{n} is not registered" for n in missing]
