"""DPO with one base copy: the loss against an independent formula, learning a synthetic preference, the reference
path never trained, precomputed == on-the-fly reference, one base for policy and reference, paper checkpoints as
init/reference, and the finetune/aligner_dpo.py CLI on a tiny checkpoint."""

import json
import math
from pathlib import Path

import pytest
import torch

import helpers
from lit_aligner.aligner_files import load_aligner
from lit_aligner.config import Config
from lit_aligner.data import TokenizedDataset
from lit_aligner.evaluation import objective_metrics
from lit_aligner.losses import preference_loss, reference_sequence_logprobs, sequence_logprobs
from lit_aligner.model import Aligner, AlignerConfig, LLaMA, init_weights, mark_only_aligner_as_trainable
from lit_aligner.training import DPOLossConfig as DPOConfig
from lit_aligner.training import TrainError
from lit_aligner.training.objectives.dpo import (DPO, WithReference, as_reference, precompute_reference,
                                                 reference_logprobs, resolve_reference, shared_lengths)
from lit_aligner.training.plot import read_metrics

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT.parent / "shared" / "data" / "aligner-paper-weights"
VOCAB = 320


def dpo_step_loss(model, batch, reference, cfg):
    """(mean loss over the batch's pairs, metric sums) of the DPO objective."""
    sums = DPO(0, reference=reference, config=cfg)(model, batch)
    return sums["loss"] / (batch["input_ids"].shape[0] // 2), sums


def collate_dpo(items, pad_id=0):
    return DPO(pad_id).collate(items)


def evaluate_dpo(model, dataset, reference, cfg, batch_size):
    return objective_metrics(model, DPO(0, reference=reference, config=cfg), dataset, None, batch_size)


def tiny_model(seed=0, n_tokens=2, start_layer=1):
    torch.manual_seed(seed)
    m = LLaMA(Config.from_name("tiny"), AlignerConfig(n_tokens, start_layer))
    init_weights(m, std=0.1)
    mark_only_aligner_as_trainable(m)
    return m


# ---------------------------------------------------------------------------------------------------------------------
# The losses: on fixed numbers against the formula written out with `math`, and every loss type against TRL's own
# trainers on the same rows and models

PC = [-12.0, -30.5, -7.25, -3.0]
PR = [-14.5, -29.0, -9.0, -3.0]
RC = [-13.0, -31.0, -7.0, -2.5]
RR = [-13.5, -28.0, -9.5, -4.0]
NC, NR = [3, 9, 2, 1], [4, 8, 3, 1]


def _logsigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _fixed(loss, **kw):
    t = [torch.tensor(v, dtype=torch.float64) for v in (PC, PR, RC, RR, NC, NR)]
    return preference_loss(*t, loss=loss, **kw)


@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.0), (0.1, 0.2)])
def test_sigmoid_loss_matches_the_formula(beta, eps):
    losses, cr, rr = _fixed("sigmoid", beta=beta, label_smoothing=eps)
    for i in range(len(PC)):
        h = (PC[i] - RC[i]) - (PR[i] - RR[i])
        want = -(1 - eps) * _logsigmoid(beta * h) - eps * _logsigmoid(-beta * h)
        assert losses[i].item() == pytest.approx(want, rel=1e-12, abs=1e-12)
        assert cr[i].item() == pytest.approx(beta * (PC[i] - RC[i]))
        assert rr[i].item() == pytest.approx(beta * (PR[i] - RR[i]))


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_ipo_loss_is_on_per_token_log_ratios(beta):
    losses, _, _ = _fixed("ipo", beta=beta)
    for i in range(len(PC)):
        h = (PC[i] - RC[i]) / NC[i] - (PR[i] - RR[i]) / NR[i]  # IPO's authors' (and TRL's) length-normalised form
        assert losses[i].item() == pytest.approx((h - 1 / (2 * beta)) ** 2, rel=1e-12)


def test_losses_add_up_with_their_weights_and_reference_free_ones_read_no_reference():
    mpo, _, _ = _fixed(("sigmoid", "bco_pair", "sft"), weights=(0.8, 0.2, 1.0))
    parts = [_fixed(name)[0] for name in ("sigmoid", "bco_pair", "sft")]
    assert torch.allclose(mpo, 0.8 * parts[0] + 0.2 * parts[1] + parts[2])
    assert torch.allclose(parts[2], torch.full((4,), -sum(PC) / sum(NC), dtype=torch.float64))  # one batch mean
    t = [torch.tensor(v, dtype=torch.float64) for v in (PC, PR, NC, NR)]
    free, cr, _ = preference_loss(t[0], t[1], None, None, t[2], t[3], beta=2.0, loss=("simpo", "orpo"))
    assert torch.allclose(cr, 2.0 * t[0] / t[2])  # rewards: beta times the average log-prob, as TRL's CPO logs them
    assert torch.isfinite(free).all()
    with pytest.raises(ValueError, match="sigmoid need reference"):
        preference_loss(t[0], t[1], None, None, t[2], t[3], loss=("sigmoid", "sft"))


def test_loss_gradient_pushes_chosen_up_and_rejected_down():
    for loss in ("sigmoid", "simpo", "orpo", "ipo"):
        pc, pr = torch.tensor([-5.0], requires_grad=True), torch.tensor([-5.0], requires_grad=True)
        ref, n = torch.tensor([-5.0]), torch.tensor([2])
        losses, _, _ = preference_loss(pc, pr, ref, ref, n, n, beta=0.1, loss=loss)
        losses.sum().backward()
        assert pc.grad.item() < 0 < pr.grad.item(), loss  # descending raises log pi(chosen), lowers log pi(rejected)


def test_bad_options_raise_clear_errors():
    with pytest.raises(TrainError, match="--loss must be one or more of"):
        DPOConfig(loss="kto")
    with pytest.raises(TrainError, match="--beta"):
        DPOConfig(beta=0)
    with pytest.raises(TrainError, match="--label-smoothing applies to"):
        DPOConfig(loss="ipo", label_smoothing=0.1)
    with pytest.raises(TrainError, match="exo_pair needs --label-smoothing"):
        DPOConfig(loss="exo_pair")
    with pytest.raises(TrainError, match="2 weights for 3 losses"):
        DPOConfig(loss=("sigmoid", "bco_pair", "sft"), loss_weights=(0.8, 0.2))
    with pytest.raises(TrainError, match="names a loss twice"):
        DPOConfig(loss=("sigmoid", "sigmoid"))
    with pytest.raises(TrainError, match="--simpo-gamma applies to --loss simpo only"):
        DPOConfig(simpo_gamma=1.0)
    with pytest.raises(TrainError, match="--discopop-tau applies"):
        DPOConfig(discopop_tau=0.1)
    with pytest.raises(TrainError, match="generalises only the losses .* not bco_pair"):
        DPOConfig(loss=("sigmoid", "bco_pair"), f_divergence="js_divergence")
    with pytest.raises(TrainError, match="--f-alpha applies to --f-divergence alpha_divergence only"):
        DPOConfig(f_alpha=0.3)
    with pytest.raises(TrainError, match=r"--ld-alpha must be in \[0, 1\]"):
        DPOConfig(ld_alpha=1.5)
    with pytest.raises(TrainError, match="--ld-alpha .* does not apply to simpo"):
        DPOConfig(loss="simpo", ld_alpha=0.5)
    with pytest.raises(TrainError, match="--use-weighting weighs each pair, and aot"):
        DPOConfig(loss=("sigmoid", "aot"), use_weighting=True)
    with pytest.raises(TrainError, match="--alpha .AlphaPO. shapes the log-probs that --loss cpo and simpo"):
        DPOConfig(loss="orpo", alpha=0.25)
    with pytest.raises(TrainError, match="--alpha must be a finite number"):
        DPOConfig(loss="simpo", alpha=float("inf"))
    assert DPOConfig(loss="ipo").loss == ("ipo",)  # one name from the library's callers
    assert DPOConfig(loss=("simpo", "sft")).reference_free and not DPOConfig(loss=("simpo", "ipo")).reference_free


TRL_VOCAB = 64
# TRL 1.16's DPOTrainer loss types; aot sorts over the batch, so its rows are scored as one batch by both
TRL_DPO_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


@pytest.fixture(scope="module")
def trl_setting():
    """Two different random tiny transformers Llamas (policy and reference; new ones for each test, as a TRL trainer
    may patch the model it is given) and 4 pairs of different lengths, written in the benchmark's word tokenizer
    ("t17 t3" -> [17, 3]) so that TRL tokenizes exactly these ids."""
    trl = pytest.importorskip("trl")
    import datasets
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=TRL_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)

    def models():
        torch.manual_seed(0)
        policy = transformers.LlamaForCausalLM(cfg).eval()
        return policy, transformers.LlamaForCausalLM(cfg).eval()

    g = torch.Generator().manual_seed(0)

    def text(n, end=False):
        ids = torch.randint(1, TRL_VOCAB - 1, (n,), generator=g).tolist() + ([TRL_VOCAB - 1] if end else [])
        return " ".join(f"t{i}" for i in ids)

    rows = [{"prompt": text(5 + i), "chosen": " " + text(3 + 2 * i, True), "rejected": " " + text(7 - i, True)}
            for i in range(4)]
    tokenizer = helpers.load_benchmark("train").word_tokenizer(TRL_VOCAB)
    datasets.disable_progress_bars()
    yield trl, models, datasets.Dataset.from_list(rows), tokenizer
    datasets.enable_progress_bars()


def _ours(model, input_ids, attention_mask, labels):
    """Our summed response log-probs and response token counts of TRL's own padded rows (labels -100 elsewhere)."""
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return reference_sequence_logprobs(logits, labels), (labels[:, 1:] != -100).sum(1)


def _trl_eval(trainer) -> dict:
    import transformers

    trainer.remove_callback(transformers.PrinterCallback)  # a line of metrics per evaluation
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        return trainer.evaluate()
    finally:
        transformers.logging.set_verbosity(verbosity)


@pytest.mark.filterwarnings("ignore")
def test_every_dpo_loss_type_equals_trls_dpo_trainer_on_the_same_rows(trl_setting, tmp_path):
    trl, models, dataset, tokenizer = trl_setting
    policy, reference = models()
    args = trl.DPOConfig(output_dir=str(tmp_path), per_device_eval_batch_size=4, beta=0.3, max_length=None,
                         use_cpu=True, report_to="none", bf16=False, disable_tqdm=True, label_smoothing=0.1)
    trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=dataset,
                             eval_dataset=dataset, processing_class=tokenizer)
    batch = next(iter(trainer.get_eval_dataloader()))  # all 4 pairs: chosen rows, then rejected rows
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    pol, n = _ours(policy, batch["input_ids"], batch["attention_mask"], labels)
    ref, _ = _ours(reference, batch["input_ids"], batch["attention_mask"], labels)
    assert n.tolist() == [4, 6, 8, 10, 8, 7, 6, 5]  # the responses' lengths and their end token: TRL added nothing
    cases = [((name,), None) for name in TRL_DPO_LOSSES] + [(("sigmoid", "bco_pair", "sft"), (0.8, 0.2, 1.0))]
    for names, weights in cases:
        trainer.loss_types, trainer.loss_weights = list(names), list(weights or [1.0] * len(names))
        # TRL 1.16's sigmoid reads no label smoothing (ours does: conservative DPO), so compare it at 0
        eps = 0.1 if set(names) & {"exo_pair", "robust", "aot", "aot_unpaired"} else 0.0
        trainer.label_smoothing = eps
        got = _trl_eval(trainer)
        losses, cr, rr = preference_loss(pol[:4], pol[4:], ref[:4], ref[4:], n[:4], n[4:], beta=0.3, loss=names,
                                         weights=weights, label_smoothing=eps)
        assert losses.mean().item() == pytest.approx(got["eval_loss"], rel=1e-5, abs=1e-6), names
        if names == ("sft",):  # reference-free here: no implicit rewards to compare
            continue
        assert cr.mean().item() == pytest.approx(got["eval_rewards/chosen"], rel=1e-5, abs=1e-6)
        assert (cr - rr).mean().item() == pytest.approx(got["eval_rewards/margins"], rel=1e-5, abs=1e-6)
    trainer.label_smoothing = 0.0
    # f-DPO: each divergence on the losses it generalises
    for divergence, alpha in [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.3)]:
        trainer.f_divergence_type, trainer.f_alpha_divergence_coef = divergence, alpha
        for name in ("sigmoid", "ipo", "sigmoid_norm", "hinge"):
            trainer.loss_types, trainer.loss_weights = [name], [1.0]
            losses, _, _ = preference_loss(pol[:4], pol[4:], ref[:4], ref[4:], n[:4], n[4:], beta=0.3, loss=name,
                                           f_divergence=divergence, f_alpha=alpha)
            assert losses.mean().item() == pytest.approx(_trl_eval(trainer)["eval_loss"], rel=1e-5), (divergence, name)
    # LD-DPO: the tokens past a pair's shorter response count ld_alpha times, in policy and reference alike
    trainer.f_divergence_type, trainer.loss_types, trainer.ld_alpha = "reverse_kl", ["sigmoid"], 0.25
    eye = torch.eye(TRL_VOCAB)  # our sequence_logprobs on the models' logits: an identity "LM head"
    cap = shared_lengths(labels)
    assert cap.tolist() == [4, 6, 6, 5] * 2
    with torch.no_grad():
        pol_ld, ref_ld = (sequence_logprobs(m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                                            .logits, eye, labels, cap=cap, tail_weight=0.25)
                          for m in (policy, reference))
    assert not torch.allclose(pol_ld, pol)  # the longer responses' tails weigh less
    losses, _, _ = preference_loss(pol_ld[:4], pol_ld[4:], ref_ld[:4], ref_ld[4:], n[:4], n[4:], beta=0.3)
    assert losses.mean().item() == pytest.approx(_trl_eval(trainer)["eval_loss"], rel=1e-5)
    # WPO: each pair's loss times its answers' weights (TRL reads log sum p^2 from a LM head set up at its start)
    policy, reference = models()
    args.use_weighting = True
    trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=dataset,
                             eval_dataset=dataset, processing_class=tokenizer)
    with torch.no_grad():
        _, weights = sequence_logprobs(policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                                       .logits, eye, labels, wpo=True)
    assert (weights > 0).all() and weights.std() > 0.01  # random answers: likely to a varying degree
    for names in [("sigmoid",), ("ipo", "hinge")]:  # TRL 1.16 fails on sft with weighting (in place on a view)
        trainer.loss_types, trainer.loss_weights = list(names), [1.0] * len(names)
        losses, _, _ = preference_loss(pol[:4], pol[4:], ref[:4], ref[4:], n[:4], n[4:], beta=0.3, loss=names)
        wpo = (losses * weights[:4] * weights[4:]).mean().item()
        assert wpo == pytest.approx(_trl_eval(trainer)["eval_loss"], rel=1e-5)
        assert wpo != pytest.approx(losses.mean().item(), rel=1e-3)


@pytest.mark.filterwarnings("ignore")
def test_simpo_cpo_and_orpo_equal_trls_cpo_and_orpo_trainers(trl_setting, tmp_path):
    trl, models, dataset, tokenizer = trl_setting
    policy, _ = models()
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    common = dict(output_dir=str(tmp_path), per_device_eval_batch_size=4, use_cpu=True, report_to="none", bf16=False,
                  disable_tqdm=True)
    simpo = CPOTrainer(model=policy, args=CPOConfig(loss_type="simpo", cpo_alpha=0.0, beta=2.0, simpo_gamma=0.7,
                                                    label_smoothing=0.1, **common),
                       train_dataset=dataset, eval_dataset=dataset, processing_class=tokenizer)
    batch = next(iter(simpo.get_eval_dataloader()))
    c, nc = _ours(policy, batch["chosen_input_ids"], batch["chosen_attention_mask"], batch["chosen_labels"])
    r, nr = _ours(policy, batch["rejected_input_ids"], batch["rejected_attention_mask"], batch["rejected_labels"])
    assert nc.tolist() == [4, 6, 8, 10] and nr.tolist() == [8, 7, 6, 5]
    got = _trl_eval(simpo)
    losses, cr, _ = preference_loss(c, r, None, None, nc, nr, beta=2.0, loss="simpo", label_smoothing=0.1,
                                    simpo_gamma=0.7)
    assert losses.mean().item() == pytest.approx(got["eval_loss"], rel=1e-5)
    assert cr.mean().item() == pytest.approx(got["eval_rewards/chosen"], rel=1e-5)
    # CPO, CPOTrainer's default: the sigmoid on summed log-probs plus cpo_alpha x the chosen answers' NLL (our sft)
    cpo = CPOTrainer(model=policy, args=CPOConfig(loss_type="sigmoid", cpo_alpha=0.5, beta=0.3, label_smoothing=0.1,
                                                  **common),
                     train_dataset=dataset, eval_dataset=dataset, processing_class=tokenizer)
    got = _trl_eval(cpo)
    losses, cr, rr = preference_loss(c, r, None, None, nc, nr, beta=0.3, loss=("cpo", "sft"), weights=(1.0, 0.5),
                                     label_smoothing=0.1)
    assert losses.mean().item() == pytest.approx(got["eval_loss"], rel=1e-5)
    assert (cr - rr).mean().item() == pytest.approx(got["eval_rewards/margins"], rel=1e-5)
    # AlphaPO: CPOTrainer's alpha reshapes the log-probs of its SimPO (averaged) and of CPO (summed), rewards too
    for loss_type, ours, weights, alpha in (("simpo", "simpo", (1.0,), 0.25), ("sigmoid", ("cpo", "sft"), (1.0, 0.5),
                                                                              -0.1)):
        shaped = CPOTrainer(model=policy, args=CPOConfig(loss_type=loss_type, cpo_alpha=weights[-1] if
                                                         loss_type == "sigmoid" else 0.0, beta=0.3, alpha=alpha,
                                                         simpo_gamma=0.7, **common),
                            train_dataset=dataset, eval_dataset=dataset, processing_class=tokenizer)
        got = _trl_eval(shaped)
        losses, cr, rr = preference_loss(c, r, None, None, nc, nr, beta=0.3, loss=ours, weights=weights,
                                         simpo_gamma=0.7, alpha=alpha)
        plain, pcr, _ = preference_loss(c, r, None, None, nc, nr, beta=0.3, loss=ours, weights=weights,
                                        simpo_gamma=0.7)
        assert losses.mean().item() == pytest.approx(got["eval_loss"], rel=1e-5), loss_type
        assert cr.mean().item() == pytest.approx(got["eval_rewards/chosen"], rel=1e-5)
        # (a small difference of two rewards near -2: fp32's rounding of each, not a relative 1e-5 of the margin)
        assert (cr - rr).mean().item() == pytest.approx(got["eval_rewards/margins"], rel=1e-5, abs=1e-6)
        assert losses.mean().item() != pytest.approx(plain.mean().item(), rel=1e-3) and not torch.allclose(cr, pcr)

    orpo = ORPOTrainer(model=policy, args=ORPOConfig(beta=0.3, **common), train_dataset=dataset,
                       eval_dataset=dataset, processing_class=tokenizer)
    got = _trl_eval(orpo)
    losses, _, _ = preference_loss(c, r, None, None, nc, nr, beta=0.3, loss="orpo")
    nll = -c.sum() / nc.sum()  # ours: the chosen responses' tokens (TRL's experimental trainer adds the prompt's)
    assert got["eval_nll_loss"] != pytest.approx(nll.item(), rel=1e-4)  # so the totals differ by that term only
    assert losses.mean().item() == pytest.approx(nll.item() - 0.3 * got["eval_log_odds_ratio"], rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# A learnable synthetic preference on a tiny model

MARK = [7, 8, 9]  # chosen responses end with this pattern; rejected ones with a different random tail


def synthetic_pairs(n, seed):
    g = torch.Generator().manual_seed(seed)
    triples = []
    for _ in range(n):
        prompt = torch.randint(20, VOCAB, (int(torch.randint(4, 9, (1,), generator=g)),), generator=g)
        body = torch.randint(20, VOCAB, (3,), generator=g)
        chosen = torch.cat([body, torch.tensor(MARK)])
        rejected = torch.cat([body, torch.randint(20, VOCAB, (3,), generator=g)])
        triples.append((prompt, chosen, rejected))
    return TokenizedDataset.from_rows("preference", triples)


def train_steps(model, data, reference, cfg, steps, lr=0.05, batch=8, seed=0):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(data), (batch,), generator=g).tolist()
        loss, _ = dpo_step_loss(model, collate_dpo([data[i] for i in idx]), reference, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_held_out_reward_accuracy_rises_above_chance():
    model = tiny_model()
    train, val = synthetic_pairs(64, seed=1), synthetic_pairs(32, seed=2)
    cfg = DPOConfig(beta=0.5)
    before = evaluate_dpo(model, val, False, cfg, batch_size=16)
    # zero gates: the policy is the bare base, so every reward (and margin) starts at exactly 0
    assert before["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    train_steps(model, train, False, cfg, steps=40)
    after = evaluate_dpo(model, val, False, cfg, batch_size=16)
    assert after["reward_accuracy"] >= 0.85, after
    assert after["loss"] < before["loss"] - 0.1, (before, after)
    assert after["reward_margin"] > 0


def test_ld_alpha_zero_scores_each_pair_up_to_its_shorter_answer_and_one_is_dpo():
    """LD-DPO through the objective: at 0 the tokens past the shorter answer of a pair count nothing, so the loss
    equals DPO's on the pairs cut to that length (a causal model scores a prefix the same without what follows)."""
    model = tiny_model()
    with torch.no_grad():
        model.aligner.gate.normal_(0, 0.5)
    g = torch.Generator().manual_seed(9)
    ids = [(torch.randint(20, VOCAB, (5,), generator=g), torch.randint(20, VOCAB, (n,), generator=g),
            torch.randint(20, VOCAB, (m,), generator=g)) for n, m in [(7, 3), (2, 6), (4, 4)]]
    full = collate_dpo(TokenizedDataset.from_rows("preference", ids))
    short = [(p, c[:min(len(c), len(r))], r[:min(len(c), len(r))]) for p, c, r in ids]
    cut = collate_dpo(TokenizedDataset.from_rows("preference", short))
    reference = as_reference(tiny_model(seed=1).aligner)
    with torch.no_grad():
        ld0, _ = dpo_step_loss(model, full, reference, DPOConfig(ld_alpha=0.0))
        want, _ = dpo_step_loss(model, cut, reference, DPOConfig())
        ld1, _ = dpo_step_loss(model, full, reference, DPOConfig(ld_alpha=1.0))
        dpo, _ = dpo_step_loss(model, full, reference, DPOConfig())
    assert ld0.item() == pytest.approx(want.item(), rel=1e-5) and ld1.item() == pytest.approx(dpo.item(), rel=1e-6)
    assert abs(ld0.item() - dpo.item()) > 1e-4


def test_wpo_weighs_each_pair_by_the_policys_probability_of_its_two_answers():
    """--use-weighting through the objective: the batch's loss is each pair's own DPO loss (the pair alone) times
    the weights of its two answers, computed here from the model's whole next-token distributions."""
    model = tiny_model()
    with torch.no_grad():
        model.aligner.gate.normal_(0, 0.5)
    data = synthetic_pairs(4, seed=5)
    reference = as_reference(model.aligner)
    with torch.no_grad():
        model.aligner.gate.mul_(1.5)  # the policy moves away from its reference: non-zero DPO losses

    def weight(prompt, answer):
        idx = torch.cat([prompt, answer])[None]
        probs = torch.softmax(model(idx), -1)[0, len(prompt) - 1:-1]
        return torch.exp(torch.log(probs[torch.arange(len(answer)), answer] / (probs ** 2).sum(-1)).mean())

    with torch.no_grad():
        each = [dpo_step_loss(model, collate_dpo([data[i]]), reference, DPOConfig())[0] for i in range(4)]
        weights = [weight(data[i]["prompt"], data[i]["chosen"]) * weight(data[i]["prompt"], data[i]["rejected"])
                   for i in range(4)]
        batch = collate_dpo([data[i] for i in range(4)])
        got, _ = dpo_step_loss(model, batch, reference, DPOConfig(use_weighting=True))
        plain, _ = dpo_step_loss(model, batch, reference, DPOConfig())
    assert got.item() == pytest.approx(sum(l * w for l, w in zip(each, weights)).item() / 4, rel=1e-5)
    assert plain.item() == pytest.approx(sum(each).item() / 4, rel=1e-5) and abs(got - plain) > 1e-3
    assert len({round(w.item(), 4) for w in weights}) == 4


@pytest.mark.parametrize("cfg", [DPOConfig(loss="simpo", beta=2.0, simpo_gamma=0.5), DPOConfig(loss="orpo", beta=0.5)],
                         ids=["simpo", "orpo"])
def test_reference_free_losses_learn_the_preference_with_one_pass_a_step(cfg, monkeypatch):
    model = tiny_model()
    train, val = synthetic_pairs(64, seed=1), synthetic_pairs(32, seed=2)
    reference = as_reference(model.aligner)  # given, but these losses never read it
    before = evaluate_dpo(model, val, reference, cfg, batch_size=16)
    calls = []
    original = LLaMA.forward

    def spy(self, idx, *args, **kwargs):
        calls.append(kwargs.get("aligner"))
        return original(self, idx, *args, **kwargs)

    monkeypatch.setattr(LLaMA, "forward", spy)
    train_steps(model, train, reference, cfg, steps=40)
    assert calls == [None] * 40  # the policy's pass only: no reference pass
    monkeypatch.undo()
    after = evaluate_dpo(model, val, reference, cfg, batch_size=16)
    assert after["reward_accuracy"] >= 0.85 > before["reward_accuracy"], (before, after)
    assert after["loss"] < before["loss"] - 0.1 and after["reward_margin"] > before["reward_margin"]


# ---------------------------------------------------------------------------------------------------------------------
# The reference path, one base copy, precomputed reference


def test_reference_never_receives_gradients_and_base_is_untouched():
    model = tiny_model()
    with torch.no_grad():
        model.aligner.gate.normal_(0, 0.5)
    reference = as_reference(model.aligner)
    assert reference is not model.aligner and not reference.prefix.requires_grad
    base_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("aligner.")}
    data = synthetic_pairs(8, seed=3)
    batch = collate_dpo([data[i] for i in range(4)])
    ref_lp = reference_logprobs(model, batch["input_ids"], batch["labels"], reference)
    assert not ref_lp.requires_grad and ref_lp.grad_fn is None  # computed under no_grad
    train_steps(model, data, reference, DPOConfig(), steps=3)
    assert reference.prefix.grad is None and reference.gate.grad is None
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("aligner."))
    for k, v in model.state_dict().items():
        if k in base_before:
            assert torch.equal(v, base_before[k]), k
    # the policy moved, the reference (a private copy) did not
    assert not torch.equal(model.aligner.gate, reference.gate)


def test_policy_and_reference_share_one_base(monkeypatch):
    """Both passes go through the same LLaMA object: count forward calls and parameters."""
    model = tiny_model()
    reference = as_reference(model.aligner)
    n_params = sum(p.numel() for p in model.parameters())
    calls = []
    original = LLaMA.forward

    def spy(self, idx, *args, **kwargs):
        calls.append((id(self), kwargs.get("aligner")))
        return original(self, idx, *args, **kwargs)

    monkeypatch.setattr(LLaMA, "forward", spy)
    data = synthetic_pairs(4, seed=4)
    dpo_step_loss(model, collate_dpo([data[i] for i in range(4)]), reference, DPOConfig())
    assert [c[0] for c in calls] == [id(model), id(model)]
    assert calls[0][1] is reference and calls[1][1] is None  # reference pass, then the policy (model.aligner)
    # the reference adds an Aligner's worth of parameters, not a second base
    assert sum(p.numel() for p in reference.parameters()) == model.aligner.num_params()
    assert sum(p.numel() for p in model.parameters()) == n_params


@pytest.mark.parametrize("with_reference_aligner", [False, True])
def test_precomputed_reference_equals_on_the_fly(with_reference_aligner):
    model = tiny_model()
    with torch.no_grad():
        model.aligner.gate.normal_(0, 0.5)
    reference = as_reference(model.aligner) if with_reference_aligner else False
    with torch.no_grad():  # move the policy away from the reference so the loss is not trivially log(2)
        model.aligner.gate.add_(0.3)
    data = synthetic_pairs(10, seed=5)
    ref = precompute_reference(model, data, DPO(0, reference=reference), batch_size=3)
    cached = WithReference(data, ref)
    cfg = DPOConfig()
    for start in (0, 4):
        items = [start + i for i in range(4)]
        loss_fly, m_fly = dpo_step_loss(model, collate_dpo([data[i] for i in items]), reference, cfg)
        batch = collate_dpo([cached[i] for i in items])
        assert "ref_logps" in batch
        loss_pre, m_pre = dpo_step_loss(model, batch, reference, cfg)
        torch.testing.assert_close(loss_pre, loss_fly, rtol=1e-5, atol=1e-5)
        for k in m_fly:
            torch.testing.assert_close(m_pre[k], m_fly[k], rtol=1e-5, atol=1e-5)
    # and the rows really differ from the bare base when the reference is an Aligner
    if with_reference_aligner:
        bare = precompute_reference(model, data, DPO(0, reference=False))
        assert not torch.allclose(bare["chosen"], ref["chosen"])


def test_collate_preference_rows_are_chosen_then_rejected():
    data = synthetic_pairs(3, seed=6)
    batch = collate_dpo([data[i] for i in range(3)])
    for i in range(3):
        c = data[i]["chosen"]
        labelled = batch["labels"][i][batch["labels"][i] != -100]
        assert torch.equal(labelled, c)


# ---------------------------------------------------------------------------------------------------------------------
# Init / reference Aligner files, including the paper's .pth


def test_resolve_reference_defaults():
    model = tiny_model()
    ref, desc = resolve_reference(None, None, model)
    assert ref is False and desc == "none"
    ref, desc = resolve_reference(None, model.aligner, model)
    assert isinstance(ref, Aligner) and desc == "init" and torch.equal(ref.prefix, model.aligner.prefix)
    ref, desc = resolve_reference("none", model.aligner, model)
    assert ref is False


def test_our_file_and_a_paper_pth_load_as_init_or_reference(tmp_path):
    from lit_aligner.aligner_files import export_paper_checkpoint, save_aligner

    model = tiny_model()
    with torch.no_grad():
        model.aligner.gate.normal_(0, 0.5)
    ours = save_aligner(model.aligner, tmp_path / "a.safetensors", "tiny", {"mode": "sft"})
    pth = export_paper_checkpoint(model.aligner, tmp_path / "a.pth")
    for path in (ours, pth):
        a, _ = load_aligner(path, model)
        torch.testing.assert_close(a.gate, model.aligner.gate)
        ref, desc = resolve_reference(str(path), None, model)
        assert desc == str(path) and not ref.gate.requires_grad


@pytest.mark.skipif(not PAPER.is_dir(), reason="../shared/data/aligner-paper-weights is not available")
def test_real_paper_checkpoint_imports_and_names_the_shape_mismatch():
    from lit_aligner.aligner_files import AlignerFileError, import_paper_checkpoint

    path = PAPER / "beaver-dpo-llama2-7b-1token.pth"
    aligner, meta = import_paper_checkpoint(path)
    assert tuple(aligner.prefix.shape) == (1, 4096) and tuple(aligner.gate.shape) == (30, 32)
    model = tiny_model()  # LLaMA-2-7B-shaped Aligner against a tiny base: one clear error
    with pytest.raises(AlignerFileError, match="does not fit"):
        load_aligner(path, model)
    with pytest.raises(AlignerFileError, match="not a checkpoint"):
        resolve_reference(str(PAPER / "published-but-not-a-checkpoint.pth"), None, model)


@pytest.mark.skipif(not PAPER.is_dir(), reason="../shared/data/aligner-paper-weights is not available")
def test_paper_checkpoint_loads_as_init_and_reference_on_a_llama2_7b_shaped_base():
    """The real beaver DPO checkpoint against a LLaMA-2-7B-shaped base built on the meta device (no 7B weights)."""
    from lit_aligner.aligner_files import import_paper_checkpoint

    path = PAPER / "beaver-dpo-llama2-7b-1token.pth"
    with torch.device("meta"):
        base = LLaMA(Config.from_name("Llama-2-7b-hf"))
    aligner, _ = load_aligner(path, base)
    assert (aligner.n_tokens, aligner.start_layer) == (1, 2)
    assert tuple(aligner.gate.shape) == (30, 32) and aligner.prefix.device.type == "meta"
    ref, desc = resolve_reference(str(path), None, base)
    assert desc == str(path) and not ref.gate.requires_grad
    # the values that would be loaded are the file's: gates and the shared prefix token
    cpu, _ = import_paper_checkpoint(path)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    torch.testing.assert_close(cpu.prefix.float(), raw["global_value_embedding.weight"].float())
    torch.testing.assert_close(cpu.gate[5].float(), raw["transformer.h.7.attn.gating_factor"].float().flatten())


# ---------------------------------------------------------------------------------------------------------------------
# run_dpo and the finetune/aligner_dpo.py CLI on the tiny checkpoint (conftest.tiny_checkpoint_dir)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """160 of the default dataset's pairs as a {prompt, chosen, rejected} JSONL file (chosen: the FORMAT)."""
    from lit_aligner.data.default import generate_preference_rows

    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    rows = [{"prompt": f"{r['prompt']}\n{r['input']}".strip(), "chosen": r["chosen"], "rejected": r["rejected"]}
            for r in generate_preference_rows(160, seed=5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def dpo_run_config(ckpt, out, **kw):
    from lit_aligner.data import DataOptions
    from lit_aligner.training import DPORunConfig, DPOTrainConfig

    train = dict(max_steps=8, learning_rate=0.1, global_batch_size=8, micro_batch_size=4, warmup_steps=1,
                 eval_interval=4, eval_iters="all", save_interval=4, seed=7)
    train.update(kw.pop("train", {}))
    base = dict(checkpoint_dir=ckpt, data=kw.pop("data"), out_dir=out, n_tokens=4, start_layer=1, accelerator="cpu",
                progress=False, data_options=DataOptions(max_seq_length=128, val_fraction=0.1),
                dpo=DPOConfig(beta=0.5))
    base.update(kw)
    return DPORunConfig(train=DPOTrainConfig(**train), **base)


def run_dpo(cfg):
    from lit_aligner.training import train

    return train(cfg)


def run_script(*args):
    return helpers.run_script(*args, timeout=600, env={"OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def short_dpo_run(tiny_checkpoint_dir, pairs_file, tmp_path_factory):
    """8 DPO steps on the default preference pairs (chosen = the FORMAT the base does not follow)."""
    out = tmp_path_factory.mktemp("dpo") / "run"
    return run_dpo(dpo_run_config(tiny_checkpoint_dir, out, data=pairs_file)), out


def test_a_short_run_writes_the_aligner_and_metrics_and_learns_the_preference(short_dpo_run):
    summary, out = short_dpo_run
    rows = read_metrics(out / "metrics.csv")
    assert {"step", "train_loss", "val_loss", "val_reward_accuracy", "val_reward_margin",
            "train_reward_accuracy"} <= set(rows[0])
    evals = [r for r in rows if r["val_loss"]]
    assert evals[0]["step"] == "0" and evals[-1]["step"] == "8"
    assert float(evals[0]["val_reward_accuracy"]) == pytest.approx(0.5)  # policy == reference (bare base): ties
    assert float(evals[-1]["val_loss"]) < float(evals[0]["val_loss"]) - 0.05, evals
    assert float(evals[-1]["val_reward_accuracy"]) > 0.6 and float(evals[-1]["val_reward_margin"]) > 0
    aligner, meta = load_aligner(out / "aligner.safetensors")
    assert meta["mode"] == "dpo" and meta["loss"] == "sigmoid" and json.loads(meta["beta"]) == 0.5
    assert meta["reference"] == "none" and meta["template"] == "chat"
    assert aligner.gate.abs().sum() > 0  # trained away from the zero-gate start
    assert (out / "state" / "last.pt").is_file()


def test_eval_only_prints_the_metrics_as_json_on_the_last_line(short_dpo_run, tiny_checkpoint_dir,
                                                                pairs_file):
    summary, out = short_dpo_run
    r = run_script("finetune/aligner_dpo.py", "--checkpoint-dir", tiny_checkpoint_dir, "--eval-only",
                   "--data", pairs_file, "--init-aligner", out / "aligner.safetensors", "--reference-aligner", "none",
                   "--max-seq-length", "128", "--val-fraction", "0.1", "--seed", "7", "--eval-iters", "all",
                   "--beta", "0.5", "--accelerator", "cpu", "--out-dir", out.parent / "eval")
    assert r.returncode == 0, r.stderr
    metrics = json.loads(r.stdout.strip().splitlines()[-1])
    # the same Aligner, reference and validation split as the end of the run: the same metrics
    assert metrics["reward_accuracy"] == pytest.approx(summary["val"]["reward_accuracy"])
    assert metrics["loss"] == pytest.approx(summary["val"]["loss"], rel=1e-4)
    assert metrics["pairs"] == summary["val"]["pairs"] and metrics["reference"] == "none"
    # and the trained Aligner as its own reference: every reward is zero, accuracy exactly chance
    r = run_script("finetune/aligner_dpo.py", "--checkpoint-dir", tiny_checkpoint_dir, "--eval-only",
                   "--data", pairs_file, "--init-aligner", out / "aligner.safetensors", "--max-seq-length", "128",
                   "--val-fraction", "0.1", "--seed", "7", "--accelerator", "cpu", "--out-dir", out.parent / "eval2")
    assert r.returncode == 0, r.stderr
    metrics = json.loads(r.stdout.strip().splitlines()[-1])
    assert metrics["reference"] == "init" and metrics["reward_accuracy"] == 0.5 and metrics["reward_margin"] == 0.0


def test_precomputing_the_reference_is_refused_under_fsdp():
    from lit_aligner.training import DPORunConfig

    with pytest.raises(TrainError, match="--precompute-reference .* --strategy fsdp"):
        DPORunConfig(precompute_reference=True, strategy="fsdp").check()
    DPORunConfig(precompute_reference=True, strategy="ddp").check()


def test_a_run_with_several_losses_records_them_and_a_reference_free_one_refuses_a_reference(
        tiny_checkpoint_dir, pairs_file, tmp_path):
    cfg = dpo_run_config(tiny_checkpoint_dir, tmp_path / "mpo", data=pairs_file, train={"max_steps": 4},
                         dpo=DPOConfig(beta=0.5, loss=("sigmoid", "bco_pair", "sft"), loss_weights=(0.8, 0.2, 1.0),
                                       use_weighting=True))
    summary = run_dpo(cfg)
    _, meta = load_aligner(tmp_path / "mpo" / "aligner.safetensors")
    assert meta["loss"] == "sigmoid,bco_pair,sft" and json.loads(meta["loss_weights"]) == [0.8, 0.2, 1.0]
    assert json.loads(meta["use_weighting"]) is True
    assert json.loads(meta["label_smoothing"]) == 0.0 and "simpo_gamma" not in meta
    assert math.isfinite(summary["val"]["loss"])
    r = run_script("finetune/aligner_dpo.py", "--checkpoint-dir", tiny_checkpoint_dir, "--data", pairs_file,
                   "--loss", "simpo", "--precompute-reference", "--out-dir", tmp_path / "simpo")
    assert r.returncode != 0 and not (tmp_path / "simpo").exists()
    assert r.stderr.strip().splitlines() == ["error: --loss simpo reads no reference: drop --precompute-reference (or "
                                             "add a loss that compares with a reference, e.g. sigmoid)"]


def test_eval_only_refuses_a_wandb_project_it_would_not_log_to():
    from lit_aligner.training import DPORunConfig

    with pytest.raises(TrainError, match="--eval-only logs no run to Weights & Biases: drop --wandb-project"):
        DPORunConfig(eval_only=True, wandb_project="t").check()


@pytest.mark.slow
def test_two_process_fsdp_dpo_equals_one_process(short_dpo_run, tiny_checkpoint_dir, pairs_file, tmp_path):
    # the policy starts at a trained Aligner and the reference is its frozen copy (not sharded: it reaches each
    # layer with the batch, while the policy's prefix is FSDP's), moved toward the policy after step 2 (TR-DPO: the
    # policy's shards gathered on each rank); the last step's validation too
    _, trained = short_dpo_run
    common = ["finetune/aligner_dpo.py", "--checkpoint-dir", tiny_checkpoint_dir, "--data", pairs_file,
              "--init-aligner", trained / "aligner.safetensors", "--max-seq-length", "128", "--val-fraction", "0.1",
              "--max-steps", "3", "--global-batch-size", "8", "--micro-batch-size", "2", "--learning-rate", "0.1",
              "--beta", "0.5", "--eval-interval", "3", "--eval-iters", "all", "--accelerator", "cpu", "--no-progress",
              "--sync-ref-model", "--ref-model-sync-steps", "2", "--ref-model-mixup-alpha", "0.5"]
    outs = [tmp_path / "one", tmp_path / "two"]
    for out, flags in zip(outs, ([], ["--devices", "2", "--strategy", "fsdp"])):
        r = run_script(*common, *flags, "--out-dir", out)
        assert r.returncode == 0, helpers.why(r)
    (a, _), (b, _) = (load_aligner(out / "aligner.safetensors") for out in outs)
    start, _ = load_aligner(trained / "aligner.safetensors")
    assert (a.prefix - start.prefix).abs().max() > 1e-3
    torch.testing.assert_close(b.prefix, a.prefix, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b.gate, a.gate, rtol=1e-4, atol=1e-5)
    losses = [[float(r["val_loss"]) for r in read_metrics(out / "metrics.csv") if r.get("val_loss")]
              for out in outs]
    assert len(losses[0]) == 2 and losses[1] == pytest.approx(losses[0], rel=1e-4)
    one, two = (torch.load(out / "state" / "last.pt", weights_only=True)["objective"] for out in outs)
    for name in ("prefix", "gate"):
        torch.testing.assert_close(two[f"reference_{name}"], one[f"reference_{name}"], rtol=1e-4, atol=1e-5)
    assert (one["reference_gate"] - start.gate).abs().max() > 1e-4  # the reference moved


def test_a_malformed_data_file_gives_one_error_line_naming_it(tiny_checkpoint_dir, tmp_path):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": "hi", "chosen": "a", "rejected": "b"}\n{"prompt": "hi", "chosen": \n')
    r = run_script("finetune/aligner_dpo.py", "--checkpoint-dir", tiny_checkpoint_dir, "--data", bad,
                   "--accelerator", "cpu", "--max-steps", "1", "--out-dir", tmp_path / "out" / "run")
    assert r.returncode == 1
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(bad) in err[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()  # the folders the run made for itself go again, left empty
    (tmp_path / "mine").mkdir()  # a folder the user made stays
    r = run_script("finetune/aligner_dpo.py", "--checkpoint-dir", tiny_checkpoint_dir, "--data", bad,
                   "--accelerator", "cpu", "--max-steps", "1", "--out-dir", tmp_path / "mine")
    assert r.returncode == 1 and (tmp_path / "mine").is_dir() and not any((tmp_path / "mine").iterdir())


def test_resume_continues_exactly_like_an_uninterrupted_run(tiny_checkpoint_dir, pairs_file, tmp_path):
    def config(out, steps, **kw):
        return dpo_run_config(tiny_checkpoint_dir, tmp_path / out, data=pairs_file,
                              train=dict(max_steps=steps, eval_interval=2, save_interval=2), **kw)

    straight = run_dpo(config("a", 4))
    run_dpo(config("b", 2))
    # a second invocation with more steps and --resume auto picks up OUT/state/last.pt at step 2
    resumed = run_dpo(config("b", 4, resume="auto"))
    assert resumed["step"] == straight["step"] == 4
    a, _ = load_aligner(tmp_path / "a" / "aligner.safetensors")
    b, _ = load_aligner(tmp_path / "b" / "aligner.safetensors")
    torch.testing.assert_close(a.gate, b.gate, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.prefix, b.prefix, rtol=1e-5, atol=1e-6)


def test_tr_dpo_moves_the_reference_toward_the_policy_every_sync_steps_and_a_resumed_run_goes_on_exactly(
        tiny_checkpoint_dir, pairs_file, tmp_path):
    """--sync-ref-model: after steps 2 and 4 (not 1 or 3) the reference becomes alpha x the policy + (1 - alpha) x
    itself, starting as the bare base (zero gates); the run state keeps it, so a run resumed at step 2 ends where an
    uninterrupted one does (a resumed run that restarted the reference would not)."""
    def config(out, steps, **kw):
        return dpo_run_config(tiny_checkpoint_dir, tmp_path / out, data=pairs_file, sync_ref_model=True,
                              ref_model_mixup_alpha=0.5, ref_model_sync_steps=2,
                              train=dict(max_steps=steps, eval_interval=2, save_interval=2), **kw)

    run_dpo(config("a", 4))
    s2, s4 = (torch.load(tmp_path / "a" / "state" / f"step-00000{k}.pt", weights_only=True) for k in (2, 4))
    torch.testing.assert_close(s2["objective"]["reference_gate"], 0.5 * s2["aligner"]["gate"])
    for name in ("prefix", "gate"):
        torch.testing.assert_close(s4["objective"][f"reference_{name}"],
                                   0.5 * s4["aligner"][name] + 0.5 * s2["objective"][f"reference_{name}"])
    assert s4["aligner"]["gate"].abs().sum() > 0
    _, meta = load_aligner(tmp_path / "a" / "aligner.safetensors")
    assert json.loads(meta["sync_ref_model"]) is True and json.loads(meta["ref_model_mixup_alpha"]) == 0.5
    assert json.loads(meta["ref_model_sync_steps"]) == 2 and meta["reference"] == "none"
    run_dpo(config("b", 2))
    run_dpo(config("b", 4, resume="auto"))
    (a, _), (b, _) = (load_aligner(tmp_path / out / "aligner.safetensors") for out in ("a", "b"))
    torch.testing.assert_close(a.gate, b.gate, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.prefix, b.prefix, rtol=1e-5, atol=1e-6)
    plain = run_dpo(dpo_run_config(tiny_checkpoint_dir, tmp_path / "plain", data=pairs_file,
                                   train=dict(max_steps=4, eval_interval=2, save_interval=2)))
    c, _ = load_aligner(tmp_path / "plain" / "aligner.safetensors")
    assert (c.gate - a.gate).abs().max() > 1e-4 and plain["step"] == 4  # the moving reference changed training
    with pytest.raises(TrainError, match=r"a run with --sync-ref-model False \(now True\)"):
        run_dpo(config("plain", 4, resume="auto"))  # a state of a run without it


def test_tr_dpo_with_alpha_one_every_step_keeps_the_loss_at_log_2(tiny_checkpoint_dir, pairs_file, tmp_path):
    """The hard update every step: each step's reference is the policy it scores (the one before the step), so every
    log-ratio is 0 and every step's loss is exactly -log sigmoid(0) = log 2, while DPO's falls; the gradient is not 0
    (log pi(chosen) - log pi(rejected) still rises), so the policy moves."""
    def losses(out, **kw):
        run_dpo(dpo_run_config(tiny_checkpoint_dir, tmp_path / out, data=pairs_file, train=dict(max_steps=8), **kw))
        return [float(r["train_loss"]) for r in read_metrics(tmp_path / out / "metrics.csv") if r["train_loss"]]

    synced = losses("synced", sync_ref_model=True, ref_model_mixup_alpha=1.0, ref_model_sync_steps=1)
    plain = losses("plain")
    assert synced == pytest.approx([math.log(2)] * 8, abs=1e-6) and plain[0] == pytest.approx(math.log(2))
    assert max(plain[4:]) < math.log(2) - 0.1, plain
    trained, _ = load_aligner(tmp_path / "synced" / "aligner.safetensors")
    assert trained.gate.abs().max() > 1e-3


def test_tr_dpo_flags_are_refused_where_they_do_nothing(tiny_checkpoint_dir, pairs_file, tmp_path):
    from lit_aligner.aligner_files import new_aligner, save_aligner
    from lit_aligner.training import DPORunConfig

    for kw, reason in [(dict(ref_model_mixup_alpha=1.0), "apply with --sync-ref-model only"),
                       (dict(sync_ref_model=True, ref_model_mixup_alpha=0.0), r"must be in \(0, 1\]"),
                       (dict(sync_ref_model=True, ref_model_sync_steps=0), "must be >= 1"),
                       (dict(sync_ref_model=True, precompute_reference=True), "drop --precompute-reference"),
                       (dict(sync_ref_model=True, eval_only=True), "--eval-only trains nothing"),
                       (dict(sync_ref_model=True, dpo=DPOConfig(loss="simpo")), "reads no reference: drop "
                                                                                "--sync-ref-model")]:
        with pytest.raises(TrainError, match=reason):
            DPORunConfig(**kw).check()
    from lit_aligner.base import load_model

    model = load_model(tiny_checkpoint_dir, "cpu")
    other = tmp_path / "n2.safetensors"
    save_aligner(new_aligner(model, 2, 1), other, model.config.name)  # another shape than the run's N=10
    for flags, reason in [(["--ref-model-sync-steps", "512"], "--ref-model-sync-steps 512 is more than this run's "
                                                              "3 steps, so the reference would never move"),
                          (["--reference-aligner", other], "has N=2 from layer 1 and the policy N=10 from layer 2")]:
        r = run_script("finetune/aligner_dpo.py", "--checkpoint-dir", tiny_checkpoint_dir, "--data", pairs_file,
                       "--max-steps", "3", "--sync-ref-model", *flags, "--out-dir", tmp_path / "out")
        errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
        assert r.returncode == 1 and len(errors) == 1 and reason in errors[0] and "Traceback" not in r.stderr, r.stderr


def test_precomputed_reference_run_matches_on_the_fly_and_reuses_its_cache(tiny_checkpoint_dir, pairs_file,
                                                                             tmp_path):
    from lit_aligner.training.objectives.dpo import REFERENCE_FILE

    kw = dict(data=pairs_file, train=dict(max_steps=2, eval_interval=2, save_interval=2))
    run_dpo(dpo_run_config(tiny_checkpoint_dir, tmp_path / "fly", **kw))
    run_dpo(dpo_run_config(tiny_checkpoint_dir, tmp_path / "pre", precompute_reference=True, **kw))
    cache = tmp_path / "pre" / REFERENCE_FILE
    assert cache.is_file()
    a, _ = load_aligner(tmp_path / "fly" / "aligner.safetensors")
    b, _ = load_aligner(tmp_path / "pre" / "aligner.safetensors")
    torch.testing.assert_close(a.gate, b.gate, rtol=1e-4, atol=1e-6)
    stamp = cache.stat().st_mtime_ns
    run_dpo(dpo_run_config(tiny_checkpoint_dir, tmp_path / "pre", precompute_reference=True, force=True, **kw))
    assert cache.stat().st_mtime_ns == stamp  # the second run read the cache instead of recomputing it


@pytest.mark.parametrize("mode", ["sft", "dpo"])
def test_step_peak_memory_takes_one_real_step_and_reports_the_peak(mode):
    from lit_aligner.perf import step_peak_memory
    from lit_aligner.training.objectives import get_objective

    model = tiny_model()
    gate = model.aligner.gate.detach().clone()
    objective = get_objective(mode)(pad_id=0)
    r = step_peak_memory(model, objective, sequences=4, seq_len=16)
    assert r["before_bytes"] > 0 and r["step_bytes"] == r["peak_bytes"] - r["before_bytes"]
    assert not torch.equal(model.aligner.gate, gate)  # the optimizer step happened
    if mode == "dpo":
        with pytest.raises(ValueError, match="even"):
            step_peak_memory(model, objective, sequences=3, seq_len=16)


def test_dpo_keeps_its_own_training_defaults_from_python_and_the_cli():
    from lit_aligner.cli import run_cli
    from lit_aligner.training import DPORunConfig, DPOTrainConfig, SFTRunConfig, TrainConfig

    sft, dpo = TrainConfig(), DPOTrainConfig()
    assert (sft.learning_rate, sft.gate_lr_ratio, sft.min_lr_ratio) == (3e-2, 0.3, 0.3)
    assert (dpo.learning_rate, dpo.gate_lr_ratio, dpo.min_lr_ratio, dpo.global_batch_size) == (5e-3, 1.0, 0.0, 8)
    # A Python user who sets one field keeps DPO's others (a plain TrainConfig would bring SFT's floor and gates).
    one = DPORunConfig(train=DPOTrainConfig(learning_rate=1e-3)).train
    assert (one.learning_rate, one.gate_lr_ratio, one.min_lr_ratio) == (1e-3, 1.0, 0.0)
    assert DPORunConfig().train == dpo and SFTRunConfig().train == sft
    assert run_cli(lambda cfg: cfg, DPORunConfig, args=["--learning-rate", "1e-3"]).train == one
