"""Prepare PKU-SafeRLHF (prompt, response_0, response_1, is_response_*_safe, better/safer_response_id) as SFT data on
the safer or the better response, or as preference pairs (chosen = the safer / better response).

    python scripts/prepare_pku.py --data-file PKU-SafeRLHF/train.jsonl --kind preference --preference safer

See howto/data.md.
"""

from pathlib import Path
from typing import Literal, Optional

import tyro

from lit_aligner.cli import run_cli
from lit_aligner.data import prepare_with_checkpoint, report
from lit_aligner.generate import DEFAULT_CHECKPOINT


def main(
    data_file: Path,
    kind: Literal["sft", "preference"] = "preference",
    preference: Literal["safer", "better"] = "safer",
    out_dir: Optional[Path] = None,
    checkpoint_dir: Path = DEFAULT_CHECKPOINT,
    template: Literal["beaver", "alpaca", "chat", "hh", "plain"] = "beaver",
    max_seq_length: int = 512,
    val_fraction: float = 0.05,
    val_size: Optional[int] = None,
    seed: int = 42,
    skip_bad_rows: tyro.conf.FlagCreatePairsOff[bool] = False,
    truncation: Literal["drop", "truncate"] = "drop",
) -> None:
    """Prepare PKU-SafeRLHF data.

    Args:
        data_file: PKU-SafeRLHF JSONL (or JSON list).
        kind: sft (target = the chosen response) or preference (chosen vs the other response).
        preference: which response is chosen: safer (safer_response_id) or better (better_response_id).
        out_dir: output directory; default data/pku-<kind>-<preference>.
        checkpoint_dir: converted model whose tokenizer (and chat template) is used.
        template: prompt template; beaver is PKU's own "BEGINNING OF CONVERSATION: USER: ... ASSISTANT:".
        max_seq_length: longest prompt + response in tokens (the longer response for pairs).
        val_fraction: fraction of rows held out for validation (seeded).
        val_size: number of validation rows instead of --val-fraction.
        seed: seed of the train/val split.
        skip_bad_rows: skip and count malformed rows instead of stopping at the first one.
        truncation: drop: leave out over-long rows; truncate: cut the response tails.
    """
    out_dir = out_dir or Path("data") / f"pku-{kind}-{preference}"
    info = prepare_with_checkpoint(kind, data_file, out_dir, checkpoint_dir, template, max_seq_length,
                                   val_fraction=val_fraction, val_size=val_size, seed=seed,
                                   skip_bad_rows=skip_bad_rows, truncation=truncation, format="pku",
                                   preference=preference)
    print(report(info))


if __name__ == "__main__":
    run_cli(main)
