"""RMSNorm benchmark: ours vs vLLM's CUDA `rms_norm` and `fused_add_rms_norm` (the `vllm_c`
provider), bf16, tokens 1..16384, hidden 4096 / 5120 / 8192, in one process, same inputs.

    python benchmarks/rmsnorm.py --out rmsnorm.json
    python benchmarks/rmsnorm.py --plot rmsnorm.json

Speed-up = vLLM time / ours; GB/s counts each tensor read or written once.
"""

from __future__ import annotations

from harness import copy_bandwidth, main, pyplot, speedup_line, speedup_summary, time_pair

TOKENS = (1, 4, 16, 64, 256, 1024, 4096, 16384)
HIDDEN = (4096, 5120, 8192)
EPS = 1e-5


def run() -> dict:
    import torch
    import vllm._custom_ops  # noqa: F401  (loads torch.ops._C)
    from det_backend.kernels.rms_norm import fused_add_rms_norm, rms_norm

    bandwidth = copy_bandwidth()
    gen = torch.Generator(device="cuda").manual_seed(0)
    points = []
    for hidden in HIDDEN:
        w = torch.randn(hidden, generator=gen, device="cuda", dtype=torch.bfloat16)
        for tokens in TOKENS:
            x = torch.randn(tokens, hidden, generator=gen, device="cuda", dtype=torch.bfloat16)
            res = torch.randn_like(x)
            out = torch.empty_like(x)
            # vLLM's fused op works in place: it keeps adding into the same buffers, which
            # changes values, not the work done.
            xv, rv = x.clone(), res.clone()
            cases = {
                "rms_norm": (
                    lambda x=x, w=w: rms_norm(x, w, EPS),
                    lambda x=x, w=w, out=out: torch.ops._C.rms_norm(out, x, w, EPS),
                    2,
                ),
                "fused_add_rms_norm": (
                    lambda x=x, res=res, w=w: fused_add_rms_norm(x, res, w, EPS),
                    lambda xv=xv, rv=rv, w=w: torch.ops._C.fused_add_rms_norm(xv, rv, w, EPS),
                    4,
                ),
            }
            for op, (ours, theirs, tensors) in cases.items():
                nbytes = tensors * x.numel() * x.element_size()
                p = {"op": op, "tokens": tokens, "hidden": hidden}
                label = f"{op:>18} T={tokens:<6} H={hidden}"
                p.update(time_pair(ours, theirs, nbytes, bandwidth, label=label))
                points.append(p)
    return speedup_summary(points, bandwidth)


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


if __name__ == "__main__":
    main(__doc__, "rmsnorm.json", lambda a: run(), plot, speedup_line)
