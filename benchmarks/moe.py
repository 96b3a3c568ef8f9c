"""MoE layer benchmark: our fused_moe (routing + experts) vs vLLM's unquantized Triton path
(fused_topk + fused_experts, tile picked by token count) and vLLM's VLLM_BATCH_INVARIANT
tile (the fixed default config), bf16, Mixtral-8x7B and Qwen3-30B-A3B expert shapes, tokens
1..8192, in one process on the same inputs.

    python benchmarks/moe.py --out moe.json            # ours vs vLLM default vs vLLM BI tile
    python benchmarks/moe.py --sweep --out sweep.json  # + every candidate tile of ours, per point
    python benchmarks/moe.py --plot moe.json           # PNG next to the JSON (no GPU needed)

Speed-up = vLLM default time / ours. Floor: the expert weights the batch touches (every
expert some token picked), read once, over the copy bandwidth measured in the same run;
TFLOPS counts 6 * T * top_k * H * I (gate_up and down GEMMs).
"""

from __future__ import annotations

import json
from pathlib import Path

from harness import bench, copy_bandwidth, geomean, main, pyplot, run_info

TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
# model: (experts E, top_k, hidden H, intermediate I)
MODELS = {"mixtral-8x7b": (8, 2, 4096, 14336), "qwen3-30b-a3b": (128, 8, 2048, 768)}
# vLLM 0.26 fused_moe.py get_default_config under VLLM_BATCH_INVARIANT.
VLLM_BI_CONFIG = {
    "BLOCK_SIZE_M": 64,
    "BLOCK_SIZE_N": 64,
    "BLOCK_SIZE_K": 32,
    "GROUP_SIZE_M": 8,
    "SPLIT_K": 1,
}
# Tile candidates for --sweep: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages).
CANDIDATES = (
    (16, 32, 256, 4, 3),
    (16, 64, 128, 4, 4),
    (16, 64, 256, 4, 3),
    (16, 128, 128, 4, 3),
    (32, 64, 128, 4, 4),
    (32, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 128, 64, 8, 3),
    (128, 64, 64, 8, 3),
    (128, 128, 64, 8, 3),
)


def run(sweep: bool, max_tokens: int, out: Path) -> dict:
    import torch
    from det_backend.kernels.moe import MoEConfig, config_for, fused_moe
    from vllm.model_executor.layers.fused_moe import override_config
    from vllm.model_executor.layers.fused_moe.fused_moe import fused_experts
    from vllm.model_executor.layers.fused_moe.router.fused_topk_router import fused_topk

    bandwidth = copy_bandwidth()
    gen = torch.Generator(device="cuda").manual_seed(0)
    points = []
    for model, (num_experts, top_k, hidden, inter) in MODELS.items():
        w13 = torch.randn(
            num_experts, 2 * inter, hidden, generator=gen, device="cuda", dtype=torch.bfloat16
        )
        w2 = torch.randn(
            num_experts, hidden, inter, generator=gen, device="cuda", dtype=torch.bfloat16
        )
        w13 *= hidden**-0.5
        w2 *= inter**-0.5
        x_all = torch.randn(max_tokens, hidden, generator=gen, device="cuda", dtype=torch.bfloat16)
        logits_all = torch.randn(
            max_tokens, num_experts, generator=gen, device="cuda", dtype=torch.bfloat16
        )
        expert_bytes = 3 * hidden * inter * w13.element_size()
        for tokens in (t for t in TOKENS if t <= max_tokens):
            x, logits = x_all[:tokens], logits_all[:tokens]

            def vllm_moe(x=x, logits=logits, w13=w13, w2=w2, top_k=top_k):
                weights, ids, _ = fused_topk(x, logits, top_k, renormalize=True)
                return fused_experts(x, w13, w2, weights, ids)

            def vllm_bi_moe(vllm_moe=vllm_moe):
                with override_config(VLLM_BI_CONFIG):
                    return vllm_moe()

            def ours(x=x, logits=logits, w13=w13, w2=w2, top_k=top_k, config=None):
                return fused_moe(x, w13, w2, logits, top_k, config=config)

            _, ids, _ = fused_topk(x, logits, top_k, renormalize=True)
            used = ids.unique().numel()
            point = {
                "model": model,
                "tokens": tokens,
                "E": num_experts,
                "top_k": top_k,
                "H": hidden,
                "I": inter,
                "experts_used": used,
                "config": list(config_for(tokens, top_k, num_experts)),
                "ours_ms": bench(ours),
                "vllm_ms": bench(vllm_moe),
                "vllm_bi_ms": bench(vllm_bi_moe),
                "floor_ms": used * expert_bytes / bandwidth * 1e3,
            }
            point["speedup_vs_vllm"] = point["vllm_ms"] / point["ours_ms"]
            point["speedup_vs_vllm_bi"] = point["vllm_bi_ms"] / point["ours_ms"]
            point["tflops"] = 6 * tokens * top_k * hidden * inter / (point["ours_ms"] * 1e-3) / 1e12
            if sweep:
                reference = ours()
                point["candidates"] = {}
                for c in CANDIDATES:
                    cfg = MoEConfig(0, *c)
                    # A tile that changed the bits could never enter the table: record it.
                    same = torch.equal(ours(config=cfg), reference)
                    ms = bench(lambda cfg=cfg, ours=ours: ours(config=cfg))
                    point["candidates"][str(c)] = ms if same else None
            points.append(point)
            out.write_text(json.dumps({"partial": True, "points": points}))  # survives a timeout
            print(
                f"{model:>14} T={tokens:<5} ours {point['ours_ms']:.4f} ms  "
                f"vLLM {point['vllm_ms']:.4f}  vLLM-BI {point['vllm_bi_ms']:.4f}  "
                f"x{point['speedup_vs_vllm']:.2f}",
                flush=True,
            )
        del w13, w2
    ratios = [p["speedup_vs_vllm"] for p in points]
    ratios_bi = [p["speedup_vs_vllm_bi"] for p in points]
    return {
        **run_info(),
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "geomean_speedup_vs_vllm": geomean(ratios),
        "min_speedup_vs_vllm": min(ratios),
        "geomean_speedup_vs_vllm_bi": geomean(ratios_bi),
        "points": points,
    }


def plot(data: dict):
    plt = pyplot()
    fig, axes = plt.subplots(1, len(MODELS), figsize=(13, 4.5), sharey=True)
    for ax, model in zip(axes, MODELS, strict=True):
        pts = [p for p in data["points"] if p["model"] == model]
        tokens = [p["tokens"] for p in pts]
        ax.plot(tokens, [p["speedup_vs_vllm"] for p in pts], "o-", label="vs vLLM default")
        ax.plot(tokens, [p["speedup_vs_vllm_bi"] for p in pts], "s--", label="vs vLLM BI tile")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens")
        ax.set_title(model)
        ax.legend()
    axes[0].set_ylabel("vLLM time / ours (higher is better)")
    fig.suptitle(
        f"det_backend fused_moe vs vLLM fused_experts, bf16, {data['gpu']} "
        f"(geomean {data['geomean_speedup_vs_vllm']:.2f}x)"
    )
    fig.tight_layout()
    return fig


def _add_args(parser) -> None:
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--max-tokens", type=int, default=max(TOKENS))


def _summary(result: dict) -> str:
    return (
        f"geomean speed-up vs vLLM {result['geomean_speedup_vs_vllm']:.3f} "
        f"(min {result['min_speedup_vs_vllm']:.3f}), vs vLLM BI tile "
        f"{result['geomean_speedup_vs_vllm_bi']:.3f} on {result['gpu']}"
    )


if __name__ == "__main__":
    main(
        __doc__,
        "moe.json",
        lambda a: run(a.sweep, a.max_tokens, Path(a.out)),
        plot,
        _summary,
        _add_args,
    )
