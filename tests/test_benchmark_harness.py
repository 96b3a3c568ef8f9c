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


def _fake_run(backend: str, tok_s: float, alone: int = 0) -> dict:
    return {
        "backend": backend,
        "tok_s": tok_s,
        "prompts_alone": alone,
        "identical_alone_vs_batch": alone,
        "identical_batch_repeat": 8,
        "prompts_batch": 8,
        "gpu": "G",
        "vllm": "0.26.0",
    }


def _fake_result(workloads, backends, alone_backends, speeds: dict) -> dict:
    """What demo.run_backends returns, each backend at its speed (alone runs: 4 prompts)."""
    return {
        "workloads": {
            w["name"]: {
                "num_prompts": len(w["prompts"]),
                "max_tokens": w["max_tokens"],
                "prompt_lengths": w["prompt_lengths"],
                "runs": [
                    _fake_run(b, speeds[b], 4 if b in alone_backends else 0) for b in backends
                ],
            }
            for w in workloads
        }
    }


def test_ab_throughput_backends_and_fields(monkeypatch, tmp_path):
    """--backends puts the default first; every engine gets <name>_tok_s and a ratio to the
    default; det keeps its first field names and det_fa3's are prefixed."""
    ab = pytest.importorskip("ab_throughput")
    assert ab.parse_backends("det_fa3,det") == ("default", "det_fa3", "det")
    assert ab.parse_backends("default,det,det") == ("default", "det")
    with pytest.raises(SystemExit, match="unknown"):
        ab.parse_backends("det,flashinfer")
    speeds = {"default": 100.0, "det": 90.0, "det_fa3": 95.0}
    calls = {}

    def fake_run_backends(config, workloads, backends, alone_backends, tensor_parallel_size, **kw):
        calls["backends"], calls["alone"] = backends, alone_backends
        calls["tp"] = tensor_parallel_size
        return _fake_result(workloads, backends, alone_backends, speeds)

    monkeypatch.setattr(ab, "run_backends", fake_run_backends)
    monkeypatch.setattr(ab, "vocab_size", lambda config: 1000)
    out = tmp_path / "ab.json"
    argv = ["ab", "--backends", "det,det_fa3", "--tensor-parallel-size", "2", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    ab.main()
    import json

    data = json.loads(out.read_text())
    # At TP > 1 our first engine runs first, then the default (it died at TP=2 on the lent
    # hosts), then the rest; the JSON keeps the given order.
    assert calls["backends"] == ("det", "default", "det_fa3") and calls["alone"] == (
        "det",
        "det_fa3",
    )
    assert data["backends"] == ["default", "det", "det_fa3"]
    w = data["workloads"]["prefill_mix"]
    assert w["det_vs_default"] == 0.9 and w["det_fa3_vs_default"] == 0.95
    assert w["identical_fraction"] == 1.0 and w["det_fa3_identical_alone"] == "4/4"
    assert data["det_tok_s"] == 90.0 and "vllm_batch_invariant_tok_s" not in data
    assert calls["tp"] == 2 and data["tensor_parallel_size"] == 2
    assert out.with_suffix(".png").exists()


def test_ab_throughput_headline_is_the_unset_engine_where_it_ran(monkeypatch, tmp_path):
    """The default engines: vLLM's, VLLM_BATCH_INVARIANT and det_backend as users start it
    (det_unset); the headline det_tok_s / identical_fraction are det_unset's, named."""
    import json

    ab = pytest.importorskip("ab_throughput")
    assert ab.parse_backends(",".join(ab.BACKENDS)) == (
        "default",
        "vllm_batch_invariant",
        "det_unset",
    )
    speeds = {"default": 100.0, "vllm_batch_invariant": 70.0, "det_unset": 97.0, "det": 80.0}

    def fake_run_backends(config, workloads, backends, alone_backends, tensor_parallel_size, **kw):
        return _fake_result(workloads, backends, alone_backends, speeds)

    monkeypatch.setattr(ab, "run_backends", fake_run_backends)
    monkeypatch.setattr(ab, "vocab_size", lambda config: 1000)
    for backends, det in ((None, "det_unset"), ("det,det_unset", "det_unset"), ("det", "det")):
        out = tmp_path / f"ab_{det}_{backends}.json"
        argv = ["ab", "--out", str(out), *(("--backends", backends) if backends else ())]
        monkeypatch.setattr(sys, "argv", argv)
        ab.main()
        data = json.loads(out.read_text())
        assert data["det_engine"] == det and data["det_tok_s"] == speeds[det]
        assert data["identical_fraction"] == 1.0


def test_ab_throughput_rounds_pair_each_engine_with_its_rounds_default(monkeypatch, tmp_path):
    """--rounds 3: every engine starts three times in turn; an engine's tok/s is the median of
    its rounds, its ratio the median of per-round ratios (each to that round's default), its
    invariance counts add up; --repeats reaches run_backends."""
    import json

    ab = pytest.importorskip("ab_throughput")
    # The default swings between rounds (as it did between calls on one H100); det follows.
    speeds = [
        {"default": 100.0, "det_unset": 95.0},
        {"default": 80.0, "det_unset": 88.0},
        {"default": 90.0, "det_unset": 90.0},
    ]
    calls = []

    def fake_run_backends(config, workloads, backends, alone_backends, tensor_parallel_size, **kw):
        calls.append(kw["repeats"])
        result = _fake_result(workloads, backends, alone_backends, speeds[len(calls) - 1])
        for w in result["workloads"].values():
            for r in w["runs"]:
                r["tok_s_runs"] = [r["tok_s"] - 1, r["tok_s"], r["tok_s"] + 1]
        kw["on_backend_done"](result)
        return result

    monkeypatch.setattr(ab, "run_backends", fake_run_backends)
    monkeypatch.setattr(ab, "vocab_size", lambda config: 1000)
    out = tmp_path / "ab.json"
    argv = ["ab", "--backends", "det_unset", "--rounds", "3", "--repeats", "5"]
    monkeypatch.setattr(sys, "argv", [*argv, "--workloads", "prefill_mix", "--out", str(out)])
    ab.main()
    data = json.loads(out.read_text())
    w = data["workloads"]["prefill_mix"]
    assert calls == [5, 5, 5] and data["rounds"] == 3 and data["repeats"] == 5
    assert w["default_tok_s"] == 90.0 and w["det_unset_tok_s"] == 90.0
    assert w["det_unset_vs_default_rounds"] == [0.95, 1.1, 1.0]
    assert w["det_unset_vs_default"] == 1.0  # not 90 / 90 by chance: the median of the three
    assert w["det_unset_identical_alone"] == "12/12" and w["det_unset_batch_repeat_identical"] == (
        "24/24"
    )
    assert len(w["default_tok_s_runs"]) == 9 and min(w["default_tok_s_runs"]) == 79.0
    assert [r["round"] for r in w["runs"]] == [0, 0, 1, 1, 2, 2]
    assert data["det_tok_s"] == 90.0 and data["det_engine"] == "det_unset"
    with pytest.raises(SystemExit, match="rounds"):
        monkeypatch.setattr(sys, "argv", [*argv[:3], "--rounds", "0"])
        ab.main()
    failed = ab.combine_rounds([{"workloads": {}, "failed": {"default": "x"}}] * 2)["failed"]
    assert failed == {"default (round 0)": "x", "default (round 1)": "x"}


def test_ab_throughput_keeps_what_ran_when_an_engine_fails(monkeypatch, tmp_path):
    """vLLM's default engine failing (as at TP=2 on the lent hosts): the JSON still has det's
    tok/s and invariance counts, names the failed engine, has no ratio, and the run exits
    non-zero."""
    import json

    from det_backend import demo

    ab = pytest.importorskip("ab_throughput")

    def fake_run(cmd, env, what):
        backend = cmd[cmd.index("--engine-worker") + 1]
        if backend == "default":
            raise RuntimeError(f"det_backend: {what} did not finish in 420 s (killed)")
        plan = json.loads(Path(cmd[cmd.index("--plan") + 1]).read_text())
        runs = {}
        for w in plan["workloads"]:
            out = [{"tokens": [1, 2], "logprobs": [-0.5, -0.25]}] * len(w["prompts"])
            runs[w["name"]] = {"backend": backend, "tok_s": 50.0, "batch_seconds": 1.0}
            runs[w["name"]].update(batch=out, batch2=out, alone=out[: w["num_alone"]])
            runs[w["name"]].update(gpu="G", vllm="0.26.0")
        Path(cmd[cmd.index("--out") + 1]).write_text(json.dumps(runs))

    monkeypatch.setattr(demo, "run_engine_process", fake_run)
    monkeypatch.setattr(ab, "vocab_size", lambda config: 1000)
    out = tmp_path / "ab.json"
    argv = ["ab", "--backends", "det", "--tensor-parallel-size", "2", "--workloads", "prefill_mix"]
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(out)])
    with pytest.raises(SystemExit, match="engines failed"):
        ab.main()
    data = json.loads(out.read_text())
    assert "did not finish" in data["failed"]["default"]
    w = data["workloads"]["prefill_mix"]
    assert w["det_tok_s"] == 50.0 and "det_vs_default" not in w and "default_tok_s" not in w
    assert w["identical_alone"] == "16/16" and w["det_batch_repeat_identical"] == "256/256"
    assert data["det_tok_s"] == 50.0 and data["gpu"] == "G"
