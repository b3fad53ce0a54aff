#!/usr/bin/env bash
# Example: the method x task x model matrix on a SLURM cluster through submitit
# (pip install -e '.[submitit]' on the login node; the jobs import the same environment).
# One SLURM job per combination, one GPU each; every job writes its own run directory
# under OUT and a re-submission resumes job by job. Adapt partition/account/time.
set -euo pipefail
OUT=${OUT:-/shared/$USER/harness-sweep}
harness run -m --launcher submitit_slurm \
  hydra.launcher.partition=gpu \
  hydra.launcher.account=my-account \
  hydra.launcher.gpus_per_node=1 \
  hydra.launcher.cpus_per_task=8 \
  hydra.launcher.mem_gb=64 \
  hydra.launcher.timeout_min=480 \
  hydra.launcher.array_parallelism=16 \
  'hydra.launcher.setup=["module load cuda"]' \
  model=zoo-target,/models/vicuna-7b-v1.3 \
  model.dtype=bfloat16 model.device=cuda \
  --task humaneval-x \
  'methods=[speculative],[prompt-lookup],[medusa]' \
  --out "$OUT"
# then, on any node that sees OUT:
#   harness leaderboard "$OUT"/*/ --by run_dir --format html --out report.html
