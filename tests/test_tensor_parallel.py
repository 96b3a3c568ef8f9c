"""Tensor parallelism (issue 8): what patches/tensor_parallel.py pins before the engine starts,
what the workers refuse, and, on two GPUs, TP=2 alone vs batch and run to run.

The CPU tests use vLLM 0.26's real EngineArgs; nothing here starts an engine without GPUs.
"""

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from det_backend.patches import tensor_parallel
from det_backend.patches.tensor_parallel import (
    ALLREDUCE_ENV,
    COMM_PASSES,
    ENV,
    NCCL_ENV,
    TWO_RANK_ENV,
    VLLM_ENV,
)

from det_backend.config import config_problems


@pytest.fixture
def clean_env():
    """No pin set beforehand; the process environment restored afterwards."""
    saved = dict(os.environ)
    for name in (*ENV, ALLREDUCE_ENV):
        os.environ.pop(name, None)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def stub_config_build(monkeypatch):
    """create_engine_config replaced by a stub under our wrapper, both restored afterwards."""
    from vllm.engine.arg_utils import EngineArgs

    monkeypatch.setattr(EngineArgs, "create_engine_config", lambda self, *a, **k: "vllm_config")
    monkeypatch.setattr(tensor_parallel, "_original_create_engine_config", None)
    # Set, so that the wrapper leaves the attention variant alone (the stub has no model).
    monkeypatch.setenv("DET_BACKEND_ATTENTION", "triton")
    tensor_parallel.apply()


def _engine_args(**kwargs):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model="unused-model-dir", **kwargs)


def test_nccl_pins_are_vllms_batch_invariant_ones(monkeypatch):
    from vllm.model_executor.layers import batch_invariant

    environ = {}
    monkeypatch.setattr(os, "environ", environ)
    batch_invariant.override_envs_for_invariance()
    assert {k: v for k, v in environ.items() if k.startswith("NCCL_")} == NCCL_ENV
    assert environ["VLLM_ALLREDUCE_USE_SYMM_MEM"] == VLLM_ENV["VLLM_ALLREDUCE_USE_SYMM_MEM"]


def test_pin_sets_exactly_the_documented_env_and_engine_args(clean_env):
    os.environ[ALLREDUCE_ENV] = "nccl"
    args = _engine_args(tensor_parallel_size=2, attention_backend="CUSTOM")
    before = dict(os.environ)
    tensor_parallel.pin(args)
    changed = {k: v for k, v in os.environ.items() if before.get(k) != v}
    assert changed == ENV
    assert args.disable_custom_all_reduce is True
    for name in COMM_PASSES:
        assert getattr(args.compilation_config.pass_config, name) is False
    tensor_parallel.pin(args)  # idempotent
    assert {k: v for k, v in os.environ.items() if before.get(k) != v} == ENV


def test_pin_overrides_a_conflicting_nccl_setting(clean_env):
    os.environ[ALLREDUCE_ENV] = "nccl"
    os.environ["NCCL_ALGO"] = "ring"
    tensor_parallel.pin(_engine_args(tensor_parallel_size=2, attention_backend="CUSTOM"))
    assert os.environ["NCCL_ALGO"] == ENV["NCCL_ALGO"]


def test_pin_keeps_a_pass_the_user_turned_on_for_the_workers_to_refuse(clean_env):
    args = _engine_args(
        tensor_parallel_size=2,
        attention_backend="CUSTOM",
        compilation_config={"pass_config": {"fuse_allreduce_rms": True}},
    )
    tensor_parallel.pin(args)
    assert args.compilation_config.pass_config.fuse_allreduce_rms is True


@pytest.mark.parametrize(
    "kwargs, pinned",
    [
        ({"tensor_parallel_size": 2, "attention_backend": "CUSTOM"}, True),
        ({"tensor_parallel_size": 2, "attention_backend": "deterministic"}, True),
        ({"tensor_parallel_size": 2, "attention_config": {"backend": "CUSTOM"}}, True),
        ({"tensor_parallel_size": 1, "attention_backend": "CUSTOM"}, False),
        ({"tensor_parallel_size": 2, "attention_backend": "FLASH_ATTN"}, False),
        ({"tensor_parallel_size": 2}, False),
    ],
)
def test_config_build_pins_only_for_our_backend_at_tp_above_1(
    kwargs, pinned, clean_env, stub_config_build
):
    os.environ[ALLREDUCE_ENV] = "nccl"
    args = _engine_args(**kwargs)
    assert args.create_engine_config() == "vllm_config"  # the original still builds it
    assert all((os.environ.get(k) == v) == pinned for k, v in ENV.items())
    assert args.disable_custom_all_reduce is pinned


def test_apply_is_idempotent_and_problems_empty_after(stub_config_build):
    from vllm.engine.arg_utils import EngineArgs

    tensor_parallel.apply()
    assert EngineArgs.create_engine_config is tensor_parallel._create_engine_config
    assert (
        tensor_parallel._original_create_engine_config is not tensor_parallel._create_engine_config
    )
    assert tensor_parallel.problems() == []


def test_problems_name_a_missing_wrapper(monkeypatch):
    from vllm.engine.arg_utils import EngineArgs

    monkeypatch.setattr(EngineArgs, "create_engine_config", lambda self: None)
    assert any("create_engine_config" in p for p in tensor_parallel.problems())


def _fake_config(tp=1, moe=False, passes=None, **parallel):
    par = dict(
        tensor_parallel_size=tp,
        pipeline_parallel_size=1,
        data_parallel_size=1,
        decode_context_parallel_size=1,
        prefill_context_parallel_size=1,
        enable_expert_parallel=False,
        enable_eplb=False,
        nnodes=1,
        disable_custom_all_reduce=True,
    )
    par.update(parallel)
    pass_config = {name: False for name in COMM_PASSES} | (passes or {})
    return SimpleNamespace(
        parallel_config=SimpleNamespace(**par),
        model_config=SimpleNamespace(is_moe=moe),
        compilation_config=SimpleNamespace(pass_config=SimpleNamespace(**pass_config)),
    )


@pytest.fixture
def pinned_env(clean_env):
    os.environ.update(ENV)
    os.environ[ALLREDUCE_ENV] = "nccl"


@pytest.mark.parametrize("tp", [1, 2])
def test_pinned_supported_sizes_have_no_problem(tp, pinned_env):
    assert tensor_parallel.parallel_problems(_fake_config(tp)) == []


@pytest.mark.parametrize(
    "config, message",
    [
        (_fake_config(pipeline_parallel_size=2), "pipeline_parallel_size=2: pipeline"),
        (_fake_config(data_parallel_size=2), "data_parallel_size=2: data parallelism"),
        (_fake_config(decode_context_parallel_size=2), "decode_context_parallel_size=2"),
        (_fake_config(enable_expert_parallel=True), "enable_expert_parallel: expert"),
        (_fake_config(4), "tensor_parallel_size=4 (supported: 1, 2"),
        (_fake_config(2, nnodes=2), "across nodes (nnodes=2)"),
        (_fake_config(2, moe=True), "mixture-of-experts layers with tensor_parallel_size > 1"),
        (_fake_config(2, disable_custom_all_reduce=False), "custom all-reduce is on"),
        (_fake_config(2, passes={"fuse_allreduce_rms": True}), "fuse_allreduce_rms=True"),
        (_fake_config(2, passes={"enable_sp": True}), "enable_sp=True"),
        (_fake_config(2, passes={"fuse_gemm_comms": True}), "fuse_gemm_comms=True"),
    ],
)
def test_parallel_refusals_name_the_cause(config, message, pinned_env):
    reasons = tensor_parallel.parallel_problems(config)
    assert len(reasons) == 1 and message in reasons[0], reasons


def test_unpinned_environment_is_refused_with_what_to_export(pinned_env):
    os.environ["NCCL_ALGO"] = "ring"
    del os.environ["VLLM_ALLREDUCE_USE_SYMM_MEM"]
    (reason,) = tensor_parallel.parallel_problems(_fake_config(2))
    assert "NCCL_ALGO='ring', needs 'allreduce:tree'" in reason
    assert "VLLM_ALLREDUCE_USE_SYMM_MEM=None, needs '0'" in reason
    assert "NCCL_ALGO=allreduce:tree" in reason  # the export line


def test_tp1_needs_no_pin(clean_env):
    assert tensor_parallel.parallel_problems(_fake_config(1)) == []


def _communicator(**live):
    paths = ("ca_comm", "symm_mem_comm", "fi_ar_comm", "qr_comm", "aiter_ar_comm")
    comm = {p: (SimpleNamespace(disabled=False) if live.get(p) else None) for p in paths}
    comm["pynccl_comm"] = SimpleNamespace(disabled=False)
    return SimpleNamespace(**comm)


def test_only_nccl_all_reduce_passes():
    assert tensor_parallel.communicator_problems(_communicator()) == []
    disabled = _communicator(ca_comm=True)
    disabled.ca_comm.disabled = True
    assert tensor_parallel.communicator_problems(disabled) == []


@pytest.mark.parametrize(
    "path, message",
    [
        ("ca_comm", "vLLM's custom all-reduce"),
        ("symm_mem_comm", "symmetric-memory"),
        ("fi_ar_comm", "FlashInfer"),
        ("qr_comm", "quick all-reduce"),
    ],
)
def test_live_non_nccl_all_reduce_is_refused(path, message):
    (reason,) = tensor_parallel.communicator_problems(_communicator(**{path: True}))
    assert message in reason and path in reason


def test_config_problems_accept_pinned_tp2(pinned_env, monkeypatch):
    """Through det_backend.config: TP=2 passes once pinned; only the platform is left on CPU."""
    monkeypatch.delenv("VLLM_BATCH_INVARIANT", raising=False)
    cfg = _fake_config(2)
    cfg.model_config = SimpleNamespace(
        dtype=torch.bfloat16,
        quantization=None,
        is_quantized=False,
        architectures=["LlamaForCausalLM"],
        use_mla=False,
        is_moe=False,
        is_encoder_decoder=False,
        is_hybrid=False,
        is_attention_free=False,
    )
    cfg.cache_config = SimpleNamespace(cache_dtype="auto")
    cfg.speculative_config = cfg.lora_config = None
    cfg.additional_config = {}
    reasons = config_problems(cfg)
    assert len(reasons) == (0 if torch.cuda.is_available() else 1), reasons


def test_two_rank_mode_pins_only_the_vllm_paths_and_keeps_custom_all_reduce(clean_env):
    """DET_BACKEND_TP_ALLREDUCE=two-rank at TP=2: NCCL as vLLM configures it and the custom
    all-reduce stay (two addends: every order gives one rounded a + b); symmetric memory,
    FlashInfer's all-reduce and the comm passes stay off."""
    os.environ[ALLREDUCE_ENV] = "two-rank"
    args = _engine_args(tensor_parallel_size=2, attention_backend="CUSTOM")
    before = dict(os.environ)
    tensor_parallel.pin(args)
    assert {k: v for k, v in os.environ.items() if before.get(k) != v} == TWO_RANK_ENV
    assert args.disable_custom_all_reduce is False
    for name in COMM_PASSES:
        assert getattr(args.compilation_config.pass_config, name) is False
    assert tensor_parallel.parallel_problems(_fake_config(2, disable_custom_all_reduce=False)) == []
    assert tensor_parallel.communicator_problems(_communicator(ca_comm=True), 2) == []
    # The other paths stay refused in this mode, and the custom all-reduce at 4 ranks.
    assert tensor_parallel.communicator_problems(_communicator(symm_mem_comm=True), 2)
    assert tensor_parallel.communicator_problems(_communicator(ca_comm=True), 4)


@pytest.mark.parametrize(
    "tp, mode, pinned_nccl", [(2, "two-rank", False), (3, "nccl", True), (4, "nccl", True)]
)
def test_unset_mode_is_two_rank_at_tp2_and_pinned_nccl_elsewhere(
    tp, mode, pinned_nccl, clean_env, monkeypatch
):
    """Unset DET_BACKEND_TP_ALLREDUCE: two-rank at TP=2 (the faster of the two, measured on two
    H100s), pinned NCCL from 3 ranks, where two-rank would not be deterministic."""
    assert tensor_parallel.allreduce_mode(tp) == mode
    args = _engine_args(tensor_parallel_size=tp, attention_backend="CUSTOM")
    before = dict(os.environ)
    tensor_parallel.pin(args)
    changed = {k: v for k, v in os.environ.items() if before.get(k) != v}
    assert changed == (ENV if pinned_nccl else TWO_RANK_ENV)
    assert args.disable_custom_all_reduce is pinned_nccl
    for name in COMM_PASSES:
        assert getattr(args.compilation_config.pass_config, name) is False
    assert tensor_parallel.communicator_problems(_communicator(ca_comm=True), tp) == (
        [] if tp == 2 else tensor_parallel.communicator_problems(_communicator(ca_comm=True))
    )
    # The refusal's export line names what this size needs.
    os.environ["VLLM_ALLREDUCE_USE_FLASHINFER"] = "1"
    monkeypatch.setattr(tensor_parallel, "SUPPORTED_TENSOR_PARALLEL_SIZES", (1, 2, 3, 4))
    (reason,) = tensor_parallel.parallel_problems(
        _fake_config(tp, disable_custom_all_reduce=pinned_nccl)
    )
    assert "VLLM_ALLREDUCE_USE_FLASHINFER='1', needs '0'" in reason
    assert ("NCCL_ALGO=allreduce:tree" in reason) is pinned_nccl


def test_two_rank_mode_still_needs_the_vllm_env_and_nvls_off(clean_env):
    os.environ[ALLREDUCE_ENV] = "two-rank"
    os.environ.update(TWO_RANK_ENV)
    assert tensor_parallel.parallel_problems(_fake_config(2, disable_custom_all_reduce=False)) == []
    os.environ["VLLM_ALLREDUCE_USE_SYMM_MEM"] = "1"
    os.environ["NCCL_NVLS_ENABLE"] = "1"  # multimem reductions in the switch
    (reason,) = tensor_parallel.parallel_problems(_fake_config(2, disable_custom_all_reduce=False))
    assert "VLLM_ALLREDUCE_USE_SYMM_MEM='1', needs '0'" in reason
    assert "NCCL_NVLS_ENABLE='1', needs '0'" in reason


def test_two_rank_mode_refused_beyond_two_ranks(clean_env, monkeypatch):
    os.environ[ALLREDUCE_ENV] = "two-rank"
    with pytest.raises(ValueError, match="tensor_parallel_size=2 only.*tensor_parallel_size=4"):
        tensor_parallel.pin(_engine_args(tensor_parallel_size=4, attention_backend="CUSTOM"))
    monkeypatch.setattr(tensor_parallel, "SUPPORTED_TENSOR_PARALLEL_SIZES", (1, 2, 4))
    os.environ.update(ENV)
    reasons = tensor_parallel.parallel_problems(_fake_config(4))
    assert any("two-rank at tensor_parallel_size=4" in r for r in reasons), reasons


def test_nccl_mode_refuses_custom_all_reduce_and_a_bad_mode_is_named(clean_env):
    os.environ.update(ENV)
    os.environ[ALLREDUCE_ENV] = "nccl"
    assert tensor_parallel.communicator_problems(_communicator(ca_comm=True), 2)
    os.environ[ALLREDUCE_ENV] = "fastest"
    (reason,) = tensor_parallel.parallel_problems(_fake_config(2))
    assert "DET_BACKEND_TP_ALLREDUCE='fastest' is not one of nccl, two-rank" in reason
    with pytest.raises(ValueError, match="'fastest' is not one of"):
        tensor_parallel.pin(_engine_args(tensor_parallel_size=2, attention_backend="CUSTOM"))
    (reason,) = tensor_parallel.parallel_problems(_fake_config(1))
    assert "'fastest' is not one of" in reason


@pytest.mark.gpu
@pytest.mark.multigpu
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_tp2_alone_equals_batch_and_runs_repeat(monkeypatch):
    """Two engines at tensor_parallel_size=2: each prompt alone = in a batch of 32, the batch
    twice, and the second engine process = the first, bit for bit; vLLM's default differs.
    This is `python -m det_backend.tp_demo` (small config, defaults); DET_RESULTS_DIR keeps its
    result as tp_demo.json. The default control runs NCCL-only unless told otherwise
    (DET_DEMO_NCCL_ONLY, det_backend/demo.py: its FlashInfer all-reduce fusion would create a
    multicast object, which the lent hosts forbid, and crashed there)."""
    from det_backend import demo
    from det_backend.demo import print_table
    from det_backend.tp_demo import compare_tp

    if demo.NCCL_ONLY not in os.environ:
        monkeypatch.setenv(demo.NCCL_ONLY, "1")

    result = compare_tp("small", tensor_parallel_size=2, num_prompts=32, max_tokens=64, runs=2)
    print_table(result)
    if os.environ.get("DET_RESULTS_DIR"):
        result["command"] = (
            "DET_RESULTS_DIR=DIR python -m pytest -m multigpu tests/test_tensor_parallel.py"
        )
        Path(os.environ["DET_RESULTS_DIR"], "tp_demo.json").write_text(json.dumps(result, indent=2))
    assert not result.get("failed"), result.get("failed")
    det = [r for r in result["runs"] if r["backend"].startswith("det#")]
    (default,) = [r for r in result["runs"] if r["backend"].startswith("default#")]
    assert len(det) == 2
    for run in det:
        assert run["identical_alone_vs_batch"] == run["prompts_alone"] == 32
        assert run["identical_batch_repeat"] == run["prompts_batch"]
    assert result["identical_across_runs"]["det"] == 32
    assert default["identical_alone_vs_batch"] < default["prompts_alone"]


@pytest.mark.parametrize("dtype, bits, max_gap", [(torch.bfloat16, 8, 30), (torch.float16, 11, 12)])
def test_two_rank_all_reduce_paths_round_alike(dtype, bits, max_gap):
    """Two-rank mode rests on this: vLLM's custom all-reduce adds two partials in fp32 and
    rounds to the model dtype (two roundings), NCCL adds them once in that dtype; vLLM picks
    between them by message size, so by batch. Both must give the correctly rounded a + b.
    Random pairs with exponent gaps up to max_gap, against the exact float64 sum rounded to
    nearest-even at `bits`; the control rounds through too few bits first and differs."""
    import numpy as np

    def round_to(x, p):  # x = m * 2**e with 0.5 <= |m| < 1; m to p bits, ties to even
        m, e = np.frexp(x)
        return np.ldexp(np.rint(np.ldexp(m, p)), e - p)

    gen = torch.Generator().manual_seed(8)
    n = 1 << 18
    a = torch.randn(n, generator=gen).to(dtype)
    gap = torch.randint(0, max_gap, (n,), generator=gen).float()
    b = (torch.randn(n, generator=gen) * torch.pow(2.0, -gap)).to(dtype)
    exact = a.double().numpy() + b.double().numpy()  # two 8- or 11-bit values: exact in 53
    once = torch.from_numpy(round_to(exact, bits)).to(dtype)
    custom_all_reduce = (a.float() + b.float()).to(dtype)
    assert torch.equal(custom_all_reduce, once)
    assert torch.equal(b.float().add(a.float()).to(dtype), once)  # either rank's order
    control = torch.from_numpy(round_to(round_to(exact, bits + 2), bits)).to(dtype)
    assert not torch.equal(control, once)


def test_tp_demo_records_each_engines_all_reduce_mode(clean_env):
    from det_backend.tp_demo import allreduce_mode_of

    assert allreduce_mode_of("det", 2) == "two-rank"  # the unset default at TP=2
    assert allreduce_mode_of("det_nccl", 2) == "nccl"
    assert allreduce_mode_of("det_two_rank", 2) == "two-rank"
    assert allreduce_mode_of("default", 2) is None
    os.environ[ALLREDUCE_ENV] = "nccl"  # this process's setting reaches the det engine
    assert allreduce_mode_of("det", 2) == "nccl"
