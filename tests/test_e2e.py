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
