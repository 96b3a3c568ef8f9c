"""`python -m det_backend.tp_invariance`: one checkpoint served at tensor_parallel_size 1 and 2,
with TP-invariant mode (DET_BACKEND_TP_INVARIANT=1) and without; prints, per mode, how many
prompts gave bit-identical tokens and logprobs at both sizes. Needs 2 CUDA GPUs.

The checkpoint is written once by transformers (det_backend.matrix's writer: normal weights,
std 0.02, norm weights 1) and loaded from safetensors by every engine, so both TP sizes hold
the same weights (tp_demo draws weights per rank, which cannot be compared across sizes).
Every engine runs our backend (`--attention-backend CUSTOM`) in its own process; the two
TP = 1 engines run side by side, one per GPU, then each TP = 2 engine alone: three phases of
engine starts. `--eager` (enforce_eager=True) skips torch.compile and CUDA graphs to start
faster; the kernels and collectives are the same, launched one by one. Greedy, logprobs=1,
all prompts in one batch. With the mode on, every prompt must match; without it (the
control), row-parallel partials are rounded per rank and summed by NCCL, and prompts differ.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import demo

MODES = {"tp_invariant": "1", "plain": "0"}


def engine_worker(args: argparse.Namespace) -> None:
    """One engine at --tensor-parallel-size on the checkpoint, the plan's prompts in one batch."""
    import torch
    import vllm
    from vllm import LLM, SamplingParams, TokensPrompt

    plan = json.loads(Path(args.plan).read_text())
    llm = LLM(
        model=args.model_dir,
        tensor_parallel_size=args.tensor_parallel_size,
        attention_backend="CUSTOM",
        skip_tokenizer_init=True,
        dtype="bfloat16",
        max_model_len=plan["max_model_len"],
        max_num_seqs=plan["max_num_seqs"],
        enforce_eager=plan["eager"],
        gpu_memory_utilization=0.8,
        seed=0,
    )
    params = SamplingParams(
        temperature=0.0,
        max_tokens=plan["max_tokens"],
        logprobs=1,
        ignore_eos=True,
        detokenize=False,
    )
    inputs = [TokensPrompt(prompt_token_ids=p) for p in plan["prompts"]]
    start = time.perf_counter()
    outputs = demo._outputs(llm.generate(inputs, params, use_tqdm=False))
    seconds = time.perf_counter() - start
    result = {
        "tensor_parallel_size": args.tensor_parallel_size,
        "tp_invariant": os.environ.get("DET_BACKEND_TP_INVARIANT"),
        "outputs": outputs,
        "tok_s": sum(len(o["tokens"]) for o in outputs) / seconds,
        "gpu": torch.cuda.get_device_name(),
        "vllm": vllm.__version__,
    }
    Path(args.out).write_text(json.dumps(result))


def _start(mode: str, tp: int, gpus: list[str], tmp: str, verbose: bool) -> subprocess.Popen:
    env = {
        **os.environ,
        "DET_BACKEND_TP_INVARIANT": MODES[mode],
        "DET_BACKEND_ATTENTION": "triton",
        "CUDA_VISIBLE_DEVICES": ",".join(gpus),
    }
    if not verbose:
        env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    cmd = [sys.executable, "-m", "det_backend.tp_invariance", "--engine-worker"]
    cmd += ["--tensor-parallel-size", str(tp), "--model-dir", str(Path(tmp, "model"))]
    cmd += ["--plan", str(Path(tmp, "plan.json")), "--out", str(Path(tmp, f"{mode}-tp{tp}.json"))]
    print(f"== {mode}, tensor_parallel_size={tp} on GPU {','.join(gpus)}: starting", flush=True)
    return subprocess.Popen(cmd, env=env, start_new_session=True)


def _wait(procs: list[subprocess.Popen]) -> None:
    """Waits for engines started side by side, together at most DET_ENGINE_TIMEOUT_S, then
    kills each one's process group (demo.run_engine_process says why)."""
    deadline = time.monotonic() + demo.engine_timeout_s()
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(0.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            codes.append(None)
    for p in procs:
        demo.kill_process_group(p)
    if any(c != 0 for c in codes):
        raise RuntimeError(
            f"det_backend.tp_invariance: an engine process failed or timed out "
            f"(exit codes {codes}; None: killed at DET_ENGINE_TIMEOUT_S)"
        )


def _visible_gpus() -> list[str]:
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return [g.strip() for g in visible.split(",") if g.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def compare_tp_sizes(
    config: str = "small",
    layers: int | None = None,
    num_prompts: int = 16,
    max_tokens: int = 64,
    eager: bool = False,
    modes: tuple[str, ...] = ("tp_invariant", "plain"),
    verbose: bool = False,
) -> dict:
    """Per mode: TP = 1 and TP = 2 on one checkpoint; `identical` counts prompts whose tokens
    and logprobs are bit-identical at both sizes."""
    gpus = _visible_gpus()[:2]
    if len(gpus) < 2:
        raise RuntimeError("det_backend.tp_invariance needs 2 CUDA GPUs")
    vocab = demo.vocab_size(config)
    min_len, max_len = 64, 512
    prompts = demo.make_prompts(num_prompts, min_len, max_len, vocab, seed=0)
    result = {
        "config": config,
        "num_prompts": num_prompts,
        "max_tokens": max_tokens,
        "prompt_lengths": [min_len, max_len],
        "eager": eager,
        "modes": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp, "model")
        model_dir.mkdir()
        if layers is None:
            text = Path(demo.write_model_dir(config, str(model_dir)), "config.json").read_text()
            layers = json.loads(text)["num_hidden_layers"]
        result["layers"] = layers
        write = [sys.executable, "-m", "det_backend.matrix", "--write-checkpoint", config]
        write += ["--layers", str(layers), "--dir", str(model_dir)]
        subprocess.run(write, check=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": gpus[0]})
        plan = {
            "prompts": prompts,
            "max_tokens": max_tokens,
            "max_model_len": max_len + max_tokens + 64,
            "max_num_seqs": num_prompts,
            "eager": eager,
        }
        Path(tmp, "plan.json").write_text(json.dumps(plan))
        # Phase 1: every mode's TP = 1 engine at once, one GPU each (at most two modes).
        _wait([_start(mode, 1, [gpus[i]], tmp, verbose) for i, mode in enumerate(modes)])
        for mode in modes:
            _wait([_start(mode, 2, gpus, tmp, verbose)])
        for mode in modes:
            runs = {t: json.loads(Path(tmp, f"{mode}-tp{t}.json").read_text()) for t in (1, 2)}
            div = [
                demo.first_divergence(a, b)
                for a, b in zip(runs[1]["outputs"], runs[2]["outputs"], strict=True)
            ]
            diverged = [d for d in div if d is not None]
            result["modes"][mode] = {
                "identical": div.count(None),
                "prompts": len(div),
                "first_divergence_min": min(diverged) if diverged else None,
                "tok_s": {f"tp{t}": runs[t]["tok_s"] for t in (1, 2)},
                "gpu": runs[1]["gpu"],
                "vllm": runs[1]["vllm"],
            }
    return result


def print_result(result: dict) -> None:
    print(
        f"{result['config']} ({result['layers']} layers), {result['num_prompts']} prompts, "
        f"{result['max_tokens']} new tokens, {'eager' if result['eager'] else 'compiled'}: "
        "TP=1 vs TP=2, tokens and logprobs bit for bit"
    )
    for mode, r in result["modes"].items():
        tok_s = ", ".join(f"{k} {v:.0f} tok/s" for k, v in r["tok_s"].items())
        print(
            f"  {mode:13s} identical {r['identical']}/{r['prompts']}, first divergence "
            f"{r['first_divergence_min']}, {tok_s} ({r['gpu']})"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m det_backend.tp_invariance",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", default="small", help=f"bundled config {sorted(demo.CONFIGS)}")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: all)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--eager", action="store_true", help="enforce_eager: no compile/graphs")
    parser.add_argument("--json", help="write the result here as JSON")
    parser.add_argument("--verbose", action="store_true", help="show vLLM's INFO logs")
    # Internal: one engine in this process.
    parser.add_argument("--engine-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tensor-parallel-size", type=int, help=argparse.SUPPRESS)
    for flag in ("--model-dir", "--plan", "--out"):
        parser.add_argument(flag, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.engine_worker:
        demo.run_engine_worker(engine_worker, args)
        return 0
    result = compare_tp_sizes(
        args.config, args.layers, args.prompts, args.max_tokens, args.eager, verbose=args.verbose
    )
    print_result(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    inv = result["modes"]["tp_invariant"]
    return 0 if inv["identical"] == inv["prompts"] else 1


if __name__ == "__main__":
    sys.exit(main())
