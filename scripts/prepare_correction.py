"""Prepare Q-A-C correction data: question, upstream answer A, corrected answer C. Reads a Q-A-C JSON/JSONL
({question, answer, correction}) or any preference file (A = rejected, C = chosen: PKU-SafeRLHF, HH-RLHF,
prompt/chosen/rejected); default: the offline default dataset (A = a plain answer, C = the same answer in its FORMAT).

    python scripts/prepare_correction.py --data-file ../shared/data/hh-rlhf/harmless_base_2000.jsonl

See howto/data.md.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lit_aligner.cli import run_cli
from lit_aligner.data import DataOptions, PrepareConfig, run_prepare


@dataclass
class Correction(PrepareConfig):
    """Prepare Q-A-C data (template: correction)."""

    kind: Literal["correction"] = "correction"
    """Q-A-C data."""
    template: Literal["correction"] = "correction"
    """the Q-A-C prompt."""
    out_dir: Path = Path("data/correction")
    """output directory."""
    data_options: DataOptions = field(default_factory=lambda: DataOptions(max_seq_length=1024))


if __name__ == "__main__":
    run_cli(run_prepare, Correction, __doc__)
