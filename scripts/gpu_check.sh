#!/usr/bin/env bash
# The first step of a session with a GPU lent: one prepared script, at most 8 minutes.
#   bash scripts/gpu_check.sh            on the GPU machine: results under results/gpu/
#   bash scripts/gpu_check.sh --dry-run  the same steps, tiny, on CPU (results/runs/gpu-dry/), so no GPU
#                                        minute is spent on a typo (tests/test_gpu_check.py runs it)
# Steps: 1. the device, named  2. the engine's and the compiled layer's tests on that device
#        3. a small bench of every method, eager and compiled  4. the vLLM backend at concurrency 1 and 16
#        5. the leaderboards. Needs .venv (on a GPU: make setup TORCH_SPEC=torch) and, for step 4,
#        .venv-vllm (make vllm); without .venv-vllm step 4 says so and the others still run.
# GPU_CHECK_VLLM=0 leaves step 4 out. Each step has its own time limit, and a failed step does not stop
# the next (the summary says which failed; the exit code is that of the first failure).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
if [ "$DRY" = 1 ]; then
  out=results/runs/gpu-dry; device=cpu; limit=1; tokens=8; conc=1,2; vlimit=2; dtype=float32; vrounds=2
  tests=(tests/test_engine.py); scale=4  # a shared CPU is far slower than the GPU the limits are set for
  compiled_dry=(--methods autoregressive,prompt-lookup model.compile_buckets=[1,4])  # compiling every method: minutes on CPU
else
  # vrounds: one paired round per method on the GPU (as many engine loads as before rounds: suffix loads one
  # engine per round), two in the dry run so the alternation itself is exercised
  out=results/gpu; device=cuda; limit=4; tokens=64; conc=1,16; vlimit=16; dtype=${DTYPE:-float32}; vrounds=1
  tests=(tests/test_engine.py tests/test_compiled.py tests/test_methods_baseline.py); scale=1  # 460 s at most in all
  compiled_dry=()
fi
[ -x .venv/bin/harness ] || { echo "error: no .venv here; run make setup (TORCH_SPEC=torch on a GPU) first" >&2; exit 2; }
rm -rf "$out"; mkdir -p "$out"
failed=0; summary=()
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $out/NAME.log, note the result
  local name=$1 limit=$2; shift 2
  local start=$(date +%s)
  timeout $(( limit * scale )) "$@" >"$out/$name.log" 2>&1
  local rc=$?
  summary+=("$name: rc $rc, $(( $(date +%s) - start )) s")
  echo "${summary[-1]}"
  [ $rc -ne 0 ] && [ $failed = 0 ] && failed=$rc
  return 0
}
# 1. the device
if [ "$DRY" = 1 ]; then
  .venv/bin/python -c "from harness.results import cpu_name; print('dry run on CPU:', cpu_name())" | tee "$out/device.txt"
else
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; \
    .venv/bin/python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"; } \
    | tee "$out/device.txt"
fi
common=(--task humaneval --limit "$limit" --max-new-tokens "$tokens" run.progress=false model.device=$device model.dtype=$dtype)
every=autoregressive,speculative,speculative-tree,prompt-lookup,reference-lookup,suffix,recycling,lookahead,swift,medusa,eagle,eagle2,eagle3
compiled=autoregressive,speculative,speculative-tree,prompt-lookup,suffix,medusa,eagle,eagle2
# 2. the engine's tests (the session's tiny models on this machine's device)
step tests 100 env HARNESS_TEST_DEVICE=$device .venv/bin/python -m pytest -q -x -p no:cacheprovider "${tests[@]}"
# 3. every method, eager and compiled
step bench-eager 100 .venv/bin/harness run --methods "$every" --out "$out/bench-eager" "${common[@]}"
step bench-compiled 100 .venv/bin/harness run --methods "$compiled" model.compile=true --out "$out/bench-compiled" "${common[@]}" \
  "${compiled_dry[@]}"
# 4. the vLLM backend at two concurrencies
if [ "${GPU_CHECK_VLLM:-1}" = 0 ]; then
  summary+=("vllm: left out (GPU_CHECK_VLLM=0)")
elif [ ! -x .venv-vllm/bin/python ]; then
  summary+=("vllm: no .venv-vllm here (make vllm builds it)")
else
  vm=autoregressive,speculative,prompt-lookup,eagle,eagle3,medusa,suffix
  [ "$DRY" = 1 ] && vm=autoregressive,prompt-lookup
  step vllm 160 .venv/bin/harness run --engine vllm --methods "$vm" --task humaneval --limit "$vlimit" \
    --max-new-tokens "$tokens" run.concurrency=$conc run.progress=false model.dtype=$dtype vllm.side_by_side=false \
    vllm.rounds=$vrounds --out "$out/vllm"
fi
# 5. the leaderboards
for run in bench-eager bench-compiled; do
  [ -f "$out/$run/manifest.json" ] && .venv/bin/harness leaderboard "$out/$run" --out "$out/$run.md" 2>/dev/null
done
[ -d "$out/vllm" ] && .venv/bin/harness leaderboard "$out/vllm" --out "$out/vllm.md" 2>/dev/null
printf '%s\n' "${summary[@]}" > "$out/summary.txt"
echo "gpu_check: $(cat "$out/device.txt" | head -1) -> $out (failed: $failed)"
exit $failed
