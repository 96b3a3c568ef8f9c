"""End-to-end A/B throughput: offline `LLM.generate`, token-id prompts, realistic synthetic
weights, the same prompts for vLLM's default, `VLLM_BATCH_INVARIANT=1`, and det_backend.

    python benchmarks/ab_throughput.py --out ab_throughput.json [--config llama-3-8b]
    python benchmarks/ab_throughput.py --plot ab_throughput.json     # the PNG next to it

Workloads: 256 prompts of 64-512 tokens with 128 new tokens, and a decode-heavy one (64
prompts, 1024 new). Each engine first runs a warm-up batch of other prompts, so the timed
batch pays no JIT compile and misses the prefix cache like fresh traffic. identical_fraction:
det_backend's prompts run alone vs the same prompts inside the timed batch (a subset, for time).
"""

import argparse
import json
import sys
from pathlib import Path

from det_backend.demo import run_backends, vocab_size, workload

BACKENDS = ("default", "vllm_batch_invariant", "det")
LABELS = {
    "default": "vLLM default",
    "vllm_batch_invariant": "VLLM_BATCH_INVARIANT=1",
    "det": "det_backend",
}


def plot(data: dict, png: Path) -> None:
    """Tokens/s per backend, one group of bars per workload, ratio to the default on top."""
    from harness import pyplot

    plt = pyplot()
    names = list(data["workloads"])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(BACKENDS)
    for i, backend in enumerate(BACKENDS):
        key = "default_tok_s" if backend == "default" else f"{backend}_tok_s"
        values = [data["workloads"][n][key] for n in names]
        xs = [j + (i - 1) * width for j in range(len(names))]
        ax.bar(xs, values, width, label=LABELS[backend])
        for x, v, n in zip(xs, values, names, strict=True):
            ratio = v / data["workloads"][n]["default_tok_s"]
            ax.text(x, v, f"{ratio:.2f}x", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"end to end, {data['config']} shapes, {data['gpu']}, vLLM {data['vllm']}")
    top = max(w["default_tok_s"] for w in data["workloads"].values())
    ax.set_ylim(0, top * 1.3)
    ax.legend(loc="upper center", ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="llama-3-8b")
    parser.add_argument("--out", default="ab_throughput.json")
    parser.add_argument("--alone", type=int, default=16, help="det prompts also run alone")
    parser.add_argument("--plot", metavar="JSON", help="draw JSON's PNG next to it, run nothing")
    args = parser.parse_args()
    if args.plot:
        plot(json.loads(Path(args.plot).read_text()), Path(args.plot).with_suffix(".png"))
        return
    vocab = vocab_size(args.config)
    workloads = [
        workload("prefill_mix", 256, 128, args.alone, vocab),
        workload("decode_heavy", 64, 1024, max(1, args.alone // 8), vocab),
    ]
    result = run_backends(args.config, workloads, BACKENDS, alone_backends=("det",))
    summary = {"config": args.config, "command": " ".join(["python", *sys.argv]), "workloads": {}}
    for name, w in result["workloads"].items():
        runs = {r["backend"]: r for r in w["runs"]}
        det, default = runs["det"], runs["default"]
        summary["workloads"][name] = {
            **{k: w[k] for k in ("num_prompts", "max_tokens", "prompt_lengths")},
            "default_tok_s": default["tok_s"],
            "vllm_batch_invariant_tok_s": runs["vllm_batch_invariant"]["tok_s"],
            "det_tok_s": det["tok_s"],
            "det_vs_default": det["tok_s"] / default["tok_s"],
            "vllm_batch_invariant_vs_default": runs["vllm_batch_invariant"]["tok_s"]
            / default["tok_s"],
            "identical_fraction": det["identical_alone_vs_batch"] / det["prompts_alone"],
            "identical_alone": f"{det['identical_alone_vs_batch']}/{det['prompts_alone']}",
            "det_batch_repeat_identical": f"{det['identical_batch_repeat']}/{det['prompts_batch']}",
            "runs": w["runs"],
        }
        summary["gpu"], summary["vllm"] = det["gpu"], det["vllm"]
        print(
            f"{name}: default {default['tok_s']:.0f} tok/s, vLLM batch-invariant "
            f"{runs['vllm_batch_invariant']['tok_s']:.0f}, det {det['tok_s']:.0f} "
            f"({det['tok_s'] / default['tok_s']:.2f}x), det alone = batch "
            f"{summary['workloads'][name]['identical_alone']}"
        )
    # The headline fields: the first (prefill_mix) workload.
    head = summary["workloads"][workloads[0]["name"]]
    for key in ("default_tok_s", "vllm_batch_invariant_tok_s", "det_tok_s", "identical_fraction"):
        summary[key] = head[key]
    Path(args.out).write_text(json.dumps(summary, indent=2))
    plot(summary, Path(args.out).with_suffix(".png"))


if __name__ == "__main__":
    main()
