"""Sampling benchmark: ours vs vLLM 0.26's defaults on CUDA, in one process, same inputs.

  - top-k / top-p masks: vLLM's `apply_top_k_top_p` (sort below 8 rows, Triton pivot search
    from 8) vs det_backend's (sort + one threshold program per row), fp32 logits.
  - logprob top-k: torch.topk vs det_backend's topk with ties lowest index first, k = 20.
Rows 1..256, vocab 152064 (Qwen2/3). Each call gets a fresh copy of the logits (both mask in
place); the copy's time is reported on its own as `clone_ms` and is inside both timings.

    python benchmarks/sampling.py --out sampling.json
    python benchmarks/sampling.py --plot sampling.json

Speed-up = vLLM time / ours; GB/s counts the logits read once.
"""

from __future__ import annotations

import functools

from harness import bench, copy_bandwidth, main, pyplot, speedup_line, speedup_summary, time_pair

ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
VOCAB = 152064
CASES = ("top_k=50", "top_p=0.9", "top_k=50,top_p=0.9", "logprobs_topk=1", "logprobs_topk=20")


def _on_a_copy(mask, logits, k, p):
    """mask(logits, k, p) works in place: each timed call masks a fresh copy."""
    return lambda: mask(logits.clone(), k, p)


def run() -> dict:
    import torch
    from det_backend.kernels.sampling import apply_top_k_top_p, topk_lowest_index_first
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p as vllm_apply_top_k_top_p

    bandwidth = copy_bandwidth()
    gen = torch.Generator(device="cuda").manual_seed(0)
    points = []
    for rows in ROWS:
        logits = 3 * torch.randn(rows, VOCAB, generator=gen, device="cuda")
        logits = logits.to(torch.bfloat16).float()  # the ties a bf16 lm_head makes
        k = torch.full((rows,), 50, dtype=torch.int32, device="cuda")
        p = torch.full((rows,), 0.9, device="cuda")
        clone_ms = bench(lambda logits=logits: logits.clone())
        for case in CASES:
            if case.startswith("logprobs_topk="):
                n = int(case.split("=")[1])
                logprobs = logits.log_softmax(-1)
                ours = functools.partial(topk_lowest_index_first, logprobs, n)
                theirs = functools.partial(torch.topk, logprobs, n, dim=-1)
            else:
                kk = k if "top_k" in case else None
                pp = p if "top_p" in case else None
                ours = _on_a_copy(apply_top_k_top_p, logits, kk, pp)
                theirs = _on_a_copy(vllm_apply_top_k_top_p, logits, kk, pp)
            pt = {"case": case, "rows": rows, "vocab": VOCAB, "clone_ms": clone_ms}
            nbytes = logits.numel() * logits.element_size()
            label = f"{case:>20} rows={rows:<4}"
            pt.update(time_pair(ours, theirs, nbytes, bandwidth, label=label))
            points.append(pt)
    return speedup_summary(points, bandwidth)


def plot(data: dict):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for case in CASES:
        pts = [pt for pt in data["points"] if pt["case"] == case]
        ax.plot([pt["rows"] for pt in pts], [pt["speedup_vs_vllm"] for pt in pts], "o-", label=case)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rows (requests sampled in the step)")
    ax.set_ylabel("vLLM time / ours (higher is better)")
    ax.set_title(f"det_backend sampling vs vLLM 0.26, vocab {VOCAB}, {data['gpu']}")
    ax.legend()
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main(__doc__, "sampling.json", lambda a: run(), plot, speedup_line)
