#!/usr/bin/env bash
# One node, N GPUs:  bash examples/normistral_11b/train_single_node.sh stage3_full.yaml [--flag value ...]
# (TP=2 x PP=2 needs 4 GPUs per model replica; the rest is data parallel.)
#
# RECIPE: a file name in examples/normistral_11b/, or a path (anything with a '/') relative to
# the current directory. The run's own paths (recipe fields, --save/--load ... overrides) are
# relative to the repository root: the script cds there, as train_slurm.sbatch does.
# GPUS: torchrun's --nproc-per-node (default: torch.cuda.device_count()). PYTHON: the
# interpreter (default: python). SHUTDOWN_TIMEOUT: seconds torchrun waits for the workers to save
# after forwarding SIGTERM/SIGUSR1 (default 420; see train_slurm.sbatch for the estimate).
set -euo pipefail
die() { echo "train_single_node.sh: error: $*" >&2; exit 2; }
(( $# >= 1 )) || die "no recipe; usage: train_single_node.sh RECIPE.yaml [--flag value ...]"
RECIPE=$1
shift
case $RECIPE in
  */*) [[ $RECIPE == /* ]] || RECIPE=$PWD/$RECIPE ;;
  *) RECIPE=examples/normistral_11b/$RECIPE ;;
esac
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
[[ -f $RECIPE ]] || die "recipe $RECIPE not found (give a file name in examples/normistral_11b/ or a path)"
PYTHON=${PYTHON:-python}
GPUS=${GPUS:-$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")}
[[ $GPUS =~ ^[1-9][0-9]*$ ]] || die "GPUS=$GPUS: no GPU count (torch sees none); set GPUS=N"
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-420}
[[ $SHUTDOWN_TIMEOUT =~ ^[0-9]+$ ]] || die "SHUTDOWN_TIMEOUT=$SHUTDOWN_TIMEOUT is not a whole number of seconds"
export CUDA_DEVICE_MAX_CONNECTIONS=1   # lets megatron-core overlap TP communication with compute
export NORMISTRAL_STOP_SIGNALS=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1   # torchrun forwards these
NODE=examples/normistral_11b/torchrun_node.sh
exec bash "$NODE" node "$GPUS" \
  "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$GPUS" \
  --signals-to-handle "$NORMISTRAL_STOP_SIGNALS" --shutdown-timeout "$SHUTDOWN_TIMEOUT" \
  --no-python bash "$NODE" worker "$PYTHON" pretrain_normistral.py --config "$RECIPE" "$@"
