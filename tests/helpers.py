"""Fixture builders shared by several test files (imported as `helpers`; tests/ is on sys.path under pytest)."""

import json
from pathlib import Path
from typing import Dict, Iterable, Optional

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def bpe_tokenizer_dir(d: Path, corpus: Iterable[str], vocab_size: int, eos: str = "</s>", add_bos: bool = True,
                      extra_config: Optional[Dict] = None) -> Path:
    """Train a byte-level BPE (Hugging Face `tokenizers`) on `corpus` into d/tokenizer.json, with SPECIALS as special
    tokens and a tokenizer_config.json (bos <s>, the given eos, pad <pad>, a ChatML chat template). Returns d."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    d.mkdir(parents=True, exist_ok=True)
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(corpus), trainer)
    tok.save(str(d / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": eos, "pad_token": "<pad>", "add_bos_token": add_bos,
              "chat_template": CHATML, **(extra_config or {})}
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d
