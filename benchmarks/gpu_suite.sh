#!/usr/bin/env bash
# The GPU check in one command (issue 12): on a bare GPU machine with this repository copied over, in at most ~9
# minutes, writing a log and JSON files under $OUT (default benchmarks/results/gpu-suite):
#   1. the CUDA tests (pytest -m cuda);
#   2. benchmarks/train.py on the LLaMA-2-7B shape (random weights), 8 x 512, bf16, N=1 and N=10, SFT and DPO,
#      checkpointing none / selective / mlp;
#   3. benchmarks/generate.py on the same shape: batch 1 and 16, with and without an Aligner, 16 different Aligners;
#   4. benchmarks/serve.py on a random-weight SmolLM2-135M-shaped base (the real tokenizer, carried in
#      checkpoints/SmolLM2-135M-Instruct/tokenizer*.json).
#
#   bash benchmarks/gpu_suite.sh            # on the GPU
#   bash benchmarks/gpu_suite.sh --tiny     # the same steps on the CPU with the tiny shape: a rehearsal (~3 min)
#
# Python packages: the machine's python3 (with its CUDA torch) is used; what it lacks (tyro, gguf, lightning-fabric,
# fastapi, uvicorn, openai, ...) is installed from wheels in .whl/ when that folder was carried (see howto/performance.md),
# and the repository itself is put on PYTHONPATH. A step that fails is logged and the next one still runs; the exit
# status says whether all passed.
set -uo pipefail
cd "$(dirname "$0")/.."
TINY=0
[ "${1:-}" = "--tiny" ] && TINY=1
OUT=${OUT:-benchmarks/results/gpu-suite}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ "$TINY" = 1 ] && PY=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/suite.log") 2>&1
failed=()
step() {  # step NAME SECONDS COMMAND...: run with a time limit, note a failure, go on
    local name=$1 limit=$2; shift 2
    echo "=== $name ($(date +%T), limit ${limit}s): $*"
    local t0=$SECONDS
    if ! timeout "$limit" "$@"; then failed+=("$name"); echo "=== $name FAILED"; fi
    echo "=== $name took $((SECONDS - t0)) s"
}

if [ -d .whl ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
$PY - <<'EOF' | tee "$OUT/environment.txt"
import importlib, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
for name in ["lightning_fabric", "tyro", "safetensors", "tokenizers", "sentencepiece", "gguf", "fastapi", "uvicorn",
             "openai", "transformers", "peft"]:
    try:
        m = importlib.import_module(name)
        print(f"  {name} {getattr(m, '__version__', '?')}")
    except ImportError:
        print(f"  {name} MISSING")
EOF

if [ "$TINY" = 1 ]; then
    SHAPE=tiny; TRAIN="--batch 2 --seq-len 32 --steps 2 --warmup 1"; GEN="--prompt-len 8 --new-tokens 8 --repeats 1"
    SERVE_SHAPE=tiny; SERVE="--clients 1 4 --requests-per-client 1 --sequential-requests 2 --max-tokens 4 --aligners 4"
    export LIT_ALIGNER_REHEARSE_CUDA=1
else
    SHAPE=Llama-2-7b-hf; TRAIN="--batch 8 --seq-len 512 --steps 5 --warmup 2"; GEN="--batch 16 --new-tokens 128"
    SERVE_SHAPE=SmolLM2-135M; SERVE="--clients 1 8 32 --max-tokens 64 --max-batch 32"
fi

# 1. the CUDA tests
step cuda-tests 150 $PY -m pytest -q -m cuda tests/test_cuda.py -rs --junitxml="$OUT/cuda-tests.xml"

# 2. training throughput and memory: N=1 and N=10, SFT and DPO, three checkpointing policies
for N in 1 10; do
    step "train-N$N" 120 $PY benchmarks/train.py --config $SHAPE $TRAIN --n-tokens $N --mode sft dpo \
        --checkpointing none selective mlp --out "$OUT/train-$SHAPE-N$N.json" --force
done

# 3. decoding: batch 1 and 16, with and without an Aligner, 16 different Aligners
step generate 120 $PY benchmarks/generate.py --config $SHAPE $GEN --out "$OUT/generate-$SHAPE.json" --force

# 4. serving: a random-weight base of a real shape with the real tokenizer
SERVE_DIR=$(mktemp -d)/base
step serve-base 60 $PY - "$SERVE_SHAPE" "$SERVE_DIR" <<'EOF'
import dataclasses, shutil, sys
from pathlib import Path
import torch
from lit_aligner.base import save_base
from lit_aligner.config import Config
from lit_aligner.model import LLaMA, init_weights

shape, out = sys.argv[1], Path(sys.argv[2])
tok = Path("checkpoints/SmolLM2-135M-Instruct")
if not (tok / "tokenizer.json").is_file():
    sys.exit(f"no tokenizer in {tok} (carry checkpoints/SmolLM2-135M-Instruct/tokenizer*.json)")
config = dataclasses.replace(Config.from_name(shape, vocab_size=49152), name=f"random-{shape}")
torch.manual_seed(0)
model = LLaMA(config)
init_weights(model)
out.mkdir(parents=True)
for f in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(tok / f, out / f)
save_base(out, config, model.state_dict())
print("wrote", out)
EOF
step serve 240 $PY benchmarks/serve.py --checkpoint-dir "$SERVE_DIR" $SERVE --out "$OUT/serve.json" --force

echo "=== done: ${#failed[@]} failed step(s): ${failed[*]:-none}"
[ ${#failed[@]} -eq 0 ]
