"""`python -m det_backend.tp_demo`: det_backend with tensor parallelism (default 2 GPUs): the
same prompts alone and inside one batch, the batch twice, and the whole engine started again
in a fresh process; prints how many prompts came out bit-identical, beside vLLM's default.

Each engine is det_backend.demo's engine worker in its own process with tensor_parallel_size
bound. Weights are drawn per rank (demo.reinit_weights runs on every worker's shard), so the
model differs from the one-GPU demo's: this checks one fixed TP size, not TP=1 against TP=2
(see det_backend/TP_INVARIANCE.md).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
from pathlib import Path

from . import demo


def engine_worker(args: argparse.Namespace) -> None:
    import vllm

    # demo.engine_worker builds `LLM(**kwargs)` at vLLM's default TP of 1; binding the size
    # here reuses its whole workload loop (warm-up, batch, batch again, alone) unchanged.
    vllm.LLM = functools.partial(vllm.LLM, tensor_parallel_size=args.tensor_parallel_size)
    demo.engine_worker(args)


def _run_engine(backend: str, tp: int, model_dir: str, plan: Path, out: Path, verbose: bool):
    env = {**os.environ, **demo.BACKENDS[backend]["env"]}
    if not verbose:
        env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    cmd = [sys.executable, "-m", "det_backend.tp_demo", "--engine-worker", backend]
    cmd += ["--tensor-parallel-size", str(tp), "--model-dir", model_dir]
    cmd += ["--plan", str(plan), "--out", str(out)]
    print(f"== {backend}, tensor_parallel_size={tp}: starting an engine", flush=True)
    demo.run_engine_process(cmd, env, f"the {backend} engine at TP={tp}")
    return json.loads(out.read_text())["main"]


def allreduce_mode_of(backend: str, tensor_parallel_size: int) -> str | None:
    """The all-reduce mode a det engine of the demo runs at this size (its own
    DET_BACKEND_TP_ALLREDUCE, else this process's, else the size's default); None for an
    engine that is not ours. Recorded with each run, so a result says which mode it measured."""
    from .patches.tensor_parallel import ALLREDUCE_ENV, allreduce_mode

    if demo.BACKENDS[backend]["attention_backend"] != "CUSTOM":
        return None
    return demo.BACKENDS[backend]["env"].get(ALLREDUCE_ENV) or allreduce_mode(tensor_parallel_size)


def compare_tp(
    config: str = "small",
    tensor_parallel_size: int = 2,
    num_prompts: int = 32,
    max_tokens: int = 64,
    num_alone: int | None = None,
    runs: int = 2,
    backends: tuple[str, ...] = ("det", "default"),
    verbose: bool = False,
) -> dict:
    """det_backend in `runs` fresh engine processes, vLLM's default once (the control that
    shows the test can fail), last: on two H200s vLLM's default engine hung at TP=2, and a
    call cut short should still have our runs. `identical_across_runs[backend]`, for a
    backend run more than once: prompts whose batched output is bit-identical in every run.
    An engine that fails is named in result["failed"] (backend#run: error); the rest run."""
    num_alone = num_prompts if num_alone is None else num_alone
    w = demo.workload("main", num_prompts, max_tokens, num_alone, demo.vocab_size(config))
    result = {
        "config": config,
        "tensor_parallel_size": tensor_parallel_size,
        "num_prompts": num_prompts,
        "max_tokens": max_tokens,
        "prompt_lengths": w["prompt_lengths"],
        # On: every engine talked over NCCL alone (demo.NCCL_ONLY says why).
        "nccl_only": demo.nccl_only(),
        "custom_all_reduce_kept": demo.custom_all_reduce_kept(),
        "runs": [],
        "identical_across_runs": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = demo.write_model_dir(config, tmp)
        plan = Path(tmp, "plan.json")
        max_model_len = w["prompt_lengths"][1] + max_tokens + 64
        plan.write_text(json.dumps({"max_model_len": max_model_len, "workloads": [w]}))
        for backend in backends:
            batches = []
            for i in range(runs if backend == "det" else 1):
                out = Path(tmp, f"{backend}-{i}.json")
                try:
                    run = _run_engine(backend, tensor_parallel_size, model_dir, plan, out, verbose)
                except RuntimeError as e:
                    # Kept, not raised: the runs before it (ours come first) still count.
                    print(f"== {backend}: {e}", flush=True)
                    result.setdefault("failed", {})[f"{backend}#{i}"] = str(e)
                    break
                result["runs"].append(
                    {
                        **demo.summarize(run),
                        "backend": f"{backend}#{i}",
                        "tp_allreduce_mode": allreduce_mode_of(backend, tensor_parallel_size),
                    }
                )
                batches.append(run["batch"])
            if len(batches) > 1:
                result["identical_across_runs"][backend] = sum(
                    all(demo.first_divergence(b[p], batches[0][p]) is None for b in batches)
                    for p in range(num_prompts)
                )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m det_backend.tp_demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", default="small", help=f"bundled config {sorted(demo.CONFIGS)}")
    parser.add_argument("--tensor-parallel-size", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--num-alone", type=int, default=None)
    parser.add_argument("--runs", type=int, default=2, help="fresh det_backend engines")
    parser.add_argument("--json", help="write the result here as JSON")
    parser.add_argument("--verbose", action="store_true", help="show vLLM's INFO logs")
    # Internal: one engine in this process.
    for flag in ("--engine-worker", "--model-dir", "--plan", "--out"):
        parser.add_argument(flag, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.engine_worker:
        demo.run_engine_worker(engine_worker, args)
        return 0

    import torch

    if torch.cuda.device_count() < args.tensor_parallel_size:
        print(
            f"tensor_parallel_size={args.tensor_parallel_size} needs as many CUDA GPUs; "
            f"this machine has {torch.cuda.device_count()}."
        )
        return 1
    result = compare_tp(
        args.config,
        args.tensor_parallel_size,
        args.prompts,
        args.max_tokens,
        args.num_alone,
        args.runs,
        verbose=args.verbose,
    )
    demo.print_table(result)
    for backend, same in result["identical_across_runs"].items():
        print(f"{backend}: {same}/{result['num_prompts']} prompts identical in every run")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    for run, error in result.get("failed", {}).items():
        print(f"{run} failed: {error}")
    return 1 if result.get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
