"""Attention benchmark: our attention variants vs FlashAttention-3 as vLLM calls it by
default, and FA3 with num_splits=1 (what VLLM_BATCH_INVARIANT uses), GQA 32/8 heads of 128,
bf16, paged KV (block 16, blocks shuffled), in one process on the same inputs. Variants:
`ours` = triton (kernels/attention.py), `det_fa3` = fa3 (det_backend/fa3.py: FA3 pinned to
one split and its prefill kernel).

    python benchmarks/attention.py --out attention.json
    python benchmarks/attention.py --plot attention.json

Workloads: decode (batch 1..256, context 512..32k) and prefill (1k..16k new tokens, alone
and mixed with 64 decodes). Speed-up = FA3 default time / variant's. vLLM's Triton unified
attention is not measured here yet.
"""

from __future__ import annotations

import math

from harness import bench, copy_bandwidth, geomean, main, pyplot, run_info

Q_HEADS, KV_HEADS, HEAD = 32, 8, 128
# Our variants -> (key prefix of their geomeans, key of their ratio to default FA3 in a point);
# triton's keys keep the names they had before there were variants.
VARIANTS = {"triton": ("", "speedup_vs_fa3"), "fa3": ("det_fa3_", "det_fa3_speedup_vs_fa3")}
BLOCK = 16
DECODE_BATCH = (1, 8, 32, 64, 128, 256)
DECODE_CONTEXT = (512, 2048, 8192, 32768)
PREFILL_TOKENS = (1024, 4096, 16384)


def make_inputs(specs: list[tuple[int, int]], seed: int) -> dict:
    """specs: (query tokens, total KV length) per request."""
    import torch

    gen = torch.Generator(device="cuda").manual_seed(seed)
    dev, dt = "cuda", torch.bfloat16
    num_tokens = sum(q for q, _ in specs)
    blocks = [math.ceil(s / BLOCK) for _, s in specs]
    num_blocks = sum(blocks)
    kv = torch.randn(num_blocks, KV_HEADS, BLOCK, 2 * HEAD, generator=gen, device=dev, dtype=dt)
    key_cache, value_cache = kv.transpose(1, 2).split(HEAD, dim=-1)  # vLLM's layout
    perm = torch.randperm(num_blocks, generator=gen, device=dev).to(torch.int32)
    table = torch.zeros(len(specs), max(blocks), dtype=torch.int32, device=dev)
    used = 0
    for b, n in enumerate(blocks):
        table[b, :n] = perm[used : used + n]
        used += n
    cu = torch.zeros(len(specs) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor([q for q, _ in specs]), 0)
    return {
        "q": torch.randn(num_tokens, Q_HEADS, HEAD, generator=gen, device=dev, dtype=dt),
        "out": torch.empty(num_tokens, Q_HEADS, HEAD, device=dev, dtype=dt),
        "k": key_cache,
        "v": value_cache,
        "table": table,
        "cu": cu.to(dev),
        "seq_lens": torch.tensor([s for _, s in specs], dtype=torch.int32, device=dev),
        "max_q": max(q for q, _ in specs),
        "max_k": max(s for _, s in specs),
    }


def providers(t: dict) -> dict:
    from det_backend.kernels.attention import KV_SPLIT_SIZE, paged_attention
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    from det_backend.fa3 import fa3_paged_attention

    scale = HEAD**-0.5

    def fa3(num_splits: int):
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
            fa_version=3,
            num_splits=num_splits,
        )

    return {
        "ours": lambda: paged_attention(
            t["q"],
            t["k"],
            t["v"],
            t["out"],
            t["cu"],
            t["seq_lens"],
            t["table"],
            scale,
            t["max_q"],
            math.ceil(t["max_k"] / KV_SPLIT_SIZE),
        ),
        "det_fa3": lambda: fa3_paged_attention(
            t["q"],
            t["k"],
            t["v"],
            t["out"],
            t["cu"],
            t["seq_lens"],
            t["table"],
            scale,
            t["max_q"],
            t["max_k"],
        ),
        "fa3_default": fa3(0),
        "fa3_num_splits_1": fa3(1),
    }


def measure(kind: str, specs: list[tuple[int, int]], label: dict, bandwidth: float) -> dict:
    t = make_inputs(specs, seed=len(specs))
    times = {name: bench(fn) for name, fn in providers(t).items()}
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
    print(
        f"{kind:>8} {label}  ours {times['ours']:.3f} ms  det_fa3 {times['det_fa3']:.3f}  "
        f"FA3 {times['fa3_default']:.3f}  FA3/1 {times['fa3_num_splits_1']:.3f}  "
        f"x{p['speedup_vs_fa3']:.2f} x{p['det_fa3_speedup_vs_fa3']:.2f}",
        flush=True,
    )
    return p


def run() -> dict:
    bandwidth = copy_bandwidth()
    points = []
    for ctx in DECODE_CONTEXT:
        for batch in DECODE_BATCH:
            points.append(
                measure("decode", [(1, ctx)] * batch, {"batch": batch, "context": ctx}, bandwidth)
            )
    for tokens in PREFILL_TOKENS:
        prompts = [(2048, 2048)] * (tokens // 2048) or [(tokens, tokens)]
        points.append(measure("prefill", prompts, {"tokens": tokens, "decodes": 0}, bandwidth))
        points.append(
            measure(
                "mixed", prompts + [(1, 2048)] * 64, {"tokens": tokens, "decodes": 64}, bandwidth
            )
        )
    summary = {}
    for prefix, key in VARIANTS.values():
        decode = [p[key] for p in points if p["kind"] == "decode"]
        prefill = [p[key] for p in points if p["kind"] != "decode"]
        summary[f"{prefix}decode_geomean_speedup_vs_fa3"] = geomean(decode)
        summary[f"{prefix}prefill_geomean_speedup_vs_fa3"] = geomean(prefill)
    return {
        **run_info(),
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "heads": [Q_HEADS, KV_HEADS, HEAD],
        "block_size": BLOCK,
        **summary,
        "points": points,
    }


def plot(data: dict):
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    # Results from before the fa3 variant carry only triton's ratios.
    variants = {v: key for v, (_, key) in VARIANTS.items() if key in data["points"][0]}
    for (variant, key), style in zip(variants.items(), ("o-", "s--"), strict=False):
        # One colour per context (per workload on the right), one line style per variant.
        for i, ctx in enumerate(DECODE_CONTEXT):
            pts = [p for p in data["points"] if p["kind"] == "decode" and p["context"] == ctx]
            x, y = [p["batch"] for p in pts], [p[key] for p in pts]
            axes[0].plot(x, y, style, color=f"C{i}", label=f"{variant}, context {ctx}")
        for i, kind in enumerate(("prefill", "mixed")):
            pts = [p for p in data["points"] if p["kind"] == kind]
            x, y = [p["tokens"] for p in pts], [p[key] for p in pts]
            axes[1].plot(x, y, style, color=f"C{i}", label=f"{variant}, {kind}")
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("decode batch")
    axes[1].set_xscale("log", base=2)
    axes[1].set_xlabel("new prefill tokens")
    for ax in axes:
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_ylabel("FA3 time / variant's (higher is better)")
        ax.legend(fontsize=7)
    fig.suptitle(
        f"det_backend attention variants vs FlashAttention-3 (vLLM default), {data['gpu']}"
    )
    fig.tight_layout()
    return fig


def _summary(result: dict) -> str:
    return (
        f"decode geomean vs FA3: triton {result['decode_geomean_speedup_vs_fa3']:.3f}, fa3 "
        f"{result['det_fa3_decode_geomean_speedup_vs_fa3']:.3f}; prefill: triton "
        f"{result['prefill_geomean_speedup_vs_fa3']:.3f}, fa3 "
        f"{result['det_fa3_prefill_geomean_speedup_vs_fa3']:.3f} on {result['gpu']}"
    )


if __name__ == "__main__":
    main(__doc__, "attention.json", lambda a: run(), plot, _summary)
