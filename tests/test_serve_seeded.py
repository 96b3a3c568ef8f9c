"""Seeded sampling through a real `vllm serve` (det_backend.matrix with matrix.SEEDED): T 0.8,
top-k 50, top-p 0.9, min-p 0.02, presence/frequency/repetition penalties and a logit bias,
prompt i seeded 1000 + i, sent through the OpenAI completions API.

GPU (slow), one lent call (four server starts): our backend's reference pass (each prompt
alone) and the cells prefix cache warm, all prompts at once, chunked prefill 256 and
preemption must give each prompt the reference's tokens and logprobs bit for bit, and the
preemption server must report preemptions; vLLM's default backend, all prompts at once, must
differ (proof the comparison can fail). Llama-3-8B widths, 2 layers, DET_MATRIX_PROMPTS
prompts (default 64, 8 groups sharing prefixes of 0..384 tokens; preemption with 200 KV
blocks). Set DET_RESULTS_DIR to keep the result as invariance_matrix_seeded.json.
"""

import os
from pathlib import Path

import pytest

from det_backend import matrix

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

CELLS = ("prefix_cache_warm", "batch_256", "chunked_prefill_256", "preemption")
DEFAULT_CELLS = ("batch_256",)


@pytest.fixture(scope="module")
def seeded_cells() -> dict[str, dict]:
    out = None
    if os.environ.get("DET_RESULTS_DIR"):
        out = str(Path(os.environ["DET_RESULTS_DIR"], "invariance_matrix_seeded.json"))
    result = matrix.run_matrix(
        ("llama-3-8b",),
        layers=2,
        cells=CELLS,
        default_cells=DEFAULT_CELLS,
        out=out,
        sampling=matrix.SEEDED,
        num_prompts=int(os.environ.get("DET_MATRIX_PROMPTS", "64")),
    )
    assert result["sampling"] == matrix.SEEDED
    return {c["dimension"]: c for c in result["cells"]}


@pytest.mark.parametrize("dimension", CELLS)
def test_serve_seeded_sampling_is_invariant(seeded_cells, dimension):
    cell = seeded_cells[dimension]
    assert cell["errors"] == 0, cell
    assert cell["identical_fraction"] == 1.0, cell


def test_serve_seeded_preemption_cell_preempted(seeded_cells):
    """Few KV blocks must have made the server preempt requests (else the cell proves nothing
    about preemption); the count comes from the server's /metrics."""
    assert seeded_cells["preemption"]["preemptions"], seeded_cells["preemption"]


def test_serve_seeded_default_backend_differs(seeded_cells):
    cell = seeded_cells["batch_256"]
    assert cell["default_errors"] == 0, cell
    assert cell["default_identical_fraction"] < 1.0, cell
