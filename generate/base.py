"""Answer one prompt with a base model (no Aligner): through its chat template, streamed to stdout, tokens/s on stderr.

    python generate/base.py --prompt "What is 2+2?"

See howto/generate.md.
"""

import sys
from pathlib import Path
from typing import Literal, Optional

import tyro

from lit_aligner.base import load_base
from lit_aligner.cli import run_cli
from lit_aligner.default_model import DEFAULT_CHECKPOINT_DIR
from lit_aligner.generation import DecodingArgs, TextStreamer, generate
from lit_aligner.perf import compile_flag
from lit_aligner.prompts import build_prompt, encode_prompt
from lit_aligner.quantize import QuantizeFlag


def main(
    prompt: str = "What is 2+2?",
    system: Optional[str] = None,
    checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR,
    max_new_tokens: int = 256,
    decoding: tyro.conf.OmitArgPrefixes[DecodingArgs] = DecodingArgs(),
    no_chat_template: tyro.conf.FlagCreatePairsOff[bool] = False,
    device: str = "auto",
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
    quantize: QuantizeFlag = "none",
    compile: Literal["auto", "on", "off"] = "auto",
) -> None:
    """Answer PROMPT with the base model, streaming the answer to stdout; timing goes to stderr.

    Args:
        prompt: the user message.
        system: a system message before it (the chat template's system turn; with --no-chat-template, a first
            paragraph). Without it the template's own default, if any.
        checkpoint_dir: converted base model (config.json, model.safetensors, tokenizer files).
        max_new_tokens: most tokens to generate; generation stops earlier at the tokenizer's end-of-turn/EOS tokens.
        decoding: how each token is picked (greedy by default), the repetition penalties and the stop strings.
        no_chat_template: send the raw prompt text instead of wrapping it in the tokenizer's chat template.
        device: auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...
        dtype: weights dtype; auto = bfloat16 on CUDA, the checkpoint's own dtype on the CPU.
        compile: torch.compile the decoding step; auto = on for CUDA when --max-new-tokens is 2,048 or more (where
            compiling, ~40 s, pays), off on the CPU (compiling takes ~30 s there) and with --quantize.
    """
    if max_new_tokens < 1:  # before the model loads
        raise ValueError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    fmt = decoding.check()
    model, tokenizer = load_base(checkpoint_dir, device, dtype, quantize)
    dev = model.tok_embeddings.weight.device
    if no_chat_template:
        text = f"{system}\n\n{prompt}" if system else prompt
    else:
        text = build_prompt(tokenizer, prompt, system=system)
    streamer = TextStreamer(tokenizer, stop=decoding.stop_strings)
    _, stats = generate(
        model, [encode_prompt(tokenizer, text)], max_new_tokens, stop_ids=tokenizer.stop_ids, on_token=streamer,
        compile=compile_flag(compile, dev, max_new_tokens), return_stats=True,
        **decoding.generate_kwargs(dev, tokenizer, model.lm_head_weight.shape[0], fmt),
    )
    streamer.finish()
    print(flush=True)
    print(stats.summary(), file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
