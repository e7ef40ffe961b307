"""Train a global-token Aligner with KTO on unpaired completions: each row a prompt, one answer and whether it is
desirable (TRL's unpaired preference rows: prompt, completion, label), as thumbs-up / thumbs-down feedback gives them;
a preference file works too (its chosen answers desirable, its rejected ones not). One copy of the base model: the
reference is the same base with a frozen reference Aligner (or none).

    python finetune/aligner_kto.py                                  # the default pairs, as unpaired completions
    python finetune/aligner_kto.py --data feedback.jsonl --desirable-weight 1.0 --undesirable-weight 1.2
    python finetune/aligner_kto.py --data feedback.jsonl --eval-only --init-aligner out/kto/aligner.safetensors

Writes OUT/aligner.safetensors, OUT/metrics.csv and OUT/state/. Every flag: howto/kto.md.
"""

from lit_aligner.cli import run_training_cli
from lit_aligner.training import KTORunConfig

if __name__ == "__main__":
    run_training_cli(KTORunConfig, __doc__)
