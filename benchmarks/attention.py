"""Attention benchmark: our paged attention vs FlashAttention-3 as vLLM calls it by default,
and FA3 with num_splits=1 (what VLLM_BATCH_INVARIANT uses), GQA 32/8 heads of 128, bf16,
paged KV (block 16, blocks shuffled), in one process on the same inputs.

    python benchmarks/attention.py --out attention.json
    python benchmarks/attention.py --plot attention.json

Variants: `ours` = triton (kernels/attention.py), `det_fa3` = the fa3 variant
(det_backend/fa3.py: vLLM's FA3 pinned to one split and its prefill kernel).

Workloads: decode (batch 1..256, context 512..32k) and prefill (1k..16k new tokens, alone
and mixed with 64 decodes, decodes first as vLLM orders a batch). Speed-up = FA3 default time
/ ours. "ours" is the launch the backend makes in an eager step: one launch with the grid
sized from the batch's real max_seq_len for decode and prefill; for mixed, the decodes apart
from the prefills (paged_attention_mixed), each part sized from its own max_seq_len, with the
prefills' query offsets computed beforehand (the backend does it once per step, not per
layer). "ours_one_launch" is the whole mixed batch in one launch (the backend before this
split: "mixed_split_speedup"). Decode also runs as vLLM runs it, replayed from a CUDA graph:
ours with the grid sized from MAX_MODEL_LEN (what a graph captured once must allow), against
FA3 replayed the same way ("graph_speedup_vs_fa3"). Prefill and mixed also time the previous
prefill tile (64 rows, 4 warps, 2 stages: "ours_block_m64", in the same launches as "ours")
against the current PREFILL_BLOCK_M tile. vLLM's Triton unified attention is not measured
here yet.

Features ("feature_points", summary "features"), after the above: each model-feature set of
tests/test_attention.py (Mistral window, Gemma-2 softcap + window at head 256, gpt-oss sinks +
window at 64/8 x 64, ALiBi at 32/32, Phi-3 window at head 96, head 80) on one decode batch (64
requests, contexts 4160..8192, also replayed from CUDA graphs) and one prefill batch (4 x 2048
new tokens after 6144 cached), longer than the windows. Ours with the feature on, as the
backend launches it; FA3 (vLLM's default splits) with the same feature where vLLM's
flash_attn_varlen_func passes it to FA3 (window_size, softcap, s_aux), else without it
("fa3_without_feature": ALiBi, for which vLLM runs FA2, timed as "fa2"); the fa3 variant where
it accepts the set, else null with its refusal ("det_fa3_refusal").
"""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path

from harness import bench, copy_bandwidth, geomean, graphed, main, pyplot, run_info, write_json

# The model feature sets are the GPU tests' own (tests/attention_inputs.py).
sys.path.append(str(Path(__file__).resolve().parents[1] / "tests"))
from attention_inputs import REAL_FEATURES  # noqa: E402

Q_HEADS, KV_HEADS, HEAD = 32, 8, 128
BLOCK = 16
DECODE_BATCH = (1, 8, 32, 64, 128, 256)
DECODE_CONTEXT = (512, 2048, 8192, 32768)
PREFILL_TOKENS = (1024, 4096, 16384)
MAX_MODEL_LEN = max(DECODE_CONTEXT)  # the bound a captured decode graph is sized for


def make_inputs(
    specs: list[tuple[int, int]], seed: int, heads: tuple[int, int, int] = (Q_HEADS, KV_HEADS, HEAD)
) -> dict:
    """specs: (query tokens, total KV length) per request; heads: (q heads, kv heads, size)."""
    import torch

    q_heads, kv_heads, head = heads
    gen = torch.Generator(device="cuda").manual_seed(seed)
    dev, dt = "cuda", torch.bfloat16
    num_tokens = sum(q for q, _ in specs)
    blocks = [math.ceil(s / BLOCK) for _, s in specs]
    num_blocks = sum(blocks)
    kv = torch.randn(num_blocks, kv_heads, BLOCK, 2 * head, generator=gen, device=dev, dtype=dt)
    key_cache, value_cache = kv.transpose(1, 2).split(head, dim=-1)  # vLLM's layout
    perm = torch.randperm(num_blocks, generator=gen, device=dev).to(torch.int32)
    table = torch.zeros(len(specs), max(blocks), dtype=torch.int32, device=dev)
    used = 0
    for b, n in enumerate(blocks):
        table[b, :n] = perm[used : used + n]
        used += n
    cu = torch.zeros(len(specs) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor([q for q, _ in specs]), 0)
    # The backend's split of a decodes-first batch (det_backend/backend.py _split_decodes).
    nd = next((i for i, (q, _) in enumerate(specs) if q > 1), len(specs))
    return {
        "q": torch.randn(num_tokens, q_heads, head, generator=gen, device=dev, dtype=dt),
        "out": torch.empty(num_tokens, q_heads, head, device=dev, dtype=dt),
        "k": key_cache,
        "v": value_cache,
        "table": table,
        "cu": cu.to(dev),
        "seq_lens": torch.tensor([s for _, s in specs], dtype=torch.int32, device=dev),
        "max_q": max(q for q, _ in specs),
        "max_k": max(s for _, s in specs),
        "num_decodes": nd,
        "num_decode_tokens": int(cu[nd]),
        "decode_max_k": max((s for _, s in specs[:nd]), default=1),
        "prefill_max_k": max((s for _, s in specs[nd:]), default=1),
        "prefill_cu": (cu[nd:] - cu[nd]).to(dev),
    }


# Why the flashinfer column is missing, if it is: its kernels JIT-build with nvcc on first use,
# and a variant that cannot build must not cost the other columns their run.
FLASHINFER_ERROR: list[str] = []


@functools.cache
def flashinfer_planner():
    import torch

    from det_backend.flashinfer_variant import FlashInferPlanner

    max_reqs, max_tokens = 512, 20000
    return FlashInferPlanner(
        max_reqs, max_tokens, max_reqs * math.ceil(MAX_MODEL_LEN / BLOCK), Q_HEADS, KV_HEADS,
        HEAD, BLOCK, torch.bfloat16, torch.device("cuda"),
    )  # fmt: skip


def flash_attn_call(t: dict, scale: float, num_splits: int, fa_version: int = 3, **features):
    """FlashAttention on t's batch as vLLM's FlashAttention backend calls it (flash_attn.py
    forward): num_splits 0 is FA's own heuristic (vLLM's default), 1 what VLLM_BATCH_INVARIANT
    passes. features: window_size, softcap, s_aux (sinks), alibi_slopes (FA2 only), as vLLM
    passes them."""
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    return lambda: flash_attn_varlen_func(
        t["q"],
        t["k"],
        t["v"],
        t["max_q"],
        t["cu"],
        t["max_k"],
        seqused_k=t["seq_lens"],
        softmax_scale=scale,
        causal=True,
        block_table=t["table"],
        out=t["out"],
        fa_version=fa_version,
        num_splits=num_splits,
        **features,
    )


def providers(t: dict, kind: str) -> dict:
    from det_backend.kernels.attention import (
        KV_SPLIT_SIZE,
        paged_attention,
        paged_attention_mixed,
    )

    from det_backend.fa3 import fa3_paged_attention
    from det_backend.flashinfer_variant import flashinfer_paged_attention

    scale = HEAD**-0.5
    # The leading arguments every one of our launchers takes, in their order.
    common = (t["q"], t["k"], t["v"], t["out"], t["cu"], t["seq_lens"], t["table"], scale)

    fa3 = functools.partial(flash_attn_call, t, scale)

    def ours(max_num_segments: int, block_q: int | None = None):
        return lambda: paged_attention(
            *common,
            t["max_q"],
            max_num_segments,
            block_q=block_q,
        )

    def segments(max_k: int) -> int:
        return math.ceil(max_k / KV_SPLIT_SIZE)

    def ours_mixed(prefill_block_q: int | None = None):
        return lambda: paged_attention_mixed(
            *common,
            t["max_q"],
            segments(t["prefill_max_k"]),
            t["num_decodes"],
            t["num_decode_tokens"],
            segments(t["decode_max_k"]),
            prefill_cu_seqlens_q=t["prefill_cu"],
            prefill_block_q=prefill_block_q,
        )

    real_bound = segments(t["max_k"])
    fns = {
        "ours": ours(real_bound) if kind == "decode" else ours_mixed(),
        # The fa3 variant (DET_BACKEND_ATTENTION=fa3): FA3 pinned to one split.
        "det_fa3": lambda: fa3_paged_attention(
            *common,
            t["max_q"],
            t["max_k"],
        ),
        "fa3_default": fa3(0),
        "fa3_num_splits_1": fa3(1),
    }
    # The flashinfer variant (DET_BACKEND_ATTENTION=flashinfer): planned once here, as the
    # backend's builder does once per step (host work, not timed); the launch is timed.
    if not FLASHINFER_ERROR:
        try:
            fi = flashinfer_planner()
            fi.plan(t["cu"].cpu(), t["seq_lens"].cpu(), t["seq_lens"], t["table"])
            fi_call = lambda: flashinfer_paged_attention(  # noqa: E731
                t["q"], t["k"], t["v"], t["out"], fi, scale
            )
            fi_call()
            fns["det_flashinfer"] = fi_call
        except Exception as e:  # recorded in the JSON as det_flashinfer_error
            FLASHINFER_ERROR.append(f"{type(e).__name__}: {str(e)[:500]}")
            print(f"det_flashinfer column dropped: {FLASHINFER_ERROR[0]}", flush=True)
    if kind == "decode":
        fns["ours_graph"] = graphed(ours(math.ceil(MAX_MODEL_LEN / KV_SPLIT_SIZE)))
        fns["fa3_graph"] = graphed(fa3(0))
    else:
        # 64 rows of G = 4 query heads: the tile before PREFILL_BLOCK_M.
        fns["ours_block_m64"] = ours_mixed(prefill_block_q=64 // (Q_HEADS // KV_HEADS))
    if kind == "mixed":
        fns["ours_one_launch"] = ours(real_bound)
    return fns


def measure(kind: str, specs: list[tuple[int, int]], label: dict, bandwidth: float) -> dict:
    t = make_inputs(specs, seed=len(specs))
    times = {name: bench(fn) for name, fn in providers(t, kind).items()}
    kv_bytes = sum(s for _, s in specs) * KV_HEADS * HEAD * 2 * 2
    # causal: query i of a request attends (context + i + 1) keys
    flops = sum(4 * Q_HEADS * HEAD * (q * (s - q) + q * (q + 1) / 2) for q, s in specs)
    p = {
        "kind": kind,
        **label,
        **{f"{k}_ms": v for k, v in times.items()},
        "speedup_vs_fa3": times["fa3_default"] / times["ours"],
        "speedup_vs_fa3_num_splits_1": times["fa3_num_splits_1"] / times["ours"],
        "det_fa3_speedup_vs_fa3": times["fa3_default"] / times["det_fa3"],
        "ours_kv_GBps": kv_bytes / (times["ours"] * 1e-3) / 1e9,
        "ours_tflops": flops / (times["ours"] * 1e-3) / 1e12,
        "kv_floor_ms": kv_bytes / bandwidth * 1e3,
    }
    extra = ""
    if "det_flashinfer" in times:
        p["det_flashinfer_speedup_vs_fa3"] = times["fa3_default"] / times["det_flashinfer"]
        extra += f"  det_flashinfer x{p['det_flashinfer_speedup_vs_fa3']:.2f}"
    if kind == "decode":
        p["graph_speedup_vs_fa3"] = times["fa3_graph"] / times["ours_graph"]
        extra = f"  graphs: ours {times['ours_graph']:.3f} FA3 {times['fa3_graph']:.3f}"
    else:
        p["prefill_tile_speedup"] = times["ours_block_m64"] / times["ours"]
        extra = f"  ours 64-row tile {times['ours_block_m64']:.3f}"
    if kind == "mixed":
        p["mixed_split_speedup"] = times["ours_one_launch"] / times["ours"]
        extra += f"  one launch {times['ours_one_launch']:.3f}"
    print(
        f"{kind:>8} {label}  ours {times['ours']:.3f} ms  det_fa3 {times['det_fa3']:.3f}  "
        f"FA3 {times['fa3_default']:.3f}  FA3/1 {times['fa3_num_splits_1']:.3f}  "
        f"x{p['speedup_vs_fa3']:.2f} det_fa3 x{p['det_fa3_speedup_vs_fa3']:.2f}{extra}",
        flush=True,
    )
    return p


def run(out: Path | None = None) -> dict:
    """out: rewritten after every point as {"partial": true, ...}, so a GPU call cut at its
    time limit keeps what it measured; the full result replaces it at the end."""
    bandwidth = copy_bandwidth()
    points, feature_points = [], []
    info = run_info()

    def save_partial() -> None:
        if out is not None:
            partial = {"partial": True, **info, "points": points}
            write_json(out, {**partial, "feature_points": feature_points})

    for ctx in DECODE_CONTEXT:
        for batch in DECODE_BATCH:
            points.append(
                measure("decode", [(1, ctx)] * batch, {"batch": batch, "context": ctx}, bandwidth)
            )
            save_partial()
    for tokens in PREFILL_TOKENS:
        prompts = [(2048, 2048)] * (tokens // 2048) or [(tokens, tokens)]
        points.append(measure("prefill", prompts, {"tokens": tokens, "decodes": 0}, bandwidth))
        points.append(
            measure(
                "mixed", [(1, 2048)] * 64 + prompts, {"tokens": tokens, "decodes": 64}, bandwidth
            )
        )
        save_partial()
    decode = [p for p in points if p["kind"] == "decode"]
    prefill = [p for p in points if p["kind"] != "decode"]
    return {
        **info,
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "heads": [Q_HEADS, KV_HEADS, HEAD],
        "block_size": BLOCK,
        "graph_max_model_len": MAX_MODEL_LEN,
        "decode_geomean_speedup_vs_fa3": geomean([p["speedup_vs_fa3"] for p in decode]),
        "decode_graph_geomean_speedup_vs_fa3": geomean([p["graph_speedup_vs_fa3"] for p in decode]),
        "prefill_geomean_speedup_vs_fa3": geomean([p["speedup_vs_fa3"] for p in prefill]),
        "prefill_tile_geomean_speedup": geomean([p["prefill_tile_speedup"] for p in prefill]),
        "mixed_split_geomean_speedup": geomean(
            [p["mixed_split_speedup"] for p in prefill if p["kind"] == "mixed"]
        ),
        "det_fa3_decode_geomean_speedup_vs_fa3": geomean(
            [p["det_fa3_speedup_vs_fa3"] for p in decode]
        ),
        "det_fa3_prefill_geomean_speedup_vs_fa3": geomean(
            [p["det_fa3_speedup_vs_fa3"] for p in prefill]
        ),
        **_flashinfer_summary(decode, prefill),
        "points": points,
        **run_features(feature_points, save_partial),
    }


def _flashinfer_summary(decode: list[dict], prefill: list[dict]) -> dict:
    """The flashinfer column's geomeans where every point has it, else why it is missing."""
    key = "det_flashinfer_speedup_vs_fa3"
    if FLASHINFER_ERROR or not all(key in p for p in decode + prefill):
        return {"det_flashinfer_error": FLASHINFER_ERROR[0] if FLASHINFER_ERROR else "partial"}
    return {
        "det_flashinfer_decode_geomean_speedup_vs_fa3": geomean([p[key] for p in decode]),
        "det_flashinfer_prefill_geomean_speedup_vs_fa3": geomean([p[key] for p in prefill]),
    }


# Model features: the GPU tests' sets (tests/attention_inputs.py REAL_FEATURES): (q heads,
# kv heads, head size, features, scale); True for alibi_slopes / sinks means the tensor is made
# at run time (BLOOM's slopes as vLLM computes them; sinks ~ N(3, 2^2)).
FEATURE_SETS = REAL_FEATURES

# One decode batch (64 requests, contexts 4160..8192) and one prefill batch (4 chunks of 2048
# new tokens after 6144 cached): longer than every window (<= 4096), so windows skip keys.
FEATURE_BATCHES = {
    "decode": [(1, 4096 + 64 * (i + 1)) for i in range(64)],
    "prefill": [(2048, 8192)] * 4,
}
# What vLLM 0.26's flash_attn_varlen_func cannot pass to FA3: `assert alibi_slopes is None`
# for fa_version 3 (vllm_flash_attn/flash_attn_interface.py). For ALiBi layers vLLM runs FA2
# instead (v1/attention/backends/fa_utils.py get_flash_attn_version), timed here as "fa2".
FA3_LACKS = ("alibi_slopes",)


def feature_point(name: str, kind: str) -> dict:
    """One features point before timing: shapes, the providers that run, and for each of our
    variants that refuses the set its own reasons (det_backend/variants.py layer_problems);
    the fa3 variant's time is then null, with the reason beside it. Pure (no GPU)."""
    from det_backend import variants

    q_heads, kv_heads, head, spec, _ = FEATURE_SETS[name]
    specs = FEATURE_BATCHES[kind]
    window = spec.get("sliding_window")
    refusals = {
        f"det_{v}": variants.layer_problems(
            v, head, spec.get("alibi_slopes"), window, spec.get("softcap"), "decoder",
            spec.get("sinks"), "auto",
        )
        for v in ("fa3", "flashinfer")
    }  # fmt: skip
    dropped = [f for f in spec if f in FA3_LACKS]
    names = ["ours", "fa3_default"]
    if not refusals["det_fa3"]:
        names.append("det_fa3")
    if "alibi_slopes" in spec:
        names.append("fa2")
    if kind == "decode":
        names += ["ours_graph", "fa3_graph"]
    # Keys a request reads: from its first query's window start (all of them without one).
    keys = sum(s - max(0, s - q - window + 1) if window else s for q, s in specs)
    p = {
        "feature_set": name,
        "kind": kind,
        "heads": [q_heads, kv_heads, head],
        "features": spec,
        "batch": len(specs),
        "new_tokens": sum(q for q, _ in specs),
        "context": [min(s for _, s in specs), max(s for _, s in specs)],
        "providers": names,
        "fa3_without_feature": bool(dropped),
        "fa3_dropped_features": dropped,
        "kv_read_bytes": keys * kv_heads * head * 2 * 2,
        "refusals": {v: r for v, r in refusals.items() if r},
    }
    if refusals["det_fa3"]:
        p["det_fa3_ms"] = None
        p["det_fa3_refusal"] = "; ".join(refusals["det_fa3"])
    return p


def feature_providers(t: dict, p: dict, scale: float) -> dict:
    """The callables of p["providers"] on t's batch, with the feature set's tensors. Ours is
    the launch the backend makes: one paged_attention, the grid from the batch's real
    max_seq_len (eager) or from MAX_MODEL_LEN ("ours_graph", replayed from a CUDA graph)."""
    import torch
    from det_backend.kernels.attention import KV_SPLIT_SIZE, paged_attention

    from det_backend.fa3 import fa3_paged_attention

    q_heads, dev = p["heads"][0], t["q"].device
    ours_kw, fa_kw = dict(p["features"]), {}
    if ours_kw.get("alibi_slopes"):
        from vllm.model_executor.models.bloom import _get_alibi_slopes

        ours_kw["alibi_slopes"] = _get_alibi_slopes(q_heads).to(torch.float32).to(dev)
    if ours_kw.get("sinks"):
        gen = torch.Generator().manual_seed(6)
        # FA3 takes sinks in q's dtype (s_aux); the gpt-oss parameter is in the model dtype.
        ours_kw["sinks"] = (3 + 2 * torch.randn(q_heads, generator=gen)).to(dev, t["q"].dtype)
        fa_kw["s_aux"] = ours_kw["sinks"]
    if ours_kw.get("sliding_window"):
        # vLLM's FlashAttention impl: (sliding_window - 1, 0), keys in (p - window, p].
        fa_kw["window_size"] = [ours_kw["sliding_window"] - 1, 0]
    if ours_kw.get("softcap"):
        fa_kw["softcap"] = ours_kw["softcap"]
    common = (t["q"], t["k"], t["v"], t["out"], t["cu"], t["seq_lens"], t["table"], scale)

    def ours(max_k: int):
        segments = math.ceil(max_k / KV_SPLIT_SIZE)
        return lambda: paged_attention(*common, t["max_q"], segments, **ours_kw)

    fns = {
        "ours": ours(t["max_k"]),
        "ours_graph": ours(MAX_MODEL_LEN),
        "fa3_default": flash_attn_call(t, scale, 0, **fa_kw),
        "fa3_graph": flash_attn_call(t, scale, 0, **fa_kw),
        "det_fa3": lambda: fa3_paged_attention(
            *common, t["max_q"], t["max_k"], softcap=ours_kw.get("softcap", 0.0)
        ),
        "fa2": flash_attn_call(
            t, scale, 0, fa_version=2, alibi_slopes=ours_kw.get("alibi_slopes"), **fa_kw
        ),
    }
    return {name: fns[name] for name in p["providers"]}


def _ratio(p: dict, theirs: str, ours: str) -> float | None:
    """theirs / ours (> 1: ours faster), or None where either is missing."""
    a, b = p.get(f"{theirs}_ms"), p.get(f"{ours}_ms")
    return a / b if a is not None and b is not None else None


def finish_feature_point(p: dict, times: dict, errors: dict) -> dict:
    """p with each provider's ms (None where it raised, its error under "errors") and the
    ratios: speedup_vs_fa3 (FA3 default / ours; FA3 without the feature where it cannot take
    it: fa3_without_feature), graph_speedup_vs_fa3 (decode, both from CUDA graphs),
    det_fa3_speedup_vs_fa3, speedup_vs_fa2 (ALiBi: what vLLM runs for it)."""
    p = {**p, **{f"{n}_ms": times.get(n) for n in p["providers"]}}
    if errors:
        p["errors"] = errors
    p["speedup_vs_fa3"] = _ratio(p, "fa3_default", "ours")
    if p["kind"] == "decode":
        p["graph_speedup_vs_fa3"] = _ratio(p, "fa3_graph", "ours_graph")
    p["det_fa3_speedup_vs_fa3"] = _ratio(p, "fa3_default", "det_fa3")
    if "fa2" in p["providers"]:
        p["speedup_vs_fa2"] = _ratio(p, "fa2", "ours")
    if p["ours_ms"] is not None:
        p["ours_kv_GBps"] = p["kv_read_bytes"] / (p["ours_ms"] * 1e-3) / 1e9
    return p


def measure_feature(name: str, kind: str) -> dict:
    """Time one features point. A provider that raises (an untested FA3 or FA2 feature path)
    is recorded as null with its error, so it costs the other columns, and the sections run
    before, nothing; names ending in "_graph" are captured in a CUDA graph once and timed as
    replays."""
    p = feature_point(name, kind)
    specs = FEATURE_BATCHES[kind]
    times, errors = {}, {}

    def attempt(what: str, fn):
        try:
            return fn()
        except Exception as e:  # recorded in the JSON: the point's "errors"
            errors[what] = f"{type(e).__name__}: {str(e)[:300]}"
            print(f"features {name} {kind}: {what} failed: {errors[what]}", flush=True)

    fns = attempt(
        "inputs",
        lambda: feature_providers(
            make_inputs(specs, seed=len(specs), heads=tuple(p["heads"])), p, FEATURE_SETS[name][4]
        ),
    )
    for n, fn in (fns or {}).items():
        ms = attempt(n, lambda fn=fn, n=n: bench(graphed(fn) if n.endswith("_graph") else fn))
        if ms is not None:
            times[n] = ms
    p = finish_feature_point(p, times, errors)
    print(
        f"features {name:>8} {kind:>7}  "
        + "  ".join(f"{n} {times[n]:.3f}" for n in p["providers"] if n in times)
        + f"  x{p['speedup_vs_fa3'] or float('nan'):.2f}"
        + (
            " (FA3 without " + "+".join(p["fa3_dropped_features"]) + ")"
            if p["fa3_dropped_features"]
            else ""
        ),
        flush=True,
    )
    return p


def features_summary(points: list[dict]) -> dict:
    """Per feature set: its decode and prefill speed-ups (FA3 default / ours), decode from CUDA
    graphs, whether FA3 ran without the feature, the fa3 variant's ratios or refusal."""
    out = {}
    for p in points:
        s = out.setdefault(
            p["feature_set"],
            {"fa3_without_feature": p["fa3_without_feature"], "heads": p["heads"]},
        )
        s[f"{p['kind']}_speedup_vs_fa3"] = p["speedup_vs_fa3"]
        if p["kind"] == "decode":
            s["decode_graph_speedup_vs_fa3"] = p["graph_speedup_vs_fa3"]
        if "det_fa3_refusal" in p:
            s["det_fa3_refusal"] = p["det_fa3_refusal"]
        else:
            s[f"det_fa3_{p['kind']}_speedup_vs_fa3"] = p["det_fa3_speedup_vs_fa3"]
        if "speedup_vs_fa2" in p:
            s[f"{p['kind']}_speedup_vs_fa2"] = p["speedup_vs_fa2"]
    return out


def run_features(points: list | None = None, progress=None) -> dict:
    """Every feature set x batch; each point is appended to `points` and progress() called."""
    points = [] if points is None else points
    for name in FEATURE_SETS:
        for kind in FEATURE_BATCHES:
            points.append(measure_feature(name, kind))
            if progress:
                progress()
    return {"features": features_summary(points), "feature_points": points}


def plot(data: dict):
    plt = pyplot()
    features = data.get("features")
    fig, axes = plt.subplots(1, 3 if features else 2, figsize=(18 if features else 12, 4.5))
    for i, ctx in enumerate(DECODE_CONTEXT):
        pts = [p for p in data["points"] if p["kind"] == "decode" and p["context"] == ctx]
        batches = [p["batch"] for p in pts]
        axes[0].plot(
            batches, [p["speedup_vs_fa3"] for p in pts], "o-", color=f"C{i}", label=f"ctx {ctx}"
        )
        if "graph_speedup_vs_fa3" in pts[0]:
            axes[0].plot(
                batches,
                [p["graph_speedup_vs_fa3"] for p in pts],
                "s--",
                color=f"C{i}",
                label=f"ctx {ctx}, CUDA graphs",
            )
        if "det_fa3_speedup_vs_fa3" in pts[0]:
            axes[0].plot(
                batches,
                [p["det_fa3_speedup_vs_fa3"] for p in pts],
                "^:",
                color=f"C{i}",
                label=f"ctx {ctx}, fa3 variant",
            )
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("decode batch")
    for i, kind in enumerate(("prefill", "mixed")):
        pts = [p for p in data["points"] if p["kind"] == kind]
        tokens = [p["tokens"] for p in pts]
        axes[1].plot(tokens, [p["speedup_vs_fa3"] for p in pts], "o-", color=f"C{i}", label=kind)
        if "det_fa3_speedup_vs_fa3" in pts[0]:
            axes[1].plot(
                tokens,
                [p["det_fa3_speedup_vs_fa3"] for p in pts],
                "^:",
                color=f"C{i}",
                label=f"{kind}, fa3 variant",
            )
    axes[1].set_xscale("log", base=2)
    axes[1].set_xlabel("new prefill tokens")
    if features:
        plot_features(axes[2], features)
    for ax in axes:
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_ylabel("FA3 time / ours (higher is better)")
        ax.legend(fontsize=7)
    fig.suptitle(f"det_backend attention vs FlashAttention-3 (vLLM default), {data['gpu']}")
    fig.tight_layout()
    return fig


def plot_features(ax, features: dict) -> None:
    """Bars per feature set: decode (eager, CUDA graphs) and prefill, FA3 default / ours; a
    set whose feature FA3 lacks is labelled with what FA3 ran without; missing values: none."""
    bars = [
        ("decode_speedup_vs_fa3", "decode"),
        ("decode_graph_speedup_vs_fa3", "decode, CUDA graphs"),
        ("prefill_speedup_vs_fa3", "prefill"),
    ]
    names = list(features)
    for i, (key, label) in enumerate(bars):
        values = [features[n].get(key) for n in names]
        x = [j + (i - 1) * 0.27 for j in range(len(names))]
        ax.bar(x, [math.nan if v is None else v for v in values], 0.27, color=f"C{i}", label=label)
    ax.set_xticks(
        range(len(names)),
        [n + ("\n(FA3 w/o feature)" if features[n]["fa3_without_feature"] else "") for n in names],
        fontsize=8,
    )
    ax.set_xlabel("model features (heads q/kv x size in the JSON)")


def _summary(result: dict) -> str:
    return (
        f"decode geomean vs FA3 {result['decode_geomean_speedup_vs_fa3']:.3f} (CUDA graphs "
        f"{result['decode_graph_geomean_speedup_vs_fa3']:.3f}), prefill "
        f"{result['prefill_geomean_speedup_vs_fa3']:.3f} (vs 64-row tile "
        f"x{result['prefill_tile_geomean_speedup']:.3f}, mixed decodes apart vs one launch "
        f"x{result.get('mixed_split_geomean_speedup', float('nan')):.3f}); fa3 variant: decode "
        f"{result.get('det_fa3_decode_geomean_speedup_vs_fa3', float('nan')):.3f}, prefill "
        f"{result.get('det_fa3_prefill_geomean_speedup_vs_fa3', float('nan')):.3f} "
        f"on {result['gpu']}" + _features_line(result.get("features", {}))
    )


def _features_line(features: dict) -> str:
    """'; features (decode/prefill vs FA3): mistral 0.90/0.40, ...'; '' without features."""

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    parts = [
        f"{n} {fmt(s.get('decode_speedup_vs_fa3'))}/{fmt(s.get('prefill_speedup_vs_fa3'))}"
        + ("*" if s["fa3_without_feature"] else "")
        for n, s in features.items()
    ]
    return (
        "; features (decode/prefill vs FA3, *: FA3 without the feature): " + ", ".join(parts)
        if parts
        else ""
    )


if __name__ == "__main__":
    main(__doc__, "attention.json", lambda a: run(Path(a.out)), plot, _summary)
