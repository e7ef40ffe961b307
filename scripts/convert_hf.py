"""Convert a Hugging Face LLaMA-style model folder into a lit-aligner base-model directory.

    python scripts/convert_hf.py path/to/Llama-2-7b-hf      # -> checkpoints/Llama-2-7b-hf

See howto/convert.md.
"""

from dataclasses import dataclass
from pathlib import Path

import tyro

from lit_aligner.cli import run_cli
from lit_aligner.convert import ConvertConfig, convert_hf


@dataclass(kw_only=True)
class HF(ConvertConfig):
    """Convert SOURCE_DIR (config.json + model*.safetensors or pytorch_model*.bin, tokenizer files) into OUT_DIR:
    config.json, model.safetensors (or shards + index) and the tokenizer files."""

    source_dir: tyro.conf.Positional[Path]
    """the Hugging Face model folder."""


if __name__ == "__main__":
    run_cli(lambda cfg: cfg.run_conversion(convert_hf, cfg.source_dir), HF, __doc__)
