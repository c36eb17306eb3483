#!/usr/bin/env bash
# Shared by the sbatch scripts in this folder (sourced, not run). One srun task per node starts torchrun,
# which starts one process per GPU:   sbatch -> srun (1 task / node) -> torchrun (1 process / GPU).
#
# Provides: slurm_setup (node list, MASTER_ADDR/PORT, GPUs per node, NCCL/CUDA environment) and
# launch_nodes TORCHRUN_ARGS... -- PROGRAM... (runs torchrun on every node with its static node rank).
# DRY_RUN=1 prints the environment and the exact command of every node instead of running anything.

# ---- NCCL / InfiniBand / CUDA settings ---------------------------------------------------------------------
# Values already in the environment win (export them before sbatch, or in a site profile). Uncomment what your
# cluster needs; NCCL's auto-detection is right on most InfiniBand clusters.
#
# export NCCL_IB_HCA=mlx5_0,mlx5_1,mlx5_2,mlx5_3,mlx5_4,mlx5_5,mlx5_6,mlx5_7
#     Which InfiniBand HCAs NCCL may use (default: all it finds). Set it when auto-detection picks storage or
#     Ethernet (RoCE) ports, e.g. "=mlx5_0,mlx5_1" for an exact match or "^mlx5_8" to exclude one. On
#     rail-optimised H100 nodes list the 8 compute NICs so each GPU uses the NIC on its own PCIe switch.
# export NCCL_SOCKET_IFNAME=ib0          (or "^lo,docker0" to exclude)
#     Network interface for NCCL's bootstrap and its socket fallback; also set GLOO_SOCKET_IFNAME to the same
#     value when hosts have several interfaces and gloo (used by PyTorch for some CPU-side collectives)
#     picks an unreachable one.
# export NCCL_IB_GID_INDEX=3             RoCE only: the GID index of the RoCE v2 address.
# export NCCL_IB_TIMEOUT=22              Longer IB retry timeout on large or busy fabrics.
# export NCCL_NET_GDR_LEVEL=PHB          GPUDirect RDMA distance policy (default is usually right).
# NCCL_NVLS_ENABLE (NVLink SHARP / multicast): left alone on purpose -- NCCL decides. Some clusters require
#     it off (NCCL_NVLS_ENABLE=0); never force it on from a job script.
# export NCCL_DEBUG=INFO                 Print NCCL's topology / transport choices (set WARN for quiet logs).

# Megatron's context parallelism on Hopper needs one hardware queue so that communication kernels run in issue
# order (Megatron asserts it for CP > 1 on pre-Blackwell GPUs).
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
# Surface NCCL errors and timeouts as Python exceptions instead of hangs.
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# One OpenMP thread per rank unless told otherwise (8 ranks per node share the CPU cores).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"

NCCL_VARS=(NCCL_IB_HCA NCCL_SOCKET_IFNAME GLOO_SOCKET_IFNAME NCCL_IB_GID_INDEX NCCL_IB_TIMEOUT NCCL_NET_GDR_LEVEL
           NCCL_NVLS_ENABLE NCCL_DEBUG TORCH_NCCL_ASYNC_ERROR_HANDLING CUDA_DEVICE_MAX_CONNECTIONS OMP_NUM_THREADS)

die() {
  echo "error: $*" >&2
  exit 2
}

# slurm_setup: read the allocation. Sets NODES (array of host names), NNODES, MASTER_ADDR, MASTER_PORT and
# GPUS_PER_NODE (exported where the ranks need them).
slurm_setup() {
  [[ -n "${SLURM_JOB_NODELIST:-}" ]] || die "SLURM_JOB_NODELIST is not set: submit with sbatch (or salloc), or use scripts/launch_torchrun.sh on a single machine"
  command -v scontrol >/dev/null 2>&1 || die "scontrol not found: run inside a Slurm allocation"
  mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  [[ ${#NODES[@]} -ge 1 ]] || die "scontrol returned no host for SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST"
  NNODES="${SLURM_NNODES:-${#NODES[@]}}"
  [[ "$NNODES" -eq ${#NODES[@]} ]] || die "SLURM_NNODES=$NNODES but the node list has ${#NODES[@]} hosts"
  # The first node of the allocation hosts the rendezvous (node rank 0 = global ranks 0..GPUS_PER_NODE-1).
  MASTER_ADDR="${MASTER_ADDR:-${NODES[0]}}"
  # A port derived from the job id, so that two jobs sharing a node do not collide.
  MASTER_PORT="${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}"
  GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
  GPUS_PER_NODE="${GPUS_PER_NODE##*:}"  # "h100:8" -> "8"
  export MASTER_ADDR MASTER_PORT GPUS_PER_NODE
}

# quote ARGS...: the arguments as one shell-quoted line (what you would paste into a terminal).
quote() {
  local out="" a
  for a in "$@"; do
    out+="$(printf '%q' "$a") "
  done
  printf '%s' "${out% }"
}

# launch_nodes ARGS...: on every node, run "torchrun --node-rank=<SLURM_NODEID> ARGS...". ARGS are the
# remaining torchrun options followed by the program (-m module ...). With DRY_RUN=1, print each node's command.
launch_nodes() {
  local common=(--nnodes="$NNODES" --nproc-per-node="$GPUS_PER_NODE" --master-addr="$MASTER_ADDR"
                --master-port="$MASTER_PORT")
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    local v i
    echo "# DRY_RUN=1: nothing is started. Job ${SLURM_JOB_ID:-?}, ${NNODES} node(s) x ${GPUS_PER_NODE} GPU(s)"
    for v in "${NCCL_VARS[@]}"; do
      if [[ -n "${!v:-}" ]]; then echo "export $v=$(printf '%q' "${!v}")"; fi
    done
    # shellcheck disable=SC2016
    echo "srun: $(quote srun --nodes="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
      bash -c 'exec torchrun --node-rank="$SLURM_NODEID" "$@"' torchrun-on-node "${common[@]}" "$@")"
    for ((i = 0; i < NNODES; i++)); do
      echo "node $i (${NODES[$i]}): $(quote torchrun --node-rank="$i" "${common[@]}" "$@")"
    done
    return 0
  fi
  command -v srun >/dev/null 2>&1 || die "srun not found: run inside a Slurm allocation"
  # Each srun task reads its own SLURM_NODEID: single quotes on purpose (expanded on the node, not here).
  # shellcheck disable=SC2016
  srun --nodes="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
    bash -c 'exec torchrun --node-rank="$SLURM_NODEID" "$@"' torchrun-on-node "${common[@]}" "$@"
}

# pretrain_gpt_args CP TOPOLOGY: fill PRETRAIN_ARGS with Megatron-LM pretrain_gpt.py arguments for a
# Llama-3-8B-shaped GPT at SEQ_LENGTH (default 131072) tokens with TASP context parallelism over CP ranks.
# Data: DATA_PATH (Megatron .bin/.idx prefix) + TOKENIZER_MODEL, or mock data when DATA_PATH is unset.
# Checkpoints: CKPT_DIR (default: checkpoints/$SLURM_JOB_NAME), torch_dist format, resumed when present.
# Arguments given to the sbatch script are appended, so they override these (argparse: the last one wins).
pretrain_gpt_args() {
  local cp="$1" topology="$2" seq="${SEQ_LENGTH:-131072}"
  PRETRAIN_ARGS=(
    --num-layers 32 --hidden-size 4096 --num-attention-heads 32 --group-query-attention --num-query-groups 8
    --ffn-hidden-size 14336 --swiglu --normalization RMSNorm --norm-epsilon 1e-5 --disable-bias-linear
    --untie-embeddings-and-output-weights --position-embedding-type rope --rotary-base 500000
    --seq-length "$seq" --max-position-embeddings "$seq"
    --micro-batch-size 1 --global-batch-size "${GLOBAL_BATCH:-8}" --train-iters "${TRAIN_ITERS:-200}"
    --lr 2e-5 --min-lr 2e-6 --lr-decay-style cosine --lr-warmup-iters 20 --weight-decay 0.1 --clip-grad 1.0
    --bf16 --use-distributed-optimizer --recompute-granularity full --recompute-method uniform
    --recompute-num-layers 1 --attention-dropout 0.0 --hidden-dropout 0.0
    --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1
    --context-parallel-size "$cp" --context-parallel-backend tasp --tasp-topology "$topology"  # rings: the most available
    --save "${CKPT_DIR:-checkpoints/${SLURM_JOB_NAME:-tasp-pretrain}}"
    --load "${CKPT_DIR:-checkpoints/${SLURM_JOB_NAME:-tasp-pretrain}}"
    --ckpt-format torch_dist --save-interval "${SAVE_INTERVAL:-100}" --log-interval 1 --eval-iters 0
  )
  if [[ -n "${DATA_PATH:-}" ]]; then
    PRETRAIN_ARGS+=(--data-path "$DATA_PATH" --tokenizer-type HuggingFaceTokenizer
                    --tokenizer-model "${TOKENIZER_MODEL:-meta-llama/Meta-Llama-3-8B}" --split "99,1,0")
  else
    PRETRAIN_ARGS+=(--mock-data --tokenizer-type NullTokenizer --vocab-size 128256)
  fi
}

# require_megatron_lm: pretrain_gpt needs a Megatron-LM checkout (MEGATRON_LM_PATH) matching megatron-core.
require_megatron_lm() {
  if [[ -z "${MEGATRON_LM_PATH:-}" ]]; then
    [[ "${DRY_RUN:-0}" == 1 ]] || die "set MEGATRON_LM_PATH to a Megatron-LM checkout (tag core_v0.19.0 for megatron-core 0.19)"
    MEGATRON_LM_PATH="/path/to/Megatron-LM"
  fi
  export MEGATRON_LM_PATH
  NCCL_VARS+=(MEGATRON_LM_PATH)
}
