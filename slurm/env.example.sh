# Site environment for slurm/*.sbatch. Copy to slurm/env.sh (ignored by git) or point
# HP_ENV_FILE at your copy; the batch scripts source it on the first node before anything else.
# Sourced with bash; keep it free of site paths in the repository, put them in your copy.

# Modules (names differ per site):
# module purge
# module load cuda/12.4 nccl gcc

# The virtual environment with hp-deepspeed installed (`pip install -e .`):
# source /path/to/venv/bin/activate

# Caches on fast shared storage, not $HOME:
# export HF_HOME=/path/to/shared/hf-cache

# Interconnect: pick the network NCCL uses between nodes, log its choice once.
# export NCCL_SOCKET_IFNAME=ib0
# export NCCL_DEBUG=WARN

# Rank 0's address when the node's host name resolves to the wrong interface:
# export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)-ib

# One launcher per node instead of one task per GPU (see slurm/README.md):
# export HP_LAUNCH_MODE=node HP_NODE_LAUNCHER=torchrun

# Threads per rank; SLURM's --cpus-per-task is a good value.
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
