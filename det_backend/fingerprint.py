"""What produced a response: vLLM version, det_backend version, a hash of our kernels and
tile tables (and of the pinned FA3 call), the attention variant, GPU and dtype. Logged by
every worker when deterministic mode turns on, so a served answer can be tied to the code that
computed it; `fingerprint_string()` fits vLLM's `--fingerprint-mode custom
--fingerprint-value ...` for the responses' system_fingerprint.
"""

from __future__ import annotations

import hashlib
from importlib import resources

from . import __version__


def kernel_hash() -> str:
    """sha256 (first 12 hex digits) over the kernel sources, tile tables included, and the
    module that pins FA3's launch choices."""
    digest = hashlib.sha256()
    kernels = resources.files("det_backend.kernels")
    files = [
        kernels.joinpath(n) for n in sorted(p.name for p in kernels.iterdir()) if n.endswith(".py")
    ]
    for path in files + [resources.files("det_backend").joinpath("fa3.py")]:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def fingerprint(
    dtype: object = None, gpu: str | None = None, attention: str | None = None
) -> dict[str, str]:
    import vllm

    info = {"vllm": vllm.__version__, "det_backend": __version__, "kernels": kernel_hash()}
    if attention is not None:
        info["attention"] = attention
    if gpu is not None:
        info["gpu"] = gpu
    if dtype is not None:
        info["dtype"] = str(dtype).removeprefix("torch.")
    return info


def fingerprint_string() -> str:
    """A stable id of this code: det-<version>-<kernel hash> (GPU and dtype are in the logs)."""
    return f"det-{__version__}-{kernel_hash()}"
