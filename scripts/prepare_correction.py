"""Prepare Q-A-C correction data: question, upstream answer A, corrected answer C. Reads a Q-A-C JSON/JSONL
({question, answer, correction}) or any preference file (A = rejected, C = chosen: PKU-SafeRLHF, HH-RLHF,
prompt/chosen/rejected).

    python scripts/prepare_correction.py --data-file ../shared/data/hh-rlhf/harmless_base_2000.jsonl --skip-bad-rows

See howto/data.md.
"""

from pathlib import Path
from typing import Literal, Optional

import tyro

from lit_aligner.cli import run_cli
from lit_aligner.data import prepare_with_checkpoint, report
from lit_aligner.generate import DEFAULT_CHECKPOINT


def main(
    data_file: Optional[Path] = None,
    format: Literal["auto", "qac", "pku", "hh", "pairs"] = "auto",
    preference: Literal["safer", "better"] = "safer",
    field_map: Optional[str] = None,
    out_dir: Path = Path("data/correction"),
    checkpoint_dir: Path = DEFAULT_CHECKPOINT,
    max_seq_length: int = 1024,
    val_fraction: float = 0.05,
    val_size: Optional[int] = None,
    seed: int = 42,
    skip_bad_rows: tyro.conf.FlagCreatePairsOff[bool] = False,
    truncation: Literal["drop", "truncate"] = "drop",
) -> None:
    """Prepare Q-A-C data (template: correction).

    Args:
        data_file: Q-A-C or preference JSON/JSONL; default: the offline default dataset (A = a plain answer,
            C = the same answer in the default FORMAT).
        format: the row format; auto detects it from the field names.
        preference: for PKU-SafeRLHF rows, which response is the correction C: safer or better (A is the other).
        field_map: ours=theirs pairs to rename fields first, e.g. question=prompt,answer=draft,correction=final.
        out_dir: output directory.
        checkpoint_dir: converted model whose tokenizer is used.
        max_seq_length: longest prompt (question + A) + the longer of A and C, in tokens.
        val_fraction: fraction of rows held out for validation (seeded).
        val_size: number of validation rows instead of --val-fraction.
        seed: seed of the train/val split.
        skip_bad_rows: skip and count malformed rows instead of stopping at the first one.
        truncation: drop: leave out over-long rows; truncate: cut the targets' tails.
    """
    info = prepare_with_checkpoint("correction", data_file, out_dir, checkpoint_dir, "correction", max_seq_length,
                                   val_fraction=val_fraction, val_size=val_size, seed=seed,
                                   skip_bad_rows=skip_bad_rows, truncation=truncation, format=format,
                                   preference=preference, field_map=field_map)
    print(report(info))


if __name__ == "__main__":
    run_cli(main)
