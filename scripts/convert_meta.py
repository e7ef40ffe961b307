"""Convert a Meta checkpoint folder (params.json, consolidated.NN.pth) into a lit-aligner checkpoint folder.

    python scripts/convert_meta.py llama/llama-2-7b --model-name Llama-2-7b-hf   # -> checkpoints/Llama-2-7b-hf

See howto/convert.md.
"""

import sys
from pathlib import Path
from typing import Literal, Optional

import tyro

from lit_aligner.cli import run_cli
from lit_aligner.convert_io import DEFAULT_MAX_SHARD_BYTES, DTYPES, convert_meta, print_progress, summary


def main(
    source_dir: tyro.conf.Positional[Path],
    out_dir: Optional[Path] = None,
    model_name: Optional[str] = None,
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
    max_shard_gb: float = DEFAULT_MAX_SHARD_BYTES / 1e9,
) -> None:
    """Convert SOURCE_DIR (params.json + consolidated.00.pth, .. consolidated.NN.pth for model-parallel shards) into
    OUT_DIR: config.json, model.safetensors (or shards + index) and the tokenizer (tokenizer.model from SOURCE_DIR or
    its parent folder, where Meta's download puts it).

    Args:
        source_dir: the Meta model folder (e.g. llama-2-7b, llama-2-13b with 2 shards, llama-2-70b with 8).
        out_dir: output folder; default checkpoints/<model name>.
        model_name: config name; default the source folder's name (e.g. llama-2-7b; Llama-2-7b-hf is the registry's).
        dtype: weights dtype; auto keeps the source's dtype.
        max_shard_gb: largest weight file, in GB (10^9 bytes); larger models get sharded with an index.
    """
    print(f"converting {source_dir}", file=sys.stderr)
    result = convert_meta(source_dir, out_dir, DTYPES[dtype], model_name, int(max_shard_gb * 1e9), print_progress())
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(summary(result))


if __name__ == "__main__":
    run_cli(main)
