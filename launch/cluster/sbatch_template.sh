#!/usr/bin/env bash
# A hand-written batch script for trident: one task per rank, srun starts them,
# trident-train joins them with launcher=external. Copy it, set the #SBATCH lines
# to your layout (nodes x ntasks-per-node = tp * pp * dp), and submit:
#   sbatch launch/cluster/sbatch_template.sh parallel.tp=2 parallel.dp=2 train.steps=100
#SBATCH --job-name=trident
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --cpus-per-task=1
#SBATCH --time=01:00:00
#SBATCH --output=trident-%j.out
set -euo pipefail
# The venv trident was installed in; override with TRIDENT_VENV=/path/to/.venv.
VENV=${TRIDENT_VENV:-$(cd "$(dirname "$0")/../.." 2>/dev/null && pwd)/.venv}
[ -x "$VENV/bin/trident-train" ] || VENV=${SLURM_SUBMIT_DIR:-.}/.venv
# Every rank must agree on the run dir: name it after the job.
# --kill-on-bad-exit: one failing rank ends the job at once (FAILED), instead of the others waiting in a collective.
srun --kill-on-bad-exit=1 "$VENV/bin/trident-train" launcher=external hydra.run.dir="${TRIDENT_RUN_DIR:-runs/$SLURM_JOB_ID}" "$@"
