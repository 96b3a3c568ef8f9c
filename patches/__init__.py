"""Every place det_backend replaces a vLLM internal. Only this package touches vLLM internals.

- backend_alias: registry._AttentionBackendEnumMeta.__getitem__ accepts DETERMINISTIC for
  CUSTOM (applied by register(), not by apply_all: the CLI name is parsed in process0).
- tensor_parallel: engine.arg_utils.EngineArgs.create_engine_config makes the all-reduce
  deterministic when our backend runs at TP > 1: the all-reduce compile passes and the
  symmetric-memory and FlashInfer all-reduces off, and NCCL pinned with vLLM's custom
  all-reduce off, except at TP=2 by default ("two-rank": two addends give one rounded sum
  whatever the path) (applied by register(): NCCL reads its environment before any worker
  builds the model); its problems() checks, in the worker, that only the allowed all-reduce
  paths are live. The same wrapper fills in the attention variant when DET_BACKEND_ATTENTION
  is unset (det_backend/variants.py export_default), at any TP size.
- custom_ops: adds torch.ops.det_backend.{linear, rms_norm, fused_add_rms_norm}, so
  torch.compile keeps our kernels whole.
- linear: layers.linear.UnquantizedLinearMethod.apply (cuBLAS split-K depends on M).
- logits: layers.vocab_parallel_embedding.UnquantizedEmbeddingMethod.apply (lm_head, same).
- row_parallel: layers.linear.RowParallelLinear.forward, in TP-invariant mode only
  (DET_BACKEND_TP_INVARIANT=1): K in fixed slices added in a fixed fp32 tree across ranks,
  so TP = 1 and 2 give the same bits (vLLM rounds each rank's partial, then all-reduces).
- rms_norm: vllm.ir.ops.rms_norm / fused_add_rms_norm get provider "det", first and only
  (vllm_c picks its block size from the row count).
- moe: layers.fused_moe UnquantizedFusedMoEMethod becomes monolithic and runs our routing +
  grouped GEMMs + fp32 combine (vLLM's Triton experts pick tiles by token count, sort with
  atomics, sum in the activation dtype); pins kernel_config.moe_backend "auto" to "triton".
- batch_invariant_ops: layers.batch_invariant.enable_batch_invariant_mode (aten
  softmax/log_softmax/mean/bmm overrides, cuBLAS workspace), reused as vLLM ships it.
- sampler: `apply_top_k_top_p` in v1.sample.ops.topk_topp_sampler, v1.worker.gpu.sample.sampler
  and .states (vLLM switches implementation at 8 rows; torch.cumsum scans one row apart), and
  the `torch.topk` of logprob gathering in v1.sample.sampler and v1.worker.gpu.sample.logprob
  (tie order depends on k = the batch's largest `logprobs`). Seeded noise is vLLM's own.

Each file says Why, How and the vLLM version it was checked against. `apply_all` runs in the
worker when our attention backend is constructed (never at import, never when the backend is
not selected) and is idempotent. Removal plan: each patch goes when vLLM exposes the same
switch as a supported setting.
"""

from . import (
    batch_invariant_ops,
    custom_ops,
    linear,
    logits,
    moe,
    rms_norm,
    row_parallel,
    sampler,
    tensor_parallel,
)

# vLLM versions whose internals these patches were read against.
CHECKED_VLLM_VERSIONS = ("0.26.0",)

# tensor_parallel is applied by register(); listed here so the worker checks it.
_PATCHES = (
    custom_ops,
    linear,
    logits,
    rms_norm,
    moe,
    batch_invariant_ops,
    sampler,
    tensor_parallel,
    row_parallel,
)


def apply_all(vllm_config=None, tp_invariant: bool = False) -> None:
    """tp_invariant: DET_BACKEND_TP_INVARIANT is on (row_parallel.requested())."""
    custom_ops.apply()
    linear.apply(full_k=tp_invariant)
    logits.apply(full_k=tp_invariant)
    if tp_invariant:
        row_parallel.apply()
    rms_norm.apply(vllm_config)
    moe.apply(vllm_config)
    batch_invariant_ops.apply()
    sampler.apply()


def problems() -> list[str]:
    """What is not in place; empty when every replacement is active."""
    return [p for patch in _PATCHES for p in patch.problems()]
