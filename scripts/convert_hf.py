"""Convert a Hugging Face LLaMA-style model folder into a lit-aligner checkpoint folder.

    python scripts/convert_hf.py path/to/Llama-2-7b-hf      # -> checkpoints/Llama-2-7b-hf

See howto/convert.md.
"""

import sys
from pathlib import Path
from typing import Literal, Optional

import tyro

from lit_aligner.cli import run_cli
from lit_aligner.convert_io import DEFAULT_MAX_SHARD_BYTES, DTYPES, convert_hf, print_progress, summary


def main(
    source_dir: tyro.conf.Positional[Path],
    out_dir: Optional[Path] = None,
    model_name: Optional[str] = None,
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
    max_shard_gb: float = DEFAULT_MAX_SHARD_BYTES / 1e9,
) -> None:
    """Convert SOURCE_DIR (config.json + model*.safetensors or pytorch_model*.bin, tokenizer files) into OUT_DIR:
    config.json, model.safetensors (or shards + index) and the tokenizer files.

    Args:
        source_dir: the Hugging Face model folder (model_type llama or mistral).
        out_dir: output folder; default checkpoints/<model name>.
        model_name: config name; default the source folder's name (e.g. Llama-2-7b-hf).
        dtype: weights dtype; auto keeps the source's dtype.
        max_shard_gb: largest weight file, in GB (10^9 bytes); larger models get sharded with an index.
    """
    print(f"converting {source_dir}", file=sys.stderr)
    result = convert_hf(source_dir, out_dir, DTYPES[dtype], model_name, int(max_shard_gb * 1e9), print_progress())
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(summary(result))


if __name__ == "__main__":
    run_cli(main)
