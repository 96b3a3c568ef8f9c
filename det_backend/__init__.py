"""det-backend: deterministic, batch-invariant inference for vLLM.

`register()` is the `vllm.general_plugins` entry point. vLLM calls it in every process
(API server, engine core, workers), so it is cheap and idempotent: it only records our
backend's class path in vLLM's CUSTOM attention-backend slot. Nothing else changes until
a user selects that backend (`--attention-backend CUSTOM`); then constructing the backend
turns deterministic mode on in the worker (see det_backend.mode).
"""

__version__ = "0.1.0"

BACKEND_CLASS_PATH = "det_backend.backend.DetAttentionBackend"

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_CLASS_PATH)
    _registered = True
