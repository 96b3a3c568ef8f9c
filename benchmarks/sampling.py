"""Sampling benchmark: ours vs vLLM 0.26's defaults on CUDA, in one process, same inputs.

  - top-k / top-p masks: vLLM's `apply_top_k_top_p` (sort below 8 rows, Triton pivot search
    from 8) vs det_backend's sort-free select (kernels/sampling.py), fp32 logits (V1 runner)
    and bf16 (V2 keeps the lm_head's dtype).
  - logprob top-k: torch.topk vs det_backend's topk with ties lowest index first, k = 20.
Each point also times det_backend's previous sort-based version (kernels/sampling_sort.py) as
`sorted_ms`. Rows 1..256, vocab 152064 (Qwen2/3), logits 3 * randn on the bf16 grid. Each call
gets a fresh copy of the logits (all mask in place); the copy's time is reported on its own as
`clone_ms` and is inside every timing.

    python benchmarks/sampling.py --out sampling.json
    python benchmarks/sampling.py --plot sampling.json

Speed-up = vLLM time / ours; GB/s counts the logits read once.
"""

from __future__ import annotations

import functools

from harness import (
    bench,
    copy_bandwidth,
    geomean,
    main,
    pyplot,
    speedup_line,
    speedup_summary,
    time_pair,
)

ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
VOCAB = 152064
CASES = (
    "top_k=50",
    "top_p=0.9",
    "top_k=50,top_p=0.9",
    "top_k=50,top_p=0.9,bf16",
    "top_p=0.99",
    "top_k=2000",
    "logprobs_topk=1",
    "logprobs_topk=20",
)


def _on_a_copy(mask, logits, k, p):
    """mask(logits, k, p) works in place: each timed call masks a fresh copy."""
    return lambda: mask(logits.clone(), k, p)


def run() -> dict:
    import torch
    from det_backend.kernels import sampling_sort
    from det_backend.kernels.sampling import apply_top_k_top_p, topk_lowest_index_first
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p as vllm_apply_top_k_top_p

    bandwidth = copy_bandwidth()
    gen = torch.Generator(device="cuda").manual_seed(0)
    points = []
    for rows in ROWS:
        logits = 3 * torch.randn(rows, VOCAB, generator=gen, device="cuda")
        logits = logits.to(torch.bfloat16).float()  # the ties a bf16 lm_head makes
        clone_ms = bench(lambda logits=logits: logits.clone())
        for case in CASES:
            params = dict(kv.split("=") for kv in case.split(",") if "=" in kv)
            x = logits.to(torch.bfloat16) if case.endswith(",bf16") else logits
            if "logprobs_topk" in params:
                n = int(params["logprobs_topk"])
                x = x.log_softmax(-1)
                ours = functools.partial(topk_lowest_index_first, x, n)
                theirs = functools.partial(torch.topk, x, n, dim=-1)
                before = functools.partial(sampling_sort.topk_lowest_index_first, x, n)
            else:
                k = p = None
                if "top_k" in params:
                    k = torch.full((rows,), int(params["top_k"]), dtype=torch.int32, device="cuda")
                if "top_p" in params:
                    p = torch.full((rows,), float(params["top_p"]), device="cuda")
                ours = _on_a_copy(apply_top_k_top_p, x, k, p)
                theirs = _on_a_copy(vllm_apply_top_k_top_p, x, k, p)
                before = _on_a_copy(sampling_sort.apply_top_k_top_p, x, k, p)
            pt = {"case": case, "rows": rows, "vocab": VOCAB, "clone_ms": clone_ms}
            nbytes = x.numel() * x.element_size()
            pt.update(time_pair(ours, theirs, nbytes, bandwidth))
            pt["sorted_ms"] = bench(before)
            pt["speedup_vs_sorted"] = pt["sorted_ms"] / pt["ours_ms"]
            points.append(pt)
            print(
                f"{case:>24} rows={rows:<4} ours {pt['ours_ms']:.4f} ms  "
                f"vLLM {pt['vllm_ms']:.4f}  x{pt['speedup_vs_vllm']:.2f}  "
                f"sorted {pt['sorted_ms']:.4f}  x{pt['speedup_vs_sorted']:.2f}",
                flush=True,
            )
    return speedup_summary(points, bandwidth)


def plot(data: dict):
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, key, who in (
        (axes[0], "speedup_vs_vllm", "vLLM 0.26"),
        (axes[1], "speedup_vs_sorted", "det_backend sort-based"),
    ):
        for case in CASES:
            pts = [pt for pt in data["points"] if pt["case"] == case and key in pt]
            if pts:
                ax.plot([pt["rows"] for pt in pts], [pt[key] for pt in pts], "o-", label=case)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("rows (requests sampled in the step)")
        ax.set_ylabel(f"{who} time / ours (higher is better)")
        ax.set_title(f"vs {who}, vocab {VOCAB}, {data['gpu']}")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def _summary(result: dict) -> str:
    vs_sorted = geomean([pt["speedup_vs_sorted"] for pt in result["points"]])
    return f"{speedup_line(result)}; vs the sort-based version {vs_sorted:.3f}"


if __name__ == "__main__":
    main(__doc__, "sampling.json", lambda a: run(), plot, _summary)
