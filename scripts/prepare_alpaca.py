"""Prepare Stanford Alpaca (instruction, input, output) as SFT data: tokenized, split, written as safetensors.

    python scripts/prepare_alpaca.py --data-file ../shared/data/alpaca/alpaca_4500.json --skip-bad-rows

Without --data-file the full Stanford Alpaca JSON is downloaded once into data/alpaca/alpaca_data.json. See
howto/data.md.
"""

from pathlib import Path
from typing import Literal, Optional

import tyro

from lit_aligner.cli import run_cli
from lit_aligner.data import ALPACA_URL, download, prepare_with_checkpoint, report
from lit_aligner.generate import DEFAULT_CHECKPOINT


def main(
    data_file: Optional[Path] = None,
    out_dir: Path = Path("data/alpaca"),
    checkpoint_dir: Path = DEFAULT_CHECKPOINT,
    template: Literal["alpaca", "chat", "beaver", "hh", "plain"] = "alpaca",
    max_seq_length: int = 512,
    val_fraction: float = 0.05,
    val_size: Optional[int] = None,
    seed: int = 42,
    skip_bad_rows: tyro.conf.FlagCreatePairsOff[bool] = False,
    truncation: Literal["drop", "truncate"] = "drop",
    url: str = ALPACA_URL,
) -> None:
    """Prepare Alpaca-style SFT data.

    Args:
        data_file: a local Alpaca JSON list or JSONL ({instruction, input, output}); default: download `url`.
        out_dir: where train.safetensors, val.safetensors and meta.json go.
        checkpoint_dir: converted model whose tokenizer (and chat template) is used.
        template: prompt template (see howto/data.md); saved in meta.json and later in the Aligner's metadata.
        max_seq_length: longest prompt + response in tokens; longer rows follow --truncation.
        val_fraction: fraction of rows held out for validation (seeded).
        val_size: number of validation rows instead of --val-fraction.
        seed: seed of the train/val split.
        skip_bad_rows: skip and count malformed rows instead of stopping at the first one.
        truncation: drop: leave out over-long rows; truncate: cut the response tail (rows whose prompt alone does not
            fit are still left out).
        url: where to download Alpaca from when no --data-file is given.
    """
    if data_file is None:
        data_file = download(url, out_dir / "alpaca_data.json")
    info = prepare_with_checkpoint("sft", data_file, out_dir, checkpoint_dir, template, max_seq_length,
                                   val_fraction=val_fraction, val_size=val_size, seed=seed,
                                   skip_bad_rows=skip_bad_rows, truncation=truncation, format="alpaca")
    print(report(info))


if __name__ == "__main__":
    run_cli(main)
