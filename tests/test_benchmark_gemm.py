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


def test_extra_candidates_parse_to_configs():
    from det_backend.kernels.matmul import MatmulConfig

    got = gemm.parse_extra(
        "64,64,128,8,4,4,tma_persistent; 64,128,128,8,4,3 ;;128,128,64,8,8,3,plain,2"
    )
    assert got == (
        MatmulConfig(0, 64, 64, 128, 8, 4, 4, "tma_persistent"),
        MatmulConfig(0, 64, 128, 128, 8, 4, 3),
        MatmulConfig(0, 128, 128, 64, 8, 8, 3, "plain", 2),
    )
    assert gemm.parse_extra("") == ()


def test_keep_below_puts_the_current_small_m_entries_before_the_swept_ones():
    # A sweep of M >= 128 only: each shape keeps its current MATMUL_TABLE entries with
    # max_m < 128, then the swept ones, in the source form kernels/matmul.py holds.
    from det_backend.kernels.matmul import MATMUL_TABLE, MatmulConfig

    n, k = 4096, 4096
    tma = "(128, 256, 64, 8, 8, 3, 'tma_persistent', 1, False)"
    plain = "(64, 128, 128, 8, 4, 3, 'plain', 1, False)"
    points = [
        {"model": "m", "layer": "o", "N": n, "K": k, "M": m, "ours_ms": 1.0, "cublas_ms": 1.0,
         "candidates": {tma: 2.0 if m == 128 else 0.5, plain: 1.0}}
        for m in (128, 512)
    ]  # fmt: skip
    source, report = gemm_table.table_source(points, keep_below=128)
    kept = [c for c in MATMUL_TABLE[(n, k)] if c.max_m < 128]
    names = {"MatmulConfig": MatmulConfig, "_ANY_M": 2**62}
    lines = [line.strip().rstrip(",") for line in source.splitlines()]
    entries = [eval(line, names) for line in lines if line.startswith("MatmulConfig(")]
    assert entries[: len(kept)] == kept
    assert entries[len(kept) :] == [
        MatmulConfig(128, 64, 128, 128, 8, 4, 3),
        MatmulConfig(2**62, 128, 256, 64, 8, 8, 3, "tma_persistent"),
    ]
    assert '"tma_persistent"' in source and "'" not in source  # ruff's quotes
    assert "split_k=1" in report[0]
    split2 = {"(128, 128, 64, 8, 8, 3, 'plain', 2, False)": 0.1}
    with pytest.raises(ValueError, match="split_k differ"):
        gemm_table.table_source([{**p, "candidates": split2} for p in points], keep_below=128)
