"""What Triton builds for H100/H200 (sm_90) from every matmul config, checked without a GPU.

tests/sm90_build.py compiles each config for the cuda:90 target with the ptxas that ships
with Triton (in a process of its own: this one runs Triton's interpreter) and reports the
instructions and resources; here we assert the properties the configs were chosen for.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HAS_PTXAS = (Path(__import__("triton").__file__).parent / "backends/nvidia/bin/ptxas").exists()
# H100/H200: 227 KiB of shared memory per block.
SM90_SHARED_BYTES = 227 * 1024


@pytest.fixture(scope="module")
def records() -> dict[str, list[dict]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("sm90_build.py")
    out = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


@pytest.mark.skipif(not HAS_PTXAS, reason="Triton's ptxas is not installed")
def test_every_matmul_config_builds_for_sm90(records):
    from det_backend.kernels.matmul import all_configs

    built = {tuple(r["config"]) for r in records["configs"]}
    assert built == {tuple(c) for group in all_configs().values() for c in group}
    # M = 1 becomes a compile-time constant: every kind, and the split-K reduction, build.
    assert {r["config"][7] for r in records["m1"]} == {"plain", "split_k", "tma_persistent"}
    for r in records["configs"]:
        _, block_m, *_, kind, split_k, warp_specialize = r["config"]
        where = r["config"]
        # Tensor cores: wgmma (a 64-row warpgroup MMA) from BLOCK_M 64, mma.sync below.
        if block_m >= 64:
            assert r["wgmma"] > 0 and r["mma_sync"] == 0, where
        else:
            assert r["mma_sync"] > 0, where
        # Loads: TMA for the TMA kind, pipelined cp.async for the others.
        if kind == "tma_persistent":
            assert r["tma_loads"] > 0 and r["cp_async"] == 0, where
        else:
            assert r["cp_async"] > 0 and r["tma_loads"] == 0, where
        assert r["warp_specialized"] == warp_specialize, where
        # In-program split-K keeps two fp32 tiles live: the configs must still fit in registers.
        assert r["spill_store_bytes"] == 0, where
        assert r["shared_bytes"] <= SM90_SHARED_BYTES, where
