"""What every benchmark shares: the timer, the bandwidth ceiling, the run's identity, and the
JSON it writes. Baselines and ours always run in one process on the same inputs."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path


def bench(fn) -> float:
    """Median milliseconds of fn over repeated CUDA-event-timed runs, after warm-up."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def graphed(fn):
    """fn captured once in a CUDA graph, after an eager call that compiles what it launches;
    returns the replay, to time as vLLM runs full-graph decode (no host launch cost)."""
    import torch

    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second: the memory ceiling."""
    import torch

    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / (bench(lambda: dst.copy_(src)) * 1e-3)


def geomean(values: list[float]) -> float:
    return math.exp(sum(map(math.log, values)) / len(values))


def time_pair(
    ours, theirs, nbytes: int, bandwidth: float, name: str = "vllm", label: str | None = None
) -> dict:
    """Ours vs `name`, side by side: times, the ratio (theirs / ours, > 1: ours faster),
    ours in GB/s of `nbytes` moved, and the memory-bound floor at `bandwidth` bytes/s.
    With `label`, the point is also printed as a progress line."""
    p = {"ours_ms": bench(ours), f"{name}_ms": bench(theirs)}
    p[f"speedup_vs_{name}"] = p[f"{name}_ms"] / p["ours_ms"]
    p["ours_GBps"] = nbytes / (p["ours_ms"] * 1e-3) / 1e9
    p["floor_ms"] = nbytes / bandwidth * 1e3
    if label is not None:
        print(
            f"{label} ours {p['ours_ms']:.4f} ms  {name} {p[f'{name}_ms']:.4f}  "
            f"x{p[f'speedup_vs_{name}']:.2f}",
            flush=True,
        )
    return p


def speedup_summary(points: list[dict], bandwidth: float, name: str = "vllm") -> dict:
    """The JSON's head: run_info, the measured copy bandwidth, geomean and min of the ratio."""
    ratios = [p[f"speedup_vs_{name}"] for p in points]
    return {
        **run_info(),
        "copy_bandwidth_GBps": bandwidth / 1e9,
        f"geomean_speedup_vs_{name}": geomean(ratios),
        f"min_speedup_vs_{name}": min(ratios),
        "points": points,
    }


def speedup_line(result: dict, name: str = "vllm") -> str:
    """The one-line summary a benchmark prints after its JSON is written."""
    return (
        f"geomean speed-up vs {name} {result[f'geomean_speedup_vs_{name}']:.3f}, "
        f"min {result[f'min_speedup_vs_{name}']:.3f} on {result['gpu']}"
    )


def run_info() -> dict:
    import torch
    import triton
    import vllm

    try:
        sha = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                cwd=Path(__file__).parent,
            ).stdout.strip()
            or "unknown"
        )
    except OSError:
        sha = "unknown"
    return {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "vllm": vllm.__version__,
        "git_sha": sha,
        "command": " ".join(["python", *sys.argv]),
    }


def write_json(path: str | Path, result: dict) -> None:
    Path(path).write_text(json.dumps(result, indent=1))


def pyplot():
    """matplotlib's pyplot on a file backend (GPU hosts and CI have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def main(doc: str, default_out: str, run, plot, summary, add_args=None) -> None:
    """The command line every benchmark shares: `--out FILE` runs and writes JSON,
    `--plot FILE.json` draws FILE.png from a result. run(args) -> result; plot(result) ->
    a matplotlib figure; summary(result) -> the line printed last."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=default_out)
    parser.add_argument("--plot", metavar="JSON")
    if add_args is not None:
        add_args(parser)
    args = parser.parse_args()
    if args.plot:
        plot(json.loads(Path(args.plot).read_text())).savefig(
            Path(args.plot).with_suffix(".png"), dpi=110
        )
        return
    result = run(args)
    write_json(args.out, result)
    print(summary(result))
