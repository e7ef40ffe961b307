"""Prepare any JSON list / JSONL / parquet file (or a Hub dataset's files) as SFT, preference or Q-A-C data, renaming
its fields with --field-map.

    python scripts/prepare_json.py --data-file qa.jsonl --field-map instruction=question,output=answer
    python scripts/prepare_json.py --hub-repo HuggingFaceH4/ultrachat_200k --hub-files "data/train_sft-*.parquet"

See howto/data.md for the formats detected from the fields (Alpaca, PKU-SafeRLHF, HH-RLHF, prompt/response,
prompt/chosen/rejected, question/answer/correction, chat messages / ShareGPT conversations).
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from lit_aligner.cli import run_cli
from lit_aligner.data import DataError, PrepareConfig, run_prepare


@dataclass
class Json(PrepareConfig):
    """Prepare a generic JSON / JSONL / parquet file, or the files of a Hugging Face dataset repository."""

    data_file: Optional[Path] = None
    """JSON list of objects, JSONL (one object per line; .gz too) or parquet."""

    def source(self):
        if self.data_file is None and self.hub_repo is None:
            raise DataError("no data: give --data-file FILE, or --hub-repo REPO (and --hub-files PATTERN)")
        return super().source()

    def default_out_dir(self) -> Path:
        if self.data_file is None and self.hub_repo is not None:
            return Path("data") / f"{self.hub_repo.split('/')[-1]}-{self.kind}"
        return super().default_out_dir()


if __name__ == "__main__":
    run_cli(run_prepare, Json, __doc__)
