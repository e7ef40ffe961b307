"""Generating corrections (Q-A-C): an Aligner that rewrites another model's answer.

The corrector sees the `correction` prompt (`lit_aligner.prompts.correction_prompt`: the question, the upstream answer
A, and the request for a corrected answer) and writes the corrected answer C. Training (`finetune/aligner.py --mode
correction`) first teaches it to copy (Q-A-A), then to correct (Q-A-C). Here:

- `correction_prompt_ids`: the prompt token ids for (question, answer), exactly as the training data encodes them;
- `correct`: batched greedy / sampled corrections of (question, answer) pairs with one Aligner (or the bare base);
- `answer_then_correct`: the two-stage pipeline on ONE loaded base: the bare base answers (its chat template), then
  the correction Aligner rewrites that answer;
- `read_qa_pairs`: (question, answer) rows written by any upstream model.
Measuring a corrector is `lit_aligner.evaluation.correction`.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from lit_aligner.files import BadRecord, UserError, read_records
from lit_aligner.generation.engine import cut_at_stop, generate
from lit_aligner.model import LLaMA, Aligner
from lit_aligner.prompts import Message, build_prompt, correction_prompt, encode_prompt

# An Aligner, or False for the bare base (the "before" column of every metric).
Corrector = Union[Aligner, bool]


def correction_prompt_ids(tokenizer, question: str, answer: str) -> torch.Tensor:
    """Prompt token ids (P,) for (question, answer): the ids the training data used for the same row
    (`lit_aligner.data` encodes the rendered prompt with the tokenizer's default BOS, as `encode_prompt` does)."""
    if not question.strip() or not answer.strip():
        raise ValueError("a correction needs a non-empty question and a non-empty answer to correct")
    return encode_prompt(tokenizer, correction_prompt(question, answer)).long()


def generate_texts(model: LLaMA, tokenizer, prompts: Sequence[torch.Tensor], aligner: Corrector,
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
        ids, stats = generate(model, [prompts[i] for i in batch], max_new_tokens, aligners=aligner,
                              return_stats=True, **sampling)
        seconds += stats.prefill_s + stats.decode_s
        out.update(zip(batch, ids))
    tokens = [out[i] for i in range(len(prompts))]
    stop = sampling.get("stop_strings") or ()
    return [cut_at_stop(tokenizer.decode(t, skip_special=True), stop) for t in tokens], tokens, seconds


def correct(model: LLaMA, tokenizer, aligner: Corrector, questions: Sequence[str], answers: Sequence[str],
            max_new_tokens: int = 256, batch_size: int = 8, **sampling: Any) -> List[str]:
    """Corrected answers for (question, answer) pairs, one string per pair. aligner: the correction Aligner, or
    False (the bare base given the same correction prompt). `sampling`: `generate` keywords (temperature, top_k,
    top_p, generator, compile; stop_ids default to the tokenizer's). Greedy by default."""
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers: give one answer per question")
    prompts = [correction_prompt_ids(tokenizer, q, a) for q, a in zip(questions, answers)]
    return generate_texts(model, tokenizer, prompts, aligner, max_new_tokens, batch_size, **sampling)[0]


def base_answers(model: LLaMA, tokenizer, questions: Sequence[str], max_new_tokens: int = 256,
                 template: Optional[str] = None, batch_size: int = 8, systems: Optional[Sequence[str]] = None,
                 histories: Optional[Sequence[Sequence[Message]]] = None, **sampling: Any) -> List[str]:
    """The bare base's answers to `questions`, with `template` (default: the tokenizer's chat template, else the
    raw text; see `generate.build_prompt`); systems / histories: a system message and earlier turns per question.
    Stage one of `answer_then_correct`."""
    sampling.pop("grammar", None)  # a structured output is the correction's, not the upstream answer's
    systems, histories = systems or [""] * len(questions), histories or [()] * len(questions)
    prompts = [encode_prompt(tokenizer, build_prompt(tokenizer, q, template, system=s, history=h))
               for q, s, h in zip(questions, systems, histories)]
    return generate_texts(model, tokenizer, prompts, False, max_new_tokens, batch_size, **sampling)[0]


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


QA_FORMAT = 'a JSON list or JSONL of objects {"question": ..., "answer": ...}'


def read_qa_pairs(path: Union[str, Path]) -> List[Tuple[str, str]]:
    """(question, answer) pairs from a JSON list or JSONL file of objects with non-empty "question" and "answer"
    strings (other fields, e.g. "correction", are ignored). UserError naming the file and the row otherwise."""
    records, _ = read_records(path, f"question/answer file ({QA_FORMAT})")
    pairs = []
    for where, row in records:
        if isinstance(row, BadRecord) or not isinstance(row, dict):
            raise UserError(f"{path}: {where} {row if isinstance(row, BadRecord) else 'is not an object'}; expected "
                            f"{QA_FORMAT}")
        for key in ("question", "answer"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise UserError(f"{path}: {where} has no non-empty {key!r} string (fields: {sorted(row)}); expected "
                                f"{QA_FORMAT}")
        pairs.append((row["question"], row["answer"]))
    if not pairs:
        raise UserError(f"{path}: no rows; expected {QA_FORMAT}")
    return pairs
