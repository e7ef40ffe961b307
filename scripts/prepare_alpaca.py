"""Prepare Stanford Alpaca (instruction, input, output) as SFT data: tokenized, split, written as safetensors.

    python scripts/prepare_alpaca.py --data-file ../shared/data/alpaca/alpaca_4500.json

Without --data-file the full Stanford Alpaca JSON is downloaded once into data/alpaca/alpaca_data.json. See
howto/data.md.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lit_aligner.cli import run_cli
from lit_aligner.data import DataOptions, PrepareConfig, run_prepare
from lit_aligner.data.download import ALPACA_URL, download


@dataclass
class Alpaca(PrepareConfig):
    """Prepare Alpaca SFT data (template: alpaca)."""

    kind: Literal["sft"] = "sft"
    """Alpaca rows have one answer each: SFT data."""
    out_dir: Path = Path("data/alpaca")
    """output directory."""
    url: str = ALPACA_URL
    """where to download Alpaca from when no --data-file is given."""
    data_options: DataOptions = field(default_factory=lambda: DataOptions(format="alpaca"))

    def source(self):
        return self.data_file or download(self.url, Path(self.out_dir) / "alpaca_data.json")


if __name__ == "__main__":
    run_cli(run_prepare, Alpaca, __doc__)
