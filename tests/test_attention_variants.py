"""Choosing the attention variant (DET_BACKEND_ATTENTION) and what each one refuses at
start-up; the pinned FA3 launch arguments. CPU only: FA3 itself runs in test_attention_fa3.py.
"""

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fake_config import fake_config

from det_backend import fa3, variants
from det_backend.config import DeterminismError, config_problems

SUPPORTED_LAYER = dict(
    head_size=128,
    alibi_slopes=None,
    sliding_window=None,
    logits_soft_cap=None,
    attn_type="decoder",
    sinks=None,
    kv_cache_dtype="auto",
)


@pytest.mark.parametrize(
    "value, expected",
    [(None, "triton"), ("", "triton"), ("fa3", "fa3"), (" FA3 ", "fa3"), ("Triton", "triton")],
)
def test_variant_read_from_environment(value, expected, monkeypatch):
    if value is None:
        monkeypatch.delenv(variants.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(variants.ENV_VAR, value)
    assert variants.read_variant() == expected


def test_unknown_variant_is_refused_everywhere():
    message = "'fa4' is not an attention variant"
    assert any(message in r for r in variants.layer_problems("fa4", **SUPPORTED_LAYER))
    assert any(message in r for r in variants.platform_problems("fa4"))


@pytest.mark.parametrize("variant", ["triton", "fa3", "flashinfer"])
def test_supported_layer_has_no_problem(variant):
    assert variants.layer_problems(variant, **SUPPORTED_LAYER) == []


@pytest.mark.parametrize(
    "variant, kwargs, message",
    [
        ("triton", {"head_size": 72}, "head_size=72"),
        ("triton", {"attn_type": "encoder_only"}, "attention type"),
        ("triton", {"kv_cache_dtype": "fp8"}, "kv_cache_dtype=fp8"),
        ("fa3", {"head_size": 192}, "head_size=192"),
        ("fa3", {"sliding_window": 4096}, "sliding window (4096): vLLM's FA3 starts"),
        ("fa3", {"alibi_slopes": [0.5]}, "ALiBi: FA3 has no ALiBi"),
        ("fa3", {"sinks": torch.ones(8)}, "attention sinks"),
        ("fa3", {"attn_type": "encoder_only"}, "attention type"),
        ("fa3", {"kv_cache_dtype": "fp8"}, "kv_cache_dtype=fp8"),
        ("flashinfer", {"head_size": 96}, "head_size=96"),
        ("flashinfer", {"sliding_window": 4096}, "sliding window (4096): FlashInfer starts"),
        ("flashinfer", {"logits_soft_cap": 30.0}, "softcap (30.0): FlashInfer takes softcap"),
        ("flashinfer", {"alibi_slopes": [0.5]}, "ALiBi"),
        ("flashinfer", {"sinks": torch.ones(8)}, "attention sinks"),
        ("flashinfer", {"attn_type": "encoder_decoder"}, "attention type"),
        ("flashinfer", {"kv_cache_dtype": "fp8"}, "kv_cache_dtype=fp8"),
    ],
)
def test_refusal_names_variant_and_feature(variant, kwargs, message):
    reasons = variants.layer_problems(variant, **{**SUPPORTED_LAYER, **kwargs})
    assert any(r.startswith(f"attention variant {variant}: ") and message in r for r in reasons)


@pytest.mark.parametrize("head_size", [64, 80, 96, 128, 256])
def test_fa3_takes_head_sizes_and_softcap(head_size):
    layer = {**SUPPORTED_LAYER, "head_size": head_size, "logits_soft_cap": 50.0}
    assert variants.layer_problems("fa3", **layer) == []


@pytest.mark.parametrize("head_size", [64, 80, 96, 128, 256])
def test_triton_takes_every_model_feature(head_size):
    layer = dict(
        SUPPORTED_LAYER, head_size=head_size, sliding_window=4096, logits_soft_cap=50.0,
        alibi_slopes=[0.5] * 8, sinks=torch.ones(8),
    )  # fmt: skip
    assert variants.layer_problems("triton", **layer) == []


def test_impl_passes_model_features_to_the_kernel(monkeypatch, device):
    """DetAttentionImpl.forward with a window, softcap, ALiBi and sinks gives the float64
    reference's numbers for them: every feature reaches the kernel."""
    from attention_inputs import alibi_slopes, make_batch, reference

    from det_backend import backend

    monkeypatch.delenv(variants.ENV_VAR, raising=False)
    monkeypatch.setattr(backend.mode, "enable", lambda config: None)
    monkeypatch.setattr(backend, "get_current_vllm_config", lambda: None)
    specs = [(1, 150), (20, 120)]
    batch = make_batch(specs, 4, 2, 64, torch.float16, device, seed=3)
    sinks = torch.tensor([2.0, -1.0, 4.0, 0.5], device=device)
    slopes = alibi_slopes(4)
    impl = backend.DetAttentionImpl(
        num_heads=4, head_size=64, scale=batch.scale, num_kv_heads=2,
        alibi_slopes=slopes.tolist(), sliding_window=50, logits_soft_cap=2.0, sinks=sinks,
    )  # fmt: skip
    # The impl reads the cache as vLLM hands it over: [blocks, kv_heads, block_size, 2 * D].
    kv_cache = torch.cat([batch.key_cache, batch.value_cache], -1).transpose(1, 2)
    cu, seq_lens = batch.metadata()
    n = sum(s[0] for s in specs)
    meta = backend.DetAttentionMetadata(
        num_actual_tokens=n, max_query_len=20, max_seq_len=150, query_start_loc=cu,
        seq_lens=seq_lens, block_table=batch.block_table, slot_mapping=None, max_num_segments=1,
    )  # fmt: skip
    out = torch.empty(n, 4, 64, dtype=torch.float16, device=device)
    impl.forward(None, batch.q, None, None, kv_cache, meta, out)
    features = dict(sliding_window=50, softcap=2.0, alibi_slopes=slopes.to(device), sinks=sinks)
    tol = 8 * torch.finfo(torch.float16).eps
    torch.testing.assert_close(out.double(), reference(batch, **features), atol=tol, rtol=0)


def test_fa3_needs_a_hopper_gpu(monkeypatch):
    reasons = variants.platform_problems("fa3")
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9:
        assert reasons == []
    else:
        assert reasons and all(r.startswith("attention variant fa3: ") for r in reasons)
    monkeypatch.setenv(variants.ENV_VAR, "fa3")
    monkeypatch.delenv("VLLM_BATCH_INVARIANT", raising=False)
    assert set(reasons) <= set(config_problems(fake_config()))


def test_impl_refuses_variant_feature_at_construction(monkeypatch):
    from det_backend.backend import DetAttentionImpl

    monkeypatch.setenv(variants.ENV_VAR, "fa3")
    with pytest.raises(DeterminismError, match=r"attention variant fa3: sliding window \(512\)"):
        DetAttentionImpl(num_heads=8, head_size=128, scale=0.1, num_kv_heads=2, sliding_window=512)
    monkeypatch.setenv(variants.ENV_VAR, "flashinfer")
    with pytest.raises(DeterminismError, match=r"attention variant flashinfer: sliding window"):
        DetAttentionImpl(num_heads=8, head_size=128, scale=0.1, num_kv_heads=2, sliding_window=64)


def test_backend_sizes_follow_the_variant(monkeypatch):
    """With fa3, vLLM splits a large cache block into kernel blocks FA3 never reads via TMA."""
    from vllm.v1.worker.utils import select_common_block_size

    from det_backend.backend import DetAttentionBackend

    monkeypatch.setenv(variants.ENV_VAR, "fa3")
    assert DetAttentionBackend.get_supported_kernel_block_sizes() == [16, 32, 64]
    assert select_common_block_size(16, [DetAttentionBackend]) == 16
    assert select_common_block_size(128, [DetAttentionBackend]) == 64
    assert DetAttentionBackend.supports_block_size(256)
    assert 192 not in DetAttentionBackend.get_supported_head_sizes()
    monkeypatch.setenv(variants.ENV_VAR, "triton")
    assert select_common_block_size(128, [DetAttentionBackend]) == 128
    assert 80 in DetAttentionBackend.get_supported_head_sizes()


@pytest.mark.parametrize("g", [1, 2, 4, 5, 8, 16, 64])
@pytest.mark.parametrize("head_size", fa3.SUPPORTED_HEAD_SIZES)
def test_pinned_max_seqlen_q_picks_the_prefill_kernel(g, head_size):
    # heuristics.h use_one_mma_wg: max_seqlen_q * G <= 64; flash_api.cpp drops causal at 1.
    # Both only matter at 64 and 256; elsewhere the batch's own max_seqlen_q goes through.
    assert set(fa3.PINNED_HEAD_SIZES) == {64, 256}
    for max_query_len in (1, 2, 16, 64, 65, 4096):
        pinned = fa3.pinned_max_seqlen_q(max_query_len, 8 * g, 8, head_size)
        if head_size not in fa3.PINNED_HEAD_SIZES:
            assert pinned == max_query_len
            continue
        assert pinned >= max_query_len and pinned > 1
        assert pinned * g > fa3.ONE_MMA_WG_MAX_ROWS
        if max_query_len * g > fa3.ONE_MMA_WG_MAX_ROWS:
            assert pinned == max_query_len


def test_fa3_block_sizes_stay_below_every_kblockn():
    # tile_size.h tile_size_fwd_sm90, 16-bit, causal, not local: kBlockN 128 (hdim 64, 128),
    # 128/144 (96), 80 (256). A page size that is a multiple of kBlockN enables TMA paged KV.
    assert max(fa3.BLOCK_SIZES) == fa3.MAX_BLOCK_SIZE < 80


def _inputs(block_size=16, head_size=128, dtype=torch.bfloat16, q_heads=8):
    q = torch.zeros(3, q_heads, head_size, dtype=dtype)
    cache = torch.zeros(4, block_size, 2, head_size, dtype=dtype)
    meta = SimpleNamespace(
        cu=torch.tensor([0, 3], dtype=torch.int32),
        seq_lens=torch.tensor([3], dtype=torch.int32),
        table=torch.zeros(1, 4, dtype=torch.int32),
    )
    return q, cache, meta


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"block_size": 128}, "block_size=128 > 64"),
        ({"head_size": 192}, "head_size=192"),
        ({"q_heads": 7}, "not a multiple"),
    ],
)
def test_fa3_launcher_rejects_before_calling_fa3(overrides, message):
    q, cache, m = _inputs(**overrides)
    with pytest.raises(ValueError, match=message):
        fa3.fa3_paged_attention(q, cache, cache, q.clone(), m.cu, m.seq_lens, m.table, 0.1, 3, 3)
    with pytest.raises(ValueError, match="share one dtype"):
        q, cache, m = _inputs()
        out = q.float()
        fa3.fa3_paged_attention(q, cache, cache, out, m.cu, m.seq_lens, m.table, 0.1, 3, 3)


# The default with DET_BACKEND_ATTENTION unset (variants.default_for, export_default).
CONFIGS = Path(__file__).resolve().parents[1] / "det_backend" / "configs"


def _model_config(tmp_path, name: str):
    """vLLM's own ModelConfig of a bundled config.json (no weights, no tokenizer: CPU only)."""
    from vllm.config import ModelConfig

    (tmp_path / "config.json").write_text((CONFIGS / f"{name}.json").read_text())
    return ModelConfig(model=str(tmp_path), skip_tokenizer_init=True)


def _fa3_platform(monkeypatch, problems: list[str]) -> None:
    # The platform check answers `problems` for fa3 whatever this machine has; the real one
    # for every other variant.
    real = variants.platform_problems
    monkeypatch.setattr(
        variants, "platform_problems", lambda v: problems if v == "fa3" else real(v)
    )


@pytest.fixture
def fa3_runs_here(monkeypatch):
    """The platform check of a Hopper GPU with vLLM's FA3 (this machine has neither)."""
    _fa3_platform(monkeypatch, [])


def test_unset_default_is_fa3_where_it_runs_and_carries_the_model(tmp_path, fa3_runs_here):
    features = variants.model_layer_features(_model_config(tmp_path, "llama-3-8b"))
    assert features == SUPPORTED_LAYER
    assert variants.default_for(features) == ("fa3", [])


@pytest.fixture
def fa3_missing(monkeypatch):
    """The platform check where vLLM's FA3 extension does not load (as on a CPU machine; on a
    Hopper GPU it loads, so the test fakes its absence there too)."""
    problem = "attention variant fa3: vLLM's FlashAttention-3 extension does not load (faked)"
    _fa3_platform(monkeypatch, [problem])


def test_unset_default_is_triton_without_fa3_and_says_why(tmp_path, fa3_missing):
    features = variants.model_layer_features(_model_config(tmp_path, "llama-3-8b"))
    variant, passed_over = variants.default_for(features)
    assert variant == "triton"
    assert passed_over and all(r.startswith("attention variant fa3") for r in passed_over)


def test_unset_default_is_triton_for_a_sliding_window_model(tmp_path, fa3_runs_here):
    features = variants.model_layer_features(_model_config(tmp_path, "mistral-sw-4l"))
    assert features["sliding_window"] == 256
    variant, passed_over = variants.default_for(features)
    assert variant == "triton"
    assert any("fa3: sliding window (256)" in r for r in passed_over), passed_over


def _fake_model_config(model_type: str = "llama", **hf):
    text = SimpleNamespace(**hf)
    return SimpleNamespace(
        hf_text_config=text,
        hf_config=SimpleNamespace(model_type=model_type),
        disable_sliding_window=False,
        get_sliding_window=lambda: getattr(text, "sliding_window", None),
        get_head_size=lambda: 128,
        is_encoder_decoder=False,
    )


@pytest.mark.parametrize(
    "model_type, hf, feature",
    [
        ("bloom", {}, "ALiBi"),
        ("mpt", {"attn_config": {"alibi": True}}, "ALiBi"),
        ("falcon", {"alibi": True}, "ALiBi"),
        ("jais", {"position_embedding_type": "alibi"}, "ALiBi"),
        ("gpt_oss", {}, "attention sinks"),
        ("gemma3", {"layer_types": ["sliding_attention", "full_attention"]}, "sliding window"),
    ],
)
def test_unset_default_passes_fa3_over_for_features_it_refuses(
    model_type, hf, feature, fa3_runs_here
):
    features = variants.model_layer_features(_fake_model_config(model_type, **hf))
    variant, passed_over = variants.default_for(features)
    assert variant == "triton"
    assert any(f"fa3: {feature}" in r for r in passed_over), passed_over


def test_tp_invariant_mode_keeps_the_default_on_triton(tmp_path, fa3_runs_here):
    features = variants.model_layer_features(_model_config(tmp_path, "llama-3-8b"))
    variant, passed_over = variants.default_for(features, tp_invariant=True)
    assert variant == "triton"
    assert any("DET_BACKEND_TP_INVARIANT=1" in r for r in passed_over), passed_over


def test_softcap_alone_keeps_fa3(fa3_runs_here):
    features = variants.model_layer_features(_fake_model_config(attn_logit_softcapping=50.0))
    assert variants.default_for(features) == ("fa3", [])


@pytest.fixture
def wrapped_config_build(monkeypatch, tmp_path):
    """create_engine_config building a real ModelConfig (Llama-3-8B's config.json) under our
    wrapper; DET_BACKEND_ATTENTION unset; everything restored afterwards."""
    from det_backend.patches import tensor_parallel
    from vllm.engine.arg_utils import EngineArgs

    model_config = _model_config(tmp_path, "llama-3-8b")
    built = SimpleNamespace(
        model_config=model_config, cache_config=SimpleNamespace(cache_dtype="auto")
    )
    monkeypatch.setattr(EngineArgs, "create_engine_config", lambda self, *a, **k: built)
    monkeypatch.setattr(tensor_parallel, "_original_create_engine_config", None)
    # Unset as the wrapper reads it (""), and recorded, so that the value the wrapper writes
    # is removed afterwards (delenv of an absent variable records nothing to undo).
    monkeypatch.setenv(variants.ENV_VAR, "")
    tensor_parallel.apply()
    return built


@pytest.mark.parametrize(
    "backend, set_to, expected",
    [("CUSTOM", None, "fa3"), ("CUSTOM", "triton", "triton"), ("FLASH_ATTN", None, None)],
)
def test_engine_build_exports_the_default_for_our_backend_only(
    backend, set_to, expected, wrapped_config_build, fa3_runs_here, monkeypatch
):
    from vllm.engine.arg_utils import EngineArgs

    if set_to is not None:
        monkeypatch.setenv(variants.ENV_VAR, set_to)
    args = EngineArgs(model="unused-model-dir", attention_backend=backend)
    assert args.create_engine_config() is wrapped_config_build
    # Exported before the engine processes start, so each of them reads the same variant.
    assert (os.environ.get(variants.ENV_VAR) or None) == expected


# A fresh interpreter: vLLM binds its platform at first import, and the build needs its CPU one.
REAL_BUILD = """
import os, sys
import vllm.platforms
from vllm.platforms.cpu import CpuPlatform
vllm.platforms._current_platform = CpuPlatform()  # this machine has no GPU
from det_backend import register, variants
real = variants.platform_problems
variants.platform_problems = lambda v: [] if v == "fa3" else real(v)  # as on a Hopper GPU
register()  # installs the create_engine_config wrapper, as vLLM's plugin loader does
from vllm.engine.arg_utils import EngineArgs
EngineArgs(
    model=sys.argv[1], attention_backend="CUSTOM", skip_tokenizer_init=True, load_format="dummy"
).create_engine_config()
print("VARIANT", os.environ[variants.ENV_VAR])
"""


@pytest.mark.parametrize("config, expected", [("llama-3-8b", "fa3"), ("mistral-sw-4l", "triton")])
def test_real_engine_config_build_exports_the_default(config, expected, tmp_path):
    """vLLM's whole EngineArgs.create_engine_config under the wrapper register() installs:
    DET_BACKEND_ATTENTION comes out set, for the engine processes to inherit."""
    import subprocess
    import sys

    (tmp_path / "config.json").write_text((CONFIGS / f"{config}.json").read_text())
    env = {k: v for k, v in os.environ.items() if k != variants.ENV_VAR}
    done = subprocess.run(
        [sys.executable, "-c", REAL_BUILD, str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert f"VARIANT {expected}" in done.stdout, done.stderr[-3000:]
