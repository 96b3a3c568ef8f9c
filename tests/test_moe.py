"""det_backend.kernels.moe: routing and its tie-break, accuracy against float64, bitwise batch
invariance; the patch that routes vLLM's unquantized FusedMoE to it.

As in test_matmul.py: under TRITON_INTERPRET=1, tl.dot rounds once per BLOCK_K step, so on
CPU tests that compare different tiles use H, I <= min(block_k) (one K step); tests with
several K steps force one config. The interpreter's bf16 tl.dot is garbage: CPU tests use
fp16/fp32, GPU tests bf16 at Mixtral-8x7B and Qwen3-30B-A3B widths.
"""

import math
from types import SimpleNamespace

import pytest
import torch
from det_backend.kernels.moe import (
    MOE_CONFIGS,
    all_configs,
    config_for,
    fused_experts,
    fused_experts_reference,
    fused_moe,
    fused_moe_reference,
    moe_route,
    moe_route_reference,
    sort_by_expert,
)
from invariance import dtype_id, prefixes_that_change, randn

_F32_EPS = torch.finfo(torch.float32).eps


def tolerance(dtype: torch.dtype, k: int) -> dict[str, float]:
    """assert_close tolerances for fused_moe outputs of O(1) size (weights scaled by 1/sqrt(K)).

    Two roundings to dtype (the SiLU-and-mul activations, the output), each at most eps / 2
    relative; the activation error spreads over the down projection's terms with random signs,
    so it stays near eps / 2 absolute: 4 * eps leaves a factor 2 on each. The fp32 sums of K
    products drift by well under K * eps(fp32).
    """
    eps = torch.finfo(dtype).eps
    return {"rtol": 4 * eps, "atol": 4 * eps + 2 * k * _F32_EPS}


CPU_DTYPES = (torch.float16, torch.float32)
ALL_CONFIGS = all_configs()
MIN_BLOCK_K = min(c.block_k for c in ALL_CONFIGS)
# (num_experts, top_k): the routing shapes of Mixtral-8x7B and, scaled down, Qwen3-30B-A3B
# (128 experts, top 8); both renormalise.
CPU_ROUTINGS = {"mixtral": (8, 2), "qwen3-moe": (32, 8)}
# Full widths: (num_experts, top_k, hidden H, intermediate I).
GPU_MODELS = {"mixtral-8x7b": (8, 2, 4096, 14336), "qwen3-30b-a3b": (128, 8, 2048, 768)}
GPU_MS = (1, 2, 3, 7, 16, 17, 31, 32, 33, 64, 100, 128, 255, 256, 257, 512, 1000, 2048, 4096)


def bucket_edges(top_k: int, num_experts: int) -> list[int]:
    """Every token count where config_for changes its answer, and the one just past it."""
    edges = set()
    for c in MOE_CONFIGS[:-1]:
        last = c.max_rows_per_expert * num_experts // top_k  # ceil(T * k / E) <= max_rows
        edges |= {last, last + 1}
    return sorted(edges)


def make_experts(num_experts, hidden, inter, dtype, device, seed):
    """w13 [E, 2I, H], w2 [E, H, I] scaled by 1/sqrt(fan-in): O(1) activations and outputs."""
    w13 = randn(num_experts, 2 * inter, hidden, dtype=torch.float32, device=device, seed=seed)
    w2 = randn(num_experts, hidden, inter, dtype=torch.float32, device=device, seed=seed + 1)
    return (w13 / math.sqrt(hidden)).to(dtype), (w2 / math.sqrt(inter)).to(dtype)


def per_token(fn, *tensors):
    """fn over rows of several per-token tensors, as a function of row indices: lets
    prefixes_that_change slice hidden states and router logits together."""
    return lambda idx: fn(*(t[idx] for t in tensors))


def assert_token_invariant_in_skewed_batches(x, logits, w13, w2, top_k, pads, seed) -> None:
    """Token 0 gives the same bits alone and inside batches whose other tokens crowd one expert
    (alternately one of token 0's own, so that its rows move deep into a long expert group)."""
    alone = fused_moe(x[:1], w13, w2, logits[:1], top_k)[0]
    own_expert = int(moe_route(logits[:1], top_k, True)[1][0, 0])
    num_experts = logits.shape[1]
    for i, pad in enumerate(pads):
        batch_x = randn(pad, x.shape[1], dtype=x.dtype, device=x.device.type, seed=seed + 2 * i)
        batch_logits = randn(
            pad, num_experts, dtype=logits.dtype, device=x.device.type, seed=seed + 2 * i + 1
        )
        crowded = own_expert if i % 2 == 0 else (own_expert + 1 + i) % num_experts
        batch_logits[:, crowded] += 3.0
        pos = (2 * pad) // 3
        batch_x[pos] = x[0]
        batch_logits[pos] = logits[0]
        out = fused_moe(batch_x, w13, w2, batch_logits, top_k)
        assert torch.equal(out[pos], alone), f"batch of {pad}, expert {crowded} crowded"


def load_dependent_moe(x, w13, w2, logits, top_k):
    """fp32 MoE whose expert GEMMs split K into more partial sums when an expert has few rows
    (as split-K kernels do to fill the GPU): a token's bits depend on who shares its experts."""
    weights, ids = moe_route_reference(logits, top_k, True)
    inter = w2.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in ids.unique().tolist():
        t, k = (ids == e).nonzero(as_tuple=True)
        splits = 4 if len(t) < 8 else 1
        parts = zip(x[t].float().chunk(splits, 1), w13[e].float().chunk(splits, 1), strict=True)
        h = torch.stack([a @ b.T for a, b in parts]).sum(0)
        act = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
        out.index_add_(0, t, weights[t, k].float()[:, None] * (act @ w2[e].float().T))
    return out


# CPU-sized tests (they also run on the GPU when there is one).


def test_config_table_covers_every_batch():
    max_rows = [c.max_rows_per_expert for c in MOE_CONFIGS]
    assert max_rows == sorted(max_rows) and len(set(max_rows)) == len(max_rows)
    for num_experts, top_k in CPU_ROUTINGS.values():
        edges = bucket_edges(top_k, num_experts)
        for before, after in zip(edges[::2], edges[1::2], strict=True):
            assert config_for(before, top_k, num_experts) != config_for(after, top_k, num_experts)
    assert config_for(1, 8, 128) is MOE_CONFIGS[0]
    assert config_for(10**7, 2, 8) is MOE_CONFIGS[-1]


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("routing", CPU_ROUTINGS.values(), ids=CPU_ROUTINGS.keys())
def test_moe_route_matches_float64(device, routing, dtype, renormalize):
    num_experts, top_k = routing
    logits = randn(45, num_experts, dtype=dtype, device=device, seed=0)
    weights, ids = moe_route(logits, top_k, renormalize)
    ref_weights, ref_ids = moe_route_reference(logits, top_k, renormalize)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert torch.equal(ids.long(), ref_ids)
    # fp32 exp, sum and divisions (approximate ones on the GPU): a few ulp of fp32.
    torch.testing.assert_close(weights.double(), ref_weights, rtol=16 * _F32_EPS, atol=_F32_EPS)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=dtype_id)
def test_moe_route_ties_go_to_lower_expert(device, dtype):
    logits = torch.tensor(
        [
            [0, 0, 0, 0, 0, 0, 0, 0],  # all equal
            [1, 3, 3, 0, 3, -1, 2, 3],  # four-way tie for first place
            [5, 1, 2, 2, 0, 2, -3, 1],  # a clear first, then a three-way tie
            [-1, -1, 4, -1, 4, -1, -1, 4],  # three-way tie for first place
            [3, 1, 1, 0, 1, 2, 1, 0],  # a four-way tie for the last place taken
        ],
        dtype=dtype,
        device=device,
    )
    expected = [[0, 1, 2], [1, 2, 4], [0, 2, 3], [2, 4, 7], [0, 5, 1]]
    for renormalize in (True, False):
        weights, ids = moe_route(logits, 3, renormalize)
        assert ids.tolist() == expected
        # Tied experts get bitwise equal weights.
        assert torch.equal(weights[0], weights[0, :1].expand(3))
        assert torch.equal(weights[2, 1], weights[2, 2])
    _, ref_ids = moe_route_reference(logits, 3, True)
    assert ref_ids.tolist() == expected


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=dtype_id)
def test_moe_route_batch_invariant(device, dtype):
    logits = randn(70, 32, dtype=dtype, device=device, seed=1)
    logits[::3, 5] = logits[::3, 9]  # ties, at every row position of the 16-token tile
    for renormalize in (True, False):

        def route(rows, renormalize=renormalize):
            weights, ids = moe_route(rows, 8, renormalize)
            return torch.cat([weights, ids.float()], dim=1)

        assert prefixes_that_change(route, logits, (1, 2, 15, 16, 17, 33, 69)) == []


def test_sort_by_expert_groups_pairs_stably(device):
    num_experts, top_k, block_m = 8, 2, 16
    logits = randn(60, num_experts, dtype=torch.float32, device=device, seed=2)
    logits[:, 3] += 3.0  # expert 3 gets more than one block of rows
    ids = moe_route(logits, top_k, True)[1]
    sorted_pairs, block_expert = sort_by_expert(ids, num_experts, block_m)
    num_pairs = ids.numel()
    flat = ids.reshape(-1).tolist()
    blocks = sorted_pairs.view(-1, block_m).tolist()
    seen, experts_in_order = [], []
    for rows, expert in zip(blocks, block_expert.tolist(), strict=True):
        real = [p for p in rows if p != num_pairs]
        if expert == -1:
            assert real == []
            continue
        experts_in_order.append(expert)
        assert rows[: len(real)] == real  # padding only at the end of a block
        assert all(flat[p] == expert for p in real)
        seen += real
    assert sorted(seen) == list(range(num_pairs))  # every pair exactly once
    assert experts_in_order == sorted(experts_in_order)
    # Stable: within an expert, pairs in ascending order.
    assert seen == sorted(range(num_pairs), key=lambda p: flat[p])


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("routing", CPU_ROUTINGS.values(), ids=CPU_ROUTINGS.keys())
@pytest.mark.parametrize("m", [1, 37])
def test_fused_moe_matches_float64(device, m, routing, dtype):
    num_experts, top_k = routing
    hidden, inter = 80, 72  # ragged: several K steps with a masked tail, N tails
    w13, w2 = make_experts(num_experts, hidden, inter, dtype, device, seed=3)
    x = randn(m, hidden, dtype=dtype, device=device, seed=5)
    logits = randn(m, num_experts, dtype=torch.float32, device=device, seed=6)
    out = fused_moe(x, w13, w2, logits, top_k)
    assert out.shape == x.shape and out.dtype == dtype
    expected = fused_moe_reference(x, w13, w2, logits, top_k)
    torch.testing.assert_close(out.double(), expected, **tolerance(dtype, max(hidden, inter)))


def test_fused_experts_takes_vllm_routing_tensors(device):
    # vLLM's routers hand over fp32 weights and int32 (or int64) ids, not renormalised here.
    num_experts, top_k, hidden, inter = 8, 2, 64, 48
    w13, w2 = make_experts(num_experts, hidden, inter, torch.float16, device, seed=7)
    x = randn(9, hidden, dtype=torch.float16, device=device, seed=9)
    logits = randn(9, num_experts, dtype=torch.float32, device=device, seed=10)
    weights, ids = moe_route_reference(logits, top_k, False)
    out = fused_experts(x, w13, w2, weights.float(), ids)
    assert torch.equal(fused_experts(x, w13, w2, weights.float(), ids.int()), out)
    expected = fused_experts_reference(x, w13, w2, weights, ids)
    torch.testing.assert_close(out.double(), expected, **tolerance(torch.float16, hidden))


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=dtype_id)
def test_fused_moe_batch_invariant(device, dtype):
    # H, I <= MIN_BLOCK_K: the launcher's choice of tile changes with T (see module docstring).
    # Mixtral's routing with 4 experts reaches the largest tile at 258 tokens.
    num_experts, top_k, hidden, inter = 4, 2, MIN_BLOCK_K, 48
    w13, w2 = make_experts(num_experts, hidden, inter, dtype, device, seed=11)
    t = 262
    x = randn(t, hidden, dtype=dtype, device=device, seed=13)
    logits = randn(t, num_experts, dtype=dtype, device=device, seed=14)
    ms = sorted({1, 7, t - 1, *bucket_edges(top_k, num_experts)})
    fn = per_token(lambda a, g: fused_moe(a, w13, w2, g, top_k), x, logits)
    assert prefixes_that_change(fn, torch.arange(t, device=device), ms) == []
    assert_token_invariant_in_skewed_batches(x, logits, w13, w2, top_k, pads=(2, 16, 70), seed=15)


def test_fused_moe_batch_invariant_many_experts(device):
    # Many experts, each seeing a few rows (as in Qwen3-MoE's 128 experts, top 8).
    num_experts, top_k, hidden, inter = 16, 4, 48, MIN_BLOCK_K
    w13, w2 = make_experts(num_experts, hidden, inter, torch.float16, device, seed=16)
    t = 20
    x = randn(t, hidden, dtype=torch.float16, device=device, seed=18)
    logits = randn(t, num_experts, dtype=torch.float16, device=device, seed=19)
    ms = sorted(m for m in {1, 3, *bucket_edges(top_k, num_experts), t - 1} if m < t)
    fn = per_token(lambda a, g: fused_moe(a, w13, w2, g, top_k), x, logits)
    assert prefixes_that_change(fn, torch.arange(t, device=device), ms) == []
    assert_token_invariant_in_skewed_batches(x, logits, w13, w2, top_k, pads=(5, 18), seed=20)


@pytest.mark.parametrize(
    "config", MOE_CONFIGS, ids=lambda c: f"BM{c.block_m}-BN{c.block_n}-BK{c.block_k}"
)
def test_fused_moe_batch_invariant_within_config(device, config):
    # Several K steps with ragged tails in both GEMMs, one forced tile.
    num_experts, top_k = 4, 2
    hidden, inter = config.block_k + 8, config.block_k + 24
    w13, w2 = make_experts(num_experts, hidden, inter, torch.float16, device, seed=21)
    t = config.block_m + 5
    x = randn(t, hidden, dtype=torch.float16, device=device, seed=23)
    logits = randn(t, num_experts, dtype=torch.float16, device=device, seed=24)
    fn = per_token(lambda a, g: fused_moe(a, w13, w2, g, top_k, config=config), x, logits)
    ms = (1, 2, config.block_m // 2, config.block_m - 1, config.block_m, t - 1)
    assert prefixes_that_change(fn, torch.arange(t, device=device), ms) == []


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=dtype_id)
def test_fused_moe_every_config_bitwise_equal(device, dtype):
    num_experts, top_k, hidden, inter = 8, 2, MIN_BLOCK_K, 40
    w13, w2 = make_experts(num_experts, hidden, inter, dtype, device, seed=25)
    x = randn(50, hidden, dtype=dtype, device=device, seed=27)
    logits = randn(50, num_experts, dtype=dtype, device=device, seed=28)
    first, *rest = (fused_moe(x, w13, w2, logits, top_k, config=c) for c in ALL_CONFIGS)
    for config, out in zip(ALL_CONFIGS[1:], rest, strict=True):
        assert torch.equal(out, first), config


def test_fused_moe_nondeterministic_control(device):
    # The invariance check above must be able to fail: an MoE whose K grouping depends on load.
    num_experts, top_k, hidden, inter = 8, 2, 64, 32
    w13, w2 = make_experts(num_experts, hidden, inter, torch.float32, device, seed=29)
    t = 40
    x = randn(t, hidden, dtype=torch.float32, device=device, seed=31)
    logits = randn(t, num_experts, dtype=torch.float32, device=device, seed=32)
    idx, ms = torch.arange(t, device=device), (1, 3, 7)
    control = per_token(lambda a, g: load_dependent_moe(a, w13, w2, g, top_k), x, logits)
    ours = per_token(lambda a, g: fused_moe(a, w13, w2, g, top_k), x, logits)
    assert prefixes_that_change(control, idx, ms) != []
    assert prefixes_that_change(ours, idx, ms) == []


def test_fused_moe_empty_batch(device):
    w13, w2 = make_experts(4, 32, 16, torch.float16, device, seed=33)
    x = torch.empty(0, 32, dtype=torch.float16, device=device)
    out = fused_moe(x, w13, w2, torch.empty(0, 4, dtype=torch.float16, device=device), 2)
    assert out.shape == (0, 32) and out.dtype == torch.float16


@pytest.mark.parametrize(
    "x_shape, w13_shape, w2_shape, dtype, top_k",
    [
        ((4, 32), (4, 30, 32), (4, 32, 16), torch.float16, 2),  # w13 not [E, 2I, H]
        ((4, 32), (4, 32, 32), (4, 32, 15), torch.float16, 2),  # I mismatch
        ((4, 32), (4, 32, 30), (4, 32, 16), torch.float16, 2),  # H mismatch
        ((32,), (4, 32, 32), (4, 32, 16), torch.float16, 2),  # 1-D hidden
        ((4, 32), (4, 32, 32), (4, 32, 16), torch.float64, 2),  # unsupported dtype
        ((4, 32), (4, 32, 32), (4, 32, 16), torch.float16, 5),  # top_k > E
    ],
)
def test_fused_moe_rejects_bad_input(device, x_shape, w13_shape, w2_shape, dtype, top_k):
    x = torch.ones(x_shape, dtype=dtype, device=device)
    w13 = torch.ones(w13_shape, dtype=dtype, device=device)
    w2 = torch.ones(w2_shape, dtype=dtype, device=device)
    logits = torch.ones(4, 4, dtype=torch.float32, device=device)
    with pytest.raises(ValueError, match="det_backend: (fused_moe|moe_route)"):
        fused_moe(x, w13, w2, logits, top_k)


def test_fused_experts_rejects_mismatched_routing(device):
    w13, w2 = make_experts(4, 32, 16, torch.float16, device, seed=34)
    x = torch.ones(4, 32, dtype=torch.float16, device=device)
    ids = torch.zeros(4, 2, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="topk"):
        fused_experts(x, w13, w2, torch.ones(3, 2, device=device), ids)
    with pytest.raises(ValueError, match="topk_ids must be int32/int64"):
        fused_experts(x, w13, w2, torch.ones(4, 2, device=device), ids.float())
    with pytest.raises(ValueError, match="dtype mismatch"):
        fused_experts(x, w13.float(), w2, torch.ones(4, 2, device=device), ids)


# The vLLM patch (CPU: the class is imported and patched, never run on CUDA).


@pytest.fixture
def moe_patch(monkeypatch):
    """patches.moe applied for one test; the class attributes it replaces are put back after."""
    from det_backend.patches import moe
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import (
        UnquantizedFusedMoEMethod,
    )

    for name in ("is_monolithic", "apply_monolithic", "process_weights_after_loading"):
        monkeypatch.setattr(
            UnquantizedFusedMoEMethod, name, UnquantizedFusedMoEMethod.__dict__[name]
        )
    monkeypatch.setattr(moe, "_original_process_weights", None)
    return UnquantizedFusedMoEMethod, moe


def supported_layer(device="cpu", **overrides):
    """What patches.moe reads of a vLLM RoutedExperts (Mixtral's values), with overrides."""
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation

    w13, w2 = make_experts(8, 64, 48, torch.float16, device, seed=35)
    fields = dict(
        layer_name="model.layers.0.block_sparse_moe.experts",
        w13_weight=w13,
        w2_weight=w2,
        top_k=2,
        renormalize=True,
        activation=MoEActivation.SILU,
        scoring_func="softmax",
        use_grouped_topk=False,
        custom_routing_function=None,
        e_score_correction_bias=None,
        routed_scaling_factor=1.0,
        apply_router_weight_on_input=False,
        moe_config=SimpleNamespace(has_bias=False),
        swiglu_limit=None,
        swiglu_alpha=None,
        swiglu_beta=None,
        expert_map=None,
        local_num_experts=8,
        global_num_experts=8,
    )
    fields.update(overrides)
    return SimpleNamespace(**fields)


def triton_method(backend=None):
    from vllm.model_executor.layers.fused_moe.oracle.unquantized import UnquantizedMoeBackend

    return SimpleNamespace(unquantized_backend=backend or UnquantizedMoeBackend.TRITON)


def test_patch_routes_fused_moe_through_our_kernel(moe_patch, device):
    method_cls, moe = moe_patch
    assert moe.problems() != []
    moe.apply()
    moe.apply()  # idempotent: the wrapped vLLM method is not wrapped twice
    assert moe.problems() == []
    method, layer = triton_method(), supported_layer(device)
    assert method_cls.is_monolithic.fget(method) is True
    x = randn(5, 64, dtype=torch.float16, device=device, seed=37)
    logits = randn(5, 8, dtype=torch.float16, device=device, seed=38)
    out = method_cls.apply_monolithic(method, layer, x, logits)
    assert torch.equal(out, fused_moe(x, layer.w13_weight, layer.w2_weight, logits, 2, True))


def test_patch_checks_layers_after_vllm_loads_their_weights(moe_patch):
    method_cls, moe = moe_patch
    moe.apply()
    calls = []
    moe._original_process_weights = lambda self, layer: calls.append(layer)
    layer = supported_layer()
    method_cls.process_weights_after_loading(triton_method(), layer)
    assert calls == [layer]
    bad = supported_layer(use_grouped_topk=True)
    with pytest.raises(ValueError, match="block_sparse_moe.experts .*grouped top-k"):
        method_cls.process_weights_after_loading(triton_method(), bad)


def test_patch_pins_the_triton_moe_backend(moe_patch):
    _, moe = moe_patch
    for before, after in (("auto", "triton"), ("triton", "triton"), ("flashinfer_cutlass",) * 2):
        config = SimpleNamespace(kernel_config=SimpleNamespace(moe_backend=before))
        moe.apply(config)
        assert config.kernel_config.moe_backend == after


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"scoring_func": "sigmoid"}, "scoring function sigmoid"),
        ({"use_grouped_topk": True}, "grouped top-k"),
        ({"custom_routing_function": max}, "custom routing function"),
        ({"e_score_correction_bias": torch.zeros(8)}, "correction bias"),
        ({"routed_scaling_factor": 2.5}, "routed_scaling_factor=2.5"),
        ({"apply_router_weight_on_input": True}, "weights applied to the input"),
        ({"moe_config": SimpleNamespace(has_bias=True)}, "expert biases"),
        ({"swiglu_limit": 7.0}, "SwiGLU"),
        ({"local_num_experts": 4}, "expert parallelism"),
        ({"w13_weight": torch.zeros(8, 96, 64)}, "w13_weight dtype torch.float32"),
    ],
)
def test_patch_layer_refusals_name_the_cause(overrides, message):
    from det_backend.patches.moe import layer_problems

    assert layer_problems(triton_method(), supported_layer()) == []
    reasons = layer_problems(triton_method(), supported_layer(**overrides))
    assert any(message in r for r in reasons), reasons


def test_patch_refuses_backends_that_relay_weights():
    from det_backend.patches.moe import layer_problems
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.oracle.unquantized import UnquantizedMoeBackend

    method = triton_method(UnquantizedMoeBackend.FLASHINFER_TRTLLM)
    assert any("--moe-backend triton" in r for r in layer_problems(method, supported_layer()))
    gelu = supported_layer(activation=MoEActivation.GELU)
    assert any("activation gelu" in r for r in layer_problems(triton_method(), gelu))


# GPU tests at full Mixtral-8x7B and Qwen3-30B-A3B widths, bf16 (router logits in bf16, as
# the models' gate layers produce them).


def gpu_model(name, device, seed):
    num_experts, top_k, hidden, inter = GPU_MODELS[name]
    w13, w2 = make_experts(num_experts, hidden, inter, torch.bfloat16, device, seed)
    return num_experts, top_k, hidden, w13, w2


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 33, 300])
@pytest.mark.parametrize("model", GPU_MODELS)
def test_fused_moe_matches_float64_gpu(device, model, m):
    num_experts, top_k, hidden, w13, w2 = gpu_model(model, device, seed=40)
    x = randn(m, hidden, dtype=torch.bfloat16, device=device, seed=42)
    logits = randn(m, num_experts, dtype=torch.bfloat16, device=device, seed=43)
    out = fused_moe(x, w13, w2, logits, top_k)
    expected = fused_moe_reference(x, w13, w2, logits, top_k)
    tol = tolerance(torch.bfloat16, max(w2.shape[1:]))
    torch.testing.assert_close(out.double(), expected, **tol)


@pytest.mark.gpu
@pytest.mark.parametrize("model", GPU_MODELS)
def test_fused_moe_batch_invariant_gpu(device, model):
    num_experts, top_k, hidden, w13, w2 = gpu_model(model, device, seed=44)
    t = max(GPU_MS)
    x = randn(t, hidden, dtype=torch.bfloat16, device=device, seed=46)
    logits = randn(t, num_experts, dtype=torch.bfloat16, device=device, seed=47)
    ms = sorted({*GPU_MS, *bucket_edges(top_k, num_experts)} - {t})
    fn = per_token(lambda a, g: fused_moe(a, w13, w2, g, top_k), x, logits)
    assert prefixes_that_change(fn, torch.arange(t, device=device), ms) == []
    assert_token_invariant_in_skewed_batches(
        x, logits, w13, w2, top_k, pads=(2, 8, 16, 48, 128, 256, 1024, 4096), seed=48
    )


@pytest.mark.gpu
@pytest.mark.parametrize("model", GPU_MODELS)
def test_fused_moe_every_config_bitwise_equal_gpu(device, model):
    num_experts, top_k, hidden, w13, w2 = gpu_model(model, device, seed=60)
    x = randn(300, hidden, dtype=torch.bfloat16, device=device, seed=62)
    logits = randn(300, num_experts, dtype=torch.bfloat16, device=device, seed=63)
    first, *rest = (fused_moe(x, w13, w2, logits, top_k, config=c) for c in ALL_CONFIGS)
    for config, out in zip(ALL_CONFIGS[1:], rest, strict=True):
        assert torch.equal(out, first), config


@pytest.mark.gpu
def test_fused_moe_vllm_default_path_control_gpu(device, record_property):
    # vLLM's unquantized path (CUDA topk_softmax, Triton fused_experts with a tile picked by
    # the token count, moe_sum) on the same inputs. Measured on an H200 (vLLM 0.26.0,
    # 2026-11-26): no prefix changed at these shapes, i.e. vLLM's kernel alone was
    # batch-invariant here (its tiles give the same bits, as ours do). The proof that the
    # invariance check can fail is then the load-dependent MoE control above; this test
    # records what vLLM's path does and reports it as an expected failure.
    from vllm.model_executor.layers.fused_moe.fused_moe import fused_experts as vllm_experts
    from vllm.model_executor.layers.fused_moe.router.fused_topk_router import fused_topk

    changed = {}
    ms = (1, 7, 32, 33, 64, 65, 256, 1000)
    for model in GPU_MODELS:
        num_experts, top_k, hidden, w13, w2 = gpu_model(model, device, seed=64)
        x = randn(2048, hidden, dtype=torch.bfloat16, device=device, seed=66)
        logits = randn(2048, num_experts, dtype=torch.bfloat16, device=device, seed=67)

        def vllm_moe(a, g, w13=w13, w2=w2, top_k=top_k):
            weights, ids, _ = fused_topk(a, g, top_k, renormalize=True)
            return vllm_experts(a, w13, w2, weights, ids)

        def ours(a, g, w13=w13, w2=w2, top_k=top_k):
            return fused_moe(a, w13, w2, g, top_k)

        idx = torch.arange(2048, device=device)
        changed[model] = prefixes_that_change(per_token(vllm_moe, x, logits), idx, ms)
        assert prefixes_that_change(per_token(ours, x, logits), idx, ms) == []
    record_property("vllm_prefixes_that_change", changed)
    if not any(changed.values()):
        pytest.xfail(f"vLLM's fused MoE kept every row's bits at these shapes: {changed}")


@pytest.mark.gpu
def test_fused_moe_cuda_graph_replay_bitwise_equal(device):
    # Under CUDA graph capture the launcher sees the padded batch; replay must give eager's bits.
    num_experts, top_k, hidden, w13, w2 = gpu_model("qwen3-30b-a3b", device, seed=68)
    static_x = randn(64, hidden, dtype=torch.bfloat16, device=device, seed=70)
    static_logits = randn(64, num_experts, dtype=torch.bfloat16, device=device, seed=71)
    eager = fused_moe(static_x, w13, w2, static_logits, top_k)  # also compiles before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fused_moe(static_x, w13, w2, static_logits, top_k)
    graph.replay()
    assert torch.equal(static_out, eager)
    static_x.copy_(randn(64, hidden, dtype=torch.bfloat16, device=device, seed=72))
    static_logits.copy_(randn(64, num_experts, dtype=torch.bfloat16, device=device, seed=73))
    graph.replay()
    assert torch.equal(static_out, fused_moe(static_x, w13, w2, static_logits, top_k))
