"""Write the offline default dataset (instructions made by code, every answer in the "ANSWER: ...\\nEND OF ANSWER"
format; see lit_aligner/data/default.py) as prepared SFT, preference or Q-A-C data.

    python scripts/prepare_default.py

See howto/data.md.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import tyro

from lit_aligner.cli import run_cli
from lit_aligner.data import DataOptions, PrepareConfig, default, run_prepare
from lit_aligner.data.prepare import TemplateName


@dataclass
class Default(PrepareConfig):
    """Prepare the offline default dataset: sft (target: the formatted answer), preference (chosen: formatted,
    rejected: the same answer in plain words) or correction (A: plain answer, C: formatted)."""

    data_file: tyro.conf.Suppress[Optional[Path]] = None
    template: Optional[TemplateName] = None  # the field again only for its help: this script's default differs
    """prompt template (default: chat, the base's own chat template; correction for --kind correction)."""
    num_rows: int = default.DEFAULT_NUM_ROWS
    """how many distinct rows to generate."""
    data_seed: int = default.DEFAULT_SEED
    """seed of the row generator (same seed, same rows)."""
    data_options: DataOptions = field(default_factory=lambda: DataOptions(max_seq_length=256))

    def default_template(self, tokenizer) -> str:
        return "correction" if self.kind == "correction" else "chat"

    def default_out_dir(self) -> Path:
        return Path("data") / ("default" if self.kind == "sft" else f"default-{self.kind}")

    def source(self):
        make = default.generate_rows if self.kind == "sft" else default.generate_preference_rows
        return make(self.num_rows, self.data_seed)

    def source_label(self) -> str:
        return f"default (num_rows={self.num_rows}, data_seed={self.data_seed})"


if __name__ == "__main__":
    run_cli(run_prepare, Default, __doc__)
