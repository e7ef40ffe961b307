"""What an Aligner does inside the base, layer by layer (`evaluate/aligner.py inspect`).

On the positions that predict response tokens of real rows, for every gated layer:
- `gate_mean_abs`, `gate_max_abs`: how far its per-head gates opened (0: the layer is the base's);
- `effective_tokens`: exp of the mean entropy of its prefix attention, per query (1: each query reads one prefix
  token; N: all N alike, the prefix acts as a single averaged vector);
- `tokens_used`: exp of the entropy of that attention averaged over the queries, per head then averaged (how many of
  the N tokens the layer reads at all);
- `shift`: how much the prefix changes the attention block's output, the part that reaches the residual stream,
  ||with - without|| / ||without|| per position, averaged;
and per prefix token its norm and its share of all prefix attention. The queries are the layer's own (`qkv`); the
output without the prefix comes from the same module called again, so nothing here re-implements attention.
"""

import math
from typing import Any, Callable, Dict, List, Sequence

import torch

from lit_aligner.data import IGNORE_INDEX


@torch.no_grad()
def inspect_aligner(model, aligner, batches: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, Any]:
    """batches: collated rows ({"input_ids", "labels"}); every position whose next token is labelled counts."""
    pkv = model.prefix_kv(aligner)
    n_head, n_kv, hs = model.config.n_head, model.config.n_query_groups, model.config.head_size
    n, L = aligner.n_tokens, len(pkv.keys)
    device = model.tok_embeddings.weight.device
    entropy = torch.zeros(L, n_head, dtype=torch.float64)  # summed over positions
    attention = torch.zeros(L, n_head, n, dtype=torch.float64)
    shift = torch.zeros(L, dtype=torch.float64)
    state = {"weights": None}
    positions = 0.0

    def hook(j: int) -> Callable:
        def record(module, args, out):
            x, cos, sin, mask, input_pos, prefix = args[:6]
            w = state["weights"]  # (B, T) 1.0 where the next token is a response token
            q = module.qkv(x, cos, sin)[0]  # (B, nh, T, hs)
            keys = prefix[0].repeat_interleave(n_head // n_kv, dim=1)  # (1, nh, N, hs)
            p = torch.softmax((q @ keys.transpose(-1, -2)).double() / math.sqrt(hs), dim=-1)  # (B, nh, T, N)
            entropy[j] += (-(p * p.clamp_min(1e-30).log()).sum(-1) * w[:, None]).sum((0, 2)).cpu()
            attention[j] += (p * w[:, None, :, None]).sum((0, 2)).cpu()
            bare = module.forward(x, cos, sin, mask, input_pos, None, *args[6:])  # forward, not __call__: no hook
            change = (out - bare).double().norm(dim=-1) / bare.double().norm(dim=-1).clamp_min(1e-30)
            shift[j] += (change * w).sum().cpu()
        return record

    handles = [block.attn.register_forward_hook(hook(j)) for j, block in enumerate(model.layers[pkv.start_layer:])]
    try:
        for batch in batches:
            ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
            w = torch.zeros(ids.shape, dtype=torch.float64, device=device)
            w[:, :-1] = (labels[:, 1:] != IGNORE_INDEX).double()
            state["weights"] = w
            positions += float(w.sum())
            model(ids, aligner=pkv)
    finally:
        for h in handles:
            h.remove()
    if positions == 0:
        raise ValueError("no response tokens to inspect")
    mean_attention = attention / positions  # (L, nh, N): each head's attention averaged over the positions
    used = torch.exp(-(mean_attention * mean_attention.clamp_min(1e-30).log()).sum(-1)).mean(-1)  # (L,)
    gate = pkv.gate[0].detach().float().abs().cpu()  # (L, nh)
    layers: List[Dict[str, Any]] = [
        {"layer": pkv.start_layer + j, "gate_mean_abs": float(gate[j].mean()), "gate_max_abs": float(gate[j].max()),
         "effective_tokens": math.exp(float(entropy[j].mean()) / positions), "tokens_used": float(used[j]),
         "shift": float(shift[j]) / positions} for j in range(L)]
    share = mean_attention.mean((0, 1))  # (N,) every gated layer and head alike
    norms = aligner.prefix.detach().float().norm(dim=-1).cpu()
    tokens = [{"token": k, "norm": float(norms[k]), "attention_share": float(share[k])} for k in range(n)]
    return {"n_tokens": n, "start_layer": pkv.start_layer, "positions": int(positions), "layers": layers,
            "tokens": tokens, "mean": {key: sum(r[key] for r in layers) / L
                                       for key in ("gate_mean_abs", "effective_tokens", "tokens_used", "shift")}}

