"""Train a global-token Aligner with DPO on preference pairs, with ONE copy of the base model in memory: the policy is
the base + the trainable Aligner, the reference is the same base with a frozen reference Aligner (or none). --loss
picks any of TRL's preference losses (IPO, RPO, MPO, ...; CPO, SimPO and ORPO need no reference pass).

    python finetune/aligner_dpo.py --data ../shared/data/hh-rlhf/harmless_base_2000.jsonl
    python finetune/aligner_dpo.py --loss simpo --beta 2.0 --simpo-gamma 1.0
    python finetune/aligner_dpo.py --data pku.jsonl --preference safer --init-aligner out/aligner/x/aligner.safetensors

Writes OUT/aligner.safetensors, OUT/metrics.csv and OUT/state/. Every flag: howto/dpo.md.
"""

from lit_aligner.cli import run_training_cli
from lit_aligner.training import DPORunConfig

if __name__ == "__main__":
    run_training_cli(DPORunConfig, __doc__)
