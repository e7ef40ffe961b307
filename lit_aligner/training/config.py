"""What a training run takes, as dataclasses: the CLIs' flags are generated from these fields (`lit_aligner.cli`, tyro
reads the field docstrings as help), so every default exists here once.

`TrainConfig` (optimisation) and `DataOptions` (how rows become examples) are groups shared by every objective;
`RunConfig` holds the flags every run shares; `SFTRunConfig` (SFT and correction), `DPORunConfig`, `KTORunConfig` and
`DistillRunConfig` add their own.
Defaults are sized for the embedded default base on a CPU; the paper's LLaMA-2-7B recipe is in howto/finetune.md.
"""

import dataclasses
import math
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Literal, Optional, Tuple, Union, get_args

from lit_aligner.data.load import DataOptions, check_template_variables_fit
from lit_aligner.default_model import DEFAULT_CHECKPOINT_DIR, DEFAULT_MODEL_NAME
from lit_aligner.devices import PRECISIONS
from lit_aligner.files import UserError
from lit_aligner.losses import (DEFAULT_CHUNK_SIZE, F_DIVERGENCE_LOSSES, LABEL_SMOOTHED, PREFERENCE_LOSSES,
                                REFERENCE_FREE, FDivergence, GRPOLossType, KTOLossName, PreferenceLossName)
from lit_aligner.model import DEFAULT_PREFIX_INIT, DEFAULT_PREFIX_INIT_SCALE, PREFIX_INITS, PrefixInit
from lit_aligner.perf import POLICIES
from lit_aligner.quantize import QuantizeFlag, check_mode, import_bitsandbytes
from lit_aligner.tokenizer import ChatTemplateKwargsFlag, read_template_variables


class TrainError(UserError):
    """Bad training arguments or unusable run state; the message names the file or flag and the fix."""


# The paper's recipe where this project's defaults depart from it (both measured in howto/evaluate.md): the N(0, 1)
# prefix and one learning rate for prefix and gates. As flags: --prefix-init normal --learning-rate 9e-3
# --gate-lr-ratio 1.
PAPER_RECIPE = {"prefix_init": "normal", "learning_rate": 9e-3, "gate_lr_ratio": 1.0}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass
class TrainConfig:
    """Optimisation. Steps count optimizer steps, each one global batch."""

    max_steps: int = 60
    """optimizer steps (each one global batch)."""
    epochs: Optional[float] = None
    """train this many passes over the training rows instead of --max-steps: steps = ceil(epochs x rows / global batch),
    worked out once the data is loaded (as Hugging Face's num_train_epochs; 0.5 is half a pass)."""
    learning_rate: float = 3e-2
    """peak learning rate of the prefix, after a linear warm-up, cosine-decayed to learning_rate * min_lr_ratio (the
    paper: 9e-3 for prefix and gates alike)."""
    gate_lr_ratio: float = 0.3
    """the gates' learning rate = learning_rate x this (the paper: 1). Slower gates let the prefix find its directions
    before they are let into the residual stream: a lower held-out loss at equal steps (howto/evaluate.md)."""
    weight_decay: float = 0.02
    """AdamW weight decay (paper: 0.02)."""
    adam_beta1: float = 0.6
    """AdamW's beta1, the memory of the gradient's running mean (Hugging Face's adam_beta1 and the paper's: 0.9). A
    shorter memory reached a lower held-out loss on all ten seeds of the benchmark (howto/evaluate.md)."""
    adam_beta2: float = 0.95
    """AdamW's beta2, the memory of the squared gradient's (litgpt's and nanoGPT's 0.95; Hugging Face's 0.999)."""
    max_norm: Optional[float] = None
    """clip the gradient's total L2 norm to this before each step (None: no clipping; Hugging Face's Trainer
    clips at 1); metrics.csv logs the norm before clipping as grad_norm either way."""
    global_batch_size: int = 16
    """sequences (DPO: pairs) per optimizer step over all devices (paper: 64)."""
    micro_batch_size: int = 8
    """sequences (DPO: pairs) per forward pass per device; gradients accumulate up to the global batch."""
    warmup_steps: int = 5
    """linear learning-rate warm-up steps."""
    min_lr_ratio: float = 0.3
    """the cosine ends at learning_rate * min_lr_ratio (0: at zero). A floor keeps the few Aligner numbers learning to
    the end: lower held-out loss at equal steps (howto/evaluate.md)."""
    eval_interval: int = 20
    """validation every this many steps (and at the first and the last)."""
    eval_iters: Union[int, Literal["all"]] = 4
    """validation micro-batches per evaluation and device; all: the whole validation split; 0: no validation."""
    final_validation: bool = True
    """after the last step, also validate on the whole split when --eval-iters covers less of it (as litgpt's
    eval.final_validation): the figure printed at the end, saved in the Aligner's metadata and in the summary."""
    save_interval: int = 50
    """resumable run state every this many steps (and at the end, and on SIGINT/SIGTERM)."""
    log_interval: int = 1
    """a metrics row every this many steps."""
    seed: int = 42
    """seed of the prefix initialisation, the data order and the train/validation split."""
    group_by_length: bool = True
    """batch examples of similar length together (runs of 50 global batches sorted by length, as Hugging Face's
    group_by_length): less padding, the same examples each epoch, a seeded order (resume stays exact)."""
    shuffle_grouped_batches: bool = True
    """with --group-by-length, take the epoch's batches in a seeded random order, the longest first (the batches hold
    the same rows either way); off: Hugging Face's order, each run of 50 batches longest to shortest, which on a small
    file sorts the whole epoch (howto/finetune.md)."""
    chunk_size: int = DEFAULT_CHUNK_SIZE
    """positions per chunk of the LM head + loss (bounds the logits memory; 0: all at once, the plain loss)."""

    @property
    def validates(self) -> bool:
        return self.eval_iters != 0

    @property
    def eval_batches(self) -> Optional[int]:
        """Validation micro-batches per evaluation (None: all)."""
        return None if self.eval_iters == "all" else self.eval_iters

    def check(self) -> None:
        for name in ("max_steps", "global_batch_size", "micro_batch_size", "eval_interval", "save_interval",
                     "log_interval"):
            if getattr(self, name) < 1:
                raise TrainError(f"{_flag(name)} must be >= 1, got {getattr(self, name)}")
        if self.epochs is not None and not 0 < self.epochs < float("inf"):
            raise TrainError(f"--epochs must be a positive number of passes over the data, got {self.epochs}")
        for name in ("warmup_steps", "chunk_size"):
            if getattr(self, name) < 0:
                raise TrainError(f"{_flag(name)} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.seed < 2**32:  # numpy's seeds (Lightning seeds it too)
            raise TrainError(f"--seed must be in 0..{2**32 - 1}, got {self.seed}")
        if self.eval_iters != "all" and (isinstance(self.eval_iters, bool) or not isinstance(self.eval_iters, int)
                                         or self.eval_iters < 0):
            raise TrainError(f"--eval-iters must be a number of micro-batches >= 0 (0: no validation) or 'all', got "
                             f"{self.eval_iters!r}")
        if not self.learning_rate > 0 or self.learning_rate == float("inf"):
            raise TrainError(f"--learning-rate must be a positive number, got {self.learning_rate}")
        if not 0 < self.gate_lr_ratio < float("inf"):
            raise TrainError(f"--gate-lr-ratio must be a positive number, got {self.gate_lr_ratio}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise TrainError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise TrainError(f"{_flag(name)} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 <= self.weight_decay < float("inf"):
            raise TrainError(f"--weight-decay must be a number >= 0, got {self.weight_decay}")
        if self.max_norm is not None and not 0 < self.max_norm < float("inf"):
            raise TrainError(f"--max-norm must be a positive number (leave it out for no clipping), got "
                             f"{self.max_norm}")


@dataclass
class DPOTrainConfig(TrainConfig):
    """Optimisation for DPO: DPO's own measured settings (howto/dpo.md). The SFT defaults' slower gates and floor under
    the cosine were measured for SFT only, its shorter AdamW memory for SFT, correction and distillation. Build
    `DPORunConfig(train=DPOTrainConfig(...))` from Python to keep them."""

    learning_rate: float = 5e-3
    gate_lr_ratio: float = 1.0
    global_batch_size: int = 8
    micro_batch_size: int = 4
    min_lr_ratio: float = 0.0
    adam_beta1: float = 0.9


@dataclass
class RunConfig:
    """The flags every training run shares: base model, data, Aligner shape, devices, output and resume."""

    checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR
    """the converted base-model directory (scripts/convert_*.py); default: the embedded SmolLM2-135M-Instruct."""
    data: Optional[Path] = None
    """a prepared data directory (scripts/prepare_*.py) or a raw JSON/JSONL file (Alpaca, PKU-SafeRLHF, HH-RLHF,
    prompt/response, prompt/chosen/rejected, Q-A-C), prepared on the fly. None: the offline default dataset."""
    val_data: Optional[Path] = None
    """a held-out file (or prepared directory) to validate on, every row of it; the training data is then not split
    (--val-fraction / --val-size apply only without it)."""
    template: Optional[str] = None
    """prompt template for raw data: alpaca, beaver, hh, chat, plain (default: chat when the tokenizer has a chat
    template, else alpaca; correction for correction data). Stored in the Aligner's metadata."""
    chat_template_kwargs: ChatTemplateKwargsFlag = None
    out_dir: Optional[Path] = None
    """where the Aligner, metrics.csv and the run state go (default: out/<objective>/<base>)."""
    init_aligner: Optional[Path] = None
    """start from this Aligner (ours .safetensors or a paper .pth) instead of a fresh one; its N and start layer
    replace --n-tokens/--start-layer."""
    n_tokens: int = 10
    """number of global prefix tokens N (1..10 in the paper)."""
    start_layer: int = 2
    """first layer that reads the prefix (paper: 2)."""
    prefix_init: PrefixInit = DEFAULT_PREFIX_INIT
    """how a fresh prefix starts: hidden (N(0, 1) scaled to --prefix-init-scale x the RMS of the inputs of the gated
    layers' K/V projections: on SmolLM2 + Alpaca it reaches a lower held-out loss, howto/evaluate.md), normal (the
    paper's N(0, 1)), embedding (the embeddings of N random vocabulary tokens at that scale)."""
    prefix_init_scale: float = DEFAULT_PREFIX_INIT_SCALE
    """a hidden or embedding prefix starts at this multiple of the RMS of the K/V projections' inputs (1: their
    scale; 0.5 reached a lower held-out loss, howto/evaluate.md); normal ignores it (the paper's N(0, 1))."""
    precision: Optional[str] = None
    """Fabric precision: bf16-true, 16-true, 32-true, bf16-mixed (default: bf16-true on a GPU, 32-true on the CPU)."""
    quantize: QuantizeFlag = "none"
    accelerator: str = "auto"
    """auto, cpu, cuda/gpu."""
    devices: Union[int, str] = 1
    """devices (processes) per node."""
    num_nodes: int = 1
    """number of nodes."""
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    """auto, ddp, or fsdp (shards a base model that does not fit one GPU)."""
    resume: Optional[str] = None
    """continue a stopped run: "auto" (the newest readable state in OUT/state; a bare --resume means auto) or a state
    file (.pt)."""
    force: bool = False
    """start over in an --out-dir that holds a run (its Aligner, metrics and state are deleted first); with --resume,
    continue even when flags differ from the run being resumed."""
    compile: bool = False
    """torch.compile each transformer block (CUDA: faster steps after a compile of a minute or so)."""
    activation_checkpointing: Literal["none", "selective", "mlp", "block"] = "none"
    """recompute activations of the gated blocks in the backward pass to save memory: selective (the cheap
    element-wise parts), mlp (the MLP too), block (whole blocks; least memory). See howto/performance.md."""
    progress: bool = True
    """show a progress bar on stderr."""
    json_summary: bool = False
    """print the run summary as one JSON object on the last line of stdout."""
    wandb_project: Optional[str] = None
    """also log the metrics to Weights & Biases in this project (pip install wandb; WANDB_MODE=offline keeps the run
    in OUT/wandb for `wandb sync`): named after the out dir, with this run's flags as its config; --resume continues
    the same W&B run."""
    data_options: DataOptions = field(default_factory=DataOptions)
    train: TrainConfig = field(default_factory=TrainConfig)

    objective: ClassVar[str] = ""  # the objective a run of this config trains (see `objective_name`)

    @property
    def objective_name(self) -> str:
        return self.objective

    def steps_per_batch(self) -> int:
        """Optimizer steps each global batch of rows is trained on (GRPO's --num-iterations; else 1)."""
        return 1

    def check(self) -> None:
        """Everything that can be checked before a model is loaded."""
        self.train.check()
        self.data_options.check()
        if self.train.epochs is not None and self.train.max_steps != type(self.train).max_steps:  # (the run sets it)
            raise TrainError(f"--epochs {self.train.epochs:g} sets the number of steps; drop --max-steps "
                             f"{self.train.max_steps} (or --epochs)")
        if self.n_tokens < 1 or self.start_layer < 0:
            raise TrainError(f"--n-tokens must be >= 1 and --start-layer >= 0, got {self.n_tokens}, "
                             f"{self.start_layer}")
        variables = self.template_variables()  # malformed, or beside a named template: refused before a run directory
        if self.template is not None:
            check_template_variables_fit(self.template, variables)
        if self.prefix_init not in PREFIX_INITS:
            raise TrainError(f"--prefix-init must be one of {', '.join(PREFIX_INITS)}, got {self.prefix_init!r}")
        if not 0 < self.prefix_init_scale < float("inf"):
            raise TrainError(f"--prefix-init-scale must be a positive number, got {self.prefix_init_scale}")
        if self.activation_checkpointing not in POLICIES:
            raise TrainError(f"--activation-checkpointing must be one of {', '.join(POLICIES)}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise TrainError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if isinstance(self.devices, int) and self.devices > 0:  # here, before the processes start: said once
            from lit_aligner.training.engine import gradient_accumulation_steps

            gradient_accumulation_steps(self.train.global_batch_size, self.train.micro_batch_size,
                                        self.devices * self.num_nodes)
        if check_mode(self.quantize):
            if self.strategy == "fsdp":
                raise TrainError("--quantize keeps each quantized layer whole on its device, which --strategy fsdp "
                                 "would shard: use one of the two (a 4-bit base already fits where bf16 needed FSDP)")
            if self.precision is not None and self.precision.endswith("-mixed"):
                raise TrainError(f"--quantize computes in the precision's dtype; --precision {self.precision} keeps "
                                 f"fp32 weights to autocast: use bf16-true, 16-true or 32-true")
            import_bitsandbytes()
        if self.wandb_project is not None:
            if not self.wandb_project.strip():
                raise TrainError("--wandb-project needs a project name (leave the flag out to log to metrics.csv only)")
            try:
                import wandb  # noqa: F401
            except ImportError:
                raise TrainError("--wandb-project needs the wandb package: pip install wandb (or pip install -e "
                                 "'.[wandb]')") from None
        for flag, path in self.input_paths().items():  # fail before minutes of loading, not after them
            if isinstance(path, (str, PathLike)) and not Path(path).exists():
                raise TrainError(f"{flag} {path}: no such file or directory; check the path.")

    def template_variables(self) -> Dict[str, Any]:
        """--chat-template-kwargs as variables ({} without it); a malformed one is a TrainError."""
        return read_template_variables(self.chat_template_kwargs, error=TrainError)

    def input_paths(self) -> Dict[str, Any]:
        """The files a run reads besides the base model, by flag."""
        return {"--data": self.data, "--val-data": self.val_data, "--init-aligner": self.init_aligner}

    def default_out_dir(self, base_name: str) -> Path:
        return Path("out") / ("aligner" if self.objective_name == "sft" else f"aligner-{self.objective_name}") / \
            (base_name or DEFAULT_MODEL_NAME)

    def identity(self) -> Dict[str, Any]:
        """What a resumed run must share with the run that wrote its state (flag name -> value)."""
        return {"checkpoint_dir": str(self.checkpoint_dir), "data": str(self.data), "template": self.template,
                "chat_template_kwargs": self.template_variables(),
                "objective": self.objective_name, "n_tokens": self.n_tokens, "start_layer": self.start_layer,
                "init_aligner": str(self.init_aligner), "prefix_init": self.prefix_init,
                "prefix_init_scale": self.prefix_init_scale,
                "learning_rate": self.train.learning_rate, "gate_lr_ratio": self.train.gate_lr_ratio,
                "min_lr_ratio": self.train.min_lr_ratio, "max_norm": self.train.max_norm,
                "weight_decay": self.train.weight_decay, "adam_beta1": self.train.adam_beta1,
                "adam_beta2": self.train.adam_beta2,
                "global_batch_size": self.train.global_batch_size, "seed": self.train.seed,
                "group_by_length": self.train.group_by_length,
                "shuffle_grouped_batches": self.train.shuffle_grouped_batches,
                "max_seq_length": self.data_options.max_seq_length, "quantize": self.quantize}


MODES = ("sft", "correction")


@dataclass
class CompareFlags:
    """The before/after comparison at the end of a run that trains on (prompt, response) rows."""

    compare: Optional[bool] = None
    """print the before/after comparison (default: only for the default dataset, in sft mode or distillation)."""
    compare_prompts: int = 32
    """held-out prompts generated for the comparison."""
    compare_max_new_tokens: int = 24
    """most new tokens per answer in the comparison."""


@dataclass
class SFTRunConfig(RunConfig, CompareFlags):
    """A `finetune/aligner.py` run: supervised fine-tuning, or correction (Q-A-C) with an identity warm-up."""

    mode: Literal["sft", "correction", "correct"] = "sft"
    """sft (instruction tuning) or correction (rewrite an upstream answer: Q-A-C with a Q-A-A copy warm-up;
    "correct" is its old name)."""
    warmup_copy_ratio: float = 0.2
    """correction: share of the steps trained on Q-A-A (copy) before Q-A-C (paper: 0.2)."""

    def __post_init__(self):
        if self.mode == "correct":
            self.mode = "correction"

    @property
    def objective_name(self) -> str:
        return self.mode

    def check(self) -> None:
        super().check()
        if self.mode not in MODES:
            raise TrainError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not 0.0 <= self.warmup_copy_ratio <= 1.0:
            raise TrainError(f"--warmup-copy-ratio must be in [0, 1], got {self.warmup_copy_ratio}")

    def identity(self) -> Dict[str, Any]:
        extra = {"warmup_copy_ratio": self.warmup_copy_ratio} if self.mode == "correction" else {}
        return {**super().identity(), **extra}


@dataclass
class DPOLossConfig:
    """The preference loss: TRL's loss types under TRL's names, one or a weighted sum (`losses.preference_loss`)."""

    beta: float = 0.1
    """temperature beta (implicit reward = beta * (log pi - log ref), nats; CPO, SimPO and ORPO: see howto/dpo.md)."""
    loss: Tuple[PreferenceLossName, ...] = ("sigmoid",)
    """one or more loss types under TRL's names, summed with --loss-weights: sigmoid is DPO; sft adds the chosen
    answers' NLL (`sigmoid sft`: RPO; `sigmoid bco_pair sft`: MPO; `cpo sft`: CPO); cpo, simpo and orpo read no
    reference (no reference pass). Each formula, and the two details that differ from TRL: howto/dpo.md."""
    loss_weights: Optional[Tuple[float, ...]] = None
    """one weight per --loss (default: 1 each), e.g. 0.8 0.2 1.0 for MPO."""
    label_smoothing: float = 0.0
    """assumed share of flipped labels, in [0, 0.5): sigmoid (conservative DPO), robust, aot, aot_unpaired, cpo,
    simpo; exo_pair's epsilon (must be > 0, e.g. 1e-3)."""
    discopop_tau: float = 0.05
    """discopop only: the temperature that mixes its logistic and exponential parts."""
    simpo_gamma: float = 0.5
    """simpo only: the target reward margin gamma (loss -logsigmoid(beta * (average log-prob difference) - gamma))."""
    f_divergence: FDivergence = "reverse_kl"
    """f-DPO: the divergence from the reference that the loss regularises; reverse_kl is DPO's (sigmoid, sigmoid_norm,
    hinge, ipo, exo_pair, robust, discopop take another)."""
    f_alpha: float = 0.5
    """alpha_divergence only: its alpha (1 is the reverse KL)."""
    ld_alpha: Optional[float] = None
    """LD-DPO: the tokens of the longer answer past the shorter one's length count this much (0..1; 1 = DPO), against
    the preference for longer answers. None: off."""
    alpha: float = 0.0
    """AlphaPO, with cpo or simpo only: the log-prob x they compare becomes the reward (1 - p^-alpha) / alpha of p =
    exp(x) (TRL's CPOTrainer `alpha`, e.g. 0.25 with simpo; negative values are allowed); 0 keeps x."""
    use_weighting: bool = False
    """WPO: weigh each pair's loss by how likely the policy finds its two answers (each one's length-normalised
    probability against its own sampling), so off-policy pairs (answers the model would not write) count less."""

    def __post_init__(self):
        if isinstance(self.loss, str):  # the library's callers (and configs from before several losses) give one name
            self.loss = (self.loss,)
        self.loss = tuple(self.loss)
        unknown = [name for name in self.loss if name not in PREFERENCE_LOSSES]
        if unknown or not self.loss:
            raise TrainError(f"--loss must be one or more of {', '.join(PREFERENCE_LOSSES)}, got "
                             f"{' '.join(map(repr, self.loss)) or 'nothing'}")
        if len(set(self.loss)) != len(self.loss):
            raise TrainError(f"--loss names a loss twice ({' '.join(self.loss)}): give each once, weighted with "
                             "--loss-weights")
        if self.loss_weights is not None:
            self.loss_weights = tuple(float(w) for w in self.loss_weights)
            if len(self.loss_weights) != len(self.loss):
                raise TrainError(f"--loss-weights gives {len(self.loss_weights)} weights for {len(self.loss)} losses "
                                 f"({' '.join(self.loss)}): one each")
        if not self.beta > 0:
            raise TrainError(f"--beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise TrainError(f"--label-smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and not set(self.loss) & LABEL_SMOOTHED:
            raise TrainError(f"--label-smoothing applies to {', '.join(sorted(LABEL_SMOOTHED))}, not to "
                             f"{' '.join(self.loss)}: drop it")
        if "exo_pair" in self.loss and not self.label_smoothing:
            raise TrainError("--loss exo_pair needs --label-smoothing > 0 (EXO's epsilon, e.g. 1e-3)")
        if self.discopop_tau != type(self).discopop_tau and "discopop" not in self.loss:
            raise TrainError("--discopop-tau applies to --loss discopop only: drop it")
        if not self.discopop_tau > 0:
            raise TrainError(f"--discopop-tau must be > 0, got {self.discopop_tau}")
        if self.simpo_gamma != type(self).simpo_gamma and "simpo" not in self.loss:
            raise TrainError("--simpo-gamma applies to --loss simpo only: drop it")
        if self.alpha != type(self).alpha and not {"cpo", "simpo"} & set(self.loss):
            raise TrainError("--alpha (AlphaPO) shapes the log-probs that --loss cpo and simpo compare: add one of "
                             "them, or drop it")
        if not math.isfinite(self.alpha):
            raise TrainError(f"--alpha must be a finite number, got {self.alpha}")
        if self.f_divergence != "reverse_kl" and not set(self.loss) <= F_DIVERGENCE_LOSSES:
            raise TrainError(f"--f-divergence {self.f_divergence} generalises only the losses on the chosen - rejected "
                             f"difference ({', '.join(sorted(F_DIVERGENCE_LOSSES))}), not "
                             f"{' '.join(sorted(set(self.loss) - F_DIVERGENCE_LOSSES))}")
        if self.f_alpha != type(self).f_alpha and self.f_divergence != "alpha_divergence":
            raise TrainError("--f-alpha applies to --f-divergence alpha_divergence only: drop it")
        if self.ld_alpha is not None:
            if not 0.0 <= self.ld_alpha <= 1.0:
                raise TrainError(f"--ld-alpha must be in [0, 1], got {self.ld_alpha}")
            if set(self.loss) & REFERENCE_FREE:
                raise TrainError(f"--ld-alpha weighs the log-ratios to the reference; it does not apply to "
                                 f"{' '.join(sorted(set(self.loss) & REFERENCE_FREE))}")
        if self.use_weighting and set(self.loss) & {"aot", "aot_unpaired"}:
            raise TrainError("--use-weighting weighs each pair, and aot and aot_unpaired sort the batch, so no loss "
                             "belongs to one pair: drop one of them")

    @property
    def reference_free(self) -> bool:
        """No loss reads the reference: no reference pass, no reference to choose."""
        return set(self.loss) <= REFERENCE_FREE

    def describe(self) -> str:
        """The losses as one string ("sigmoid", "sigmoid,bco_pair,sft"): the metadata's and a resume's `loss`."""
        return ",".join(self.loss)

    def settings(self) -> Dict[str, Any]:
        """What the loss depends on, for metadata and a run's identity: beta, the loss and each setting it reads."""
        out: Dict[str, Any] = {"beta": self.beta, "loss": self.describe()}
        if self.loss_weights is not None:
            out["loss_weights"] = list(self.loss_weights)
        if self.label_smoothing or set(self.loss) & LABEL_SMOOTHED:
            out["label_smoothing"] = self.label_smoothing
        if "discopop" in self.loss:
            out["discopop_tau"] = self.discopop_tau
        if "simpo" in self.loss:
            out["simpo_gamma"] = self.simpo_gamma
        if self.alpha:
            out["alpha"] = self.alpha
        if self.f_divergence != "reverse_kl":
            out["f_divergence"] = self.f_divergence
            if self.f_divergence == "alpha_divergence":
                out["f_alpha"] = self.f_alpha
        if self.ld_alpha is not None:
            out["ld_alpha"] = self.ld_alpha
        if self.use_weighting:
            out["use_weighting"] = True
        return out


def reference_file(spec: Optional[str]) -> Optional[str]:
    """The file a --reference-aligner flag names (None for "none": the bare base, or for no flag)."""
    return None if spec is None or str(spec).lower() == "none" else spec


@dataclass
class ReferenceSyncFlags:
    """TRL's sync_ref_model (TR-DPO's trust region that follows training) for the runs with a reference: DPO, KTO
    and GRPO's KL."""

    sync_ref_model: bool = False
    """TR-DPO (TR-KTO, GRPO's KL): every --ref-model-sync-steps steps the reference Aligner moves toward the policy,
    ref = alpha x policy + (1 - alpha) x ref, so the trust region follows training (a reference of none starts as the
    bare base in the policy's shape)."""
    ref_model_mixup_alpha: float = 0.6
    """--sync-ref-model only: alpha in (0, 1]; 1 replaces the reference by the policy (TR-DPO's hard update)."""
    ref_model_sync_steps: int = 512
    """--sync-ref-model only: optimizer steps between syncs (TRL's default; at most the run's steps)."""

    def check_sync(self) -> None:
        if not self.sync_ref_model:
            if (self.ref_model_mixup_alpha, self.ref_model_sync_steps) != (ReferenceSyncFlags.ref_model_mixup_alpha,
                                                                           ReferenceSyncFlags.ref_model_sync_steps):
                raise TrainError("--ref-model-mixup-alpha and --ref-model-sync-steps apply with --sync-ref-model only: "
                                 "add it, or drop them")
            return
        if not 0.0 < self.ref_model_mixup_alpha <= 1.0:
            raise TrainError(f"--ref-model-mixup-alpha must be in (0, 1], got {self.ref_model_mixup_alpha}")
        if self.ref_model_sync_steps < 1:
            raise TrainError(f"--ref-model-sync-steps must be >= 1, got {self.ref_model_sync_steps}")

    def sync_identity(self) -> Dict[str, Any]:
        return {"sync_ref_model": self.sync_ref_model, "ref_model_mixup_alpha": self.ref_model_mixup_alpha,
                "ref_model_sync_steps": self.ref_model_sync_steps}


@dataclass
class ReferenceRunConfig(RunConfig, ReferenceSyncFlags):
    """The flags of a run against a frozen reference through the same base (DPO, KTO)."""

    reference_aligner: Optional[str] = None
    """the frozen reference: an Aligner file (.safetensors/.pth) or "none" (the bare base). Default: a frozen copy of
    --init-aligner if given, else none."""
    prefix_init_scale: float = 1.0
    """a hidden or embedding prefix starts at this multiple of the RMS of the K/V projections' inputs (DPO's defaults
    were measured at 1; SFT's 0.5 was measured for SFT only)."""
    eval_only: bool = False
    """no training: evaluate --init-aligner (default: the bare base) against the reference on the validation split and
    print the metrics as one JSON object (`evaluate/aligner.py preference` and `kto` score many Aligners)."""
    precompute_reference: bool = False
    """score every row with the reference once before training (cached next to a prepared --data directory, else in
    OUT/) instead of a reference pass every step."""

    def check(self) -> None:
        super().check()
        if self.precompute_reference and self.strategy == "fsdp":
            raise TrainError("--precompute-reference scores the rows with one unsharded copy of the base, which "
                             "--strategy fsdp keeps on the CPU (hours for a large base): drop one of the two flags")
        if self.sync_ref_model and self.precompute_reference:
            raise TrainError("--sync-ref-model moves the reference during training, so log-probs computed once would "
                             "go stale: drop --precompute-reference")
        if self.eval_only and self.wandb_project is not None:
            raise TrainError("--eval-only logs no run to Weights & Biases: drop --wandb-project (its metrics are "
                             "printed as JSON on the last line)")
        if self.eval_only and self.sync_ref_model:
            raise TrainError("--sync-ref-model moves the reference during training; --eval-only trains nothing: drop "
                             "one of them")
        self.check_sync()

    def input_paths(self) -> Dict[str, Any]:
        return {**super().input_paths(), "--reference-aligner": reference_file(self.reference_aligner)}

    def identity(self) -> Dict[str, Any]:
        return {**super().identity(), "reference_aligner": str(self.reference_aligner), **self.sync_identity()}


@dataclass
class DPORunConfig(ReferenceRunConfig):
    """A `finetune/aligner_dpo.py` run: DPO on preference pairs with one copy of the base (global batches count
    pairs)."""

    dpo: DPOLossConfig = field(default_factory=DPOLossConfig)
    train: DPOTrainConfig = field(default_factory=DPOTrainConfig)

    objective: ClassVar[str] = "dpo"

    def check(self) -> None:
        super().check()
        if self.dpo.reference_free and (self.precompute_reference or self.reference_aligner is not None or
                                        self.sync_ref_model):
            flag = "--precompute-reference" if self.precompute_reference else \
                "--reference-aligner" if self.reference_aligner is not None else "--sync-ref-model"
            raise TrainError(f"--loss {' '.join(self.dpo.loss)} reads no reference: drop {flag} (or add a loss that "
                             "compares with a reference, e.g. sigmoid)")

    def identity(self) -> Dict[str, Any]:
        # every loss field, also the ones off (a run resumed without its --ld-alpha or --use-weighting differs)
        return {**super().identity(), **plain(self.dpo), **self.dpo.settings()}


@dataclass
class KTOLossConfig:
    """The loss on unpaired completions (`losses.kto_loss`), under TRL's KTOTrainer names."""

    beta: float = 0.1
    """temperature beta (implicit reward = beta * (log pi - log ref), nats)."""
    loss: KTOLossName = "kto"
    """kto (the KTO paper; its KL term from mismatched rows of a micro-batch) or apo_zero_unpaired (APO, no KL
    term)."""
    desirable_weight: float = 1.0
    """weight of a desirable completion's loss (TRL: keep desirable_weight x desirable rows / (undesirable_weight x
    undesirable rows) between 1 and 4/3)."""
    undesirable_weight: float = 1.0
    """weight of an undesirable completion's loss."""

    def __post_init__(self):
        if self.loss not in get_args(KTOLossName):
            raise TrainError(f"--loss must be one of {', '.join(get_args(KTOLossName))}, got {self.loss!r}")
        if not self.beta > 0:
            raise TrainError(f"--beta must be > 0, got {self.beta}")
        if not (self.desirable_weight > 0 and self.undesirable_weight > 0):
            raise TrainError(f"--desirable-weight and --undesirable-weight must be > 0, got {self.desirable_weight} "
                             f"and {self.undesirable_weight}")

    def check_batch(self, rows: int, flag: str, batch: str = "batch") -> None:
        """The kto loss's z is a mean over a `batch`'s mismatched rows: `flag` (its rows) must be at least 2."""
        if self.loss == "kto" and rows < 2:
            raise TrainError(f"KTO's KL estimate is a mean over the mismatched rows of a {batch}, noise alone from one "
                             f"row: {flag} must be at least 2 (as TRL asks)")

    def settings(self) -> Dict[str, Any]:
        """What the loss depends on, for metadata and a run's identity."""
        return dataclasses.asdict(self)


@dataclass
class KTORunConfig(ReferenceRunConfig):
    """A `finetune/aligner_kto.py` run: KTO on unpaired completions (prompt, completion, true/false label) or on
    preference pairs (each pair two completions), with one copy of the base (global batches count completions; DPO's
    optimisation settings, not measured for KTO)."""

    kto: KTOLossConfig = field(default_factory=KTOLossConfig)
    train: DPOTrainConfig = field(default_factory=DPOTrainConfig)

    objective: ClassVar[str] = "kto"

    def check(self) -> None:
        super().check()
        self.kto.check_batch(self.train.micro_batch_size, "--micro-batch-size", "micro-batch")

    def identity(self) -> Dict[str, Any]:
        # --precompute-reference fixes each row's KL partner (other KL rows than the in-batch ones): part of the run
        return {**super().identity(), **self.kto.settings(), "precompute_reference": self.precompute_reference}


def plain(v: Any) -> Any:
    """A config as plain, weights_only-loadable and JSON-serialisable values (paths as strings)."""
    if dataclasses.is_dataclass(v):
        return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, dict):
        return {str(k): plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


@dataclass
class DistillConfig:
    """Context distillation: the teacher is the same frozen base reading a context the student never sees (a system
    prompt), optionally with an Aligner of its own; the student's Aligner learns to stand in for that context."""

    system: Optional[str] = None
    """the teacher's context: a system message put in front of every prompt (the chat template's system turn; other
    templates read it as an earlier turn, as generate/aligner.py --system does), or @FILE to read it from a file.
    Default: for the offline default dataset, three worked examples of its answer format; else required."""
    teacher_aligner: Optional[Path] = None
    """the teacher's own Aligner (e.g. one trained with SFT), so that one Aligner learns both; default: the bare
    base."""
    beta: float = 0.0
    """the divergence, TRL's GKD beta: 0 = KL(teacher || student), the forward KL of context distillation; 1 = the
    reverse KL(student || teacher); between: the generalized Jensen-Shannon divergence."""
    temperature: float = 1.0
    """both models' next-token distributions are softmaxes at this temperature."""
    _file_text = None  # an @FILE's text, read once: the run's identity, data and metadata all see the same (not a flag)

    def check(self) -> None:
        if not 0.0 <= self.beta <= 1.0:
            raise TrainError(f"--beta must be in [0, 1] (0: forward KL, 1: reverse KL), got {self.beta}")
        if not 0.0 < self.temperature < float("inf"):
            raise TrainError(f"--temperature must be a positive number, got {self.temperature}")
        if self.system is not None and not self.system.strip():
            raise TrainError("--system is empty: give the context to distill (a text, or @FILE)")

    def system_text(self, default_data: bool) -> str:
        """The teacher's system message: --system (read from its file for @FILE), or the default dataset's format
        examples."""
        if self.system is None:
            if not default_data:
                raise TrainError('--system is required with --data: the context the Aligner learns to replace, e.g. '
                                 '--system "Answer in one short paragraph." or --system @system_prompt.txt')
            from lit_aligner.data.default import format_context

            return format_context()
        if not self.system.startswith("@"):
            return self.system
        if self._file_text is None:
            self._file_text = self._read_file()
        return self._file_text

    def _read_file(self) -> str:
        path = Path(self.system[1:])
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TrainError(f"--system {self.system}: cannot read {path} ({e.__class__.__name__}: {e}); give a "
                             f"UTF-8 text file, or the text itself") from None
        if not text.strip():
            raise TrainError(f"--system {self.system}: {path} is empty; put the context to distill in it")
        return text.strip()

    def settings(self, default_data: bool) -> Dict[str, Any]:
        """What the loss depends on, for a run's identity."""
        return self.recorded(self.system_text(default_data))

    def recorded(self, system: str) -> Dict[str, Any]:
        """`settings` with the system message already read: what an Aligner's metadata records."""
        return {"system": system, "teacher_aligner": str(self.teacher_aligner), "beta": self.beta,
                "temperature": self.temperature}


@dataclass
class DistillTrainConfig(DistillConfig):
    """Distillation in training: what `DistillConfig` says, and where the responses come from (the data's, or the
    student's own samples on a share of the steps: on-policy, TRL GKD's lmbda)."""

    lmbda: float = 0.0
    """on-policy share, TRL GKD's lmbda: the share of training steps whose responses the student writes itself
    (sampled from the base with the Aligner being trained, then scored by the teacher) instead of reading the data's;
    1 = every step, so the training rows' responses are never read and the data may be prompts alone (with --beta 1:
    on-policy distillation, the reverse KL on the student's own samples). Validation reads the data's responses
    (prompt-only rows: the teacher's greedy answers, written once)."""
    max_new_tokens: int = 128
    """on-policy steps: the most tokens the student writes per response (--max-seq-length bounds it too)."""
    sample_temperature: float = 1.0
    """on-policy steps: the student's sampling temperature (0: greedy)."""

    def check(self) -> None:
        super().check()
        if not 0.0 <= self.lmbda <= 1.0:
            raise TrainError(f"--lmbda must be in [0, 1] (the share of on-policy steps), got {self.lmbda}")
        if self.max_new_tokens < 1:
            raise TrainError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if not 0.0 <= self.sample_temperature < float("inf"):
            raise TrainError(f"--sample-temperature must be 0 (greedy) or positive, got {self.sample_temperature}")

    def recorded(self, system: str) -> Dict[str, Any]:
        out = super().recorded(system)
        if self.lmbda > 0:  # only then do they change the loss (and an off-policy run's identity stays as it was)
            out.update(lmbda=self.lmbda, max_new_tokens=self.max_new_tokens,
                       sample_temperature=self.sample_temperature)
        return out


@dataclass
class DistillRunConfig(RunConfig, CompareFlags):
    """A `finetune/aligner_distill.py` run: context distillation into an Aligner. The teacher (the base reading
    --system, with --teacher-aligner if given) and the student (the base with the Aligner being trained, without
    --system) read the same responses; the loss is their token-level divergence on the response tokens."""

    distill: DistillTrainConfig = field(default_factory=DistillTrainConfig)

    objective: ClassVar[str] = "distill"

    def check(self) -> None:
        super().check()
        self.distill.check()
        self.distill.system_text(self.data is None)
        if self.data_options.turns != "last":
            raise TrainError("distillation learns from the last answer of each conversation (the teacher's context "
                             "goes in front of it): --turns all is SFT's; drop it")
        if self.distill.lmbda > 0 and self.strategy == "fsdp":
            raise TrainError("--lmbda above 0 samples from the student, which needs the whole base on each device: "
                             "use --strategy ddp (or one device), or --lmbda 0")

    def input_paths(self) -> Dict[str, Any]:
        return {**super().input_paths(), "--teacher-aligner": self.distill.teacher_aligner}

    def identity(self) -> Dict[str, Any]:
        return {**super().identity(), **self.distill.settings(self.data is None)}


@dataclass
class RewardConfig:
    """How answers are scored: reward functions and their weights, on answers of at most --max-new-tokens (GRPO's
    training and validation, and evaluate/aligner.py reward)."""

    rewards: List[str] = field(default_factory=lambda: ["answer"])
    """reward functions, summed with --reward-weights: answer (1 when the answer is the row's reference answer: the
    last number for a number, else the whole phrase), format (the default dataset's answer format), concise (1 - tokens
    / --max-new-tokens), regex:PATTERN (1 when it matches), or your own: FILE.py:FUNCTION or package.module:FUNCTION,
    called as TRL calls one: f(prompts=[...], completions=[...], references=[...], **kwargs) -> one float each."""
    reward_weights: Optional[List[float]] = None
    """one weight per --rewards entry (default: 1 each)."""
    max_new_tokens: int = 128
    """the most tokens per answer (--max-seq-length bounds prompt + answer too)."""
    _functions = None  # the Rewards, once built: a user's reward file is imported once (not a flag)

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise TrainError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        self.reward_functions()

    def reward_functions(self) -> "Rewards":  # noqa: F821
        """The --rewards functions (user files imported at the first call, `check`: a bad one fails before the model
        loads)."""
        from lit_aligner.rewards import RewardError, Rewards

        if self._functions is None:
            try:
                self._functions = Rewards(self.rewards, self.reward_weights, self.max_new_tokens)
            except RewardError as e:
                raise TrainError(str(e)) from None
        return self._functions

    def settings(self) -> Dict[str, Any]:
        return {"rewards": list(self.rewards), "reward_weights": self.reward_weights,
                "max_new_tokens": self.max_new_tokens}


@dataclass
class GRPOConfig(RewardConfig):
    """GRPO (DeepSeekMath; TRL's GRPOTrainer): the student (the base with the Aligner being trained) samples a group of
    answers to each prompt, reward functions score them, and each answer's advantage is its reward against its
    group's. Names as TRL's."""

    num_generations: int = 8
    """answers sampled per prompt (the group, G); each step trains --global-batch-size prompts x G answers."""
    sample_temperature: float = 1.0
    """sampling temperature of the training answers (validation answers are greedy); the loss reads the policy's
    log-probabilities at this temperature too (TRL's), those of the distribution the answers were drawn from."""
    # the training answers' sampling filters: generate/aligner.py's flags, the same names, meaning and check
    top_k: Optional[int] = None
    """sample the training answers from the k most likely tokens only (default: all)."""
    top_p: Optional[float] = None
    """sample the training answers from the smallest set of tokens whose probability reaches top_p (nucleus)."""
    min_p: Optional[float] = None
    """sample the training answers from the tokens at least min_p times as likely as the most likely one."""
    repetition_penalty: float = 1.0
    """sample the training answers with the positive logits of the tokens already in the prompt or the answer divided
    by this (the negative ones multiplied): > 1 discourages repeating (TRL's, transformers' and vLLM's; 1 = off). The
    loss reads the policy's own log-probabilities, as TRL's."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """what divides each answer's reward less its group's mean (TRL's names): group, the group's standard deviation
    (GRPO's); batch, the standard deviation of the whole step's rewards, over every process (LitePPO's); none, nothing
    (Dr. GRPO's: the group's spread biases towards too easy and too hard prompts)."""
    multi_objective_aggregation: Literal["sum_then_normalize", "normalize_then_sum"] = "sum_then_normalize"
    """how several reward functions make one advantage (TRL's names): sum_then_normalize, their weighted sum, then
    --scale-rewards; normalize_then_sum (GDPO), each function's rewards centred and scaled within their group first,
    then weighted and summed, and the sums centred and scaled over the whole step (so a function with a wide range
    cannot drown another's signal, and a group whose totals tie can still learn from functions that disagree)."""
    mask_truncated_completions: bool = False
    """leave answers cut at --max-new-tokens (or at the room left under --max-seq-length) out of the loss, as
    DAPO's overlong filter: their ending is unknown, so their reward says little about their tokens. They still
    count in their group's advantages and, except under --loss-type dapo (a mean over the kept tokens), in the mean
    over answers. train_truncated logs their share either way."""
    beta: float = 0.0
    """weight of the KL penalty to the reference (--reference-aligner; k3 estimator, per token; TRL's default 0: no
    reference pass)."""
    use_bias_correction_kl: bool = False
    """multiply each token's KL term by its ratio to the sampling policy (DeepSeek-V3.2's unbiased estimate of the
    reverse KL's gradient; TRL's flag, on by default in TRL 1.16, off up to 1.10: set it to train as a current TRL
    does with --beta). It changes the KL's gradient even when the ratio is 1."""
    loss_type: GRPOLossType = "grpo"
    """the loss and how the answers' per-token terms are averaged (TRL's names): grpo, each answer's mean over its
    tokens, then the mean over answers (each answer weighs the same: the paper's); dapo, the mean over every answer
    token of the step (a longer answer weighs more: TRL's default); dr_grpo, each answer's sum over its tokens /
    --max-new-tokens, then the mean over answers (Dr. GRPO: no length bias); bnpo, the mean over each micro-batch's
    answer tokens, then over the micro-batches (TRL's: so it depends on --micro-batch-size); cispo (MiniMax-M1), the
    policy gradient weighted by the ratio to the sampling policy capped at --epsilon-high (default 5), averaged as dapo;
    sapo (Soft Adaptive Policy Optimization), a smooth gate on the ratio instead of clipping
    (--sapo-temperature-pos/-neg), averaged as grpo; luspo (LUSPO, with --importance-sampling-level sequence), GSPO's
    term weighed by the answer's length; vespo (VESPO), the policy gradient weighted by a smooth function of the
    answer's whole ratio to the sampling policy (--vespo-k-pos and the three others), averaged as dapo."""
    importance_sampling_level: Literal["token", "sequence"] = "token"
    """the ratio to the sampling policy (TRL's names): token, one per token (PPO's, GRPO's); sequence, one per answer,
    the geometric mean of its tokens' (GSPO: steadier, matches rewards given per answer; its paper clips it with
    --epsilon 3e-4 --epsilon-high 4e-4)."""
    num_iterations: int = 1
    """optimizer steps on each batch of sampled answers (TRL's, DeepSeekMath's mu): with more than 1, a batch of
    prompts is answered once and trained on for this many steps, each a clipped ratio to the policy that sampled the
    answers (--epsilon), so sampling, the slow part, costs 1/mu as much per step. A batch then spans mu steps:
    --max-steps is a multiple of it, and run states (--save-interval, a stop by Ctrl-C) wait for a batch's last
    step."""
    epsilon: float = 0.2
    """with --num-iterations > 1: the ratio to the sampling policy is held within [1 - epsilon, 1 + epsilon-high]
    (PPO's clipping; with 1 the ratio is 1 and nothing is clipped)."""
    epsilon_high: Optional[float] = None
    """the upper bound's epsilon (DAPO's clip-higher, e.g. 0.28; default: --epsilon). Under --loss-type cispo, the
    cap on the ratio itself (ScaleRL's epsilon_max; default 5: TRL's default there is --epsilon)."""
    delta: Optional[float] = None
    """cap the ratio at delta in the unclipped term too (INTELLECT-2's two-sided clipping; > 1 + --epsilon-high, e.g.
    4; default: no cap)."""
    sapo_temperature_pos: float = 1.0
    """--loss-type sapo: the gate's temperature for answers with a positive advantage."""
    sapo_temperature_neg: float = 1.05
    """--loss-type sapo: the gate's temperature for the others (SAPO's paper: a little higher)."""
    vespo_k_pos: float = 2.0
    """--loss-type vespo: the weight's power k for answers with a non-negative advantage (how fast it fades for a
    ratio below 1); phi(w) = exp(lambda + k log w - lambda w), 1 at w = 1."""
    vespo_lambda_pos: float = 3.0
    """--loss-type vespo: the weight's decay lambda for those answers (how fast it fades for a ratio above 1)."""
    vespo_k_neg: float = 3.0
    """--loss-type vespo: k for answers with a negative advantage."""
    vespo_lambda_neg: float = 2.0
    """--loss-type vespo: lambda for answers with a negative advantage."""
    entropy_coef: float = 0.0
    """weight of an entropy bonus (TRL's): the loss less this x the policy's mean next-token entropy over the step's
    answer tokens (those the policy term keeps), against a policy collapsing onto one answer; 0: off. With
    --use-adaptive-entropy, the starting coefficient."""
    use_adaptive_entropy: bool = False
    """adapt --entropy-coef each step (Skywork-OR1's control, TRL's): up by --entropy-coef-delta after a step whose mean
    entropy was at or below --entropy-target, down otherwise, within [--entropy-coef-min, --entropy-coef-max]; the
    bonus applies only on steps after one at or below the target."""
    entropy_coef_min: float = 0.0
    """--use-adaptive-entropy: the coefficient's lower bound."""
    entropy_coef_max: float = 1.0
    """--use-adaptive-entropy: the coefficient's upper bound."""
    entropy_coef_delta: float = 0.005
    """--use-adaptive-entropy: the coefficient's change per step."""
    entropy_target: float = 0.2
    """--use-adaptive-entropy: the mean entropy (nats) at or below which the bonus applies; set it near the
    train_entropy of a run's first steps (TRL's default 0.2 acts on a near collapse only)."""
    off_policy_mask_threshold: Optional[float] = None
    """with --num-iterations > 1: leave out of the policy term each answer with a negative advantage whose tokens'
    mean KL from the sampling policy to the current one (log p_old - log p) is above this (DeepSeek-V3.2's
    off-policy sequence mask, e.g. 0.5): a stale sample pushed down further only adds noise; default: none."""
    top_entropy_quantile: float = 1.0
    """keep in the policy term only the tokens whose distribution's entropy is in this top share of the forward pass's
    answer tokens ("Beyond the 80/20 rule": 0.2; 1: every token)."""

    def check(self) -> None:
        super().check()
        if self.num_iterations < 1:
            raise TrainError(f"--num-iterations must be >= 1 (optimizer steps per batch of samples), got "
                             f"{self.num_iterations}")
        if not 0.0 < self.epsilon < 1.0 or not 0.0 < self.upper_epsilon() < float("inf"):
            raise TrainError(f"--epsilon must be in (0, 1) and --epsilon-high positive, got {self.epsilon} and "
                             f"{self.epsilon_high}")
        if self.loss_type == "cispo" and self.upper_epsilon() < 1.0:
            raise TrainError(f"under --loss-type cispo, --epsilon-high is the cap on the ratio itself (ScaleRL: 5), so "
                             f"at least 1; got {self.epsilon_high}")
        if self.loss_type == "luspo" and self.importance_sampling_level != "sequence":
            raise TrainError("--loss-type luspo weighs GSPO's sequence-level term by the answer's length: add "
                             "--importance-sampling-level sequence")
        if self.loss_type == "vespo" and self.importance_sampling_level != "token":
            raise TrainError("--loss-type vespo weighs each answer by its whole ratio itself: leave "
                             "--importance-sampling-level at token")
        nonnegative = lambda *xs: all(0.0 <= x < float("inf") for x in xs)  # noqa: E731
        vespo = (self.vespo_k_pos, self.vespo_lambda_pos, self.vespo_k_neg, self.vespo_lambda_neg)
        if not nonnegative(*vespo):
            raise TrainError(f"--vespo-k-pos, --vespo-lambda-pos, --vespo-k-neg and --vespo-lambda-neg must be >= 0, "
                             f"got {', '.join(f'{x:g}' for x in vespo)}")
        if self.delta is not None and not 1.0 < self.delta < float("inf"):
            raise TrainError(f"--delta caps the ratio (above 1 + --epsilon-high, e.g. 4), got {self.delta}")
        if not (0.0 < self.sapo_temperature_pos < float("inf") and 0.0 < self.sapo_temperature_neg < float("inf")):
            raise TrainError(f"--sapo-temperature-pos and --sapo-temperature-neg must be positive, got "
                             f"{self.sapo_temperature_pos} and {self.sapo_temperature_neg}")
        if self.off_policy_mask_threshold is not None and not (0.0 < self.off_policy_mask_threshold < float("inf")
                                                               and self.num_iterations > 1):
            raise TrainError(f"--off-policy-mask-threshold must be positive (e.g. 0.5) and needs --num-iterations > 1 "
                             f"(with 1 every answer is trained on by the policy that sampled it), got "
                             f"{self.off_policy_mask_threshold} with --num-iterations {self.num_iterations}")
        if not nonnegative(self.entropy_coef, self.entropy_coef_min, self.entropy_coef_max, self.entropy_target) or (
                self.use_adaptive_entropy and not (self.entropy_coef_min <= self.entropy_coef <= self.entropy_coef_max
                                                   and 0.0 < self.entropy_coef_delta < float("inf"))):
            raise TrainError(f"--entropy-coef {self.entropy_coef} is a bonus's weight (>= 0; 0: off); with "
                             f"--use-adaptive-entropy it must lie within --entropy-coef-min {self.entropy_coef_min} "
                             f"and --entropy-coef-max {self.entropy_coef_max}, --entropy-coef-delta "
                             f"{self.entropy_coef_delta} be positive and --entropy-target {self.entropy_target} >= 0")
        if self.multi_objective_aggregation == "normalize_then_sum" and self.scale_rewards != "group":
            raise TrainError(f"--multi-objective-aggregation normalize_then_sum scales each function's rewards by "
                             f"their group's spread and the sums by the step's; --scale-rewards {self.scale_rewards} "
                             f"applies to sum_then_normalize only: leave it at group")
        if not 0.0 <= self.top_entropy_quantile <= 1.0:
            raise TrainError(f"--top-entropy-quantile is a share of the tokens, in [0, 1] (1: all), got "
                             f"{self.top_entropy_quantile}")
        if self.num_generations < 2:
            raise TrainError(f"--num-generations must be at least 2 (advantages compare answers within a group), got "
                             f"{self.num_generations}")
        if not 0.0 <= self.sample_temperature < float("inf"):
            raise TrainError(f"--sample-temperature must be 0 (greedy) or positive, got {self.sample_temperature}")
        if not 0.0 <= self.beta < float("inf"):
            raise TrainError(f"--beta must be >= 0 (0: no KL penalty), got {self.beta}")
        from lit_aligner.generation.engine import as_flag, check_penalties, check_sampling

        sampling = self.sampling()
        try:
            check_penalties(sampling.pop("penalties"))
            check_sampling(self.sample_temperature, **sampling)
        except ValueError as e:
            raise TrainError(as_flag(str(e))) from None

    def upper_epsilon(self) -> float:
        """--epsilon-high as given, else its default (--epsilon; cispo: 5)."""
        if self.epsilon_high is not None:
            return self.epsilon_high
        return 5.0 if self.loss_type == "cispo" else self.epsilon

    def loss_settings(self) -> Dict[str, Any]:
        """`losses.grpo_loss`'s settings from these flags."""
        return {"loss_type": self.loss_type, "max_completion_length": self.max_new_tokens,
                "epsilon_low": self.epsilon, "epsilon_high": self.upper_epsilon(),
                "importance_sampling_level": self.importance_sampling_level, "delta": self.delta,
                "sapo_temperatures": (self.sapo_temperature_pos, self.sapo_temperature_neg),
                "top_entropy_quantile": self.top_entropy_quantile, "beta": self.beta,
                "off_policy_mask_threshold": self.off_policy_mask_threshold, "entropy_grad": self.entropy_bonus(),
                "vespo_params": (self.vespo_k_pos, self.vespo_lambda_pos, self.vespo_k_neg, self.vespo_lambda_neg),
                "use_bias_correction_kl": self.use_bias_correction_kl}

    def entropy_bonus(self) -> bool:
        """Whether the loss has an entropy bonus (TRL's: a coefficient, or the adaptive control, which may raise one
        from 0)."""
        return self.entropy_coef != 0.0 or self.use_adaptive_entropy

    def sampling(self) -> Dict[str, Any]:
        """The training answers' sampling filters and penalty, as `generation.generate` takes them (None: off)."""
        from lit_aligner.generation import Penalties

        return {"top_k": self.top_k, "top_p": self.top_p, "min_p": self.min_p,
                "penalties": Penalties(repetition=self.repetition_penalty)}

    def settings(self) -> Dict[str, Any]:
        """What the loss depends on: a run's identity, and what the Aligner's metadata records."""
        return {**super().settings(), "num_generations": self.num_generations,
                "sample_temperature": self.sample_temperature, "top_k": self.top_k, "top_p": self.top_p,
                "min_p": self.min_p, "repetition_penalty": self.repetition_penalty, "scale_rewards": self.scale_rewards,
                "multi_objective_aggregation": self.multi_objective_aggregation,
                "mask_truncated_completions": self.mask_truncated_completions, "beta": self.beta,
                "use_bias_correction_kl": self.use_bias_correction_kl,
                "loss_type": self.loss_type, "num_iterations": self.num_iterations, "epsilon": self.epsilon,
                "epsilon_high": self.epsilon_high, "importance_sampling_level": self.importance_sampling_level,
                "delta": self.delta, "sapo_temperature_pos": self.sapo_temperature_pos,
                "sapo_temperature_neg": self.sapo_temperature_neg, "vespo_k_pos": self.vespo_k_pos,
                "vespo_lambda_pos": self.vespo_lambda_pos, "vespo_k_neg": self.vespo_k_neg,
                "vespo_lambda_neg": self.vespo_lambda_neg, "top_entropy_quantile": self.top_entropy_quantile,
                "off_policy_mask_threshold": self.off_policy_mask_threshold,
                "entropy_coef": self.entropy_coef, "use_adaptive_entropy": self.use_adaptive_entropy,
                "entropy_coef_min": self.entropy_coef_min, "entropy_coef_max": self.entropy_coef_max,
                "entropy_coef_delta": self.entropy_coef_delta, "entropy_target": self.entropy_target}


@dataclass
class GRPOTrainConfig(TrainConfig):
    """Optimisation for GRPO: batches count prompts, each of which brings its group of sampled answers."""

    max_steps: int = 40
    """optimizer steps (each one global batch of prompts)."""
    global_batch_size: int = 4
    """prompts per optimizer step over all devices (each brings --num-generations answers)."""
    micro_batch_size: int = 1
    """prompts per forward pass per device (each pass holds their --num-generations answers)."""
    eval_interval: int = 10
    """validation every this many steps (and at the first and the last)."""
    eval_iters: Union[int, Literal["all"]] = "all"
    """validation micro-batches per evaluation and device (each prompt answered greedily); all: the whole split
    (--val-size sets its rows); 0: no validation."""
    adam_beta1: float = 0.9
    """AdamW's beta1 (SFT's default, 0.6, was measured for SFT, correction and distillation, not for GRPO)."""


@dataclass
class GRPORunConfig(RunConfig, CompareFlags, ReferenceSyncFlags):
    """A `finetune/aligner_grpo.py` run: GRPO into an Aligner. Each step the student samples --num-generations
    answers to each of its prompts; the reward functions score them; the loss is the policy gradient of each answer's
    advantage (its reward less its group's mean, over the group's standard deviation)."""

    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    train: TrainConfig = field(default_factory=GRPOTrainConfig)
    data_options: DataOptions = field(default_factory=lambda: DataOptions(val_size=64))
    reference_aligner: Optional[str] = None
    """with --beta > 0, the KL penalty's frozen reference: an Aligner file (.safetensors/.pth) or "none" (the bare
    base). Default: a frozen copy of --init-aligner if given (GRPO on top of SFT stays near the SFT policy), else
    none."""
    log_completions: bool = False
    """write every sampled answer with its prompt, rewards and advantage to OUT/completions.jsonl, a line each (under
    DDP, every process's, gathered): what the policy really says, the first thing to read when a reward is gamed."""

    objective: ClassVar[str] = "grpo"

    def check(self) -> None:
        super().check()
        self.grpo.check()
        if self.data_options.turns != "last":
            raise TrainError("GRPO answers the last turn of each conversation: --turns all is SFT's; drop it")
        if self.strategy == "fsdp":
            raise TrainError("GRPO samples from the student, which needs the whole base on each device: use "
                             "--strategy ddp (or one device)")
        mu, steps = self.grpo.num_iterations, self.train.max_steps
        if self.train.epochs is None and steps % mu:
            raise TrainError(f"--max-steps {steps} is not a multiple of --num-iterations {mu} (each batch of samples "
                             f"is trained on for {mu} steps): give --max-steps {max(mu, steps - steps % mu)}")
        for flag, given in (("--reference-aligner " + str(self.reference_aligner), self.reference_aligner is not None),
                            ("--sync-ref-model", self.sync_ref_model)):
            if given and self.grpo.beta == 0:
                raise TrainError(f"{flag} is about the KL penalty's reference, and --beta 0 has none: add --beta (e.g. "
                                 f"0.04), or drop {flag.split()[0]}")
        self.check_sync()

    def input_paths(self) -> Dict[str, Any]:
        return {**super().input_paths(), "--reference-aligner": reference_file(self.reference_aligner)}

    def steps_per_batch(self) -> int:
        return self.grpo.num_iterations

    def identity(self) -> Dict[str, Any]:
        return {**super().identity(), **self.grpo.settings(), "reference_aligner": str(self.reference_aligner),
                **self.sync_identity()}
