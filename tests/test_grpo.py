"""GRPO into an Aligner (finetune/aligner_grpo.py): advantages and loss against TRL's GRPOTrainer formulas, the reward
functions, rollouts against an independent decoder, a run whose reward really rises, resume and the CLI's errors."""

import dataclasses
import json

import pytest
import torch

import helpers
from lit_aligner.aligner_files import load_aligner
from lit_aligner.config import Config
from lit_aligner.data import DataOptions, TokenizedDataset
from lit_aligner.data.dataset import NO_CONTEXT
from lit_aligner.losses import grpo_loss
from lit_aligner.model import AlignerConfig, LLaMA, init_weights
from lit_aligner.rewards import RewardError, Rewards, gives_answer, reference_answer
from lit_aligner.training import GRPOConfig, GRPORunConfig, TrainError
from lit_aligner.training.objectives.grpo import GRPO, batch_moments, decoupled_advantages, group_advantages
from lit_aligner.training.plot import read_metrics


def test_group_advantages_are_trls():
    from trl.trainer.utils import nanstd

    g = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 3, (6, 8), generator=g).float()
    rewards[2] = 1.0  # a group whose answers all score alike: no signal, advantage 0
    flat = rewards.view(-1)  # TRL's computation (GRPOTrainer, scale_rewards="group"), on its flat batch
    mean = rewards.view(-1, 8).mean(1).repeat_interleave(8)
    std = nanstd(rewards.view(-1, 8), dim=1).repeat_interleave(8)
    assert torch.allclose(group_advantages(rewards).view(-1), (flat - mean) / (std + 1e-4), atol=1e-6)
    assert torch.allclose(group_advantages(rewards, "none").view(-1), flat - mean)  # scale_rewards="none"
    assert torch.equal(group_advantages(rewards)[2], torch.zeros(8))
    # scale_rewards="batch": the group's mean, the whole batch's standard deviation
    theirs = (flat - mean) / (nanstd(flat) + 1e-4)
    assert torch.allclose(group_advantages(rewards, "batch").view(-1), theirs, atol=1e-6)
    assert torch.allclose(group_advantages(rewards, "batch", batch_moments(None, rewards)[1]).view(-1), theirs,
                          atol=1e-6)


def test_the_batch_mean_and_standard_deviation_span_every_process():
    # TRL gathers the rewards of every process before it scales; here the other process holds the last 3 groups
    from types import SimpleNamespace

    from trl.trainer.utils import nanstd

    rewards = torch.rand(5, 4, generator=torch.Generator().manual_seed(2))
    theirs = rewards[2:].double().flatten()
    other = torch.stack([theirs.new_tensor(float(theirs.numel())), theirs.sum(), (theirs * theirs).sum()])
    fabric = SimpleNamespace(world_size=2, device=torch.device("cpu"), all_reduce=lambda t, reduce_op: t + other)
    mean, std = batch_moments(fabric, rewards[:2])
    assert float(std) == pytest.approx(float(nanstd(rewards.flatten())), rel=1e-6)
    assert float(mean) == pytest.approx(float(rewards.mean()), rel=1e-6)
    mean, std = batch_moments(None, rewards[:2])
    assert float(std) == pytest.approx(float(nanstd(rewards[:2].flatten())), rel=1e-6)
    assert float(mean) == pytest.approx(float(rewards[:2].mean()), rel=1e-6)


def test_decoupled_advantages_are_trls_normalize_then_sum():
    """GDPO: TRL's computation (GRPOTrainer, multi_objective_aggregation="normalize_then_sum") on its flat batch of
    rewards per function; two functions whose sum ties within a group still give it signal."""
    from trl.trainer.utils import nanstd

    g = torch.Generator().manual_seed(6)
    rewards = torch.stack([torch.randint(0, 2, (5, 4), generator=g).float(),  # a 0/1 check
                           10 * torch.rand(5, 4, generator=g)], -1)  # a wide-ranged score
    rewards[1, :, 0] = torch.tensor([0.0, 1.0, 1.0, 0.0])
    rewards[1, :, 1] = 2 * (1.0 - rewards[1, :, 0])  # group 1: the two functions disagree, their weighted totals tie
    rewards[3] = 0.5  # group 3: no function tells its answers apart
    weights = [1.0, 0.5]
    grouped = rewards.view(-1, 4, 2)  # TRL's lines, on rewards_per_func (B*G, K)
    mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
    std_k = nanstd(grouped, dim=1, keepdim=True)
    reward_k = ((grouped - mean_k) / (std_k + 1e-4)).view(-1, 2)
    summed = (reward_k * torch.tensor(weights).unsqueeze(0)).nansum(dim=1)
    theirs = (summed - torch.nanmean(summed)) / (nanstd(summed).expand_as(summed) + 1e-4)
    ours = decoupled_advantages(None, rewards, weights)
    assert torch.allclose(ours.view(-1), theirs, atol=1e-5)
    plain = group_advantages((rewards * torch.tensor(weights)).sum(-1))
    assert float(plain[1].abs().max()) == 0 and float(ours[1].abs().max()) > 0.5
    assert float(ours[3].abs().max()) < 1e-5


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("chunk_size", [0, 3])
@pytest.mark.parametrize("old", [False, True])
def test_grpo_loss_is_trls_with_its_gradient(beta, chunk_size, old):
    """old: the log-probs of a sampling policy a few steps back (--num-iterations > 1), far enough that the clipping
    holds some tokens (DAPO's clip-higher: a wider upper bound); else the ratio is 1."""
    g = torch.Generator().manual_seed(1)
    B, T, C, V = 3, 7, 8, 11
    hidden = torch.randn(B, T, C, generator=g, requires_grad=True)
    ref_hidden = torch.randn(B, T, C, generator=g)
    weight = torch.randn(V, C, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :2] = -100  # the prompts
    labels[1, 5:] = -100  # padding
    advantages = torch.tensor([1.5, -0.5, -1.0])
    low, high = 0.2, 0.28 if old else 0.2
    mask = (labels[:, 1:] != -100).float()

    def logps(h):
        lp = torch.log_softmax((h @ weight.T)[:, :-1], -1)
        return lp.gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0]

    old_lp = (logps(hidden) + 0.4 * torch.randn(B, T - 1, generator=g)).detach() if old else None
    loss, kl, held, *_ = grpo_loss(hidden, weight, labels, advantages, ref_hidden if beta else None, beta, chunk_size,
                                  old_logps=old_lp[mask.bool()] if old else None, epsilon_low=low, epsilon_high=high)
    loss.sum().backward()
    ours = hidden.grad.clone()
    hidden.grad = None

    # TRL's GRPOTrainer._compute_loss (loss_type "grpo"; num_iterations 1: old log-probs = the detached ones), on
    # per-token log-probs from whole logits
    lp = logps(hidden)
    coef_1 = torch.exp(lp - (old_lp if old else lp.detach()))
    coef_2 = torch.clamp(coef_1, 1 - low, 1 + high)
    per_token = -torch.min(coef_1 * advantages[:, None], coef_2 * advantages[:, None])
    region = ((coef_1 < 1 - low) & (advantages[:, None] < 0)) | ((coef_1 > 1 + high) & (advantages[:, None] > 0))
    assert torch.allclose(held, (region.float() * mask).sum(-1) / mask.sum(-1))
    assert (held.sum() > 0) == old  # (the noise puts some tokens outside the bounds)
    ref_lp = logps(ref_hidden)
    per_token_kl = torch.exp(ref_lp - lp) - (ref_lp - lp) - 1
    if beta:
        per_token = per_token + beta * per_token_kl
    theirs = (per_token * mask).sum(-1) / mask.sum(-1)
    theirs.sum().backward()
    assert torch.allclose(loss, theirs.detach(), atol=1e-5)
    assert torch.allclose(ours, hidden.grad, atol=1e-5)
    if beta:
        assert torch.allclose(kl, ((per_token_kl * mask).sum(-1) / mask.sum(-1)).detach(), atol=1e-5)
    else:
        assert torch.equal(kl, torch.zeros(B))
    # the gradient is the policy gradient: -A x the mean of grad log p over each answer's tokens
    if not beta and not old:
        hidden.grad = None
        (-(advantages[:, None] * logps(hidden) * mask).sum(-1) / mask.sum(-1)).sum().backward()
        assert torch.allclose(ours, hidden.grad, atol=1e-5)


def _trls_compute_loss(settings, hidden, ref_hidden, weight, prompt, completions, mask, advantages, old_lp,
                       temperature):
    """TRL's own GRPOTrainer._compute_loss (the installed trl's code, not a copy) on a stand-in trainer whose model
    gives per-token log-probabilities and entropies of the logits hidden @ weight.T over the sampling temperature, as
    TRL's `_get_per_token_logps_and_entropies` does. Returns (loss, its gradient on hidden, TRL's metrics)."""
    from collections import defaultdict
    from types import MethodType, SimpleNamespace

    from trl.trainer.grpo_trainer import GRPOTrainer
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    P, Tc = prompt, completions.shape[1]

    def per_token(h):  # the completion's positions: logits at P-1 .. P+Tc-2 predict its tokens
        logits = (h @ weight.T)[:, P - 1:P - 1 + Tc] / temperature
        return selective_log_softmax(logits, completions), entropy_from_logits(logits)

    ident = lambda x, **kw: x  # noqa: E731  (one process)
    trainer = SimpleNamespace(
        loss_type=settings["loss_type"], importance_sampling_level=settings["importance_sampling_level"],
        epsilon_low=settings["epsilon_low"], epsilon_high=settings["epsilon_high"], beta=settings["beta"],
        top_entropy_quantile=settings["top_entropy_quantile"], max_completion_length=settings["max_completion_length"],
        off_policy_mask_threshold=settings["off_policy_mask_threshold"], use_vllm=False,
        vllm_importance_sampling_correction=False,
        aux_loss_enabled=False, _entropy_bonus_enabled=bool(settings["entropy_coef"]),
        entropy_coef=settings["entropy_coef"], use_adaptive_entropy=False, current_gradient_accumulation_steps=1,
        model=SimpleNamespace(training=True), _metrics={"train": defaultdict(list)},
        args=SimpleNamespace(delta=settings["delta"], use_bias_correction_kl=settings["use_bias_correction_kl"],
                             steps_per_generation=1,
                             sapo_temperature_pos=settings["sapo_temperatures"][0],
                             sapo_temperature_neg=settings["sapo_temperatures"][1],
                             **dict(zip(("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"),
                                        settings["vespo_params"]))),
        accelerator=SimpleNamespace(num_processes=1, gather=ident, gather_for_metrics=ident, sync_gradients=True,
                                    pad_across_processes=ident, reduce=ident))
    trainer.get_high_entropy_mask = MethodType(GRPOTrainer.get_high_entropy_mask, trainer)
    trainer.get_off_policy_mask = GRPOTrainer.get_off_policy_mask  # (static methods)
    trainer.get_gamma_weights = GRPOTrainer.get_gamma_weights
    trainer._get_per_token_logps_and_entropies = lambda model, *a, **kw: (*per_token(hidden), None)
    B = completions.shape[0]
    inputs = {"prompt_ids": torch.zeros(B, P, dtype=torch.long), "prompt_mask": torch.ones(B, P, dtype=torch.long),
              "completion_ids": completions, "completion_mask": mask.long(), "advantages": advantages,
              "num_items_in_batch": mask.sum()}
    if old_lp is not None:
        inputs["old_per_token_logps"] = old_lp
    if settings["beta"]:
        inputs["ref_per_token_logps"] = per_token(ref_hidden)[0].detach()
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    grad, = torch.autograd.grad(loss, hidden)
    return loss.detach(), grad, {k: v[0] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("loss_type, level, old, extra", [
    ("grpo", "token", True, {"beta": 0.04, "temperature": 0.7}),
    ("grpo", "sequence", True, {"epsilon_low": 0.02, "epsilon_high": 0.03}),  # (GSPO's bounds, at this noise)
    ("dapo", "token", True, {"delta": 1.3, "top_entropy_quantile": 0.5, "advantages": [-1.2, 0.7, -0.4, -0.9]}),
    ("dr_grpo", "sequence", True, {"epsilon_low": 0.02, "epsilon_high": 0.03}),
    ("cispo", "token", True, {"epsilon_high": 1.1}),
    ("cispo", "sequence", True, {"epsilon_high": 1.0, "beta": 0.04}),
    ("sapo", "token", True, {"beta": 0.04, "sapo_temperatures": (1.0, 1.05)}),
    ("sapo", "sequence", False, {"sapo_temperatures": (0.5, 2.0), "temperature": 1.3}),
    ("luspo", "sequence", True, {"epsilon_low": 0.02, "epsilon_high": 0.03}),
    ("grpo", "token", False, {"top_entropy_quantile": 0.2}),
    ("grpo", "token", True, {"off_policy_mask_threshold": 0.1, "advantages": [-1.2, 0.7, -0.4, -0.9], "beta": 0.04}),
    ("dapo", "sequence", True, {"off_policy_mask_threshold": 0.1, "advantages": [-1.2, 0.7, -0.4, -0.9],
                                "epsilon_high": 0.1}),
    ("grpo", "token", True, {"entropy_coef": 0.3, "temperature": 0.7}),
    ("dapo", "token", False, {"entropy_coef": 0.3, "top_entropy_quantile": 0.5}),
    ("bnpo", "token", True, {"epsilon_high": 0.28}),
    ("vespo", "token", True, {"advantages": [-1.2, 0.7, -0.4, -0.9]}),
    ("vespo", "token", True, {"vespo_params": (1.0, 0.5, 4.0, 1.5), "beta": 0.04}),
    ("grpo", "token", True, {"beta": 0.3, "use_bias_correction_kl": True}),
    ("grpo", "token", False, {"beta": 0.3, "use_bias_correction_kl": True}),  # (the ratio is 1, its gradient not)
    ("dapo", "sequence", True, {"beta": 0.3, "use_bias_correction_kl": True, "epsilon_high": 0.1}),
])
def test_every_loss_type_and_ratio_level_is_trls_own_loss(loss_type, level, old, extra):
    """Value, gradient, the clipped share and the entropy against the installed TRL's GRPOTrainer._compute_loss itself,
    for each loss type (GSPO's sequence-level ratio, CISPO, SAPO, LUSPO, INTELLECT-2's delta, the top-entropy tokens,
    the KL, a sampling temperature, DeepSeek-V3.2's off-policy mask, the entropy bonus), with old log-probs of a
    policy a few steps back (--num-iterations > 1) or none."""
    g = torch.Generator().manual_seed(3)
    B, P, Tc, C, V = 4, 3, 6, 8, 11
    extra = dict(extra)
    temperature = extra.pop("temperature", 1.0)
    advantages = extra.pop("advantages", [1.2, 0.7, 0.4, -0.9])
    settings = {"loss_type": loss_type, "importance_sampling_level": level, "epsilon_low": 0.2, "epsilon_high": 0.2,
                "delta": None, "sapo_temperatures": (1.0, 1.05), "top_entropy_quantile": 1.0, "beta": 0.0,
                "off_policy_mask_threshold": None, "entropy_coef": 0.0, "max_completion_length": Tc,
                "vespo_params": (2.0, 3.0, 3.0, 2.0), "use_bias_correction_kl": False, **extra}
    hidden = torch.randn(B, P + Tc, C, generator=g, requires_grad=True)
    ref_hidden = hidden.detach() + 0.3 * torch.randn(B, P + Tc, C, generator=g)  # (a reference near the policy)
    weight = torch.randn(V, C, generator=g)
    completions = torch.randint(0, V, (B, Tc), generator=g)
    mask = torch.ones(B, Tc, dtype=torch.bool)
    mask[1, 4:] = mask[3, 2:] = False  # answers of 6, 4, 6 and 2 tokens
    advantages = torch.tensor(advantages)
    labels = torch.full((B, P + Tc), -100)
    labels[:, P:] = torch.where(mask, completions, -100)
    with torch.no_grad():
        lp = torch.log_softmax((hidden @ weight.T)[:, P - 1:-1] / temperature, -1).gather(-1, completions[..., None])
    old_lp = (lp[..., 0] + 0.4 * torch.randn(B, Tc, generator=g)) if old else None

    theirs, their_grad, metrics = _trls_compute_loss(settings, hidden, ref_hidden, weight, P, completions, mask,
                                                     advantages, old_lp, temperature)
    given = {k: v for k, v in settings.items() if k != "entropy_coef"}  # (the bonus is the objective's: below)
    ours, kl, held, entropy, _, bonus, bonus_tokens = grpo_loss(
        hidden / temperature, weight, labels, advantages, ref_hidden / temperature if settings["beta"] else None,
        chunk_size=3, old_logps=old_lp[mask] if old else None, entropy_grad=bool(settings["entropy_coef"]), **given)
    count = mask.sum(-1).float()
    step_loss = lambda x: x.sum() / count.sum() if loss_type in ("dapo", "bnpo", "cispo", "vespo") else x.mean()  # noqa
    value = step_loss(ours)
    value = value - settings["entropy_coef"] * bonus.sum() / bonus_tokens.sum()  # the mean over the tokens it keeps
    value.backward()
    assert float(value.detach()) == pytest.approx(float(theirs), rel=1e-5, abs=1e-6)
    assert torch.allclose(hidden.grad, their_grad, rtol=1e-4, atol=1e-6)
    assert float(their_grad.abs().sum()) > 0
    # the metrics: TRL's are means over every token (over answers at the sequence level), ours each answer's share
    if level == "token":
        per = lambda x: float((x * count).sum() / count.sum())  # noqa: E731
    else:
        per = lambda x: float(x.mean())  # noqa: E731
    assert float((entropy * count).sum() / count.sum()) == pytest.approx(metrics["entropy"], abs=1e-5)
    if loss_type == "cispo":
        assert per(held) == pytest.approx(metrics["cispo_clip_ratio"], abs=1e-6)
    elif loss_type not in ("sapo", "vespo"):
        assert per(held) == pytest.approx(metrics["clip_ratio/region_mean"], abs=1e-6)
    if old and loss_type not in ("sapo", "vespo"):
        assert float(held.sum()) > 0  # (the noise puts some tokens, or answers, outside the bounds)
    if settings["off_policy_mask_threshold"] is not None:  # the mask left some answers out, not all
        def policy_term(threshold):
            return grpo_loss(hidden.detach() / temperature, weight, labels, advantages, None, chunk_size=3,
                             old_logps=old_lp[mask], **{**given, "off_policy_mask_threshold": threshold}).loss

        dropped = policy_term(settings["off_policy_mask_threshold"]) != policy_term(None)
        assert 0 < int(dropped.sum()) < int((advantages < 0).sum()), dropped
    if settings["use_bias_correction_kl"]:  # it moves the KL's gradient, even where the ratio is 1
        h = hidden.detach().requires_grad_()
        plain = grpo_loss(h / temperature, weight, labels, advantages, ref_hidden / temperature, chunk_size=3,
                          old_logps=old_lp[mask] if old else None, **{**given, "use_bias_correction_kl": False})
        step_loss(plain.loss).backward()
        assert not torch.allclose(h.grad, hidden.grad, atol=1e-4)
    if settings["beta"]:
        assert per(kl) == pytest.approx(metrics["kl"], abs=1e-5) if level == "token" else float(kl.sum()) > 0


def test_the_top_entropy_quantile_is_taken_over_every_processs_tokens():
    # TRL gathers the entropies of every process's forward pass before it takes the quantile: here the other process
    # holds 5 tokens of high entropy, which raise the cut, so fewer of this process's tokens keep their gradient
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, 8, 8, generator=g)
    weight = torch.randn(11, 8, generator=g)
    labels = torch.randint(0, 11, (2, 8), generator=g)
    labels[:, :2] = -100
    other = torch.full((5,), 5.0)  # (above any entropy over 11 tokens: log 11 = 2.4)

    def gathered(x):  # a stand-in for Fabric's all_gather over 2 processes (this one first): the sizes, the values
        theirs = torch.tensor([len(other)]) if x.dtype == torch.long else torch.cat([other, other.new_zeros(7)])
        return torch.stack([x, theirs])

    objective = GRPO(0, _decode, GRPOConfig(rewards=["concise"]))
    objective.fabric = SimpleNamespace(world_size=2, all_gather=gathered)
    pool = torch.rand(12, generator=g)
    assert torch.equal(objective._every_process(pool), torch.cat([pool, other]))

    def kept_tokens(gather):
        h = hidden.clone().requires_grad_()
        loss = grpo_loss(h, weight, labels, torch.tensor([1.0, -1.0]), top_entropy_quantile=0.5, gather=gather)
        loss.loss.sum().backward()
        return int((h.grad[:, 1:-1].abs().sum(-1) > 0).sum())  # positions whose next token keeps a gradient

    alone, together = kept_tokens(None), kept_tokens(objective._every_process)
    assert alone == 6 and together == 4  # the top half of our 12 tokens; of all 17, the 9th and above: 5 theirs


def test_the_top_entropy_tokens_are_drawn_from_the_answers_the_loss_keeps():
    # --mask-truncated-completions: a left-out answer's tokens do not count for the quantile (TRL's mask zeroes them)
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, 10, 8, generator=g)
    hidden[1] *= 3  # (the other answer's distributions are sharper: its tokens move the cut)
    weight = torch.randn(11, 8, generator=g)
    labels = torch.randint(0, 11, (2, 10), generator=g)
    labels[:, :2] = -100
    advantages = torch.tensor([1.0, -1.0])

    def first_grad(h, labels, advantages, **kw):  # the gradient of the first answer's loss on its hidden states
        h = h.clone().requires_grad_()
        loss = grpo_loss(h, weight, labels, advantages, top_entropy_quantile=0.5, **kw)
        return torch.autograd.grad(loss.loss[0], h)[0][0]

    kept = first_grad(hidden, labels, advantages, kept=torch.tensor([True, False]))
    assert torch.allclose(kept, first_grad(hidden[:1], labels[:1], advantages[:1]), atol=1e-6)
    assert not torch.allclose(kept, first_grad(hidden, labels, advantages), atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# Reward functions


@pytest.mark.parametrize("completion, reference, right", [
    ("11 * 4 = 44", "ANSWER: 44\nEND OF ANSWER", True),  # the default dataset's format: its answer
    ("11 * 4 = 42, not 44... no: 42", "ANSWER: 44\nEND OF ANSWER", False),  # a number: the last one counts
    ("The total is 1,234 dollars.", "She pays 1234 in all.\n#### 1234", True),  # GSM8K: after ####; commas ignored
    ("It is 12.0", "12", True),
    ("It is 120", "12", False),
    ("The month before August is July.", "July", True),
    ("The month before August is june", "July", False),
    ("Julys are warm", "July", False),  # a whole phrase, not part of a word
    ("Sorted: a,  C, z.", "a, c, z", True),  # case and runs of white space ignored
    ("nothing", "", False),
])
def test_the_answer_reward_reads_the_reference_answer(completion, reference, right):
    assert gives_answer(completion, reference) is right


def test_reference_answers():
    assert reference_answer("ANSWER: tac\nEND OF ANSWER") == "tac"
    assert reference_answer("Step one.\n#### 72 ") == "72"
    assert reference_answer("  plain text ") == "plain text"


def test_rewards_are_weighed_and_a_users_trl_style_function_runs(tmp_path):
    (tmp_path / "my_rewards.py").write_text(
        "def mentions_reference(prompts, completions, **kwargs):\n"
        "    refs = kwargs['references']\n"
        "    return [float(r in c) + 0.5 * len(p) / 100 for p, c, r in zip(prompts, completions, refs)]\n")
    rewards = Rewards(["answer", "concise", f"{tmp_path / 'my_rewards.py'}:mentions_reference", "regex:^ANSWER"],
                      [1.0, 0.5, 2.0, 1.0], max_new_tokens=10)
    scores = rewards(["q" * 10, "q" * 20], ["ANSWER: 7\nEND OF ANSWER", "it is 8"], ["7", "9"], [4, 10])
    assert scores == {"answer": [1.0, 0.0], "concise": [0.6, 0.0], "mentions_reference": [1.05, 0.1],
                      "regex": [1.0, 0.0]}  # (metrics: reward_<name>)
    assert rewards.total(scores) == pytest.approx([1 + 0.3 + 2.1 + 1, 0.2])
    assert Rewards(["format"])([""], ["ANSWER: 3\nEND OF ANSWER"], [""], [5]) == {"format": [1.0]}


def test_reward_names_are_short_and_distinct():
    from lit_aligner.rewards import reward_names

    assert reward_names(["answer", "regex:a+", "regex:b", "my.py:score", "pkg.mod:score"]) == [
        "answer", "regex", "regex_2", "score", "score_2"]


@pytest.mark.parametrize("names, weights, match", [
    ([], None, "at least one reward function"),
    (["answer", "concise"], [1.0], "one per reward function"),
    (["regex:(unclosed"], None, "not a regular expression"),
    (["no_such_reward"], None, "not a reward function"),
    (["missing.py:f"], None, "no such file missing.py"),
    (["no_such_module_xyz:f"], None, "cannot import no_such_module_xyz"),
    (["json:no_such_function"], None, "has no function 'no_such_function'"),
])
def test_bad_reward_flags_are_one_clear_error(names, weights, match):
    with pytest.raises(RewardError, match=match):
        Rewards(names, weights)


def test_a_reward_function_that_returns_the_wrong_thing_is_named(tmp_path):
    (tmp_path / "bad.py").write_text("def short(prompts, completions, **kw):\n    return [1.0]\n"
                                     "def nan(prompts, completions, **kw):\n    return [float('nan')] * 2\n"
                                     "def boom(prompts, completions, **kw):\n    raise KeyError('solution')\n")
    for name, match in (("short", "one finite number per completion"), ("nan", "one finite number"),
                        ("boom", "failed: KeyError")):
        spec = f"{tmp_path / 'bad.py'}:{name}"
        with pytest.raises(RewardError, match=f"reward function {spec}.*{match}"):
            Rewards([spec])(["p", "p"], ["a", "b"], ["r", "r"], [1, 1])


# ---------------------------------------------------------------------------------------------------------------------
# Rollouts: each prompt's group of the student's own answers, scored


def _tiny_model():
    torch.manual_seed(0)
    model = LLaMA(Config.from_name("tiny"), AlignerConfig(3, 1))
    init_weights(model, std=0.1)
    with torch.no_grad():
        model.aligner.gate.normal_()  # a trained Aligner: the answers must be the student's
    return model


def _decode(ids):
    return " ".join(f"t{i}" for i in ids if i != 299)  # 299: the template's end token, special


def _items(n=3, seed=4):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 300, (int(k),), generator=g) for k in torch.randint(3, 8, (n,), generator=g)]
    return {i: {"prompt": p, "response": torch.tensor([5, 299]), "context": NO_CONTEXT} for i, p in enumerate(prompts)}


def test_a_gdpo_rollout_scales_each_reward_function_in_its_group_then_the_step():
    model, items = _tiny_model(), _items()
    config = GRPOConfig(rewards=["regex:t1\\d\\d\\b", "concise"], reward_weights=[1.0, 0.5], num_generations=4,
                        max_new_tokens=6, multi_objective_aggregation="normalize_then_sum")
    objective = GRPO(0, _decode, config, max_seq_length=64, stop_ids=[7], seed=3, end_id=299)
    groups = objective.rollout(None, model, items, 0)
    by_name = torch.stack([torch.stack([a["rewards"] for a in groups[i]]) for i in sorted(groups)])  # (3, 4, 2)
    advantages = torch.stack([torch.cat([a["advantage"] for a in groups[i]]) for i in sorted(groups)])
    assert torch.allclose(advantages, decoupled_advantages(None, by_name, [1.0, 0.5]), atol=1e-6)
    assert float(advantages.abs().sum()) > 0 and float(advantages.mean()) == pytest.approx(0, abs=1e-5)
    ties = (by_name.amax(1) == by_name.amin(1)).all(-1)
    assert [float(groups[i][0]["zero_std"]) for i in sorted(groups)] == ties.float().tolist()


def test_a_rollout_is_a_scored_group_of_the_students_own_samples():
    model, items = _tiny_model(), _items()
    config = GRPOConfig(rewards=["regex:t1\\d\\d\\b", "concise"], num_generations=4, max_new_tokens=6)
    objective = GRPO(0, _decode, config, max_seq_length=64, stop_ids=[7], seed=3, end_id=299)
    groups = objective.rollout(None, model, items, step=0)
    assert model.layers[0].attn.kv_cache is None  # the sampling cache is freed for the training passes
    assert sorted(groups) == [0, 1, 2] and all(len(g) == 4 for g in groups.values())
    for i, group in groups.items():
        assert all(torch.equal(a["prompt"], items[i]["prompt"]) for a in group)
        for a in group:
            text = _decode(a["response"].tolist())
            regex = float(any(t.startswith("t1") and len(t) == 4 for t in text.split()))
            concise = 1 - len(a["response"]) / 6
            assert a["rewards"].tolist() == pytest.approx([regex, concise])
            assert float(a["reward"]) == pytest.approx(regex + concise)
        rewards = torch.stack([a["reward"] for a in group]).view(1, 4)
        assert torch.allclose(torch.stack([a["advantage"] for a in group]).view(1, 4), group_advantages(rewards))
        # cut short = not ended by the template's end token (TRL's test: the last id is not an EOS)
        assert [bool(a["truncated"]) for a in group] == [int(a["response"][-1]) != 299 for a in group]
    # seeded by the step: the same step samples the same answers (a resumed run), another step others
    again = objective.rollout(None, model, items, step=0)
    other = objective.rollout(None, model, items, step=1)
    same = lambda a, b: all(torch.equal(x["response"], y["response"]) for i in a for x, y in zip(a[i], b[i]))  # noqa
    assert same(groups, again) and not same(groups, other)
    # greedy answers are the model's greedy continuations: stopped ones end with the template's end token
    greedy = GRPO(0, _decode, dataclasses.replace(config, sample_temperature=0.0), max_seq_length=64,
                  stop_ids=[7], end_id=299).rollout(None, model, items, step=0)
    for i in items:
        tokens, stopped = helpers.greedy(model, items[i]["prompt"], 6, {7})
        assert greedy[i][0]["response"].tolist() == tokens + ([299] if stopped else [])
        assert float(greedy[i][0]["zero_std"]) == 1.0 and float(greedy[i][0]["advantage"]) == 0.0  # all alike
    # the sampling filters reach the sampler: kept to the most likely token, a sample at temperature 1 is greedy
    for narrow in (dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)):
        sampled = GRPO(0, _decode, dataclasses.replace(config, **narrow), max_seq_length=64, stop_ids=[7], seed=3,
                       end_id=299).rollout(None, model, items, step=0)
        assert all(torch.equal(a["response"], greedy[i][0]["response"]) for i in items for a in sampled[i]), narrow
    assert not same(groups, {i: [greedy[i][0]] * 4 for i in items})  # (unfiltered samples are not)
    # the repetition penalty reaches the sampler: the greedy answers are the engine's under that penalty, not the plain
    from lit_aligner.generation import Penalties, generate

    penalized = GRPO(0, _decode, dataclasses.replace(config, sample_temperature=0.0, repetition_penalty=3.0),
                     max_seq_length=64, stop_ids=[7], end_id=299).rollout(None, model, items, step=0)
    for i in items:
        ids = generate(model, [items[i]["prompt"]], 6, penalties=Penalties(repetition=3.0), stop_ids=[7])[0].tolist()
        assert penalized[i][0]["response"].tolist() == ids + ([299] if len(ids) < 6 else [])
    assert any(not torch.equal(penalized[i][0]["response"], greedy[i][0]["response"]) for i in items)


@pytest.mark.parametrize("mask_truncated", [False, True])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "bnpo", "cispo", "vespo"])
def test_a_steps_loss_over_micro_batches_is_trls_loss_type_over_the_whole_batch(loss_type, mask_truncated):
    # the engine's way: each micro-batch's summed loss / the step's answers, accumulated; TRL's: its formula for the
    # loss type over one batch of every answer (DAPO, CISPO, VESPO: a mean over every answer token of the step; BNPO:
    # each micro-batch's mean over its tokens, averaged over the two equal micro-batches), with its
    # mask_truncated_completions zeroing the loss mask of answers that end in no EOS, and the log-probabilities of
    # the logits over the sampling temperature
    model, items = _tiny_model(), _items(3, seed=5)
    config = GRPOConfig(rewards=["concise"], num_generations=4, max_new_tokens=6, loss_type=loss_type,
                        mask_truncated_completions=mask_truncated, sample_temperature=0.7)
    stops = range(0, 300, 7)  # (a stop token in 1 of 7 draws: answers of many lengths)
    objective = GRPO(0, _decode, config, max_seq_length=64, stop_ids=stops, seed=1, end_id=299).with_aligner(None)
    answers = [a for g in objective.rollout(None, model, items, step=0).values() for a in g]
    lengths = [len(a["response"]) for a in answers]
    assert len(set(lengths)) > 1  # (answers of different lengths, or every type would agree)
    truncated = torch.tensor([int(a["response"][-1]) != 299 for a in answers])
    assert 0 < int(truncated.sum()) < len(answers)  # (some cut short, some not: the mask matters)
    params = [model.aligner.prefix, model.aligner.gate]
    value, cut = 0.0, 6 if loss_type == "bnpo" else 8  # (TRL's micro-batches are equal; ours too but the last)
    for micro in (answers[:cut], answers[cut:]):
        loss = objective(model, objective.collate(micro))["loss"] / len(answers)
        loss.backward()
        value += float(loss.detach())
    ours = [p.grad.clone() for p in params]
    model.zero_grad()

    batch = objective.collate(answers)
    hidden = model(batch["input_ids"], return_hidden=True)
    labels = batch["labels"][:, 1:]
    logits = hidden[:, :-1] @ model.lm_head_weight.T / 0.7
    lp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    mask = (labels != -100).float()
    assert mask.sum(-1).tolist() == lengths
    if mask_truncated:
        mask = mask * (~truncated).float()[:, None]
    per_token = -torch.exp(lp - lp.detach()) * batch["advantage"]
    if loss_type in ("cispo", "vespo"):  # (the ratio 1: under cispo's cap of 5; vespo's weight phi(1) = 1)
        per_token = -batch["advantage"] * lp
    halves = [slice(0, cut), slice(cut, None)]
    theirs = {"grpo": ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean(),
              "dapo": (per_token * mask).sum() / mask.sum(), "cispo": (per_token * mask).sum() / mask.sum(),
              "dr_grpo": (per_token * mask).sum() / (len(answers) * 6),
              "vespo": (per_token * mask).sum() / mask.sum(),
              "bnpo": sum((per_token * mask)[h].sum() / mask[h].sum() for h in halves) / 2}[loss_type]
    if loss_type == "bnpo":  # (else a mean over all the step's tokens would do as well)
        assert float(mask[halves[0]].sum() / cut) != float(mask[halves[1]].sum() / (len(answers) - cut))
    theirs.backward()
    assert value == pytest.approx(float(theirs.detach()), abs=1e-6)
    for a, b in zip(ours, params):
        assert torch.allclose(a, b.grad, atol=1e-6), loss_type
    assert ours[0].abs().sum() > 0


def test_a_batchs_first_step_keeps_the_sampling_policys_log_probs_for_its_later_steps():
    # --num-iterations 2: the first step's own forward passes keep each answer's token log-probs (at the sampling
    # temperature) for the second, whatever micro-batch it came in: no forward pass of their own
    model, items = _tiny_model(), _items(3, seed=5)
    config = GRPOConfig(rewards=["concise"], num_generations=4, max_new_tokens=6, num_iterations=2,
                        sample_temperature=0.7)
    objective = GRPO(0, _decode, config, max_seq_length=64, stop_ids=range(0, 300, 7), seed=1,
                     end_id=299).with_aligner(None)
    answers = [a for g in objective.rollout(None, model, items, step=0).values() for a in g]
    assert not any("old_logps" in a for a in answers)
    for micro in (answers[5:], answers[:5]):  # (out of order)
        objective(model, objective.collate(micro))["loss"].backward()
    for a in answers:  # an independent computation: the policy's logits / 0.7 at the answer's tokens
        with torch.no_grad():
            ids = torch.cat([a["prompt"], a["response"]])[None]
            logits = model(ids)[0, len(a["prompt"]) - 1:-1] / 0.7
            theirs = torch.log_softmax(logits, -1).gather(-1, a["response"][:, None])[:, 0]
        assert torch.allclose(a["old_logps"], theirs, atol=1e-5)
    assert objective.rollout(None, model, items, step=1)[0][0] is answers[0]  # the second step: the same answers
    batch = objective.collate(answers[:4])
    assert torch.equal(batch["old_logps"], torch.cat([a["old_logps"] for a in answers[:4]]))


def test_the_off_policy_mask_drops_drifted_answers_with_negative_advantages_on_a_later_step():
    # --off-policy-mask-threshold through the objective: nothing drifts on a batch's first step; on its second (the
    # policy moved) the answers with A < 0 whose mean log p_old - log p passed the threshold leave the loss
    items, losses = _items(3, seed=5), []
    for threshold in (None, 1e-6):
        torch.manual_seed(0)
        m = _tiny_model()
        config = GRPOConfig(rewards=["concise"], num_generations=4, max_new_tokens=6, num_iterations=2,
                            off_policy_mask_threshold=threshold)
        objective = GRPO(0, _decode, config, max_seq_length=64, stop_ids=range(0, 300, 7), seed=1,
                         end_id=299).with_aligner(None)
        answers = [a for g in objective.rollout(None, m, items, step=0).values() for a in g]
        with torch.no_grad():
            first = objective(m, objective.collate(answers))
        with torch.no_grad():
            m.aligner.gate.add_(0.5)  # the policy moves
            drift = []
            for a in answers:
                ids = torch.cat([a["prompt"], a["response"]])[None]
                lp = torch.log_softmax(m(ids)[0, len(a["prompt"]) - 1:-1], -1).gather(-1, a["response"][:, None])
                drift.append(float((a["old_logps"] - lp[:, 0]).mean()))
        second = [objective(m, objective.collate([a]))["loss"].item() for a in answers]
        losses.append((first["loss"].item(), second))
    advantages = [float(a["advantage"]) for a in answers]
    dropped = [a < 0 and d > 1e-6 for a, d in zip(advantages, drift)]
    assert losses[0][0] == pytest.approx(losses[1][0], abs=1e-6)  # the first step: nothing masked
    assert 0 < sum(dropped) < len(answers)
    for (plain, masked), drop in zip(zip(losses[0][1], losses[1][1]), dropped):
        assert masked == (0.0 if drop else pytest.approx(plain, abs=1e-6)) and (not drop or plain != 0.0)


def _mean_entropy(model, answers, temperature):
    """The policy's mean next-token entropy over the answers' tokens, at the sampling temperature (independently)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for a in answers:
            ids = torch.cat([a["prompt"], a["response"]])[None]
            logp = torch.log_softmax(model(ids)[0, len(a["prompt"]) - 1:-1] / temperature, -1)
            total += float(-(logp.exp() * logp).sum())
            count += len(a["response"])
    return total / count


def test_the_entropy_bonus_is_the_micro_batchs_mean_entropy_over_its_kept_answers(monkeypatch):
    # --entropy-coef: the loss less coef x the mean entropy over the kept answers' tokens (each micro-batch's, weighed
    # by its answers: the engine divides the sum by the step's answers); its gradient raises the entropy
    model, items = _tiny_model(), _items(3, seed=5)
    config = GRPOConfig(rewards=["concise"], num_generations=4, max_new_tokens=6, sample_temperature=0.8,
                        mask_truncated_completions=True)
    plain = GRPO(0, _decode, config, max_seq_length=64, stop_ids=range(0, 300, 11), seed=1,
                 end_id=299).with_aligner(None)
    bonus = GRPO(0, _decode, dataclasses.replace(config, entropy_coef=0.2), max_seq_length=64,
                 stop_ids=range(0, 300, 11), seed=1, end_id=299).with_aligner(None)
    answers = [a for g in plain.rollout(None, model, items, step=0).values() for a in g]
    kept = [a for a in answers if not float(a["truncated"])]
    assert 0 < len(kept) < len(answers)  # (some answers ran to --max-new-tokens: left out, also of the bonus)
    batch = plain.collate(answers)
    with torch.no_grad():
        got = bonus(model, batch)
        assert float(got["loss"] - plain(model, batch)["loss"]) == pytest.approx(
            -0.2 * _mean_entropy(model, kept, 0.8) * len(answers), rel=1e-4)
        assert float(got["entropy_coef"]) == pytest.approx(0.2 * len(answers))
    entropy = lambda: _mean_entropy(model, kept, 0.8)  # noqa: E731
    before = entropy()
    loss = bonus(model, batch)["loss"] - plain(model, batch)["loss"]  # the bonus alone
    loss.backward()
    with torch.no_grad():
        for p in (model.aligner.prefix, model.aligner.gate):
            p -= 0.05 * p.grad
    assert entropy() > before


def test_the_adaptive_entropy_coefficient_follows_the_steps_entropy():
    # Skywork-OR1's control (TRL's): the bonus waits for a step at or below the target; after each step the
    # coefficient moves by delta toward more bonus when that step's mean entropy (every kept token) was at or below
    # the target, else toward less, within [min, max]; a run state keeps it
    model, items = _tiny_model(), _items(3, seed=5)
    for target, coefs in ((100.0, [0.0, 0.15, 0.2, 0.22]), (0.0, [0.0, 0.0, 0.0, 0.0])):
        config = GRPOConfig(rewards=["concise"], num_generations=4, max_new_tokens=6, entropy_coef=0.1,
                            use_adaptive_entropy=True, entropy_coef_delta=0.05, entropy_coef_max=0.22,
                            entropy_coef_min=0.02, entropy_target=target)
        objective = GRPO(0, _decode, config, max_seq_length=64, stop_ids=range(0, 300, 11), seed=1,
                         end_id=299).with_aligner(None)
        applied = []
        for step in range(4):
            answers = [a for g in objective.rollout(None, model, items, step=step).values() for a in g]
            with torch.no_grad():
                for micro in (answers[:5], answers[5:]):
                    applied.append(float(objective(model, objective.collate(micro))["entropy_coef"]) / len(micro))
            objective.after_step(step + 1, model.aligner)
            assert objective.last_entropy == pytest.approx(_mean_entropy(model, answers, 1.0), rel=1e-5)
        assert applied[0::2] == pytest.approx(coefs) and applied[1::2] == pytest.approx(coefs), applied
        assert objective.entropy_coef == pytest.approx(0.22 if target else 0.02)
    state = objective.state_dict()
    fresh = GRPO(0, _decode, config, max_seq_length=64, end_id=299)
    fresh.load_state_dict(state)
    assert (fresh.entropy_coef, fresh.last_entropy) == (objective.entropy_coef, objective.last_entropy)


def test_dapo_divides_by_the_answer_tokens_of_every_process():
    # under DDP each process samples its own groups; DAPO's mean runs over the tokens of all of them (TRL gathers the
    # count): the other process here brings 8 answers of 40 tokens in all
    import contextlib
    from types import SimpleNamespace

    other = torch.tensor([40.0, 8.0], dtype=torch.float64)
    fabric = SimpleNamespace(global_rank=0, world_size=2, autocast=contextlib.nullcontext,
                             all_reduce=lambda t, reduce_op: t + other)
    config = GRPOConfig(rewards=["concise"], num_generations=2, max_new_tokens=6, loss_type="dapo")
    objective = GRPO(0, _decode, config, max_seq_length=64, stop_ids=range(0, 300, 7), end_id=299)
    answers = [a for g in objective.rollout(fabric, _tiny_model(), _items(2), step=0).values() for a in g]
    tokens = sum(len(a["response"]) for a in answers)
    assert [float(a["token_scale"]) for a in answers] == pytest.approx([(4 + 8) / (tokens + 40)] * 4)


def test_validation_scores_the_policys_greedy_answers_by_their_reward():
    from lit_aligner.evaluation import objective_metrics

    model, items = _tiny_model(), _items(5, seed=6)
    data = TokenizedDataset.from_rows("sft", [(it["prompt"], it["response"], NO_CONTEXT) for it in items.values()])
    config = GRPOConfig(rewards=["regex:t1\\d\\d\\b", "concise"], num_generations=4, max_new_tokens=6)
    objective = GRPO(0, _decode, config, max_seq_length=64, stop_ids=[7], end_id=299)
    for aligner in (model.aligner, False):
        metrics = objective_metrics(model, objective, data, aligner, batch_size=2)
        scorer = objective.with_aligner(aligner)
        answers = {i: scorer._answer_items(None, model, [items[i]], 1, 0.0, aligner, None)[0][0] for i in items}
        mean = lambda k: sum(float(a[k].sum()) for a in answers.values()) / len(items)  # noqa: E731
        assert metrics["answers"] == 5 and metrics["reward"] == pytest.approx(mean("reward"))
        assert metrics["loss"] == pytest.approx(-metrics["reward"]) and "zero_std" not in metrics
        assert metrics["length"] == pytest.approx(sum(len(a["response"]) for a in answers.values()) / 5)
        assert metrics["truncated"] == pytest.approx(mean("truncated"))


def test_a_process_without_held_out_rows_repeats_an_answered_one():
    # DDP with fewer held-out prompts than processes: a process with none runs the others' passes on row 0, which it
    # must answer too (its sums count nothing: alone here, nothing is left to average)
    import contextlib
    from types import SimpleNamespace

    from lit_aligner.training.engine import evaluate
    from lit_aligner.training.objectives import ObjectiveModule

    model, items = _tiny_model(), _items(1)
    data = TokenizedDataset.from_rows("sft", [(it["prompt"], it["response"], NO_CONTEXT) for it in items.values()])
    objective = GRPO(0, _decode, GRPOConfig(rewards=["concise"], max_new_tokens=4), max_seq_length=64)
    rank1 = SimpleNamespace(global_rank=1, world_size=2, device=torch.device("cpu"), all_reduce=lambda t, **_: t,
                            autocast=contextlib.nullcontext)
    with pytest.raises(TrainError, match="no answers to evaluate"):
        evaluate(ObjectiveModule(model, objective), objective, data, 2, None, rank1)
    assert evaluate(ObjectiveModule(model, objective), objective, data, 2)["answers"] == 1


# ---------------------------------------------------------------------------------------------------------------------
# Whole runs


@pytest.fixture(scope="module")
def letter_reward(tmp_path_factory):
    """A reward the tiny random model can learn in a few steps: the share of an answer's letters that are 'e'."""
    path = tmp_path_factory.mktemp("grpo") / "letters.py"
    path.write_text("def e_share(prompts, completions, **kwargs):\n"
                    "    return [sum(ch == 'e' for ch in c) / max(1, sum(ch.isalpha() for ch in c)) "
                    "for c in completions]\n")
    return f"{path}:e_share"


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory):
    from lit_aligner.data import default

    path = tmp_path_factory.mktemp("grpo") / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in default.generate_rows(80, seed=5)))
    return path


def _config(checkpoint_dir, rows_file, reward, out, weight=1.0, **train):
    return GRPORunConfig(
        checkpoint_dir=checkpoint_dir, out_dir=out, data=rows_file, n_tokens=4, start_layer=1, accelerator="cpu",
        progress=False, compare=False, data_options=DataOptions(max_seq_length=96, val_size=8),
        grpo=GRPOConfig(rewards=[reward], reward_weights=[weight], num_generations=4, max_new_tokens=12),
        train=dataclasses.replace(GRPORunConfig().train, **{
            "max_steps": 12, "learning_rate": 0.1, "global_batch_size": 4, "micro_batch_size": 2,
            "warmup_steps": 1, "eval_interval": 6, "save_interval": 6, "seed": 7, **train}))


def test_a_grpo_run_moves_its_reward_the_way_it_is_weighed(tiny_checkpoint_dir, rows_file, letter_reward, tmp_path):
    from lit_aligner.training import train

    shares = {}
    for weight in (1.0, -1.0):  # -1: the same function as a penalty, so the same signal pushes the other way
        out = tmp_path / f"w{weight:g}"
        summary = train(_config(tiny_checkpoint_dir, rows_file, letter_reward, out, weight))
        rows = read_metrics(out / "metrics.csv")
        assert len([r for r in rows if r.get("train_reward")]) == 12
        # the loss of a group sums to 0 (its advantages do) and the ratio is 1: a step's loss is 0, its gradient not
        assert all(float(r["train_loss"]) == pytest.approx(0, abs=1e-5) for r in rows if r.get("train_loss"))
        assert all(float(r["grad_norm"]) > 0 for r in rows if r.get("grad_norm"))
        val = [(float(r["val_reward"]), float(r["val_reward_e_share"])) for r in rows if r.get("val_reward")]
        assert val[-1][0] == pytest.approx(weight * val[-1][1]) and summary["val"]["reward"] == val[-1][0]
        # the KL and entropy are measured in training only: no column of zeros for validation
        assert all(float(r["train_entropy"]) > 0 for r in rows if r.get("train_entropy"))
        assert not {"val_kl", "val_zero_std", "val_entropy"} & set(rows[0]) and "kl" not in summary["val"]
        shares[weight] = (val[0][1], val[-1][1])  # the held-out greedy answers' share of e's: before, after
    assert shares[1.0][0] == shares[-1.0][0]  # the same base
    assert shares[1.0][1] > shares[1.0][0] + 0.1, shares  # rewarded: more e's
    assert shares[-1.0][1] < shares[-1.0][0], shares  # penalised: fewer (from a floor of few)
    _, meta = load_aligner(tmp_path / "w1" / "aligner.safetensors")
    assert json.loads(meta["grpo"])["rewards"] == [letter_reward]
    assert json.loads(meta["grpo"])["num_generations"] == 4


def test_the_kl_reference_is_the_init_aligner_unless_another_is_named(tiny_checkpoint_dir, rows_file, letter_reward,
                                                                       tmp_path):
    from lit_aligner.training import train

    def run(out, **flags):
        config = _config(tiny_checkpoint_dir, rows_file, letter_reward, tmp_path / out, max_steps=2, eval_interval=2)
        config.grpo = dataclasses.replace(config.grpo, beta=0.1 if "init_aligner" in flags else 0.0)
        for k, v in flags.items():
            setattr(config, k, v)
        summary = train(config)
        rows = read_metrics(tmp_path / out / "metrics.csv")
        runs[out] = (summary["comparison"], float(rows[0]["val_reward"]))  # (step 0: the starting Aligner)
        return [float(r["train_kl"]) for r in rows if r.get("train_kl")], json.loads(
            load_aligner(tmp_path / out / "aligner.safetensors")[1]["grpo"])

    runs = {}
    run("sft")  # an Aligner that is not the base (two steps at lr 0.1)
    init = tmp_path / "sft" / "aligner.safetensors"
    kl_init, meta_init = run("init", init_aligner=init)
    kl_base, meta_base = run("base", init_aligner=init, reference_aligner="none")
    kl_file, meta_file = run("file", init_aligner=init, reference_aligner=str(init))
    # the end report judges a run against the Aligner it started from too (its step-0 validation), not only the base
    report, first_val = runs["init"]
    assert "init" not in runs["sft"][0] and report["init"]["reward"] == pytest.approx(first_val, abs=1e-6)
    assert report["init"]["reward"] != report["before"]["reward"]
    # the first step's policy is the init Aligner: no divergence from a copy of it, some from the bare base
    assert kl_init[0] == pytest.approx(0, abs=1e-9) and kl_init[1] > 1e-6
    assert kl_base[0] > 1e-6 and kl_file == kl_init
    assert (meta_init["reference"], meta_base["reference"], meta_file["reference"]) == ("init", "none", str(init))
    assert meta_init["beta"] == 0.1


def test_sync_ref_model_moves_the_kl_reference_toward_the_policy(tiny_checkpoint_dir, rows_file, letter_reward,
                                                                   tmp_path):
    """TRL's sync_ref_model for GRPO's KL: after steps 2 and 4 the reference (a copy of the init Aligner) becomes
    alpha x the policy + (1 - alpha) x itself; the end report's init Aligner stays the one the run started from; a run
    resumed at step 2 ends where the uninterrupted one does; with alpha 1 every step the reference is the policy that
    samples, so the KL is 0 at every step."""
    from lit_aligner.training import train

    def config(out, **flags):
        c = _config(tiny_checkpoint_dir, rows_file, letter_reward, tmp_path / out, max_steps=4, eval_interval=4,
                    save_interval=2)
        c.grpo = dataclasses.replace(c.grpo, beta=0.1)
        return dataclasses.replace(c, init_aligner=init, **flags)

    train(_config(tiny_checkpoint_dir, rows_file, letter_reward, tmp_path / "sft", max_steps=2, eval_interval=2))
    init = tmp_path / "sft" / "aligner.safetensors"
    start, _ = load_aligner(init)
    summary = train(config("a", sync_ref_model=True, ref_model_mixup_alpha=0.5, ref_model_sync_steps=2))
    s2, s4 = (torch.load(tmp_path / "a" / "state" / f"step-00000{k}.pt", weights_only=True) for k in (2, 4))
    for name in ("prefix", "gate"):
        torch.testing.assert_close(s2["objective"][f"reference_{name}"],
                                   0.5 * s2["aligner"][name] + 0.5 * getattr(start, name).detach())
        torch.testing.assert_close(s4["objective"][f"reference_{name}"],
                                   0.5 * s4["aligner"][name] + 0.5 * s2["objective"][f"reference_{name}"])
    first_val = float(read_metrics(tmp_path / "a" / "metrics.csv")[0]["val_reward"])
    assert summary["comparison"]["init"]["reward"] == pytest.approx(first_val, abs=1e-6)
    meta = json.loads(load_aligner(tmp_path / "a" / "aligner.safetensors")[1]["grpo"])
    assert (meta["sync_ref_model"], meta["ref_model_mixup_alpha"], meta["ref_model_sync_steps"]) == (True, 0.5, 2)
    train(config("b", sync_ref_model=True, ref_model_mixup_alpha=0.5, ref_model_sync_steps=2,
                 resume=str(tmp_path / "a" / "state" / "step-000002.pt")))
    helpers.assert_same_trained_aligner(tmp_path / "a", tmp_path / "b")
    train(config("hard", sync_ref_model=True, ref_model_mixup_alpha=1.0, ref_model_sync_steps=1))
    kl = [float(r["train_kl"]) for r in read_metrics(tmp_path / "hard" / "metrics.csv") if r.get("train_kl")]
    assert kl == [0.0] * 4
    with pytest.raises(TrainError, match="--sync-ref-model is about the KL penalty's reference, and --beta 0"):
        dataclasses.replace(config("c", sync_ref_model=True), grpo=GRPOConfig()).check()


@pytest.mark.slow
def test_a_resumed_grpo_run_retraces_the_same_curve(tiny_checkpoint_dir, rows_file, letter_reward, tmp_path,
                                                    monkeypatch):
    def config(out):
        return dataclasses.replace(_config(tiny_checkpoint_dir, rows_file, letter_reward, out, max_steps=6,
                                           save_interval=3, eval_interval=3), log_completions=True)

    _, a, b = helpers.train_whole_and_resumed(monkeypatch, config, tmp_path)
    assert [r["train_reward"] for r in a] == [r["train_reward"] for r in b]
    helpers.assert_same_trained_aligner(tmp_path / "full", tmp_path / "cut")
    # the completions log of the resumed run reads as the whole run's: every step once, the same answers
    logs = {k: (tmp_path / k / "completions.jsonl").read_text().splitlines() for k in ("full", "cut")}
    assert logs["full"] == logs["cut"] and len(logs["full"]) == 6 * 4 * 4


def test_num_iterations_trains_each_batch_of_samples_for_mu_steps_with_a_clipped_ratio(
        tiny_checkpoint_dir, rows_file, letter_reward, tmp_path, monkeypatch):
    """--num-iterations 2 (TRL's mu): a batch of prompts is answered once and its answers serve 2 steps; the first
    step's ratio to the sampling policy is 1 (its loss 0, as with mu 1), the second's is not (a loss, some tokens held
    by a tiny --epsilon); run states are written between batches only, and a run stopped mid-way (its stop waits for
    the batch's last step) resumes to the same curve."""
    from lit_aligner.training import train
    from lit_aligner.training.objectives.grpo import GRPO

    sampled, sample = [], GRPO._sample

    def counting(self, fabric, model, items, step):
        sampled.append((step, sorted(items)))
        return sample(self, fabric, model, items, step)

    monkeypatch.setattr(GRPO, "_sample", counting)

    def config(out):
        cfg = _config(tiny_checkpoint_dir, rows_file, letter_reward, out, max_steps=6, save_interval=1,
                      eval_interval=3)
        # (at a sampling temperature: the kept log-probabilities must be those at it, or the first ratio is not 1)
        return dataclasses.replace(cfg, grpo=dataclasses.replace(cfg.grpo, num_iterations=2, epsilon=0.001,
                                                                 sample_temperature=0.8))

    train(config(tmp_path / "once"))
    assert [s for s, _ in sampled] == [0, 2, 4] and sampled[0][1] != sampled[1][1]  # a new batch every 2 steps
    rows = [r for r in read_metrics(tmp_path / "once" / "metrics.csv") if r.get("train_loss")]
    loss, clipped = [abs(float(r["train_loss"])) for r in rows], [float(r["train_clip_ratio"]) for r in rows]
    assert max(loss[0::2]) < 1e-6 and min(loss[1::2]) > 1e-5, loss  # ratio 1, then the policy has moved
    assert max(clipped[0::2]) == 0 and max(clipped[1::2]) > 0, clipped
    assert min(float(r["train_entropy"]) for r in rows) > 0  # (the policy's entropy at the answer tokens, logged)
    assert sorted(p.name for p in (tmp_path / "once" / "state").glob("step-*")) == [
        f"step-{s:06d}.pt" for s in (2, 4, 6)]
    _, a, b = helpers.train_whole_and_resumed(monkeypatch, config, tmp_path, at=3)  # stopped after step 4
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]
    helpers.assert_same_trained_aligner(tmp_path / "full", tmp_path / "cut")
    cfg = config(tmp_path / "epochs")  # --epochs counts batches of prompts, each trained on for mu steps
    cfg.train = dataclasses.replace(cfg.train, max_steps=type(cfg.train).max_steps, epochs=0.05)
    assert train(cfg)["step"] == 2  # 0.05 of the 72 training rows, 4 a batch: one batch, its 2 steps
    with pytest.raises(TrainError, match="--max-steps 5 is not a multiple of --num-iterations 2.*give --max-steps 4"):
        config(tmp_path / "bad").__class__(grpo=GRPOConfig(num_iterations=2),
                                           train=dataclasses.replace(GRPORunConfig().train, max_steps=5)).check()


def test_an_adaptive_entropy_run_resumes_with_its_coefficient(tiny_checkpoint_dir, rows_file, letter_reward, tmp_path,
                                                              monkeypatch):
    def config(out):
        cfg = _config(tiny_checkpoint_dir, rows_file, letter_reward, out, max_steps=4, save_interval=1,
                      eval_interval=4)
        return dataclasses.replace(cfg, grpo=dataclasses.replace(
            cfg.grpo, entropy_coef=0.1, use_adaptive_entropy=True, entropy_coef_delta=0.05, entropy_target=100.0))

    _, a, b = helpers.train_whole_and_resumed(monkeypatch, config, tmp_path, at=2)
    a, b = ([r for r in rows if r.get("train_loss")] for rows in (a, b))
    assert [float(r["train_entropy_coef"]) for r in a] == pytest.approx([0.0, 0.15, 0.2, 0.25])
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]  # (the coefficient came back with the state)
    meta = json.loads(load_aligner(tmp_path / "full" / "aligner.safetensors")[1]["grpo"])
    assert meta["use_adaptive_entropy"] and meta["entropy_target"] == 100.0
    assert "val_entropy_coef" not in a[0]


def test_gspo_clips_whole_answers(tiny_checkpoint_dir, rows_file, letter_reward, tmp_path):
    """--importance-sampling-level sequence (GSPO, with its paper's bounds): one ratio per answer, so on a batch's
    second step the clipping holds whole answers (train_clip_ratio is a count of the step's 16 answers), while the
    token-level run from the same start holds single tokens."""
    from lit_aligner.training import train

    shares = {}
    for level in ("sequence", "token"):
        cfg = _config(tiny_checkpoint_dir, rows_file, letter_reward, tmp_path / level, max_steps=4, eval_interval=4)
        cfg.grpo = dataclasses.replace(cfg.grpo, num_iterations=2, epsilon=3e-4, epsilon_high=4e-4,
                                       importance_sampling_level=level)
        train(cfg)
        rows = [r for r in read_metrics(tmp_path / level / "metrics.csv") if r.get("train_loss")]
        shares[level] = [float(r["train_clip_ratio"]) * 16 for r in rows[1::2]]  # (the batches' second steps)
        assert json.loads(load_aligner(tmp_path / level / "aligner.safetensors")[1]["grpo"])[
            "importance_sampling_level"] == level
    assert all(s > 0 and s == pytest.approx(round(s), abs=1e-4) for s in shares["sequence"]), shares
    assert any(abs(s - round(s)) > 1e-3 for s in shares["token"]), shares


def test_the_completions_log_holds_every_sampled_answer_and_its_scores(tiny_checkpoint_dir, rows_file, letter_reward,
                                                                        tmp_path):
    from lit_aligner.training import train

    config = dataclasses.replace(_config(tiny_checkpoint_dir, rows_file, letter_reward, tmp_path / "out", max_steps=2,
                                         eval_interval=2, save_interval=1), log_completions=True)
    train(config)
    log = tmp_path / "out" / "completions.jsonl"
    lines = log.read_text().splitlines()
    # resumed from step 1's state, the run writes step 2 again: its earlier lines go, the file reads as one run
    step1 = next((tmp_path / "out").glob("*/step-000001.pt"))
    train(dataclasses.replace(config, resume=str(step1)))
    assert log.read_text().splitlines() == lines
    rows = [json.loads(line) for line in lines]
    metrics = {int(r["step"]): r for r in read_metrics(tmp_path / "out" / "metrics.csv") if r.get("train_reward")}
    assert [r["step"] for r in rows] == [1] * 16 + [2] * 16  # 4 prompts x 4 answers a step
    for step, m in metrics.items():  # the engine's figures, reduced on its own, from the same answers
        mine = [r for r in rows if r["step"] == step]
        assert sum(r["reward"] for r in mine) / 16 == pytest.approx(float(m["train_reward"]), abs=1e-6)
        assert sum(r["tokens"] for r in mine) / 16 == pytest.approx(float(m["train_length"]), abs=1e-6)
        for g in range(4):  # each prompt's group: advantages centred, the function's score is the reward
            group = mine[4 * g:4 * g + 4]
            assert len({r["prompt"] for r in group}) == 1 and abs(sum(r["advantage"] for r in group)) < 1e-4
            assert all(r["rewards"] == {"e_share": pytest.approx(r["reward"])} for r in group)
    # the logged text is what was scored: the reward recomputed from it
    share = lambda text: text.count("e") / max(1, sum(c.isalpha() for c in text))  # noqa: E731
    assert all(r["reward"] == pytest.approx(share(r["completion"])) for r in rows)
    # a new run into the same folder (--force) starts the file again
    train(dataclasses.replace(config, force=True, train=dataclasses.replace(config.train, max_steps=1)))
    assert len((tmp_path / "out" / "completions.jsonl").read_text().splitlines()) == 16


def test_a_run_state_that_spelled_scale_rewards_as_a_bool_resumes(tiny_checkpoint_dir, rows_file, letter_reward,
                                                                     tmp_path):
    from lit_aligner.training import train

    config = _config(tiny_checkpoint_dir, rows_file, letter_reward, tmp_path / "out", max_steps=2, eval_interval=2,
                     save_interval=1)
    train(config)
    path = next((tmp_path / "out").glob("*/step-000001.pt"))
    state = torch.load(path, weights_only=True)
    assert state["identity"]["scale_rewards"] == "group"
    state["identity"]["scale_rewards"] = True  # as written when the flag was a bool
    torch.save(state, path)
    assert train(dataclasses.replace(config, resume=str(path)))["step"] == 2  # True was "group": the same run
    other = dataclasses.replace(config, resume=str(path), grpo=dataclasses.replace(config.grpo, scale_rewards="none"))
    with pytest.raises(TrainError, match="--scale-rewards group \\(now none\\)"):
        train(other)


def test_grpo_cli_errors_are_one_line(tiny_checkpoint_dir, rows_file, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {w}."}) + "\n" for w in ("yes", "no", "maybe", "so")))
    common = ["finetune/aligner_grpo.py", "--checkpoint-dir", tiny_checkpoint_dir, "--accelerator", "cpu",
              "--max-steps", "1", "--no-progress", "--out-dir", tmp_path / "out"]
    cases = [(["--data", rows_file, "--rewards", "no_such_reward"], "not a reward function"),
             (["--data", rows_file, "--num-generations", "1"], "--num-generations must be at least 2"),
             (["--data", rows_file, "--strategy", "fsdp"], "needs the whole base"),
             (["--data", prompts, "--val-size", "1"], "prompt-only rows have none"),
             (["--data", rows_file, "--reference-aligner", "none"], "--beta 0 has none"),
             (["--data", rows_file, "--beta", "0.1", "--reference-aligner", tmp_path / "no.safetensors"],
              "no.safetensors")]
    for args, match in cases:
        r = helpers.run_script(*common, *args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and lines[-1].startswith("error:") and match in lines[-1], helpers.why(r)
        assert "Traceback" not in r.stderr
    # prompt-only rows train with rewards that need no reference; the old spelling --no-scale-rewards still works
    r = helpers.run_script(*common, "--data", prompts, "--val-size", "1", "--rewards", "concise", "--max-new-tokens",
                           "4", "--num-generations", "2", "--global-batch-size", "2", "--micro-batch-size", "2",
                           "--json-summary", "--no-scale-rewards")
    assert r.returncode == 0, helpers.why(r)
    assert json.loads(r.stdout.strip().splitlines()[-1])["step"] == 1
    assert "note: --no-scale-rewards is now --scale-rewards none" in r.stderr
    assert json.loads(load_aligner(tmp_path / "out" / "aligner.safetensors")[1]["grpo"])["scale_rewards"] == "none"


def test_grpo_flags_are_checked():
    with pytest.raises(TrainError, match="--beta must be >= 0"):
        GRPOConfig(beta=-1).check()
    with pytest.raises(TrainError, match="--sample-temperature"):
        GRPOConfig(sample_temperature=-1).check()
    with pytest.raises(TrainError, match="--num-iterations must be >= 1"):
        GRPOConfig(num_iterations=0).check()
    for bad in (dict(epsilon=1.0), dict(epsilon=0.0), dict(epsilon_high=-0.1), dict(epsilon_high=0.0)):
        with pytest.raises(TrainError, match="--epsilon must be in"):  # (0 is a value given, not "unset")
            GRPOConfig(**bad).check()
    assert GRPOConfig(epsilon=0.1).loss_settings()["epsilon_high"] == 0.1  # the upper bound defaults to --epsilon
    assert GRPOConfig(loss_type="cispo").loss_settings()["epsilon_high"] == 5.0  # cispo's cap: ScaleRL's 5
    for bad, says in ((dict(loss_type="cispo", epsilon_high=0.28), "cispo, --epsilon-high is the cap on the ratio"),
                      (dict(loss_type="luspo"), "add --importance-sampling-level sequence"),
                      (dict(delta=1.0), "--delta caps the ratio"), (dict(sapo_temperature_neg=0.0), "must be positive"),
                      (dict(top_entropy_quantile=1.5), r"--top-entropy-quantile is a share of the tokens"),
                      (dict(off_policy_mask_threshold=0.5), "needs --num-iterations > 1"),
                      (dict(entropy_coef=-0.1), "is a bonus's weight"),
                      (dict(loss_type="vespo", importance_sampling_level="sequence"), "leave --importance-sampling"),
                      (dict(vespo_lambda_neg=-1.0), "--vespo-lambda-neg must be >= 0"),
                      (dict(use_adaptive_entropy=True, entropy_coef=2.0), "must lie within --entropy-coef-min"),
                      (dict(use_adaptive_entropy=True, entropy_coef_delta=0.0), "be positive"),
                      (dict(off_policy_mask_threshold=0.0, num_iterations=2), "must be positive"),
                      (dict(multi_objective_aggregation="normalize_then_sum", scale_rewards="none"),
                       "applies to sum_then_normalize only")):
        with pytest.raises(TrainError, match=says):
            GRPOConfig(**bad).check()
    GRPOConfig(loss_type="luspo", importance_sampling_level="sequence", delta=4.0, top_entropy_quantile=0.2).check()
    GRPOConfig(off_policy_mask_threshold=0.5, num_iterations=2,
               multi_objective_aggregation="normalize_then_sum").check()
    for bad, says in ((dict(top_k=0), "^--top-k must be >= 1"), (dict(top_p=0.0), r"^--top-p must be in \(0, 1\]"),
                      (dict(min_p=1.5), r"^--min-p must be in \[0, 1\]"),
                      (dict(repetition_penalty=0.0), "^--repetition-penalty must be a finite number > 0")):
        with pytest.raises(TrainError, match=says):
            GRPOConfig(**bad).check()
    with pytest.raises(TrainError, match="--turns all is SFT's"):
        GRPORunConfig(data_options=DataOptions(turns="all")).check()


def test_evaluate_reward_gives_a_runs_end_report_again(tiny_checkpoint_dir, rows_file, letter_reward, tmp_path):
    from lit_aligner.training import train

    summary = train(_config(tiny_checkpoint_dir, rows_file, letter_reward, tmp_path / "run", max_steps=4))
    aligner = tmp_path / "run" / "aligner.safetensors"
    r = helpers.run_script("evaluate/aligner.py", "reward", "--checkpoint-dir", tiny_checkpoint_dir, "--data",
                           rows_file, "--split", "val", "--val-size", "8", "--seed", "7", "--max-seq-length", "96",
                           "--rewards", letter_reward, "concise", "--max-new-tokens", "12", "--aligners", "none",
                           aligner, "--device", "cpu", "--out", tmp_path / "reward.json")
    assert r.returncode == 0, helpers.why(r)
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result == json.loads((tmp_path / "reward.json").read_text())
    base, trained = result["results"]
    assert base["name"] == "base" and base["answers"] == trained["answers"] == 8
    assert trained["e_share"] == pytest.approx(summary["val"]["reward"], abs=1e-6)  # the run's held-out figure
    assert base["e_share"] == pytest.approx(summary["first_val"]["reward"], abs=1e-6)  # (step 0: the bare base)
    assert trained["reward"] == pytest.approx(trained["e_share"] + trained["concise"])
    assert trained["truncated"] == pytest.approx(summary["val"]["truncated"], abs=1e-6)
    assert "e_share" in r.stdout and "answer tokens" in r.stdout and "cut short" in r.stdout
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {w}."}) + "\n" for w in ("yes", "no")))
    r = helpers.run_script("evaluate/aligner.py", "reward", "--checkpoint-dir", tiny_checkpoint_dir, "--data", prompts,
                           "--aligners", "none", "--device", "cpu")
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("error:") and \
        "prompt-only rows have none" in r.stderr, helpers.why(r)


@pytest.mark.slow
def test_two_process_grpo_validates_as_one_process(tiny_checkpoint_dir, rows_file, letter_reward, tmp_path):
    # each process answers its own held-out prompts and samples its own prompts' groups: the held-out reward must be
    # summed over both (greedy answers: the same as one process's), every step counts both processes' answers
    common = ["finetune/aligner_grpo.py", "--checkpoint-dir", tiny_checkpoint_dir, "--data", rows_file, "--accelerator",
              "cpu", "--max-steps", "2", "--global-batch-size", "4", "--micro-batch-size", "1", "--n-tokens", "4",
              "--start-layer", "1", "--max-seq-length", "96", "--val-size", "7", "--eval-interval", "2",
              "--rewards", letter_reward, "--num-generations", "4", "--max-new-tokens", "12", "--no-progress",
              "--compare", "False", "--learning-rate", "0.1", "--scale-rewards", "batch", "--log-completions"]
    helpers.run_one_and_two_processes(common, tmp_path)
    rows = {k: read_metrics(tmp_path / k / "metrics.csv") for k in ("one", "two")}
    assert float(rows["two"][0]["val_reward"]) == pytest.approx(float(rows["one"][0]["val_reward"]), abs=1e-6)
    trained = [r for r in rows["two"] if r.get("train_reward")]
    assert len(trained) == 2 and all(0 <= float(r["train_zero_std"]) <= 1 for r in trained)
    # the completions log gathers both processes' answers (each step: 4 prompts x 4), and under --scale-rewards batch
    # every answer's advantage divides by the standard deviation of all of the step's rewards, both processes'
    for k in ("one", "two"):
        lines = [json.loads(line) for line in (tmp_path / k / "completions.jsonl").read_text().splitlines()]
        assert [r["step"] for r in lines] == [1] * 16 + [2] * 16, k
        for step, m in enumerate(trained if k == "two" else [r for r in rows[k] if r.get("train_reward")], 1):
            mine = [r for r in lines if r["step"] == step]
            rewards = torch.tensor([r["reward"] for r in mine])
            assert float(rewards.mean()) == pytest.approx(float(m["train_reward"]), abs=1e-6)  # all of the step's
            groups = rewards.view(4, 4)
            expected = (groups - groups.mean(1, keepdim=True)) / (rewards.std() + 1e-4)
            assert [r["advantage"] for r in mine] == pytest.approx(expected.view(-1).tolist(), abs=1e-4), k
    _, meta = load_aligner(tmp_path / "two" / "aligner.safetensors")
    assert json.loads(meta["grpo"])["rewards"] == [letter_reward]


@pytest.mark.slow
def test_two_process_gdpo_and_adaptive_entropy_span_both_processes(tiny_checkpoint_dir, rows_file, letter_reward,
                                                                   tmp_path):
    # GDPO's step-wide mean and spread, the adaptive entropy control's step entropy and the top-entropy quantile's
    # tokens are reduced over both processes (collectives after every step and in every micro-batch: none may hang)
    common = ["finetune/aligner_grpo.py", "--checkpoint-dir", tiny_checkpoint_dir, "--data", rows_file, "--accelerator",
              "cpu", "--max-steps", "3", "--global-batch-size", "4", "--micro-batch-size", "1", "--n-tokens", "4",
              "--start-layer", "1", "--max-seq-length", "96", "--val-size", "4", "--eval-interval", "3",
              "--rewards", letter_reward, "concise", "--reward-weights", "1", "0.5", "--num-generations", "4",
              "--max-new-tokens", "12", "--no-progress", "--compare", "False", "--learning-rate", "0.1",
              "--multi-objective-aggregation", "normalize_then_sum", "--entropy-coef", "0.01",
              "--use-adaptive-entropy", "--entropy-target", "100", "--entropy-coef-delta", "0.05", "--log-completions",
              "--top-entropy-quantile", "0.5"]  # (the quantile's pool is gathered: a collective in every micro-batch)
    helpers.run_one_and_two_processes(common, tmp_path)
    for k in ("one", "two"):
        rows = [r for r in read_metrics(tmp_path / k / "metrics.csv") if r.get("train_reward")]
        assert [float(r["train_entropy_coef"]) for r in rows] == pytest.approx([0.0, 0.06, 0.11]), k
        lines = [json.loads(line) for line in (tmp_path / k / "completions.jsonl").read_text().splitlines()]
        for step in (1, 2, 3):
            mine = [r for r in lines if r["step"] == step]
            assert len(mine) == 16, k
            by_name = torch.tensor([[r["rewards"]["e_share"], r["rewards"]["concise"]] for r in mine]).view(4, 4, 2)
            expected = decoupled_advantages(None, by_name, [1.0, 0.5]).view(-1)
            assert [r["advantage"] for r in mine] == pytest.approx(expected.tolist(), abs=1e-4), (k, step)
