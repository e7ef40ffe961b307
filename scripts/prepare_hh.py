"""Prepare Anthropic HH-RLHF ({chosen, rejected} dialogues) as SFT data (the chosen dialogues' last answers) or as
preference pairs; every dialogue is split at its last "\\n\\nAssistant:" turn.

    python scripts/prepare_hh.py --data-file ../shared/data/hh-rlhf/harmless_base_2000.jsonl --kind preference

Without --data-file, harmless-base/train.jsonl.gz of the Hub dataset Anthropic/hh-rlhf is downloaded once (into the
Hugging Face cache). See howto/data.md.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Tuple

from lit_aligner.cli import run_cli
from lit_aligner.data import DataOptions, PrepareConfig, run_prepare


@dataclass
class HH(PrepareConfig):
    """Prepare HH-RLHF data. Template hh keeps the dialogue verbatim; chat renders its turns with the model's chat
    template; the others render the last Human turn with the earlier turns as context."""

    data_file: Optional[Path] = None
    """HH-RLHF JSONL (or .jsonl.gz as released); default: --hub-repo's --hub-files."""
    hub_repo: Optional[str] = "Anthropic/hh-rlhf"
    """the Hub dataset read when no --data-file is given."""
    hub_files: Tuple[str, ...] = ("harmless-base/train.jsonl.gz",)
    """its files (e.g. helpful-base/train.jsonl.gz)."""
    kind: Literal["sft", "preference"] = "preference"
    """sft (prompt + the chosen answer) or preference (chosen vs rejected answer to the shared prompt)."""
    template: Literal["hh", "chat", "alpaca", "beaver", "plain"] = "hh"
    """prompt template."""
    data_options: DataOptions = field(default_factory=lambda: DataOptions(format="hh", max_seq_length=1024))
    name: str = field(default="hh", init=False, repr=False)

    def default_out_dir(self) -> Path:
        return Path("data") / f"hh-{self.kind}"


if __name__ == "__main__":
    run_cli(run_prepare, HH, __doc__)
