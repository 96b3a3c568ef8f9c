"""A stand-in for VllmConfig with the fields det_backend's start-up checks read: a supported
dense model by default, any field overridden per test."""

from types import SimpleNamespace

import torch


def fake_config(**overrides):
    model = dict(
        dtype=torch.bfloat16,
        quantization=None,
        is_quantized=False,
        architectures=["LlamaForCausalLM"],
        use_mla=False,
        is_moe=False,
        is_encoder_decoder=False,
        is_hybrid=False,
        is_attention_free=False,
        enable_return_routed_experts=False,
        # llama-small's widths (det_backend/configs/llama-small.json): o_proj reads 8 x 128,
        # down_proj 3584, both TP-invariant-mode friendly.
        hf_text_config=SimpleNamespace(
            hidden_size=1024, num_attention_heads=8, head_dim=128, intermediate_size=3584
        ),
    )
    model.update(overrides.pop("model", {}))
    parallel = dict(
        tensor_parallel_size=1,
        pipeline_parallel_size=1,
        data_parallel_size=1,
        decode_context_parallel_size=1,
        prefill_context_parallel_size=1,
        enable_expert_parallel=False,
        enable_eplb=False,
    )
    parallel.update(overrides.pop("parallel", {}))
    cfg = dict(
        model_config=SimpleNamespace(**model),
        parallel_config=SimpleNamespace(**parallel),
        cache_config=SimpleNamespace(cache_dtype=overrides.pop("cache_dtype", "auto")),
        kernel_config=SimpleNamespace(moe_backend=overrides.pop("moe_backend", "auto")),
        speculative_config=overrides.pop("speculative_config", None),
        lora_config=overrides.pop("lora_config", None),
        additional_config=overrides.pop("additional_config", {}),
    )
    return SimpleNamespace(**cfg)
