"""A whole training run, the same for every objective: flags checked, Fabric launched, the run directory locked and
readied, the data, base model and Aligner loaded (or resumed), the objective built, `engine.fit`, and the trained
Aligner saved with its metadata. `finetune/aligner.py` (SFT, correction) and `finetune/aligner_dpo.py` (DPO) call
`train`."""

import dataclasses
import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from lit_aligner.training.config import RunConfig, TrainError, plain
from lit_aligner.training.engine import FitResult, evaluate, fit, gradient_accumulation_steps, optimizer_groups
from lit_aligner.training.objectives import Objective, ObjectiveModule, as_reference, get_objective
from lit_aligner.training.state import (ALIGNER_NAME, MetricsLog, RunLock, RunState, check_out_dir, check_resumable,
                                        load_optimizer_state, prepare_out_dir, resolve_resume, restore_rng_state,
                                        start_wandb)


@dataclass
class Run:
    """Everything a run has loaded; objectives read what they need from it (`Objective.from_run` / `prepare`)."""

    cfg: RunConfig
    fabric: Any
    precision: str
    base_config: Any
    out_dir: Path
    tokenizer: Any = None
    template: str = ""
    train: Any = None
    val: Any = None
    info: Dict[str, Any] = field(default_factory=dict)
    model: Any = None
    init_aligner: Any = None
    start: Any = False  # the --init-aligner as it was before training, a frozen copy (the end reports'); False: none
    objective: Optional[Objective] = None
    resume_path: Optional[Path] = None
    state: Optional[Dict[str, Any]] = None


def launch(cfg: RunConfig, precision: str):
    """A launched Fabric for the run's devices (other processes of a multi-device run re-run the calling script)."""
    import lightning_fabric as L

    from lit_aligner import perf

    if cfg.accelerator != "cpu" and torch.cuda.is_available():
        # TF32 and cuDNN autotuning before Fabric sets up the device, which otherwise tells the user to set the
        # matmul precision that these flags set (on the CPU this changes nothing)
        perf.configure_backends(torch.device("cuda"))
    half = precision in ("bf16-true", "16-true")
    try:
        fabric = L.Fabric(accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes,
                          strategy=make_strategy(cfg.strategy), precision=None if half else precision,
                          plugins=[fp32_aligner_precision(precision)] if half else None)
    except (ValueError, TypeError, RuntimeError, ImportError) as e:  # Lightning's word on devices this machine lacks
        raise TrainError(f"--accelerator {cfg.accelerator} --devices {cfg.devices} --strategy {cfg.strategy} "
                         f"--precision {precision}: {e}") from None
    fabric.launch()
    return fabric


def fp32_aligner_precision(precision: str):
    """Fabric's bf16-true / 16-true plugin, except that the Aligner stays in fp32 (master weights for the few numbers
    that train, as PEFT keeps adapters of a half-precision base in fp32; the model casts them to the activations'
    dtype). In fp16, AdamW's eps (1e-8) rounds to 0, so a fresh Aligner's first step, whose prefix has no gradient yet
    (the gates are zero), divided 0 by 0; in bf16, an update below 1/256 of a weight rounds away."""
    from lightning_fabric.plugins.precision import HalfPrecision

    from lit_aligner.model import Aligner

    class FP32Aligner(HalfPrecision):
        def convert_module(self, module: torch.nn.Module) -> torch.nn.Module:
            aligners = [m for m in module.modules() if isinstance(m, Aligner)]
            kept = [[p.detach().clone() for p in m.parameters()] for m in aligners]  # not rounded through half
            module = super().convert_module(module)
            with torch.no_grad():
                for m, values in zip(aligners, kept):
                    for p, v in zip(m.float().parameters(), values):
                        p.copy_(v)
            return module

    return FP32Aligner(precision)


def make_strategy(strategy: str):
    """Fabric strategy from a flag: "auto", "ddp", or "fsdp": PyTorch's FSDP2 (`fully_shard`, through Fabric's
    ModelParallelStrategy; unlike Fabric's FSDPStrategy it also runs on the CPU, so the tests run it), see
    `shard_model`."""
    if strategy != "fsdp":
        return strategy
    from lightning_fabric.strategies import ModelParallelStrategy

    # the run shards the model itself (`_setup_module`), before Fabric's precision plugin could convert it whole
    return ModelParallelStrategy(parallelize_fn=lambda module, mesh: module, save_distributed_checkpoint=False)


def shard_model(module: torch.nn.Module, mesh, dtype: Optional[torch.dtype] = None,
                device: Optional[torch.device] = None) -> torch.nn.Module:
    """FSDP2 units: every `Block` its own, the rest (embeddings, final norm, LM head, the Aligner) the root's. The
    mesh is Fabric's (nodes, devices per node): each node holds one sharded copy and the nodes replicate it (HSDP),
    so parameters are gathered within a node only.

    The module's tensors (a base loaded in its file's dtype, memory-mapped) are the source; the module is sharded on
    the meta device, materialised on `device` (default: the CPU) in `dtype` (default: the source's), and each rank
    copies in only its own rows of every tensor, converted as they are copied: a rank reads and converts 1/world of the
    weights, never a whole tensor (torchtitan's way, from our safetensors file instead of a distributed checkpoint)."""
    from itertools import chain

    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from lit_aligner.model import Aligner, Block

    def tensors():
        return chain(module.named_parameters(), module.named_buffers())

    sources = dict(tensors())
    module.to("meta")
    if dtype is not None:
        module.to(dtype)  # floating-point tensors only; free on the meta device
        for name, m in module.named_modules():  # the Aligner keeps its own (fp32: `fp32_aligner_precision`)
            if isinstance(m, Aligner):
                m.to(sources[f"{name}.prefix"].dtype)
    for block in (m for m in module.modules() if isinstance(m, Block)):
        fully_shard(block, mesh=mesh)
    fully_shard(module, mesh=mesh)
    module.to_empty(device=device or torch.device("cpu"))  # FSDP2 re-registers its shards (`FSDPModule._apply`)
    with torch.no_grad():
        for name, t in tensors():
            if isinstance(t, DTensor):
                t.to_local().copy_(_local_rows(sources[name], t))
            else:
                t.copy_(sources[name])
    return module


def _local_rows(full: torch.Tensor, sharded) -> torch.Tensor:
    """The part of `full` that this rank holds of the DTensor `sharded` (FSDP2: `Shard(0)` over the devices of a node,
    `Replicate()` over the nodes), as a view: only its rows are read when it is copied. A `Shard(d)` placement splits
    dim d as `torch.chunk` does (chunks of ceil(size / n); the last ones short or empty)."""
    from torch.distributed.tensor import Replicate, Shard

    for mesh_dim, placement in enumerate(sharded.placements):
        if isinstance(placement, Shard):
            size, n = full.shape[placement.dim], sharded.device_mesh.size(mesh_dim)
            chunk = -(-size // n)
            start = min(sharded.device_mesh.get_local_rank(mesh_dim) * chunk, size)
            full = full.narrow(placement.dim, start, min(chunk, size - start))
        elif not isinstance(placement, Replicate):
            raise NotImplementedError(f"loading a {placement} placement")
    if full.shape != sharded.to_local().shape:
        raise RuntimeError(f"rows {tuple(full.shape)} for a local shard {tuple(sharded.to_local().shape)}")
    return full


def train(cfg: RunConfig) -> Dict[str, Any]:
    """Train (or with eval_only, DPO and KTO: evaluate) an Aligner as `cfg` says. Returns a summary dict: out_dir, step,
    stopped (a signal name), state (the newest run state), val / first_val (validation metrics; val_whole_split: val
    scored every held-out row), train_loss (the last step's), seconds, throughput, template, aligner (the saved file),
    data (the loader's counts) and, when made, the before/after comparison."""
    from lit_aligner.base import load_config
    from lit_aligner.devices import default_precision

    cfg.check()
    base_config = load_config(cfg.checkpoint_dir)  # BaseModelError with the conversion command when missing
    if cfg.data_options.max_seq_length > base_config.block_size:
        raise TrainError(f"--max-seq-length {cfg.data_options.max_seq_length} exceeds the context of "
                         f"{cfg.checkpoint_dir} ({base_config.block_size} tokens); lower it.")
    if cfg.start_layer >= base_config.n_layer and cfg.init_aligner is None:
        raise TrainError(f"--start-layer {cfg.start_layer} must be < the model's {base_config.n_layer} layers")
    out_dir = Path(cfg.out_dir) if cfg.out_dir else cfg.default_out_dir(base_config.name)
    eval_only = getattr(cfg, "eval_only", False)
    if eval_only and cfg.resume:
        raise TrainError("--eval-only evaluates --init-aligner; it does not take --resume")
    if not eval_only:
        check_out_dir(out_dir, cfg.input_paths())
    precision = cfg.precision or default_precision(cfg.accelerator)
    fabric = launch(cfg, precision)
    run = Run(cfg, fabric, precision, base_config, out_dir)
    with RunLock(out_dir) if fabric.global_rank == 0 and not eval_only else nullcontext() as lock:
        if lock is not None and lock.note:
            fabric.print(f"note: {lock.note}")
        return _train(run, eval_only)


# TrainConfig fields that joined the run identity after run states existed: the value an earlier run trained with
# unless its recorded train config says otherwise, and the note
LATER_TRAIN_SETTINGS = {
    "group_by_length": (False, "predates length-grouped batching: the run continues in its own order"),
    "shuffle_grouped_batches": (False, "predates the shuffled order of length-grouped batches: the run continues in "
                                       "its own order, each run of 50 batches longest to shortest"),
    "gate_lr_ratio": (1.0, "predates --gate-lr-ratio: the run continues with its gates at {}x"),
    "min_lr_ratio": (0.0, "predates the default floor of the cosine: the run continues with --min-lr-ratio {}"),
    "max_norm": (None, "predates --max-norm: the run continues without gradient clipping"),
    # the optimizer's state carries these anyway (AdamW's param groups): named so a changed flag is refused, not lost
    "weight_decay": (0.02, "was trained with --weight-decay {} (before the run identity named it): the run "
                           "continues with it"),
    "adam_beta1": (0.9, "predates --adam-beta1: the run continues with {}"),
    "adam_beta2": (0.95, "predates --adam-beta2: the run continues with {}"),
}

# identity values that took another spelling: an earlier state's -> today's (the same training either way)
RESPELLED_VALUES = {"scale_rewards": {True: "group", False: "none"}}


def _resume(run: Run) -> None:
    cfg, fabric = run.cfg, run.fabric
    run.resume_path, run.state, notes = resolve_resume(cfg.resume, run.out_dir)
    if run.state is not None:
        identity, trained = run.state.get("identity") or {}, run.state.get("train_config") or {}
        for name, spellings in RESPELLED_VALUES.items():
            if isinstance(identity.get(name), bool):
                identity[name] = spellings[identity[name]]
        for name, (before, what) in LATER_TRAIN_SETTINGS.items():
            before = trained.get(name, before)
            if name not in identity and getattr(cfg.train, name) != before:
                setattr(cfg.train, name, before)  # the state predates the setting: go on as it was trained (exact)
                if name != "shuffle_grouped_batches" or cfg.train.group_by_length:  # (no order to keep without)
                    notes.append(f"{run.resume_path} {what.format(before)}")
        note = check_resumable(run.state, cfg.identity(), run.resume_path, cfg.force)
        notes += [note] if note else []
    if fabric.global_rank == 0:
        note = prepare_out_dir(run.out_dir, cfg.resume, run.state is not None, cfg.force)
        notes += [note] if note else []
    for note in notes:
        fabric.print(f"note: {note}")
    fabric.barrier()


def _load_data(run: Run) -> None:
    """Tokenizer and data (and with them the steps of --epochs)."""
    from lit_aligner.base import load_tokenizer
    from lit_aligner.data import check_template_variables_fit, load_data, report, storable_info

    cfg, fabric = run.cfg, run.fabric
    objective_cls = get_objective(cfg.objective_name)
    run.tokenizer = load_tokenizer(cfg.checkpoint_dir, run.base_config)
    template = cfg.template or objective_cls.default_template(run.tokenizer)
    variables = cfg.template_variables()
    check_template_variables_fit(template, variables)
    run.tokenizer.template_variables = variables
    options = cfg.data_options
    if cfg.val_data is not None:  # a held-out file: the training file is not split
        options = dataclasses.replace(options, val_fraction=0.0, val_size=None)
    data_arguments = objective_cls.data_arguments(cfg)
    run.train, run.val, run.info = load_data(objective_cls.data_kind, cfg.data, run.tokenizer, template, options,
                                             cfg.train.seed, **data_arguments)
    run.template = run.info.get("template") or template
    fabric.print(report(run.info))
    if cfg.val_data is not None:
        run.val, _, val_info = load_data(objective_cls.data_kind, cfg.val_data, run.tokenizer, run.template, options,
                                         cfg.train.seed, **data_arguments)
        fabric.print(report(val_info).replace(" train=", " (validation) train="))
        run.info.update(val=len(run.val), val_source=str(cfg.val_data), val_info=storable_info(val_info))
    if cfg.train.epochs is not None:
        per = cfg.steps_per_batch()
        cfg.train.max_steps = per * max(1, math.ceil(cfg.train.epochs * len(run.train) / cfg.train.global_batch_size))
        fabric.print(f"--epochs {cfg.train.epochs:g}: {cfg.train.max_steps:,} steps of {cfg.train.global_batch_size} "
                     f"over {len(run.train):,} training rows" + (f", each batch for {per} steps" if per > 1 else ""))
    if not cfg.train.validates:
        fabric.print("note: validation is off (--eval-iters 0); --eval-iters all validates on the whole split")
    elif shared := run.val.shared_rows(run.train):  # its loss would be called held-out
        source = "--val-data" if cfg.val_data is not None else "the validation split's"
        fabric.print(f"note: {shared:,} of {source} {len(run.val):,} rows are also training rows (the same tokens), so "
                     f"their validation loss is not held-out" + ("; is --val-data the training file?" if
                                                                  shared == len(run.val) else ""))
    elif not len(run.val):
        fabric.print("note: no validation rows (--val-fraction 0, no --val-data): the run is not validated")


def _load_model(run: Run) -> None:
    """Base model, Aligner (init, fresh or resumed) and the objective."""
    from lit_aligner.aligner_files import attach, load_aligner, new_aligner
    from lit_aligner.base import load_model
    from lit_aligner.devices import precision_dtype
    from lit_aligner.model import check_only_aligner_trainable, mark_only_aligner_as_trainable, num_trainable

    cfg, fabric = run.cfg, run.fabric
    objective_cls = get_objective(cfg.objective_name)
    fabric.seed_everything(cfg.train.seed)  # the same fresh prefix on every rank
    if cfg.strategy == "fsdp":  # in the file's dtype, memory-mapped: `shard_model` copies each rank its own rows
        run.model = load_model(cfg.checkpoint_dir, "cpu")
    else:
        run.model = load_model(cfg.checkpoint_dir, fabric.device, precision_dtype(run.precision), cfg.quantize)
    # The Aligner trains in fp32 on any base (master weights: `fp32_aligner_precision`), also before the plugin
    # converts the model, so that neither an --init-aligner file nor a resumed state is rounded to the base's dtype.
    if cfg.init_aligner is not None:
        run.init_aligner, _ = load_aligner(cfg.init_aligner, run.model, base_name=str(cfg.checkpoint_dir),
                                           dtype=torch.float32)
        if (run.init_aligner.n_tokens, run.init_aligner.start_layer) != (cfg.n_tokens, cfg.start_layer):
            fabric.print(f"--init-aligner {cfg.init_aligner}: N={run.init_aligner.n_tokens}, start layer "
                         f"{run.init_aligner.start_layer} (the file's shape wins over --n-tokens/--start-layer)")
        cfg.n_tokens, cfg.start_layer = run.init_aligner.n_tokens, run.init_aligner.start_layer
        attach(run.model, run.init_aligner, dtype=torch.float32)
        run.start = as_reference(run.init_aligner, fabric.device)
    else:
        new_aligner(run.model, cfg.n_tokens, cfg.start_layer, cfg.prefix_init, cfg.prefix_init_scale, torch.float32)
    # the objective (a DPO reference copies the init Aligner) before the resumed values enter model.aligner
    run.objective = objective_cls.from_run(cfg, run)
    run.objective.fabric = run.fabric
    if run.state is not None:
        with torch.no_grad():
            for name in ("prefix", "gate"):
                saved, param = run.state["aligner"][name], getattr(run.model.aligner, name)
                if saved.shape != param.shape:
                    raise TrainError(f"{run.resume_path}: Aligner {name} {tuple(saved.shape)} does not fit this run's "
                                     f"{tuple(param.shape)}; resume with the same --n-tokens/--start-layer.")
                param.copy_(saved)
        run.objective.load_state_dict(run.state.get("objective") or {})
    mark_only_aligner_as_trainable(run.model)
    check_only_aligner_trainable(run.model)
    fabric.print(f"base {run.base_config.name} ({cfg.checkpoint_dir}), Aligner N={cfg.n_tokens} from layer "
                 f"{cfg.start_layer}{' from ' + str(cfg.init_aligner) if cfg.init_aligner else ''}: "
                 f"{num_trainable(run.model):,} trainable parameters; objective {run.objective.name}; precision "
                 f"{run.precision}{', base quantized ' + run.model.quantize if run.model.quantize else ''}, "
                 f"{fabric.world_size} process(es)")
    run.objective.prepare(run)


def _setup_module(run: Run):
    from lit_aligner import perf
    from lit_aligner.devices import precision_dtype

    cfg = run.cfg
    policy = cfg.activation_checkpointing
    if policy != "none":  # before FSDP shards the blocks (their forwards are wrapped, not the modules)
        n = perf.apply_activation_checkpointing(run.model, policy, cfg.start_layer)
        run.fabric.print(f"activation checkpointing '{policy}' on {n} modules of the gated blocks")
    if cfg.compile:
        perf.compile_blocks(run.model)
    module = ObjectiveModule(run.model, run.objective)
    if cfg.strategy == "fsdp":
        shard_model(module, run.fabric.strategy.device_mesh, precision_dtype(run.precision), run.fabric.device)
    return run.fabric.setup_module(module)


def _train(run: Run, eval_only: bool) -> Dict[str, Any]:
    cfg, fabric = run.cfg, run.fabric
    wandb_run = None
    if not eval_only:
        gradient_accumulation_steps(cfg.train.global_batch_size, cfg.train.micro_batch_size, fabric.world_size)
        _resume(run)
        if cfg.wandb_project and fabric.global_rank == 0:
            wandb_run = start_wandb(cfg.wandb_project, run.out_dir, plain(cfg), (run.state or {}).get("wandb_run_id"))
    _load_data(run)
    aligner_file = run.out_dir / ALIGNER_NAME
    if not eval_only and run.state is not None and int(run.state["step"]) >= cfg.train.max_steps and \
            aligner_file.is_file():
        # a finished run (known once --epochs has its steps, before the base loads): nothing to train, and saving
        # again would drop the file's validation figures
        step = int(run.state["step"])
        where = "the last" if step == cfg.train.max_steps else "past the last"
        fabric.print(f"note: {run.resume_path} is at step {step}, {where} of --max-steps {cfg.train.max_steps}: "
                     f"nothing to train, and {aligner_file} stays as it is. Raise --max-steps to train on.")
        if wandb_run is not None:
            wandb_run.finish()
        return {"out_dir": str(run.out_dir), "step": step, "finished": True, "aligner": str(aligner_file)}
    _load_model(run)
    module = _setup_module(run)
    summary: Dict[str, Any] = {"out_dir": str(run.out_dir), "template": run.template, "objective": run.objective.name,
                               "data": {k: v for k, v in run.info.items() if k != "bad_row_examples"},
                               **run.objective.metadata()}
    if eval_only:
        batches = cfg.train.eval_batches if cfg.train.validates else None  # evaluating is the point: 0 means all
        metrics = evaluate(module, run.objective, run.val, cfg.train.micro_batch_size, batches, fabric)
        return {"eval_only": True, **summary, "init_aligner": str(cfg.init_aligner) if cfg.init_aligner else None,
                **metrics}

    optimizer = torch.optim.AdamW(optimizer_groups(module, cfg.train), lr=cfg.train.learning_rate,
                                  weight_decay=cfg.train.weight_decay,
                                  betas=(cfg.train.adam_beta1, cfg.train.adam_beta2))
    optimizer = fabric.setup_optimizers(optimizer)
    start_step = 0
    if run.state is not None:
        load_optimizer_state(fabric, module, optimizer, run.state["optimizer"])
        restore_rng_state(run.state["rng"])
        start_step = int(run.state["step"])
        fabric.print(f"resuming from {run.resume_path} at step {start_step}")
    extra = {"identity": cfg.identity(), "run_config": plain(cfg), "train_config": plain(cfg.train),
             "template": run.template, "wandb_run_id": wandb_run.id if wandb_run is not None else None}
    run_state = RunState(fabric, run.out_dir, module, optimizer, run.model.aligner, extra, run.objective)
    metrics = MetricsLog(run.out_dir, resume_step=start_step or None, wandb_run=wandb_run)
    result = fit(fabric, module, optimizer, run.model.aligner, run.train, run.val, cfg.train, run_state, metrics,
                 start_step=start_step, progress=cfg.progress)
    summary.update(step=result.step, stopped=result.stopped,
                   state=str(result.last_state) if result.last_state else None,
                   val=result.val, val_whole_split=result.val_whole, first_val=result.first_val,
                   val_loss=result.val.get("loss"),
                   first_val_loss=result.first_val.get("loss"), train_loss=result.train.get("loss"),
                   seconds=result.seconds, throughput=result.throughput)
    if result.stopped:
        fabric.print(f"\nstopped by {result.stopped} after step {result.step}; run state {result.last_state}. "
                     f"Continue with the same command plus --resume auto.")
        return summary
    summary["aligner"] = str(save_trained_aligner(run, module, result))
    if result.val:
        unit = run.objective.unit
        scope = "all" if result.val_whole else f"{cfg.train.eval_iters} micro-batches of the"
        fabric.print(f"validation ({scope} {len(run.val)} held-out rows, {result.val[unit]:,} {unit}): "
                     + ", ".join(f"{k} {v:.4f}" for k, v in result.val.items() if k != unit))
    report = getattr(run.objective, "final_report", lambda *a: None)(cfg, run, result)
    if report is not None:
        summary["comparison"] = report
    fabric.barrier()
    return summary


def save_trained_aligner(run: Run, module, result: FitResult) -> Path:
    """OUT/aligner.safetensors with the run's metadata (every rank gathers the Aligner, which FSDP needs; rank 0
    writes it, atomically)."""
    from lit_aligner.aligner_files import build_aligner, save_aligner
    from lit_aligner.data import storable_info
    from lit_aligner.training.state import aligner_tensors

    cfg, c = run.cfg, run.base_config
    tensors = aligner_tensors(module, run.model.aligner)
    final = build_aligner(cfg.n_tokens, cfg.start_layer, c.n_layer, c.n_head, c.n_embd, tensors["prefix"],
                          tensors["gate"])
    variables = run.info.get("template_variables")  # the data's (a prepared directory's win over the flag)
    metadata = {"template": run.template, **({"template_variables": variables} if variables else {}),
                "mode": run.objective.name, "n_tokens": cfg.n_tokens,
                "start_layer": cfg.start_layer, "created_by": f"lit-aligner {run.objective.name} training",
                "steps": result.step, "val_loss": result.val.get("loss"), "val": result.val,
                "training_args": plain(cfg), "data": storable_info(run.info), **run.objective.metadata()}
    path = run.out_dir / ALIGNER_NAME
    if run.fabric.global_rank == 0:
        save_aligner(final, path, c.name, metadata)
        run.fabric.print(f"saved the Aligner to {path} ({result.step} steps, {result.seconds:.0f} s)")
    return path


__all__: List[str] = ["Run", "launch", "make_strategy", "save_trained_aligner", "shard_model", "train"]
