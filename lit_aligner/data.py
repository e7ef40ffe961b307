"""Training data: reading instruction / preference / Q-A-C files, rendering prompts with a template, tokenizing with
the loss on the response only, the train/val split, prepared directories on disk, and the batch collators.

Three kinds of examples, each a torch Dataset of token tensors:
- `SFTDataset`: {"input_ids": (T,), "labels": (T,)}, labels -100 on the prompt;
- `PreferenceDataset`: {"prompt_ids": (P,), "chosen_ids": (C,), "rejected_ids": (R,)};
- `CorrectionDataset`: {"prompt_ids": (P,), "question": (Q,), "answer": (A,), "correction": (C,)}, where prompt_ids is
  the Q-A-C prompt (question + upstream answer A) and `sft_item(i, copy)` targets A (identity warm-up) or C.

Responses end with the tokenizer's EOS token (with the `chat` template: the chat template's end-of-turn token).
Tokenization keeps the prompt exactly as generation will see it: prompt_ids == tokenizer.encode(prompt) (BOS per the
tokenizer's default), and the response ids are the tail of encode(prompt + response) after those prompt ids (the same
as encoding the response alone, except that the tokenizer sees the boundary: no SentencePiece dummy-prefix space in
front of the response). When a tokenizer merges text across the boundary, the response is encoded on its own.

Files (`load_*_data(data=...)`): None → the offline default dataset (`lit_aligner.default_data`); a directory written
by `save_prepared` (scripts/prepare_*.py) → loaded as is; a .json list or .jsonl file → prepared on the fly. Formats
are detected from the row keys (see FORMATS) or chosen with `format=`; `field_map` renames fields first.
"""

import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import Dataset

from lit_aligner.prompts import (CorrectionTemplate, Message, PromptTemplate, get_template, join_input, transcript)

IGNORE_INDEX = -100
META_NAME = "meta.json"
SPLITS = ("train", "val")
KINDS = ("sft", "preference", "correction")
TRUNCATION = ("drop", "truncate")
PREFERENCES = ("safer", "better")
# format name -> the fields (after field_map) that identify it; checked in this order.
FORMATS: Dict[str, Tuple[str, ...]] = {
    "pku": ("prompt", "response_0", "response_1"),
    "qac": ("question", "answer", "correction"),
    "pairs": ("prompt", "chosen", "rejected"),
    "hh": ("chosen",),  # full "\n\nHuman: ... \n\nAssistant: ..." dialogues (+ "rejected" for pairs)
    "alpaca": ("instruction", "output"),
}
# fields a field_map may map onto, per format family
MAPPABLE = ("instruction", "input", "output", "prompt", "chosen", "rejected", "question", "answer", "correction",
            "response_0", "response_1", "better_response_id", "safer_response_id", "is_response_0_safe",
            "is_response_1_safe")
DATA_VERSION = 1
_SKIP_HINT = "fix the row, or pass --skip-bad-rows (skip_bad_rows=True) to skip and count such rows"


class DataError(ValueError):
    """Unusable data: the message names the file (and row) and the fix."""


class _BadRow(Exception):
    """One malformed row; becomes a DataError naming the file and row, or is counted with skip_bad_rows."""


# ---------------------------------------------------------------------------------------------------------------------
# Datasets


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

    def select(self, index: Sequence[int]) -> "Ragged":
        return Ragged.from_list([self[i] for i in index])

    def tensors(self, prefix: str = "") -> Dict[str, torch.Tensor]:
        return {f"{prefix}tokens": self.tokens, f"{prefix}offsets": self.offsets}


class SFTDataset(Dataset):
    """Supervised examples: item i is {"input_ids": LongTensor (T,), "labels": LongTensor (T,)} with labels ==
    input_ids on the response and -100 on the prompt. `seqs` holds prompt + response ids, `prompt_lengths` (n,)."""

    def __init__(self, seqs: Ragged, prompt_lengths: torch.Tensor):
        if len(seqs) != prompt_lengths.numel():
            raise ValueError("one prompt length per sequence")
        self.seqs, self.prompt_lengths = seqs, prompt_lengths.to(torch.int64)

    @classmethod
    def from_pairs(cls, pairs: Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> "SFTDataset":
        """From (prompt_ids, response_ids) pairs."""
        return cls(Ragged.from_list([torch.cat([p, r]) for p, r in pairs]),
                   torch.tensor([len(p) for p, _ in pairs], dtype=torch.int64))

    def __len__(self) -> int:
        return len(self.seqs)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        ids = self.seqs[i]
        labels = ids.clone()
        labels[: int(self.prompt_lengths[i])] = IGNORE_INDEX
        return {"input_ids": ids, "labels": labels}

    def lengths(self) -> torch.Tensor:
        """(n,) total tokens per example."""
        return self.seqs.lengths()

    def tensors(self) -> Dict[str, torch.Tensor]:
        return {**self.seqs.tensors(), "prompt_lengths": self.prompt_lengths}

    @classmethod
    def from_tensors(cls, t: Dict[str, torch.Tensor]) -> "SFTDataset":
        return cls(Ragged(t["tokens"], t["offsets"]), t["prompt_lengths"])

    def fit(self, max_seq_length: int, truncation: str = "drop") -> Tuple["SFTDataset", int, int]:
        """Apply the truncation policy for a (smaller) max_seq_length: (dataset, truncated, dropped)."""
        pairs, truncated, dropped = [], 0, 0
        for i in range(len(self)):
            ids, p = self.seqs[i], int(self.prompt_lengths[i])
            fitted = _fit(ids[:p], [ids[p:]], max_seq_length, truncation)
            if fitted is None:
                dropped += 1
                continue
            truncated += fitted[1]
            pairs.append((ids[:p], fitted[0][0]))
        return SFTDataset.from_pairs(pairs), truncated, dropped


class PreferenceDataset(Dataset):
    """Preference pairs: item i is {"prompt_ids": (P,), "chosen_ids": (C,), "rejected_ids": (R,)} (LongTensors; the
    responses end with EOS)."""

    def __init__(self, prompts: Ragged, chosen: Ragged, rejected: Ragged):
        if not len(prompts) == len(chosen) == len(rejected):
            raise ValueError("prompts, chosen and rejected must have the same number of rows")
        self.prompts, self.chosen, self.rejected = prompts, chosen, rejected

    @classmethod
    def from_triples(cls, triples: Sequence[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> "PreferenceDataset":
        return cls(*(Ragged.from_list([t[k] for t in triples]) for k in range(3)))

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        return {"prompt_ids": self.prompts[i], "chosen_ids": self.chosen[i], "rejected_ids": self.rejected[i]}

    def lengths(self) -> torch.Tensor:
        """(n,) the longer of prompt+chosen and prompt+rejected per pair."""
        return self.prompts.lengths() + torch.maximum(self.chosen.lengths(), self.rejected.lengths())

    def tensors(self) -> Dict[str, torch.Tensor]:
        return {**self.prompts.tensors("prompt_"), **self.chosen.tensors("chosen_"),
                **self.rejected.tensors("rejected_")}

    @classmethod
    def from_tensors(cls, t: Dict[str, torch.Tensor]) -> "PreferenceDataset":
        return cls(*(Ragged(t[f"{k}_tokens"], t[f"{k}_offsets"]) for k in ("prompt", "chosen", "rejected")))

    def fit(self, max_seq_length: int, truncation: str = "drop") -> Tuple["PreferenceDataset", int, int]:
        triples, truncated, dropped = [], 0, 0
        for i in range(len(self)):
            item = self[i]
            fitted = _fit(item["prompt_ids"], [item["chosen_ids"], item["rejected_ids"]], max_seq_length, truncation)
            if fitted is None:
                dropped += 1
                continue
            truncated += fitted[1]
            triples.append((item["prompt_ids"], *fitted[0]))
        return PreferenceDataset.from_triples(triples), truncated, dropped


class CorrectionDataset(Dataset):
    """Q-A-C examples: item i is {"prompt_ids": (P,) the correction prompt showing question and upstream answer,
    "question": (Q,) the question's own tokens (no BOS), "answer": (A,) and "correction": (C,) as response tokens
    (ending with EOS)}. `sft_item(i, copy)` / `as_sft(copy)` give SFT examples whose target is the answer itself
    (copy=True: the identity Q-A-A warm-up) or the correction (Q-A-C)."""

    FIELDS = ("prompt", "question", "answer", "correction")

    def __init__(self, prompts: Ragged, questions: Ragged, answers: Ragged, corrections: Ragged):
        if not len(prompts) == len(questions) == len(answers) == len(corrections):
            raise ValueError("all Q-A-C fields must have the same number of rows")
        self.prompts, self.questions, self.answers, self.corrections = prompts, questions, answers, corrections

    @classmethod
    def from_rows(cls, rows: Sequence[Tuple[torch.Tensor, ...]]) -> "CorrectionDataset":
        return cls(*(Ragged.from_list([r[k] for r in rows]) for k in range(4)))

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        return {"prompt_ids": self.prompts[i], "question": self.questions[i], "answer": self.answers[i],
                "correction": self.corrections[i]}

    def sft_item(self, i: int, copy: bool) -> Dict[str, torch.Tensor]:
        """{"input_ids", "labels"} for prompt + (answer if copy else correction), labels -100 on the prompt."""
        prompt = self.prompts[i]
        target = self.answers[i] if copy else self.corrections[i]
        ids = torch.cat([prompt, target])
        labels = ids.clone()
        labels[: len(prompt)] = IGNORE_INDEX
        return {"input_ids": ids, "labels": labels}

    def as_sft(self, copy: bool) -> SFTDataset:
        """The whole dataset as an SFTDataset targeting the answer (copy=True) or the correction."""
        return SFTDataset.from_pairs([(self.prompts[i], self.answers[i] if copy else self.corrections[i])
                                      for i in range(len(self))])

    def lengths(self) -> torch.Tensor:
        return self.prompts.lengths() + torch.maximum(self.answers.lengths(), self.corrections.lengths())

    def tensors(self) -> Dict[str, torch.Tensor]:
        parts = (self.prompts, self.questions, self.answers, self.corrections)
        return {k: v for name, r in zip(self.FIELDS, parts) for k, v in r.tensors(f"{name}_").items()}

    @classmethod
    def from_tensors(cls, t: Dict[str, torch.Tensor]) -> "CorrectionDataset":
        return cls(*(Ragged(t[f"{k}_tokens"], t[f"{k}_offsets"]) for k in cls.FIELDS))

    def fit(self, max_seq_length: int, truncation: str = "drop") -> Tuple["CorrectionDataset", int, int]:
        rows, truncated, dropped = [], 0, 0
        for i in range(len(self)):
            item = self[i]
            fitted = _fit(item["prompt_ids"], [item["answer"], item["correction"]], max_seq_length, truncation)
            if fitted is None:
                dropped += 1
                continue
            truncated += fitted[1]
            rows.append((item["prompt_ids"], item["question"], *fitted[0]))
        return CorrectionDataset.from_rows(rows), truncated, dropped


AnyDataset = Union[SFTDataset, PreferenceDataset, CorrectionDataset]
# a file or prepared directory, None for the offline default dataset, or rows already in memory (a list of dicts)
DataSource = Union[str, Path, None, Sequence[Dict[str, Any]]]
_DATASET_OF_KIND = {"sft": SFTDataset, "preference": PreferenceDataset, "correction": CorrectionDataset}


# ---------------------------------------------------------------------------------------------------------------------
# Collators


def _pad_rows(rows: Sequence[Tuple[torch.Tensor, int]], pad_id: Optional[int],
              max_length: Optional[int]) -> Dict[str, torch.Tensor]:
    """rows of (ids, prompt_length) -> right-padded input_ids/labels (B, T), labels -100 on prompt and padding."""
    if not rows:
        raise ValueError("cannot collate an empty batch")
    if max_length is not None:
        rows = [(ids[:max_length], p) for ids, p in rows]
    T = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), T), 0 if pad_id is None else pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    for b, (ids, p) in enumerate(rows):
        input_ids[b, : len(ids)] = ids
        labels[b, p: len(ids)] = ids[p:]
    return {"input_ids": input_ids, "labels": labels}


def collate_sft(batch: Sequence[Dict[str, torch.Tensor]], pad_id: Optional[int],
                max_length: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """SFT items -> {"input_ids": (B, T), "labels": (B, T)}, right-padded with pad_id (labels -100 on padding), T the
    longest item (cut to max_length when given)."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    if max_length is not None:
        batch = [{k: v[:max_length] for k, v in item.items()} for item in batch]
    T = max(len(item["input_ids"]) for item in batch)
    input_ids = torch.full((len(batch), T), 0 if pad_id is None else pad_id, dtype=torch.long)
    labels = torch.full((len(batch), T), IGNORE_INDEX, dtype=torch.long)
    for b, item in enumerate(batch):
        n = len(item["input_ids"])
        input_ids[b, :n] = item["input_ids"]
        labels[b, :n] = item["labels"]
    return {"input_ids": input_ids, "labels": labels}


def collate_preference(batch: Sequence[Dict[str, torch.Tensor]], pad_id: Optional[int],
                       max_length: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Preference items -> {"input_ids": (2B, T), "labels": (2B, T)}: rows 0..B-1 are prompt+chosen, rows B..2B-1
    prompt+rejected (same order), right-padded, labels -100 on the prompt and the padding."""
    rows = [(torch.cat([it["prompt_ids"], it[key]]), len(it["prompt_ids"]))
            for key in ("chosen_ids", "rejected_ids") for it in batch]
    return _pad_rows(rows, pad_id, max_length)


# ---------------------------------------------------------------------------------------------------------------------
# Reading files


def read_records(path: Path) -> Tuple[List[Tuple[str, Any]], str]:
    """The rows of a JSON list or JSONL file as (where, value) pairs, where = "row i" (index in the list) or
    "line n" (1-based), and the container ("json" | "jsonl"). A JSONL line that is not valid JSON becomes a _BadRow
    value."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file" + (" (a directory, but not a prepared one: it has no meta.json)"
                                                   if path.is_dir() else "") + ".")
    try:
        if path.suffix == ".gz":  # the HH-RLHF release ships its splits gzipped
            import gzip

            with gzip.open(path, "rb") as f:
                text = f.read().decode("utf-8-sig")
        else:
            text = path.read_text(encoding="utf-8-sig")
    except (UnicodeDecodeError, OSError, EOFError):
        raise DataError(f"{path}: not a JSON/JSONL text file (not UTF-8 text; a binary file?). Pass a .json list of "
                        f"objects or a .jsonl file with one object per line.") from None
    stripped = text.lstrip()
    if not stripped:
        raise DataError(f"{path}: the file is empty.")
    if stripped[0] == "[":
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e}); fix the file (a JSON list of objects is expected).") \
                from None
        return [(f"row {i}", v) for i, v in enumerate(value)], "json"
    if stripped[0] != "{":
        raise DataError(f"{path}: not JSON or JSONL (it starts with {stripped[:20]!r}); expected a JSON list of "
                        f"objects or one JSON object per line.")
    try:  # one JSON object spread over several lines: not a dataset
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if isinstance(value, dict) and text.strip().count("\n") > 0:
        raise DataError(f"{path}: a single JSON object, not a dataset; expected a JSON list of objects or JSONL (one "
                        f"object per line).")
    records: List[Tuple[str, Any]] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append((f"line {n}", json.loads(line)))
        except json.JSONDecodeError as e:
            records.append((f"line {n}", _BadRow(f"not valid JSON ({e.msg} at column {e.colno})")))
    return records, "jsonl"


def _apply_field_map(row: Dict[str, Any], field_map: Optional[Dict[str, str]]) -> Dict[str, Any]:
    if not field_map:
        return row
    out = {k: v for k, v in row.items() if k not in field_map.values()}
    for ours, theirs in field_map.items():
        if theirs in row:
            out[ours] = row[theirs]
    return out


def parse_field_map(spec: Union[str, Dict[str, str], None]) -> Optional[Dict[str, str]]:
    """"instruction=question,output=answer" (ours=theirs) or a dict -> {ours: theirs}; DataError on a bad spec."""
    if spec is None or spec == "" or spec == {}:
        return None
    if isinstance(spec, str):
        pairs = [p.strip() for p in spec.split(",") if p.strip()]
        if any(p.count("=") != 1 for p in pairs):
            raise DataError(f"--field-map {spec!r}: expected comma-separated ours=theirs pairs, e.g. "
                            f"instruction=question,output=answer")
        spec = dict(tuple(s.strip() for s in p.split("=")) for p in pairs)
    unknown = sorted(set(spec) - set(MAPPABLE))
    if unknown:
        raise DataError(f"field map: unknown target field(s) {unknown}; map onto {', '.join(MAPPABLE)}")
    return dict(spec)


def detect_format(row: Dict[str, Any], path: Path) -> str:
    keys = set(row)
    for name, needed in FORMATS.items():
        if name == "hh" and "prompt" in keys:
            continue  # {prompt, chosen, ...} is a pair row that lacks a field, not an HH dialogue
        if set(needed) <= keys:
            return name
    raise DataError(
        f"{path}: cannot tell the data format from the row keys {sorted(keys)}. Known formats: Alpaca "
        f"(instruction, input, output), PKU-SafeRLHF (prompt, response_0, response_1, better_response_id, "
        f"safer_response_id), HH-RLHF (chosen, rejected dialogues), preference pairs (prompt, chosen, rejected), "
        f"Q-A-C (question, answer, correction). Map other names with --field-map, e.g. "
        f"instruction=question,output=answer.")


# ---------------------------------------------------------------------------------------------------------------------
# Rows -> examples


@dataclass
class Example:
    """One normalized row: the prompt conversation (ends with a user message), an optional Alpaca input for one-turn
    prompts, the response (`chosen`: SFT target / preferred / correction C), the other answer (`rejected`:
    dispreferred / upstream answer A), and for HH-RLHF the verbatim dialogue prefix used by the `hh` template."""

    messages: List[Message]
    chosen: str
    rejected: Optional[str] = None
    input: str = ""
    raw_prompt: Optional[str] = None
    notes: Dict[str, Any] = field(default_factory=dict)

    def chat_messages(self) -> List[Message]:
        """The conversation with the input joined into the (single) user message."""
        if self.input:
            return [{"role": "user", "content": join_input(self.messages[-1]["content"], self.input)}]
        return self.messages

    def question(self) -> str:
        """The question as one text, for the correction template (earlier turns as a transcript)."""
        if len(self.messages) == 1:
            return join_input(self.messages[0]["content"], self.input)
        return transcript(self.messages)


def _text(row: Dict[str, Any], key: str, allow_empty: bool = False) -> str:
    if key not in row:
        raise _BadRow(f"missing field {key!r} (fields: {sorted(row)})")
    value = row[key]
    if value is None and allow_empty:
        return ""
    if not isinstance(value, str):
        raise _BadRow(f"field {key!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise _BadRow(f"field {key!r} is empty")
    return value


def _choice_id(row: Dict[str, Any], key: str) -> int:
    if key not in row:
        raise _BadRow(f"missing field {key!r}")
    v = row[key]
    if isinstance(v, bool) or v not in (0, 1):
        raise _BadRow(f"field {key!r} must be 0 or 1, got {v!r}")
    return int(v)


HH_ASSISTANT = "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def split_hh(dialogue: str) -> Tuple[str, str]:
    """Split an HH-RLHF dialogue at its LAST "\\n\\nAssistant:" into (prompt, answer): the prompt is everything up to
    and including that "Assistant:", the answer the rest (stripped). ValueError when there is no Assistant turn or
    the answer is empty."""
    i = dialogue.rfind(HH_ASSISTANT)
    if i < 0:
        raise ValueError("no '\\n\\nAssistant:' turn in the dialogue")
    prompt, answer = dialogue[: i + len(HH_ASSISTANT)], dialogue[i + len(HH_ASSISTANT):].strip()
    if not answer:
        raise ValueError("the last Assistant turn is empty")
    return prompt, answer


def hh_messages(prompt: str) -> List[Message]:
    """Chat messages (Human → user, Assistant → assistant) of an HH prompt ending with the open "\\n\\nAssistant:"
    turn; consecutive turns of one speaker are merged. ValueError when it does not end with a Human turn."""
    parts = _HH_TURN.split(prompt)
    lead, turns = parts[0].strip(), list(zip(parts[1::2], parts[2::2]))
    if not turns or turns[-1][0] != "Assistant" or turns[-1][1].strip():
        raise ValueError("the prompt must end with an open '\\n\\nAssistant:' turn")
    messages: List[Message] = []
    if lead:  # text before the first marker: context from the user
        messages.append({"role": "user", "content": lead})
    for speaker, content in turns[:-1]:
        role = "user" if speaker == "Human" else "assistant"
        content = content.strip()
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] = (messages[-1]["content"] + "\n\n" + content).strip()
        else:
            messages.append({"role": role, "content": content})
    if not messages or messages[-1]["role"] != "user" or not messages[-1]["content"]:
        raise ValueError("the dialogue's last turn before the answer is not a (non-empty) Human turn")
    return messages


def row_to_example(row: Any, fmt: str, kind: str, preference: str) -> Example:
    """One raw row of format `fmt` -> Example for `kind` (sft uses `chosen` only). Raises _BadRow."""
    if not isinstance(row, dict):
        raise _BadRow(f"expected a JSON object, got {type(row).__name__}")
    pair = kind != "sft"
    if fmt == "alpaca":
        if pair:
            raise DataError("Alpaca-style rows (instruction, input, output) have one answer per prompt: they make "
                            "SFT data only. Preference / correction data needs pairs (PKU-SafeRLHF, HH-RLHF, "
                            "prompt/chosen/rejected or question/answer/correction).")
        return Example([{"role": "user", "content": _text(row, "instruction")}], _text(row, "output"),
                       input=_text(row, "input", allow_empty=True) if "input" in row else "")
    if fmt == "qac":
        return Example([{"role": "user", "content": _text(row, "question")}], _text(row, "correction"),
                       _text(row, "answer"))
    if fmt == "pairs":
        return Example([{"role": "user", "content": _text(row, "prompt")}], _text(row, "chosen"),
                       _text(row, "rejected") if pair else None,
                       input=_text(row, "input", allow_empty=True) if "input" in row else "")
    if fmt == "pku":
        prompt = _text(row, "prompt")
        responses = [_text(row, "response_0"), _text(row, "response_1")]
        key = "safer_response_id" if preference == "safer" else "better_response_id"
        best = _choice_id(row, key)
        notes = {}
        safe = row.get(f"is_response_{best}_safe")
        if safe is not None and not isinstance(safe, bool):
            raise _BadRow(f"field 'is_response_{best}_safe' must be true or false, got {safe!r}")
        if safe is False:
            notes["chosen_unsafe"] = True
        return Example([{"role": "user", "content": prompt}], responses[best], responses[1 - best] if pair else None,
                       notes=notes)
    if fmt == "hh":
        try:
            prompt, chosen = split_hh(_text(row, "chosen"))
            rejected = None
            if pair:
                prompt_r, rejected = split_hh(_text(row, "rejected"))
                if prompt_r != prompt:
                    raise _BadRow("'chosen' and 'rejected' have different prompts (they differ before the last "
                                  "Assistant turn)")
            try:
                messages = hh_messages(prompt)
            except ValueError as e:  # the hh template still uses the prompt verbatim; others need the turns
                return Example([], chosen, rejected, raw_prompt=prompt, notes={"turns_error": str(e)})
            return Example(messages, chosen, rejected, raw_prompt=prompt)
        except ValueError as e:
            raise _BadRow(str(e)) from None
    raise DataError(f"unknown data format {fmt!r}; known: {', '.join(FORMATS)}")


# ---------------------------------------------------------------------------------------------------------------------
# Tokenization


def _end_tokens(tokenizer) -> Dict[str, int]:
    """Spelling -> id of the tokens that end a response (EOS and the stop tokens)."""
    ids = [tokenizer.eos_id, *sorted(getattr(tokenizer, "stop_ids", ()) or ())]
    spell = getattr(tokenizer, "id_to_token", None)
    out = {}
    for i in ids:
        if i is None:
            continue
        text = spell(i) if spell else tokenizer.decode([i])
        if text:
            out.setdefault(text, i)
    return out


def tokenize_pair(tokenizer, prompt: str, completion: str,
                  prompt_ids: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(prompt_ids, response_ids): prompt_ids == tokenizer.encode(prompt) (BOS per the tokenizer's default);
    response_ids = the completion's tokens ending with one end token: the end-of-turn token the completion already
    ends with (chat templates), else the tokenizer's EOS. prompt_ids: the prompt's ids when already known."""
    if tokenizer.eos_id is None:
        raise DataError("the tokenizer has no EOS token, so responses cannot be terminated; use a checkpoint whose "
                        "tokenizer_config.json names an eos_token")
    body = completion.rstrip()
    end_id = tokenizer.eos_id
    for text, i in _end_tokens(tokenizer).items():
        if body.endswith(text):
            body, end_id = body[: -len(text)].rstrip(), i
            break
    p = tokenizer.encode(prompt).long() if prompt_ids is None else prompt_ids
    full = tokenizer.encode(prompt + body).long()
    if len(full) >= len(p) and torch.equal(full[: len(p)], p):
        r = full[len(p):]
    else:  # the tokenizer merged text across the boundary: the response on its own
        r = tokenizer.encode(body, bos=False).long()
    return p, torch.cat([r, torch.tensor([end_id], dtype=torch.long)])


def _fit(prompt: torch.Tensor, responses: Sequence[torch.Tensor], max_len: int,
         truncation: str) -> Optional[Tuple[List[torch.Tensor], int]]:
    """Apply the truncation policy: (responses, 1 if any was cut else 0), or None to drop the row. drop: rows whose
    prompt + longest response exceed max_len go; truncate: responses lose their tail (and with it the EOS), rows
    whose prompt leaves no room for a response token go."""
    if len(prompt) + max(len(r) for r in responses) <= max_len:
        return list(responses), 0
    if truncation == "drop" or len(prompt) >= max_len:
        return None
    room = max_len - len(prompt)
    return [r[:room] for r in responses], 1


def _need_turns(ex: Example) -> None:
    if not ex.messages:
        raise _BadRow(f"{ex.notes.get('turns_error', 'no prompt turns')} (the dialogue's turns cannot be recovered; "
                      f"only the 'hh' template, which keeps the prompt verbatim, can use this row)")


def render_prompt(template: PromptTemplate, ex: Example, tokenizer) -> str:
    """The prompt text of an example: HH prompts verbatim for `hh`, one-turn prompts via `render` (Alpaca input
    kept apart), multi-turn conversations via `render_messages`."""
    if ex.raw_prompt is not None and template.name == "hh":
        return ex.raw_prompt
    _need_turns(ex)
    if len(ex.messages) == 1:
        return template.render(ex.messages[0]["content"], ex.input, tokenizer=tokenizer)
    return template.render_messages(ex.messages, tokenizer=tokenizer)


def tokenize_example(ex: Example, kind: str, template: PromptTemplate, tokenizer) -> Tuple[torch.Tensor, ...]:
    """sft: (prompt_ids, response_ids); preference: (prompt_ids, chosen_ids, rejected_ids); correction: (prompt_ids,
    question_ids, answer_ids, correction_ids)."""
    if kind == "correction":
        if not isinstance(template, CorrectionTemplate):
            raise DataError(f"correction data needs the 'correction' template, not {template.name!r}")
        _need_turns(ex)
        prompt = template.render_correction(ex.question(), ex.rejected, tokenizer)
        p, a = tokenize_pair(tokenizer, prompt, template.completion(ex.rejected))
        _, c = tokenize_pair(tokenizer, prompt, template.completion(ex.chosen), p)
        return p, tokenizer.encode(ex.question(), bos=False).long(), a, c
    prompt = render_prompt(template, ex, tokenizer)
    msgs = ex.chat_messages()
    p, c = tokenize_pair(tokenizer, prompt, template.completion(ex.chosen, msgs, tokenizer))
    if kind == "sft":
        return p, c
    _, r = tokenize_pair(tokenizer, prompt, template.completion(ex.rejected, msgs, tokenizer), p)
    return p, c, r


# ---------------------------------------------------------------------------------------------------------------------
# Split, build, prepared directories


def split_indices(n: int, val_fraction: float = 0.05, seed: int = 42,
                  val_size: Optional[int] = None) -> Tuple[List[int], List[int]]:
    """A deterministic split of row indices 0..n-1: (train, val), each in ascending order. val_size (rows) wins over
    val_fraction; a positive fraction of n >= 2 rows gives at least one val row."""
    if val_size is None:
        if not 0.0 <= val_fraction < 1.0:
            raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
        val_size = round(n * val_fraction)
        if val_fraction > 0 and n >= 2:
            val_size = max(1, val_size)
    if not 0 <= val_size < max(n, 1):
        raise DataError(f"val_size {val_size} leaves no training rows out of {n}")
    perm = list(range(n))
    random.Random(seed).shuffle(perm)
    return sorted(perm[val_size:]), sorted(perm[:val_size])


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of how the tokenizer encodes a probe text (+ its special ids): prepared data only fits the same."""
    probe = "Hello, world! 12345 \u00fcn\u00efc\u00f6d\u00e9 \n\tThe quick brown fox.\n\n### Response: ASSISTANT:"
    ids = tokenizer.encode(probe).tolist()
    key = json.dumps([ids, tokenizer.bos_id, tokenizer.eos_id, getattr(tokenizer, "vocab_size", None)])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _check_options(kind: str, max_seq_length: int, truncation: str, preference: str) -> None:
    if kind not in KINDS:
        raise DataError(f"unknown data kind {kind!r}; one of {', '.join(KINDS)}")
    if truncation not in TRUNCATION:
        raise DataError(f"truncation must be one of {', '.join(TRUNCATION)}, got {truncation!r}")
    if preference not in PREFERENCES:
        raise DataError(f"preference must be one of {', '.join(PREFERENCES)}, got {preference!r}")
    if max_seq_length < 2:
        raise DataError(f"max_seq_length must be at least 2, got {max_seq_length}")


def _default_records(kind: str) -> List[Tuple[str, Any]]:
    from lit_aligner import default_data

    if kind == "sft":
        rows = default_data.generate_rows()
    else:  # preferred = the FORMAT, dispreferred / upstream answer = the same answer in plain words
        rows = default_data.generate_preference_rows()
    return [(f"row {i}", r) for i, r in enumerate(rows)]


def build_datasets(
    kind: str,
    data: DataSource,
    tokenizer,
    template: str,
    max_seq_length: int,
    val_fraction: float = 0.05,
    seed: int = 42,
    skip_bad_rows: bool = False,
    field_map: Optional[Union[str, Dict[str, str]]] = None,
    preference: Optional[str] = None,
    truncation: str = "drop",
    format: str = "auto",
    val_size: Optional[int] = None,
    source: Optional[str] = None,
) -> Tuple[AnyDataset, AnyDataset, Dict[str, Any]]:
    """Read a raw file (or the default dataset when data is None, or in-memory rows), render with `template`,
    tokenize, split and fit to max_seq_length. Returns (train, val, info); see `load_sft_data` for info. source: a
    label for info["source"] (default: the file name). preference None: "better" for sft, "safer" otherwise (the
    defaults of the load_* functions)."""
    preference = preference or ("better" if kind == "sft" else "safer")
    _check_options(kind, max_seq_length, truncation, preference)
    tmpl = get_template(template) if isinstance(template, str) else template
    if kind == "correction" and not isinstance(tmpl, CorrectionTemplate):
        raise DataError(f"correction data is rendered with the 'correction' template, not {tmpl.name!r}")
    if kind != "correction" and isinstance(tmpl, CorrectionTemplate):
        raise DataError("the 'correction' template renders Q-A-C prompts: load such data with "
                        "load_correction_data / scripts/prepare_correction.py")
    fmap = parse_field_map(field_map)
    if data is None:
        path, records, container = Path("<default dataset>"), _default_records(kind), "generated"
    elif isinstance(data, (list, tuple)):
        path, records, container = Path("<rows>"), [(f"row {i}", r) for i, r in enumerate(data)], "rows"
    else:
        path = Path(data)
        records, container = read_records(path)
    if not records:
        raise DataError(f"{path}: no rows in the file.")
    if format != "auto" and format not in FORMATS:
        raise DataError(f"unknown format {format!r}; one of auto, {', '.join(FORMATS)}")

    source = source or ("default" if data is None else "<rows>" if isinstance(data, (list, tuple)) else str(data))
    info: Dict[str, Any] = {"kind": kind, "source": source,
                            "template": tmpl.name, "format": None, "container": container,
                            "rows_read": len(records), "bad_rows": 0, "kept": 0, "truncated": 0, "dropped": 0,
                            "max_seq_length": max_seq_length, "truncation": truncation, "seed": seed,
                            "val_fraction": val_fraction, "val_size": val_size, "bad_row_examples": []}
    train_idx, val_idx = split_indices(len(records), val_fraction, seed, val_size)
    in_val = set(val_idx)
    out: Dict[str, list] = {"train": [], "val": []}
    fmt = None if format == "auto" else format
    counts = {"identical_pairs": 0, "chosen_unsafe": 0}
    for i, (where, row) in enumerate(records):
        try:
            if isinstance(row, _BadRow):
                raise row
            if isinstance(row, dict):
                row = _apply_field_map(row, fmap)
            if fmt is None and isinstance(row, dict):
                fmt = detect_format(row, path)
            ex = row_to_example(row, fmt or "alpaca", kind, preference)
            if kind != "sft" and ex.chosen.strip() == ex.rejected.strip():
                if kind == "preference":  # no preference signal; (a correction may legitimately be a copy)
                    counts["identical_pairs"] += 1
                    continue
            counts["chosen_unsafe"] += bool(ex.notes.get("chosen_unsafe"))
            try:
                ids = tokenize_example(ex, kind, tmpl, tokenizer)
            except ValueError as e:  # a template that cannot render this row (e.g. a chat template's own checks)
                if isinstance(e, DataError):
                    raise
                raise _BadRow(f"cannot render the prompt: {e}") from None
        except _BadRow as e:
            if not skip_bad_rows:
                raise DataError(f"{path}: {where}: {e}; {_SKIP_HINT}.") from None
            info["bad_rows"] += 1
            if len(info["bad_row_examples"]) < 5:
                info["bad_row_examples"].append(f"{where}: {e}")
            continue
        responses = list(ids[1:]) if kind != "correction" else list(ids[2:])
        fitted = _fit(ids[0], responses, max_seq_length, truncation)
        if fitted is None:
            info["dropped"] += 1
            continue
        info["truncated"] += fitted[1]
        head = [ids[0]] if kind != "correction" else [ids[0], ids[1]]
        out["val" if i in in_val else "train"].append((*head, *fitted[0]))
    info["format"] = fmt
    if fmt == "pku":
        info.update(preference=preference, chosen_unsafe=counts["chosen_unsafe"])
    if kind == "preference":
        info["identical_pairs"] = counts["identical_pairs"]
    train, val = (_from_rows(kind, out[s]) for s in SPLITS)
    info.update(kept=len(train) + len(val), train=len(train), val=len(val))
    if not len(train):
        raise DataError(f"{path}: no training rows left ({describe(info)}); raise max_seq_length, use "
                        f"truncation='truncate' or check the data.")
    return train, val, info


def _from_rows(kind: str, rows: list) -> AnyDataset:
    if kind == "sft":
        return SFTDataset.from_pairs(rows)
    if kind == "preference":
        return PreferenceDataset.from_triples(rows)
    return CorrectionDataset.from_rows(rows)


def save_prepared(out_dir: Union[str, Path], train: AnyDataset, val: AnyDataset, info: Dict[str, Any],
                  tokenizer=None) -> Path:
    """Write train.safetensors, val.safetensors (flat int32 tokens + int64 offsets [+ prompt lengths]) and
    meta.json (kind, template, tokenizer, max_seq_length, counts, split seed) into out_dir."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, ds in zip(SPLITS, (train, val)):
        save_file({k: v.contiguous() for k, v in ds.tensors().items()}, str(out_dir / f"{name}.safetensors"))
    meta = {"version": DATA_VERSION, **storable_info(info)}
    if tokenizer is not None:
        meta["tokenizer"] = {"checkpoint_dir": str(getattr(tokenizer, "checkpoint_dir", "")),
                             "fingerprint": tokenizer_fingerprint(tokenizer),
                             "vocab_size": getattr(tokenizer, "vocab_size", None),
                             "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id}
    (out_dir / META_NAME).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return out_dir


def load_prepared(data_dir: Union[str, Path], kind: Optional[str] = None,
                  tokenizer=None) -> Tuple[AnyDataset, AnyDataset, Dict[str, Any]]:
    """Read a directory written by `save_prepared`. Checks the kind and (given a tokenizer) that the data was
    tokenized by the same tokenizer. Returns (train, val, meta)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    data_dir = Path(data_dir)
    meta_path = data_dir / META_NAME
    if not meta_path.is_file():
        raise DataError(f"{data_dir}: not a prepared data directory (no {META_NAME}); make one with "
                        f"scripts/prepare_*.py or pass a .json/.jsonl file.")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        stored_kind = meta["kind"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{meta_path}: unreadable ({e!r}); prepare the data again.") from None
    if kind is not None and stored_kind != kind:
        raise DataError(f"{data_dir} holds {stored_kind} data, but {kind} data is needed; prepare it with the "
                        f"matching script (see howto/data.md).")
    if tokenizer is not None and "tokenizer" in meta and \
            meta["tokenizer"].get("fingerprint") != tokenizer_fingerprint(tokenizer):
        raise DataError(f"{data_dir} was tokenized with another tokenizer ({meta['tokenizer'].get('checkpoint_dir')}) "
                        f"than this model's ({getattr(tokenizer, 'checkpoint_dir', '?')}); prepare the data again "
                        f"with --checkpoint-dir pointing at this model.")
    cls = _DATASET_OF_KIND[stored_kind]
    splits = []
    for name in SPLITS:
        f = data_dir / f"{name}.safetensors"
        try:
            splits.append(cls.from_tensors(load_file(str(f))))
        except (SafetensorError, OSError, KeyError, ValueError) as e:
            raise DataError(f"{f}: missing or unreadable ({e}); prepare the data again.") from None
    return splits[0], splits[1], meta


def _load(kind: str, data, tokenizer, template: str, max_seq_length: int, val_fraction: float, seed: int,
          skip_bad_rows: bool, field_map, preference: str, truncation: str, format: str,
          val_size: Optional[int]) -> Tuple[AnyDataset, AnyDataset, Dict[str, Any]]:
    if isinstance(data, (str, Path)) and Path(data).is_dir():
        _check_options(kind, max_seq_length, truncation, preference)
        train, val, meta = load_prepared(data, kind, tokenizer)
        info = {k: v for k, v in meta.items() if k not in ("version",)}
        info.update(source=str(data), prepared=True, prepared_max_seq_length=meta.get("max_seq_length"),
                    max_seq_length=max_seq_length, truncation=truncation)
        if template is not None and meta.get("template") not in (None, template):
            info["note"] = (f"{data} was prepared with the {meta.get('template')!r} template; it is used as is "
                            f"(not {template!r})")
        extra_truncated = extra_dropped = 0
        if max_seq_length < (meta.get("max_seq_length") or 0):
            train, t1, d1 = train.fit(max_seq_length, truncation)
            val, t2, d2 = val.fit(max_seq_length, truncation)
            extra_truncated, extra_dropped = t1 + t2, d1 + d2
        info["truncated"] = info.get("truncated", 0) + extra_truncated
        info["dropped"] = info.get("dropped", 0) + extra_dropped
        info.update(kept=len(train) + len(val), train=len(train), val=len(val))
        if not len(train):
            raise DataError(f"{data}: no training rows fit max_seq_length={max_seq_length}.")
        return train, val, info
    return build_datasets(kind, data, tokenizer, template, max_seq_length, val_fraction, seed, skip_bad_rows,
                          field_map, preference, truncation, format, val_size)


def load_sft_data(
    data: DataSource,
    tokenizer,
    template: str,
    max_seq_length: int,
    val_fraction: float = 0.05,
    seed: int = 42,
    skip_bad_rows: bool = False,
    field_map: Optional[Union[str, Dict[str, str]]] = None,
    preference: str = "better",
    truncation: str = "drop",
    format: str = "auto",
    val_size: Optional[int] = None,
) -> Tuple[SFTDataset, SFTDataset, Dict[str, Any]]:
    """SFT data: (train, val, info).

    data: None → the offline default dataset; a prepared directory → loaded as is (its template wins, rows longer
    than max_seq_length handled by `truncation`); a .json/.jsonl file → prepared now with `template`: Alpaca
    (instruction/input/output), PKU-SafeRLHF (the `preference` response: safer|better), HH-RLHF (the `chosen`
    dialogue's last answer), prompt/chosen/rejected pairs (chosen), Q-A-C (the correction), or any of those with
    field_map {ours: theirs} (or "instruction=question,output=answer").
    info: kind, source, format, template (the one actually used: save it with the Aligner), rows_read, bad_rows
    (skipped), kept, truncated, dropped (too long), train, val, max_seq_length, truncation, seed,
    bad_row_examples. Raises DataError (file, row, fix) on bad input."""
    return _load("sft", data, tokenizer, template, max_seq_length, val_fraction, seed, skip_bad_rows, field_map,
                 preference, truncation, format, val_size)


def load_preference_data(
    data: DataSource,
    tokenizer,
    template: str,
    max_seq_length: int,
    val_fraction: float = 0.05,
    seed: int = 42,
    skip_bad_rows: bool = False,
    preference: str = "safer",
    format: str = "auto",
    field_map: Optional[Union[str, Dict[str, str]]] = None,
    truncation: str = "drop",
    val_size: Optional[int] = None,
) -> Tuple[PreferenceDataset, PreferenceDataset, Dict[str, Any]]:
    """Preference pairs: (train, val, info). data: None → the default dataset's pairs (chosen = the FORMAT,
    rejected = a plain answer), a prepared directory, or a PKU-SafeRLHF (chosen = the `preference` response),
    HH-RLHF (split at the last Assistant turn; the two prompts must match), prompt/chosen/rejected or Q-A-C
    (chosen = correction, rejected = answer) file. Pairs with identical answers are left out (info
    "identical_pairs"). See `load_sft_data` for the other arguments and info."""
    return _load("preference", data, tokenizer, template, max_seq_length, val_fraction, seed, skip_bad_rows,
                 field_map, preference, truncation, format, val_size)


def load_correction_data(
    data: DataSource,
    tokenizer,
    template: str = "correction",
    max_seq_length: int = 1024,
    val_fraction: float = 0.05,
    seed: int = 42,
    skip_bad_rows: bool = False,
    preference: str = "safer",
    format: str = "auto",
    field_map: Optional[Union[str, Dict[str, str]]] = None,
    truncation: str = "drop",
    val_size: Optional[int] = None,
) -> Tuple[CorrectionDataset, CorrectionDataset, Dict[str, Any]]:
    """Q-A-C data: (train, val, info) of CorrectionDatasets. data: a Q-A-C JSON(L) {question, answer, correction},
    or any preference file (A = rejected, C = chosen; PKU by `preference`), a prepared directory, or None (the
    default dataset: A = a plain answer, C = the FORMAT). The prompt is `template` ('correction') rendering the
    question (multi-turn dialogues as a transcript) and A; `max_seq_length` bounds prompt + the longer of A and C."""
    return _load("correction", data, tokenizer, template, max_seq_length, val_fraction, seed, skip_bad_rows,
                 field_map, preference, truncation, format, val_size)


LOADERS = {"sft": load_sft_data, "preference": load_preference_data, "correction": load_correction_data}


def prepare(kind: str, data: DataSource, out_dir: Union[str, Path], tokenizer, template: str,
            max_seq_length: int, **kwargs: Any) -> Dict[str, Any]:
    """Build `kind` data from a raw file (or the default dataset) and write it to out_dir; returns info."""
    if isinstance(data, (str, Path)) and Path(data).is_dir():
        raise DataError(f"{data} is a directory; the prepare scripts read a .json/.jsonl file.")
    train, val, info = build_datasets(kind, data, tokenizer, template, max_seq_length, **kwargs)
    save_prepared(out_dir, train, val, info, tokenizer)
    return info


def storable_info(info: Dict[str, Any]) -> Dict[str, Any]:
    """A loader's counts without the bad-row examples (row texts): what goes into saved metadata."""
    return {k: v for k, v in info.items() if k != "bad_row_examples"}


def describe(info: Dict[str, Any]) -> str:
    """One line of the counts in an info dict, for the scripts and logs."""
    keys = ["rows_read", "bad_rows", "identical_pairs", "dropped", "truncated", "kept", "train", "val",
            "chosen_unsafe"]
    counts = ", ".join(f"{k}={info[k]}" for k in keys if k in info)
    head = f"{info.get('kind')} data from {info.get('source')} (format {info.get('format')}, template " \
           f"{info.get('template')}, max_seq_length {info.get('max_seq_length')}, truncation {info.get('truncation')})"
    return f"{head}: {counts}"


ALPACA_URL = "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json"


def download(url: str, dest: Union[str, Path], timeout: float = 60.0) -> Path:
    """Download url to dest (kept: an existing dest is reused). DataError naming the url when offline."""
    import urllib.error
    import urllib.request

    dest = Path(dest)
    if dest.is_file() and dest.stat().st_size > 0:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
    except (urllib.error.URLError, OSError) as e:
        tmp.unlink(missing_ok=True)
        raise DataError(f"cannot download {url} ({getattr(e, 'reason', e)}); without network, download it "
                        f"elsewhere and pass the file with --data-file (e.g. ../shared/data/alpaca/alpaca_4500.json)."
                        ) from None
    tmp.replace(dest)
    return dest


def prepare_with_checkpoint(kind: str, data: DataSource, out_dir: Union[str, Path], checkpoint_dir: Union[str, Path],
                            template: str, max_seq_length: int, **kwargs: Any) -> Dict[str, Any]:
    """`prepare` with the tokenizer of a converted checkpoint directory (what the prepare scripts run)."""
    from lit_aligner.tokenizer import Tokenizer

    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise DataError(f"{checkpoint_dir}: no such checkpoint directory (its tokenizer is needed). Convert a model "
                        f"first (e.g. `python scripts/convert_gguf.py --default`) or pass --checkpoint-dir.")
    tokenizer = Tokenizer(checkpoint_dir)
    info = prepare(kind, data, out_dir, tokenizer, template, max_seq_length, **kwargs)
    info["out_dir"] = str(out_dir)
    return info


def report(info: Dict[str, Any]) -> str:
    """What the prepare scripts print: the counts, examples of skipped rows, and where the data went."""
    lines = [describe(info)]
    for example in info.get("bad_row_examples", []):
        lines.append(f"  skipped {example}")
    if info.get("bad_rows", 0) > len(info.get("bad_row_examples", [])):
        lines.append(f"  ... {info['bad_rows'] - len(info['bad_row_examples'])} more skipped rows")
    if "out_dir" in info:
        lines.append(f"wrote {info['out_dir']}/{{train,val}}.safetensors and {META_NAME}")
    return "\n".join(lines)
