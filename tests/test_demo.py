"""The demo's host side on the CPU (det_backend.demo): what reaches each engine process and
what comes back in the summary. The engines themselves run in tests/test_e2e.py (GPU)."""

import json
import os
import sys
import time
from pathlib import Path

import pytest

from det_backend import demo


def test_sampling_fields_seed_per_prompt_and_logit_bias_ids_from_json():
    from vllm import SamplingParams

    sampling = json.loads(json.dumps({"temperature": 0.8, "seed": 1000, "logit_bias": {7: 2.0}}))
    fields = demo.sampling_fields(sampling, 5)
    assert fields == {"temperature": 0.8, "seed": 1005, "logit_bias": {7: 2.0}}
    assert demo.sampling_fields(sampling, None)["seed"] is None
    assert demo.sampling_fields({"temperature": 0.0}, 3)["seed"] is None
    SamplingParams(**fields, max_tokens=4)  # vLLM takes them


def test_preemption_engines_get_few_blocks_and_report_preemptions(monkeypatch):
    plans = {}

    def fake_run(cmd, env, what):
        backend = cmd[cmd.index("--engine-worker") + 1]
        plan = json.loads(Path(cmd[cmd.index("--plan") + 1]).read_text())
        plans[backend] = plan
        w = plan["workloads"][0]
        out = [{"tokens": [1, 2], "logprobs": [-0.5, -0.25]}] * len(w["prompts"])
        run = {"backend": backend, "tok_s": 1.0, "batch_seconds": 1.0, "batch": out}
        run.update(batch2=out, alone=out[: w["num_alone"]], gpu="G", vllm="0.26.0")
        run["preemptions"] = 9
        Path(cmd[cmd.index("--out") + 1]).write_text(json.dumps({w["name"]: run}))

    monkeypatch.setattr(demo, "run_engine_process", fake_run)
    sampling = {"temperature": 0.8, "seed": 1000, "logit_bias": {1000: 4.0}}
    result = demo.compare("small", 4, 8, sampling=sampling, num_gpu_blocks=128)
    assert {b: p["num_gpu_blocks_override"] for b, p in plans.items()} == {
        "default": 128,
        "det": 128,
    }
    assert plans["det"]["workloads"][0]["sampling"]["logit_bias"] == {"1000": 4.0}
    assert [r["preemptions"] for r in result["runs"]] == [9, 9]
    assert demo.compare("small", 4, 8) and plans["det"]["num_gpu_blocks_override"] is None


def test_engine_process_failure_is_named():
    from det_backend.demo import run_engine_process

    run_engine_process([sys.executable, "-c", "pass"], dict(os.environ), "the ok engine")
    with pytest.raises(RuntimeError, match="the bad engine failed with exit code 3"):
        run_engine_process(
            [sys.executable, "-c", "import sys; sys.exit(3)"], dict(os.environ), "the bad engine"
        )


def test_engine_process_timeout_kills_its_workers(monkeypatch, tmp_path):
    """A hung engine (as after a TP worker crashed) is killed at DET_ENGINE_TIMEOUT_S with the
    processes it started, so the caller goes on and no worker keeps a GPU."""
    from det_backend.demo import run_engine_process

    monkeypatch.setenv("DET_ENGINE_TIMEOUT_S", "2")
    pid_file = tmp_path / "worker.pid"
    engine = (
        "import subprocess, sys, time\n"
        "w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(w.pid))\n"
        "time.sleep(120)\n"
    )
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="the hung engine did not finish in 2 s"):
        run_engine_process([sys.executable, "-c", engine], dict(os.environ), "the hung engine")
    assert time.monotonic() - start < 30
    time.sleep(0.5)
    status = Path(f"/proc/{int(pid_file.read_text())}/status")
    assert not status.exists() or "State:\tZ" in status.read_text()  # gone, or a dead zombie
