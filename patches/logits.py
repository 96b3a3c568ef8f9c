"""Replaces vllm.model_executor.layers.vocab_parallel_embedding.UnquantizedEmbeddingMethod.apply.

Why: the logits GEMM (lm_head, tied or not) runs through this method, called by
LogitsProcessor with M = number of sampled positions in the batch; vLLM's default is
cuBLAS, whose split-K depends on M.
How: as patches/linear.py, with the same `torch.ops.det_backend.linear` op (`linear_full_k`
in TP-invariant mode: lm_head is vocab-parallel, so its N shrinks with the TP size).
Checked against vLLM: 0.26.0.
"""

from . import linear

_full_k = False


def apply(full_k: bool = False) -> None:
    global _full_k
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    _full_k = full_k
    UnquantizedEmbeddingMethod.apply = linear.method(full_k)


def problems() -> list[str]:
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    if UnquantizedEmbeddingMethod.apply is not linear.method(_full_k):
        return ["UnquantizedEmbeddingMethod.apply is not det_backend's"]
    return []
