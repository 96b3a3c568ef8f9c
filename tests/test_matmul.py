"""det_backend.kernels.matmul: accuracy against float64 and bitwise batch invariance.

On CPU the kernel runs under TRITON_INTERPRET=1, where `tl.dot` is numpy's matmul of one
[BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N] tile added to the accumulator: the sum is rounded once
per BLOCK_K step, so there the result depends on BLOCK_K (on the GPU the tensor cores add K in
one order whatever the tile). CPU tests that compare different BLOCK_K therefore use
K <= min(BLOCK_K) (one step); tests with several K steps compare one config at a time. The
interpreter's bf16 `tl.dot` returns garbage: CPU tests use fp16/fp32, GPU tests bf16.
"""

from itertools import pairwise

import pytest
import torch
from det_backend.kernels.matmul import (
    MATMUL_CONFIGS,
    MATMUL_TABLE,
    all_configs,
    config_for_m,
    matmul,
    matmul_reference,
)
from invariance import dtype_id, prefixes_that_change, randn

_F32_EPS = torch.finfo(torch.float32).eps


def tolerance(dtype: torch.dtype, k: int) -> dict[str, float]:
    """assert_close tolerances for a K-long dot product of randn inputs.

    rtol: the output is rounded once to dtype (at most eps / 2 relative); eps leaves a factor 2.
    atol: the fp32 sum of K products of size ~1 drifts by well under K * eps(fp32).
    """
    return {"rtol": torch.finfo(dtype).eps, "atol": 2 * k * _F32_EPS}


CPU_DTYPES = (torch.float16, torch.float32)
# Every tile the launcher can pick, for any shape: the "every config" tests span these.
ALL_CONFIGS = all_configs()
MIN_BLOCK_K = min(c.block_k for c in ALL_CONFIGS)


def bucket_edges(table=MATMUL_CONFIGS) -> list[int]:
    """Every M where the table changes its answer, and the M just past it."""
    return sorted({m for c in table[:-1] for m in (c.max_m, c.max_m + 1)})


BUCKET_EDGES = bucket_edges()
# Llama-3-8B linear layers, (N, K): qkv, o_proj, gate_up, down.
LLAMA_WIDTHS = ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336))
LM_HEAD = (128256, 4096)
GPU_MS = (1, 2, 3, 7, 16, 17, 31, 32, 33, 64, 100, 128, 255, 256, 257, 512, 1000, 2048, 4096)


def split_k_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 GEMM that splits K into more partial sums when M is small, as split-K GEMMs do to
    fill the GPU: the row's sum is grouped differently depending on M."""
    splits = 4 if x.shape[0] < 32 else 1
    parts = [
        a.float() @ b.float().T
        for a, b in zip(x.chunk(splits, 1), weight.chunk(splits, 1), strict=True)
    ]
    return torch.stack(parts).sum(0)


def assert_row_invariant_in_padded_batches(x, weight, pads, seed) -> None:
    """Row 0 of x gives the same bits alone and at any position inside batches of other rows."""
    alone = matmul(x[:1], weight)[0]
    for i, pad in enumerate(pads):
        batch = randn(pad, x.shape[1], dtype=x.dtype, device=x.device.type, seed=seed + i)
        batch[pad // 2] = x[0]
        assert torch.equal(matmul(batch, weight)[pad // 2], alone), f"padded batch of {pad}"


# CPU-sized tests (they also run on the GPU when there is one).


def test_config_table_covers_every_m():
    max_ms = [c.max_m for c in MATMUL_CONFIGS]
    assert max_ms == sorted(max_ms) and len(set(max_ms)) == len(max_ms)
    for prev, config in pairwise(MATMUL_CONFIGS):
        assert config_for_m(prev.max_m) is prev
        assert config_for_m(prev.max_m + 1) is config
    assert config_for_m(1) is MATMUL_CONFIGS[0]
    assert config_for_m(10**9) is MATMUL_CONFIGS[-1]


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("m", [1, 37, 130])
def test_matmul_matches_float64(device, dtype, with_bias, m):
    n, k = 96, 200  # ragged N and K: several K steps with a masked tail
    x = randn(m, k, dtype=dtype, device=device, seed=0)
    w = randn(n, k, dtype=dtype, device=device, seed=1)
    bias = randn(n, dtype=dtype, device=device, seed=2) if with_bias else None
    y = matmul(x, w, bias)
    assert y.shape == (m, n) and y.dtype == dtype
    torch.testing.assert_close(y.double(), matmul_reference(x, w, bias), **tolerance(dtype, k))


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=dtype_id)
def test_matmul_batch_invariant(device, dtype):
    # K = MIN_BLOCK_K: the launcher's choice of config changes with M (see module docstring).
    m, n, k = 300, 96, MIN_BLOCK_K
    x = randn(m, k, dtype=dtype, device=device, seed=3)
    w = randn(n, k, dtype=dtype, device=device, seed=4)
    ms = sorted({1, 7, 31, 32, 33, m - 1, *BUCKET_EDGES})
    assert prefixes_that_change(lambda a: matmul(a, w), x, ms) == []
    assert_row_invariant_in_padded_batches(x, w, pads=(2, 16, 17, 64, 129, 257), seed=5)


@pytest.mark.parametrize(
    "config", MATMUL_CONFIGS, ids=lambda c: f"BM{c.block_m}-BN{c.block_n}-BK{c.block_k}"
)
def test_matmul_batch_invariant_within_config(device, config):
    # Several K steps with a ragged tail, one forced config: rows never mix across the tile.
    dtype, n, k = torch.float16, 96, 3 * config.block_k + 8
    m = 2 * config.block_m + 3
    x = randn(m, k, dtype=dtype, device=device, seed=6)
    w = randn(n, k, dtype=dtype, device=device, seed=7)
    ms = (1, 2, config.block_m - 1, config.block_m, config.block_m + 1, m - 1)
    assert prefixes_that_change(lambda a: matmul(a, w, config=config), x, ms) == []


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("k", [40, MIN_BLOCK_K])
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=dtype_id)
def test_matmul_every_config_bitwise_equal(device, dtype, k, with_bias):
    m, n = 100, 96
    x = randn(m, k, dtype=dtype, device=device, seed=8)
    w = randn(n, k, dtype=dtype, device=device, seed=9)
    bias = randn(n, dtype=dtype, device=device, seed=10) if with_bias else None
    first, *rest = (matmul(x, w, bias, config=c) for c in ALL_CONFIGS)
    for config, y in zip(ALL_CONFIGS[1:], rest, strict=True):
        assert torch.equal(y, first), config


def test_matmul_reads_strided_inputs(device):
    dtype, m, n, k = torch.float16, 33, 80, 64
    x = randn(m, k, dtype=dtype, device=device, seed=11)
    w = randn(n, k, dtype=dtype, device=device, seed=12)
    expected = matmul(x, w)
    # x: a column slice of a wider tensor (row stride != K), as q out of a fused qkv.
    wide = randn(m, k + 24, dtype=dtype, device=device, seed=13)
    wide[:, 8 : 8 + k] = x
    # weight: stored [K, N] and read through the transposed view, with no copy.
    w_t = w.T.contiguous().T
    assert w_t.stride() == (1, n)
    assert torch.equal(matmul(wide[:, 8 : 8 + k], w), expected)
    assert torch.equal(matmul(x, w_t), expected)


def test_matmul_nondeterministic_control(device):
    # The invariance check above must be able to fail: a GEMM whose K grouping depends on M.
    n, k = 64, 256
    x = randn(40, k, dtype=torch.float32, device=device, seed=14)
    w = randn(n, k, dtype=torch.float32, device=device, seed=15)
    ms = (1, 7, 31)
    assert prefixes_that_change(lambda a: split_k_matmul(a, w), x, ms) != []
    assert prefixes_that_change(lambda a: matmul(a, w, config=MATMUL_CONFIGS[1]), x, ms) == []


def test_matmul_empty_m(device):
    w = randn(32, 16, dtype=torch.float16, device=device, seed=16)
    y = matmul(torch.empty(0, 16, dtype=torch.float16, device=device), w)
    assert y.shape == (0, 32) and y.dtype == torch.float16


@pytest.mark.parametrize(
    "x_shape, w_shape, x_dtype, w_dtype, bias_shape",
    [
        ((4, 16), (8, 12), torch.float16, torch.float16, None),  # K mismatch
        ((16,), (8, 16), torch.float16, torch.float16, None),  # 1-D x
        ((2, 4, 16), (8, 16), torch.float16, torch.float16, None),  # 3-D x
        ((4, 16), (16,), torch.float16, torch.float16, None),  # 1-D weight
        ((4, 16), (8, 16), torch.float16, torch.float32, None),  # dtype mismatch
        ((4, 16), (8, 16), torch.float64, torch.float64, None),  # unsupported dtype
        ((4, 16), (8, 16), torch.float16, torch.float16, (4,)),  # bias not [N]
    ],
)
def test_matmul_rejects_bad_input(device, x_shape, w_shape, x_dtype, w_dtype, bias_shape):
    x = torch.ones(x_shape, dtype=x_dtype, device=device)
    w = torch.ones(w_shape, dtype=w_dtype, device=device)
    bias = None if bias_shape is None else torch.ones(bias_shape, dtype=x_dtype, device=device)
    with pytest.raises(ValueError, match="det_backend: matmul"):
        matmul(x, w, bias)


def test_matmul_rejects_bias_dtype_mismatch(device):
    x = torch.ones(4, 16, dtype=torch.float16, device=device)
    w = torch.ones(8, 16, dtype=torch.float16, device=device)
    with pytest.raises(ValueError, match="bias"):
        matmul(x, w, torch.ones(8, dtype=torch.float32, device=device))


# GPU tests at Llama-3-8B shapes, bf16.


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 33, 257, 1000])
@pytest.mark.parametrize("n, k", LLAMA_WIDTHS)
def test_matmul_matches_float64_gpu(device, n, k, m):
    x = randn(m, k, dtype=torch.bfloat16, device=device, seed=20)
    w = randn(n, k, dtype=torch.bfloat16, device=device, seed=21)
    bias = randn(n, dtype=torch.bfloat16, device=device, seed=22)
    tol = tolerance(torch.bfloat16, k)
    torch.testing.assert_close(matmul(x, w).double(), matmul_reference(x, w), **tol)
    torch.testing.assert_close(matmul(x, w, bias).double(), matmul_reference(x, w, bias), **tol)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 7, 128])
def test_matmul_lm_head_matches_float64_gpu(device, m):
    n, k = LM_HEAD
    x = randn(m, k, dtype=torch.bfloat16, device=device, seed=23)
    w = randn(n, k, dtype=torch.bfloat16, device=device, seed=24)
    y = matmul(x, w).double()
    torch.testing.assert_close(y, matmul_reference(x, w), **tolerance(torch.bfloat16, k))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=dtype_id)
def test_matmul_other_dtypes_gpu(device, dtype):
    # fp32 goes through the ieee (non-TF32) dot and fewer pipeline stages.
    m, n, k = 300, 1000, 1000
    x = randn(m, k, dtype=dtype, device=device, seed=25)
    w = randn(n, k, dtype=dtype, device=device, seed=26)
    first, *rest = (matmul(x, w, config=c) for c in ALL_CONFIGS)
    torch.testing.assert_close(first.double(), matmul_reference(x, w), **tolerance(dtype, k))
    for config, y in zip(ALL_CONFIGS[1:], rest, strict=True):
        assert torch.equal(y, first), config


@pytest.mark.gpu
@pytest.mark.parametrize("n, k", LLAMA_WIDTHS)
def test_matmul_batch_invariant_gpu(device, n, k):
    x = randn(max(GPU_MS), k, dtype=torch.bfloat16, device=device, seed=27)
    w = randn(n, k, dtype=torch.bfloat16, device=device, seed=28)
    edges = bucket_edges(MATMUL_TABLE.get((n, k), MATMUL_CONFIGS))
    ms = sorted({*GPU_MS, *edges} - {max(GPU_MS)})
    assert prefixes_that_change(lambda a: matmul(a, w), x, ms) == []
    bias = randn(n, dtype=torch.bfloat16, device=device, seed=29)
    assert prefixes_that_change(lambda a: matmul(a, w, bias), x[:300], (1, 17, 65, 129, 257)) == []
    assert_row_invariant_in_padded_batches(x, w, pads=(2, 8, 16, 48, 128, 256, 512), seed=30)


@pytest.mark.gpu
def test_matmul_lm_head_batch_invariant_gpu(device):
    n, k = LM_HEAD
    x = randn(300, k, dtype=torch.bfloat16, device=device, seed=31)
    w = randn(n, k, dtype=torch.bfloat16, device=device, seed=32)
    assert prefixes_that_change(lambda a: matmul(a, w), x, (1, 7, 16, 17, 64, 65, 256, 257)) == []


@pytest.mark.gpu
@pytest.mark.parametrize("n, k", [*LLAMA_WIDTHS, LM_HEAD])
def test_matmul_every_config_bitwise_equal_gpu(device, n, k):
    x = randn(257, k, dtype=torch.bfloat16, device=device, seed=33)
    w = randn(n, k, dtype=torch.bfloat16, device=device, seed=34)
    bias = randn(n, dtype=torch.bfloat16, device=device, seed=35)
    for b in (None, bias):
        first, *rest = (matmul(x, w, b, config=c) for c in ALL_CONFIGS)
        for config, y in zip(ALL_CONFIGS[1:], rest, strict=True):
            assert torch.equal(y, first), config


@pytest.mark.gpu
def test_matmul_nondeterministic_control_gpu(device, record_property):
    # cuBLAS picks kernels (and split-K) by M: row r of A[:m] @ B need not be row r of A @ B.
    # Which shapes show it is cuBLAS's business; at least one of these must.
    ms = (1, 7, 32, 33, 64, 256, 1000)
    changed = {}
    for n, k in LLAMA_WIDTHS:
        x = randn(2048, k, dtype=torch.bfloat16, device=device, seed=36)
        w = randn(n, k, dtype=torch.bfloat16, device=device, seed=37)
        changed[(n, k)] = prefixes_that_change(lambda a, w=w: a @ w.T, x, ms)
        assert prefixes_that_change(lambda a, w=w: matmul(a, w), x, ms) == []
    record_property("cublas_prefixes_that_change", changed)
    assert any(changed.values()), changed


@pytest.mark.gpu
def test_matmul_cuda_graph_replay_bitwise_equal(device):
    # Under CUDA graph capture the launcher sees the padded M; replay must give eager's bits.
    n, k = 4096, 4096
    w = randn(n, k, dtype=torch.bfloat16, device=device, seed=38)
    static_x = randn(64, k, dtype=torch.bfloat16, device=device, seed=39)
    eager = matmul(static_x, w)  # also compiles before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = matmul(static_x, w)
    graph.replay()
    assert torch.equal(static_y, eager)
    static_x.copy_(randn(64, k, dtype=torch.bfloat16, device=device, seed=40))
    graph.replay()
    assert torch.equal(static_y, matmul(static_x, w))
