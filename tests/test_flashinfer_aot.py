"""FlashInfer modules prebuilt for sm_90a (benchmarks/prebuild_flashinfer.py): FlashInfer loads
them instead of compiling them, for exactly the modules our planner asks for.

No CUDA anywhere here: what the planner asks for is caught at FlashInfer's module lookup,
and FlashInfer's AOT decision (JitSpec.is_aot, from jit/env.py's flashinfer_jit_cache lookup)
is read in subprocesses that see a package on their PYTHONPATH, since FlashInfer fixes its
AOT directory when it is first imported. Tests of the built folder skip when it is absent.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from det_backend import flashinfer_variant as fi

flashinfer = pytest.importorskip("flashinfer")
REPO = Path(__file__).parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import prebuild_flashinfer as prebuild  # noqa: E402
from flashinfer.jit.attention import get_batch_prefill_uri  # noqa: E402

BUILT = REPO / ".flashinfer_aot_sm90" / prebuild.PACKAGE
VARIANT_MODULES = {
    (head_size, dtype): get_batch_prefill_uri(*fi.prefill_module_args(head_size, dtype))
    for head_size in fi.SUPPORTED_HEAD_SIZES
    for dtype in fi.SUPPORTED_DTYPES
}
needs_build = pytest.mark.skipif(
    not BUILT.is_dir(), reason="no .flashinfer_aot_sm90 (python benchmarks/prebuild_flashinfer.py)"
)


class _Looked(Exception):
    """Raised where FlashInfer would build or load the module: the lookup is all we need."""


@pytest.fixture
def module_lookups(monkeypatch) -> list[tuple]:
    """The arguments of every get_batch_prefill_module call the wrappers make, with no CUDA:
    plan() is stopped at that call, and the wrappers' page-locked buffers are plain ones."""
    import flashinfer.prefill as prefill

    calls = []

    def lookup(*args):
        calls.append(args)
        raise _Looked

    class _Torch(types.ModuleType):
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def empty(*args, pin_memory=False, **kwargs):
            return torch.empty(*args, **kwargs)

    monkeypatch.setattr(prefill, "get_batch_prefill_module", lookup)
    monkeypatch.setattr(prefill, "torch", _Torch("torch"))
    return calls


@pytest.mark.parametrize("dtype", fi.SUPPORTED_DTYPES)
@pytest.mark.parametrize("head_size", fi.SUPPORTED_HEAD_SIZES)
def test_planner_asks_for_the_prebuilt_module(module_lookups, head_size, dtype):
    """Our planner (CUDA-graph wrapper) and the tests' vLLM-style control plan (plain wrapper,
    test_attention_flashinfer.run_as_vllm) both ask for prefill_module_args: the prebuilt one."""
    with pytest.raises(_Looked):
        fi.FlashInferPlanner(4, 256, 64, 32, 8, head_size, 16, dtype, torch.device("cpu"))
    wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
        torch.empty(1024, dtype=torch.uint8), "NHD", backend="fa2"
    )
    qo = torch.tensor([0, 3], dtype=torch.int32)
    with pytest.raises(_Looked):
        wrapper.plan(qo, torch.tensor([0, 1], dtype=torch.int32), torch.zeros(1, dtype=torch.int32),
                     torch.tensor([3], dtype=torch.int32), 32, 8, head_size, 16, causal=True,
                     sm_scale=0.1, q_data_type=dtype, disable_split_kv=True)  # fmt: skip
    assert module_lookups == [fi.prefill_module_args(head_size, dtype)] * 2


def _fake_package(root: Path, version: str, modules) -> Path:
    """A flashinfer_jit_cache package as prebuild_flashinfer.py writes it, with empty files for
    modules: FlashInfer's AOT decision only asks whether the file exists."""
    pkg = root / prebuild.PACKAGE
    (pkg / "jit_cache").mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        prebuild.INIT_PY.format(version=version, sm=prebuild.SM, cuda=130)
    )
    for name in modules:
        (pkg / "jit_cache" / name).mkdir()
        (pkg / "jit_cache" / name / f"{name}.so").touch()
    return root


def _run(package_root: Path, tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    """python argv in a fresh interpreter with package_root on PYTHONPATH and no nvcc reachable;
    FlashInfer's generated sources go under tmp_path, not the user's cache."""
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH")},
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": os.pathsep.join([str(package_root), *sys.path]),
        # gen_jit_spec refuses to run with no target arch (no GPU here): the host's, sm_90a.
        "FLASHINFER_CUDA_ARCH_LIST": prebuild.ARCH,
        "FLASHINFER_WORKSPACE_BASE": str(tmp_path / "workspace"),
    }
    return subprocess.run(
        [sys.executable, *argv], env=env, capture_output=True, text=True, timeout=300
    )


REPORT = (str(REPO / "benchmarks" / "prebuild_flashinfer.py"), "--report")
LOADER_DECISION = """
import json, torch
from flashinfer.jit import env
from flashinfer.jit.attention import gen_batch_prefill_module
from det_backend import flashinfer_variant as fi
aot = {spec.name: spec.is_aot for spec in (
    gen_batch_prefill_module(*fi.prefill_module_args(h, d))
    for h in fi.SUPPORTED_HEAD_SIZES for d in fi.SUPPORTED_DTYPES)}
print(json.dumps({"dir": str(env.FLASHINFER_AOT_DIR), "aot": aot,
                  "missing": fi.missing_aot_modules(), "problems": fi.platform_problems()}))
"""


def _loader_decision(package_root: Path, tmp_path: Path) -> dict:
    run = _run(package_root, tmp_path, "-c", LOADER_DECISION)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.splitlines()[-1])


def test_flashinfer_loads_what_the_package_holds(tmp_path):
    """With the package importable, FlashInfer's AOT directory is its jit_cache, the modules it
    holds are AOT (loaded, never built) and the others are not; the variant's start-up check
    counts the same ones and, without nvcc, refuses only while some are missing."""
    held = [VARIANT_MODULES[128, torch.bfloat16], VARIANT_MODULES[64, torch.float16]]
    root = _fake_package(tmp_path, flashinfer.__version__, held)
    seen = _loader_decision(root, tmp_path)
    assert Path(seen["dir"]) == root / prebuild.PACKAGE / "jit_cache"
    assert seen["aot"] == {name: name in held for name in VARIANT_MODULES.values()}
    assert sorted(seen["missing"]) == sorted(set(VARIANT_MODULES.values()) - set(held))
    assert any("no nvcc" in p and "4 of its head sizes" in p for p in seen["problems"])

    for name in set(VARIANT_MODULES.values()) - set(held):
        (root / prebuild.PACKAGE / "jit_cache" / name).mkdir()
        (root / prebuild.PACKAGE / "jit_cache" / name / f"{name}.so").touch()
    seen = _loader_decision(root, tmp_path)
    assert all(seen["aot"].values()) and seen["missing"] == []
    assert not any("nvcc" in p for p in seen["problems"]), seen["problems"]


def test_report_refuses_another_version_or_unloadable_modules(tmp_path):
    """FlashInfer raises at import on a flashinfer_jit_cache of another version (jit/env.py),
    and a module the host cannot dlopen would fail at first use: gpu_run.sh must then leave
    the package off PYTHONPATH, which the report's status says."""
    root = _fake_package(tmp_path, "0.0.1", VARIANT_MODULES.values())
    run = _run(root, tmp_path, *REPORT)
    assert run.returncode == 1 and "not usable" in run.stdout, run.stdout + run.stderr[-2000:]
    root = _fake_package(tmp_path / "same", flashinfer.__version__, VARIANT_MODULES.values())
    run = _run(root, tmp_path, *REPORT)
    assert "the flashinfer variant's: 6 of 6 found" in run.stdout, run.stdout + run.stderr[-2000:]
    # Found, but empty files: a module that does not load leaves the package unused.
    assert run.returncode == 1 and "does not load here" in run.stdout, run.stdout


# The built folder --------------------------------------------------------------------------


LOAD = """
import json, os
from flashinfer.jit import env
from flashinfer.jit.attention import gen_batch_prefill_module
from det_backend import flashinfer_variant as fi
loaded = {}
for h in fi.SUPPORTED_HEAD_SIZES:
    for d in fi.SUPPORTED_DTYPES:
        spec = gen_batch_prefill_module(*fi.prefill_module_args(h, d))
        module = spec.build_and_load()
        loaded[spec.name] = [spec.is_aot] + [callable(getattr(module, f))
                                             for f in ("plan", "ragged_run", "paged_run")]
print(json.dumps({"dir": str(env.FLASHINFER_AOT_DIR), "loaded": loaded,
                  "jit_dir_made": env.FLASHINFER_JIT_DIR.exists()}))
"""


@needs_build
def test_flashinfer_loads_every_built_module_without_nvcc(tmp_path):
    """FlashInfer's own build_and_load, with no nvcc reachable, loads each of the variant's
    modules from the package (dlopen: libcudart.so.13 comes with torch) and finds the three
    functions it calls (prefill.py get_batch_prefill_module); its JIT directory, where a
    build would go, is never made."""
    run = _run(BUILT.parent, tmp_path, "-c", LOAD)
    assert run.returncode == 0, f"rebuild without --dtypes/--head-sizes? {run.stderr[-3000:]}"
    seen = json.loads(run.stdout.splitlines()[-1])
    assert Path(seen["dir"]) == BUILT / "jit_cache"
    assert seen["loaded"] == {name: [True] * 4 for name in VARIANT_MODULES.values()}
    assert not seen["jit_dir_made"]


@needs_build
def test_built_modules_match_manifest_and_this_flashinfer():
    manifest = json.loads((BUILT / "manifest.json").read_text())
    assert manifest["flashinfer"] == flashinfer.__version__
    found = {p.parent.name: p for p in (BUILT / "jit_cache").glob("*/*.so")}
    assert set(found) == set(manifest["modules"])
    for name, path in found.items():
        assert prebuild._sha256(path) == manifest["modules"][name]["sha256"], name


@needs_build
@pytest.mark.skipif(not shutil.which("readelf"), reason="no readelf")
def test_built_modules_need_neither_python_nor_torch():
    """Each module needs only the CUDA 13 runtime and driver and the C/C++ runtime (no
    libtorch), and uses no Python C API: Python 3.12 loads what 3.11 built."""
    for so in (BUILT / "jit_cache").glob("*/*.so"):
        assert prebuild.check(so) == [], f"{so.name} needs {prebuild.needed_libraries(so)}"
        symbols = subprocess.run(["readelf", "-W", "--dyn-syms", str(so)], capture_output=True,
                                 text=True, check=True).stdout  # fmt: skip
        undefined = re.findall(r"\sUND\s+(\S+)$", symbols, re.M)
        assert not [s for s in undefined if s.startswith(("Py", "_Py"))], so.name


@needs_build
def test_report_loads_every_built_module(tmp_path):
    run = _run(BUILT.parent, tmp_path, *REPORT)
    assert "the flashinfer variant's: 6 of 6 found" in run.stdout, run.stdout + run.stderr[-2000:]
    assert "loaded 6 of 6" in run.stdout, run.stdout


CUOBJDUMP = shutil.which("cuobjdump") or str(
    Path(__import__("triton").__file__).parent / "backends/nvidia/bin/cuobjdump"
)


@needs_build
@pytest.mark.skipif(not Path(CUOBJDUMP).exists(), reason="no cuobjdump")
def test_built_modules_hold_sm90_code_only():
    """sm_90 cubins and no PTX: nothing left for the driver to compile at load."""
    for so in (BUILT / "jit_cache").glob("*/*.so"):
        elf = subprocess.run([CUOBJDUMP, "--list-elf", str(so)], capture_output=True, text=True)
        cubins = re.findall(r"\.(sm_\d+a?)\.cubin", elf.stdout)
        assert cubins and set(cubins) <= {"sm_90", "sm_90a"}, (so.name, elf.stdout[-500:])
        ptx = subprocess.run([CUOBJDUMP, "--list-ptx", str(so)], capture_output=True, text=True)
        assert ".ptx" not in ptx.stdout, so.name
