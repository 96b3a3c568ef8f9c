"""Where the time goes, end to end (issue 4): per engine, the GPU kernel time of one batch
under torch.profiler, by category (GEMM, attention, RMSNorm, ...), side by side.

    python benchmarks/profile_e2e.py --out profile_e2e.json                # default, det
    python benchmarks/profile_e2e.py --backends default,det,det_fa3 --out profile_e2e.json
    python benchmarks/profile_e2e.py --plot profile_e2e.json               # the PNG next to it

Each engine (its own process, as in ab_throughput.py: Llama-3-8B shapes, realistic synthetic
weights) runs a warm-up batch of other prompts, then the workload's batch once under the
profiler (det_backend.demo.profiled_generate): 256 prompts of 64-512 tokens and 128 new
(prefill_mix), or 64 prompts and 1024 new (decode_heavy). The engine runs its model in its own
process for this (VLLM_ENABLE_V1_MULTIPROCESSING=0, TP=1), which is not how ab_throughput.py
times it: the wall time here is not a throughput figure, the kernel times are what to compare.
CUPTI reports the kernels of CUDA-graph replays too (`kernel_share_of_wall` would show any
missed). `ratio_vs_default` per category: ours / the
default's kernel time (> 1: ours takes longer); `gap_share`: that category's part of the
difference in total kernel time.
"""

from __future__ import annotations

import sys

from ab_throughput import WORKLOADS, parse_workloads
from harness import main, pyplot, run_info

# (category, lower-case substrings of kernel names), first match wins: FA3's kernels are
# cutlass templates named flash::..., so attention is tested before GEMM, and vLLM's KV write
# is reshape_and_cache_flash_kernel, so it is tested before attention.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("kv_cache_write", ("reshape_and_cache", "concat_and_cache")),  # ..._cache_flash_kernel
    ("attention", ("flash", "fmha", "attention", "batchprefill", "_merge_segments")),
    ("all_reduce", ("nccl", "allreduce", "all_reduce", "cross_device_reduce")),
    ("moe", ("_moe_", "fused_moe", "moe_align", "topk_softmax")),
    ("rms_norm", ("rms_norm", "rmsnorm", "layernorm", "layer_norm")),
    ("gemm", ("matmul", "gemm", "nvjet", "xmma", "cublas", "cutlass", "_split_k_reduce")),
    ("activation", ("silu", "act_and_mul", "gelu")),
    ("rotary", ("rotary", "rope")),
    ("sampling", ("sampl", "top_k", "topk", "top_p", "softmax", "argmax", "sort", "gumbel",
                  "penalt", "_min_p", "_temperature", "logprob", "_ranks")),
)  # fmt: skip
OTHER = "other"


def category(kernel_name: str) -> str:
    name = kernel_name.lower()
    for label, needles in CATEGORIES:
        if any(n in name for n in needles):
            return label
    return OTHER


def by_category(kernels: dict[str, list]) -> dict[str, dict]:
    """{name: [device us, count]} -> {category: {"ms", "launches", "top": [(name, ms)]}}."""
    out: dict[str, dict] = {}
    for name, (us, count) in kernels.items():
        entry = out.setdefault(category(name), {"ms": 0.0, "launches": 0, "top": []})
        entry["ms"] += us / 1e3
        entry["launches"] += count
        entry["top"].append((name[:160], us / 1e3))
    for entry in out.values():
        entry["top"] = sorted(entry["top"], key=lambda t: -t[1])[:5]
    return out


def compare(runs: list[dict]) -> dict:
    """Per engine: kernel ms by category and total; for each engine but the default, the
    ratio to the default per category and each category's share of the gap."""
    engines = {}
    for run in runs:
        cats = by_category(run["kernels"])
        kernel_ms = sum(c["ms"] for c in cats.values())
        engines[run["backend"]] = {
            "wall_s": run["seconds"],
            "tokens": run["tokens"],
            "kernel_ms": kernel_ms,
            # Far below 1 with a busy GPU would mean kernels the profiler missed (e.g. inside
            # CUDA-graph replays); the rest is host time between steps.
            "kernel_share_of_wall": kernel_ms / (run["seconds"] * 1e3),
            "categories": cats,
            # GPU idle between the batch's first and last kernel (demo.idle_gaps): many short
            # gaps are launch overhead, a few long ones a stall (a JIT compile mid-batch).
            "idle": run.get("idle"),
        }
    base = engines.get("default")
    if base:
        for name, engine in engines.items():
            if name == "default":
                continue
            gap = engine["kernel_ms"] - base["kernel_ms"]
            for label in sorted(set(engine["categories"]) | set(base["categories"])):
                ours = engine["categories"].get(label, {}).get("ms", 0.0)
                theirs = base["categories"].get(label, {}).get("ms", 0.0)
                engine.setdefault("vs_default", {})[label] = {
                    "ratio_vs_default": ours / theirs if theirs else None,
                    "gap_share": (ours - theirs) / gap if gap else None,
                }
    return engines


def run(args) -> dict:
    from det_backend.demo import run_backends, vocab_size, workload

    backends = [b for b in args.backends.split(",") if b]
    vocab = vocab_size(args.config)
    workloads = [workload(n, *WORKLOADS[n], 0, vocab) for n in parse_workloads(args.workloads)]
    result = run_backends(args.config, workloads, tuple(backends), profile=True, keep_going=True)
    return {
        **run_info(),
        "config": args.config,
        "command": " ".join(["python", *sys.argv]),
        "failed": result.get("failed", {}),
        "workloads": {
            name: {**{k: v for k, v in w.items() if k != "runs"}, "engines": compare(w["runs"])}
            for name, w in result["workloads"].items()
        },
    }


def plot(data: dict):
    plt = pyplot()
    names = list(data["workloads"])
    fig, axes = plt.subplots(1, len(names), figsize=(7 * len(names), 4.5), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        engines = data["workloads"][name]["engines"]
        labels = sorted({c for e in engines.values() for c in e["categories"]})
        bottom = {engine: 0.0 for engine in engines}
        for label in labels:
            values = [engines[e]["categories"].get(label, {}).get("ms", 0.0) for e in engines]
            ax.bar(list(engines), values, bottom=[bottom[e] for e in engines], label=label)
            for e, v in zip(engines, values, strict=True):
                bottom[e] += v
        ax.set_ylabel("GPU kernel time (ms)")
        ax.set_title(f"{name}, {data['config']}, {data['gpu']}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _summary(result: dict) -> str:
    lines = []
    for name, w in result["workloads"].items():
        for engine, e in w["engines"].items():
            cats = ", ".join(
                f"{label} {c['ms']:.0f}" for label, c in sorted(e["categories"].items())
            )
            lines.append(f"{name} {engine}: kernels {e['kernel_ms']:.0f} ms ({cats})")
            idle = e.get("idle")
            if idle:
                long_gaps = idle["idle_ms_in_gaps_of_at_least_us"].get("100000", 0.0)
                lines.append(
                    f"{name} {engine}: GPU idle {idle['idle_ms']:.0f} ms, {long_gaps:.0f} ms of it"
                    f" in gaps >= 100 ms; longest {idle['longest'][:2]}"
                )
    return "\n".join(lines)


def _add_args(parser) -> None:
    parser.add_argument("--config", default="llama-3-8b")
    parser.add_argument("--backends", default="default,det")
    parser.add_argument("--workloads", default="prefill_mix", help=f"subset of {list(WORKLOADS)}")


if __name__ == "__main__":
    main(__doc__, "profile_e2e.json", run, plot, _summary, _add_args)
