"""Replaces vllm.model_executor.layers.linear.UnquantizedLinearMethod.apply.

Why: vLLM's default path is `torch.nn.functional.linear` (cuBLAS), which picks split-K and
its kernel from M, the number of tokens in the batch: a token's row changes with the batch
(row 0 of A[:m] @ B differs from A[:1] @ B once m >= 32 on H100). Every unquantized linear
layer (QKV, O, gate/up, down) goes through this method.
How: the class attribute is replaced by a call to `torch.ops.det_backend.linear` (our
full-K Triton matmul); `apply()` is idempotent.
This also replaces vLLM's own VLLM_BATCH_INVARIANT branch, which lives in the same method.
Checked against vLLM: 0.26.0.
"""

import torch


def _det_apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None):
    return torch.ops.det_backend.linear(x, layer.weight, bias)


def apply() -> None:
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    if UnquantizedLinearMethod.apply is not _det_apply:
        UnquantizedLinearMethod.apply = _det_apply


def problems() -> list[str]:
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    if UnquantizedLinearMethod.apply is not _det_apply:
        return ["UnquantizedLinearMethod.apply is not det_backend's"]
    return []
