# Site environment for slurm/*.sbatch. Copy to slurm/env.sh (ignored by git) or point
# HP_ENV_FILE at your copy; the batch scripts source it on the first node before anything else.
# Sourced with bash; keep it free of site paths in the repository, put them in your copy.

# Modules (names differ per site). torch's wheels bring their own CUDA runtime and NCCL; a CUDA
# module is needed only to compile DeepSpeed ops (optim.implementation=deepspeed, i.e. FusedAdam),
# and its nvcc must have torch's CUDA major: `python -c "import torch; print(torch.version.cuda)"`
# says 13.0 for the cu130 wheels, so load cuda/13.x then, not 12.x. The default optimizer (torch's
# fused AdamW) needs no build; ZeRO optimizer offload JIT-builds DeepSpeedCPUAdam with the C++
# compiler on its first run (load gcc).
# module purge
# module load cuda/13.0 gcc

# Hopper images often set TORCH_CUDA_ARCH_LIST=9.0a, which DeepSpeed 0.19's op builder cannot
# parse; hp-deepspeed rewrites it to 9.0 in every rank (hp_deepspeed/launching/device.py).
# export TORCH_CUDA_ARCH_LIST=9.0

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
