"""Wraps vllm.engine.arg_utils.EngineArgs.create_engine_config: with our backend selected and
tensor_parallel_size > 1, makes the all-reduce deterministic before any engine process starts:
at TP=2 by default only the paths that add more than two partials or fuse our RMSNorm are
turned off ("two-rank", see DET_BACKEND_TP_ALLREDUCE below); otherwise NCCL is pinned and
every non-NCCL all-reduce path turned off. `parallel_problems` and `problems` refuse, in the
worker, what is not pinned.

Why: at TP > 1 the row-parallel layers and the vocab-parallel embedding end in an
all-reduce. vLLM picks its implementation per message size (cuda_communicator.py:273), and
NCCL picks algorithm, protocol and channels per size; beyond two ranks each choice adds the
partials in another order. At -O2 on H100, TP > 1 also turns on the FlashInfer
all-reduce + RMSNorm fusion pass (config/vllm.py:131, :256). It matches the vllm_ir.rms_norm
op that our RMSNorm provider implements and swaps in FlashInfer's kernel for small batches.
Sequence parallelism / async TP (dense models with hidden_size >= 8192) turn the all-reduce
into reduce-scatter + all-gather above a token count. VLLM_BATCH_INVARIANT switches the
communicator paths off (parallel.py:975, all_reduce_utils.py:115,144, symm_mem.py:113, NCCL
env at batch_invariant.py:963 via gpu_worker.py:1422) but not those passes, and det_backend
refuses that flag anyway, so we set the switches ourselves.

How: NCCL reads its environment once per process, at the first communicator. A worker
creates it in Worker.init_device (gpu_worker.py:1435, :1444), before its model, so before
our backend or det_backend.mode runs there. register() runs earlier (worker_base.py:247)
but never sees the config. The first code that knows the backend choice before the engine
processes start is EngineArgs.create_engine_config (arg_utils.py:1847). It runs in the
process that builds the engine (LLM, vllm serve), after register() (arg_utils.py:769,
:2733). There `pin` does three things:
- sets ENV in os.environ (TWO_RANK_ENV in two-rank mode): the engine-core and worker
  processes inherit it, and Ray copies NCCL_* and VLLM_* (ray_env.py:36);
- sets disable_custom_all_reduce=True (not in two-rank mode);
- sets each of COMM_PASSES to False unless the user set it.
With DET_BACKEND_TP_INVARIANT=1 (at any TP size) it also writes the mode into
additional_config (`stamp_tp_invariant`), so that compiled graphs of the two modes are cached
apart (patches/row_parallel.py).
A config built without EngineArgs is not pinned, and its workers refuse to start.
With our backend at any TP size, once the config is built, the wrapper also fills in the
attention variant when DET_BACKEND_ATTENTION is unset (det_backend/variants.py
export_default), for the same reason: every engine process must see one choice.
register() calls `apply()` on a checked vLLM version only; `apply()` is idempotent. With
another backend the wrapper just calls the original.
Checked against vLLM: 0.26.0.
"""

import os

from . import row_parallel

# vLLM's own NCCL pins, same names and values (override_envs_for_invariance,
# batch_invariant.py:963-981): one channel, tree, Simple protocol, no NVLS or CollNet, so
# every element is reduced in the same order whatever the message size.
NCCL_ENV = {
    "NCCL_LAUNCH_MODE": "GROUP",
    "NCCL_COLLNET_ENABLE": "0",
    "NCCL_NVLS_ENABLE": "0",
    "NCCL_P2P_NET_DISABLE": "1",
    "NCCL_MIN_NCHANNELS": "1",
    "NCCL_MAX_NCHANNELS": "1",
    "NCCL_PROTO": "Simple",
    "NCCL_ALGO": "allreduce:tree",
    "NCCL_NTHREADS": "1",
    "NCCL_SOCKET_NTHREADS": "1",
}
# vLLM's other all-reduce paths, off: torch symmetric memory (on by default; vLLM's
# batch-invariant mode sets it to 0 too), NCCL symmetric memory (also its all-gather and
# reduce-scatter), FlashInfer's all-reduce. Read in the worker (cuda_communicator.py:58-59,
# pynccl_allocator.py:48).
VLLM_ENV = {
    "VLLM_ALLREDUCE_USE_SYMM_MEM": "0",
    "VLLM_USE_NCCL_SYMM_MEM": "0",
    "VLLM_ALLREDUCE_USE_FLASHINFER": "0",
}
ENV = {**NCCL_ENV, **VLLM_ENV}
# What two-rank mode keeps of the pins: the paths above, and NCCL's NVLS (NVLink SHARP), whose
# reductions run in the NVSwitch (multimem); that they round (subnormals included) as a CUDA-
# core a + b does is not documented, so they stay off. The lent hosts have it off anyway.
TWO_RANK_ENV = {**VLLM_ENV, "NCCL_NVLS_ENABLE": "0"}

# DET_BACKEND_TP_ALLREDUCE (read in every process, like DET_BACKEND_ATTENTION) picks how the
# tensor-parallel all-reduce stays deterministic. Unset: "two-rank" at tensor_parallel_size=2,
# "nccl" at other sizes. Why two-rank by default at TP=2: measured side by side on two H100s
# (benchmarks/results/ab_tp2_h100x2.json, Llama-3-8B shapes, 256 prompts of 64-512 tokens), the
# pinned NCCL ran at 0.31x of vLLM's default and two-rank at 0.72x, both alone = batch.
# - "nccl": NCCL pinned as above, vLLM's custom all-reduce off, at every TP size.
# - "two-rank": at tensor_parallel_size=2 only, vLLM's custom all-reduce and NCCL as vLLM picks
#   them. With two addends every algorithm computes each element as one rounded sum of the
#   two partials, and a + b = b + a bit for bit, so message size, algorithm, channels and
#   protocol cannot change the bits: the custom all-reduce (custom_all_reduce.cuh: each rank
#   upcasts both partials, adds in fp32 in its own rank-rotated order, rounds to the model
#   dtype), NCCL's ring and tree at 2 ranks (one add per element, bf16/fp16 natively on sm_80+).
#   The custom all-reduce rounds twice (to fp32, then to bf16/fp16) where NCCL rounds once,
#   but for addition double rounding through a format of p' >= 2p + 2 significand bits is
#   innocuous (Figueroa, 1995): fp32's 24 >= 18 for bf16 (p = 8) and >= 24 for fp16 (p = 11),
#   so the two paths, which vLLM picks by message size (that is, by batch), agree bit for bit.
#   From 3 ranks the orders differ ((a+b)+c vs a+(b+c)), so asking for it there is refused.
#   Symmetric-memory and FlashInfer all-reduces and the COMM_PASSES stay off in both modes
#   (multimem reductions in the switch, fused RMSNorm).
#   tests/test_tensor_parallel.py checks the double-rounding claim on random pairs.
ALLREDUCE_ENV = "DET_BACKEND_TP_ALLREDUCE"
ALLREDUCE_MODES = ("nccl", "two-rank")


def requested_allreduce_mode() -> str | None:
    """The DET_BACKEND_TP_ALLREDUCE setting, None when unset; ValueError names a bad value."""
    value = os.environ.get(ALLREDUCE_ENV, "").strip().lower()
    if value and value not in ALLREDUCE_MODES:
        raise ValueError(
            f"det_backend: {ALLREDUCE_ENV}={os.environ[ALLREDUCE_ENV]!r} is not one of "
            f"{', '.join(ALLREDUCE_MODES)}"
        )
    return value or None


def allreduce_mode(tensor_parallel_size: int) -> str:
    """The mode in effect at this size: the setting, else two-rank at 2 and nccl elsewhere."""
    requested = requested_allreduce_mode()
    if requested:
        return requested
    return "two-rank" if tensor_parallel_size == 2 else "nccl"


def _two_rank(tensor_parallel_size: int) -> bool:
    return tensor_parallel_size == 2 and allreduce_mode(tensor_parallel_size) == "two-rank"


def required_env(tensor_parallel_size: int) -> dict[str, str]:
    """The environment a TP rank must see: ENV, or TWO_RANK_ENV in two-rank mode."""
    return TWO_RANK_ENV if _two_rank(tensor_parallel_size) else ENV


# PassConfig fields whose compile passes rewrite the tensor-parallel all-reduce.
COMM_PASSES = ("fuse_allreduce_rms", "enable_sp", "fuse_gemm_comms")

# Sizes with a multi-GPU test (tests/test_tensor_parallel.py). The pins hold for any size;
# a larger one is allowed once a test on that many GPUs backs it.
SUPPORTED_TENSOR_PARALLEL_SIZES = (1, 2)

# The all-reduce implementations of CudaCommunicator that are not NCCL, by attribute.
_OTHER_ALL_REDUCES = {
    "ca_comm": "vLLM's custom all-reduce",
    "symm_mem_comm": "torch symmetric-memory all-reduce",
    "fi_ar_comm": "FlashInfer all-reduce",
    "qr_comm": "quick all-reduce",
    "aiter_ar_comm": "AITER custom all-reduce",
}


def _how_to_pin(tensor_parallel_size: int) -> str:
    return (
        "det_backend pins it when the engine is built through EngineArgs (LLM(...), vllm serve); "
        "otherwise export it before starting: "
        + " ".join(f"{name}={value}" for name, value in required_env(tensor_parallel_size).items())
    )


_original_create_engine_config = None


def _selects_our_backend(engine_args) -> bool:
    """The same reading of the backend choice as create_engine_config (arg_utils.py:2249)."""
    from vllm.config.attention import AttentionConfig
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    attention = engine_args.attention_config
    chosen = {attention.backend, *attention.backend_per_kind.values()}
    if engine_args.attention_backend is not None:
        chosen.add(AttentionConfig.validate_backend_before(engine_args.attention_backend))
    return AttentionBackendEnum.CUSTOM in chosen


def pin(engine_args) -> None:
    """Sets ENV in this process (and so in the engine processes it starts), custom all-reduce
    off and COMM_PASSES off unless set by the user. Idempotent. In two-rank mode at TP=2:
    TWO_RANK_ENV only, and the custom all-reduce stays as the user set it."""
    import torch.distributed
    from vllm.logger import init_logger

    tp = engine_args.tensor_parallel_size
    if requested_allreduce_mode() == "two-rank" and tp != 2:
        raise ValueError(
            f"det_backend: {ALLREDUCE_ENV}=two-rank is deterministic at tensor_parallel_size=2 "
            f"only (from 3 ranks the partials are added in an order that depends on the "
            f"algorithm); got tensor_parallel_size={tp}. Unset it to pin NCCL instead."
        )
    env = required_env(tp)
    unpinned = {name: os.environ.get(name) for name, value in env.items()}
    unpinned = {name: value for name, value in unpinned.items() if value != env[name]}
    if unpinned and torch.distributed.is_initialized():
        raise RuntimeError(
            "det_backend: torch.distributed was initialized in this process before the engine "
            "was built, so NCCL may already have read its environment; tensor_parallel_size > 1 "
            f"needs it pinned first. {_how_to_pin(tp)}"
        )
    overridden = {name: value for name, value in unpinned.items() if value is not None}
    if overridden:
        init_logger(__name__).warning(
            "det_backend: overriding %s with %s for a deterministic all-reduce",
            overridden,
            {name: env[name] for name in overridden},
        )
    os.environ.update(env)
    if not _two_rank(tp):
        engine_args.disable_custom_all_reduce = True
    pass_config = engine_args.compilation_config.pass_config
    for name in COMM_PASSES:
        # None = "the optimization level decides" (config/vllm.py:783); a user's True stays
        # and the workers refuse it, naming it.
        if getattr(pass_config, name) is None:
            setattr(pass_config, name, False)


def stamp_tp_invariant(engine_args) -> None:
    """Writes TP-invariant mode into additional_config, which vLLM's compile-cache hash covers
    (patches/row_parallel.py says why). Idempotent; a non-dict additional_config is left alone
    and the workers refuse it."""
    extra = engine_args.additional_config
    if isinstance(extra, dict):
        engine_args.additional_config = {**extra, row_parallel.CONFIG_KEY: True}


def _create_engine_config(self, *args, **kwargs):
    ours = _selects_our_backend(self)
    tp_invariant = row_parallel.requested()
    if ours and self.tensor_parallel_size > 1:
        pin(self)
    if ours and tp_invariant:
        stamp_tp_invariant(self)
    vllm_config = _original_create_engine_config(self, *args, **kwargs)
    if ours:
        # The other choice every engine process must share: the attention variant, when
        # DET_BACKEND_ATTENTION is unset (it depends on the model, known only now; the
        # processes start after this returns). Imported here: register() imports this module
        # in every vLLM process, and the variants pull in the kernels.
        from .. import variants

        variants.export_default(vllm_config)
    return vllm_config


def apply() -> None:
    global _original_create_engine_config
    from vllm.engine.arg_utils import EngineArgs

    if EngineArgs.create_engine_config is not _create_engine_config:
        _original_create_engine_config = EngineArgs.create_engine_config
        EngineArgs.create_engine_config = _create_engine_config


def parallel_problems(vllm_config) -> list[str]:
    """Parallel settings det_backend cannot make deterministic, and, at TP > 1, any pin
    that is not in effect. Runs in each worker at start-up."""
    par = vllm_config.parallel_config
    reasons = []
    not_covered = {
        "pipeline_parallel_size": "pipeline parallelism (stage hand-offs and micro-batches "
        "are not checked)",
        "data_parallel_size": "data parallelism (replicas pad and synchronise their batches "
        "with each other)",
        "decode_context_parallel_size": "context parallelism (attention partials are merged "
        "across ranks, outside our attention kernel)",
        "prefill_context_parallel_size": "context parallelism (attention partials are merged "
        "across ranks, outside our attention kernel)",
    }
    for name, what in not_covered.items():
        size = getattr(par, name, 1)
        if size != 1:
            reasons.append(f"{name}={size}: {what}")
    if getattr(par, "enable_expert_parallel", False):
        reasons.append(
            "enable_expert_parallel: expert parallelism sends tokens to other ranks "
            "(all-to-all), outside our MoE kernel"
        )
    tp = par.tensor_parallel_size
    if tp == 1:
        try:  # a bad value is an error at any size, not only where an all-reduce runs
            requested_allreduce_mode()
        except ValueError as e:
            reasons.append(str(e))
    if tp not in SUPPORTED_TENSOR_PARALLEL_SIZES:
        reasons.append(
            f"tensor_parallel_size={tp} (supported: "
            f"{', '.join(map(str, SUPPORTED_TENSOR_PARALLEL_SIZES))}; a larger size needs "
            "its own multi-GPU test first)"
        )
    if tp > 1 and tp in SUPPORTED_TENSOR_PARALLEL_SIZES:
        reasons += _tensor_parallel_problems(vllm_config)
    return reasons


def _tensor_parallel_problems(vllm_config) -> list[str]:
    par = vllm_config.parallel_config
    reasons = []
    if getattr(par, "nnodes", 1) > 1:
        reasons.append(
            f"tensor parallelism across nodes (nnodes={par.nnodes}): the all-reduce pins are "
            "checked within one host only"
        )
    if vllm_config.model_config.is_moe:
        reasons.append(
            "mixture-of-experts layers with tensor_parallel_size > 1 (patches/moe.py is checked "
            "at tensor_parallel_size=1 only)"
        )
    try:
        two_rank = _two_rank(par.tensor_parallel_size)
    except ValueError as e:
        return [*reasons, str(e)]
    if requested_allreduce_mode() == "two-rank" and not two_rank:
        reasons.append(
            f"{ALLREDUCE_ENV}=two-rank at tensor_parallel_size={par.tensor_parallel_size}: it "
            "is deterministic with two ranks only; unset it to pin NCCL"
        )
    if not par.disable_custom_all_reduce and not two_rank:
        reasons.append(
            "custom all-reduce is on (disable_custom_all_reduce=False); det_backend turns it off "
            "when the engine is built through EngineArgs, else pass disable_custom_all_reduce=True"
        )
    pass_config = vllm_config.compilation_config.pass_config
    for name in COMM_PASSES:
        if getattr(pass_config, name):
            reasons.append(
                f"compilation pass {name}=True rewrites the tensor-parallel all-reduce (and "
                "fuse_allreduce_rms replaces our RMSNorm); set it to False"
            )
    env = required_env(par.tensor_parallel_size)
    wrong = {name: os.environ.get(name) for name, value in env.items()}
    wrong = {name: value for name, value in wrong.items() if value != env[name]}
    if wrong:
        reasons.append(
            "the all-reduce environment was not pinned before the NCCL communicators were "
            "created ("
            + ", ".join(f"{name}={value!r}, needs {env[name]!r}" for name, value in wrong.items())
            + f"); {_how_to_pin(par.tensor_parallel_size)}"
        )
    return reasons


def communicator_problems(communicator, world_size: int = 0) -> list[str]:
    """All-reduce paths other than NCCL that are live in a tensor-parallel CudaCommunicator
    (vLLM's custom all-reduce is allowed in two-rank mode with world_size 2)."""
    allowed = {"ca_comm"} if world_size and _two_rank(world_size) else set()
    return [
        f"{what} is active in the tensor-parallel group ({attr}); only NCCL's all-reduce is "
        "pinned to a fixed order"
        for attr, what in _OTHER_ALL_REDUCES.items()
        if attr not in allowed
        and getattr(communicator, attr, None) is not None
        and not getattr(communicator, attr).disabled
    ]


def problems() -> list[str]:
    from vllm.distributed import parallel_state
    from vllm.distributed.device_communicators.pynccl_allocator import (
        is_symmetric_memory_enabled,
    )
    from vllm.engine.arg_utils import EngineArgs

    reasons = []
    if EngineArgs.create_engine_config is not _create_engine_config:
        reasons.append("EngineArgs.create_engine_config does not pin tensor parallelism")
    if parallel_state.model_parallel_is_initialized():
        group = parallel_state.get_tp_group()
        if group.world_size > 1:
            reasons += communicator_problems(group.device_communicator, group.world_size)
            if is_symmetric_memory_enabled():
                reasons.append("NCCL symmetric-memory all-reduce is enabled")
    return reasons
