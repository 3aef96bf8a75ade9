#!/usr/bin/env bash
# Chapter 8's device check, in one call on a machine with an NVIDIA GPU (H100 or H200):
# the kernel tests on the GPU, the lab notebook on the GPU, then the benchmark, which writes
# code/normlab/runtime/results/<gpu-name>.json.
#   bash chapters/gpu/run_on_gpu.sh            (from the repository root; about 8 minutes)
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=code:tools/coursekit NORMLAB_PROGRESS=0
python -c 'import torch, triton; assert torch.cuda.is_available(), "no CUDA GPU"; print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)'
python -m pytest -q -x -p no:cacheprovider tests/test_kernels.py
# The lab as a student runs it on a Colab GPU runtime: under nbval where the machine has Jupyter,
# else its code cells in order in one Python process (the device image has no Jupyter kernel).
if python -c 'import nbval, ipykernel' 2>/dev/null; then
    python -m pytest -q -p no:cacheprovider --nbval-lax --nbval-current-env chapters/gpu/lab.ipynb
else
    python -m coursekit.cells chapters/gpu/lab.ipynb
fi
python -m normlab.runtime.gpu_bench --out code/normlab/runtime/results --shapes "${SHAPES:-default}" --budget-s "${BUDGET_S:-300}"
