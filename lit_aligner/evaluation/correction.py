"""Measuring a correction Aligner on held-out Q-A-C pairs, next to the bare base given the same prompts: the copy rate
(fed an already-good answer C, how often the corrector returns it unchanged, plus a token-level similarity) and the
log-likelihood of C versus A given (Q, A)."""

import difflib
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from lit_aligner.data import TokenizedDataset
from lit_aligner.evaluation import score_rows
from lit_aligner.generation.correction import Corrector, correction_prompt_ids, generate_texts
from lit_aligner.model import Aligner, LLaMA


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


def loglik_metrics(model: LLaMA, dataset: TokenizedDataset, aligner: Corrector,
                   batch_size: int = 8) -> Dict[str, float]:
    """ll(C) versus ll(A) given the correction prompt of (Q, A), over every pair of `dataset`: the mean per-token
    and mean per-sequence log-likelihoods (nats) of the correction C and of the upstream answer A, and the share of
    pairs where C is the more likely one, per token (length-normalised) and per sequence."""
    items = [dataset[i] for i in range(len(dataset))]
    c_sum, c_n = score_rows(model, [(it["prompt"], it["correction"]) for it in items], aligner, batch_size)
    a_sum, a_n = score_rows(model, [(it["prompt"], it["answer"]) for it in items], aligner, batch_size)
    c_tok, a_tok = c_sum / c_n.clamp(min=1), a_sum / a_n.clamp(min=1)
    return {"n": len(dataset),
            "ll_c_token": float(c_tok.mean()), "ll_a_token": float(a_tok.mean()),
            "ll_c_seq": float(c_sum.mean()), "ll_a_seq": float(a_sum.mean()),
            "c_over_a_token": float((c_tok > a_tok).float().mean()),
            "c_over_a_seq": float((c_sum > a_sum).float().mean())}


def eval_pairs(tokenizer, dataset: TokenizedDataset) -> List[Tuple[str, str, str]]:
    """(question, answer, correction) texts of every pair, decoded from the dataset's token ids (the end token
    dropped). Byte-level BPE and SentencePiece decode their own encoding back to the same text (up to the
    surrounding whitespace, which the correction template strips anyway)."""
    def text(ids: torch.Tensor) -> str:
        return tokenizer.decode(ids, skip_special=True).strip()

    return [(text(dataset[i]["question"]), text(dataset[i]["answer"]), text(dataset[i]["correction"]))
            for i in range(len(dataset))]


def copy_eval(model: LLaMA, tokenizer, aligner: Corrector, dataset: TokenizedDataset, max_new_tokens: int = 128,
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
    texts, _, seconds = generate_texts(model, tokenizer, prompts, aligner, max_new_tokens, batch_size, **sampling)
    tokenize = lambda s: tokenizer.encode(s, bos=False).tolist()  # noqa: E731
    return {**copy_metrics(texts, targets, tokenize), "clipped": clipped, "seconds": seconds, "outputs": texts}


def evaluate_correction(model: LLaMA, tokenizer, aligner: Aligner, dataset: TokenizedDataset,
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
