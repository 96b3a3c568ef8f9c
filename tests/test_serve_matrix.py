"""The invariance matrix through a real `vllm serve` (det_backend.matrix).

CPU: the prompt set and the scoring. GPU (slow): one run of the matrix for a Llama-3-8B
shape (2 layers, full widths), one test per dimension; vLLM's default backend must differ in
at least one of its cells (proof the comparison can fail). Set DET_RESULTS_DIR to keep the
result as invariance_matrix.json.
"""

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
    assert score == {
        "n": 3,
        "identical": 1,
        "errors": 1,
        "identical_fraction": 1 / 3,
        "fingerprints": [],
    }


def test_matrix_merge_keeps_each_cell_from_the_run_that_measured_it():
    def cell(dimension, det=None, default=None):
        row = matrix._row([], "m", dimension)
        row.update(identical_fraction=det, default_identical_fraction=default)
        return row

    a = {"command": "a", "gpu": "G", "cells": [cell("batch_256", det=1.0), cell("restart", 1.0)]}
    b = {"command": "b", "gpu": "G", "cells": [cell("batch_256", default=0.25)]}
    merged = matrix.merge([a, b])
    rows = {c["dimension"]: c for c in merged["cells"]}
    assert rows["batch_256"]["identical_fraction"] == 1.0
    assert rows["batch_256"]["default_identical_fraction"] == 0.25
    assert rows["restart"]["default_identical_fraction"] is None
    assert merged["command"] == "a + b"


# One GPU call may not fit every server start: DET_MATRIX_CELLS / DET_MATRIX_DEFAULT_CELLS
# pick cells (comma lists; the rest skip) and DET_MATRIX_MODELS the shapes;
# DET_MATRIX_REF_DIR keeps each variant's reference pass for the next call on the same host.
def _env_cells(name: str) -> tuple[str, ...]:
    return tuple(c for c in os.environ.get(name, ",".join(matrix.ALL_CELLS)).split(",") if c)


CELLS = _env_cells("DET_MATRIX_CELLS")
DEFAULT_CELLS = _env_cells("DET_MATRIX_DEFAULT_CELLS")


@pytest.fixture(scope="module")
def matrix_result():
    out = None
    if os.environ.get("DET_RESULTS_DIR"):
        out = str(Path(os.environ["DET_RESULTS_DIR"], "invariance_matrix.json"))
    models = tuple(os.environ.get("DET_MATRIX_MODELS", "llama-3-8b").split(","))
    result = matrix.run_matrix(
        models,
        layers=2,
        cells=CELLS,
        default_cells=DEFAULT_CELLS,
        out=out,
        reference_dir=os.environ.get("DET_MATRIX_REF_DIR"),
    )
    return result["cells"]


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("dimension", matrix.ALL_CELLS)
def test_serve_is_invariant(matrix_result, dimension):
    if dimension not in CELLS:
        pytest.skip(f"{dimension} not in DET_MATRIX_CELLS")
    for cell in (c for c in matrix_result if c["dimension"] == dimension):
        assert cell["errors"] == 0, cell
        assert cell["identical_fraction"] == 1.0, cell


@pytest.mark.gpu
@pytest.mark.slow
def test_serve_default_backend_differs(matrix_result):
    """The control: vLLM's default backend is not bit-identical in at least one cell (the
    comparison can fail). Each cell's default fraction is in the JSON."""
    if not DEFAULT_CELLS:
        pytest.skip("no control cells selected")
    defaults = [c["default_identical_fraction"] for c in matrix_result]
    assert any(f is not None and f < 1.0 for f in defaults), defaults
