"""The attention benchmark's features section (benchmarks/attention.py), on the CPU: which
providers each feature set gets, the refusals taken from the variants' own checks, the
arguments FA3 and FA2 receive, and the fields, summary and plot on fake timings."""

import math
import sys
from pathlib import Path

import pytest
import torch
from test_attention import REAL_FEATURES

from det_backend import variants

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
attention = pytest.importorskip("attention")


def test_feature_sets_are_the_tested_real_features():
    assert attention.FEATURE_SETS == REAL_FEATURES


@pytest.mark.parametrize("name", list(REAL_FEATURES))
@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_feature_point_shapes_providers_and_refusals(name, kind):
    q_heads, kv_heads, head, spec, _ = REAL_FEATURES[name]
    p = attention.feature_point(name, kind)
    assert p["feature_set"] == name and p["kind"] == kind
    assert p["heads"] == [q_heads, kv_heads, head] and p["features"] == spec
    assert (p["batch"], p["new_tokens"]) == ((64, 64) if kind == "decode" else (4, 8192))
    # Every context is longer than the window: the window skips keys.
    assert p["context"][0] > spec.get("sliding_window", 0)

    problems = {
        v: variants.layer_problems(
            v, head, spec.get("alibi_slopes"), spec.get("sliding_window"),
            spec.get("softcap"), "decoder", spec.get("sinks"), "auto",
        )
        for v in ("fa3", "flashinfer")
    }  # fmt: skip
    fa3_accepts = name == "head80"  # every other set has a window or ALiBi
    assert (not problems["fa3"]) == fa3_accepts
    assert problems["flashinfer"]  # window, ALiBi, or head 80/96: none of them runs
    assert p["refusals"] == {f"det_{v}": r for v, r in problems.items() if r}
    if fa3_accepts:
        assert "det_fa3" in p["providers"] and "det_fa3_refusal" not in p
    else:
        assert "det_fa3" not in p["providers"] and p["det_fa3_ms"] is None
        assert p["det_fa3_refusal"] == "; ".join(problems["fa3"])

    assert p["fa3_without_feature"] == (name == "alibi")
    assert p["fa3_dropped_features"] == (["alibi_slopes"] if name == "alibi" else [])
    expected = ["ours", "fa3_default"] + ["det_fa3"] * fa3_accepts + ["fa2"] * (name == "alibi")
    expected += ["ours_graph", "fa3_graph"] if kind == "decode" else []
    assert p["providers"] == expected


def test_feature_point_kv_read_bytes():
    # Decode, window 4096 < every context: 4096 keys per request.
    assert attention.feature_point("mistral", "decode")["kv_read_bytes"] == 64 * 4096 * 8 * 128 * 4
    # A 2048-token chunk at 6144..8191 with window 128: keys from 6144 - 127.
    p = attention.feature_point("gpt-oss", "prefill")
    assert p["kv_read_bytes"] == 4 * (2048 + 127) * 8 * 64 * 4
    assert attention.feature_point("head80", "prefill")["kv_read_bytes"] == 4 * 8192 * 8 * 80 * 4


def _fake_t(name: str) -> dict:
    q_heads, _, head, _, _ = REAL_FEATURES[name]
    t = dict.fromkeys(["k", "v", "out", "cu", "seq_lens", "table", "max_q"])
    return {**t, "q": torch.empty(1, q_heads, head, dtype=torch.bfloat16), "max_k": 8192}


@pytest.mark.parametrize("name", list(REAL_FEATURES))
def test_feature_providers_pass_each_feature_as_vllm_does(name, monkeypatch):
    """FA3 gets window_size (window - 1, 0), softcap and s_aux (sinks in q's dtype) as vLLM's
    FlashAttention impl passes them; never ALiBi, which goes to FA2 only."""

    def fake_flash_attn_call(t, scale, num_splits, fa_version=3, **features):
        call = dict(features, fa_version=fa_version, num_splits=num_splits)
        return lambda: call

    monkeypatch.setattr(attention, "flash_attn_call", fake_flash_attn_call)
    p = attention.feature_point(name, "decode")
    fns = attention.feature_providers(_fake_t(name), p, REAL_FEATURES[name][4])
    assert list(fns) == p["providers"]
    calls = {n: fns[n]() for n in ("fa3_default", "fa3_graph", "fa2") if n in fns}
    q_heads, _, _, spec, _ = REAL_FEATURES[name]
    expected = {}
    if "sliding_window" in spec:
        expected["window_size"] = [spec["sliding_window"] - 1, 0]
    if "softcap" in spec:
        expected["softcap"] = spec["softcap"]
    for n in ("fa3_default", "fa3_graph"):
        s_aux = calls[n].pop("s_aux", None)
        assert (s_aux is not None) == ("sinks" in spec)
        if s_aux is not None:
            assert s_aux.shape == (q_heads,) and s_aux.dtype == torch.bfloat16
        assert calls[n] == {**expected, "fa_version": 3, "num_splits": 0}
    if "fa2" in calls:
        slopes = calls["fa2"].pop("alibi_slopes")
        assert slopes.dtype == torch.float32 and slopes.shape == (q_heads,)
        assert calls["fa2"] == {**expected, "fa_version": 2, "num_splits": 0}


def _fake_features_result() -> dict:
    points = []
    for name in REAL_FEATURES:
        for kind in ("decode", "prefill"):
            p = attention.feature_point(name, kind)
            times = {n: 2.0 for n in p["providers"]}
            times["ours"] = 4.0 if kind == "prefill" else 1.0
            errors = {}
            if "fa2" in times:  # an untested baseline that raised
                del times["fa2"]
                errors["fa2"] = "RuntimeError: boom"
            points.append(attention.finish_feature_point(p, times, errors))
    return {"features": attention.features_summary(points), "feature_points": points}


def test_finish_feature_point_fields_and_summary():
    result = _fake_features_result()
    by = {(p["feature_set"], p["kind"]): p for p in result["feature_points"]}
    d = by[("mistral", "decode")]
    assert d["ours_ms"] == 1.0 and d["fa3_default_ms"] == 2.0 and d["speedup_vs_fa3"] == 2.0
    assert d["graph_speedup_vs_fa3"] == 1.0 and d["det_fa3_ms"] is None
    assert d["det_fa3_speedup_vs_fa3"] is None and "errors" not in d
    assert math.isclose(d["ours_kv_GBps"], d["kv_read_bytes"] / 1e-3 / 1e9)
    a = by[("alibi", "prefill")]
    assert a["fa2_ms"] is None and a["speedup_vs_fa2"] is None
    assert a["errors"] == {"fa2": "RuntimeError: boom"} and a["speedup_vs_fa3"] == 0.5
    assert by[("head80", "prefill")]["det_fa3_speedup_vs_fa3"] == 1.0

    s = result["features"]
    assert list(s) == list(REAL_FEATURES)
    assert s["mistral"]["decode_speedup_vs_fa3"] == 2.0
    assert s["mistral"]["decode_graph_speedup_vs_fa3"] == 1.0
    assert s["mistral"]["prefill_speedup_vs_fa3"] == 0.5
    assert s["mistral"]["det_fa3_refusal"].startswith("attention variant fa3: sliding window")
    assert s["head80"]["det_fa3_decode_speedup_vs_fa3"] == 1.0
    assert s["alibi"]["fa3_without_feature"] and not s["gemma2"]["fa3_without_feature"]
    assert s["alibi"]["decode_speedup_vs_fa2"] is None
    assert s["gpt-oss"]["heads"] == [64, 8, 64]


def _fake_main_result() -> dict:
    points = [
        {"kind": "decode", "batch": b, "context": c, "speedup_vs_fa3": 0.8}
        for c in attention.DECODE_CONTEXT
        for b in attention.DECODE_BATCH
    ]
    points += [
        {"kind": k, "tokens": n, "speedup_vs_fa3": 0.4}
        for k in ("prefill", "mixed")
        for n in attention.PREFILL_TOKENS
    ]
    result = {"gpu": "G", "points": points}
    for key in (
        "decode_geomean_speedup_vs_fa3",
        "decode_graph_geomean_speedup_vs_fa3",
        "prefill_geomean_speedup_vs_fa3",
        "prefill_tile_geomean_speedup",
    ):
        result[key] = 1.0
    return result


def test_plot_and_summary_with_and_without_features(tmp_path):
    import json

    plain = _fake_main_result()
    assert len(attention.plot(plain).axes) == 2
    assert "features" not in attention._summary(plain)
    full = {**plain, **_fake_features_result()}
    full = json.loads(json.dumps(full))  # what --plot reads back
    fig = attention.plot(full)
    assert len(fig.axes) == 3
    fig.savefig(tmp_path / "attention.png")
    line = attention._summary(full)
    assert "mistral 2.00/0.50" in line and "alibi 2.00/0.50*" in line


def test_measure_feature_records_errors_and_keeps_going(monkeypatch):
    """A provider that raises gets null and its error; graphs are captured for *_graph only;
    inputs that cannot be made leave every provider null."""
    monkeypatch.setattr(attention, "make_inputs", lambda specs, seed, heads: _fake_t("alibi"))
    monkeypatch.setattr(attention, "flash_attn_call", lambda *a, **k: "fa")
    monkeypatch.setattr(attention, "graphed", lambda fn: ("graph", fn))
    timed = []

    def fake_bench(fn):
        timed.append(fn)
        if fn == "fa" and len(timed) == 3:  # ours, fa3_default, then fa2
            raise RuntimeError("FA2 said no")
        return 1.5

    monkeypatch.setattr(attention, "bench", fake_bench)
    p = attention.measure_feature("alibi", "decode")
    assert p["providers"] == ["ours", "fa3_default", "fa2", "ours_graph", "fa3_graph"]
    assert [isinstance(f, tuple) for f in timed] == [False, False, False, True, True]
    assert p["fa2_ms"] is None and p["errors"] == {"fa2": "RuntimeError: FA2 said no"}
    assert p["ours_ms"] == p["fa3_graph_ms"] == 1.5 and p["speedup_vs_fa3"] == 1.0

    def no_cuda(specs, seed, heads):
        raise RuntimeError("no CUDA")

    monkeypatch.setattr(attention, "make_inputs", no_cuda)
    p = attention.measure_feature("mistral", "prefill")
    assert p["errors"] == {"inputs": "RuntimeError: no CUDA"}
    assert p["ours_ms"] is None and p["speedup_vs_fa3"] is None


def test_run_writes_what_it_measured_after_every_point(monkeypatch, tmp_path):
    """A GPU call cut at its limit keeps the points so far: run(out) rewrites out after each
    point (partial), decode, prefill and feature points alike."""
    import json

    out = tmp_path / "attention.json"
    seen = []

    def fake_measure(kind, specs, fields, bandwidth):
        if out.exists():
            seen.append(len(json.loads(out.read_text())["points"]))
        if len(seen) == 5:
            raise KeyboardInterrupt  # the call's time limit
        return {"kind": kind, **fields}

    monkeypatch.setattr(attention, "copy_bandwidth", lambda: 1e12)
    monkeypatch.setattr(attention, "run_info", lambda: {"gpu": "G"})
    monkeypatch.setattr(attention, "measure", fake_measure)
    with pytest.raises(KeyboardInterrupt):
        attention.run(out)
    data = json.loads(out.read_text())
    assert data["partial"] is True and data["gpu"] == "G"
    assert seen == [1, 2, 3, 4, 5] and len(data["points"]) == 5
    assert all(p["kind"] == "decode" for p in data["points"])

    features = []
    monkeypatch.setattr(attention, "measure_feature", lambda n, k: {"name": n, "kind": k})
    monkeypatch.setattr(attention, "features_summary", lambda points: {"n": len(points)})
    result = attention.run_features(features, lambda: seen.append(len(features)))
    n = len(attention.FEATURE_SETS) * len(attention.FEATURE_BATCHES)
    assert result["features"] == {"n": n} and seen[-n:] == list(range(1, n + 1))
