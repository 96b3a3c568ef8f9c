"""Makes `DETERMINISTIC` a second name for vLLM's CUSTOM attention-backend slot, so users can
write `--attention-backend DETERMINISTIC` (or `attention_backend="deterministic"`).

Why: vLLM 0.26's AttentionBackendEnum is closed; `CUSTOM` is the only slot for out-of-tree
backends, and it says nothing about what it selects.
How: `_AttentionBackendEnumMeta.__getitem__` (every name lookup of the enum, the CLI's and
AttentionConfig's validators included) maps the alias to CUSTOM first and otherwise calls
the original. Applied by `register()` in every process, only on a checked vLLM version; it
adds an accepted name and changes nothing else. Checked against vLLM: 0.26.0.
"""

ALIAS = "DETERMINISTIC"

_original_getitem = None


def _getitem(cls, name: str):
    if isinstance(name, str) and name.upper() == ALIAS:
        name = "CUSTOM"
    return _original_getitem(cls, name)


def apply() -> None:
    global _original_getitem
    from vllm.v1.attention.backends.registry import _AttentionBackendEnumMeta

    if _AttentionBackendEnumMeta.__getitem__ is not _getitem:
        _original_getitem = _AttentionBackendEnumMeta.__getitem__
        _AttentionBackendEnumMeta.__getitem__ = _getitem


def problems() -> list[str]:
    from vllm.v1.attention.backends.registry import _AttentionBackendEnumMeta

    if _AttentionBackendEnumMeta.__getitem__ is not _getitem:
        return [f"the {ALIAS} alias of the CUSTOM attention backend is not installed"]
    return []
