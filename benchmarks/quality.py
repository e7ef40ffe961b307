"""The paper's comparison on equal footing: the global-token Aligner (this project) against LoRA and prefix tuning
(Hugging Face PEFT on `transformers`), same base, same tokenized rows, same steps, batch, schedule and optimizer.

- Rows: `lit_aligner.data.load_data` on --data with --template (the project's own rendering and response-only
  masking), --max-seq-length, a seeded held-out split of --heldout rows. Every system sees the same rows in the same
  order (`lit_aligner.training.engine.BatchOrder`, length-grouped and shuffled by batch as the trainer does
  by default; --no-shuffle-grouped-batches for the order of the files measured before that) with the
  same warm-up + cosine schedule (`lr_at`, --min-lr-ratio) and AdamW (the trainer's betas, --adam-beta1/-beta2, and
  weight decay 0.02).
- Aligner: trained by this project's trainer (`lit_aligner.train`), each variant of --aligners (N:init; normal = the
  paper's N(0, 1) prefix) at each learning rate of --aligner-lrs, gate ratio of --gate-lr-ratios and starting scale of
  --init-scales (by default the trainer's defaults), and with --paper each N as the paper trains it.
- LoRA r=8 on q_proj and v_proj (alpha 16, no dropout; other ranks with --lora-ranks, alpha 2 x rank) and prefix
  tuning with 10 virtual tokens (PEFT defaults, no reparametrisation), trained by a plain PyTorch loop on the
  `transformers` model that `scripts/export_hf.py` writes from the same checkpoint; each learning rate of --lora-lrs /
  --prefix-lrs.
- Held-out loss: summed response-token cross-entropy over the held-out rows / their token count, the same code for
  every system. The sanity row checks that our model and transformers give the bare base the same held-out loss.
- Every system runs in its own child process (peak resident memory is per system; on a GPU, peak allocated memory).

Learning rates are picked by held-out loss on the same held-out rows for every system (fair between systems, slightly
optimistic for all). Every run is reported, not only the best.

    python benchmarks/quality.py                                     # SmolLM2-135M on the shared Alpaca subset
    python benchmarks/quality.py --resume --aligners 10:embedding --aligner-lrs 3e-2   # add a variant to its file
    python benchmarks/quality.py --steps 2 --heldout 16 --aligner-lrs 1e-2 --lora-lrs 1e-3 --prefix-lrs 1e-2 \\
        --aligners 1:normal --no-paper --max-seq-length 64          # a smoke run, about a minute on a CPU
"""

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (BenchmarkError, check_out, command_line, format_table, machine_info, machine_name,  # noqa: E402
                    peer_lora_config, peer_prefix_tuning_config, pick_device, require, sigterm_as_interrupt,
                    write_json)

import torch  # noqa: E402

from lit_aligner.cli import run_cli  # noqa: E402
from lit_aligner.default_model import DEFAULT_CHECKPOINT_DIR  # noqa: E402
from lit_aligner.files import UserError, check_output, input_files  # noqa: E402
from lit_aligner.model import DEFAULT_PREFIX_INIT  # noqa: E402
from lit_aligner.training.config import PAPER_RECIPE, RunConfig, TrainConfig, TrainError  # noqa: E402

DEFAULTS = TrainConfig()  # the trainer's defaults: what the no-flag sweep measures
REFERENCE_RANK = 8  # the paper's LoRA baseline: every "x LoRA's loss" is to LoRA r=8

REPO = Path(__file__).resolve().parent.parent
ALPACA = REPO.parent / "shared" / "data" / "alpaca" / "alpaca_4500.json"


# --- what every system shares -----------------------------------------------------------------------------------------


def load_rows(common: Dict[str, Any]):
    from lit_aligner.base import load_tokenizer
    from lit_aligner.data import DataOptions, load_data

    tokenizer = load_tokenizer(common["checkpoint_dir"])
    options = DataOptions(max_seq_length=common["max_seq_length"], val_size=common["heldout"])
    train, val, info = load_data("sft", common["data"], tokenizer, common["template"], options, common["seed"])
    return tokenizer, train, val, info


def train_config(common: Dict[str, Any], lr: float, gate_lr_ratio: float = 1.0):
    return TrainConfig(max_steps=common["steps"], learning_rate=lr, gate_lr_ratio=gate_lr_ratio,
                       global_batch_size=common["batch"], micro_batch_size=common["micro_batch"],
                       warmup_steps=common["warmup_steps"], min_lr_ratio=common["min_lr_ratio"],
                       max_norm=common["max_norm"], adam_beta1=common["adam_beta1"],
                       adam_beta2=common["adam_beta2"], eval_iters=0,
                       save_interval=common["steps"], seed=common["seed"], group_by_length=True,
                       shuffle_grouped_batches=common["shuffle_grouped_batches"])


def batches(rows, size: int, pad_id: int):
    from lit_aligner.data import pad_rows

    for s in range(0, len(rows), size):
        yield pad_rows(rows[s:s + size], pad_id)


def summed_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the labelled (response) positions."""
    from lit_aligner.data import IGNORE_INDEX

    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=IGNORE_INDEX, reduction="sum")


@torch.no_grad()
def heldout_loss(forward, val, pad_id: int, device) -> float:
    """Held-out loss per response token of `forward(input_ids, attention_mask) -> logits`."""
    from lit_aligner.data import IGNORE_INDEX

    total, count = 0.0, 0
    rows = sorted(val.rows(), key=lambda r: len(r[0]) + len(r[1]))  # similar lengths together: little padding
    for b in batches(rows, 8, pad_id):
        ids, labels = b["input_ids"].to(device), b["labels"].to(device)
        mask = (torch.arange(ids.shape[1])[None] < b["lengths"][:, None]).to(device)
        total += float(summed_ce(forward(ids, mask), labels))
        count += int((labels[:, 1:] != IGNORE_INDEX).sum())
    return total / count


def device_of(common: Dict[str, Any]) -> torch.device:
    return pick_device(common["device"])


# --- the systems (each runs in a child process) -----------------------------------------------------------------------


def run_system(spec: Dict[str, Any], common: Dict[str, Any]) -> Dict[str, Any]:
    torch.set_num_threads(common["threads"] or torch.get_num_threads())
    from lit_aligner.perf import peak_memory_bytes, reset_peak_memory

    device = device_of(common)
    reset_peak_memory(device)
    t0 = time.perf_counter()
    out = {"aligner": run_aligner, "lora": run_peft, "prefix": run_peft, "base": run_base}[spec["system"]](spec, common)
    out.update(peak_memory_gb=peak_memory_bytes(device) / 1e9, wall_s=time.perf_counter() - t0)
    return {**spec, **out}


def run_base(spec, common):
    """The bare base's held-out loss in our model and in transformers (the sanity row)."""
    import transformers

    from lit_aligner.base import load_base

    device = device_of(common)
    tokenizer, _, val, _ = load_rows(common)
    model, _ = load_base(common["checkpoint_dir"], device, "float32")
    ours = heldout_loss(lambda ids, mask: model(ids, aligner=False), val, tokenizer.pad_id, device)
    hf = transformers.AutoModelForCausalLM.from_pretrained(common["hf_dir"], dtype=torch.float32).to(device).eval()
    theirs = heldout_loss(lambda ids, mask: hf(input_ids=ids, attention_mask=mask).logits, val, tokenizer.pad_id,
                          device)
    return {"heldout_loss": ours, "heldout_loss_transformers": theirs, "trainable_params": 0,
            "relative_difference": abs(ours - theirs) / theirs, "heldout_rows": len(val),
            "heldout_tokens": sum(len(r[1]) for r in val.rows())}


def run_aligner(spec, common):
    """This project's trainer, then the held-out loss of the saved Aligner."""
    from lit_aligner import load_aligner, load_base, train
    from lit_aligner.data import DataOptions
    from lit_aligner.training import SFTRunConfig

    device = device_of(common)
    with tempfile.TemporaryDirectory() as out:
        cfg = SFTRunConfig(checkpoint_dir=common["checkpoint_dir"], data=common["data"], template=common["template"],
                           out_dir=Path(out) / "run", n_tokens=spec["n_tokens"], prefix_init=spec["init"],
                           prefix_init_scale=spec["init_scale"],
                           start_layer=spec["start_layer"],
                           accelerator=device.type, precision="32-true", progress=False, compare=False,
                           data_options=DataOptions(max_seq_length=common["max_seq_length"],
                                                    val_size=common["heldout"]),
                           train=train_config(common, spec["lr"], spec["gate_lr_ratio"]))
        summary = train(cfg)
        if summary.get("stopped"):  # SIGINT/SIGTERM: the trainer stopped early and saved no Aligner
            raise BenchmarkError(f"the {spec['label']} run was stopped by {summary['stopped']} after step "
                                 f"{summary['step']}; nothing was measured")
        if common.get("save_aligners"):
            from lit_aligner.files import atomic_write

            keep = Path(common["save_aligners"]) / aligner_file_name(spec, common["seed"])
            atomic_write(keep, lambda tmp: shutil.copyfile(summary["aligner"], tmp))
        tokenizer, _, val, _ = load_rows(common)
        model, _ = load_base(common["checkpoint_dir"], device, "float32")
        aligner, _ = load_aligner(summary["aligner"], model)
    loss = heldout_loss(lambda ids, mask: model(ids, aligner=aligner), val, tokenizer.pad_id, device)
    return {"heldout_loss": loss, "trainable_params": aligner.num_params(),
            "train_tokens_per_s": summary["throughput"]["real_tokens_per_sec"],
            "final_train_loss": summary["train_loss"]}


def aligner_file_name(spec: Dict[str, Any], seed: int) -> str:
    """--save-aligners: one file per Aligner run, named by what sets it apart."""
    return (f"aligner-N{spec['n_tokens']}-{spec['init']}-x{spec['init_scale']:g}-lr{spec['lr']:g}-gate"
            f"{spec['gate_lr_ratio']:g}-layer{spec['start_layer']}-seed{seed}.safetensors")


def run_peft(spec, common):
    """PEFT on the transformers model, trained on the same rows, order and schedule."""
    import peft
    import transformers

    from lit_aligner.training.engine import BatchOrder, lr_at, rank_micro_batches
    from lit_aligner.training.objectives.sft import SFT

    device = device_of(common)
    tokenizer, train, val, _ = load_rows(common)
    torch.manual_seed(common["seed"])
    base = transformers.AutoModelForCausalLM.from_pretrained(common["hf_dir"], dtype=torch.float32).to(device)
    if spec["system"] == "lora":
        config = peer_lora_config(spec["rank"])
    else:
        config = peer_prefix_tuning_config(spec["n_tokens"])
    model = peft.get_peft_model(base, config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec["lr"], betas=(common["adam_beta1"], common["adam_beta2"]),
                                  weight_decay=DEFAULTS.weight_decay)
    tc = train_config(common, spec["lr"])
    # the trainer's length-grouped order (its default), the same for every system
    order = BatchOrder(len(train), tc.global_batch_size, tc.seed, train.lengths(), tc.shuffle_grouped_batches)
    objective = SFT(tokenizer.pad_id, 0)
    speeds, last = [], float("nan")
    model.train()
    for step in range(tc.max_steps):
        t0 = time.perf_counter()
        indices = order(step)
        units = sum(objective.units(train[i], step) for i in indices)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, tc)
        real, total = 0, 0.0
        for idx in rank_micro_batches(indices, 0, 1, tc.micro_batch_size):
            b = objective.collate([train[i] for i in idx], step)
            ids, labels = b["input_ids"].to(device), b["labels"].to(device)
            mask = (torch.arange(ids.shape[1])[None] < b["lengths"][:, None]).to(device)
            loss = summed_ce(model(input_ids=ids, attention_mask=mask).logits, labels)
            (loss / units).backward()
            total += float(loss.detach())
            real += int(b["lengths"].sum())
        if common["max_norm"]:  # as the trainer's --max-norm (and Hugging Face's max_grad_norm)
            torch.nn.utils.clip_grad_norm_(params, common["max_norm"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        speeds.append(real / (time.perf_counter() - t0))
        last = total / units
    model.eval()
    loss = heldout_loss(lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits, val, tokenizer.pad_id,
                        device)
    return {"heldout_loss": loss, "trainable_params": sum(p.numel() for p in params),
            "train_tokens_per_s": sorted(speeds)[len(speeds) // 2], "final_train_loss": last}


def run_child(spec: Dict[str, Any], common: Dict[str, Any], tmp: Path) -> Dict[str, Any]:
    """`run_system` in a fresh Python process (its own peak memory; nothing left over from the previous system)."""
    job = tmp / "job.json"
    job.write_text(json.dumps({"spec": spec, "common": common}))
    child = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), WORKER_FLAG, str(job)])
    try:
        status = child.wait()
    except KeyboardInterrupt:  # (SIGINT or SIGTERM) the child stops at the end of its step (it may have had it)
        child.terminate()
        try:
            child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()
        raise
    if status != 0:
        raise BenchmarkError(f"the {spec['label']} run failed (exit status {status}); its output is above")
    return json.loads(job.with_suffix(".out.json").read_text())


WORKER_FLAG = "--_run-one-system"


def spec_key(spec: Dict[str, Any]) -> tuple:
    return tuple(spec.get(k) for k in ("system", "n_tokens", "init", "init_scale", "lr", "gate_lr_ratio",
                                       "start_layer", "rank"))


def lora_label(rank: int) -> str:
    return f"LoRA r={rank} (q, v)"


def earlier_runs(path: Path, settings: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The runs of an earlier (possibly interrupted) benchmark in `path`, if it used the same settings."""
    from lit_aligner.files import read_json_object

    earlier = read_json_object(path, "results file (--resume)", BenchmarkError)
    runs = earlier.get("runs")
    if not isinstance(runs, list):
        raise BenchmarkError(f"--resume: {path} is not a results file of this benchmark; give another --out or "
                             "--force to replace it")
    before = earlier.get("settings")
    from lit_aligner.training.run import LATER_TRAIN_SETTINGS

    # a file from before --min-lr-ratio, --max-norm, the shuffled batch order or --adam-beta1/-beta2: made as a run
    # state from before them resumes (every system's cosine ended at 0, no clipping, each run of 50 batches longest to
    # shortest, betas 0.9 and 0.95)
    old = {k: LATER_TRAIN_SETTINGS[k][0] for k in ("min_lr_ratio", "max_norm", "shuffle_grouped_batches",
                                                     "adam_beta1", "adam_beta2")}
    if not isinstance(before, dict):
        raise BenchmarkError(f"--resume: {path} holds no settings; give another --out or --force to replace it")
    before = {**old, **before}
    if before != settings:
        diff = ", ".join(f"{'the machine' if k == 'machine' else '--' + k.replace('_', '-')} {before.get(k)} "
                         f"(now {v})" for k, v in settings.items() if before.get(k) != v)
        raise BenchmarkError(f"--resume: {path} was made with other settings: {diff}; run with the same flags, or "
                             "give another --out")
    for r in runs:  # runs made before --gate-lr-ratios / --start-layers / --init-scales: gates at the Aligner's rate,
        if r.get("system") == "aligner":  # from layer 2, the prefix at 1x the hidden scale
            r.setdefault("gate_lr_ratio", 1.0)
            r.setdefault("start_layer", 2)
            r.setdefault("init_scale", 1.0)
        if r.get("system") == "lora":  # runs made before --lora-ranks: r=8
            r.setdefault("rank", REFERENCE_RANK)
    return runs


# --- the benchmark ----------------------------------------------------------------------------------------------------


def main(
    checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR,
    data: Path = ALPACA,
    template: str = "alpaca",
    max_seq_length: int = 256,
    heldout: int = 320,
    steps: int = 120,
    batch: int = 8,
    micro_batch: int = 8,
    warmup_steps: int = 5,
    min_lr_ratio: float = DEFAULTS.min_lr_ratio,
    max_norm: Optional[float] = DEFAULTS.max_norm,
    adam_beta1: float = DEFAULTS.adam_beta1,
    adam_beta2: float = DEFAULTS.adam_beta2,
    seed: int = 42,
    aligners: List[str] = [f"1:{DEFAULT_PREFIX_INIT}", f"10:{DEFAULT_PREFIX_INIT}"],  # noqa: B006 (tyro reads it)
    aligner_lrs: List[float] = [DEFAULTS.learning_rate],  # noqa: B006
    gate_lr_ratios: List[float] = [DEFAULTS.gate_lr_ratio],  # noqa: B006
    init_scales: List[float] = [RunConfig.prefix_init_scale],  # noqa: B006
    start_layers: List[int] = [RunConfig.start_layer],  # noqa: B006
    shuffle_grouped_batches: bool = DEFAULTS.shuffle_grouped_batches,
    paper: bool = True,
    lora_lrs: List[float] = [1e-3, 3e-3],  # noqa: B006
    lora_ranks: List[int] = [REFERENCE_RANK],  # noqa: B006
    prefix_lrs: List[float] = [3e-2, 1e-1],  # noqa: B006 (1e-1 its best on SmolLM2 of 1e-2 to 3e-1)
    device: str = "auto",
    threads: Optional[int] = None,
    out: Optional[Path] = None,
    force: bool = False,
    resume: bool = False,
    save_aligners: Optional[Path] = None,
) -> Dict[str, Any]:
    """Held-out loss, trainable parameters, training tokens/s and peak memory of the Aligner (N=1, N=10), PEFT LoRA
    r=8 (q, v) and PEFT prefix tuning (10 tokens) at an equal budget.

    Args:
        checkpoint_dir: the converted base model (exported once to a temporary Hugging Face directory for PEFT).
        data: the SFT data file (any format the trainer reads).
        template: prompt template for the rows.
        max_seq_length: longest row in tokens (longer rows are dropped, the same for every system).
        heldout: rows of the seeded held-out split before long rows are dropped (320 keeps about 300).
        steps: optimizer steps for every system.
        batch: rows per optimizer step.
        micro_batch: rows per forward pass.
        warmup_steps: linear warm-up steps, then a cosine to lr x min_lr_ratio (every system).
        min_lr_ratio: where the cosine ends, as a share of each system's peak learning rate (the trainer's
            --min-lr-ratio), for every system.
        max_norm: clip every system's gradient norm to this before each step (the trainer's --max-norm, Hugging
            Face's max_grad_norm); None: no clipping.
        adam_beta1: AdamW's beta1 for every system (the trainer's --adam-beta1).
        adam_beta2: AdamW's beta2 for every system (the trainer's --adam-beta2).
        seed: data split, data order and initialisation seed.
        aligners: Aligner variants as N:init (init: normal = the paper's N(0, 1), hidden, embedding). The defaults of
            this flag and the next three are the trainer's.
        aligner_lrs: Aligner learning rates (each variant x each lr x each gate ratio is one run).
        gate_lr_ratios: the gates' learning rate as a multiple of the Aligner's (the trainer's --gate-lr-ratio).
        init_scales: a hidden or embedding prefix's starting scale (the trainer's --prefix-init-scale; normal
            ignores it: the paper's N(0, 1)).
        start_layers: first layer that reads the prefix (the trainer's --start-layer; the paper's is 2).
        shuffle_grouped_batches: the length-grouped batches in a seeded random order (the trainer's
            --shuffle-grouped-batches; off: each run of 50 batches longest to shortest, as before that flag), the
            same order for every system.
        paper: also train each N of --aligners with the paper's recipe (N(0, 1) prefix, lr 9e-3 for prefix and
            gates: lit_aligner.training.config.PAPER_RECIPE).
        lora_lrs: LoRA learning rates.
        lora_ranks: LoRA ranks (alpha = 2 x rank, as r=8 / alpha 16); each rank x each lr is one run. The ratios to
            LoRA are to r=8's best (else the largest rank run).
        prefix_lrs: prefix tuning learning rates.
        device: auto (CUDA if available), cpu, cuda.
        threads: torch CPU threads per run (default: torch's choice).
        out: JSON results file (default benchmarks/results/quality-<model>-<machine>.json).
        force: replace an existing results file.
        resume: keep the runs already in the results file (made with the same settings) and run only the missing
            ones; earlier runs of other variants or learning rates stay in the tables (how a sweep grows).
        save_aligners: keep each Aligner this run trains in this directory, as
            aligner-N<n>-<init>-x<scale>-lr<lr>-gate<ratio>-layer<start>-seed<seed>.safetensors (for generate or
            `evaluate/aligner.py inspect`); an existing file only with --force.
    """
    require("peft", "transformers", extra="eval")
    if not all(g > 0 for g in gate_lr_ratios + init_scales) or not all(s >= 0 for s in start_layers):
        raise BenchmarkError(f"--gate-lr-ratios and --init-scales must be positive and --start-layers >= 0, got "
                             f"{gate_lr_ratios}, {init_scales}, {start_layers}")
    try:  # the trainer's own bounds for the flags it shares with every system here
        TrainConfig(min_lr_ratio=min_lr_ratio, max_norm=max_norm, adam_beta1=adam_beta1, adam_beta2=adam_beta2).check()
    except TrainError as e:
        raise BenchmarkError(str(e)) from None
    if not all(r >= 1 for r in lora_ranks):
        raise BenchmarkError(f"--lora-ranks must be >= 1, got {lora_ranks}")
    if min(steps, batch, micro_batch, heldout) < 1 or batch % micro_batch:
        raise BenchmarkError("--steps, --batch, --micro-batch and --heldout must be >= 1, and --batch a multiple of "
                             "--micro-batch")
    if not Path(data).is_file():
        raise BenchmarkError(f"--data {data}: no such file")
    from lit_aligner.base import load_config
    from lit_aligner.model import PREFIX_INITS

    variants = []
    for v in aligners:
        n, _, init = v.partition(":")
        if not n.isdigit() or int(n) < 1 or (init or "normal") not in PREFIX_INITS:
            raise BenchmarkError(f"--aligners {v!r}: give N:init, N >= 1 and init one of {', '.join(PREFIX_INITS)}")
        variants.append((int(n), init or "normal"))
    name = load_config(checkpoint_dir).name or Path(checkpoint_dir).name
    dev = pick_device(device)
    path = Path(out or REPO / "benchmarks" / "results" / f"quality-{name}-{machine_name(dev)}.json")
    settings = dict(checkpoint_dir=str(checkpoint_dir), data=str(data), template=template,
                    max_seq_length=max_seq_length, heldout=heldout, steps=steps, batch=batch, micro_batch=micro_batch,
                    warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio, max_norm=max_norm, adam_beta1=adam_beta1,
                    adam_beta2=adam_beta2, seed=seed, shuffle_grouped_batches=shuffle_grouped_batches,
                    machine=machine_name(dev))
    runs: List[Dict[str, Any]] = earlier_runs(path, settings) if resume and path.exists() else []
    if not runs:
        check_out(path, force, (checkpoint_dir, data))
    specs: List[Dict[str, Any]] = [{"system": "base", "label": "base (no training)"}]
    # normal ignores the scale (the paper's N(0, 1)): recorded as 1
    sweep = [(n, init, 1.0 if init == "normal" else sc, lr, g, s) for n, init in variants for sc in init_scales
             for lr in aligner_lrs for g in gate_lr_ratios for s in start_layers]
    if paper:
        recipe = PAPER_RECIPE
        sweep += [(n, recipe["prefix_init"], 1.0, recipe["learning_rate"], recipe["gate_lr_ratio"],
                   RunConfig.start_layer) for n in sorted({n for n, _ in variants})]
    specs += [{"system": "aligner", "label": f"Aligner N={n}", "n_tokens": n, "init": init, "init_scale": sc, "lr": lr,
               "gate_lr_ratio": g, "start_layer": s} for n, init, sc, lr, g, s in dict.fromkeys(sweep)]
    specs += [{"system": "lora", "label": lora_label(r), "rank": r, "lr": lr} for r in lora_ranks for lr in lora_lrs]
    specs += [{"system": "prefix", "label": "prefix tuning 10 tokens", "n_tokens": 10, "lr": lr} for lr in prefix_lrs]

    done = {spec_key(r) for r in runs}
    specs = [s for s in specs if spec_key(s) not in done]
    if save_aligners is not None:
        for s in specs:
            if s["system"] == "aligner":
                check_output(Path(save_aligners) / aligner_file_name(s, seed), input_files(checkpoint_dir, data), force,
                             "--save-aligners")
    if specs and specs[0]["system"] != "base" and not any(r["system"] == "base" for r in runs):
        specs.insert(0, {"system": "base", "label": "base (no training)"})
    runs.sort(key=lambda r: r["system"] != "base")  # the base row first
    with sigterm_as_interrupt(), tempfile.TemporaryDirectory() as tmp:
        from lit_aligner.convert.export import export_hf

        hf_dir = Path(tmp) / "hf"
        if specs:
            export_hf(checkpoint_dir, hf_dir)
        common = dict(settings, device=device, threads=threads, hf_dir=str(hf_dir),
                      save_aligners=str(save_aligners) if save_aligners else None)
        for spec in specs:
            try:
                result = run_child(spec, common, Path(tmp))
            except KeyboardInterrupt:
                print(f"interrupted during the {spec['label']} run; the {len(runs)} finished run(s) are in {path}: "
                      "the same command plus --resume goes on from there", file=sys.stderr, flush=True)
                raise
            result["command"] = command_line()  # each run keeps its own: a file grown with --resume has several
            runs.insert(0, result) if spec["system"] == "base" else runs.append(result)
            print(f"{result['label']} {result.get('init', '')} x{result.get('init_scale', '-')} lr="
                  f"{result.get('lr', '-')} gate x"
                  f"{result.get('gate_lr_ratio', '-')} from layer {result.get('start_layer', '-')}: held-out loss "
                  f"{result['heldout_loss']:.4f} ({result['wall_s']:.0f} s)", file=sys.stderr, flush=True)
            # written after every run: an interrupted benchmark goes on with --resume
            write_json(path, {"benchmark": "quality", "partial": True, "settings": settings, "runs": runs})

    base = runs[0]
    best: Dict[str, Dict[str, Any]] = {}
    for r in runs[1:]:
        # the paper's init and ours, and each start layer (another number of gates), are reported apart
        key = f"{r['label']} {r.get('init', '')} {r.get('start_layer', '')}".strip()
        if key not in best or r["heldout_loss"] < best[key]["heldout_loss"]:
            best[key] = r
    ranks = sorted({r["rank"] for r in runs if r["system"] == "lora"})  # (earlier_runs gives older runs theirs)
    reference = REFERENCE_RANK if REFERENCE_RANK in ranks or not ranks else ranks[-1]
    lora = best.get(lora_label(reference))  # (its init key is empty)
    for r in runs:
        r["x_lora_loss"] = r["heldout_loss"] / lora["heldout_loss"] if lora else None
        r["gain_vs_lora"] = ((base["heldout_loss"] - r["heldout_loss"]) / (base["heldout_loss"] - lora["heldout_loss"])
                             if lora and r is not base else None)
    columns = ["label", "init", "init_scale", "lr", "gate_lr_ratio", "start_layer", "trainable_params", "heldout_loss",
               "x_lora_loss", "gain_vs_lora", "train_tokens_per_s", "peak_memory_gb"]
    order = {"aligner": 0, "lora": 1, "prefix": 2}  # then N, init, lr: a sweep grown with --resume reads in order
    inits = {"normal": 0, "hidden": 1, "embedding": 2}
    runs[1:] = sorted(runs[1:], key=lambda r: (order[r["system"]], r.get("n_tokens") or r.get("rank") or 0,
                                               inits.get(r.get("init"), 0), r.get("init_scale") or 0, r["lr"],
                                               r.get("gate_lr_ratio") or 0,
                                               r.get("start_layer") or 0))
    best_rows = [base] + sorted(best.values(), key=runs.index)
    formats = {"heldout_loss": ".4f", "x_lora_loss": ".4f", "gain_vs_lora": ".0%"}
    table = format_table(best_rows, columns, formats)
    all_table = format_table(runs, columns, formats)
    sanity = (f"sanity: the bare base's held-out loss is {base['heldout_loss']:.4f} in lit-aligner and "
              f"{base['heldout_loss_transformers']:.4f} in transformers ({base['relative_difference']:.3%} apart)")
    clip = f", gradients clipped to norm {max_norm:g}" if max_norm else ""
    print(f"{name}, {steps} steps x {batch} rows ({warmup_steps} warm-up, cosine to {min_lr_ratio:g}x{clip}, AdamW "
          f"betas {adam_beta1:g}, {adam_beta2:g}), max "
          f"length {max_seq_length}, template {template}, {base['heldout_rows']} held-out rows of {data}")
    print("best learning rate per system:")
    print(table)
    print("every run:")
    print(all_table)
    print(sanity)
    payload = {"benchmark": "quality", "settings": settings, "model": name, "data": str(data), "template": template,
               "max_seq_length": max_seq_length, "heldout": heldout, "steps": steps, "batch": batch,
               "warmup_steps": warmup_steps, "seed": seed, "machine": machine_info(dev), "best": best_rows,
               "runs": runs, "table": table, "all_runs_table": all_table, "sanity": sanity}
    write_json(path, payload)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == WORKER_FLAG:
        job = Path(sys.argv[2])
        task = json.loads(job.read_text())
        try:
            job.with_suffix(".out.json").write_text(json.dumps(run_system(task["spec"], task["common"])))
        except UserError as e:  # one line (a BenchmarkError, or the trainer's); the parent names the run that failed
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
        except KeyboardInterrupt:
            sys.exit(130)
    else:
        run_cli(main, description=__doc__)
