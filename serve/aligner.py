"""Serve the base model and every Aligner in a directory through the OpenAI API, with continuous batching (rows with
different Aligners share one decode batch) and a page at / that compares answers side by side.

    python serve/aligner.py --aligners-dir out                  # the embedded SmolLM2 and every Aligner under out/
    curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "aligner/SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Hi!"}]}'

Every flag, the request fields, correction Aligners and the benchmark: howto/serve.md.
"""

from lit_aligner.cli import run_cli
from lit_aligner.serving import ServeConfig, serve

if __name__ == "__main__":
    run_cli(serve, ServeConfig, __doc__)
