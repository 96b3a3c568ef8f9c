"""Seeded sampling under det_backend: a request's token and logprobs are the same alone and in any
batch (patches/sampler.py, kernels/sampling.py).

What vLLM 0.26 already does per row, and we reuse (so the tests show it invariant in our mode
rather than failing without it): seeded noise (V1: the request's own torch.Generator; V2: Philox
keyed on (seed, position), so chunked prefill and preemption, which only change the batch a
(request, position) is sampled in, cannot change it), temperature, min-p, logit bias, penalties
(repetition, frequency, presence), greedy argmax, logprob values.
What it gets wrong, and the test that fails without the patch:
  - logprobs: the top-n tokens returned to a request are the first n of a torch.topk whose k is
    the batch's largest request, and torch.topk orders tied values by k (CPU and CUDA) and by the
    row count (CUDA): test_vllm_v1_sampling_depends_on_batch, test_v2_logprobs_batch_invariant[vllm]
    (CPU only: on CUDA that tie order for these shapes is not established).
  - top-k/top-p switch implementation at 8 rows, and torch.cumsum scans one row differently from
    several, both on CUDA only: test_vllm_top_k_top_p_depends_on_batch_size_on_gpu. On the CPU
    vLLM disables Triton (no driver) and takes its sort path at every batch size, so there its
    tokens do not depend on the batch.
vLLM's V2 kernels run here under TRITON_INTERPRET=1 from a private copy of their module loaded
with the real triton (`vllm_module_with_triton`).
"""

import dataclasses
import functools
import importlib.util
import random
import types

import pytest
import torch
from det_backend.kernels import sampling as ks
from det_backend.kernels.sampling import (
    apply_top_k_top_p,
    apply_top_k_top_p_reference,
    top_k_top_p_threshold,
    topk_lowest_index_first,
)
from det_backend.kernels.sampling_sort import topk_lowest_index_first as packed_key_topk
from det_backend.patches import sampler as sampler_patch
from invariance import prefixes_that_change

VOCAB = 1000
# A top-p tie group may be kept or not where its float64 cumulative mass is this close to 1 - p:
# fixed-point weights (2^-38 per token), fp32 exp and 1 - p in fp32 each move it by less.
TOP_P_TOL = 1e-5
# 1 and 2: torch.cumsum's one-row and several-row scans; 7, 8: vLLM's top-k/top-p switch.
BATCH_SIZES = (1, 2, 7, 8, 9, 64, 256)
# The sampler tests run on the CPU, or with a GPU on CUDA (gpu-marked: the GPU runs select them);
# kernels/sampling.py launches Triton, which runs CPU tensors only under the interpreter.
DEVICES = (
    pytest.param("cpu", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has CUDA")),
    pytest.param("cuda", marks=pytest.mark.gpu),
)


def bf16_logits(rows: int, vocab: int, seed: int, device: str = "cpu") -> torch.Tensor:
    """Random fp32 logits on the bf16 grid, as an lm_head in bf16 makes them: ties are common."""
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(rows, vocab, generator=g)).to(torch.bfloat16).float().to(device)


@pytest.fixture
def vllm_on_cpu(monkeypatch):
    """vLLM's V1 sampler on CPU tensors: no pinned memory without a driver, and its compiled
    rank count (an integer count, exact either way) run eagerly rather than built by inductor."""
    if not torch.cuda.is_available():
        import vllm.utils.torch_utils
        import vllm.v1.sample.ops.penalties

        monkeypatch.setattr(vllm.utils.torch_utils, "PIN_MEMORY", False)
        monkeypatch.setattr(vllm.v1.sample.ops.penalties, "PIN_MEMORY", False)
        monkeypatch.setattr(torch._dynamo.config, "disable", True)


@pytest.fixture
def det_sampler(monkeypatch):
    """The patch applied for one test; monkeypatch puts vLLM's own functions back after it."""
    for module, name, _ in sampler_patch.targets():
        monkeypatch.setattr(module, name, getattr(module, name))
    sampler_patch.apply()
    yield


@functools.cache
def vllm_module_with_triton(name: str) -> types.ModuleType:
    """A private copy of a vLLM module whose `triton`, `tl` are the real ones (vLLM swaps in
    placeholders when no GPU driver is active; the interpreter needs none)."""
    import triton
    import triton.language as tl
    import triton.language.extra.libdevice as tldevice
    import vllm.triton_utils as tu

    saved = (tu.triton, tu.tl, tu.tldevice)
    tu.triton, tu.tl, tu.tldevice = triton, tl, tldevice
    try:
        spec = importlib.util.find_spec(name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        tu.triton, tu.tl, tu.tldevice = saved
    if name.endswith(".gumbel") and not torch.cuda.is_available():
        # The interpreter has no libdevice; log1p(-u) = log(1 - u) loses bits, not invariance.
        module.tldevice = types.SimpleNamespace(log1p=lambda x: tl.log(1.0 + x))
    return module


# ----------------------------------------------------------------------------- the kernels


def kept_groups_off_by_more_than_rounding(x, k, p, out, tol=TOP_P_TOL) -> list[tuple]:
    """Rows of `out` (x masked by top-k/top-p) whose kept set is not float64's: top-k's must be
    exact; a top-p tie group may differ only where its cumulative mass (float64, ascending,
    through the group) is within tol of 1 - p. Returns (row, value, mass) of the others."""
    bad = []
    vocab = x.shape[1]
    for r in range(x.shape[0]):
        xr = x[r].double().cpu()
        values, group = torch.unique(xr, return_inverse=True)  # ascending
        kept = out[r].cpu() > float("-inf")  # -inf tokens look the same masked or not
        thr = xr[kept].min() if kept.any() else -torch.inf
        if not torch.equal(kept, (xr >= thr) & (xr > -torch.inf)):
            bad.append((r, "not a threshold", None))
            continue
        t_k = -torch.inf
        if k is not None and 0 < int(k[r]) < vocab:
            t_k = torch.sort(xr).values[vocab - int(k[r])].item()
        ref_kept = values >= t_k
        mass = torch.zeros_like(values)
        if p is not None and float(p[r]) < 1.0 and xr.max() > -torch.inf:
            e = torch.where(xr >= t_k, torch.exp(xr - xr.max()), 0.0)
            mass = torch.zeros_like(values).index_add_(0, group, e).cumsum(0) / e.sum()
            ref_kept &= mass > 1.0 - float(p[r])
            ref_kept[-1] = True  # at least one token stays
        differ = ((values >= thr) != ref_kept) & (values > -torch.inf)
        near = (mass - (1.0 - float(p[r] if p is not None else 1.0))).abs() <= tol
        off = differ & ~near
        bad += [(r, v, m) for v, m in zip(values[off].tolist(), mass[off].tolist(), strict=True)]
    return bad


def random_top_k_top_p(rows: int, vocab: int, seed: int, device: str):
    """k in 1..300 (every 5th row: vocab, no top-k), p in [0.05, 0.95] (every 7th: 1, none)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(1, 300, (rows,), generator=g, dtype=torch.int32)
    k[::5] = vocab
    p = 0.05 + 0.9 * torch.rand(rows, generator=g)
    p[::7] = 1.0
    return k.to(device), p.to(device)


def test_top_k_top_p_matches_float64_reference(device):
    rows, vocab = 12, 2 * ks.TILE_ROW + 907  # three row tiles, a ragged last one
    x = bf16_logits(rows, vocab, seed=1, device=device)
    k, p = random_top_k_top_p(rows, vocab, seed=2, device=device)
    for kk, pp in ((k, None), (None, p), (k, p)):
        out = apply_top_k_top_p(x.clone(), kk, pp)
        if pp is None:
            assert torch.equal(out, apply_top_k_top_p_reference(x, kk, pp))
        assert kept_groups_off_by_more_than_rounding(x, kk, pp, out) == []


@pytest.mark.parametrize("shape", ("peaked", "flat", "ties", "masked"))
def test_top_p_kept_set_is_float64_within_rounding(device, shape):
    """Logits a model may give: peaked (few tokens hold the mass), flat (thousands do), on a
    coarse grid (large tie groups), mostly -inf (a grammar mask); p from tiny to almost 1."""
    rows, vocab = 8, 3001
    g = torch.Generator().manual_seed(7)
    x = torch.randn(rows, vocab, generator=g)
    x = {
        "peaked": 12 * x,
        "flat": 0.05 * x,
        "ties": (2 * x).round() / 2,
        "masked": torch.where(torch.rand(rows, vocab, generator=g) < 0.9, -torch.inf, x),
    }[shape].to(device)
    p = torch.tensor([1e-9, 0.1, 0.5, 0.8, 0.9, 0.95, 0.999, 0.999999], device=device)
    k = torch.tensor([vocab, 2000, 1000, 40, 1, vocab, 3000, 2], device=device)
    for kk in (None, k):
        out = apply_top_k_top_p(x.clone(), kk, p)
        assert kept_groups_off_by_more_than_rounding(x, kk, p, out) == []
    # p tiny: the max and its ties alone.
    out = apply_top_k_top_p(x[:1].clone(), None, p[:1])
    assert torch.equal(out[0] > float("-inf"), x[0] == x[0].max())


def test_top_k_keeps_every_logit_tied_with_the_kth(device):
    x = bf16_logits(1, VOCAB, seed=3, device=device)
    values, indices = x.topk(11)
    x[0, indices[0, 10]] = values[0, 9]  # the 11th largest ties the 10th
    out = apply_top_k_top_p(x.clone(), torch.tensor([10], device=device), None)
    assert int((out > float("-inf")).sum()) == 11


def test_top_k_top_p_edge_cases(device):
    vocab = 700
    inf = float("inf")
    x = bf16_logits(8, vocab, seed=8, device=device)
    x[1] = -inf  # nothing finite
    x[2] = 0.5  # one tie group
    x[3, 1:] = -inf  # one finite token
    x[4, ::2] = -0.0
    x[4, 1::2] = 0.0  # -0.0 ties +0.0
    x[5, 3] = inf  # +inf max
    x[6, 10:] = -inf  # fewer finite tokens than k
    k = torch.tensor([0, 5, 5, 5, 5, 5, 50, vocab - 1], device=device)
    p = torch.tensor([0.9, 0.9, 0.9, 0.9, 0.3, 0.9, 1.0, 1.0], device=device)
    out = apply_top_k_top_p(x.clone(), k, p)
    kept = (out > -inf).sum(1).tolist()
    assert torch.equal(out[1], x[1]) and kept[2] == vocab and kept[3] == 1 and kept[4] == vocab
    assert kept[5] == 1 and kept[6] == 10 and kept[7] == vocab - 1
    assert kept_groups_off_by_more_than_rounding(x, k, p, out) == []
    thr = top_k_top_p_threshold(x, k, p)
    assert thr[1] == -inf and thr[2] == 0.5 and thr[5] == inf
    # A row stride and a strided last dim (copied to a contiguous row, then back) change nothing.
    wide = torch.full((8, 2 * vocab), 7.0, device=device)
    wide[:, ::2] = x
    assert torch.equal(apply_top_k_top_p(wide[:, ::2], k, p), out)
    assert torch.equal(wide[:, 1::2], torch.full_like(x, 7.0))
    wide[:, :vocab] = x
    assert torch.equal(apply_top_k_top_p(wide[:, :vocab], k, p), out)
    # k <= 0, k >= vocab and p >= 1 mask nothing.
    none = top_k_top_p_threshold(x, torch.tensor([-3, 0, vocab, vocab + 9] * 2, device=device),
                                 torch.tensor([1.0, 1.5] * 4, device=device))  # fmt: skip
    assert (none == -inf).all()


def test_top_k_top_p_result_does_not_depend_on_the_path(device, monkeypatch):
    """Tiles, cut points and the list only change what is read: the same thresholds bitwise
    from the row alone (LIST_CAP 1: every round reads the row) and from a list at once."""
    rows, vocab = 6, 3001
    x = bf16_logits(rows, vocab, seed=9, device=device)
    k, p = random_top_k_top_p(rows, vocab, seed=10, device=device)
    k[1] = 2500  # top-k brackets too large for a small list
    p[2] = 0.999
    want = [top_k_top_p_threshold(x, kk, pp) for kk, pp in ((k, None), (None, p), (k, p))]
    for cap, cuts, tile in ((1, 2, 256), (64, 4, 512), (vocab, 8, 1024), (700, 32, 2048)):
        monkeypatch.setattr(ks, "LIST_CAP", cap)
        monkeypatch.setattr(ks, "CUTS_ROW", cuts)
        monkeypatch.setattr(ks, "CUTS_LIST", 2 * cuts)
        monkeypatch.setattr(ks, "TILE_ROW", tile)
        got = [top_k_top_p_threshold(x, kk, pp) for kk, pp in ((k, None), (None, p), (k, p))]
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True)), (cap, cuts, tile)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_top_k_top_p_batch_invariant(device, dtype):
    rows = 40
    x = bf16_logits(rows, VOCAB, seed=4, device=device).to(dtype)
    g = torch.Generator().manual_seed(5)
    k = torch.randint(1, VOCAB + 1, (rows,), generator=g).to(device)
    p = (0.1 + 0.9 * torch.rand(rows, generator=g)).to(device)

    def fn(t):
        m = t.shape[0]
        return apply_top_k_top_p(t.clone(), k[:m], p[:m])

    assert prefixes_that_change(fn, x, (1, 2, 7, 8, 9, 33)) == []


def test_topk_lowest_index_first(device):
    x = bf16_logits(16, VOCAB, seed=6, device=device)
    x[3] = 1.0  # a row of ties
    x[4, 100:] = -float("inf")  # fewer finite values than k
    values, indices = topk_lowest_index_first(x, 200)
    assert torch.equal(values, torch.topk(x, 200).values)
    assert torch.equal(topk_lowest_index_first(x, 5).indices, indices[:, :5])
    # Among equal values, lower indices first.
    tied = values[:, 1:] == values[:, :-1]
    assert tied.any()
    assert (indices[:, 1:][tied] > indices[:, :-1][tied]).all()
    # The packed-key version it replaces gives the same.
    for n in (2, 20, 200, VOCAB):
        assert torch.equal(topk_lowest_index_first(x, n).indices, packed_key_topk(x, n).indices)
    assert topk_lowest_index_first(x, 0).indices.shape == (16, 0)


def test_topk_lowest_index_first_batch_invariant(device):
    x = bf16_logits(40, VOCAB, seed=11, device=device)
    assert (
        prefixes_that_change(lambda t: topk_lowest_index_first(t, 20).indices, x, (1, 7, 33)) == []
    )


# ----------------------------------------------------------------------------- the patch


def test_patch_applies_and_reports_nothing_missing(det_sampler):
    sampler_patch.apply()  # idempotent
    assert sampler_patch.problems() == []
    from vllm.v1.sample.ops import topk_topp_sampler
    from vllm.v1.worker.gpu.sample import logprob

    assert topk_topp_sampler.apply_top_k_top_p is apply_top_k_top_p
    assert logprob.torch.topk is not torch.topk
    assert logprob.torch.float32 is torch.float32


def test_patch_reports_each_missing_replacement(monkeypatch):
    for module, name, _ in sampler_patch.targets():
        monkeypatch.setattr(module, name, object())
    assert len(sampler_patch.problems()) == len(sampler_patch.targets())


def test_patch_refuses_a_module_it_was_not_written_for(monkeypatch):
    from vllm.v1.worker.gpu.sample import logprob

    monkeypatch.setattr(logprob, "torch", types.SimpleNamespace())
    with pytest.raises(RuntimeError, match="not what vLLM 0.26.0 has there"):
        sampler_patch.apply()
    # Nothing was replaced: the check runs before any replacement.
    assert len(sampler_patch.problems()) == len(sampler_patch.targets())


@pytest.fixture
def vllm_sampler():
    """vLLM's own sampler functions, not det_backend's, are in place."""
    if len(sampler_patch.problems()) != len(sampler_patch.targets()):
        pytest.fail("the sampler patch was left applied in this process; these tests need vLLM's")


# ----------------------------------------------------------------------------- V1 sampler


@dataclasses.dataclass
class Request:
    params: object  # vllm.SamplingParams
    logits: torch.Tensor  # [V]
    prompt: list[int]
    output: list[int]


def requests(num: int, seed: int, targets: bool) -> list[Request]:
    """Seeded targets with every parameter the sampler knows, or filler rows of mixed kinds."""
    from vllm import SamplingParams

    rng = random.Random(seed)
    logits = bf16_logits(num, VOCAB, seed)
    kinds = [
        dict(temperature=0.7, top_k=20, logprobs=5),
        dict(temperature=1.0, top_p=0.8, logprobs=2),
        dict(temperature=1.3, min_p=0.05, logprobs=1),
        dict(temperature=0.9, top_k=40, top_p=0.9, min_p=0.02, logit_bias={7: 3.0, 99: -2.0}),
        dict(
            temperature=0.6,
            top_p=0.95,
            repetition_penalty=1.2,
            presence_penalty=0.5,
            frequency_penalty=0.3,
            logprobs=3,
        ),
        dict(temperature=1.0, logprobs=0),
    ]
    if not targets:
        kinds = [
            dict(temperature=0.0, logprobs=20),
            dict(temperature=0.8, top_k=5),
            dict(temperature=1.0, top_p=0.5, min_p=0.1, logprobs=20),
            dict(temperature=0.5, top_k=30, top_p=0.7, repetition_penalty=0.8, seed=-1),
            dict(temperature=1.2, logit_bias={5: 10.0}, frequency_penalty=1.0),
        ]
    out = []
    for i in range(num):
        kind = dict(kinds[i % len(kinds)])
        if targets or kind.pop("seed", None) is not None:
            kind["seed"] = rng.randrange(2**31)
        # The three largest tie: bf16 logits tie near the top often, and three make the order
        # of tied logprobs matter in most rows.
        values, indices = logits[i].topk(3)
        logits[i, indices] = values[0]
        if "top_k" in kind:
            # Tie the k-th largest logit with the next: top-k must keep both, at any batch size.
            values, indices = logits[i].topk(kind["top_k"] + 1)
            logits[i, indices[-1]] = values[-2]
        out.append(
            Request(
                params=SamplingParams(**kind),
                logits=logits[i],
                prompt=[rng.randrange(VOCAB) for _ in range(rng.randrange(1, 40))],
                output=[rng.randrange(VOCAB) for _ in range(rng.randrange(0, 20))],
            )
        )
    return out


def v1_sample(batch: list[Request], logprobs_mode: str, device: str):
    """vLLM's V1 Sampler on one step of `batch`, its inputs built as InputBatch builds them."""
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessors
    from vllm.v1.sample.logits_processor.builtin import (
        LogitBiasLogitsProcessor,
        MinPLogitsProcessor,
    )
    from vllm.v1.sample.metadata import SamplingMetadata
    from vllm.v1.sample.sampler import Sampler

    params = [r.params for r in batch]
    rows = len(batch)

    def per_row(f, dtype=torch.float32):
        return torch.tensor([f(sp) for sp in params], dtype=dtype, device=device)

    config = types.SimpleNamespace(scheduler_config=types.SimpleNamespace(max_num_seqs=rows))
    procs = [
        MinPLogitsProcessor(config, torch.device(device), False),
        LogitBiasLogitsProcessor(config, torch.device(device), False),
    ]
    added = [
        (i, sp, r.prompt, r.output) for i, (sp, r) in enumerate(zip(params, batch, strict=True))
    ]
    for proc in procs:
        proc.update_state(BatchUpdate(batch_size=rows, removed=[], added=added, moved=[]))
    greedy = [sp.temperature < 1e-5 for sp in params]
    prompt_len = max(len(r.prompt) for r in batch)
    num_logprobs = [sp.logprobs for sp in params if sp.logprobs is not None]
    metadata = SamplingMetadata(
        temperature=per_row(lambda sp: sp.temperature),
        all_greedy=all(greedy),
        all_random=not any(greedy),
        top_p=per_row(lambda sp: sp.top_p) if any(sp.top_p < 1 for sp in params) else None,
        top_k=(
            per_row(lambda sp: sp.top_k if 0 < sp.top_k < VOCAB else VOCAB, torch.int32)
            if any(sp.top_k > 0 for sp in params)
            else None
        ),
        generators={
            i: torch.Generator(device=device).manual_seed(sp.seed)
            for i, sp in enumerate(params)
            if sp.seed is not None
        },
        max_num_logprobs=max(num_logprobs) if num_logprobs else None,
        no_penalties=all(
            sp.repetition_penalty == 1 and sp.presence_penalty == 0 and sp.frequency_penalty == 0
            for sp in params
        ),
        prompt_token_ids=torch.tensor(
            [r.prompt + [VOCAB] * (prompt_len - len(r.prompt)) for r in batch], device=device
        ),
        frequency_penalties=per_row(lambda sp: sp.frequency_penalty),
        presence_penalties=per_row(lambda sp: sp.presence_penalty),
        repetition_penalties=per_row(lambda sp: sp.repetition_penalty),
        output_token_ids=[r.output for r in batch],
        allowed_token_ids_mask=None,
        bad_words_token_ids={},
        logitsprocs=LogitsProcessors(procs),
    )
    logits = torch.stack([r.logits for r in batch]).to(device)
    return Sampler(logprobs_mode=logprobs_mode)(logits, metadata)


def v1_result(out, row: int, request: Request) -> tuple:
    """What the request receives: its token and, if it asked, its own n + 1 logprob columns."""
    token = out.sampled_token_ids[row].cpu()
    n = request.params.logprobs
    if n is None:
        return (token,)
    lp = out.logprobs_tensors
    cols = slice(0, n + 1)
    return (
        token,
        lp.logprob_token_ids[row, cols].cpu(),
        lp.logprobs[row, cols].cpu(),
        lp.selected_token_ranks[row].cpu(),
    )


def v1_mismatches(targets, fillers, logprobs_mode, device) -> list[tuple[int, int]]:
    """(batch size, target) pairs whose result in the batch differs from the target alone."""
    alone = [v1_result(v1_sample([t], logprobs_mode, device), 0, t) for t in targets]
    mismatches = []
    for size in BATCH_SIZES[1:]:
        batch = list(fillers[:size])
        count = min(len(targets), size)
        where = [(j * size) // count for j in range(count)]
        for j, row in enumerate(where):
            batch[row] = targets[j]
        out = v1_sample(batch, logprobs_mode, device)
        for j, row in enumerate(where):
            got = v1_result(out, row, targets[j])
            if not all(torch.equal(a, b) for a, b in zip(got, alone[j], strict=True)):
                mismatches.append((size, j))
    return mismatches


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("logprobs_mode", ("raw_logprobs", "processed_logprobs"))
def test_v1_seeded_sampling_batch_invariant(det_sampler, vllm_on_cpu, device, logprobs_mode):
    targets = requests(6, seed=10, targets=True)
    fillers = requests(max(BATCH_SIZES), seed=11, targets=False)
    assert v1_mismatches(targets, fillers, logprobs_mode, device) == []


@pytest.mark.parametrize("device", DEVICES)
def test_vllm_v1_sampling_depends_on_batch(vllm_sampler, vllm_on_cpu, device):
    """Without the patch: a request asking n logprobs gets the first n of the batch's topk, in
    the tie order of that k (CPU and CUDA); on CUDA, top-k keeps the logit tied with the k-th
    alone (sort path) but not in 8 rows or more (Triton), and processed logprobs show it."""
    targets = requests(6, seed=10, targets=True)
    fillers = requests(max(BATCH_SIZES), seed=11, targets=False)
    assert v1_mismatches(targets, fillers, "processed_logprobs", device) != []


# ----------------------------------------------------------------------------- V2 sampler


def v2_sample(batch: list[Request], positions: list[int], device: str):
    """The V2 runner's Sampler.sample in its order: temperature, min-p, top-k/top-p, Gumbel-max
    keyed on (seed, position). Penalties and logit bias, which V2 applies first, have their own
    test (test_v2_penalties_and_logit_bias_row_local)."""
    gumbel = vllm_module_with_triton("vllm.v1.worker.gpu.sample.gumbel")
    min_p = vllm_module_with_triton("vllm.v1.worker.gpu.sample.min_p")
    params = [r.params for r in batch]
    rows = len(batch)

    def per_row(f, dtype=torch.float32):
        return torch.tensor([f(sp) for sp in params], dtype=dtype, device=device)

    # V2 keeps the lm_head's dtype (bf16) through sampling; the interpreter cannot store bf16.
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    logits = torch.stack([r.logits for r in batch]).to(device, dtype)
    idx_mapping = torch.arange(rows, dtype=torch.int32, device=device)
    temperature = per_row(lambda sp: sp.temperature)
    # V2 draws a random seed for requests without one.
    seeds = per_row(
        lambda sp: sp.seed if sp.seed is not None else random.randrange(2**62), torch.int64
    )
    gumbel.apply_temperature(logits, idx_mapping, temperature)
    min_p.apply_min_p(logits, idx_mapping, per_row(lambda sp: sp.min_p))
    top_k = per_row(lambda sp: sp.top_k if 0 < sp.top_k < VOCAB else VOCAB, torch.int32)
    top_p = per_row(lambda sp: sp.top_p)
    logits = apply_top_k_top_p(
        logits,
        top_k if (top_k != VOCAB).any() else None,
        top_p if (top_p != 1).any() else None,
    )
    pos = torch.tensor(positions, dtype=torch.int64, device=device)
    return gumbel.gumbel_sample(
        logits, idx_mapping, temperature, seeds, pos, apply_temperature=False
    )


@pytest.mark.parametrize("device", DEVICES)
def test_v2_seeded_sampling_batch_invariant(device):
    """Chunked prefill and preemption only move a (request, position) to another batch."""
    targets = requests(6, seed=20, targets=True)
    fillers = requests(max(BATCH_SIZES), seed=21, targets=False)
    positions = [40 + 3 * j for j in range(len(targets))]
    alone = [v2_sample([t], [positions[j]], device) for j, t in enumerate(targets)]
    for size in (2, 7, 8, 9, 256):  # 64 left out: the interpreter runs three kernels per row
        batch, pos = list(fillers[:size]), list(range(size))
        count = min(len(targets), size)
        where = [(j * size) // count for j in range(count)]
        for j, row in enumerate(where):
            batch[row], pos[row] = targets[j], positions[j]
        tokens = v2_sample(batch, pos, device)
        for j, row in enumerate(where):
            assert torch.equal(tokens[row : row + 1], alone[j]), (size, j)


def v2_logprob_columns(logprob, logits, sampled, n_max, rows, n):
    """Each of `rows`, with its own n + 1 of compute_topk_scores's columns."""
    out = logprob.compute_topk_scores(logits, n_max, sampled)
    return [
        (out.logprob_token_ids[r, : n + 1], out.logprobs[r, : n + 1], out.selected_token_ranks[r])
        for r in rows
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("patched", (True, False), ids=("det_backend", "vllm"))
def test_v2_logprobs_batch_invariant(monkeypatch, device, patched):
    """compute_topk_scores with k = the batch's largest logprobs: each row's own n + 1 columns."""
    if not patched and device == "cuda":
        pytest.skip("how CUDA's topk orders ties for k=5 and k=20 of 64 rows is not established")
    logprob = vllm_module_with_triton("vllm.v1.worker.gpu.sample.logprob")
    monkeypatch.setattr(
        logprob, "torch", sampler_patch.TORCH_WITH_ROW_LOCAL_TOPK if patched else torch
    )
    logits = bf16_logits(64, VOCAB, seed=30, device=device).to(torch.bfloat16)
    sampled = torch.randint(0, VOCAB, (64,), device=device)
    batch = v2_logprob_columns(logprob, logits, sampled, 20, range(64), 5)
    alone = [
        v2_logprob_columns(logprob, logits[r : r + 1], sampled[r : r + 1], 5, [0], 5)[0]
        for r in range(64)
    ]
    same = all(
        torch.equal(a, b)
        for ra, rb in zip(batch, alone, strict=True)
        for a, b in zip(ra, rb, strict=True)
    )
    assert same == patched


# ------------------------------------------------- penalties and logit bias (patches/SAMPLER.md)


@dataclasses.dataclass
class Biased:
    logits: torch.Tensor  # [V]
    prompt: list[int]
    output: list[int]
    rep: float
    freq: float
    pres: float
    bias: dict[int, float]


def biased_requests(num: int, seed: int) -> list[Biased]:
    """Rows with penalties and logit bias in every mix, and rows with neither (their kernels'
    early returns); tokens repeat, so counts above 1 occur."""
    rng = random.Random(seed)
    logits = bf16_logits(num, VOCAB, seed)
    kinds = [(1.2, 0.3, 0.5), (1.0, 0.0, 0.0), (0.8, 0.0, 1.0), (1.0, 1.5, 0.0), (1.1, -0.4, -0.2)]
    out = []
    for i in range(num):
        rep, freq, pres = kinds[i % len(kinds)]
        bias = {rng.randrange(VOCAB): rng.uniform(-8, 8) for _ in range(rng.choice((0, 1, 3)))}
        pool = [rng.randrange(VOCAB) for _ in range(30)]
        out.append(
            Biased(
                logits=logits[i],
                prompt=[rng.choice(pool) for _ in range(rng.randrange(1, 60))],
                output=[rng.choice(pool) for _ in range(rng.randrange(0, 40))],
                rep=rep,
                freq=freq,
                pres=pres,
                bias=bias,
            )
        )
    return out


def v2_bias_and_penalties(batch: list[Biased], state_rows: list[int], resumed: bool):
    """The V2 runner's first two steps (v1/worker/gpu/sample/sampler.py:171-182): logit bias,
    then penalties, with each request's counts in persistent state row `state_rows[i]`.
    resumed: counts built by one bincount over prompt + output (a request added again after
    preemption, v1/worker/gpu/model_runner.py:791-801); else bincount over the prompt, then
    one increment per output token as _post_update_kernel does (input_batch.py:496-503)."""
    pen = vllm_module_with_triton("vllm.v1.worker.gpu.sample.penalties")
    lb = vllm_module_with_triton("vllm.v1.worker.gpu.sample.logit_bias")
    states = max(state_rows) + 1
    longest = max(len(r.prompt) + len(r.output) for r in batch)
    all_tokens = torch.zeros(states, longest, dtype=torch.int32)
    prompt_len = torch.zeros(states, dtype=torch.int32)
    prefill_len = torch.zeros(states, dtype=torch.int32)
    rep, freq, pres = (torch.ones(states), torch.zeros(states), torch.zeros(states))
    num_bias = torch.zeros(states, dtype=torch.int32)
    bias_ids = torch.zeros(states, lb.MAX_NUM_LOGIT_BIAS_TOKENS, dtype=torch.int32)
    bias = torch.zeros(states, lb.MAX_NUM_LOGIT_BIAS_TOKENS)
    for r, s in zip(batch, state_rows, strict=True):
        tokens = r.prompt + r.output
        all_tokens[s, : len(tokens)] = torch.tensor(tokens, dtype=torch.int32)
        prompt_len[s] = len(r.prompt)
        prefill_len[s] = len(tokens) if resumed else len(r.prompt)
        rep[s], freq[s], pres[s] = r.rep, r.freq, r.pres
        num_bias[s] = len(r.bias)
        bias_ids[s, : len(r.bias)] = torch.tensor(list(r.bias), dtype=torch.int32)
        bias[s, : len(r.bias)] = torch.tensor(list(r.bias.values()))
    idx = torch.tensor(state_rows, dtype=torch.int32)
    prompt_mask = torch.zeros(states, (VOCAB + 31) // 32, dtype=torch.int32)
    counts = torch.zeros(states, VOCAB, dtype=torch.int32)
    pen.bincount(
        idx, all_tokens, prompt_len, prefill_len, prompt_mask, counts, int(prefill_len.max())
    )
    if not resumed:
        for r, s in zip(batch, state_rows, strict=True):
            for t in r.output:
                counts[s, t] += 1
    logits = torch.stack([r.logits for r in batch])
    rows = len(batch)
    none = torch.zeros(states, dtype=torch.int32)
    lb.apply_logit_bias(
        logits,
        idx,
        torch.zeros(rows, dtype=torch.int64),  # positions: only min_tokens reads them
        none,  # no allowed_token_ids
        torch.zeros(states, lb.MAX_NUM_ALLOWED_TOKEN_IDS, dtype=torch.int32),
        num_bias,
        bias_ids,
        bias,
        none,  # no min_tokens
        none,
        torch.zeros(states, lb.MAX_NUM_STOP_TOKEN_IDS, dtype=torch.int32),
    )
    pen.apply_penalties(
        logits,
        idx,
        torch.zeros(rows, dtype=torch.int32),  # input ids: read only for draft tokens
        torch.zeros(rows, dtype=torch.int32),  # no draft tokens: local position 0
        rep,
        freq,
        pres,
        prompt_mask,
        counts,
    )
    return logits


def test_v2_penalties_and_logit_bias_row_local(vllm_on_cpu):
    """Each row's logits after V2's logit-bias and penalty kernels are the same alone and in
    batches of 2..64 (at other state rows), and the same whether its counts were built at
    once (after preemption) or one token at a time (decode); alone, they equal V1's (the
    same formulas), which checks the state this test builds."""
    targets = biased_requests(10, seed=60)
    fillers = biased_requests(64, seed=61)
    alone = [v2_bias_and_penalties([t], [0], resumed=False) for t in targets]
    for j, t in enumerate(targets):
        assert torch.equal(v1_bias_and_penalties([t]), alone[j]), j
    for j, t in enumerate(targets):
        assert torch.equal(v2_bias_and_penalties([t], [3], resumed=True), alone[j]), j
    changed = sum(not torch.equal(a[0], t.logits) for a, t in zip(alone, targets, strict=True))
    assert changed >= 7  # every target but those with neither penalties nor bias
    for size in (2, 7, 8, 9, 64):
        batch = list(fillers[:size])
        count = min(len(targets), size)
        where = [(j * size) // count for j in range(count)]
        for j, row in enumerate(where):
            batch[row] = targets[j]
        state_rows = random.Random(size).sample(range(2 * size), size)
        for resumed in (False, True):
            out = v2_bias_and_penalties(batch, state_rows, resumed)
            for j, row in enumerate(where):
                assert torch.equal(out[row : row + 1], alone[j]), (size, j, resumed)


def v1_bias_and_penalties(batch: list[Biased]) -> torch.Tensor:
    """V1's LogitBiasLogitsProcessor (v1/sample/logits_processor/builtin.py:119), then
    apply_penalties (model_executor/layers/utils.py:51), as v1/sample/sampler.py:398-403 runs
    them; prompts and outputs padded to the batch's longest with the id VOCAB, which only a
    dropped column counts."""
    from vllm.model_executor.layers.utils import apply_penalties
    from vllm.v1.sample.logits_processor import BatchUpdate
    from vllm.v1.sample.logits_processor.builtin import LogitBiasLogitsProcessor

    def padded(lists):
        n = max(1, max(len(x) for x in lists))
        return torch.tensor([x + [VOCAB] * (n - len(x)) for x in lists])

    logits = torch.stack([r.logits for r in batch])
    proc = LogitBiasLogitsProcessor(None, torch.device("cpu"), False)
    added = [
        (i, types.SimpleNamespace(logit_bias=r.bias or None), r.prompt, r.output)
        for i, r in enumerate(batch)
    ]
    proc.update_state(BatchUpdate(batch_size=len(batch), removed=[], added=added, moved=[]))
    return apply_penalties(
        proc.apply(logits),
        padded([r.prompt for r in batch]),
        padded([r.output for r in batch]),
        torch.tensor([r.pres for r in batch]),
        torch.tensor([r.freq for r in batch]),
        torch.tensor([r.rep for r in batch]),
    )


def test_v1_penalties_and_logit_bias_row_local(vllm_on_cpu):
    targets = biased_requests(10, seed=70)
    fillers = biased_requests(256, seed=71)
    alone = [v1_bias_and_penalties([t]) for t in targets]
    for size in BATCH_SIZES[1:]:
        batch = list(fillers[:size])
        count = min(len(targets), size)
        where = [(j * size) // count for j in range(count)]
        for j, row in enumerate(where):
            batch[row] = targets[j]
        out = v1_bias_and_penalties(batch)
        for j, row in enumerate(where):
            assert torch.equal(out[row : row + 1], alone[j]), (size, j)


# ----------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_top_k_top_p_batch_invariant_at_full_vocab_gpu(dtype):
    rows, vocab = 256, 152064
    x = bf16_logits(rows, vocab, seed=50, device="cuda").to(dtype)
    g = torch.Generator().manual_seed(51)
    k = torch.randint(1, 2000, (rows,), generator=g).cuda()
    k[::3] = vocab
    p = (0.5 + 0.5 * torch.rand(rows, generator=g)).cuda()

    def fn(t):
        m = t.shape[0]
        return apply_top_k_top_p(t.clone(), k[:m], p[:m])

    assert prefixes_that_change(fn, x, (1, 2, 7, 8, 9, 64, 255)) == []


@pytest.mark.gpu
@pytest.mark.parametrize("shape", ("randn", "peaked"))
def test_top_k_top_p_matches_float64_at_full_vocab_gpu(shape):
    rows, vocab = 48, 152064
    x = bf16_logits(rows, vocab, seed=52, device="cuda")
    if shape == "peaked":
        x = (4 * x).to(torch.bfloat16).float()  # a few tokens hold the mass
    k, p = random_top_k_top_p(rows, vocab, seed=53, device="cuda")
    k[3::6] = 20000  # brackets larger than the list
    p[4::6] = 0.999
    for kk, pp in ((k, None), (None, p), (k, p)):
        out = apply_top_k_top_p(x.clone(), kk, pp)
        if pp is None:
            assert torch.equal(out, apply_top_k_top_p_reference(x, kk, pp))
        assert kept_groups_off_by_more_than_rounding(x, kk, pp, out) == []


@pytest.mark.gpu
def test_top_k_top_p_result_does_not_depend_on_the_path_gpu(monkeypatch):
    """Each launch parameter compiles another kernel: its exp2 weights, and so every
    threshold, must come out the same bitwise."""
    rows, vocab = 64, 152064
    x = bf16_logits(rows, vocab, seed=54, device="cuda").to(torch.bfloat16)
    k, p = random_top_k_top_p(rows, vocab, seed=55, device="cuda")
    k[1::8] = 30000
    p[2::8] = 0.999
    modes = ((k, None), (None, p), (k, p))
    want = [top_k_top_p_threshold(x, kk, pp) for kk, pp in modes]
    for cap, cuts, tile in ((1, 4, 256), (1024, 8, 1024), (vocab, 32, 4096)):
        monkeypatch.setattr(ks, "LIST_CAP", cap)
        monkeypatch.setattr(ks, "CUTS_ROW", cuts)
        monkeypatch.setattr(ks, "CUTS_LIST", cuts)
        monkeypatch.setattr(ks, "TILE_ROW", tile)
        got = [top_k_top_p_threshold(x, kk, pp) for kk, pp in modes]
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True)), (cap, cuts, tile)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_topk_lowest_index_first_at_full_vocab_gpu(dtype):
    """The same as the packed-key version it replaced, alone and in any batch."""
    rows, vocab = 256, 152064
    x = bf16_logits(rows, vocab, seed=56, device="cuda").log_softmax(-1).to(dtype)
    for n in (2, 20, 500):
        got = topk_lowest_index_first(x, n)
        want = packed_key_topk(x, n)
        assert torch.equal(got.indices, want.indices) and torch.equal(got.values, want.values)
    fn = lambda t: topk_lowest_index_first(t, 20).indices  # noqa: E731
    assert prefixes_that_change(fn, x, (1, 2, 7, 8, 9, 64, 255)) == []


@pytest.mark.gpu
def test_vllm_top_k_top_p_depends_on_batch_size_on_gpu():
    """vLLM 0.26 on CUDA: fewer than 8 rows take the sort path (keeps every logit tied with the
    k-th), 8 or more the Triton pivot search (keeps exactly k). Ours: one set at every size."""
    from vllm.v1.sample.ops import topk_topp_sampler

    rows, vocab = 16, 32000
    x = bf16_logits(rows, vocab, seed=40, device="cuda")
    k = torch.full((rows,), 50, dtype=torch.int32, device="cuda")
    values, indices = x.topk(51)
    x.scatter_(1, indices[:, 50:], values[:, 49:50])  # the 51st ties the 50th in every row

    def alone_vs_batch(fn) -> bool:
        full = fn(x.clone(), k, None)
        return all(
            torch.equal(fn(x[r : r + 1].clone(), k[r : r + 1], None), full[r : r + 1])
            for r in range(rows)
        )

    assert not alone_vs_batch(topk_topp_sampler.apply_top_k_top_p)
    assert alone_vs_batch(apply_top_k_top_p)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_vllm_v1_generator_rewind_matches_one_draw_on_gpu(dtype):
    """The V1 runner undoes a discarded chunked-prefill draw with set_offset(offset - 4)
    (gpu_model_runner.py:3692-3695): one exponential_ over a vocabulary row must advance the
    CUDA Philox offset by exactly 4, whatever the batch the row sits in."""
    for rows in (1, 8, 256):
        q = torch.empty(rows, 152064, dtype=dtype, device="cuda")
        g = torch.Generator(device="cuda").manual_seed(7)
        before = g.get_offset()
        q[rows // 2].exponential_(generator=g)
        assert g.get_offset() - before == 4


def test_topk_one_column_takes_the_first_of_tied_maxima():
    """k=1 (the common logprobs=1 case) uses max, which must pick what the packed keys pick."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(37, 1000, generator=gen).to(torch.bfloat16).float()
    x[:, 500] = x.max(dim=-1).values  # a tie at the max, after the first maximum
    x[3, :] = 1.0  # a whole row tied
    got = topk_lowest_index_first(x, 1)
    keys = topk_lowest_index_first(x, 2)  # the packed-key path
    assert torch.equal(got.indices, keys.indices[:, :1])
    assert torch.equal(got.values, keys.values[:, :1])
    assert got.indices[3, 0].item() == 0
