#!/usr/bin/env bash
# Data-parallel throughput (docs/distributed.md): `moontune bench` on the smollm2-135m
# shape at 1 and 2 ranks, 1 thread each, LoRA and full fine-tuning, in one run; bench
# prints tokens/s of the whole job and, on 2 ranks, the bytes all-reduced per step and
# their time. OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE are unset for the benchmark.
#   tests/bench/data_parallel.sh [moontune] [batch per rank] [seq]
set -euo pipefail
moontune=${1:-build/moontune}; batch=${2:-2}; seq=${3:-256}
export OMP_NUM_THREADS=1
unset OPENBLAS_CORETYPE OPENBLAS_L2_SIZE
lscpu | grep "Model name"
for mode in lora full; do
  if [ "$mode" = lora ]; then a=(--adapter lora); else a=(--mode full); fi
  echo "== $mode, 1 rank"
  "$moontune" bench --shape smollm2-135m --batch "$batch" --seq "$seq" --steps 3 --warmup 1 "${a[@]}"
  echo "== $mode, 2 ranks"
  mpirun --allow-run-as-root -np 2 --bind-to core "$moontune" bench --shape smollm2-135m \
    --batch "$batch" --seq "$seq" --steps 3 --warmup 1 "${a[@]}"
done
