#!/usr/bin/env bash
# Submit train_slurm.sbatch from any directory:
#
#   bash examples/normistral_11b/submit_slurm.sh [SBATCH_OPTION ...] -- RECIPE.yaml [--flag value ...]
#   bash examples/normistral_11b/submit_slurm.sh --nodes 64 --account project_x -- stage3_full.yaml
#   bash examples/normistral_11b/submit_slurm.sh stage3_full.yaml          # no sbatch options: no '--'
#
# Creates logs/ in the repository root first (SLURM opens --output before the job script runs,
# and fails the job when its folder is missing), writes the log to logs/<job name>-<job id>.out
# and tells the job where the repository is (NORMISTRAL_ROOT), so the directory you submit from
# does not matter. Options after the ones given here win over the script's #SBATCH lines.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
if [[ ${1:-} == -h || ${1:-} == --help ]]; then  # the header above is the usage
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
  exit 0
fi
options=()
if [[ " $* " == *" -- "* ]]; then
  while (( $# )) && [[ $1 != -- ]]; do
    options+=("$1")
    shift
  done
  shift
fi
(( $# >= 1 )) || { echo "submit_slurm.sh: error: no recipe; usage: submit_slurm.sh [SBATCH_OPTION ...] -- RECIPE.yaml [--flag value ...]" >&2; exit 2; }
mkdir -p "$ROOT/logs"
exec sbatch --output="$ROOT/logs/%x-%j.out" --export="ALL,NORMISTRAL_ROOT=$ROOT" "${options[@]}" \
  "$ROOT/examples/normistral_11b/train_slurm.sbatch" "$@"
