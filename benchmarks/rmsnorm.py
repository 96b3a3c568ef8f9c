"""RMSNorm benchmark: ours vs vLLM's CUDA `rms_norm` and `fused_add_rms_norm` (the `vllm_c`
provider), bf16, tokens 1..16384, hidden 4096 / 5120 / 8192, in one process, same inputs.

    python benchmarks/rmsnorm.py --out rmsnorm.json
    python benchmarks/rmsnorm.py --plot rmsnorm.json
    python benchmarks/rmsnorm.py --sweep --out rmsnorm_sweep.json   # launch configs, see below

Speed-up = vLLM time / ours; GB/s counts each tensor read or written once.

--sweep times each candidate launch (kernels/rms_norm.py `launch_candidates`: the row whole or
in chunks, warps) at 1024..16384 tokens for each hidden size (--hidden), beside vLLM's op, and
checks that each keeps a row's bits whatever the row count (8 rows alone vs inside the full
batch). A config may follow hidden, never the tokens: the best by geomean over tokens per
hidden is what `launch_config` may adopt.
"""

from __future__ import annotations

from harness import (
    copy_bandwidth,
    geomean,
    main,
    pyplot,
    speedup_line,
    speedup_summary,
    time_pair,
)

TOKENS = (1, 4, 16, 64, 256, 1024, 4096, 16384)
HIDDEN = (4096, 5120, 8192)
EPS = 1e-5


def op_cases(x, res, w, config=None) -> dict:
    """op -> (ours, vLLM's, tensors moved) on these inputs; config: our launch (None: the
    default one)."""
    import torch
    from det_backend.kernels.rms_norm import fused_add_rms_norm, rms_norm

    out = torch.empty_like(x)
    # vLLM's fused op works in place: it keeps adding into the same buffers, which changes
    # values, not the work done.
    xv, rv = x.clone(), res.clone()
    return {
        "rms_norm": (
            lambda: rms_norm(x, w, EPS, config=config),
            lambda: torch.ops._C.rms_norm(out, x, w, EPS),
            2,
        ),
        "fused_add_rms_norm": (
            lambda: fused_add_rms_norm(x, res, w, EPS, config=config),
            lambda: torch.ops._C.fused_add_rms_norm(xv, rv, w, EPS),
            4,
        ),
    }


def first_output(result):
    """The normalised rows of either op's result."""
    return result[0] if isinstance(result, tuple) else result


def run() -> dict:
    import torch
    import vllm._custom_ops  # noqa: F401  (loads torch.ops._C)

    bandwidth = copy_bandwidth()
    gen = torch.Generator(device="cuda").manual_seed(0)
    points = []
    for hidden in HIDDEN:
        w = torch.randn(hidden, generator=gen, device="cuda", dtype=torch.bfloat16)
        for tokens in TOKENS:
            x = torch.randn(tokens, hidden, generator=gen, device="cuda", dtype=torch.bfloat16)
            res = torch.randn_like(x)
            cases = op_cases(x, res, w)
            for op, (ours, theirs, tensors) in cases.items():
                nbytes = tensors * x.numel() * x.element_size()
                p = {"op": op, "tokens": tokens, "hidden": hidden}
                label = f"{op:>18} T={tokens:<6} H={hidden}"
                p.update(time_pair(ours, theirs, nbytes, bandwidth, label=label))
                points.append(p)
    return speedup_summary(points, bandwidth)


SWEEP_TOKENS = (1024, 4096, 16384)  # below, launch overhead, not the config, sets the time


def run_sweep(hiddens: tuple[int, ...]) -> dict:
    import torch
    import vllm._custom_ops  # noqa: F401  (loads torch.ops._C)
    from det_backend.kernels.rms_norm import launch_candidates, launch_config

    bandwidth = copy_bandwidth()
    gen = torch.Generator(device="cuda").manual_seed(0)
    points, best = [], {}
    for hidden in hiddens:
        w = torch.randn(hidden, generator=gen, device="cuda", dtype=torch.bfloat16)
        per_config = {}
        for config in launch_candidates(hidden):
            for tokens in SWEEP_TOKENS:
                x = torch.randn(tokens, hidden, generator=gen, device="cuda", dtype=torch.bfloat16)
                res = torch.randn_like(x)
                alone = op_cases(x[:8], res[:8], w, config)
                for op, (ours, theirs, tensors) in op_cases(x, res, w, config).items():
                    # The config must keep a row's bits whatever the row count.
                    few = first_output(ours())[:8]
                    rows_invariant = torch.equal(few, first_output(alone[op][0]()))
                    nbytes = tensors * x.numel() * x.element_size()
                    p = {
                        "op": op,
                        "tokens": tokens,
                        "hidden": hidden,
                        "config": config._asdict(),
                        "is_default": config == launch_config(hidden),
                        "rows_invariant": rows_invariant,
                    }
                    label = f"{op:>18} T={tokens:<6} H={hidden} {tuple(config)}"
                    p.update(time_pair(ours, theirs, nbytes, bandwidth, label=label))
                    points.append(p)
                    per_config.setdefault(config, []).append(p["speedup_vs_vllm"])
        ranked = sorted(per_config.items(), key=lambda kv: -geomean(kv[1]))
        best[str(hidden)] = [
            {"config": c._asdict(), "geomean_speedup_vs_vllm": geomean(r), "min": min(r)}
            for c, r in ranked
        ]
    result = speedup_summary(points, bandwidth)
    result["ranked_configs"] = best
    result["all_rows_invariant"] = all(p["rows_invariant"] for p in points)
    return result


def plot(data: dict):
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, op in zip(axes, ("rms_norm", "fused_add_rms_norm"), strict=True):
        for hidden in HIDDEN:
            pts = [p for p in data["points"] if p["op"] == op and p["hidden"] == hidden]
            ax.plot(
                [p["tokens"] for p in pts],
                [p["speedup_vs_vllm"] for p in pts],
                "o-",
                label=f"hidden {hidden}",
            )
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens")
        ax.set_title(op)
        ax.legend()
    axes[0].set_ylabel("vLLM time / ours (higher is better)")
    fig.suptitle(f"det_backend RMSNorm vs vLLM CUDA, bf16, {data['gpu']}")
    fig.tight_layout()
    return fig


def sweep_line(result: dict) -> str:
    if "ranked_configs" not in result:
        return speedup_line(result)
    lines = [f"rows invariant for every config: {result['all_rows_invariant']}"]
    for hidden, ranked in result["ranked_configs"].items():
        top = ", ".join(
            f"{tuple(r['config'].values())} {r['geomean_speedup_vs_vllm']:.3f}" for r in ranked[:3]
        )
        lines.append(f"hidden {hidden}: best {top}")
    return "\n".join(lines)


def add_args(parser) -> None:
    parser.add_argument("--sweep", action="store_true", help="time the candidate launch configs")
    parser.add_argument(
        "--hidden",
        default=",".join(map(str, HIDDEN)),
        help="--sweep: hidden sizes, comma-separated (each candidate is one more JIT compile)",
    )


if __name__ == "__main__":
    main(
        __doc__,
        "rmsnorm.json",
        lambda a: run_sweep(tuple(int(h) for h in a.hidden.split(","))) if a.sweep else run(),
        plot,
        sweep_line,
        add_args,
    )
