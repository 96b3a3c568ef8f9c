"""The cost of TP-invariant mode on one GPU: the K-slice tree GEMM (kernels/tree_matmul.py) vs
our normal matmul, bf16, Llama-3-8B o_proj (4096 x 4096) and down_proj (4096 x 14336), M 1..8192.

    python benchmarks/tp_gemm.py --out tp_gemm.json
    python benchmarks/tp_gemm.py --plot tp_gemm.json

Per point, two cases, both replayed from CUDA graphs (as vLLM runs them):
- tp1: the whole layer on one GPU, tree_matmul (8 slice partials, then the tree) vs matmul.
- tp2_rank: one rank's compute at TP=2 (K/2): its subtree root (4 slices) and the final
  bias + rounding vs the normal full-K GEMM of the shard. The all-reduce is not timed; in
  this mode it moves fp32 (2x the bf16 bytes: `allreduce_bytes` vs `plain_allreduce_bytes`).
Ratio = matmul time / tree time (< 1: the mode is slower). GB/s counts x, weight and y once.
"""

from __future__ import annotations

from harness import copy_bandwidth, graphed, main, pyplot, speedup_summary, time_pair

SHAPES = {"o_proj": (4096, 4096), "down_proj": (4096, 14336)}  # (N, K)
MS = (1, 8, 32, 128, 512, 2048, 8192)
NAME = "matmul"


def run() -> dict:
    import torch
    from det_backend.kernels.matmul import matmul
    from det_backend.kernels.tree_matmul import TREE_SLICES, tree_finish, tree_matmul, tree_partial

    bandwidth = copy_bandwidth()
    gen = torch.Generator(device="cuda").manual_seed(0)
    points = []
    for layer, (n, k) in SHAPES.items():
        w = torch.randn(n, k, generator=gen, device="cuda", dtype=torch.bfloat16) * 0.02
        w_half = w[:, : k // 2].contiguous()
        for m in MS:
            x = torch.randn(m, k, generator=gen, device="cuda", dtype=torch.bfloat16)
            x_half = x[:, : k // 2].contiguous()

            def rank_tree(x_half=x_half, w_half=w_half):
                root = tree_partial(x_half, w_half, TREE_SLICES // 2)
                return tree_finish(root.unsqueeze(0), None, torch.bfloat16)

            cases = {
                "tp1": (
                    lambda x=x, w=w: tree_matmul(x, w),
                    lambda x=x, w=w: matmul(x, w),
                    k,
                ),
                "tp2_rank": (
                    rank_tree,
                    lambda x_half=x_half, w_half=w_half: matmul(x_half, w_half),
                    k // 2,
                ),
            }
            for case, (ours, theirs, kk) in cases.items():
                nbytes = 2 * (m * kk + n * kk + m * n)
                p = {"layer": layer, "case": case, "m": m, "n": n, "k": kk}
                p["allreduce_bytes"] = 4 * m * n
                p["plain_allreduce_bytes"] = 2 * m * n
                label = f"{layer:>9} {case:>8} M={m:<5}"
                p.update(time_pair(graphed(ours), graphed(theirs), nbytes, bandwidth, NAME, label))
                points.append(p)
    return speedup_summary(points, bandwidth, NAME)


def summary(result: dict) -> str:
    lines = []
    for case in ("tp1", "tp2_rank"):
        pts = [p for p in result["points"] if p["case"] == case]
        for layer in SHAPES:
            ratios = ", ".join(
                f"M={p['m']}: {p['speedup_vs_matmul']:.2f}" for p in pts if p["layer"] == layer
            )
            lines.append(f"{case} {layer} (matmul time / tree time): {ratios}")
    lines.append(
        f"geomean {result['geomean_speedup_vs_matmul']:.3f}, min "
        f"{result['min_speedup_vs_matmul']:.3f} on {result['gpu']}"
    )
    return "\n".join(lines)


def plot(data: dict):
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, case in zip(axes, ("tp1", "tp2_rank"), strict=True):
        for layer in SHAPES:
            pts = [p for p in data["points"] if p["case"] == case and p["layer"] == layer]
            ax.plot([p["m"] for p in pts], [p["speedup_vs_matmul"] for p in pts], "o-", label=layer)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("M (tokens)")
        ax.set_title(case)
        ax.legend()
    axes[0].set_ylabel("matmul time / tree time (higher is better)")
    fig.suptitle(f"TP-invariant tree GEMM vs det_backend matmul, bf16, {data['gpu']}")
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main(__doc__, "tp_gemm.json", lambda a: run(), plot, summary)
