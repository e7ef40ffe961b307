"""Context distillation into an Aligner: the teacher is the frozen base reading a context in front of every prompt (a
system message, `--system`), the student the same base with the Aligner being trained and without that context. Both
read the same response; the loss is the token-level divergence between their next-token distributions on it
(`losses.distillation_loss`: forward KL by default, TRL's GKD family with --beta). The Aligner learns to stand in for
the context, so a long system prompt costs N prefix tokens instead of its length on every request.

The teacher runs through the same loaded base (like DPO's reference), without gradient; a batch holds the student's
rows and the teacher's, which differ only in their prompts. On a share of the steps (--lmbda, TRL GKD's; on-policy
distillation) the responses are the student's own samples instead of the data's, written before the step
(`rollout`) and then scored by the teacher like any other. With every step on-policy (--lmbda 1) the data may be
prompts alone; held-out prompts then get the teacher's greedy answers once (`prepare`), for validation to score.
"""

import random
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn

from lit_aligner.data.dataset import KIND_FIELDS, TokenizedDataset, pad_rows
from lit_aligner.losses import DEFAULT_CHUNK_SIZE, distillation_loss
from lit_aligner.training.config import DistillConfig
from lit_aligner.training.objectives import Batch, Reference, as_reference, register, response_end, write_responses
from lit_aligner.training.objectives.sft import SFT


TEACHER_ANSWERS = "the teacher's greedy answers"  # what prompt-only rows are scored on (data info "val_responses")


def lmbda(config: DistillConfig) -> float:
    """The on-policy share (--lmbda) of a config: an evaluation's (a plain `DistillConfig`) has none."""
    return getattr(config, "lmbda", 0.0)


@register
class Distill(SFT):
    """Summed divergence (nats) of the response tokens between teacher and student; units are those tokens. Metrics:
    loss (the divergence), agreement (the share of tokens where both models' most likely next token is the same)."""

    name = "distill"
    data_kind = "distill"
    metric_names = ("loss", "agreement")

    def __init__(self, pad_id: int, chunk_size: int = DEFAULT_CHUNK_SIZE, teacher: Reference = False,
                 config: DistillConfig = DistillConfig(), system: str = "", max_seq_length: int = 0,
                 stop_ids: Sequence[int] = (), seed: int = 0, end_id: Optional[int] = None):
        super().__init__(pad_id, chunk_size)
        self.teacher, self.config, self.system = teacher, config, system
        # on-policy steps only (a DistillTrainConfig with lmbda > 0): the row budget, where samples end, their seed,
        # the token a stopped sample ends with (the template's, as the data's responses; None: each row's last)
        self.max_seq_length, self.stop_ids, self.seed, self.end_id = max_seq_length, sorted(stop_ids), seed, end_id

    @property
    def on_policy_only(self) -> bool:
        return lmbda(self.config) >= 1

    def on_policy(self, step: int) -> bool:
        """Whether training step `step` (0-based) reads the student's own responses: a draw from the run's seed and
        the step, so every rank, and a resumed run, decide alike."""
        share = lmbda(self.config)
        return share >= 1 or (share > 0 and random.Random(self.seed * 1_000_003 + step).random() < share)

    def rollout(self, fabric: Any, model: nn.Module, items: Dict[int, Dict[str, torch.Tensor]],
                step: int) -> Optional[Dict[int, Dict[str, torch.Tensor]]]:
        """On an on-policy step, each item's response replaced by one the student (the base with the Aligner being
        trained) samples for its prompt: at most --max-new-tokens, and no more than the row's room under
        --max-seq-length beside the longer of its two prompts; a sample that stopped ends with the template's end
        token (as the data's responses do), one cut short does not. A row with no room keeps the data's response."""
        if not self.on_policy(step):
            return None
        device = model.tok_embeddings.weight.device
        rank = fabric.global_rank if fabric is not None else 0  # each process's rows their own draws
        seed = random.Random(f"{self.seed}:{step}:{rank}").getrandbits(63)
        generator = torch.Generator(device=device).manual_seed(seed)
        return self.respond(fabric, model, items, "prompt", None, self.config.sample_temperature,
                            self.config.max_new_tokens, generator)

    def respond(self, fabric: Any, model: nn.Module, items: Dict[int, Dict[str, torch.Tensor]], prompt: str,
                aligners: Any, temperature: float, max_new_tokens: int,
                generator: Optional[torch.Generator] = None) -> Dict[int, Dict[str, torch.Tensor]]:
        """`items` with each response replaced by the model's continuation of the item's `prompt` field ("prompt":
        the student's, "teacher_prompt": the teacher's) with `aligners` (None: the attached Aligner; `generate`'s
        meaning), at most `max_new_tokens`, cut as `rollout` says."""
        keys = list(items)
        rooms = [self.max_seq_length - max(len(items[k]["prompt"]), len(items[k]["teacher_prompt"])) for k in keys]
        ends = [response_end(items[k]["response"], self.end_id) for k in keys]
        responses, _ = write_responses(fabric, model, [items[k][prompt] for k in keys], rooms, ends, max_new_tokens,
                                       temperature, self.stop_ids, aligners, generator)
        return {k: items[k] if r is None else {**items[k], "response": r} for k, r in zip(keys, responses)}

    def prepare(self, run: Any) -> None:
        """With every step on-policy, the training rows' responses are never read: each becomes the end token alone
        (batches are then grouped by prompt length, and a file of prompts trains exactly as the same prompts with
        answers). Prompt-only held-out rows get the teacher's greedy answers, written once, so that every validation
        scores the student on the same text, as it would on a file of the teacher's answers."""
        if self.on_policy_only:
            run.train = TokenizedDataset.from_rows("distill", [(p, response_end(r, self.end_id), tp)
                                                               for p, r, tp in run.train.rows()])
        info = run.info.get("val_info") or run.info  # a --val-data file's, else the training file's split
        if info.get("format") != "prompt_only" or not len(run.val):
            return
        run.val = self.teacher_answers(run.fabric, run.model, run.val, run.cfg.train.micro_batch_size,
                                       self.config.max_new_tokens)
        tokens = int(run.val.fields["response"].lengths().sum())
        run.info["val_responses"] = TEACHER_ANSWERS
        run.fabric.print(f"validation: the teacher answered the {len(run.val):,} held-out prompts (greedy, up to "
                         f"{self.config.max_new_tokens} new tokens; {tokens:,} response tokens), once")

    def teacher_answers(self, fabric: Any, model: nn.Module, data: TokenizedDataset, batch_size: int,
                        max_new_tokens: int) -> TokenizedDataset:
        """`data` with each response the teacher's greedy answer to the row's teacher prompt (batches of
        `batch_size` rows in order; `respond`'s limits): what prompt-only rows are scored on."""
        answered: Dict[int, Dict[str, torch.Tensor]] = {}
        for s in range(0, len(data), batch_size):
            items = {i: data[i] for i in range(s, min(len(data), s + batch_size))}
            answered.update(self.respond(fabric, model, items, "teacher_prompt", self.teacher, 0.0, max_new_tokens))
        return TokenizedDataset.from_rows("distill", [tuple(answered[i][f] for f in KIND_FIELDS["distill"])
                                                      for i in range(len(data))])

    def collate(self, items: Sequence[Dict[str, torch.Tensor]], step: Optional[int] = None) -> Batch:
        batch = super().collate(items, step)
        teacher = pad_rows([(it["teacher_prompt"], it["response"]) for it in items], self.pad_id)
        batch["teacher_input_ids"], batch["teacher_labels"] = teacher["input_ids"], teacher["labels"]
        return batch

    def __call__(self, model: nn.Module, batch: Batch) -> Dict[str, torch.Tensor]:
        with torch.no_grad():
            teacher = model(batch["teacher_input_ids"], aligner=self.teacher, return_hidden=True)
        student = model(batch["input_ids"], aligner=self.aligner, return_hidden=True)  # (B, T, C)
        loss, agreement = distillation_loss(student, teacher, model.lm_head_weight, batch["labels"],
                                            batch["teacher_labels"], self.config.beta, self.config.temperature,
                                            self.chunk_size)
        return {"loss": loss, "agreement": agreement}

    @classmethod
    def data_arguments(cls, cfg: Any) -> Dict[str, Any]:
        return {"teacher_system": cfg.distill.system_text(cfg.data is None),
                "prompt_only": lmbda(cfg.distill) >= 1}  # every response the student's

    @classmethod
    def from_run(cls, cfg: Any, run: Any) -> "Distill":
        teacher: Reference = False
        if cfg.distill.teacher_aligner is not None:
            from lit_aligner.aligner_files import load_aligner

            aligner, _ = load_aligner(cfg.distill.teacher_aligner, run.model, base_name=str(cfg.checkpoint_dir))
            teacher = as_reference(aligner, run.fabric.device)
        from lit_aligner.data.tokenize import end_token
        from lit_aligner.prompts import get_template

        return cls(run.tokenizer.pad_id, cfg.train.chunk_size, teacher, cfg.distill,
                   cfg.distill.system_text(cfg.data is None), cfg.data_options.max_seq_length,
                   run.tokenizer.stop_ids, cfg.train.seed, end_token(get_template(run.template), run.tokenizer))

    def metadata(self) -> Dict[str, Any]:
        return {"distill": self.config.recorded(self.system)}

    def final_report(self, cfg: Any, run: Any, result: Any) -> Optional[Dict[str, Any]]:
        """The held-out divergence and agreement of the bare base (the student before training), of the --init-aligner
        the run started from (if any) and of the Aligner; with --compare (default: on the default dataset) greedy
        answers of teacher, base (init) and Aligner side by side."""
        from lit_aligner.training.state import is_sharded

        if run.fabric.global_rank != 0 or not len(run.val) or is_sharded(run.fabric):
            return None
        from lit_aligner.evaluation import figures_line, prompt_question

        before, init, after = self.heldout_before_after(cfg, run, result)
        # (report key suffix, label, aligner, held-out metrics)
        systems = [("before", "base", False, before), ("after", "with Aligner", run.model.aligner, after)]
        if init is not None:
            systems.insert(1, ("init", "init Aligner", run.start, init))
        report: Dict[str, Any] = {"val_rows": len(run.val)}
        for key, _, _, m in systems:
            report.update({f"divergence_{key}": m["loss"], f"agreement_{key}": m["agreement"]})

        def line(key: str, fmt: str) -> str:  # a report figure of every system
            return figures_line([(label, report[f"{key}_{k}"]) for k, label, _, _ in systems], fmt)

        closed = 1 - after["loss"] / before["loss"] if before["loss"] > 0 else float("nan")
        divergence = "forward KL" if self.config.beta == 0 else f"beta {self.config.beta:g}"
        lines = ["", "=== the context's effect, learned (all held-out rows) ===",
                 f"divergence from the teacher:  {line('divergence', '.4f')}   "
                 f"({closed:.0%} of the base's closed; {divergence}, nats per response token)",
                 f"top-1 agreement:              {line('agreement', '.1%')}"]
        compare = cfg.compare if cfg.compare is not None else cfg.data is None
        if compare:
            from lit_aligner.generation import generate
            from lit_aligner.perf import compile_flag

            items = [run.val[i] for i in range(min(cfg.compare_prompts, len(run.val)))]
            answers = {}
            compile = compile_flag("auto", run.model.tok_embeddings.weight.device,
                                   (1 + len(systems)) * cfg.compare_max_new_tokens)  # few answers: eager pays
            for name, prompts, aligner in (("teacher", [it["teacher_prompt"] for it in items], self.teacher),
                                           *((label, [it["prompt"] for it in items], a) for _, label, a, _ in systems)):
                ids = generate(run.model, prompts, cfg.compare_max_new_tokens, temperature=0.0,
                               stop_ids=sorted(run.tokenizer.stop_ids), aligners=aligner, compile=compile)
                answers[name] = [run.tokenizer.decode(x, skip_special=True).strip() for x in ids]
            run.model.clear_caches()
            for key, label, _, _ in systems:
                report[f"same_answer_{key}"] = sum(a == t for a, t in zip(answers[label], answers["teacher"])) / len(
                    items)
            lines.append(f"greedy answer = the teacher's: {line('same_answer', '.0%')}   "
                         f"({len(items)} prompts, up to {cfg.compare_max_new_tokens} new tokens)")
            for i in range(min(3, len(items))):
                lines.append(f"--- sample {i + 1}: {prompt_question(run.tokenizer.decode(items[i]['prompt'], True))}")
                lines += [f"  {name}: {answers[name][i]!r}" for name in answers]
            report["answers"] = answers
        run.fabric.print("\n".join(lines))
        return report
