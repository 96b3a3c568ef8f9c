"""The plugin as vLLM sees it: entry point, registration, start-up refusals, patches.

These run on the CPU with a real vLLM 0.26 import; nothing here needs a GPU.
"""

import importlib.metadata
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
from fake_config import fake_config

from det_backend.config import DeterminismError, check_vllm_version, config_problems
from det_backend.variants import layer_problems


def _run_isolated(code: str) -> str:
    """Patches are process-wide: exercise them in a fresh interpreter."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "TRITON_INTERPRET": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_entry_point_is_declared():
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    ours = [ep for ep in eps if ep.name == "det_backend"]
    assert len(ours) == 1
    assert ours[0].value == "det_backend:register"


def test_vllm_plugin_loader_registers_backend_and_changes_nothing_else():
    out = _run_isolated(
        """
        from vllm.model_executor.layers.linear import UnquantizedLinearMethod
        original_apply = UnquantizedLinearMethod.apply
        from vllm.plugins import load_general_plugins
        load_general_plugins()
        load_general_plugins()  # vLLM calls it in several places: must be idempotent
        import det_backend
        det_backend.register()
        from vllm.v1.attention.backends.registry import AttentionBackendEnum
        from vllm import ir
        assert AttentionBackendEnum.CUSTOM.get_path() == det_backend.BACKEND_CLASS_PATH
        cls = AttentionBackendEnum.CUSTOM.get_class()
        from det_backend.backend import DetAttentionBackend
        assert cls is DetAttentionBackend
        assert cls.get_name() == "CUSTOM"
        assert AttentionBackendEnum[cls.get_name()] is AttentionBackendEnum.CUSTOM
        # Registered but not selected: no vLLM behaviour changed.
        assert UnquantizedLinearMethod.apply is original_apply
        assert "det" not in ir.ops.rms_norm.impls
        print("ok")
        """
    )
    assert out.strip().endswith("ok")


def test_attention_backend_cli_values_are_accepted():
    out = _run_isolated(
        """
        from vllm.config.attention import AttentionConfig
        from vllm.plugins import load_general_plugins
        from vllm.v1.attention.backends.registry import AttentionBackendEnum
        load_general_plugins()
        for value in ("CUSTOM", "custom", "DETERMINISTIC", "deterministic"):
            assert AttentionConfig.validate_backend_before(value) is AttentionBackendEnum.CUSTOM
        cfg = AttentionConfig(backend="deterministic")
        assert cfg.backend is AttentionBackendEnum.CUSTOM
        # The alias adds a name and changes nothing else.
        assert AttentionBackendEnum["FLASH_ATTN"] is AttentionBackendEnum.FLASH_ATTN
        try:
            AttentionBackendEnum["NOPE"]
        except ValueError as e:
            assert "Unknown attention backend: 'NOPE'" in str(e)
        else:
            raise AssertionError("unknown name accepted")
        print("ok")
        """
    )
    assert out.strip().endswith("ok")


def test_version_guard_names_the_version():
    check_vllm_version("0.26.0")
    with pytest.raises(DeterminismError, match=r"vLLM 0\.25\.1 is not a version"):
        check_vllm_version("0.25.1")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model": {"dtype": torch.float32}}, "dtype torch.float32"),
        ({"model": {"quantization": "fp8", "is_quantized": True}}, "quantized weights"),
        ({"model": {"use_mla": True}}, "MLA"),
        ({"model": {"is_moe": True}, "moe_backend": "flashinfer_cutlass"}, "moe_backend="),
        ({"model": {"is_moe": True}, "parallel": {"enable_eplb": True}}, "EPLB"),
        (
            {"model": {"is_moe": True, "enable_return_routed_experts": True}},
            "enable_return_routed_experts",
        ),
        ({"model": {"architectures": ["DeepseekV3ForCausalLM"]}}, "DeepseekV3ForCausalLM"),
        ({"model": {"is_encoder_decoder": True}}, "encoder-decoder"),
        ({"model": {"architectures": ["Gemma2ForCausalLM"]}}, "Gemma2ForCausalLM: its GemmaRMS"),
        ({"model": {"architectures": ["BloomForCausalLM"]}}, "BloomForCausalLM: its LayerNorm"),
        ({"speculative_config": object()}, "speculative decoding"),
        ({"parallel": {"tensor_parallel_size": 4}}, "tensor_parallel_size=4"),
        ({"parallel": {"data_parallel_size": 2}}, "data_parallel_size=2"),
        ({"parallel": {"enable_expert_parallel": True}}, "enable_expert_parallel"),
        ({"parallel": {"pipeline_parallel_size": 2}}, "pipeline_parallel_size=2"),
        ({"cache_dtype": "fp8"}, "kv_cache_dtype=fp8"),
    ],
)
def test_config_refusals_name_the_cause(overrides, message, monkeypatch):
    monkeypatch.delenv("VLLM_BATCH_INVARIANT", raising=False)
    reasons = config_problems(fake_config(**overrides))
    assert any(message in r for r in reasons), reasons
    with pytest.raises(DeterminismError, match=message.split("=")[0]):
        raise DeterminismError(reasons)


def test_config_refuses_vllm_batch_invariant_env(monkeypatch):
    monkeypatch.setenv("VLLM_BATCH_INVARIANT", "1")
    assert any("VLLM_BATCH_INVARIANT" in r for r in config_problems(fake_config()))


def test_supported_config_has_only_the_platform_problem(monkeypatch):
    # On this CPU-only machine the one problem left is the missing CUDA GPU.
    monkeypatch.delenv("VLLM_BATCH_INVARIANT", raising=False)
    monkeypatch.delenv("DET_BACKEND_ATTENTION", raising=False)
    reasons = config_problems(fake_config())
    assert len(reasons) == (0 if torch.cuda.is_available() else 1), reasons


@pytest.mark.parametrize("arch", ["MistralForCausalLM", "Phi3ForCausalLM"])
def test_sliding_window_architectures_are_supported(arch, monkeypatch):
    # Their window (and Phi-3's head_size 96) is the attention layer's: see test_attention.
    monkeypatch.delenv("VLLM_BATCH_INVARIANT", raising=False)
    monkeypatch.delenv("DET_BACKEND_ATTENTION", raising=False)
    reasons = config_problems(fake_config(model={"architectures": [arch]}))
    assert not any(arch in r for r in reasons), reasons


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"head_size": 72}, "head_size=72"),
        ({"attn_type": "encoder_only"}, "attention type"),
        ({"kv_cache_dtype": "fp8"}, "kv_cache_dtype=fp8"),
    ],
)
def test_layer_refusals_name_the_cause(kwargs, message):
    args = dict(
        head_size=128,
        alibi_slopes=None,
        sliding_window=None,
        logits_soft_cap=None,
        attn_type="decoder",
        sinks=None,
        kv_cache_dtype="auto",
    )
    assert layer_problems("triton", **args) == []
    args.update(kwargs)
    assert any(message in r for r in layer_problems("triton", **args))


def test_impl_refuses_unsupported_layer_before_patching(monkeypatch):
    from det_backend.backend import DetAttentionImpl

    monkeypatch.delenv("DET_BACKEND_ATTENTION", raising=False)
    with pytest.raises(DeterminismError, match="head_size=72"):
        DetAttentionImpl(num_heads=8, head_size=72, scale=0.1, num_kv_heads=8)


def test_builder_bounds_segments_by_max_seq_len_except_for_full_graphs():
    """Eager steps size the attention grid from max_seq_len; a full CUDA graph's capture, and
    the V1 runner's eager warm-up of it (decode, seq_lens of 1, build()), from max_model_len,
    so that the warm-up compiles and loads exactly what the capture launches."""
    from vllm.config import CUDAGraphMode

    from det_backend.backend import DetAttentionMetadataBuilder

    builder = object.__new__(DetAttentionMetadataBuilder)  # the bound needs no vLLM engine
    compilation = SimpleNamespace(
        cudagraph_mode=CUDAGraphMode.FULL_AND_PIECEWISE, max_cudagraph_capture_size=512
    )
    builder.vllm_config = SimpleNamespace(compilation_config=compilation)
    builder.max_num_segments = 64  # max_model_len 32768
    builder.launch_decodes_apart = True

    def bound(num_tokens, max_query_len, max_seq_len, capture=False) -> int:
        cm = SimpleNamespace(
            num_reqs=1,
            num_actual_tokens=num_tokens,
            max_query_len=max_query_len,
            max_seq_len=max_seq_len,
            query_start_loc=None,
            query_start_loc_cpu=torch.tensor([0, num_tokens], dtype=torch.int32),
            seq_lens=None,
            seq_lens_cpu_upper_bound=None,
            block_table_tensor=None,
            slot_mapping=None,
        )
        if capture:
            return builder.build_for_cudagraph_capture(cm).max_num_segments
        return builder.build(0, cm).max_num_segments

    assert bound(300, 200, 1500) == 3  # prefill and mixed: piecewise, attention eager
    assert bound(8, 1, 1) == bound(8, 1, 32768, capture=True) == 64  # V1 warm-up, capture
    assert bound(512, 1, 1) == 64
    assert bound(513, 1, 1000) == 2  # decode past the largest graph runs eagerly
    assert bound(8, 1, 0) == 64
    for mode in (CUDAGraphMode.PIECEWISE, CUDAGraphMode.NONE):
        compilation.cudagraph_mode = mode
        assert bound(8, 1, 1000) == 2
        assert bound(8, 1, 0) == 1  # an empty dummy batch still launches a valid grid
    assert bound(8, 1, 1000, capture=True) == 64


def _mixed_builder(launch_decodes_apart: bool = True):
    from vllm.config import CUDAGraphMode

    from det_backend.backend import DetAttentionMetadataBuilder

    builder = object.__new__(DetAttentionMetadataBuilder)  # no vLLM engine needed
    compilation = SimpleNamespace(
        cudagraph_mode=CUDAGraphMode.FULL_AND_PIECEWISE, max_cudagraph_capture_size=512
    )
    builder.vllm_config = SimpleNamespace(compilation_config=compilation)
    builder.max_num_segments = 64  # max_model_len 32768
    builder.launch_decodes_apart = launch_decodes_apart
    return builder


def _common_metadata(specs, pad_tokens=0, upper_bound=True, block_table=None, device="cpu"):
    """CommonAttentionMetadata's fields as vLLM fills them for (q_len, seq_len) requests in
    this order; pad_tokens past the last request (piecewise CUDA-graph padding)."""
    q_lens = torch.tensor([q for q, _ in specs], dtype=torch.int32)
    cu = torch.zeros(len(specs) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(q_lens, 0)
    seq_lens = torch.tensor([s for _, s in specs], dtype=torch.int32)
    return SimpleNamespace(
        num_reqs=len(specs),
        num_actual_tokens=int(cu[-1]) + pad_tokens,
        max_query_len=int(q_lens.max()),
        max_seq_len=int(seq_lens.max()),
        query_start_loc=cu.to(device),
        query_start_loc_cpu=cu,
        seq_lens=seq_lens.to(device),
        seq_lens_cpu_upper_bound=seq_lens if upper_bound else None,
        block_table_tensor=block_table,
        slot_mapping=None,
    )


def test_builder_launches_mixed_batch_decodes_apart():
    """A mixed batch, decodes first (as vLLM orders it: reorder_batch_threshold), gets its
    decodes as a part of their own with their own bound, from host data; everything else
    stays one launch: pure decode (so full CUDA graphs), pure prefill, a decode that comes
    after a prefill, the fa3 variant and CUDA-graph capture."""
    from det_backend.backend import DetAttentionMetadataBuilder

    assert DetAttentionMetadataBuilder.reorder_batch_threshold == 1
    builder = _mixed_builder()
    # Decodes up to 1025 positions (3 segments of 512), prefills up to 2000 (4), padding.
    mixed = [(1, 100), (1, 1025), (1, 700), (200, 2000), (50, 50), (0, 0)]
    md = builder.build(0, _common_metadata(mixed, pad_tokens=5))
    d = md.decodes
    assert (d.num_decodes, d.num_decode_tokens, d.max_query_len) == (3, 3, 1)
    assert (d.max_num_segments, md.max_num_segments, md.max_query_len) == (3, 4, 200)
    assert d.prefill_query_start_loc.tolist() == [0, 200, 250, 250]
    # Without the host upper bound both parts take the batch's max_seq_len.
    md = builder.build(0, _common_metadata(mixed, upper_bound=False))
    assert (md.decodes.max_num_segments, md.max_num_segments) == (4, 4)

    for specs in ([(1, 100), (1, 1025)], [(200, 2000), (50, 50)], [(200, 2000), (1, 100)]):
        md = builder.build(0, _common_metadata(specs))
        assert md.decodes is None, specs
        assert md.max_num_segments == (64 if specs[0][0] == 1 else 4), specs
    assert _mixed_builder(False).build(0, _common_metadata(mixed)).decodes is None
    assert builder.build_for_cudagraph_capture(_common_metadata(mixed)).decodes is None


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")  # interpreter
def test_impl_forward_mixed_batch_equals_one_launch(device):
    """DetAttentionImpl.forward on the builder's metadata for a mixed batch (two launches)
    gives the bits of one launch, and leaves the padding rows alone."""
    import dataclasses

    from det_backend.backend import DetAttentionImpl

    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, head_size, block_size = 4, 2, 64, 16
    specs = [(1, 40), (1, 90), (70, 100), (20, 20), (0, 0)]
    pad = 3
    num_blocks = sum(-(-s // block_size) for _, s in specs) + 2
    kv_cache = torch.randn(num_blocks, kv_heads, block_size, 2 * head_size, generator=gen)
    kv_cache = kv_cache.half().to(device)  # vLLM's layout: [blocks, kv_heads, slot, K | V]
    # Requests may share blocks: the cache is only read.
    block_table = torch.randint(0, num_blocks, (len(specs), 7), generator=gen)
    cm = _common_metadata(specs, pad, block_table=block_table.int().to(device), device=device)
    md = _mixed_builder().build(0, cm)
    assert md.decodes is not None and md.decodes.num_decodes == 2
    one = dataclasses.replace(md, decodes=None, max_num_segments=64)
    impl = object.__new__(DetAttentionImpl)
    impl.variant, impl.head_size, impl.scale = "triton", head_size, head_size**-0.5
    # No attention features: what __init__ sets for a plain Llama layer.
    impl.sliding_window, impl.logits_soft_cap, impl.alibi_slopes, impl.sinks = None, 0.0, None, None
    query = torch.randn(cm.num_actual_tokens, heads, head_size, generator=gen).half().to(device)
    outs = []
    for metadata in (md, one):
        out = torch.full_like(query, float("nan"))
        impl.forward(None, query, None, None, kv_cache, metadata, out)
        outs.append(out)
    n = int(cm.query_start_loc_cpu[-1])
    assert torch.equal(outs[0][:n], outs[1][:n]) and not outs[0][:n].isnan().any()
    assert outs[0][n:].isnan().all()


def test_backend_validate_configuration_rejects_what_vllm_checks(monkeypatch):
    from det_backend.backend import DetAttentionBackend

    monkeypatch.delenv("DET_BACKEND_ATTENTION", raising=False)
    common = dict(
        kv_cache_dtype="auto",
        block_size=16,
        use_mla=False,
        has_sink=False,
        use_sparse=False,
        use_mm_prefix=False,
        use_per_head_quant_scales=False,
        device_capability=None,
        attn_type="decoder",
        has_sliding_window=False,
        use_non_causal=False,
        use_batch_invariant=True,
        use_kv_connector=False,
        use_pcp=False,
    )
    ok = DetAttentionBackend.validate_configuration(head_size=128, dtype=torch.bfloat16, **common)
    assert ok == []
    bad = DetAttentionBackend.validate_configuration(head_size=72, dtype=torch.float32, **common)
    assert len(bad) >= 2
    # Sinks and sliding windows pass vLLM's check: the impl decides per variant.
    features = dict(common, has_sink=True, has_sliding_window=True)
    assert (
        DetAttentionBackend.validate_configuration(head_size=96, dtype=torch.float16, **features)
        == []
    )


def test_patches_route_linear_and_rms_norm_through_our_kernels():
    out = _run_isolated(
        """
        import torch
        from det_backend import patches
        from det_backend.patches import custom_ops, linear, logits, moe, rms_norm
        from det_backend.kernels.matmul import matmul
        from det_backend.kernels.rms_norm import rms_norm as det_rms_norm
        assert patches.problems() != []
        for p in (custom_ops, linear, logits, rms_norm, moe):
            p.apply(); p.apply()  # idempotent
        for p in (custom_ops, linear, logits, rms_norm, moe):
            assert p.problems() == [], p.problems()

        from vllm.model_executor.layers.linear import UnquantizedLinearMethod
        from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod
        from vllm import ir
        g = torch.Generator().manual_seed(0)
        x = torch.randn(5, 64, generator=g).half()
        layer = torch.nn.Module()
        w = (torch.randn(32, 64, generator=g) * 0.1).half()
        layer.weight = torch.nn.Parameter(w, requires_grad=False)
        bias = torch.randn(32, generator=g).half()
        for method in (UnquantizedLinearMethod(), UnquantizedEmbeddingMethod()):
            assert torch.equal(method.apply(layer, x, bias), matmul(x, layer.weight, bias))
        w = torch.randn(64, generator=g).half()
        assert torch.equal(ir.ops.rms_norm(x, w, 1e-5), det_rms_norm(x, w, 1e-5))
        out, res = ir.ops.fused_add_rms_norm(x, x.clone(), w, 1e-5)
        assert torch.equal(res, (x.float() * 2).half())
        print("ok")
        """
    )
    assert out.strip().endswith("ok")


def test_fingerprint_names_the_code():
    from det_backend import __version__
    from det_backend.fingerprint import fingerprint, fingerprint_string, kernel_hash

    info = fingerprint("torch.bfloat16", "NVIDIA H200")
    assert info["det_backend"] == __version__
    assert info["kernels"] == kernel_hash() and len(kernel_hash()) == 12
    assert info["dtype"] == "bfloat16" and info["gpu"] == "NVIDIA H200"
    assert fingerprint_string() == f"det-{__version__}-{kernel_hash()}"


def test_cli_prints_fingerprint_and_usage(capsys):
    from det_backend.cli import cli
    from det_backend.fingerprint import fingerprint_string

    assert cli(["fingerprint"]) == 0
    assert capsys.readouterr().out.strip() == fingerprint_string()
    assert cli([]) == 2
    assert "det-backend {drift,matrix,fingerprint}" in capsys.readouterr().err


def test_mode_logs_the_fingerprint(caplog):
    from det_backend import mode
    from det_backend.fingerprint import kernel_hash

    config = SimpleNamespace(model_config=SimpleNamespace(dtype=torch.bfloat16))
    with caplog.at_level("INFO"):
        mode._log_fingerprint(config)
    assert kernel_hash() in caplog.text or kernel_hash() in str(caplog.records)
