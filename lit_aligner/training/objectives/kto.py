"""Kahneman-Tversky Optimization (KTO) of an Aligner on unpaired completions: each row is one answer to a prompt and a
label (desirable or not), as thumbs-up / thumbs-down feedback gives them; a preference file trains it too (each pair
is two rows). The reference runs through the same base as DPO's does (`dpo.run_reference`).

The loss is `losses.kto_loss`: a desirable answer's log-ratio to the reference is pushed above z, an undesirable one's
below, where z estimates KL(pi || ref) from mismatched rows: row i's prompt with row i-1's completion, within the
micro-batch, as the KTO paper and TRL's KTOTrainer build them (so --micro-batch-size must be at least 2): the
mismatched completions of a micro-batch are its own matched ones. With --precompute-reference each row's partner is
fixed before training instead (`WithPartners`: a row of another prompt, drawn by seed), so that the reference
log-probs of both rows can be computed once. A batch holds the B matched rows, then the B mismatched ones; only the
matched rows' policy pass carries a graph.
"""

from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from lit_aligner.data.dataset import pad_rows
from lit_aligner.losses import DEFAULT_CHUNK_SIZE, kto_loss
from lit_aligner.training.config import KTOLossConfig
from lit_aligner.training.objectives import Batch, register
from lit_aligner.training.objectives.dpo import Reference, ReferenceObjective, response_logprobs, run_reference


@register
class KTO(ReferenceObjective):
    """Summed KTO losses over a batch's completions; units are completions. Metrics (sums; means per completion after
    the engine divides): loss, kl (the estimate z), reward_accuracy (a desirable completion's reward above beta x z,
    KTO's reference point, an undesirable one's below; a tie counts 1/2), reward (beta x log-ratio), logp."""

    name = "kto"
    data_kind = "unpaired"
    unit = "completions"
    metric_names = ("loss", "kl", "reward_accuracy", "reward", "logp")
    reference_file = "reference_logprobs_kto.safetensors"
    seed = 42  # a run's --seed (`from_run`): the order --precompute-reference draws the partners from

    def __init__(self, pad_id: int, chunk_size: int = DEFAULT_CHUNK_SIZE, reference: Reference = False,
                 config: KTOLossConfig = KTOLossConfig(), reference_desc: str = "none"):
        super().__init__(pad_id, chunk_size, reference, config, reference_desc)

    @property
    def reference_names(self):
        return ("completion", "kl") if self.config.loss == "kto" else ("completion",)

    def collate(self, items: Sequence[Dict[str, torch.Tensor]], step: Optional[int] = None) -> Batch:
        rows = [(it["prompt"], it["completion"]) for it in items]
        if self.config.loss == "kto":
            if "kl_completion" in items[0]:  # each row's fixed partner (`WithPartners`: --precompute-reference)
                rows += [(it["prompt"], it["kl_completion"]) for it in items]
            else:
                longest = max(len(p) + len(c) for p, c in rows)  # cut to fit where the matched rows fit
                rows += [(p, items[i - 1]["completion"][:max(1, longest - len(p))]) for i, (p, _) in enumerate(rows)]
        batch = pad_rows(rows, self.pad_id)
        batch["desirable"] = torch.tensor([bool(it["label"][0]) for it in items])
        ref = self.cached_reference(items)  # precomputed reference log-probs (--precompute-reference)
        if ref is not None:
            batch["ref_logps"] = ref
        return batch

    def units(self, item: Dict[str, torch.Tensor], step: Optional[int] = None) -> int:
        return 1

    def __call__(self, model: nn.Module, batch: Batch) -> Dict[str, torch.Tensor]:
        input_ids, labels, desirable = batch["input_ids"], batch["labels"], batch["desirable"]
        B, c = desirable.shape[0], self.config  # (a last micro-batch of one row is its own mismatched row)
        with torch.no_grad():  # the reference on every row; the policy on the mismatched rows (z has no gradient)
            ref = batch.get("ref_logps")
            ref = response_logprobs(model, input_ids, labels, self.reference, self.chunk_size) if ref is None else \
                ref.to(device=input_ids.device, dtype=torch.float32)
            kl = response_logprobs(model, input_ids[B:], labels[B:], self.aligner, self.chunk_size) \
                if input_ids.shape[0] > B else None
        pol = response_logprobs(model, input_ids[:B], labels[:B], self.aligner, self.chunk_size)
        losses, rewards, z = kto_loss(pol, ref[:B], kl, ref[B:] if kl is not None else None,
                                      desirable.to(pol.device), c.beta, c.loss, c.desirable_weight,
                                      c.undesirable_weight, self._across_processes)
        above = rewards - c.beta * z  # KTO's reference point: beta x the KL estimate
        right = torch.where(desirable.to(pol.device), above > 0, above < 0).float()
        return {"loss": losses.float().sum(), "kl": z.float() * B,
                "reward_accuracy": torch.where(above == 0, 0.5, right).sum(),
                "reward": rewards.float().sum(), "logp": pol.detach().float().sum()}

    def _across_processes(self, z: torch.Tensor) -> torch.Tensor:
        """The mean of every process's z (TRL's gather): each process runs as many micro-batches, in step, the
        engine's evaluation included."""
        fabric = self.fabric
        if fabric is None or fabric.world_size == 1:
            return z
        return fabric.all_reduce(z, reduce_op="mean")

    @classmethod
    def from_run(cls, cfg: Any, run: Any) -> "KTO":
        reference, desc = run_reference(cfg, run)
        objective = cls(run.tokenizer.pad_id, cfg.train.chunk_size, reference, cfg.kto, desc).follow(cfg)
        objective.seed = cfg.train.seed
        return objective

    def prepare(self, run: Any) -> None:
        if self.precompute and self.config.loss == "kto":  # fixed partners: their reference log-probs cached too
            run.train, run.val = WithPartners(run.train, self.seed), WithPartners(run.val, self.seed)
        super().prepare(run)


def partners(prompts: Sequence[torch.Tensor], seed: int) -> torch.Tensor:
    """(n,) each row's partner for its mismatched KL row: the previous row in a seeded random order (a cycle),
    skipping further back past rows of the same prompt while another prompt is within 7 places (a preference file
    gives each prompt two rows). A split of one row (or one prompt) pairs within itself: z is then no KL estimate."""
    n = len(prompts)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    key = [p.numpy().tobytes() for p in prompts]
    out = torch.empty(n, dtype=torch.long)
    for k, i in enumerate(order):
        j = next((order[k - d] for d in range(1, min(n, 8)) if key[order[k - d]] != key[i]), order[k - 1])
        out[i] = j
    return out


class WithPartners(Dataset):
    """Unpaired items with "kl_completion": the completion of their partner row (`partners`), fixed for the run. It is
    cut so that the mismatched row is no longer than the longer of the two rows, which keeps it within the run's
    --max-seq-length."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.partner = partners([dataset[i]["prompt"] for i in range(len(dataset))], seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        it, other = self.dataset[i], self.dataset[int(self.partner[i])]
        room = max(len(it["prompt"]) + len(it["completion"]), len(other["prompt"]) + len(other["completion"]))
        return {**it, "kl_completion": other["completion"][:max(1, room - len(it["prompt"]))]}

    def lengths(self) -> torch.Tensor:  # the matched rows' lengths: the same length-grouped order
        return self.dataset.lengths()
