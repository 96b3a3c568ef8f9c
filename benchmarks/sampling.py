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
    python benchmarks/sampling.py --sweep --out sampling_sweep.json   # launch parameters

--sweep times det_backend's top-k/top-p alone under each set of launch parameters in SWEEP
(kernels/sampling.py: none changes a result, which the sweep checks bitwise) and reports the
fastest per case and row count.

Speed-up = vLLM time / ours; GB/s counts the logits read once.
"""

from __future__ import annotations

import functools
import itertools

from harness import (
    bench,
    copy_bandwidth,
    geomean,
    main,
    pyplot,
    run_info,
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


# Launch parameters swept: NUM_WARPS, tokens per thread in a row tile (TILE_ROW), CUTS_ROW, and
# (tokens per thread in a scan tile (TILE_SCAN), STAGES).
SWEEP = list(itertools.product((4, 8), (4, 8), (8, 16), ((8, 3), (16, 2))))
SWEEP_ROWS = (1, 8, 64, 256)
SWEEP_CASES = ("top_k=50", "top_p=0.9", "top_k=50,top_p=0.9")


def _on_a_copy(mask, logits, k, p):
    """mask(logits, k, p) works in place: each timed call masks a fresh copy."""
    return lambda: mask(logits.clone(), k, p)


def _case_inputs(case: str, rows: int):
    """(k, p) tensors for a top-k/top-p case, None where the case has no such parameter."""
    import torch

    params = dict(kv.split("=") for kv in case.split(",") if "=" in kv)
    k = p = None
    if "top_k" in params:
        k = torch.full((rows,), int(params["top_k"]), dtype=torch.int32, device="cuda")
    if "top_p" in params:
        p = torch.full((rows,), float(params["top_p"]), device="cuda")
    return k, p


def sweep() -> dict:
    import torch
    from det_backend.kernels import sampling as ks

    defaults = {n: getattr(ks, n) for n in ("NUM_WARPS", "TILE_ROW", "TILE_LIST", "TILE_SCAN")}
    defaults.update(CUTS_ROW=ks.CUTS_ROW, STAGES=ks.STAGES)
    gen = torch.Generator(device="cuda").manual_seed(0)
    points = []
    for rows in SWEEP_ROWS:
        logits = (3 * torch.randn(rows, VOCAB, generator=gen, device="cuda")).to(torch.bfloat16)
        logits = logits.float()
        for case in SWEEP_CASES:
            k, p = _case_inputs(case, rows)
            want = None
            for warps, per_thread, cuts, (scan, stages) in SWEEP:
                threads = 32 * warps
                ks.NUM_WARPS, ks.CUTS_ROW, ks.STAGES = warps, cuts, stages
                ks.TILE_ROW, ks.TILE_LIST, ks.TILE_SCAN = (
                    per_thread * threads,
                    4 * threads,
                    scan * threads,
                )
                thr = ks.top_k_top_p_threshold(logits, k, p)
                if want is None:
                    want = thr
                if not torch.equal(thr, want):
                    raise RuntimeError(f"{case} rows={rows}: thresholds differ at {ks.TILE_ROW=}")
                ms = bench(_on_a_copy(ks.apply_top_k_top_p, logits, k, p))
                points.append(
                    dict(case=case, rows=rows, num_warps=warps, tile_row=ks.TILE_ROW,
                         cuts_row=cuts, tile_scan=ks.TILE_SCAN, stages=stages, ms=ms)
                )  # fmt: skip
                print(f"{case:>20} rows={rows:<4} {points[-1]}", flush=True)
    for name, value in defaults.items():
        setattr(ks, name, value)
    best = {}
    for pt in points:
        key = f"{pt['case']} rows={pt['rows']}"
        if key not in best or pt["ms"] < best[key]["ms"]:
            best[key] = pt
    return {**run_info(), "defaults": defaults, "best": best, "points": points}


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
                k, p = _case_inputs(case, rows)
                ours = _on_a_copy(apply_top_k_top_p, x, k, p)
                theirs = _on_a_copy(vllm_apply_top_k_top_p, x, k, p)
                before = _on_a_copy(sampling_sort.apply_top_k_top_p, x, k, p)
            pt = {"case": case, "rows": rows, "vocab": VOCAB, "clone_ms": clone_ms}
            nbytes = x.numel() * x.element_size()
            pt["sorted_ms"] = bench(before)  # the sort-based version (kernels/sampling_sort.py)
            label = f"{case:>24} rows={rows:<4} sorted {pt['sorted_ms']:.4f} ms"
            pt.update(time_pair(ours, theirs, nbytes, bandwidth, label=label))
            pt["speedup_vs_sorted"] = pt["sorted_ms"] / pt["ours_ms"]
            points.append(pt)
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
    if "best" in result:
        return "\n".join(
            f"{key}: {pt['ms']:.4f} ms with num_warps={pt['num_warps']} tile_row={pt['tile_row']} "
            f"cuts_row={pt['cuts_row']} tile_scan={pt['tile_scan']} stages={pt['stages']}"
            for key, pt in result["best"].items()
        )
    vs_sorted = geomean([pt["speedup_vs_sorted"] for pt in result["points"]])
    return f"{speedup_line(result)}; vs the sort-based version {vs_sorted:.3f}"


def _add_args(parser) -> None:
    parser.add_argument("--sweep", action="store_true", help="time launch parameters instead")


if __name__ == "__main__":
    main(
        __doc__,
        "sampling.json",
        lambda a: sweep() if a.sweep else run(),
        plot,
        _summary,
        _add_args,
    )
