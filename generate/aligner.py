"""Answer prompts with one or more Aligners (and optionally the bare base) on one loaded base model.

    python generate/aligner.py --aligner out/alpaca/aligner.safetensors --no-aligner --prompt "What is 2+2?"

Every prompt is answered once per Aligner, labelled; --out writes one JSONL row per prompt x Aligner. See
howto/generate.md.
"""

import json
import sys
import warnings
from pathlib import Path
from typing import Iterator, List, Literal, Optional

import torch
import tyro

from lit_aligner.checkpoint import CheckpointError
from lit_aligner.generate import (DEFAULT_CHECKPOINT, AlignerEntry, PromptItem, TextStreamer, answer_prompts,
                                  load_aligner_entries, load_base, read_prompts)


def main(
    aligner: tyro.conf.UseAppendAction[List[Path]] = [],
    no_aligner: tyro.conf.FlagCreatePairsOff[bool] = False,
    prompt: tyro.conf.UseAppendAction[List[str]] = [],
    prompts_file: Optional[Path] = None,
    out: Optional[Path] = None,
    interactive: tyro.conf.FlagCreatePairsOff[bool] = False,
    checkpoint_dir: Path = DEFAULT_CHECKPOINT,
    template: Optional[str] = None,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    seed: int = 1234,
    device: str = "auto",
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
    compile: Literal["auto", "on", "off"] = "auto",
) -> None:
    """Answer every prompt with every Aligner on one loaded base; answers are labelled with the Aligner's path.

    Args:
        aligner: an Aligner file; repeat the flag to compare several (all run on the same loaded base).
        no_aligner: also answer with the bare base (a column labelled "base").
        prompt: a prompt; repeat the flag for several.
        prompts_file: JSON list of strings or of objects with "prompt" or "instruction" (+ optional "input"), or JSONL.
        out: write one JSONL row per prompt x Aligner (prompt, input, aligner, template, output) to this file.
        interactive: after any given prompts, read prompts from stdin, one per line, until EOF or "exit".
        checkpoint_dir: converted base model the Aligners were trained on.
        template: prompt template for every Aligner and the base (alpaca, beaver, hh, chat, plain, correction);
            default: each Aligner's own (from its metadata), for the base the one the Aligners share, else the
            tokenizer's chat template.
        batch_size: most requests (prompt x Aligner) decoded together.
        max_new_tokens: most tokens per answer; answers stop earlier at the tokenizer's end-of-turn/EOS tokens.
        temperature: 0 = greedy (deterministic); > 0 samples from softmax(logits / temperature).
        top_k: when sampling, keep only the k most likely tokens.
        top_p: when sampling, keep the smallest set of tokens whose probability reaches top_p (nucleus).
        seed: seed of the sampling generator (same seed, same text).
        device: auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...
        dtype: weights dtype; auto = bfloat16 on CUDA, the checkpoint's own dtype on the CPU.
        compile: torch.compile the decoding step; auto = on for CUDA, off on the CPU.
    """
    if not aligner and not no_aligner:
        raise ValueError("nothing to answer with: give --aligner PATH (repeatable) and/or --no-aligner (the bare base)")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    items = [PromptItem(p) for p in prompt] + (read_prompts(prompts_file) if prompts_file else [])
    if not items and not interactive:
        raise ValueError("no prompts: give --prompt TEXT (repeatable), --prompts-file FILE or --interactive")
    if template is not None:
        from lit_aligner.prompts import get_template

        get_template(template)  # an unknown name fails here, before the model is loaded

    model, tokenizer = load_base(checkpoint_dir, device, dtype)
    entries = load_aligner_entries(aligner, model) + ([AlignerEntry("base")] if no_aligner else [])
    dev = model.tok_embeddings.weight.device
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, stop_ids=tokenizer.stop_ids,
                    generator=torch.Generator(dev).manual_seed(seed),
                    compile=None if compile == "auto" else compile == "on")
    sink = out.open("w", encoding="utf-8") if out else None
    try:
        if items:
            answer(model, tokenizer, items, entries, max_new_tokens, batch_size, template, sampling, sink)
        if interactive:
            for text in read_stdin():
                answer(model, tokenizer, [PromptItem(text)], entries, max_new_tokens, batch_size, template, sampling,
                       sink)
    finally:
        if sink:
            sink.close()
            print(f"wrote {out}", file=sys.stderr)


def answer(model, tokenizer, items, entries, max_new_tokens, batch_size, template, sampling, sink) -> None:
    # One answer at a time can be streamed as it is generated; otherwise print when the batches are done.
    stream = len(items) == 1 and len(entries) == 1
    if stream:
        show_prompt(items[0], 0, 1)
        print(f"--- {entries[0].name} ---", flush=True)
    streamer = TextStreamer(tokenizer) if stream else None
    answers, stats = answer_prompts(model, tokenizer, items, entries, max_new_tokens, batch_size=batch_size,
                                    template=template, on_token=streamer, **sampling)
    for i, row in enumerate(answers):
        if stream:
            streamer.finish()
            print()
        else:
            show_prompt(items[i], i, len(items))
            for a in row:
                print(f"--- {a.entry.name} ---\n{a.text.strip()}")
        if sink:
            for a in row:
                sink.write(json.dumps({"prompt": a.prompt.instruction, "input": a.prompt.input,
                                       "aligner": a.entry.name if a.entry.aligner is not None else None,
                                       "template": template or a.entry.metadata.get("template"),
                                       "output": a.text}) + "\n")
            sink.flush()
    sys.stdout.flush()
    new = sum(s.new_tokens for s in stats)
    decode_s = sum(s.decode_s for s in stats)
    steps = sum(s.decode_steps * s.batch_size for s in stats)
    print(f"{len(stats)} batch(es), {new} new tokens, decode {steps / max(decode_s, 1e-9):.1f} tokens/s",
          file=sys.stderr)


def show_prompt(item: PromptItem, i: int, n: int) -> None:
    head = item.instruction + (f"\n{item.input}" if item.input else "")
    print(f"\n=== [{i + 1}/{n}] {head} ===")


def read_stdin() -> Iterator[str]:
    while True:
        if sys.stdin.isatty():
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("exit", "quit"):
            return
        if line.strip():
            yield line.strip()


if __name__ == "__main__":
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"
    try:
        tyro.cli(main)
    except (CheckpointError, ValueError, KeyError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
