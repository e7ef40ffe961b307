"""Measuring what an Aligner changed: validation loss and, on the offline default dataset, the rate at which greedy
answers follow its response FORMAT (`lit_aligner.default_data.format_rate`), for the bare base and with the Aligner,
plus a few side-by-side samples. `finetune/aligner.py` prints this after training on the default dataset."""

from typing import Any, Dict, List, Optional, Sequence

import torch

from lit_aligner.data import IGNORE_INDEX, collate_sft
from lit_aligner.losses import chunked_cross_entropy


def split_prompt(item: Dict[str, torch.Tensor]) -> "tuple[torch.Tensor, torch.Tensor]":
    """An SFT item -> (prompt ids (P,), reference response ids (R,)): the prompt ends where the labels start."""
    labelled = (item["labels"] != IGNORE_INDEX).nonzero()
    p = int(labelled[0]) if len(labelled) else len(item["labels"])
    return item["input_ids"][:p], item["input_ids"][p:]


@torch.no_grad()
def sft_val_loss(model, dataset, pad_id: int, aligner: Any = None, micro_batch_size: int = 16,
                 max_examples: Optional[int] = None) -> float:
    """Mean response-token cross-entropy (nats) of `model` over `dataset` (SFT items), with `aligner` (None: the
    model's own, False: the bare base)."""
    device = model.tok_embeddings.weight.device
    n = len(dataset) if max_examples is None else min(len(dataset), max_examples)
    total, count = 0.0, 0
    for s in range(0, n, micro_batch_size):
        items = [dataset[i] for i in range(s, min(n, s + micro_batch_size))]
        batch = {k: v.to(device) for k, v in collate_sft(items, pad_id).items()}
        hidden = model(batch["input_ids"], aligner=aligner, return_hidden=True)
        total += float(chunked_cross_entropy(hidden, model.lm_head_weight, batch["labels"], reduction="sum"))
        count += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return total / max(count, 1)


@torch.no_grad()
def compare_before_after(model, tokenizer, val, aligner, n_prompts: int = 32, max_new_tokens: int = 24,
                         val_loss_before: Optional[float] = None, val_loss_after: Optional[float] = None,
                         n_samples: int = 3) -> Dict[str, Any]:
    """Greedy answers of the bare base and of base + `aligner` to the first `n_prompts` validation prompts (held out
    from training; one batch each), their FORMAT rates, the validation losses (computed here when not given), and
    `n_samples` side-by-side samples. Returns a dict (see `format_comparison`)."""
    from lit_aligner.default_data import format_rate
    from lit_aligner.generate import generate

    n = min(n_prompts, len(val))
    if n == 0:
        raise ValueError("no validation examples to compare on")
    items = [val[i] for i in range(n)]
    prompts = [split_prompt(it)[0] for it in items]
    stop = sorted(tokenizer.stop_ids)
    outs = {}
    for name, a in (("before", False), ("after", aligner)):
        ids = generate(model, prompts, max_new_tokens, temperature=0.0, stop_ids=stop, aligners=a)
        outs[name] = [tokenizer.decode(x, skip_special=True) for x in ids]
    model.clear_caches()
    if val_loss_before is None:
        val_loss_before = sft_val_loss(model, val, tokenizer.pad_id, aligner=False)
    if val_loss_after is None:
        val_loss_after = sft_val_loss(model, val, tokenizer.pad_id, aligner=aligner)
    samples = []
    for i in range(min(n_samples, n)):
        samples.append({"prompt": tokenizer.decode(prompts[i], skip_special=True),
                        "reference": tokenizer.decode(split_prompt(items[i])[1], skip_special=True),
                        "before": outs["before"][i], "after": outs["after"][i]})
    return {"n_prompts": n, "max_new_tokens": max_new_tokens,
            "format_rate_before": format_rate(outs["before"]), "format_rate_after": format_rate(outs["after"]),
            "val_loss_before": val_loss_before, "val_loss_after": val_loss_after,
            "answers_before": outs["before"], "answers_after": outs["after"], "samples": samples}


def _block(text: str) -> str:
    return "\n".join("    " + line for line in (text.strip() or "(empty)").splitlines())


def format_comparison(report: Dict[str, Any]) -> str:
    """The before/after report as text."""
    lines = [
        "",
        "=== before / after (held-out default-data prompts, greedy) ===",
        f"validation loss:  base {report['val_loss_before']:.4f}  ->  with Aligner {report['val_loss_after']:.4f}",
        f"format rate:      base {report['format_rate_before']:.0%}  ->  with Aligner "
        f"{report['format_rate_after']:.0%}   ({report['n_prompts']} prompts, up to {report['max_new_tokens']} new "
        f"tokens)",
    ]
    for i, s in enumerate(report["samples"], 1):
        prompt = s["prompt"].strip().splitlines()
        roles = ("", "assistant", "user", "system", "### Response:", "ASSISTANT:")
        question = next((l for l in reversed(prompt) if l.strip() not in roles and not l.strip().startswith("<")), "")
        lines += [f"--- sample {i}: {question.strip()[:100]}", "  base:", _block(s["before"]),
                  "  with Aligner:", _block(s["after"])]
    return "\n".join(lines)
