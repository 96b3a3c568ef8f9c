"""Why does the "tma_persistent" matmul never finish on a GPU, and is a TMA form worth having?

Every GPU run that reached `kernels/matmul.py`'s TMA kind (an H200 kernel-test run, an H100
sweep) went on for minutes with nothing logged. This probe runs forms of a TMA matmul, one
form per process with a time limit, and logs each step as it happens, so a stop says where:
before the launch returned (compile), or between launch and synchronize (the GPU kernel).

Forms (all the same per-tile sum as the plain kernel: zero fp32 accumulator, K in BLOCK_K
steps in order, one rounding at the store):
- ours:        kernels/matmul.py's kind as it is (persistent tile loop, flatten=True).
- noflat:      the same loop without flatten (no overlap of next tile's loads and the epilogue).
- flat_c:      flatten=True, the epilogue's tile from its own counter (Triton's tutorial 09
               works around a pipeliner bug so: a value used in both prologue and epilogue).
- grid:        not persistent: one program per tile, TMA loads, pointer store.
- plain:       our plain kernel with the same tile (pointer loads), for time and bits.
Each form is timed (triton.testing.do_bench) next to torch.mm (cuBLAS) and checked bitwise
against the plain kernel.

    python benchmarks/tma_probe.py --out tma_probe.json [--limit-s 90]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
import triton
import triton.language as tl
from det_backend.kernels.matmul import _tile_coords  # the tile order every form shares
from triton.tools.tensor_descriptor import TensorDescriptor

# (M, N, K): gate_up and down of Llama-3-8B at prefill and mid M, then a ragged shape (M, N,
# K tails; a new specialization, so last).
SHAPES = ((4096, 28672, 4096), (4096, 4096, 14336), (512, 28672, 4096), (300, 1000, 1000))
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
TILES = ((128, 128, 64, 8, 4), (128, 256, 64, 8, 3))
FORMS = ("plain", "grid", "noflat", "flat_c", "ours")


@triton.jit
def _store(acc, y_ptr, off_m, off_n, M, N, stride_ym, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_m = off_m + tl.arange(0, BLOCK_M)
    offs_n = off_n + tl.arange(0, BLOCK_N)
    ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(
        ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N)
    )


@triton.jit
def _grid_kernel(x_desc, w_desc, y_ptr, M, N, K, stride_ym,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr):  # fmt: skip
    pid_m, pid_n = _tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        x = x_desc.load([off_m, k * BLOCK_K])
        w = w_desc.load([off_n, k * BLOCK_K])
        acc = tl.dot(x, w.T, acc)
    _store(acc, y_ptr, off_m, off_n, M, N, stride_ym, BLOCK_M, BLOCK_N)


@triton.jit
def _persistent_kernel(x_desc, w_desc, y_ptr, M, N, K, stride_ym,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr,
                       FLATTEN: tl.constexpr):  # fmt: skip
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    tile_id_c = tl.program_id(0) - NUM_SMS
    for tile_id in tl.range(tl.program_id(0), num_tiles, NUM_SMS, flatten=FLATTEN):
        pid_m, pid_n = _tile_coords(tile_id, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, k_tiles):
            x = x_desc.load([off_m, k * BLOCK_K])
            w = w_desc.load([off_n, k * BLOCK_K])
            acc = tl.dot(x, w.T, acc)
        # The epilogue's tile from its own counter (tutorial 09's workaround).
        tile_id_c += NUM_SMS
        pid_m_c, pid_n_c = _tile_coords(tile_id_c, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        _store(acc, y_ptr, pid_m_c * BLOCK_M, pid_n_c * BLOCK_N, M, N, stride_ym, BLOCK_M, BLOCK_N)


def run_form(form: str, x, w, tile) -> torch.Tensor:
    from det_backend.kernels.matmul import MatmulConfig, matmul

    bm, bn, bk, warps, stages = tile
    M, K = x.shape
    N = w.shape[0]
    if form in ("plain", "ours"):
        kind = "plain" if form == "plain" else "tma_persistent"
        return matmul(x, w, config=MatmulConfig(0, bm, bn, bk, 8, warps, stages, kind))
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    x_desc = TensorDescriptor(x, list(x.shape), list(x.stride()), [bm, bk])
    w_desc = TensorDescriptor(w, list(w.shape), list(w.stride()), [bn, bk])
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    common = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages)
    if form == "grid":
        _grid_kernel[(tiles,)](x_desc, w_desc, y, M, N, K, y.stride(0), **common)
    else:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        _persistent_kernel[(min(sms, tiles),)](
            x_desc, w_desc, y, M, N, K, y.stride(0), NUM_SMS=sms, FLATTEN=form == "flat_c", **common
        )
    return y


def one(form: str) -> None:
    """Child: every tile and shape for one form; a line per step, flushed."""

    def say(**kw):
        print(json.dumps({"t": round(time.monotonic() - t0, 2), **kw}), flush=True)

    t0 = time.monotonic()
    g = torch.Generator(device="cuda").manual_seed(70)
    for tile in TILES:
        for m, n, k in SHAPES:
            x = torch.randn(m, k, generator=g, device="cuda").to(torch.bfloat16)
            w = (torch.randn(n, k, generator=g, device="cuda") * 0.02).to(torch.bfloat16)
            point = dict(form=form, tile=tile, shape=(m, n, k))
            say(step="launch", **point)
            y = run_form(form, x, w, tile)
            say(step="launched", **point)
            torch.cuda.synchronize()
            say(step="finished", **point)
            equal = torch.equal(y, run_form("plain", x, w, tile))
            ms = triton.testing.do_bench(lambda x=x, w=w, t=tile: run_form(form, x, w, t), rep=50)
            cublas_ms = triton.testing.do_bench(lambda x=x, w=w: x @ w.T, rep=50)
            say(step="timed", equal_to_plain=equal, ms=ms, cublas_ms=cublas_ms,
                speedup_vs_cublas=cublas_ms / ms, **point)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="tma_probe.json")
    ap.add_argument("--limit-s", type=float, default=90)
    ap.add_argument("--forms", default=",".join(FORMS))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return one(args.one)
    result = {"gpu": torch.cuda.get_device_name(), "triton": triton.__version__,
              "limit_s": args.limit_s, "command": " ".join(sys.argv), "forms": {}}  # fmt: skip
    for form in args.forms.split(","):
        cmd = [sys.executable, __file__, "--one", form]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.limit_s)
            out, err, status = done.stdout, done.stderr, f"rc={done.returncode}"
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
            status = f"killed after {args.limit_s} s"
        steps = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        result["forms"][form] = {"status": status, "steps": steps, "stderr_tail": err[-1500:]}
        last = steps[-1] if steps else {}
        print(
            f"{form}: {status}; last step {last.get('step')} {last.get('tile')} {last.get('shape')}"
        )
        for s in steps:
            if s["step"] == "timed":
                print(f"  {s['tile']} {s['shape']}: {s['speedup_vs_cublas']:.2f}x cuBLAS, "
                      f"equal to plain {s['equal_to_plain']}")  # fmt: skip
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
