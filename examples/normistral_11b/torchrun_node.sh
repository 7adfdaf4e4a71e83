#!/usr/bin/env bash
# One node of train_slurm.sbatch and train_single_node.sh; not run by hand. Two roles:
#
#   torchrun_node.sh node N_WORKERS TORCHRUN_COMMAND...   what srun starts on each node
#   torchrun_node.sh worker COMMAND...                    what torchrun starts per GPU (--no-python)
#
# Why: torchrun (torch 2.13) exits 1 with a SignalException traceback whenever it forwarded a
# signal (SIGUSR1 from `#SBATCH --signal`), even when every worker then saved its checkpoint
# and exited 0, and it tells nobody its workers' exit codes. So each worker records its own exit
# code and whether a stop signal reached it, and the node decides:
#   - torchrun exited 0                                       -> 0
#   - torchrun exited non-zero, but all N_WORKERS workers of this node received a stop signal
#     and exited 0 (the training code exits 0 only after its checkpoint is complete)
#                                                             -> 0, with one line saying so
#   - anything else (a worker failed, was SIGKILLed after --shutdown-timeout, never started)
#                                                             -> torchrun's exit code
# Deciding per node (not in the batch script after srun) matters with several nodes: the first
# node to exit non-zero would make `srun --kill-on-bad-exit` kill the others while they exit.
#
# Both roles trap the stop signals without acting on them: SLURM delivers a step's signal to the
# task's process group (proctrack/pgid) or to every process of the step (proctrack/cgroup), so
# these shells get it too and must survive it; torchrun (same process group as the node shell)
# forwards it to the workers; a worker's shell shares its process group with the worker.
# Bash runs a trap only after the foreground command has finished, and keeps its exit code.
#
# Everything is inside main(), called on the last line: bash reads a script while it runs it, and
# these shells wait for up to 48 hours while the checkout may change under them.
set -uo pipefail

main() {
  local role=${1:?usage: torchrun_node.sh node N_WORKERS COMMAND... | torchrun_node.sh worker COMMAND...}
  shift
  local stop_signals=${NORMISTRAL_STOP_SIGNALS:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1} name
  received=
  for name in ${stop_signals//,/ }; do
    trap "received=\${received:-$name}" "${name#SIG}"
  done
  case $role in
    worker) worker "$@" ;;
    node) NORMISTRAL_STOP_SIGNALS=$stop_signals node "$@" ;;
    *) echo "torchrun_node.sh: error: unknown role '$role' (node or worker)" >&2; return 2 ;;
  esac
}

worker() {
  local dir=${NORMISTRAL_WORKER_STATUS:?torchrun_node.sh worker: NORMISTRAL_WORKER_STATUS is not set (run by torchrun_node.sh node)}
  "$@"
  local rc=$?
  printf '%s %s\n' "$rc" "${received:-none}" > "$dir/rank-${RANK:-unknown}"
  return "$rc"
}

node() {
  local expected=${1:?torchrun_node.sh node: the number of workers is missing}
  shift
  NORMISTRAL_WORKER_STATUS=$(mktemp -d "${TMPDIR:-/tmp}/normistral-workers.XXXXXX") || return 1
  export NORMISTRAL_WORKER_STATUS NORMISTRAL_STOP_SIGNALS
  trap 'rm -rf "$NORMISTRAL_WORKER_STATUS"' EXIT
  "$@"
  local rc=$?
  (( rc == 0 )) && return 0
  local saved=0 total=0 signals= file code signal
  for file in "$NORMISTRAL_WORKER_STATUS"/rank-*; do
    [[ -e $file ]] || continue
    read -r code signal < "$file"
    total=$((total + 1))
    if [[ $code == 0 && $signal == SIG* ]]; then
      saved=$((saved + 1))
      signals=$signal
    fi
  done
  local where="node ${SLURM_NODEID:-0} ($(hostname))"
  if (( saved == expected && total == expected )); then
    echo "torchrun_node.sh: $where: torchrun exited $rc after forwarding $signals; all $expected workers stopped on it and exited 0 (checkpoint saved): exit 0" >&2
    return 0
  fi
  echo "torchrun_node.sh: $where: torchrun exited $rc; $saved of $expected workers stopped on a signal and exited 0 ($total reported): exit $rc" >&2
  return "$rc"
}

main "$@"; exit
