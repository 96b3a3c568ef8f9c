"""Compile every matmul config for sm_90 (H100/H200) without a GPU and print what was built.

    python tests/sm90_build.py        # JSON: one record per config

Run in a process without TRITON_INTERPRET (tests/test_matmul_sm90_build.py starts it). Each
kernel is specialized as the JIT would specialize it for bf16 x [512, 4096] @ w [4096, 4096].T
with bias (16-byte aligned pointers and sizes), compiled by Triton for the cuda:90 target with
the ptxas Triton ships, and summarized from its PTX, TTGIR and cubin.
"""

import json
import os
import re
import subprocess
import tempfile

import torch
import triton
from det_backend.kernels import matmul as mm
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import native_specialize_impl
from triton.tools.tensor_descriptor import TensorDescriptor

M, N, K = 512, 4096, 4096


def compile_sm90(kernel, args: dict, num_warps: int, num_stages: int):
    """triton.compile for cuda:90 with the JIT's argument specialization (Triton 3.6)."""
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(kernel.arg_names, kernel.params, strict=True)):
        value = args[name]
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
            continue
        ty, key = native_specialize_impl(BaseBackend, value, False, True, True)
        signature[name] = ty
        if ty == "constexpr":
            constexprs[name] = key
        elif key:
            attrs[(i,)] = BaseBackend.parse_attr(key)
    source = ASTSource(kernel, signature, constexprs, attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def resource_usage(compiled) -> dict[str, int]:
    """Registers and spill stores of the kernel, from `ptxas -v` (Triton's own ptxas)."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")
    with tempfile.NamedTemporaryFile(suffix=".ptx", mode="w") as f:
        f.write(compiled.asm["ptx"])
        f.flush()
        report = subprocess.run(
            [ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    return {
        "registers": int(re.search(r"Used (\d+) registers", report)[1]),
        "spill_store_bytes": int(re.search(r"(\d+) bytes spill stores", report)[1]),
    }


def kernel_args(cfg: mm.MatmulConfig, x, w, y) -> tuple:
    M = x.shape[0]
    common = {
        "bias_ptr": x,
        "M": M,
        "N": N,
        "K": K,
        "K_CHUNK": mm.k_chunk(K, cfg.split_k),
        "HAS_BIAS": True,
        "BLOCK_M": cfg.block_m,
        "BLOCK_N": cfg.block_n,
        "BLOCK_K": cfg.block_k,
        "GROUP_M": cfg.group_m,
        "SPLIT_K": cfg.split_k,
    }
    if cfg.kind == "tma_persistent":
        x_desc = TensorDescriptor(x, [M, K], [K, 1], [cfg.block_m, cfg.block_k])
        w_desc = TensorDescriptor(w, [N, K], [K, 1], [cfg.block_n, cfg.block_k])
        args = {"x_desc": x_desc, "w_desc": w_desc, "y_ptr": y, "stride_ym": N, "stride_yn": 1}
        args |= {"NUM_PROGRAMS": 132, "WARP_SPECIALIZE": cfg.warp_specialize}
        return mm._matmul_tma_kernel, common | args
    partials = cfg.kind == "split_k"
    args = {"x_ptr": x, "w_ptr": w, "y_ptr": y, "stride_xm": K, "stride_xk": 1}
    args |= {"stride_wn": K, "stride_wk": 1, "stride_ys": M * N if partials else 0}
    args |= {"stride_ym": N, "stride_yn": 1, "EVEN_K": True, "PARTIALS": partials}
    return mm._matmul_kernel, common | args


def reduce_args(m: int, split_k: int) -> dict:
    y = torch.empty(m, N, dtype=torch.bfloat16)
    partials = torch.empty(split_k, m, N, dtype=torch.float32)
    args = {"p_ptr": partials, "bias_ptr": y, "y_ptr": y, "M": m, "N": N, "stride_ps": m * N}
    args |= {"stride_ym": N, "stride_yn": 1, "HAS_BIAS": True, "SPLIT_K": split_k}
    return args | {"BLOCK_M": 16, "BLOCK_N": 128}


def build_record(cfg: mm.MatmulConfig, m: int = M) -> dict:
    x = torch.empty(m, K, dtype=torch.bfloat16)
    w = torch.empty(N, K, dtype=torch.bfloat16)
    y = torch.empty(m, N, dtype=torch.bfloat16)
    kernel, args = kernel_args(cfg, x, w, y)
    compiled = compile_sm90(kernel, args, cfg.num_warps, mm._num_stages(cfg, x.element_size()))
    if cfg.kind == "split_k":
        compile_sm90(mm._split_k_reduce_kernel, reduce_args(m, cfg.split_k), 4, 1)
    ptx, ttgir = compiled.asm["ptx"], compiled.asm["ttgir"]
    return {
        "config": list(cfg),
        "wgmma": ptx.count("wgmma.mma_async"),
        "mma_sync": ptx.count("mma.sync"),
        "tma_loads": ptx.count("cp.async.bulk.tensor"),
        "cp_async": ptx.count("cp.async.cg"),
        "warp_specialized": "ttg.warp_specialize" in ttgir,
        "shared_bytes": compiled.metadata.shared,
        **resource_usage(compiled),
    }


if __name__ == "__main__":
    configs = [c for group in mm.all_configs().values() for c in group]
    one_per_kind = {(c.kind, c.split_k > 1, c.warp_specialize): c for c in configs}.values()
    records = {
        "configs": [build_record(c) for c in configs],
        "m1": [build_record(c, m=1) for c in one_per_kind],
    }
    print(json.dumps(records))
