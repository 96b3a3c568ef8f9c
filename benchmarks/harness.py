"""What every benchmark shares: the timer, the bandwidth ceiling, the run's identity, and the
JSON it writes. Baselines and ours always run in one process on the same inputs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path


def bench(fn) -> float:
    """Median milliseconds of fn over repeated CUDA-event-timed runs, after warm-up."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second: the memory ceiling."""
    import torch

    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / (bench(lambda: dst.copy_(src)) * 1e-3)


def geomean(values: list[float]) -> float:
    return math.exp(sum(map(math.log, values)) / len(values))


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
