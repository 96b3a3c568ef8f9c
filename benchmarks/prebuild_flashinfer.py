"""Prebuild, without a GPU, the FlashInfer modules the flashinfer attention variant loads, for
sm_90a (H100/H200), so that the lent GPU host loads them instead of compiling them with nvcc
(minutes of a 30-minute GPU session).

    python benchmarks/prebuild_flashinfer.py                  # .flashinfer_aot_sm90/
    python benchmarks/prebuild_flashinfer.py --dtypes bfloat16 --head-sizes 128
    python benchmarks/prebuild_flashinfer.py --report     # on the host (gpu_run.sh)

What is built: one FA2 batch-prefill module per (head size, dtype) of the variant, from the
arguments its plan() passes (det_backend.flashinfer_variant.prefill_module_args), with
FlashInfer's own spec generator and ninja build (flashinfer/aot.py does the same for the
flashinfer-jit-cache wheel). FLASHINFER_CUDA_ARCH_LIST=9.0a: FlashInfer targets Hopper as
compute_90a/sm_90a (compilation_context.py _normalize_cuda_arch), as the host would.

How the host finds them: FlashInfer takes its AOT directory from an importable
`flashinfer_jit_cache` package (`__version__` must start with FlashInfer's version,
`get_jit_cache_dir()`; jit/env.py:100-132) and loads `<dir>/<uri>/<uri>.so` with no build when
it exists (jit/core.py:256-261, 307-309); other modules still JIT-compile as before. So the
output is such a package, holding only these modules:

    .flashinfer_aot_sm90/flashinfer_jit_cache/__init__.py
    .flashinfer_aot_sm90/flashinfer_jit_cache/jit_cache/<uri>/<uri>.so
    .flashinfer_aot_sm90/flashinfer_jit_cache/manifest.json

gpu_run.sh puts `.flashinfer_aot_sm90` on PYTHONPATH when it is carried. Relocating a JIT
workspace instead would not do: its build.ninja files name absolute source paths (this
machine's site-packages vs the host's /tmp/site), so ninja would see new commands and rebuild.

The modules are TVM-FFI libraries: they need libcudart.so.13 (torch cu130 brings it), the
tvm_ffi symbols that `import tvm_ffi` provides and the C/C++ runtime (GLIBCXX_3.4.26, GCC 9's
libstdc++: the manifest's "needs"), not libpython or libtorch (check() below refuses others),
so a Python 3.11 build serves the host's Python 3.12. Each one leaves its CTA_TILE_Q = 32
kernels undefined, as FlashInfer's own JIT build does (the generated sources instantiate 16, 64
and 128; the planner picks 32 only at head sizes of 512 and up): tvm_ffi dlopens with
RTLD_LAZY, and our pinned tiles are 128 and 64.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT_DIR = REPO / ".flashinfer_aot_sm90"
BUILD_DIR = Path.home() / ".cache" / "det_backend" / "flashinfer_build_sm90"
PACKAGE = "flashinfer_jit_cache"
ARCH = "9.0a"  # FLASHINFER_CUDA_ARCH_LIST's spelling of sm_90a
SM = "sm_90a"
# Shared libraries a module may need that the host has: CUDA 13's runtime (torch cu130 loads
# it) and driver, and the C/C++ runtime.
ALLOWED_NEEDED = re.compile(
    r"^lib(cudart\.so\.13|cuda\.so\.1|stdc\+\+\.so\.6|m\.so\.6|gcc_s\.so\.1|c\.so\.6)$"
)

INIT_PY = '''"""A minimal flashinfer-jit-cache: FlashInfer {version}'s modules for det_backend's
flashinfer attention variant, prebuilt for {sm} by benchmarks/prebuild_flashinfer.py."""

from pathlib import Path

__version__ = "{version}+cu{cuda}"


def get_jit_cache_dir() -> str:
    return str(Path(__file__).parent / "jit_cache")
'''


def _setup_env(build_dir: Path) -> None:
    """FlashInfer reads these at import: set them before importing it."""
    os.environ["FLASHINFER_CUDA_ARCH_LIST"] = ARCH
    os.environ["FLASHINFER_WORKSPACE_BASE"] = str(build_dir)
    # nvcc on PATH may be a wrapper script (/usr/local/bin/nvcc here), whose parent FlashInfer
    # would take for CUDA_HOME (cpp_ext.get_cuda_path) and then miss lib64/libcudart.
    if not os.environ.get("CUDA_HOME"):
        for home in ("/usr/local/cuda", "/usr/local/cuda-13.0"):
            if Path(home, "bin", "nvcc").exists():
                os.environ["CUDA_HOME"] = home
                break
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    _libcuda_stub(build_dir)
    if os.environ.get("FLASHINFER_DISABLE_JIT"):
        raise SystemExit("FLASHINFER_DISABLE_JIT is set: nothing can be built")


def _libcuda_stub(build_dir: Path) -> None:
    """FlashInfer links each module with -lcuda (cpp_ext.py generate_ninja_build_for_op), found
    on a GPU host as the driver or in the toolkit's lib64/stubs, which this toolkit lacks. An
    empty library named libcuda.so.1 serves the link (a shared object may leave the driver's
    symbols undefined); the module then needs libcuda.so.1, bound to the real driver at load."""
    if Path(
        os.environ.get("CUDA_HOME", "/usr/local/cuda"), "lib64", "stubs", "libcuda.so"
    ).exists():
        return
    stubs = build_dir / "libcuda_stub"
    stubs.mkdir(parents=True, exist_ok=True)
    (stubs / "empty.c").write_text("")
    subprocess.run(
        ["cc", "-shared", "-Wl,-soname,libcuda.so.1", "-o", str(stubs / "libcuda.so"),
         str(stubs / "empty.c")],
        check=True,
    )  # fmt: skip
    os.environ["FLASHINFER_EXTRA_LDFLAGS"] = f"-L{stubs}"


def specs(dtypes, head_sizes):
    from flashinfer.jit.attention import gen_batch_prefill_module

    from det_backend import flashinfer_variant

    # The module arguments come from the variant: build from the sources this checkout carries.
    source = REPO / "det_backend" / "flashinfer_variant.py"
    if Path(flashinfer_variant.__file__).read_bytes() != source.read_bytes():
        found = flashinfer_variant.__file__
        raise SystemExit(f"det_backend imports {found}, not {REPO}'s: install this checkout")
    return [
        gen_batch_prefill_module(*flashinfer_variant.prefill_module_args(head_size, dtype))
        for dtype in dtypes
        for head_size in head_sizes
    ]


def needed_libraries(so: Path) -> list[str]:
    out = subprocess.run(["readelf", "-d", str(so)], capture_output=True, text=True, check=True)
    return re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", out.stdout)


def check(so: Path) -> list[str]:
    """What would keep the host from loading so: a library it may lack (libpython, libtorch)."""
    return [lib for lib in needed_libraries(so) if not ALLOWED_NEEDED.search(lib)]


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in version.split("_")[-1].split("."))


def _needed_version(so: Path, prefix: str) -> str:
    """The newest symbol version so asks of glibc (GLIBC) or libstdc++ (GLIBCXX)."""
    out = subprocess.run(["readelf", "-V", str(so)], capture_output=True, text=True, check=True)
    return max(set(re.findall(rf"\b{prefix}_[0-9.]+\b", out.stdout)), key=_version_key)


def _version(distribution: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(distribution)


def _sha256(path: Path) -> str:
    return hashlib.file_digest(path.open("rb"), "sha256").hexdigest()


def package(jit_specs, out_dir: Path) -> dict:
    """Copy the built modules into a fresh flashinfer_jit_cache package under out_dir (put in
    place only once complete and checked: a half-written one is never left to carry)."""
    import flashinfer
    from flashinfer.jit.cpp_ext import get_cuda_version

    cuda = get_cuda_version()
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    pkg = staging / PACKAGE
    (pkg / "jit_cache").mkdir(parents=True)
    version = flashinfer.__version__
    (pkg / "__init__.py").write_text(
        INIT_PY.format(version=version, sm=SM, cuda=f"{cuda.major}{cuda.minor}")
    )
    modules = {}
    for spec in jit_specs:
        dst = pkg / "jit_cache" / spec.name / f"{spec.name}.so"
        dst.parent.mkdir()
        shutil.copy2(spec.jit_library_path, dst)
        bad = check(dst)
        if bad:
            raise SystemExit(f"{spec.name}.so needs {bad}, which the GPU host may lack")
        modules[spec.name] = {"bytes": dst.stat().st_size, "sha256": _sha256(dst)}
    manifest = {
        "flashinfer": version,
        "arch": SM,
        "nvcc": str(cuda),
        "tvm_ffi": _version("apache-tvm-ffi"),
        "python_built_with": sys.version.split()[0],
        "needs": {
            prefix: max(
                (_needed_version(p, prefix) for p in pkg.glob("jit_cache/*/*.so")), key=_version_key
            )
            for prefix in ("GLIBC", "GLIBCXX")
        },  # fmt: skip
        "command": " ".join(sys.argv),
        "modules": modules,
    }
    (pkg / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    return manifest


def report() -> int:
    """On the host, with the package on PYTHONPATH: where FlashInfer's AOT directory points, how
    many modules it holds, and which of the variant's it lacks. 1 if it must not be used:
    FlashInfer refuses it, a module does not load here (e.g. an older libstdc++ than the
    manifest's "needs"), or the GPU is not sm_90 (FlashInfer would load sm_90a code anyway)."""
    try:
        import flashinfer.jit.env as jit_env
    except RuntimeError as e:  # the package's version is not this FlashInfer's (jit/env.py)
        print(f"flashinfer AOT package not usable: {e}")
        return 1
    from det_backend import flashinfer_variant

    found = sorted(jit_env.FLASHINFER_AOT_DIR.glob("*/*.so"))
    missing = flashinfer_variant.missing_aot_modules()
    wanted = len(flashinfer_variant.SUPPORTED_HEAD_SIZES) * len(flashinfer_variant.SUPPORTED_DTYPES)
    print(
        f"flashinfer AOT dir {jit_env.FLASHINFER_AOT_DIR}: {len(found)} modules, "
        f"{sum(p.stat().st_size for p in found) / 2**20:.1f} MiB; the flashinfer variant's: "
        f"{wanted - len(missing)} of {wanted} found" + "".join(f"\n  missing {n}" for n in missing)
    )
    manifest = jit_env.FLASHINFER_AOT_DIR.parent / "manifest.json"
    if manifest.exists():
        # The modules call TVM-FFI's C API (vLLM 0.26 pins apache-tvm-ffi 0.1.10).
        built, here = json.loads(manifest.read_text())["tvm_ffi"], _version("apache-tvm-ffi")
        if built != here:
            print(f"warning: built against apache-tvm-ffi {built}, this host has {here}")
    import torch  # first, as in FlashInfer's use: it brings libcudart.so.13
    import tvm_ffi

    for so in found:
        try:
            tvm_ffi.load_module(str(so))  # dlopen, as JitSpec.load does
        except Exception as e:  # any load failure means: leave it to FlashInfer's JIT
            print(f"not used: {so.name} does not load here: {e}")
            return 1
    print(f"loaded {len(found)} of {len(found)}")
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        found = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA GPU"
        print(f"not used: built for {SM}, found {found}")
        return 1
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--build-dir", type=Path, default=BUILD_DIR, help="ninja workspace, kept")
    parser.add_argument("--dtypes", nargs="*", default=["float16", "bfloat16"])
    parser.add_argument("--head-sizes", nargs="*", type=int, default=None)
    parser.add_argument("--verbose", action="store_true", help="show nvcc command lines")
    parser.add_argument("--report", action="store_true", help="what the host finds; no build")
    args = parser.parse_args()
    if args.report:
        sys.exit(report())
    _setup_env(args.build_dir)

    import torch
    from flashinfer.jit import build_jit_specs

    from det_backend.flashinfer_variant import SUPPORTED_HEAD_SIZES

    start = time.perf_counter()
    dtypes = [getattr(torch, d) for d in args.dtypes]
    jit_specs = specs(dtypes, args.head_sizes or SUPPORTED_HEAD_SIZES)
    jobs = os.environ["MAX_JOBS"]
    print(f"building {len(jit_specs)} modules for {SM}, MAX_JOBS={jobs}, in {args.build_dir}")
    build_jit_specs(jit_specs, verbose=args.verbose, skip_prebuilt=False)
    manifest = package(jit_specs, args.out)
    total = sum(m["bytes"] for m in manifest["modules"].values())
    for name, m in manifest["modules"].items():
        print(f"  {m['bytes'] / 2**20:6.2f} MiB  {name}")
    print(
        f"{len(jit_specs)} modules, {total / 2**20:.2f} MiB in {args.out}, "
        f"{time.perf_counter() - start:.0f} s"
    )


if __name__ == "__main__":
    main()
