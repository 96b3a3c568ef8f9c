"""What Triton builds for H100/H200 (sm_90) from our paged attention, checked without a GPU
(tests/attention_sm90_build.py compiles the launcher's real launches for cuda:90 with the
ptxas that ships with Triton and reports registers and spills)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HAS_PTXAS = (Path(__import__("triton").__file__).parent / "backends/nvidia/bin/ptxas").exists()


@pytest.mark.skipif(not HAS_PTXAS, reason="Triton's ptxas is not installed")
def test_attention_plain_and_window_paths_do_not_spill_on_sm90():
    """Spills cost every attention layer of every step; the model features must not make
    the launches without them (or with only a window) spill at head size 128. Reported, not
    asserted: at head size 64 decode is held to 128 registers and spills 8-12 bytes, as the
    kernel measured on the H200 (0f251c5) already did; with every feature at once head 128
    spills 20-228 bytes."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("attention_sm90_build.py")
    out = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stderr[-3000:]
    records = json.loads(out.stdout)
    kernels = {r["kernel"] for r in records}
    assert kernels == {"_paged_attention_kernel", "_merge_segments_kernel"}
    for r in records:
        if " all " not in r["launch"] and "head 128" in r["launch"]:
            assert r["spill_store_bytes"] == 0, r
    spills = {r["launch"]: r["spill_store_bytes"] for r in records if r["spill_store_bytes"]}
    print("launches that spill:", spills)
