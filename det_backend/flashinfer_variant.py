"""The `flashinfer` attention variant: FlashInfer's FA2 paged prefill kernel, planned so that a
query token's bits depend only on its own request (ATTENTION_VARIANTS.md section 8 has the
source references; file:line below = FlashInfer 0.6.14 as installed).

What FlashInfer picks from the batch, and the pin:

- Query tile (CTA_TILE_Q 16/64/128: warp layout and KV tile, so each row's online-softmax
  grouping). Without CUDA graphs it follows the batch's average packed query length
  (attention/scheduler.cuh:545-549, utils.cuh:389-413). In CUDA-graph mode it follows
  (total_num_rows - batch_size + 1) * G (scheduler.cuh:530-536), where the wrapper keeps the
  total of its *first* plan (prefill.py:1993-1999, 2139) and the batch size is fixed per
  wrapper (prefill.py:2001-2008). So every step, decode included, goes through one
  BatchPrefillWithPagedKVCacheWrapper(use_cuda_graph=True) whose batch is padded to
  `batch_size` requests and whose first plan declares `pinned_total_rows` rows: the tile is
  then 128 (64 at head_size 256) for every step. Decode never uses FlashInfer's decode
  wrapper, whose CUDA-core kernel (or, with tensor cores, the 16-row tile) gives other bits.
- Split-KV: disable_split_kv=True: one KV chunk per (request, query tile) starting at
  position 0 (scheduler.cuh:566-568, prefill.cuh:2939-2946), no merge kernel at all
  (prefill.cuh:3760-3779 only runs with a split). fixed_split_size is not used: in
  CUDA-graph mode FlashInfer refuses it once a batch has more chunks than the padded grid
  (scheduler.cuh:608-611).
- Within the pinned tile a row's KV tiles are aligned to position 0; the tile's other rows
  only add trailing, fully masked KV tiles for it (num_iterations from the tile's last row,
  prefill.cuh:3111-3118), so a row's count of such tiles depends on where the chunking put it.
  They are no-ops only if their rescale is exactly 1. FlashInfer computes it as
  exp2(m_prev * s - m * s) (update_mdo_states, prefill.cuh:1188-1215, s = sm_scale * log2e),
  which nvcc contracts to an FMA: with m_prev = m the result is the rounding error of m * s,
  not 0, so o and d are scaled by 1 +- 1 ulp and the output's last bf16 bit moves (seen on an
  H200: a 1-token chunk vs the same row inside the whole prefill, 1-2 bf16 ulps). Pin:
  `kernel_scales` makes s an exact power of two (m * s exact, the FMA gives 0, exp2(0) = 1)
  and folds the rest of the layer's scale into q (one rounding of q to its dtype).
- CUDA-graph mode launches `padded_batch_size` CTAs and, without a split, no validity mask
  (csrc/batch_prefill.cu:171-181): the work items past this step's real ones are whatever an
  earlier plan left in the page-locked buffer (scheduler.cuh:760-784 copies only the real
  ones). They would recompute stale tiles (same bits, wasted time) or, with garbage, read out
  of bounds. After each plan we point them at the always-empty last request (query and KV
  length 0: no iterations, no writes).

Refused by variants.py: sliding window (the tile's KV start moves with its first row,
prefill.cuh:2939-2940; the planner clips KV by window_left + the tile, scheduler.cuh:552-559),
softcap, ALiBi, sinks, fp8 KV, head sizes other than 64/128/256, another FlashInfer version
(this module reads two private fields of the wrapper: its int workspace and plan info).
"""

from __future__ import annotations

import functools
import math
import os
import shutil

import numpy as np
import torch

FLASHINFER_VERSION = "0.6.14"
SUPPORTED_HEAD_SIZES = (64, 128, 256)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
# Past this many packed query rows per request FlashInfer's FA2 planner picks its largest tile
# (utils.cuh FA2DetermineCtaTileQ: 128 if avg > 64 and head_dim < 256).
TILE_THRESHOLD_ROWS = 64
WORKSPACE_BYTES = 16 * 1024 * 1024  # float workspace: only a split would use it; we never split
# PrefillPlanInfo::ToVector (scheduler.cuh:651-667).
PLAN_PADDED_BATCH_SIZE, PLAN_CTA_TILE_Q = 0, 3
PLAN_REQUEST_INDICES, PLAN_QO_TILE_INDICES, PLAN_KV_TILE_INDICES = 4, 5, 6
PLAN_SPLIT_KV = 14


# FlashInfer's math::log2e, the float its kernel multiplies sm_scale by (math.cuh:29,
# variants.cuh:54: sm_scale_log2 = params.sm_scale * math::log2e, one fp32 multiply).
LOG2E_F32 = np.float32(1.44269504088896340736)


@functools.cache
def kernel_scales(scale: float) -> tuple[float, float]:
    """(q_multiplier, sm_scale) for a layer's softmax scale: FlashInfer's kernel then computes
    sm_scale_log2 = fl32(sm_scale * log2e) = P, a power of two, exactly, and q * q_multiplier
    carries the rest (q_multiplier * P = scale * log2e). With P a power of two, m * P is exact,
    so the rescale of a fully masked trailing KV tile is exp2(0) = 1 exactly (module doc)."""
    if not scale > 0 or not math.isfinite(scale):
        raise ValueError(f"det_backend flashinfer: softmax scale={scale} must be positive.")
    target = scale * float(LOG2E_F32)
    power = 2.0 ** round(math.log2(target))
    x = np.float32(power / float(LOG2E_F32))
    # fl32(x * log2e) steps by ~0.72 ulp of P per ulp of x, and P's rounding interval is
    # 0.75 ulp wide, so one of a few neighbours lands on P (checked for every P in the tests).
    for _ in range(16):
        product = x * LOG2E_F32  # float32 x float32: one IEEE rounding, as on the GPU
        if product == np.float32(power):
            return target / power, float(x)
        x = np.nextafter(x, np.float32(np.inf if product < power else -np.inf))
    raise RuntimeError(f"det_backend flashinfer: no fp32 sm_scale gives log2 scale {power}")


def cta_tile_q(avg_packed_qo_len: int, head_dim: int) -> int:
    """FlashInfer's FA2DetermineCtaTileQ (utils.cuh:389-413) on sm_80 and newer."""
    if head_dim >= 512:
        return 16 if avg_packed_qo_len <= 32 else 32
    if avg_packed_qo_len > 64 and head_dim < 256:
        return 128
    return 64 if avg_packed_qo_len > 16 else 16


def pinned_total_rows(max_num_tokens: int, batch_size: int) -> int:
    """The row count the first plan declares: at least any step's tokens, and large enough that
    the CUDA-graph planner's (rows - batch_size + 1) * G is past TILE_THRESHOLD_ROWS."""
    return max(max_num_tokens, batch_size + TILE_THRESHOLD_ROWS)


def pinned_cta_tile_q(head_dim: int) -> int:
    return cta_tile_q(TILE_THRESHOLD_ROWS + 1, head_dim)


def num_work_items(qo_lens, group_size: int, tile: int) -> int:
    """Real (request, query tile) work items of a plan without split (scheduler.cuh:582-596)."""
    return sum(-(-int(n) * group_size // tile) for n in qo_lens)


def host_page_metadata(qo_indptr, seq_lens, page_size: int, batch_size: int):
    """Host arrays for plan(): the step's requests, then zero-length padding up to batch_size.
    qo_indptr: [num_reqs + 1]; seq_lens: [num_reqs] (KV length incl. this step's tokens).
    Returns (qo_indptr, kv_page_indptr, last_page_len), int32 CPU tensors of batch_size + 1,
    batch_size + 1 and batch_size entries."""
    qo_indptr = torch.as_tensor(qo_indptr, dtype=torch.int32).cpu()
    seq_lens = torch.as_tensor(seq_lens, dtype=torch.int32).cpu()
    num_reqs = seq_lens.shape[0]
    if qo_indptr.shape[0] != num_reqs + 1 or num_reqs >= batch_size:
        raise ValueError(
            f"det_backend flashinfer: {num_reqs} requests with {qo_indptr.shape[0]} qo_indptr "
            f"entries; at most {batch_size - 1} requests (the last slot stays empty)."
        )
    pages = (seq_lens + page_size - 1) // page_size
    qo = torch.full((batch_size + 1,), int(qo_indptr[-1]), dtype=torch.int32)
    qo[: num_reqs + 1] = qo_indptr
    kv = torch.zeros(batch_size + 1, dtype=torch.int32)
    kv[1 : num_reqs + 1] = torch.cumsum(pages, 0)
    kv[num_reqs + 1 :] = kv[num_reqs]
    last = torch.zeros(batch_size, dtype=torch.int32)
    last[:num_reqs] = seq_lens - (pages - 1) * page_size
    last[:num_reqs][pages == 0] = 0
    return qo, kv, last


def device_page_indices(
    seq_lens: torch.Tensor, block_table: torch.Tensor, page_size: int, num_pages: int
) -> torch.Tensor:
    """FlashInfer's flat page list (request i's pages, then i + 1's) gathered on the device from
    the block table, without a host sync. seq_lens: [num_reqs] on the device."""
    pages = (seq_lens.to(torch.int64) + page_size - 1) // page_size
    ends = torch.cumsum(pages, 0)
    pos = torch.arange(num_pages, device=block_table.device)
    req = torch.searchsorted(ends, pos, right=True)
    first = ends[req] - pages[req]
    return block_table[req, pos - first].to(torch.int32)


def prefill_module_args(head_size: int, dtype: torch.dtype) -> tuple:
    """The arguments our plan() makes the wrapper pass to get_batch_prefill_module
    (prefill.py:2081-2096), so the one JIT module a (head_size, dtype) loads: backend fa2; q, kv
    and o in dtype; int32 indices (paged_kv_indptr); qk = vo head size; no position encoding,
    sliding window, soft cap or fp16 QK reduction. benchmarks/prebuild_flashinfer.py builds
    these ahead of time."""
    return ("fa2", dtype, dtype, dtype, torch.int32, head_size, head_size, 0, False, False, False)


def missing_aot_modules() -> list[str]:
    """The variant's modules (every supported head size and dtype) absent from FlashInfer's AOT
    directory: flashinfer-jit-cache's, which may be ours (benchmarks/prebuild_flashinfer.py).
    FlashInfer loads a module from there when its file exists (jit/core.py:256-261, 307-309)
    and otherwise compiles it with nvcc on first use."""
    from flashinfer.jit import env as jit_env
    from flashinfer.jit.attention import get_batch_prefill_uri

    names = [
        get_batch_prefill_uri(*prefill_module_args(head_size, dtype))
        for dtype in SUPPORTED_DTYPES
        for head_size in SUPPORTED_HEAD_SIZES
    ]
    return [n for n in names if not (jit_env.FLASHINFER_AOT_DIR / n / f"{n}.so").exists()]


def platform_problems() -> list[str]:
    """What this machine lacks for the flashinfer variant (checked once, at start-up)."""
    try:
        import flashinfer
    except ImportError as e:
        return [f"attention variant flashinfer: FlashInfer does not import ({e})"]
    problems = []
    if flashinfer.__version__ != FLASHINFER_VERSION:
        problems.append(
            f"attention variant flashinfer: FlashInfer {flashinfer.__version__}, pinned for "
            f"{FLASHINFER_VERSION} only (its planner's tile choice and two private fields)"
        )
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8:
        problems.append("attention variant flashinfer: needs a CUDA GPU of sm_80 or newer")
    missing = missing_aot_modules()
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = shutil.which("nvcc") or (
        cuda_home and shutil.which(os.path.join(cuda_home, "bin", "nvcc"))
    )
    if missing and not nvcc:
        problems.append(
            f"attention variant flashinfer: FlashInfer JIT-compiles its prefill kernel with nvcc "
            f"on first use, and there is no nvcc (CUDA_HOME, PATH) nor a prebuilt module in "
            f"flashinfer-jit-cache for {len(missing)} of its head sizes and dtypes ({missing[0]})"
        )
    return problems


class FlashInferPlanner:
    """One FlashInfer prefill wrapper in CUDA-graph mode, planned once per step (host work) for
    every layer of a KV-cache group; its buffers stay put, so captured graphs replay any plan."""

    def __init__(
        self,
        max_num_reqs: int,
        max_num_tokens: int,
        max_pages: int,
        num_q_heads: int,
        num_kv_heads: int,
        head_size: int,
        page_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        from flashinfer import BatchPrefillWithPagedKVCacheWrapper

        if head_size not in SUPPORTED_HEAD_SIZES or dtype not in SUPPORTED_DTYPES:
            raise ValueError(
                f"det_backend flashinfer: head_size={head_size}, dtype={dtype} (supported: "
                f"{SUPPORTED_HEAD_SIZES}, {SUPPORTED_DTYPES})."
            )
        self.batch_size = max_num_reqs + 1  # the last request is always empty padding
        self.total_rows = pinned_total_rows(max_num_tokens, self.batch_size)
        self.group_size = num_q_heads // num_kv_heads
        self.tile = pinned_cta_tile_q(head_size)
        self.shape = (num_q_heads, num_kv_heads, head_size, page_size)
        self.dtype, self.device = dtype, device
        i32 = dict(dtype=torch.int32, device=device)
        self.wrapper = BatchPrefillWithPagedKVCacheWrapper(
            torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device),
            "NHD",
            use_cuda_graph=True,
            qo_indptr_buf=torch.zeros(self.batch_size + 1, **i32),
            paged_kv_indptr_buf=torch.zeros(self.batch_size + 1, **i32),
            paged_kv_indices_buf=torch.zeros(max(max_pages, 1), **i32),
            paged_kv_last_page_len_buf=torch.zeros(self.batch_size, **i32),
            backend="fa2",
        )
        self.pin = torch.cuda.is_available()
        # First plan: total_rows rows in request 0 fixes the wrapper's row bound, hence the tile.
        qo = torch.tensor([0] + [self.total_rows] * self.batch_size, dtype=torch.int32)
        kv = torch.tensor([0] + [1] * self.batch_size, dtype=torch.int32)
        last = torch.zeros(self.batch_size, dtype=torch.int32)
        last[0] = 1
        self._plan(qo, kv, torch.zeros(1, **i32), last)
        self.plan_info = list(self.wrapper._plan_info)
        self._check_plan()
        self.num_rows = 0  # query rows of the current plan (FlashInfer's run checks q's)

    def _plan(self, qo, kv, indices, last) -> None:
        num_q_heads, num_kv_heads, head_size, page_size = self.shape
        if self.pin:
            qo, kv, last = qo.pin_memory(), kv.pin_memory(), last.pin_memory()
        self.wrapper.plan(
            qo, kv, indices, last, num_q_heads, num_kv_heads, head_size, page_size,
            causal=True, sm_scale=1.0, window_left=-1, q_data_type=self.dtype,
            kv_data_type=self.dtype, o_data_type=self.dtype, disable_split_kv=True,
        )  # fmt: skip

    def _check_plan(self) -> None:
        info = list(self.wrapper._plan_info)
        if info[PLAN_CTA_TILE_Q] != self.tile or info[PLAN_SPLIT_KV]:
            raise RuntimeError(
                f"det_backend flashinfer: plan chose tile {info[PLAN_CTA_TILE_Q]} (pinned "
                f"{self.tile}), split {bool(info[PLAN_SPLIT_KV])}: FlashInfer's planner changed."
            )
        if info != self.plan_info:
            raise RuntimeError(
                f"det_backend flashinfer: plan {info} differs from the first {self.plan_info}; "
                "captured CUDA graphs read the first plan's buffers."
            )

    def plan(
        self, qo_indptr_cpu, seq_lens_cpu, seq_lens: torch.Tensor, block_table: torch.Tensor
    ) -> None:
        """Plan one step: qo_indptr_cpu [num_reqs + 1] and seq_lens_cpu [num_reqs] on the host,
        seq_lens [num_reqs] and block_table [num_reqs, max_blocks] on the device."""
        page_size = self.shape[3]
        qo, kv, last = host_page_metadata(qo_indptr_cpu, seq_lens_cpu, page_size, self.batch_size)
        num_reqs = seq_lens.shape[0]
        indices = device_page_indices(seq_lens, block_table[:num_reqs], page_size, int(kv[-1]))
        self._plan(qo, kv, indices, last)
        self._check_plan()
        self.num_rows = int(qo[-1])
        # Work items past the real ones: the empty last request, query tile 0, KV chunk 0.
        real = num_work_items((qo[1:] - qo[:-1]).tolist(), self.group_size, self.tile)
        padded = self.plan_info[PLAN_PADDED_BATCH_SIZE]
        ws = self.wrapper._int_workspace_buffer.view(torch.int32)
        for field, value in (
            (PLAN_REQUEST_INDICES, self.batch_size - 1),
            (PLAN_QO_TILE_INDICES, 0),
            (PLAN_KV_TILE_INDICES, 0),
        ):
            start = self.plan_info[field] // 4
            ws[start + real : start + padded].fill_(value)


def _check(q, key_cache, value_cache, out, planner: FlashInferPlanner) -> None:
    num_q_heads, num_kv_heads, head_size, page_size = planner.shape
    if q.dim() != 3 or q.shape[1:] != (num_q_heads, head_size) or out.shape != q.shape:
        raise ValueError(
            f"det_backend flashinfer: q {tuple(q.shape)} and out {tuple(out.shape)} must be "
            f"[tokens, {num_q_heads}, {head_size}]."
        )
    expected = (num_kv_heads, head_size)
    if key_cache.shape != value_cache.shape or key_cache.shape[1:] != (page_size, *expected):
        raise ValueError(
            f"det_backend flashinfer: caches {tuple(key_cache.shape)}, "
            f"{tuple(value_cache.shape)} must be [pages, {page_size}, {num_kv_heads}, "
            f"{head_size}]."
        )
    if {t.dtype for t in (q, key_cache, value_cache, out)} != {planner.dtype}:
        raise ValueError(f"det_backend flashinfer: every tensor must be {planner.dtype}.")


def flashinfer_paged_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    out: torch.Tensor,
    planner: FlashInferPlanner,
    scale: float,
) -> torch.Tensor:
    """Causal attention of q over the paged KV cache as planned this step; writes and returns
    out. q, out: [tokens, q_heads, head_size] with at least the plan's rows (rows past them,
    padding, are left untouched); caches: [pages, page_size, kv_heads, head_size] (strided
    views are fine: FlashInfer reads the cache's strides). The plan holds sm_scale 1; the
    layer's scale goes in through kernel_scales: a power-of-two log2 scale as k_scale
    (FlashInfer multiplies them, prefill.py:2394-2400: 1.0 * k_scale is exact), the rest on q."""
    q_multiplier, sm_scale = kernel_scales(float(scale))
    return _run(q, key_cache, value_cache, out, planner, q_multiplier, sm_scale)


def _run(q, key_cache, value_cache, out, planner, q_multiplier: float, sm_scale: float):
    """flashinfer_paged_attention with the two scales given (the tests' control passes
    FlashInfer's own split: q as it is and the layer's scale)."""
    _check(q, key_cache, value_cache, out, planner)
    rows = planner.num_rows
    if q.shape[0] < rows:
        raise ValueError(
            f"det_backend flashinfer: q has {q.shape[0]} rows, the plan {rows} query tokens."
        )
    if rows == 0:
        return out
    # FlashInfer 0.6.14 wants exactly the plan's rows (prefill.py:2353-2360). A captured CUDA
    # graph scales the captured rows of q's storage and writes out's; a replay's plan (same
    # buffers, re-planned by build()) has at most that many rows.
    q = q[:rows] if q_multiplier == 1.0 else torch.mul(q[:rows], q_multiplier)
    planner.wrapper.run(q, (key_cache, value_cache), k_scale=sm_scale, out=out[:rows])
    return out
