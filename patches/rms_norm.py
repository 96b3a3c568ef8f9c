"""Adds provider "det" to the vLLM IR ops `rms_norm` and `fused_add_rms_norm`, and makes it
the only one in their dispatch priority.

Why: vLLM's CUDA RMSNorm (`vllm_c`) picks its block size, and so its reduction order, from
the number of tokens; ours reduces each row in one program in a fixed order. RMSNorm's
forward (enabled or not, compiled or eager) ends in these IR ops, so one provider covers
every caller (models' norms, q/k norms).
How: `IrOp.register_impl("det")` with our torch custom ops, then `IrOp.set_default(["det"])`
in the worker, after vLLM installed its own priority (WorkerBase.__init__) and before the
model is compiled. With only "det" listed and no `supports_args`, dispatch never reaches
another provider. The config's `kernel_config.ir_op_priority` is updated to match, so the
compile-cache hash and logs say what runs.
Checked against vLLM: 0.26.0.
"""

import torch

PROVIDER = "det"


def _rms_norm(
    x: torch.Tensor, weight: torch.Tensor | None, epsilon: float, variance_size: int | None = None
) -> torch.Tensor:
    return torch.ops.det_backend.rms_norm(x, weight, epsilon, variance_size)


def _fused_add_rms_norm(
    x: torch.Tensor,
    x_residual: torch.Tensor,
    weight: torch.Tensor | None,
    epsilon: float,
    variance_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.det_backend.fused_add_rms_norm(x, x_residual, weight, epsilon, variance_size)


def _ops():
    from vllm import ir

    return ((ir.ops.rms_norm, _rms_norm), (ir.ops.fused_add_rms_norm, _fused_add_rms_norm))


def register_providers() -> None:
    """Registration alone changes nothing: dispatch follows the priority list."""
    for op, fn in _ops():
        if PROVIDER not in op.impls:
            op.register_impl(PROVIDER)(fn)


def apply(vllm_config=None) -> None:
    register_providers()
    for op, _ in _ops():
        op.set_default([PROVIDER])
    if vllm_config is not None:
        priority = vllm_config.kernel_config.ir_op_priority
        priority.rms_norm = [PROVIDER]
        priority.fused_add_rms_norm = [PROVIDER]


def problems() -> list[str]:
    return [
        f"vllm.ir.ops.{op.name} dispatches to {op.get_priority()}, not [{PROVIDER!r}]"
        for op, _ in _ops()
        if op.get_priority() != [PROVIDER]
    ]
