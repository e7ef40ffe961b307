"""`python -m lit_aligner.serving [flags]`: the same as serve/aligner.py (for installs without the repository)."""

from lit_aligner.cli import run_cli
from lit_aligner.serving import ServeConfig, serve

run_cli(serve, ServeConfig,
        "Serve a base model and the Aligners in a directory through the OpenAI API (howto/serve.md).")
