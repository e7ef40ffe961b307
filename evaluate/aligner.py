"""Measure what an Aligner does: one subcommand per measurement, each printing a table and, on the last line of
stdout, the whole result as JSON (--out FILE writes it too).

    python evaluate/aligner.py loss --aligners out/aligner/SmolLM2-135M-Instruct/aligner.safetensors
    python evaluate/aligner.py inspect --aligners out/aligner/SmolLM2-135M-Instruct/aligner.safetensors
    python evaluate/aligner.py preference --data ../shared/data/hh-rlhf/harmless_base_2000.jsonl \\
        --aligners none A.safetensors
    python evaluate/aligner.py kto --data feedback.jsonl --aligners none out/kto/aligner.safetensors
    python evaluate/aligner.py distill --data rows.jsonl --aligners none out/distill/aligner.safetensors
    python evaluate/aligner.py reward --split val --aligners none G.safetensors
    python evaluate/aligner.py correction --aligners out/corr/aligner.safetensors --data pairs.jsonl
    python evaluate/aligner.py harness --tasks arc_easy --aligners A.safetensors --limit 200
    python evaluate/aligner.py judge --prompts vicuna.jsonl --a A.safetensors --b base

Every subcommand and flag, the judging prompt and the quality benchmark: howto/evaluate.md.
"""

from lit_aligner.cli import run_cli
from lit_aligner.evaluation.commands import SUBCOMMANDS

if __name__ == "__main__":
    run_cli(lambda cfg: cfg.execute(), SUBCOMMANDS, __doc__)
