#!/usr/bin/env bash
# The GPU check in one command (issue 12): on a bare GPU machine with this repository copied over, in about 10 minutes,
# writing a log and JSON files under $OUT (default benchmarks/results/gpu-suite). Steps, most important first; a step
# cut short by its time limit keeps what finished (every benchmark writes its rows so far to <name>.partial.json):
#   tests     the CUDA tests (pytest -m cuda);
#   train     benchmarks/train.py on the LLaMA-2-7B shape (random weights), bf16, compiled blocks, N=10: SFT 8 x 512
#             under checkpointing none / selective / mlp, beside PEFT LoRA r=8 and prefix tuning (the peer, compiled too);
#             SFT-16 vs DPO on 8 pairs (16 x 512); then N=1 SFT 8 x 512; then DPO on 8 pairs beside TRL's DPOTrainer
#             with that LoRA (the peer, compiled too; only where trl imports: its wheels and datasets' are too big to
#             carry); then SFT 8 x 512 on an NF4 base beside QLoRA (eager; only where bitsandbytes imports);
#   generate  benchmarks/generate.py on the same shape: batch 1 and 16, with and without an Aligner, 16 different
#             Aligners; eager first (no compilation: figures even if compiling fails), with the peer (transformers'
#             generate, PEFT LoRA r=8: one, and 16 different in one batch), then compiled with CUDA graphs;
#   cli       the user's first commands on the GPU: finetune/aligner.py (Fabric, bf16-true, compiled blocks) for a few
#             steps on the default dataset, then generate/aligner.py with the Aligner it wrote, on a random-weight
#             SmolLM2-135M-shaped base with the real tokenizer (carried in checkpoints/SmolLM2-135M-Instruct/tokenizer*.json);
#   serve     benchmarks/serve.py on that base;
#   profile   (only when named: ~4 more minutes) benchmarks/profile_steps.py: where the time of a training step and of
#             a decoding step goes, by kind of kernel.
#
#   bash benchmarks/gpu_suite.sh                  # every step, on the GPU
#   bash benchmarks/gpu_suite.sh train generate   # only these steps
#   bash benchmarks/gpu_suite.sh --tiny           # the same steps on the CPU with the tiny shape: a rehearsal (~2 min)
#
# Python packages: the machine's python3 (with its CUDA torch) is used; what it lacks (tyro, gguf, lightning-fabric,
# fastapi, uvicorn, openai, ...) is installed from wheels in .whl/ when that folder was carried (see howto/performance.md),
# and the repository itself is put on PYTHONPATH. A step that fails or runs past its limit is logged and the next one
# still runs; the exit status says whether all passed.
set -uo pipefail
cd "$(dirname "$0")/.."
TINY=0
STEPS=()
for a in "$@"; do
    case $a in
        --tiny) TINY=1 ;;
        tests|train|cli|generate|serve|profile) STEPS+=("$a") ;;
        *) echo "error: unknown step '$a' (steps: tests train cli generate serve profile; flag: --tiny)" >&2; exit 2 ;;
    esac
done
[ ${#STEPS[@]} -eq 0 ] && STEPS=(tests train cli generate serve)
wanted() { [[ " ${STEPS[*]} " == *" $1 "* ]]; }
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
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
$PY - <<'EOF' | tee "$OUT/environment.txt"
import importlib, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
for name in ["lightning_fabric", "tyro", "safetensors", "tokenizers", "sentencepiece", "gguf", "fastapi", "uvicorn",
             "prometheus_client", "llguidance", "openai", "transformers", "peft", "trl", "bitsandbytes"]:
    try:
        m = importlib.import_module(name)
        print(f"  {name} {getattr(m, '__version__', '?')}")
    except ImportError:
        print(f"  {name} MISSING")
EOF

if [ "$TINY" = 1 ]; then
    SHAPE=tiny; B=2; B2=4; TRAIN="--seq-len 32 --steps 2 --warmup 1"
    GEN="--batch 4 --prompt-len 8 --new-tokens 8"; REPEATS=1; PROFILE="--batch 2 --seq-len 32 --decode-batch 4 --new-tokens 8"
    SERVE_SHAPE=tiny; SERVE="--clients 1 4 --requests-per-client 1 --sequential-requests 2 --max-tokens 4 --aligners 4 --long-prompt-tokens 40 --chunk-tokens 8 --stall-clients 2 --stall-max-tokens 6 --system-prompt-tokens 40 --system-clients 2"
    CLI_COMPILE=""  # compiling on the CPU costs more than 6 steps
    export LIT_ALIGNER_REHEARSE_CUDA=1
else
    SHAPE=Llama-2-7b-hf; B=8; B2=16; TRAIN="--seq-len 512 --steps 5 --warmup 2"
    GEN="--batch 16 --new-tokens 128"; REPEATS=3; PROFILE="--batch 8 --seq-len 512 --decode-batch 16 --new-tokens 128"
    SERVE_SHAPE=SmolLM2-135M; SERVE="--clients 1 8 32 --max-tokens 64 --max-batch 32"
    CLI_COMPILE="--compile"
fi

# 1. the CUDA tests
if wanted tests; then
    step cuda-tests 120 $PY -m pytest -q -m cuda tests/test_cuda.py -rs --junitxml="$OUT/cuda-tests.xml"
fi

# 2. training throughput and memory (compiled blocks: the default on CUDA)
if wanted train; then
    # the first with the peer (PEFT LoRA r=8 and prefix tuning on transformers, compiled like ours, the same rows), the
    # others alone
    step train-sft 240 $PY benchmarks/train.py --config $SHAPE --batch $B $TRAIN --n-tokens 10 --mode sft \
        --checkpointing none selective mlp --out "$OUT/train-$SHAPE-N10-b$B.json" --force
    step train-dpo 90 $PY benchmarks/train.py --config $SHAPE --batch $B2 $TRAIN --n-tokens 10 --mode sft dpo \
        --checkpointing none --no-peer --out "$OUT/train-$SHAPE-N10-b$B2-dpo.json" --force
    step train-N1 60 $PY benchmarks/train.py --config $SHAPE --batch $B $TRAIN --n-tokens 1 --mode sft \
        --checkpointing none --no-peer --out "$OUT/train-$SHAPE-N1-b$B.json" --force
    if $PY -c "import trl" 2>/dev/null; then  # DPO beside TRL's DPOTrainer (PEFT LoRA r=8, compiled like ours)
        step train-dpo-peer 180 $PY benchmarks/train.py --config $SHAPE --batch $B2 $TRAIN --n-tokens 10 --mode dpo \
            --checkpointing none --out "$OUT/train-$SHAPE-N10-b$B2-dpo-peer.json" --force
    else
        echo "=== train-dpo-peer skipped: trl is not installed on this machine"
    fi
    if $PY -c "import bitsandbytes" 2>/dev/null; then  # --quantize: NF4 base beside QLoRA, eager (compile unmeasured)
        step train-quant 180 $PY benchmarks/train.py --config $SHAPE --batch $B $TRAIN --n-tokens 10 --mode sft \
            --checkpointing none --quantize none bnb.nf4 --compile False --out "$OUT/train-$SHAPE-N10-b$B-nf4.json" --force
    else
        echo "=== train-quant skipped: bitsandbytes is not installed on this machine"
    fi
fi

# A random-weight base of a real shape with the real tokenizer (for the CLI and serving steps), made once.
SMALL_BASE=""
small_base() {
    [ -n "$SMALL_BASE" ] && return
    SMALL_BASE=$(mktemp -d)/base
    step small-base 60 $PY - "$SERVE_SHAPE" "$SMALL_BASE" <<'EOF'
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
}

# 3. the user's first commands: train an Aligner for a few steps through the trainer (Fabric), then answer with it
if wanted cli; then
    small_base
    step finetune 180 $PY finetune/aligner.py --checkpoint-dir "$SMALL_BASE" --out-dir "$OUT/cli-run" --max-steps 6 --max-seq-length 256 \
        --eval-interval 3 --compare-prompts 4 $CLI_COMPILE --no-progress --force
    step generate-cli 120 $PY generate/aligner.py --checkpoint-dir "$SMALL_BASE" \
        --aligner "$OUT/cli-run/aligner.safetensors" --no-aligner --prompt "What is 7 times 6?" --max-new-tokens 16
fi

# 4. decoding: eager (seconds, no compilation), then compiled with CUDA graphs (each case compiles its own graph)
if wanted generate; then
    # eager with the peer (transformers' generate and PEFT LoRA, eager too: like for like), then compiled alone
    step generate-eager 240 $PY benchmarks/generate.py --config $SHAPE $GEN --repeats 1 --compile False \
        --out "$OUT/generate-$SHAPE-eager.json" --force
    # (240 s: on the H200 the fifth case, compiling its own graph, ran past 180 s)
    step generate 240 $PY benchmarks/generate.py --config $SHAPE $GEN --repeats $REPEATS --no-peer \
        --out "$OUT/generate-$SHAPE.json" --force
fi

# 5. serving
if wanted serve; then
    small_base
    # beside transformers serve on the same base (its start and batching warm-up; on the H200, 2026-12-04, the
    # peer's last case, chunked prefill, was still running at 240 s)
    step serve 360 $PY benchmarks/serve.py --checkpoint-dir "$SMALL_BASE" $SERVE --out "$OUT/serve.json" --force
fi

# 6. where the time goes (named only)
if wanted profile; then
    step profile 300 $PY benchmarks/profile_steps.py --config $SHAPE $PROFILE --what train decode \
        --checkpointing none block --decode-cases base-1 aligner-1 shared-B different-B base-B \
        --out "$OUT/profile-$SHAPE.json" --force
fi

echo "=== done: ${#failed[@]} failed step(s): ${failed[*]:-none}"
[ ${#failed[@]} -eq 0 ]
