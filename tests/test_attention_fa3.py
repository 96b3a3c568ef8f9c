"""The fa3 attention variant (det_backend/fa3.py) on a Hopper GPU: accuracy against float64 and
bitwise invariance to the batch, to chunked prefill (many chunk sizes), to decode vs prefill
(a token recomputed as prefill after preemption), to the split count default FA3 would pick,
and to CUDA-graph capture with padding. Controls call FA3 the way vLLM does (default
num_splits, and VLLM_BATCH_INVARIANT's num_splits=1 without our max_seqlen_q pin) and must
show differences, or the equality tests could not fail.

Outputs are compared in the input dtype: FA3 writes only that.
"""

import math

import pytest
import torch
from attention_inputs import Batch, assert_rows_equal, join, make_batch, reference

from det_backend.fa3 import fa3_paged_attention

pytestmark = pytest.mark.gpu

TOL = {
    torch.float16: dict(atol=8 * torch.finfo(torch.float16).eps, rtol=0.0),
    torch.bfloat16: dict(atol=8 * torch.finfo(torch.bfloat16).eps, rtol=0.0),
}
# (q_len, seq_len): decode with long and short context, prefill with context, pure prefill,
# a short chunk with context; long enough for several kBlockN = 80..128 KV blocks.
MIXED = [(1, 1500), (300, 1700), (1, 37), (700, 700), (5, 900), (1, 4000)]
# (q heads, kv heads): MHA, GQA 4 (Llama-3-8B), GQA 8, MQA.
HEADS = [(8, 8), (32, 8), (16, 2), (8, 1)]


@pytest.fixture(autouse=True)
def _needs_fa3():
    from det_backend.variants import platform_problems

    problems = platform_problems("fa3")
    if problems:
        pytest.skip(problems[0])


def run(batch: Batch, softcap: float = 0.0) -> torch.Tensor:
    cu, seq_lens = batch.metadata()
    out = torch.full(batch.q.shape, float("nan"), dtype=batch.q.dtype, device=batch.q.device)
    return fa3_paged_attention(
        batch.q, batch.key_cache, batch.value_cache, out, cu, seq_lens, batch.block_table,
        batch.scale, max(s[0] for s in batch.specs), max(s[1] for s in batch.specs), softcap,
    )  # fmt: skip


def run_as_vllm(batch: Batch, num_splits: int) -> torch.Tensor:
    """FA3 as vLLM 0.26's FlashAttention backend calls it: num_splits 0 by default, 1 under
    VLLM_BATCH_INVARIANT; max_seqlen_q is the batch's own."""
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    cu, seq_lens = batch.metadata()
    out = torch.full(batch.q.shape, float("nan"), dtype=batch.q.dtype, device=batch.q.device)
    flash_attn_varlen_func(
        batch.q, batch.key_cache, batch.value_cache,
        max_seqlen_q=max(s[0] for s in batch.specs), cu_seqlens_q=cu,
        max_seqlen_k=max(s[1] for s in batch.specs), seqused_k=seq_lens,
        softmax_scale=batch.scale, causal=True, block_table=batch.block_table, out=out,
        num_splits=num_splits, fa_version=3,
    )  # fmt: skip
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_size", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("num_q_heads,num_kv_heads", HEADS)
def test_fa3_matches_float64(dtype, head_size, num_q_heads, num_kv_heads, device):
    batch = make_batch(MIXED, num_q_heads, num_kv_heads, head_size, dtype, device, pad=3)
    out = run(batch)
    n = sum(s[0] for s in MIXED)
    torch.testing.assert_close(out[:n].double(), reference(batch)[:n], **TOL[dtype])
    assert out[n:].isnan().all(), "padding rows were written"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_size", [64, 96, 128, 256])
@pytest.mark.parametrize("num_q_heads,num_kv_heads", HEADS)
@pytest.mark.parametrize("softcap", [0.0, 30.0])
def test_fa3_batch_invariant(dtype, head_size, num_q_heads, num_kv_heads, softcap, device):
    batch = make_batch(MIXED, num_q_heads, num_kv_heads, head_size, dtype, device, seed=1, pad=5)
    full = run(batch, softcap)
    for b in range(len(MIXED)):
        alone = run(batch.select(b), softcap)
        assert_rows_equal(alone, full[batch.token_rows(b)], f"request {b} alone vs in batch")
    bs = [5, 3, 0, 2]
    other = run(batch.subset(bs), softcap)
    expected = torch.cat([full[batch.token_rows(b)] for b in bs])
    assert_rows_equal(other, expected, f"requests {bs} as their own batch")


@pytest.mark.parametrize("head_size", [64, 128, 256])
@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(32, 8), (8, 8)])
def test_fa3_chunked_prefill_invariant(head_size, num_q_heads, num_kv_heads, device):
    """One 1100-token prompt with 300 tokens of context, prefilled in chunks of many sizes,
    alone and beside decodes of other requests."""
    specs = [(1100, 1400), (1, 3000), (1, 90)]
    batch = make_batch(specs, num_q_heads, num_kv_heads, head_size, torch.bfloat16, device, seed=2)
    full = run(batch.select(0))
    decodes = batch.subset([1, 2])
    for size in (1, 7, 16, 63, 64, 65, 100, 128, 333, 1099):
        for lo in range(0, 1100, size):
            rows = slice(lo, min(lo + size, 1100))
            chunk = batch.select(0, rows)
            assert_rows_equal(run(chunk), full[rows], f"chunk {rows} (size {size}) alone")
            if size in (7, 128, 333):
                mixed = run(join(decodes, chunk))[2:]
                assert_rows_equal(mixed, full[rows], f"chunk {rows} beside decodes")


@pytest.mark.parametrize("head_size", [64, 80, 128, 256])
@pytest.mark.parametrize("num_q_heads,num_kv_heads", HEADS)
def test_fa3_decode_equals_prefill(head_size, num_q_heads, num_kv_heads, device):
    """A token decoded (max_seqlen_q = 1, alone or in a decode batch) has the bits it gets when
    recomputed inside a prefill after preemption, so the KV it feeds later layers agrees."""
    specs = [(600, 900)] + [(1, n) for n in (2000, 50, 700, 1300)]
    batch = make_batch(specs, num_q_heads, num_kv_heads, head_size, torch.bfloat16, device, seed=3)
    prefill = run(batch.select(0))
    others = batch.subset([1, 2, 3, 4])
    for i in list(range(590, 600)) + [0, 1, 127, 128, 129]:
        token = batch.select(0, slice(i, i + 1))
        assert_rows_equal(run(token), prefill[i : i + 1], f"decode of token {i} alone")
        in_batch = run(join(others, token))[4:]
        assert_rows_equal(in_batch, prefill[i : i + 1], f"decode of token {i} in a batch of 5")


def test_fa3_invariant_where_default_fa3_splits(device):
    """A long-context decode alone (default FA3 splits its KV over many CTAs) and inside a
    batch of 128 decodes (fewer or no splits): same bits pinned; default FA3 differs."""
    specs = [(1, 16384)] + [(1, 1000 + 7 * i) for i in range(127)]
    batch = make_batch(specs, 32, 8, 128, torch.bfloat16, device, seed=4)
    alone, batched = run(batch.select(0)), run(batch)[:1]
    assert_rows_equal(alone, batched, "long decode alone vs in 128 decodes")
    default_alone = run_as_vllm(batch.select(0), num_splits=0)
    default_batched = run_as_vllm(batch, num_splits=0)[:1]
    torch.testing.assert_close(default_alone, default_batched, **TOL[torch.bfloat16])
    assert not torch.equal(default_alone, default_batched), (
        "default FA3 gave the same bits alone and batched: this control cannot tell"
    )


def test_vllm_batch_invariant_fa3_decode_depends_on_the_batch_at_head_size_64(device):
    """Why max_seqlen_q is pinned: vLLM's own VLLM_BATCH_INVARIANT call (num_splits=1) runs a
    decode-only batch through FA3's one-warpgroup kernel (kBlockN 192 at head_size 64) and a
    batch holding a prefill through the two-warpgroup one (kBlockN 128): a decoded token's bits
    depend on whether another request was prefilling in the same step, and differ from the
    same token recomputed in a prefill."""
    specs = [(600, 900), (300, 300)]
    batch = make_batch(specs, 32, 8, 64, torch.bfloat16, device, seed=5)
    tokens = range(400, 600)
    prefill = run_as_vllm(batch.select(0), num_splits=1)[400:600]
    other_prefill = batch.select(1)
    alone, beside = [], []
    for i in tokens:
        token = batch.select(0, slice(i, i + 1))
        alone.append(run_as_vllm(token, num_splits=1))
        beside.append(run_as_vllm(join(token, other_prefill), num_splits=1)[:1])
    alone, beside = torch.cat(alone), torch.cat(beside)
    torch.testing.assert_close(alone, prefill, **TOL[torch.bfloat16])
    assert torch.equal(beside, prefill), "same kernel (two warpgroups): same bits expected"
    assert not torch.equal(alone, beside), (
        "vLLM's batch-invariant FA3 call gave a decode the same bits alone and beside a "
        "prefill at head_size 64: the max_seqlen_q pin may not be needed (ATTENTION_VARIANTS.md)"
    )
    pinned = torch.cat([run(batch.select(0, slice(i, i + 1))) for i in tokens])
    assert_rows_equal(pinned, run(batch.select(0))[400:600], "pinned decode vs pinned prefill")


def fa3_kernel_names(fn) -> set[str]:
    """Names of the FA3 forward kernels one call of fn launches (torch profiler)."""
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.name for e in prof.events() if "FlashAttnFwdSm90" in e.name}


@pytest.mark.parametrize("num_q_heads,num_kv_heads", HEADS)
def test_fa3_one_warpgroup_kernel_gives_the_prefill_bits_at_head_size_128(
    num_q_heads, num_kv_heads, device
):
    """Why head_size 128 is not pinned: decode batches and small chunks (max_seqlen_q * G <=
    64) run FA3's one-warpgroup kernel, another instantiation than the prefill's (other kernel
    names, so the equality below is not one kernel compared with itself), with the same
    kBlockN 128, and it gives every row the prefill's bits."""
    specs = [(600, 900)] + [(1, n) for n in (2000, 50, 700, 1300)]
    batch = make_batch(specs, num_q_heads, num_kv_heads, 128, torch.bfloat16, device, seed=6)
    g = num_q_heads // num_kv_heads
    prefill = run(batch.select(0))
    others = batch.subset([1, 2, 3, 4])
    small = max(1, 64 // g)  # the largest chunk that still takes the one-warpgroup kernel
    token = batch.select(0, slice(590, 591))
    chunk = batch.select(0, slice(600 - small, 600))
    one_wg = fa3_kernel_names(lambda: run(token)) | fa3_kernel_names(lambda: run(chunk))
    two_wg = fa3_kernel_names(lambda: run(batch.select(0)))
    assert one_wg and two_wg and not (one_wg & two_wg), (one_wg, two_wg)
    for i in list(range(580, 600)) + [0, 1, 127, 128, 129, 300]:
        token = batch.select(0, slice(i, i + 1))
        assert_rows_equal(run(token), prefill[i : i + 1], f"decode of token {i} alone")
        in_batch = run(join(others, token))[4:]
        assert_rows_equal(in_batch, prefill[i : i + 1], f"decode of token {i} in a batch of 5")
    for lo in range(0, 600, small):
        rows = slice(lo, min(lo + small, 600))
        assert_rows_equal(run(batch.select(0, rows)), prefill[rows], f"chunk {rows}")


def test_fa3_zero_length_padding_requests(device):
    """Batch padding as vLLM's CUDA graphs produce it: trailing requests with no tokens and no
    KV, and q rows past the last request. Real rows keep their bits; padding is untouched."""
    specs = [(1, 700), (1, 90), (1, 3000)]
    batch = make_batch(specs + [(0, 0), (0, 0)], 32, 8, 128, torch.bfloat16, device, pad=4)
    out = run(batch)
    assert_rows_equal(out[:3], run(batch.subset([0, 1, 2]))[:3], "with vs without padding")
    assert out[3:].isnan().all(), "padding rows were written"


@pytest.mark.parametrize("head_size", [64, 128])
def test_fa3_cuda_graph_replay(head_size, device):
    """A decode step captured once replays other lengths and block tables (same shapes, padded
    q rows) with the bits of the eager call."""
    specs = [[(1, 4096), (1, 100), (1, 2000)], [(1, 100), (1, 2000), (1, 4096)]]
    batches = [
        make_batch(s, 32, 8, head_size, torch.bfloat16, device, seed=i, pad=5)
        for i, s in enumerate(specs)
    ]
    static = make_batch(specs[0], 32, 8, head_size, torch.bfloat16, device, seed=9, pad=5)
    cu, seq_lens = static.metadata()
    out = torch.full_like(static.q, float("nan"))

    def call():
        fa3_paged_attention(
            static.q, static.key_cache, static.value_cache, out, cu, seq_lens,
            static.block_table, static.scale, 1, 4096,
        )  # fmt: skip

    call()  # first launch outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    for i, batch in enumerate(batches):
        sources = (batch.q, batch.key_cache, batch.value_cache, batch.block_table)
        targets = (static.q, static.key_cache, static.value_cache, static.block_table)
        for dst, src in zip(targets + (cu, seq_lens), sources + batch.metadata(), strict=True):
            dst.copy_(src)
        out.fill_(float("nan"))
        graph.replay()
        assert_rows_equal(out[:3], run(batch)[:3], f"graph replay of batch {i}")
        assert out[3:].isnan().all(), "padding rows were written"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fa3_invariant_real_shapes(dtype, device):
    """32 q heads / 8 kv heads, head 128, block_size 16: a decode batch of 64 (contexts up to
    4096) plus prefills of 512-2048 tokens, some with context."""
    gen = torch.Generator().manual_seed(4)
    decode = [(1, int(n)) for n in torch.randint(1, 4097, (64,), generator=gen)]
    prefill = [(512, 512), (2048, 3000), (1024, 4096), (700, 1500)]
    specs = decode + prefill
    batch = make_batch(specs, 32, 8, 128, dtype, device, seed=5, pad=7)
    full = run(batch)
    n = sum(s[0] for s in specs)
    for b in (0, 1, 64, 65):
        rows = batch.token_rows(b)
        torch.testing.assert_close(full[rows].double(), reference(batch.select(b)), **TOL[dtype])
    for b in range(len(specs)):
        assert_rows_equal(run(batch.select(b)), full[batch.token_rows(b)], f"request {b} alone")
    bs = list(range(len(specs) - 1, -1, -2))
    expected = torch.cat([full[batch.token_rows(b)] for b in bs])
    assert_rows_equal(run(batch.subset(bs)), expected, "every other request as a batch")
    b = 65
    for bounds in ([0, 1000, 2048], [0, 300, 1111, 2048]):
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            chunk = run(batch.select(b, slice(lo, hi)))
            assert_rows_equal(chunk, full[batch.token_rows(b, slice(lo, hi))], f"chunk {lo}:{hi}")
    for i in range(2040, 2048):
        token = run(batch.select(b, slice(i, i + 1)))
        assert_rows_equal(token, full[batch.token_rows(b, slice(i, i + 1))], f"decode {i}")
    assert math.isfinite(full[:n].float().abs().max().item())
