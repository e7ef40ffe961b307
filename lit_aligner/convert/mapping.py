"""Weight-name and layout mapping from other checkpoint formats into ours.

Our names: tok_embeddings, layers.{i}.{attention_norm, attn.wqkv, attn.wo, attn.q_norm, attn.k_norm, ffn_norm,
feed_forward.w1/w2/w3}, norm, output. q, k and v are fused into one `wqkv` matrix (rows: q, then k, then v), and their
biases (Qwen2) into one `wqkv` bias. RoPE uses the Hugging Face "rotate half" layout; the q/k rows of Meta
checkpoints and of llama-architecture GGUFs interleave the rotated pairs, so they are permuted once here, on import
(qwen2/qwen3 GGUFs already use the half layout).
"""

import re
from typing import Dict, Iterable, Iterator, Optional, Tuple

import torch

from lit_aligner.config import Config

Tensors = Iterable[Tuple[str, torch.Tensor]]


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta/GGUF q or k rows (pairs interleaved per head) -> Hugging Face layout (pairs split into halves)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `interleaved_to_half`."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


# Per-layer weights: (pattern in the source, our name). "q", "k", "v" are fused into wqkv.
_HF = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "self_attn.q_proj.weight": "q",
    "self_attn.k_proj.weight": "k",
    "self_attn.v_proj.weight": "v",
    "self_attn.q_proj.bias": "q.bias",
    "self_attn.k_proj.bias": "k.bias",
    "self_attn.v_proj.bias": "v.bias",
    "self_attn.q_norm.weight": "attn.q_norm.weight",
    "self_attn.k_norm.weight": "attn.k_norm.weight",
    "self_attn.o_proj.weight": "attn.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
_META = {
    "tok_embeddings.weight": "tok_embeddings.weight",
    "norm.weight": "norm.weight",
    "output.weight": "output.weight",
    "attention.wq.weight": "q",
    "attention.wk.weight": "k",
    "attention.wv.weight": "v",
    "attention.wo.weight": "attn.wo.weight",
    "feed_forward.w1.weight": "feed_forward.w1.weight",
    "feed_forward.w3.weight": "feed_forward.w3.weight",
    "feed_forward.w2.weight": "feed_forward.w2.weight",
    "attention_norm.weight": "attention_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
}
_GGUF = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
    "attn_q.weight": "q",
    "attn_k.weight": "k",
    "attn_v.weight": "v",
    "attn_q.bias": "q.bias",
    "attn_k.bias": "k.bias",
    "attn_v.bias": "v.bias",
    "attn_q_norm.weight": "attn.q_norm.weight",
    "attn_k_norm.weight": "attn.k_norm.weight",
    "attn_output.weight": "attn.wo.weight",
    "ffn_gate.weight": "feed_forward.w1.weight",
    "ffn_up.weight": "feed_forward.w3.weight",
    "ffn_down.weight": "feed_forward.w2.weight",
    "attn_norm.weight": "attention_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
}
_LAYER = {
    "hf": re.compile(r"^model\.layers\.(\d+)\.(.+)$"),
    "meta": re.compile(r"^layers\.(\d+)\.(.+)$"),
    "gguf": re.compile(r"^blk\.(\d+)\.(.+)$"),
}
_IGNORED = re.compile(r"rotary_emb\.inv_freq|^rope\.freqs$|^rope_freqs\.weight$")


_QKV = {"q": "weight", "k": "weight", "v": "weight", "q.bias": "bias", "k.bias": "bias", "v.bias": "bias"}


def to_lit(tensors: Tensors, config: Config, source: str,
           interleaved: Optional[bool] = None) -> Iterator[Tuple[str, torch.Tensor]]:
    """Stream (name, tensor) pairs of a `source` checkpoint ("hf", "meta" or "gguf") as ours, one tensor at a time.
    Only the q/k/v (and their biases) of the layer being read are held until its fused wqkv can be emitted.
    interleaved: whether q/k rows interleave the RoPE pairs (default: Meta and GGUF yes, HF no)."""
    table = {"hf": _HF, "meta": _META, "gguf": _GGUF}[source]
    interleaved = source != "hf" if interleaved is None else interleaved
    pending: Dict[Tuple[int, str], Dict[str, torch.Tensor]] = {}
    for name, t in tensors:
        if _IGNORED.search(name):
            continue
        m = _LAYER[source].match(name)
        if m is None:
            if name not in table:
                raise KeyError(f"unexpected tensor {name!r} in a {source} checkpoint")
            ours = table[name]
            if ours == "output.weight" and config.tie_embeddings:
                continue
            yield ours, t
            continue
        i, rest = int(m.group(1)), m.group(2)
        if rest not in table:
            raise KeyError(f"unexpected tensor {name!r} in a {source} checkpoint")
        ours = table[rest]
        if ours not in _QKV:
            yield f"layers.{i}.{ours}", t
            continue
        part, kind = ours.split(".")[0], _QKV[ours]
        if interleaved and part in ("q", "k"):
            heads = config.n_head if part == "q" else config.n_query_groups
            t = interleaved_to_half(t if t.dim() == 2 else t[:, None], heads).reshape(t.shape)
        parts = pending.setdefault((i, kind), {})
        parts[part] = t
        if len(parts) == 3:
            del pending[(i, kind)]
            yield f"layers.{i}.attn.wqkv.{kind}", torch.cat([parts["q"], parts["k"], parts["v"]])
    if pending:
        raise KeyError(f"layers {sorted({i for i, _ in pending})} are missing some of q/k/v")


def lit_to_hf(tensors: Tensors, config: Config) -> Iterator[Tuple[str, torch.Tensor]]:
    """Ours -> Hugging Face names and layout (for exporting, and for tests against `transformers`)."""
    inv = {v: k for k, v in _HF.items()}
    q_size, kv_size = config.n_head * config.head_size, config.n_query_groups * config.head_size
    for name, t in tensors:
        m = re.match(r"^layers\.(\d+)\.(.+)$", name)
        if m is None:
            yield inv[name], t
        elif m.group(2) in ("attn.wqkv.weight", "attn.wqkv.bias"):
            suffix = "" if m.group(2).endswith("weight") else ".bias"
            for part, w in zip("qkv", t.split([q_size, kv_size, kv_size])):
                yield f"model.layers.{m.group(1)}.{inv[part + suffix]}", w.contiguous()
        else:
            yield f"model.layers.{m.group(1)}.{inv[m.group(2)]}", t


# Meta's model-parallel shards (13B: 2, 70B: 8) split each matrix along the dim its parallel layer is split on: column
# parallel (wq, wk, wv, w1, w3, output) along the output rows, row parallel (wo, w2) along the input columns. Norms and
# rope.freqs are replicated.
_META_ROW_PARALLEL = re.compile(r"(attention\.wo|feed_forward\.w2)\.weight$")


def meta_shard_dim(name: str, shard_shape: Tuple[int, ...], n_embd: int, n_shards: int) -> Optional[int]:
    """The dim along which the `n_shards` model-parallel pieces of Meta tensor `name` are concatenated, or None when
    the tensor is replicated (take any one). `n_embd` tells the embedding's split: LLaMA 1/2 split it along the
    embedding dim (1), Llama 3 along the vocabulary (0)."""
    if n_shards == 1 or len(shard_shape) < 2:
        return None
    if name == "tok_embeddings.weight":
        return 1 if shard_shape[1] * n_shards == n_embd else 0
    return 1 if _META_ROW_PARALLEL.search(name) else 0
