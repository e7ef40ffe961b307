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

from typing import Tuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
DEFAULT_CHUNK_SIZE = 1024  # positions per chunk: 1024 x 32000 fp32 logits = 128 MB; 0 = all at once (plain)


def _shift(hidden: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    if hidden.shape[:2] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} must share (B, T)")
    return hidden[:, :-1], labels[:, 1:]


def _chunk_logprobs(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """h (n, C), targets (n,) -> log p(target) (n,) in fp32."""
    logits = F.linear(h, weight).float()  # (n, V): the only logits alive at a time
    return -F.cross_entropy(logits, targets, reduction="none")


def _token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                    chunk_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the labelled next tokens: (lp (n,) fp32, row index (n,) of each) over the n scored positions."""
    if chunk_size < 0:
        raise ValueError(f"chunk_size must be >= 0 (0: all positions at once), got {chunk_size}")
    h, y = _shift(hidden, labels)
    keep = y != IGNORE_INDEX  # (B, T-1)
    rows = torch.arange(y.shape[0], device=y.device)[:, None].expand_as(y)[keep]
    h, y = h[keep], y[keep]  # (n, C), (n,)
    if h.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32) + 0.0 * hidden.sum(), rows
    if chunk_size == 0:  # the plain loss: every scored position's logits at once, kept alive for the backward
        return _chunk_logprobs(h, weight, y), rows
    # Checkpointing only pays (and only works) when something needs a gradient.
    grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    parts = []
    for s in range(0, h.shape[0], chunk_size):
        hc, yc = h[s:s + chunk_size], y[s:s + chunk_size]
        if grad:
            parts.append(checkpoint(_chunk_logprobs, hc, weight, yc, use_reentrant=False))
        else:
            parts.append(_chunk_logprobs(hc, weight, yc))
    return torch.cat(parts), rows


def chunked_cross_entropy(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor,
                          chunk_size: int = DEFAULT_CHUNK_SIZE, reduction: str = "mean") -> torch.Tensor:
    """Mean next-token cross-entropy (nats, fp32 scalar) over the positions whose label is not -100 (reduction="sum":
    their sum, so callers can normalise by a token count of their own, e.g. the whole global batch's).

    hidden: (B, T, C) final normalised hidden states; lm_head_weight: (V, C); labels: (B, T) unshifted token ids,
    -100 where no loss is wanted. Equals `cross_entropy(hidden @ lm_head_weight.T, labels)` (values and gradients)
    while never materialising more than chunk_size x V fp32 logits. No labelled position → 0 (with a graph)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    lp, _ = _token_logprobs(hidden, lm_head_weight, labels, chunk_size)
    if lp.numel() == 0 or reduction == "sum":
        return -lp.sum()
    return -lp.mean()


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The plain reference: logits (B, T, V), labels (B, T) unshifted with -100 ignored -> mean CE (fp32 scalar)."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)


def sequence_logprobs(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor,
                      chunk_size: int = DEFAULT_CHUNK_SIZE, average: bool = False) -> torch.Tensor:
    """Summed log-probability of each row's labelled tokens (the response): (B,) fp32 (nats).

    Same inputs as `chunked_cross_entropy`. average=True divides by each row's number of labelled tokens (rows with
    none give 0). Used by DPO: log pi(y|x) for prompt + response rows."""
    lp, rows = _token_logprobs(hidden, lm_head_weight, labels, chunk_size)
    B = labels.shape[0]
    total = torch.zeros(B, dtype=torch.float32, device=hidden.device).index_add(0, rows, lp)
    if average:
        count = torch.zeros(B, dtype=torch.float32, device=hidden.device).index_add(
            0, rows, torch.ones_like(lp))
        total = total / count.clamp(min=1)
    return total


def reference_sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Plain reference for `sequence_logprobs`: logits (B, T, V), labels (B, T) -> (B,) summed log-probs."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != IGNORE_INDEX
    lp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (lp * mask).sum(-1)


DPO_LOSSES = ("sigmoid", "ipo")


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, loss: str = "sigmoid",
             label_smoothing: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO loss. All inputs (B,) summed response log-probs (nats). With
    h = (log pi(c) - log ref(c)) - (log pi(r) - log ref(r)):
        sigmoid: -(1 - eps) * logsigmoid(beta * h) - eps * logsigmoid(-beta * h)     (eps = label smoothing: cDPO)
        ipo:     (h - 1 / (2 * beta)) ** 2
    Returns (losses (B,), chosen_rewards (B,), rejected_rewards (B,)); the implicit rewards are
    beta * (policy - reference) and carry no gradient."""
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss!r}; one of {', '.join(DPO_LOSSES)}")
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses, chosen_rewards, rejected_rewards
