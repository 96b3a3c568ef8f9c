"""MATMUL_TABLE (kernels/matmul.py) from `benchmarks/gemm.py --sweep` results; no GPU needed.

    python benchmarks/gemm_table.py sweep.json [part2.json ...]
    python benchmarks/gemm_table.py --keep-below 128 large_m_sweep.json   # re-sweep of large M

--keep-below M: the sweep covers only M >= some M0 (gemm.py --min-m); each shape keeps the
entries of its current MATMUL_TABLE that serve only M < M (max_m < M), and the swept entries
follow. Both must use one split_k (checked).

Per weight shape: for each split_k, the fastest bit-checked candidate at every swept M; the
split_k whose per-M best times have the smallest geometric mean wins (one split_k per shape
keeps every M on the same sums); consecutive M with the same best config merge into one entry,
and the last entry serves every larger M. Prints the Python source of the table and, per
shape, the expected speed-up over the sweep's own table and over cuBLAS.
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

from harness import geomean

_DEFAULTS = ("plain", 1, False)  # kind, split_k, warp_specialize of a MatmulConfig


def candidate_config(key: str) -> tuple:
    """'(16, 64, 256, 8, 4, 3, ...)' -> the full config tuple after max_m; sweeps made before
    the kinds existed list 6 numbers."""
    values = ast.literal_eval(key)
    return (*values, *_DEFAULTS[len(values) - 6 :])


def best_per_m(points: list[dict]) -> dict[int, dict[int, tuple[float, tuple]]]:
    """{split_k: {M: (ms, config)}} over the candidates that ran and kept the bits."""
    best: dict[int, dict[int, tuple[float, tuple]]] = {}
    for p in points:
        for key, ms in p.get("candidates", {}).items():
            if not isinstance(ms, float):
                continue
            cfg = candidate_config(key)
            by_m = best.setdefault(cfg[7], {})
            if p["M"] not in by_m or ms < by_m[p["M"]][0]:
                by_m[p["M"]] = (ms, cfg)
    return best


def choose(points: list[dict]) -> tuple[int, list[tuple[int, tuple]], float]:
    """(split_k, [(max_m, config)], geomean ms) for one shape's points."""
    ms_all = sorted({p["M"] for p in points})
    complete = {s: by_m for s, by_m in best_per_m(points).items() if sorted(by_m) == ms_all}
    if not complete:
        raise ValueError("no split_k has a bit-checked candidate at every M")
    split_k, by_m = min(complete.items(), key=lambda i: geomean([t for t, _ in i[1].values()]))
    entries: list[tuple[int, tuple]] = []
    for m in ms_all:
        cfg = by_m[m][1]
        if entries and entries[-1][1] == cfg:
            entries[-1] = (m, cfg)
        else:
            entries.append((m, cfg))
    entries[-1] = (2**62, entries[-1][1])
    return split_k, entries, geomean([t for t, _ in by_m.values()])


def config_source(max_m: int, cfg: tuple) -> str:
    tail = list(cfg[6:])
    while tail and tail[-1] == _DEFAULTS[len(tail) - 1]:
        tail.pop()
    # Double quotes, as ruff formats the table in kernels/matmul.py.
    values = [repr(v).replace("'", '"') for v in (*cfg[:6], *tail)]
    args = ["_ANY_M" if max_m >= 2**62 else str(max_m), *values]
    return f"        MatmulConfig({', '.join(args)}),"


def kept_entries(n: int, k: int, below: int) -> list[tuple[int, tuple]]:
    """The current MATMUL_TABLE entries of (n, k) that serve only M < below."""
    from det_backend.kernels.matmul import MATMUL_TABLE

    return [(c.max_m, tuple(c)[1:]) for c in MATMUL_TABLE.get((n, k), ()) if c.max_m < below]


def table_source(points: list[dict], keep_below: int = 0) -> tuple[str, list[str]]:
    shapes: dict[tuple, list[dict]] = {}
    for p in points:
        shapes.setdefault((p["model"], p["layer"], p["N"], p["K"]), []).append(p)
    lines, report = ["MATMUL_TABLE: dict[tuple[int, int], tuple[MatmulConfig, ...]] = {"], []
    for (model, layer, n, k), pts in shapes.items():
        split_k, entries, ms = choose(pts)
        if keep_below:
            kept = kept_entries(n, k, keep_below)
            if any(cfg[7] != split_k for _, cfg in kept):
                raise ValueError(f"{model} {layer}: kept entries and the sweep's split_k differ")
            entries = kept + entries
        lines += [f"    # {model} {layer}", f"    ({n}, {k}): ("]
        lines += [config_source(max_m, cfg) for max_m, cfg in entries]
        lines.append("    ),")
        ours = geomean([p["ours_ms"] for p in pts])
        cublas = geomean([p["cublas_ms"] for p in pts])
        report.append(
            f"# {model:>10} {layer:>8} split_k={split_k}: x{ours / ms:.3f} vs the swept table, "
            f"x{cublas / ms:.3f} vs cuBLAS (geomean over M)"
        )
    lines.append("}")
    return "\n".join(lines), report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("sweeps", nargs="+", type=Path)
    parser.add_argument("--keep-below", type=int, default=0)
    args = parser.parse_args()
    points = [p for f in args.sweeps for p in json.loads(f.read_text())["points"]]
    source, report = table_source(points, args.keep_below)
    print(source)
    print("\n".join(report))


if __name__ == "__main__":
    main()
