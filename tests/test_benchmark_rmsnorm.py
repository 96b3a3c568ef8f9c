"""benchmarks/rmsnorm.py's cases on the CPU (Triton interpreter): the sweep's row check runs
our ops with the launch it is given and compares the rows it means to (the timing itself runs
on the GPU host; the kernel's own nondeterministic control is in test_rms_norm.py)."""

import sys
from pathlib import Path

import torch
from det_backend.kernels.rms_norm import launch_candidates
from invariance import randn

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

import rmsnorm  # noqa: E402


def rows_equal(x, res, w, config, op, alone_from=0):
    """The sweep's check: rows 0-3 in the batch vs rows alone_from.. run alone."""
    few = rmsnorm.first_output(rmsnorm.op_cases(x, res, w, config)[op][0]())[:4]
    rows = slice(alone_from, alone_from + 4)
    alone = rmsnorm.op_cases(x[rows], res[rows], w, config)[op][0]()
    return torch.equal(few, rmsnorm.first_output(alone))


def test_sweep_cases_run_each_launch_and_the_row_check_compares_rows(device):
    hidden = 1500
    x = randn(12, hidden, dtype=torch.float32, device=device, seed=40)
    res = randn(12, hidden, dtype=torch.float32, device=device, seed=41)
    w = randn(hidden, dtype=torch.float32, device=device, seed=42)
    for config in launch_candidates(hidden):
        for op in ("rms_norm", "fused_add_rms_norm"):
            assert rows_equal(x, res, w, config, op), (op, config)
            # Other rows alone: the check sees them differ (it is not comparing a tensor
            # with itself).
            assert not rows_equal(x, res, w, config, op, alone_from=4), (op, config)
