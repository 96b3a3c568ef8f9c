"""det-backend: deterministic, batch-invariant inference for vLLM.

`register()` is the `vllm.general_plugins` entry point. vLLM calls it in every process
(API server, engine core, workers), so it is cheap and idempotent: it records our backend's
class path in vLLM's CUSTOM attention-backend slot and, on a checked vLLM version, accepts
DETERMINISTIC as a second name for that slot and wraps EngineArgs.create_engine_config (an
engine with our backend at tensor_parallel_size > 1 gets a deterministic all-reduce set up
before its processes start: patches/tensor_parallel.py). Nothing else changes until a user
selects the backend (`--attention-backend CUSTOM` or `DETERMINISTIC`); then constructing the
backend turns deterministic mode on in the worker (see det_backend.mode).
"""

__version__ = "0.1.0"

BACKEND_CLASS_PATH = "det_backend.backend.DetAttentionBackend"

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    import vllm
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from .patches import CHECKED_VLLM_VERSIONS, backend_alias, tensor_parallel

    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_CLASS_PATH)
    # On an unchecked version the alias is not offered; CUSTOM still selects the backend,
    # which then refuses to start and names the version.
    if vllm.__version__ in CHECKED_VLLM_VERSIONS:
        backend_alias.apply()
        tensor_parallel.apply()
    _registered = True
