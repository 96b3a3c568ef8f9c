"""benchmarks/prebuild_cache.py: a Triton cache built for sm_90 without a GPU is found again
under the key the JIT computes for the same launch, once its paths are relocated.

The builds run in processes of their own (this one runs Triton's interpreter) and use this
machine's triton_key (`--host-libtriton local`), so the hits here are real cache lookups.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
HAS_PTXAS = (Path(__import__("triton").__file__).parent / "backends/nvidia/bin/ptxas").exists()


GEMM = ["--what", "gemm", "--layers", "llama-3-8b:o", "--max-m", "2"]
# The CUDA-graph test with a single-pass graph: a pool of 7 decodes, 6 kernels, seconds.
ATTENTION = ["--what", "attention-tests", "--tests", "cuda_graph_replay[split=False]"]


def build(out: Path, args: list[str] = GEMM) -> tuple[int, int]:
    """(compiled, found in the cache); by default for the table's configs at llama-3-8b:o,
    M = 1 and 2."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = [*args, "--out", str(out)]
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


@pytest.mark.skipif(not HAS_PTXAS, reason="Triton's ptxas is not installed")
def test_attention_tests_build_then_all_cached(tmp_path):
    compiled, cached = build(tmp_path, ATTENTION)
    assert compiled > 0 and cached == 0
    # Entries keep only what a hit reads, and are found again.
    assert list(tmp_path.glob("*/*.cubin")) and not list(tmp_path.glob("*/*.ptx"))
    assert build(tmp_path, ATTENTION) == (0, compiled)
    first = json.loads((tmp_path / "prebuild.json").read_text())["builds"][0]
    assert first["launches"] == 1 and first["errors"] == {}
    assert first["kernels"] == ["_merge_segments_kernel", "_paged_attention_kernel"]


@pytest.mark.slow
@pytest.mark.skipif(not HAS_PTXAS, reason="Triton's ptxas is not installed")
def test_attention_tests_full_build_then_all_cached(tmp_path):
    """Every GPU test of test_attention.py (minutes: the real-shape inputs are built on CPU)."""
    everything = ["--what", "attention-tests"]
    compiled, _ = build(tmp_path, everything)
    assert compiled > 0
    assert build(tmp_path, everything)[0] == 0


def test_attention_tests_build_runs_every_gpu_test():
    """One launch per test that pytest would run on the GPU, parametrizations included."""
    prebuild = pytest.importorskip("prebuild_cache")
    ours = Counter(label.split("[")[0] for label, _ in prebuild.attention_test_launches(None))
    path = Path(__file__).with_name("test_attention.py")
    collect = ["--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider", str(path)]
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", *collect],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    theirs = Counter(re.findall(r"::(test_\w+)\[", collected))
    assert ours == theirs and len(theirs) == 3, (ours, collected[-2000:])


def test_what_is_repeatable_and_comma_joined():
    prebuild = pytest.importorskip("prebuild_cache")
    assert prebuild.parse_what(None) == ["gemm-sweep"]
    assert prebuild.parse_what(["gemm,attention-tests", "gemm"]) == ["gemm", "attention-tests"]
    with pytest.raises(ValueError, match="attention"):
        prebuild.parse_what(["attention"])


def test_export_packs_only_new_entries_stripped_and_merge_adds_missing_ones(tmp_path):
    """--export (host): entries written after the mark, IRs dropped, one .tgz; --merge (here):
    adds the entries the carried cache lacks and keeps those it has; a path-escaping member
    is ignored."""
    import io
    import tarfile
    import time

    import prebuild_cache

    cache = tmp_path / "cache"

    def entry(name: str, body: bytes) -> None:
        d = cache / name
        d.mkdir(parents=True)
        files = {"k.json": b"{}", "k.cubin": body, "k.ptx": b"ir"}
        for f, data in files.items():
            (d / f).write_bytes(data)
        grp = {"child_paths": {f: str(d / f) for f in files}}
        (d / "__grp__k.json").write_text(json.dumps(grp))

    entry("OLD", b"old")
    old_time = time.time() - 100
    for f in (cache / "OLD").iterdir():
        os.utime(f, (old_time, old_time))
    mark = tmp_path / "mark"
    mark.touch()
    os.utime(mark, (old_time + 10, old_time + 10))
    entry("NEW1", b"n1")
    entry("NEW2", b"n2")
    (cache / "launcher").mkdir()
    (cache / "launcher" / "__triton_launcher.so").write_bytes(b"so")
    pack = tmp_path / "triton_new.tgz"
    prebuild_cache.export_new(cache, mark, pack)
    with tarfile.open(pack) as tar:
        names = sorted(tar.getnames())
    assert {n.split("/")[0] for n in names} == {"NEW1", "NEW2", "launcher"}
    assert not any(n.endswith(".ptx") for n in names)  # stripped to what a hit reads

    carried = tmp_path / "carried"
    (carried / "NEW1").mkdir(parents=True)
    (carried / "NEW1" / "k.cubin").write_bytes(b"mine")
    with tarfile.open(pack, "r:gz") as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
    evil = tmp_path / "evil.tgz"
    with tarfile.open(evil, "w:gz") as tar:
        for m, data in members:
            tar.addfile(m, io.BytesIO(data))
        bad = tarfile.TarInfo("../escaped")
        bad.size = 1
        tar.addfile(bad, io.BytesIO(b"x"))
    prebuild_cache.merge(evil, carried)
    assert (carried / "NEW1" / "k.cubin").read_bytes() == b"mine"  # kept as it was
    assert (carried / "NEW2" / "k.cubin").read_bytes() == b"n2"
    assert (carried / "launcher" / "__triton_launcher.so").read_bytes() == b"so"
    assert not (tmp_path / "escaped").exists()

    mark.touch()  # nothing newer than the mark now: no pack written
    pack.unlink()
    prebuild_cache.export_new(cache, mark, pack)
    assert not pack.exists()


def test_gemm_launches_cover_each_table_entry_at_a_ragged_m_too():
    # An engine's M is any number (prefill chunks): besides gemm.py's points, M - 1 (not a
    # multiple of 16, or 1) is the other specialization of the same table entry.
    prebuild = pytest.importorskip("prebuild_cache")
    labels = [label for label, _ in prebuild.gemm_launches("llama-3-8b:o", False, 64)]
    ms = [int(label.split("M=")[1]) for label in labels]
    assert ms == [1, 2, 1, 4, 3, 8, 7, 16, 15, 32, 31, 64, 63]
    # The sweep's launches are gemm.py's own points only.
    sweep = [label for label, _ in prebuild.gemm_launches("llama-3-8b:o", True, 2)]
    assert [label for label in sweep if "(" not in label] == [
        "llama-3-8b:o M=1",
        "llama-3-8b:o M=2",
    ]
