"""Convert Aligner checkpoints between the paper's `.pth` layout and our `.safetensors` format.

    python scripts/convert_aligner.py alpaca-sft-llama2-7b-1token.pth --out aligners/alpaca-7b.safetensors
    python scripts/convert_aligner.py aligners/alpaca-7b.safetensors --out alpaca-7b.pth --to paper

See howto/aligners.md.
"""

import sys
from pathlib import Path
from typing import Literal, Optional

import tyro

from lit_aligner.aligner_files import (AlignerFileError, describe, export_paper_checkpoint, import_paper_checkpoint,
                                       load_aligner, save_aligner)
from lit_aligner.cli import run_cli
from lit_aligner.files import check_output


def main(
    src: tyro.conf.Positional[Path],
    out: Path,
    to: Literal["ours", "paper"] = "ours",
    base_name: Optional[str] = None,
    force: tyro.conf.FlagCreatePairsOff[bool] = False,
) -> None:
    """Convert the Aligner in SRC and write it to OUT.

    Args:
        src: the Aligner to convert: a paper `.pth` (with --to ours) or one of our `.safetensors` (with --to paper).
        out: the file to write (`.safetensors` for --to ours, `.pth` for --to paper); written atomically.
        to: target format: `ours` (lit-aligner .safetensors with a header) or `paper` (the paper's .pth state dict).
        base_name: base config name to record in the header (--to ours); default: guessed from the shape
            (LLaMA-2 preferred, the paper's bases).
        force: overwrite OUT if it exists.
    """
    check_output(out, [src], force)
    if to == "ours":
        if src.suffix == ".safetensors":
            raise AlignerFileError(f"{src} is already a .safetensors file; to write the paper's layout pass "
                                   f"--to paper.")
        aligner, meta = import_paper_checkpoint(src, base_name)
        if not meta["base_model"]:
            print("warning: no registry config has this shape; the base name is left empty (pass --base-name)",
                  file=sys.stderr)
        save_aligner(aligner, out, meta["base_model"], {**meta, "created_by": "scripts/convert_aligner.py"})
    else:
        aligner, meta = load_aligner(src)
        export_paper_checkpoint(aligner, out)
    kind = "lit-aligner .safetensors" if to == "ours" else "paper .pth"
    print(f"wrote {out} ({kind}, {out.stat().st_size / 1024:.1f} KiB): {describe(aligner, meta)}")


if __name__ == "__main__":
    run_cli(main)
