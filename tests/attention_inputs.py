"""Paged-attention inputs shared by the attention tests of every variant: a batch of
requests over a shuffled paged KV cache in vLLM's layout, the float64 reference, and a bitwise
row comparison that names the rows that differ."""

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


def reference(batch: Batch) -> torch.Tensor:
    cu, seq_lens = batch.metadata()
    return paged_attention_reference(
        batch.q, batch.key_cache, batch.value_cache, cu, seq_lens, batch.block_table, batch.scale
    )


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
