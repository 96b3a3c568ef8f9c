"""`det-backend COMMAND ...`, the console script.

det-backend drift ...       measure determinism of an endpoint (det_backend.drift)
det-backend matrix ...      the invariance matrix through `vllm serve` (det_backend.matrix)
det-backend fingerprint     print det-<version>-<kernel hash>, for vLLM's
                            --fingerprint-mode custom --fingerprint-value
"""

import sys

from . import drift, matrix


def _fingerprint(argv: list[str], prog: str) -> int:
    from .fingerprint import fingerprint_string

    print(fingerprint_string())
    return 0


COMMANDS = {"drift": drift.main, "matrix": matrix.main, "fingerprint": _fingerprint}


def cli(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]](argv[1:], prog=f"det-backend {argv[0]}")
    usage = f"usage: det-backend {{{','.join(COMMANDS)}}} [options]  (det-backend drift --help)"
    if argv and argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    print(usage, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(cli())
