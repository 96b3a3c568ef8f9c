"""Prebuild Triton's on-disk kernel cache for sm_90 (H100/H200) on a machine without a GPU, so
that the lent GPU host loads each kernel instead of compiling it (JIT compiles took most of a
GPU call: ~80 s per point of `gemm.py --sweep`).

    python benchmarks/prebuild_cache.py --what gemm-sweep            # .triton_cache_sm90/
    python benchmarks/prebuild_cache.py --what gemm --layers llama-3-8b:o,llama-3-8b:down
    python benchmarks/prebuild_cache.py --what gemm-sweep,attention-tests  # both, one folder
    python benchmarks/prebuild_cache.py --relocate DIR               # on the host (gpu_run.sh)
    python benchmarks/prebuild_cache.py --merge triton_new.tgz       # what a GPU call compiled

How: the real launchers run on CPU tensors while (1) Triton's active driver reports the target
cuda:90 and (2) every `kernel[grid](...)` is a warm-up (compile, no launch). So each kernel is
specialized by the JIT's own code (`JITFunction.run`: dtypes, 16-byte alignment of pointers,
ints divisible by 16 or equal to 1, constexprs, num_warps/num_stages) and written by
`triton.compile` under the key the host computes for the same launch. The matmul launcher's
device queries answer for an H100/H200 (sm_90, 132 SMs: both have 132). `attention-tests`
runs the GPU tests of tests/test_attention.py as written on CPU tensors, asserts stripped and
checks no-ops (`attention_test_launches`); the attention launcher asks the device nothing.
Entries keep only what a hit reads (.json, .cubin): 1/7 of the bytes.

What the host must share for its key to match ours (`triton.runtime.cache.get_cache_key`):
- `triton_key()`: Triton's version, its Python sources and the bytes of `_C/libtriton.so`. The
  sources and the bundled ptxas are identical in the cp311 and cp312 wheels of triton 3.6.0
  (their RECORDs differ only in libtriton.so and proton), so for the host's Python 3.12 we
  swap in the cp312 wheel's libtriton.so hash (`HOST_LIBTRITON_SHA256`). The host prints its
  own key next to ours (`--relocate`), so a mismatch shows at once.
- the backend hash: `ptxas --version` of the ptxas in the wheel (unless TRITON_PTXAS_PATH
  is set) and the arch (90); nothing from the CUDA driver or libcuda.
- the options (num_warps, num_stages, debug, ...) and the cache-invalidating TRITON_* env
  vars, none set by gpu_run.sh.

Triton's cache records each entry's files by absolute path (`__grp__*.json`), so a carried
cache must be relocated before use: `--relocate DIR` rewrites those paths to DIR (gpu_run.sh
does it). Launchers (`__triton_launcher.so`, one per signature) and `cuda_utils.so` are
C extensions built for the host's Python and are still built there (about a second each).

What the prebuild cannot reach (the kernels a real engine launches: ours at the model's shapes,
vLLM's own sampler and cache kernels, the launchers) the host can send back: with
TRITON_EXPORT=1, gpu_run.sh packs after each mode what the call compiled into
$OUT/triton_new.tgz (`--export`), and `--merge` adds it here for the next session to carry.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import inspect
import itertools
import json
import os
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE_DIR = REPO / ".triton_cache_sm90"
MANIFEST = "prebuild.json"
# sha256 of triton/_C/libtriton.so in triton-3.6.0-cp312-cp312-manylinux_2_27_x86_64
# .manylinux_2_28_x86_64.whl (PyPI), the GPU host's Python 3.12 build.
HOST_LIBTRITON_SHA256 = {
    "3.6.0": "28daaa70a904e4f8add754e518533e8a69b94ab8b16431ce77d45f1f25282b87",
}
# H100 SXM and H200 both have 132 SMs; the TMA matmul's grid and NUM_PROGRAMS depend on it.
SM90_SMS = 132


def triton_key(host_libtriton: str | None = None) -> str:
    """This process's triton_key(), the part of every cache key that depends on the Triton
    build (and so on the Python version); with host_libtriton, the host's."""
    from triton.runtime.cache import triton_key

    key = triton_key()
    return key.replace(_libtriton_sha256(), host_libtriton) if host_libtriton else key


def key_sha256(host_libtriton: str | None = None) -> str:
    return hashlib.sha256(triton_key(host_libtriton).encode()).hexdigest()


def _libtriton_sha256() -> str:
    import sysconfig

    import triton

    ext = sysconfig.get_config_var("EXT_SUFFIX").split(".")[-1]
    path = Path(triton.__file__).parent / "_C" / f"libtriton.{ext}"
    return hashlib.file_digest(path.open("rb"), "sha256").hexdigest()


class _Sm90Driver:
    """Just enough of a Triton driver for JITFunction.run to specialize and compile."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int) -> int:
        return 0


@contextlib.contextmanager
def compile_only_sm90(host_libtriton: str | None):
    """Within: every Triton launch compiles for cuda:90 into the cache and launches nothing.
    host_libtriton: sha256 of the host's libtriton.so, swapped into triton_key()."""
    import triton.runtime.cache as tcache
    from det_backend.kernels import matmul as mm
    from triton import knobs
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    counts = {"compiled": 0, "hit": 0, "names": set()}

    def listener(*, src, metadata, metadata_group, times, cache_hit):
        counts["hit" if cache_hit else "compiled"] += 1
        counts["names"].add(metadata["name"])

    run, key = JITFunction.run, tcache.triton_key
    host_key = triton_key(host_libtriton)
    saved = {n: getattr(mm, n) for n in ("_device_info", "gpu_family", "_INTERPRETER_PROGRAMS")}
    active = driver._active  # None without a GPU; reset_active() would raise
    driver.set_active(_Sm90Driver())
    JITFunction.run = lambda self, *a, grid, warmup, **kw: run(
        self, *a, grid=grid, warmup=True, **kw
    )
    tcache.triton_key = lambda: host_key
    knobs.compilation.listener = listener
    # CPU tensors take the launcher's non-CUDA branches: make those answer as an H100/H200.
    mm._device_info = lambda index: ((9, 0), SM90_SMS)
    mm.gpu_family = lambda device: mm.SM90
    mm._INTERPRETER_PROGRAMS = SM90_SMS
    try:
        yield counts
    finally:
        for name, value in saved.items():
            setattr(mm, name, value)
        knobs.compilation.listener = None
        tcache.triton_key = key
        JITFunction.run = run
        driver._active = active


def gemm_launches(layers: str | None, sweep: bool, max_m: int):
    """Every matmul call of benchmarks/gemm.py (table config per point, + candidates if sweep),
    on CPU tensors shaped and sliced as gemm.py slices them (x_all[:m])."""
    import torch
    from det_backend.kernels.matmul import MATMUL_CANDIDATES, matmul
    from gemm import M_VALUES, select_shapes, sweep_fits

    for model, layer, n, k in select_shapes(layers):
        # torch.empty: address space only, never touched (no launch reads it).
        w = torch.empty(n, k, dtype=torch.bfloat16)
        x_all = torch.empty(max_m, k, dtype=torch.bfloat16)
        for m in (m for m in M_VALUES if m <= max_m):
            x = x_all[:m]
            yield f"{model}:{layer} M={m}", lambda x=x, w=w: matmul(x, w)
            if not sweep and m > 1:
                # An engine's M is any number (prefill chunks): M = m - 1 is the other
                # specialization of the same table entry (M not a multiple of 16, or 1).
                x = x_all[: m - 1]
                yield f"{model}:{layer} M={m - 1}", lambda x=x, w=w: matmul(x, w)
            if sweep:
                for cfg in (c for c in MATMUL_CANDIDATES if sweep_fits(c, m)):
                    yield (
                        f"{model}:{layer} M={m} {cfg}",
                        lambda x=x, w=w, c=cfg: matmul(x, w, config=c),
                    )


def attention_test_launches(tests: str | None):
    """Every GPU-marked test of tests/test_attention.py, in each parametrization, its body run
    as written with device "cpu": every launch it makes on the GPU, with the same arguments
    (the tests draw their inputs on CPU generators, and a CPU tensor is 16-byte aligned
    wherever the CUDA one is: base allocations are, and views keep the same offsets). Nothing
    is checked: the test's `assert` statements are stripped and its checking helpers are
    no-ops (`_unchecked`), since no output is ever computed. tests: comma-separated
    substrings of the labels to keep (default all)."""
    module = _load_without_asserts(REPO / "tests" / "test_attention.py")
    wanted = tests.split(",") if tests else None
    for name, fn in list(vars(module).items()):
        marks = getattr(fn, "pytestmark", [])
        if not name.startswith("test_") or not any(m.name == "gpu" for m in marks):
            continue
        for params in _parametrizations(marks):
            label = f"{name}[{'-'.join(f'{k}={v}' for k, v in params.items())}]"
            if wanted is None or any(w in label for w in wanted):
                yield label, lambda fn=fn, params=params: _run_unchecked(fn, params)


def _load_without_asserts(path: Path) -> types.ModuleType:
    """Import a test file as a plain module with its `assert` statements removed (what
    `python -O` does, for this file only: Triton and the kernels keep theirs)."""

    class StripAsserts(ast.NodeTransformer):
        def visit_Assert(self, node):
            return ast.copy_location(ast.Pass(), node)

    tests_dir = str(path.parent)
    if tests_dir not in sys.path:
        sys.path.insert(0, tests_dir)  # for the tests' own helpers (attention_inputs)
    tree = StripAsserts().visit(ast.parse(path.read_text(), str(path)))
    module = types.ModuleType(path.stem)
    module.__file__ = str(path)
    exec(compile(tree, str(path), "exec"), module.__dict__)
    # The float64 reference (slow on CPU at these shapes) and the bitwise comparison.
    module.reference = module.assert_rows_equal = lambda *args, **kwargs: None
    return module


def _parametrizations(marks) -> list[dict]:
    """The argument sets pytest makes from a test's parametrize marks (no pytest.param)."""
    axes = []
    for mark in (m for m in marks if m.name == "parametrize"):
        names, values = mark.args[0], mark.args[1]
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else names
        axes.append([dict(zip(names, v if len(names) > 1 else (v,), strict=True)) for v in values])
    return [{k: v for axis in combo for k, v in axis.items()} for combo in itertools.product(*axes)]


def _run_unchecked(fn, params: dict) -> None:
    kwargs = {}
    for name in inspect.signature(fn).parameters:
        if name not in params and name != "device":
            raise ValueError(f"{fn.__name__}: fixture {name!r} has no CPU value here")
        kwargs[name] = params.get(name, "cpu")
    with _unchecked():
        fn(**kwargs)


@contextlib.contextmanager
def _unchecked():
    """What the GPU tests call besides launches, as no-ops: torch.testing.assert_close, and
    CUDA-graph capture and replay (test_attention_cuda_graph_replay): the capture's launch is
    its warm-up's (already compiled; the test asserts the capture compiles nothing), a replay
    compiles nothing, and the test's eager launches around them still run."""
    import torch

    patches = {
        (torch.testing, "assert_close"): lambda *args, **kwargs: None,
        (torch.cuda, "synchronize"): lambda *args, **kwargs: None,
        (torch.cuda, "CUDAGraph"): lambda: types.SimpleNamespace(replay=lambda: None),
        (torch.cuda, "graph"): lambda *args, **kwargs: contextlib.nullcontext(),
    }
    saved = {(obj, name): getattr(obj, name) for obj, name in patches}
    for (obj, name), value in patches.items():
        setattr(obj, name, value)
    try:
        yield
    finally:
        for (obj, name), value in saved.items():
            setattr(obj, name, value)


# Each build, the kernels file whose launches it compiles.
WHATS = {"gemm": "matmul", "gemm-sweep": "matmul", "attention-tests": "attention"}


def parse_what(values: list[str] | None) -> list[str]:
    """--what, given several times and/or as comma lists, in order, each once."""
    whats = [w.strip() for v in values or ["gemm-sweep"] for w in v.split(",") if w.strip()]
    for w in whats:
        if w not in WHATS:
            raise ValueError(f"--what {w!r}: one of {', '.join(WHATS)}")
    return list(dict.fromkeys(whats))


def build(
    what: str,
    out: Path,
    host_libtriton: str | None,
    layers: str | None = None,
    max_m: int = 8192,
    tests: str | None = None,
    keep_ir: bool = False,
):
    import importlib

    import triton
    from triton import knobs

    source = WHATS[what]
    kernels = importlib.import_module(f"det_backend.kernels.{source}")
    # A kernel's key hashes its source: build from the sources this checkout will carry.
    if Path(kernels.__file__).read_bytes() != (REPO / "kernels" / f"{source}.py").read_bytes():
        raise SystemExit(
            f"det_backend imports {kernels.__file__}, not {REPO}'s: install this checkout"
        )
    if what == "attention-tests":
        launches, params = attention_test_launches(tests), {"tests": tests}
    else:
        launches = gemm_launches(layers, what == "gemm-sweep", max_m)
        params = {"layers": layers, "max_m": max_m}
    out.mkdir(parents=True, exist_ok=True)
    knobs.cache.dir = str(out)
    start = time.perf_counter()
    errors, labels = {}, []
    with compile_only_sm90(host_libtriton) as counts:
        for label, launch in launches:
            labels.append(label)
            try:
                launch()
            except Exception as e:  # gemm.py records such a config as an error, so do we
                errors[label] = f"{type(e).__name__}: {str(e)[:200]}"
    seconds = time.perf_counter() - start
    if not keep_ir:
        strip_to_binaries(out)
    manifest_path = out / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"builds": []}
    manifest["triton"] = triton.__version__
    manifest["host_triton_key_sha256"] = key_sha256(host_libtriton)
    manifest["builds"].append(
        {
            "what": what,
            **params,
            "launches": len(labels),
            "compiled": counts["compiled"],
            "already_cached": counts["hit"],
            "kernels": sorted(counts["names"]),
            "errors": errors,
            "seconds": round(seconds, 1),
        }
    )
    manifest_path.write_text(json.dumps(manifest, indent=1))
    entries, size = cache_stats(out)
    print(
        f"{what}: {counts['compiled']} compiled, {counts['hit']} already cached, "
        f"{len(errors)} errors, {seconds:.0f} s; {out}: {entries} kernels, {size / 2**20:.1f} MiB"
    )
    for label, err in errors.items():
        print(f"  error {label}: {err}")


def strip_to_binaries(cache: Path) -> None:
    """Keep of each entry only what a cache hit reads (`triton.compiler.compile` ->
    `CompiledKernel`: the metadata .json and the .cubin); the IRs (.source, .ttir, .ttgir,
    .llir, .ptx) are for reading only and are 85% of the bytes. `get_group` returns the
    children listed in the group file, so those are listed no more."""
    for grp in cache.glob("*/__grp__*.json"):
        paths = json.loads(grp.read_text()).get("child_paths", {})
        keep = {name: p for name, p in paths.items() if name.endswith((".json", ".cubin"))}
        for name in paths.keys() - keep.keys():
            (grp.parent / name).unlink(missing_ok=True)
        if keep != paths:
            grp.write_text(json.dumps({"child_paths": keep}))


def cache_stats(cache: Path) -> tuple[int, int]:
    """(kernel entries, bytes) of a Triton cache directory."""
    entries = sum(1 for _ in cache.glob("*/__grp__*.json"))
    size = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
    return entries, size


def relocate(cache: Path) -> None:
    """Point every entry's group file at `cache` (Triton stores absolute paths), then say
    whether this host's Triton computes the key the cache was built for."""
    moved = 0
    for grp in cache.glob("*/__grp__*.json"):
        data = json.loads(grp.read_text())
        paths = data.get("child_paths", {})
        new = {name: str(grp.parent / Path(p).name) for name, p in paths.items()}
        if new != paths:
            grp.write_text(json.dumps({"child_paths": new}))
            moved += 1
    manifest = cache / MANIFEST
    built_for = (
        json.loads(manifest.read_text())["host_triton_key_sha256"] if manifest.exists() else None
    )
    here = key_sha256()
    verdict = (
        "matches"
        if built_for == here
        else f"DIFFERS from the cache's {str(built_for)[:16]}: expect misses (rebuild with "
        f"--host-libtriton {_libtriton_sha256()})"
    )
    print(
        f"prebuilt Triton cache {cache}: {cache_stats(cache)[0]} kernels, {moved} relocated; "
        f"this host's triton_key {here[:16]} {verdict}"
    )


EXPORT_LIMIT_BYTES = 15 * 2**20  # a file back from the device host: at most 16 MiB


def export_new(cache: Path, since: Path, out: Path) -> None:
    """On the host: pack into `out` (.tgz) the cache entries written after the file `since`
    was touched (kernels and launchers this call compiled), each stripped to what a hit reads,
    so that `--merge` adds them to the carried cache and the next session loads them. Nothing
    is written when nothing is new or the pack is over EXPORT_LIMIT_BYTES (said so)."""
    import shutil
    import tarfile
    import tempfile

    mark = since.stat().st_mtime
    new = [
        d
        for d in cache.iterdir()
        if d.is_dir() and any(f.stat().st_mtime > mark for f in d.iterdir() if f.is_file())
    ]
    if not new:
        print(f"triton export: nothing new in {cache}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        for d in new:
            shutil.copytree(d, Path(tmp, d.name))
        strip_to_binaries(Path(tmp))
        part = out.with_suffix(".part")
        with tarfile.open(part, "w:gz") as tar:
            for d in sorted(Path(tmp).iterdir()):
                tar.add(d, arcname=d.name)
    size = part.stat().st_size
    if size > EXPORT_LIMIT_BYTES:
        part.unlink()
        print(f"triton export: {len(new)} new entries, {size / 2**20:.1f} MiB: over the limit")
        return
    part.rename(out)
    print(f"triton export: {len(new)} new entries, {size / 2**20:.1f} MiB -> {out}")


def merge(pack: Path, into: Path) -> None:
    """Here: add an --export pack's entries to the carried cache `into`; entries already
    there are kept as they are. Only <entry>/<file> members are read."""
    import tarfile

    into.mkdir(parents=True, exist_ok=True)
    added, kept = set(), set()
    with tarfile.open(pack, "r:gz") as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) != 2 or ".." in parts:
                continue
            entry = parts[0]
            if entry in kept or (entry not in added and (into / entry).exists()):
                kept.add(entry)
                continue
            added.add(entry)
            (into / entry).mkdir(exist_ok=True)
            (into / entry / parts[1]).write_bytes(tar.extractfile(member).read())
    entries, size = cache_stats(into)
    print(
        f"merged {pack}: {len(added)} entries added, {len(kept)} already there; "
        f"{into}: {entries} kernels, {size / 2**20:.1f} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--what",
        action="append",
        help="gemm (the table), gemm-sweep (default) or attention-tests; repeat or comma-join",
    )
    parser.add_argument("--layers", help="comma-separated model:layer of gemm.py (default all)")
    parser.add_argument("--max-m", type=int, default=8192)
    parser.add_argument(
        "--tests", help="attention-tests: comma-separated substrings of test labels (default all)"
    )
    parser.add_argument("--out", type=Path, default=CACHE_DIR)
    parser.add_argument(
        "--keep-ir", action="store_true", help="keep each kernel's IRs (default: cubin only)"
    )
    parser.add_argument(
        "--host-libtriton",
        default="auto",
        help="sha256 of the host's libtriton.so ('auto': the cp312 wheel's; 'local': this one's)",
    )
    parser.add_argument("--relocate", type=Path, help="on the host: fix a carried cache's paths")
    parser.add_argument(
        "--export",
        nargs=3,
        type=Path,
        metavar=("CACHE", "MARK", "TGZ"),
        help="on the host: pack CACHE's entries newer than the file MARK into TGZ",
    )
    parser.add_argument(
        "--merge", type=Path, metavar="TGZ", help="here: add an --export pack to --out's cache"
    )
    args = parser.parse_args()
    if args.relocate:
        relocate(args.relocate)
        return
    if args.export:
        export_new(*args.export)
        return
    if args.merge:
        merge(args.merge, args.out)
        return
    import triton

    host = {"auto": HOST_LIBTRITON_SHA256.get(triton.__version__), "local": None}.get(
        args.host_libtriton, args.host_libtriton
    )
    if args.host_libtriton == "auto" and host is None:
        raise SystemExit(f"no host libtriton.so hash for triton {triton.__version__}; pass one")
    if os.environ.get("TRITON_INTERPRET"):
        raise SystemExit("prebuild_cache.py compiles for sm_90: unset TRITON_INTERPRET")
    try:
        whats = parse_what(args.what)
    except ValueError as e:
        parser.error(str(e))
    sys.path.insert(0, str(Path(__file__).parent))
    for what in whats:
        build(what, args.out, host, args.layers, args.max_m, args.tests, args.keep_ir)


if __name__ == "__main__":
    main()
