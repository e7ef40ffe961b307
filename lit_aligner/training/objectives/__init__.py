"""Training objectives: small objects that turn a batch into a loss and its metrics, behind one interface, so that one
engine (`lit_aligner.training.engine.fit` / `evaluate`) trains and validates every one of them.

An objective declares the data kind it reads (`data_kind`, see `lit_aligner.data.KIND_FIELDS`), which (prompt,
response) rows of an item a batch holds (`collate`), how many units an item's loss sums over (`units`: tokens, or
pairs), and the metric sums of a batch (`__call__`, "loss" carrying the graph to the Aligner). Adding one is a file
in this package: a subclass registered with `@register`.

- `sft.SFT`: cross-entropy on the response tokens; `sft.Correction`: the same on Q-A-C data, targeting the upstream
  answer itself during the copy warm-up (Q-A-A), then the correction;
- `dpo.DPO`: the DPO loss (or another of TRL's preference losses) against a frozen reference that runs through the
  same base;
- `kto.KTO`: the KTO loss on unpaired completions (desirable or not), against the same kind of reference;
- `distill.Distill`: context distillation, the divergence from a teacher that is the same base reading a system
  prompt the student (base + Aligner) does not see;
- `grpo.GRPO`: GRPO, the policy gradient of the student's own sampled answers, each group's rewards centred on their
  mean (reinforcement learning from reward functions).
"""

from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn

from lit_aligner.losses import DEFAULT_CHUNK_SIZE
from lit_aligner.model import Aligner
from lit_aligner.prompts import default_template

Batch = Dict[str, torch.Tensor]
OBJECTIVES: Dict[str, Type["Objective"]] = {}


def register(cls: Type["Objective"]) -> Type["Objective"]:
    OBJECTIVES[cls.name] = cls
    return cls


class Objective:
    """Turns a batch into metric sums. Subclasses set the class attributes and implement `collate`, `units` and
    `__call__`; `from_run` builds one for a training run, `metadata` adds what the Aligner file should record."""

    name: ClassVar[str] = ""
    data_kind: ClassVar[str] = "sft"
    unit: ClassVar[str] = "tokens"  # what `units` counts and every metric is averaged over
    metric_names: ClassVar[Tuple[str, ...]] = ("loss",)
    # those measured in training only, left out of validation's (GRPO's KL and entropy: it scores greedy answers)
    train_only_metrics: ClassVar[Tuple[str, ...]] = ()
    # optimizer steps each global batch trains (GRPO's --num-iterations: its samples are reused); run states are
    # written between batches only
    iterations: int = 1
    # a training run's Fabric (set by `train`; None elsewhere): what an objective that reduces a statistic over the
    # processes, as TRL gathers it, reduces with
    fabric: Any = None

    def __init__(self, pad_id: int, chunk_size: int = DEFAULT_CHUNK_SIZE):
        self.pad_id, self.chunk_size = pad_id, chunk_size
        # the `aligner` argument of the policy's forward pass: None is the model's own (the one being trained); an
        # evaluation may set an Aligner, or False for the bare base (see `with_aligner`)
        self.aligner: Any = None

    @property
    def val_metric_names(self) -> Tuple[str, ...]:
        return tuple(k for k in self.metric_names if k not in self.train_only_metrics)

    def with_aligner(self, aligner: Any) -> "Objective":
        """A copy of this objective whose policy is `aligner` (an Aligner, a stacked one, or False: the bare base)."""
        import copy

        other = copy.copy(self)
        other.aligner = aligner
        return other

    def collate(self, items: Sequence[Dict[str, torch.Tensor]], step: Optional[int] = None) -> Batch:
        """Items of `data_kind` -> a batch with at least "input_ids" (B, T) and "lengths" (B,). `step`: the optimizer
        step the batch trains (None: validation)."""
        raise NotImplementedError

    def units(self, item: Dict[str, torch.Tensor], step: Optional[int] = None) -> int:
        raise NotImplementedError

    def __call__(self, model: nn.Module, batch: Batch) -> Dict[str, torch.Tensor]:
        """Sums over the batch of every name in `metric_names` (0-dim fp32 tensors); "loss" has the graph."""
        raise NotImplementedError

    # --- building one for a run ---------------------------------------------------------------------------------

    @classmethod
    def from_run(cls, cfg: Any, run: Any) -> "Objective":
        """The objective for a training run (`lit_aligner.training.run.Run`: its model, tokenizer, data, ...)."""
        return cls(run.tokenizer.pad_id, cfg.train.chunk_size)

    @classmethod
    def data_arguments(cls, cfg: Any) -> Dict[str, Any]:
        """More keyword arguments of `lit_aligner.data.load_data` for a run's data (distillation's teacher context)."""
        return {}

    @classmethod
    def default_template(cls, tokenizer) -> str:
        return default_template(tokenizer)

    def prepare(self, run: Any) -> None:
        """Called once the model and data are loaded, before training (e.g. to precompute reference log-probs)."""

    def rollout(self, fabric: Any, model: nn.Module, items: Dict[int, Dict[str, torch.Tensor]],
                step: int) -> Optional[Dict[int, Dict[str, torch.Tensor]]]:
        """Called before the forward passes of optimizer step `step` with this rank's items of it (index -> item)
        and the bare model (base + the Aligner being trained; `fabric` for its precision, or None); returns the items
        to train on instead, with new responses the model wrote itself (on-policy distillation), or None to train on
        the data as it is. An index may map to a list of items (GRPO's group of samples of one prompt): the
        micro-batch of that index then holds them all. Every rank must decide alike for a step: the engine then
        counts the units of the new items across ranks."""
        return None

    def answer(self, fabric: Any, model: nn.Module, dataset: Any,
               indices: Sequence[int]) -> Optional[Dict[int, Dict[str, torch.Tensor]]]:
        """Called by `engine.evaluate` with the held-out rows a rank scores (`dataset`'s `indices`) before they are
        scored; returns their items (index -> item) with the responses to score instead (GRPO: the policy's greedy
        answers and their rewards), or None to score the data's."""
        return None

    def after_step(self, step: int, aligner: nn.Module) -> None:
        """Called on every rank after optimizer step `step` (1-based) with the Aligner being trained, before that
        step's validation and run state (e.g. TR-DPO moves its reference toward it)."""

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """What a run state keeps of this objective besides the Aligner and the optimizer (plain tensors)."""
        return {}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        """Restores `state_dict` on resume."""

    def metadata(self) -> Dict[str, Any]:
        """What the trained Aligner's file records about this objective (beyond mode, template and data)."""
        return {}


class ObjectiveModule(nn.Module):
    """The model and an objective as one module whose `forward(batch)` returns the objective's metric sums: Fabric
    (DDP/FSDP) sees a single forward that uses every weight it needs (the LM head too), so sharded weights are gathered
    where they are read, and the policy and reference passes of DPO run inside it."""

    def __init__(self, model: nn.Module, objective: Objective):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch: Batch) -> Dict[str, torch.Tensor]:
        return self.objective(self.model, batch)


# A frozen Aligner read through the same base (a reference, a teacher, the run's starting Aligner), or False for the
# bare base.
Reference = Union[Aligner, bool]


def as_reference(aligner: Optional[Aligner], device: Any = None) -> Reference:
    """A frozen, private copy of `aligner` (False for None: the bare base). Copying matters when the policy starts
    from the same Aligner: training it in place would otherwise move the copy too."""
    from lit_aligner.aligner_files import build_aligner

    if aligner is None:
        return False
    ref = build_aligner(aligner.n_tokens, aligner.start_layer, aligner.n_layer, aligner.n_head, aligner.n_embd,
                        aligner.prefix.detach().clone(), aligner.gate.detach().clone())
    ref.requires_grad_(False)
    return ref if device is None else ref.to(device)


def response_end(response: torch.Tensor, end_id: Optional[int]) -> torch.Tensor:
    """(1,) the token an on-policy response that stopped ends with: the template's (`end_id`), or without one the
    data response's last token."""
    return response[-1:] if end_id is None else torch.tensor([end_id], dtype=torch.long)


def write_responses(fabric: Any, model: nn.Module, prompts: Sequence[torch.Tensor], rooms: Sequence[int],
                    ends: Sequence[torch.Tensor], max_new_tokens: int, temperature: float, stop_ids: Sequence[int],
                    aligners: Any = None, generator: Optional[torch.Generator] = None,
                    **sampling: Any) -> Tuple[List[Optional[torch.Tensor]], List[bool]]:
    """The model's continuation of each prompt (on-policy responses): at most `max_new_tokens` and no more than the
    prompt's room (`rooms`: tokens left under --max-seq-length); a continuation that stopped ends with the prompt's end
    token (`ends`: the template's, as the data's responses end), one cut short does not; None where there is no room.
    Returns the continuations and whether each stopped (False: cut short, or no room).
    `aligners`: `generate`'s (None: the attached Aligner); `fabric`: the training precision (None: the weights');
    `sampling`: `generate`'s filters and penalties (top_k, top_p, min_p, penalties)."""
    import contextlib

    from lit_aligner.generation import generate

    rows = [k for k, room in enumerate(rooms) if room >= 1]
    out: List[Optional[torch.Tensor]] = [None] * len(prompts)
    stopped = [False] * len(prompts)
    if not rows:
        return out, stopped
    max_new = min(max_new_tokens, max(rooms[k] for k in rows))
    with fabric.autocast() if fabric is not None else contextlib.nullcontext():
        samples = generate(model, [prompts[k] for k in rows], max_new, temperature=temperature, stop_ids=stop_ids,
                           aligners=aligners, generator=generator, compile=False, **sampling)
    model.clear_caches()  # the training passes need the memory more than the next rollout needs the cache
    for k, ids in zip(rows, samples):
        ended = len(ids) < max_new  # (generate drops the stop token it ended on)
        response = torch.cat([ids, ends[k].to(ids)]) if ended else ids
        out[k], stopped[k] = response[: rooms[k]], ended and len(response) <= rooms[k]
    return out, stopped


def get_objective(name: str) -> Type[Objective]:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


from lit_aligner.training.objectives import distill, dpo, grpo, kto, sft  # noqa: E402,F401  (register the built-in objectives)

__all__: List[str] = ["OBJECTIVES", "Objective", "ObjectiveModule", "Reference", "as_reference", "get_objective",
                      "register", "response_end", "write_responses"]
