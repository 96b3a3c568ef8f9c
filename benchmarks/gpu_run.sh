#!/usr/bin/env bash
# On the lent GPU host (README, "Benchmarks"): install this checkout next to the staged vLLM,
# then run what is asked, writing logs and JSON under $OUT.
#   bash benchmarks/gpu_run.sh kernels    gpu-marked kernel tests
#   bash benchmarks/gpu_run.sh fa3        the fa3 attention variant: its GPU tests and selection tests (fa3.log)
#   bash benchmarks/gpu_run.sh flashinfer the flashinfer attention variant: its GPU tests and selection
#                                         tests (flashinfer.log); the first call JIT-compiles
#                                         FlashInfer's FA2 prefill kernels with nvcc (minutes)
#                                         unless .flashinfer_aot_sm90 is carried (see below)
#   bash benchmarks/gpu_run.sh e2e        end-to-end engine test (+ e2e.json)
#   bash benchmarks/gpu_run.sh tma-probe  TMA matmul forms, each in its own process (tma_probe.json)
#   bash benchmarks/gpu_run.sh smoke      the demo on the small model (16 prompts)
#   bash benchmarks/gpu_run.sh gemm-sweep every candidate tile at every point (gemm_sweep.json);
#                                         not the TMA kind unless GEMM_ARGS has --kinds: first
#                                         KERNELS_K=tma_config_finishes ... kernels (one process
#                                         per TMA config, 60 s each at most)
#   bash benchmarks/gpu_run.sh gemm       the GEMM benchmark with the committed table (gemm.json)
#   bash benchmarks/gpu_run.sh rmsnorm    RMSNorm vs vLLM's CUDA ops (rmsnorm.json)
#   bash benchmarks/gpu_run.sh rmsnorm-sweep  RMSNorm launch candidates per hidden size, each
#                                         bit-checked across row counts (rmsnorm_sweep.json)
#   bash benchmarks/gpu_run.sh attention  attention vs FA3 (attention.json)
#   bash benchmarks/gpu_run.sh matrix     invariance matrix through vllm serve (invariance_matrix.json);
#                                         DET_MATRIX_TP=2: every server at --tensor-parallel-size 2;
#                                         DET_MATRIX_PROMPTS: prompts per pass (default 256);
#                                         DET_BACKEND_ATTENTION=fa3|flashinfer: the det servers' variant
#   bash benchmarks/gpu_run.sh seeded     seeded sampling (penalties, logit bias) through vllm serve:
#                                         4 det cells + the default control (invariance_matrix_seeded.json),
#                                         then offline after preemption (e2e_seeded_preemption.json);
#                                         seeded-serve / seeded-offline run one part each
#   bash benchmarks/gpu_run.sh ab         end-to-end throughput A/B (ab_throughput.json)
#   bash benchmarks/gpu_run.sh profile    where the end-to-end time goes: each engine's kernel time
#                                         by category under torch.profiler (profile_e2e.json);
#                                         PROFILE_BACKENDS (default default,det), PROFILE_WORKLOADS
#   bash benchmarks/gpu_run.sh moe        our MoE vs vLLM's fused MoE (moe.json)
#   bash benchmarks/gpu_run.sh sampling   our top-k/top-p and logprob topk vs vLLM's (sampling.json)
#   bash benchmarks/gpu_run.sh sampling-sweep  top-k/top-p launch parameters (sampling_sweep.json)
#   bash benchmarks/gpu_run.sh tp         2 GPUs, one call (< 10 min): TP-invariance kernel tests
#                                         on one GPU (tp_kernels.log), the tree-GEMM cost
#                                         (tp_gemm.json), then -m multigpu: TP=1 vs TP=2 with and
#                                         without DET_BACKEND_TP_INVARIANT (tp_invariance.json;
#                                         enforce_eager unless TP_INV_EAGER=0) and the TP=2
#                                         tp_demo test (tp_demo.json), log tp_multigpu.log
#   bash benchmarks/gpu_run.sh install    only install (then SKIP_INSTALL=1 for modes run side by side,
#                                         one per GPU: CUDA_VISIBLE_DEVICES and OUT of their own)
#   bash benchmarks/gpu_run.sh all
set -uo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-$REPO/out}"; mkdir -p "$OUT"
# pytest and its needs travel as wheels in .whl/ (carried with the call), when present.
# SKIP_INSTALL=1: /tmp/site is already installed (two modes run at once, one per GPU, after
# one `bash benchmarks/gpu_run.sh install`: two pip installs into one target would collide).
if [[ "${SKIP_INSTALL:-0}" != 1 ]]; then
  if compgen -G "$REPO/.whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site "$REPO"/.whl/*.whl 2>&1 | grep -v -i warning
  fi
  python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/site "$REPO" 2>&1 \
    | grep -v -i -E 'warning|already exists' || true
fi
export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
# Run from outside the checkout: its det_backend/ folder must not shadow the installed package.
cd /tmp
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
# A Triton cache prebuilt for sm_90 without a GPU (benchmarks/prebuild_cache.py), when carried:
# copied somewhere writable (the carried copy may be read-only), its recorded absolute paths
# pointed there, and used by every mode. After each mode, cache_report says how many kernels
# that mode still compiled (misses, by name) and how many prebuilt ones it read (hits, from
# access times: 0 hits with 0 misses means a noatime mount). Log: $OUT/triton_cache.txt.
# Modes side by side (SKIP_INSTALL=1, one per GPU) each get their own copy and mark.
TC_SUFFIX="${CUDA_VISIBLE_DEVICES:+_gpu${CUDA_VISIBLE_DEVICES//,/_}}"
TC_MARK=/tmp/.triton_cache_mark$TC_SUFFIX
rm -f "$TC_MARK"
if [[ -d "$REPO/.triton_cache_sm90" ]]; then
  export TRITON_CACHE_DIR=/tmp/triton_cache_sm90$TC_SUFFIX
  rm -rf "$TRITON_CACHE_DIR" && cp -r "$REPO/.triton_cache_sm90" "$TRITON_CACHE_DIR"
  chmod -R u+w "$TRITON_CACHE_DIR"
  python3 "$REPO/benchmarks/prebuild_cache.py" --relocate "$TRITON_CACHE_DIR" 2>&1 | tee "$OUT/triton_cache.txt"
  # Old access times, so that reading a prebuilt kernel updates them (relatime).
  find "$TRITON_CACHE_DIR" -type f -exec touch -a -d 2000-01-01 {} +
  touch "$TC_MARK"
fi
# TRITON_EXPORT=1: after each mode, what this call compiled (kernels and launchers, into the
# carried cache's copy or Triton's default cache) goes to $OUT/triton_new.tgz; merge it here with
# `python benchmarks/prebuild_cache.py --merge triton_new.tgz`, so the next session carries it.
# Opt-in: it is one more file under $OUT, and a call brings back 8 at most.
TX_MARK=/tmp/.triton_export_mark$TC_SUFFIX
touch "$TX_MARK"
triton_export() {
  [[ "${TRITON_EXPORT:-0}" == 1 ]] || return 0
  local dir="${TRITON_CACHE_DIR:-$HOME/.triton/cache}"
  [[ -d "$dir" ]] && python3 "$REPO/benchmarks/prebuild_cache.py" --export "$dir" "$TX_MARK" \
    "$OUT/triton_new.tgz" 2>&1 | tee -a "$OUT/triton_cache.txt"
}
cache_report() {
  [[ -f "$TC_MARK" ]] || return 0
  local mark="$TC_MARK" new hits launchers
  new=$(find "$TRITON_CACHE_DIR" -name '__grp__*.json' -newer "$mark" | sed 's/.*__grp__//; s/\.json$//' | sort | uniq -c | tr -s ' \n' ' ')
  hits=$(find "$TRITON_CACHE_DIR" -name '*.cubin' -anewer "$mark" ! -newer "$mark" | wc -l)
  launchers=$(find "$TRITON_CACHE_DIR" -name '__triton_launcher*' -newer "$mark" | wc -l)
  echo "triton cache after $1: $(find "$TRITON_CACHE_DIR" -name '__grp__*.json' -newer "$mark" | wc -l) compiled here (misses:${new:- none}), $hits prebuilt read (hits), $launchers launchers built" \
    | tee -a "$OUT/triton_cache.txt"
  touch "$mark"
}
# FlashInfer modules prebuilt for sm_90a without a GPU (benchmarks/prebuild_flashinfer.py), when
# carried: a minimal flashinfer_jit_cache package, put on PYTHONPATH as it is (FlashInfer only
# dlopens from it, so a read-only copy does), from which FlashInfer loads those modules instead
# of compiling them with nvcc. Its report (modules found, loaded) decides: not used if this
# FlashInfer refuses it (another version: flashinfer would not even import), a module does not
# load here, or the GPU is not sm_90. After each mode, fi_report names the modules FlashInfer
# still compiled: new .so files in its JIT workspace. Log: $OUT/flashinfer_aot.txt.
# The mark is this script's own: two modes may run side by side (SKIP_INSTALL=1).
FI_MARK=/tmp/.flashinfer_jit_mark.$$
FI_JIT_DIR="${FLASHINFER_WORKSPACE_BASE:-$HOME}/.cache/flashinfer"
if [[ -d "$REPO/.flashinfer_aot_sm90/flashinfer_jit_cache" ]]; then
  # pipefail: the report's exit status, not tee's.
  if PYTHONPATH="$PYTHONPATH:$REPO/.flashinfer_aot_sm90" python3 "$REPO/benchmarks/prebuild_flashinfer.py" \
    --report 2>&1 | tee "$OUT/flashinfer_aot.txt"; then
    export PYTHONPATH="$PYTHONPATH:$REPO/.flashinfer_aot_sm90"
    mkdir -p "$FI_JIT_DIR" && touch "$FI_MARK"
  fi
fi
fi_report() {
  [[ -f "$FI_MARK" ]] || return 0
  local built
  built=$(find "$FI_JIT_DIR" -name '*.so' -newer "$FI_MARK" -printf '%f ')
  echo "flashinfer after $1: modules JIT-compiled here: $(wc -w <<< "$built")${built:+ ($built)}" \
    | tee -a "$OUT/flashinfer_aot.txt"
  touch "$FI_MARK"
}
after_mode() { cache_report "$1"; fi_report "$1"; triton_export; }
what=" ${*:-all} "
rc=0
if [[ $what == *" tp "* || "${AB_TP:-1}" != 1 || "${DET_MATRIX_TP:-1}" != 1 ]]; then
  # Several GPUs: vLLM skips its P2P check by default (envs.py VLLM_SKIP_P2P_CHECK) and trusts
  # the driver. On two H200s here (2026-11-26) vLLM's default engine at TP=2 hung for a minute
  # in its first forward before CUDA-graph capture, then died with an illegal memory access;
  # vLLM's note on that variable names exactly this hang of the custom all-reduce. With the
  # check on, vLLM tests P2P and turns its custom all-reduce off where P2P does not work.
  export VLLM_SKIP_P2P_CHECK=0
  # It died so again with the check on, and on two H100s with the custom all-reduce off
  # (2026-11-26). Likely cause, and a rule of these hosts: vLLM's FlashInfer all-reduce fusion
  # (on at TP > 1 on Hopper) creates an NVLink multicast object, which the device library's
  # KINDS.md forbids here. So, not to be overridden here: every engine of the demos, benchmarks
  # and serve matrix starts with that pass and vLLM's custom all-reduce off (det_backend/demo.py
  # NCCL_ONLY says why and how; DET_DEMO_KEEP_CUSTOM_ALL_REDUCE=1 keeps the custom all-reduce),
  # and any FlashInfer all-reduce workspace still built is the IPC one, without multicast.
  export DET_DEMO_NCCL_ONLY=1
  export VLLM_FLASHINFER_ALLREDUCE_BACKEND=trtllm
  # An engine that hangs is killed after this long, so the call goes on to the next one.
  export DET_ENGINE_TIMEOUT_S="${DET_ENGINE_TIMEOUT_S:-420}"
fi
if [[ $what == *" kernels "* || $what == *" all "* ]]; then
  # KERNELS_K: a pytest -k expression choosing among the kernel tests (default: all).
  # -v: one line per test, so a call cut at its time limit still names what passed.
  python3 -m pytest -v -m "gpu and not slow" "$REPO/tests" -p no:cacheprovider --continue-on-collection-errors \
    ${KERNELS_K:+-k "$KERNELS_K"} 2>&1 | tee "$OUT/kernels.log" | grep -v -E " PASSED | SKIPPED |^$"
  rc=$(( rc | ${PIPESTATUS[0]} ))
  after_mode kernels
fi
if [[ $what == *" fa3 "* ]]; then
  python3 -m pytest -q "$REPO/tests/test_attention_fa3.py" "$REPO/tests/test_attention_variants.py" \
    -p no:cacheprovider 2>&1 | tee "$OUT/fa3.log" | tail -40
  rc=$(( rc | ${PIPESTATUS[0]} ))
  after_mode fa3
fi
if [[ $what == *" flashinfer "* ]]; then
  # FI_K: a pytest -k expression choosing among the flashinfer tests (default: all).
  python3 -m pytest -v "$REPO/tests/test_attention_flashinfer.py" "$REPO/tests/test_attention_variants.py" \
    -p no:cacheprovider ${FI_K:+-k "$FI_K"} 2>&1 | tee "$OUT/flashinfer.log" | grep -v -E " PASSED |^$" | tail -60
  rc=$(( rc | ${PIPESTATUS[0]} ))
  after_mode flashinfer
fi
if [[ $what == *" smoke "* || $what == *" all "* ]]; then
  python3 -m det_backend.demo --config small --prompts 16 --max-tokens 32 --json "$OUT/smoke.json" \
    2>&1 | tee "$OUT/smoke.log" | tail -40
  rc=$(( rc | ${PIPESTATUS[0]} ))
  after_mode smoke
fi
if [[ $what == *" e2e "* || $what == *" all "* ]]; then
  # E2E_K: a pytest -k expression choosing among the end-to-end tests (default: all), e.g.
  # E2E_K=sliding: the sliding-window model (mistral-sw-4l) through the triton variant;
  # E2E_K=unset: DET_BACKEND_ATTENTION unset, the variant picked by the engine build.
  DET_RESULTS_DIR="$OUT" python3 -m pytest -q -s -m slow "$REPO/tests/test_e2e.py" -p no:cacheprovider \
    ${E2E_K:+-k "$E2E_K"} 2>&1 \
    | tee "$OUT/e2e.log" | grep -v -E '^\s*$' | tail -60
  rc=$(( rc | ${PIPESTATUS[0]} ))
  after_mode e2e
fi
if [[ $what == *" tma-probe "* ]]; then
  # Forms of a TMA matmul, one process each with a time limit, every step logged (why the
  # "tma_persistent" kind never finished on a GPU; TMA_PROBE_ARGS: e.g. --forms grid,noflat).
  python3 "$REPO/benchmarks/tma_probe.py" ${TMA_PROBE_ARGS:-} --out "$OUT/tma_probe.json" \
    2>&1 | tee "$OUT/tma_probe.log" | tail -40
  rc=$(( rc | ${PIPESTATUS[0]} ))
  after_mode tma-probe
fi
if [[ $what == *" gemm-sweep "* ]]; then
  # GEMM_ARGS: more gemm.py arguments, e.g. --layers llama-3-8b:o,llama-3-8b:down (one call
  # per part keeps each under the per-command limit; gemm_table.py joins the parts).
  python3 "$REPO/benchmarks/gemm.py" --sweep ${GEMM_ARGS:-} --out "$OUT/gemm_sweep.json" > "$OUT/gemm_sweep.log" 2>&1
  rc=$(( rc | $? )); tail -5 "$OUT/gemm_sweep.log"
  after_mode gemm-sweep
fi
if [[ $what == *" gemm "* ]]; then
  python3 "$REPO/benchmarks/gemm.py" --out "$OUT/gemm.json" 2>&1 | tee "$OUT/gemm.log" | tail -130
  rc=$(( rc | ${PIPESTATUS[0]} ))
  after_mode gemm
fi
if [[ $what == *" matrix "* ]]; then
  DET_RESULTS_DIR="$OUT" python3 -m pytest -q -m slow "$REPO/tests/test_serve_matrix.py" \
    -p no:cacheprovider > "$OUT/matrix.log" 2>&1
  rc=$(( rc | $? )); tail -15 "$OUT/matrix.log"
  after_mode matrix
fi
if [[ $what == *" seeded "* || $what == *" seeded-serve "* ]]; then
  # DET_MATRIX_PROMPTS: prompts per pass (default 64; four server starts fit one call).
  start=$SECONDS
  DET_RESULTS_DIR="$OUT" python3 -m pytest -q -m slow "$REPO/tests/test_serve_seeded.py" \
    -p no:cacheprovider > "$OUT/seeded_serve.log" 2>&1
  rc=$(( rc | $? )); echo "seeded-serve: $(( SECONDS - start )) s" | tee -a "$OUT/seeded_times.txt"
  tail -15 "$OUT/seeded_serve.log"
  after_mode seeded-serve
fi
if [[ $what == *" seeded "* || $what == *" seeded-offline "* ]]; then
  start=$SECONDS
  DET_RESULTS_DIR="$OUT" python3 -m pytest -q -s -m slow "$REPO/tests/test_e2e.py" \
    -k seeded_sampling_after_preemption -p no:cacheprovider 2>&1 \
    | tee "$OUT/seeded_offline.log" | grep -v -E '^\s*$' | tail -30
  rc=$(( rc | ${PIPESTATUS[0]} ))
  echo "seeded-offline: $(( SECONDS - start )) s" | tee -a "$OUT/seeded_times.txt"
  after_mode seeded-offline
fi
if [[ $what == *" sampling-sweep "* ]]; then
  python3 "$REPO/benchmarks/sampling.py" --sweep --out "$OUT/sampling_sweep.json" \
    > "$OUT/sampling_sweep.log" 2>&1
  rc=$(( rc | $? )); tail -20 "$OUT/sampling_sweep.log"
  after_mode sampling-sweep
fi
if [[ $what == *" rmsnorm-sweep "* ]]; then
  # RMS_HIDDEN: the hidden sizes to sweep, comma-separated (default 4096,5120,8192).
  python3 "$REPO/benchmarks/rmsnorm.py" --sweep ${RMS_HIDDEN:+--hidden "$RMS_HIDDEN"} --out "$OUT/rmsnorm_sweep.json" \
    > "$OUT/rmsnorm_sweep.log" 2>&1
  rc=$(( rc | $? )); tail -6 "$OUT/rmsnorm_sweep.log"
  after_mode rmsnorm-sweep
fi
for bench in rmsnorm attention moe sampling; do
  if [[ $what == *" $bench "* ]]; then
    python3 "$REPO/benchmarks/$bench.py" --out "$OUT/$bench.json" > "$OUT/$bench.log" 2>&1
    rc=$(( rc | $? )); tail -4 "$OUT/$bench.log"
    after_mode "$bench"
  fi
done
if [[ $what == *" tp "* ]]; then
  # Quick parts first: if the engine part overruns the call, these are already under $OUT.
  # TP_ONE_GPU=0 skips the two one-GPU parts (run them on a one-GPU host, where they count less).
  if [[ "${TP_ONE_GPU:-1}" == 1 ]]; then
  python3 -m pytest -q -m "gpu and not slow" "$REPO/tests/test_tp_invariance.py" -p no:cacheprovider \
    2>&1 | tee "$OUT/tp_kernels.log" | tail -5
  rc=$(( rc | ${PIPESTATUS[0]} ))
  python3 "$REPO/benchmarks/tp_gemm.py" --out "$OUT/tp_gemm.json" > "$OUT/tp_gemm.log" 2>&1
  rc=$(( rc | $? )); tail -6 "$OUT/tp_gemm.log"
  fi
  # 7 engine starts: TP=1 x2 side by side, TP=2 x2 (eager), then tp_demo's 3 at TP=2 (compiled).
  # On two H200s (2026-11-26) the first part took 6 min: one call each, with TP_K=tp1_equals_tp2
  # and TP_K=tp2_alone (a pytest -k expression).
  TP_INV_EAGER="${TP_INV_EAGER:-1}" DET_RESULTS_DIR="$OUT" python3 -m pytest -q -s -m multigpu \
    "$REPO/tests/test_tp_invariance.py" "$REPO/tests/test_tensor_parallel.py" -p no:cacheprovider \
    ${TP_K:+-k "$TP_K"} \
    2>&1 | tee "$OUT/tp_multigpu.log" | grep -E "identical|tensor_parallel_size|passed|failed|Error|^(det|default)" | tail -40
  rc=$(( rc | ${PIPESTATUS[0]} ))
  after_mode tp
fi
if [[ $what == *" profile "* ]]; then
  python3 "$REPO/benchmarks/profile_e2e.py" ${PROFILE_BACKENDS:+--backends "$PROFILE_BACKENDS"} \
    ${PROFILE_WORKLOADS:+--workloads "$PROFILE_WORKLOADS"} --out "$OUT/profile_e2e.json" \
    > "$OUT/profile.log" 2>&1
  rc=$(( rc | $? )); grep -E "kernels|GPU idle|Error|error" "$OUT/profile.log" | tail -20
  python3 "$REPO/benchmarks/profile_e2e.py" --plot "$OUT/profile_e2e.json" 2>/dev/null
  after_mode profile
fi
if [[ $what == *" ab "* ]]; then
  # AB_BACKENDS: engines to compare, e.g. default,det,det_fa3 (default: default, vLLM BI, det).
  # AB_TP: GPUs per engine (2 on a two-GPU host: issue 8's A/B at TP=2).
  # AB_WORKLOADS: a subset of prefill_mix,decode_heavy (default: both).
  # AB_REPEATS: timed runs per batch and engine (default 3); AB_ROUNDS: every engine started
  # this many times, in turn (default 1); ratios are medians over rounds.
  python3 "$REPO/benchmarks/ab_throughput.py" ${AB_BACKENDS:+--backends "$AB_BACKENDS"} \
    ${AB_TP:+--tensor-parallel-size "$AB_TP"} ${AB_WORKLOADS:+--workloads "$AB_WORKLOADS"} \
    ${AB_REPEATS:+--repeats "$AB_REPEATS"} ${AB_ROUNDS:+--rounds "$AB_ROUNDS"} \
    --out "$OUT/ab_throughput.json" > "$OUT/ab.log" 2>&1
  rc=$(( rc | $? )); grep -E "tok/s|Error|error" "$OUT/ab.log" | tail -20
  after_mode ab
fi
exit $rc
