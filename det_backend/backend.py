"""The attention backend vLLM resolves for `--attention-backend CUSTOM`.

Structure follows vllm/v1/attention/backends/triton_attn.py (metadata dataclass, builder,
backend, impl). The kernel is picked by DET_BACKEND_ATTENTION (det_backend/variants.py; unset:
fa3 on Hopper where the model allows, else triton):
`triton` is ours (kernels/attention.py): every query token reduces its KV in tiles
and fixed-size segments aligned to position 0, so its bits depend only on its own request;
`fa3` is vLLM's FlashAttention-3 with every batch-dependent choice pinned (det_backend/fa3.py);
`flashinfer` is FlashInfer's FA2 prefill kernel planned once per step with one pinned query tile
and no split (det_backend/flashinfer_variant.py). All read the same KV cache layout (vLLM's
FlashAttention one). The KV cache is written (do_kv_cache_update) before attention runs, so
prefill, chunked prefill and prefix-cache hits read the same cache.

Constructing the impl turns deterministic mode on in this process (det_backend.mode).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm.config import CUDAGraphMode, VllmConfig, get_current_vllm_config
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionLayer,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.attention.backends.utils import get_kv_cache_layout, split_decodes_and_prefills
from vllm.v1.attention.ops.triton_reshape_and_cache_flash import triton_reshape_and_cache_flash
from vllm.v1.kv_cache_interface import AttentionSpec

from . import fa3, mode, variants
from .config import SUPPORTED_DTYPES, SUPPORTED_KV_CACHE_DTYPES, DeterminismError
from .flashinfer_variant import FlashInferPlanner, flashinfer_paged_attention
from .kernels.attention import KV_SPLIT_SIZE, paged_attention, paged_attention_mixed


@dataclass
class DetDecodePart:
    """A mixed batch's leading decodes, which the triton variant launches apart from its
    prefills (kernels/attention.py paged_attention_mixed): requests [0, num_decodes)."""

    num_decodes: int
    num_decode_tokens: int  # query tokens of the decodes: query_start_loc[num_decodes]
    max_query_len: int
    max_num_segments: int  # the decodes' own bound, from their max seq_len
    # The prefills' query offsets from 0: query_start_loc[num_decodes:] - num_decode_tokens,
    # computed once per step for every layer.
    prefill_query_start_loc: torch.Tensor


def _segments(max_seq_len: int) -> int:
    return max(1, -(-max_seq_len // KV_SPLIT_SIZE))


@dataclass
class DetAttentionMetadata:
    num_actual_tokens: int  # tokens in the batch, padding excluded
    max_query_len: int
    max_seq_len: int  # fa3 only: an upper bound of seq_lens
    query_start_loc: torch.Tensor  # [num_reqs + 1] int32
    seq_lens: torch.Tensor  # [num_reqs] int32, KV length including this step's tokens
    block_table: torch.Tensor  # [num_reqs, max_blocks] int32
    slot_mapping: torch.Tensor  # [num_tokens]
    # Bound on KV_SPLIT_SIZE segments per request: sizes the launch grid (kernels/attention.py
    # plan()). From this step's max_seq_len when the launch runs eagerly; from max_model_len
    # when it is (or warms up) a full CUDA graph, which replays batches of any length. With
    # `decodes`, the bound of the requests after them.
    max_num_segments: int
    # Set for a mixed batch of an eager step (triton variant): its decodes, launched apart.
    decodes: DetDecodePart | None = None
    # flashinfer variant: the group's planner, planned for this step.
    flashinfer: FlashInferPlanner | None = None


class DetAttentionMetadataBuilder(AttentionMetadataBuilder[DetAttentionMetadata]):
    # Launch grids depend only on the number of tokens and requests and on max_num_segments,
    # never on values in the metadata tensors, so pure-decode batches can be captured whole.
    # A mixed batch's decode/prefill split comes from host data; below ALWAYS, vLLM never
    # captures a mixed batch whole (config/compilation.py:1371-1396 turns a FULL mixed mode
    # into FULL_AND_PIECEWISE or FULL_DECODE_ONLY): its attention runs eagerly.
    _cudagraph_support: ClassVar[AttentionCGSupport] = (
        AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    )
    # Decodes first: vLLM 0.26's V1 runner moves requests with context and at most this many
    # query tokens to the front of the batch (the minimum over its builders:
    # gpu_model_runner.py:1106-1129, 7147-7165 -> v1/attention/backends/utils.py:665-742
    # reorder_batch_to_split_decodes_and_prefills); the V2 runner puts requests of one query
    # token first whatever the backend (gpu/model_runner.py:891, 1652-1658). Bits never depend
    # on the order; a decode found after a prefill is launched with the prefills.
    reorder_batch_threshold: int = 1
    # The flashinfer variant's planner (None for the other variants).
    flashinfer: FlashInferPlanner | None = None

    def __init__(
        self,
        kv_cache_spec: AttentionSpec,
        layer_names: list[str],
        vllm_config: VllmConfig,
        device: torch.device,
    ):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        max_model_len = vllm_config.model_config.max_model_len
        self.max_num_segments = -(-max_model_len // KV_SPLIT_SIZE)
        # fa3 launches any batch whole; only our kernel launches decodes apart.
        self.launch_decodes_apart = variants.read_variant() == "triton"
        self.flashinfer = (
            self._flashinfer_planner(kv_cache_spec, vllm_config, device)
            if variants.read_variant() == "flashinfer"
            else None
        )

    @staticmethod
    def _flashinfer_planner(
        spec: AttentionSpec, vllm_config: VllmConfig, device: torch.device
    ) -> FlashInferPlanner:
        # Every batch vLLM builds, CUDA-graph captures included, has at most this many requests
        # and tokens; the planner pads each step's requests to one more than that.
        sched, cc = vllm_config.scheduler_config, vllm_config.compilation_config
        max_reqs = max(sched.max_num_seqs, cc.max_cudagraph_capture_size or 0)
        max_model_len = vllm_config.model_config.max_model_len
        return FlashInferPlanner(
            max_num_reqs=max_reqs,
            max_num_tokens=sched.max_num_batched_tokens,
            max_pages=max_reqs * -(-max_model_len // spec.block_size),
            num_q_heads=vllm_config.model_config.get_num_attention_heads(
                vllm_config.parallel_config
            ),
            num_kv_heads=spec.num_kv_heads,
            head_size=spec.head_size,
            page_size=spec.block_size,
            dtype=spec.dtype,
            device=device,
        )

    def _plan_flashinfer(self, cm: CommonAttentionMetadata, md: DetAttentionMetadata) -> None:
        """Host work once per step for every layer of the group: query offsets from
        query_start_loc_cpu, KV lengths from seq_lens_cpu_upper_bound (exact: det_backend
        refuses speculative decoding), the page list gathered on the device."""
        n = cm.num_reqs
        seq_lens_cpu = cm.seq_lens_cpu_upper_bound
        if seq_lens_cpu is None:
            seq_lens_cpu = cm.seq_lens_cpu  # a device-to-host copy; vLLM 0.26 fills the bound
        self.flashinfer.plan(
            cm.query_start_loc_cpu[: n + 1], seq_lens_cpu[:n], cm.seq_lens[:n],
            cm.block_table_tensor,
        )  # fmt: skip
        md.flashinfer = self.flashinfer

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> DetAttentionMetadata:
        cm = common_attn_metadata
        if self.flashinfer is not None:
            md = self._metadata(cm, 1)
            self._plan_flashinfer(cm, md)
            return md
        if self._may_be_full_graph(cm):
            return self._metadata(cm, self.max_num_segments)
        # max_seq_len is a host int that vLLM already holds (an upper bound on seq_lens:
        # gpu_model_runner.py:2298, gpu/model_states/default.py:164): no sync.
        md = self._metadata(cm, _segments(cm.max_seq_len))
        if self.launch_decodes_apart and cm.max_query_len > self.reorder_batch_threshold:
            self._split_decodes(cm, md)
        return md

    def _split_decodes(self, cm: CommonAttentionMetadata, md: DetAttentionMetadata) -> None:
        """Mixed batch: give its leading decodes their own launch and bound. Host data only:
        split_decodes_and_prefills reads query_start_loc_cpu (v1/attention/backends/utils.py:
        564-634, as FlashInfer's builder does, flashinfer.py:1125-1131), and each part's bound
        comes from seq_lens_cpu_upper_bound (v1/attention/backend.py:464-468: exact but for
        async spec decode, which det_backend refuses, where it stays an upper bound), which
        both runners fill (gpu_model_runner.py:2343-2344, 2407; gpu/model_states/default.py:
        159, 188); else from max_seq_len."""
        num_decodes, num_prefills, num_decode_tokens, _ = split_decodes_and_prefills(
            cm, decode_threshold=self.reorder_batch_threshold
        )
        if num_decodes == 0 or num_prefills == 0:
            return
        upper = cm.seq_lens_cpu_upper_bound
        if upper is None:
            decode_len = prefill_len = cm.max_seq_len
        else:
            decode_len = int(upper[:num_decodes].max())
            # Past num_prefills: request padding (no query tokens), which only raises the bound.
            prefill_len = int(upper[num_decodes : cm.num_reqs].max())
        md.max_num_segments = _segments(prefill_len)
        md.decodes = DetDecodePart(
            num_decodes=num_decodes,
            num_decode_tokens=num_decode_tokens,
            max_query_len=self.reorder_batch_threshold,
            max_num_segments=_segments(decode_len),
            prefill_query_start_loc=cm.query_start_loc[num_decodes:] - num_decode_tokens,
        )

    def build_for_cudagraph_capture(
        self, common_attn_metadata: CommonAttentionMetadata
    ) -> DetAttentionMetadata:
        # vLLM captures with dummy seq_lens (max_query_len: gpu_model_runner.py:5972) and
        # replays the graph for any batch of that shape: size the grid for max_model_len.
        # vLLM 0.26 also passes max_seq_len = max_model_len here (gpu_model_runner.py:2292-2296,
        # gpu/model_states/default.py:160-162); the bound does not rely on it.
        md = self._metadata(common_attn_metadata, self.max_num_segments)
        if self.flashinfer is not None:
            self._plan_flashinfer(common_attn_metadata, md)
        return md

    def _may_be_full_graph(self, cm: CommonAttentionMetadata) -> bool:
        """Whether a batch of this shape runs as a full CUDA graph, so that this eager build is
        the warm-up before its capture. vLLM 0.26's V1 runner warms each graph up eagerly
        through build(), with seq_lens of 1, then captures through build_for_cudagraph_capture
        (gpu_model_runner.py:6851-6893, 5972, 6010); the V2 runner uses the capture path for
        both (gpu/cudagraph_utils.py:325, 621). A Triton kernel first launched inside a capture
        must load its module, which CUDA forbids mid-capture, so the warm-up must launch what
        the capture will: the same bound. Real batches of this shape replay the graph, so the
        bound costs them nothing. Mirrors vllm/v1/cudagraph_dispatcher.py:272-281 for our
        UNIFORM_SINGLE_TOKEN_DECODE support."""
        cc = self.vllm_config.compilation_config
        max_size = cc.max_cudagraph_capture_size
        return (
            cm.max_query_len == 1
            and cc.cudagraph_mode.decode_mode() == CUDAGraphMode.FULL
            and max_size is not None
            and cm.num_actual_tokens <= max_size
        )

    @staticmethod
    def _metadata(cm: CommonAttentionMetadata, max_num_segments: int) -> DetAttentionMetadata:
        return DetAttentionMetadata(
            num_actual_tokens=cm.num_actual_tokens,
            max_query_len=cm.max_query_len,
            max_seq_len=cm.max_seq_len,
            query_start_loc=cm.query_start_loc,
            seq_lens=cm.seq_lens,
            block_table=cm.block_table_tensor,
            slot_mapping=cm.slot_mapping,
            max_num_segments=max_num_segments,
        )


class DetAttentionBackend(AttentionBackend):
    supported_dtypes: ClassVar[list[torch.dtype]] = list(SUPPORTED_DTYPES)
    supported_kv_cache_dtypes: ClassVar[list] = list(SUPPORTED_KV_CACHE_DTYPES)
    forward_includes_kv_cache_update: bool = False

    @staticmethod
    def get_name() -> str:
        # vLLM maps this name back to its enum (AttentionBackendEnum[name]): it must be CUSTOM.
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[DetAttentionImpl]:
        return DetAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[DetAttentionMetadataBuilder]:
        return DetAttentionMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes() -> list[int | MultipleOf]:
        # vLLM splits larger cache blocks into these (v1/worker/utils.py
        # select_common_block_size); fa3 must stay under FA3's TMA paged-KV page sizes.
        if variants.read_variant() == "fa3":
            return list(fa3.BLOCK_SIZES)
        return [MultipleOf(16)]

    @staticmethod
    def get_kv_cache_shape(
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_size: int,
        cache_dtype_str: str = "auto",
    ) -> tuple[int, ...]:
        if block_size % 16 != 0:
            raise ValueError(f"det_backend: block_size={block_size} must be a multiple of 16")
        # Same packing as vLLM's Triton and FlashAttention backends: K | V in the last dim.
        return (num_blocks, num_kv_heads, block_size, 2 * head_size)

    @staticmethod
    def get_kv_cache_stride_order(include_num_layers_dimension: bool = False) -> tuple[int, ...]:
        layout = get_kv_cache_layout()
        orders = {
            ("NHD", False): (0, 2, 1, 3),
            ("NHD", True): (1, 0, 3, 2, 4),
            ("HND", False): (0, 1, 2, 3),
            ("HND", True): (1, 2, 0, 3, 4),
        }
        if (layout, include_num_layers_dimension) not in orders:
            raise ValueError(f"det_backend: unknown KV cache layout {layout}")
        return orders[(layout, include_num_layers_dimension)]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return list(variants.head_sizes(variants.read_variant()))

    @classmethod
    def supports_batch_invariance(cls) -> bool:
        return True

    # vLLM's selector refuses sinks and sliding windows for a backend that does not claim
    # them, with a message that names neither our variant nor why; claim them, and let the
    # impl refuse them per variant (variants.layer_problems).
    @classmethod
    def supports_sink(cls) -> bool:
        return True

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return True

    @staticmethod
    def use_cascade_attention(*args, **kwargs) -> bool:
        return False


def _unset(value: object) -> bool:
    # vLLM passes optional features as extra kwargs whose "off" is None, False or -1.
    return value is None or value is False or (type(value) is int and value == -1)


class DetAttentionImpl(AttentionImpl[DetAttentionMetadata]):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        sinks: torch.Tensor | None = None,
        **extra: object,
    ) -> None:
        variant = variants.read_variant()
        reasons = variants.layer_problems(
            variant,
            head_size,
            alibi_slopes,
            sliding_window,
            logits_soft_cap,
            attn_type,
            sinks,
            kv_cache_dtype,
        )
        reasons += [f"attention option {k}={v!r}" for k, v in extra.items() if not _unset(v)]
        if reasons:
            raise DeterminismError(reasons)
        mode.enable(get_current_vllm_config())
        self.variant = variant
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.logits_soft_cap = float(logits_soft_cap or 0.0)
        # As vLLM's FlashAttention impl: a query at position p sees keys in
        # (p - sliding_window, p] (FA's window_left = sliding_window - 1).
        self.sliding_window = sliding_window
        # vLLM builds layers under its target-device context, so this lands on the GPU
        # (vLLM's FlashAttention impl makes its slopes the same way).
        self.alibi_slopes = (
            None if alibi_slopes is None else torch.tensor(alibi_slopes, dtype=torch.float32)
        )
        # The layer's parameter, filled by weight loading after construction: keep the tensor.
        self.sinks = sinks
        if sinks is not None and sinks.shape != (num_heads,):
            raise DeterminismError(
                [f"attention sinks of shape {tuple(sinks.shape)}, not one per head ({num_heads})"]
            )
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name

    def forward(
        self,
        layer: AttentionLayer,
        query: torch.Tensor,  # [num_tokens, num_heads, head_size]
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, 2 * head_size]
        attn_metadata: DetAttentionMetadata,
        output: torch.Tensor,  # [num_tokens, num_heads, head_size]
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("det_backend: fused output quantization is not supported")
        if attn_metadata is None:
            # Profiling run: no KV cache yet.
            return output.fill_(0)
        n = attn_metadata.num_actual_tokens
        if self.alibi_slopes is not None and self.alibi_slopes.device != query.device:
            # Built outside vLLM's device context (the layer was made on the CPU): moved once,
            # at the first forward (the profile run, before any CUDA-graph capture).
            self.alibi_slopes = self.alibi_slopes.to(query.device)
        key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)
        if self.variant == "flashinfer":
            flashinfer_paged_attention(
                query[:n], key_cache, value_cache, output[:n], attn_metadata.flashinfer, self.scale
            )
            return output
        if self.variant == "fa3":
            fa3.fa3_paged_attention(
                query[:n],
                key_cache,
                value_cache,
                output[:n],
                cu_seqlens_q=attn_metadata.query_start_loc,
                seq_lens=attn_metadata.seq_lens,
                block_table=attn_metadata.block_table,
                scale=self.scale,
                max_seqlen_q=attn_metadata.max_query_len,
                max_seqlen_k=attn_metadata.max_seq_len,
                softcap=self.logits_soft_cap,
            )
            return output
        args = dict(
            cu_seqlens_q=attn_metadata.query_start_loc,
            seq_lens=attn_metadata.seq_lens,
            block_table=attn_metadata.block_table,
            scale=self.scale,
            max_seqlen_q=attn_metadata.max_query_len,
            max_num_segments=attn_metadata.max_num_segments,
            sliding_window=self.sliding_window,
            softcap=self.logits_soft_cap,
            alibi_slopes=self.alibi_slopes,
            sinks=self.sinks,
        )
        decodes = attn_metadata.decodes
        if decodes is None:
            paged_attention(query[:n], key_cache, value_cache, output[:n], **args)
            return output
        paged_attention_mixed(
            query[:n],
            key_cache,
            value_cache,
            output[:n],
            **args,
            num_decodes=decodes.num_decodes,
            num_decode_tokens=decodes.num_decode_tokens,
            decode_max_num_segments=decodes.max_num_segments,
            decode_max_seqlen_q=decodes.max_query_len,
            prefill_cu_seqlens_q=decodes.prefill_query_start_loc,
        )
        return output

    def do_kv_cache_update(
        self,
        layer: AttentionLayer,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        # (B, H, N, 2*D) -> ((B, N, H, D), (B, N, H, D)); a copy, deterministic by nature.
        key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)
        triton_reshape_and_cache_flash(
            key,
            value,
            key_cache,
            value_cache,
            slot_mapping,
            self.kv_cache_dtype,
            layer._k_scale,
            layer._v_scale,
        )
