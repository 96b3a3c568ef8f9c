"""GEMM benchmark: our matmul vs cuBLAS (torch default) vs vLLM's batch-invariant matmul,
bf16, Llama-3-8B and Qwen3-32B linear-layer shapes, M from 1 to 8192, side by side in one
process on the same inputs.

    python benchmarks/gemm.py --out gemm.json            # the table in kernels/matmul.py
    python benchmarks/gemm.py --sweep --out sweep.json   # + every candidate config, per point
    python benchmarks/gemm.py --sweep --layers llama-3-8b:o,qwen3-32b:down --out part.json
    python benchmarks/gemm.py --plot gemm.json           # PNG next to the JSON (no GPU needed)
    python benchmarks/gemm_table.py sweep.json [more.json ...]  # MATMUL_TABLE from sweeps

Timing: every GEMM (ours, each candidate, cuBLAS, vLLM's) is captured once in a CUDA graph
and the replay is timed (`--eager`: plain launches). vLLM runs its linear layers inside CUDA
graphs (full graphs for decode, piecewise ones for prefill up to the largest capture size), so
host launch cost is not part of what it pays; timing eager launches of kernels of 10-50 us
measured Python launch overhead instead (a same-config candidate read 0.024 ms at one M and
0.10 ms at the next, H200).

Speed-up = cuBLAS time / ours. The memory floor is the bytes every GEMM must move (x, weight,
y once each) over the copy bandwidth measured in the same run.

The sweep times every config of `MATMUL_CANDIDATES` (kernels/matmul.py, so the tests cover
each one) where it makes sense (`sweep_fits`), and records None for a config whose output is
not bitwise that of the other configs with the same split_k at that point: such a config
could never enter a table.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from harness import bench, copy_bandwidth, geomean, graphed, main, pyplot, run_info

M_VALUES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
# (model, layer, N, K) for y[M, N] = x[M, K] @ W[N, K].T
SHAPES = (
    ("llama-3-8b", "qkv", 6144, 4096),
    ("llama-3-8b", "o", 4096, 4096),
    ("llama-3-8b", "gate_up", 28672, 4096),
    ("llama-3-8b", "down", 4096, 14336),
    ("llama-3-8b", "lm_head", 128256, 4096),
    ("qwen3-32b", "qkv", 10240, 5120),
    ("qwen3-32b", "o", 5120, 8192),
    ("qwen3-32b", "gate_up", 51200, 5120),
    ("qwen3-32b", "down", 5120, 25600),
)
# One rank's shapes at tensor_parallel_size=2 (column-parallel N / 2, row-parallel K / 2).
# MATMUL_TABLE has no entry for them yet, so MATMUL_CONFIGS serves them: on two H100s det's
# TP=2 throughput was 0.72x of vLLM's default (benchmarks/results/ab_tp2_h100x2.json) against
# 0.87x at TP=1 (H200). Not in the default run; name them with --layers llama-3-8b-tp2:o,...
ROW_PARALLEL = ("o", "down")  # K split across ranks; the other layers split N (vocab for lm_head)
TP2_SHAPES = tuple(
    (f"{model}-tp2", layer, *((n, k // 2) if layer in ROW_PARALLEL else (n // 2, k)))
    for model, layer, n, k in SHAPES
    if model == "llama-3-8b"
)


def select_shapes(layers: str | None) -> list[tuple[str, str, int, int]]:
    """SHAPES, or the model:layer names given (from SHAPES and TP2_SHAPES, in that order);
    ValueError names any unknown one."""
    if not layers:
        return list(SHAPES)
    wanted = [name for name in layers.split(",") if name]
    known = {f"{shape[0]}:{shape[1]}": shape for shape in (*SHAPES, *TP2_SHAPES)}
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise ValueError(f"unknown --layers {unknown}; known: {', '.join(known)}")
    return [shape for name, shape in known.items() if name in wanted]


# TMA descriptors cost host time per launch and the persistent loop pays off with many tiles:
# TMA configs are swept from this M. Parallel split-K writes [split_k, M, N] fp32 partials:
# swept up to SPLIT_K_MAX_M. In-program split-K (the large-M side of a split-K shape) from
# TMA_MIN_M.
TMA_MIN_M = 128
SPLIT_K_MAX_M = 128
# Kinds --sweep times unless --kinds says otherwise: not the TMA kind, which the GPU tests first
# run one config per process with a time limit (tests/test_matmul.py
# test_matmul_tma_config_finishes_and_matches_plain_gpu): in a sweep, a kernel that does not end
# takes the whole sweep with it. Two runs once went on for minutes there; on an H100 every TMA
# config has since ended (benchmarks/results/tma_probe_h100.json): add it with --kinds.
SWEEP_KINDS = ("plain", "split_k")


def sweep_fits(config, m: int) -> bool:
    """Whether --sweep times `config` at M = m."""
    import triton

    if config.block_m > max(16, triton.next_power_of_2(m)):
        return False
    if config.kind == "split_k":
        return m <= SPLIT_K_MAX_M
    if config.kind == "tma_persistent" or config.split_k > 1:
        return m >= TMA_MIN_M
    return True


def parse_extra(text: str) -> tuple:
    """--extra: ';'-separated configs, each block_m,block_n,block_k,group_m,warps,stages
    [,kind[,split_k]] (max_m 0, as the candidates)."""
    from det_backend.kernels.matmul import MatmulConfig

    configs = []
    for item in (t.strip() for t in text.split(";") if t.strip()):
        parts = [p.strip() for p in item.split(",")]
        ints = [int(p) for p in parts[:6]]
        kind = parts[6] if len(parts) > 6 else "plain"
        split_k = int(parts[7]) if len(parts) > 7 else 1
        configs.append(MatmulConfig(0, *ints, kind, split_k))
    return tuple(configs)


def make_timer(eager: bool):
    """ms of fn: its CUDA-graph replay (what vLLM runs), or plain launches with `eager`."""
    return bench if eager else lambda fn: bench(graphed(fn))


def sweep_point(x, w, ours, candidates, timer=bench, walls: dict | None = None) -> dict:
    """Milliseconds per candidate at one point; None where its bits differ from its split_k
    group's first output here (the table's own output for split_k 1), or an error string.
    walls, if given, receives per candidate [first call s (JIT compile or cache load),
    timing s]: where an H200 sweep's ~80 s per point went."""
    import torch
    from det_backend.kernels.matmul import matmul

    times, first = {}, {1: ours}
    for cfg in candidates:
        key = str(tuple(cfg[1:]))
        # Before the first call: a candidate that hangs or compiles for minutes is named in
        # the log (an H100 sweep at M >= 512 was cut at 590 s with nothing printed).
        print(f"  M={x.shape[0]} {key} ...", flush=True)
        start = time.perf_counter()
        try:
            y = matmul(x, w, config=cfg)
            torch.cuda.synchronize()
        except Exception as e:  # a config this Triton cannot compile is a result, not a crash
            times[key] = f"error: {type(e).__name__}: {str(e)[:200]}"
            print(f"  {key}: {times[key]}", flush=True)
            continue
        first_s = time.perf_counter() - start
        same = torch.equal(y, first.setdefault(cfg.split_k, y))
        start = time.perf_counter()
        times[key] = timer(lambda x=x, w=w, cfg=cfg: matmul(x, w, config=cfg)) if same else None
        if walls is not None:
            walls[key] = [round(first_s, 3), round(time.perf_counter() - start, 3)]
    return times


def run(
    sweep: bool,
    max_m: int,
    layers: str | None,
    out: Path,
    eager: bool = False,
    min_m: int = 1,
    kinds: tuple[str, ...] = SWEEP_KINDS,
    split_ks: tuple[int, ...] | None = None,
    extra: tuple = (),
) -> dict:
    import torch
    from det_backend.kernels.matmul import (
        KINDS,
        MATMUL_CANDIDATES,
        config_for,
        gpu_family,
        matmul,
    )
    from vllm.model_executor.layers.batch_invariant import matmul_persistent

    if set(kinds) - set(KINDS):
        raise ValueError(f"--kinds {sorted(set(kinds) - set(KINDS))}: not among {KINDS}")

    bandwidth = copy_bandwidth()
    timer = make_timer(eager)
    points = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    family = gpu_family(torch.device("cuda", torch.cuda.current_device()))
    for model, layer, n, k in select_shapes(layers):
        w = torch.randn(n, k, generator=gen, device="cuda", dtype=torch.bfloat16) * 0.02
        x_all = torch.randn(max_m, k, generator=gen, device="cuda", dtype=torch.bfloat16)
        for m in (m for m in M_VALUES if min_m <= m <= max_m):
            x = x_all[:m]
            start = time.perf_counter()
            ours = matmul(x, w)
            point = {
                "model": model,
                "layer": layer,
                "M": m,
                "N": n,
                "K": k,
                "config": list(config_for(m, n, k, family)),
                "ours_ms": timer(lambda x=x, w=w: matmul(x, w)),
                "cublas_ms": timer(lambda x=x, w=w: torch.nn.functional.linear(x, w)),
                # vLLM's VLLM_BATCH_INVARIANT linear on Hopper: its persistent Triton matmul.
                "vllm_bi_ms": timer(lambda x=x, w=w: matmul_persistent(x, w.t())),
                "floor_ms": 2 * (m * k + n * k + m * n) / bandwidth * 1e3,
            }
            point["fixed_wall_s"] = time.perf_counter() - start  # ours, cuBLAS, vLLM BI
            point["speedup_vs_cublas"] = point["cublas_ms"] / point["ours_ms"]
            point["tflops"] = 2 * m * n * k / (point["ours_ms"] * 1e-3) / 1e12
            if sweep:
                fits = [
                    c
                    for c in (*MATMUL_CANDIDATES, *extra)
                    if sweep_fits(c, m)
                    and c.kind in kinds
                    and (split_ks is None or c.split_k in split_ks)
                ]
                point["candidate_wall_s"] = {}
                point["candidates"] = sweep_point(
                    x, w, ours, fits, timer, point["candidate_wall_s"]
                )
            # Wall time per point: an H200 sweep took ~80 s per point for 9-21 candidates that
            # compile in ~20 s in all (benchmarks/prebuild_cache.py); this says where it goes.
            point["wall_s"] = time.perf_counter() - start
            points.append(point)
            out.write_text(json.dumps({"partial": True, "points": points}))  # survives a timeout
            print(
                f"{model:>10} {layer:>8} M={m:<5} ours {point['ours_ms']:.4f} ms  "
                f"cuBLAS {point['cublas_ms']:.4f}  x{point['speedup_vs_cublas']:.2f}  "
                f"({point['wall_s']:.1f} s)",
                flush=True,
            )
    ratios = [p["speedup_vs_cublas"] for p in points]
    return {
        **run_info(),
        "timing": "eager launches" if eager else "CUDA graph replay",
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "geomean_speedup_vs_cublas": geomean(ratios),
        "min_speedup_vs_cublas": min(ratios),
        "points": points,
    }


def plot(data: dict):
    plt = pyplot()
    shapes = sorted({(p["model"], p["layer"]) for p in data["points"]}, key=str)
    models = sorted({model for model, _ in shapes})
    fig, axes = plt.subplots(
        1, len(models), figsize=(6.5 * len(models), 4.5), sharey=True, squeeze=False
    )
    axes = axes[0]
    for ax, model in zip(axes, models, strict=True):
        for mdl, layer in shapes:
            if mdl != model:
                continue
            pts = [p for p in data["points"] if (p["model"], p["layer"]) == (mdl, layer)]
            ax.plot([p["M"] for p in pts], [p["speedup_vs_cublas"] for p in pts], "o-", label=layer)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("M (tokens)")
        ax.set_title(model)
        ax.legend()
    axes[0].set_ylabel("cuBLAS time / ours (higher is better)")
    fig.suptitle(
        f"det_backend matmul vs cuBLAS, bf16, {data['gpu']} "
        f"(geomean {data['geomean_speedup_vs_cublas']:.2f}x)"
    )
    fig.tight_layout()
    return fig


def _add_args(parser) -> None:
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--max-m", type=int, default=max(M_VALUES))
    # A sweep of the large-M points only (where the table is furthest from cuBLAS) fits one
    # call of the lent host: --min-m 512.
    parser.add_argument("--min-m", type=int, default=1)
    parser.add_argument(
        "--kinds",
        default=",".join(SWEEP_KINDS),
        help="comma-separated candidate kinds for --sweep (plain, split_k, tma_persistent)",
    )
    # --split-ks 1: only the sums the tables already use (every table is split_k = 1), e.g.
    # to re-sweep the large M of each table without the other split_k's candidates.
    parser.add_argument("--split-ks", help="comma-separated split_k values for --sweep")
    # --extra: configs not (yet) in MATMUL_CANDIDATES, e.g. "64,64,128,8,4,4,tma_persistent;
    # 64,128,128,8,4,3" (block_m, block_n, block_k, group_m, warps, stages[, kind[, split_k]]).
    # Exploration only: the sweep checks their bits at every point, and a config enters a table
    # only through MATMUL_CANDIDATES or the table itself, which the tests span.
    parser.add_argument("--extra", default="", help="more candidate configs for --sweep")
    parser.add_argument("--eager", action="store_true", help="time plain launches, not graphs")
    parser.add_argument(
        "--layers",
        help="comma-separated model:layer (e.g. llama-3-8b:o, llama-3-8b-tp2:down) to run; "
        "default: every shape of SHAPES",
    )


def _summary(result: dict) -> str:
    return (
        f"geomean speed-up vs cuBLAS {result['geomean_speedup_vs_cublas']:.3f}, "
        f"min {result['min_speedup_vs_cublas']:.3f} on {result['gpu']}"
    )


if __name__ == "__main__":
    main(
        __doc__,
        "gemm.json",
        lambda a: run(
            a.sweep,
            a.max_m,
            a.layers,
            Path(a.out),
            a.eager,
            a.min_m,
            tuple(a.kinds.split(",")),
            tuple(int(s) for s in a.split_ks.split(",")) if a.split_ks else None,
            parse_extra(a.extra),
        ),
        plot,
        _summary,
        _add_args,
    )
