#!/usr/bin/env bash
# pgot-train on 2 nodes x 8 GPUs under SLURM: one `accelerate launch` per node, 16 processes in all.
#
#   sbatch scripts/slurm_train.sh configs/sd35_turbo_pgot.yaml                    # a pgot config
#   sbatch --nodes 3 scripts/slurm_train.sh configs/sd35_turbo_pgot.yaml train.max_steps=2000   # the paper's 3 x 8
#
# Build the frontier store once before (any single node): pgot-precompute --config configs/precompute_sd35_turbo.yaml
# train.output_dir and the store must be on a filesystem every node sees. One job per train.output_dir: a second
# job started into the same folder stops at once with an error naming the first (pgot's folder lock).
#
# Output: #SBATCH lines are read before the script runs, so the folder of --output must exist when the job is
# submitted; the log goes to the submission folder (pgot-train-<job id>.out) and a requeued job appends to it.
# For a logs/ folder: mkdir -p logs && sbatch --output=logs/%x-%j.out scripts/slurm_train.sh CONFIG
#
# Preemption, time limits, requeueing. pgot-train treats SIGTERM like Ctrl-C: every process finishes the step in
# flight, the checkpoint of that step is written, and each process exits with 143 (130 for SIGINT). The same
# command with train.resume=latest (passed below) continues from that checkpoint exactly; a run stopped before
# its first checkpoint starts afresh. accelerate launch gives its processes 30 s after a SIGTERM (then SIGKILL),
# enough for a step and a LoRA checkpoint of SD3.5-Large on GPUs.
#   - Preemption: Slurm sends SIGTERM to every process of the job, waits the partition's GraceTime, kills what is
#     left and, with --requeue (below) and PreemptMode=REQUEUE, queues the job again. Ask for a GraceTime of at
#     least 60 s.
#   - Time limit: --signal=B:USR1@300 has Slurm send USR1 to this script 5 minutes before the limit; the trap
#     below sends SIGTERM to the training (scancel --signal=TERM: every task of the job's steps), waits for the
#     checkpoint, and queues the job again with `scontrol requeue`. Without it, the limit's SIGTERM would also stop
#     training with a checkpoint, but the job would not come back.
#   - By hand: `scontrol requeue <job id>` (or scancel, then sbatch the same line) stops the job the same way and
#     the next start continues it. Exit codes of pgot-train: 0 done, 2 user error (one `error:` line each), 130 /
#     143 stopped by SIGINT / SIGTERM with a checkpoint; accelerate launch and srun report 1 for any failed
#     process.
#SBATCH --job-name=pgot-train
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # one launcher per node; it starts 8 processes
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --requeue                    # preempted jobs are queued again
#SBATCH --signal=B:USR1@300          # USR1 to this script 5 minutes before the time limit (the trap below)
#SBATCH --open-mode=append           # a requeued job appends to its log
#SBATCH --output=%x-%j.out

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
echo "$(date -Is) job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}"

requeue=0
# shellcheck disable=SC2329  # called from the traps
stop_training() {  # every task of the job's steps: each pgot process finishes its step and writes the checkpoint
    scancel --signal=TERM "$SLURM_JOB_ID" 2>/dev/null || kill -TERM "$TRAIN_PID" 2>/dev/null || true
}
# shellcheck disable=SC2329
on_time_limit() {
    echo "$(date -Is) time limit in 5 minutes: stopping at the end of the step in flight, then requeueing"
    requeue=1
    stop_training
}
trap on_time_limit USR1
trap 'echo "$(date -Is) SIGTERM (preemption or scancel): stopping with a checkpoint"; stop_training' TERM

# srun starts one launcher per node; SLURM_NODEID is that node's machine rank. In the background, so that the
# traps run while it trains.
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
    -m pgot train --config $CONFIG train.resume=latest $*" &
TRAIN_PID=$!

status=0
while true; do
    wait "$TRAIN_PID" && status=0 || status=$?
    kill -0 "$TRAIN_PID" 2>/dev/null || break  # wait also returns when a trapped signal arrives: keep waiting
done
if ((requeue)); then
    echo "$(date -Is) requeueing job ${SLURM_JOB_ID}; it continues from its last checkpoint (train.resume=latest)"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
