"""Prepare Stanford Alpaca (instruction, input, output) as SFT data: tokenized, split, written as safetensors.

    python scripts/prepare_alpaca.py --data-file ../shared/data/alpaca/alpaca_4500.json

Without --data-file the 52k rows of the Hub dataset tatsu-lab/alpaca are downloaded once (into the Hugging Face cache;
its parquet file needs pyarrow, the [data] extra). See howto/data.md.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Tuple

from lit_aligner.cli import run_cli
from lit_aligner.data import DataOptions, PrepareConfig, run_prepare
from lit_aligner.data.prepare import TemplateName


@dataclass
class Alpaca(PrepareConfig):
    """Prepare Alpaca SFT data (template: alpaca)."""

    kind: Literal["sft"] = "sft"
    """Alpaca rows have one answer each: SFT data."""
    out_dir: Path = Path("data/alpaca")
    """output directory."""
    hub_repo: Optional[str] = "tatsu-lab/alpaca"
    """the Hub dataset read when no --data-file is given."""
    hub_files: Tuple[str, ...] = ("data/*.parquet",)
    """its files."""
    template: Optional[TemplateName] = None  # the field again only for its help: this script's default differs
    """prompt template (default: alpaca, the Stanford wording the paper's Alpaca Aligners were trained on)."""
    data_options: DataOptions = field(default_factory=lambda: DataOptions(format="alpaca"))

    def default_template(self, tokenizer) -> str:
        return "alpaca"


if __name__ == "__main__":
    run_cli(run_prepare, Alpaca, __doc__)
