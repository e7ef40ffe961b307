"""Reusable pieces for training Aligners (SFT here; DPO reuses them): the learning-rate schedule, a deterministic data
order, the split of a global batch over ranks and micro-batches, RNG capture, atomic checkpoints that resume exactly,
signal handling, metrics logging, validation, and `fit`, the loop that ties them together under Lightning Fabric.

Determinism, and hence exact resume: the examples of optimizer step s are fixed by (seed, s) alone: sample position
p = s * global_batch_size + k reads example perm(seed, epoch)[p % n] with epoch = p // n. Rank r of W takes the r-th
contiguous slice of that global batch, cut into micro-batches. The loss of a step is the sum of the per-token (or
per-pair) losses of the whole global batch divided by its total count, so the gradient is the same for any micro-batch
size and any number of ranks. A checkpoint holds the Aligner, the optimizer state, the step, the RNG states and the
run's arguments; resuming from it replays the same steps an uninterrupted run would have taken.
"""

import csv
import dataclasses
import math
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from lit_aligner.losses import DEFAULT_CHUNK_SIZE, IGNORE_INDEX, chunked_cross_entropy
from lit_aligner.model import LLaMA, is_aligner_param

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_VERSION = 1
METRIC_FIELDS = ("step", "train_loss", "val_loss", "lr", "tokens_per_sec", "tokens_seen", "elapsed_s")

PathLike = Union[str, Path]


class TrainError(ValueError):
    """Bad training arguments or an unusable training checkpoint; the message names the file or flag and the fix."""


@dataclass
class TrainConfig:
    """Hyper-parameters of one run. Steps count optimizer steps (one global batch each)."""

    max_steps: int = 200
    learning_rate: float = 9e-3
    weight_decay: float = 0.02
    global_batch_size: int = 64
    micro_batch_size: int = 4
    warmup_steps: int = 10
    min_lr_ratio: float = 0.0  # the cosine decays to learning_rate * min_lr_ratio
    eval_interval: int = 50
    eval_iters: int = 10  # validation micro-batches per rank (0: the whole validation set)
    save_interval: int = 100
    log_interval: int = 1
    seed: int = 42
    chunk_size: int = DEFAULT_CHUNK_SIZE

    def check(self) -> None:
        for name in ("max_steps", "global_batch_size", "micro_batch_size", "eval_interval", "save_interval",
                     "log_interval", "chunk_size"):
            if getattr(self, name) < 1:
                raise TrainError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0 or self.eval_iters < 0:
            raise TrainError("--warmup-steps and --eval-iters must be >= 0")
        if self.learning_rate <= 0:
            raise TrainError(f"--learning-rate must be > 0, got {self.learning_rate}")


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


def gradient_accumulation_steps(global_batch_size: int, micro_batch_size: int, world_size: int) -> int:
    """global_batch_size / (micro_batch_size * world_size); TrainError when it does not divide."""
    per_step = micro_batch_size * world_size
    if global_batch_size % per_step:
        raise TrainError(f"--global-batch-size {global_batch_size} is not a multiple of --micro-batch-size "
                         f"{micro_batch_size} x {world_size} device(s) = {per_step}; change one of them.")
    return global_batch_size // per_step


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order (n,) of the examples in `epoch`: a function of (seed, epoch) only."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def global_batch_indices(n: int, step: int, global_batch_size: int, seed: int) -> List[int]:
    """Dataset indices of optimizer step `step`'s global batch (epochs continue across the boundary)."""
    if n < 1:
        raise TrainError("the training set is empty")
    out, cache = [], {}
    for p in range(step * global_batch_size, (step + 1) * global_batch_size):
        epoch = p // n
        if epoch not in cache:
            cache[epoch] = epoch_permutation(n, seed, epoch)
        out.append(int(cache[epoch][p % n]))
    return out


def rank_micro_batches(indices: Sequence[int], rank: int, world_size: int, micro_batch_size: int) -> List[List[int]]:
    """Rank `rank`'s contiguous slice of a global batch, cut into micro-batches of micro_batch_size."""
    per_rank = len(indices) // world_size
    mine = list(indices[rank * per_rank:(rank + 1) * per_rank])
    return [mine[i:i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]


def count_response_tokens(item: Dict[str, torch.Tensor]) -> int:
    """Tokens that carry a loss in one SFT item (labels unshifted: position 0 never does)."""
    return int((item["labels"][1:] != IGNORE_INDEX).sum())


# ---------------------------------------------------------------------------------------------------------------------
# The objective as a module: everything that touches the weights happens inside one forward (FSDP-safe)


def sft_loss(model: LLaMA, batch: Dict[str, torch.Tensor], chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """Summed cross-entropy (nats, fp32 scalar) of the response tokens of a collated SFT batch
    {"input_ids": (B, T), "labels": (B, T)} with the model's own Aligner."""
    hidden = model(batch["input_ids"], return_hidden=True)  # (B, T, C): no (B, T, V) logits
    return chunked_cross_entropy(hidden, model.lm_head_weight, batch["labels"], chunk_size, reduction="sum")


class Objective(nn.Module):
    """Wraps the model so that `forward(batch)` returns `loss_fn(model, batch)`: Fabric (DDP/FSDP) sees a single
    forward that uses every weight it needs (the LM head too), so sharded weights are gathered where they are read."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Dict[str, torch.Tensor]], torch.Tensor]):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


# ---------------------------------------------------------------------------------------------------------------------
# RNG states and checkpoints (plain tensors and dicts: loadable with torch.load(weights_only=True))


def capture_rng_state() -> Dict[str, torch.Tensor]:
    """The torch (CPU and CUDA) and Python RNG states, as tensors."""
    version, state, gauss = random.getstate()
    out = {"torch": torch.get_rng_state(),
           "python": torch.tensor(list(state), dtype=torch.int64),
           "python_version": torch.tensor(version),
           "python_gauss": torch.tensor(float("nan") if gauss is None else gauss, dtype=torch.float64)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return out


def restore_rng_state(state: Dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    gauss = float(state["python_gauss"])
    random.setstate((int(state["python_version"]), tuple(int(x) for x in state["python"].tolist()),
                     None if math.isnan(gauss) else gauss))
    if "cuda" in state and torch.cuda.is_available():
        for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


def atomic_torch_save(obj: Any, path: PathLike) -> Path:
    """torch.save to a temp file in the same folder, then os.replace: a crash never leaves a half-written file."""
    from lit_aligner.checkpoint import atomic_write

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def checkpoint_path(out_dir: PathLike, step: int) -> Path:
    return Path(out_dir) / CHECKPOINT_DIR / f"step-{step:06d}.pt"


def latest_checkpoint(out_dir: PathLike) -> Optional[Path]:
    """The newest complete checkpoint of a run: `last.pt` if present, else the highest step-XXXXXX.pt."""
    d = Path(out_dir) / CHECKPOINT_DIR
    if (d / "last.pt").is_file():
        return d / "last.pt"
    steps = sorted(d.glob("step-*.pt"))
    return steps[-1] if steps else None


def resolve_resume(resume: Optional[Union[str, Path]], out_dir: PathLike) -> Optional[Path]:
    """--resume: None/"" → start fresh; "auto" → the latest checkpoint in out_dir (fresh if there is none); a path →
    that checkpoint (TrainError if missing)."""
    if resume in (None, "", False):
        return None
    if str(resume) == "auto":
        return latest_checkpoint(out_dir)
    path = Path(resume)
    if path.is_dir():
        found = latest_checkpoint(path) or (latest_checkpoint(path.parent) if path.name == CHECKPOINT_DIR else None)
        if found is None:
            raise TrainError(f"--resume {path}: no checkpoint in that directory (expected {CHECKPOINT_DIR}/last.pt or "
                             f"{CHECKPOINT_DIR}/step-XXXXXX.pt); pass a checkpoint file or --resume auto.")
        return found
    if not path.is_file():
        raise TrainError(f"--resume {path}: no such checkpoint file; pass OUT/{CHECKPOINT_DIR}/last.pt, a "
                         f"step-XXXXXX.pt, or --resume auto.")
    return path


def load_training_checkpoint(path: PathLike) -> Dict[str, Any]:
    """Read a checkpoint written by `fit` (never unpickling code: weights_only)."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, a pickle with code, not a torch file at all
        raise TrainError(f"{path}: not a readable lit-aligner training checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]}); pick another one (e.g. an earlier step-XXXXXX.pt) or "
                         f"start without --resume.") from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION or "aligner" not in state:
        raise TrainError(f"{path}: not a lit-aligner training checkpoint (expected a dict with 'aligner', "
                         f"'optimizer', 'step'); start without --resume.")
    return state


# ---------------------------------------------------------------------------------------------------------------------
# Aligner state under any strategy


def _is_fsdp(fabric) -> bool:
    from lightning_fabric.strategies import FSDPStrategy

    return isinstance(getattr(fabric, "strategy", None), FSDPStrategy)


def aligner_tensors(fabric, module: nn.Module, aligner: nn.Module) -> Dict[str, torch.Tensor]:
    """Full (unsharded) copies of the Aligner's prefix and gate on the CPU, from any strategy. Under FSDP the Aligner
    lives in the root unit, so its full parameters are gathered for the copy (collective: call on every rank)."""
    ctx = nullcontext()
    if fabric is not None and _is_fsdp(fabric):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        inner = getattr(module, "_forward_module", module)
        ctx = FSDP.summon_full_params(inner, writeback=False, recurse=False)
    with ctx:
        return {"prefix": aligner.prefix.detach().cpu().clone(), "gate": aligner.gate.detach().cpu().clone()}


def optimizer_state(fabric, module: nn.Module, optimizer) -> Dict[str, Any]:
    """A full optimizer state dict of plain tensors. FSDP: gathered with torch.distributed.checkpoint (frozen base
    weights left out); otherwise the optimizer's own state dict (it holds only the Aligner's parameters)."""
    if fabric is not None and _is_fsdp(fabric):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        inner = getattr(module, "_forward_module", module)
        return get_optimizer_state_dict(inner, getattr(optimizer, "optimizer", optimizer), options=opts)
    return getattr(optimizer, "optimizer", optimizer).state_dict()


def load_optimizer_state(fabric, module: nn.Module, optimizer, state: Dict[str, Any]) -> None:
    if fabric is not None and _is_fsdp(fabric):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, ignore_frozen_params=True)
        inner = getattr(module, "_forward_module", module)
        set_optimizer_state_dict(inner, getattr(optimizer, "optimizer", optimizer), state, options=opts)
        return
    getattr(optimizer, "optimizer", optimizer).load_state_dict(state)


# ---------------------------------------------------------------------------------------------------------------------
# Signals


class GracefulStop:
    """While active, SIGINT and SIGTERM only set `requested`: the loop finishes its optimizer step, writes a checkpoint
    and returns. A second SIGINT interrupts at once (KeyboardInterrupt). Restores the old handlers on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested: Optional[str] = None
        self._old: Dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __enter__(self) -> "GracefulStop":
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


# ---------------------------------------------------------------------------------------------------------------------
# Metrics


class MetricsLogger:
    """`OUT/metrics.csv` (METRIC_FIELDS, one row per logged step; val_loss filled on evaluation steps) and, when the
    `tensorboard` package is importable, TensorBoard event files in `OUT/tensorboard/`. On resume, rows after the
    resumed step are dropped so the file continues as the uninterrupted run's would. Only rank 0 writes."""

    def __init__(self, out_dir: PathLike, enabled: bool = True, resume_step: Optional[int] = None,
                 fields: Sequence[str] = METRIC_FIELDS):
        self.path = Path(out_dir) / "metrics.csv"
        self.fields = tuple(fields)  # DPO logs more columns (reward accuracy, margins) than SFT
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = []
        if resume_step is not None and self.path.is_file():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step") and int(r["step"]) <= resume_step]
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields)
            w.writeheader()
            w.writerows({k: r.get(k, "") for k in self.fields} for r in rows)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(out_dir) / "tensorboard"), purge_step=resume_step)
        except ImportError:  # tensorboard is optional
            self.tb = None

    def log(self, row: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.fields).writerow(
                {k: ("" if row.get(k) is None else _fmt(row[k])) for k in self.fields})
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and v is not None:
                    self.tb.add_scalar(k, float(v), int(row["step"]))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _fmt(v: Any) -> str:
    return repr(float(v)) if isinstance(v, float) else str(v)


def read_metrics(path: PathLike) -> List[Dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"{path}: no such metrics file; runs write OUT/metrics.csv (give that path).")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "step" not in rows[0]:
        raise TrainError(f"{path} is not a metrics.csv of a training run (no `step` column or no rows).")
    return rows


def plot_metrics(path: PathLike, out: PathLike, title: Optional[str] = None) -> Path:
    """Draw every loss-like column of a metrics.csv (train/val loss; DPO: also reward accuracy and margin) against
    the step to the PNG `out`. Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise TrainError("plotting needs matplotlib: pip install matplotlib") from None
    rows = read_metrics(path)
    panels = [("loss (nats)", ("train_loss", "val_loss"))]
    if any(r.get("reward_accuracy") for r in rows):
        panels.append(("reward", ("reward_accuracy", "train_reward_accuracy", "reward_margin")))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (label, cols) in zip(axes[0], panels):
        for col in cols:
            pts = [(int(r["step"]), float(r[col])) for r in rows if r.get(col) not in (None, "")]
            if pts:
                ax.plot(*zip(*pts), marker="o" if col.startswith("val") or col == "reward_accuracy" else None,
                        markersize=3, label=col)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title or Path(path).resolve().parent.name)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Validation


@torch.no_grad()
def validation_loss(fabric, module: nn.Module, dataset, collate: Callable, count_fn: Callable, micro_batch_size: int,
                    max_batches: int = 0) -> float:
    """Mean loss per unit (token for SFT) over the validation set: rank r scores examples r, r+W, ... (the first
    max_batches micro-batches of them per rank; 0 = all); sums and counts are all-reduced. Returns a float (nats)."""
    rank, world = (fabric.global_rank, fabric.world_size) if fabric is not None else (0, 1)
    mine = list(range(rank, len(dataset), world))
    batches = [mine[i:i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]
    if max_batches:
        batches = batches[:max_batches]
    was_training = module.training
    module.eval()
    device = fabric.device if fabric is not None else torch.device("cpu")
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for idx in batches:
        items = [dataset[i] for i in idx]
        batch = {k: v.to(device) for k, v in collate(items).items()}
        total[0] += module(batch).double()
        total[1] += sum(count_fn(it) for it in items)
    if fabric is not None and world > 1:
        total = fabric.all_reduce(total, reduce_op="sum")
    module.train(was_training)
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")


# ---------------------------------------------------------------------------------------------------------------------
# The loop


@dataclass
class FitResult:
    step: int  # optimizer steps done in total
    stopped: Optional[str]  # the signal name when a SIGINT/SIGTERM ended the run early
    last_checkpoint: Optional[Path]
    val_loss: Optional[float]
    first_val_loss: Optional[float]  # at the first evaluation of this call (step 0 for a fresh run)
    seconds: float


def fit(
    fabric,
    module: nn.Module,
    optimizer,
    aligner: nn.Module,
    train_for_step: Callable[[int], Any],
    val_dataset,
    collate: Callable,
    config: TrainConfig,
    out_dir: PathLike,
    count_fn: Callable[[Dict[str, torch.Tensor]], int] = count_response_tokens,
    start_step: int = 0,
    extra_state: Optional[Dict[str, Any]] = None,
    progress: bool = True,
    on_step: Optional[Callable[[int, Dict[str, Any]], None]] = None,
) -> FitResult:
    """Train `aligner` (the only trainable parameters of `module`, an `Objective` set up by Fabric) for steps
    start_step .. config.max_steps - 1.

    train_for_step(step) -> the dataset to draw step `step`'s global batch from (one dataset for SFT; correction mode
    switches from its Q-A-A view to its Q-A-C view; the views must have the same length and order). collate(items) ->
    a batch dict of tensors, the input of `module`; `module(batch)` returns the summed loss, and count_fn(item) the
    units (tokens, pairs) it sums over, so each step's loss is a mean over its whole global batch.
    Writes OUT/metrics.csv, OUT/checkpoints/step-XXXXXX.pt every save_interval steps and at the end (each also copied
    to last.pt), `extra_state` (e.g. the run's arguments, plain types) inside each checkpoint. SIGINT/SIGTERM: the
    current step completes, a checkpoint is written, and FitResult.stopped names the signal."""
    config.check()
    rank, world = fabric.global_rank, fabric.world_size
    gradient_accumulation_steps(config.global_batch_size, config.micro_batch_size, world)  # raises if it does not divide
    out_dir = Path(out_dir)
    logger = MetricsLogger(out_dir, enabled=rank == 0, resume_step=start_step if start_step else None)
    device = fabric.device
    t_start = time.perf_counter()
    tokens_seen = 0
    last_ckpt: Optional[Path] = None
    val_loss = first_val = None

    def evaluate() -> float:
        return validation_loss(fabric, module, val_dataset, collate, count_fn, config.micro_batch_size,
                               config.eval_iters)

    def save(step: int) -> Path:
        state = {
            "version": CHECKPOINT_VERSION,
            "step": step,
            "samples_seen": step * config.global_batch_size,  # the data-order position
            "aligner": aligner_tensors(fabric, module, aligner),
            "optimizer": optimizer_state(fabric, module, optimizer),
            "rng": capture_rng_state(),
            "train_config": dataclasses.asdict(config),
            **(extra_state or {}),
        }
        path = checkpoint_path(out_dir, step)
        if rank == 0:
            atomic_torch_save(state, path)
            atomic_torch_save(state, path.parent / "last.pt")
        fabric.barrier()
        return path

    if len(val_dataset) and start_step == 0:
        val_loss = first_val = evaluate()
        logger.log({"step": 0, "val_loss": val_loss, "lr": lr_at(0, config), "tokens_seen": 0, "elapsed_s": 0.0})
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                   file=sys.stderr)
    step = start_step
    stopped = None
    module.train()
    with GracefulStop() as stop:
        while step < config.max_steps:
            t0 = time.perf_counter()
            dataset = train_for_step(step)
            indices = global_batch_indices(len(dataset), step, config.global_batch_size, config.seed)
            items_all = {i: dataset[i] for i in indices}
            # The global normaliser: every rank can count it itself, so no communication is needed for it.
            units = sum(count_fn(items_all[i]) for i in indices)
            lr = lr_at(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro = rank_micro_batches(indices, rank, world, config.micro_batch_size)
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            local_tokens = 0
            for j, idx in enumerate(micro):
                items = [items_all[i] for i in idx]
                batch = {k: v.to(device) for k, v in collate(items).items()}
                local_tokens += int(batch["input_ids"].numel()) if "input_ids" in batch else 0
                with fabric.no_backward_sync(module, enabled=j < len(micro) - 1):
                    summed = module(batch)
                    # DDP averages gradients over ranks, hence * world: the result is d(sum / units) exactly.
                    fabric.backward(summed * (world / max(units, 1)))
                loss_sum += summed.detach().double()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            stats = torch.stack([loss_sum, torch.tensor(float(local_tokens), dtype=torch.float64, device=device),
                                 torch.tensor(1.0 if stop.requested else 0.0, dtype=torch.float64, device=device)])
            if world > 1:
                stats = fabric.all_reduce(stats, reduce_op="sum")
            train_loss = float(stats[0]) / max(units, 1)
            dt = time.perf_counter() - t0
            tokens_seen += int(stats[1])
            row = {"step": step, "train_loss": train_loss, "lr": lr, "tokens_per_sec": float(stats[1]) / dt,
                   "tokens_seen": tokens_seen, "elapsed_s": time.perf_counter() - t_start}
            if step % config.eval_interval == 0 or step == config.max_steps:
                if len(val_dataset):
                    val_loss = row["val_loss"] = evaluate()
                    if first_val is None:
                        first_val = val_loss
            if step % config.log_interval == 0 or "val_loss" in row or step == config.max_steps:
                logger.log(row)
            if on_step is not None:
                on_step(step, row)
            if bar is not None:
                post = {"loss": f"{train_loss:.4f}", "tok/s": f"{row['tokens_per_sec']:.0f}"}
                if val_loss is not None:
                    post["val"] = f"{val_loss:.4f}"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
            stop_now = float(stats[2]) > 0
            if step % config.save_interval == 0 or step == config.max_steps or stop_now:
                last_ckpt = save(step)
            if stop_now:
                stopped = stop.requested or "signal"
                break
    if bar is not None:
        bar.close()
    logger.close()
    return FitResult(step, stopped, last_ckpt, val_loss, first_val, time.perf_counter() - t_start)


# ---------------------------------------------------------------------------------------------------------------------
# Fabric helpers


def default_precision(accelerator: str = "auto") -> str:
    """bf16-true on a GPU that supports bf16, 32-true otherwise (CPU)."""
    if accelerator in ("auto", "cuda", "gpu") and torch.cuda.is_available():
        return "bf16-true" if torch.cuda.is_bf16_supported() else "16-true"
    return "32-true"


def make_strategy(strategy: str, devices: Union[int, str], num_nodes: int):
    """Fabric strategy from a flag: "auto", "ddp", or "fsdp" (the base sharded per `Block`, the Aligner in the root
    unit; `use_orig_params` because frozen and trainable weights share units)."""
    if strategy == "fsdp":
        from lightning_fabric.strategies import FSDPStrategy

        from lit_aligner.model import Block

        return FSDPStrategy(auto_wrap_policy={Block}, activation_checkpointing_policy={Block},
                            state_dict_type="full", use_orig_params=True, limit_all_gathers=True,
                            cpu_offload=False)
    if strategy not in ("auto", "ddp"):
        raise TrainError(f"--strategy must be auto, ddp or fsdp, got {strategy!r}")
    return strategy


def precision_dtype(precision: str) -> torch.dtype:
    """The weight dtype a Fabric precision flag implies (the model is loaded straight into it)."""
    if precision.startswith("bf16"):
        return torch.bfloat16 if precision == "bf16-true" else torch.float32
    if precision.startswith("16"):
        return torch.float16 if precision == "16-true" else torch.float32
    return torch.float32


def save_final_aligner(fabric, module: nn.Module, aligner: nn.Module, model_config, out_dir: PathLike,
                       metadata: Dict[str, Any], steps: int, seconds: float) -> Path:
    """The trained `aligner` as OUT/aligner.safetensors with `metadata` (every rank gathers it, which FSDP needs;
    rank 0 writes). Returns the path."""
    from lit_aligner.aligner import build_aligner, save_aligner

    tensors = aligner_tensors(fabric, module, aligner)
    final = build_aligner(aligner.n_tokens, aligner.start_layer, model_config.n_layer, model_config.n_head,
                          model_config.n_embd, tensors["prefix"], tensors["gate"])
    path = Path(out_dir) / "aligner.safetensors"
    if fabric.global_rank == 0:
        save_aligner(final, path, model_config.name, metadata)
        fabric.print(f"saved the Aligner to {path} ({steps} steps, {seconds:.0f} s)")
    return path


def setup_optimizer(fabric, module: nn.Module, config: TrainConfig, state: Optional[Dict[str, Any]] = None,
                    resume_path: Optional[Path] = None) -> Tuple[Any, int]:
    """AdamW over the trainable (Aligner) parameters of a Fabric-set-up `module`; with a training checkpoint `state`,
    its optimizer and RNG states restored. Returns (optimizer, the step to start from)."""
    optimizer = torch.optim.AdamW(trainable_parameters(module), lr=config.learning_rate,
                                  weight_decay=config.weight_decay, betas=(0.9, 0.95))
    optimizer = fabric.setup_optimizers(optimizer)
    if state is None:
        return optimizer, 0
    load_optimizer_state(fabric, module, optimizer, state["optimizer"])
    restore_rng_state(state["rng"])
    fabric.print(f"resuming from {resume_path} at step {int(state['step'])}")
    return optimizer, int(state["step"])


def trainable_parameters(module: nn.Module) -> List[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def check_only_aligner_trainable(model: nn.Module) -> None:
    bad = [n for n, p in model.named_parameters() if p.requires_grad and not is_aligner_param(n)]
    if bad:
        raise RuntimeError(f"only the Aligner may train, but these base weights require grad: {bad[:5]}")


# ---------------------------------------------------------------------------------------------------------------------
# A whole run: what `finetune/aligner.py` calls


MODES = ("sft", "correct")
DEFAULT_CHECKPOINT = Path("checkpoints/SmolLM2-135M-Instruct")


@dataclass
class BaseRunConfig:
    """The flags every training script shares (base model, data, Aligner shape, devices, resume); `train` holds the
    optimisation hyper-parameters. `RunConfig` (SFT / correction) and `dpo.DPORunConfig` add their own."""

    checkpoint_dir: Path = DEFAULT_CHECKPOINT
    data: Optional[Path] = None
    template: Optional[str] = None  # None: "chat" when the tokenizer has a chat template, else "alpaca"
    out_dir: Optional[Path] = None  # None: out/aligner[-dpo]/<base name>[-correct]
    n_tokens: int = 10
    start_layer: int = 2
    max_seq_length: int = 512
    precision: Optional[str] = None
    accelerator: str = "auto"
    devices: Union[int, str] = 1
    num_nodes: int = 1
    strategy: str = "auto"
    resume: Optional[str] = None
    skip_bad_rows: bool = False
    progress: bool = True
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)


@dataclass
class RunConfig(BaseRunConfig):
    """Everything one `finetune/aligner.py` run needs (the flags)."""

    mode: str = "sft"
    warmup_copy_ratio: float = 0.2
    compile: bool = False  # torch.compile each block (lit_aligner.perf.compile_blocks)
    activation_checkpointing: str = "none"  # none | selective | mlp | block (lit_aligner.perf)
    compare: Optional[bool] = None  # the before/after report; None: only for the default dataset in sft mode
    compare_prompts: int = 32
    compare_max_new_tokens: int = 24


@dataclass
class TrainingData:
    """What the loop trains on: `for_step(step)` gives the dataset of that step (SFT items); `val` the validation
    SFT items; `info` the loader's counts; `template` the prompt template actually used (saved with the Aligner);
    `copy_steps` the number of identity warm-up steps (correction mode)."""

    for_step: Callable[[int], Any]
    val: Any
    info: Dict[str, Any]
    template: str
    copy_steps: int = 0


def copy_phase_steps(max_steps: int, warmup_copy_ratio: float) -> int:
    """Steps 0 .. n-1 of a correction run train on the identity targets (Q-A-A): n = round(ratio * max_steps)."""
    if not 0.0 <= warmup_copy_ratio <= 1.0:
        raise TrainError(f"--warmup-copy-ratio must be in [0, 1], got {warmup_copy_ratio}")
    return int(round(warmup_copy_ratio * max_steps))


def build_training_data(mode: str, data: Optional[PathLike], tokenizer, template: str, max_seq_length: int,
                        max_steps: int, seed: int = 42, skip_bad_rows: bool = False,
                        warmup_copy_ratio: float = 0.2) -> TrainingData:
    """The extension point for training modes: which dataset, which targets at which step.

    sft: `load_sft_data` with `template`; every step draws from the same SFT set.
    correct: `load_correction_data` (Q-A-C JSON or any preference file: A = rejected, C = chosen) with the
    `correction` template; steps < copy_phase_steps(...) target the upstream answer itself (Q-A-A identity warm-up),
    later steps the correction (Q-A-C). Validation always scores the corrections."""
    from lit_aligner import data as D

    if mode == "sft":
        train, val, info = D.load_sft_data(data, tokenizer, template, max_seq_length, seed=seed,
                                           skip_bad_rows=skip_bad_rows)
        return TrainingData(lambda step: train, val, info, info.get("template") or template)
    if mode == "correct":
        train, val, info = D.load_correction_data(data, tokenizer, template, max_seq_length, seed=seed,
                                                  skip_bad_rows=skip_bad_rows)
        copy_steps = copy_phase_steps(max_steps, warmup_copy_ratio)
        copy_view, correct_view = train.as_sft(copy=True), train.as_sft(copy=False)
        return TrainingData(lambda step: copy_view if step < copy_steps else correct_view, val.as_sft(copy=False),
                            info, info.get("template") or template, copy_steps)
    raise TrainError(f"--mode must be one of {MODES}, got {mode!r}")


def default_template(mode: str, tokenizer) -> str:
    if mode == "correct":
        return "correction"
    return "chat" if getattr(tokenizer, "has_chat_template", False) else "alpaca"


def _plain(v: Any) -> Any:
    """Arguments as plain, weights_only-loadable values (paths as strings)."""
    if dataclasses.is_dataclass(v):
        return {f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


def _check_resumable(state: Dict[str, Any], cfg: RunConfig, path: Path) -> None:
    old = state.get("run_config", {})
    same = [("n_tokens", cfg.n_tokens), ("start_layer", cfg.start_layer), ("mode", cfg.mode)]
    bad = [f"--{k.replace('_', '-')} {old.get(k)} (now {v})" for k, v in same if k in old and old[k] != v]
    told = state.get("train_config", {})
    for k in ("global_batch_size", "seed"):
        if k in told and told[k] != getattr(cfg.train, k):
            bad.append(f"--{k.replace('_', '-')} {told[k]} (now {getattr(cfg.train, k)})")
    if bad:
        raise TrainError(f"{path} was written by a run with {', '.join(bad)}; resume with the same flags, or start a "
                         f"new run in another --out-dir.")


def run(cfg: RunConfig) -> Dict[str, Any]:
    """Set up Fabric, load the base and data, train the Aligner, save `OUT/aligner.safetensors`. Returns a summary
    dict (paths, steps, losses, and the before/after comparison when made). Launches the other processes of a
    multi-device run (Fabric re-runs the calling script for ranks > 0)."""
    import lightning_fabric as L

    cfg.train.check()
    if cfg.mode not in MODES:
        raise TrainError(f"--mode must be one of {MODES}, got {cfg.mode!r}")
    precision = cfg.precision or default_precision(cfg.accelerator)
    fabric = L.Fabric(accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes,
                      strategy=make_strategy(cfg.strategy, cfg.devices, cfg.num_nodes), precision=precision)
    fabric.launch()
    return _run(fabric, cfg, precision)


def _run(fabric, cfg: RunConfig, precision: str) -> Dict[str, Any]:
    from lit_aligner.checkpoint import load_config, load_model
    from lit_aligner.data import collate_sft, describe, storable_info
    from lit_aligner.model import AlignerConfig, mark_only_aligner_as_trainable, num_trainable
    from lit_aligner.tokenizer import Tokenizer

    checkpoint_dir = Path(cfg.checkpoint_dir)
    model_config = load_config(checkpoint_dir)  # CheckpointError with the conversion command when missing
    out_dir = Path(cfg.out_dir) if cfg.out_dir else Path("out/aligner") / (
        model_config.name + ("-correct" if cfg.mode == "correct" else ""))
    gradient_accumulation_steps(cfg.train.global_batch_size, cfg.train.micro_batch_size, fabric.world_size)
    resume_path = resolve_resume(cfg.resume, out_dir)
    state = load_training_checkpoint(resume_path) if resume_path else None
    if state is not None:
        _check_resumable(state, cfg, resume_path)

    tokenizer = Tokenizer(checkpoint_dir)
    template = cfg.template or default_template(cfg.mode, tokenizer)
    td = build_training_data(cfg.mode, cfg.data, tokenizer, template, cfg.max_seq_length, cfg.train.max_steps,
                             cfg.train.seed, cfg.skip_bad_rows, cfg.warmup_copy_ratio)
    fabric.print(describe(td.info))
    if td.copy_steps:
        fabric.print(f"correction mode: identity (Q-A-A) warm-up for steps 1-{td.copy_steps}, then Q-A-C")

    fabric.seed_everything(cfg.train.seed)  # the same fresh prefix on every rank
    dtype = precision_dtype(precision)
    load_device = "cpu" if cfg.strategy == "fsdp" else fabric.device
    model = load_model(checkpoint_dir, load_device, dtype, AlignerConfig(cfg.n_tokens, cfg.start_layer))
    if cfg.start_layer >= model_config.n_layer:
        raise TrainError(f"--start-layer {cfg.start_layer} must be < the model's {model_config.n_layer} layers")
    if state is not None:
        with torch.no_grad():
            for name in ("prefix", "gate"):
                saved = state["aligner"][name]
                param = getattr(model.aligner, name)
                if saved.shape != param.shape:
                    raise TrainError(f"{resume_path}: Aligner {name} {tuple(saved.shape)} does not fit this run's "
                                     f"{tuple(param.shape)}; resume with the same --n-tokens/--start-layer.")
                param.copy_(saved)
    mark_only_aligner_as_trainable(model)
    check_only_aligner_trainable(model)
    fabric.print(f"base {model_config.name} ({checkpoint_dir}), Aligner N={cfg.n_tokens} from layer "
                 f"{cfg.start_layer}: {num_trainable(model):,} trainable parameters; precision {precision}, "
                 f"{fabric.world_size} process(es)")

    from lit_aligner import perf

    perf.configure_backends(fabric.device)
    if cfg.activation_checkpointing != "none":
        n = perf.apply_activation_checkpointing(model, cfg.activation_checkpointing, cfg.start_layer)
        fabric.print(f"activation checkpointing '{cfg.activation_checkpointing}' on {n} gated blocks")
    if cfg.compile:
        perf.compile_blocks(model)
    chunk = cfg.train.chunk_size
    module = fabric.setup_module(Objective(model, lambda m, b: sft_loss(m, b, chunk)))
    optimizer, start_step = setup_optimizer(fabric, module, cfg.train, state, resume_path)

    pad_id = tokenizer.pad_id
    collate = lambda items: collate_sft(items, pad_id)  # noqa: E731
    run_args = _plain(cfg)
    result = fit(fabric, module, optimizer, model.aligner, td.for_step, td.val, collate, cfg.train, out_dir,
                 start_step=start_step, extra_state={"run_config": run_args, "template": td.template},
                 progress=cfg.progress)
    summary: Dict[str, Any] = {"out_dir": str(out_dir), "step": result.step, "stopped": result.stopped,
                               "checkpoint": str(result.last_checkpoint) if result.last_checkpoint else None,
                               "val_loss": result.val_loss, "first_val_loss": result.first_val_loss,
                               "seconds": result.seconds, "template": td.template, "copy_steps": td.copy_steps}
    if result.stopped:
        fabric.print(f"\nstopped by {result.stopped} after step {result.step}; checkpoint {result.last_checkpoint}. "
                     f"Continue with the same command plus --resume auto.")
        return summary

    metadata = {"template": td.template, "mode": cfg.mode, "n_tokens": cfg.n_tokens, "start_layer": cfg.start_layer,
                "created_by": "finetune/aligner.py", "steps": result.step, "val_loss": result.val_loss,
                "training_args": run_args, "data": storable_info(td.info)}
    if cfg.mode == "correct":
        metadata["warmup_copy_ratio"] = cfg.warmup_copy_ratio
    aligner_path = save_final_aligner(fabric, module, model.aligner, model_config, out_dir, metadata, result.step,
                                      result.seconds)
    summary["aligner"] = str(aligner_path)
    compare = cfg.compare if cfg.compare is not None else (cfg.data is None and cfg.mode == "sft")
    if compare and fabric.global_rank == 0:
        from lit_aligner.evaluate import compare_before_after, format_comparison

        model.eval()
        report = compare_before_after(model, tokenizer, td.val, model.aligner, n_prompts=cfg.compare_prompts,
                                      max_new_tokens=cfg.compare_max_new_tokens,
                                      val_loss_before=result.first_val_loss, val_loss_after=result.val_loss)
        fabric.print(format_comparison(report))
        summary["comparison"] = report
    fabric.barrier()
    return summary
