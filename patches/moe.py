"""Replaces the forward of vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method.
UnquantizedFusedMoEMethod (every unquantized FusedMoE layer): routing and experts become one
call to det_backend.kernels.moe.fused_moe.

Why: vLLM's path (FusedTopKRouter's CUDA topk_softmax, then the modular TritonExperts) takes
several decisions from the batch: the tile (BLOCK_SIZE_M/N/K, warps, stages) from the token
count (fused_moe.py:1358 try_get_optimal_moe_config: a tuned JSON's nearest batch size, else
get_default_config:1239), a one-token-per-block path when T * top_k * 4 <= E
(fused_moe.py:1498), the place of a token in its expert group (moe_align_block_size, atomics),
and for top_k > 4 the final sum through at::sum_out. vLLM issue #57016 reports bf16 experts on
H100 not batch-invariant even under VLLM_BATCH_INVARIANT. On Blackwell the default backend is
FlashInfer, whose kernels choose tactics by token count. Ours (kernels/moe.py): per-token
routing, full-K tiles for both expert GEMMs, fp32 combine in rank order, each tile checked
bitwise against the others by tests/test_moe.py.
How: the method is marked monolithic (`is_monolithic` -> True), so MoERunner._apply_quant_method
(runner/moe_runner.py:564) passes it the router logits instead of running the router and the
modular kernel; `apply_monolithic` calls our launcher with the layer's top_k and renormalize.
It runs inside vLLM's opaque `vllm::moe_forward` op, so torch.compile never traces it and it
needs no custom op of its own. `process_weights_after_loading` is wrapped to refuse, at
start-up, any layer whose features our kernel does not implement (grouped or biased
routing, other activations, biases, expert parallelism, a backend that re-lays the weights).
`apply(vllm_config)` turns `kernel_config.moe_backend="auto"` into "triton", the backend that
keeps w13 [E, 2I, H] / w2 [E, H, I] as loaded; it must run before the MoE layers are built
(the attention backend calls it from the first attention layer, built before each decoder
layer's MoE block in Mixtral and Qwen3-MoE).
This also replaces vLLM's VLLM_BATCH_INVARIANT handling of MoE (a fixed default tile).
Checked against vLLM: 0.26.0.
"""

import torch

from ..kernels.moe import fused_moe

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)

# The vLLM methods we wrap, kept to call on the normal path (weight post-processing).
_original_process_weights = None


def _det_is_monolithic(self) -> bool:
    return True


_IS_MONOLITHIC = property(_det_is_monolithic)


def _det_apply_monolithic(self, layer, x, router_logits, input_ids=None) -> torch.Tensor:
    return fused_moe(
        x, layer.w13_weight, layer.w2_weight, router_logits, layer.top_k, layer.renormalize
    )


def layer_problems(method, layer) -> list[str]:
    """What in this FusedMoE layer (vLLM's RoutedExperts) our kernel does not implement."""
    import vllm.envs as envs
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.oracle.unquantized import UnquantizedMoeBackend

    reasons = []
    if method.unquantized_backend != UnquantizedMoeBackend.TRITON:
        reasons.append(
            f"MoE backend {method.unquantized_backend.value} (it re-lays the expert weights "
            "for its own kernels; use --moe-backend triton)"
        )
    if layer.activation != MoEActivation.SILU:
        reasons.append(f"MoE activation {layer.activation.value} (supported: silu)")
    if layer.scoring_func != "softmax":
        reasons.append(f"MoE scoring function {layer.scoring_func} (supported: softmax)")
    if layer.use_grouped_topk:
        reasons.append("grouped top-k routing")
    if layer.custom_routing_function is not None:
        reasons.append("a custom routing function")
    if layer.e_score_correction_bias is not None:
        reasons.append("routing with an expert-score correction bias")
    if layer.routed_scaling_factor != 1.0:
        reasons.append(f"routed_scaling_factor={layer.routed_scaling_factor}")
    if layer.apply_router_weight_on_input:
        reasons.append("router weights applied to the input")
    if layer.moe_config.has_bias:
        reasons.append("expert biases")
    if any(getattr(layer, a) is not None for a in ("swiglu_limit", "swiglu_alpha", "swiglu_beta")):
        reasons.append("clamped/scaled SwiGLU")
    if layer.expert_map is not None or layer.local_num_experts != layer.global_num_experts:
        reasons.append("expert parallelism")
    if envs.VLLM_MOE_ROUTING_SIMULATION_STRATEGY:
        reasons.append("VLLM_MOE_ROUTING_SIMULATION_STRATEGY is set")
    for name in ("w13_weight", "w2_weight"):
        dtype = getattr(layer, name).dtype
        if dtype not in _SUPPORTED_DTYPES:
            reasons.append(f"MoE {name} dtype {dtype} (supported: float16, bfloat16)")
    return reasons


def _det_process_weights_after_loading(self, layer) -> None:
    _original_process_weights(self, layer)
    reasons = layer_problems(self, layer)
    if reasons:
        raise ValueError(
            f"det_backend: MoE layer {layer.layer_name} has no deterministic kernel: "
            + "; ".join(reasons)
        )


def apply(vllm_config=None) -> None:
    global _original_process_weights
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import (
        UnquantizedFusedMoEMethod as Method,
    )

    if Method.process_weights_after_loading is not _det_process_weights_after_loading:
        _original_process_weights = Method.process_weights_after_loading
        Method.process_weights_after_loading = _det_process_weights_after_loading
    Method.is_monolithic = _IS_MONOLITHIC
    Method.apply_monolithic = _det_apply_monolithic
    if vllm_config is not None and vllm_config.kernel_config.moe_backend == "auto":
        vllm_config.kernel_config.moe_backend = "triton"


def problems() -> list[str]:
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import (
        UnquantizedFusedMoEMethod as Method,
    )

    missing = [
        name
        for name, ours in (
            ("is_monolithic", _IS_MONOLITHIC),
            ("apply_monolithic", _det_apply_monolithic),
            ("process_weights_after_loading", _det_process_weights_after_loading),
        )
        if Method.__dict__.get(name) is not ours
    ]
    return [f"UnquantizedFusedMoEMethod.{n} is not det_backend's" for n in missing]
