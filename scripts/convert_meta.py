"""Convert a Meta checkpoint folder (params.json, consolidated.NN.pth) into a lit-aligner base-model directory.

    python scripts/convert_meta.py llama/llama-2-7b --model-name Llama-2-7b-hf   # -> checkpoints/Llama-2-7b-hf

See howto/convert.md.
"""

from dataclasses import dataclass
from pathlib import Path

import tyro

from lit_aligner.cli import run_cli
from lit_aligner.convert import ConvertConfig, convert_meta


@dataclass(kw_only=True)
class Meta(ConvertConfig):
    """Convert SOURCE_DIR (params.json + consolidated.00.pth, .. consolidated.NN.pth for model-parallel shards) into
    OUT_DIR: config.json, model.safetensors (or shards + index) and the tokenizer (tokenizer.model from SOURCE_DIR or
    its parent folder, where Meta's download puts it)."""

    source_dir: tyro.conf.Positional[Path]
    """the Meta model folder (e.g. llama-2-7b, llama-2-13b with 2 shards, llama-2-70b with 8)."""


if __name__ == "__main__":
    run_cli(lambda cfg: cfg.run_conversion(convert_meta, cfg.source_dir), Meta, __doc__)
