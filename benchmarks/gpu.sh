#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one run: the CUDA tests, the extraction throughput of ViT-B-16
# (random weights) on 4,096 generated JPEGs, PIL against GPU decoding, then the search, APE-T's
# training and ProKeR's search at ImageNet's shape on the GPU against the CPU.
#
#   bash benchmarks/gpu.sh [OUTPUT_FOLDER]          # default: gpu-results; PYTHON=... to pick the interpreter
#
# Each step's output is also saved in OUTPUT_FOLDER (gpu.txt, tests.txt, throughput.txt, device.txt).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-results}
python=${PYTHON:-python3}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # installed or not
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu.txt"
"$python" -c "
import torch, torchvision
try:
    import torchcodec; codec = torchcodec.__version__
except Exception as failure:  # missing, or built for another torch
    codec = f'unavailable ({type(failure).__name__})'
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'torchvision', torchvision.__version__, 'torchcodec', codec)" 2>&1 | tee -a "$out/gpu.txt"
"$python" -m pytest -q -rs -s tests/test_gpu.py 2>&1 | tee "$out/tests.txt" || status=1
"$python" benchmarks/extract_throughput.py --model ViT-B-16 --images 4096 --batch-size 256 \
    --workers "${WORKERS:-16}" --device cuda 2>&1 | tee "$out/throughput.txt" || status=1
"$python" benchmarks/device_speed.py --device cuda 2>&1 | tee "$out/device.txt" || status=1
exit $status
