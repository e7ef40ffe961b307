"""Download a model from the Hugging Face Hub (only what conversion needs: config, tokenizer files, the weights in one
format, safetensors preferred) and, with --convert, convert it into checkpoints/<name> in the same step.

    python scripts/download.py Qwen/Qwen2.5-0.5B-Instruct --convert
    python scripts/download.py meta-llama/Llama-3.2-1B-Instruct --access-token hf_... --convert

Files go to the Hugging Face cache (HF_HOME / HF_HUB_CACHE; HF_HUB_OFFLINE=1 uses only what is cached). See
howto/convert.md.
"""

from dataclasses import dataclass
from typing import Optional

import tyro

from lit_aligner.cli import run_cli
from lit_aligner.convert import ConvertConfig, convert_hf
from lit_aligner.hub import download_model


@dataclass(kw_only=True)
class Download(ConvertConfig):
    """Download REPO_ID's config, tokenizer and weights; convert them with --convert."""

    repo_id: tyro.conf.Positional[str]
    """the model repository, e.g. Qwen/Qwen2.5-0.5B-Instruct or meta-llama/Llama-3.2-1B-Instruct."""
    access_token: Optional[str] = None
    """a Hugging Face token, for gated or private repositories (default: HF_TOKEN or the cached login)."""
    revision: Optional[str] = None
    """a branch, tag or commit (default: main)."""
    convert: bool = False
    """convert the download into --out-dir (default checkpoints/<repo name>)."""


def main(cfg: Download) -> None:
    folder = download_model(cfg.repo_id, cfg.access_token, cfg.revision)
    print(f"downloaded {cfg.repo_id} into {folder}")
    if cfg.convert:
        cfg.model_name = cfg.model_name or cfg.repo_id.split("/")[-1]
        cfg.run_conversion(convert_hf, folder)
    else:
        print(f"convert it with: python scripts/convert_hf.py {folder} --model-name {cfg.repo_id.split('/')[-1]}")


if __name__ == "__main__":
    run_cli(main, Download, __doc__)
