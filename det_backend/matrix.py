"""`det-backend matrix`: the invariance matrix through a real `vllm serve`, on a CUDA GPU.

For each model shape and each variant (our backend, and vLLM's default as the control), a
reference pass sends every prompt alone and in order to a fresh server; each cell then
changes one dimension and counts the prompts whose tokens and logprobs are bit-identical to
the reference:

    prefix_cache_warm    the same prompts again on the same server: prefix-cache hits
    batch_256            all prompts at once (prompts share prefixes of 0..384 tokens)
    concurrency_64       1000 requests from 64 clients, prompts cycled
    chunked_prefill_N    a server with --max-num-batched-tokens N (256, 2048, 8192)
    preemption           a server with few KV blocks, all prompts at once (the count of
                         preemptions the server reports is kept with the cell)
    restart              a new server process, prompts alone again

Greedy by default. With --temperature > 0 (and --seed: prompt i gets seed SEED + i) every
request samples, with any of --top-k, --top-p, --min-p, the penalties and --logit-bias sent
through the OpenAI API, and the same cells compare the sampled tokens and their logprobs;
`--seeded` is the preset the GPU test runs (SEEDED). The settings are kept in the JSON.

Checkpoints are written with transformers from a bundled config (fewer layers, same widths)
and realistic random weights (normal, std 0.02; norm weights 1), served with
--skip-tokenizer-init; prompts are token ids, logprobs asked with return_tokens_as_token_ids.

    det-backend matrix --out invariance_matrix.json [--models llama-3-8b,qwen3-8b]
        [--cells batch_256,restart] [--default-cells '']    a subset of the cells
    det-backend matrix --seeded --prompts 128 --cells batch_256,preemption --default-cells batch_256
    det-backend matrix --merge part1.json part2.json --out invariance_matrix.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from . import demo, drift, variants
from .demo import reinit_weights, write_model_dir

MODELS = ("llama-3-8b", "qwen3-8b")
VARIANTS = {"det": ["--attention-backend", "CUSTOM"], "default": []}
CHUNK_SIZES = (256, 2048, 8192)
NUM_PROMPTS = 256
MAX_TOKENS = 64
SERVE_TIMEOUT_S = 900
# KV blocks of 16 tokens for the preemption cell, per 256 prompts: ~24 requests of up to 576
# tokens fit in 800, so the rest wait or are preempted.
PREEMPTION_BLOCKS_PER_256 = 800
# Seeded sampling as the GPU test sends it: every knob vLLM batches differently (top-k and
# top-p switch kernels at 8 rows), the three penalties and a logit bias (vLLM's OpenAI server
# takes top_k, min_p and repetition_penalty as extensions); prompt i gets seed 1000 + i.
SEEDED: dict[str, Any] = {
    "temperature": 0.8,
    "seed": 1000,
    "top_k": 50,
    "top_p": 0.9,
    "min_p": 0.02,
    "presence_penalty": 0.5,
    "frequency_penalty": 0.3,
    "repetition_penalty": 1.1,
    "logit_bias": {"1000": 4.0, "2000": -4.0, "3000": 2.0},
}


def make_prompts(vocab: int, seed: int = 0, num: int = NUM_PROMPTS) -> list[drift.Prompt]:
    """num // 8 groups of 8 prompts; a group shares a prefix of 0..384 tokens, so prefix-cache
    hits and misses both occur, at many lengths."""
    if num < 16 or num % 8:
        raise ValueError(f"num={num}: the prompt set is groups of 8, at least 2 groups")
    rng = random.Random(seed)
    prompts = []
    groups = num // 8
    for group in range(groups):
        prefix = [rng.randrange(100, vocab) for _ in range(group * 384 // (groups - 1))]
        for _ in range(8):
            suffix = [rng.randrange(100, vocab) for _ in range(rng.randint(16, 128))]
            prompts.append(drift.Prompt(len(prompts), 0, "token_ids", prefix + suffix))
    return prompts


def write_checkpoint(config: str, layers: int, directory: str) -> None:
    """A transformers checkpoint with realistic random weights, built on the GPU."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    write_model_dir(config, directory)
    cfg = AutoConfig.from_pretrained(directory)
    cfg.num_hidden_layers = layers
    # Default dtype rather than a from_config keyword: its name changed across transformers.
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg)
    reinit_weights(model)
    model.save_pretrained(directory)


def preemption_blocks(num_prompts: int) -> int:
    # 64 blocks hold one request of max_model_len (1024) tokens.
    return max(64, PREEMPTION_BLOCKS_PER_256 * num_prompts // 256)


def _settings(sampling: dict[str, Any] | None) -> drift.Settings:
    """Greedy when `sampling` is None; else its temperature, seed (prompt i: seed + i) and
    the rest as request fields."""
    sampling = dict(sampling or {})
    return drift.Settings(
        api="completions",
        max_tokens=MAX_TOKENS,
        temperature=sampling.pop("temperature", 0.0),
        seed=sampling.pop("seed", None),
        sampling=sampling,
        logprobs=1,
        token_ids=True,
        timeout=600,
        repeats=1,
        concurrency=(1,),
        background=0,
        abort_after=0,
    )


def _send_all(
    url: str, prompts: list[drift.Prompt], clients: int, sampling: dict[str, Any] | None
) -> list[drift.Response]:
    target = drift.Target("target", url, drift.resolve_model(url, None, None))
    settings = _settings(sampling)
    with ThreadPoolExecutor(max_workers=clients) as pool:
        futures = [pool.submit(drift.send_prompt, target, settings, p, clients, 0) for p in prompts]
        return [f.result() for f in futures]


def count_preemptions(metrics: str) -> int | None:
    """vLLM's preemption counter in a Prometheus /metrics text (summed over its label sets);
    None when the server does not report it."""
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith(("vllm:num_preemptions_total{", "vllm:num_preemptions_total "))
    ]
    return int(sum(values)) if values else None


def _preemptions(base_url: str) -> int | None:
    url = base_url.removesuffix("/v1") + "/metrics"
    try:
        with urllib.request.urlopen(url, timeout=30) as reply:
            return count_preemptions(reply.read().decode())
    except OSError as e:
        # The cell's outputs are measured already; a missing count is reported, not fatal.
        print(f"could not read {url}: {e}", file=sys.stderr)
        return None


def _keys(responses: list[drift.Response]) -> dict[int, str]:
    return {r.prompt: r.output.key for r in responses if r.output is not None}


def _score(
    reference: list[drift.Response] | dict[int, str], responses: list[drift.Response]
) -> dict:
    ref = reference if isinstance(reference, dict) else _keys(reference)
    same = sum(1 for r in responses if r.output is not None and ref.get(r.prompt) == r.output.key)
    errors = sum(1 for r in responses if r.output is None)
    return {
        "n": len(responses),
        "identical": same,
        "errors": errors,
        "identical_fraction": same / len(responses),
        "fingerprints": sorted({r.fingerprint for r in responses if r.fingerprint}),
    }


def run_variant(
    checkpoint: str,
    variant: str,
    prompts: list[drift.Prompt],
    cells: tuple[str, ...],
    record: Callable[[str, dict], None],
    reference_file: Path | None = None,
    sampling: dict[str, Any] | None = None,
    tensor_parallel_size: int = 1,
) -> None:
    """Every requested cell for one variant; each server is started and stopped here, and
    each cell's score goes to `record` as soon as it is known (a run cut short keeps them).

    reference_file: the reference pass's outputs are saved there, and read back instead of
    run again when no requested cell needs the reference server (runs split over several
    calls on one host; the checkpoint is the same, its weights are seeded).
    sampling: None for greedy, else what _settings takes (SEEDED).
    tensor_parallel_size > 1: every server runs `--tensor-parallel-size` (issue 8)."""
    base = [
        *VARIANTS[variant],
        "--skip-tokenizer-init",
        "--max-model-len",
        "1024",
        "--gpu-memory-utilization",
        "0.85",
    ]
    if tensor_parallel_size > 1:
        base += ["--tensor-parallel-size", str(tensor_parallel_size)]
        if demo.nccl_only():
            base += demo.nccl_only_serve_args()

    def serve(extra: list[str]):
        return drift.serve_vllm(checkpoint, 0, base + extra, SERVE_TIMEOUT_S)

    def score(cell: str, responses: list[drift.Response], **extra) -> None:
        record(cell, {**_score(reference, responses), **extra})

    def send(url: str, some: list[drift.Prompt], clients: int) -> list[drift.Response]:
        return _send_all(url, some, clients, sampling)

    same_server = {"prefix_cache_warm", "batch_256", "concurrency_64"}
    if reference_file and reference_file.exists() and not same_server & set(cells):
        saved = json.loads(reference_file.read_text())
        reference = {int(k): v for k, v in saved.items()}
    else:
        with serve([]) as server:
            responses = send(server.base_url, prompts, clients=1)
            record("reference", _score(responses, responses))
            reference = _keys(responses)
            if reference_file:
                reference_file.write_text(json.dumps(reference))
            if "prefix_cache_warm" in cells:
                score("prefix_cache_warm", send(server.base_url, prompts, 1))
            if "batch_256" in cells:
                score("batch_256", send(server.base_url, prompts, len(prompts)))
            if "concurrency_64" in cells:
                cycled = [prompts[i % len(prompts)] for i in range(1000)]
                score("concurrency_64", send(server.base_url, cycled, 64))
    for size in CHUNK_SIZES:
        if f"chunked_prefill_{size}" in cells:
            with serve(["--enable-chunked-prefill", "--max-num-batched-tokens", str(size)]) as s:
                score(f"chunked_prefill_{size}", send(s.base_url, prompts, len(prompts)))
    if "preemption" in cells:
        blocks = preemption_blocks(len(prompts))
        with serve(["--num-gpu-blocks-override", str(blocks)]) as s:
            responses = send(s.base_url, prompts, len(prompts))
            score("preemption", responses, preemptions=_preemptions(s.base_url))
    if "restart" in cells:
        with serve([]) as s:
            score("restart", send(s.base_url, prompts, 1))


ALL_CELLS = (
    "prefix_cache_warm",
    "batch_256",
    "concurrency_64",
    *(f"chunked_prefill_{s}" for s in CHUNK_SIZES),
    "preemption",
    "restart",
)


def _row(rows: list[dict], model: str, cell: str) -> dict:
    for row in rows:
        if row["model"] == model and row["dimension"] == cell:
            return row
    row = {
        "dimension": cell,
        "model": model,
        "variant": "det",
        "n": None,
        "identical_fraction": None,
        "errors": None,
        "default_identical_fraction": None,
        "default_errors": None,
        "fingerprints": None,
        "default_fingerprints": None,
    }
    rows.append(row)
    return row


def run_matrix(
    models: tuple[str, ...],
    layers: int,
    cells: tuple[str, ...] = ALL_CELLS,
    default_cells: tuple[str, ...] = ALL_CELLS,
    out: str | None = None,
    reference_dir: str | None = None,
    sampling: dict[str, Any] | None = None,
    num_prompts: int = NUM_PROMPTS,
    tensor_parallel_size: int = 1,
) -> dict:
    """Our backend's cells and the control's; with `out`, the JSON is rewritten after every
    cell, so a run stopped part-way keeps what it measured. sampling: None (greedy) or
    temperature, seed and request fields (SEEDED), kept in the JSON as "sampling"."""
    import torch
    import vllm

    result = {
        "cells": [],
        "gpu": torch.cuda.get_device_name(),
        "vllm": vllm.__version__,
        "command": " ".join(["det-backend matrix", *sys.argv[1:]]),
        "sampling": sampling,
        "num_prompts": num_prompts,
        "tensor_parallel_size": tensor_parallel_size,
        # At TP > 1: every server talked over NCCL alone (demo.NCCL_ONLY says why).
        "nccl_only": tensor_parallel_size > 1 and demo.nccl_only(),
        "custom_all_reduce_kept": demo.custom_all_reduce_kept(),
        # The det servers inherit DET_BACKEND_ATTENTION from this process; unset, each server
        # picks the default for its model (variants.default_for: fa3 on Hopper where the
        # model allows) and logs it.
        "attention_variant": variants.requested() or "unset",
    }

    def save() -> None:
        if out:
            Path(out).write_text(json.dumps(result, indent=2))

    for model in models:
        label = f"{model} ({layers} layers)"
        with tempfile.TemporaryDirectory() as checkpoint:
            # A child process builds the checkpoint, so this one holds no GPU memory.
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "det_backend.matrix",
                    "--write-checkpoint",
                    model,
                    "--layers",
                    str(layers),
                    "--dir",
                    checkpoint,
                ],
                check=True,
            )
            vocab = json.loads(Path(checkpoint, "config.json").read_text())["vocab_size"]
            prompts = make_prompts(vocab, num=num_prompts)
            for variant, wanted in (("det", cells), ("default", default_cells)):
                if not wanted:
                    continue
                prefix = "" if variant == "det" else "default_"

                def record(
                    cell: str, score: dict, prefix=prefix, variant=variant, label=label
                ) -> None:
                    if cell == "reference":
                        if score["errors"]:
                            raise RuntimeError(f"{variant} reference pass had errors: {score}")
                        return
                    row = _row(result["cells"], label, cell)
                    if prefix == "":
                        row["n"] = score["n"]
                    row[prefix + "identical_fraction"] = score["identical_fraction"]
                    row[prefix + "errors"] = score["errors"]
                    row[prefix + "fingerprints"] = score["fingerprints"]
                    if "preemptions" in score:
                        row[prefix + "preemptions"] = score["preemptions"]
                    print(f"{label} {variant} {cell}: {score}", file=sys.stderr, flush=True)
                    save()

                ref_file = None
                if reference_dir:
                    Path(reference_dir).mkdir(parents=True, exist_ok=True)
                    name = f"{model}-{layers}-{variant}{_mode_tag(sampling, num_prompts)}"
                    if tensor_parallel_size > 1:
                        name += f"-tp{tensor_parallel_size}"
                    ref_file = Path(reference_dir, f"{name}.json")
                run_variant(
                    checkpoint,
                    variant,
                    prompts,
                    wanted,
                    record,
                    ref_file,
                    sampling,
                    tensor_parallel_size,
                )
    save()
    return result


def _mode_tag(sampling: dict[str, Any] | None, num_prompts: int) -> str:
    """'' for the greedy 256-prompt reference (its file name as before), else a tag that
    tells references of other settings apart."""
    if sampling is None and num_prompts == NUM_PROMPTS:
        return ""
    text = json.dumps([sampling, num_prompts], sort_keys=True)
    return "-" + hashlib.sha256(text.encode()).hexdigest()[:12]


def merge(results: list[dict]) -> dict:
    """Partial runs (e.g. one GPU call per group of cells) into one matrix: a cell's fields
    from the first run that measured them. Runs of other sampling settings, prompt counts,
    attention variants or TP sizes do not merge (their cells measure different things)."""
    modes = {
        json.dumps(
            [
                r.get("sampling"),
                r.get("num_prompts", NUM_PROMPTS),
                r.get("attention_variant", variants.DEFAULT),
                r.get("tensor_parallel_size", 1),
            ]
        )
        for r in results
    }
    if len(modes) > 1:
        raise ValueError(
            "runs with different sampling settings, prompt counts, attention variants or TP "
            f"sizes: {modes}"
        )
    merged = {k: v for k, v in results[0].items() if k != "cells"}
    merged["cells"] = []
    merged["command"] = " + ".join(r["command"] for r in results)
    for r in results:
        for cell in r["cells"]:
            row = _row(merged["cells"], cell["model"], cell["dimension"])
            for key, value in cell.items():
                if row.get(key) is None:
                    row[key] = value
    return merged


def _fraction(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_matrix(result: dict) -> None:
    sampling = result.get("sampling")
    print(f"sampling: {'greedy' if sampling is None else json.dumps(sampling)}")
    print(f"{'dimension':<22}{'model':<26}{'det':>10}{'default':>10}")
    for c in result["cells"]:
        print(
            f"{c['dimension']:<22}{c['model']:<26}{_fraction(c['identical_fraction']):>10}"
            f"{_fraction(c['default_identical_fraction']):>10}"
        )


def _cells(text: str) -> tuple[str, ...]:
    cells = tuple(c for c in text.split(",") if c)
    unknown = [c for c in cells if c not in ALL_CELLS]
    if unknown:
        raise SystemExit(f"unknown cell(s) {unknown}; known: {', '.join(ALL_CELLS)}")
    return cells


# Request fields the command line can set besides temperature and seed.
SAMPLING_FLAGS = {
    "top_k": int,
    "top_p": float,
    "min_p": float,
    "presence_penalty": float,
    "frequency_penalty": float,
    "repetition_penalty": float,
}


def parse_logit_bias(text: str) -> dict[str, float]:
    """'ID:BIAS,ID:BIAS' as the OpenAI API's logit_bias (token id strings to floats)."""
    bias = {}
    for item in (i for i in text.split(",") if i):
        token, _, value = item.partition(":")
        if not token.strip().isdigit() or not value:
            raise argparse.ArgumentTypeError(f"--logit-bias item {item!r} is not ID:BIAS")
        bias[str(int(token))] = float(value)
    return bias


def sampling_from_args(args: argparse.Namespace) -> dict[str, Any] | None:
    """None (greedy, no other field) or the settings run_matrix takes: --seeded's preset,
    overridden by any flag given."""
    sampling = dict(SEEDED) if args.seeded else {}
    if args.temperature is not None:
        sampling["temperature"] = args.temperature
    if args.seed is not None:
        sampling["seed"] = args.seed
    for name in SAMPLING_FLAGS:
        if getattr(args, name) is not None:
            sampling[name] = getattr(args, name)
    if args.logit_bias is not None:
        sampling["logit_bias"] = args.logit_bias
    if sampling.get("temperature", 0.0) > 0 and sampling.get("seed") is None:
        raise SystemExit("--temperature > 0 needs --seed: unseeded sampling differs by design")
    return sampling or None


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="invariance_matrix.json")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of each shape")
    parser.add_argument(
        "--tensor-parallel-size", type=int, default=1, help="GPUs per server (issue 8: 2)"
    )
    parser.add_argument("--cells", default=",".join(ALL_CELLS), help="our backend's cells")
    parser.add_argument(
        "--default-cells", default=",".join(ALL_CELLS), help="the control's cells ('' for none)"
    )
    parser.add_argument(
        "--merge", nargs="+", metavar="JSON", help="merge partial runs into --out, run nothing"
    )
    parser.add_argument(
        "--prompts", type=int, default=NUM_PROMPTS, help="prompts per pass (a multiple of 8)"
    )
    what = parser.add_argument_group("sampling (default: greedy)")
    what.add_argument("--seeded", action="store_true", help=f"the GPU test's preset: {SEEDED}")
    what.add_argument("--temperature", type=float)
    what.add_argument("--seed", type=int, help="prompt i gets seed SEED + i")
    for name, kind in SAMPLING_FLAGS.items():
        what.add_argument("--" + name.replace("_", "-"), type=kind)
    what.add_argument("--logit-bias", type=parse_logit_bias, metavar="ID:BIAS,...")
    parser.add_argument("--write-checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m det_backend.matrix") -> int:
    args = build_parser(prog).parse_args(argv)
    if args.write_checkpoint:
        write_checkpoint(args.write_checkpoint, args.layers, args.dir)
        return 0
    if args.merge:
        result = merge([json.loads(Path(f).read_text()) for f in args.merge])
        Path(args.out).write_text(json.dumps(result, indent=2))
    else:
        result = run_matrix(
            tuple(args.models.split(",")),
            args.layers,
            _cells(args.cells),
            _cells(args.default_cells),
            out=args.out,
            sampling=sampling_from_args(args),
            num_prompts=args.prompts,
            tensor_parallel_size=args.tensor_parallel_size,
        )
    print_matrix(result)
    return 0 if all(c["identical_fraction"] == 1.0 for c in result["cells"]) else 1


if __name__ == "__main__":
    sys.exit(main())
