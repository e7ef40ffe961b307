"""Prepare any JSON list / JSONL file as SFT, preference or Q-A-C data, renaming its fields with --field-map.

    python scripts/prepare_json.py --data-file qa.jsonl --field-map instruction=question,output=answer

See howto/data.md for the formats detected from the fields (Alpaca, PKU-SafeRLHF, HH-RLHF, prompt/response,
prompt/chosen/rejected, question/answer/correction, chat messages / ShareGPT conversations).
"""

from dataclasses import dataclass
from pathlib import Path

from lit_aligner.cli import run_cli
from lit_aligner.data import PrepareConfig, run_prepare


@dataclass
class Json(PrepareConfig):
    """Prepare a generic JSON / JSONL file."""

    data_file: Path = Path("data.jsonl")
    """JSON list of objects or JSONL (one object per line)."""


if __name__ == "__main__":
    run_cli(run_prepare, Json, __doc__)
