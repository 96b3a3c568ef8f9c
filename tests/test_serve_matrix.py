"""The invariance matrix through a real `vllm serve` (det_backend.matrix).

CPU: the prompt set and the scoring. GPU (slow): one run of the matrix for a Llama-3-8B
shape (2 layers, full widths), one test per dimension; vLLM's default backend must differ in
at least one of its cells (proof the comparison can fail). Set DET_RESULTS_DIR to keep the
result as invariance_matrix.json.
"""

import contextlib
import os
from pathlib import Path

import pytest
from test_drift import FakeOpenAI

from det_backend import drift, matrix


def test_matrix_prompts_share_prefixes_of_many_lengths():
    prompts = matrix.make_prompts(vocab=32000)
    assert len(prompts) == matrix.NUM_PROMPTS
    # seeded: the same prompts in every run and process
    assert [p.payload for p in prompts] == [p.payload for p in matrix.make_prompts(vocab=32000)]
    shared = set()
    for g in range(0, len(prompts), 8):
        group = [p.payload for p in prompts[g : g + 8]]
        n = 0
        while all(len(p) > n and p[n] == group[0][n] for p in group):
            n += 1
        shared.add(n // 16)
    assert len(shared) > 10  # prefixes of many lengths, in 16-token blocks


def test_matrix_score_counts_bitwise_equal_outputs():
    def response(i, logprob, error=None):
        out = None if error else drift.Output("", ("token_id:5",), (logprob,), ((),))
        return drift.Response(i, 1, 0, output=out, error=error)

    reference = [response(0, -0.5), response(1, -0.25)]
    got = [response(0, -0.5), response(1, -0.25000001), response(0, 0, error="http")]
    score = matrix._score(reference, got)
    assert score == {
        "n": 3,
        "identical": 1,
        "errors": 1,
        "identical_fraction": 1 / 3,
        "fingerprints": [],
    }


def test_matrix_merge_keeps_each_cell_from_the_run_that_measured_it():
    def cell(dimension, det=None, default=None):
        row = matrix._row([], "m", dimension)
        row.update(identical_fraction=det, default_identical_fraction=default)
        return row

    a = {"command": "a", "gpu": "G", "cells": [cell("batch_256", det=1.0), cell("restart", 1.0)]}
    b = {"command": "b", "gpu": "G", "cells": [cell("batch_256", default=0.25)]}
    merged = matrix.merge([a, b])
    rows = {c["dimension"]: c for c in merged["cells"]}
    assert rows["batch_256"]["identical_fraction"] == 1.0
    assert rows["batch_256"]["default_identical_fraction"] == 0.25
    assert rows["restart"]["default_identical_fraction"] is None
    assert merged["command"] == "a + b"


def test_matrix_prompt_count_is_a_parameter_and_256_keeps_the_committed_set():
    assert len(matrix.make_prompts(vocab=32000, num=128)) == 128
    first = matrix.make_prompts(vocab=32000, num=128)
    assert len(first[-1].payload) - len(first[0].payload) > 200  # last group's long prefix
    with pytest.raises(ValueError):
        matrix.make_prompts(vocab=32000, num=100)
    assert matrix.preemption_blocks(256) == 800
    assert matrix.preemption_blocks(128) == 400


def test_matrix_seeded_settings_send_seed_per_prompt_and_every_field():
    prompt = drift.Prompt(5, 0, "token_ids", [101, 102])
    body = drift.request_body(matrix._settings(matrix.SEEDED), "m", prompt)
    assert body["seed"] == matrix.SEEDED["seed"] + 5
    assert body["temperature"] == 0.8
    for name in ("top_k", "top_p", "min_p", "presence_penalty", "frequency_penalty"):
        assert body[name] == matrix.SEEDED[name]
    assert body["repetition_penalty"] == matrix.SEEDED["repetition_penalty"]
    assert body["logit_bias"] == matrix.SEEDED["logit_bias"]
    greedy = drift.request_body(matrix._settings(None), "m", prompt)
    assert greedy["temperature"] == 0.0 and "seed" not in greedy and "top_k" not in greedy
    assert matrix.SEEDED["seed"] == 1000  # _settings must not consume the preset


def test_matrix_sampling_flags():
    def parse(*argv):
        return matrix.sampling_from_args(matrix.build_parser("matrix").parse_args(argv))

    assert parse() is None
    assert parse("--seeded") == matrix.SEEDED
    assert parse("--seeded", "--top-k", "5")["top_k"] == 5
    assert parse("--temperature", "0.7", "--seed", "3") == {"temperature": 0.7, "seed": 3}
    assert parse("--seed", "1", "--temperature", "1", "--logit-bias", "1000:4,2000:-2.5")[
        "logit_bias"
    ] == {"1000": 4.0, "2000": -2.5}
    with pytest.raises(SystemExit):
        parse("--temperature", "0.7")
    with pytest.raises(SystemExit):
        parse("--logit-bias", "x:1")


def test_matrix_counts_preemptions_from_prometheus_text():
    text = (
        "# HELP vllm:num_preemptions_total Cumulative number of preemption from the engine.\n"
        "# TYPE vllm:num_preemptions_total counter\n"
        'vllm:num_preemptions_total{engine="0",model_name="m"} 12.0\n'
        'vllm:num_preemptions_created{engine="0",model_name="m"} 1.7e+09\n'
    )
    assert matrix.count_preemptions(text) == 12
    assert matrix.count_preemptions("vllm:num_requests_running 3.0\n") is None


def test_matrix_merge_refuses_runs_of_other_sampling_settings():
    greedy = {"command": "a", "cells": [], "sampling": None}
    old = {"command": "b", "cells": []}  # committed before the key existed: greedy, 256
    seeded = {"command": "c", "cells": [], "sampling": matrix.SEEDED, "num_prompts": 128}
    assert matrix.merge([greedy, old])["sampling"] is None
    with pytest.raises(ValueError, match="different sampling"):
        matrix.merge([greedy, seeded])
    # Another attention variant or TP size measures other kernels: no merge either.
    flashinfer = {**greedy, "command": "d", "attention_variant": "flashinfer"}
    tp2 = {**greedy, "command": "e", "tensor_parallel_size": 2}
    assert matrix.merge([greedy, {**old, "attention_variant": "triton"}])["command"] == "a + b"
    for other in (flashinfer, tp2):
        with pytest.raises(ValueError, match="attention variants or TP sizes"):
            matrix.merge([greedy, other])


@pytest.fixture
def fake_openai():
    server = FakeOpenAI().start()
    yield server
    server.stop()


@pytest.fixture
def served_args(fake_openai, monkeypatch):
    """Every `vllm serve` of matrix.run_variant answered by the fake server; the list of each
    start's arguments."""
    started = []

    @contextlib.contextmanager
    def serve(model, port, args, timeout):
        started.append(args)
        yield drift.Served(fake_openai.base_url, None, "")

    monkeypatch.setattr(matrix.drift, "serve_vllm", serve)
    return started


def test_matrix_seeded_cells_send_the_settings_and_keep_the_preemption_count(
    fake_openai, served_args, tmp_path
):
    """run_variant against a fake OpenAI server standing in for every `vllm serve`: each cell
    sends the seeded fields, scores against the reference, and the preemption cell keeps the
    count (None: the fake has no /metrics)."""
    server, started = fake_openai, served_args
    prompts = matrix.make_prompts(vocab=32000, num=16)
    records = {}
    cells = ("prefix_cache_warm", "batch_256", "chunked_prefill_256", "preemption")
    matrix.run_variant(
        "ckpt", "det", prompts, cells, records.__setitem__, tmp_path / "ref.json", matrix.SEEDED
    )
    assert set(records) == {"reference", *cells}
    assert all(records[c]["identical_fraction"] == 1.0 for c in cells)  # the fake repeats itself
    assert records["preemption"]["preemptions"] is None
    assert "preemptions" not in records["batch_256"]
    bodies = server.measured()
    assert len(bodies) == 16 * 5
    index = {tuple(p.payload): p.index for p in prompts}
    assert all(b["seed"] == 1000 + index[tuple(b["prompt"])] for b in bodies)
    assert all(b["top_k"] == 50 and b["logit_bias"] == matrix.SEEDED["logit_bias"] for b in bodies)
    assert ["--num-gpu-blocks-override", "64"] == started[-1][-2:]
    assert ["--max-num-batched-tokens", "256"] == started[1][-2:]


def test_matrix_tensor_parallel_serves_every_server_at_that_size(served_args):
    """DET_MATRIX_TP / --tensor-parallel-size: each `vllm serve` of the run gets the flag, the
    reference server and the cells' own servers alike; TP=1 adds nothing."""
    started = served_args
    prompts = matrix.make_prompts(vocab=32000, num=16)
    cells = ("batch_256", "chunked_prefill_256", "restart")
    for tp, flag in ((2, ["--tensor-parallel-size", "2"]), (1, [])):
        started.clear()
        matrix.run_variant("ckpt", "det", prompts, cells, {}.__setitem__, tensor_parallel_size=tp)
        assert len(started) == 3
        for args in started:
            at = [i for i, a in enumerate(args) if a == "--tensor-parallel-size"]
            assert [args[i : i + 2] for i in at] == ([flag] if flag else [])


def test_matrix_nccl_only_at_tp_above_1(served_args, monkeypatch):
    """DET_DEMO_NCCL_ONLY=1 (gpu_run.sh at TP > 1): every server at TP=2 gets vLLM's flags for
    the custom all-reduce and the FlashInfer all-reduce fusion off; TP=1 servers nothing."""
    import json

    from det_backend import demo

    started = served_args
    prompts = matrix.make_prompts(vocab=32000, num=16)
    monkeypatch.setenv(demo.NCCL_ONLY, "1")
    monkeypatch.delenv(demo.KEEP_CUSTOM_AR, raising=False)
    for tp in (2, 1):
        started.clear()
        matrix.run_variant(
            "ckpt", "default", prompts, ("batch_256",), {}.__setitem__, tensor_parallel_size=tp
        )
        for args in started:
            assert ("--disable-custom-all-reduce" in args) == (tp == 2)
            if tp == 2:
                config = json.loads(args[args.index("--compilation-config") + 1])
                assert config == {"pass_config": {"fuse_allreduce_rms": False}}
    monkeypatch.setenv(demo.NCCL_ONLY, "0")
    started.clear()
    matrix.run_variant(
        "ckpt", "default", prompts, ("batch_256",), {}.__setitem__, tensor_parallel_size=2
    )
    assert started and not any("--disable-custom-all-reduce" in args for args in started)


# One GPU call may not fit every server start: DET_MATRIX_CELLS / DET_MATRIX_DEFAULT_CELLS
# pick cells (comma lists; the rest skip) and DET_MATRIX_MODELS the shapes;
# DET_MATRIX_REF_DIR keeps each variant's reference pass for the next call on the same host;
# DET_MATRIX_TP=2 serves every variant with --tensor-parallel-size 2 (two GPUs);
# DET_MATRIX_PROMPTS sets the prompts per pass (default 256, the committed set).
def _env_cells(name: str) -> tuple[str, ...]:
    return tuple(c for c in os.environ.get(name, ",".join(matrix.ALL_CELLS)).split(",") if c)


CELLS = _env_cells("DET_MATRIX_CELLS")
DEFAULT_CELLS = _env_cells("DET_MATRIX_DEFAULT_CELLS")


@pytest.fixture(scope="module")
def matrix_result():
    from det_backend import demo

    if int(os.environ.get("DET_MATRIX_TP", "1")) > 1:
        # The default servers at TP > 1 run NCCL-only unless told otherwise (demo.NCCL_ONLY:
        # their FlashInfer all-reduce fusion would create a multicast object, which the lent
        # hosts forbid). Set for this process and the servers it starts.
        os.environ.setdefault(demo.NCCL_ONLY, "1")
    out = None
    if os.environ.get("DET_RESULTS_DIR"):
        out = str(Path(os.environ["DET_RESULTS_DIR"], "invariance_matrix.json"))
    models = tuple(os.environ.get("DET_MATRIX_MODELS", "llama-3-8b").split(","))
    result = matrix.run_matrix(
        models,
        layers=2,
        cells=CELLS,
        default_cells=DEFAULT_CELLS,
        out=out,
        reference_dir=os.environ.get("DET_MATRIX_REF_DIR"),
        tensor_parallel_size=int(os.environ.get("DET_MATRIX_TP", "1")),
        num_prompts=int(os.environ.get("DET_MATRIX_PROMPTS", str(matrix.NUM_PROMPTS))),
    )
    return result["cells"]


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("dimension", matrix.ALL_CELLS)
def test_serve_is_invariant(matrix_result, dimension):
    if dimension not in CELLS:
        pytest.skip(f"{dimension} not in DET_MATRIX_CELLS")
    for cell in (c for c in matrix_result if c["dimension"] == dimension):
        assert cell["errors"] == 0, cell
        assert cell["identical_fraction"] == 1.0, cell


@pytest.mark.gpu
@pytest.mark.slow
def test_serve_default_backend_differs(matrix_result):
    """The control: vLLM's default backend is not bit-identical in at least one cell (the
    comparison can fail). Each cell's default fraction is in the JSON."""
    if not DEFAULT_CELLS:
        pytest.skip("no control cells selected")
    defaults = [c["default_identical_fraction"] for c in matrix_result]
    assert any(f is not None and f < 1.0 for f in defaults), defaults
