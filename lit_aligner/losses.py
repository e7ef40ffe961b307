"""The losses: cross-entropy and sequence log-probabilities on the model's final hidden states, computed without the
full (B, T, vocab) logits, and the DPO loss on those log-probabilities.

The LM head of LLaMA-2-7B is 32000 x 4096: a batch of 8 x 512 tokens gives 0.5 GB of fp32 logits plus as much again
for their gradient. Only the response positions carry a loss, so we gather those positions first, then project them
to logits a chunk at a time (in fp32 for a stable log-softmax), each chunk under activation checkpointing so the
backward recomputes that chunk's logits instead of keeping all of them alive.

Conventions: `hidden` (B, T, C) is `model(idx, return_hidden=True)`; `labels` (B, T) are the input ids with -100
(IGNORE_INDEX) on prompt and padding. Position t predicts token t + 1, so hidden[:, :-1] is scored against
labels[:, 1:] (the shift happens here, callers pass unshifted labels).
"""

import math
from typing import Callable, Literal, NamedTuple, Optional, Sequence, Tuple, Union, get_args

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
DEFAULT_CHUNK_SIZE = 1024  # positions per chunk: 1024 x 32000 fp32 logits = 128 MB; 0 = all at once (plain)


def _shift(hidden: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    if hidden.shape[:2] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} must share (B, T)")
    return hidden[:, :-1], labels[:, 1:]


def _chunk_logprobs(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    extra: Optional[str] = None) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """h (n, C), targets (n,) -> log p(target) (n,) in fp32; with `extra`, also (n,): "squares", log sum_v p_v^2 of
    each position's distribution, and "entropy", its entropy -sum_v p_v log p_v, both without gradient;
    "entropy_grad", the entropy with its gradient (an entropy bonus)."""
    logits = F.linear(h, weight).float()  # (n, V): the only logits alive at a time
    if extra is None:
        return -F.cross_entropy(logits, targets, reduction="none")
    log_z = torch.logsumexp(logits, -1)  # shared by both (TRL's kernel does the same): one pass less over (n, V)
    lp = logits.gather(-1, targets[:, None])[:, 0] - log_z
    if extra == "entropy_grad":
        return lp, log_z - (torch.softmax(logits, -1) * logits).sum(-1)
    with torch.no_grad():
        if extra == "squares":  # log sum_v p_v^2 = log sum_v exp(2 z_v) - 2 log Z
            return lp, torch.logsumexp(2 * logits, -1) - 2 * log_z
        return lp, log_z - torch.softmax(logits, -1).mul_(logits).sum(-1)  # H = log Z - sum_v p_v z_v (one n x V)


def _token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int,
                    extra: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Log-probs of the labelled next tokens: (lp (n,) fp32, row index (n,) of each, `_chunk_logprobs`' `extra` (n,)
    of each position's distribution, else None) over the n scored positions."""
    if chunk_size < 0:
        raise ValueError(f"chunk_size must be >= 0 (0: all positions at once), got {chunk_size}")
    h, y = _shift(hidden, labels)
    keep = y != IGNORE_INDEX  # (B, T-1)
    rows = torch.arange(y.shape[0], device=y.device)[:, None].expand_as(y)[keep]
    h, y = h[keep], y[keep]  # (n, C), (n,)
    if h.shape[0] == 0:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty + 0.0 * hidden.sum(), rows, empty if extra else None
    if chunk_size == 0:  # the plain loss: every scored position's logits at once, kept alive for the backward
        parts = [_chunk_logprobs(h, weight, y, extra)]
    else:
        # Checkpointing only pays (and only works) when something needs a gradient.
        grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
        parts = []
        for s in range(0, h.shape[0], chunk_size):
            hc, yc = h[s:s + chunk_size], y[s:s + chunk_size]
            if grad:
                parts.append(checkpoint(_chunk_logprobs, hc, weight, yc, extra, use_reentrant=False))
            else:
                parts.append(_chunk_logprobs(hc, weight, yc, extra))
    if extra:
        return torch.cat([p[0] for p in parts]), rows, torch.cat([p[1] for p in parts])
    return torch.cat(parts), rows, None


def chunked_cross_entropy(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor,
                          chunk_size: int = DEFAULT_CHUNK_SIZE, reduction: str = "mean") -> torch.Tensor:
    """Mean next-token cross-entropy (nats, fp32 scalar) over the positions whose label is not -100 (reduction="sum":
    their sum, so callers can normalise by a token count of their own, e.g. the whole global batch's).

    hidden: (B, T, C) final normalised hidden states; lm_head_weight: (V, C); labels: (B, T) unshifted token ids,
    -100 where no loss is wanted. Equals `cross_entropy(hidden @ lm_head_weight.T, labels)` (values and gradients)
    while never materialising more than chunk_size x V fp32 logits. No labelled position → 0 (with a graph)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    lp, _, _ = _token_logprobs(hidden, lm_head_weight, labels, chunk_size)
    if lp.numel() == 0 or reduction == "sum":
        return -lp.sum()
    return -lp.mean()


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The plain reference: logits (B, T, V), labels (B, T) unshifted with -100 ignored -> mean CE (fp32 scalar)."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)


def sequence_logprobs(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor,
                      chunk_size: int = DEFAULT_CHUNK_SIZE, average: bool = False, cap: Optional[torch.Tensor] = None,
                      tail_weight: float = 1.0,
                      wpo: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Summed log-probability of each row's labelled tokens (the response): (B,) fp32 (nats).

    Same inputs as `chunked_cross_entropy`. average=True divides by each row's number of labelled tokens (rows with
    none give 0). cap (B,): a row's labelled tokens past its first cap[row] count tail_weight times (LD-DPO). Used by
    DPO: log pi(y|x) for prompt + response rows. wpo=True returns (log-probs, weights): each row's WPO weight (Eq. 2
    of its paper, as TRL computes it), without gradient: exp of the mean over its tokens of log p(token) - log sum_v
    p_v^2, the probability of each token against the expected probability of a token the model samples itself (sum_v
    p_v^2), so above 1 for an answer the model favours and near 0 for one it would not write."""
    lp, rows, squares = _token_logprobs(hidden, lm_head_weight, labels, chunk_size, "squares" if wpo else None)
    B = labels.shape[0]
    count = torch.bincount(rows, minlength=B)  # each row's labelled tokens
    if wpo:  # before LD-DPO's tail weighting: WPO weighs the response as the model would sample it
        with torch.no_grad():
            aligned = torch.zeros(B, dtype=torch.float32, device=hidden.device).index_add(0, rows, lp - squares)
            weights = torch.exp(aligned / count.clamp(min=1))
    if cap is not None:  # the positions come row by row, in order: each one's index within its row's response
        position = torch.arange(rows.numel(), device=rows.device) - (count.cumsum(0) - count)[rows]
        lp = torch.where(position < cap.to(rows.device)[rows], lp, tail_weight * lp)
    total = torch.zeros(B, dtype=torch.float32, device=hidden.device).index_add(0, rows, lp)
    if average:
        total = total / count.clamp(min=1)
    return (total, weights) if wpo else total


def reference_sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Plain reference for `sequence_logprobs`: logits (B, T, V), labels (B, T) -> (B,) summed log-probs."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != IGNORE_INDEX
    lp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (lp * mask).sum(-1)


# TRL's preference losses (trl 1.16: `DPOConfig.loss_type`, and CPO / SimPO / ORPO from its CPO and ORPO trainers),
# each as TRL computes it (but for sigmoid's label smoothing and ORPO's NLL over the response only, see
# `preference_loss`), so a user moving between the two trains on the same objective. The reference-free ones need no
# reference pass at all.
PreferenceLossName = Literal["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
                             "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm", "cpo",
                             "simpo", "orpo"]
PREFERENCE_LOSSES = get_args(PreferenceLossName)
REFERENCE_FREE = frozenset({"sft", "cpo", "simpo", "orpo"})
AVERAGED = frozenset({"simpo", "orpo"})  # compare average log-probs (their logged rewards are b x those)
LABEL_SMOOTHED = frozenset({"sigmoid", "exo_pair", "robust", "aot", "aot_unpaired", "cpo", "simpo"})  # read it
# f-DPO (TRL's f_divergence_type): the divergence from the reference that the losses on the reward difference regularise
FDivergence = Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"]
# the losses built on the chosen - rejected difference, the only ones an f-divergence generalises (TRL's list)
F_DIVERGENCE_LOSSES = frozenset({"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"})


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2 (ORPO's odds of an average log-probability)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _f_scores(logratio: torch.Tensor, divergence: str, alpha: float) -> torch.Tensor:
    """f'(pi/ref) of the f-DPO paper on a log-ratio: the log-ratio itself under the reverse KL (DPO)."""
    if divergence == "forward_kl":
        return 1 - torch.exp(-logratio)
    if divergence == "js_divergence":
        return math.log(2) + F.logsigmoid(logratio)
    if divergence == "alpha_divergence" and abs(alpha - 1.0) >= 1e-6:  # alpha -> 1 is the reverse KL
        # exp() kept finite: fp16 overflows past ~11, fp32 and bf16 past ~88 (TRL's clamp)
        t = ((alpha - 1.0) * logratio).float().clamp(max=11.0 if logratio.dtype == torch.float16 else 80.0)
        return ((torch.exp(t) - 1.0) / (alpha - 1.0)).to(logratio.dtype)
    return logratio


def preference_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: Optional[torch.Tensor],
                    ref_rejected: Optional[torch.Tensor], chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor,
                    beta: float = 0.1, loss: Sequence[str] = ("sigmoid",), weights: Optional[Sequence[float]] = None,
                    label_smoothing: float = 0.0, discopop_tau: float = 0.05, simpo_gamma: float = 0.5,
                    f_divergence: str = "reverse_kl", f_alpha: float = 0.5,
                    alpha: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair preference loss: the weighted sum of the named losses (TRL's `loss_type` list and `loss_weights`).

    chosen, rejected: (B,) summed response log-probs of the policy (nats); ref_*: the reference's (None when every
    loss is reference-free); *_tokens: (B,) response token counts (IPO, sigmoid_norm, SimPO and ORPO average over
    them). With beta = b, eps = label_smoothing, the log-ratios c = chosen - ref_chosen, r = rejected - ref_rejected and
    h = c - r:
        sigmoid      -(1-eps) logsig(b h) - eps logsig(-b h)        (DPO; eps > 0: conservative DPO, as earlier TRL)
        hinge        relu(1 - b h)                                  (SLiC)
        ipo          (c/n_c - r/n_r - 1/(2b))^2                     (IPO, per-token log-ratios as its authors and TRL)
        exo_pair     KL(softmax(b [c, r]) || [1-eps, eps])          (EXO; needs eps > 0)
        nca_pair     -logsig(b c) - logsig(-b c)/2 - logsig(-b r)/2
        robust       (-(1-eps) logsig(b h) + eps logsig(-b h)) / (1 - 2 eps)
        bco_pair     -logsig(b c) - logsig(-b r)
        sppo_hard    (c - 1/(2b))^2 + (r + 1/(2b))^2
        aot          sigmoid on sort(chosen - rejected) - sort(ref_chosen - ref_rejected) over the batch
        aot_unpaired sigmoid on sort(c) - sort(r) over the batch
        apo_zero     1 - sig(b c) + sig(b r)
        apo_down     sig(b c) + 1 - sig(b h)
        discopop     logistic and exponential losses of b h, mixed by sig(b h / tau)
        sft          the chosen responses' mean token NLL over the batch (RPO's term; every pair gets the batch mean)
        sigmoid_norm -logsig(b (c/n_c - r/n_r))
        cpo          sigmoid (with eps) on chosen - rejected           (CPO without its NLL term, add sft; no reference)
        simpo        sigmoid (with eps) on a_c - a_r - gamma/b, a = the policy's average log-prob (no reference)
        orpo         sft - b logsig(log odds(a_c) - log odds(a_r))  (no reference; TRL's NLL adds the prompt's tokens)
    f_divergence (f-DPO; f_alpha: its alpha-divergence's alpha) replaces c and r by f'(pi/ref) in h (and in ipo's and
    sigmoid_norm's per-token difference): 1 - exp(-c) (forward_kl), log 2 + logsig(c) (js_divergence),
    (exp((alpha-1) c) - 1) / (alpha-1) (alpha_divergence); reverse_kl (the default) keeps c.
    alpha != 0 (AlphaPO, TRL's CPOTrainer `alpha`) replaces the log-probs x that cpo and simpo compare (summed,
    averaged) by the reward (1 - p^-alpha) / alpha of p = exp(x), in their losses and in the rewards returned; 0 keeps
    x.
    Returns (losses (B,), chosen_rewards (B,), rejected_rewards (B,)), the rewards without gradient: b times the
    log-ratios, or when every loss is reference-free b times the log-probs, averaged with simpo or orpo (as TRL's CPO
    and ORPO trainers log them)."""
    names = (loss,) if isinstance(loss, str) else tuple(loss)
    weights = tuple(weights) if weights is not None else (1.0,) * len(names)
    if not names or len(weights) != len(names):
        raise ValueError(f"{len(weights)} loss weights for the losses {', '.join(names) or '(none)'}")
    for name in names:
        if name not in PREFERENCE_LOSSES:
            raise ValueError(f"unknown preference loss {name!r}; one of {', '.join(PREFERENCE_LOSSES)}")
    b, eps = beta, label_smoothing
    nc, nr = chosen_tokens.to(chosen.dtype).clamp(min=1), rejected_tokens.to(chosen.dtype).clamp(min=1)
    avg_c, avg_r = chosen / nc, rejected / nr
    nll = -chosen.sum() / nc.sum()  # the batch's chosen tokens, as one mean
    reference_free = set(names) <= REFERENCE_FREE
    if not reference_free:
        if ref_chosen is None or ref_rejected is None:
            raise ValueError(f"the losses {', '.join(sorted(set(names) - REFERENCE_FREE))} need reference log-probs")
        c, r = chosen - ref_chosen, rejected - ref_rejected
        sc, sr = _f_scores(c, f_divergence, f_alpha), _f_scores(r, f_divergence, f_alpha)
        h = sc - sr

    def smoothed(x):  # the sigmoid loss with a share eps of flipped labels
        return -(1 - eps) * F.logsigmoid(b * x) - eps * F.logsigmoid(-b * x)

    def shaped(x):  # AlphaPO's reward of p = exp(x): (1 - exp(-alpha x)) / alpha, no underflow of p to 0
        return x if alpha == 0 else -torch.expm1(-alpha * x) / alpha

    total = chosen.new_zeros(chosen.shape)
    for name, w in zip(names, weights):
        if name == "sigmoid":
            part = smoothed(h)
        elif name == "hinge":
            part = torch.relu(1 - b * h)
        elif name == "ipo":
            part = (sc / nc - sr / nr - 1 / (2 * b)) ** 2
        elif name == "exo_pair":
            part = (torch.sigmoid(b * h) * (F.logsigmoid(b * h) - math.log1p(-eps))
                    + torch.sigmoid(-b * h) * (F.logsigmoid(-b * h) - math.log(eps)))
        elif name == "nca_pair":
            part = -F.logsigmoid(b * c) - 0.5 * F.logsigmoid(-b * c) - 0.5 * F.logsigmoid(-b * r)
        elif name == "robust":
            part = (-(1 - eps) * F.logsigmoid(b * h) + eps * F.logsigmoid(-b * h)) / (1 - 2 * eps)
        elif name == "bco_pair":
            part = -F.logsigmoid(b * c) - F.logsigmoid(-b * r)
        elif name == "sppo_hard":
            part = (c - 0.5 / b) ** 2 + (r + 0.5 / b) ** 2
        elif name == "aot":
            part = smoothed(torch.sort(chosen - rejected).values - torch.sort(ref_chosen - ref_rejected).values)
        elif name == "aot_unpaired":
            part = smoothed(torch.sort(c).values - torch.sort(r).values)
        elif name == "apo_zero":
            part = 1 - torch.sigmoid(b * c) + torch.sigmoid(b * r)
        elif name == "apo_down":
            part = torch.sigmoid(b * c) + 1 - torch.sigmoid(b * h)
        elif name == "discopop":
            mix = torch.sigmoid(b * h / discopop_tau)
            part = -F.logsigmoid(b * h) * (1 - mix) + torch.exp(-b * h) * mix
        elif name == "sft":
            part = nll.expand(chosen.shape)
        elif name == "sigmoid_norm":
            part = -F.logsigmoid(b * (sc / nc - sr / nr))
        elif name == "cpo":
            part = smoothed(shaped(chosen) - shaped(rejected))
        elif name == "simpo":
            part = smoothed(shaped(avg_c) - shaped(avg_r) - simpo_gamma / b)
        else:  # orpo
            log_odds = (avg_c - avg_r) - (_log1mexp(avg_c) - _log1mexp(avg_r))
            part = nll - b * F.logsigmoid(log_odds)
        total = total + w * part
    if reference_free and set(names) & AVERAGED:
        return total, b * shaped(avg_c).detach(), b * shaped(avg_r).detach()
    if reference_free:
        return total, b * shaped(chosen).detach(), b * shaped(rejected).detach()
    return total, b * c.detach(), b * r.detach()


KTOLossName = Literal["kto", "apo_zero_unpaired"]


def kto_loss(logps: torch.Tensor, ref_logps: torch.Tensor, kl_logps: Optional[torch.Tensor],
             ref_kl_logps: Optional[torch.Tensor], desirable: torch.Tensor, beta: float = 0.1, loss: str = "kto",
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
             across: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row loss of unpaired completions (TRL's KTOTrainer, its `loss_type`). logps, ref_logps: (B,) summed
    completion log-probs of the policy and the reference (nats); desirable: (B,) bool labels; kl_logps, ref_kl_logps:
    (B,) the same for mismatched rows (a prompt with another row's completion), whose mean log-ratio, clamped at 0 and
    without gradient, estimates KL(pi || ref) as z. With b = beta and the log-ratio x = logps - ref_logps:
        kto                desirable: w_d (1 - sig(b (x - z)));  undesirable: w_u (1 - sig(b (z - x)))   (KTO, Eq. 7)
        apo_zero_unpaired  desirable: w_d (1 - sig(b x));        undesirable: w_u sig(b x)              (APO, no z)
    `across`: this batch's mean mismatched log-ratio -> its mean over every process's batches (TRL gathers them
    before z is clamped); None: this batch's alone. Returns (losses (B,), rewards b x (B,) without gradient, z
    (0-dim))."""
    x = logps - ref_logps
    z = x.new_zeros(())
    if loss == "kto":
        if kl_logps is None or ref_kl_logps is None:
            raise ValueError("the kto loss needs the mismatched rows' log-probs (its KL estimate)")
        z = (kl_logps - ref_kl_logps).mean().detach()
        z = (z if across is None else across(z)).clamp(min=0)
        good, bad = 1 - torch.sigmoid(beta * (x - z)), 1 - torch.sigmoid(beta * (z - x))
    elif loss == "apo_zero_unpaired":
        good, bad = 1 - torch.sigmoid(beta * x), torch.sigmoid(beta * x)
    else:
        raise ValueError(f"unknown unpaired loss {loss!r}; one of {', '.join(get_args(KTOLossName))}")
    losses = torch.where(desirable, desirable_weight * good, undesirable_weight * bad)
    return losses, beta * x.detach(), z


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 0.0,
                    temperature: float = 1.0) -> torch.Tensor:
    """GKD's generalized Jensen-Shannon divergence (Agarwal et al. 2024, Eq. 1) of each position, under TRL's
    convention: logits (n, V) -> (n,) fp32 nats. beta 0: KL(teacher || student), the forward KL of classic and context
    distillation (mode-covering); 1: KL(student || teacher), the reverse (mode-seeking); between: beta KL(teacher || m)
    + (1 - beta) KL(student || m), m = beta teacher + (1 - beta) student. Both distributions are softmaxes at
    `temperature`."""
    s = F.log_softmax(student_logits.float() / temperature, -1)
    t = F.log_softmax(teacher_logits.float() / temperature, -1)
    if beta == 0:
        return (t.exp() * (t - s)).sum(-1)
    if beta == 1:
        return (s.exp() * (s - t)).sum(-1)
    m = torch.logaddexp(s + math.log1p(-beta), t + math.log(beta))
    return beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)


def _chunk_divergence(hs: torch.Tensor, ht: torch.Tensor, weight: torch.Tensor, beta: float,
                      temperature: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher hidden states (n, C) -> (divergence (n,), top-1 agreement (n,) bool)."""
    s, t = F.linear(hs, weight), F.linear(ht, weight)  # (n, V) each: the only logits alive at a time
    return generalized_jsd(s, t, beta, temperature), s.argmax(-1) == t.argmax(-1)


def distillation_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, lm_head_weight: torch.Tensor,
                      student_labels: torch.Tensor, teacher_labels: torch.Tensor, beta: float = 0.0,
                      temperature: float = 1.0,
                      chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token-level distillation on the labelled positions: (the summed `generalized_jsd` between the student's and
    the teacher's next-token distributions, fp32 scalar; the number of positions where both put their most likely
    token on the same one, fp32 scalar without gradient).

    The two sequences share their responses but not their prompts (the teacher's holds a context the student's
    lacks), so each side's labelled positions are gathered from its own (B, T_s / T_t) labels, row by row in order;
    they must hold the same tokens. The teacher's hidden states need no gradient. Chunked and checkpointed as
    `chunked_cross_entropy`: at most chunk_size x V logits of each model at a time."""
    if chunk_size < 0:
        raise ValueError(f"chunk_size must be >= 0 (0: all positions at once), got {chunk_size}")
    hs, ys = _shift(student_hidden, student_labels)
    ht, yt = _shift(teacher_hidden, teacher_labels)
    ks, kt = ys != IGNORE_INDEX, yt != IGNORE_INDEX
    if not torch.equal(ys[ks], yt[kt]):
        raise ValueError("the student's and the teacher's labelled tokens differ: both rows must end in the same "
                         "response")
    hs, ht = hs[ks], ht[kt].detach()  # (n, C) each
    if hs.shape[0] == 0:
        return 0.0 * student_hidden.sum(), student_hidden.new_zeros((), dtype=torch.float32)
    step = chunk_size or hs.shape[0]
    grad = torch.is_grad_enabled() and (hs.requires_grad or lm_head_weight.requires_grad) and chunk_size > 0
    parts = [checkpoint(_chunk_divergence, hs[s:s + step], ht[s:s + step], lm_head_weight, beta, temperature,
                        use_reentrant=False) if grad else
             _chunk_divergence(hs[s:s + step], ht[s:s + step], lm_head_weight, beta, temperature)
             for s in range(0, hs.shape[0], step)]
    return torch.cat([p[0] for p in parts]).sum(), torch.cat([p[1] for p in parts]).sum().float()


# TRL's GRPO loss types (GRPOConfig.loss_type) this trainer has: how per-token terms become a step's loss, and for
# cispo and sapo the terms themselves. Per answer, "grpo" and "sapo" take the mean over its tokens, "dr_grpo" the sum
# / max_completion_length, "dapo", "cispo" and "luspo" the sum (DAPO's and CISPO's divided by the caller by the step's
# answer tokens, LUSPO's by its answers: each sequence-level term weighed by its answer's length).
GRPOLossType = Literal["grpo", "dapo", "dr_grpo", "bnpo", "cispo", "sapo", "luspo", "vespo"]
GRPO_LOSS_TYPES = get_args(GRPOLossType)
# divided by the step's answer tokens (the caller's token_scale); bnpo's sums by each micro-batch's (the caller's too)
TOKEN_MEAN_LOSSES = frozenset({"dapo", "cispo", "vespo"})


class GRPOTerms(NamedTuple):
    """`grpo_loss`'s result, each fp32 and only `loss` (and `bonus` when asked) with a gradient: per completion (B,) its
    loss, its tokens' mean KL, the share of its tokens the clipping held and their mean entropy; the scored tokens'
    log-probabilities (n,), row by row (what a later step's `old_logps` is); and per completion the sum of the entropy
    over the tokens the policy term keeps (what an entropy bonus rewards) and their count."""
    loss: torch.Tensor
    kl: torch.Tensor
    held: torch.Tensor
    entropy: torch.Tensor
    logps: torch.Tensor
    bonus: torch.Tensor
    bonus_tokens: torch.Tensor


def grpo_loss(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor, advantages: torch.Tensor,
              ref_hidden: Optional[torch.Tensor] = None, beta: float = 0.0, chunk_size: int = DEFAULT_CHUNK_SIZE,
              loss_type: str = "grpo", max_completion_length: Optional[int] = None,
              old_logps: Optional[torch.Tensor] = None, epsilon_low: float = 0.2, epsilon_high: float = 0.2,
              importance_sampling_level: str = "token", delta: Optional[float] = None,
              sapo_temperatures: Tuple[float, float] = (1.0, 1.05), top_entropy_quantile: float = 1.0,
              kept: Optional[torch.Tensor] = None, off_policy_mask_threshold: Optional[float] = None,
              entropy_grad: bool = False, vespo_params: Tuple[float, float, float, float] = (2.0, 3.0, 3.0, 2.0),
              use_bias_correction_kl: bool = False,
              gather: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> GRPOTerms:
    """GRPO's loss of each completion (TRL's GRPOTrainer._compute_loss), from per-token terms
    -min(c x A, clip(c, 1 - epsilon_low, 1 + epsilon_high) x A) + beta x KL, where A (B,) is the completion's
    advantage, KL the k3 estimate exp(r) - r - 1 with r = log p_ref - log p (`ref_hidden`: the reference's hidden
    states; None: no KL term) and c the importance ratio to the policy that sampled the completion: per token
    exp(log p - log p_old) (`importance_sampling_level` "token"), or one per completion, exp of the mean of its tokens'
    log-ratios ("sequence": GSPO's). `old_logps`: log p_old of the scored tokens (n,), in the order of `labels`'
    scored positions, row by row; None (one optimizer step per batch of samples): log p_old = sg(log p), so c = 1,
    nothing is clipped and the gradient is the policy gradient. `delta` (INTELLECT-2's two-sided clipping) caps c
    in the unclipped term too. `off_policy_mask_threshold` (DeepSeek-V3.2's off-policy sequence mask, with `old_logps`)
    leaves out of the policy term each completion with A < 0 whose mean over its tokens of log p_old - log p is above
    it. `use_bias_correction_kl` (DeepSeek-V3.2's unbiased KL estimate) multiplies each KL term by c (with its
    gradient, so the KL's gradient changes even where c = 1).

    `loss_type` (TRL's names; `GRPO_LOSS_TYPES`): "grpo" (DeepSeekMath's) the mean over the completion's tokens;
    "dr_grpo" their sum / `max_completion_length` (Dr. GRPO: no length bias); "dapo" their sum, which the caller divides
    by the tokens of the whole batch (DAPO's token-level mean), "bnpo" by those of its micro-batch; "cispo"
    (MiniMax-M1's) the per-token term -sg(min(c, epsilon_high)) x A x log p, summed as dapo's (epsilon_high is the cap
    on the ratio itself there); "sapo" (Soft Adaptive Policy Optimization) -sigmoid(tau (c - 1)) x 4 / tau x A with tau
    `sapo_temperatures` (A > 0, A <= 0), averaged as grpo's; "luspo" (needs "sequence") the sum over the completion's
    tokens, which the caller averages over completions; "vespo" (VESPO, at the "token" level) -sg(phi(w)) x A x log p
    summed as dapo's, with w the completion's ratio exp(sum of its tokens' log-ratios) and phi(w) = exp(lambda + k log w
    - lambda w) (k, lambda: `vespo_params` (k_pos, lambda_pos, k_neg, lambda_neg) by the sign of A; phi(1) = 1), a
    smooth weight that fades for completions far off-policy either way. `top_entropy_quantile` rho < 1 ("Beyond the
    80/20 rule") keeps in the policy term only the tokens whose distribution's entropy reaches the 1 - rho quantile of
    the scored tokens here (of the `kept` (B,) completions', when given; `gather`: those entropies -> every process's,
    as TRL takes the quantile over all of them). `entropy_grad`: `GRPOTerms.bonus` (the entropy
    summed over the tokens the policy term keeps) has its gradient, for an entropy bonus (TRL's entropy_coef).

    Returns `GRPOTerms`: per completion the loss, the mean KL over its tokens, the share of its tokens whose ratio the
    clipping held (TRL's clip region; cispo: c above its cap with A > 0) and their mean entropy; and the tokens'
    log-probabilities, without gradient."""
    if loss_type not in GRPO_LOSS_TYPES or (loss_type == "dr_grpo" and not max_completion_length):
        raise ValueError(f"loss_type one of {', '.join(GRPO_LOSS_TYPES)} (dr_grpo with max_completion_length), got "
                         f"{loss_type!r}")
    needed = {"luspo": "sequence", "vespo": "token"}.get(loss_type, importance_sampling_level)
    if importance_sampling_level not in ("token", "sequence") or importance_sampling_level != needed:
        raise ValueError(f"importance_sampling_level 'token' or 'sequence' (luspo: 'sequence', vespo: 'token'), got "
                         f"{importance_sampling_level!r}")
    lp, rows, entropy = _token_logprobs(hidden, lm_head_weight, labels, chunk_size,
                                        "entropy_grad" if entropy_grad else "entropy")
    B = labels.shape[0]
    total = lambda x: torch.zeros(B, dtype=torch.float32, device=hidden.device).index_add(0, rows, x)  # noqa: E731
    count = torch.bincount(rows, minlength=B).clamp(min=1).float()
    a = advantages.to(lp)[rows]
    log_ratio = lp - (lp.detach() if old_logps is None else old_logps.to(lp))
    if importance_sampling_level == "sequence":  # each completion's mean log-ratio, at every one of its tokens
        log_ratio = (total(log_ratio) / count)[rows]
    ratio = coef = torch.exp(log_ratio)
    if loss_type == "cispo":
        per_token = -torch.clamp(ratio, max=epsilon_high).detach() * a * lp
        held = (ratio > epsilon_high) & (a > 0)
    elif loss_type == "vespo":  # TRL's get_gamma_weights, in log space (its clamps included)
        with torch.no_grad():
            log_w = total(torch.clamp(log_ratio, -20.0, 20.0)).clamp(math.log(1e-8), 20.0)
            k_pos, lambda_pos, k_neg, lambda_neg = vespo_params
            k = torch.where(advantages.to(lp) >= 0, k_pos, k_neg)
            lam = torch.where(advantages.to(lp) >= 0, lambda_pos, lambda_neg).clamp(min=1e-4)
            phi = torch.exp(lam + k * log_w - lam * log_w.exp()).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
        per_token = -phi[rows] * a * lp
        held = torch.zeros_like(ratio, dtype=torch.bool)  # (a smooth weight: nothing is held outright)
    elif loss_type == "sapo":
        tau = torch.where(a > 0, sapo_temperatures[0], sapo_temperatures[1])
        per_token = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * a
        held = torch.zeros_like(ratio, dtype=torch.bool)  # (a soft gate: nothing is held outright)
    else:
        clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
        held = ((ratio < 1 - epsilon_low) & (a < 0)) | ((ratio > 1 + epsilon_high) & (a > 0))  # TRL's clip region
        if delta is not None:
            ratio = torch.clamp(ratio, max=delta)
        per_token = -torch.min(ratio * a, clipped * a)
    if off_policy_mask_threshold is not None and old_logps is not None:
        drift = total(old_logps.to(lp) - lp.detach()) / count  # each completion's mean KL(old || now) estimate
        per_token = per_token * ((advantages.to(lp) >= 0) | (drift <= off_policy_mask_threshold)).to(lp)[rows]
    chosen = torch.ones_like(lp)  # the tokens the policy term keeps
    if top_entropy_quantile < 1.0:  # (on every process alike: `gather` may be a collective)
        pool = (entropy if kept is None else entropy[kept.to(rows.device)[rows]]).detach()
        pool = pool if gather is None else gather(pool)
        if pool.numel():
            chosen = (entropy.detach() >= torch.quantile(pool, 1.0 - top_entropy_quantile)).to(lp)
            per_token = per_token * chosen
    kl = torch.zeros_like(lp)
    if ref_hidden is not None:
        with torch.no_grad():
            ref_lp, _, _ = _token_logprobs(ref_hidden, lm_head_weight, labels, chunk_size)
        r = ref_lp - lp
        kl = torch.exp(r) - r - 1
        if use_bias_correction_kl:
            kl = kl * coef
        per_token = per_token + beta * kl
    divisor = {"grpo": count, "sapo": count, "dr_grpo": float(max_completion_length or 1)}.get(loss_type, 1.0)
    return GRPOTerms(total(per_token) / divisor, total(kl.detach()) / count, total(held.float()) / count,
                     total(entropy.detach()) / count, lp.detach(), total(entropy * chosen), total(chosen))
