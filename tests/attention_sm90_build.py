"""Compile our paged attention for H100/H200 (cuda:90) without a GPU and report registers and
spills per launch (run by tests/test_attention_sm90_build.py in a process of its own: the
test process runs Triton's interpreter). The launches are the real launcher's, on CPU tensors
that are never read: benchmarks/prebuild_cache.py's compile-only sm_90 driver."""

import glob
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import prebuild_cache  # noqa: E402
from det_backend.kernels import attention  # noqa: E402
from triton import knobs  # noqa: E402

H, KVH, BLOCK = 32, 8, 16


def launch(specs, head_size, split, **features):
    """One launch of paged_attention on CPU tensors (bf16, GQA 32/8, vLLM's cache layout)."""
    tokens = sum(q for q, _ in specs)
    q = torch.empty(tokens, H, head_size, dtype=torch.bfloat16)
    blocks = sum(math.ceil(s / BLOCK) for _, s in specs) + 1
    kv = torch.empty(blocks, 2, BLOCK, KVH, head_size, dtype=torch.bfloat16)
    width = max(math.ceil(s / BLOCK) for _, s in specs)
    table = torch.zeros(len(specs), width, dtype=torch.int32)
    cu = torch.zeros(len(specs) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor([n for n, _ in specs]), 0)
    seq_lens = torch.tensor([s for _, s in specs], dtype=torch.int32)
    max_k = max(s for _, s in specs)
    attention.paged_attention(
        q, kv[:, 0], kv[:, 1], torch.empty_like(q), cu, seq_lens, table, head_size**-0.5,
        max(n for n, _ in specs), 64 if split else math.ceil(max_k / attention.KV_SPLIT_SIZE),
        split=split, **features,
    )  # fmt: skip


FEATURES = {
    "plain": {},
    "window": {"sliding_window": 256},
    "all": {
        "sliding_window": 256,
        "softcap": 30.0,
        "alibi_slopes": torch.empty(H, dtype=torch.float32),
        "sinks": torch.empty(H, dtype=torch.float32),
    },
}
LAUNCHES = [
    (f"{kind} {feat} head {d} {'split' if split else 'single'}", specs, d, split, FEATURES[feat])
    for kind, specs in (("decode", [(1, 2048)] * 8), ("prefill", [(512, 512)] * 2))
    for feat in FEATURES
    for d in (64, 128)
    for split in (False, True)
]


def ptxas_report(ptx: str) -> dict:
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")
    report = subprocess.run(
        [ptxas, "-arch=sm_90a", "-v", ptx, "-o", os.devnull], capture_output=True, text=True
    ).stderr
    return {
        "registers": int(re.search(r"Used (\d+) registers", report)[1]),
        "spill_store_bytes": int(re.search(r"(\d+) bytes spill stores", report)[1]),
    }


def main() -> None:
    records = []
    for label, specs, head_size, split, features in LAUNCHES:
        # One cache folder per launch: what it compiled is what is in it.
        knobs.cache.dir = tempfile.mkdtemp()
        with prebuild_cache.compile_only_sm90(None):
            launch(specs, head_size, split, **features)
        for ptx in glob.glob(f"{knobs.cache.dir}/*/*.ptx"):
            meta = json.loads(Path(ptx[:-4] + ".json").read_text())
            records.append({"launch": label, "kernel": meta["name"], **ptxas_report(ptx)})
    print(json.dumps(records))


if __name__ == "__main__":
    main()
