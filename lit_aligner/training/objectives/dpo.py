"""Direct Preference Optimization (DPO) of an Aligner with ONE copy of the base model in memory.

The policy is the frozen base + the trainable Aligner (`model.aligner`); the reference is the *same* base weights
steered by a second, frozen Aligner (`model(x, aligner=reference)`) or by none (`aligner=False`: the bare base). The
paper's code loaded two full model copies on two GPUs for this; here the reference costs one Aligner (N x n_embd + a
few gates) and a forward pass under `torch.no_grad()`, or nothing per step with precomputed reference log-probs.

A batch holds 2B rows: prompt+chosen first, then prompt+rejected, so one forward pass scores both halves; log-probs
are summed over response tokens only (`losses.sequence_logprobs`), the loss is `losses.preference_loss` (DPO's
sigmoid by default, or any of TRL's loss types; the reference-free ones, CPO, SimPO and ORPO, skip the reference
pass).
Implicit rewards: beta * (log pi - log ref) for chosen and rejected; reward accuracy = mean(chosen > rejected), a tie
counting 1/2 (so a policy equal to its reference scores 0.5, chance).
"""

import hashlib
from pathlib import Path
from typing import Any, ClassVar, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from lit_aligner.data.dataset import pad_rows
from lit_aligner.losses import DEFAULT_CHUNK_SIZE, IGNORE_INDEX, preference_loss, sequence_logprobs
from lit_aligner.model import Aligner, LLaMA
from lit_aligner.training.config import DPOLossConfig, TrainError
from lit_aligner.training.objectives import Batch, Objective, Reference, as_reference, register
from lit_aligner.training.state import full_tensor

REFERENCE_FILE = "reference_logprobs.safetensors"


def response_tokens(labels: torch.Tensor) -> torch.Tensor:
    """(N,) each row's response tokens (labels != -100, after the shift): what its log-prob sums over."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(1)


def response_logprobs(model: LLaMA, input_ids: torch.Tensor, labels: torch.Tensor, aligner=None,
                      chunk_size: int = DEFAULT_CHUNK_SIZE, ld_alpha: Optional[float] = None, wpo: bool = False):
    """(N,) summed log-probs (fp32, nats) of each row's response tokens (labels != -100) given its prompt.
    input_ids, labels: (N, T). aligner: None (the policy: `model.aligner`), an Aligner, or False (bare base).
    ld_alpha (LD-DPO, rows = chosen then rejected): the tokens past the shorter response of a pair count ld_alpha
    times, so that a longer answer's extra tokens weigh less in the preference. wpo: also each row's WPO weight,
    ((N,), (N,)) (`losses.sequence_logprobs`)."""
    hidden = model(input_ids, aligner=aligner, return_hidden=True)  # (N, T, C)
    cap = None if ld_alpha is None else shared_lengths(labels)
    return sequence_logprobs(hidden, model.lm_head_weight, labels, chunk_size, cap=cap,
                             tail_weight=1.0 if ld_alpha is None else ld_alpha, wpo=wpo)


def shared_lengths(labels: torch.Tensor) -> torch.Tensor:
    """(2B,) for rows chosen then rejected: each pair's shorter response length, for both of its rows (LD-DPO)."""
    n = response_tokens(labels)
    B = n.shape[0] // 2
    return torch.minimum(n[:B], n[B:]).repeat(2)


@torch.no_grad()
def reference_logprobs(model: LLaMA, input_ids: torch.Tensor, labels: torch.Tensor, reference: Reference,
                       chunk_size: int = DEFAULT_CHUNK_SIZE, ld_alpha: Optional[float] = None) -> torch.Tensor:
    """(N,) reference log-probs: the same base with the frozen `reference` Aligner (or False: none), no graph."""
    return response_logprobs(model, input_ids, labels, reference, chunk_size, ld_alpha)


def run_reference(cfg: Any, run: Any) -> Tuple[Reference, str]:
    """A training run's reference (`--reference-aligner`, see `resolve_reference`) on the run's device. Taken before
    any training (or resumed state) touches model.aligner, so a copy of the init Aligner is the one it started from.
    With --sync-ref-model the reference is an Aligner of the policy's shape, which training moves: the bare base
    becomes a copy of the policy's starting Aligner with zero gates (exactly the base until the first sync)."""
    reference, desc = resolve_reference(cfg.reference_aligner, run.init_aligner, run.model)
    if cfg.sync_ref_model:
        policy = run.model.aligner
        if reference is False:
            reference = as_reference(policy)
            reference.gate.zero_()
        elif (reference.n_tokens, reference.start_layer) != (policy.n_tokens, policy.start_layer):
            raise TrainError(f"--sync-ref-model mixes the policy into the reference, but --reference-aligner {desc} "
                             f"has N={reference.n_tokens} from layer {reference.start_layer} and the policy "
                             f"N={policy.n_tokens} from layer {policy.start_layer}: give a reference of the policy's "
                             f"shape, or none")
        if cfg.ref_model_sync_steps > cfg.train.max_steps:
            raise TrainError(f"--ref-model-sync-steps {cfg.ref_model_sync_steps} is more than this run's "
                             f"{cfg.train.max_steps} steps, so the reference would never move: give at most "
                             f"{cfg.train.max_steps}")
    return (reference if reference is False else reference.to(run.fabric.device)), desc


def resolve_reference(spec: Optional[str], init_aligner: Optional[Aligner], model: LLaMA) -> Tuple[Reference, str]:
    """The reference for `--reference-aligner`: None (flag not given) → a frozen copy of the init Aligner if there
    is one, else the bare base; "none" → the bare base; a path → that Aligner file (ours or a paper .pth; frozen).
    Returns (reference, a description for metadata: "none", "init" or the path)."""
    from lit_aligner.aligner_files import load_aligner

    if spec is None:
        return (False, "none") if init_aligner is None else (as_reference(init_aligner), "init")
    if str(spec).lower() == "none":
        return False, "none"
    aligner, _ = load_aligner(spec, model)
    return as_reference(aligner), str(spec)


class SyncedReference:
    """TR-DPO's sync of an objective's `reference` (DPO, KTO, GRPO's KL): `sync` = (alpha, steps) moves the reference
    toward the policy after every `steps`-th optimizer step, ref = alpha x policy + (1 - alpha) x ref (TRL's
    SyncRefModelCallback), and the run state keeps the moved reference so that a resumed run goes on exactly."""

    sync: Optional[Tuple[float, int]] = None
    reference: Reference = False

    def follow_sync(self, cfg: Any) -> None:
        """Takes a run's --sync-ref-model settings."""
        self.sync = (cfg.ref_model_mixup_alpha, cfg.ref_model_sync_steps) if cfg.sync_ref_model else None

    def after_step(self, step: int, aligner: nn.Module) -> None:
        if self.sync is None or step % self.sync[1]:
            return
        alpha = self.sync[0]
        with torch.no_grad():
            for name in ("prefix", "gate"):  # full_tensor: FSDP's shards of the policy, gathered on every rank
                ref = getattr(self.reference, name)
                ref.mul_(1 - alpha).add_(full_tensor(getattr(aligner, name).detach()).to(ref), alpha=alpha)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        if self.sync is None:
            return {}
        return {f"reference_{name}": getattr(self.reference, name).detach().cpu().clone()
                for name in ("prefix", "gate")}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        if self.sync is None or not state:
            return
        with torch.no_grad():
            for name in ("prefix", "gate"):
                getattr(self.reference, name).copy_(state[f"reference_{name}"])

    def sync_metadata(self) -> Dict[str, Any]:
        return {} if self.sync is None else {"sync_ref_model": True, "ref_model_mixup_alpha": self.sync[0],
                                             "ref_model_sync_steps": self.sync[1]}


class ReferenceObjective(SyncedReference, Objective):
    """What DPO and KTO share: a frozen `reference` through the same base (an Aligner, or False for the bare base),
    named in the metadata; TR-DPO's sync (`SyncedReference`); and --precompute-reference: a batch's rows
    are `reference_names` blocks of B (chosen then rejected; KTO's completions then their mismatched rows), each
    item's reference log-prob of its row in block j cached as item["ref_" + name_j], stacked back in `collate`."""

    precompute = False
    reference_file: ClassVar[str] = REFERENCE_FILE
    reference_names: Tuple[str, ...] = ()

    def __init__(self, pad_id: int, chunk_size: int, reference: Reference, config: Any, reference_desc: str):
        super().__init__(pad_id, chunk_size)
        self.reference, self.config, self.reference_desc = reference, config, reference_desc

    def follow(self, cfg: Any) -> "ReferenceObjective":
        """Takes a run's --sync-ref-model and --precompute-reference settings."""
        self.follow_sync(cfg)
        self.precompute = cfg.precompute_reference
        return self

    def cached_reference(self, items: Sequence[Dict[str, torch.Tensor]]) -> Optional[torch.Tensor]:
        """(len(reference_names) x B,) the items' cached reference log-probs in the batch's row order, or None."""
        if "ref_" + self.reference_names[0] not in items[0]:
            return None
        return torch.stack([it["ref_" + name] for name in self.reference_names for it in items])

    def prepare(self, run: Any) -> None:
        if self.precompute:
            run.train, run.val = with_cached_reference(run, self)

    def metadata(self) -> Dict[str, Any]:
        return {**self.config.settings(), "reference": self.reference_desc, **self.sync_metadata()}


@register
class DPO(ReferenceObjective):
    """Summed DPO losses over the pairs of a batch; units are pairs. Metrics (sums; means per pair after the engine
    divides): loss, reward_accuracy, chosen_reward, rejected_reward, reward_margin, chosen_logp, rejected_logp."""

    name = "dpo"
    data_kind = "preference"
    reference_names = ("chosen", "rejected")
    unit = "pairs"
    metric_names = ("loss", "reward_accuracy", "chosen_reward", "rejected_reward", "reward_margin", "chosen_logp",
                    "rejected_logp")

    def __init__(self, pad_id: int, chunk_size: int = DEFAULT_CHUNK_SIZE, reference: Reference = False,
                 config: DPOLossConfig = DPOLossConfig(), reference_desc: str = "none"):
        super().__init__(pad_id, chunk_size, reference, config, reference_desc)

    def collate(self, items: Sequence[Dict[str, torch.Tensor]], step: Optional[int] = None) -> Batch:
        rows = [(it["prompt"], it[key]) for key in ("chosen", "rejected") for it in items]
        batch = pad_rows(rows, self.pad_id)
        ref = self.cached_reference(items)  # precomputed reference log-probs (see `WithReference`)
        if ref is not None:
            batch["ref_logps"] = ref
        return batch

    def units(self, item: Dict[str, torch.Tensor], step: Optional[int] = None) -> int:
        return 1

    def __call__(self, model: nn.Module, batch: Batch) -> Dict[str, torch.Tensor]:
        input_ids, labels = batch["input_ids"], batch["labels"]
        B = input_ids.shape[0] // 2
        if input_ids.shape[0] != 2 * B or B == 0:
            raise TrainError(f"a DPO batch needs 2B rows (chosen then rejected), got {input_ids.shape[0]}")
        c = self.config
        ref = batch.get("ref_logps")
        if ref is None and not c.reference_free:
            ref = reference_logprobs(model, input_ids, labels, self.reference, self.chunk_size, c.ld_alpha)
        if ref is not None:
            ref = ref.to(device=input_ids.device, dtype=torch.float32)
        pol = response_logprobs(model, input_ids, labels, self.aligner, self.chunk_size, c.ld_alpha, c.use_weighting)
        if c.use_weighting:  # WPO: each pair weighs as likely as the policy finds both of its answers
            pol, weights = pol
        tokens = response_tokens(labels)
        losses, cr, rr = preference_loss(
            pol[:B], pol[B:], None if ref is None else ref[:B], None if ref is None else ref[B:], tokens[:B],
            tokens[B:], c.beta, c.loss, c.loss_weights, c.label_smoothing, c.discopop_tau, c.simpo_gamma,
            c.f_divergence, c.f_alpha, c.alpha)
        if c.use_weighting:
            losses = losses * weights[:B] * weights[B:]
        return {
            "loss": losses.float().sum(),
            # a tie counts half: the untrained policy (== reference) then scores exactly chance, 0.5
            "reward_accuracy": ((cr > rr).float() + 0.5 * (cr == rr).float()).sum(),
            "chosen_reward": cr.float().sum(), "rejected_reward": rr.float().sum(),
            "reward_margin": (cr - rr).float().sum(),
            "chosen_logp": pol[:B].detach().float().sum(), "rejected_logp": pol[B:].detach().float().sum(),
        }

    # --- a training run -----------------------------------------------------------------------------------------

    @classmethod
    def from_run(cls, cfg: Any, run: Any) -> "DPO":
        reference, desc = (False, "none") if cfg.dpo.reference_free else run_reference(cfg, run)
        return cls(run.tokenizer.pad_id, cfg.train.chunk_size, reference, cfg.dpo, desc).follow(cfg)


# ---------------------------------------------------------------------------------------------------------------------
# Precomputed reference log-probs


class WithReference(Dataset):
    """A dataset whose items also carry precomputed reference log-probs: logps = {name: (n,) fp32} -> each item's
    "ref_" + name (0-dim)."""

    def __init__(self, dataset: Dataset, logps: Dict[str, torch.Tensor]):
        for name, t in logps.items():
            if len(t) != len(dataset):
                raise TrainError(f"{len(t)} reference log-probs ({name}) for {len(dataset)} items")
        self.dataset, self.logps = dataset, logps

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        return {**self.dataset[i], **{f"ref_{name}": t[i] for name, t in self.logps.items()}}

    def lengths(self) -> torch.Tensor:  # the same length-grouped order as without the cache
        return self.dataset.lengths()


@torch.no_grad()
def precompute_reference(model: LLaMA, dataset: Dataset, objective: ReferenceObjective,
                         batch_size: int = 4) -> Dict[str, torch.Tensor]:
    """Reference log-probs of every item, once: {name: (n,) fp32 on the CPU} for each of the objective's
    `reference_names` (DPO: chosen, rejected). Rows are collated exactly as in training, so the cached values equal
    the on-the-fly ones."""
    device = model.tok_embeddings.weight.device
    was_training = model.training
    model.eval()
    names = objective.reference_names
    parts: Dict[str, list] = {name: [] for name in names}
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]
        batch = objective.collate(items)
        lp = reference_logprobs(model, batch["input_ids"].to(device), batch["labels"].to(device), objective.reference,
                                objective.chunk_size, getattr(objective.config, "ld_alpha", None)).cpu()
        for j, name in enumerate(names):  # the batch's rows are one block of len(items) per name
            parts[name].append(lp[j * len(items):(j + 1) * len(items)])
    model.train(was_training)
    return {name: torch.cat(p) for name, p in parts.items()}


def dataset_fingerprint(dataset: Dataset) -> str:
    """A hash of every item's token ids (every field, KTO's mismatched completion too): a cache only fits the data it
    was computed on."""
    h = hashlib.sha256()
    for i in range(len(dataset)):
        it = dataset[i]
        for k in sorted(it):
            h.update(k.encode() + b"=" + it[k].to(torch.int32).numpy().tobytes() + b"|")
    return h.hexdigest()[:24]


def reference_fingerprint(reference: Reference) -> str:
    """A hash of the reference Aligner's values ("none" for the bare base)."""
    if reference is False:
        return "none"
    h = hashlib.sha256()
    for t in (reference.prefix, reference.gate):
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:24]


def save_reference_cache(path: Union[str, Path], splits: Dict[str, Dict[str, torch.Tensor]],
                         metadata: Dict[str, str]) -> Path:
    """Write {split: {name: log-probs}} to a safetensors file ("{split}_{name}") with string `metadata`
    (fingerprints of the data and the reference, base name), atomically."""
    from safetensors.torch import save_file

    from lit_aligner.files import atomic_write

    tensors = {f"{s}_{name}": t.contiguous() for s, logps in splits.items() for name, t in logps.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={k: str(v) for k, v in metadata.items()}))


def load_reference_cache(path: Union[str, Path], expected: Dict[str, str], names: Sequence[str],
                         splits: Sequence[str] = ("train", "val")) -> Optional[Dict[str, Dict[str, torch.Tensor]]]:
    """Read a cache written by `save_reference_cache`; None when it is absent or was computed for other data, another
    reference or another base (any `expected` metadata value differs), so the caller recomputes it."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            if any(meta.get(k) != str(v) for k, v in expected.items()):
                return None
            return {s: {name: f.get_tensor(f"{s}_{name}") for name in names} for s in splits}
    except Exception:  # unreadable or missing a split: recompute rather than fail
        return None


def reference_cache_path(data: Optional[Path], out_dir: Path, name: str = REFERENCE_FILE) -> Path:
    """Where --precompute-reference keeps its log-probs: next to a prepared data directory (reused by every run on
    that data; the fingerprints in the file say for which base/reference), else in OUT/."""
    import os

    if data is not None and Path(data).is_dir() and os.access(data, os.W_OK):
        return Path(data) / name
    return Path(out_dir) / name


def with_cached_reference(run: Any, objective: ReferenceObjective):
    """run.train / run.val wrapped in WithReference, the log-probs read from the cache or computed once (rank 0)."""
    fabric = run.fabric
    path = reference_cache_path(run.cfg.data, run.out_dir, objective.reference_file)
    expected = {"base": run.base_config.name, "precision": run.precision,
                "reference": reference_fingerprint(objective.reference),
                "ld_alpha": str(getattr(objective.config, "ld_alpha", None)),
                "train": dataset_fingerprint(run.train), "val": dataset_fingerprint(run.val)}
    names = objective.reference_names
    cached = load_reference_cache(path, expected, names)
    if cached is None:
        if fabric.global_rank == 0:
            fabric.print(f"precomputing the reference log-probs of {len(run.train) + len(run.val)} "
                         f"{objective.unit} -> {path}")
            splits = {s: precompute_reference(run.model, d, objective, run.cfg.train.micro_batch_size)
                      for s, d in (("train", run.train), ("val", run.val))}
            save_reference_cache(path, splits, expected)
        fabric.barrier()
        cached = load_reference_cache(path, expected, names)
        if cached is None:
            raise TrainError(f"{path}: the reference cache could not be written or read back; check that the folder "
                             f"is writable, or run without --precompute-reference.")
    else:
        fabric.print(f"reference log-probs from {path}")
    return WithReference(run.train, cached["train"]), WithReference(run.val, cached["val"])
