"""benchmarks/prebuild_cache.py: a Triton cache built for sm_90 without a GPU is found again
under the key the JIT computes for the same launch, once its paths are relocated.

The builds run in processes of their own (this one runs Triton's interpreter) and use this
machine's triton_key (`--host-libtriton local`), so the hits here are real cache lookups.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
HAS_PTXAS = (Path(__import__("triton").__file__).parent / "backends/nvidia/bin/ptxas").exists()


def build(out: Path) -> tuple[int, int]:
    """(compiled, found in the cache) for the table's configs at llama-3-8b:o, M = 1 and 2."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = ["--what", "gemm", "--layers", "llama-3-8b:o", "--max-m", "2", "--out", str(out)]
    run = subprocess.run(
        [sys.executable, str(BENCH / "prebuild_cache.py"), *args, "--host-libtriton", "local"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    found = re.search(r"(\d+) compiled, (\d+) already cached, 0 errors", run.stdout)
    assert found, run.stdout
    return int(found[1]), int(found[2])


@pytest.mark.skipif(not HAS_PTXAS, reason="Triton's ptxas is not installed")
def test_prebuilt_cache_hits_after_relocation(tmp_path):
    prebuild = pytest.importorskip("prebuild_cache")
    built = tmp_path / "built"
    # M = 1 is a compile-time constant, M = 2 is not: two specializations, two kernels.
    assert build(built) == (2, 0)
    assert list(built.glob("*/*.cubin")) and build(built) == (0, 2)
    # Carried elsewhere, the entries' recorded paths are stale: every lookup misses...
    stale = tmp_path / "stale"
    shutil.copytree(built, stale)
    shutil.rmtree(built)
    carried = tmp_path / "carried"
    shutil.copytree(stale, carried)
    assert build(stale) == (2, 0)
    # ... until relocated.
    prebuild.relocate(carried)
    assert build(carried) == (0, 2)


def test_host_key_differs_from_ours_only_in_libtriton():
    prebuild = pytest.importorskip("prebuild_cache")
    host = "0" * 64
    ours, theirs = prebuild.triton_key(), prebuild.triton_key(host)
    assert ours != theirs and host in theirs
    assert theirs.replace(host, prebuild._libtriton_sha256()) == ours
