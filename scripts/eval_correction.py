"""Evaluate one correction-mode Aligner on held-out Q-A-C pairs (kept for old command lines): the same as
`python evaluate/aligner.py correction --aligners FILE`, which takes several Aligners (howto/evaluate.md).

    python scripts/eval_correction.py --aligner out/corr/aligner.safetensors \
        --data ../shared/data/hh-rlhf/harmless_base_2000.jsonl --n 32 --out report.json

Prints a table, then the report of this one Aligner as one JSON object on the last line of stdout.
"""

import json
import sys
from pathlib import Path
from typing import Literal, Optional

import tyro

from lit_aligner.cli import run_cli
from lit_aligner.default_model import DEFAULT_CHECKPOINT_DIR
from lit_aligner.evaluation.commands import Correction
from lit_aligner.files import atomic_write_json, check_output, input_files


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
    """Copy rate and ll(C) vs ll(A) of one correction Aligner (and the bare base); the flags of `evaluate/aligner.py
    correction`, with --aligner for its one Aligner."""
    cfg = Correction(aligners=[aligner], data=data, checkpoint_dir=checkpoint_dir, split=split, n=n,
                     max_seq_length=max_seq_length, max_new_tokens=max_new_tokens, batch_size=batch_size,
                     with_base=with_base, device=device, dtype=dtype)
    if out is not None:
        check_output(out, input_files(*cfg.inputs()), force)
    result = cfg.run()
    print(cfg.format(result))
    report = {**result["results"][0], "checkpoint_dir": str(checkpoint_dir)}
    if out is not None:
        atomic_write_json(out, report)
        print(f"wrote {out}", file=sys.stderr)
    print("note: this is `python evaluate/aligner.py correction --aligners FILE` (several Aligners at once)",
          file=sys.stderr)
    print(json.dumps(report))


if __name__ == "__main__":
    run_cli(main)
