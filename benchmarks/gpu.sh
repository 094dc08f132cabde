#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one run: the CUDA tests, the extraction throughput of ViT-B-16
# (random weights) on 8,192 generated JPEGs, PIL against GPU decoding, then the search, APE-T's
# training and ProKeR's search at ImageNet's shape on the GPU against the CPU.
#
#   bash benchmarks/gpu.sh [OUTPUT_FOLDER]          # default: gpu-results; PYTHON=... to pick the interpreter
#   STEPS="tests throughput" bash benchmarks/gpu.sh # some of the steps: tests, throughput, decode, device
#
# decode (not run by default): resizing a decoded batch of one size and of many (seconds), then
# --decode gpu alone, with the encoder eager and with CUDA graphs, with 4 reading threads (extract's
# default) and with 2, and with 4 on JPEGs of many sizes (about a minute each).
# Each step's output is also saved in OUTPUT_FOLDER (gpu.txt, tests.txt, throughput.txt, resize.txt,
# decode-4.txt, decode-2.txt, decode-4-varied.txt, device.txt).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-results}
python=${PYTHON:-python3}
steps=" ${STEPS:-tests throughput device} "
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # installed or not
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu.txt"
"$python" -c "
import os, torch, torchvision
try:
    import torchcodec; codec = torchcodec.__version__
except Exception as failure:  # missing, or built for another torch
    codec = f'unavailable ({type(failure).__name__})'
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'torchvision', torchvision.__version__, 'torchcodec', codec,
      'cores', os.cpu_count())" 2>&1 | tee -a "$out/gpu.txt"
if [[ $steps == *" tests "* ]]; then
    "$python" -m pytest -q -rs -s tests/test_gpu.py 2>&1 | tee "$out/tests.txt" || status=1
fi
if [[ $steps == *" throughput "* ]]; then
    "$python" benchmarks/extract_throughput.py --model ViT-B-16 --images 8192 --batch-size 256 \
        --workers "${WORKERS:-16}" --device cuda --repeat 2 2>&1 | tee "$out/throughput.txt" || status=1
fi
if [[ $steps == *" decode "* ]]; then
    "$python" benchmarks/resize_batch.py --device cuda 2>&1 | tee "$out/resize.txt" || status=1
    for run in "4 fixed decode-4" "2 fixed decode-2" "4 varied decode-4-varied"; do
        set -- $run  # reading threads, JPEG sizes, output file
        "$python" benchmarks/extract_throughput.py --model ViT-B-16 --images 8192 --batch-size 256 --read-threads "$1" \
            --sizes "$2" --device cuda --repeat 4 --gpu-only 2>&1 | tee "$out/$3.txt" || status=1
    done
fi
if [[ $steps == *" device "* ]]; then
    "$python" benchmarks/device_speed.py --device cuda 2>&1 | tee "$out/device.txt" || status=1
fi
exit $status
