"""The training engine: one `fit` and one `evaluate` for every objective (SFT, correction, DPO, ...).

Determinism, and hence exact resume: the examples of optimizer step s are fixed by (seed, s) alone: sample position
p = s * global_batch_size + k reads example perm(seed, epoch)[p % n] with epoch = p // n. Rank r of W takes the r-th
contiguous slice of that global batch, cut into micro-batches. The loss of a step is the sum of the per-unit losses
(tokens for SFT, pairs for DPO) of the whole global batch divided by its total count of units, so the gradient is the
same for any micro-batch size and any number of ranks.

A non-finite loss, gradient or Aligner stops the run at that step with a `TrainError` before anything non-finite is
written: the newest run state stays the last good one.
"""

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from lit_aligner.training.config import TrainConfig, TrainError
from lit_aligner.training.objectives import Objective, ObjectiveModule
from lit_aligner.training.state import GracefulStop, MetricsLog, RunState, full_tensor, local_part


# ---------------------------------------------------------------------------------------------------------------------
# Schedule and data order


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup over warmup_steps (reaching learning_rate at
    the last warmup step), then a cosine decay to learning_rate * min_lr_ratio at max_steps."""
    lr, warm = config.learning_rate, config.warmup_steps
    if step < warm:
        return lr * (step + 1) / warm
    span = max(config.max_steps - warm, 1)
    progress = min((step - warm) / span, 1.0)
    floor = lr * config.min_lr_ratio
    return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def optimizer_groups(module: nn.Module, config: TrainConfig) -> List[Dict[str, Any]]:
    """The trainable parameters as AdamW parameter groups: the prefix, then the gates with their `lr_ratio` (the
    schedule multiplies each group's learning rate by it). The order is fixed so that run states stay loadable."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    gates = [p for n, p in named if n.endswith("gate")]
    return [{"params": [p for n, p in named if not n.endswith("gate")], "lr_ratio": 1.0},
            {"params": gates, "lr_ratio": config.gate_lr_ratio}]


def gradient_accumulation_steps(global_batch_size: int, micro_batch_size: int, world_size: int) -> int:
    """global_batch_size / (micro_batch_size * world_size); TrainError when it does not divide."""
    per_step = micro_batch_size * world_size
    if global_batch_size % per_step:
        raise TrainError(f"--global-batch-size {global_batch_size} is not a multiple of --micro-batch-size "
                         f"{micro_batch_size} x {world_size} device(s) = {per_step}; change one of them.")
    return global_batch_size // per_step


MEGABATCH = 50  # length grouping sorts runs of this many global batches (as Hugging Face's LengthGroupedSampler)


def epoch_permutation(n: int, seed: int, epoch: int, lengths: Optional[torch.Tensor] = None, batch: int = 1,
                      shuffle_batches: bool = True) -> torch.Tensor:
    """The order (n,) of the examples in `epoch`: a function of (seed, epoch) only, so resume stays exact. With
    `lengths` (n,), length grouping: the shuffled order is cut into runs of MEGABATCH global batches (`batch` examples
    each) and each run is sorted by length, so that a batch holds examples of similar length (little padding) while
    every epoch still visits every example once. Then, with `shuffle_batches`, the epoch's whole batches go in a
    seeded random order, the one holding the longest example first (a run that cannot fit it fails at once); without,
    each run stays longest to shortest (Hugging Face's order): on a small file, one run, the short rows all land in
    the epoch's last steps, one kind of row at a time where length tells kinds apart (howto/finetune.md)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    if lengths is None:
        return perm
    # Steps run on across epochs, so the epoch's first `head` examples finish a step the last epoch began: cut the
    # batches from there, so that each whole step's batch is one of them
    head = (-epoch * n) % batch if shuffle_batches else 0
    pieces = [perm[:head], *perm[head:].split(batch * MEGABATCH)]
    perm = torch.cat([p[torch.argsort(lengths[p], descending=True, stable=True)] for p in pieces])
    k = (n - head) // batch
    if not shuffle_batches or k < 2:
        return perm
    whole = perm[head:head + k * batch].view(k, batch)
    order = torch.randperm(k, generator=g)
    longest = int(lengths[whole].max(dim=1).values.argmax())
    at = int((order == longest).nonzero())
    order[[0, at]] = order[[at, 0]]
    return torch.cat([perm[:head], whole[order].reshape(-1), perm[head + k * batch:]])


class BatchOrder:
    """Dataset indices of each optimizer step's global batch (epochs continue across the boundary); with the
    examples' `lengths`, in the length-grouped order (`epoch_permutation`). Keeps the permutations of the epochs its
    last step touched: building one sorts the dataset (0.02 s at 52,000 rows, 0.26 s at a million), which every step
    paid before."""

    def __init__(self, n: int, global_batch_size: int, seed: int, lengths: Optional[torch.Tensor] = None,
                 shuffle_batches: bool = True):
        if n < 1:
            raise TrainError("the training set is empty")
        self.n, self.batch, self.seed, self.lengths, self.shuffle = n, global_batch_size, seed, lengths, shuffle_batches
        self._epochs: Dict[int, torch.Tensor] = {}

    def __call__(self, step: int) -> List[int]:
        first, last = step * self.batch, (step + 1) * self.batch - 1
        epochs = range(first // self.n, last // self.n + 1)
        self._epochs = {e: self._epochs[e] if e in self._epochs else
                        epoch_permutation(self.n, self.seed, e, self.lengths, self.batch, self.shuffle)
                        for e in epochs}
        return [int(self._epochs[p // self.n][p % self.n]) for p in range(first, last + 1)]


def rank_micro_batches(indices: Sequence[int], rank: int, world_size: int, micro_batch_size: int) -> List[List[int]]:
    """Rank `rank`'s contiguous slice of a global batch, cut into micro-batches of micro_batch_size."""
    per_rank = len(indices) // world_size
    mine = list(indices[rank * per_rank:(rank + 1) * per_rank])
    return [mine[i:i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]


def _to(batch: Dict[str, torch.Tensor], device: torch.device) -> Dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _add(total: Optional[Dict[str, torch.Tensor]], new: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    new = {k: v.detach().double() for k, v in new.items()}
    return new if total is None else {k: total[k] + new[k] for k in total}


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def eval_batches_per_rank(n_rows: int, world: int, micro_batch_size: int) -> int:
    """Micro-batches a whole pass of `evaluate` over n_rows takes on rank 0 (rank r scores rows r, r+W, ...)."""
    return math.ceil(math.ceil(n_rows / world) / micro_batch_size)


def evaluate(module: nn.Module, objective: Objective, dataset, micro_batch_size: int = 8,
             max_batches: Optional[int] = None, fabric=None) -> Dict[str, float]:
    """The objective's metrics (means per unit: per token for SFT, per pair for DPO) of `module` (an
    `ObjectiveModule`, set up by Fabric or not) over `dataset`, plus the count of units under `objective.unit`.
    Rank r scores examples r, r+W, ... (the first max_batches micro-batches of them; None = all); sums are
    all-reduced. Every rank runs as many forward passes as rank 0 (a sharded model gathers its weights in each one,
    with every rank): one with fewer rows repeats its first batch and discards the result."""
    rank, world = (fabric.global_rank, fabric.world_size) if fabric is not None else (0, 1)
    device = fabric.device if fabric is not None else next(module.parameters()).device
    mine = list(range(rank, len(dataset), world))
    batches = [mine[i:i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]
    most = eval_batches_per_rank(len(dataset), world, micro_batch_size)
    if max_batches is not None:
        batches, most = batches[:max_batches], min(most, max_batches)
    was_training = module.training
    module.eval()
    # the rows scored, or a rank without any repeats row 0 (below): an objective that answers them answers those
    rows = [i for idx in batches for i in idx] or [0] * bool(most)
    answered = objective.answer(fabric, module.model, dataset, rows) if rows else None
    item = answered.__getitem__ if answered is not None else dataset.__getitem__
    sums, units = None, 0
    for idx in batches:
        items = [item(i) for i in idx]
        sums = _add(sums, module(_to(objective.collate(items), device)))
        units += sum(objective.units(it) for it in items)
    for _ in range(most - len(batches)):  # (an empty dataset: most is 0)
        module(_to(objective.collate([item(i) for i in (batches[0] if batches else [0])]), device))
    module.train(was_training)
    names = list(objective.val_metric_names)
    flat = torch.tensor([float(units)] + [0.0] * len(names), dtype=torch.float64, device=device)
    if sums is not None:
        flat[1:] = torch.stack([sums[k] for k in names])
    if world > 1:
        flat = fabric.all_reduce(flat, reduce_op="sum")
    total = float(flat[0])
    if total == 0:
        raise TrainError(f"no {objective.unit} to evaluate: the validation split is empty (raise --val-fraction)")
    return {**{k: float(v) / total for k, v in zip(names, flat[1:])}, objective.unit: int(total)}


# ---------------------------------------------------------------------------------------------------------------------
# The loop


@dataclass
class FitResult:
    step: int  # optimizer steps done in total
    stopped: Optional[str]  # the signal name when a SIGINT/SIGTERM ended the run early
    last_state: Optional[Path]
    val: Dict[str, float]  # the last validation metrics (the final one on the whole split, see val_whole)
    first_val: Dict[str, float]  # at the first evaluation of this call (step 0 for a fresh run)
    seconds: float
    throughput: Dict[str, float] = field(default_factory=dict)  # median tokens/s of the steps (padded and real)
    train: Dict[str, float] = field(default_factory=dict)  # the last step's training metrics (its global batch)
    val_whole: bool = False  # whether `val` scored every row of the validation split


def _finite(fabric, *tensors: torch.Tensor) -> bool:
    """Whether every tensor is finite on every rank (FSDP ranks hold different slices: all must stop together)."""
    bad = sum(not bool(torch.isfinite(local_part(t)).all()) for t in tensors if t is not None)
    if fabric.world_size > 1:
        bad = int(fabric.all_reduce(torch.tensor(float(bad), device=fabric.device), reduce_op="sum"))
    return bad == 0


def fit(
    fabric,
    module: ObjectiveModule,
    optimizer,
    aligner: nn.Module,
    train,
    val,
    config: TrainConfig,
    run_state: RunState,
    metrics: MetricsLog,
    start_step: int = 0,
    progress: bool = True,
    on_step: Optional[Callable[[int, Dict[str, Any]], None]] = None,
) -> FitResult:
    """Train `aligner` (the only trainable parameters of `module`, an `ObjectiveModule` set up by Fabric) for steps
    start_step .. config.max_steps - 1 on the examples of `train`, validating on `val`.

    The objective (`module.objective`) collates the items of a step, returns the loss and metric sums of a batch, and
    counts the units each item's loss sums over, so each step's loss is a mean over its whole global batch. Every
    eval_interval steps (and at the first and last) the validation metrics are logged, after the last step also those
    of the whole split (final_val_*, when config.final_validation and eval_iters cover less); every save_interval
    steps, at the end and on SIGINT/SIGTERM `run_state` writes a resumable state. SIGINT/SIGTERM: the current step
    completes, the state is written, and FitResult.stopped names the signal."""
    config.check()
    objective = module.objective
    rank, world = fabric.global_rank, fabric.world_size
    # raises if the global batch does not divide into micro-batches on every process
    gradient_accumulation_steps(config.global_batch_size, config.micro_batch_size, world)
    device = fabric.device
    t_start = time.perf_counter()
    names, val_names = list(objective.metric_names), list(objective.val_metric_names)
    tokens_seen = real_seen = 0
    speeds: Dict[str, List[float]] = {"tokens_per_sec": [], "real_tokens_per_sec": []}
    last_state: Optional[Path] = None
    val_metrics: Dict[str, float] = {}
    first_val: Dict[str, float] = {}
    last_train: Dict[str, float] = {}
    params = [p for p in aligner.parameters()]

    def validate(batches: Optional[int] = config.eval_batches) -> Dict[str, float]:
        return evaluate(module, objective, val, config.micro_batch_size, batches, fabric)

    def diverged(step: int, what: str) -> TrainError:
        newest = run_state.latest()
        return TrainError(f"step {step}: the {what} is not finite (NaN or inf), so the run stopped before writing it; "
                          f"{'the newest run state is ' + str(newest) if newest else 'no run state was written'}. "
                          f"Lower --learning-rate (now {config.learning_rate:g}) and start again (--force), or "
                          f"resume from that state with a lower --learning-rate (--resume auto --force).")

    validating = bool(len(val)) and config.validates
    val_whole = validating and (config.eval_batches is None or
                                config.eval_batches >= eval_batches_per_rank(len(val), world, config.micro_batch_size))
    lengths = train.lengths() if config.group_by_length else None  # every training dataset has lengths()
    order = BatchOrder(len(train), config.global_batch_size, config.seed, lengths, config.shuffle_grouped_batches)
    per_batch = objective.iterations  # optimizer steps on each global batch (GRPO's --num-iterations; else 1)
    if validating and start_step == 0:
        val_metrics = first_val = validate()
        metrics.log({"step": 0, **{f"val_{k}": val_metrics[k] for k in val_names}, "lr": lr_at(0, config),
                     "tokens_seen": 0, "elapsed_s": 0.0})
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.max_steps, initial=start_step, desc=objective.name, unit="step", dynamic_ncols=True,
                   file=sys.stderr)
    step, stopped = start_step, None
    module.train()
    with GracefulStop() as stop:
        while step < config.max_steps:
            t0 = time.perf_counter()
            indices = order(step // per_batch)
            items = {i: train[i] for i in indices}
            micro = rank_micro_batches(indices, rank, world, config.micro_batch_size)
            mine = [i for idx in micro for i in idx]
            rolled = objective.rollout(fabric, module.model, {i: items[i] for i in mine}, step)
            if rolled is None:
                # The global normaliser: every rank can count it itself, so it needs no communication.
                units = sum(objective.units(items[i], step) for i in indices)
                groups = {i: [items[i]] for i in mine}
            else:  # responses written on each rank for its own rows: only their sum over ranks is the normaliser
                groups = {i: g if isinstance(g, list) else [g] for i, g in rolled.items()}
                units = sum(objective.units(it, step) for g in groups.values() for it in g)
                if world > 1:
                    units = int(fabric.all_reduce(torch.tensor(float(units), device=device), reduce_op="sum"))
            lr = lr_at(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_ratio", 1.0)
            sums, padded, real = None, 0, 0
            for j, idx in enumerate(micro):
                batch = _to(objective.collate([it for i in idx for it in groups[i]], step), device)
                padded += batch["input_ids"].numel()
                real += int(batch["lengths"].sum())
                with fabric.no_backward_sync(module, enabled=j < len(micro) - 1):
                    out = module(batch)
                    # DDP averages gradients over ranks, hence * world: the result is d(sum / units) exactly.
                    fabric.backward(out["loss"] * (world / max(units, 1)))
                sums = _add(sums, out)
            if not _finite(fabric, sums["loss"], *(p.grad for p in params)):
                raise diverged(step + 1, "loss or its gradient")
            # The total norm before clipping (the grad_norm Hugging Face logs), through Fabric so that sharded (FSDP)
            # gradients count whole; without --max-norm the bound is infinite and the gradients stay as they are.
            grad_norm = full_tensor(fabric.clip_gradients(module, optimizer, max_norm=config.max_norm or float("inf")))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if not _finite(fabric, *params):
                raise diverged(step + 1, "Aligner after the optimizer step")
            step += 1
            objective.after_step(step, aligner)
            stats = torch.stack([sums[k] for k in names] + [
                torch.tensor(float(v), dtype=torch.float64, device=device)
                for v in (padded, real, 1.0 if stop.requested else 0.0)])
            if world > 1:
                stats = fabric.all_reduce(stats, reduce_op="sum")
            dt = time.perf_counter() - t0
            padded, real = int(stats[-3]), int(stats[-2])
            tokens_seen, real_seen = tokens_seen + padded, real_seen + real
            speeds["tokens_per_sec"].append(padded / dt)
            speeds["real_tokens_per_sec"].append(real / dt)
            row = {"step": step, **{f"train_{k}": float(stats[i]) / max(units, 1) for i, k in enumerate(names)},
                   "lr": lr, "grad_norm": float(grad_norm), "tokens_per_sec": padded / dt,
                   "real_tokens_per_sec": real / dt, "tokens_seen": tokens_seen, "real_tokens_seen": real_seen,
                   "elapsed_s": time.perf_counter() - t_start}
            last_train = {k: row[f"train_{k}"] for k in names}
            # a batch's samples live in memory only: run states (and stops) wait for its last step
            between = step % per_batch == 0
            stop_now = float(stats[-1]) > 0 and between
            if validating and (step % config.eval_interval == 0 or step == config.max_steps or stop_now):
                val_metrics = validate()
                first_val = first_val or val_metrics
                row.update({f"val_{k}": val_metrics[k] for k in val_names})
                if step == config.max_steps and config.final_validation and not val_whole:
                    # the curve keeps its --eval-iters rows; the figure reported and saved is the whole split's
                    val_metrics, val_whole = validate(None), True
                    row.update({f"final_val_{k}": val_metrics[k] for k in val_names})
            if step % config.log_interval == 0 or "val_loss" in row or step == config.max_steps:
                metrics.log(row)
            if on_step is not None:
                on_step(step, row)
            if bar is not None:
                post = {"loss": f"{row['train_loss']:.4f}", "tok/s": f"{row['real_tokens_per_sec']:.0f} real, "
                                                                     f"{row['tokens_per_sec']:.0f} padded"}
                if val_metrics:
                    post["val"] = f"{val_metrics['loss']:.4f}"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
            saving = step // config.save_interval > (step - per_batch) // config.save_interval  # one in this batch
            if between and (saving or step == config.max_steps or stop_now):
                last_state = run_state.save(step)
            if stop_now:
                stopped = stop.requested or "signal"
                break
    if bar is not None:
        bar.close()
    metrics.close()
    throughput = {k: sorted(v)[len(v) // 2] for k, v in speeds.items() if v}
    return FitResult(step, stopped, last_state, val_metrics, first_val, time.perf_counter() - t_start, throughput,
                     last_train, val_whole and bool(val_metrics))
