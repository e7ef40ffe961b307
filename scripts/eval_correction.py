"""Evaluate a correction-mode Aligner on held-out Q-A-C pairs, next to the bare base given the same prompts.

    python scripts/eval_correction.py --aligner out/corr/aligner.safetensors \
        --data ../shared/data/hh-rlhf/harmless_base_2000.jsonl --n 32 --out report.json

Prints a table, then the whole report as one JSON object on the last line of stdout. See howto/correction.md.
"""

import json
import sys
import time
from pathlib import Path
from typing import Literal, Optional

import torch
import tyro

from lit_aligner.base import load_base
from lit_aligner.cli import run_cli
from lit_aligner.default_model import DEFAULT_CHECKPOINT_DIR
from lit_aligner.evaluation import heldout_split
from lit_aligner.evaluation.correction import evaluate_correction, format_report
from lit_aligner.files import atomic_write_json, check_output, input_files
from lit_aligner.generation import load_aligner_entries
from lit_aligner.prompts import is_correction


def main(
    aligner: Path,
    data: Optional[Path] = None,
    checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR,
    split: Literal["val", "all"] = "val",
    n: Optional[int] = 32,
    max_seq_length: Optional[int] = None,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    with_base: tyro.conf.FlagCreatePairsOff[bool] = True,
    out: Optional[Path] = None,
    force: bool = False,
    device: str = "auto",
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
) -> None:
    """Copy rate (fed the good answer C, does the corrector return it unchanged?) and ll(C) vs ll(A) given (Q, A),
    for the correction Aligner and the bare base, on held-out pairs. Greedy decoding.

    Args:
        aligner: the correction-mode Aligner file (trained with `finetune/aligner.py --mode correct`).
        data: Q-A-C JSON/JSONL {question, answer, correction}, any preference file (A = rejected, C = chosen), or a
            prepared correction directory; default: the offline default dataset.
        checkpoint_dir: the converted base model the Aligner was trained on.
        split: val = the validation rows the training run held out (same split seed / fraction / max_seq_length,
            read from the Aligner's metadata); all = every row (for a file the Aligner never saw).
        n: evaluate the first N pairs of the split (None: all of them).
        max_seq_length: drop pairs whose prompt + longer answer exceed this (default: the training run's).
        max_new_tokens: most tokens generated per copy test; longer good answers are compared on this many tokens.
        batch_size: pairs per generation / scoring batch.
        with_base: also evaluate the bare base given the same correction prompts (the "before" column).
        out: also write the report (with the copy outputs of a few samples) to this JSON file.
        force: replace an existing --out file.
        device: auto (cuda if available, else cpu), cpu, cuda, ...
        dtype: weights dtype; auto = bfloat16 on CUDA, the checkpoint's own dtype on the CPU.
    """
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if out is not None:
        check_output(out, input_files(aligner, data, checkpoint_dir), force)
    t0 = time.perf_counter()
    model, tokenizer = load_base(checkpoint_dir, device, dtype)
    entry = load_aligner_entries([aligner], model)[0]
    if not is_correction(entry.metadata):
        raise ValueError(f"{aligner} is not a correction Aligner (metadata mode "
                         f"{entry.metadata.get('mode', 'unset')!r}); train one with `finetune/aligner.py --mode "
                         f"correction` (howto/correction.md)")
    dataset, info = heldout_split("correction", data, tokenizer, "correction", entry.metadata, split, n,
                                  max_seq_length)
    print(f"evaluating {aligner} on {len(dataset)} {split!r} pairs of {info['source']} "
          f"(bad rows skipped: {info.get('bad_rows', 0)})", file=sys.stderr)
    with torch.inference_mode():
        report = evaluate_correction(model, tokenizer, entry.aligner, dataset, max_new_tokens, batch_size, with_base)
    report.update(aligner=str(aligner), checkpoint_dir=str(checkpoint_dir), data=info,
                  seconds=time.perf_counter() - t0)
    print(format_report(report))
    for i, s in enumerate(report["samples"], 1):
        print(f"--- sample {i}: {s['question'][:100]!r}")
        for k in ("good_answer", "base_copy", "corrector_copy"):
            if k in s:
                print(f"  {k}: {s[k][:200]!r}")
    if out:
        atomic_write_json(out, report)
        print(f"wrote {out}", file=sys.stderr)
    print(json.dumps(report))


if __name__ == "__main__":
    run_cli(main)
