#!/usr/bin/env bash
# The CI benchmark: every method on the shipped zoo, a few HumanEval problems, one thread,
# then the regression gate against the committed baselines. Regenerate the baseline (on
# this kind of machine) with:  bash scripts/ci_bench.sh --rebaseline
set -euo pipefail
cd "$(dirname "$0")/.."
out=${CI_BENCH_OUT:-results/runs/ci-bench}
baselines=results/baselines
rm -rf "$out" "$out-space"
common=(--task humaneval --limit 4 --max-new-tokens 64 run.threads=1 run.progress=false)
.venv/bin/harness run --methods autoregressive,hf-generate,speculative,prompt-lookup,medusa,hf-assisted,hf-prompt-lookup \
  --out "$out" "${common[@]}"
.venv/bin/harness run --model zoo-space --methods autoregressive,space method.space.k=1 --out "$out-space" "${common[@]}"
if [ "${1:-}" = "--rebaseline" ]; then
  # speedups from 4 short problems are noisy: a drop of more than half fails
  .venv/bin/harness baseline "$out" --out "$baselines/ci-zoo-cpu.json" --speedup-tolerance 0.5
  .venv/bin/harness baseline "$out-space" --out "$baselines/ci-zoo-space-cpu.json" --speedup-tolerance 0.5
fi
.venv/bin/harness check "$out" --baseline "$baselines/ci-zoo-cpu.json"
.venv/bin/harness check "$out-space" --baseline "$baselines/ci-zoo-space-cpu.json"
