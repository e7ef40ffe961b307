"""Direct Preference Optimization (DPO) of an Aligner with ONE copy of the base model in memory.

The policy is the frozen base + the trainable Aligner (`model.aligner`); the reference is the *same* base weights
steered by a second, frozen Aligner (`model(x, aligner=reference)`) or by none (`aligner=False`: the bare base). The
paper's code loaded two full model copies on two GPUs for this; here the reference costs one Aligner (N x n_embd + a
few gates) and a forward pass under `torch.no_grad()` - or nothing per step with precomputed reference log-probs.

Batches come from `lit_aligner.data.collate_preference`: (2B, T) rows, prompt+chosen first, then prompt+rejected, so
one forward pass scores both halves. Log-probs are summed over response tokens only (`losses.sequence_logprobs`).

With h = (log pi(c) - log ref(c)) - (log pi(r) - log ref(r)) (nats):
    sigmoid: -(1 - eps) * logsigmoid(beta * h) - eps * logsigmoid(-beta * h)     (eps = label smoothing: cDPO)
    ipo:     (h - 1 / (2 * beta)) ** 2
Implicit rewards: beta * (log pi - log ref) for chosen and rejected; reward accuracy = mean(chosen > rejected), a tie
counting 1/2 (so a policy equal to its reference scores 0.5, chance).

`run_dpo(DPORunConfig)` is the whole `finetune/aligner_dpo.py` run (training or --eval-only).
"""

import hashlib
import os
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from lit_aligner.data import collate_preference
from lit_aligner.losses import DEFAULT_CHUNK_SIZE, sequence_logprobs
from lit_aligner.model import Aligner, LLaMA
from lit_aligner.train import BaseRunConfig

LOSSES = ("sigmoid", "ipo")
# The reference argument of the functions below: a frozen Aligner, or False for the bare base.
Reference = Union[Aligner, bool]
REFERENCE_FILE = "reference_logprobs.safetensors"
METRIC_NAMES = ("loss", "reward_accuracy", "chosen_reward", "rejected_reward", "reward_margin")


class DPOError(ValueError):
    """Unusable DPO input (bad options, a stale reference cache, ...): the message names the file and the fix."""


@dataclass
class DPOConfig:
    beta: float = 0.1
    loss: str = "sigmoid"
    label_smoothing: float = 0.0

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise DPOError(f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if not self.beta > 0:
            raise DPOError(f"--beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise DPOError(f"--label-smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.loss == "ipo" and self.label_smoothing:
            raise DPOError("--label-smoothing applies to the sigmoid loss only (cDPO); drop it with --loss ipo")


# ---------------------------------------------------------------------------------------------------------------------
# The loss


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, loss: str = "sigmoid",
             label_smoothing: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO loss. All inputs (B,) summed response log-probs (nats). Returns (losses (B,), chosen_rewards (B,),
    rejected_rewards (B,)); the rewards are beta * (policy - reference) and carry no gradient."""
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise DPOError(f"unknown DPO loss {loss!r}; one of {', '.join(LOSSES)}")
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


def pair_metrics(losses: torch.Tensor, chosen_rewards: torch.Tensor,
                 rejected_rewards: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Batch sums (not means, so that batches of different sizes average correctly) of the METRIC_NAMES, plus
    "pairs" (the count). Divide by "pairs" with `finish_metrics`."""
    return {
        "loss": losses.detach().float().sum(),
        # a tie counts half: the untrained policy (== reference) then scores exactly chance, 0.5
        "reward_accuracy": ((chosen_rewards > rejected_rewards).float()
                            + 0.5 * (chosen_rewards == rejected_rewards).float()).sum(),
        "chosen_reward": chosen_rewards.float().sum(),
        "rejected_reward": rejected_rewards.float().sum(),
        "reward_margin": (chosen_rewards - rejected_rewards).float().sum(),
        "pairs": torch.tensor(float(losses.numel()), device=losses.device),
    }


def finish_metrics(sums: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """Sums from `pair_metrics` (possibly added over batches) -> means per pair (floats)."""
    n = float(sums["pairs"])
    return {k: float(sums[k]) / max(n, 1.0) for k in METRIC_NAMES} | {"pairs": int(n)}


def add_metrics(total: Optional[Dict[str, torch.Tensor]], new: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    if total is None:
        return {k: v.detach().clone() for k, v in new.items()}
    return {k: total[k] + new[k].detach() for k in total}


# ---------------------------------------------------------------------------------------------------------------------
# Log-probs of policy and reference on one base


def response_logprobs(model: LLaMA, input_ids: torch.Tensor, labels: torch.Tensor, aligner=None,
                      chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """(N,) summed log-probs (fp32, nats) of each row's response tokens (labels != -100) given its prompt.
    input_ids, labels: (N, T). aligner: None (the policy: `model.aligner`), an Aligner, or False (bare base)."""
    hidden = model(input_ids, aligner=aligner, return_hidden=True)  # (N, T, C)
    return sequence_logprobs(hidden, model.lm_head_weight, labels, chunk_size)


@torch.no_grad()
def reference_logprobs(model: LLaMA, input_ids: torch.Tensor, labels: torch.Tensor, reference: Reference,
                       chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """(N,) reference log-probs: the same base with the frozen `reference` Aligner (or False: none), no graph."""
    return response_logprobs(model, input_ids, labels, reference if reference is not False else False, chunk_size)


def as_reference(aligner: Optional[Aligner], device=None) -> Reference:
    """A frozen, private copy of `aligner` to serve as the reference (False for None: the bare base). Copying matters
    when the policy starts from the same Aligner: training it in place would otherwise move the reference too."""
    from lit_aligner.aligner import build_aligner

    if aligner is None:
        return False
    ref = build_aligner(aligner.n_tokens, aligner.start_layer, aligner.n_layer, aligner.n_head, aligner.n_embd,
                        aligner.prefix.detach().clone(), aligner.gate.detach().clone())
    ref.requires_grad_(False)
    if device is not None:
        ref = ref.to(device)
    return ref


def dpo_step_loss(model: LLaMA, batch: Dict[str, torch.Tensor], reference: Reference, config: DPOConfig,
                  chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Loss (mean over pairs, scalar with a graph to the policy Aligner) and metric sums for one batch.

    batch: {"input_ids": (2B, T), "labels": (2B, T)} from `collate_preference` (chosen rows first), optionally
    "ref_logps": (2B,) precomputed reference log-probs (then the reference pass is skipped)."""
    input_ids, labels = batch["input_ids"], batch["labels"]
    B = input_ids.shape[0] // 2
    if input_ids.shape[0] != 2 * B or B == 0:
        raise DPOError(f"a DPO batch needs 2B rows (chosen then rejected), got {input_ids.shape[0]}")
    ref = batch.get("ref_logps")
    if ref is None:
        ref = reference_logprobs(model, input_ids, labels, reference, chunk_size)
    ref = ref.to(device=input_ids.device, dtype=torch.float32)
    pol = response_logprobs(model, input_ids, labels, None, chunk_size)
    losses, cr, rr = dpo_loss(pol[:B], pol[B:], ref[:B], ref[B:], config.beta, config.loss, config.label_smoothing)
    return losses.mean(), pair_metrics(losses, cr, rr)


@torch.no_grad()
def evaluate_dpo(model: LLaMA, dataset: Dataset, reference: Reference, config: DPOConfig, pad_id: int,
                 batch_size: int = 4, max_batches: Optional[int] = None, max_length: Optional[int] = None,
                 chunk_size: int = DEFAULT_CHUNK_SIZE) -> Dict[str, float]:
    """Mean loss, reward accuracy, chosen/rejected rewards and margin over (up to max_batches batches of) the pairs of
    `dataset` (items as from `PreferenceDataset`, optionally with precomputed "ref_chosen"/"ref_rejected")."""
    was_training = model.training
    model.eval()
    device = model.tok_embeddings.weight.device
    total = None
    n = len(dataset)
    for bi, start in enumerate(range(0, n, batch_size)):
        if max_batches is not None and bi >= max_batches:
            break
        batch = collate_dpo([dataset[i] for i in range(start, min(n, start + batch_size))], pad_id, max_length)
        batch = {k: v.to(device) for k, v in batch.items()}
        _, sums = dpo_step_loss(model, batch, reference, config, chunk_size)
        total = add_metrics(total, sums)
    model.train(was_training)
    if total is None:
        raise DPOError("no preference pairs to evaluate (the validation split is empty; raise --val-fraction)")
    return finish_metrics(total)


# ---------------------------------------------------------------------------------------------------------------------
# Precomputed reference log-probs


class WithReference(Dataset):
    """A preference dataset whose items also carry "ref_chosen" and "ref_rejected" (0-dim fp32 tensors)."""

    def __init__(self, dataset: Dataset, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor):
        if not len(dataset) == len(ref_chosen) == len(ref_rejected):
            raise DPOError(f"{len(ref_chosen)} reference log-probs for {len(dataset)} pairs")
        self.dataset, self.ref_chosen, self.ref_rejected = dataset, ref_chosen, ref_rejected

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        return {**self.dataset[i], "ref_chosen": self.ref_chosen[i], "ref_rejected": self.ref_rejected[i]}


def collate_dpo(batch, pad_id: Optional[int], max_length: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """`collate_preference` + "ref_logps" (2B,) (chosen first) when the items carry precomputed reference log-probs."""
    out = collate_preference(batch, pad_id, max_length)
    if "ref_chosen" in batch[0]:
        out["ref_logps"] = torch.stack([it["ref_chosen"] for it in batch] + [it["ref_rejected"] for it in batch])
    return out


@torch.no_grad()
def precompute_reference(model: LLaMA, dataset: Dataset, reference: Reference, pad_id: int, batch_size: int = 4,
                         max_length: Optional[int] = None,
                         chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference log-probs of every pair, once: (ref_chosen (n,), ref_rejected (n,)) fp32 on the CPU. Rows are
    scored exactly as in training (same collation, same truncation), so the cached values equal the on-the-fly ones."""
    device = model.tok_embeddings.weight.device
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]
        batch = collate_preference(items, pad_id, max_length)
        lp = reference_logprobs(model, batch["input_ids"].to(device), batch["labels"].to(device), reference,
                                chunk_size).cpu()
        chosen.append(lp[:len(items)])
        rejected.append(lp[len(items):])
    model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


def dataset_fingerprint(dataset: Dataset, max_length: Optional[int] = None) -> str:
    """A hash of every pair's token ids (+ the truncation length): a cache only fits the data it was computed on."""
    h = hashlib.sha256(str(max_length).encode())
    for i in range(len(dataset)):
        it = dataset[i]
        for k in ("prompt_ids", "chosen_ids", "rejected_ids"):
            h.update(it[k].to(torch.int32).numpy().tobytes())
            h.update(b"|")
    return h.hexdigest()[:24]


def reference_fingerprint(reference: Reference) -> str:
    """A hash of the reference Aligner's values ("none" for the bare base)."""
    if reference is False:
        return "none"
    h = hashlib.sha256()
    for t in (reference.prefix, reference.gate):
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:24]


def save_reference_cache(path: Union[str, Path], splits: Dict[str, Tuple[torch.Tensor, torch.Tensor]],
                         metadata: Dict[str, str]) -> Path:
    """Write {split: (ref_chosen, ref_rejected)} to a safetensors file ("{split}_chosen", "{split}_rejected") with
    string `metadata` (fingerprints of the data and the reference, base name)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"{s}_{k}": t.contiguous() for s, pair in splits.items() for k, t in zip(("chosen", "rejected"), pair)}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={k: str(v) for k, v in metadata.items()})
    tmp.replace(path)
    return path


def load_reference_cache(path: Union[str, Path], expected: Dict[str, str],
                         splits: Iterable[str] = ("train", "val")) -> Optional[Dict[str, Tuple[torch.Tensor, ...]]]:
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
            return {s: (f.get_tensor(f"{s}_chosen"), f.get_tensor(f"{s}_rejected")) for s in splits}
    except Exception:  # unreadable or missing a split: recompute rather than fail
        return None


# ---------------------------------------------------------------------------------------------------------------------
# Aligner files for --init-aligner / --reference-aligner


def load_any_aligner(path: Union[str, Path], model: LLaMA) -> Tuple[Aligner, Dict[str, str]]:
    """An Aligner from our `.safetensors` or directly from a paper `.pth` (imported in memory), checked against the
    loaded base and moved to its device (dtype of the base weights). Raises AlignerFileError naming the file."""
    from lit_aligner.aligner import check_compatible, import_paper_checkpoint, load_aligner

    path = Path(path)
    p = model.tok_embeddings.weight
    if path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        aligner, meta = import_paper_checkpoint(path)
        aligner = aligner.to(device=p.device, dtype=p.dtype)
    else:
        aligner, meta = load_aligner(path, p.device, p.dtype)
    check_compatible(aligner, model.config, path)
    return aligner, meta


def resolve_reference(spec: Optional[str], init_aligner: Optional[Aligner], model: LLaMA) -> Tuple[Reference, str]:
    """The reference for `--reference-aligner`: None (flag not given) → a frozen copy of the init Aligner if there
    is one, else the bare base; "none" → the bare base; a path → that Aligner file (frozen). Returns (reference,
    a description for metadata: "none", "init:<...>" or the path)."""
    if spec is None:
        if init_aligner is None:
            return False, "none"
        return as_reference(init_aligner), "init"
    if str(spec).lower() == "none":
        return False, "none"
    aligner, _ = load_any_aligner(spec, model)
    return as_reference(aligner), str(spec)


def is_finite_metrics(metrics: Dict[str, float]) -> bool:
    return all(math.isfinite(v) for v in metrics.values() if isinstance(v, float))


# ---------------------------------------------------------------------------------------------------------------------
# The training loop: the pieces of lit_aligner.train (schedule, data order, micro-batches over ranks, checkpoints that
# resume, signals, metrics CSV) with the DPO objective and its reward metrics.

DPO_METRIC_FIELDS = ("step", "train_loss", "val_loss", "reward_accuracy", "reward_margin", "chosen_reward",
                     "rejected_reward", "train_reward_accuracy", "train_reward_margin", "lr", "pairs_per_sec",
                     "elapsed_s")


def dpo_objective(reference: Reference, config: DPOConfig, chunk_size: int = DEFAULT_CHUNK_SIZE):
    """loss_fn(model, batch) -> (summed DPO loss over the batch's pairs, metric sums), for `train.Objective`: the
    reference and the policy pass both run inside the one forward that Fabric sees."""

    def loss_fn(model, batch):
        mean, sums = dpo_step_loss(model, batch, reference, config, chunk_size)
        return mean * sums["pairs"], sums

    return loss_fn


@torch.no_grad()
def evaluate_module(fabric, module, dataset, collate, micro_batch_size: int, max_batches: int = 0) -> Dict[str, float]:
    """Validation metrics (means per pair) of `module` (an Objective over `dpo_objective`): rank r scores pairs r,
    r+W, ... (the first max_batches micro-batches; 0 = all); the sums are all-reduced over ranks."""
    rank, world = fabric.global_rank, fabric.world_size
    mine = list(range(rank, len(dataset), world))
    batches = [mine[i:i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]
    if max_batches:
        batches = batches[:max_batches]
    was_training = module.training
    module.eval()
    total = None
    for idx in batches:
        batch = {k: v.to(fabric.device) for k, v in collate([dataset[i] for i in idx]).items()}
        total = add_metrics(total, module(batch)[1])
    module.train(was_training)
    if total is None:
        raise DPOError("no preference pairs to evaluate (the validation split is empty; raise --val-fraction)")
    if world > 1:
        keys = list(total)
        stacked = fabric.all_reduce(torch.stack([total[k].double() for k in keys]), reduce_op="sum")
        total = dict(zip(keys, stacked))
    return finish_metrics(total)


def train_dpo(fabric, module, optimizer, aligner: Aligner, train, val, collate, train_config, out_dir,
              start_step: int = 0, extra_state: Optional[Dict[str, Any]] = None, progress: bool = True,
              on_save=None):
    """DPO steps start_step .. max_steps - 1 of `aligner` (the only trainable weights of `module`, a Fabric-set-up
    `train.Objective(model, dpo_objective(...))`). Each step draws train_config.global_batch_size pairs (the data
    order of `train.global_batch_indices`: a resumed run replays the same batches), split over ranks and
    micro-batches; the loss is the mean over the global batch. Every eval_interval steps (and at the end) the
    validation metrics (loss, reward accuracy, rewards, margin) go to OUT/metrics.csv and the progress bar; every
    save_interval steps, at the end and on SIGINT/SIGTERM a resumable checkpoint OUT/checkpoints/step-XXXXXX.pt (+
    last.pt) is written and on_save(step) is called (e.g. to write the Aligner file).
    Returns {"step", "stopped", "val" (last validation metrics), "first_val", "seconds"}."""
    import dataclasses
    import sys
    import time

    from lit_aligner.train import (CHECKPOINT_VERSION, GracefulStop, MetricsLogger, aligner_tensors,
                                   atomic_torch_save, capture_rng_state, checkpoint_path, global_batch_indices,
                                   gradient_accumulation_steps, lr_at, optimizer_state, rank_micro_batches)

    config = train_config
    config.check()
    rank, world = fabric.global_rank, fabric.world_size
    accum = gradient_accumulation_steps(config.global_batch_size, config.micro_batch_size, world)
    del accum  # the micro-batches of a step come from rank_micro_batches; the check above is what matters
    out_dir = Path(out_dir)
    logger = MetricsLogger(out_dir, enabled=rank == 0, resume_step=start_step or None, fields=DPO_METRIC_FIELDS)
    t_start = time.perf_counter()

    def evaluate():
        return evaluate_module(fabric, module, val, collate, config.micro_batch_size, config.eval_iters)

    def save(step):
        state = {"version": CHECKPOINT_VERSION, "step": step, "samples_seen": step * config.global_batch_size,
                 "aligner": aligner_tensors(fabric, module, aligner),
                 "optimizer": optimizer_state(fabric, module, optimizer), "rng": capture_rng_state(),
                 "train_config": dataclasses.asdict(config), **(extra_state or {})}
        path = checkpoint_path(out_dir, step)
        if rank == 0:
            atomic_torch_save(state, path)
            atomic_torch_save(state, path.parent / "last.pt")
            if on_save is not None:
                on_save(step)
        fabric.barrier()
        return path

    val_m: Dict[str, float] = {}
    first_val = None
    if len(val) and start_step == 0:
        val_m = first_val = evaluate()
        logger.log({"step": 0, "val_loss": val_m["loss"], **{k: val_m[k] for k in METRIC_NAMES if k != "loss"},
                    "elapsed_s": 0.0})
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.max_steps, initial=start_step, desc="dpo", unit="step", dynamic_ncols=True,
                   file=sys.stderr)
    step, stopped = start_step, None
    module.train()
    with GracefulStop() as stop:
        while step < config.max_steps:
            t0 = time.perf_counter()
            indices = global_batch_indices(len(train), step, config.global_batch_size, config.seed)
            lr = lr_at(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro = rank_micro_batches(indices, rank, world, config.micro_batch_size)
            sums = None
            for j, idx in enumerate(micro):
                batch = {k: v.to(fabric.device) for k, v in collate([train[i] for i in idx]).items()}
                with fabric.no_backward_sync(module, enabled=j < len(micro) - 1):
                    summed, m = module(batch)
                    # mean over the global batch; DDP averages over ranks, hence * world
                    fabric.backward(summed * (world / config.global_batch_size))
                sums = add_metrics(sums, m)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            keys = list(sums)
            flat = torch.stack([sums[k].double() for k in keys] +
                               [torch.tensor(1.0 if stop.requested else 0.0, dtype=torch.float64,
                                             device=fabric.device)])
            if world > 1:
                flat = fabric.all_reduce(flat, reduce_op="sum")
            train_m = finish_metrics(dict(zip(keys, flat[:-1])))
            row = {"step": step, "train_loss": train_m["loss"], "train_reward_accuracy": train_m["reward_accuracy"],
                   "train_reward_margin": train_m["reward_margin"], "lr": lr,
                   "pairs_per_sec": config.global_batch_size / (time.perf_counter() - t0),
                   "elapsed_s": time.perf_counter() - t_start}
            stop_now = float(flat[-1]) > 0
            if len(val) and (step % config.eval_interval == 0 or step == config.max_steps or stop_now):
                val_m = evaluate()
                if not is_finite_metrics(val_m):
                    raise DPOError(f"validation metrics are not finite at step {step} ({val_m}); lower --lr")
                row.update(val_loss=val_m["loss"], **{k: val_m[k] for k in METRIC_NAMES if k != "loss"})
            if step % config.log_interval == 0 or "val_loss" in row or step == config.max_steps:
                logger.log(row)
            if bar is not None:
                post = {"loss": f"{train_m['loss']:.4f}", "acc": f"{train_m['reward_accuracy']:.2f}"}
                if val_m:
                    post.update(val_loss=f"{val_m['loss']:.4f}", val_acc=f"{val_m['reward_accuracy']:.2f}")
                bar.set_postfix(post, refresh=False)
                bar.update(1)
            if step % config.save_interval == 0 or step == config.max_steps or stop_now:
                save(step)
            if stop_now:
                stopped = stop.requested or "signal"
                break
    if bar is not None:
        bar.close()
    logger.close()
    return {"step": step, "stopped": stopped, "val": val_m, "first_val": first_val,
            "seconds": time.perf_counter() - t_start}


# ---------------------------------------------------------------------------------------------------------------------
# A whole run: what `finetune/aligner_dpo.py` calls


@dataclass
class DPORunConfig(BaseRunConfig):
    """Everything one `finetune/aligner_dpo.py` run needs (the flags); `train.global_batch_size` counts PAIRS here,
    `dpo` holds the loss."""

    format: str = "auto"
    preference: str = "safer"
    val_fraction: float = 0.05
    init_aligner: Optional[Path] = None
    reference_aligner: Optional[str] = None  # None: the init Aligner if given, else "none" (the bare base)
    precompute_reference: bool = False
    eval_only: bool = False
    dpo: DPOConfig = field(default_factory=DPOConfig)


def reference_cache_path(data: Optional[Path], out_dir: Path) -> Path:
    """Where --precompute-reference keeps its log-probs: next to a prepared data directory (reused by every run on
    that data; the fingerprints in the file say for which base/reference), else in OUT/."""
    if data is not None and Path(data).is_dir() and os.access(data, os.W_OK):
        return Path(data) / REFERENCE_FILE
    return Path(out_dir) / REFERENCE_FILE


def run_dpo(cfg: DPORunConfig) -> Dict[str, Any]:
    """Set up Fabric, load the base, the data (`load_preference_data`), the init and reference Aligners, then either
    evaluate (cfg.eval_only: returns the metrics) or train with `train_dpo` and save `OUT/aligner.safetensors`
    (metadata: mode "dpo", template, beta, loss, reference). Returns a summary dict. Launches the other processes of a
    multi-device run (Fabric re-runs the calling script for ranks > 0)."""
    import lightning_fabric as L

    from lit_aligner.train import default_precision, make_strategy

    cfg.train.check()
    if cfg.eval_only and cfg.resume:
        raise DPOError("--eval-only evaluates --init-aligner; it does not take --resume")
    precision = cfg.precision or default_precision(cfg.accelerator)
    fabric = L.Fabric(accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes,
                      strategy=make_strategy(cfg.strategy, cfg.devices, cfg.num_nodes), precision=precision)
    fabric.launch()
    return _run_dpo(fabric, cfg, precision)


def _check_dpo_resumable(state: Dict[str, Any], cfg: DPORunConfig, reference_desc: str, path: Path) -> None:
    old = state.get("run_config", {})
    now = {"n_tokens": cfg.n_tokens, "start_layer": cfg.start_layer, "beta": cfg.dpo.beta, "loss": cfg.dpo.loss,
           "reference": reference_desc}
    bad = [f"{k} {old[k]} (now {v})" for k, v in now.items() if k in old and old[k] != v]
    told = state.get("train_config", {})
    bad += [f"--{k.replace('_', '-')} {told[k]} (now {getattr(cfg.train, k)})" for k in ("global_batch_size", "seed")
            if k in told and told[k] != getattr(cfg.train, k)]
    if bad:
        from lit_aligner.train import TrainError

        raise TrainError(f"{path} was written by a run with {', '.join(bad)}; resume with the same flags, or start a "
                         f"new run in another --out-dir.")


def _with_cached_reference(fabric, cfg: DPORunConfig, model: LLaMA, reference: Reference, train, val, pad_id: int,
                           out_dir: Path, base_name: str, precision: str):
    """train/val wrapped in WithReference, the log-probs read from the cache or computed once (rank 0) and saved."""
    path = reference_cache_path(cfg.data, out_dir)
    expected = {"base": base_name, "precision": precision, "reference": reference_fingerprint(reference),
                "train": dataset_fingerprint(train), "val": dataset_fingerprint(val)}
    cached = load_reference_cache(path, expected)
    if cached is None:
        if fabric.global_rank == 0:
            fabric.print(f"precomputing the reference log-probs of {len(train) + len(val)} pairs -> {path}")
            splits = {s: precompute_reference(model, d, reference, pad_id, cfg.train.micro_batch_size,
                                              chunk_size=cfg.train.chunk_size)
                      for s, d in (("train", train), ("val", val))}
            save_reference_cache(path, splits, expected)
        fabric.barrier()
        cached = load_reference_cache(path, expected)
        if cached is None:
            raise DPOError(f"{path}: the reference cache could not be written or read back; check that the folder "
                           f"is writable, or run without --precompute-reference.")
    else:
        fabric.print(f"reference log-probs from {path}")
    return WithReference(train, *cached["train"]), WithReference(val, *cached["val"])


def _run_dpo(fabric, cfg: DPORunConfig, precision: str) -> Dict[str, Any]:
    from lit_aligner.checkpoint import load_config, load_model
    from lit_aligner.data import describe, load_preference_data, storable_info
    from lit_aligner.model import AlignerConfig, mark_only_aligner_as_trainable, num_trainable
    from lit_aligner.tokenizer import Tokenizer
    from lit_aligner.train import (Objective, _plain, check_only_aligner_trainable, save_final_aligner,
                                   default_template, gradient_accumulation_steps, load_training_checkpoint,
                                   precision_dtype, resolve_resume, setup_optimizer)

    checkpoint_dir = Path(cfg.checkpoint_dir)
    model_config = load_config(checkpoint_dir)  # CheckpointError with the conversion command when missing
    out_dir = Path(cfg.out_dir) if cfg.out_dir else Path("out/aligner-dpo") / model_config.name
    if cfg.eval_only:
        if cfg.init_aligner is None and cfg.reference_aligner is None:
            fabric.print("--eval-only without --init-aligner: evaluating a zero-gate Aligner (the bare base) against "
                         "the bare base, the chance baseline (reward accuracy 0.5)")
    else:
        gradient_accumulation_steps(cfg.train.global_batch_size, cfg.train.micro_batch_size, fabric.world_size)
    resume_path = None if cfg.eval_only else resolve_resume(cfg.resume, out_dir)
    state = load_training_checkpoint(resume_path) if resume_path else None

    tokenizer = Tokenizer(checkpoint_dir)
    template = cfg.template or default_template("sft", tokenizer)
    train, val, info = load_preference_data(cfg.data, tokenizer, template, cfg.max_seq_length, cfg.val_fraction,
                                            cfg.train.seed, cfg.skip_bad_rows, cfg.preference, cfg.format)
    template = info.get("template") or template
    fabric.print(describe(info))

    fabric.seed_everything(cfg.train.seed)  # the same fresh prefix on every rank
    dtype = precision_dtype(precision)
    load_device = "cpu" if cfg.strategy == "fsdp" else fabric.device
    init = None
    if cfg.init_aligner is not None:
        model = load_model(checkpoint_dir, load_device, dtype)
        init, _ = load_any_aligner(cfg.init_aligner, model)
        if (init.n_tokens, init.start_layer) != (cfg.n_tokens, cfg.start_layer):
            fabric.print(f"--init-aligner {cfg.init_aligner}: N={init.n_tokens}, start layer {init.start_layer} "
                         f"(the file's shape wins over --n-tokens/--start-layer)")
        cfg.n_tokens, cfg.start_layer = init.n_tokens, init.start_layer
        model.aligner = init
    else:
        if cfg.start_layer >= model_config.n_layer:
            raise DPOError(f"--start-layer {cfg.start_layer} must be < the model's {model_config.n_layer} layers")
        model = load_model(checkpoint_dir, load_device, dtype, AlignerConfig(cfg.n_tokens, cfg.start_layer))
    # the reference is a frozen private copy, taken before any training (or resumed state) touches model.aligner
    reference, reference_desc = resolve_reference(cfg.reference_aligner, init, model)
    if reference is not False:
        reference = reference.to(fabric.device)
    if state is not None:
        _check_dpo_resumable(state, cfg, reference_desc, resume_path)
        with torch.no_grad():
            for name in ("prefix", "gate"):
                saved, param = state["aligner"][name], getattr(model.aligner, name)
                if saved.shape != param.shape:
                    raise DPOError(f"{resume_path}: Aligner {name} {tuple(saved.shape)} does not fit this run's "
                                   f"{tuple(param.shape)}; resume with the same --n-tokens/--start-layer.")
                param.copy_(saved)
    mark_only_aligner_as_trainable(model)
    check_only_aligner_trainable(model)
    fabric.print(f"base {model_config.name} ({checkpoint_dir}), Aligner N={cfg.n_tokens} from layer "
                 f"{cfg.start_layer}{' from ' + str(cfg.init_aligner) if init is not None else ''}: "
                 f"{num_trainable(model):,} trainable parameters; reference: {reference_desc}; {cfg.dpo.loss} loss, "
                 f"beta {cfg.dpo.beta}; precision {precision}, {fabric.world_size} process(es)")

    pad_id = tokenizer.pad_id
    if cfg.precompute_reference:
        train, val = _with_cached_reference(fabric, cfg, model, reference, train, val, pad_id, out_dir,
                                            model_config.name, precision)
    collate = lambda items: collate_dpo(items, pad_id)  # noqa: E731  (rows already fit max_seq_length)
    module = fabric.setup_module(Objective(model, dpo_objective(reference, cfg.dpo, cfg.train.chunk_size)))
    base_summary = {"reference": reference_desc, "init_aligner": str(cfg.init_aligner) if cfg.init_aligner else None,
                    "template": template, "beta": cfg.dpo.beta, "dpo_loss": cfg.dpo.loss}

    if cfg.eval_only:
        if not len(val):
            raise DPOError(f"{cfg.data or 'the default dataset'}: the validation split is empty; raise "
                           f"--val-fraction.")
        metrics = evaluate_module(fabric, module, val, collate, cfg.train.micro_batch_size, cfg.train.eval_iters)
        return {"eval_only": True, **metrics, **base_summary}

    optimizer, start_step = setup_optimizer(fabric, module, cfg.train, state, resume_path)

    run_args = _plain(cfg) | {"reference": reference_desc, "beta": cfg.dpo.beta, "loss": cfg.dpo.loss}
    result = train_dpo(fabric, module, optimizer, model.aligner, train, val, collate, cfg.train, out_dir,
                       start_step=start_step, extra_state={"run_config": run_args, "template": template},
                       progress=cfg.progress)
    summary: Dict[str, Any] = {"out_dir": str(out_dir), "step": result["step"], "stopped": result["stopped"],
                               "seconds": result["seconds"], "val": result["val"], "first_val": result["first_val"],
                               **base_summary}
    if result["stopped"]:
        fabric.print(f"\nstopped by {result['stopped']} after step {result['step']}; continue with the same command "
                     f"plus --resume auto.")
        return summary

    metadata = {"template": template, "mode": "dpo", "n_tokens": cfg.n_tokens, "start_layer": cfg.start_layer,
                "beta": cfg.dpo.beta, "loss": cfg.dpo.loss, "label_smoothing": cfg.dpo.label_smoothing,
                "reference": reference_desc, "init_aligner": base_summary["init_aligner"],
                "created_by": "finetune/aligner_dpo.py", "steps": result["step"], "val": result["val"],
                "training_args": run_args, "data": storable_info(info)}
    aligner_path = save_final_aligner(fabric, module, model.aligner, model_config, out_dir, metadata, result["step"],
                                      result["seconds"])
    summary["aligner"] = str(aligner_path)
    fabric.barrier()
    return summary


# ---------------------------------------------------------------------------------------------------------------------
# What one step costs: DPO (policy + reference on one base) against SFT of as many sequences


def step_peak_memory(model: LLaMA, mode: str, sequences: int, seq_len: int, reference: Reference = False,
                     chunk_size: int = DEFAULT_CHUNK_SIZE, seed: int = 0) -> Dict[str, Any]:
    """Peak memory of ONE optimizer step of `model`'s Aligner (forward, backward, AdamW step) on `sequences` rows of
    `seq_len` random tokens (the first quarter of each row is prompt, without loss): mode "sft" (summed CE) or "dpo"
    (sequences / 2 pairs; the reference pass through the same base under no_grad, then the policy pass). Returns
    {"mode", "sequences", "seq_len", "before_bytes" (memory in use before the step), "peak_bytes", "step_bytes" (peak -
    before: what the step itself adds), "seconds", "method"}. CUDA: allocator figures; CPU: the process's resident set
    (reset VmHWM; see lit_aligner.perf.PEAK_MEMORY_METHOD) - call it in a fresh process, once, for a clean figure."""
    import time

    from lit_aligner.losses import IGNORE_INDEX, chunked_cross_entropy
    from lit_aligner.perf import PEAK_MEMORY_METHOD, peak_memory_bytes, reset_peak_memory

    if mode not in ("sft", "dpo"):
        raise DPOError(f"mode must be sft or dpo, got {mode!r}")
    if mode == "dpo" and sequences % 2:
        raise DPOError(f"a DPO step needs an even number of sequences (chosen + rejected), got {sequences}")
    device = model.tok_embeddings.weight.device
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, model.config.vocab_size, (sequences, seq_len), generator=g).to(device)
    labels = idx.clone()
    labels[:, : seq_len // 4] = IGNORE_INDEX
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    for p in params:  # AdamW state allocated up front: it is part of the steady state, not of the step's peak
        optimizer.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                              "exp_avg_sq": torch.zeros_like(p)}

    def current_bytes() -> int:
        if device.type == "cuda":
            return torch.cuda.memory_allocated(device)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

    before = current_bytes()
    reset_peak_memory(device)
    t0 = time.perf_counter()
    if mode == "sft":
        loss = chunked_cross_entropy(model(idx, return_hidden=True), model.lm_head_weight, labels, chunk_size,
                                     reduction="sum")
    else:
        loss, _ = dpo_step_loss(model, {"input_ids": idx, "labels": labels}, reference, DPOConfig(), chunk_size)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    peak = peak_memory_bytes(device)
    return {"mode": mode, "sequences": sequences, "seq_len": seq_len, "before_bytes": before, "peak_bytes": peak,
            "step_bytes": peak - before, "seconds": seconds, "method": PEAK_MEMORY_METHOD[device.type]}
