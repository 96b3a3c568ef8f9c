"""What det_backend can make deterministic, and the start-up checks that refuse the rest.

Every check collects the reasons it finds and raises one ValueError naming all of them:
a user learns in one start-up what to change. Nothing here falls back to a vLLM path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import variants
from .patches import CHECKED_VLLM_VERSIONS
from .patches.row_parallel import tp_invariance_problems
from .patches.tensor_parallel import parallel_problems
from .variants import SUPPORTED_KV_CACHE_DTYPES

if TYPE_CHECKING:
    from vllm.config import VllmConfig

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
# Decoder-only architectures whose every batch-variant op we replace (GEMM, RMSNorm,
# attention, and for the MoE ones softmax top-k routing + SiLU experts: patches/moe.py, which
# also checks each MoE layer at load); their other ops (rotary, SiLU-and-mul, embedding
# lookup) are per-token.
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "MixtralForCausalLM",
    "Qwen3MoeForCausalLM",
    # Llama's layers (vLLM's Phi3ForCausalLM subclasses LlamaForCausalLM; LongRoPE's factor
    # choice is per config, not per batch) with head_size 96 and a sliding window: both are
    # in our attention kernel now (kernel-tested; no engine run yet).
    "Phi3ForCausalLM",
)
# Architectures whose attention features our kernel now takes (sliding window, softcap,
# ALiBi, sinks) but whose other ops we do not cover yet: each says what is missing.
# (MistralForCausalLM with a sliding window is Llama's ops plus the window: supported above.)
_GEMMA_NORM = (
    "its GemmaRMSNorm hands vllm.ir rms_norm an fp32 weight (1 + w), which det_backend's "
    "RMSNorm kernel does not take (fp16/bf16 weights only); its attention (sliding window, "
    "logit softcap) is covered"
)
UNCOVERED_ARCHITECTURES = {
    "Gemma2ForCausalLM": _GEMMA_NORM,
    "Gemma3ForCausalLM": _GEMMA_NORM,
    "BloomForCausalLM": "its LayerNorm has no deterministic kernel here (ALiBi is covered)",
    "MPTForCausalLM": "its LayerNorm has no deterministic kernel here (ALiBi is covered)",
    "GptOssForCausalLM": (
        "its MoE (MXFP4 experts with biases and a clamped SwiGLU) is outside our MoE kernel "
        "(sinks and sliding window are covered)"
    ),
}
# "auto" is pinned to "triton" by patches/moe.py: the one backend that keeps the expert
# weights in the layout our kernel reads.
SUPPORTED_MOE_BACKENDS = ("auto", "triton")


class DeterminismError(ValueError):
    """A configuration det_backend cannot make deterministic."""

    def __init__(self, reasons: list[str]):
        self.reasons = reasons
        super().__init__(
            "det_backend (--attention-backend CUSTOM) cannot make this configuration "
            "deterministic, so it refuses to start: " + "; ".join(reasons)
        )


def check_vllm_version(version: str) -> None:
    if version not in CHECKED_VLLM_VERSIONS:
        raise DeterminismError(
            [
                f"vLLM {version} is not a version det_backend's patches were checked against "
                f"({', '.join(CHECKED_VLLM_VERSIONS)}); its internals may have moved"
            ]
        )


def config_problems(vllm_config: VllmConfig) -> list[str]:
    """Model- and engine-level features det_backend cannot make deterministic."""
    import vllm.envs as envs
    from vllm.platforms import current_platform

    reasons = []
    if not current_platform.is_cuda():
        reasons.append(f"platform {type(current_platform).__name__}: the kernels need a CUDA GPU")
    # vLLM's own reading of the flag, the one its layers branch on.
    if envs.VLLM_BATCH_INVARIANT:
        reasons.append(
            "VLLM_BATCH_INVARIANT=1 is set: it swaps in vLLM's own RMSNorm path ahead of ours; "
            "det_backend replaces that mode, unset it"
        )
    model = vllm_config.model_config
    if model.dtype not in SUPPORTED_DTYPES:
        reasons.append(f"dtype {model.dtype} (supported: float16, bfloat16)")
    if model.quantization is not None or model.is_quantized:
        reasons.append(f"quantized weights ({model.quantization}) have no deterministic GEMM yet")
    archs = [a for a in (model.architectures or []) if a not in SUPPORTED_ARCHITECTURES]
    reasons += [
        f"architecture {a}: {UNCOVERED_ARCHITECTURES[a]}"
        for a in archs
        if a in UNCOVERED_ARCHITECTURES
    ]
    archs = [a for a in archs if a not in UNCOVERED_ARCHITECTURES]
    if archs:
        reasons.append(
            f"architecture {', '.join(archs)} is not one whose ops det_backend covers "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    if model.use_mla:
        reasons.append("MLA attention")
    if model.is_moe:
        reasons += _moe_problems(vllm_config)
    if model.is_encoder_decoder:
        reasons.append("encoder-decoder models")
    if model.is_hybrid or model.is_attention_free:
        reasons.append("state-space / hybrid layers")
    if vllm_config.speculative_config is not None:
        reasons.append("speculative decoding")
    if vllm_config.lora_config is not None:
        reasons.append("LoRA adapters")
    # Parallel sizes and expert parallelism; at TP > 1, the all-reduce pins.
    reasons += parallel_problems(vllm_config)
    # DET_BACKEND_TP_INVARIANT: what the K-slice tree cannot cover (MoE, TP size, K).
    reasons += tp_invariance_problems(vllm_config)
    cache_dtype = vllm_config.cache_config.cache_dtype
    if cache_dtype not in SUPPORTED_KV_CACHE_DTYPES:
        reasons.append(f"kv_cache_dtype={cache_dtype} (supported: {SUPPORTED_KV_CACHE_DTYPES})")
    reasons += variants.platform_problems(variants.read_variant())
    return reasons


def _moe_problems(vllm_config: VllmConfig) -> list[str]:
    """MoE features outside our kernel (the rest is checked per layer by patches/moe.py)."""
    reasons = []
    backend = vllm_config.kernel_config.moe_backend
    if backend not in SUPPORTED_MOE_BACKENDS:
        reasons.append(
            f"moe_backend={backend} (supported: {', '.join(SUPPORTED_MOE_BACKENDS)}); other "
            "backends re-lay the expert weights for their own kernels"
        )
    par = vllm_config.parallel_config
    # Expert parallelism itself is refused for every model by parallel_problems.
    if par.enable_eplb:
        reasons.append("EPLB (expert load balancing)")
    if vllm_config.model_config.enable_return_routed_experts:
        reasons.append(
            "enable_return_routed_experts (our MoE layer routes inside its kernel, so vLLM's "
            "router, which records the experts, never runs)"
        )
    return reasons
