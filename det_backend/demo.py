"""`python -m det_backend.demo`: the same prompts alone and inside one large batch, with vLLM's
default backend and with ours; prints how many prompts came out bit-identical.

On a CUDA GPU it builds a Llama-shaped model from a bundled config.json (no weights are
downloaded: vLLM's dummy loader, then weights re-drawn at a realistic scale, normal std 0.02
with norm weights 1, because vLLM's own dummy weights of +-1e-3 give near-flat logits that
hide nondeterminism). Each backend runs in its own process (one engine per process).
Without a GPU it runs the kernel-level part on the CPU under Triton's interpreter.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

CONFIGS = {
    "small": "llama-small.json",
    "llama-3-8b": "llama-3-8b.json",
    "qwen3-8b": "qwen3-8b.json",
    # MoE shapes at full widths, 4 decoder layers (enough to test; quick to start).
    "mixtral-8x7b-4l": "mixtral-8x7b-4l.json",
    "qwen3-30b-a3b-4l": "qwen3-30b-a3b-4l.json",
    # Mistral-7B-v0.1 widths, 4 layers, a 256-position sliding window: prompts of 64-512
    # tokens plus 128 new ones run past it, so vLLM frees blocks behind the window.
    "mistral-sw-4l": "mistral-sw-4l.json",
}
# name -> how its engine is made: attention backend, and environment for its process.
BACKENDS = {
    "default": {"attention_backend": None, "env": {}},
    "vllm_batch_invariant": {"attention_backend": None, "env": {"VLLM_BATCH_INVARIANT": "1"}},
    "det": {"attention_backend": "CUSTOM", "env": {"DET_BACKEND_ATTENTION": "triton"}},
    "det_fa3": {"attention_backend": "CUSTOM", "env": {"DET_BACKEND_ATTENTION": "fa3"}},
    "det_flashinfer": {
        "attention_backend": "CUSTOM",
        "env": {"DET_BACKEND_ATTENTION": "flashinfer"},
    },
    # The variable unset (None: removed from the engine's environment), as a user starts it:
    # det_backend picks the variant when the engine is built (variants.default_for); the run
    # records which.
    "det_unset": {"attention_backend": "CUSTOM", "env": {"DET_BACKEND_ATTENTION": None}},
    # The two all-reduce modes of patches/tensor_parallel.py by name, to compare at TP=2 (where
    # "det" runs the default, two-rank): NCCL pinned (any TP size), and, TP=2 only, vLLM's
    # custom all-reduce with unpinned NCCL.
    "det_nccl": {
        "attention_backend": "CUSTOM",
        "env": {"DET_BACKEND_ATTENTION": "triton", "DET_BACKEND_TP_ALLREDUCE": "nccl"},
    },
    "det_two_rank": {
        "attention_backend": "CUSTOM",
        "env": {"DET_BACKEND_ATTENTION": "triton", "DET_BACKEND_TP_ALLREDUCE": "two-rank"},
    },
}
WEIGHT_STD = 0.02
WEIGHT_SEED = 1234


# An engine process that outlives this (seconds): DET_ENGINE_TIMEOUT_S. An engine whose
# worker died can leave the parent waiting forever (seen on two H200s: a TP=2 worker crashed
# in CUDA-graph capture and the benchmark then sat idle for the rest of its call).
ENGINE_TIMEOUT_S = 1500.0


def engine_timeout_s() -> float:
    return float(os.environ.get("DET_ENGINE_TIMEOUT_S", ENGINE_TIMEOUT_S))


def kill_process_group(proc: subprocess.Popen) -> None:
    """Kills the session `proc` leads (started with start_new_session=True): the engine and
    any worker it left behind, so none keeps a GPU for the next engine."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def run_engine_process(cmd: list[str], env: dict, what: str) -> None:
    """Runs one engine process in a session of its own and waits at most DET_ENGINE_TIMEOUT_S;
    then (success, failure or timeout) kills its process group. RuntimeError names `what`."""
    timeout = engine_timeout_s()
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        kill_process_group(proc)
    if code is None:
        raise RuntimeError(f"det_backend: {what} did not finish in {timeout:.0f} s (killed)")
    if code != 0:
        raise RuntimeError(f"det_backend: {what} failed with exit code {code}")


def run_engine_worker(worker, args: argparse.Namespace) -> None:
    """The engine process's body. On any error: traceback, then os._exit(1). A plain raise
    let the process hang at exit behind vLLM's dead workers (two H100s, 2026-11-26: the engine
    core failed at start and the process waited out DET_ENGINE_TIMEOUT_S)."""
    try:
        worker(args)
    except BaseException:
        import traceback

        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


def write_model_dir(config: str, directory: str) -> str:
    """A model folder holding only config.json: a bundled name or a path to a config.json."""
    if config in CONFIGS:
        text = resources.files("det_backend.configs").joinpath(CONFIGS[config]).read_text()
    else:
        text = Path(config).read_text()
    Path(directory, "config.json").write_text(text)
    return directory


def make_prompts(n: int, min_len: int, max_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    # Ids from 100 up avoid special tokens of real vocabularies; any id works for random weights.
    return [
        [rng.randrange(100, vocab_size) for _ in range(rng.randint(min_len, max_len))]
        for _ in range(n)
    ]


# "1": every engine of these demos and benchmarks (and the serve matrix's servers) talks
# over NCCL alone at TP > 1: vLLM's custom all-reduce off, and FlashInfer's all-reduce +
# RMSNorm fusion pass off (on by default at TP > 1 on Hopper with FlashInfer, vLLM
# config/vllm.py:131). Why: on the lent two-GPU hosts vLLM's default engine at TP=2 died in its
# first compiled forward (profile run) with an illegal memory access, three times: two H200s
# (with VLLM_SKIP_P2P_CHECK=0 too) and two H100s with the custom all-reduce already off
# (2026-11-26). Our pinned engines ran on the same hosts; of what they turn off, that pass and
# the NCCL pins are what was left. The pass's workspace is FlashInfer's "mnnvl" by default
# (device_communicators/flashinfer_all_reduce.py:_resolve_fi_ar_backend), which needs NVLink
# multicast (flashinfer/comm/mnnvl.py calls cuMulticastCreate), which these hosts keep off and
# forbid (the device library's KINDS.md: it can take the shared GPUs out of service); else its
# "trtllm" fallback over CUDA-IPC peer buffers. The likely cause, not yet confirmed, and reason
# enough not to run that pass there. The default is then "vLLM default, NCCL only"; results
# record the setting. gpu_run.sh sets it at TP > 1, always.
# KEEP_CUSTOM_AR=1 with it keeps vLLM's custom all-reduce (CUDA IPC over NVLink, no multicast),
# to measure vLLM's default as it is and det_two_rank's one-shot path on such a host; the
# fusion pass stays off. No evidence points at the custom all-reduce: the default died with
# and without it, the pass on each time.
NCCL_ONLY = "DET_DEMO_NCCL_ONLY"
KEEP_CUSTOM_AR = "DET_DEMO_KEEP_CUSTOM_ALL_REDUCE"


def nccl_only() -> bool:
    return os.environ.get(NCCL_ONLY) == "1"


def custom_all_reduce_kept() -> bool:
    return os.environ.get(KEEP_CUSTOM_AR) == "1"


def nccl_only_engine_kwargs() -> dict:
    """What NCCL_ONLY adds to an engine's LLM(...) arguments."""
    kwargs: dict = {"compilation_config": {"pass_config": {"fuse_allreduce_rms": False}}}
    if not custom_all_reduce_kept():
        kwargs["disable_custom_all_reduce"] = True
    return kwargs


def nccl_only_serve_args() -> list[str]:
    """nccl_only_engine_kwargs() as `vllm serve` flags."""
    kwargs = nccl_only_engine_kwargs()
    flags = ["--compilation-config", json.dumps(kwargs["compilation_config"])]
    return (
        ["--disable-custom-all-reduce"] if "disable_custom_all_reduce" in kwargs else []
    ) + flags


def reinit_weights(model) -> None:
    """Realistic-scale synthetic weights, identical in every process that calls this."""
    import torch

    device = next(model.parameters()).device
    gen = torch.Generator(device=device)
    gen.manual_seed(WEIGHT_SEED)
    for name, param in sorted(model.named_parameters()):
        if "norm" in name:
            param.data.fill_(1.0)
        else:
            param.data.normal_(0.0, WEIGHT_STD, generator=gen)


def _outputs(request_outputs) -> list[dict]:
    result = []
    for ro in request_outputs:
        out = ro.outputs[0]
        tokens = list(out.token_ids)
        logprobs = [step[t].logprob for step, t in zip(out.logprobs, tokens, strict=True)]
        result.append({"tokens": tokens, "logprobs": logprobs})
    return result


def sampling_fields(sampling: dict, index: int | None) -> dict:
    """SamplingParams fields of prompt `index` (None: a warm-up prompt, unseeded) from a
    workload's sampling dict as it comes back from JSON."""
    fields = {k: v for k, v in sampling.items() if k != "seed"}
    # Seeded sampling: each prompt its own seed, the same alone and in the batch.
    fields["seed"] = None if index is None or "seed" not in sampling else sampling["seed"] + index
    if "logit_bias" in fields:  # token ids came through JSON as strings
        fields["logit_bias"] = {int(t): b for t, b in fields["logit_bias"].items()}
    return fields


def engine_worker(args: argparse.Namespace) -> None:
    """One engine, one backend, every workload of the plan. Per workload: a warm-up batch of
    other prompts (pays Triton's JIT compiles), the timed batch (prompts not yet in the prefix
    cache), the same batch again (served from the prefix cache), then prompts alone."""
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # for apply_model
    import torch
    import vllm
    from vllm import LLM, SamplingParams, TokensPrompt

    from det_backend.variants import requested as requested_variant

    plan = json.loads(Path(args.plan).read_text())
    kwargs = dict(
        model=args.model_dir,
        load_format="dummy",
        skip_tokenizer_init=True,
        dtype="bfloat16",
        max_model_len=plan["max_model_len"],
        max_num_seqs=256,
        gpu_memory_utilization=0.85,
        seed=0,
        # Every Triton JIT compile after warm-up logged, not only each kernel's first: a compile
        # inside a timed batch stalls the GPU for a second (one suspect of the triton variant's
        # idle time on an H100, README "Performance"), and the log then shows it in place.
        jit_monitor_verbose=True,
    )
    if plan.get("tensor_parallel_size", 1) > 1:
        kwargs.update(tensor_parallel_size=plan["tensor_parallel_size"])
    if plan.get("num_gpu_blocks_override"):
        # Few KV blocks: a batch outgrows the cache and vLLM preempts requests (frees their
        # blocks, recomputes them later); the stats count the preemptions.
        kwargs.update(num_gpu_blocks_override=plan["num_gpu_blocks_override"])
        kwargs.update(disable_log_stats=False)
    if BACKENDS[args.engine_worker]["attention_backend"]:
        kwargs["attention_backend"] = BACKENDS[args.engine_worker]["attention_backend"]
    if nccl_only():
        kwargs.update(nccl_only_engine_kwargs())
    llm = LLM(**kwargs)
    # By module name: run as `python -m det_backend.demo`, this file's reinit_weights is
    # __main__.reinit_weights, which vLLM's spawned TP workers (another __main__) cannot
    # unpickle; the imported module's function pickles as det_backend.demo.reinit_weights.
    from det_backend.demo import reinit_weights as reinit

    llm.apply_model(reinit)
    tag = f"[{args.engine_worker}]"
    results = {}
    for w in plan["workloads"]:
        sampling = w.get("sampling") or {"temperature": 0.0}

        def params_for(index: int | None, sampling=sampling, w=w) -> SamplingParams:
            return SamplingParams(
                **sampling_fields(sampling, index),
                max_tokens=w["max_tokens"],
                logprobs=1,
                ignore_eos=True,
                detokenize=False,
            )

        params = [params_for(i) for i in range(len(w["prompts"]))]
        inputs = [TokensPrompt(prompt_token_ids=p) for p in w["prompts"]]
        print(f"{tag} {w['name']}: warm-up batch", flush=True)
        llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in w["warmup_prompts"]], params_for(None)
        )
        if plan.get("profile"):
            print(f"{tag} {w['name']}: batch of {len(inputs)} prompts (profiled)", flush=True)
            results[w["name"]] = {
                "backend": args.engine_worker,
                "profile": profiled_generate(llm, inputs, params),
                "gpu": torch.cuda.get_device_name(),
                "vllm": vllm.__version__,
            }
            continue
        print(f"{tag} {w['name']}: batch of {len(inputs)} prompts (timed)", flush=True)
        start = time.perf_counter()
        batch = _outputs(llm.generate(inputs, params))
        seconds = [time.perf_counter() - start]
        print(f"{tag} {w['name']}: the same batch again", flush=True)
        batch2 = _outputs(llm.generate(inputs, params, use_tqdm=False))
        # More timed runs of the batch, each after emptying the prefix cache so that it misses
        # like the first: one run's time moved by 10% between calls on one H100 (README,
        # "Performance"), so tok_s is the median of plan["repeats"] runs.
        for i in range(1, plan.get("repeats", 1)):
            print(f"{tag} {w['name']}: timed run {i + 1}/{plan['repeats']}", flush=True)
            if not llm.reset_prefix_cache():
                raise RuntimeError("det_backend: vLLM did not empty its prefix cache")
            start = time.perf_counter()
            llm.generate(inputs, params, use_tqdm=False)
            seconds.append(time.perf_counter() - start)
        tokens = sum(len(o["tokens"]) for o in batch)
        alone = []
        for i, p in enumerate(inputs[: w["num_alone"]]):
            print(f"\r{tag} prompts alone: {i + 1}/{w['num_alone']}", end="", flush=True)
            alone += _outputs(llm.generate([p], params[i], use_tqdm=False))
        print(flush=True)
        results[w["name"]] = {
            "backend": args.engine_worker,
            "tok_s": statistics.median(tokens / t for t in seconds),
            "tok_s_runs": [tokens / t for t in seconds],
            "batch_seconds": statistics.median(seconds),
            "batch": batch,
            "batch2": batch2,
            "alone": alone,
            # Ours: the variant the engine ran (set by the engine build when it was unset).
            "attention_variant": requested_variant(),
            "gpu": torch.cuda.get_device_name(),
            "vllm": vllm.__version__,
            "preemptions": _preemptions(llm) if plan.get("num_gpu_blocks_override") else None,
        }
    Path(args.out).write_text(json.dumps(results))


def profiled_generate(llm, inputs, params) -> dict:
    """llm.generate under torch.profiler (CUDA activity): every kernel's name, total device
    time (us) and launch count, with the batch's wall time and output tokens. The engine must
    run its model in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, TP=1: run_backends'
    profile=True sets it), or the profiler sees no kernel. CUPTI reports the kernels of CUDA-
    graph replays too (not yet seen on our host: profile_e2e's kernel_share_of_wall would
    show kernels missed)."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        outputs = _outputs(llm.generate(inputs, params, use_tqdm=False))
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    kernels = {
        e.key: [e.device_time_total, e.count]
        for e in prof.key_averages()
        if e.device_type == DeviceType.CUDA
    }
    spans = [
        (e.time_range.start, e.time_range.end, e.name)
        for e in prof.events()
        if e.device_type == DeviceType.CUDA
    ]
    if not kernels:
        raise RuntimeError(
            "det_backend: torch.profiler recorded no CUDA kernel (no CUPTI, or the model ran "
            "in another process: VLLM_ENABLE_V1_MULTIPROCESSING=0 and TP=1 are needed)"
        )
    return {
        "seconds": seconds,
        "tokens": sum(len(o["tokens"]) for o in outputs),
        "kernels": kernels,
        "idle": idle_gaps(spans),
    }


# Gaps between GPU work worth naming: above a step's launch overhead, up to a JIT compile.
IDLE_BUCKETS_US = (100, 1_000, 100_000)


def idle_gaps(spans: list[tuple[float, float, str]], top: int = 8) -> dict:
    """Where the GPU sat idle between its first and last kernel: spans are (start us, end us,
    name) of GPU work (kernels, copies), in any order and overlapping. Returns the idle time,
    how much of it came in gaps of at least each IDLE_BUCKETS_US size (spread thin: host
    launch overhead; in a few long gaps: a stall such as a JIT compile), and the longest gaps
    with the work before and after each (what the host was about to launch)."""
    if not spans:
        return {"busy_ms": 0.0, "idle_ms": 0.0, "idle_ms_in_gaps_of_at_least_us": {}, "longest": []}
    spans = sorted(spans)
    gaps, busy = [], 0.0
    start, end, before = spans[0]
    for s, e, name in spans[1:]:
        if s > end:
            gaps.append((s - end, before, name))
            busy += end - start
            start = s
        if e > end:
            end, before = e, name
    busy += end - start
    return {
        "busy_ms": busy / 1e3,
        "idle_ms": sum(g for g, _, _ in gaps) / 1e3,
        "idle_ms_in_gaps_of_at_least_us": {
            str(b): sum(g for g, _, _ in gaps if g >= b) / 1e3 for b in IDLE_BUCKETS_US
        },
        "longest": [
            [round(g / 1e3, 3), a[:120], b[:120]] for g, a, b in sorted(gaps, reverse=True)[:top]
        ],
    }


def _preemptions(llm) -> int:
    """vLLM's cumulative preemption count in this engine (its stats must be on)."""
    return sum(
        int(m.value)
        for m in llm.get_metrics()
        if m.name in ("vllm:num_preemptions", "vllm:num_preemptions_total")
    )


def first_divergence(a: dict, b: dict) -> int | None:
    """First step where tokens or logprobs differ; None when bit-identical."""
    for i, (ta, tb, la, lb) in enumerate(
        zip(a["tokens"], b["tokens"], a["logprobs"], b["logprobs"], strict=False)
    ):
        if ta != tb or la != lb:
            return i
    return None if len(a["tokens"]) == len(b["tokens"]) else min(len(a["tokens"]), len(b["tokens"]))


def summarize(run: dict) -> dict:
    alone_div = [first_divergence(a, b) for a, b in zip(run["alone"], run["batch"], strict=False)]
    repeat_div = [first_divergence(a, b) for a, b in zip(run["batch"], run["batch2"], strict=True)]
    diverged = [d for d in alone_div + repeat_div if d is not None]
    return {
        "backend": run["backend"],
        "prompts_alone": len(alone_div),
        "identical_alone_vs_batch": alone_div.count(None),
        "identical_batch_repeat": repeat_div.count(None),
        "prompts_batch": len(repeat_div),
        "first_divergence_min": min(diverged) if diverged else None,
        "tok_s": run["tok_s"],
        "tok_s_runs": run.get("tok_s_runs", [run["tok_s"]]),
        "preemptions": run.get("preemptions"),
        "attention_variant": run.get("attention_variant"),
        "gpu": run["gpu"],
        "vllm": run["vllm"],
    }


def workload(
    name: str,
    num_prompts: int,
    max_tokens: int,
    num_alone: int,
    vocab: int,
    min_len: int = 64,
    max_len: int = 512,
    sampling: dict | None = None,
) -> dict:
    """sampling: SamplingParams fields (temperature, top_k, top_p, min_p, ...) and "seed", the
    first prompt's seed (prompt i gets seed + i); None means greedy."""
    return {
        "name": name,
        "sampling": sampling,
        "max_tokens": max_tokens,
        "num_alone": num_alone,
        "prompt_lengths": [min_len, max_len],
        "prompts": make_prompts(num_prompts, min_len, max_len, vocab, seed=0),
        "warmup_prompts": make_prompts(num_prompts, min_len, max_len, vocab, seed=1),
    }


def vocab_size(config: str) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        return json.loads(Path(write_model_dir(config, tmp), "config.json").read_text())[
            "vocab_size"
        ]


def run_backends(
    config: str,
    workloads: list[dict],
    backends: tuple[str, ...],
    alone_backends: tuple[str, ...] | None = None,
    verbose: bool = False,
    num_gpu_blocks: int | None = None,
    tensor_parallel_size: int = 1,
    keep_going: bool = False,
    on_backend_done: Callable[[dict], None] | None = None,
    profile: bool = False,
    repeats: int = 1,
) -> dict:
    """Each backend in its own process (one engine per process), same prompts and weights.
    Only `alone_backends` (default: all) also run prompts alone. num_gpu_blocks: KV blocks
    of the engines (vLLM's num_gpu_blocks_override), few enough that batches preempt.
    tensor_parallel_size: GPUs per engine (each rank draws its own shard's weights, so the
    model differs from the one-GPU model; compare backends at one size only).
    keep_going: an engine that fails or times out is named in result["failed"] (backend:
    error) and the next one runs, instead of raising. on_backend_done(result) after each
    backend, failed or not, so a caller can save what is known if the run is cut short.
    profile: each workload's batch runs once under torch.profiler after the warm-up
    (profiled_generate), nothing else; its run is {"backend", **profile} (TP=1 only: the model
    must run in the engine's own process). repeats: timed runs of each batch (tok_s is their
    median; tok_s_runs lists them), each after emptying the prefix cache."""
    if repeats < 1:
        raise ValueError(f"det_backend: repeats must be >= 1, got {repeats}")
    if profile and tensor_parallel_size != 1:
        raise ValueError("det_backend: profile=True needs tensor_parallel_size=1")
    result = {"config": config, "workloads": {}}
    alone = backends if alone_backends is None else alone_backends
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model_dir(config, tmp)
        max_len = max(w["prompt_lengths"][1] + w["max_tokens"] for w in workloads)
        for backend in backends:
            plan = {
                "max_model_len": max_len + 64,
                "num_gpu_blocks_override": num_gpu_blocks,
                "tensor_parallel_size": tensor_parallel_size,
                "profile": profile,
                "repeats": repeats,
                "workloads": [
                    {**w, "num_alone": w["num_alone"] if backend in alone else 0} for w in workloads
                ],
            }
            plan_file, out = Path(tmp, f"{backend}-plan.json"), Path(tmp, f"{backend}.json")
            plan_file.write_text(json.dumps(plan))
            env = {**os.environ, **BACKENDS[backend]["env"]}
            env = {k: v for k, v in env.items() if v is not None}
            if profile:
                # The engine core (and, at TP=1, the model) in the engine process itself.
                env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            if not verbose:
                env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
            cmd = [
                sys.executable,
                "-m",
                "det_backend.demo",
                "--engine-worker",
                backend,
                "--model-dir",
                model_dir,
                "--plan",
                str(plan_file),
                "--out",
                str(out),
            ]
            print(
                f"== {backend}: starting an engine (compile and CUDA graphs take a minute)",
                flush=True,
            )
            try:
                run_engine_process(cmd, env, f"the {backend} engine")
            except RuntimeError as e:
                if not keep_going:
                    raise
                print(f"== {backend}: {e}; going on with the next engine", flush=True)
                result.setdefault("failed", {})[backend] = str(e)
            else:
                for name, run in json.loads(out.read_text()).items():
                    spec = next(w for w in workloads if w["name"] == name)
                    entry = result["workloads"].setdefault(
                        name,
                        {
                            "num_prompts": len(spec["prompts"]),
                            "max_tokens": spec["max_tokens"],
                            "prompt_lengths": spec["prompt_lengths"],
                            "runs": [],
                        },
                    )
                    if profile:
                        entry["runs"].append({"backend": run["backend"], **run["profile"]})
                    else:
                        entry["runs"].append(summarize(run))
            if on_backend_done:
                on_backend_done(result)
    return result


def compare(
    config: str = "small",
    num_prompts: int = 64,
    max_tokens: int = 128,
    num_alone: int | None = None,
    backends: tuple[str, ...] = ("default", "det"),
    verbose: bool = False,
    sampling: dict | None = None,
    num_gpu_blocks: int | None = None,
) -> dict:
    """The demo's comparison: one workload, every prompt (or `num_alone`) also alone."""
    num_alone = num_prompts if num_alone is None else num_alone
    w = workload("main", num_prompts, max_tokens, num_alone, vocab_size(config), sampling=sampling)
    result = run_backends(config, [w], backends, verbose=verbose, num_gpu_blocks=num_gpu_blocks)
    return {"config": config, **result["workloads"]["main"]}


def print_table(result: dict) -> None:
    print(
        f"\nmodel {result['config']}, {result['num_prompts']} prompts of "
        f"{result['prompt_lengths'][0]}-{result['prompt_lengths'][1]} tokens, "
        f"{result['max_tokens']} new tokens, greedy, logprobs compared bit for bit"
    )
    header = (
        f"{'backend':<10}{'alone = batch':>16}{'batch = batch':>16}{'1st diverg.':>13}{'tok/s':>10}"
    )
    print(header)
    print("-" * len(header))
    for r in result["runs"]:
        div = "-" if r["first_divergence_min"] is None else str(r["first_divergence_min"])
        print(
            f"{r['backend']:<10}"
            f"{r['identical_alone_vs_batch']:>9}/{r['prompts_alone']:<6}"
            f"{r['identical_batch_repeat']:>9}/{r['prompts_batch']:<6}"
            f"{div:>13}{r['tok_s']:>10.0f}"
        )
    if result["runs"]:
        print(f"GPU: {result['runs'][0]['gpu']}, vLLM {result['runs'][0]['vllm']}")


def kernel_demo() -> list[dict]:
    """CPU part: a row alone vs inside batches, for our GEMM and RMSNorm and for torch's."""
    import torch

    from .kernels.matmul import matmul
    from .kernels.rms_norm import rms_norm

    gen = torch.Generator().manual_seed(0)
    # fp16 dots: the interpreter's bf16 tl.dot is not trustworthy.
    x = torch.randn(48, 256, generator=gen).half()
    w = (torch.randn(64, 256, generator=gen) * 0.05).half()
    nw = torch.randn(256, generator=gen).half()
    ops = {
        "det_backend matmul": lambda a: matmul(a, w),
        "torch matmul (fp32)": lambda a: a.float() @ w.float().T,
        "det_backend rms_norm": lambda a: rms_norm(a, nw, 1e-5),
    }
    rows = []
    for name, fn in ops.items():
        full = fn(x)
        sizes = (1, 7, 16, 33, 47)
        same = sum(torch.equal(fn(x[:m]), full[:m]) for m in sizes)
        rows.append({"op": name, "batch_sizes": len(sizes), "identical": same})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m det_backend.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        default="small",
        help=f"bundled model config {sorted(CONFIGS)} or a config.json path",
    )
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument(
        "--num-alone", type=int, default=None, help="prompts also run alone (default: all)"
    )
    parser.add_argument(
        "--backends",
        default="default,det",
        help=f"comma-separated engines to compare, from {sorted(BACKENDS)} (det_fa3: "
        "DET_BACKEND_ATTENTION=fa3)",
    )
    parser.add_argument("--json", help="write the result here as JSON")
    parser.add_argument("--verbose", action="store_true", help="show vLLM's INFO logs")
    # Internal: one engine in this process.
    for flag in ("--engine-worker", "--model-dir", "--plan", "--out"):
        parser.add_argument(flag, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    backends = tuple(args.backends.split(","))
    unknown = set(backends) - set(BACKENDS)
    if unknown:
        parser.error(f"unknown backends {sorted(unknown)} (choose from {sorted(BACKENDS)})")
    if args.engine_worker:
        run_engine_worker(engine_worker, args)
        return 0

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
        print("No CUDA GPU: running the kernel-level part on the CPU (Triton interpreter).")
        print(f"{'op':<24}{'row alone = row in batch':>26}")
        for r in kernel_demo():
            print(f"{r['op']:<24}{r['identical']:>20}/{r['batch_sizes']}")
        print(
            "\nThe engine part (vLLM default vs det_backend, prompts alone vs batched) "
            "needs a CUDA GPU; run this command again on one."
        )
        return 0

    result = compare(
        args.config, args.prompts, args.max_tokens, args.num_alone, backends, verbose=args.verbose
    )
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
