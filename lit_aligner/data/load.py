"""From a data source to tokenized train / validation splits: `load_data` (what every trainer and evaluator calls) and
`prepare` (what the prepare scripts call), with the bad-row policy, the truncation policy and the seeded split.

Sources: None → the offline default dataset (`lit_aligner.data.default`); a directory written by `save_prepared` →
loaded as is; a .json list or .jsonl (.gz) file → prepared on the fly; a list of row dicts → the same, from memory.

Bad rows (a missing or empty field, a line that is not JSON, HH pairs whose prompts differ): public datasets hold a
few, so by default they are skipped and counted (info "bad_rows", the first reasons in "bad_row_examples"), and the
load stops only when more than `max_bad_rows` (a share, default 5%) are bad, which means a wrong format or field map.
`strict_data` stops at the first bad row.
"""

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Union

from lit_aligner.data.dataset import (KIND_FIELDS, KINDS, ONE_ANSWER_KINDS, TRUNCATION, TokenizedDataset, context_spans,
                                      fit_item)
from lit_aligner.data.formats import (FORMATS, PREFERENCES, BadRow, DataError, apply_field_map, detect_format,
                                      every_answer, parse_field_map, row_to_example, unpair)
from lit_aligner.data.prepared import is_prepared, load_prepared, storable_info
from lit_aligner.data.tokenize import pack_answers, tokenize_example
from lit_aligner.files import BadRecord, UserError, read_records
from lit_aligner.prompts import CorrectionTemplate, get_template

DataSource = Union[str, Path, None, Sequence[Dict[str, Any]], Sequence[Path]]
Splits = Tuple[TokenizedDataset, TokenizedDataset, Dict[str, Any]]
FormatName = Literal["auto", "alpaca", "pku", "hh", "pairs", "prompt", "qac", "messages", "unpaired", "prompt_only"]


@dataclass
class DataOptions:
    """How rows become tokenized examples: the data flags that training, evaluation and the prepare scripts share."""

    format: FormatName = "auto"
    """the rows' format (alpaca, pku, hh, pairs = prompt/chosen/rejected, prompt = prompt/response, qac, messages =
    chat turns: messages / conversations, or chosen/rejected message lists, unpaired = prompt/completion/label for
    KTO, prompt_only = a prompt and no answer, for on-policy distillation and GRPO); auto detects it from the first
    row."""
    field_map: Optional[str] = None
    """rename fields first: comma-separated ours=theirs pairs, e.g. instruction=question,output=answer."""
    preference: Optional[Literal["safer", "better"]] = None
    """PKU-SafeRLHF rows: which response is the target / chosen one (default: better for SFT, safer for pairs and
    corrections)."""
    max_seq_length: int = 512
    """longest prompt + response in tokens (the longer response of a pair); longer rows follow --truncation."""
    truncation: Literal["drop", "truncate"] = "drop"
    """drop: leave out rows longer than --max-seq-length (counted); truncate: cut their responses' tails."""
    turns: Literal["last", "all"] = "last"
    """SFT on multi-turn conversations (chat messages, HH dialogues): last = the loss on the final answer only; all =
    on every assistant turn, the whole conversation as one sequence with the loss on its answers alone (TRL's
    assistant_only_loss)."""
    val_fraction: float = 0.05
    """share of the rows held out for validation (seeded split)."""
    val_size: Optional[int] = None
    """number of validation rows, instead of --val-fraction."""
    strict_data: bool = False
    """stop at the first malformed row instead of skipping and counting it."""
    max_bad_rows: float = 0.05
    """stop when more than this share of the rows is malformed (a wrong format or field map, not a few bad rows)."""

    def check(self) -> None:
        if self.turns not in ("last", "all"):
            raise DataError(f"--turns must be last or all, got {self.turns!r}")
        if self.truncation not in TRUNCATION:
            raise DataError(f"--truncation must be one of {', '.join(TRUNCATION)}, got {self.truncation!r}")
        if self.preference is not None and self.preference not in PREFERENCES:
            raise DataError(f"--preference must be one of {', '.join(PREFERENCES)}, got {self.preference!r}")
        if self.max_seq_length < 2:
            raise DataError(f"--max-seq-length must be at least 2, got {self.max_seq_length}")
        if not 0.0 <= self.max_bad_rows <= 1.0:
            raise DataError(f"--max-bad-rows is a share of the rows in [0, 1], got {self.max_bad_rows}")
        if self.format != "auto" and self.format not in FORMATS:
            raise DataError(f"unknown --format {self.format!r}; one of auto, {', '.join(FORMATS)}")


def split_indices(n: int, val_fraction: float = 0.05, seed: int = 42,
                  val_size: Optional[int] = None) -> Tuple[List[int], List[int]]:
    """A deterministic split of row indices 0..n-1: (train, val), each in ascending order. val_size (rows) wins over
    val_fraction; a positive fraction of n >= 2 rows gives at least one val row."""
    if val_size is None:
        if not 0.0 <= val_fraction < 1.0:
            raise DataError(f"--val-fraction must be in [0, 1), got {val_fraction}")
        val_size = round(n * val_fraction)
        if val_fraction > 0 and n >= 2:
            val_size = max(1, val_size)
    if not 0 <= val_size < max(n, 1):
        raise DataError(f"--val-size {val_size} leaves no training rows out of {n}")
    perm = list(range(n))
    random.Random(seed).shuffle(perm)
    return sorted(perm[val_size:]), sorted(perm[:val_size])


def _records(kind: str, data: DataSource) -> Tuple[Path, List[Tuple[str, Any]], str]:
    if data is None:
        from lit_aligner.data import default

        rows = default.generate_rows() if kind in ONE_ANSWER_KINDS else default.generate_preference_rows()
        return Path("<default dataset>"), [(f"row {i}", r) for i, r in enumerate(rows)], "generated"
    if isinstance(data, (list, tuple)) and data and all(isinstance(d, Path) for d in data):  # several files, one set
        records = []
        for path in data:
            recs, container = read_records(path, "data file (a JSON list or JSONL of rows)", DataError)
            records += [(f"{path.name} {where}", value) for where, value in recs]
        return Path(data[0]).parent, records, container
    if isinstance(data, (list, tuple)):
        return Path("<rows>"), [(f"row {i}", r) for i, r in enumerate(data)], "rows"
    path = Path(data)
    records, container = read_records(path, "data file (a JSON list or JSONL of rows)", DataError)
    return path, records, container


def _check_template(kind: str, template) -> None:
    is_correction = isinstance(template, CorrectionTemplate)
    if kind == "correction" and not is_correction:
        raise DataError(f"correction data is rendered with the 'correction' template, not {template.name!r}")
    if kind != "correction" and is_correction:
        raise DataError("the 'correction' template renders Q-A-C prompts: load such data as correction data "
                        "(finetune/aligner.py --mode correction, scripts/prepare_correction.py)")


def build_datasets(kind: str, data: DataSource, tokenizer, template: str, options: DataOptions = DataOptions(),
                   seed: int = 42, source: Optional[str] = None, teacher_system: Optional[str] = None,
                   prompt_only: bool = False) -> Splits:
    """Read raw rows (a file, the default dataset for data=None, or rows in memory), render them with `template`,
    tokenize, split with `seed` and fit to options.max_seq_length. Returns (train, val, info); see `load_data`."""
    if kind not in KINDS:
        raise DataError(f"unknown data kind {kind!r}; one of {', '.join(KINDS)}")
    options.check()
    preference = options.preference or ("better" if kind in ONE_ANSWER_KINDS else "safer")
    tmpl = get_template(template) if isinstance(template, str) else template
    _check_template(kind, tmpl)
    fmap = parse_field_map(options.field_map)
    path, records, container = _records(kind, data)
    if not records:
        raise DataError(f"{path}: no rows in the file.")
    if source is None:
        many = isinstance(data, (list, tuple))
        source = "default" if data is None else str(path) if many and data and isinstance(data[0], Path) else \
            "<rows>" if many else str(data)
    info: Dict[str, Any] = {"kind": kind, "source": source, "template": tmpl.name, "format": None,
                            "container": container, "rows_read": len(records), "bad_rows": 0, "kept": 0,
                            "truncated": 0, "dropped": 0, "max_seq_length": options.max_seq_length,
                            "truncation": options.truncation, "seed": seed, "val_fraction": options.val_fraction,
                            "val_size": options.val_size, "bad_row_examples": []}
    _, val_idx = split_indices(len(records), options.val_fraction, seed, options.val_size)
    in_val = set(val_idx)
    out: Dict[str, list] = {"train": [], "val": []}
    fmt = None if options.format == "auto" else options.format
    counts = {"identical_pairs": 0, "chosen_unsafe": 0, "unpacked": 0, "answers_dropped": 0}
    every_turn = kind == "sft" and options.turns == "all"
    for i, (where, row) in enumerate(records):
        try:
            if isinstance(row, BadRecord):
                raise BadRow(str(row))
            if isinstance(row, dict):
                row = apply_field_map(row, fmap)
                fmt = fmt or detect_format(row, path)
                if fmt == "prompt_only" and not prompt_only:
                    raise _no_answers(path, kind)
            ex = row_to_example(row, fmt or "alpaca", kind, preference)
            if ex.label is not None and kind != "unpaired":
                raise BadRow("an unpaired row (prompt, completion, label) is KTO data (finetune/aligner_kto.py)")
            if kind == "unpaired" and ex.label is None and ex.rejected is None:
                raise BadRow("KTO needs labelled completions or preference pairs")
            if kind in ("preference", "unpaired") and ex.rejected is not None and \
                    ex.chosen.strip() == ex.rejected.strip():
                counts["identical_pairs"] += 1  # no preference signal (a correction may legitimately be a copy)
                continue
            counts["chosen_unsafe"] += bool(ex.notes.get("chosen_unsafe"))
            examples = every_answer(ex) if every_turn else unpair(ex) if kind == "unpaired" and ex.rejected else [ex]
            try:
                rows = [tokenize_example(x, kind, tmpl, tokenizer, teacher_system) for x in examples]
            except UserError:  # the tokenizer or its chat template is broken: no row can be rendered
                raise
            except ValueError as e:  # a template that refuses this row (e.g. a chat template's own checks)
                raise BadRow(f"cannot render the prompt: {e}") from None
            if len(rows) > 1:  # every answer of a conversation in one sequence, else one row per answer
                packed = pack_answers(rows)
                counts["unpacked"] += packed is None
                rows = [packed] if packed is not None else rows
        except BadRow as e:
            if options.strict_data:
                raise DataError(f"{path}: {where}: {e}; fix the row, or drop --strict-data to skip and count such "
                                f"rows.") from None
            info["bad_rows"] += 1
            if len(info["bad_row_examples"]) < 5:
                info["bad_row_examples"].append(f"{where}: {e}")
            continue
        for ids in rows:
            item = dict(zip(KIND_FIELDS[kind], ids))
            fitted = fit_item(kind, item, options.max_seq_length, options.truncation)
            if every_turn:  # answers of a conversation left out past the limit (the row may stay)
                answers = len(context_spans(item["context"])) + 1
                counts["answers_dropped"] += answers - (len(context_spans(fitted[0]["context"])) + 1 if fitted else 0)
            if fitted is None:
                info["dropped"] += 1
                continue
            info["truncated"] += fitted[1]
            out["val" if i in in_val else "train"].append(tuple(fitted[0][name] for name in KIND_FIELDS[kind]))
    info["format"] = fmt
    variables = getattr(tokenizer, "template_variables", None)
    if tmpl.name == "chat" and variables:  # saved with the Aligner: its prompts are rendered with them everywhere
        info["template_variables"] = variables
    if every_turn:
        info.update(turns="all", unpacked=counts["unpacked"], answers_dropped=counts["answers_dropped"])
    if fmt == "pku":
        info.update(preference=preference, chosen_unsafe=counts["chosen_unsafe"])
    if kind in ("preference", "unpaired"):
        info["identical_pairs"] = counts["identical_pairs"]
    _check_bad_share(path, info, options)
    train, val = (TokenizedDataset.from_rows(kind, out[s]) for s in ("train", "val"))
    info.update(kept=len(train) + len(val), train=len(train), val=len(val))
    if kind == "unpaired":
        info["desirable"] = sum(int(d.fields["label"].tokens.sum()) for d in (train, val))
    if every_turn:
        info["answers"] = train.answers() + val.answers()
    if not len(train):
        raise DataError(f"{path}: no training rows left ({describe(info)}); raise --max-seq-length, use "
                        f"--truncation truncate or check the data.")
    return train, val, info


def _no_answers(path: Path, kind: str) -> DataError:
    what = {"distill": "off-policy distillation trains on the data's responses"}.get(
        kind, f"{kind} data needs the answers it learns from")
    return DataError(f"{path}: the rows hold a prompt and no answer (prompt-only rows); {what}. Only on-policy "
                     f"runs train on such rows: finetune/aligner_distill.py --lmbda 1 (the student writes every "
                     f"response; held-out prompts get the teacher's greedy answers, as in evaluate/aligner.py "
                     f"distill) and finetune/aligner_grpo.py (reward functions score the student's answers). "
                     f"Otherwise give rows with answers.")


def _check_bad_share(path: Path, info: Dict[str, Any], options: DataOptions) -> None:
    bad, total = info["bad_rows"], info["rows_read"]
    if bad and bad > options.max_bad_rows * total:
        first = "; ".join(info["bad_row_examples"][:3])
        raise DataError(f"{path}: {bad} of {total} rows ({bad / total:.0%}) are malformed, more than --max-bad-rows "
                        f"{options.max_bad_rows:.0%} (first: {first}). That is a wrong --format or --field-map rather "
                        f"than a few bad rows; fix those, or raise --max-bad-rows.")


def load_data(kind: str, data: DataSource, tokenizer, template: str, options: DataOptions = DataOptions(),
              seed: int = 42, source: Optional[str] = None, teacher_system: Optional[str] = None,
              prompt_only: bool = False) -> Splits:
    """Tokenized (train, val, info) of `kind` ("sft", "preference" or "correction") data.

    data: None → the offline default dataset; a prepared directory → loaded as is (its template and split win, with a
    note where the flags differ, and with no split asked for its held-out rows join the others; rows longer than
    options.max_seq_length follow options.truncation); a .json/.jsonl file or a list of rows → prepared now with
    `template`: Alpaca, PKU-SafeRLHF (the `preference` response), HH-RLHF (the dialogue's last answer), prompt/response,
    prompt/chosen/rejected, Q-A-C, or any of those after a field map (see `lit_aligner.data.formats`). Correction data
    reads Q-A-C rows or any pair file (A = rejected, C = chosen) and needs the `correction` template.
    info: kind, source, format, template (the one actually used: save it with the Aligner), rows_read, bad_rows
    (skipped), kept, truncated, dropped (too long), train, val, max_seq_length, truncation, seed, bad_row_examples.
    Distill data (context distillation) renders each prompt twice, the second time with `teacher_system` as its
    system message, so it reads raw rows only. `prompt_only`: distill data may be prompt-only rows (info format
    "prompt_only"), each with the end token alone as its response, for an on-policy run to write (else a DataError).
    Raises DataError (file, row, fix) on bad input."""
    if not is_prepared(data):
        return build_datasets(kind, data, tokenizer, template, options, seed, source, teacher_system, prompt_only)
    if kind == "distill":
        raise DataError(f"{data} is a prepared directory, whose prompts are already rendered without the teacher's "
                        f"system message; give distillation the raw .json/.jsonl rows it was prepared from.")
    options.check()
    train, val, meta = load_prepared(data, kind, tokenizer)
    info = {k: v for k, v in meta.items() if k != "version"}
    info.update(source=str(data), prepared=True, prepared_max_seq_length=meta.get("max_seq_length"),
                max_seq_length=options.max_seq_length, truncation=options.truncation)
    notes = []  # prepared data is used as it was prepared: say where that differs from the flags
    if template is not None and meta.get("template") not in (None, template):
        notes.append(f"{data} was prepared with the {meta.get('template')!r} template; it is used as is")
    prepared_with = meta.get("template_variables", {})
    if meta.get("template") == "chat" and prepared_with != (getattr(tokenizer, "template_variables", None) or {}):
        notes.append(f"{data} was prepared with the chat-template variables {prepared_with}; it is used as is")
    if kind == "sft" and options.turns != meta.get("turns", "last"):
        notes.append(f"{data} was prepared with --turns {meta.get('turns', 'last')}; it is used as is")
    if options.val_fraction == 0 and options.val_size is None:
        # no split asked for (a held-out --val-data, or every row): the rows it held out join the others
        train, val = TokenizedDataset.from_rows(kind, train.rows() + val.rows()), val.select([])
        info.update(val_fraction=0.0, val_size=None)  # the rows as loaded: not split
    elif (options.val_fraction, options.val_size, seed) != (meta.get("val_fraction"), meta.get("val_size"),
                                                            meta.get("seed")):
        notes.append(f"{data} was split when it was prepared (--val-fraction {meta.get('val_fraction')}, --val-size "
                     f"{meta.get('val_size')}, --seed {meta.get('seed')}: {len(val)} validation rows); that split is "
                     f"used as is")
    if notes:
        info["note"] = "; ".join(notes)
    if options.max_seq_length < (meta.get("max_seq_length") or 0):
        for split in ("train", "val"):
            fitted, truncated, dropped = (train if split == "train" else val).fit(options.max_seq_length,
                                                                                  options.truncation)
            train, val = (fitted, val) if split == "train" else (train, fitted)
            info["truncated"] = info.get("truncated", 0) + truncated
            info["dropped"] = info.get("dropped", 0) + dropped
    info.update(kept=len(train) + len(val), train=len(train), val=len(val))
    if "answers" in info:  # --turns all: answers left out by a smaller limit count as dropped answers
        info["answers_dropped"] = info.get("answers_dropped", 0) + info["answers"] - train.answers() - val.answers()
        info["answers"] = train.answers() + val.answers()
    if not len(train):
        raise DataError(f"{data}: no training rows fit --max-seq-length {options.max_seq_length}.")
    return train, val, info


def check_template_variables_fit(template: str, variables: Dict[str, Any]) -> None:
    """A training run's or a prepare script's --chat-template-kwargs are variables of the tokenizer's chat template:
    a named template takes none, so the flag beside one is a mistake."""
    if variables and template != "chat":
        raise DataError(f"--chat-template-kwargs sets variables of the tokenizer's chat template; the {template!r} "
                        f"template takes none: drop the flag, or use --template chat")


def describe(info: Dict[str, Any]) -> str:
    """One line of the counts in an info dict, for the scripts and logs."""
    keys = ["rows_read", "bad_rows", "identical_pairs", "dropped", "truncated", "kept", "train", "val", "desirable",
            "answers", "answers_dropped", "chosen_unsafe"]
    counts = ", ".join(f"{k}={info[k]}" for k in keys if k in info)
    turns = f", turns {info['turns']}" if "turns" in info else ""
    variables = f" with {json.dumps(info['template_variables'])}" if info.get("template_variables") else ""
    head = f"{info.get('kind')} data from {info.get('source')} (format {info.get('format')}{turns}, template " \
           f"{info.get('template')}{variables}, max_seq_length {info.get('max_seq_length')}, truncation " \
           f"{info.get('truncation')})"
    return f"{head}: {counts}"


def report(info: Dict[str, Any]) -> str:
    """The counts, the first skipped rows with their reasons, and where prepared data went (scripts and trainers
    print this)."""
    lines = [describe(info)]
    examples = info.get("bad_row_examples")  # none in prepared data's counts: its bad_rows were shown when prepared
    for example in examples or []:
        lines.append(f"  skipped {example}")
    if examples is not None and info.get("bad_rows", 0) > len(examples):
        lines.append(f"  ... {info['bad_rows'] - len(examples)} more skipped rows")
    if info.get("val_size") and info.get("val", 0) < info["val_size"]:
        lines.append(f"  note: --val-size {info['val_size']} held out {info['val_size']} rows, {info['val']} of them "
                     f"kept: the others were dropped as longer than --max-seq-length or skipped (the split comes "
                     f"first, so it does not move with those settings)")
    if info.get("unpacked"):
        lines.append(f"  note: {info['unpacked']} conversations are one row per answer, not one sequence: the template "
                     f"renders their earlier turns differently once the conversation goes on")
    if info.get("note"):
        lines.append(f"  note: {info['note']}")
    if "out_dir" in info:
        lines.append(f"wrote {info['out_dir']}/{{train,val}}.safetensors and meta.json")
    return "\n".join(lines)


__all__ = ["DataOptions", "DataSource", "build_datasets", "describe", "load_data", "report", "split_indices",
           "storable_info"]
