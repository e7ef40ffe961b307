"""Measuring what an Aligner changed.

- `objective_metrics`: the bare base or any Aligner scored with a training objective's own metrics (loss per token,
  DPO reward accuracy, ...) on any tokenized dataset, through the training engine's `evaluate`;
- `score_rows`: the log-likelihood of each (prompt, response) row;
- `heldout_split`: the rows a training run held out, from its Aligner's metadata;
- `compare_before_after`: on the offline default dataset, the rate at which greedy answers follow its response FORMAT
  (`lit_aligner.data.default.format_rate`), and a few side-by-side samples (`finetune/aligner.py` prints it);
- `correction`: copy rate and log-likelihood margins of correction Aligners.
"""

import json
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from lit_aligner.training.engine import evaluate
from lit_aligner.training.objectives import Objective, ObjectiveModule


@torch.no_grad()
def score_rows(model, rows: Sequence[Tuple[torch.Tensor, torch.Tensor]], aligner: Any = False,
               batch_size: int = 8) -> Tuple[torch.Tensor, torch.Tensor]:
    """Log-likelihood of each response given its prompt: (sums (N,) in nats, scored token counts (N,)) on the CPU.
    rows: (prompt (P,), response (R,)) token ids, the response's end token included as in training. aligner: an
    Aligner, False (the bare base) or None (the model's own). Right-padded batches: padding never precedes a scored
    token, so the causal mask keeps every row exact."""
    from lit_aligner.data import IGNORE_INDEX, pad_rows
    from lit_aligner.training.objectives.dpo import response_logprobs

    device = model.tok_embeddings.weight.device
    sums, counts = [], []
    for s in range(0, len(rows), batch_size):
        batch = pad_rows(rows[s:s + batch_size], 0)
        ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
        sums.append(response_logprobs(model, ids, labels, aligner).cpu())
        counts.append((labels[:, 1:] != IGNORE_INDEX).sum(-1).cpu().float())
    return torch.cat(sums), torch.cat(counts)


def _meta_json(metadata: Dict[str, Any], key: str) -> Any:
    value = metadata.get(key)
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def heldout_split(kind: str, data: Any, tokenizer, template: str, metadata: Optional[Dict[str, Any]] = None,
                  split: str = "val", n: Optional[int] = None, max_seq_length: Optional[int] = None):
    """The rows to evaluate on: `data` (a file, a prepared directory, or None for the default dataset) loaded as
    `kind` data with `template`. split "val": the validation split the Aligner's training run held out (its split
    seed, val fraction, max_seq_length and turns are read from the Aligner's metadata, so on the training file these
    rows were never trained on); "all": every row (for a file the Aligner never saw). n: keep the first n rows.
    Returns (dataset, info) with info["split"], info["evaluated"] and info["trained_on_this_file"]."""
    from lit_aligner.data import DataOptions, TokenizedDataset, load_data, storable_info

    if split not in ("val", "all"):
        raise ValueError(f"--split must be 'val' or 'all', got {split!r}")
    trained = _meta_json(metadata or {}, "data") or {}
    trained = trained if isinstance(trained, dict) else {}
    options = DataOptions(max_seq_length=max_seq_length or int(trained.get("max_seq_length") or 1024),
                          val_fraction=float(trained.get("val_fraction") or 0.05), val_size=trained.get("val_size"),
                          turns="all" if kind == "sft" and trained.get("turns") == "all" else "last")
    train, val, info = load_data(kind, data, tokenizer, template, options, int(trained.get("seed", 42)))
    rows: List[Any] = val.rows() if split == "val" else train.rows() + val.rows()
    if n is not None:
        if n < 1:
            raise ValueError(f"--n must be >= 1, got {n}")
        rows = rows[:n]
    if not rows:
        raise ValueError(f"{data}: no rows in the {split!r} split (kept {info.get('kept')} rows); use --split all, or "
                         f"more data")
    same_source = str(trained.get("source")) == str(data if data is not None else "default") if trained else None
    info = {**storable_info(info), "split": split, "evaluated": len(rows), "trained_on_this_file": same_source}
    return TokenizedDataset.from_rows(kind, rows), info


def objective_metrics(model, objective: Objective, dataset, aligner: Any = None, batch_size: int = 8,
                      max_batches: Optional[int] = None) -> Dict[str, float]:
    """`objective`'s metrics (means per unit) of `model` steered by `aligner` (None: the model's own; False: the bare
    base) over `dataset` (up to max_batches batches; None = all)."""
    scored = objective.with_aligner(aligner)
    return evaluate(ObjectiveModule(model, scored), scored, dataset, batch_size, max_batches)


@torch.no_grad()
def compare_before_after(model, tokenizer, val, objective: Objective, aligner, n_prompts: int = 32,
                         max_new_tokens: int = 24, val_loss_before: Optional[float] = None,
                         val_loss_after: Optional[float] = None, n_samples: int = 3, init: Any = False,
                         val_loss_init: Optional[float] = None) -> Dict[str, Any]:
    """Greedy answers of the bare base and of base + `aligner` to the first `n_prompts` validation prompts (held out
    from training; one batch each), their FORMAT rates, the validation losses on every row of `val` (computed with
    `objective` when not given), and `n_samples` side-by-side samples; with `init` (the Aligner a run started from),
    its figures and answers too (keys `*_init`, samples' "init"). Returns a dict (see `format_comparison`)."""
    from lit_aligner.data.default import format_rate
    from lit_aligner.generation import generate
    from lit_aligner.perf import compile_flag

    n = min(n_prompts, len(val))
    if n == 0:
        raise ValueError("no validation examples to compare on")
    items = [val[i] for i in range(n)]
    prompts = [it["prompt"] for it in items]
    stop = sorted(tokenizer.stop_ids)
    systems = {"before": (False, val_loss_before), "after": (aligner, val_loss_after)}
    if init is not False:
        systems = {"before": systems["before"], "init": (init, val_loss_init), "after": systems["after"]}
    outs, report = {}, {"n_prompts": n, "max_new_tokens": max_new_tokens, "val_rows": len(val)}
    # a few short answers: eager, also on CUDA, where compiling the decoding step would take longer than they do
    compile = compile_flag("auto", model.tok_embeddings.weight.device, len(systems) * max_new_tokens)
    for name, (a, _) in systems.items():
        ids = generate(model, prompts, max_new_tokens, temperature=0.0, stop_ids=stop, aligners=a, compile=compile)
        outs[name] = [tokenizer.decode(x, skip_special=True) for x in ids]
    model.clear_caches()
    for name, (a, loss) in systems.items():
        report[f"format_rate_{name}"] = format_rate(outs[name])
        report[f"val_loss_{name}"] = objective_metrics(model, objective, val, a)["loss"] if loss is None else loss
    report.update({f"answers_{name}": outs[name] for name in systems})
    report["samples"] = [{"prompt": tokenizer.decode(prompts[i], skip_special=True),
                          "reference": tokenizer.decode(objective.target(items[i], None), skip_special=True),
                          **{name: outs[name][i] for name in systems}} for i in range(min(n_samples, n))]
    return report


def _block(text: str) -> str:
    return "\n".join("    " + line for line in (text.strip() or "(empty)").splitlines())


def prompt_question(prompt: str) -> str:
    """The last line of a rendered prompt (special tokens skipped) that is not a role marker: the request, for a
    sample's header (at most 100 characters)."""
    roles = ("", "assistant", "user", "system", "### Response:", "ASSISTANT:")
    lines = prompt.strip().splitlines()
    question = next((l for l in reversed(lines) if l.strip() not in roles and not l.strip().startswith("<")), "")
    return question.strip()[:100]


def figures_line(figures: Sequence[Tuple[str, float]], fmt: str) -> str:
    """One figure of each system an end report compares, "base 2.1  ->  init Aligner 1.9  ->  with Aligner 1.8"."""
    return "  ->  ".join(f"{label} {format(value, fmt)}" for label, value in figures)


def format_comparison(report: Dict[str, Any]) -> str:
    """The before/after report as text."""
    names = [("before", "base"), *([("init", "init Aligner")] if "val_loss_init" in report else []),
             ("after", "with Aligner")]

    def line(key: str, fmt: str) -> str:
        return figures_line([(label, report[f"{key}_{name}"]) for name, label in names], fmt)

    lines = [
        "",
        "=== before / after (held-out default-data prompts, greedy) ===",
        f"validation loss:  {line('val_loss', '.4f')}   (all {report['val_rows']} held-out rows)",
        f"format rate:      {line('format_rate', '.0%')}   ({report['n_prompts']} prompts, up to "
        f"{report['max_new_tokens']} new tokens)",
    ]
    for i, s in enumerate(report["samples"], 1):
        lines.append(f"--- sample {i}: {prompt_question(s['prompt'])}")
        for name, label in names:
            lines += [f"  {label}:", _block(s[name])]
    return "\n".join(lines)
