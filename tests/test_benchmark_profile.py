"""benchmarks/profile_e2e.py (where the end-to-end time goes) and the profile plumbing of
det_backend.demo.run_backends, on the CPU with a fake engine (no GPU, no vLLM engine)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

import profile_e2e  # noqa: E402

from det_backend import demo  # noqa: E402


@pytest.mark.parametrize(
    "name, label",
    [
        ("_matmul_kernel", "gemm"),
        ("_matmul_tma_kernel", "gemm"),
        ("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNT", "gemm"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "gemm"),
        ("void cutlass::device_kernel<flash::enable_sm90_or_later<flash::FlashAttnFwdSm90<"
         "flash::CollectiveMainloopFwdSm90<2, cute::tuple<>>>>>(...)", "attention"),
        ("_paged_attention_kernel", "attention"),
        ("_merge_segments_kernel", "attention"),
        ("void vllm::reshape_and_cache_flash_kernel<__nv_bfloat16>(...)", "kv_cache_write"),
        ("triton_per_fused_fused_add_rms_norm_0", "rms_norm"),
        ("_rms_norm_kernel", "rms_norm"),
        ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)",
         "all_reduce"),
        ("void vllm::cross_device_reduce_1stage<__nv_bfloat16, 2>(...)", "all_reduce"),
        ("triton_poi_fused_linear_mul_silu_slice_0", "activation"),
        ("_top_k_top_p_select_kernel", "sampling"),
        ("_topk_log_softmax_kernel", "sampling"),
        ("_moe_gemm_kernel", "moe"),
        ("triton_poi_fused_add_bitwise_and_embedding_0", "other"),
    ],
)  # fmt: skip
def test_kernel_names_fall_in_their_category(name, label):
    assert profile_e2e.category(name) == label


def test_compare_gives_per_category_ratios_and_shares_of_the_gap():
    default = {
        "backend": "default",
        "seconds": 2.0,
        "tokens": 100,
        "kernels": {"nvjet_a": [3000.0, 10], "flash_fwd": [1000.0, 5], "elementwise": [500.0, 7]},
    }
    det = {
        "backend": "det",
        "seconds": 2.5,
        "tokens": 100,
        "kernels": {"_matmul_kernel": [4000.0, 10], "_paged_attention_kernel": [1500.0, 5],
                    "elementwise": [500.0, 7], "_rms_norm_kernel": [100.0, 4]},
    }  # fmt: skip
    engines = profile_e2e.compare([default, det])
    assert engines["default"]["kernel_ms"] == pytest.approx(4.5)
    assert engines["det"]["kernel_ms"] == pytest.approx(6.1)
    assert engines["det"]["kernel_share_of_wall"] == pytest.approx(6.1 / 2500)
    vs = engines["det"]["vs_default"]
    assert vs["gemm"]["ratio_vs_default"] == pytest.approx(4 / 3)
    assert vs["gemm"]["gap_share"] == pytest.approx(1.0 / 1.6)
    assert vs["attention"]["gap_share"] == pytest.approx(0.5 / 1.6)
    assert vs["rms_norm"]["ratio_vs_default"] is None  # the default's norm is fused elsewhere
    assert sum(v["gap_share"] for v in vs.values()) == pytest.approx(1.0)
    assert engines["det"]["categories"]["gemm"]["top"] == [("_matmul_kernel", 4.0)]


def test_run_backends_profile_runs_the_engine_in_process_and_keeps_its_kernels(monkeypatch):
    seen = {}

    def fake_run(cmd, env, what):
        backend = cmd[cmd.index("--engine-worker") + 1]
        plan = json.loads(Path(cmd[cmd.index("--plan") + 1]).read_text())
        seen[backend] = (env.get("VLLM_ENABLE_V1_MULTIPROCESSING"), plan["profile"])
        w = plan["workloads"][0]
        profile = {"seconds": 1.0, "tokens": 8, "kernels": {f"{backend}_k": [10.0, 1]}}
        run = {"backend": backend, "profile": profile, "gpu": "G", "vllm": "0.26.0"}
        Path(cmd[cmd.index("--out") + 1]).write_text(json.dumps({w["name"]: run}))

    monkeypatch.setattr(demo, "run_engine_process", fake_run)
    w = demo.workload("prefill_mix", 4, 8, 0, 1000)
    result = demo.run_backends("small", [w], ("default", "det"), profile=True)
    assert seen == {"default": ("0", True), "det": ("0", True)}
    runs = result["workloads"]["prefill_mix"]["runs"]
    assert [r["kernels"] for r in runs] == [{"default_k": [10.0, 1]}, {"det_k": [10.0, 1]}]
    assert result["workloads"]["prefill_mix"]["num_prompts"] == 4
    with pytest.raises(ValueError, match="profile=True needs tensor_parallel_size=1"):
        demo.run_backends("small", [w], ("det",), profile=True, tensor_parallel_size=2)


def test_plot_stacks_each_engines_categories():
    pytest.importorskip("matplotlib")
    run = {"backend": "default", "seconds": 1.0, "tokens": 1, "kernels": {"nvjet": [5.0, 1]}}
    engines = profile_e2e.compare([run, {**run, "backend": "det"}])
    data = {"config": "c", "gpu": "g", "workloads": {"prefill_mix": {"engines": engines}}}
    fig = profile_e2e.plot(data)
    assert fig.axes[0].get_title() == "prefill_mix, c, g"


def test_idle_gaps_separate_launch_overhead_from_a_stall():
    from det_backend.demo import idle_gaps

    # Overlapping work (two streams), gaps of 50 us, 200 us and a 0.5 s stall, given unsorted.
    spans = [
        (0.0, 100.0, "a"),
        (50.0, 300.0, "b"),  # overlaps a: busy 0-300
        (350.0, 400.0, "c"),  # 50 us after b
        (600.0, 700.0, "d"),  # 200 us after c
        (500_700.0, 500_800.0, "jit"),  # 0.5 s after d
    ]
    idle = idle_gaps(list(reversed(spans)))
    assert idle["busy_ms"] == pytest.approx(0.55)
    assert idle["idle_ms"] == pytest.approx(500.25)
    by_size = idle["idle_ms_in_gaps_of_at_least_us"]
    assert by_size == pytest.approx({"100": 500.2, "1000": 500.0, "100000": 500.0})
    assert idle["longest"][0] == [500.0, "d", "jit"]
    assert [g[0] for g in idle["longest"]] == [500.0, 0.2, 0.05]
    assert idle_gaps([])["idle_ms"] == 0.0
