"""Turns deterministic mode on in the process that runs the model.

vLLM only logs an exception raised inside a general plugin and carries on, so nothing is
patched from the plugin entry point. Instead our attention backend calls `enable()` when
each of its layers is constructed in a worker: the first call checks the configuration and
the vLLM version, applies every patch, and every call verifies that all replacements are in
place, raising otherwise. An exception there stops start-up with its message.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import patches
from .config import DeterminismError, check_vllm_version, config_problems
from .fingerprint import fingerprint
from .patches import row_parallel

if TYPE_CHECKING:
    from vllm.config import VllmConfig

_enabled = False


def enable(vllm_config: VllmConfig) -> None:
    global _enabled
    if not _enabled:
        import vllm

        check_vllm_version(vllm.__version__)
        reasons = config_problems(vllm_config)
        if reasons:
            raise DeterminismError(reasons)
        # Our builder never asks for cascade attention; the flag keeps vLLM from planning it.
        vllm_config.model_config.disable_cascade_attn = True
        patches.apply_all(vllm_config, tp_invariant=row_parallel.requested())
        _enabled = True
        _log_fingerprint(vllm_config)
    missing = patches.problems()
    if missing:
        raise RuntimeError(
            "det_backend: a replacement deterministic mode relies on is not in place: "
            + "; ".join(missing)
        )


def _log_fingerprint(vllm_config: VllmConfig) -> None:
    import torch
    from vllm.logger import init_logger

    from .variants import read_variant

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    info = fingerprint(vllm_config.model_config.dtype, gpu, read_variant())
    # The mode changes every row-parallel layer's bits, at TP = 1 too.
    info["tp_invariant"] = str(row_parallel.requested()).lower()
    init_logger(__name__).info("det_backend: deterministic mode on: %s", info)
