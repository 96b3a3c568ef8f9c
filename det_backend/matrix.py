"""`det-backend matrix`: the invariance matrix through a real `vllm serve`, on a CUDA GPU.

For each model shape and each variant (our backend, and vLLM's default as the control), a
reference pass sends every prompt alone and in order to a fresh server; each cell then
changes one dimension and counts the prompts whose tokens and logprobs are bit-identical to
the reference:

    prefix_cache_warm    the same prompts again on the same server: prefix-cache hits
    batch_256            all prompts at once (prompts share prefixes of 0..384 tokens)
    concurrency_64       1000 requests from 64 clients, prompts cycled
    chunked_prefill_N    a server with --max-num-batched-tokens N (256, 2048, 8192)
    preemption           a server with few KV blocks, all prompts at once
    restart              a new server process, prompts alone again

Checkpoints are written with transformers from a bundled config (fewer layers, same widths)
and realistic random weights (normal, std 0.02; norm weights 1), served with
--skip-tokenizer-init; prompts are token ids, logprobs asked with return_tokens_as_token_ids.

    det-backend matrix --out invariance_matrix.json [--models llama-3-8b,qwen3-8b]
        [--cells batch_256,restart] [--default-cells '']    a subset of the cells
    det-backend matrix --merge part1.json part2.json --out invariance_matrix.json
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import drift
from .demo import reinit_weights, write_model_dir

MODELS = ("llama-3-8b", "qwen3-8b")
VARIANTS = {"det": ["--attention-backend", "CUSTOM"], "default": []}
CHUNK_SIZES = (256, 2048, 8192)
NUM_PROMPTS = 256
MAX_TOKENS = 64
SERVE_TIMEOUT_S = 900


def make_prompts(vocab: int, seed: int = 0) -> list[drift.Prompt]:
    """32 groups of 8 prompts; a group shares a prefix of 0..384 tokens, so prefix-cache hits
    and misses both occur, at many lengths."""
    rng = random.Random(seed)
    prompts = []
    for group in range(NUM_PROMPTS // 8):
        prefix = [rng.randrange(100, vocab) for _ in range(group * 384 // 31)]
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


def _settings() -> drift.Settings:
    return drift.Settings(
        api="completions",
        max_tokens=MAX_TOKENS,
        temperature=0.0,
        seed=None,
        logprobs=1,
        token_ids=True,
        timeout=600,
        repeats=1,
        concurrency=(1,),
        background=0,
        abort_after=0,
    )


def _send_all(url: str, prompts: list[drift.Prompt], clients: int) -> list[drift.Response]:
    target = drift.Target("target", url, drift.resolve_model(url, None, None))
    settings = _settings()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        futures = [pool.submit(drift.send_prompt, target, settings, p, clients, 0) for p in prompts]
        return [f.result() for f in futures]


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
) -> None:
    """Every requested cell for one variant; each server is started and stopped here, and
    each cell's score goes to `record` as soon as it is known (a run cut short keeps them).

    reference_file: the reference pass's outputs are saved there, and read back instead of
    run again when no requested cell needs the reference server (runs split over several
    calls on one host; the checkpoint is the same, its weights are seeded)."""
    base = [
        *VARIANTS[variant],
        "--skip-tokenizer-init",
        "--max-model-len",
        "1024",
        "--gpu-memory-utilization",
        "0.85",
    ]

    def serve(extra: list[str]):
        return drift.serve_vllm(checkpoint, 0, base + extra, SERVE_TIMEOUT_S)

    def score(cell: str, responses: list[drift.Response]) -> None:
        record(cell, _score(reference, responses))

    same_server = {"prefix_cache_warm", "batch_256", "concurrency_64"}
    if reference_file and reference_file.exists() and not same_server & set(cells):
        saved = json.loads(reference_file.read_text())
        reference = {int(k): v for k, v in saved.items()}
    else:
        with serve([]) as server:
            responses = _send_all(server.base_url, prompts, clients=1)
            record("reference", _score(responses, responses))
            reference = _keys(responses)
            if reference_file:
                reference_file.write_text(json.dumps(reference))
            if "prefix_cache_warm" in cells:
                score("prefix_cache_warm", _send_all(server.base_url, prompts, 1))
            if "batch_256" in cells:
                score("batch_256", _send_all(server.base_url, prompts, 256))
            if "concurrency_64" in cells:
                cycled = [prompts[i % len(prompts)] for i in range(1000)]
                score("concurrency_64", _send_all(server.base_url, cycled, 64))
    for size in CHUNK_SIZES:
        if f"chunked_prefill_{size}" in cells:
            with serve(["--enable-chunked-prefill", "--max-num-batched-tokens", str(size)]) as s:
                score(f"chunked_prefill_{size}", _send_all(s.base_url, prompts, 256))
    if "preemption" in cells:
        # ~24 requests of up to 576 tokens fit in 800 blocks of 16: the rest wait or preempt.
        with serve(["--num-gpu-blocks-override", "800"]) as s:
            score("preemption", _send_all(s.base_url, prompts, 256))
    if "restart" in cells:
        with serve([]) as s:
            score("restart", _send_all(s.base_url, prompts, 1))


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
) -> dict:
    """Our backend's cells and the control's; with `out`, the JSON is rewritten after every
    cell, so a run stopped part-way keeps what it measured."""
    import torch
    import vllm

    result = {
        "cells": [],
        "gpu": torch.cuda.get_device_name(),
        "vllm": vllm.__version__,
        "command": " ".join(["det-backend matrix", *sys.argv[1:]]),
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
            prompts = make_prompts(vocab)
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
                    print(f"{label} {variant} {cell}: {score}", file=sys.stderr, flush=True)
                    save()

                ref_file = None
                if reference_dir:
                    Path(reference_dir).mkdir(parents=True, exist_ok=True)
                    ref_file = Path(reference_dir, f"{model}-{layers}-{variant}.json")
                run_variant(checkpoint, variant, prompts, wanted, record, ref_file)
    save()
    return result


def merge(results: list[dict]) -> dict:
    """Partial runs (e.g. one GPU call per group of cells) into one matrix: a cell's fields
    from the first run that measured them."""
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


def main(argv: list[str] | None = None, prog: str = "python -m det_backend.matrix") -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="invariance_matrix.json")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of each shape")
    parser.add_argument("--cells", default=",".join(ALL_CELLS), help="our backend's cells")
    parser.add_argument(
        "--default-cells", default=",".join(ALL_CELLS), help="the control's cells ('' for none)"
    )
    parser.add_argument(
        "--merge", nargs="+", metavar="JSON", help="merge partial runs into --out, run nothing"
    )
    parser.add_argument("--write-checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
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
        )
    print_matrix(result)
    return 0 if all(c["identical_fraction"] == 1.0 for c in result["cells"]) else 1


if __name__ == "__main__":
    sys.exit(main())
