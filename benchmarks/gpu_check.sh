#!/usr/bin/env bash
# One GPU check, about 12 minutes on one GPU: the gpu-marked tests (fp16 distillation step, fp16 generation at any
# batch size, fp16 DreamBooth LoRA), then the U-Net latency, distillation throughput and batched-generation
# benchmarks on the GPU, and the fast path's image latency (bk-small + LCM + tiny decoder, compiled; SDXL students
# at 1024 px; target under 0.1 s per 512 px image). Run from the repository root:  bash benchmarks/gpu_check.sh
# Installs what the project needs first when torch is missing (a fresh machine).
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
python3 -c "import torch, bksdm" 2>/dev/null || {
  python3 -m pip install -q torch==2.14.1 torchvision==0.29.1 2>&1 | tail -2
  python3 -m pip install -q -e ".[test]" 2>&1 | tail -2
}
python3 - <<'PY'
import torch
print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device", "| torch", torch.__version__)
PY
echo "== gpu tests"
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -5
echo "== U-Net latency (sd-v1 family, batch 2, fp32 and fp16)"
timeout 120 python3 benchmarks/unet_latency.py --device cuda --dtypes fp32 fp16 --runs 5 2>&1 | grep -v Warning | tail -8
echo "== distillation throughput (512 px, batch 8, fp16)"
timeout 200 python3 benchmarks/distill_throughput.py --steps 4 --batch 8 --resolution 512 --precision fp16 --workdir /tmp/bksdm-gpu 2>&1 | grep -E "^\||speed-up|machine|SD-v1" | tail -8
echo "== batched generation (mini teacher)"
timeout 60 python3 benchmarks/generate_batch.py --prompts 48 --batches 1 8 48 2>&1 | grep -E "^\||machine" | tail -6
echo "== one image, fast path (fp16; 512 px, SDXL 1024 px)"
timeout 420 python3 benchmarks/cpu_image_latency.py --device cuda --sdxl --workdir /tmp/bksdm-gpu-image 2>&1 | grep -E "^\||machine" | tail -20
