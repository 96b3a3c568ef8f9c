"""det_backend.kernels.rms_norm: vLLM's semantics, accuracy against float64, batch invariance.

Under TRITON_INTERPRET=1 a cast from fp32 to bf16 truncates instead of rounding to nearest, so
on CPU bf16 results can sit one ulp off vLLM's; tests that compare bits with torch's rounding
run bf16 on the GPU only. Invariance tests compare the kernel with itself and hold everywhere.
"""

import math

import pytest
import torch
from det_backend.kernels.rms_norm import (
    _MAX_WHOLE_ROW,
    LaunchConfig,
    fused_add_rms_norm,
    fused_add_rms_norm_reference,
    launch_candidates,
    launch_config,
    rms_norm,
    rms_norm_reference,
)
from invariance import dtype_id, prefixes_that_change, randn

_F32_EPS = torch.finfo(torch.float32).eps
EPS = 1e-6


def tolerance(hidden: int, *dtypes: torch.dtype) -> dict[str, float]:
    """assert_close tolerances for rms_norm outputs of O(1) size.

    Up to three roundings to the coarsest dtype (to weight.dtype, the weight product, to
    x.dtype), each at most eps / 2, or eps where the interpreter truncates bf16: 4 * eps.
    The fp32 mean of `hidden` squares adds about sqrt(hidden) * eps(fp32), halved by rsqrt.
    """
    tol = 4 * max(torch.finfo(d).eps for d in dtypes) + math.sqrt(hidden) * _F32_EPS
    return {"rtol": tol, "atol": tol}


DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# A weight dtype unlike x's, for each x dtype (vLLM casts the normalised x to weight.dtype).
OTHER_DTYPE = {
    torch.float16: torch.bfloat16,
    torch.bfloat16: torch.float32,
    torch.float32: torch.float16,
}
CHUNKED_HIDDEN = _MAX_WHOLE_ROW + 3000  # walks the row in chunks, with a ragged last one
GPU_MS = (1, 2, 3, 7, 16, 17, 31, 32, 33, 64, 100, 128, 255, 256, 257, 512, 1000, 2048, 4096)


def fused(x, residual, weight, variance_size=None):
    """Both outputs of fused_add_rms_norm as one tensor, for prefixes_that_change."""
    out, residual_out = fused_add_rms_norm(x, residual, weight, EPS, variance_size)
    return torch.stack([out, residual_out], dim=1)


def row_count_dependent_rms_norm(x: torch.Tensor) -> torch.Tensor:
    """fp32 RMSNorm that splits each row over more partial sums when there are few rows (as
    kernels that spread a row over several programs to fill the GPU do)."""
    splits = 8 if x.shape[0] < 32 else 1
    partials = torch.stack([c.pow(2).sum(-1) for c in x.float().chunk(splits, dim=-1)])
    variance = partials.sum(0, keepdim=True).T / x.shape[-1]
    return (x.float() * torch.rsqrt(variance + EPS)).to(x.dtype)


def make_inputs(rows, hidden, dtype, weight_dtype, device, seed):
    x = randn(rows, hidden, dtype=dtype, device=device, seed=seed)
    residual = randn(rows, hidden, dtype=dtype, device=device, seed=seed + 1)
    weight = None
    if weight_dtype is not None:
        weight = randn(hidden, dtype=weight_dtype, device=device, seed=seed + 2)
    return x, residual, weight


def weight_dtype_for(case: str, dtype: torch.dtype) -> torch.dtype | None:
    return {"none": None, "same": dtype, "other": OTHER_DTYPE[dtype]}[case]


# CPU-sized tests (they also run on the GPU when there is one).


@pytest.mark.parametrize("variance_size", [None, 300])
@pytest.mark.parametrize("weight_case", ["none", "same", "other"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_rms_norm_matches_float64(device, dtype, weight_case, variance_size):
    hidden = 1000
    w_dtype = weight_dtype_for(weight_case, dtype)
    x, residual, weight = make_inputs(7, hidden, dtype, w_dtype, device, seed=0)
    tol = tolerance(hidden, dtype, *([w_dtype] if w_dtype else []))

    out = rms_norm(x, weight, EPS, variance_size)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(
        out.double(), rms_norm_reference(x, weight, EPS, variance_size), **tol
    )

    out, residual_out = fused_add_rms_norm(x, residual, weight, EPS, variance_size)
    ref_out, ref_residual = fused_add_rms_norm_reference(x, residual, weight, EPS, variance_size)
    torch.testing.assert_close(out.double(), ref_out, **tol)
    torch.testing.assert_close(residual_out.double(), ref_residual, **tolerance(1, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_rms_norm_chunked_rows_match_float64(device, dtype):
    hidden = CHUNKED_HIDDEN
    x, residual, weight = make_inputs(3, hidden, dtype, dtype, device, seed=3)
    tol = tolerance(hidden, dtype)
    for variance_size in (None, hidden - 5000):
        torch.testing.assert_close(
            rms_norm(x, weight, EPS, variance_size).double(),
            rms_norm_reference(x, weight, EPS, variance_size),
            **tol,
        )
        out, _ = fused_add_rms_norm(x, residual, weight, EPS, variance_size)
        ref_out, _ = fused_add_rms_norm_reference(x, residual, weight, EPS, variance_size)
        torch.testing.assert_close(out.double(), ref_out, **tol)


@pytest.mark.parametrize("hidden", [128, 1000, CHUNKED_HIDDEN])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_rms_norm_batch_invariant(device, dtype, hidden):
    # The row count never reaches the launch config; a few prefixes suffice.
    rows = 34 if hidden < _MAX_WHOLE_ROW else 9
    x, residual, weight = make_inputs(rows, hidden, dtype, dtype, device, seed=5)
    ms = [m for m in (1, 2, 7, 33) if m < rows]
    assert prefixes_that_change(lambda a: rms_norm(a, weight, EPS), x, ms) == []
    assert prefixes_that_change(lambda a: rms_norm(a, None, EPS, hidden // 2), x, ms) == []
    both = torch.stack([x, residual], dim=1)  # [rows, 2, hidden]: slice both at once
    assert prefixes_that_change(lambda a: fused(a[:, 0], a[:, 1], weight), both, ms) == []


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_rms_norm_row_invariant_in_padded_batches(device, dtype):
    hidden = 256
    x, residual, weight = make_inputs(1, hidden, dtype, dtype, device, seed=7)
    alone = rms_norm(x, weight, EPS)[0]
    alone_fused = fused(x, residual, weight)[0]
    for pad in (2, 5, 16, 33):
        batch, batch_residual, _ = make_inputs(pad, hidden, dtype, None, device, seed=8 + pad)
        batch[pad // 2], batch_residual[pad // 2] = x[0], residual[0]
        assert torch.equal(rms_norm(batch, weight, EPS)[pad // 2], alone), pad
        assert torch.equal(fused(batch, batch_residual, weight)[pad // 2], alone_fused), pad


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_rms_norm_any_rank(device, dtype):
    x, residual, weight = make_inputs(12, 64, dtype, dtype, device, seed=9)
    expected = rms_norm(x, weight, EPS)
    expected_fused = fused_add_rms_norm(x, residual, weight, EPS)
    assert torch.equal(rms_norm(x[3], weight, EPS), expected[3])  # 1-D
    for shape in ((3, 4, 64), (2, 3, 2, 64)):
        out = rms_norm(x.view(shape), weight, EPS)
        assert out.shape == shape and torch.equal(out.view(12, 64), expected)
        out, residual_out = fused_add_rms_norm(x.view(shape), residual.view(shape), weight, EPS)
        assert torch.equal(out.view(12, 64), expected_fused[0])
        assert torch.equal(residual_out.view(12, 64), expected_fused[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_rms_norm_3d_noncontiguous_rows(device, dtype):
    # q/k norm: [T, H, D] views of q and k inside a fused qkv [T, (H + 2 * KV) * D] tensor.
    tokens, heads, kv_heads, head_dim = 5, 4, 2, 32
    width = (heads + 2 * kv_heads) * head_dim
    qkv = randn(tokens, width, dtype=dtype, device=device, seed=10)
    weight = randn(head_dim, dtype=dtype, device=device, seed=11)
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    assert not q.is_contiguous() and not k.is_contiguous()
    for t in (q, k):
        out = rms_norm(t, weight, EPS)
        assert out.shape == t.shape
        assert torch.equal(out, rms_norm(t.contiguous(), weight, EPS))
        torch.testing.assert_close(
            out.double(), rms_norm_reference(t, weight, EPS), **tolerance(head_dim, dtype)
        )
    residual = randn(tokens, heads, head_dim, dtype=dtype, device=device, seed=12)
    out, residual_out = fused_add_rms_norm(q, residual, weight, EPS)
    expected = fused_add_rms_norm(q.contiguous(), residual, weight, EPS)
    assert torch.equal(out, expected[0]) and torch.equal(residual_out, expected[1])


# bf16 casts truncate under the interpreter: compared with torch's rounding on the GPU only.
EXACT_DTYPES = (
    torch.float16,
    torch.float32,
    pytest.param(torch.bfloat16, marks=pytest.mark.gpu),
)


@pytest.mark.parametrize("hidden", [1000, CHUNKED_HIDDEN])
@pytest.mark.parametrize("dtype", EXACT_DTYPES, ids=dtype_id)
def test_fused_add_rms_norm_residual_is_rounded_sum(device, dtype, hidden):
    x, residual, weight = make_inputs(4, hidden, dtype, dtype, device, seed=13)
    _, residual_out = fused_add_rms_norm(x, residual, weight, EPS)
    assert torch.equal(residual_out, (x.float() + residual.float()).to(dtype))


@pytest.mark.parametrize("hidden", [1000, CHUNKED_HIDDEN])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_fused_add_rms_norm_inplace_equals_out_of_place(device, dtype, hidden):
    x, residual, weight = make_inputs(4, hidden, dtype, dtype, device, seed=14)
    expected_out, expected_residual = fused_add_rms_norm(x, residual, weight, EPS)
    # The norm must use the fp32 sum, not the rounded residual it has just written.
    x_in, residual_in = x.clone(), residual.clone()
    out, residual_out = fused_add_rms_norm(x_in, residual_in, weight, EPS, inplace=True)
    assert out is x_in and residual_out is residual_in
    assert torch.equal(out, expected_out) and torch.equal(residual_out, expected_residual)


@pytest.mark.parametrize("hidden", [1500, 5120])
def test_every_launch_candidate_matches_float64_and_keeps_rows(device, hidden):
    # Any candidate may become launch_config's choice for its hidden size: each must be
    # accurate and give a row the same bits whatever the row count (fp32: a changed sum of
    # squares shows there first; fp16 for the interpreter, whose bf16 math is off).
    candidates = launch_candidates(hidden)
    assert candidates[0] == launch_config(hidden) and len(set(candidates)) == len(candidates)
    assert any(not c.whole_row for c in candidates) and any(c.whole_row for c in candidates)
    for dtype in (torch.float32, torch.float16):
        x, residual, weight = make_inputs(9, hidden, dtype, dtype, device, seed=30)
        tol = tolerance(hidden, dtype)
        ref_out, _ = fused_add_rms_norm_reference(x, residual, weight, EPS)
        both = torch.stack([x, residual], dim=1)
        for c in candidates:
            out, _ = fused_add_rms_norm(x, residual, weight, EPS, config=c)
            torch.testing.assert_close(out.double(), ref_out, **tol, msg=lambda m, c=c: f"{c}: {m}")
            fn = lambda a, c=c, weight=weight: torch.cat(  # noqa: E731
                [
                    rms_norm(a[:, 0], weight, EPS, config=c),
                    *fused_add_rms_norm(a[:, 0], a[:, 1], weight, EPS, config=c),
                ],
                dim=-1,
            )
            assert prefixes_that_change(fn, both, (1, 2, 7)) == [], c


def test_launch_config_follows_the_real_columns():
    # A warp per 512 real columns (power of two); padded blocks no longer get the padding's.
    assert launch_config(5120) == LaunchConfig(True, 8192, 8)
    assert launch_config(4096) == LaunchConfig(True, 4096, 8)
    assert launch_config(8192) == LaunchConfig(True, 8192, 16)
    assert launch_config(128) == LaunchConfig(True, 128, 1)
    assert launch_config(CHUNKED_HIDDEN) == LaunchConfig(False, 8192, 16)


def test_rms_norm_rejects_bad_launch_config(device):
    x = torch.ones(4, 640, dtype=torch.float16, device=device)
    for bad in (
        LaunchConfig(True, 512, 4),
        LaunchConfig(False, 1000, 4),
        LaunchConfig(True, 1024, 3),
    ):
        with pytest.raises(ValueError, match="rms_norm"):
            rms_norm(x, None, EPS, config=bad)


def test_rms_norm_nondeterministic_control(device):
    # The invariance check above must be able to fail: a reduction chunked by the row count.
    x = randn(40, 4096, dtype=torch.float32, device=device, seed=15)
    ms = (1, 7, 31)
    assert prefixes_that_change(row_count_dependent_rms_norm, x, ms) != []
    assert prefixes_that_change(lambda a: rms_norm(a, None, EPS), x, ms) == []


def test_rms_norm_empty_rows(device):
    x = torch.empty(0, 64, dtype=torch.float16, device=device)
    weight = torch.ones(64, dtype=torch.float16, device=device)
    assert rms_norm(x, weight, EPS).shape == (0, 64)
    out, residual_out = fused_add_rms_norm(x, x.clone(), weight, EPS)
    assert out.shape == residual_out.shape == (0, 64)


@pytest.mark.parametrize(
    "x_shape, x_dtype, w_shape, w_dtype, variance_size, match",
    [
        ((4, 64), torch.float16, (32,), torch.float16, None, "weight"),
        ((4, 64), torch.float16, (64, 1), torch.float16, None, "weight"),
        ((4, 64), torch.float16, (64,), torch.float64, None, "weight"),
        ((4, 64), torch.float64, (64,), torch.float64, None, "dtype"),
        ((4, 64), torch.float16, (64,), torch.float16, 65, "variance_size"),
        ((4, 64), torch.float16, (64,), torch.float16, 0, "variance_size"),
        ((), torch.float16, None, None, None, "x"),
        ((4, 0), torch.float16, None, None, None, "x"),
    ],
)
def test_rms_norm_rejects_bad_input(
    device, x_shape, x_dtype, w_shape, w_dtype, variance_size, match
):
    x = torch.ones(x_shape, dtype=x_dtype, device=device)
    weight = None if w_shape is None else torch.ones(w_shape, dtype=w_dtype, device=device)
    with pytest.raises(ValueError, match=match):
        rms_norm(x, weight, EPS, variance_size)
    if x.dim() >= 1:
        with pytest.raises(ValueError, match=match):
            fused_add_rms_norm(x, x.clone(), weight, EPS, variance_size)


def test_rms_norm_rejects_bad_layout_and_residual(device):
    x = torch.ones(4, 64, dtype=torch.float16, device=device)
    with pytest.raises(ValueError, match="contiguous last dim"):
        rms_norm(torch.ones(64, 4, dtype=torch.float16, device=device).T, None, EPS)
    with pytest.raises(ValueError, match="residual"):
        fused_add_rms_norm(x, torch.ones(4, 32, dtype=torch.float16, device=device), None, EPS)
    with pytest.raises(ValueError, match="residual"):
        fused_add_rms_norm(x, x.float(), None, EPS)
    # [T, H, D] whose leading dims cannot merge into one row index without a copy.
    unmergeable = torch.ones(3, 5, 4, 64, dtype=torch.float16, device=device).transpose(0, 1)
    with pytest.raises(ValueError, match="without a copy"):
        rms_norm(unmergeable, None, EPS)


# GPU tests at real shapes, bf16.


@pytest.mark.gpu
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("hidden", [128, 4096, 5120, 8192, 16384, 20480])
def test_rms_norm_matches_float64_gpu(device, hidden, weight_dtype):
    x, residual, weight = make_inputs(1000, hidden, torch.bfloat16, weight_dtype, device, seed=20)
    tol = tolerance(hidden, torch.bfloat16)
    out = rms_norm(x, weight, EPS)
    torch.testing.assert_close(out.double(), rms_norm_reference(x, weight, EPS), **tol)
    out, residual_out = fused_add_rms_norm(x, residual, weight, EPS)
    ref_out, _ = fused_add_rms_norm_reference(x, residual, weight, EPS)
    torch.testing.assert_close(out.double(), ref_out, **tol)
    assert torch.equal(residual_out, (x.float() + residual.float()).bfloat16())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("hidden", [128, 1000, 4096, 8192, CHUNKED_HIDDEN])
def test_rms_norm_batch_invariant_gpu(device, hidden, dtype):
    # fp32 outputs show a changed sum of squares far more often than bf16 ones.
    x, residual, weight = make_inputs(max(GPU_MS), hidden, dtype, dtype, device, seed=21)
    ms = GPU_MS[:-1]
    assert prefixes_that_change(lambda a: rms_norm(a, weight, EPS), x, ms) == []
    assert prefixes_that_change(lambda a: rms_norm(a, None, EPS, hidden // 2), x, ms) == []
    both = torch.stack([x, residual], dim=1)
    assert prefixes_that_change(lambda a: fused(a[:, 0], a[:, 1], weight), both, ms) == []


@pytest.mark.gpu
def test_rms_norm_qk_norm_gpu(device):
    # Qwen3-8B q/k norm: 32 q heads, 8 kv heads, head_dim 128, views into qkv.
    tokens, heads, kv_heads, head_dim = 1000, 32, 8, 128
    qkv = randn(
        tokens, (heads + 2 * kv_heads) * head_dim, dtype=torch.bfloat16, device=device, seed=22
    )
    weight = randn(head_dim, dtype=torch.bfloat16, device=device, seed=23)
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    out = rms_norm(q, weight, EPS)
    assert torch.equal(out, rms_norm(q.contiguous(), weight, EPS))
    assert prefixes_that_change(lambda a: rms_norm(a, weight, EPS), q, (1, 7, 33, 257)) == []


@pytest.mark.gpu
def test_fused_add_rms_norm_cuda_graph_replay_bitwise_equal(device):
    x, residual, weight = make_inputs(64, 4096, torch.bfloat16, torch.bfloat16, device, seed=24)
    expected = fused_add_rms_norm(x, residual, weight, EPS)  # also compiles before capture
    x_in, residual_in = x.clone(), residual.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fused_add_rms_norm(x_in, residual_in, weight, EPS, inplace=True)
    x_in.copy_(x)
    residual_in.copy_(residual)
    graph.replay()
    assert torch.equal(x_in, expected[0]) and torch.equal(residual_in, expected[1])
