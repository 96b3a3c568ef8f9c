"""Turns on vLLM's own batch-invariant overrides of stray aten ops, without VLLM_BATCH_INVARIANT.

Why: outside the layers we replace, the model and sampler call aten reductions
(`_log_softmax` for logprobs in the V1 sampler, `softmax`, `mean.dim`, `bmm`) whose CUDA
kernels may pick their split from the batch. vLLM 0.26 ships Triton one-row-per-program
overrides for them (`enable_batch_invariant_mode`), and on Hopper it pins cuBLAS to no
split-K workspace for any matmul we do not own; those switches are right, so we reuse them.
TF32 stays off, as `init_batch_invariance` sets it.
What we do NOT take from that mode: its linear and RMSNorm paths (ours replace them: see
patches/linear.py, patches/rms_norm.py) and its attention switches (our backend).
Checked against vLLM: 0.26.0.
"""

import torch


def apply() -> None:
    from vllm.model_executor.layers import batch_invariant

    batch_invariant.enable_batch_invariant_mode()
    torch.backends.cuda.matmul.fp32_precision = "ieee"


def problems() -> list[str]:
    from vllm.model_executor.layers import batch_invariant

    if not batch_invariant._batch_invariant_MODE:
        return ["vLLM's batch-invariant aten overrides are not enabled"]
    return []
