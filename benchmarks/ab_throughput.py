"""End-to-end A/B throughput: offline `LLM.generate`, token-id prompts, realistic synthetic
weights, the same prompts for vLLM's default, `VLLM_BATCH_INVARIANT=1`, and det_backend.

    python benchmarks/ab_throughput.py --out ab_throughput.json [--config llama-3-8b]
    python benchmarks/ab_throughput.py --plot ab_throughput.json     # the PNG next to it
    python benchmarks/ab_throughput.py --backends default,det,det_fa3 --out ab_variants.json

Workloads: 256 prompts of 64-512 tokens with 128 new tokens, and a decode-heavy one (64
prompts, 1024 new). Each engine first runs a warm-up batch of other prompts, so the timed
batch pays no JIT compile and misses the prefix cache like fresh traffic. identical_fraction:
det_backend's prompts run alone vs the same prompts inside the timed batch (a subset, for time).
`--backends` picks the engines (det_backend.demo.BACKENDS; `default` always runs, as the
baseline): `det_fa3` is det_backend with DET_BACKEND_ATTENTION=fa3. Each det backend's fields
are prefixed with its name (`det_tok_s`, `det_fa3_tok_s`, ...).
"""

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from det_backend.demo import BACKENDS as ENGINES
from det_backend.demo import run_backends, vocab_size, workload

# det_unset: det_backend as `vllm serve --attention-backend CUSTOM` starts it (the attention
# variant picked at engine build: fa3 on Hopper for Llama). `det` pins the triton variant.
BACKENDS = ("default", "vllm_batch_invariant", "det_unset")
LABELS = {
    "default": "vLLM default",
    "vllm_batch_invariant": "VLLM_BATCH_INVARIANT=1",
    "det": "det_backend, triton variant",
    "det_unset": "det_backend, variant unset (picked at engine build)",
    "det_fa3": "det_backend, fa3 variant",
    "det_flashinfer": "det_backend, flashinfer variant",
    "det_nccl": "det_backend, pinned NCCL all-reduce",
    "det_two_rank": "det_backend, two-rank all-reduce",
}


# name -> (prompts, new tokens per prompt); prompts of 64-512 tokens (demo.workload).
WORKLOADS = {"prefill_mix": (256, 128), "decode_heavy": (64, 1024)}


def parse_workloads(text: str) -> list[str]:
    """--workloads: a comma-separated subset of WORKLOADS; SystemExit names an unknown one."""
    names = [n for n in text.split(",") if n]
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown or not names:
        raise SystemExit(f"--workloads: unknown {unknown or names}; choose from {list(WORKLOADS)}")
    return names


def parse_backends(text: str) -> tuple[str, ...]:
    """`default` first (the baseline every ratio divides by), then the rest in the given order."""
    names = [b for b in text.split(",") if b]
    unknown = [b for b in names if b not in ENGINES]
    if unknown:
        raise SystemExit(f"--backends: unknown {unknown}; choose from {sorted(ENGINES)}")
    return ("default", *dict.fromkeys(b for b in names if b != "default"))


def plot(data: dict, png: Path) -> None:
    """Tokens/s per backend, one group of bars per workload, ratio to the default on top."""
    from harness import pyplot

    plt = pyplot()
    names = list(data["workloads"])
    backends = data.get("backends", BACKENDS)  # results from before --backends: the three
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(backends)
    for i, backend in enumerate(backends):
        key = f"{backend}_tok_s"
        values = [data["workloads"][n][key] for n in names]
        xs = [j + (i - (len(backends) - 1) / 2) * width for j in range(len(names))]
        ax.bar(xs, values, width, label=LABELS.get(backend, backend))
        for x, v, n in zip(xs, values, names, strict=True):
            ratio = v / data["workloads"][n]["default_tok_s"]
            ax.text(x, v, f"{ratio:.2f}x", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("output tokens/s")
    tp = data.get("tensor_parallel_size", 1)
    where = data["gpu"] if tp == 1 else f"{tp} x {data['gpu']}, TP={tp}"
    ax.set_title(f"end to end, {data['config']} shapes, {where}, vLLM {data['vllm']}")
    top = max(w["default_tok_s"] for w in data["workloads"].values())
    ax.set_ylim(0, top * 1.3)
    ax.legend(loc="upper center", ncol=len(backends), fontsize=8)
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
    parser.add_argument(
        "--backends", default=",".join(BACKENDS), help="comma-separated engines (default first)"
    )
    parser.add_argument(
        "--tensor-parallel-size", type=int, default=1, help="GPUs per engine (issue 8: TP=2)"
    )
    parser.add_argument(
        "--workloads",
        default="prefill_mix,decode_heavy",
        help="comma-separated subset of prefill_mix,decode_heavy",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs per batch and engine (median)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="start every engine this many times, in turn (ratios: median over rounds)",
    )
    args = parser.parse_args()
    if args.repeats < 1 or args.rounds < 1:
        raise SystemExit("--repeats and --rounds must be >= 1")
    backends = parse_backends(args.backends)
    if args.plot:
        plot(json.loads(Path(args.plot).read_text()), Path(args.plot).with_suffix(".png"))
        return
    vocab = vocab_size(args.config)
    # Decode-heavy prompts each run 1024 tokens alone: fewer of them.
    alone = {"prefill_mix": args.alone, "decode_heavy": max(1, args.alone // 8)}
    workloads = [
        workload(n, *WORKLOADS[n], alone[n], vocab) for n in parse_workloads(args.workloads)
    ]
    dets = tuple(b for b in backends if b.startswith("det"))
    # At TP > 1 our first engine runs first, then the default, then the rest: on the lent
    # two-GPU hosts vLLM's default died at TP=2 (README, "Tensor parallelism"), and a call cut
    # short should still have ours and, if it ran, the ratio to the default.
    order = backends
    if args.tensor_parallel_size > 1 and dets:
        order = (dets[0], "default", *(b for b in backends[1:] if b != dets[0]))
    header = {
        "config": args.config,
        "command": " ".join(["python", *sys.argv]),
        "backends": list(backends),
        "tensor_parallel_size": args.tensor_parallel_size,
        # What the engines inherited that changes them (gpu_run.sh sets some at TP > 1).
        "env": {
            k: v
            for k, v in sorted(os.environ.items())
            if k.startswith(("VLLM_", "NCCL_", "DET_")) and k != "VLLM_LOGGING_LEVEL"
        },
    }

    def save(result: dict, final: bool = False) -> dict:
        # After every engine: a call cut at its time limit, or an engine that fails (vLLM's
        # default at TP=2 on the lent hosts), still leaves the engines that ran in --out.
        summary, lines = summarize_ab(
            header, result, backends, dets, [w["name"] for w in workloads]
        )
        Path(args.out).write_text(json.dumps(summary, indent=2))
        if final:
            print("\n".join(lines), flush=True)
        return summary

    header["repeats"], header["rounds"] = args.repeats, args.rounds
    done = []  # the rounds that ended; each engine's saves include them
    for _ in range(args.rounds):
        done.append(
            run_backends(
                args.config,
                workloads,
                order,
                alone_backends=dets,
                tensor_parallel_size=args.tensor_parallel_size,
                keep_going=True,
                on_backend_done=lambda partial: save(combine_rounds([*done, partial])),
                repeats=args.repeats,
            )
        )
    summary = save(combine_rounds(done), final=True)
    if summary.get("failed"):
        raise SystemExit(f"engines failed: {summary['failed']} (what ran is in {args.out})")
    plot(summary, Path(args.out).with_suffix(".png"))


def combine_rounds(results: list[dict]) -> dict:
    """run_backends' results of several rounds as one: every run tagged with its round, the
    failed engines of any round (named with it when there are several)."""
    combined = {"workloads": {}}
    for r, result in enumerate(results):
        for name, w in result.get("workloads", {}).items():
            entry = combined["workloads"].setdefault(name, {**w, "runs": []})
            entry["runs"] += [{**run, "round": r} for run in w["runs"]]
        for backend, error in result.get("failed", {}).items():
            key = backend if len(results) == 1 else f"{backend} (round {r})"
            combined.setdefault("failed", {})[key] = error
    return combined


def _tok_s(runs: list[dict]) -> float:
    """An engine's tok/s over its rounds: the median of each round's (itself a median)."""
    return statistics.median(r["tok_s"] for r in runs)


def summarize_ab(
    header: dict, result: dict, backends: tuple[str, ...], dets: tuple[str, ...], names: list
) -> tuple[dict, list[str]]:
    """The JSON of ab_throughput from run_backends' result so far: per workload each backend
    that ran (tok/s, and for det backends alone = batch and batch = batch), ratios to the
    default where it ran; `failed` names the engines that did not. Also one line per workload
    to print."""
    summary, lines = {**header, "workloads": {}}, []
    if result.get("failed"):
        summary["failed"] = result["failed"]
    for name, w in result["workloads"].items():
        # backend -> its runs, one per round that ran it (each run's tok_s: a median of repeats)
        runs: dict[str, list[dict]] = {}
        for r in w["runs"]:
            runs.setdefault(r["backend"], []).append(r)
        # round -> default's tok_s there: ratios pair each engine with the default of its round
        default_at = {r.get("round", 0): r["tok_s"] for r in runs.get("default", [])}
        entry = {k: w[k] for k in ("num_prompts", "max_tokens", "prompt_lengths")}
        line = [
            f"{name}: default " + (f"{_tok_s(runs['default']):.0f} tok/s" if default_at else "-")
        ]
        for b in (b for b in backends if b in runs):
            entry[f"{b}_tok_s"] = _tok_s(runs[b])
            entry[f"{b}_tok_s_runs"] = [
                t for r in runs[b] for t in r.get("tok_s_runs", [r["tok_s"]])
            ]
            if b == "default":
                continue
            ratios = [
                r["tok_s"] / default_at[r.get("round", 0)]
                for r in runs[b]
                if r.get("round", 0) in default_at
            ]
            if ratios:
                entry[f"{b}_vs_default"] = statistics.median(ratios)
                if len(ratios) > 1:
                    entry[f"{b}_vs_default_rounds"] = ratios
                line.append(f"{b} {entry[f'{b}_tok_s']:.0f} ({entry[f'{b}_vs_default']:.2f}x)")
            else:
                line.append(f"{b} {entry[f'{b}_tok_s']:.0f}")
        for b in (b for b in dets if b in runs):
            alone = sum(r["identical_alone_vs_batch"] for r in runs[b])
            prompts_alone = sum(r["prompts_alone"] for r in runs[b])
            repeat = sum(r["identical_batch_repeat"] for r in runs[b])
            prompts_batch = sum(r["prompts_batch"] for r in runs[b])
            # det's keys keep their first names (identical_fraction, ...); others get a prefix.
            pre = "" if b == "det" else f"{b}_"
            entry[f"{pre}identical_fraction"] = alone / prompts_alone
            entry[f"{pre}identical_alone"] = f"{alone}/{prompts_alone}"
            entry[f"{b}_batch_repeat_identical"] = f"{repeat}/{prompts_batch}"
            line.append(f"{b} alone = batch {entry[f'{pre}identical_alone']}")
        entry["runs"] = w["runs"]
        summary["workloads"][name] = entry
        summary["gpu"], summary["vllm"] = w["runs"][0]["gpu"], w["runs"][0]["vllm"]
        lines.append(", ".join(line))
    # The headline fields: the first (prefill_mix) workload; det's are those of the
    # engine users get (det_unset) where it ran, else the triton-pinned `det`.
    head = summary["workloads"].get(names[0], {})
    det = "det_unset" if "det_unset_tok_s" in head else "det"
    pre = "" if det == "det" else f"{det}_"
    fields = {
        "default_tok_s": "default_tok_s",
        "vllm_batch_invariant_tok_s": "vllm_batch_invariant_tok_s",
        "det_tok_s": f"{det}_tok_s",
        "identical_fraction": f"{pre}identical_fraction",
    }
    for key, source in fields.items():
        if source in head:
            summary[key] = head[source]
    if f"{det}_tok_s" in head:
        summary["det_engine"] = det
    return summary, lines


if __name__ == "__main__":
    main()
