"""A run directory and what survives an interruption: the lock on OUT, the resumable run state in OUT/state/, the RNG
states, the metrics log, and signal handling.

OUT/ holds `aligner.safetensors` (the result), `metrics.csv` (+ `tensorboard/` when installed), `state/` (resumable
states `step-XXXXXX.pt` and `last.pt`: the Aligner, the optimizer, the step, the RNG states and the run's identity;
plain tensors and dicts, read with torch.load(weights_only=True)) and `.lock` while a run writes into it. Runs before
lit-aligner 0.2 wrote their states into OUT/checkpoints/; `--resume` still reads them.
"""

import fcntl
import math
import os
import random
import signal
import socket
import shutil
import threading
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from lit_aligner.base import is_base_dir
from lit_aligner.files import atomic_torch_save, torch_load_failure
from lit_aligner.training.config import TrainError

STATE_DIR = "state"
LEGACY_STATE_DIR = "checkpoints"
STATE_VERSION = 2  # 1: before 0.2 (no run identity); still read
LOCK_NAME = ".lock"
ALIGNER_NAME = "aligner.safetensors"
# The files a run writes into OUT (what --force clears; anything else in OUT is left alone).
RUN_FILES = (ALIGNER_NAME, "metrics.csv", "loss.png", STATE_DIR, LEGACY_STATE_DIR, "tensorboard", "wandb")
PathLike = Union[str, Path]


# ---------------------------------------------------------------------------------------------------------------------
# The run directory


class RunLock:
    """An exclusive lock on a run directory (OUT/.lock, `flock`), held for the whole run and released on any exit (the
    kernel drops it when the process dies, so a crashed run never blocks the next). A second run into the same OUT stops
    at once with a TrainError naming the process that holds it; a lock file left by a dead process is reported and
    taken over. The folders it made for the run go again if the run leaves them empty (it stopped on bad input before
    writing anything)."""

    def __init__(self, out_dir: PathLike):
        self.path = Path(out_dir) / LOCK_NAME
        self.note: Optional[str] = None
        self._file = None
        self._made: List[Path] = []

    def __enter__(self) -> "RunLock":
        self._made = [d for d in [self.path.parent, *self.path.parent.parents] if not d.exists()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise TrainError(f"{self.path.parent} is in use by another run ({holder}); wait for it to finish, or "
                             f"choose another --out-dir.") from None
        f.seek(0)
        previous = f.read().strip()
        if previous:  # the lock file of a run that died without releasing it (the kernel already dropped its lock)
            self.note = f"took over the stale lock of a run that is no longer running ({previous})"
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        self._file = f
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self.path.unlink(missing_ok=True)
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
            for d in self._made:  # deepest first; a folder with anything in it stays
                try:
                    d.rmdir()
                except OSError:
                    break


def check_out_dir(out_dir: Path, inputs: Optional[Dict[str, Any]] = None) -> None:
    """Refuse, before anything is loaded, an --out-dir that cannot hold a run (a file, not writable), that is a base
    model's directory, or whose run files are one of the run's `inputs` (flag -> path): --force would delete that
    input before the run reads it, and the run would overwrite it."""
    if out_dir.exists() and not out_dir.is_dir():
        raise TrainError(f"--out-dir {out_dir} is a file; give a directory (it is created if missing).")
    if is_base_dir(out_dir):
        raise TrainError(f"--out-dir {out_dir} is a base model's directory (config.json and its weights); a run "
                         f"would write its Aligner, metrics and run state among the model's files. Choose another "
                         f"--out-dir (without the flag: out/<objective>/<base>).")
    for flag, path in (inputs or {}).items():
        if not isinstance(path, (str, os.PathLike)):
            continue
        p = Path(path).resolve()
        for name in RUN_FILES:
            target = (out_dir / name).resolve()
            if p == target or target in p.parents:
                where = (f"is the run's own {name} in --out-dir {out_dir}" if p == target else
                         f"is inside {out_dir / name}, which a run in --out-dir {out_dir} writes")
                resume = f" (without {flag})" if flag == "--init-aligner" else ""
                raise TrainError(f"{flag} {path} {where} (--force deletes it before it is read). Copy it out of "
                                 f"{out_dir} and pass the copy, or choose another --out-dir; to continue the run that "
                                 f"wrote it, use --resume auto{resume}.")
    parent = next((p for p in [out_dir, *out_dir.parents] if p.exists()), Path("."))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise TrainError(f"--out-dir {out_dir}: {parent} is not writable; choose a directory you can write to.")


def existing_run_files(out_dir: Path) -> List[str]:
    return [name for name in RUN_FILES if (out_dir / name).exists()]


def prepare_out_dir(out_dir: Path, resume: Optional[str], resuming: bool, force: bool) -> Optional[str]:
    """Make OUT ready for a fresh run or a resume (call under the RunLock). An OUT that holds another run is refused
    unless the run resumes it or --force (its run files are deleted first). Returns a note for the log, or None."""
    found = existing_run_files(out_dir)
    if not found or resuming:
        return None
    if not force:
        if resume:
            raise TrainError(f"{out_dir} holds a run ({', '.join(found)}) but no readable run state to resume; pass "
                             f"--force to delete it and start over, or choose another --out-dir.")
        raise TrainError(f"{out_dir} already holds a run ({', '.join(found)}). Pass --resume auto to continue it, "
                         f"--force to delete it and start over, or choose another --out-dir.")
    for name in found:
        p = out_dir / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return f"--force: deleted the previous run's {', '.join(found)} in {out_dir}"


# ---------------------------------------------------------------------------------------------------------------------
# RNG states


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


# ---------------------------------------------------------------------------------------------------------------------
# The Aligner and optimizer under any strategy


def is_sharded(fabric) -> bool:
    """Whether the run's parameters are sharded (--strategy fsdp): each rank holds a slice of each one."""
    from lightning_fabric.strategies import ModelParallelStrategy

    return isinstance(getattr(fabric, "strategy", None), ModelParallelStrategy)


def local_part(t: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a sharded (FSDP2 DTensor) tensor; any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole of a sharded (FSDP2 DTensor) tensor, gathered (collective: call on every rank); any other as is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def resharded(module: nn.Module) -> nn.Module:
    """The module with its sharded parameters in place (the ones the optimizer holds): FSDP2 keeps the root unit's
    gathered after a forward pass without a backward one (validation)."""
    from torch.distributed.fsdp import FSDPModule

    inner = getattr(module, "_forward_module", module)
    if isinstance(inner, FSDPModule):
        inner.reshard()
    return inner


def aligner_tensors(module: nn.Module, aligner: nn.Module) -> Dict[str, torch.Tensor]:
    """Full (unsharded) copies of the Aligner's prefix and gate on the CPU, from any strategy. Under FSDP only these
    two are gathered (collective: call on every rank); Fabric's own `fabric.save(filter=...)` would gather the whole
    base first and filter afterwards: gigabytes per save."""
    resharded(module)
    return {name: full_tensor(getattr(aligner, name).detach()).cpu().clone() for name in ("prefix", "gate")}


def optimizer_state(fabric, module: nn.Module, optimizer) -> Dict[str, Any]:
    """A full optimizer state dict of plain tensors. FSDP: gathered with torch.distributed.checkpoint (frozen base
    weights left out); otherwise the optimizer's own state dict (it holds only the Aligner's parameters)."""
    if fabric is not None and is_sharded(fabric):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        return get_optimizer_state_dict(resharded(module), getattr(optimizer, "optimizer", optimizer), options=opts)
    return getattr(optimizer, "optimizer", optimizer).state_dict()


def load_optimizer_state(fabric, module: nn.Module, optimizer, state: Dict[str, Any]) -> None:
    groups = getattr(optimizer, "optimizer", optimizer).param_groups
    saved = state.get("param_groups", [])
    if len(saved) == 1 and len(groups) > 1 and len(saved[0]["params"]) == sum(len(g["params"]) for g in groups):
        # a state from before the gates had their own group: the same parameters in the same order, one group
        ids, cut = list(saved[0]["params"]), 0
        state = dict(state, param_groups=[])
        for g in groups:
            state["param_groups"].append(dict(saved[0], params=ids[cut:cut + len(g["params"])],
                                              lr_ratio=g.get("lr_ratio", 1.0)))
            cut += len(g["params"])
    if fabric is not None and is_sharded(fabric):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        inner = resharded(module)
        # a state saved without FSDP numbers the parameters in the optimizer's order; this reader wants their names
        names = {p: n for n, p in inner.named_parameters()}
        name_of = dict(zip((i for g in state["param_groups"] for i in g["params"]),
                           (names[p] for g in groups for p in g["params"])))
        state = {"state": {name_of.get(k, k): v for k, v in state["state"].items()},
                 "param_groups": [dict(g, params=[name_of.get(i, i) for i in g["params"]])
                                  for g in state["param_groups"]]}
        opts = StateDictOptions(full_state_dict=True, ignore_frozen_params=True)
        set_optimizer_state_dict(inner, getattr(optimizer, "optimizer", optimizer), state, options=opts)
        return
    # torch's own reader maps saved parameters to the optimizer's by position, whether numbered or named (FSDP)
    getattr(optimizer, "optimizer", optimizer).load_state_dict(state)


# ---------------------------------------------------------------------------------------------------------------------
# Run states


def state_path(out_dir: PathLike, step: int) -> Path:
    return Path(out_dir) / STATE_DIR / f"step-{step:06d}.pt"


def state_candidates(out_dir: PathLike) -> List[Path]:
    """The run states in OUT, newest first: last.pt, then step-XXXXXX.pt by step (OUT/state/, else the pre-0.2
    OUT/checkpoints/)."""
    for name in (STATE_DIR, LEGACY_STATE_DIR):
        d = Path(out_dir) / name
        found = ([d / "last.pt"] if (d / "last.pt").is_file() else []) + sorted(d.glob("step-*.pt"), reverse=True)
        if found:
            return found
    return []


def load_state(path: PathLike) -> Dict[str, Any]:
    """A run state written by `RunState.save` (never unpickling code: weights_only)."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, a pickle with code, not a torch file at all
        raise TrainError(f"{path} is not a lit-aligner run state: {torch_load_failure(e)}. Only run states of plain "
                         f"tensors are read; pick another one (e.g. an earlier step-XXXXXX.pt) or start without "
                         f"--resume.") from None
    if not isinstance(state, dict) or state.get("version") not in (1, STATE_VERSION) or "aligner" not in state:
        raise TrainError(f"{path}: not a lit-aligner run state (expected a dict with 'aligner', 'optimizer', 'step'); "
                         f"start without --resume.")
    return state


def resolve_resume(resume: Optional[str], out_dir: PathLike) -> Tuple[Optional[Path], Optional[Dict[str, Any]],
                                                                      List[str]]:
    """--resume: None/"" → a fresh run; "auto" → the newest READABLE state in OUT (a fresh run if there is none; an
    unreadable newer one is skipped, with a note); a path (file, or a run directory) → that state. Returns (path,
    state, notes)."""
    if resume in (None, "", False):
        return None, None, []
    notes: List[str] = []
    if str(resume) != "auto":
        path = Path(resume)
        if path.is_dir():
            found = state_candidates(path) or state_candidates(path.parent)
            if not found:
                raise TrainError(f"--resume {path}: no run state in that directory (expected {STATE_DIR}/last.pt or "
                                 f"{STATE_DIR}/step-XXXXXX.pt); pass a state file or --resume auto.")
            path = found[0]
        elif not path.is_file():
            raise TrainError(f"--resume {path}: no such run state; pass OUT/{STATE_DIR}/last.pt, a step-XXXXXX.pt, "
                             f"or --resume auto.")
        return path, load_state(path), notes
    for path in state_candidates(out_dir):
        try:
            return path, load_state(path), notes
        except TrainError as e:
            notes.append(f"skipped an unreadable run state: {e}")
    return None, None, notes


def check_resumable(state: Dict[str, Any], identity: Dict[str, Any], path: Path, force: bool) -> Optional[str]:
    """Refuse to resume a state written by a run with other flags (data, template, base, learning rate, shape, ...)
    unless --force. Returns a note when --force overrides a difference."""
    old = state.get("identity")
    if old is None:  # a pre-0.2 state records only a few of them
        run = state.get("run_config", {})
        train = state.get("train_config", {})
        old = {k: v for k, v in {"n_tokens": run.get("n_tokens"), "start_layer": run.get("start_layer"),
                                 "global_batch_size": train.get("global_batch_size"), "seed": train.get("seed")}.items()
               if v is not None}
    diff = [f"--{k.replace('_', '-')} {old[k]} (now {v})" for k, v in identity.items() if k in old and old[k] != v]
    if not diff:
        return None
    msg = f"{path} was written by a run with {', '.join(diff)}"
    if force:
        return f"{msg}; continuing anyway (--force)"
    raise TrainError(f"{msg}. Resume with the same flags, pass --force to continue with the new ones, or start a new "
                     f"run in another --out-dir.")


class RunState:
    """Writes OUT/state/step-XXXXXX.pt (and the same as last.pt), atomically, on rank 0. Every rank calls `save` (FSDP
    gathers the Aligner collectively)."""

    def __init__(self, fabric, out_dir: PathLike, module: nn.Module, optimizer, aligner: nn.Module,
                 extra: Dict[str, Any], objective: Any = None):
        self.fabric, self.out_dir, self.module, self.optimizer, self.aligner = fabric, Path(out_dir), module, \
            optimizer, aligner
        self.extra = extra  # plain values: identity, run config, template, train config
        self.objective = objective  # its `state_dict()` is saved too (e.g. a TR-DPO reference)
        self.newest: Optional[Path] = None

    def latest(self) -> Optional[Path]:
        found = state_candidates(self.out_dir)
        return self.newest or (found[0] if found else None)

    def save(self, step: int) -> Path:
        tensors = aligner_tensors(self.module, self.aligner)
        if not all(torch.isfinite(t).all() for t in tensors.values()):
            raise TrainError(f"step {step}: the Aligner is not finite; no run state written (lower --learning-rate).")
        state = {"version": STATE_VERSION, "step": step, "aligner": tensors,
                 "optimizer": optimizer_state(self.fabric, self.module, self.optimizer), "rng": capture_rng_state(),
                 "objective": self.objective.state_dict() if self.objective is not None else {}, **self.extra}
        path = state_path(self.out_dir, step)
        if self.fabric.global_rank == 0:
            atomic_torch_save(state, path)
            atomic_torch_save(state, path.parent / "last.pt")
        self.fabric.barrier()
        self.newest = path
        return path


# ---------------------------------------------------------------------------------------------------------------------
# Signals


class GracefulStop:
    """While active, SIGINT and SIGTERM only set `requested`: the loop finishes its optimizer step (GRPO with
    --num-iterations: the last step on its batch of samples), writes a run state and returns. A second SIGINT
    interrupts at once (KeyboardInterrupt). Restores the old handlers on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested: Optional[str] = None
        self._old: Dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


# ---------------------------------------------------------------------------------------------------------------------
# Metrics


def start_wandb(project: str, out_dir: Path, config: Dict[str, Any], run_id: Optional[str] = None):
    """The Weights & Biases run of --wandb-project (rank 0 starts it): named after the out dir (or $WANDB_NAME), the
    run's flags as its config, its files in OUT/wandb/; `run_id`, the W&B run of the state being resumed, continues
    that run. Started before the model loads, so that a missing login fails in seconds."""
    import wandb

    try:
        return wandb.init(project=project, dir=str(out_dir), name=os.environ.get("WANDB_NAME") or out_dir.name,
                          config=config, id=run_id, resume="allow" if run_id else None)
    except wandb.errors.Error as e:  # no API key (and no terminal to ask for one), no network, a bad project name
        raise TrainError(f"Weights & Biases: {str(e).strip()} (or WANDB_MODE=offline: the run stays in "
                         f"{out_dir / 'wandb'} for `wandb sync`)") from None


class MetricsLog:
    """OUT/metrics.csv (one row per logged step; validation columns on evaluation steps) through Lightning Fabric's
    CSVLogger, TensorBoard event files in OUT/tensorboard/ through its TensorBoardLogger when `tensorboard` is
    installed, and the same rows to a Weights & Biases run when given one (`start_wandb`). A resumed run keeps the rows
    up to its step and continues the file as the uninterrupted run would (TensorBoard and W&B, which kept theirs, get
    only the new steps). Only rank 0 writes (the loggers are rank-zero only; only rank 0 has a W&B run)."""

    def __init__(self, out_dir: PathLike, resume_step: Optional[int] = None, wandb_run: Any = None):
        import csv

        from lightning_fabric.loggers import CSVLogger, TensorBoardLogger
        from lightning_fabric.loggers.tensorboard import _TENSORBOARD_AVAILABLE

        out_dir = Path(out_dir)
        path = out_dir / "metrics.csv"
        kept = []
        if resume_step is not None and path.is_file():
            with open(path, newline="") as f:
                kept = [r for r in csv.DictReader(f) if r.get("step") and int(r["step"]) <= resume_step]
        self.wandb_run = wandb_run
        self.loggers = [CSVLogger(out_dir, name="", version="", flush_logs_every_n_steps=1)]
        if _TENSORBOARD_AVAILABLE:
            self.loggers.append(TensorBoardLogger(out_dir, name="tensorboard", version=""))
        with warnings.catch_warnings():  # "previous log files will be deleted": we rewrite the kept rows below
            warnings.simplefilter("ignore")
            for row in kept:
                self.log({k: float(v) if k != "step" else int(v) for k, v in row.items() if v not in ("", None)},
                         kept=True)
            if not kept:  # create the file (and drop a stale one) now, not at the first row
                self.loggers[0].experiment  # noqa: B018

    def log(self, row: Dict[str, Any], kept: bool = False) -> None:
        """One metrics row; `kept`: a resumed run's earlier row, rewritten into metrics.csv only."""
        step = int(row["step"])
        values = {k: float(v) for k, v in row.items() if k != "step" and v is not None}
        for logger in self.loggers[:1] if kept else self.loggers:
            logger.log_metrics(values, step=step)
        if not kept and self.wandb_run is not None:
            self.wandb_run.log(values, step=step)

    def close(self) -> None:
        for logger in self.loggers:
            logger.finalize("success")
        if self.wandb_run is not None:
            self.wandb_run.finish()
