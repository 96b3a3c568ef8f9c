"""Paged-attention inputs shared by the attention tests of every variant: a batch of
requests over a shuffled paged KV cache in vLLM's layout, the float64 reference, and a bitwise
row comparison that names the rows that differ."""

import dataclasses
import math
from dataclasses import dataclass

import torch
from det_backend.kernels.attention import paged_attention_reference


@dataclass
class Batch:
    q: torch.Tensor  # [T, H, D], a view into a fused qkv buffer (token stride != H * D)
    key_cache: torch.Tensor  # [num_blocks, block_size, KVH, D], a view (vLLM's layout)
    value_cache: torch.Tensor
    block_table: torch.Tensor  # [num_seqs, max_blocks], shuffled block ids
    specs: list  # [(q_len, seq_len)]
    scale: float

    def select(self, b: int, rows: slice | None = None) -> "Batch":
        """Request b alone (optionally only query rows `rows` of it, with seq_len cut so that
        the last selected row is the last position), sharing this batch's cache."""
        q_len, seq_len = self.specs[b]
        start = sum(s[0] for s in self.specs[:b])
        lo, hi, _ = (rows or slice(0, q_len)).indices(q_len)
        return Batch(
            self.q[start + lo : start + hi],
            self.key_cache,
            self.value_cache,
            self.block_table[b : b + 1],
            [(hi - lo, seq_len - q_len + hi)],
            self.scale,
        )

    def subset(self, bs: list[int]) -> "Batch":
        """Requests bs, in that order, as a batch of their own (q copied: contiguous)."""
        q = torch.cat([self.q[self.token_rows(b)] for b in bs])
        idx = torch.tensor(bs, device=self.block_table.device)
        specs = [self.specs[b] for b in bs]
        return Batch(q, self.key_cache, self.value_cache, self.block_table[idx], specs, self.scale)

    def token_rows(self, b: int, rows: slice | None = None) -> slice:
        q_len = self.specs[b][0]
        start = sum(s[0] for s in self.specs[:b])
        lo, hi, _ = (rows or slice(0, q_len)).indices(q_len)
        return slice(start + lo, start + hi)

    def shifted(self, b: int, num_blocks: int) -> "Batch":
        """Request b alone with num_blocks unused (NaN) blocks before its first: the same
        request num_blocks * block_size positions later. Where those positions are outside
        every query's window, the math is the same but tiles and segments meet the window at
        other offsets: what a kernel that aligned its grid to the window start would do."""
        q_len, seq_len = self.specs[b]
        block_size = self.key_cache.shape[1]
        n = math.ceil(seq_len / block_size)
        used = set(self.block_table[:, :n].flatten().tolist())
        spare = [i for i in range(self.key_cache.shape[0]) if i not in used][:num_blocks]
        assert len(spare) == num_blocks, "make_batch keeps 3 spare blocks"
        row = self.block_table[b, :n]
        table = torch.cat([torch.tensor(spare, dtype=row.dtype, device=row.device), row])
        return Batch(
            self.q[self.token_rows(b)],
            self.key_cache,
            self.value_cache,
            table[None],
            [(q_len, seq_len + num_blocks * block_size)],
            self.scale,
        )

    def poisoned_before_windows(self, window: int) -> "Batch":
        """A copy of the cache with NaN at every position before its request's first query's
        window start: blocks vLLM may free (or hand back as its null block) for a
        sliding-window layer. A kernel that reads one there shows NaN."""
        key_cache, value_cache = self.key_cache.clone(), self.value_cache.clone()
        block_size = key_cache.shape[1]
        for b, (q_len, seq_len) in enumerate(self.specs):
            for pos in range(max(0, seq_len - q_len - window + 1)):
                block = self.block_table[b, pos // block_size]
                key_cache[block, pos % block_size] = float("nan")
                value_cache[block, pos % block_size] = float("nan")
        return dataclasses.replace(self, key_cache=key_cache, value_cache=value_cache)

    def metadata(self):
        dev = self.q.device
        q_lens = torch.tensor([s[0] for s in self.specs], dtype=torch.int32)
        cu = torch.zeros(len(self.specs) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(q_lens, 0)
        seq_lens = torch.tensor([s[1] for s in self.specs], dtype=torch.int32)
        return cu.to(dev), seq_lens.to(dev)


def make_batch(
    specs, num_q_heads, num_kv_heads, head_size, dtype, device, block_size=16, seed=0, pad=0
) -> Batch:
    """Random q and cache; unused cache slots hold NaN so that reading one shows. `pad` extra
    q rows past the last request stand for CUDA-graph batch padding."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    num_tokens = sum(s[0] for s in specs) + pad
    qkv = torch.randn(num_tokens, (num_q_heads + 2 * num_kv_heads) * head_size, generator=gen)
    q = qkv.to(dtype).to(device)[:, : num_q_heads * head_size].view(num_tokens, -1, head_size)
    max_blocks = max(math.ceil(s[1] / block_size) for s in specs)
    num_blocks = sum(math.ceil(s[1] / block_size) for s in specs) + 3
    ids = torch.randperm(num_blocks, generator=gen)
    block_table = torch.zeros(len(specs), max_blocks, dtype=torch.int32)
    kv = torch.full((num_blocks, num_kv_heads, block_size, 2 * head_size), float("nan"))
    used = 0
    for b, (_, seq_len) in enumerate(specs):
        n = math.ceil(seq_len / block_size)
        block_table[b, :n] = ids[used : used + n]
        for j in range(n):
            fill = min(block_size, seq_len - j * block_size)
            kv[ids[used + j], :, :fill] = torch.randn(
                num_kv_heads, fill, 2 * head_size, generator=gen
            )
        used += n
    # vLLM's layout: [blocks, kv_heads, block_size, 2D] seen as two [blocks, block_size, KVH, D]
    key_cache, value_cache = kv.to(dtype).to(device).transpose(1, 2).split(head_size, dim=-1)
    return Batch(q, key_cache, value_cache, block_table.to(device), list(specs), head_size**-0.5)


def reference(batch: Batch, **features) -> torch.Tensor:
    cu, seq_lens = batch.metadata()
    return paged_attention_reference(
        batch.q, batch.key_cache, batch.value_cache, cu, seq_lens, batch.block_table,
        batch.scale, **features,
    )  # fmt: skip


def model_features(name: str, num_q_heads: int, device, seed: int = 0) -> dict:
    """paged_attention's feature kwargs by name ("none", "window", "softcap", "alibi",
    "sinks", "all", or several joined by "+"), at CPU-test scale: a window of 80 positions,
    softcap 2 (scores of unit q and k reach a few units: tanh bends them), BLOOM's
    geometric ALiBi slopes, sinks ~ N(3, 2^2) (next to a few hundred keys they move
    the output by more than the test tolerance)."""
    gen = torch.Generator().manual_seed(seed)
    every = {
        "window": dict(sliding_window=80),
        "softcap": dict(softcap=2.0),
        "alibi": dict(alibi_slopes=alibi_slopes(num_q_heads).to(device)),
        "sinks": dict(sinks=(3 + 2 * torch.randn(num_q_heads, generator=gen)).to(device)),
    }
    names = list(every) if name == "all" else [n for n in name.split("+") if n != "none"]
    return {k: v for n in names for k, v in every[n].items()}


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """BLOOM's slopes (vLLM's bloom.py _get_alibi_slopes), fp32."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2 ** (-(2 ** -(math.log2(closest) - 3)))
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest != num_heads:
        extra = 2 ** (-(2 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra ** (2 * i + 1) for i in range(min(closest, num_heads - closest))]
    return torch.tensor(slopes, dtype=torch.float32)


def assert_rows_equal(actual: torch.Tensor, expected: torch.Tensor, what: str):
    if not torch.equal(actual, expected):
        diff = (actual.float() - expected.float()).abs()
        rows = (diff.flatten(1).amax(1) > 0).nonzero().flatten().tolist()
        raise AssertionError(f"{what}: rows {rows[:10]} differ, max |diff| {diff.max().item()}")


def join(*batches: Batch) -> Batch:
    """The requests of several batches over one cache (e.g. from select/subset of one
    make_batch), in order, as one batch."""
    first = batches[0]
    return Batch(
        torch.cat([b.q for b in batches]),
        first.key_cache,
        first.value_cache,
        torch.cat([b.block_table for b in batches]),
        [s for b in batches for s in b.specs],
        first.scale,
    )


# Model-shaped feature sets at real sizes: (q heads, kv heads, head_size, features, scale);
# True for alibi_slopes / sinks: the tensor is made where it is used. The GPU tests
# (test_attention.py) and the benchmark's features section (benchmarks/attention.py) share it.
REAL_FEATURES = {
    # Mistral-7B-v0.1: window 4096.
    "mistral": (32, 8, 128, dict(sliding_window=4096), 128**-0.5),
    # Gemma-2-9B local layers: window 4096, softcap 50, query_pre_attn_scalar 256.
    "gemma2": (16, 8, 256, dict(sliding_window=4096, softcap=50.0), 256**-0.5),
    # gpt-oss sliding layers: window 128, sinks, head 64, G = 8.
    "gpt-oss": (64, 8, 64, dict(sliding_window=128, sinks=True), 64**-0.5),
    # BLOOM / MPT: ALiBi, multi-head.
    "alibi": (32, 32, 128, dict(alibi_slopes=True), 128**-0.5),
    # Phi-3-mini: head 96 (padded to 128), window 2047.
    "phi3": (32, 32, 96, dict(sliding_window=2047), 96**-0.5),
    "head80": (32, 8, 80, {}, 80**-0.5),
}
