"""Write a converted base model as a Hugging Face model directory (config.json, model.safetensors, tokenizer files),
so transformers, PEFT, lm-evaluation-harness or vLLM load the very weights an Aligner was trained on.

    python scripts/export_hf.py --out-dir hf/SmolLM2-135M-Instruct          # the embedded default
    python -c "import transformers; transformers.AutoModelForCausalLM.from_pretrained('hf/SmolLM2-135M-Instruct')"

See howto/convert.md.
"""

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lit_aligner.cli import run_cli
from lit_aligner.convert import print_progress, summary
from lit_aligner.convert.writer import DEFAULT_MAX_SHARD_BYTES
from lit_aligner.default_model import DEFAULT_CHECKPOINT_DIR


@dataclass(kw_only=True)
class ExportHF:
    """Export CHECKPOINT_DIR (a lit-aligner base-model directory) into OUT_DIR as a Hugging Face model."""

    out_dir: Path
    """the Hugging Face model directory to write."""
    checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR
    """the converted base model."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """weights dtype; auto keeps the checkpoint's."""
    max_shard_gb: float = DEFAULT_MAX_SHARD_BYTES / 1e9
    """largest weight file, in GB; larger models get sharded with an index."""
    force: bool = False
    """replace a model already in --out-dir."""


def main(cfg: ExportHF) -> None:
    from lit_aligner.convert.export import export_hf
    from lit_aligner.devices import DTYPES

    print(f"exporting {cfg.checkpoint_dir}", file=sys.stderr)
    result = export_hf(cfg.checkpoint_dir, cfg.out_dir, DTYPES.get(cfg.dtype), int(cfg.max_shard_gb * 1e9),
                       print_progress(), force=cfg.force)
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(summary(result).replace("converted", "exported"))


if __name__ == "__main__":
    run_cli(main, ExportHF, __doc__)
