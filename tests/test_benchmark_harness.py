"""The benchmark harness's arithmetic (benchmarks/harness.py), on the CPU with a fake timer."""

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
harness = pytest.importorskip("harness")


def test_time_pair_ratio_bandwidth_and_floor(monkeypatch):
    times = iter([2.0, 3.0])  # ours, then theirs: the order benchmarks rely on
    monkeypatch.setattr(harness, "bench", lambda fn: next(times))
    p = harness.time_pair(None, None, nbytes=4_000_000, bandwidth=2e12, name="cublas")
    assert p["ours_ms"] == 2.0 and p["cublas_ms"] == 3.0
    assert p["speedup_vs_cublas"] == 1.5
    assert math.isclose(p["ours_GBps"], 2.0)  # 4 MB in 2 ms
    assert math.isclose(p["floor_ms"], 0.002)


def test_speedup_summary_geomean_and_min(monkeypatch):
    monkeypatch.setattr(harness, "run_info", lambda: {"gpu": "G"})
    points = [{"speedup_vs_vllm": 0.5}, {"speedup_vs_vllm": 2.0}, {"speedup_vs_vllm": 1.0}]
    s = harness.speedup_summary(points, bandwidth=3e12)
    assert s["gpu"] == "G" and s["points"] is points
    assert math.isclose(s["geomean_speedup_vs_vllm"], 1.0)
    assert s["min_speedup_vs_vllm"] == 0.5
    assert math.isclose(s["copy_bandwidth_GBps"], 3000.0)


def test_speedup_line_names_the_baseline_and_gpu():
    result = {"geomean_speedup_vs_vllm": 0.9712, "min_speedup_vs_vllm": 0.25, "gpu": "G"}
    assert harness.speedup_line(result) == "geomean speed-up vs vllm 0.971, min 0.250 on G"
