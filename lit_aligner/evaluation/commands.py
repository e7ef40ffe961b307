"""The subcommands of `evaluate/aligner.py`: each a config dataclass (its fields are the flags) with a `run()` that
returns the result as a dict. Every subcommand prints a table, and the whole result as one JSON object on the last
line of stdout; `--out FILE` writes it too (atomically; an existing file only with --force).

| subcommand | measures |
| --- | --- |
| `loss` | response-token loss and perplexity of the bare base and Aligners on any SFT or correction data |
| `inspect` | per gated layer: gates, how many prefix tokens a query reads, how far the prefix moves attention |
| `preference` | DPO metrics (TRL's names) of Aligners on preference pairs against a reference |
| `kto` | KTO metrics of Aligners on unpaired completions (or pairs, unpaired) against a reference |
| `distill` | divergence of the base and Aligners from a teacher (the base reading a system prompt) |
| `reward` | mean reward of the greedy answers of the base and Aligners (GRPO's reward functions) |
| `correction` | copy rate and log-likelihood margins of correction Aligners |
| `harness` | lm-evaluation-harness tasks on the base with each Aligner (`lit_aligner.evaluation.harness`) |
| `judge` | pairwise win rate of two systems judged by a local model (`lit_aligner.evaluation.judge`) |
"""

import json
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple

import tyro

from lit_aligner.data.load import DataOptions
from lit_aligner.default_model import DEFAULT_CHECKPOINT_DIR
from lit_aligner.files import UserError, atomic_write_json, check_output, input_files
from lit_aligner.losses import DEFAULT_CHUNK_SIZE
from lit_aligner.quantize import QuantizeFlag
from lit_aligner.prompts import saved_variables
from lit_aligner.reasoning import ReasoningParser
from lit_aligner.tokenizer import ChatTemplateKwargsFlag, read_template_variables, variables_under
from lit_aligner.training.config import (DistillConfig, DistillTrainConfig, DPOLossConfig, GRPORunConfig,
                                         KTOLossConfig, RewardConfig)

NoFlag = tyro.conf.FlagCreatePairsOff[bool]


@dataclass(kw_only=True)
class EvalCommon:
    """What every subcommand takes."""

    checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR
    """the converted base model the Aligners were trained on."""
    out: Optional[Path] = None
    """also write the result as JSON to this file."""
    force: bool = False
    """replace an existing --out file."""
    batch_size: int = 8
    """rows per forward pass (per Aligner)."""
    device: str = "auto"
    """auto (cuda if available, else cpu), cpu, cuda, cuda:1, ..."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """weights dtype; auto = bfloat16 on CUDA, the checkpoint's own dtype on the CPU."""
    quantize: QuantizeFlag = "none"
    chat_template_kwargs: ChatTemplateKwargsFlag = None

    def inputs(self) -> List[Any]:
        return [self.checkpoint_dir]

    def execute(self) -> Dict[str, Any]:
        """Check --out, run, print the table and the JSON line, write --out."""
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {self.batch_size}")
        read_template_variables(self.chat_template_kwargs)  # a malformed one fails here, before any model loads
        if self.out is not None:
            check_output(self.out, input_files(*self.inputs()), self.force)
        t0 = time.perf_counter()
        result = self.run()
        result["quantize"] = self.quantize
        result["seconds"] = time.perf_counter() - t0
        print(self.format(result))
        if self.out is not None:
            atomic_write_json(self.out, result)
            print(f"wrote {self.out}", file=sys.stderr)
        print(json.dumps(result, default=str))
        return result

    def load(self, checkpoint_dir: Optional[Path] = None):
        """The base (or another checkpoint, a judge), its tokenizer with --chat-template-kwargs."""
        from lit_aligner.base import load_base

        model, tokenizer = load_base(checkpoint_dir or self.checkpoint_dir, self.device, self.dtype, self.quantize)
        tokenizer.template_variables = read_template_variables(self.chat_template_kwargs)
        return model, tokenizer

    def run(self) -> Dict[str, Any]:
        raise NotImplementedError

    def format(self, result: Dict[str, Any]) -> str:
        raise NotImplementedError


def _bare(path: Any) -> bool:
    """Whether an --aligners entry names the bare base ("none" or "base") rather than a file."""
    return str(path).lower() in ("none", "base")


def _aligner_files(paths: Sequence[Any]) -> List[Any]:
    """The --aligners entries that are files (inputs: --out may not replace one)."""
    return [p for p in paths if not _bare(p)]


def _aligners(paths: Sequence[Any], model) -> List[Tuple[str, Any, Dict[str, Any]]]:
    """(name, Aligner or None, metadata) per path; "none" / "base" is the bare base."""
    from lit_aligner.aligner_files import load_aligner

    out = []
    for p in paths:
        if _bare(p):
            out.append(("base", None, {}))
        else:
            aligner, meta = load_aligner(p, model)
            out.append((str(p), aligner, meta))
    return out


def _table(rows: List[Dict[str, Any]], columns: Sequence[Tuple[str, str, str]]) -> str:
    """columns: (header, key, format)."""
    cells = [[h for h, _, _ in columns]]
    for r in rows:
        cells.append([("-" if r.get(k) is None else f.format(r[k])) for _, k, f in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


@dataclass(kw_only=True)
class DataCommon(EvalCommon):
    """The data flags of the subcommands that score rows."""

    data: Optional[Path] = None
    """a data file or prepared directory in any format the trainer reads (default: the offline default dataset)."""
    template: Optional[str] = None
    """prompt template for every system (default: each Aligner's saved template; the bare base uses the template the
    Aligners share, else the trainer's default)."""
    split: Literal["all", "val"] = "all"
    """all: every row of --data; val: the seeded validation split a training run on this file held out (same --seed,
    --val-fraction / --val-size, --max-seq-length)."""
    n: Optional[int] = None
    """score the first N rows only."""
    seed: int = 42
    """the split seed (the trainer's --seed)."""
    data_options: DataOptions = field(default_factory=DataOptions)

    def inputs(self) -> List[Any]:
        return [self.checkpoint_dir, self.data]

    def data_arguments(self) -> Dict[str, Any]:
        """More keyword arguments of `load_data` (distillation's teacher context)."""
        return {}

    def complete(self, dataset, info: Dict[str, Any], tokenizer, template: str):
        """The rows as they are scored (distillation writes prompt-only rows' responses here)."""
        return dataset

    def rows(self, kind: str, tokenizer, template: str):
        """(dataset, counts) through the trainer's data pipeline."""
        import dataclasses

        from lit_aligner.data import TokenizedDataset, load_data, storable_info

        options = self.data_options if self.split == "val" else \
            dataclasses.replace(self.data_options, val_fraction=0.0, val_size=None)
        train, val, info = load_data(kind, self.data, tokenizer, template, options, self.seed, **self.data_arguments())
        rows = val.rows() if self.split == "val" else train.rows()
        if self.n is not None:
            if self.n < 1:
                raise UserError(f"--n must be >= 1, got {self.n}")
            rows = rows[:self.n]
        if not rows:
            raise UserError(f"{self.data or 'the default dataset'}: no rows in the {self.split!r} split")
        dataset = self.complete(TokenizedDataset.from_rows(kind, rows), info, tokenizer, template)
        counts = {k: info.get(k) for k in ("source", "format", "template", "rows_read", "bad_rows", "dropped",
                                           "truncated", "kept", "max_seq_length")}
        counts.update(split=self.split, evaluated=len(rows), skipped=info.get("bad_rows", 0),
                      **({"responses": info["val_responses"]} if "val_responses" in info else {}))
        if "answers" in info:  # --turns all: a row is a conversation
            counts["answers"] = dataset.answers()
        return dataset, {**counts, "info": storable_info(info)}

    def score(self, systems, kind: str, tokenizer, default: str, metrics) -> Tuple[List[Dict[str, Any]], Dict]:
        """Each system's `metrics(aligner, dataset)` (a dict) on the rows as it reads them: under its template
        (--template, else the Aligner's own; the base: --template, the one the Aligners share, else `default`) and,
        under the chat template, an Aligner's saved variables (under --chat-template-kwargs). Each rendering is built
        once. Returns (results, the data counts by rendering)."""
        own = {name: (self.template or meta.get("template") or default) for name, a, meta in systems if a is not None}
        shared = set(own.values())
        base = self.template or (shared.pop() if len(shared) == 1 else default)
        renderings = {}
        for name, _, meta in systems:
            template = own.get(name, base)
            saved = saved_variables(meta) if template == "chat" else {}
            renderings[name] = (template, json.dumps(saved, sort_keys=True) if saved else "")
        results, data, notes = [], {}, set()
        for template, variables in dict.fromkeys(renderings.values()):
            label = f"{template} {variables}".strip()
            with variables_under(tokenizer, json.loads(variables or "{}")):
                dataset, counts = self.rows(kind, tokenizer, template)
            if counts["info"].get("prepared"):  # rendered when it was prepared: label the rows as they are
                prepared = counts["info"].get("template_variables")
                label = f"{counts['template']} {json.dumps(prepared, sort_keys=True) if prepared else ''}".strip()
                note = counts["info"].get("note")
                if note and note not in notes:
                    print(f"note: {note}", file=sys.stderr)
                    notes.add(note)
            data[label] = counts
            for name, aligner, _ in systems:
                if renderings[name] == (template, variables):
                    results.append({"name": name, "template": label, **metrics(aligner, dataset)})
        return results, data


# --- loss -------------------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class Loss(DataCommon):
    """Response-token loss and perplexity of the bare base and each Aligner on SFT or correction data (the trainer's
    own rendering and masking; rows too long for --max-seq-length follow --truncation and are counted)."""

    aligners: List[Path] = field(default_factory=list)
    """Aligner files (ours or the paper's .pth) to score next to the base."""
    base: NoFlag = True
    """score the bare base too (--no-base: Aligners only)."""
    mode: Literal["sft", "correction"] = "sft"
    """sft: prompt -> response rows; correction: Q-A-C rows scored on C given (Q, A)."""

    def inputs(self) -> List[Any]:
        return [*super().inputs(), *self.aligners]

    def run(self) -> Dict[str, Any]:
        from lit_aligner.evaluation import objective_metrics

        model, tokenizer = self.load()
        systems = ([("base", None, {})] if self.base else []) + _aligners(self.aligners, model)
        if not systems:
            raise UserError("nothing to score: give --aligners, or drop --no-base")
        cls, objective = _response_objective(self.mode, tokenizer)

        def metrics(aligner, dataset):
            m = objective_metrics(model, objective, dataset, aligner if aligner is not None else False,
                                  self.batch_size)
            return {"loss": m["loss"], "perplexity": math.exp(min(m["loss"], 700)), "tokens": m[objective.unit],
                    "rows": len(dataset)}

        results, data = self.score(systems, cls.data_kind, tokenizer, cls.default_template(tokenizer), metrics)
        return {"command": "loss", "mode": self.mode, "checkpoint_dir": str(self.checkpoint_dir), "results": results,
                "data": data}

    def format(self, result: Dict[str, Any]) -> str:
        head = "\n".join(f"data ({t}): {c['evaluated']} rows" + (f" ({c['answers']} answers)" if "answers" in c else "")
                         + f" of {c['source']} ({c['split']} split; read "
                         f"{c['rows_read']}, skipped {c['skipped']} malformed, dropped {c['dropped']} too long, "
                         f"truncated {c['truncated']})" for t, c in result["data"].items())
        return head + "\n" + _table(result["results"], [("system", "name", "{}"), ("template", "template", "{}"),
                                                        ("loss", "loss", "{:.4f}"), ("perplexity", "perplexity",
                                                                                     "{:.2f}"),
                                                        ("tokens", "tokens", "{}"), ("rows", "rows", "{}")])


def _response_objective(mode: str, tokenizer):
    """(class, objective) that renders and masks `mode` rows as the trainer does (correction: every row Q-A-C)."""
    from lit_aligner.training.objectives import get_objective

    cls = get_objective(mode)
    return cls, (cls(tokenizer.pad_id, DEFAULT_CHUNK_SIZE) if mode == "sft" else
                 cls(tokenizer.pad_id, DEFAULT_CHUNK_SIZE, 0))


# --- inspect ----------------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class Inspect(DataCommon):
    """What each Aligner does inside the base, per gated layer, on the positions that predict response tokens: how
    far its gates opened, how many of the N prefix tokens a query reads (exp of the prefix attention's entropy) and
    how many the layer reads at all, and how much the prefix moves the attention output; then each prefix token's
    share of the attention (`lit_aligner.evaluation.inspect`)."""

    aligners: List[Path] = field(default_factory=list)
    """Aligner files (ours or the paper's .pth) to look into."""
    mode: Literal["sft", "correction"] = "sft"
    """sft: prompt -> response rows; correction: Q-A-C rows, the positions that predict C."""
    n: Optional[int] = 128
    """look at the first N rows (averages settle well before; more costs two attention passes per gated layer)."""

    def inputs(self) -> List[Any]:
        return [*super().inputs(), *self.aligners]

    def run(self) -> Dict[str, Any]:
        from lit_aligner.evaluation.inspect import inspect_aligner

        if not self.aligners or any(_bare(p) for p in self.aligners):
            raise UserError("inspect looks into Aligners: give --aligners FILE [FILE ...] (the bare base has none)")
        model, tokenizer = self.load()
        cls, objective = _response_objective(self.mode, tokenizer)

        def metrics(aligner, dataset):
            items = [dataset[i] for i in range(len(dataset))]
            batches = (objective.collate(items[s:s + self.batch_size]) for s in range(0, len(items), self.batch_size))
            return {"rows": len(dataset), **inspect_aligner(model, aligner, batches)}

        results, data = self.score(_aligners(self.aligners, model), cls.data_kind, tokenizer,
                                   cls.default_template(tokenizer), metrics)
        return {"command": "inspect", "mode": self.mode, "checkpoint_dir": str(self.checkpoint_dir),
                "results": results, "data": data}

    def format(self, result: Dict[str, Any]) -> str:
        parts = []
        for r in result["results"]:
            m = r["mean"]
            layers = [{**layer, "shift_pct": 100 * layer["shift"]} for layer in r["layers"]]
            tokens = "  ".join(f"{t['token']}: {100 * t['attention_share']:.1f}% (norm {t['norm']:.2f})"
                               for t in r["tokens"])
            parts.append(
                f"{r['name']} (N={r['n_tokens']}, {r['rows']} rows, {r['positions']} positions, {r['template']})\n"
                + _table(layers, [("layer", "layer", "{}"), ("mean |gate|", "gate_mean_abs", "{:.4f}"),
                                  ("max |gate|", "gate_max_abs", "{:.4f}"),
                                  ("tokens per query", "effective_tokens", "{:.2f}"),
                                  ("tokens used", "tokens_used", "{:.2f}"),
                                  ("attention output moved %", "shift_pct", "{:.2f}")])
                + f"\nmean of the {len(layers)} gated layers: |gate| {m['gate_mean_abs']:.4f}, "
                f"{m['effective_tokens']:.2f} of {r['n_tokens']} tokens per query, {m['tokens_used']:.2f} used, "
                f"attention output moved {100 * m['shift']:.2f}%\nprefix tokens (share of the prefix attention, "
                f"norm): {tokens}")
        return "\n\n".join(parts)


# --- preference -------------------------------------------------------------------------------------------------------

# Our DPO metric -> the name TRL's DPOTrainer logs
TRL_NAMES = {"loss": "loss", "reward_accuracy": "rewards/accuracies", "chosen_reward": "rewards/chosen",
             "rejected_reward": "rewards/rejected", "reward_margin": "rewards/margins", "chosen_logp": "logps/chosen",
             "rejected_logp": "logps/rejected"}


@dataclass(kw_only=True)
class AgainstReference(DataCommon):
    """What `preference` and `kto` share: policies scored by a training objective against a frozen reference through
    the same base, as a training run validates."""

    aligners: List[str] = field(default_factory=list)
    """policies: Aligner files, or "none" for the bare base."""
    reference: str = "none"
    """the reference: "none" (the bare base) or an Aligner file."""

    def inputs(self) -> List[Any]:
        return [*super().inputs(), *_aligner_files(self.aligners)]

    def scored(self, objective_cls, loss_config, names: Dict[str, str]) -> Tuple[List[Dict[str, Any]], Dict, str]:
        """(results, data counts, the reference's description): each policy's metrics of `objective_cls` with
        `loss_config`, renamed by `names`, with its count of units."""
        from lit_aligner.evaluation import objective_metrics
        from lit_aligner.training.objectives.dpo import resolve_reference

        if not self.aligners:
            raise UserError("give the policies to evaluate: --aligners FILE [FILE ...] (none = the bare base)")
        model, tokenizer = self.load()
        systems = _aligners(self.aligners, model)
        reference, desc = resolve_reference(self.reference, None, model)
        objective = objective_cls(tokenizer.pad_id, DEFAULT_CHUNK_SIZE, reference, loss_config, desc)

        def metrics(aligner, dataset):
            m = objective_metrics(model, objective, dataset, aligner if aligner is not None else False,
                                  self.batch_size)
            return {objective.unit: m[objective.unit], **{names[k]: v for k, v in m.items() if k in names}}

        results, data = self.score(systems, objective_cls.data_kind, tokenizer,
                                   objective_cls.default_template(tokenizer), metrics)
        return results, data, desc


@dataclass(kw_only=True)
class Preference(AgainstReference):
    """DPO metrics of each Aligner (policy) against a reference on preference pairs: loss, reward accuracy (a tie
    counts 1/2), chosen / rejected rewards and their margin, chosen / rejected log-probabilities, under TRL's names.
    (`finetune/aligner_dpo.py --eval-only` does the same for one Aligner on a training run's split.)"""

    dpo: DPOLossConfig = field(default_factory=DPOLossConfig)

    def run(self) -> Dict[str, Any]:
        from lit_aligner.training.objectives.dpo import DPO

        if self.dpo.reference_free and self.reference.lower() != "none":
            raise UserError(f"--loss {' '.join(self.dpo.loss)} reads no reference: drop --reference")
        results, data, desc = self.scored(DPO, self.dpo, TRL_NAMES)
        settings = self.dpo.settings()
        return {"command": "preference", "reference": desc, "loss_type": settings.pop("loss"), **settings,
                "results": results, "data": data}

    def format(self, result: Dict[str, Any]) -> str:
        head = f"reference: {result['reference']}, loss {result['loss_type']}, beta {result['beta']}\n"
        return head + _table(result["results"], [
            ("policy", "name", "{}"), ("pairs", "pairs", "{}"), ("loss", "loss", "{:.4f}"),
            ("rewards/accuracies", "rewards/accuracies", "{:.3f}"), ("rewards/margins", "rewards/margins", "{:+.4f}"),
            ("rewards/chosen", "rewards/chosen", "{:+.4f}"), ("rewards/rejected", "rewards/rejected", "{:+.4f}"),
            ("logps/chosen", "logps/chosen", "{:.2f}"), ("logps/rejected", "logps/rejected", "{:.2f}")])


# --- kto --------------------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class KTO(AgainstReference):
    """KTO metrics of each Aligner (policy) against a reference on unpaired completions (prompt, completion, label;
    a preference file gives two rows a pair): loss, kl (the estimate z: each batch's mismatched rows, row i's prompt
    with row i-1's completion, as in training), reward accuracy (a completion on its label's side of beta x z, a tie
    counting 1/2), reward and log-prob, means per completion. (`finetune/aligner_kto.py --eval-only` does the same for
    one Aligner on a training run's split.)"""

    kto: KTOLossConfig = field(default_factory=KTOLossConfig)

    def run(self) -> Dict[str, Any]:
        from lit_aligner.training.objectives.kto import KTO as Objective

        self.kto.check_batch(self.batch_size, "--batch-size")
        results, data, desc = self.scored(Objective, self.kto, {k: k for k in Objective.metric_names})
        return {"command": "kto", "reference": desc, **self.kto.settings(), "results": results, "data": data}

    def format(self, result: Dict[str, Any]) -> str:
        head = f"reference: {result['reference']}, loss {result['loss']}, beta {result['beta']}\n"
        return head + _table(result["results"], [
            ("policy", "name", "{}"), ("completions", "completions", "{}"), ("loss", "loss", "{:.4f}"),
            ("kl", "kl", "{:.4f}"), ("reward_accuracy", "reward_accuracy", "{:.3f}"), ("reward", "reward", "{:+.4f}"),
            ("logp", "logp", "{:.2f}")])


# --- distill ----------------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class Distill(DataCommon):
    """Context distillation: how far the bare base and each Aligner (without the system prompt) are from the teacher
    (the base reading --system, with --teacher-aligner if given) on the rows' responses: the divergence in nats per
    response token and the share of tokens whose most likely next token is the teacher's, as a distillation run
    validates. Without --system: the one the Aligners' metadata records (when they agree), else the default dataset's
    context."""

    aligners: List[str] = field(default_factory=list)
    """the students: Aligner files, or "none" for the bare base (the context's whole effect)."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    max_new_tokens: int = DistillTrainConfig.max_new_tokens
    """prompt-only rows (the on-policy trainer's): each is scored on the teacher's greedy answer, at most this long (the
    trainer's --max-new-tokens; with its --seed, --val-size and --micro-batch-size as --batch-size, its held-out
    answers)."""
    _system = ""  # the teacher's system message, once resolved (not a flag)
    _objective = None  # the objective that scores the rows, once built (not a flag)

    def inputs(self) -> List[Any]:
        return [*super().inputs(), *_aligner_files(self.aligners),
                self.distill.teacher_aligner]

    def data_arguments(self) -> Dict[str, Any]:
        return {"teacher_system": self._system, "prompt_only": True}

    def complete(self, dataset, info: Dict[str, Any], tokenizer, template: str):
        if info.get("format") != "prompt_only":
            return dataset
        from lit_aligner.data.tokenize import end_token
        from lit_aligner.prompts import get_template
        from lit_aligner.training.objectives.distill import TEACHER_ANSWERS

        self._objective.end_id = end_token(get_template(template), tokenizer)  # this rendering's
        info["val_responses"] = TEACHER_ANSWERS
        return self._objective.teacher_answers(None, self._model, dataset, self.batch_size, self.max_new_tokens)

    def run(self) -> Dict[str, Any]:
        from lit_aligner.evaluation import _meta_json, objective_metrics
        from lit_aligner.training.objectives.distill import Distill as Objective
        from lit_aligner.training.objectives.dpo import resolve_reference

        if not self.aligners:
            raise UserError("give the students to evaluate: --aligners FILE [FILE ...] (none = the bare base)")
        self.distill.check()
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        model, tokenizer = self.load()
        systems = _aligners(self.aligners, model)
        recorded = {(_meta_json(meta, "distill") or {}).get("system") for _, a, meta in systems if a is not None}
        recorded.discard(None)
        if self.distill.system is None and len(recorded) == 1:
            self._system, source = recorded.pop(), "the Aligners' metadata"
        else:
            self._system = self.distill.system_text(self.data is None)
            source = "--system" if self.distill.system is not None else "the default dataset's"
        teacher, _ = resolve_reference(self.distill.teacher_aligner, None, model)  # (None: the bare base)
        # (the length limits and stop tokens write prompt-only rows' answers as the trainer does: `complete`)
        objective = Objective(tokenizer.pad_id, DEFAULT_CHUNK_SIZE, teacher, self.distill, self._system,
                              self.data_options.max_seq_length, tokenizer.stop_ids)
        self._objective, self._model = objective, model

        def metrics(aligner, dataset):
            m = objective_metrics(model, objective, dataset, aligner if aligner is not None else False,
                                  self.batch_size)
            return {"divergence": m["loss"], "agreement": m["agreement"], "tokens": m["tokens"]}

        results, data = self.score(systems, Objective.data_kind, tokenizer, Objective.default_template(tokenizer),
                                   metrics)
        return {"command": "distill", "system": self._system, "system_from": source,
                "teacher_aligner": str(self.distill.teacher_aligner), "beta": self.distill.beta,
                "temperature": self.distill.temperature, "results": results, "data": data}

    def format(self, result: Dict[str, Any]) -> str:
        system = result["system"] if len(result["system"]) <= 80 else result["system"][:77] + "..."
        head = (f"teacher: the base{' + ' + result['teacher_aligner'] if result['teacher_aligner'] != 'None' else ''}"
                f" reading the system prompt ({result['system_from']}) {system!r}; "
                f"{'forward KL' if result['beta'] == 0 else 'beta ' + str(result['beta'])}, temperature "
                f"{result['temperature']}\n")
        return head + _table(result["results"], [
            ("student", "name", "{}"), ("template", "template", "{}"), ("divergence", "divergence", "{:.4f}"),
            ("agreement", "agreement", "{:.3f}"), ("tokens", "tokens", "{}")])


# --- reward -----------------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class Reward(DataCommon):
    """GRPO's measure: each system's greedy answer to every prompt of the rows, scored by the reward functions, as a
    GRPO run validates (its end report again on its held-out rows: --split val with its --seed and --val-size): the
    mean reward, each function's, and the answers' length in tokens. Rows with answers give the `answer` reward its
    references; prompt-only rows suit the others."""

    aligners: List[str] = field(default_factory=list)
    """Aligner files, or "none" for the bare base."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    # --split val: the held-out rows of a GRPO run (its --val-size default)
    data_options: DataOptions = field(default_factory=lambda: GRPORunConfig().data_options)
    _objective = None  # the objective that answers and scores the rows, once built (not a flag)

    def inputs(self) -> List[Any]:
        return [*super().inputs(), *_aligner_files(self.aligners)]

    def data_arguments(self) -> Dict[str, Any]:
        return {"prompt_only": True}

    def complete(self, dataset, info: Dict[str, Any], tokenizer, template: str):
        from lit_aligner.data.tokenize import end_token
        from lit_aligner.prompts import get_template

        self._objective.check_references(info, self.data)
        self._objective.end_id = end_token(get_template(template), tokenizer)  # this rendering's, as the trainer's
        return dataset

    def run(self) -> Dict[str, Any]:
        from lit_aligner.evaluation import objective_metrics
        from lit_aligner.training.objectives.grpo import GRPO

        if not self.aligners:
            raise UserError("give the systems to evaluate: --aligners FILE [FILE ...] (none = the bare base)")
        self.reward.check()  # (a TrainError is a UserError: one error line)
        model, tokenizer = self.load()
        systems = _aligners(self.aligners, model)
        objective = GRPO(tokenizer.pad_id, lambda ids: tokenizer.decode(ids, skip_special=True), self.reward,
                         DEFAULT_CHUNK_SIZE, self.data_options.max_seq_length, tokenizer.stop_ids)
        self._objective = objective

        def metrics(aligner, dataset):
            m = objective_metrics(model, objective, dataset, aligner if aligner is not None else False,
                                  self.batch_size)
            return {"reward": m["reward"], **{n: m[f"reward_{n}"] for n in objective.rewards.names},
                    "length": m["length"], "truncated": m["truncated"], "answers": m["answers"]}

        results, data = self.score(systems, GRPO.data_kind, tokenizer, GRPO.default_template(tokenizer), metrics)
        return {"command": "reward", **self.reward.settings(), "results": results, "data": data}

    def format(self, result: Dict[str, Any]) -> str:
        names = result["rewards"]
        weights = result["reward_weights"] or [1.0] * len(names)
        head = ("greedy answers (up to " + str(result["max_new_tokens"]) + " new tokens); reward = " +
                " + ".join(f"{w:g} x {n}" for n, w in zip(names, weights)) + "\n")
        return head + _table(result["results"], [
            ("system", "name", "{}"), ("template", "template", "{}"), ("reward", "reward", "{:.4f}"),
            *[(n, n, "{:.4f}") for n in names if len(names) > 1], ("answer tokens", "length", "{:.1f}"),
            ("cut short", "truncated", "{:.1%}"), ("answers", "answers", "{}")])


# --- correction -------------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class Correction(EvalCommon):
    """Copy rate (fed the good answer C, does the corrector return it unchanged?) and ll(C) vs ll(A) given (Q, A), for
    each correction Aligner and the bare base given the same prompts, on held-out pairs. Greedy decoding."""

    aligners: List[Path] = field(default_factory=list)
    """correction-mode Aligner files (trained with `finetune/aligner.py --mode correction`)."""
    data: Optional[Path] = None
    """Q-A-C JSON/JSONL, any preference file (A = rejected, C = chosen), or a prepared correction directory; default:
    the offline default dataset."""
    split: Literal["val", "all"] = "val"
    """val: the validation rows the Aligner's training run held out (its split seed, fraction and max_seq_length,
    from the Aligner's metadata); all: every row (a file the Aligner never saw)."""
    n: Optional[int] = 32
    """evaluate the first N pairs of the split (None: all)."""
    max_seq_length: Optional[int] = None
    """drop pairs whose prompt + longer answer exceed this (default: the training run's)."""
    max_new_tokens: int = 128
    """most tokens generated per copy test."""
    with_base: NoFlag = True
    """also evaluate the bare base given the same correction prompts (the "before" column)."""

    def inputs(self) -> List[Any]:
        return [self.checkpoint_dir, self.data, *self.aligners]

    def run(self) -> Dict[str, Any]:
        import torch

        from lit_aligner.evaluation import heldout_split
        from lit_aligner.evaluation.correction import evaluate_correction
        from lit_aligner.prompts import is_correction

        if not self.aligners:
            raise UserError("give the correction Aligners: --aligners FILE [FILE ...]")
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        model, tokenizer = self.load()
        reports = []
        for name, aligner, meta in _aligners(self.aligners, model):
            if not is_correction(meta):
                raise UserError(f"{name} is not a correction Aligner (metadata mode {meta.get('mode', 'unset')!r}); "
                                f"train one with `finetune/aligner.py --mode correction` (howto/correction.md)")
            dataset, info = heldout_split("correction", self.data, tokenizer, "correction", meta, self.split, self.n,
                                          self.max_seq_length)
            print(f"evaluating {name} on {len(dataset)} {self.split!r} pairs of {info['source']} (bad rows skipped: "
                  f"{info.get('bad_rows', 0)})", file=sys.stderr)
            with torch.inference_mode():
                report = evaluate_correction(model, tokenizer, aligner, dataset, self.max_new_tokens,
                                             self.batch_size, self.with_base)
            reports.append({"aligner": name, "data": info, **report})
        return {"command": "correction", "checkpoint_dir": str(self.checkpoint_dir), "results": reports}

    def format(self, result: Dict[str, Any]) -> str:
        from lit_aligner.evaluation.correction import format_report

        parts = []
        for r in result["results"]:
            parts.append(f"== {r['aligner']}\n{format_report(r)}")
            for i, s in enumerate(r["samples"], 1):
                parts.append(f"--- sample {i}: {s['question'][:100]!r}")
                parts += [f"  {k}: {s[k][:200]!r}" for k in ("good_answer", "base_copy", "corrector_copy") if k in s]
        return "\n".join(parts)


# --- harness ----------------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class Harness(EvalCommon):
    """lm-evaluation-harness tasks (the `lm_eval` package) on the base with each Aligner, one loaded base for all:
    every batch holds rows of every Aligner (an Aligner per row). Any task lm_eval knows (mmlu, arc_easy, hellaswag,
    gsm8k, ... wherever their datasets are reachable) or your own task YAMLs in --include-path."""

    tasks: List[str]
    """task (or group) names."""
    aligners: List[Path] = field(default_factory=list)
    """Aligner files, each a column of results."""
    base: NoFlag = True
    """evaluate the bare base too."""
    include_path: Optional[Path] = None
    """a folder of extra task YAMLs (local JSONL data works offline)."""
    num_fewshot: Optional[int] = None
    """few-shot examples per prompt (default: the task's)."""
    limit: Optional[float] = None
    """documents per task (an int), or a share of them (< 1)."""
    max_length: Optional[int] = None
    """longest context in tokens (default: the model's context)."""
    max_gen_toks: int = 256
    """most generated tokens for generation tasks that set none."""
    gen_kwargs: Optional[str] = None
    """generation settings for every generation task, lm_eval's "key=value,..." (e.g. do_sample=True,temperature=0.7,
    top_p=0.9 or repetition_penalty=1.2): do_sample, temperature, top_k, top_p, min_p, repetition_penalty,
    presence_penalty, frequency_penalty, max_gen_toks, until."""
    reasoning_parser: ReasoningParser = "none"
    """think (or vLLM's names qwen3, deepseek_r1), for thinking bases: a generation's <think> block (at its start, or
    opened by the prompt) is read off and the task scores the answer after it, cut at the task's `until` strings (so
    a generation runs to its end token or max_gen_toks), as lm_eval's think_end_token does for transformers models."""
    apply_chat_template: NoFlag = False
    """format every request with the tokenizer's chat template (instruct models, and Aligners trained with the
    default `chat` template), as lm_eval's --apply_chat_template."""
    fewshot_as_multiturn: NoFlag = False
    """with --apply-chat-template: few-shot examples as earlier turns of the chat."""
    system_instruction: Optional[str] = None
    """a system message (or, without a chat template, a preamble) for every request."""
    log_samples: NoFlag = False
    """keep every request's prompt and answer per system and task in the JSON ("logged_samples"), as lm_eval's
    --log_samples."""
    seed: int = 1234
    """the harness's seeds (few-shot sampling, sampling)."""

    def inputs(self) -> List[Any]:
        return [self.checkpoint_dir, *self.aligners]

    def run(self) -> Dict[str, Any]:
        try:
            import lm_eval  # noqa: F401
        except ImportError:
            raise UserError("the harness subcommand needs lm-evaluation-harness: pip install -e '.[eval]'") from None
        from lit_aligner.evaluation.harness import AlignerLM, run_harness

        for flag, value, low in (("--num-fewshot", self.num_fewshot, 0), ("--max-length", self.max_length, 2),
                                 ("--max-gen-toks", self.max_gen_toks, 1)):
            if value is not None and value < low:  # before the tasks' data is fetched
                raise UserError(f"{flag} must be >= {low}, got {value}")
        if self.limit is not None and not (0 < self.limit < 1 or (self.limit >= 1 and self.limit == int(self.limit))):
            raise UserError(f"--limit is a number of documents per task (1, 2, ...) or a share of them in (0, 1), got "
                            f"{self.limit:g}")
        if self.gen_kwargs:
            from lm_eval.utils import simple_parse_args_string

            from lit_aligner.evaluation.harness import decoding

            try:
                decoding(simple_parse_args_string(self.gen_kwargs))
            except ValueError as e:
                raise UserError(f"--gen-kwargs {self.gen_kwargs}: {e}") from None
        if self.fewshot_as_multiturn and not self.apply_chat_template:
            raise UserError("--fewshot-as-multiturn makes the few-shot examples turns of a chat: add "
                            "--apply-chat-template")
        model, tokenizer = self.load()
        if self.apply_chat_template and not tokenizer.has_chat_template:
            raise UserError(f"--apply-chat-template: the tokenizer in {self.checkpoint_dir} has no chat template; "
                            f"drop the flag (requests are then plain text)")
        systems = ([("base", None, {})] if self.base else []) + _aligners(self.aligners, model)
        if not systems:
            raise UserError("nothing to evaluate: give --aligners, or drop --no-base")
        for name, _, meta in systems:
            template = meta.get("template")
            if self.apply_chat_template and template not in (None, "chat"):
                warnings.warn(f"{name} was trained with the {template!r} template; --apply-chat-template formats its "
                              f"requests with the tokenizer's chat template instead")
            saved = saved_variables(meta)
            if self.apply_chat_template and {**saved, **tokenizer.template_variables} != tokenizer.template_variables:
                warnings.warn(f"{name} was trained with the chat-template variables {json.dumps(saved)}; the harness "
                              f"renders every request with --chat-template-kwargs alone (one rendering for all the "
                              f"systems): pass them there to evaluate it as it was trained")
        lm = AlignerLM(model, tokenizer, {name: a for name, a, _ in systems}, self.batch_size, self.max_length,
                       self.max_gen_toks, reasoning=self.reasoning_parser != "none")
        options = dict(apply_chat_template=self.apply_chat_template, fewshot_as_multiturn=self.fewshot_as_multiturn,
                       system_instruction=self.system_instruction, gen_kwargs=self.gen_kwargs)
        from lit_aligner.hub import quiet_retries

        try:
            with quiet_retries():
                results = run_harness(lm, self.tasks, str(self.include_path) if self.include_path else None,
                                      self.num_fewshot, self.limit, self.seed, self.log_samples, **options)
        except KeyError as e:  # lm_eval's "task not found"
            said = e.args[0] if e.args else e  # its own sentence, not the KeyError's quoted repr
            raise UserError(f"--tasks {' '.join(self.tasks)}: lm_eval does not know one of them ({said}); list them "
                            f"with `lm_eval --tasks list`, or pass --include-path with your task YAML") from None
        except ConnectionError as e:  # the datasets library: a task's data is neither cached nor downloadable
            raise UserError(f"--tasks {' '.join(self.tasks)}: {e}; run it once where the Hub can be reached (the "
                            f"datasets cache keeps the data), or give a task whose data is local (--include-path "
                            f"with its YAML)") from None
        return {"command": "harness", "tasks": self.tasks, "num_fewshot": self.num_fewshot, "limit": self.limit,
                **options,
                "results": {k: v for k, v in results.items() if not k.startswith("_")},
                "samples": results.get("_samples", {}), "versions": results.get("_versions", {}),
                **({"logged_samples": results.get("_logged", {})} if self.log_samples else {})}

    def format(self, result: Dict[str, Any]) -> str:
        rows = []
        for name, tasks in result["results"].items():
            for task, metrics in tasks.items():
                for metric, value in metrics.items():
                    if isinstance(value, (int, float)) and not metric.endswith("_stderr,none"):
                        rows.append({"system": name, "task": task, "metric": metric.replace(",none", ""),
                                     "value": value})
        return _table(rows, [("system", "system", "{}"), ("task", "task", "{}"), ("metric", "metric", "{}"),
                             ("value", "value", "{:.4f}")])


# --- judge ------------------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class Judge(EvalCommon):
    """Pairwise win rate of system A against system B on a prompt file, judged by a local model through its chat
    template (MT-Bench's pairwise prompt; howto/evaluate.md), each pair in both orders (a disagreement is a tie):
    score = (wins + ties / 2) / N with a 95% bootstrap interval, and per category for Vicuna-style files."""

    prompts: Path
    """questions: Vicuna / MT-Bench JSONL ({"question_id", "category", "turns"}: the first turn, or every turn with
    --multi-turn), rows with "prompt" / "instruction", or a JSON list of strings."""
    a: str
    """system A: "base", an Aligner file, or a JSON/JSONL file of another model's answers."""
    b: str = "base"
    """system B, the same kinds."""
    judge_dir: Optional[Path] = None
    """the judge: any converted checkpoint with a chat template (default: --checkpoint-dir itself)."""
    max_new_tokens: int = 256
    """most tokens per generated answer."""
    template: Optional[str] = None
    """prompt template for generated answers (default: each Aligner's own; the base: its chat template)."""
    reasoning_parser: ReasoningParser = "none"
    """think (or vLLM's names qwen3, deepseek_r1), for thinking systems: a generated answer's <think> block (at its
    start, or opened by the prompt) is read off, and the judge sees the answer after it (its conversation goes on
    with that too)."""
    multi_turn: bool = False
    """judge every turn of multi-turn prompts (MT-Bench's second turns): each system answers a follow-up with its own
    earlier answers in the conversation, and a later turn is judged on the two whole conversations (MT-Bench's
    multi-turn prompt); the score is over every judgement, with one per turn."""
    bootstrap: int = 1000
    """bootstrap resamples for the 95% interval."""
    seed: int = 0
    """bootstrap seed."""

    def inputs(self) -> List[Any]:
        return [self.checkpoint_dir, self.prompts, self.judge_dir,
                *[s for s in (self.a, self.b) if s.lower() != "base"]]

    def _answers(self, spec: str, questions, model, tokenizer) -> List[List[str]]:
        """Each question's answers by a system: its first turn, or with --multi-turn every turn (a generated follow-up
        answer has the system's own earlier answers in its conversation)."""
        from lit_aligner.aligner_files import PAPER_SUFFIXES
        from lit_aligner.generation import AlignerEntry, PromptItem, answer_prompts
        from lit_aligner.evaluation.judge import read_answers
        from lit_aligner.perf import compile_flag, decode_steps_bound

        path = Path(spec)
        turns = max(len(q.turns) for q in questions) if self.multi_turn else 1
        if spec.lower() != "base" and path.suffix in (".json", ".jsonl"):
            answers = read_answers(path, questions)
            short = next((q for q, a in zip(questions, answers) if len(a) < min(turns, len(q.turns))), None)
            if short is not None:
                raise UserError(f"{path}: question {short.id!r} has {len(short.turns)} turns to judge, its answers "
                                f"fewer: give every turn's answer (FastChat's choices[0].turns), or drop --multi-turn")
            return [a[:turns] for a in answers]
        if spec.lower() == "base":
            entry = AlignerEntry("base")
        elif path.suffix in (".safetensors",) + PAPER_SUFFIXES:
            entry = _aligners([path], model)[0]
            entry = AlignerEntry(entry[0], entry[1], entry[2])
        else:
            raise UserError(f"system {spec!r}: give 'base', an Aligner file (.safetensors/.pth) or an answers file "
                            f"(.json/.jsonl)")
        out: List[List[str]] = [[] for _ in questions]
        # compiled on CUDA only when the answers are many enough to pay for it (perf.COMPILE_PAYS_AFTER_STEPS)
        compile = compile_flag("auto", model.tok_embeddings.weight.device,
                               turns * decode_steps_bound(len(questions), self.batch_size, self.max_new_tokens))
        for t in range(turns):  # turn t of every question that has one, its conversation so far as the history
            asked = [i for i, q in enumerate(questions) if len(q.turns) > t]
            items = [PromptItem(questions[i].turns[t], history=[
                {"role": role, "content": text} for k in range(t)
                for role, text in (("user", questions[i].turns[k]), ("assistant", out[i][k]))]) for i in asked]
            answers, _ = answer_prompts(model, tokenizer, items, [entry], self.max_new_tokens,
                                        batch_size=self.batch_size, template=self.template,
                                        stop_ids=tokenizer.stop_ids, reasoning=self.reasoning_parser != "none",
                                        compile=compile)
            for i, row in zip(asked, answers):
                out[i].append(row[0].reply)
        model.clear_caches()
        return out

    def run(self) -> Dict[str, Any]:
        from lit_aligner.evaluation.judge import Judge as LocalJudge, judge_pairs, read_questions

        if self.bootstrap < 1:
            raise UserError(f"--bootstrap must be >= 1, got {self.bootstrap}")
        questions = read_questions(self.prompts)
        model, tokenizer = self.load()
        answers_a = self._answers(self.a, questions, model, tokenizer)
        answers_b = self._answers(self.b, questions, model, tokenizer)
        same = self.judge_dir is None or Path(self.judge_dir).resolve() == Path(self.checkpoint_dir).resolve()
        if not same:
            del model
            model, tokenizer = self.load(self.judge_dir)
        result = judge_pairs(LocalJudge(model, tokenizer, self.batch_size), questions, answers_a, answers_b,
                             self.bootstrap, self.seed)
        return {"command": "judge", "a": self.a, "b": self.b, "judge": str(self.judge_dir or self.checkpoint_dir),
                "prompts": str(self.prompts), **result}

    def format(self, result: Dict[str, Any]) -> str:
        from lit_aligner.evaluation.judge import format_judgement

        return f"judge: {result['judge']}\n" + format_judgement(result, result["a"], result["b"])


SUBCOMMANDS = {"loss": Loss, "inspect": Inspect, "preference": Preference, "kto": KTO, "distill": Distill,
               "reward": Reward, "correction": Correction, "harness": Harness, "judge": Judge}
