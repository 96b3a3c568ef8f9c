"""Which kernel the CUSTOM attention backend runs, and what each kernel can make deterministic.

One setting picks it: the environment variable DET_BACKEND_ATTENTION, read in every process
that builds the backend (vLLM's engine core and worker processes inherit the environment of
the process that starts them):

    DET_BACKEND_ATTENTION=triton       our Triton paged attention (kernels/attention.py)
    DET_BACKEND_ATTENTION=fa3          vLLM's bundled FlashAttention-3, pinned (det_backend/fa3.py)
    DET_BACKEND_ATTENTION=flashinfer   FlashInfer's FA2 prefill kernel, one pinned tile, no split
                                       (det_backend/flashinfer_variant.py)
    unset                              the fastest measured that runs here and carries every
                                       attention feature of the model (`default_for`): fa3 on
                                       Hopper, else triton

Unset, the choice is made once, where the engine's config is built (EngineArgs.
create_engine_config: LLM(...), vllm serve; patches/tensor_parallel.py wraps it), and written
to the environment before the engine processes start, so that every process runs the same
kernel. A config built another way, with the variable unset, runs triton (DEFAULT).

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


# Unset DET_BACKEND_ATTENTION: the first of these that this machine and model allow, fastest
# first. Measured end to end side by side on one H100 (benchmarks/results/ab_variants_*_h100
# .json, Llama-3-8B shapes, vLLM's default = 1): 256 prompts of 64-512 tokens, 128 new: fa3
# 0.85x, flashinfer 0.80x, triton 0.69x; 64 prompts, 1024 new: fa3 0.97x, triton 0.96x.
# flashinfer is not in the list: slower than fa3 where fa3 runs (Hopper), not measured against
# triton elsewhere, and it refuses every feature triton carries.
AUTO_ORDER = ("fa3", "triton")


def requested() -> str | None:
    """DET_BACKEND_ATTENTION as set, normalised; None when unset or empty."""
    return os.environ.get(ENV_VAR, "").strip().lower() or None


def read_variant() -> str:
    """The variant named by DET_BACKEND_ATTENTION, normalised; may be unknown (see problems)."""
    return requested() or DEFAULT


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


def model_layer_features(model_config, cache_dtype: str = "auto") -> dict:
    """The attention-layer features a model's config announces, as layer_problems' keywords.
    Read from the HF config, so it may miss a feature that only the model code sets; then the
    chosen variant's layer check refuses it at start-up, naming it (never a silent switch)."""
    hf = model_config.hf_text_config
    model_type = getattr(model_config.hf_config, "model_type", None)
    window = None
    if not getattr(model_config, "disable_sliding_window", False):
        window = model_config.get_sliding_window()
        if window is None and "sliding_attention" in (getattr(hf, "layer_types", None) or ()):
            window = -1  # a window whose size the model code sets
    attn_config = getattr(hf, "attn_config", None)
    mpt_alibi = (
        attn_config.get("alibi") if isinstance(attn_config, dict)
        else getattr(attn_config, "alibi", False)
    )  # fmt: skip
    alibi = bool(
        model_type == "bloom"
        or getattr(hf, "alibi", False)  # Falcon
        or mpt_alibi  # MPT
        or getattr(hf, "position_embedding_type", None) == "alibi"  # JAIS
    )
    return dict(
        head_size=model_config.get_head_size(),
        alibi_slopes=[0.0] if alibi else None,
        sliding_window=window,
        logits_soft_cap=getattr(hf, "attn_logit_softcapping", None),
        attn_type="encoder_decoder" if model_config.is_encoder_decoder else "decoder",
        sinks=True if model_type == "gpt_oss" else None,
        kv_cache_dtype=cache_dtype,
    )


def default_for(features: dict, tp_invariant: bool = False) -> tuple[str, list[str]]:
    """The variant for DET_BACKEND_ATTENTION unset: the first of AUTO_ORDER with no platform or
    layer problem for these features (model_layer_features), else triton, whose own checks
    then refuse what it cannot carry. Returns it and why each variant before it was passed
    over. tp_invariant (DET_BACKEND_TP_INVARIANT=1): triton, the only variant TP=1 = TP=2 has
    been tested with (det_backend/TP_INVARIANCE.md)."""
    passed_over = []
    for variant in AUTO_ORDER:
        reasons = platform_problems(variant) + layer_problems(variant, **features)
        if tp_invariant and variant != "triton":
            reasons.append(
                f"attention variant {variant}: TP-size invariance (DET_BACKEND_TP_INVARIANT=1) "
                "is tested with triton only"
            )
        if not reasons or variant == AUTO_ORDER[-1]:
            return variant, passed_over
        passed_over += reasons
    raise AssertionError("unreachable")


def export_default(vllm_config) -> str | None:
    """With DET_BACKEND_ATTENTION unset, picks the variant for this engine (default_for) and
    sets it in os.environ, which the engine processes started afterwards inherit. Returns the
    pick, or None when the variable was set (an unknown value is refused by the workers)."""
    if requested():
        return None
    from .patches import row_parallel

    features = model_layer_features(vllm_config.model_config, vllm_config.cache_config.cache_dtype)
    variant, passed_over = default_for(features, tp_invariant=row_parallel.requested())
    os.environ[ENV_VAR] = variant
    from vllm.logger import init_logger

    init_logger(__name__).info(
        "det_backend: %s unset: attention variant %s%s",
        ENV_VAR,
        variant,
        f" ({'; '.join(passed_over)})" if passed_over else " (the fastest measured here)",
    )
    return variant
