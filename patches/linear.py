"""Replaces vllm.model_executor.layers.linear.UnquantizedLinearMethod.apply.

Why: vLLM's default path is `torch.nn.functional.linear` (cuBLAS), which picks split-K and
its kernel from M, the number of tokens in the batch: a token's row changes with the batch
(row 0 of A[:m] @ B differs from A[:1] @ B once m >= 32 on H100). Every unquantized linear
layer (QKV, O, gate/up, down) goes through this method.
How: the class attribute is replaced by a call to `torch.ops.det_backend.linear` (our
full-K Triton matmul); `apply()` is idempotent. In TP-invariant mode
(DET_BACKEND_TP_INVARIANT=1, patches/row_parallel.py) it calls `linear_full_k` instead:
split_k = 1 whatever a shape's tile table says, so a column-parallel layer's columns have
the same bits at every TP size (its N shrinks with the TP size; K does not). Row-parallel
layers then bypass this method (RowParallelLinear.forward is replaced).
This also replaces vLLM's own VLLM_BATCH_INVARIANT branch, which lives in the same method.
Checked against vLLM: 0.26.0.
"""

import torch


def _det_apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None):
    return torch.ops.det_backend.linear(x, layer.weight, bias)


def _det_apply_full_k(
    self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
):
    return torch.ops.det_backend.linear_full_k(x, layer.weight, bias)


def method(full_k: bool):
    """The replacement `apply` for the mode: full_k in TP-invariant mode."""
    return _det_apply_full_k if full_k else _det_apply


_full_k = False


def apply(full_k: bool = False) -> None:
    global _full_k
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    _full_k = full_k
    UnquantizedLinearMethod.apply = method(full_k)


def problems() -> list[str]:
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    if UnquantizedLinearMethod.apply is not method(_full_k):
        return ["UnquantizedLinearMethod.apply is not det_backend's"]
    return []
