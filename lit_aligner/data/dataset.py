"""Tokenized examples: one dataset type for every kind of data, the truncation policy, and the one collate.

An item is a dict of 1-D LongTensors named by its kind's fields (`KIND_FIELDS`):
- sft: {"prompt": (P,), "response": (R,), "context": (2k,)}: context holds k [start, end) spans of the response that
  are conversation, not target: with `--turns all` one sequence carries every answer of a conversation, and the user
  turns between the answers are context (empty for a single answer)
- preference: {"prompt", "chosen", "rejected"}
- unpaired: {"prompt", "completion", "label": (1,) 1 if the completion is desirable, else 0} (KTO)
- correction: {"prompt": the Q-A-C prompt (question + upstream answer A), "question": the question's own tokens,
  "answer": A, "correction": C}
- distill: {"prompt", "response", "teacher_prompt": the same prompt rendered with the teacher's context (its system
  message)} (context distillation: the teacher reads teacher_prompt + response, the student prompt + response)
Responses end with their end token (EOS, or the chat template's end-of-turn). Objectives (`lit_aligner.training`)
choose which (prompt, response) rows of an item a batch holds; `pad_rows` turns such rows into model inputs.
"""

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset

from lit_aligner.losses import IGNORE_INDEX

KIND_FIELDS: Dict[str, Tuple[str, ...]] = {
    "sft": ("prompt", "response", "context"),
    "preference": ("prompt", "chosen", "rejected"),
    "correction": ("prompt", "question", "answer", "correction"),
    "unpaired": ("prompt", "completion", "label"),
    "distill": ("prompt", "response", "teacher_prompt"),
}
# The fields that follow the prompt in a training sequence (the truncation policy cuts them, never the prompt).
RESPONSE_FIELDS: Dict[str, Tuple[str, ...]] = {"sft": ("response",), "preference": ("chosen", "rejected"),
                                               "correction": ("answer", "correction"), "unpaired": ("completion",),
                                               "distill": ("response",)}
KINDS = tuple(KIND_FIELDS)
ONE_ANSWER_KINDS = ("sft", "distill")  # rows with one answer: a pair's second answer is not read
TRUNCATION = ("drop", "truncate")
NO_CONTEXT = torch.zeros(0, dtype=torch.long)


def context_spans(context: Optional[torch.Tensor]) -> List[Tuple[int, int]]:
    """The [start, end) spans of an SFT `context` field."""
    return [] if context is None else [tuple(s) for s in context.view(-1, 2).tolist()]


class Ragged:
    """Variable-length int sequences stored flat: `tokens` (N,) int32 and `offsets` (n+1,) int64; row i is
    tokens[offsets[i]:offsets[i+1]]. The on-disk layout of prepared data, and a compact in-memory one."""

    def __init__(self, tokens: torch.Tensor, offsets: torch.Tensor):
        if offsets.ndim != 1 or offsets.numel() < 1 or tokens.ndim != 1 or int(offsets[-1]) != tokens.numel():
            raise ValueError("inconsistent ragged arrays: offsets must end at len(tokens)")
        self.tokens, self.offsets = tokens.to(torch.int32), offsets.to(torch.int64)

    @classmethod
    def from_list(cls, rows: Sequence[torch.Tensor]) -> "Ragged":
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.int64)
        offsets = torch.zeros(len(rows) + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(lengths, 0)
        tokens = torch.cat([torch.as_tensor(r, dtype=torch.int32) for r in rows]) if rows else \
            torch.zeros(0, dtype=torch.int32)
        return cls(tokens, offsets)

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    def __getitem__(self, i: int) -> torch.Tensor:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        return self.tokens[int(self.offsets[i]):int(self.offsets[i + 1])].long()

    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]


class TokenizedDataset(Dataset):
    """Tokenized examples of one `kind`: item i is {field: LongTensor} for the kind's fields (see the module
    docstring). Stored as one `Ragged` per field."""

    def __init__(self, kind: str, fields: Dict[str, Ragged]):
        if kind not in KIND_FIELDS:
            raise ValueError(f"unknown data kind {kind!r}; one of {', '.join(KINDS)}")
        if set(fields) != set(KIND_FIELDS[kind]):
            raise ValueError(f"{kind} data needs the fields {KIND_FIELDS[kind]}, got {sorted(fields)}")
        if len({len(r) for r in fields.values()}) != 1:
            raise ValueError("every field must have the same number of rows")
        self.kind, self.fields = kind, {name: fields[name] for name in KIND_FIELDS[kind]}

    @classmethod
    def from_rows(cls, kind: str, rows: Sequence[Sequence[torch.Tensor]]) -> "TokenizedDataset":
        """From rows of token tensors in the order of KIND_FIELDS[kind]; an SFT row may leave out its (empty)
        context."""
        names = KIND_FIELDS[kind]
        return cls(kind, {name: Ragged.from_list([r[k] if k < len(r) else NO_CONTEXT for r in rows])
                          for k, name in enumerate(names)})

    def __len__(self) -> int:
        return len(self.fields["prompt"])

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        return {name: r[i] for name, r in self.fields.items()}

    def rows(self) -> List[Tuple[torch.Tensor, ...]]:
        return [tuple(self[i][name] for name in KIND_FIELDS[self.kind]) for i in range(len(self))]

    def select(self, indices: Sequence[int]) -> "TokenizedDataset":
        rows = self.rows()
        return TokenizedDataset.from_rows(self.kind, [rows[i] for i in indices])

    def shared_rows(self, other: "TokenizedDataset") -> int:
        """How many of its rows are also rows of `other` (the same tokens in every field): validation rows that a run
        also trains on."""
        theirs = set(other.row_keys()) if other.kind == self.kind else set()
        return sum(k in theirs for k in self.row_keys())

    def row_keys(self) -> List[Tuple[bytes, ...]]:
        """Each row's tokens as bytes, field by field: equal keys, equal rows."""
        parts = [(r.tokens.numpy(), r.offsets.tolist()) for r in self.fields.values()]
        return [tuple(t[o[i]:o[i + 1]].tobytes() for t, o in parts) for i in range(len(self))]

    def answers(self) -> int:
        """The answers (targets) its rows hold: one per row, and one more per context span of an SFT row."""
        return len(self) + (len(self.fields["context"].tokens) // 2 if self.kind == "sft" else 0)

    def lengths(self) -> torch.Tensor:
        """(n,) tokens of the longest training sequence per example: its longest prompt + its longest response."""
        longest = torch.stack([self.fields[f].lengths() for f in RESPONSE_FIELDS[self.kind]]).amax(0)
        prompt = self.fields["prompt"].lengths()
        if self.kind == "distill":  # a chat template's default system message may make the student's the longer
            prompt = torch.maximum(prompt, self.fields["teacher_prompt"].lengths())
        return prompt + longest

    def tensors(self) -> Dict[str, torch.Tensor]:
        """The flat tensors ({field}_tokens, {field}_offsets) that prepared data stores."""
        return {f"{name}_{part}": getattr(r, part) for name, r in self.fields.items() for part in ("tokens", "offsets")}

    @classmethod
    def from_tensors(cls, kind: str, t: Dict[str, torch.Tensor]) -> "TokenizedDataset":
        if kind == "sft" and "prompt_lengths" in t:  # prepared-data version 1: prompt + response stored as one row
            seqs = Ragged(t["tokens"], t["offsets"])
            cut = t["prompt_lengths"].tolist()
            return cls.from_rows(kind, [(seqs[i][:p], seqs[i][p:]) for i, p in enumerate(cut)])
        fields = {name: Ragged(t[f"{name}_tokens"], t[f"{name}_offsets"]) for name in KIND_FIELDS[kind]
                  if not (kind == "sft" and name == "context" and "context_tokens" not in t)}
        if len(fields) < len(KIND_FIELDS[kind]):  # version 2: no context (one answer per row)
            fields["context"] = Ragged.from_list([NO_CONTEXT] * len(fields["prompt"]))
        return cls(kind, fields)

    def fit(self, max_seq_length: int, truncation: str = "drop") -> Tuple["TokenizedDataset", int, int]:
        """Apply the truncation policy for a (smaller) max_seq_length: (dataset, truncated, dropped)."""
        rows, truncated, dropped = [], 0, 0
        for i in range(len(self)):
            fitted = fit_item(self.kind, self[i], max_seq_length, truncation)
            if fitted is None:
                dropped += 1
                continue
            truncated += fitted[1]
            rows.append(tuple(fitted[0][name] for name in KIND_FIELDS[self.kind]))
        return TokenizedDataset.from_rows(self.kind, rows), truncated, dropped


def fit_responses(prompt: torch.Tensor, responses: Sequence[torch.Tensor], max_len: int,
                  truncation: str) -> Optional[Tuple[List[torch.Tensor], int]]:
    """The truncation policy for one example: (responses, 1 if any was cut else 0), or None to drop it. drop: an
    example whose prompt + longest response exceeds max_len goes; truncate: responses lose their tail (and with it the
    end token), and only an example whose prompt leaves no room for a response token goes."""
    if len(prompt) + max(len(r) for r in responses) <= max_len:
        return list(responses), 0
    if truncation == "drop" or len(prompt) >= max_len:
        return None
    room = max_len - len(prompt)
    return [r[:room] for r in responses], 1


def fit_item(kind: str, item: Dict[str, torch.Tensor], max_len: int,
             truncation: str) -> Optional[Tuple[Dict[str, torch.Tensor], int]]:
    """The truncation policy for one item of `kind`: (item, 1 if it was cut else 0), or None to drop it."""
    if len(item.get("context", NO_CONTEXT)):
        return _fit_conversation(item, max_len, truncation)
    names = RESPONSE_FIELDS[kind]
    prompt = max(item["prompt"], item["teacher_prompt"], key=len) if kind == "distill" else item["prompt"]
    fitted = fit_responses(prompt, [item[f] for f in names], max_len, truncation)
    return None if fitted is None else ({**item, **dict(zip(names, fitted[0]))}, fitted[1])


def _fit_conversation(item: Dict[str, torch.Tensor], max_len: int,
                      truncation: str) -> Optional[Tuple[Dict[str, torch.Tensor], int]]:
    """A sequence of several answers keeps the ones that fit, as one row per answer would: drop: the answers that end
    within max_len (each context span starts where an answer ends; not counted as truncated: no answer is cut);
    truncate: everything up to max_len, less a trailing piece of context. None when not one answer token fits."""
    p, r, spans = item["prompt"], item["response"], context_spans(item["context"])
    room = max_len - len(p)
    if len(r) <= room:
        return item, 0
    if truncation == "drop":
        cut = max((s for s, _ in spans if s <= room), default=0)
    else:
        cut = next((s for s, e in spans if s < room <= e), room)
    if cut <= 0:
        return None
    kept = [x for s, e in spans if e <= cut for x in (s, e)]
    return {**item, "response": r[:cut], "context": torch.tensor(kept, dtype=torch.long)}, int(truncation != "drop")


def pad_rows(rows: Sequence[Sequence[torch.Tensor]], pad_id: Optional[int]) -> Dict[str, torch.Tensor]:
    """(prompt, response) or (prompt, response, context) token rows -> {"input_ids": (B, T), "labels": (B, T),
    "lengths": (B,)}: prompt + response right-padded with pad_id to the longest row; labels are the input ids on the
    response outside its context spans and IGNORE_INDEX on the prompt, the context and the padding; lengths count each
    row's real tokens."""
    if not rows:
        raise ValueError("cannot collate an empty batch")
    T = max(len(row[0]) + len(row[1]) for row in rows)
    input_ids = torch.full((len(rows), T), 0 if pad_id is None else pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    lengths = torch.zeros(len(rows), dtype=torch.long)
    for b, (p, r, *context) in enumerate(rows):
        n = len(p) + len(r)
        input_ids[b, :n] = torch.cat([p, r])
        labels[b, len(p):n] = r
        for s, e in context_spans(context[0] if context else None):
            labels[b, len(p) + s:len(p) + e] = IGNORE_INDEX
        lengths[b] = n
    return {"input_ids": input_ids, "labels": labels, "lengths": lengths}


def target_tokens(row: Sequence[torch.Tensor]) -> int:
    """The tokens of a (prompt, response[, context]) row that carry a loss: the response outside its context, less
    a first token without a prompt to predict it from (position t predicts token t + 1)."""
    p, r, *context = row
    ctx = sum(e - s for s, e in context_spans(context[0] if context else None))
    return len(r) - ctx - (0 if len(p) else 1)
