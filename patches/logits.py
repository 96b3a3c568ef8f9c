"""Replaces vllm.model_executor.layers.vocab_parallel_embedding.UnquantizedEmbeddingMethod.apply.

Why: the logits GEMM (lm_head, tied or not) runs through this method, called by
LogitsProcessor with M = number of sampled positions in the batch; vLLM's default is
cuBLAS, whose split-K depends on M.
How: as patches/linear.py, with the same `torch.ops.det_backend.linear` op.
Checked against vLLM: 0.26.0.
"""

from .linear import _det_apply


def apply() -> None:
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    if UnquantizedEmbeddingMethod.apply is not _det_apply:
        UnquantizedEmbeddingMethod.apply = _det_apply


def problems() -> list[str]:
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    if UnquantizedEmbeddingMethod.apply is not _det_apply:
        return ["UnquantizedEmbeddingMethod.apply is not det_backend's"]
    return []
