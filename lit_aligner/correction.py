"""Correction mode (Q-A-C): an Aligner that rewrites another model's answer.

The corrector sees the `correction` prompt (`lit_aligner.prompts.render_correction`: the question, the upstream answer
A, and the request for a corrected answer) and writes the corrected answer C. Training (`lit_aligner.train`,
`--mode correct`) first teaches it to copy (Q-A-A), then to correct (Q-A-C). This module holds everything after
training:

- `correction_prompt_ids`: the prompt token ids for (question, answer), exactly as the training data encodes them;
- `correct`: batched greedy / sampled corrections of (question, answer) pairs with one Aligner (or the bare base);
- `answer_then_correct`: the two-stage pipeline on ONE loaded base: the bare base answers (its chat template), then
  the correction Aligner rewrites that answer;
- the evaluation on held-out Q-A-C pairs (`evaluate_correction`): the copy rate (fed an already-good answer C, how
  often the corrector returns it unchanged, plus a token-level similarity) and the log-likelihood of C versus A given
  (Q, A) under the corrector and under the bare base.
"""

import difflib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from lit_aligner.data import IGNORE_INDEX, CorrectionDataset, collate_sft
from lit_aligner.generate import build_prompt, encode_prompt, generate_with_stats
from lit_aligner.losses import sequence_logprobs
from lit_aligner.model import LLaMA, Aligner
from lit_aligner.prompts import render_correction

# An Aligner, or False for the bare base (the "before" column of every metric).
Corrector = Union[Aligner, bool]


def correction_prompt(question: str, answer: str) -> str:
    """The Q-A-C prompt text for one (question, upstream answer); the corrected answer follows it directly."""
    return render_correction(question, answer)


def correction_prompt_ids(tokenizer, question: str, answer: str) -> torch.Tensor:
    """Prompt token ids (P,) for (question, answer): the ids the training data used for the same row
    (`lit_aligner.data` encodes the rendered prompt with the tokenizer's default BOS, as `encode_prompt` does)."""
    if not question.strip() or not answer.strip():
        raise ValueError("a correction needs a non-empty question and a non-empty answer to correct")
    return encode_prompt(tokenizer, correction_prompt(question, answer)).long()


def _generate_texts(model: LLaMA, tokenizer, prompts: Sequence[torch.Tensor], aligner: Corrector,
                    max_new_tokens: int, batch_size: int = 8,
                    **sampling: Any) -> Tuple[List[str], List[torch.Tensor], float]:
    """Generate for every prompt in batches of similar length. Returns (texts, new token ids, seconds)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sampling.setdefault("stop_ids", tokenizer.stop_ids)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # less padding per batch
    out: Dict[int, torch.Tensor] = {}
    seconds = 0.0
    for s in range(0, len(order), batch_size):
        batch = order[s:s + batch_size]
        ids, stats = generate_with_stats(model, [prompts[i] for i in batch], max_new_tokens,
                                         aligners=aligner, **sampling)
        seconds += stats.prefill_s + stats.decode_s
        out.update(zip(batch, ids))
    tokens = [out[i] for i in range(len(prompts))]
    return [tokenizer.decode(t, skip_special=True) for t in tokens], tokens, seconds


def correct(model: LLaMA, tokenizer, aligner: Corrector, questions: Sequence[str], answers: Sequence[str],
            max_new_tokens: int = 256, batch_size: int = 8, **sampling: Any) -> List[str]:
    """Corrected answers for (question, answer) pairs, one string per pair. aligner: the correction Aligner, or
    False (the bare base given the same correction prompt). `sampling`: `generate` keywords (temperature, top_k,
    top_p, generator, compile; stop_ids default to the tokenizer's). Greedy by default."""
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers: give one answer per question")
    prompts = [correction_prompt_ids(tokenizer, q, a) for q, a in zip(questions, answers)]
    return _generate_texts(model, tokenizer, prompts, aligner, max_new_tokens, batch_size, **sampling)[0]


def base_answers(model: LLaMA, tokenizer, questions: Sequence[str], max_new_tokens: int = 256,
                 template: Optional[str] = None, batch_size: int = 8, **sampling: Any) -> List[str]:
    """The bare base's answers to `questions`, with `template` (default: the tokenizer's chat template, else the
    raw text; see `generate.build_prompt`). Stage one of `answer_then_correct`."""
    prompts = [encode_prompt(tokenizer, build_prompt(tokenizer, q, template)) for q in questions]
    return _generate_texts(model, tokenizer, prompts, False, max_new_tokens, batch_size, **sampling)[0]


@dataclass
class PipelineResult:
    question: str
    answer: str  # the bare base's answer (stage one)
    correction: str  # the correction Aligner's rewrite of it (stage two)


def answer_then_correct(model: LLaMA, tokenizer, aligner: Aligner, questions: Sequence[str],
                        max_new_tokens: int = 256, answer_max_new_tokens: Optional[int] = None,
                        base_template: Optional[str] = None, batch_size: int = 8,
                        **sampling: Any) -> List[PipelineResult]:
    """Two stages on ONE loaded base: the bare base answers each question (`base_answers`, up to
    answer_max_new_tokens, default max_new_tokens), then `aligner` corrects each (question, answer) (`correct`).
    An empty base answer is passed on as "(no answer)" so that the corrector still has something to rewrite."""
    answers = base_answers(model, tokenizer, questions, answer_max_new_tokens or max_new_tokens, base_template,
                           batch_size, **sampling)
    upstream = [a if a.strip() else "(no answer)" for a in answers]
    fixed = correct(model, tokenizer, aligner, questions, upstream, max_new_tokens, batch_size, **sampling)
    return [PipelineResult(q, a, c) for q, a, c in zip(questions, answers, fixed)]


# ---------------------------------------------------------------------------------------------------------------------
# Q-A pairs from any upstream model


def read_qa_pairs(path: Union[str, Path]) -> List[Tuple[str, str]]:
    """(question, answer) pairs from a JSON list or JSONL file of objects with non-empty "question" and "answer"
    strings (other fields, e.g. "correction", are ignored). ValueError naming the file and the row otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such question/answer file")
    text = path.read_text(encoding="utf-8")
    fmt = 'a JSON list or JSONL of objects {"question": ..., "answer": ...}'
    try:
        rows = json.loads(text)
        rows = list(enumerate(rows if isinstance(rows, list) else [rows], 1))
        where = "item"
    except json.JSONDecodeError:
        rows, where = [], "line"
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {n} is not valid JSON ({e}); expected {fmt}") from None
    pairs = []
    for n, row in rows:
        if not isinstance(row, dict):
            raise ValueError(f"{path}: {where} {n} is not an object; expected {fmt}")
        for key in ("question", "answer"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise ValueError(f"{path}: {where} {n} has no non-empty {key!r} string (fields: {sorted(row)}); "
                                 f"expected {fmt}")
        pairs.append((row["question"], row["answer"]))
    if not pairs:
        raise ValueError(f"{path}: no rows; expected {fmt}")
    return pairs


# ---------------------------------------------------------------------------------------------------------------------
# Metrics


def normalize_ws(text: str) -> str:
    """Whitespace-normalised text: runs of whitespace become one space, ends stripped."""
    return " ".join(text.split())


def copy_metrics(outputs: Sequence[str], targets: Sequence[str],
                 tokenize: Optional[Callable[[str], Sequence[Any]]] = None) -> Dict[str, float]:
    """How closely `outputs` reproduce `targets` (the good answers the corrector was given). Returns
    copy_rate (share of exact copies after `normalize_ws`), similarity (mean difflib ratio in [0, 1] of the token
    sequences, `tokenize(text)`; default: whitespace words) and n."""
    if len(outputs) != len(targets):
        raise ValueError(f"{len(outputs)} outputs but {len(targets)} targets")
    if not outputs:
        raise ValueError("no outputs to score")
    tokenize = tokenize or (lambda s: s.split())
    exact = [normalize_ws(o) == normalize_ws(t) for o, t in zip(outputs, targets)]
    sim = [difflib.SequenceMatcher(None, list(tokenize(o)), list(tokenize(t)), autojunk=False).ratio()
           for o, t in zip(outputs, targets)]
    return {"n": len(outputs), "copy_rate": sum(exact) / len(exact), "similarity": sum(sim) / len(sim)}


@torch.no_grad()
def response_loglik(model: LLaMA, prompts: Sequence[torch.Tensor], responses: Sequence[torch.Tensor],
                    aligner: Corrector, batch_size: int = 8) -> Tuple[torch.Tensor, torch.Tensor]:
    """Log-likelihood of each response given its prompt: (sum (N,) in nats, token count (N,)). prompts[i] (P_i,),
    responses[i] (R_i,) token ids (the response's end token included, as in training). aligner: an Aligner or False
    (bare base). Right-padded batches; padding never precedes a scored token, so the causal mask keeps rows exact."""
    device = model.tok_embeddings.weight.device
    sums, counts = [], []
    for s in range(0, len(prompts), batch_size):
        items = []
        for p, r in zip(prompts[s:s + batch_size], responses[s:s + batch_size]):
            ids = torch.cat([p, r]).long()
            labels = ids.clone()
            labels[: len(p)] = IGNORE_INDEX
            items.append({"input_ids": ids, "labels": labels})
        batch = {k: v.to(device) for k, v in collate_sft(items, 0).items()}
        hidden = model(batch["input_ids"], aligner=aligner, return_hidden=True)
        sums.append(sequence_logprobs(hidden, model.lm_head_weight, batch["labels"]).cpu())
        counts.append((batch["labels"][:, 1:] != IGNORE_INDEX).sum(-1).cpu().float())
    return torch.cat(sums), torch.cat(counts)


def loglik_metrics(model: LLaMA, dataset: CorrectionDataset, aligner: Corrector,
                   batch_size: int = 8) -> Dict[str, float]:
    """ll(C) versus ll(A) given the correction prompt of (Q, A), over every pair of `dataset`: the mean per-token
    and mean per-sequence log-likelihoods (nats) of the correction C and of the upstream answer A, and the share of
    pairs where C is the more likely one, per token (length-normalised) and per sequence."""
    prompts = [dataset[i]["prompt_ids"] for i in range(len(dataset))]
    c_sum, c_n = response_loglik(model, prompts, [dataset[i]["correction"] for i in range(len(dataset))], aligner,
                                 batch_size)
    a_sum, a_n = response_loglik(model, prompts, [dataset[i]["answer"] for i in range(len(dataset))], aligner,
                                 batch_size)
    c_tok, a_tok = c_sum / c_n.clamp(min=1), a_sum / a_n.clamp(min=1)
    return {"n": len(dataset),
            "ll_c_token": float(c_tok.mean()), "ll_a_token": float(a_tok.mean()),
            "ll_c_seq": float(c_sum.mean()), "ll_a_seq": float(a_sum.mean()),
            "c_over_a_token": float((c_tok > a_tok).float().mean()),
            "c_over_a_seq": float((c_sum > a_sum).float().mean())}


# ---------------------------------------------------------------------------------------------------------------------
# The evaluation


def _meta_json(metadata: Dict[str, Any], key: str) -> Any:
    value = metadata.get(key)
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def heldout_pairs(data: Any, tokenizer, metadata: Optional[Dict[str, Any]] = None, split: str = "val",
                  n: Optional[int] = None, skip_bad_rows: bool = False,
                  max_seq_length: Optional[int] = None) -> Tuple[CorrectionDataset, Dict[str, Any]]:
    """The Q-A-C pairs to evaluate on: `data` (a Q-A-C file, any preference file, a prepared directory, or None for
    the default dataset) loaded with `load_correction_data`. split "val": the validation split the Aligner's training
    run held out: the split seed, val fraction and max_seq_length are read from its metadata (`metadata["data"]`,
    saved by `finetune/aligner.py`), so on the training file these rows were never trained on; "all": every row (for
    a file the Aligner never saw). n: keep the first n pairs. Returns (dataset, info) with info["split"]."""
    from lit_aligner.data import load_correction_data, storable_info

    if split not in ("val", "all"):
        raise ValueError(f"--split must be 'val' or 'all', got {split!r}")
    trained = _meta_json(metadata or {}, "data") or {}
    trained = trained if isinstance(trained, dict) else {}
    seed = int(trained.get("seed", 42))
    val_fraction = float(trained.get("val_fraction") or 0.05)
    max_seq_length = max_seq_length or int(trained.get("max_seq_length") or 1024)
    train, val, info = load_correction_data(data, tokenizer, "correction", max_seq_length, val_fraction=val_fraction,
                                            seed=seed, skip_bad_rows=skip_bad_rows, val_size=trained.get("val_size"))
    if split == "val":
        ds = val
    else:
        parts = [train[i] for i in range(len(train))] + [val[i] for i in range(len(val))]
        ds = CorrectionDataset.from_rows([(r["prompt_ids"], r["question"], r["answer"], r["correction"])
                                          for r in parts])
    if n is not None:
        if n < 1:
            raise ValueError(f"--n must be >= 1, got {n}")
        ds = CorrectionDataset.from_rows([tuple(ds[i][k] for k in ("prompt_ids", "question", "answer", "correction"))
                                          for i in range(min(n, len(ds)))])
    if len(ds) == 0:
        raise ValueError(f"{data}: no Q-A-C pairs in the {split!r} split (kept {info.get('kept')} rows); use "
                         f"--split all, or more data")
    same_source = str(trained.get("source")) == str(data) if trained else None
    info = {**storable_info(info), "split": split, "evaluated": len(ds),
            "trained_on_this_file": same_source}
    return ds, info


def eval_pairs(tokenizer, dataset: CorrectionDataset) -> List[Tuple[str, str, str]]:
    """(question, answer, correction) texts of every pair, decoded from the dataset's token ids (the end token
    dropped). Byte-level BPE and SentencePiece decode their own encoding back to the same text (up to the
    surrounding whitespace, which the correction template strips anyway)."""
    def text(ids: torch.Tensor) -> str:
        return tokenizer.decode(ids, skip_special=True).strip()

    return [(text(dataset[i]["question"]), text(dataset[i]["answer"]), text(dataset[i]["correction"]))
            for i in range(len(dataset))]


def copy_eval(model: LLaMA, tokenizer, aligner: Corrector, dataset: CorrectionDataset, max_new_tokens: int = 128,
              batch_size: int = 8, **sampling: Any) -> Dict[str, Any]:
    """The copy test: feed (Q, C) (the good answer as the upstream answer) and compare the output with C. C is
    clipped to its first max_new_tokens tokens (the output cannot be longer); `clipped` counts such pairs.
    Returns copy_metrics (similarity on token ids) + clipped, seconds and the outputs."""
    rows = eval_pairs(tokenizer, dataset)
    prompts = [correction_prompt_ids(tokenizer, q, c) for q, _, c in rows]
    targets, clipped = [], 0
    for i in range(len(dataset)):
        c = dataset[i]["correction"]
        body = c[:-1] if len(c) and int(c[-1]) in ({tokenizer.eos_id} | set(tokenizer.stop_ids)) else c
        clipped += len(body) > max_new_tokens
        targets.append(tokenizer.decode(body[:max_new_tokens], skip_special=True))
    texts, _, seconds = _generate_texts(model, tokenizer, prompts, aligner, max_new_tokens, batch_size, **sampling)
    tokenize = lambda s: tokenizer.encode(s, bos=False).tolist()  # noqa: E731
    return {**copy_metrics(texts, targets, tokenize), "clipped": clipped, "seconds": seconds, "outputs": texts}


def evaluate_correction(model: LLaMA, tokenizer, aligner: Aligner, dataset: CorrectionDataset,
                        max_new_tokens: int = 128, batch_size: int = 8, with_base: bool = True,
                        n_samples: int = 3, **sampling: Any) -> Dict[str, Any]:
    """Everything `scripts/eval_correction.py` reports, for the corrector and (with_base) the bare base given the
    same correction prompts: {"corrector": {copy..., loglik...}, "base": {...}, "n", "samples"}. Wall seconds per
    part are included (copy_seconds: generation; loglik_seconds: the two scoring passes)."""
    if len(dataset) == 0:
        raise ValueError("no Q-A-C pairs to evaluate")
    report: Dict[str, Any] = {"n": len(dataset), "max_new_tokens": max_new_tokens}
    outputs = {}
    for name, a in (("corrector", aligner), ("base", False)) if with_base else (("corrector", aligner),):
        cp = copy_eval(model, tokenizer, a, dataset, max_new_tokens, batch_size, **sampling)
        outputs[name] = cp.pop("outputs")
        t0 = time.perf_counter()
        ll = loglik_metrics(model, dataset, a, batch_size)
        report[name] = {"copy_rate": cp["copy_rate"], "similarity": cp["similarity"], "clipped": cp["clipped"],
                        "copy_seconds": cp["seconds"], **{k: v for k, v in ll.items() if k != "n"},
                        "loglik_seconds": time.perf_counter() - t0}
    rows = eval_pairs(tokenizer, dataset)
    report["samples"] = [{"question": q, "good_answer": c, **{f"{k}_copy": v[i] for k, v in outputs.items()}}
                         for i, (q, _, c) in enumerate(rows[:n_samples])]
    return report


def format_report(report: Dict[str, Any]) -> str:
    """The evaluation as a text table (one column per model)."""
    cols = [c for c in ("base", "corrector") if c in report]
    rows = [("copy rate (exact, given C)", "copy_rate", "{:.1%}"), ("token similarity to C", "similarity", "{:.3f}"),
            ("ll(C) per token", "ll_c_token", "{:.3f}"), ("ll(A) per token", "ll_a_token", "{:.3f}"),
            ("ll(C) per sequence", "ll_c_seq", "{:.1f}"), ("ll(A) per sequence", "ll_a_seq", "{:.1f}"),
            ("share ll(C) > ll(A), per token", "c_over_a_token", "{:.1%}"),
            ("share ll(C) > ll(A), per sequence", "c_over_a_seq", "{:.1%}"),
            ("generation seconds", "copy_seconds", "{:.1f}"), ("scoring seconds", "loglik_seconds", "{:.1f}")]
    width = max(len(r[0]) for r in rows)
    lines = [f"{report['n']} held-out Q-A-C pairs, greedy, up to {report['max_new_tokens']} new tokens",
             f"{'':{width}}  " + "  ".join(f"{c:>10}" for c in cols)]
    for label, key, fmt in rows:
        lines.append(f"{label:{width}}  " + "  ".join(f"{fmt.format(report[c][key]):>10}" for c in cols))
    return "\n".join(lines)
