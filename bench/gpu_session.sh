#!/usr/bin/env bash
# The GPU measurements issue 7 asks for, as one short script for a lent GPU session
# (device time is scarce: run it once, with a timeout that leaves room to rerun).
#   bash bench/gpu_session.sh            # writes into ${OUT:-bench/results}
# Llama-2-7B-shaped model with random weights (no download), bf16, LoRA r=8 on q,v:
# training step vs one expert boundary, per merge_precision, CUDA-synchronised timings and
# torch.cuda peak memory. Not covered here: tokens/s against the stock recipe (needs a 7B
# checkpoint on disk for `tune run`; bench/overhead.py is CPU-only as written).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu_info.csv"
python bench/boundary_cost.py model --device cuda --dtype bf16 --shape 7b --batch 4 --seq 512 \
    --repeats 5 --out "$out/boundary_7b_gpu.json"
