"""Prepare any JSON list / JSONL file as SFT, preference or Q-A-C data, renaming its fields with --field-map.

    python scripts/prepare_json.py --data-file qa.jsonl --field-map instruction=question,output=answer

See howto/data.md for the formats detected from the fields (Alpaca, PKU-SafeRLHF, HH-RLHF, prompt/chosen/rejected,
question/answer/correction).
"""

from pathlib import Path
from typing import Literal, Optional

import tyro

from lit_aligner.cli import run_cli
from lit_aligner.data import prepare_with_checkpoint, report
from lit_aligner.generate import DEFAULT_CHECKPOINT


def main(
    data_file: Path,
    field_map: Optional[str] = None,
    kind: Literal["sft", "preference", "correction"] = "sft",
    format: Literal["auto", "alpaca", "pku", "hh", "pairs", "qac"] = "auto",
    preference: Optional[Literal["safer", "better"]] = None,
    out_dir: Optional[Path] = None,
    checkpoint_dir: Path = DEFAULT_CHECKPOINT,
    template: Optional[Literal["alpaca", "chat", "beaver", "hh", "plain", "correction"]] = None,
    max_seq_length: int = 512,
    val_fraction: float = 0.05,
    val_size: Optional[int] = None,
    seed: int = 42,
    skip_bad_rows: tyro.conf.FlagCreatePairsOff[bool] = False,
    truncation: Literal["drop", "truncate"] = "drop",
) -> None:
    """Prepare a generic JSON / JSONL file.

    Args:
        data_file: JSON list of objects or JSONL (one object per line).
        field_map: ours=theirs pairs, comma-separated, e.g. instruction=question,input=context,output=answer
            (ours: instruction, input, output; prompt, chosen, rejected; question, answer, correction; the PKU
            fields).
        kind: sft (one target per prompt), preference (chosen/rejected pairs) or correction (Q-A-C).
        format: the row format; auto detects it from the (mapped) field names.
        preference: for PKU-SafeRLHF rows, which response is the target/chosen one: safer or better (default:
            better for sft, safer for preference and correction).
        out_dir: output directory; default data/<file stem>-<kind>.
        checkpoint_dir: converted model whose tokenizer (and chat template) is used.
        template: prompt template; default alpaca (correction for --kind correction).
        max_seq_length: longest prompt + response in tokens; longer rows follow --truncation.
        val_fraction: fraction of rows held out for validation (seeded).
        val_size: number of validation rows instead of --val-fraction.
        seed: seed of the train/val split.
        skip_bad_rows: skip and count malformed rows instead of stopping at the first one.
        truncation: drop: leave out over-long rows; truncate: cut the response tail.
    """
    template = template or ("correction" if kind == "correction" else "alpaca")
    out_dir = out_dir or Path("data") / f"{data_file.name.split('.')[0]}-{kind}"
    info = prepare_with_checkpoint(kind, data_file, out_dir, checkpoint_dir, template, max_seq_length,
                                   val_fraction=val_fraction, val_size=val_size, seed=seed,
                                   skip_bad_rows=skip_bad_rows, truncation=truncation, field_map=field_map,
                                   format=format, preference=preference)
    print(report(info))


if __name__ == "__main__":
    run_cli(main)
