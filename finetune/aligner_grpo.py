"""GRPO into an Aligner: the student (the base with the Aligner being trained) samples a group of answers to each
prompt, reward functions score them, and the Aligner learns from each answer's reward against its group's
(DeepSeekMath's GRPO, as TRL's GRPOTrainer). No reward model and no value model; one copy of the base.

    python finetune/aligner_grpo.py                           # the default dataset, rewarded for the right answer
    python finetune/aligner_grpo.py --init-aligner out/aligner/SmolLM2-135M-Instruct/aligner.safetensors \\
        --rewards answer format                                # on top of an SFT Aligner
    python finetune/aligner_grpo.py --data gsm8k.jsonl --field-map instruction=question,output=answer \\
        --rewards answer my_rewards.py:shows_work --reward-weights 1 0.2

Writes OUT/aligner.safetensors (its metadata records the rewards), OUT/metrics.csv and OUT/state/. Every flag:
howto/grpo.md.
"""

from lit_aligner.cli import run_training_cli
from lit_aligner.training import GRPORunConfig

if __name__ == "__main__":
    run_training_cli(GRPORunConfig, __doc__)
