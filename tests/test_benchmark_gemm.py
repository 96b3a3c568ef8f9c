"""benchmarks/gemm.py's shape selection and plot, and benchmarks/gemm_table.py's table
building, on the CPU (no GPU: the timing itself runs on the GPU host)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

import gemm  # noqa: E402
import gemm_table  # noqa: E402


def test_default_layers_are_the_issue_shapes_and_tp2_shapes_are_asked_for_by_name():
    assert gemm.select_shapes(None) == list(gemm.SHAPES)
    got = gemm.select_shapes("llama-3-8b-tp2:down,llama-3-8b:o")
    assert got == [("llama-3-8b", "o", 4096, 4096), ("llama-3-8b-tp2", "down", 4096, 7168)]
    for (_, layer, n, k), (_, layer2, n2, k2) in zip(gemm.SHAPES[:5], gemm.TP2_SHAPES, strict=True):
        # one rank's share: column-parallel layers halve N, row-parallel ones K
        assert layer == layer2 and (n, k) in {(n2 * 2, k2), (n2, k2 * 2)}
    with pytest.raises(ValueError, match=r"unknown --layers \['llama-3-8b:qkv_proj'\]"):
        gemm.select_shapes("llama-3-8b:qkv_proj")


def test_table_from_a_sweep_keeps_one_split_k_and_merges_equal_neighbours():
    a, b = "(16, 64, 256, 8, 4, 3)", "(128, 128, 64, 8, 4, 4, 'plain', 2)"
    c = "(64, 64, 128, 8, 4, 4)"
    points = [
        {"M": 1, "candidates": {a: 1.0, b: 0.5, c: 2.0}},
        {"M": 2, "candidates": {a: 1.0, b: None, c: 2.0}},  # b's bits differed here
        {"M": 4, "candidates": {a: 3.0, b: 0.1, c: 2.0}},
    ]
    split_k, entries, _ = gemm_table.choose(points)
    assert split_k == 1  # split_k 2 lacks M=2, so it cannot serve every M
    assert entries == [(2, gemm_table.candidate_config(a)), (2**62, gemm_table.candidate_config(c))]


def test_plot_draws_one_panel_per_model(tmp_path):
    pytest.importorskip("matplotlib")
    points = [
        {"model": model, "layer": "o", "M": m, "speedup_vs_cublas": 1.0}
        for model in ("llama-3-8b", "llama-3-8b-tp2")
        for m in (1, 2)
    ]
    fig = gemm.plot({"points": points, "gpu": "test", "geomean_speedup_vs_cublas": 1.0})
    assert [ax.get_title() for ax in fig.axes] == ["llama-3-8b", "llama-3-8b-tp2"]
