#!/bin/bash
# Without SLURM: torchrun starts one process per GPU on each node, and Lightning picks up the
# torchelastic environment (RANK, WORLD_SIZE, MASTER_ADDR). Run the same line on every node.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 bash experiments/slurm/torchrun_example.sh configs/quickstart.yaml
set -euo pipefail
CONFIG=${1:?usage: torchrun_example.sh CONFIG [more scifm args]}
shift
NPROC=${NPROC:-$(nvidia-smi -L | wc -l)}
torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$NPROC" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  "$(command -v scifm)" fit --config "$CONFIG" --config configs/trainer/ddp.yaml \
  --trainer.num_nodes "${NNODES:-1}" --trainer.devices "$NPROC" "$@"
