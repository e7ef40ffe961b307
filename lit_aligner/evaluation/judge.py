"""Pairwise judging: the win rate of system A against system B on a prompt file, judged by a local model.

Systems: the bare base, an Aligner on it, or a file of answers from any other model. The judge is any converted
checkpoint, prompted through its own chat template with the MT-Bench pairwise prompt (`JUDGE_SYSTEM`, below). The
verdict is read from the judge's next-token distribution after the answer is opened with "[[": the most likely of
"A", "B" and "C" (tie). Reading the distribution instead of parsing free text makes every verdict well-formed, even
from a small judge, and deterministic.

With multi-turn prompts (MT-Bench's second turns; `judge --multi-turn`) each system answers the follow-up questions
with its own earlier answers in the conversation, and a later turn is judged on the two whole conversations with
MT-Bench's multi-turn pairwise prompt (`JUDGE_SYSTEM_MULTI`), the judge told to focus on the last answer.

Every pair is judged in both answer orders (position bias is real, worst in small judges); a system wins a prompt
only when both orders agree, else the prompt is a tie. Score of A = (wins + ties / 2) / N, with a 95% percentile
bootstrap interval over prompts, and per category when the prompt file has categories (Vicuna / MT-Bench style).
"""

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple, Union

import torch

from lit_aligner.files import UserError, read_records

JUDGE_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to the "
    "user question displayed below. You should choose the assistant that follows the user's instructions and answers "
    "the user's question better. Your evaluation should consider factors such as the helpfulness, relevance, "
    "accuracy, depth, creativity, and level of detail of their responses. Avoid any position biases and ensure that "
    "the order in which the responses were presented does not influence your decision. Do not allow the length of the "
    "responses to influence your evaluation. Do not favor certain names of the assistants. Be as objective as "
    "possible. Output your final verdict by strictly following this format: \"[[A]]\" if assistant A is better, "
    "\"[[B]]\" if assistant B is better, and \"[[C]]\" for a tie."
)
JUDGE_USER = ("[User Question]\n{question}\n\n[The Start of Assistant A's Answer]\n{a}\n[The End of Assistant A's "
              "Answer]\n\n[The Start of Assistant B's Answer]\n{b}\n[The End of Assistant B's Answer]")
# MT-Bench's "pair-v2-multi-turn" prompt, with "the last user question" for its "second" (any number of turns) and,
# as JUDGE_SYSTEM, without the explanation: the verdict is read straight after the opened "[[".
JUDGE_SYSTEM_MULTI = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to the "
    "user questions. You should choose the assistant that follows the user's instructions and answers the user's "
    "questions better. Your evaluation should consider factors such as the helpfulness, relevance, accuracy, depth, "
    "creativity, and level of detail of their responses. You should focus on who provides a better answer to the last "
    "user question. Avoid any position biases and ensure that the order in which the responses were presented does "
    "not influence your decision. Do not allow the length of the responses to influence your evaluation. Do not favor "
    "certain names of the assistants. Be as objective as possible. Output your final verdict by strictly following "
    "this format: \"[[A]]\" if assistant A is better, \"[[B]]\" if assistant B is better, and \"[[C]]\" for a tie."
)


def judge_conversation(name: str, questions: Sequence[str], answers: Sequence[str]) -> str:
    """One assistant's conversation as MT-Bench's multi-turn judging prompt shows it."""
    turns = "".join(f"### User:\n{q}\n\n### Assistant {name}:\n{a}\n\n" for q, a in zip(questions, answers))
    return (f"<|The Start of Assistant {name}'s Conversation with User|>\n\n{turns}"
            f"<|The End of Assistant {name}'s Conversation with User|>")


VERDICT_LEAD = "[["  # the judge's answer is opened with this; the next token is the verdict
VERDICTS = ("A", "B", "C")


@dataclass
class Question:
    id: str
    text: str  # the first user turn
    category: str = ""
    follow_ups: List[str] = field(default_factory=list)  # the later user turns of a multi-turn prompt (MT-Bench)

    @property
    def turns(self) -> List[str]:
        return [self.text, *self.follow_ups]


def read_questions(path: Path) -> List[Question]:
    """Prompts from JSON/JSONL: Vicuna / MT-Bench rows ({"question_id", "category", "turns": [...]}: the first turn,
    and the later ones as follow-ups), or rows with "prompt" / "instruction" / "question" (+ optional "input", "id",
    "category"), or plain strings."""
    records, _ = read_records(path, "prompts file (JSON or JSONL)")
    out = []
    for i, (where, row) in enumerate(records):
        if isinstance(row, str):
            out.append(Question(str(i), row))
            continue
        if not isinstance(row, dict):
            raise UserError(f"{path}: {where} is not a string or an object")
        turns = row.get("turns") if isinstance(row.get("turns"), list) else \
            [row.get("prompt", row.get("instruction", row.get("question")))]
        if not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise UserError(f"{path}: {where} has no question text ('turns', 'prompt', 'instruction' or 'question'), "
                            f"or an empty turn")
        text = f"{turns[0]}\n\n{row['input']}" if row.get("input") else turns[0]
        out.append(Question(str(row.get("question_id", row.get("id", i))), text, str(row.get("category", "")),
                            list(turns[1:])))
    if not out:
        raise UserError(f"{path}: no prompts")
    return out


def read_answers(path: Path, questions: Sequence[Question]) -> List[List[str]]:
    """Answers of another model to `questions`, one list of turns each, from JSON/JSONL rows keyed by
    "question_id"/"id" (else by the question text in "prompt"/"instruction"/"question", else, in a file without ids, in
    file order): "answer", "output", "response", "text" (one turn), or Vicuna / FastChat's {"choices": [{"turns":
    [...]}]} (every turn)."""
    records, _ = read_records(path, "answers file (JSON or JSONL)")
    by_id, by_text, in_order = {}, {}, []
    for where, row in records:
        if not isinstance(row, dict):
            raise UserError(f"{path}: {where} is not an object with an answer")
        text = next((row[k] for k in ("answer", "output", "response", "text") if isinstance(row.get(k), str)), None)
        answer = [text] if text is not None else None
        if answer is None and isinstance(row.get("choices"), list) and row["choices"]:
            answer = row["choices"][0].get("turns") if isinstance(row["choices"][0], dict) else None
        if not answer or not all(isinstance(a, str) for a in answer):
            raise UserError(f"{path}: {where} has no answer ('answer', 'output', 'response', 'text' or choices/turns)")
        if "question_id" in row or "id" in row:
            by_id[str(row.get("question_id", row.get("id")))] = answer
        for k in ("prompt", "instruction", "question"):
            if isinstance(row.get(k), str):
                by_text[row[k].strip()] = answer
        in_order.append(answer)
    out = []
    for i, q in enumerate(questions):
        a = by_id.get(q.id, by_text.get(q.text.strip()))
        if a is None:
            if by_id:  # rows keyed by id: the answer in this place belongs to another question
                raise UserError(f"{path}: no answer for question {q.id!r}: no row has that 'question_id'/'id' (nor its "
                                f"question text); answer every question of the prompts file")
            if len(in_order) != len(questions):
                raise UserError(f"{path}: no answer for question {q.id!r} (match rows by 'question_id'/'id' or the "
                                f"question text, or give one answer per question in order)")
            a = in_order[i]
        out.append(a)
    return out


class Judge:
    """A converted checkpoint asked the pairwise question; `verdicts` returns "A", "B" or "C" per pair."""

    def __init__(self, model, tokenizer, batch_size: int = 4):
        self.model, self.tok, self.batch_size = model, tokenizer, batch_size
        ids = [tokenizer.encode(v, bos=False).tolist() for v in VERDICTS]
        if any(len(i) != 1 for i in ids):  # e.g. a tokenizer that merges "[[A" : score the first token of each
            ids = [i[:1] for i in ids]
        self.verdict_ids = [i[0] for i in ids]
        if len(set(self.verdict_ids)) != 3:
            raise UserError("the judge's tokenizer does not tell the verdicts A, B and C apart by their first token")

    def prompt(self, question: Union[str, Sequence[str]], a: Union[str, Sequence[str]],
               b: Union[str, Sequence[str]]) -> str:
        """The judging prompt for one question and two answers, or (lists) the user turns of a conversation and each
        assistant's answers to them: MT-Bench's multi-turn prompt, judging the last answers."""
        qs, a, b = ([x] if isinstance(x, str) else list(x) for x in (question, a, b))
        if len(qs) == 1:
            system, user = JUDGE_SYSTEM, JUDGE_USER.format(question=qs[0], a=a[0], b=b[0])
        else:
            system = JUDGE_SYSTEM_MULTI
            user = judge_conversation("A", qs, a) + "\n\n\n" + judge_conversation("B", qs, b)
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        if self.tok.has_chat_template:
            try:
                return self.tok.apply_chat_template(messages) + VERDICT_LEAD
            except ValueError:  # a template without a system role
                merged = [{"role": "user", "content": system + "\n\n" + user}]
                return self.tok.apply_chat_template(merged) + VERDICT_LEAD
        return f"{system}\n\n{user}\n\nVerdict: {VERDICT_LEAD}"

    @torch.no_grad()
    def verdicts(self, triples: Sequence[Tuple[Any, Any, Any]]) -> List[Tuple[str, List[float]]]:
        """(verdict, probabilities of A/B/C renormalised over the three) for each (question, answer A, answer B), or
        (user turns, A's answers, B's answers) of a conversation (see `prompt`)."""
        from lit_aligner.prompts import encode_prompt

        device = self.model.tok_embeddings.weight.device
        limit = self.model.config.block_size
        out = []
        for s in range(0, len(triples), self.batch_size):
            chunk = [encode_prompt(self.tok, self.prompt(*t)).tolist()[-limit:] for t in triples[s:s + self.batch_size]]
            T = max(map(len, chunk))
            idx = torch.zeros(len(chunk), T, dtype=torch.long)
            for b, ids in enumerate(chunk):
                idx[b, :len(ids)] = torch.tensor(ids)
            hidden = self.model(idx.to(device), aligner=False, return_hidden=True)
            last = hidden[torch.arange(len(chunk)), torch.tensor([len(c) - 1 for c in chunk])]
            logits = torch.nn.functional.linear(last, self.model.lm_head_weight)[:, self.verdict_ids].float()
            probs = logits.softmax(-1)
            for p in probs.tolist():
                out.append((VERDICTS[max(range(3), key=p.__getitem__)], p))
        return out


def outcome(first: str, swapped: str) -> float:
    """System A's result on one prompt from the two orders: first = verdict with A's answer shown first, swapped = with
    B's answer first. 1 = A wins (both orders agree), 0 = B wins, 0.5 = a tie or a disagreement."""
    if first == "A" and swapped == "B":
        return 1.0
    if first == "B" and swapped == "A":
        return 0.0
    return 0.5


def bootstrap_interval(values: Sequence[float], iters: int = 1000, seed: int = 0, level: float = 0.95):
    """Percentile bootstrap interval of the mean of `values` (resampled with replacement)."""
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(iters))
    lo = means[int(math.floor((1 - level) / 2 * (iters - 1)))]
    hi = means[int(math.ceil((1 + level) / 2 * (iters - 1)))]
    return lo, hi


def win_rate(outcomes: Sequence[float], iters: int = 1000, seed: int = 0) -> Dict[str, Any]:
    n = len(outcomes)
    wins, losses = sum(o == 1.0 for o in outcomes), sum(o == 0.0 for o in outcomes)
    lo, hi = bootstrap_interval(outcomes, iters, seed)
    return {"n": n, "wins": wins, "ties": n - wins - losses, "losses": losses, "score": sum(outcomes) / n,
            "ci95": [lo, hi]}


def judge_pairs(judge: Judge, questions: Sequence[Question], answers_a: Sequence[Union[str, Sequence[str]]],
                answers_b: Sequence[Union[str, Sequence[str]]], iters: int = 1000, seed: int = 0) -> Dict[str, Any]:
    """Both orders for every judgement, the outcomes, the overall score and one per category. An answer is a text
    (the first turn) or a list of turns: turn k of a question is judged when both systems answered it (with the
    conversation so far), and with more than one turn judged the result also has one score per turn."""
    items = []  # (question, turn, user turns, A's answers, B's answers)
    for q, a, b in zip(questions, answers_a, answers_b):
        a, b = ([x] if isinstance(x, str) else list(x) for x in (a, b))
        for t in range(min(len(q.turns), len(a), len(b))):
            items.append((q, t + 1, q.turns[:t + 1], a[:t + 1], b[:t + 1]))
    first = judge.verdicts([(qs, a, b) for _, _, qs, a, b in items])
    swapped = judge.verdicts([(qs, b, a) for _, _, qs, a, b in items])
    rows, outcomes = [], []
    for (q, turn, qs, a, b), (v1, p1), (v2, p2) in zip(items, first, swapped):
        o = outcome(v1, v2)
        outcomes.append(o)
        rows.append({"question_id": q.id, "category": q.category, "turn": turn, "question": qs[-1],
                     "answer_a": a[-1], "answer_b": b[-1], "verdict_a_first": v1, "verdict_b_first": v2,
                     "probs_a_first": p1, "probs_b_first": p2, "outcome": o})
    categories = {}
    for cat in sorted({q.category for q in questions if q.category}):
        sel = [o for (q, *_), o in zip(items, outcomes) if q.category == cat]
        categories[cat] = win_rate(sel, iters, seed)
    turns = sorted({r["turn"] for r in rows})
    per_turn = {str(t): win_rate([o for r, o in zip(rows, outcomes) if r["turn"] == t], iters, seed)
                for t in turns} if len(turns) > 1 else {}
    agree = sum(r["verdict_a_first"] == {"A": "B", "B": "A", "C": "C"}[r["verdict_b_first"]] for r in rows)
    return {**win_rate(outcomes, iters, seed), "order_agreement": agree / len(rows), "turns": per_turn,
            "categories": categories, "rows": rows}


def format_judgement(result: Dict[str, Any], name_a: str, name_b: str) -> str:
    what = "judgements (prompts x turns)" if result.get("turns") else "prompts"
    lines = [f"{name_a} vs {name_b}: score {result['score']:.3f} (95% CI {result['ci95'][0]:.3f}-"
             f"{result['ci95'][1]:.3f}) over {result['n']} {what}: {result['wins']} wins, {result['ties']} ties, "
             f"{result['losses']} losses; the two orders agreed on {result['order_agreement']:.0%}"]
    for title, table in (("turn", {f"turn {t}": r for t, r in (result.get("turns") or {}).items()}),
                         ("category", result["categories"])):
        if table:
            lines.append(f"{title:>16}  {'n':>4}  {'score':>6}  {'95% CI':>13}  wins/ties/losses")
            for name, r in table.items():
                lines.append(f"{name[:16]:>16}  {r['n']:>4}  {r['score']:>6.3f}  {r['ci95'][0]:.3f}-"
                             f"{r['ci95'][1]:.3f}  {r['wins']}/{r['ties']}/{r['losses']}")
    return "\n".join(lines)
