"""Distill a context into an Aligner: the teacher is the base reading a system prompt (--system), the student the same
base with the Aligner and without it; the Aligner learns the teacher's next-token distributions on the responses of
the data (forward KL by default), so N prefix tokens stand in for the whole prompt. One copy of the base serves both.

    python finetune/aligner_distill.py                          # the default dataset; the teacher is told its format
    python finetune/aligner_distill.py --data alpaca.json --system @system_prompt.txt
    python finetune/aligner_distill.py --data alpaca.json --system "Answer like a pirate." --beta 0.5

Writes OUT/aligner.safetensors (its metadata records the system prompt it stands for), OUT/metrics.csv and
OUT/state/. Every flag: howto/distill.md.
"""

from lit_aligner.cli import run_training_cli
from lit_aligner.training import DistillRunConfig

if __name__ == "__main__":
    run_training_cli(DistillRunConfig, __doc__)
