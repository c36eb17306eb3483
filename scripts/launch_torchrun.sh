#!/usr/bin/env bash
# One machine, no Slurm: torchrun starts one rank per GPU (or NPROC CPU ranks with gloo).
#
#   scripts/launch_torchrun.sh finetune CONFIG.yaml [section.field=value ...] [--max-steps N]
#   scripts/launch_torchrun.sh pretrain [Megatron-LM pretrain_gpt.py arguments ...]   # needs MEGATRON_LM_PATH
#   NPROC=2 scripts/launch_torchrun.sh finetune my-cpu-recipe.yaml                   # e.g. 2 CPU ranks
#   DRY_RUN=1 scripts/launch_torchrun.sh finetune ...                                # print the command only
#
# NPROC defaults to the number of GPUs nvidia-smi lists. For finetune it must equal the recipe's
# tp * cp * dp (or tp * cp times any dp when parallel.dp is null). pretrain passes everything after the
# word "pretrain" to python -m megatron_tasp.megatron.pretrain_gpt, e.g.
#   ... pretrain <model/data args> --context-parallel-size 8 --context-parallel-backend tasp \
#       --attention-dropout 0.0 --tasp-topology h100-sxm-8
# NCCL variables: see scripts/slurm/common.sh (they matter less on one node: NVLink/NVSwitch only).
set -euo pipefail

usage() {
  sed -n '2,9p' "$0" >&2
  exit 2
}

mode="${1:-}"
[[ $# -gt 0 ]] && shift
case "$mode" in
  finetune) prog=(-m megatron_tasp.cli finetune) ;;
  pretrain)
    if [[ -z "${MEGATRON_LM_PATH:-}" && "${DRY_RUN:-0}" != 1 ]]; then
      echo "error: set MEGATRON_LM_PATH to a Megatron-LM checkout (tag core_v0.19.0 for megatron-core 0.19)" >&2
      exit 2
    fi
    prog=(-m megatron_tasp.megatron.pretrain_gpt) ;;
  *) usage ;;
esac

if [[ -z "${NPROC:-}" ]]; then
  NPROC=0
  if command -v nvidia-smi >/dev/null 2>&1; then
    NPROC="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
  fi
  if [[ "$NPROC" -lt 1 ]]; then
    echo "error: no GPU found by nvidia-smi; set NPROC (CPU ranks run with gloo)" >&2
    exit 2
  fi
fi

# Context parallelism on Hopper: communication kernels must run in issue order (one hardware queue).
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"

cmd=("${TORCHRUN:-torchrun}" --standalone --nproc-per-node="$NPROC" "${prog[@]}" "$@")
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf 'export CUDA_DEVICE_MAX_CONNECTIONS=%s OMP_NUM_THREADS=%s\n' "$CUDA_DEVICE_MAX_CONNECTIONS" "$OMP_NUM_THREADS"
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
exec "${cmd[@]}"
