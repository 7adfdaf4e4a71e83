#!/usr/bin/env bash
# One node, N GPUs:  bash examples/normistral_11b/train_single_node.sh stage3_full.yaml [--flag value ...]
# (TP=2 x PP=2 needs 4 GPUs per model replica; the rest is data parallel.)
set -euo pipefail
RECIPE=${1:?usage: $0 RECIPE.yaml [overrides...]}; shift
GPUS=${GPUS:-$(python -c "import torch; print(torch.cuda.device_count())")}
export CUDA_DEVICE_MAX_CONNECTIONS=1   # lets megatron-core overlap TP communication with compute
cd "$(dirname "$0")/../.."
exec torchrun --standalone --nproc-per-node "$GPUS" pretrain_normistral.py \
  --config "examples/normistral_11b/$RECIPE" "$@"
