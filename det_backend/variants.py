"""Which kernel the CUSTOM attention backend runs, and what each kernel can make deterministic.

One setting picks it: the environment variable DET_BACKEND_ATTENTION, read in every process
that builds the backend (vLLM's engine core and worker processes inherit the environment of
the process that starts them):

    DET_BACKEND_ATTENTION=triton       our Triton paged attention (kernels/attention.py), default
    DET_BACKEND_ATTENTION=fa3          vLLM's bundled FlashAttention-3, pinned (det_backend/fa3.py)
    DET_BACKEND_ATTENTION=flashinfer   FlashInfer's FA2 prefill kernel, one pinned tile, no split
                                       (det_backend/flashinfer_variant.py)

Why an environment variable and not --additional-config: vLLM 0.26 does carry
`additional_config` to the workers inside VllmConfig, but vLLM asks the backend class for its
kernel block sizes and head sizes through static methods, some outside any
`set_current_vllm_config` context; the environment is readable everywhere. See
ATTENTION_VARIANTS.md.

Every function here returns reasons (strings naming the variant and the feature); the callers
raise one DeterminismError with all of them.
"""

from __future__ import annotations

import os

from . import fa3
from . import flashinfer_variant as flashinfer
from .kernels import attention as triton_attention

ENV_VAR = "DET_BACKEND_ATTENTION"
DEFAULT = "triton"
VARIANTS = ("triton", "fa3", "flashinfer")
SUPPORTED_KV_CACHE_DTYPES = ("auto", "float16", "bfloat16")
HEAD_SIZES = {
    "triton": triton_attention.SUPPORTED_HEAD_SIZES,
    "fa3": fa3.SUPPORTED_HEAD_SIZES,
    "flashinfer": flashinfer.SUPPORTED_HEAD_SIZES,
}
# Layer features each variant refuses, and why (ATTENTION_VARIANTS.md, question a for fa3).
# triton takes all four: kernels/attention.py (window aligned to position 0, fp32 softcap and
# ALiBi per score, sinks as the first state of the merge).
REFUSED_FEATURES = {
    "triton": {},
    "fa3": {
        "sliding_window": "vLLM's FA3 starts a sliding-window tile's KV blocks at an offset set "
        "by the tile's first query row (hopper/block.h n_offset), so a token's bits would "
        "depend on how its prompt was chunked",
        "alibi": "FA3 has no ALiBi",
        "sinks": "FA3 takes sinks (bf16 only) but this path is untested",
    },
    "flashinfer": {
        "sliding_window": "FlashInfer starts a sliding-window query tile's KV at an offset set by "
        "the tile's first row (prefill.cuh kv_start_idx) and its planner clips KV by the window "
        "plus the tile, so a token's bits would depend on how its prompt was chunked",
        "alibi": "FlashInfer's ALiBi mode is not wired or tested here",
        "softcap": "FlashInfer takes softcap at plan time for a whole KV-cache group; not wired "
        "or tested here",
        "sinks": "FlashInfer's FA2 paged prefill kernel takes no sinks",
    },
}


def read_variant() -> str:
    """The variant named by DET_BACKEND_ATTENTION, normalised; may be unknown (see problems)."""
    return os.environ.get(ENV_VAR, "").strip().lower() or DEFAULT


def head_sizes(variant: str) -> tuple[int, ...]:
    return HEAD_SIZES.get(variant, HEAD_SIZES[DEFAULT])


def _variant_problem(variant: str) -> str | None:
    if variant not in VARIANTS:
        return f"{ENV_VAR}={variant!r} is not an attention variant (choose one of {VARIANTS})"
    return None


def platform_problems(variant: str) -> list[str]:
    """What this machine lacks for the variant (checked once, at start-up)."""
    problem = _variant_problem(variant)
    if problem is not None:
        return [problem]
    if variant == "flashinfer":
        return flashinfer.platform_problems()
    if variant != "fa3":
        return []
    try:
        from vllm.vllm_flash_attn import fa_version_unsupported_reason
    except ImportError as e:
        return [f"attention variant fa3: vLLM's FlashAttention-3 extension does not load ({e})"]
    reason = fa_version_unsupported_reason(3)
    return [] if reason is None else [f"attention variant fa3: {reason}"]


def layer_problems(
    variant: str,
    head_size: int,
    alibi_slopes,
    sliding_window: int | None,
    logits_soft_cap: float | None,
    attn_type: str,
    sinks,
    kv_cache_dtype: str,
) -> list[str]:
    """Attention-layer features the variant's kernel does not make deterministic."""
    problem = _variant_problem(variant)
    if problem is not None:
        return [problem]
    used = {
        "alibi": ("ALiBi", alibi_slopes is not None),
        "sliding_window": (f"sliding window ({sliding_window})", sliding_window is not None),
        "softcap": (f"attention logit softcap ({logits_soft_cap})", bool(logits_soft_cap)),
        "sinks": ("attention sinks", sinks is not None),
    }
    refused = REFUSED_FEATURES[variant]
    reasons = [
        f"attention variant {variant}: {name}: {refused[feature]}"
        for feature, (name, on) in used.items()
        if on and feature in refused
    ]
    if head_size not in head_sizes(variant):
        reasons.append(
            f"attention variant {variant}: head_size={head_size} (supported: {head_sizes(variant)})"
        )
    if attn_type != "decoder":
        reasons.append(
            f"attention variant {variant}: attention type {attn_type!r} (only 'decoder')"
        )
    if kv_cache_dtype not in SUPPORTED_KV_CACHE_DTYPES:
        reasons.append(f"attention variant {variant}: kv_cache_dtype={kv_cache_dtype}")
    return reasons
