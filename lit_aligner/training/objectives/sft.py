"""Supervised fine-tuning: cross-entropy on the response tokens only; and correction (Q-A-C), the same loss with the
upstream answer as the target during a copy warm-up, then the correction."""

from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from lit_aligner.data.dataset import NO_CONTEXT, pad_rows, target_tokens
from lit_aligner.losses import chunked_cross_entropy
from lit_aligner.training.objectives import Batch, Objective, register


@register
class SFT(Objective):
    """Summed cross-entropy (nats) of the response tokens (outside a conversation's context spans); units are those
    tokens."""

    name = "sft"
    data_kind = "sft"

    def target(self, item: Dict[str, torch.Tensor], step: Optional[int]) -> torch.Tensor:
        return item["response"]

    def row(self, item: Dict[str, torch.Tensor], step: Optional[int]) -> Tuple[torch.Tensor, ...]:
        """The (prompt, response, context) row of an item that a batch holds at `step` (an item built by hand may
        leave out its empty context)."""
        return item["prompt"], item["response"], item.get("context", NO_CONTEXT)

    def collate(self, items: Sequence[Dict[str, torch.Tensor]], step: Optional[int] = None) -> Batch:
        return pad_rows([self.row(it, step) for it in items], self.pad_id)

    def units(self, item: Dict[str, torch.Tensor], step: Optional[int] = None) -> int:
        return target_tokens(self.row(item, step))

    def __call__(self, model: nn.Module, batch: Batch) -> Dict[str, torch.Tensor]:
        hidden = model(batch["input_ids"], aligner=self.aligner, return_hidden=True)  # (B, T, C): no (B, T, V) logits
        return {"loss": chunked_cross_entropy(hidden, model.lm_head_weight, batch["labels"], self.chunk_size,
                                              reduction="sum")}

    def final_report(self, cfg: Any, run: Any, result: Any) -> Optional[Dict[str, Any]]:
        """The before/after comparison (format rate and samples), by default only for the offline default dataset;
        a run from --init-aligner shows that Aligner between the base and the trained one."""
        compare = cfg.compare if cfg.compare is not None else cfg.data is None
        if not compare or run.fabric.global_rank != 0:
            return None
        from lit_aligner.training.state import is_sharded

        if not len(run.val):
            run.fabric.print("note: no before/after comparison: it compares on the validation rows, and there are none")
            return None
        if is_sharded(run.fabric):  # rank 0 alone holds a slice of each weight
            run.fabric.print("note: no before/after comparison under --strategy fsdp; compare the saved Aligner with "
                             "the bare base: python generate/aligner.py --aligner OUT/aligner.safetensors --no-aligner")
            return None
        from lit_aligner.evaluation import compare_before_after, format_comparison

        before, init, after = self.heldout_before_after(cfg, run, result)
        report = compare_before_after(run.model, run.tokenizer, run.val, self, run.model.aligner,
                                      n_prompts=cfg.compare_prompts, max_new_tokens=cfg.compare_max_new_tokens,
                                      val_loss_before=before["loss"], val_loss_after=after["loss"], init=run.start,
                                      val_loss_init=init["loss"] if init else None)
        run.fabric.print(format_comparison(report))
        return report


    def heldout_before_after(self, cfg: Any, run: Any, result: Any
                             ) -> Tuple[Dict[str, float], Optional[Dict[str, float]], Dict[str, float]]:
        """This objective's metrics on every held-out row of the bare base, of the --init-aligner the run started
        from (None without one: continued training is judged against where it started too) and of the trained
        Aligner, under the run's precision like the trainer's validation. The base's are computed here, not taken from
        step 0: that scored fewer rows (--eval-iters), or, resumed, a trained Aligner."""
        from lit_aligner.evaluation import objective_metrics

        run.model.eval()
        mb = cfg.train.micro_batch_size
        with run.fabric.autocast():
            before = objective_metrics(run.model, self, run.val, False, mb)
            init = objective_metrics(run.model, self, run.val, run.start, mb) if run.start is not False else None
            after = result.val if result.val_whole else \
                objective_metrics(run.model, self, run.val, run.model.aligner, mb)
        return before, init, after


def copy_phase_steps(max_steps: int, warmup_copy_ratio: float) -> int:
    """Steps 0 .. n-1 of a correction run train on the identity targets (Q-A-A): n = round(ratio * max_steps)."""
    return int(round(warmup_copy_ratio * max_steps))


@register
class Correction(SFT):
    """Correction (Q-A-C): the prompt shows the question and an upstream answer A; steps < copy_steps target A itself
    (the identity warm-up, Q-A-A), later steps and validation the correction C."""

    name = "correction"
    data_kind = "correction"

    def __init__(self, pad_id: int, chunk_size: int, copy_steps: int = 0):
        super().__init__(pad_id, chunk_size)
        self.copy_steps = copy_steps

    @classmethod
    def from_run(cls, cfg: Any, run: Any) -> "Correction":
        copy_steps = copy_phase_steps(cfg.train.max_steps, cfg.warmup_copy_ratio)
        if copy_steps:
            run.fabric.print(f"correction: identity (Q-A-A) warm-up for steps 1-{copy_steps}, then Q-A-C")
        return cls(run.tokenizer.pad_id, cfg.train.chunk_size, copy_steps)

    @classmethod
    def default_template(cls, tokenizer) -> str:
        return "correction"

    def target(self, item: Dict[str, torch.Tensor], step: Optional[int]) -> torch.Tensor:
        return item["answer"] if step is not None and step < self.copy_steps else item["correction"]

    def row(self, item: Dict[str, torch.Tensor], step: Optional[int]) -> Tuple[torch.Tensor, ...]:
        return item["prompt"], self.target(item, step)

    def metadata(self) -> Dict[str, Any]:
        return {"copy_steps": self.copy_steps}

    def final_report(self, cfg: Any, run: Any, result: Any) -> Optional[Dict[str, Any]]:
        return None  # scripts/eval_correction.py / evaluate/aligner.py correction measure a corrector
