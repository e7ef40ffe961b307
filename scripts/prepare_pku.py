"""Prepare PKU-SafeRLHF (prompt, response_0, response_1, is_response_*_safe, better/safer_response_id) as SFT data on
the safer or the better response, or as preference pairs (chosen = the safer / better response).

    python scripts/prepare_pku.py --data-file PKU-SafeRLHF/train.jsonl --kind preference --preference safer

Without --data-file, the train splits of the Hub dataset PKU-Alignment/PKU-SafeRLHF are downloaded once (into the
Hugging Face cache). See howto/data.md.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Tuple

from lit_aligner.cli import run_cli
from lit_aligner.data import DataOptions, PrepareConfig, run_prepare


@dataclass
class PKU(PrepareConfig):
    """Prepare PKU-SafeRLHF data (template: beaver, PKU's own "BEGINNING OF CONVERSATION: USER: ... ASSISTANT:")."""

    kind: Literal["sft", "preference"] = "preference"
    """sft (target = the chosen response) or preference (chosen vs the other response)."""
    hub_repo: Optional[str] = "PKU-Alignment/PKU-SafeRLHF"
    """the Hub dataset read when no --data-file is given."""
    hub_files: Tuple[str, ...] = ("data/*/train.jsonl",)
    """its files (the Alpaca-7B, Alpaca2-7B and Alpaca3-8B subsets' train splits)."""
    template: Literal["beaver", "alpaca", "chat", "hh", "plain"] = "beaver"
    """prompt template."""
    data_options: DataOptions = field(default_factory=lambda: DataOptions(format="pku", preference="safer"))

    def default_out_dir(self) -> Path:
        return Path("data") / f"pku-{self.kind}-{self.data_options.preference}"


if __name__ == "__main__":
    run_cli(run_prepare, PKU, __doc__)
