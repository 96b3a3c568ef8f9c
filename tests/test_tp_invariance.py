"""TP-size invariance (issue 8, DET_BACKEND_TP_INVARIANT=1): the K-slice tree GEMM
(kernels/tree_matmul.py), its vLLM hook (patches/row_parallel.py), the full-K column-parallel
configs, the start-up refusals, and on two GPUs TP=1 vs TP=2 end to end.

Ranks are simulated in one process: rank r of t gets x[:, r K/t:(r+1) K/t] and the same
columns of the weight, as vLLM's RowParallelLinear loader gives them (linear.py:1641-1647).
CPU tests use fp16/fp32 under the Triton interpreter (its bf16 tl.dot is garbage); there
BLOCK_K rounds too (test_matmul.py's docstring), which the tree keeps fixed per (M, K / 8).
"""

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from det_backend.kernels.matmul import (
    MATMUL_CONFIGS,
    MATMUL_TABLE,
    PORTABLE,
    SM90,
    MatmulConfig,
    config_for,
    matmul,
    matmul_reference,
)
from det_backend.kernels.tree_matmul import (
    TREE_SLICES,
    slice_partials,
    tree_config,
    tree_finish,
    tree_matmul,
    tree_partial,
    tree_problems,
)
from det_backend.patches import row_parallel, tensor_parallel
from det_backend.patches.row_parallel import CONFIG_KEY, ENV_VAR, tp_invariance_problems
from fake_config import fake_config
from invariance import dtype_id, prefixes_that_change, randn

CPU_DTYPES = (torch.float16, torch.float32)
TP_SIZES = (1, 2, 4, 8)
_F32_EPS = torch.finfo(torch.float32).eps


def tolerance(dtype: torch.dtype, k: int) -> dict[str, float]:
    # As test_matmul.py: one rounding to dtype; the fp32 sum drifts by well under K * eps.
    return {"rtol": torch.finfo(dtype).eps, "atol": 2 * k * _F32_EPS}


def shard(t: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s K columns of x [M, K] or weight [N, K], contiguous like a loaded shard."""
    k = t.shape[1] // tp
    return t[:, rank * k : (rank + 1) * k].contiguous()


def tp_tree_matmul(x, weight, bias, tp: int) -> torch.Tensor:
    """What patches/row_parallel.py computes at TP = tp, ranks simulated one after another:
    each rank's subtree root, then an fp32 add (tp = 2, the all-reduce of two values) or the
    tree over the gathered roots (tp >= 4)."""
    if tp == 1:
        return tree_matmul(x, weight, bias)
    roots = [
        tree_partial(shard(x, tp, r), shard(weight, tp, r), TREE_SLICES // tp) for r in range(tp)
    ]
    leaves = (roots[0] + roots[1]).unsqueeze(0) if tp == 2 else torch.stack(roots)
    return tree_finish(leaves, bias, x.dtype)


def plain_tp_matmul(x, weight, bias, tp: int) -> torch.Tensor:
    """vLLM's row-parallel path: each rank's full-K GEMM rounded to the dtype (bias on rank 0),
    then the rounded partials summed (as an all-reduce does, in the dtype)."""
    parts = [
        matmul(shard(x, tp, r), shard(weight, tp, r), bias if r == 0 else None) for r in range(tp)
    ]
    out = parts[0]
    for p in parts[1:]:
        out = out + p
    return out


# The kernel, on CPU.


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("m, k", [(1, 512), (37, 1536), (130, 1024)])
def test_tree_matmul_equals_rank_roots_at_every_tp_size(device, dtype, with_bias, m, k):
    # K = 1536: slices of 192, not a power of two (BLOCK_K 64 by gcd).
    n = 96
    x = randn(m, k, dtype=dtype, device=device, seed=1)
    w = randn(n, k, dtype=dtype, device=device, seed=2)
    bias = randn(n, dtype=dtype, device=device, seed=3) if with_bias else None
    full = tree_matmul(x, w, bias)
    for tp in TP_SIZES:
        assert torch.equal(tp_tree_matmul(x, w, bias, tp), full), f"tp={tp}"


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("with_bias", [False, True])
def test_tree_matmul_matches_float64(device, dtype, with_bias):
    m, n, k = 37, 96, 1536
    x = randn(m, k, dtype=dtype, device=device, seed=4)
    w = randn(n, k, dtype=dtype, device=device, seed=5)
    bias = randn(n, dtype=dtype, device=device, seed=6) if with_bias else None
    y = tree_matmul(x, w, bias)
    assert y.dtype == dtype and y.shape == (m, n)
    torch.testing.assert_close(y.double(), matmul_reference(x, w, bias), **tolerance(dtype, k))


def test_tree_partials_are_the_slice_dot_products(device):
    # Each partial is one slice's fp32 sum; the root adds them ((0+1)+(2+3))+((4+5)+(6+7)).
    m, n, k = 20, 64, 512
    x = randn(m, k, dtype=torch.float16, device=device, seed=7)
    w = randn(n, k, dtype=torch.float16, device=device, seed=8)
    parts = slice_partials(x, w, TREE_SLICES)
    ref = torch.stack(
        [a.double() @ b.double().T for a, b in zip(x.chunk(8, 1), w.chunk(8, 1), strict=True)]
    )
    torch.testing.assert_close(parts.double(), ref, rtol=0, atol=64 * _F32_EPS * 8)
    p = parts
    tree = ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]))
    assert torch.equal(tree_finish(parts), tree)
    assert torch.equal(tree_partial(x, w, TREE_SLICES), tree)


def test_plain_tensor_parallel_path_differs_control(device):
    # The control: vLLM's path (per-rank partials rounded to fp16, then summed) is not TP=1's
    # bits, nor is an in-order (non-tree) sum of the slices combined per rank.
    m, n, k = 64, 128, 1024
    x = randn(m, k, dtype=torch.float16, device=device, seed=9)
    w = randn(n, k, dtype=torch.float16, device=device, seed=10)
    tp1 = matmul(x, w)
    assert not torch.equal(plain_tp_matmul(x, w, None, 2), tp1)
    # In-order sum over 8 slices at TP=1 vs two ranks each summing 4 in order, then added:
    # (((s0+s1)+s2)+s3)+... is not ((s0+s1)+s2)+s3) + ((s4+s5)+s6)+s7).
    p = slice_partials(x.float(), w.float(), TREE_SLICES)
    in_order = p[0]
    for i in range(1, 8):
        in_order = in_order + p[i]
    halves = [p[4 * h] + p[4 * h + 1] + p[4 * h + 2] + p[4 * h + 3] for h in (0, 1)]
    assert not torch.equal(in_order, halves[0] + halves[1])


def test_tree_matmul_batch_invariant(device):
    # Slices of 64: every M's tile walks a slice in one BLOCK_K step, so the interpreter
    # rounds alike (on the GPU any tile does); M crosses every bucket of MATMUL_CONFIGS.
    m, n, k = 140, 64, 512
    x = randn(m, k, dtype=torch.float16, device=device, seed=11)
    w = randn(n, k, dtype=torch.float16, device=device, seed=12)
    ms = sorted({1, 2, 4, 5, 16, 17, 32, 33, 64, 65, 128, 129, m - 1})
    assert prefixes_that_change(lambda a: tree_matmul(a, w), x, ms) == []


def test_tree_config_depends_on_m_and_slice_only():
    for m in (1, 5, 17, 33, 65, 129, 3000):
        for slice_len in (64, 128, 192, 448, 512, 1792):
            cfg = tree_config(m, slice_len)
            assert slice_len % cfg.block_k == 0 and cfg.block_k >= 64
            assert cfg._replace(kind="plain", block_k=0) == MATMUL_CONFIGS[
                [c.max_m >= m for c in MATMUL_CONFIGS].index(True)
            ]._replace(block_k=0)


def test_tree_refuses_what_it_cannot_slice(device):
    x = randn(4, 1000, dtype=torch.float16, device=device, seed=13)
    w = randn(8, 1000, dtype=torch.float16, device=device, seed=14)
    with pytest.raises(ValueError, match="not 8 slices of a multiple of 64"):
        tree_matmul(x, w)
    with pytest.raises(ValueError, match="leaves"):
        tree_finish(torch.zeros(3, 2, 2))
    with pytest.raises(ValueError, match="fp32"):
        tree_finish(torch.zeros(2, 2, 2, dtype=torch.float16))
    assert tree_problems(4096, 2) == [] and tree_problems(14336, 8) == []
    assert "tensor_parallel_size=3" in tree_problems(4096, 3)[0]
    assert "K=1000" in tree_problems(1000, 2)[0]


# Column-parallel layers: each column's bits must not depend on the N shard.


def test_full_k_configs_do_not_split_k_at_any_shard():
    for n, k in MATMUL_TABLE:
        for tp in TP_SIZES:
            for m in (1, 16, 17, 300, 5000):
                assert config_for(m, n // tp, k, SM90, full_k=True).split_k == 1, (n, k, tp)


def test_full_k_falls_back_to_the_portable_table_for_a_split_shape(monkeypatch):
    # A shape whose table sums K in 2 chunks would give other bits than its N/2 shard (no
    # table, split_k = 1): full_k takes the portable (split_k = 1) config for it.
    split = (MatmulConfig(2**62, 16, 64, 256, 8, 4, 3, "split_k", 2),)
    monkeypatch.setitem(MATMUL_TABLE, (256, 1024), split)
    assert config_for(8, 256, 1024, SM90).split_k == 2
    assert config_for(8, 256, 1024, SM90, full_k=True) == config_for(8, 256, 1024, PORTABLE)
    assert config_for(8, 4096, 4096, SM90, full_k=True) is config_for(8, 4096, 4096, SM90)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=dtype_id)
def test_column_shards_give_the_same_columns(device, dtype):
    m, n, k = 33, 256, 512
    x = randn(m, k, dtype=dtype, device=device, seed=15)
    w = randn(n, k, dtype=dtype, device=device, seed=16)
    bias = randn(n, dtype=dtype, device=device, seed=17)
    full = matmul(x, w, bias, full_k=True)
    for tp in TP_SIZES:
        cols = [
            matmul(x, ws, bs, full_k=True)
            for ws, bs in zip(w.chunk(tp), bias.chunk(tp), strict=True)
        ]
        assert torch.equal(torch.cat(cols, dim=1), full), f"tp={tp}"


# The vLLM hook, ranks simulated.


def _fake_row_parallel(weight, bias, tp, rank, **overrides):
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    layer = dict(
        input_is_parallel=True,
        tp_size=tp,
        tp_rank=rank,
        quant_method=UnquantizedLinearMethod(),
        skip_bias_add=False,
        reduce_results=True,
        return_bias=True,
        prefix=f"layers.0.o_proj(rank {rank})",
        weight=shard(weight, tp, rank),
        bias=bias,
    )
    layer.update(overrides)
    return SimpleNamespace(**layer)


def _run_ranks(x, weight, bias, tp, monkeypatch, **overrides):
    """Rank 0's output of patches/row_parallel._tree_forward, the collectives faked: the other
    ranks run first, and their roots are what rank 0's collective returns."""
    import vllm.distributed as dist

    roots = {}

    def record(root, dim=0):
        roots[len(roots)] = root
        return root if tp == 2 else torch.cat([root] * tp, dim)

    monkeypatch.setattr(dist, "tensor_model_parallel_all_reduce", record)
    monkeypatch.setattr(dist, "tensor_model_parallel_all_gather", record)
    for r in range(1, tp):
        row_parallel._tree_forward(
            _fake_row_parallel(weight, bias, tp, r, **overrides), shard(x, tp, r)
        )
    others = [roots[i] for i in range(tp - 1)]

    def all_reduce(root):
        return root + others[0]

    def all_gather(root, dim=0):
        return torch.cat([root, *others], dim)

    monkeypatch.setattr(dist, "tensor_model_parallel_all_reduce", all_reduce)
    monkeypatch.setattr(dist, "tensor_model_parallel_all_gather", all_gather)
    layer = _fake_row_parallel(weight, bias, tp, 0, **overrides)
    return row_parallel._tree_forward(layer, shard(x, tp, 0))


@pytest.fixture
def custom_ops():
    from det_backend.patches import custom_ops

    custom_ops.apply()


@pytest.mark.parametrize("tp", TP_SIZES)
def test_row_parallel_forward_is_tp_invariant(device, tp, custom_ops, monkeypatch):
    m, n, k = 9, 64, 1024
    x = randn(m, k, dtype=torch.float16, device=device, seed=18)
    w = randn(n, k, dtype=torch.float16, device=device, seed=19)
    bias = randn(n, dtype=torch.float16, device=device, seed=20)
    out, out_bias = _run_ranks(x, w, bias, tp, monkeypatch)
    assert out_bias is None
    assert torch.equal(out, tree_matmul(x, w, bias))
    out, out_bias = _run_ranks(x, w, bias, tp, monkeypatch, skip_bias_add=True)
    assert out_bias is bias and torch.equal(out, tree_matmul(x, w))


def test_row_parallel_forward_refuses_unreduced_layers(device, custom_ops, monkeypatch):
    x = randn(3, 512, dtype=torch.float16, device=device, seed=21)
    w = randn(64, 512, dtype=torch.float16, device=device, seed=22)
    with pytest.raises(RuntimeError, match="reduce_results=False"):
        _run_ranks(x, w, None, 2, monkeypatch, reduce_results=False)


def test_apply_all_installs_tree_forward_and_full_k(tmp_path):
    import subprocess
    import sys
    import textwrap

    code = """
        from det_backend import patches
        from det_backend.patches import linear, logits, row_parallel
        from vllm.model_executor.layers.linear import RowParallelLinear, UnquantizedLinearMethod
        from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod
        original = RowParallelLinear.forward
        patches.apply_all(tp_invariant=False)
        assert RowParallelLinear.forward is original
        assert UnquantizedLinearMethod.apply is linear._det_apply
        assert row_parallel.problems() == [] and linear.problems() == []
        patches.apply_all(tp_invariant=True); patches.apply_all(tp_invariant=True)
        assert RowParallelLinear.forward is row_parallel._tree_forward
        assert UnquantizedLinearMethod.apply is linear._det_apply_full_k
        assert UnquantizedEmbeddingMethod.apply is linear._det_apply_full_k
        for p in (row_parallel, linear, logits):
            assert p.problems() == [], p.problems()
        RowParallelLinear.forward = original
        assert "tree forward" in row_parallel.problems()[0]
        print("ok")
    """
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TRITON_INTERPRET": "1"},
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr


# Start-up: the setting, its copy in additional_config, what the mode refuses.


def _on(**overrides):
    return fake_config(additional_config={CONFIG_KEY: True}, **overrides)


def test_mode_off_changes_nothing(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert tp_invariance_problems(fake_config()) == []
    assert tp_invariance_problems(fake_config(model={"is_moe": True})) == []


@pytest.mark.parametrize("value", ["1", "true", " ON "])
def test_mode_on_accepts_llama_small_at_tp_1_2_4_8(value, monkeypatch):
    monkeypatch.setenv(ENV_VAR, value)
    assert row_parallel.requested()
    for tp in TP_SIZES:
        assert tp_invariance_problems(_on(parallel={"tensor_parallel_size": tp})) == []


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model": {"is_moe": True}}, "mixture-of-experts"),
        ({"parallel": {"tensor_parallel_size": 3}}, "tensor_parallel_size=3 does not divide"),
        (
            {"model": {"hf_text_config": SimpleNamespace(
                hidden_size=1000, num_attention_heads=8, intermediate_size=3584
            )}},
            "o_proj: K=1000 is not 8 slices",
        ),
        (
            {"model": {"hf_text_config": SimpleNamespace(
                hidden_size=1024, num_attention_heads=8, head_dim=128, intermediate_size=3000
            )}},
            "down_proj: K=3000",
        ),
    ],
)  # fmt: skip
def test_mode_refusals_name_the_cause(overrides, message, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "1")
    reasons = tp_invariance_problems(_on(**overrides))
    assert len(reasons) == 1 and message in reasons[0], reasons


def test_mode_refuses_an_unknown_value_and_a_missing_stamp(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "maybe")
    assert "neither on" in tp_invariance_problems(_on())[0]
    monkeypatch.setenv(ENV_VAR, "1")
    (reason,) = tp_invariance_problems(fake_config())
    assert "additional_config['det_backend_tp_invariant'] is None" in reason
    monkeypatch.setenv(ENV_VAR, "0")
    (reason,) = tp_invariance_problems(_on())
    assert "is off in this worker" in reason


def test_config_problems_include_the_mode(monkeypatch):
    from det_backend.config import config_problems

    monkeypatch.delenv("VLLM_BATCH_INVARIANT", raising=False)
    monkeypatch.setenv(ENV_VAR, "1")
    reasons = config_problems(_on(model={"is_moe": True}))
    assert any("mixture-of-experts" in r and ENV_VAR in r for r in reasons), reasons


@pytest.fixture
def stub_config_build(monkeypatch):
    from vllm.engine.arg_utils import EngineArgs

    monkeypatch.setattr(EngineArgs, "create_engine_config", lambda self, *a, **k: "vllm_config")
    monkeypatch.setattr(tensor_parallel, "_original_create_engine_config", None)
    # Set, so that the wrapper leaves the attention variant alone (the stub has no model).
    monkeypatch.setenv("DET_BACKEND_ATTENTION", "triton")
    tensor_parallel.apply()


@pytest.mark.parametrize(
    "env, kwargs, stamped",
    [
        ("1", {"attention_backend": "CUSTOM"}, True),
        ("1", {"attention_backend": "CUSTOM", "additional_config": {"x": 1}}, True),
        ("1", {"attention_backend": "FLASH_ATTN"}, False),
        ("0", {"attention_backend": "CUSTOM"}, False),
    ],
)
def test_engine_build_stamps_the_mode_into_additional_config(
    env, kwargs, stamped, stub_config_build, monkeypatch
):
    from vllm.engine.arg_utils import EngineArgs

    monkeypatch.setenv(ENV_VAR, env)
    args = EngineArgs(model="unused-model-dir", **kwargs)
    assert args.create_engine_config() == "vllm_config"
    assert (args.additional_config.get(CONFIG_KEY) is True) == stamped
    if "additional_config" in kwargs:
        assert args.additional_config["x"] == 1


# GPU: the simulation in bf16 at Llama-3-8B widths, then two GPUs end to end.

LLAMA_ROW_PARALLEL = ((4096, 4096), (4096, 14336))  # o_proj, down_proj: (N, K)


@pytest.mark.gpu
@pytest.mark.parametrize("n, k", LLAMA_ROW_PARALLEL)
@pytest.mark.parametrize("m", [1, 33, 257, 2048])
def test_tree_matmul_tp_invariant_bf16_gpu(device, n, k, m):
    x = randn(m, k, dtype=torch.bfloat16, device=device, seed=30)
    w = randn(n, k, dtype=torch.bfloat16, device=device, seed=31) * 0.02
    bias = randn(n, dtype=torch.bfloat16, device=device, seed=32)
    full = tree_matmul(x, w, bias)
    for tp in TP_SIZES:
        assert torch.equal(tp_tree_matmul(x, w, bias, tp), full), f"tp={tp}"
    torch.testing.assert_close(
        full.double(), matmul_reference(x, w, bias), **tolerance(torch.bfloat16, k)
    )
    if m > 1:
        assert not torch.equal(plain_tp_matmul(x, w, bias, 2), matmul(x, w, bias))


@pytest.mark.gpu
@pytest.mark.parametrize("n, k", LLAMA_ROW_PARALLEL)
def test_tree_matmul_batch_invariant_gpu(device, n, k):
    x = randn(4096, k, dtype=torch.bfloat16, device=device, seed=33)
    w = randn(n, k, dtype=torch.bfloat16, device=device, seed=34)
    ms = (1, 2, 3, 4, 5, 16, 17, 31, 32, 33, 64, 65, 128, 129, 255, 2048, 2049, 4095)
    assert prefixes_that_change(lambda a: tree_matmul(a, w), x, ms) == []


@pytest.mark.gpu
@pytest.mark.multigpu
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_tp1_equals_tp2_with_tp_invariant_mode():
    """One checkpoint at TP=1 and TP=2: with DET_BACKEND_TP_INVARIANT=1 every prompt's tokens
    and logprobs are bit-identical; without it (the control) some differ. TP_INV_EAGER=1 runs
    the engines with enforce_eager (quicker starts). DET_RESULTS_DIR keeps tp_invariance.json."""
    from det_backend.tp_invariance import compare_tp_sizes, print_result

    eager = os.environ.get("TP_INV_EAGER") == "1"
    result = compare_tp_sizes("small", num_prompts=16, max_tokens=64, eager=eager)
    print_result(result)
    if os.environ.get("DET_RESULTS_DIR"):
        result["command"] = (
            f"TP_INV_EAGER={int(eager)} DET_RESULTS_DIR=DIR python -m pytest -m multigpu "
            "tests/test_tp_invariance.py"
        )
        Path(os.environ["DET_RESULTS_DIR"], "tp_invariance.json").write_text(
            json.dumps(result, indent=2)
        )
    inv, plain = result["modes"]["tp_invariant"], result["modes"]["plain"]
    assert inv["identical"] == inv["prompts"] == 16
    assert plain["identical"] < plain["prompts"]
