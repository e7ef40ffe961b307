"""Train a global-token Aligner (N learnable prefix tokens + per-layer gates) on a frozen base model: supervised
fine-tuning, or correction (Q-A-C: rewrite an upstream answer, after a copy warm-up).

    python finetune/aligner.py                                   # the offline default dataset on SmolLM2-135M
    python finetune/aligner.py --data ../shared/data/alpaca/alpaca_4500.json --template alpaca
    python finetune/aligner.py --mode correction --data ../shared/data/hh-rlhf/harmless_base_2000.jsonl

Writes OUT/aligner.safetensors, OUT/metrics.csv and OUT/state/. Every flag: howto/finetune.md (correction:
howto/correction.md).
"""

from lit_aligner.cli import run_training_cli
from lit_aligner.training import SFTRunConfig

if __name__ == "__main__":
    run_training_cli(SFTRunConfig, __doc__)
