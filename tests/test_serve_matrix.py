"""The invariance matrix through a real `vllm serve` (det_backend.matrix).

CPU: the prompt set and the scoring. GPU (slow): one run of the matrix for a Llama-3-8B
shape (2 layers, full widths), one test per dimension; vLLM's default backend must differ in
at least one of its cells (proof the comparison can fail). Set DET_RESULTS_DIR to keep the
result as invariance_matrix.json.
"""

import json
import os
from pathlib import Path

import pytest

from det_backend import drift, matrix


def test_matrix_prompts_share_prefixes_of_many_lengths():
    prompts = matrix.make_prompts(vocab=32000)
    assert len(prompts) == matrix.NUM_PROMPTS
    # seeded: the same prompts in every run and process
    assert [p.payload for p in prompts] == [p.payload for p in matrix.make_prompts(vocab=32000)]
    shared = set()
    for g in range(0, len(prompts), 8):
        group = [p.payload for p in prompts[g : g + 8]]
        n = 0
        while all(len(p) > n and p[n] == group[0][n] for p in group):
            n += 1
        shared.add(n // 16)
    assert len(shared) > 10  # prefixes of many lengths, in 16-token blocks


def test_matrix_score_counts_bitwise_equal_outputs():
    def response(i, logprob, error=None):
        out = None if error else drift.Output("", ("token_id:5",), (logprob,), ((),))
        return drift.Response(i, 1, 0, output=out, error=error)

    reference = [response(0, -0.5), response(1, -0.25)]
    got = [response(0, -0.5), response(1, -0.25000001), response(0, 0, error="http")]
    score = matrix._score(reference, got)
    assert score == {"n": 3, "identical": 1, "errors": 1, "identical_fraction": 1 / 3}


@pytest.fixture(scope="module")
def matrix_result():
    result = matrix.run_matrix(("llama-3-8b",), layers=2)
    if os.environ.get("DET_RESULTS_DIR"):
        Path(os.environ["DET_RESULTS_DIR"], "invariance_matrix.json").write_text(
            json.dumps(result, indent=2)
        )
    return {c["dimension"]: c for c in result["cells"]}


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("dimension", matrix.ALL_CELLS)
def test_serve_is_invariant(matrix_result, dimension):
    cell = matrix_result[dimension]
    assert cell["errors"] == 0
    assert cell["identical_fraction"] == 1.0, cell


@pytest.mark.gpu
@pytest.mark.slow
def test_serve_default_backend_differs(matrix_result):
    defaults = [c["default_identical_fraction"] for c in matrix_result.values()]
    assert any(f is not None and f < 1.0 for f in defaults), defaults
