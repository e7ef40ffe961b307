"""Write the offline default dataset (instructions made by code, every answer in the "ANSWER: ...\\nEND OF ANSWER"
format; see lit_aligner/default_data.py) as prepared SFT, preference or Q-A-C data.

    python scripts/prepare_default.py

See howto/data.md.
"""

from pathlib import Path
from typing import Literal, Optional


from lit_aligner.cli import run_cli
from lit_aligner import default_data
from lit_aligner.data import DataError, prepare_with_checkpoint, report
from lit_aligner.generate import DEFAULT_CHECKPOINT


def main(
    kind: Literal["sft", "preference", "correction"] = "sft",
    num_rows: int = default_data.DEFAULT_NUM_ROWS,
    data_seed: int = default_data.DEFAULT_SEED,
    out_dir: Optional[Path] = None,
    checkpoint_dir: Path = DEFAULT_CHECKPOINT,
    template: Optional[Literal["chat", "alpaca", "beaver", "hh", "plain"]] = None,
    max_seq_length: int = 256,
    val_fraction: float = 0.05,
    val_size: Optional[int] = None,
    seed: int = 42,
    truncation: Literal["drop", "truncate"] = "drop",
) -> None:
    """Prepare the offline default dataset.

    Args:
        kind: sft (target: the formatted answer), preference (chosen: formatted, rejected: the same answer in plain
            words) or correction (A: plain answer, C: formatted; template correction).
        num_rows: how many distinct rows to generate.
        data_seed: seed of the row generator (same seed, same rows).
        out_dir: output directory; default data/default (data/default-<kind> for other kinds).
        checkpoint_dir: converted model whose tokenizer (and chat template) is used.
        template: prompt template; default chat (the base model's own chat template), correction for --kind
            correction.
        max_seq_length: longest prompt + response in tokens; longer rows follow --truncation.
        val_fraction: fraction of rows held out for validation (seeded).
        val_size: number of validation rows instead of --val-fraction.
        seed: seed of the train/val split.
        truncation: drop: leave out over-long rows; truncate: cut the response tail.
    """
    if kind == "sft":
        rows = default_data.generate_rows(num_rows, data_seed)
    else:
        rows = default_data.generate_preference_rows(num_rows, data_seed)
    template = template or ("correction" if kind == "correction" else "chat")
    if kind == "correction" and template != "correction":
        raise DataError("--kind correction renders its prompts with the correction template; leave --template out")
    out_dir = out_dir or Path("data") / ("default" if kind == "sft" else f"default-{kind}")
    info = prepare_with_checkpoint(kind, rows, out_dir, checkpoint_dir, template, max_seq_length,
                                   val_fraction=val_fraction, val_size=val_size, seed=seed, truncation=truncation,
                                   source=f"default (num_rows={num_rows}, data_seed={data_seed})")
    print(report(info))


if __name__ == "__main__":
    run_cli(main)
