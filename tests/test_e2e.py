"""End to end in a real vLLM engine (GPU): each prompt alone vs all in one batch, and the
batch twice, greedy with logprobs; tokens and logprobs must be bit-identical with our
backend, and vLLM's default backend must show differences (proof the test can fail).

Set DET_RESULTS_DIR to also keep the measured result as e2e.json there.
"""

import json
import os
from pathlib import Path

import pytest

from det_backend.demo import compare

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def test_llama8b_alone_equals_batch_and_default_differs():
    result = compare("llama-3-8b", num_prompts=64, max_tokens=128)
    runs = {r["backend"]: r for r in result["runs"]}
    if os.environ.get("DET_RESULTS_DIR"):
        result["command"] = "DET_RESULTS_DIR=DIR python -m pytest -m slow tests/test_e2e.py"
        Path(os.environ["DET_RESULTS_DIR"], "e2e.json").write_text(json.dumps(result, indent=2))
    det, default = runs["det"], runs["default"]
    assert det["identical_alone_vs_batch"] == det["prompts_alone"] == 64
    assert det["identical_batch_repeat"] == det["prompts_batch"]
    assert default["identical_alone_vs_batch"] < default["prompts_alone"]


def test_llama8b_fa3_variant_alone_equals_batch():
    """The fa3 attention variant (DET_BACKEND_ATTENTION=fa3) end to end: 64 prompts of
    64-512 tokens, chunked prefill and decode mixed by the scheduler, alone vs batched."""
    result = compare("llama-3-8b", num_prompts=64, max_tokens=128, backends=("det_fa3",))
    _keep("e2e_llama8b_fa3", result, "-k fa3")
    det = {r["backend"]: r for r in result["runs"]}["det_fa3"]
    assert det["identical_alone_vs_batch"] == det["prompts_alone"] == 64
    assert det["identical_batch_repeat"] == det["prompts_batch"]


def test_llama8b_flashinfer_variant_alone_equals_batch():
    """The flashinfer attention variant (DET_BACKEND_ATTENTION=flashinfer) end to end, as the
    fa3 test above; its JIT build (nvcc) happens at engine start."""
    result = compare("llama-3-8b", num_prompts=64, max_tokens=128, backends=("det_flashinfer",))
    _keep("e2e_llama8b_flashinfer", result, "-k flashinfer")
    det = {r["backend"]: r for r in result["runs"]}["det_flashinfer"]
    assert det["identical_alone_vs_batch"] == det["prompts_alone"] == 64
    assert det["identical_batch_repeat"] == det["prompts_batch"]


def test_llama8b_unset_variant_is_the_fastest_and_alone_equals_batch():
    """DET_BACKEND_ATTENTION unset, as a user starts vLLM: the engine build picks the variant
    (fa3 on Hopper for this model: no window, ALiBi or sinks), and it is invariant end to end."""
    import torch

    result = compare("llama-3-8b", num_prompts=64, max_tokens=128, backends=("det_unset",))
    _keep("e2e_llama8b_unset_variant", result, "-k unset")
    det = {r["backend"]: r for r in result["runs"]}["det_unset"]
    hopper = torch.cuda.get_device_capability()[0] == 9
    assert det["attention_variant"] == ("fa3" if hopper else "triton"), det
    assert det["identical_alone_vs_batch"] == det["prompts_alone"] == 64
    assert det["identical_batch_repeat"] == det["prompts_batch"]


def _keep(name: str, result: dict, command: str) -> None:
    if os.environ.get("DET_RESULTS_DIR"):
        result["command"] = (
            f"DET_RESULTS_DIR=DIR python -m pytest -m slow tests/test_e2e.py {command}"
        )
        Path(os.environ["DET_RESULTS_DIR"], f"{name}.json").write_text(json.dumps(result, indent=2))


# Every sampling knob vLLM batches differently (top-k/top-p switch kernels at 8 rows).
SEEDED = {"temperature": 0.8, "top_k": 50, "top_p": 0.9, "min_p": 0.02, "seed": 1000}


def test_seeded_sampling_alone_equals_batch_and_default_differs():
    """T > 0 with a seed per request: the same tokens and logprobs alone and in a batch of 64."""
    result = compare("small", num_prompts=64, max_tokens=64, sampling=SEEDED)
    _keep("e2e_seeded_sampling", result, "-k seeded")
    runs = {r["backend"]: r for r in result["runs"]}
    det, default = runs["det"], runs["default"]
    assert det["identical_alone_vs_batch"] == det["prompts_alone"] == 64
    assert det["identical_batch_repeat"] == det["prompts_batch"]
    assert default["identical_alone_vs_batch"] < default["prompts_alone"]


# SEEDED with the penalties and a logit bias (token ids of the small model's 32000).
SEEDED_PENALTIES = {
    **SEEDED,
    "presence_penalty": 0.5,
    "frequency_penalty": 0.3,
    "repetition_penalty": 1.1,
    "logit_bias": {1000: 4.0, 2000: -4.0, 3000: 2.0},
}
# KV blocks of 16 tokens: 32 prompts of 64-512 tokens + 64 new need ~700; 128 hold a few
# requests at a time (one of max_model_len 640 needs 40), so the batch preempts.
PREEMPTION_BLOCKS = 128


def test_seeded_sampling_after_preemption_and_default_differs():
    """Seeded sampling with penalties and a logit bias in an engine with few KV blocks: the
    batch is preempted (requests freed and recomputed, penalty counts rebuilt from their
    tokens) and must still give each prompt its tokens and logprobs alone (where nothing is
    preempted); vLLM's default backend, same engine settings, must differ."""
    result = compare(
        "small",
        num_prompts=32,
        max_tokens=64,
        sampling=SEEDED_PENALTIES,
        num_gpu_blocks=PREEMPTION_BLOCKS,
    )
    _keep("e2e_seeded_preemption", result, "-k preemption")
    runs = {r["backend"]: r for r in result["runs"]}
    det, default = runs["det"], runs["default"]
    assert det["preemptions"] > 0 and default["preemptions"] > 0, runs
    assert det["identical_alone_vs_batch"] == det["prompts_alone"] == 32
    assert det["identical_batch_repeat"] == det["prompts_batch"]
    assert default["identical_alone_vs_batch"] < default["prompts_alone"]


def test_mistral_sliding_window_alone_equals_batch_and_default_differs():
    """A sliding-window model (Mistral-7B-v0.1 widths, 4 layers, window 256) through the
    triton variant: windows start inside tiles and segments, chunked prefill and decode run
    past the window, and vLLM frees the blocks behind it. Select: E2E_K=sliding."""
    result = compare("mistral-sw-4l", num_prompts=32, max_tokens=128)
    _keep("e2e_mistral_sliding_window", result, "-k sliding")
    runs = {r["backend"]: r for r in result["runs"]}
    det, default = runs["det"], runs["default"]
    assert det["identical_alone_vs_batch"] == det["prompts_alone"] == 32
    assert det["identical_batch_repeat"] == det["prompts_batch"]
    assert default["identical_alone_vs_batch"] < default["prompts_alone"]


@pytest.mark.parametrize("config", ["mixtral-8x7b-4l", "qwen3-30b-a3b-4l"])
def test_moe_alone_equals_batch_and_default_differs(config):
    """Mixture-of-experts shapes (full widths, 4 layers): routing, grouped GEMMs and the
    combine of expert outputs give each prompt the same bits alone and in a batch of 32."""
    result = compare(config, num_prompts=32, max_tokens=64)
    _keep(f"e2e_{config}", result, f"-k {config}")
    runs = {r["backend"]: r for r in result["runs"]}
    det, default = runs["det"], runs["default"]
    assert det["identical_alone_vs_batch"] == det["prompts_alone"] == 32
    assert det["identical_batch_repeat"] == det["prompts_batch"]
    assert default["identical_alone_vs_batch"] < default["prompts_alone"]
