"""det_backend.kernels.matmul: accuracy against float64 and bitwise batch invariance.

On CPU the kernel runs under TRITON_INTERPRET=1, where `tl.dot` is numpy's matmul of one
[BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N] tile added to the accumulator: the sum is rounded once
per BLOCK_K step, so there the result depends on BLOCK_K (on the GPU the tensor cores add K in
one order whatever the tile). CPU tests that compare different BLOCK_K therefore use
K <= min(BLOCK_K) (one step); tests with several K steps compare one config at a time, or
configs of one BLOCK_K. The interpreter's bf16 `tl.dot` returns garbage: CPU tests use
fp16/fp32, GPU tests bf16.

Configs with different split_k sum K in different chunks and give different bits: "every
config equal" means every config of one split_k (`all_configs()` groups them).
"""

from itertools import pairwise

import pytest
import torch
from det_backend.kernels.matmul import (
    KINDS,
    MATMUL_CANDIDATES,
    MATMUL_CONFIGS,
    MATMUL_TABLE,
    PORTABLE,
    SM90,
    MatmulConfig,
    all_configs,
    config_for,
    config_for_m,
    k_chunk,
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
# Every config a table can pick or the sweep can propose, by split_k: the "every config"
# tests span these, each group on its own.
CONFIG_GROUPS = all_configs()
ALL_CONFIGS = [c for group in CONFIG_GROUPS.values() for c in group]
MIN_BLOCK_K = min(c.block_k for c in ALL_CONFIGS)
SPLIT_CONFIGS = [c for c in ALL_CONFIGS if c.split_k > 1]
# One config of each kind and split_k, for the tests that loop over a handful.
ONE_PER_KIND = list({(c.kind, c.split_k, c.warp_specialize): c for c in ALL_CONFIGS}.values())
# The TMA kind also runs once per config in a process of its own with a time limit
# (test_matmul_tma_config_finishes_and_matches_plain_gpu), first among the GPU tests that use
# it: earlier GPU runs that reached the kind (then with warp-specialized candidates, since
# removed) went on for minutes, and a kernel that does not end stops every test after it. On
# an H100 (2026-11-26, benchmarks/results/tma_probe_h100.json) every TMA config ended and
# matched the plain kernel; the sm_90 table names it from M = 128 up.
TMA_CONFIGS = [c for c in ALL_CONFIGS if c.kind == "tma_persistent"]


def config_id(c: MatmulConfig) -> str:
    ws = "-ws" if c.warp_specialize else ""
    return f"{c.kind}{ws}-S{c.split_k}-BM{c.block_m}-BN{c.block_n}-BK{c.block_k}-W{c.num_warps}"


def assert_group_bitwise_equal(outputs: dict[MatmulConfig, torch.Tensor], key=None) -> None:
    """Every output equals the first of its group (group: split_k, or `key(config)`)."""
    firsts = {}
    for config, y in outputs.items():
        group = key(config) if key else config.split_k
        first = firsts.setdefault(group, (config, y))
        assert torch.equal(y, first[1]), f"{config} differs from {first[0]}"


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


# One TMA config per process: it must end within the limit (or the test fails, naming it, and
# the next one runs) and give the bits of the plain config of its split_k, at a ragged shape
# (M, N, K tails: TMA pads with zeros) and at Llama-3-8B's gate_up with M = 512 (where the
# H100 sweep stopped). The first call loads or compiles the kernel: the limit allows for it.
TMA_CHECK = """
import sys, torch
from det_backend.kernels.matmul import MatmulConfig, all_configs, matmul
cfg = MatmulConfig(*eval(sys.argv[1]))
plain = next(c for c in all_configs()[cfg.split_k] if c.kind == "plain")
g = torch.Generator(device="cuda").manual_seed(70)
for m, n, k in ((300, 1000, 1000), (512, 28672, 4096)):
    x = torch.randn(m, k, generator=g, device="cuda").to(torch.bfloat16)
    w = (torch.randn(n, k, generator=g, device="cuda") * 0.02).to(torch.bfloat16)
    y = matmul(x, w, config=cfg)
    torch.cuda.synchronize()
    assert torch.equal(y, matmul(x, w, config=plain)), (m, n, k)
print("TMA OK")
"""
TMA_LIMIT_S = 60


@pytest.mark.gpu
@pytest.mark.parametrize("config", TMA_CONFIGS, ids=config_id)
def test_matmul_tma_config_finishes_and_matches_plain_gpu(device, config):
    import subprocess
    import sys

    try:
        done = subprocess.run(
            [sys.executable, "-c", TMA_CHECK, repr(tuple(config))],
            capture_output=True, text=True, timeout=TMA_LIMIT_S,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail(f"{config} did not finish in {TMA_LIMIT_S} s (hang, or a compile that slow)")
    assert "TMA OK" in done.stdout, done.stderr[-3000:]


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
    "config", list(dict.fromkeys([*MATMUL_CONFIGS, *ONE_PER_KIND])), ids=config_id
)
def test_matmul_batch_invariant_within_config(device, config):
    # Several K steps with a ragged tail (several chunks, the last empty for split_k = 4), one
    # forced config: rows never mix across the tile. Two column tiles: the persistent kernel
    # walks several tiles per program.
    dtype, n = torch.float16, 200
    k = 3 * config.block_k + 8 if config.split_k == 1 else config.split_k * 256 + 40
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
    assert_group_bitwise_equal({c: matmul(x, w, bias, config=c) for c in ALL_CONFIGS})


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
    # TMA reads the column slice too (16-byte aligned base and row pitch).
    tma = next(c for c in ALL_CONFIGS if c.kind == "tma_persistent" and c.split_k == 1)
    if device == "cpu":
        assert torch.equal(matmul(wide[:, 8 : 8 + k], w, config=tma), expected)


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


def test_tables_keep_one_split_k_per_shape():
    # The launcher picks by M within a shape's table; every M of one shape must sum K in the
    # same chunks, or a row would change with the batch size.
    for (n, k), table in MATMUL_TABLE.items():
        assert len({c.split_k for c in table}) == 1, (n, k)
        assert table[-1].max_m >= 2**62, (n, k)
    # The portable table serves every GPU and shape: the plain kernel, no split.
    assert all(c.kind == "plain" and c.split_k == 1 for c in MATMUL_CONFIGS)
    assert all(c.kind in KINDS for c in (*ALL_CONFIGS, *MATMUL_CANDIDATES))


def test_config_for_uses_the_shape_table_on_sm90_only():
    n, k = 4096, 4096
    for m in (1, 64, 128, 300, 10**6):
        sm90 = [c for c in MATMUL_TABLE[(n, k)] if m <= c.max_m][0]
        assert config_for(m, n, k, SM90) is sm90
        assert config_for(m, n, k, PORTABLE) is config_for_m(m)
    assert config_for(300, 96, 200, SM90) is config_for_m(300)  # no table for this shape


def test_k_chunk_covers_k_in_multiples_of_every_block_k():
    for k in (1, 40, 255, 256, 600, 4096, 5120, 14336, 25600):
        for split_k in (1, 2, 3, 4, 8):
            chunk = k_chunk(k, split_k)
            assert chunk % 256 == 0 and chunk * split_k >= k
            assert all(chunk % c.block_k == 0 for c in ALL_CONFIGS)
    assert k_chunk(4096, 4) == 1024 and k_chunk(14336, 4) == 3584


@pytest.mark.parametrize("k", [600, 1064])
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=dtype_id)
def test_matmul_split_k_kinds_bitwise_equal(device, dtype, k):
    # Several chunks (k = 1064, split_k = 4: the last one empty), ragged tails. Parallel
    # chunks + reduce, in-program chunks and TMA give one result per split_k. Under the
    # interpreter BLOCK_K also rounds (module docstring): compare within one BLOCK_K.
    m, n = 70, 96
    x = randn(m, k, dtype=dtype, device=device, seed=40)
    w = randn(n, k, dtype=dtype, device=device, seed=41)
    bias = randn(n, dtype=dtype, device=device, seed=42)
    configs = [c for c in ALL_CONFIGS if c.block_k == 64]
    outputs = {c: matmul(x, w, bias, config=c) for c in configs}
    kinds = set(KINDS)
    assert {c.kind for c in outputs if c.split_k > 1} == kinds
    for y in outputs.values():
        torch.testing.assert_close(y.double(), matmul_reference(x, w, bias), **tolerance(dtype, k))
    assert_group_bitwise_equal(outputs)


def test_matmul_split_k_changes_the_bits(device):
    # The control for the grouping above: another split_k sums other chunks. fp32 output, so
    # rounding to the output dtype cannot hide it.
    m, n, k = 40, 64, 1000
    x = randn(m, k, dtype=torch.float32, device=device, seed=43)
    w = randn(n, k, dtype=torch.float32, device=device, seed=44)
    by_split = {}
    for c in ALL_CONFIGS:
        if c.block_k == 64 and c.kind == "plain":
            by_split.setdefault(c.split_k, matmul(x, w, config=c))
    assert sorted(by_split) == sorted(CONFIG_GROUPS)
    ys = list(by_split.values())
    assert all(not torch.equal(a, b) for a, b in pairwise(ys))


@pytest.mark.parametrize("split_k", sorted(s for s in CONFIG_GROUPS if s > 1))
def test_matmul_split_k_rows_equal_across_m(device, split_k):
    # A shape with a split_k table runs the parallel kernel at small M and the in-program
    # kernels at large M: row r must be the same bits at every M, whichever kernel runs.
    dtype, m, n, k = torch.float16, 150, 96, split_k * 256 + 40
    x = randn(m, k, dtype=dtype, device=device, seed=45)
    w = randn(n, k, dtype=dtype, device=device, seed=46)
    group = [c for c in CONFIG_GROUPS[split_k] if c.block_k == 64]
    parallel = [c for c in group if c.kind == "split_k"]
    large = [c for c in group if c.kind != "split_k"]
    assert parallel and large
    full = matmul(x, w, config=large[0])
    for c in group:
        for rows in (1, 7, 17, 64, m):
            assert torch.equal(matmul(x[:rows], w, config=c), full[:rows]), (c, rows)


def test_matmul_tma_rejects_layouts_tma_cannot_read(device):
    tma = next(c for c in ALL_CONFIGS if c.kind == "tma_persistent")
    w = randn(32, 13, dtype=torch.float16, device=device, seed=47)
    x = randn(4, 13, dtype=torch.float16, device=device, seed=48)
    with pytest.raises(ValueError, match="tma_persistent"):  # 26-byte rows
        matmul(x, w, config=tma)
    w = randn(32, 16, dtype=torch.float16, device=device, seed=49)
    with pytest.raises(ValueError, match="tma_persistent"):  # weight read through a transpose
        matmul(
            randn(4, 16, dtype=torch.float16, device=device, seed=50),
            w.T.contiguous().T,
            config=tma,
        )
    x = randn(4, 24, dtype=torch.float16, device=device, seed=51)
    with pytest.raises(ValueError, match="tma_persistent"):  # base 2 bytes past 16-byte alignment
        matmul(x[:, 1:17], w, config=tma)


def test_matmul_table_tma_entry_runs_plain_for_a_layout_tma_cannot_read(device, monkeypatch):
    # The sm_90 table names TMA from M = 128; an operand TMA cannot read (here a view whose
    # base is 2 bytes past 16-byte alignment) gets the plain kernel with the same tile, whose
    # bits are the TMA kernel's (every config of a split_k gives the same). A forced TMA config
    # still refuses it (above).
    from det_backend.kernels import matmul as mm

    tma = next(c for c in ALL_CONFIGS if c.kind == "tma_persistent" and c.split_k == 1)
    monkeypatch.setattr(mm, "config_for", lambda *a, **k: tma)
    w = randn(40, 16, dtype=torch.float16, device=device, seed=52)
    x = randn(5, 24, dtype=torch.float16, device=device, seed=53)[:, 1:17]
    y = mm.matmul(x, w)
    assert torch.equal(y, mm.matmul(x, w, config=tma._replace(kind="plain")))
    aligned = x.contiguous()
    assert torch.equal(mm.matmul(aligned, w), y)  # TMA itself, on an aligned copy


def test_tma_kind_is_refused_below_sm90_and_tables_follow_the_family(monkeypatch):
    # No GPU needed: the capability is read through _device_info, patched here to an A100.
    from types import SimpleNamespace

    from det_backend.kernels import matmul as mm

    cuda0 = torch.device("cuda", 0)
    monkeypatch.setattr(mm, "_device_info", lambda index: ((8, 0), 108))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    assert mm.gpu_family(cuda0) == PORTABLE
    tma = next(c for c in ALL_CONFIGS if c.kind == "tma_persistent")
    fake_x = SimpleNamespace(is_cuda=True, device=cuda0)
    with pytest.raises(RuntimeError, match="needs TMA .sm_90 or newer.; NVIDIA A100 is sm_80"):
        mm._check_config(tma, fake_x)
    mm._check_config(MATMUL_CONFIGS[0], fake_x)  # the portable table's kind runs anywhere
    monkeypatch.setattr(mm, "_device_info", lambda index: ((9, 0), 132))
    assert mm.gpu_family(cuda0) == SM90
    mm._check_config(tma, fake_x)
    assert mm.gpu_family(torch.device("cpu")) == PORTABLE


@pytest.mark.parametrize(
    "bad",
    [
        {"kind": "stream_k"},
        {"split_k": 0},
        {"kind": "split_k", "split_k": 1},
        {"warp_specialize": True},
        {"block_k": 96},
    ],
    ids=str,
)
def test_matmul_rejects_bad_config(device, bad):
    x = randn(4, 16, dtype=torch.float16, device=device, seed=52)
    w = randn(8, 16, dtype=torch.float16, device=device, seed=53)
    with pytest.raises(ValueError, match="det_backend: matmul config"):
        matmul(x, w, config=MATMUL_CONFIGS[0]._replace(**bad))


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
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=dtype_id)
def test_matmul_ragged_every_config_gpu(device, dtype):
    # M, N and K tails for every tile (TMA pads them with zeros, the others mask or wrap).
    # fp32 goes through the ieee (non-TF32) dot and fewer pipeline stages.
    m, n, k = 300, 1000, 1000
    x = randn(m, k, dtype=dtype, device=device, seed=25)
    w = randn(n, k, dtype=dtype, device=device, seed=26)
    outputs = {c: matmul(x, w, config=c) for c in ALL_CONFIGS}
    for y in outputs.values():
        torch.testing.assert_close(y.double(), matmul_reference(x, w), **tolerance(dtype, k))
    assert_group_bitwise_equal(outputs)


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
        assert_group_bitwise_equal({c: matmul(x, w, b, config=c) for c in ALL_CONFIGS})


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


@pytest.mark.gpu
@pytest.mark.parametrize("n, k", [(4096, 4096), (4096, 14336), (6144, 4096)])  # o, down, qkv
def test_matmul_split_k_rows_equal_across_m_gpu(device, n, k):
    # The small-N layers a split_k table would serve: parallel chunks at small M, in-program
    # chunks (plain and TMA) at large M, and row r the same bits at every M.
    x = randn(512, k, dtype=torch.bfloat16, device=device, seed=60)
    w = randn(n, k, dtype=torch.bfloat16, device=device, seed=61)
    bias = randn(n, dtype=torch.bfloat16, device=device, seed=62)
    for split_k, group in CONFIG_GROUPS.items():
        if split_k == 1:
            continue
        full = matmul(x, w, bias, config=next(c for c in group if c.kind == "plain"))
        torch.testing.assert_close(
            full.double(), matmul_reference(x, w, bias), **tolerance(torch.bfloat16, k)
        )
        for c in group:
            ms = (1, 7, 16, 33, 64, 128) if c.kind == "split_k" else (128, 257, 512)
            for m in ms:
                assert torch.equal(matmul(x[:m], w, bias, config=c), full[:m]), (c, m)


@pytest.mark.gpu
@pytest.mark.parametrize("config", ONE_PER_KIND, ids=config_id)
def test_matmul_cuda_graph_replay_bitwise_equal_per_kind_gpu(device, config):
    # TMA descriptors and split-K partials are made on the host / allocated at capture; replay
    # must still give eager's bits, for the captured input and for new values in it.
    n, k, m = 4096, 4096, 256
    w = randn(n, k, dtype=torch.bfloat16, device=device, seed=63)
    bias = randn(n, dtype=torch.bfloat16, device=device, seed=64)
    static_x = randn(m, k, dtype=torch.bfloat16, device=device, seed=65)
    eager = matmul(static_x, w, bias, config=config)  # also compiles before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = matmul(static_x, w, bias, config=config)
    graph.replay()
    assert torch.equal(static_y, eager)
    static_x.copy_(randn(m, k, dtype=torch.bfloat16, device=device, seed=66))
    graph.replay()
    assert torch.equal(static_y, matmul(static_x, w, bias, config=config))


@pytest.mark.gpu
@pytest.mark.parametrize("config", ONE_PER_KIND, ids=config_id)
def test_matmul_launches_without_host_sync_gpu(device, config):
    # No kind may wait for the GPU on the host (it would break capture and stall decode).
    x = randn(256, 4096, dtype=torch.bfloat16, device=device, seed=67)
    w = randn(4096, 4096, dtype=torch.bfloat16, device=device, seed=68)
    matmul(x, w, config=config)  # compile outside the check
    torch.cuda.set_sync_debug_mode("error")
    try:
        matmul(x, w, config=config)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_matmul_tma_inside_torch_compile_gpu(device):
    # As patches/custom_ops.py registers it: an opaque custom op with a fake impl; compiled
    # code calls the launcher, which builds the TMA descriptors at every call.
    tma = next(c for c in ALL_CONFIGS if c.kind == "tma_persistent" and c.split_k == 1)

    @torch.library.custom_op("det_backend_test::tma_linear", mutates_args=())
    def tma_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return matmul(x, w, config=tma)

    @tma_linear.register_fake
    def _(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x.new_empty((x.shape[0], w.shape[0]))

    compiled = torch.compile(lambda x, w: tma_linear(x, w) * 2, fullgraph=True)
    w = randn(4096, 4096, dtype=torch.bfloat16, device=device, seed=69)
    for m in (128, 300):
        x = randn(m, 4096, dtype=torch.bfloat16, device=device, seed=70 + m)
        assert torch.equal(compiled(x, w), matmul(x, w, config=tma) * 2)
