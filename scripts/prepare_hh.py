"""Prepare Anthropic HH-RLHF ({chosen, rejected} dialogues) as SFT data (the chosen dialogues' last answers) or as
preference pairs; every dialogue is split at its last "\\n\\nAssistant:" turn.

    python scripts/prepare_hh.py --data-file ../shared/data/hh-rlhf/harmless_base_2000.jsonl --kind preference \\
        --skip-bad-rows

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
    out_dir: Optional[Path] = None,
    checkpoint_dir: Path = DEFAULT_CHECKPOINT,
    template: Literal["hh", "chat", "alpaca", "beaver", "plain"] = "hh",
    max_seq_length: int = 1024,
    val_fraction: float = 0.05,
    val_size: Optional[int] = None,
    seed: int = 42,
    skip_bad_rows: tyro.conf.FlagCreatePairsOff[bool] = False,
    truncation: Literal["drop", "truncate"] = "drop",
) -> None:
    """Prepare HH-RLHF data.

    Args:
        data_file: HH-RLHF JSONL (or .jsonl.gz as released).
        kind: sft (prompt + the chosen answer) or preference (chosen vs rejected answer to the shared prompt).
        out_dir: output directory; default data/hh-<kind>.
        checkpoint_dir: converted model whose tokenizer (and chat template) is used.
        template: hh keeps the dialogue verbatim; chat renders its turns with the model's chat template; the others
            render the last Human turn with the earlier turns as context.
        max_seq_length: longest prompt + response in tokens (the longer response for pairs).
        val_fraction: fraction of rows held out for validation (seeded).
        val_size: number of validation rows instead of --val-fraction.
        seed: seed of the train/val split.
        skip_bad_rows: skip and count malformed rows (mismatched prompts, empty answers) instead of stopping.
        truncation: drop: leave out over-long rows; truncate: cut the response tails.
    """
    out_dir = out_dir or Path("data") / f"hh-{kind}"
    info = prepare_with_checkpoint(kind, data_file, out_dir, checkpoint_dir, template, max_seq_length,
                                   val_fraction=val_fraction, val_size=val_size, seed=seed,
                                   skip_bad_rows=skip_bad_rows, truncation=truncation, format="hh")
    print(report(info))


if __name__ == "__main__":
    run_cli(main)
