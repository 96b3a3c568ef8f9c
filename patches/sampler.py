"""Replaces vLLM's top-k/top-p masking and the top-k of its logprob gathering, in both model
runners, with row-local versions (det_backend.kernels.sampling).

Why: with a per-request seed, a request's token must not depend on its batch. vLLM 0.26 draws
seeded noise per row already: the V2 runner (default for our dense models) from Philox keyed on
(seed, position) (v1/worker/gpu/sample/gumbel.py), the V1 runner from the request's own
torch.Generator (v1/sample/ops/topk_topp_sampler.py `random_sample`). Temperature, min-p, logit
bias, penalties (repetition, frequency, presence, in that order) and greedy argmax are per-row
elementwise ops or one-program-per-row kernels, with integer token counts (patches/SAMPLER.md,
with vLLM file:line for each). What is not row-local:
  - `apply_top_k_top_p` (v1/sample/ops/topk_topp_sampler.py:345) switches on the batch size:
    a Triton pivot search for >= 8 rows (keeps exactly k of tied logits), a sort for fewer
    (keeps every tie); and the sort path's torch.cumsum is CUB's device-wide scan for one row
    but a row-per-warp kernel for several, so a lone request's top-p set differs in its last
    bits. Both runners call it (V2: v1/worker/gpu/sample/sampler.py:248, states.py:112).
  - logprobs: torch.topk over the row with k = the batch's largest `logprobs` (V1
    v1/sample/sampler.py:334, V2 v1/worker/gpu/sample/logprob.py:126,141); each request keeps
    the first n columns (vllm/logprobs.py:189). How torch.topk orders tied values depends on k
    and, on CUDA, on the number of rows; bf16 logits tie often.
How: the name `apply_top_k_top_p` is rebound in the three modules that call it; the `torch`
global of the two logprob modules becomes a view of torch whose `topk` breaks ties by the lower
index (every other attribute is torch's own). The FlashInfer sampler stays: vLLM uses it only
for batches with no seeded request (V1 forward_cuda, V2 sampler.py:231-246).
Not covered: the rejection sampler (speculative decoding is refused by det_backend.config).
Checked against vLLM: 0.26.0.
"""

import types

import torch

from ..kernels.sampling import apply_top_k_top_p, topk_lowest_index_first


class _TorchWithRowLocalTopk(types.ModuleType):
    """`torch` as the logprob modules see it: torch's attributes, with a tie-ordered topk."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name: str):
        return getattr(torch, name)

    @staticmethod
    def topk(input: torch.Tensor, k: int, dim: int = -1, largest: bool = True, sorted=True):
        if input.dim() != 2 or dim not in (-1, 1) or not largest or not sorted:
            raise ValueError(
                "det_backend: vLLM's logprob code called topk in a way det_backend's row-local "
                f"topk does not cover (shape {tuple(input.shape)}, dim={dim}, "
                f"largest={largest}, sorted={sorted})"
            )
        return topk_lowest_index_first(input, k)


TORCH_WITH_ROW_LOCAL_TOPK = _TorchWithRowLocalTopk()


def targets() -> list[tuple[types.ModuleType, str, object]]:
    """(vLLM module, global name, what det_backend puts there)."""
    from vllm.v1.sample import sampler as v1_sampler
    from vllm.v1.sample.ops import topk_topp_sampler
    from vllm.v1.worker.gpu.sample import logprob as v2_logprob
    from vllm.v1.worker.gpu.sample import sampler as v2_sampler
    from vllm.v1.worker.gpu.sample import states as v2_states

    return [
        (topk_topp_sampler, "apply_top_k_top_p", apply_top_k_top_p),
        (v2_sampler, "apply_top_k_top_p", apply_top_k_top_p),
        (v2_states, "apply_top_k_top_p", apply_top_k_top_p),
        (v1_sampler, "torch", TORCH_WITH_ROW_LOCAL_TOPK),
        (v2_logprob, "torch", TORCH_WITH_ROW_LOCAL_TOPK),
    ]


def apply() -> None:
    todo = []
    for module, name, replacement in targets():
        current = getattr(module, name, None)
        if current is replacement:
            continue
        # What vLLM 0.26.0 has there; anything else means the module moved on. Checked for
        # every target before any is replaced.
        if current is None or (name == "torch" and current is not torch):
            raise RuntimeError(
                f"det_backend: {module.__name__}.{name} is {current!r}, not what vLLM 0.26.0 "
                "has there; the sampler patch was not written for it"
            )
        todo.append((module, name, replacement))
    for module, name, replacement in todo:
        setattr(module, name, replacement)


def problems() -> list[str]:
    return [
        f"{module.__name__}.{name} is not det_backend's"
        for module, name, replacement in targets()
        if getattr(module, name, None) is not replacement
    ]
