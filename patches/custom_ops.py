"""Registers our kernels as torch custom ops: `torch.ops.det_backend.{linear, rms_norm,
fused_add_rms_norm}`.

Why: torch.compile must keep each kernel whole (one opaque node with a fake impl for shape
inference) instead of tracing into the Triton launcher; CUDA graphs then capture the launch.
The launcher runs at real shapes every call, so its per-M tile choice follows the real M.
How: vLLM's `direct_register_custom_op` into our own `det_backend` library.
Checked against vLLM: 0.26.0.
"""

import torch

from ..kernels.matmul import matmul
from ..kernels.rms_norm import fused_add_rms_norm, rms_norm

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
        ("rms_norm", _rms_norm, _rms_norm_fake),
        ("fused_add_rms_norm", _fused_add_rms_norm, _fused_add_rms_norm_fake),
    ):
        direct_register_custom_op(
            name, fn, fake_impl=fake, target_lib=_LIB, dispatch_key=_DISPATCH_KEY
        )
    _registered = True


def problems() -> list[str]:
    missing = [
        n
        for n in ("linear", "rms_norm", "fused_add_rms_norm")
        if not hasattr(torch.ops.det_backend, n)
    ]
    return [f"torch.ops.det_backend.{n} is not registered" for n in missing]
