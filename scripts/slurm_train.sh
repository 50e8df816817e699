#!/usr/bin/env bash
# pgot-train on 2 nodes x 8 GPUs under SLURM: one `accelerate launch` per node, 16 processes in all.
#
#   sbatch scripts/slurm_train.sh configs/sd35_turbo_pgot.yaml                    # a pgot config
#   sbatch --nodes 3 scripts/slurm_train.sh configs/sd35_turbo_pgot.yaml train.max_steps=2000   # the paper's 3 x 8
#
# Build the frontier store once before (any single node): pgot-precompute --config configs/precompute_sd35_turbo.yaml
# train.resume=latest (set in the shipped configs) makes a requeued or resubmitted job continue from its last
# checkpoint; train.output_dir and the store must be on a filesystem every node sees.
#SBATCH --job-name=pgot-train
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # one launcher per node; it starts 8 processes
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --output=logs/%x-%j.out

set -euo pipefail
CONFIG=${1:?usage: sbatch scripts/slurm_train.sh CONFIG [key=value ...]}
shift
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MAIN_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MAIN_PORT=${MAIN_PORT:-29500}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
# export NCCL_IB_HCA=mlx5 NCCL_SOCKET_IFNAME=ib0   # cluster-specific network settings go here
mkdir -p logs

# srun starts one launcher per node; SLURM_NODEID is that node's machine rank.
srun --kill-on-bad-exit=1 bash -c "accelerate launch \
    --multi_gpu \
    --num_machines $SLURM_NNODES \
    --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) \
    --machine_rank \$SLURM_NODEID \
    --main_process_ip $MAIN_ADDR \
    --main_process_port $MAIN_PORT \
    --rdzv_backend static \
    --mixed_precision no \
    --dynamo_backend no \
    -m pgot train --config $CONFIG train.resume=latest $*"
