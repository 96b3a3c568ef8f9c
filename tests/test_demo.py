"""The demo's host side on the CPU (det_backend.demo): what reaches each engine process and
what comes back in the summary. The engines themselves run in tests/test_e2e.py (GPU)."""

import json
import os
import subprocess
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


def _fake_engine(fail: set[str]):
    """run_engine_process stand-in: writes a run for each backend, raises for those in fail."""

    def fake_run(cmd, env, what):
        backend = cmd[cmd.index("--engine-worker") + 1]
        if backend in fail:
            raise RuntimeError(f"det_backend: {what} failed with exit code 1")
        plan = json.loads(Path(cmd[cmd.index("--plan") + 1]).read_text())
        w = plan["workloads"][0]
        out = [{"tokens": [1, 2], "logprobs": [-0.5, -0.25]}] * len(w["prompts"])
        run = {"backend": backend, "tok_s": 1.0, "batch_seconds": 1.0, "batch": out}
        run.update(batch2=out, alone=out[: w["num_alone"]], gpu="G", vllm="0.26.0")
        Path(cmd[cmd.index("--out") + 1]).write_text(json.dumps({w["name"]: run}))

    return fake_run


def test_run_backends_keep_going_records_a_failed_engine_and_reports_each(monkeypatch):
    """keep_going: the default engine failing (as vLLM's did at TP=2 on the lent hosts) leaves
    det's run in the result, names the failure, and on_backend_done saw every step; without
    keep_going the failure raises."""
    monkeypatch.setattr(demo, "run_engine_process", _fake_engine({"default"}))
    w = demo.workload("main", 4, 8, 2, 1000)
    seen = []
    result = demo.run_backends(
        "small",
        [w],
        ("det", "default"),
        keep_going=True,
        on_backend_done=lambda r: seen.append((len(r["workloads"]), dict(r.get("failed", {})))),
    )
    assert [r["backend"] for r in result["workloads"]["main"]["runs"]] == ["det"]
    assert "the default engine failed" in result["failed"]["default"]
    assert seen == [(1, {}), (1, result["failed"])]
    with pytest.raises(RuntimeError, match="the default engine failed"):
        demo.run_backends("small", [w], ("det", "default"))


def test_engine_worker_error_exits_even_with_a_thread_holding_the_process(tmp_path):
    """run_engine_worker: an error in the engine body prints its traceback and exits 1 at once,
    even where a plain raise would wait at exit (here: a non-daemon thread, as vLLM's dead
    workers left the engine process hanging on two H100s)."""
    body = (
        "import threading, time, argparse\n"
        "from det_backend import demo\n"
        "threading.Thread(target=time.sleep, args=(120,)).start()\n"
        "def worker(args):\n"
        "    raise RuntimeError('engine core failed to start')\n"
        "demo.run_engine_worker(worker, argparse.Namespace())\n"
    )
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", body], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and time.monotonic() - start < 30
    assert "engine core failed to start" in proc.stderr


def test_nccl_only_engine_kwargs_are_vllm_engine_args(monkeypatch):
    """DET_DEMO_NCCL_ONLY's kwargs build vLLM EngineArgs with the custom all-reduce and the
    FlashInfer all-reduce fusion pass off; DET_DEMO_KEEP_CUSTOM_ALL_REDUCE=1 keeps the custom
    all-reduce, never the pass; the serve flags carry the same."""
    from vllm.engine.arg_utils import EngineArgs

    monkeypatch.delenv(demo.KEEP_CUSTOM_AR, raising=False)
    args = EngineArgs(model="unused-model-dir", **demo.nccl_only_engine_kwargs())
    assert args.disable_custom_all_reduce is True
    assert args.compilation_config.pass_config.fuse_allreduce_rms is False
    flags = demo.nccl_only_serve_args()
    assert "--disable-custom-all-reduce" in flags
    config = json.loads(flags[flags.index("--compilation-config") + 1])
    assert config == {"pass_config": {"fuse_allreduce_rms": False}}

    monkeypatch.setenv(demo.KEEP_CUSTOM_AR, "1")
    args = EngineArgs(model="unused-model-dir", **demo.nccl_only_engine_kwargs())
    assert args.disable_custom_all_reduce is False
    assert args.compilation_config.pass_config.fuse_allreduce_rms is False
    flags = demo.nccl_only_serve_args()
    assert "--disable-custom-all-reduce" not in flags and "--compilation-config" in flags


class _FakeLLM:
    """vllm.LLM as engine_worker uses it: each generate one step slower than the last, so the
    timed runs differ; every prompt returns its first two ids with their logprobs."""

    resets: list = []
    reset_ok = True

    def __init__(self, **kwargs):
        self.calls = 0

    def apply_model(self, fn):
        pass

    def reset_prefix_cache(self):
        _FakeLLM.resets.append(self.calls)
        return _FakeLLM.reset_ok

    def generate(self, prompts, params, use_tqdm=True):
        from types import SimpleNamespace

        self.calls += 1
        time.sleep(0.01 * self.calls)
        prompts = prompts if isinstance(prompts, list) else [prompts]
        return [
            SimpleNamespace(
                outputs=[
                    SimpleNamespace(
                        token_ids=p["prompt_token_ids"][:2],
                        logprobs=[
                            {t: SimpleNamespace(logprob=-1.0)} for t in p["prompt_token_ids"][:2]
                        ],
                    )
                ]
            )
            for p in prompts
        ]


@pytest.mark.parametrize("repeats", [1, 3])
def test_engine_worker_times_the_batch_repeats_times_each_after_emptying_the_prefix_cache(
    repeats, monkeypatch, tmp_path
):
    import argparse

    import torch
    import vllm

    monkeypatch.setattr(vllm, "LLM", _FakeLLM)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "G")
    monkeypatch.setattr(_FakeLLM, "resets", [])
    w = demo.workload("main", 3, 2, 1, 1000)
    plan = {"max_model_len": 600, "repeats": repeats, "workloads": [w]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    args = argparse.Namespace(
        engine_worker="default",
        model_dir=str(tmp_path),
        plan=str(tmp_path / "plan.json"),
        out=str(tmp_path / "out.json"),
    )
    demo.engine_worker(args)
    run = json.loads((tmp_path / "out.json").read_text())["main"]
    assert len(run["tok_s_runs"]) == repeats
    assert run["tok_s"] == sorted(run["tok_s_runs"])[(repeats - 1) // 2]  # the median
    # warm-up, timed, again (cache hits), then each repeat after a reset of the prefix cache
    assert _FakeLLM.resets == list(range(3, 3 + repeats - 1))
    assert demo.summarize(run)["tok_s_runs"] == run["tok_s_runs"]
    if repeats > 1:
        monkeypatch.setattr(_FakeLLM, "reset_ok", False)
        with pytest.raises(RuntimeError, match="prefix cache"):
            demo.engine_worker(args)
    with pytest.raises(ValueError, match="repeats"):
        demo.run_backends("small", [w], ("default",), repeats=0)
