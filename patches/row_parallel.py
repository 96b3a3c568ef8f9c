"""TP-invariant mode (DET_BACKEND_TP_INVARIANT=1): replaces
vllm.model_executor.layers.linear.RowParallelLinear.forward (linear.py:1676), so that o_proj and
down_proj give the same bits at tensor_parallel_size 1 and 2 (4 and 8 by design).

Why: vLLM's forward (linear.py:1676-1703) has each rank multiply its K/t columns, round the
partial to the model dtype (quant_method.apply, :1692) and all-reduce t rounded partials in
NCCL's order (:1694-1695). TP = 1 rounds once over the whole K; TP = 2 rounds three times.
How: K is reduced in TREE_SLICES fixed slices added in a fixed fp32 tree
(kernels/tree_matmul.py). At TP = 1 one op computes the whole tree (`tree_linear`). At
TP = t each rank computes its subtree's fp32 root (`tree_linear_partial`, t | TREE_SLICES);
t = 2 adds the two roots with an fp32 all-reduce (one commutative add per element, exact
whatever NCCL's algorithm); t >= 4 all-gathers the roots and adds them in tree order
locally (`tree_finish`), since NCCL's order is not the tree's. Bias is added once, to the
fp32 root, then rounded once; vLLM's rank-0 bias (:1691) is not used. The collectives are
vLLM's own (tensor_model_parallel_all_reduce / _all_gather, communication_op.py:12, :17),
which go through torch.ops.vllm.all_reduce / all_gather (parallel_state.py:641, :670): opaque
to torch.compile and captured in CUDA graphs through PyNCCL. The input split for
input_is_parallel=False (:1679-1685) is vLLM's. A class attribute: instances built before
`apply` are covered too. Column-parallel layers switch to full-K configs (patches/linear.py).

The setting is read from the environment in every process, as DET_BACKEND_ATTENTION is
(det_backend/variants.py). In the process that builds the engine, patches/tensor_parallel.py
also writes it into VllmConfig.additional_config[CONFIG_KEY]: vLLM's compile caches (the AOT
artifact included, decorators.py:524-547, caching.py:565) are keyed by the config hash, which
covers additional_config (config/vllm.py:493-501) but not our environment variable nor the
forward we swap in, so without the key a graph compiled in the other mode could be loaded.
Checked against vLLM: 0.26.0.
"""

from __future__ import annotations

import os

import torch

from ..kernels.tree_matmul import TREE_SLICES, tree_problems

ENV_VAR = "DET_BACKEND_TP_INVARIANT"
ON = ("1", "true", "on", "yes")
OFF = ("", "0", "false", "off", "no")
# The key in VllmConfig.additional_config that carries the mode into the compile-cache hash.
CONFIG_KEY = "det_backend_tp_invariant"


def read_setting() -> str:
    """DET_BACKEND_TP_INVARIANT, normalised; may be a value that is neither on nor off."""
    return os.environ.get(ENV_VAR, "").strip().lower()


def requested() -> bool:
    return read_setting() in ON


def _tree_forward(self, input_):
    from vllm.distributed import (
        split_tensor_along_last_dim,
        tensor_model_parallel_all_gather,
        tensor_model_parallel_all_reduce,
    )
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    # linear.py:1679-1685, unchanged.
    if self.input_is_parallel:
        input_parallel = input_
    else:
        split_input = split_tensor_along_last_dim(input_, num_partitions=self.tp_size)
        input_parallel = split_input[self.tp_rank].contiguous()
    if not isinstance(self.quant_method, UnquantizedLinearMethod):
        raise RuntimeError(
            f"det_backend: TP-invariant mode needs unquantized row-parallel weights; {self.prefix} "
            f"uses {type(self.quant_method).__name__}"
        )
    t = self.tp_size
    bias = None if self.skip_bias_add else self.bias
    if t == 1:
        output = torch.ops.det_backend.tree_linear(input_parallel, self.weight, bias, TREE_SLICES)
    else:
        if not self.reduce_results:
            # The caller would all-reduce rounded partials itself (e.g. FusedMoE).
            raise RuntimeError(
                f"det_backend: TP-invariant mode cannot leave {self.prefix}'s reduction to its "
                "caller (reduce_results=False)"
            )
        # fp32 [M, N]: the root of this rank's subtree of TREE_SLICES // t slices.
        root = torch.ops.det_backend.tree_linear_partial(
            input_parallel, self.weight, TREE_SLICES // t
        )
        if t == 2:
            leaves = tensor_model_parallel_all_reduce(root).unsqueeze(0)
        else:
            # [t * M, N] in rank order -> [t, M, N]: the tree's top levels, added locally.
            leaves = tensor_model_parallel_all_gather(root, dim=0).view(t, *root.shape)
        output = torch.ops.det_backend.tree_finish(leaves, bias, input_parallel.dtype)
        output = output.view(*input_parallel.shape[:-1], output.shape[-1])
    if not self.return_bias:
        return output
    return output, (self.bias if self.skip_bias_add else None)


_original_forward = None
_applied = False


def apply() -> None:
    """Installs the tree forward. Called only when the mode is requested; idempotent."""
    global _original_forward, _applied
    from vllm.model_executor.layers.linear import RowParallelLinear

    if RowParallelLinear.forward is not _tree_forward:
        _original_forward = RowParallelLinear.forward
        RowParallelLinear.forward = _tree_forward
    _applied = True


def problems() -> list[str]:
    from vllm.model_executor.layers.linear import RowParallelLinear

    ours = RowParallelLinear.forward is _tree_forward
    if _applied and not ours:
        return ["RowParallelLinear.forward is not det_backend's tree forward (TP-invariant mode)"]
    if ours and not _applied:
        return ["RowParallelLinear.forward is the tree forward but TP-invariant mode is off"]
    return []


def row_parallel_widths(hf_config) -> dict[str, int]:
    """The full K of each row-parallel layer of a Llama-family decoder (llama.py:100, :172;
    qwen2.py:97, :165; qwen3.py:114): o_proj reads every head, down_proj the MLP width."""
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    return {"o_proj": heads * head_dim, "down_proj": hf_config.intermediate_size}


def tp_invariance_problems(vllm_config) -> list[str]:
    """What TP-invariant mode cannot make invariant in this configuration; also the setting
    itself and its copy in additional_config. Runs in each worker at start-up."""
    setting = read_setting()
    if setting not in ON + OFF:
        return [f"{ENV_VAR}={setting!r} is neither on ({'/'.join(ON)}) nor off ('', 0)"]
    on = setting in ON
    extra = vllm_config.additional_config
    stamp = extra.get(CONFIG_KEY) if isinstance(extra, dict) else None
    if on != (stamp is True):
        return [
            f"{ENV_VAR} is {'on' if on else 'off'} in this worker but "
            f"additional_config[{CONFIG_KEY!r}] is {stamp!r}: "
            "the compile cache would not tell the modes apart. det_backend writes the key when "
            "the engine is built through EngineArgs (LLM(...), vllm serve) with the variable "
            "set in that process; set it there, or pass "
            f"--additional-config '{{\"{CONFIG_KEY}\": true}}' with it"
        ]
    if not on:
        return []
    model = vllm_config.model_config
    tp = vllm_config.parallel_config.tensor_parallel_size
    reasons = []
    if model.is_moe:
        reasons.append(
            f"{ENV_VAR}=1 with a mixture-of-experts model: the expert down projections leave "
            "their reduction to the MoE layer (reduce_results=False), which the K-slice tree "
            "does not cover"
        )
    widths = row_parallel_widths(model.hf_text_config)
    by_reason: dict[str, list[str]] = {}
    for layer, k in widths.items():
        for reason in tree_problems(k, tp):
            by_reason.setdefault(reason, []).append(layer)
    reasons += [
        f"{ENV_VAR}=1: {', '.join(layers)}: {reason}" for reason, layers in by_reason.items()
    ]
    return reasons
