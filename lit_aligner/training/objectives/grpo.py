"""GRPO (Group Relative Policy Optimization, DeepSeekMath; TRL's GRPOTrainer) into an Aligner: every step the student
(the base with the Aligner being trained) samples a group of --num-generations answers to each prompt of the step
(`rollout`), reward functions score each answer (`lit_aligner.rewards`), and each answer's advantage is its reward less
its group's mean, over the group's standard deviation (--scale-rewards; with several functions, GDPO's
--multi-objective-aggregation normalize_then_sum scales each function's within the group first). An answer's per-token
loss is -advantage x the ratio of its token's probability to the sampling policy's, clipped to [1 - epsilon, 1 +
epsilon-high] (PPO's; with one optimizer step per batch of samples, TRL's default num_iterations=1, the ratio is 1 and
the gradient the policy gradient; with --num-iterations mu the batch's samples, and their log-probabilities under the
policy that drew them, are kept for its mu steps) plus --beta x the KL to a frozen reference through the same base
(--reference-aligner: by default a copy of --init-aligner, else the bare base), averaged as --loss-type says (which also
names CISPO's and SAPO's terms; `losses.grpo_loss`); the ratio is per token or, with --importance-sampling-level
sequence, per answer (GSPO), and every log-probability is the policy's at the sampling temperature. Units are answers.
No value model and no reward model: the rewards are functions.

Validation answers each held-out prompt greedily (`answer`) and reports the mean reward; its "loss" is minus that
reward, so lower is better there too.
"""

import json
import random
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from lit_aligner.data.dataset import NO_CONTEXT
from lit_aligner.losses import DEFAULT_CHUNK_SIZE, TOKEN_MEAN_LOSSES, grpo_loss
from lit_aligner.training.config import GRPOConfig, RewardConfig, TrainError
from lit_aligner.training.objectives import Batch, register, response_end, write_responses
from lit_aligner.training.objectives.dpo import SyncedReference, run_reference
from lit_aligner.training.objectives.sft import SFT

# what `rollout` / `answer` add to an item, beside its answer
SCORES = ("reward", "rewards", "advantage", "zero_std", "truncated")


def group_advantages(rewards: torch.Tensor, scale: str = "group", std: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(groups, G) rewards -> advantages: each less its group's mean, over (`scale`, TRL's scale_rewards) the group's
    standard deviation ("group"), the whole batch's ("batch": `std`, default these rewards') or nothing ("none");
    +1e-4 as TRL: a group whose answers all score alike has advantage 0."""
    centred = rewards - rewards.mean(-1, keepdim=True)
    if scale == "none":
        return centred
    if scale == "group":
        std = rewards.std(-1, keepdim=True)
    return centred / ((rewards.std() if std is None else std) + 1e-4)


def batch_moments(fabric: Any, rewards: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The mean and (unbiased) standard deviation of a step's rewards over every process (each holds its own
    groups)."""
    x = rewards.double().flatten()
    sums = torch.stack([x.new_tensor(float(x.numel())), x.sum(), (x * x).sum()])
    if fabric is not None and fabric.world_size > 1:
        sums = fabric.all_reduce(sums.to(fabric.device), reduce_op="sum").cpu()
    n, s, ss = sums.tolist()
    std = torch.tensor(max(ss - s * s / n, 0.0) / max(n - 1, 1) if n > 1 else 0.0).sqrt().float()
    return torch.tensor(s / max(n, 1)).float(), std


def decoupled_advantages(fabric: Any, rewards: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """GDPO (TRL's multi_objective_aggregation="normalize_then_sum"): (groups, G, K) rewards of K functions ->
    (groups, G) advantages: each function's rewards less their group's mean over its standard deviation (+1e-4),
    weighted and summed, then the sums less the step's mean over its standard deviation (every process's)."""
    centred = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)
    sums = (centred * torch.tensor(weights, dtype=rewards.dtype)).sum(-1)
    mean, std = batch_moments(fabric, sums)
    return (sums - mean) / (std + 1e-4)


def keep_completions(path: Path, step: int) -> Path:
    """--log-completions' file for a run starting at `step`: the lines of steps up to it (a resumed run goes on as the
    whole run would; an interrupted step's lines go), none for a new run; written through a temporary file."""
    from lit_aligner.files import atomic_write_text

    def kept(line: str) -> bool:
        try:
            return json.loads(line)["step"] <= step
        except ValueError:  # a line cut short when the run was killed
            return False

    lines = path.read_text(encoding="utf-8").splitlines(keepends=True) if step and path.is_file() else []
    atomic_write_text(path, "".join(line for line in lines if kept(line)))
    return path


@register
class GRPO(SyncedReference, SFT):
    """Per answer: the GRPO loss (training) or minus its reward (validation); units are answers. Metrics: loss,
    reward (the weighted sum), each reward function's (reward_<name>), length (answer tokens), kl (to the reference,
    with --beta), zero_std (the share of answers in groups whose rewards do not differ: no signal), truncated (the
    share cut at --max-new-tokens or the room left: TRL's clipped_ratio), entropy (each answer's mean over its tokens
    of the policy's entropy there: a policy collapsing to one answer shows it falling) and, with --num-iterations > 1,
    clip_ratio (the share of each answer's tokens whose ratio the clipping held); validation has loss, the rewards,
    length and truncated (`train_only_metrics` are not measured there)."""

    name = "grpo"
    data_kind = "sft"
    unit = "answers"
    # validation scores one greedy answer per prompt by its reward alone: no group, no KL, no sampled entropy
    train_only_metrics = ("kl", "zero_std", "entropy", "clip_ratio", "entropy_coef")

    def __init__(self, pad_id: int, decode, config: RewardConfig = GRPOConfig(), chunk_size: int = DEFAULT_CHUNK_SIZE,
                 max_seq_length: int = 512, stop_ids: Sequence[int] = (), seed: int = 0, end_id: Optional[int] = None,
                 reference: Any = False, reference_desc: str = "none"):
        super().__init__(pad_id, chunk_size)
        # config: a GRPOConfig to train (a RewardConfig only scores greedy answers: evaluate/aligner.py reward);
        # decode: token ids (list) -> text without special tokens; reference: the KL's (--beta > 0), a frozen Aligner
        # or False (the bare base), named by reference_desc in the metadata
        self.config, self.decode, self.reference, self.reference_desc = config, decode, reference, reference_desc
        self.rewards = config.reward_functions()
        self.max_seq_length, self.stop_ids, self.seed, self.end_id = max_seq_length, sorted(stop_ids), seed, end_id
        self.metric_names = ("loss", "reward", *(f"reward_{n}" for n in self.rewards.names), "length", "kl",
                             "zero_std", "truncated", "entropy")
        self.iterations = getattr(config, "num_iterations", 1)  # (a RewardConfig only scores: 1)
        if self.iterations > 1 and config.loss_type not in ("sapo", "vespo"):  # the share of each answer's tokens
            self.metric_names += ("clip_ratio",)  # whose ratio the clipping held (TRL's clip_ratio; sapo's and vespo's
            # smooth weights hold none outright)
        # --entropy-coef (TRL's entropy bonus) and its adaptive control: the coefficient, the mean entropy of the last
        # step (inf before the first: the adaptive bonus waits for one at or below the target), and this step's sums
        # of (entropy, tokens) over the kept tokens so far
        self.bonus = isinstance(config, GRPOConfig) and config.entropy_bonus()
        if self.bonus:
            self.metric_names += ("entropy_coef",)
            self.entropy_coef, self.last_entropy = config.entropy_coef, float("inf")
            self._window = torch.zeros(2, dtype=torch.float64)
        # the loss reads log-probabilities at the sampling temperature (TRL's), those of the policy that sampled
        self.temperature = getattr(config, "sample_temperature", 0.0) or 1.0
        self._batch: Optional[tuple] = None  # (batch number, its rows, its scored answers): reused for mu steps
        self.answers: Dict[int, str] = {}  # the last validation's greedy answers, by held-out row (the final report's)
        # --log-completions: every process gathers its answers' lines to the first, which appends them to this file
        self.log_completions = False
        self.completions: Optional[Path] = None

    def units(self, item: Dict[str, torch.Tensor], step: Optional[int] = None) -> int:
        return 1

    def _text(self, ids: torch.Tensor) -> str:
        return self.decode(ids.tolist()).strip()

    def _answer_items(self, fabric: Any, model: nn.Module, items: List[Dict[str, torch.Tensor]], copies: int,
                      temperature: float, aligners: Any, generator: Optional[torch.Generator],
                      sampling: Optional[Dict[str, Any]] = None) -> List[List[Dict[str, torch.Tensor]]]:
        """Each item's group: `copies` answers of the model to its prompt, scored (reward, each function's, the
        advantage within the group)."""
        prompts = [it["prompt"] for it in items for _ in range(copies)]
        rooms = [self.max_seq_length - len(p) for p in prompts]
        if min(rooms) < 1:
            raise TrainError(f"a prompt of {len(prompts[rooms.index(min(rooms))])} tokens leaves no room for an answer "
                             f"under --max-seq-length {self.max_seq_length}; raise it")
        ends = [response_end(it["response"], self.end_id) for it in items for _ in range(copies)]
        answers, stopped = write_responses(fabric, model, prompts, rooms, ends, self.config.max_new_tokens,
                                           temperature, self.stop_ids, aligners, generator, **(sampling or {}))
        texts = [self._text(a) for a in answers]
        references = [self._text(it["response"]) for it in items for _ in range(copies)]
        scores = self.rewards([self._text(p) for p in prompts], texts, references, [len(a) for a in answers])
        total = torch.tensor(self.rewards.total(scores), dtype=torch.float32).view(len(items), copies)
        by_name = torch.tensor([scores[n] for n in self.rewards.names], dtype=torch.float32).T.reshape(
            len(items), copies, -1)
        advantages = torch.zeros_like(total)  # (one answer: no group)
        # a group without signal: its answers' totals tie (GDPO: every function's rewards do)
        zero_std = (total.max(-1).values == total.min(-1).values).float() * (copies > 1)
        if copies > 1 and self.config.multi_objective_aggregation == "normalize_then_sum":
            advantages = decoupled_advantages(fabric, by_name, self.rewards.weights)
            zero_std = (by_name.amax(1) == by_name.amin(1)).all(-1).float()
        elif copies > 1:
            scale = self.config.scale_rewards
            advantages = group_advantages(total, scale, batch_moments(fabric, total)[1] if scale == "batch" else None)
        truncated = torch.tensor([not s for s in stopped], dtype=torch.float32).view(len(items), copies)
        return [[{"prompt": it["prompt"], "response": answers[g * copies + c], "context": NO_CONTEXT,
                  "reward": total[g, c:c + 1], "rewards": by_name[g, c], "advantage": advantages[g, c:c + 1],
                  "zero_std": zero_std[g:g + 1], "truncated": truncated[g, c:c + 1]} for c in range(copies)]
                for g, it in enumerate(items)]

    def rollout(self, fabric: Any, model: nn.Module, items: Dict[int, Dict[str, torch.Tensor]],
                step: int) -> Dict[int, List[Dict[str, torch.Tensor]]]:
        """Every batch: each prompt's group of --num-generations sampled answers, scored; seeded by --seed, the
        batch's first step and the process (a resumed run samples the same). With --num-iterations mu the batch's
        answers serve its mu steps, the later ones each with its tokens' log-probabilities under the policy that
        sampled them: those of the batch's first step, where the policy has not moved yet (kept by `__call__`, so
        they cost no forward pass of their own)."""
        number = step // self.iterations
        if self._batch is not None and self._batch[:2] == (number, list(items)):
            return self._batch[2]
        rolled = self._sample(fabric, model, items, number * self.iterations)
        if self.iterations > 1:
            self._batch = (number, list(items), rolled)
            for k, it in enumerate(self._batch_answers()):  # (a micro-batch's rows name their answers: __call__)
                it["answer"] = torch.tensor([k])
        return rolled

    def _batch_answers(self) -> List[Dict[str, torch.Tensor]]:
        """The kept batch's answers, group by group: the order of their "answer" numbers."""
        return [it for g in self._batch[2].values() for it in g] if self._batch is not None else []

    def _sample(self, fabric: Any, model: nn.Module, items: Dict[int, Dict[str, torch.Tensor]],
                step: int) -> Dict[int, List[Dict[str, torch.Tensor]]]:
        device = model.tok_embeddings.weight.device
        rank = fabric.global_rank if fabric is not None else 0
        seed = random.Random(f"grpo:{self.seed}:{step}:{rank}").getrandbits(63)
        generator = torch.Generator(device=device).manual_seed(seed)
        keys = list(items)
        groups = self._answer_items(fabric, model, [items[k] for k in keys], self.config.num_generations,
                                    self.config.sample_temperature, None, generator, self.config.sampling())
        # each answer's loss x token_scale: 0 for an answer --mask-truncated-completions leaves out, else 1 or, under
        # dapo and cispo, answers / kept tokens (both the whole step's, on every process), which the engine's division
        # by the step's answers makes DAPO's mean over every kept answer token of the step
        answers = [it for g in groups for it in g]
        kept = [not (self.config.mask_truncated_completions and float(it["truncated"])) for it in answers]
        scale = 1.0
        if self.config.loss_type in TOKEN_MEAN_LOSSES:
            counts = torch.tensor([float(sum(len(it["response"]) for it, k in zip(answers, kept) if k)),
                                   float(len(answers))], dtype=torch.float64, device=device)
            if fabric is not None and fabric.world_size > 1:
                counts = fabric.all_reduce(counts, reduce_op="sum")
            scale = float(counts[1] / counts[0].clamp(min=1))
        for it, k in zip(answers, kept):
            it["token_scale"] = torch.tensor([scale if k else 0.0])
        if self.log_completions:
            self._log_completions(fabric, step + 1, answers)
        return dict(zip(keys, groups))

    def _log_completions(self, fabric: Any, step: int, answers: List[Dict[str, torch.Tensor]]) -> None:
        """Appends a step's answers to --log-completions' file, a JSON object each (step as metrics.csv counts it),
        every process's in process order (TRL gathers them too)."""
        lines = [json.dumps({"step": step, "prompt": self._text(it["prompt"]), "completion": self._text(it["response"]),
                             "tokens": len(it["response"]), "truncated": bool(it["truncated"]),
                             "reward": float(it["reward"]),
                             "rewards": dict(zip(self.rewards.names, it["rewards"].tolist())),
                             "advantage": float(it["advantage"])}, ensure_ascii=False) + "\n" for it in answers]
        if fabric is not None and fabric.world_size > 1:
            import torch.distributed as dist

            parts: List[Any] = [None] * fabric.world_size
            dist.all_gather_object(parts, lines)
            lines = [line for part in parts for line in part]
        if self.completions is not None:  # (the first process's)
            with open(self.completions, "a", encoding="utf-8") as f:
                f.writelines(lines)

    def answer(self, fabric: Any, model: nn.Module, dataset: Any,
               indices: Sequence[int]) -> Dict[int, Dict[str, torch.Tensor]]:
        """Validation: each held-out prompt's greedy answer by the policy (this objective's `aligner`), scored."""
        keys, out = list(dict.fromkeys(indices)), {}
        for s in range(0, len(keys), 32):  # generation batches (the scoring passes keep the run's micro-batches)
            part = keys[s:s + 32]
            groups = self._answer_items(fabric, model, [dataset[k] for k in part], 1, 0.0, self.aligner, None)
            out.update({k: g[0] for k, g in zip(part, groups)})
        self.answers = {k: self._text(it["response"]) for k, it in out.items()}
        return out

    def collate(self, items: Sequence[Dict[str, torch.Tensor]], step: Optional[int] = None) -> Batch:
        batch = super().collate(items, step)
        for name in SCORES + (("token_scale",) if "token_scale" in items[0] else ()):  # (training answers have it)
            batch[name] = torch.stack([it[name] for it in items])
        if "answer" in items[0]:
            batch["answer"] = torch.stack([it["answer"] for it in items])
        if "old_logps" in items[0]:  # every scored token's, row by row: the order of the loss's log-probabilities
            batch["old_logps"] = torch.cat([it["old_logps"] for it in items])
        return batch

    def __call__(self, model: nn.Module, batch: Batch) -> Dict[str, torch.Tensor]:
        length = (batch["labels"][:, 1:] != -100).sum().float()
        out = {"reward": batch["reward"].sum(), "length": length, "truncated": batch["truncated"].sum()}
        out.update({f"reward_{n}": batch["rewards"][:, i].sum() for i, n in enumerate(self.rewards.names)})
        if not model.training:  # validation: greedy answers, scored by their reward alone
            return {**out, "loss": -out["reward"]}
        out["zero_std"] = batch["zero_std"].sum()
        hidden = self._hidden(model, batch["input_ids"], self.aligner)
        ref = None
        if self.config.beta > 0:
            with torch.no_grad():
                ref = self._hidden(model, batch["input_ids"], self.reference)
        scale = batch["token_scale"][:, 0]
        terms = grpo_loss(hidden, model.lm_head_weight, batch["labels"], batch["advantage"][:, 0], ref,
                          chunk_size=self.chunk_size, old_logps=batch.get("old_logps"), kept=scale > 0,
                          gather=self._every_process, **self.config.loss_settings())
        if "answer" in batch and "old_logps" not in batch:
            # a batch's first step: the sampling policy's log-probs, kept with each answer for the later steps
            rows, answers = (batch["labels"][:, 1:] != -100).sum(-1).tolist(), self._batch_answers()
            for k, lp in zip(batch["answer"][:, 0].tolist(), terms.logps.float().cpu().split(rows)):
                answers[k]["old_logps"] = lp
        if "clip_ratio" in self.metric_names:
            out["clip_ratio"] = terms.held.sum()
        loss = (terms.loss * scale.to(terms.loss)).sum()
        if self.config.loss_type == "bnpo":  # the mean over the micro-batch's kept answer tokens, x its answers
            tokens = ((batch["labels"][:, 1:] != -100).sum(-1) * (scale > 0)).sum().clamp(min=1)
            loss = loss / tokens.to(loss) * len(scale)
        if self.bonus:
            # TRL's bonus: less coef x the micro-batch's mean entropy over the tokens the policy term keeps (of the
            # answers the loss keeps), weighed by its answers as the engine weighs every micro-batch's terms
            coef = self.entropy_coef if self.last_entropy <= self.config.entropy_target or not \
                self.config.use_adaptive_entropy else 0.0
            keep = (scale > 0).to(terms.bonus)
            sums = torch.stack([(terms.bonus * keep).sum(), (terms.bonus_tokens * keep).sum()])
            loss = loss - coef * sums[0] / sums[1].clamp(min=1.0) * len(scale)
            if self.config.use_adaptive_entropy:  # the control's: this step's, over every token
                self._window += sums.detach().double().cpu()
            out["entropy_coef"] = torch.tensor(coef * len(scale))  # (its mean over the step's answers: coef)
        return {**out, "loss": loss, "kl": terms.kl.sum(), "entropy": terms.entropy.sum()}

    def _every_process(self, x: torch.Tensor) -> torch.Tensor:
        """This process's values (n,) -> every process's, concatenated (the top-entropy quantile's pool, which TRL
        gathers): every process runs as many training micro-batches, in step."""
        fabric = self.fabric
        if fabric is None or fabric.world_size == 1:
            return x
        sizes = fabric.all_gather(torch.tensor([x.numel()], device=x.device)).flatten().tolist()
        padded = torch.cat([x, x.new_zeros(max(sizes) - x.numel())])
        gathered = fabric.all_gather(padded).view(len(sizes), -1)
        return torch.cat([row[:n] for row, n in zip(gathered, sizes)])

    def after_step(self, step: int, aligner: nn.Module) -> None:
        """--use-adaptive-entropy: the coefficient for the next step, from this one's mean entropy over the kept tokens
        of every process (Skywork-OR1's control, as TRL updates it)."""
        super().after_step(step, aligner)
        if not (self.bonus and self.config.use_adaptive_entropy):
            return
        window, self._window = self._window, torch.zeros(2, dtype=torch.float64)
        fabric = self.fabric
        if fabric is not None and fabric.world_size > 1:
            window = fabric.all_reduce(window.to(fabric.device), reduce_op="sum").cpu()
        c = self.config
        self.last_entropy = float(window[0] / window[1].clamp(min=1.0))
        step_size = c.entropy_coef_delta if self.last_entropy <= c.entropy_target else -c.entropy_coef_delta
        self.entropy_coef = min(max(self.entropy_coef + step_size, c.entropy_coef_min), c.entropy_coef_max)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        state = super().state_dict()
        if self.bonus:
            state.update(entropy_coef=torch.tensor(self.entropy_coef, dtype=torch.float64),
                         last_entropy=torch.tensor(self.last_entropy, dtype=torch.float64))
        return state

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        if self.bonus and "entropy_coef" in state:
            self.entropy_coef, self.last_entropy = float(state["entropy_coef"]), float(state["last_entropy"])

    def _hidden(self, model: nn.Module, input_ids: torch.Tensor, aligner: Any) -> torch.Tensor:
        """The final hidden states over the sampling temperature: their logits are those of the sampled distribution."""
        hidden = model(input_ids, aligner=aligner, return_hidden=True)
        return hidden if self.temperature == 1.0 else hidden / self.temperature

    @classmethod
    def data_arguments(cls, cfg: Any) -> Dict[str, Any]:
        return {"prompt_only": True}  # every answer is the student's; a row's own answer is only a reference

    @classmethod
    def from_run(cls, cfg: Any, run: Any) -> "GRPO":
        from lit_aligner.data.tokenize import end_token
        from lit_aligner.prompts import get_template
        reference, desc = False, "none"
        if cfg.grpo.beta > 0:  # (taken before training or a resumed state moves the init Aligner)
            reference, desc = run_reference(cfg, run)
        objective = cls(run.tokenizer.pad_id, lambda ids: run.tokenizer.decode(ids, skip_special=True), cfg.grpo,
                        cfg.train.chunk_size, cfg.data_options.max_seq_length, run.tokenizer.stop_ids,
                        cfg.train.seed, end_token(get_template(run.template), run.tokenizer), reference, desc)
        for info in (run.info, run.info.get("val_info") or {}):
            objective.check_references(info, cfg.data)
        objective.follow_sync(cfg)
        objective.log_completions = cfg.log_completions
        if cfg.log_completions and run.fabric.global_rank == 0:
            objective.completions = keep_completions(run.out_dir / "completions.jsonl",
                                                     int(run.state["step"]) if run.state is not None else 0)
        return objective

    def check_references(self, info: Dict[str, Any], data: Any) -> None:
        """Refuses prompt-only rows (data `info`) when a reward reads the rows' reference answers."""
        if self.rewards.needs_references and info.get("format") == "prompt_only":
            raise TrainError(f"{data}: the answer reward compares each answer with its row's reference answer, and "
                             f"prompt-only rows have none: give rows with answers (e.g. prompt/response or GSM8K's "
                             f"question/answer), or other --rewards")

    def metadata(self) -> Dict[str, Any]:
        reference = {"reference": self.reference_desc} if self.config.beta > 0 else {}
        return {"grpo": {**self.config.settings(), **reference, **self.sync_metadata()}}

    def final_report(self, cfg: Any, run: Any, result: Any) -> Optional[Dict[str, Any]]:
        """The held-out reward of the bare base's greedy answers, of the --init-aligner's when the run started from one
        (GRPO on top of SFT must be judged against SFT), and of the trained Aligner's: each reward function's, the
        answers' lengths, and (with --compare; default: on the default dataset) three answers side by side."""
        from lit_aligner.training.state import is_sharded

        if run.fabric.global_rank != 0 or not len(run.val) or is_sharded(run.fabric):
            return None
        from lit_aligner.evaluation import figures_line, prompt_question

        before, init, after = self.heldout_before_after(cfg, run, result)
        report = {"val_rows": len(run.val), "before": before, "after": after}
        systems = [("base", False, before), ("with Aligner", run.model.aligner, after)]
        if init is not None:
            report["init"] = init
            systems.insert(1, ("init Aligner", run.start, init))

        def line(label: str, key: str, fmt: str) -> str:
            return label + figures_line([(name, m[key]) for name, _, m in systems], fmt)

        title = f"=== held-out reward of greedy answers ({len(run.val)} prompts) ==="
        lines = ["", title, line("reward:   ", "reward", ".4f")]
        lines += [line(f"  {n}: ", "reward_" + n, ".4f") for n in self.rewards.names if len(self.rewards.names) > 1]
        lines.append(line("answer tokens: ", "length", ".1f"))
        lines.append(line("cut short at --max-new-tokens: ", "truncated", ".1%"))
        compare = cfg.compare if cfg.compare is not None else cfg.data is None
        if compare:
            rows = range(min(3, len(run.val)))
            shown: Dict[str, Dict[int, Any]] = {}
            with run.fabric.autocast():
                for name, aligner, _ in systems:
                    scorer = self.with_aligner(aligner)
                    scored = scorer.answer(run.fabric, run.model, run.val, rows)
                    shown[name] = {i: (scorer.answers[i], float(scored[i]["reward"])) for i in rows}
            for i in rows:
                lines.append(f"--- sample {i + 1}: {prompt_question(self._text(run.val[i]['prompt']))}")
                lines += [f"  {name} (reward {shown[name][i][1]:g}): {shown[name][i][0]!r}" for name in shown]
            report["answers"] = {name: [shown[name][i][0] for i in rows] for name in shown}
        run.fabric.print("\n".join(lines))
        return report
