"""A LLaMA-family decoder with the global-token Aligner, in one file.

Read top to bottom: the Aligner (N shared prefix tokens + per-layer, per-head gates), the model, its block,
attention, MLP and norm, the KV cache, and the RoPE helpers. The families differ in a few config fields, each used in
one place: `attn_bias` (Qwen2: bias on the q/k/v projection), `qk_norm` (Qwen3: RMSNorm of every query and key head
before RoPE), `head_size` (Qwen3, Mistral-Nemo: not n_embd / n_head), `rope_scaling` (Llama 3.1+: "llama3";
"linear", "yarn", "dynamic") and `nope_layers` (SmolLM3: every 4th layer's queries and keys get no RoPE).

The Aligner (arXiv 2312.05503): a prefix P of shape (N, n_embd) is shared by every layer i >= start_layer. Each such
layer projects P through its own frozen K and V weights (no RoPE on the prefix keys; GQA layers use their KV heads),
lets its queries attend to those N keys with a softmax of their own, and adds the result, scaled by a per-head gate
initialised to zero, to the causal attention output before the output projection. Zero gates give the base model.
The prefix keys are computed exactly as the layer computes keys (bias, k-norm) except for RoPE: the prefix has no
position.
"""

import math
from dataclasses import dataclass
from typing import List, Literal, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_aligner.config import Config


@dataclass
class AlignerConfig:
    n_tokens: int = 10
    start_layer: int = 2


class Aligner(nn.Module):
    """The whole alignment: `prefix` (N, n_embd) and `gate` (n_layer - start_layer, n_head).

    A stack of several Aligners (see `stack_aligners`) has a leading batch dimension on both tensors: row b of a
    batch is then steered by Aligner b.
    """

    def __init__(self, model_config: Config, config: AlignerConfig = AlignerConfig()):
        super().__init__()
        if not 1 <= config.n_tokens:
            raise ValueError(f"n_tokens must be >= 1, got {config.n_tokens}")
        if not 0 <= config.start_layer < model_config.n_layer:
            raise ValueError(f"start_layer must be in [0, {model_config.n_layer}), got {config.start_layer}")
        self.config = config
        self.n_layer, self.n_head, self.n_embd = model_config.n_layer, model_config.n_head, model_config.n_embd
        # N(0, 1) like the embedding the original code used for the prefix; gates at zero so training starts at the
        # base.
        self.prefix = nn.Parameter(torch.randn(config.n_tokens, model_config.n_embd))
        self.gate = nn.Parameter(torch.zeros(model_config.n_layer - config.start_layer, model_config.n_head))

    @property
    def start_layer(self) -> int:
        return self.config.start_layer

    @property
    def n_tokens(self) -> int:
        return self.config.n_tokens

    def num_params(self) -> int:
        return self.prefix.numel() + self.gate.numel()


PrefixInit = Literal["normal", "hidden", "embedding"]
PREFIX_INITS = ("normal", "hidden", "embedding")
# "hidden" reached a lower held-out loss than the paper's "normal" at equal steps (benchmarks/quality.py); "normal"
# stays one flag away and every Aligner file loads whatever its initialisation was.
DEFAULT_PREFIX_INIT = "hidden"
# A hidden or embedding prefix starts at this multiple of the hidden-state scale: 0.5 reached a lower held-out loss
# than 1 and 2, and 0.25 and 0.1 no lower (SmolLM2 + Alpaca, howto/evaluate.md).
DEFAULT_PREFIX_INIT_SCALE = 0.5


@torch.no_grad()
def init_prefix(model: "LLaMA", aligner: Aligner, how: str = "normal", generator: Optional[torch.Generator] = None,
                scale: float = 1.0):
    """Set a fresh prefix. "normal": N(0, 1), the paper's (and the original code's) initialisation. The prefix enters
    each gated layer's K/V projection without that layer's RMSNorm, so N(0, 1) is on an arbitrary scale next to the
    hidden states the projection was trained on: "hidden" draws N(0, 1) times `scale` times the RMS those inputs have
    (the RMS of the gated layers' attention-norm weights: a normalised hidden state has unit RMS before them);
    "embedding" takes the embeddings of N random vocabulary tokens, RMS-normalised to that same scale (real-token
    directions). `scale` does not apply to "normal": that is the paper's N(0, 1) exactly."""
    if how not in PREFIX_INITS:
        raise ValueError(f"unknown prefix init {how!r}; one of {', '.join(PREFIX_INITS)}")
    p = aligner.prefix
    if how == "normal":  # what Aligner() drew already (redrawn only from an explicit generator)
        if generator is not None:
            p.copy_(torch.randn(p.shape, generator=generator).to(p))
        return
    norms = [b.attention_norm.weight.float() for b in model.layers[aligner.start_layer:]]
    rms = torch.stack([w.pow(2).mean().sqrt() for w in norms]).mean() * scale
    if how == "hidden":
        p.copy_((torch.randn(p.shape, generator=generator) * rms.cpu()).to(p))
        return
    ids = torch.randint(0, model.config.vocab_size, (aligner.n_tokens,), generator=generator)
    e = model.tok_embeddings.weight[ids.to(model.tok_embeddings.weight.device)].float()
    p.copy_((e * torch.rsqrt(e.pow(2).mean(-1, keepdim=True) + 1e-12) * rms).to(p))


def stack_aligners(aligners: List[Optional[Aligner]], model_config: Config) -> Aligner:
    """One Aligner per batch row, for serving several alignments from one loaded base. `None` rows get the bare
    base: a zero gate and a zero prefix, so that no other row's values (even non-finite ones) can reach them through
    0 * x. All must share n_tokens and start_layer."""
    real = [a for a in aligners if a is not None]
    if not real:
        raise ValueError("stack_aligners needs at least one Aligner")
    shapes = {(a.n_tokens, a.start_layer) for a in real}
    if len(shapes) > 1:
        raise ValueError(f"Aligners batched together must share n_tokens and start_layer, got {sorted(shapes)}")
    first = real[0]
    stacked = Aligner(model_config, first.config).to(device=first.prefix.device, dtype=first.prefix.dtype)
    with torch.no_grad():
        zeros = torch.zeros_like(first.prefix)
        stacked.prefix = nn.Parameter(torch.stack([a.prefix if a is not None else zeros for a in aligners]),
                                      requires_grad=False)
        stacked.gate = nn.Parameter(
            torch.stack([a.gate if a is not None else torch.zeros_like(first.gate) for a in aligners]),
            requires_grad=False,
        )
    return stacked


@dataclass
class PrefixKV:
    """The prefix keys and values of every gated layer, computed once per Aligner (inference) instead of per call.
    keys[j], values[j]: (B or 1, n_query_groups, N, head_size) for layer start_layer + j; gate: (B or 1, L', n_head);
    mask: optional (B, N) bool, False for padding prefix slots (rows whose Aligners have fewer than N tokens).
    values[j] None: keys[j] is the raw prefix, (N, C) or (B, N, C), which that layer projects itself."""

    start_layer: int
    keys: List[torch.Tensor]
    values: List[torch.Tensor]
    gate: torch.Tensor
    mask: Optional[torch.Tensor] = None

    def per_row(self, batch_size: int) -> "PrefixKV":
        """This prefix with one row per batch row (a shared one copied B times; a few MB, once per call), so that one
        shared Aligner and B different ones run the same code and the same compiled decoding graph (compiling one
        takes ~45 s for a 7B model)."""
        if self.gate.shape[0] == batch_size:
            return self

        def rows(t):
            return t.expand(batch_size, *t.shape[1:]).contiguous()

        return PrefixKV(self.start_layer, [rows(k) for k in self.keys], [rows(v) for v in self.values],
                        rows(self.gate), None if self.mask is None else rows(self.mask))


# `aligner` argument of the forward pass: None uses the model's own Aligner (if any), False the bare base.
AlignerArg = Union[None, bool, Aligner, PrefixKV]


class LLaMA(nn.Module):
    def __init__(self, config: Config, aligner_config: Optional[AlignerConfig] = None):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.output = None if config.tie_embeddings else nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.aligner: Optional[Aligner] = Aligner(config, aligner_config) if aligner_config else None
        self.quantize: Optional[str] = None  # the blocks' linear layers quantized by lit_aligner.quantize, or None
        self.max_seq_length = config.block_size
        # Long-context bases (128k, 1M positions) would spend gigabytes on tables never used: grown on demand.
        cos, sin = build_rope_cache(min(config.block_size, ROPE_CACHE_START), config)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.causal_mask: Optional[torch.Tensor] = None

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def reset_rope(self, device: Optional[torch.device] = None, length: Optional[int] = None) -> None:
        """Recompute the RoPE tables (after building on the meta device, or to lengthen them to `length`)."""
        device = device or self.tok_embeddings.weight.device
        length = length or max(self.rope_cos.shape[0], min(self.config.block_size, ROPE_CACHE_START))
        self.rope_cos, self.rope_sin = build_rope_cache(length, self.config, device=device)

    def setup_caches(self, max_batch_size: int, max_seq_length: int, dtype: Optional[torch.dtype] = None) -> None:
        """Allocate full-size KV caches once, so shapes never change during decoding. Normal tensors also when
        called under torch.inference_mode: a later call outside it writes them too (inference tensors refuse that)."""
        p = self.tok_embeddings.weight
        dtype = dtype or p.dtype
        self.max_seq_length = max_seq_length
        if max_seq_length > self.rope_cos.shape[0]:
            self.reset_rope(p.device, max_seq_length)
        with torch.inference_mode(False):
            for block in self.layers:
                block.attn.kv_cache = KVCache(max_batch_size, self.config.n_query_groups, max_seq_length,
                                              self.config.head_size, dtype, p.device)
        self.causal_mask = torch.tril(torch.ones(max_seq_length, max_seq_length, dtype=torch.bool, device=p.device))

    def clear_caches(self) -> None:
        for block in self.layers:
            block.attn.kv_cache = None
        self.causal_mask = None

    def prefix_kv(self, aligner: Aligner, project: bool = True) -> PrefixKV:
        """Project an Aligner's prefix through every gated layer's K and V weights, once (project=False: the raw
        prefix for each layer, which projects it in its own forward)."""
        gate = aligner.gate if aligner.gate.dim() == 3 else aligner.gate.unsqueeze(0)
        gated = self.layers[aligner.start_layer:]
        if not project:
            return PrefixKV(aligner.start_layer, [aligner.prefix] * len(gated), [None] * len(gated), gate)
        prefix = aligner.prefix.to(self.tok_embeddings.weight.dtype)
        keys, values = zip(*(block.attn.project_prefix(prefix) for block in gated))
        return PrefixKV(aligner.start_layer, list(keys), list(values), gate)

    def forward(
        self,
        idx: torch.Tensor,
        input_pos: Optional[torch.Tensor] = None,
        aligner: AlignerArg = None,
        mask: Optional[torch.Tensor] = None,
        positions: Optional[torch.Tensor] = None,
        return_hidden: bool = False,
        cache_rows: Optional[slice] = None,
    ) -> torch.Tensor:
        """idx: (B, T) token ids. input_pos: KV-cache slots to write, (T,) for every row or (B, T) per row (None: no
        cache, plain causal attention). mask: optional (B, 1, T, S) boolean attention mask (True = attend) replacing
        the causal one, e.g. for left-padded batches; with a cache, S may be shorter than the cache (only the first S
        slots are attended: rows that are all short need not scan the whole cache). positions: optional (B, T) RoPE
        positions (default: input_pos, else 0..T-1). cache_rows: the rows of the KV cache this batch uses (default:
        the first B).
        Returns logits (B, T, vocab), or the final normalised hidden states (B, T, n_embd) if return_hidden."""
        B, T = idx.shape
        if aligner is None:
            aligner = self.aligner
        elif aligner is False:
            aligner = None
        # An Aligner's prefix is projected by each gated layer inside its own forward: a sharded model (FSDP) has a
        # layer's weights only there. Decoding passes a PrefixKV projected once per Aligner instead.
        pkv = self.prefix_kv(aligner, project=False) if isinstance(aligner, Aligner) else aligner

        if positions is None:
            positions = input_pos if input_pos is not None else torch.arange(T, device=idx.device)
        if input_pos is None and T > self.rope_cos.shape[0]:  # (cached decoding grows the table in setup_caches)
            self.reset_rope(idx.device, T)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # (T, hs) or (B, T, hs)
        if cos.dim() == 3:
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, hs) broadcasts over heads
        if input_pos is not None and mask is None:
            causal = self.causal_mask[input_pos]  # (T, S) or (B, T, S)
            mask = causal[None, None] if input_pos.dim() == 1 else causal[:, None]  # (1 | B, 1, T, S)

        x = self.tok_embeddings(idx)  # (B, T, C)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for i, block in enumerate(self.layers):
            prefix = None
            if pkv is not None and i >= pkv.start_layer:
                j = i - pkv.start_layer
                prefix = (pkv.keys[j], pkv.values[j], pkv.gate[:, j], pkv.mask)
            x = block(x, cos, sin, mask, input_pos, prefix, cache_rows)
        x = self.norm(x)
        if return_hidden:
            return x
        return F.linear(x, self.lm_head_weight)  # (B, T, vocab)


class Block(nn.Module):
    def __init__(self, config: Config, index: int = 0):
        super().__init__()
        self.attention_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = CausalSelfAttention(config, rope=index not in (config.nope_layers or ()))
        self.ffn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.feed_forward = MLP(config)

    def forward(self, x, cos, sin, mask, input_pos, prefix, cache_rows=None):
        x = x + self.attn(self.attention_norm(x), cos, sin, mask, input_pos, prefix, cache_rows)
        return x + self.feed_forward(self.ffn_norm(x))


class CausalSelfAttention(nn.Module):
    def __init__(self, config: Config, rope: bool = True):
        super().__init__()
        self.rope = rope  # SmolLM3's NoPE layers attend by content alone
        self.n_head, self.n_kv, self.hs = config.n_head, config.n_query_groups, config.head_size
        # q, k and v in one matmul; the prefix reuses the k and v rows of this same weight (and bias).
        self.wqkv = nn.Linear(config.n_embd, (self.n_head + 2 * self.n_kv) * self.hs, bias=config.attn_bias)
        self.wo = nn.Linear(self.n_head * self.hs, config.n_embd, bias=False)
        # Qwen3: every query and key head is RMS-normalised before RoPE (keys of the prefix too)
        self.q_norm = RMSNorm(self.hs, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.hs, config.norm_eps) if config.qk_norm else None
        self.kv_cache: Optional[KVCache] = None

    def project_prefix(self, prefix: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """prefix: (N, C) or (B, N, C) -> keys, values: (B or 1, n_kv, N, hs), through this layer's own key and value
        projection (bias and k-norm included). No RoPE: the prefix has no position."""
        if prefix.dim() == 2:
            prefix = prefix.unsqueeze(0)
        q_size, kv_size = self.n_head * self.hs, self.n_kv * self.hs
        if type(self.wqkv) is nn.Linear:
            bias = self.wqkv.bias[q_size:] if self.wqkv.bias is not None else None
            kv = F.linear(prefix.to(self.wqkv.weight.dtype), self.wqkv.weight[q_size:], bias)  # (B, N, 2 * kv_size)
        else:  # a quantized layer (lit_aligner.quantize) has no float rows to slice: q for N tokens costs nothing
            kv = self.wqkv(prefix)[..., q_size:]
        k, v = kv.split(kv_size, dim=-1)
        B, N = prefix.shape[:2]
        k, v = k.view(B, N, self.n_kv, self.hs), v.view(B, N, self.n_kv, self.hs)
        if self.k_norm is not None:
            k = self.k_norm(k)
        # Contiguous once here: the attention kernels need this layout, and a strided prefix was copied in every
        # decoding step (2 copy kernels per layer: 0.18 of 4.75 ms per token for LLaMA-2-7B on an H200).
        return k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()

    def qkv(self, x, cos, sin) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (B, T, C) normalised hidden states -> q (B, nh, T, hs), k and v (B, n_kv, T, hs), as attention sees them
        (q/k-norm and RoPE applied); `lit_aligner.evaluation.inspect` reads the prefix attention's queries here."""
        B, T, _ = x.shape
        q, k, v = self.wqkv(x).split([self.n_head * self.hs, self.n_kv * self.hs, self.n_kv * self.hs], dim=-1)
        q, k, v = q.view(B, T, self.n_head, self.hs), k.view(B, T, self.n_kv, self.hs), v.view(B, T, self.n_kv, self.hs)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def forward(self, x, cos, sin, mask, input_pos, prefix, cache_rows=None):
        B, T, _ = x.shape
        q, k, v = self.qkv(x, cos, sin)
        if self.kv_cache is not None and input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v, cache_rows)  # (B, n_kv, S, hs)
            if mask is not None and mask.shape[-1] < k.shape[2]:  # a mask over the first slots only: skip the rest
                k, v = k[:, :, :mask.shape[-1]], v[:, :, :mask.shape[-1]]
        gqa = self.n_kv != self.n_head
        # No mask tensor at all in training: the causal flag lets SDPA take its flash path.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
        if prefix is not None:
            pk, pv, gate, pmask = prefix  # (B|1, n_kv, N, hs) x2, (B|1, nh), (B, N) or None
            if pv is None:  # the Aligner's prefix itself, (N, C) or (B, N, C)
                pk, pv = self.project_prefix(pk.to(x.dtype))
            if pk.shape[0] != B:
                pk, pv = pk.expand(B, -1, -1, -1), pv.expand(B, -1, -1, -1)
            # Every query sees all N prefix tokens, with a softmax separate from the causal one.
            pmask = pmask[:, None, None, :] if pmask is not None else None
            ay = F.scaled_dot_product_attention(q, pk, pv, attn_mask=pmask, enable_gqa=gqa)  # (B, nh, T, hs)
            y = y + gate.to(y.dtype)[:, :, None, None] * ay
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.hs)
        return self.wo(y)


class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, config: Config):
        super().__init__()
        self.w1 = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.w3 = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 even for bf16 activations, as the reference implementations do.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class KVCache(nn.Module):
    """Full-size key/value buffers written in place at `input_pos` (gpt-fast style: static shapes)."""

    def __init__(self, B: int, n_kv: int, S: int, hs: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.register_buffer("k", torch.zeros(B, n_kv, S, hs, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(B, n_kv, S, hs, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: Optional[slice] = None):
        """Write k, v: (B, n_kv, T, hs) at slots input_pos ((T,) for every row, or (B, T) per row) of cache `rows`
        (default: the first B); returns those rows' whole buffers (B, n_kv, S, hs)."""
        rows = rows if rows is not None else slice(0, k.shape[0])
        ck, cv = self.k[rows], self.v[rows]
        if input_pos.dim() == 1:
            ck.index_copy_(2, input_pos, k.to(ck.dtype))
            cv.index_copy_(2, input_pos, v.to(cv.dtype))
        else:  # each row at its own slots (continuous batching: rows are at different lengths)
            b = torch.arange(k.shape[0], device=k.device)[:, None]
            ck[b, :, input_pos] = k.transpose(1, 2).to(ck.dtype)
            cv[b, :, input_pos] = v.transpose(1, 2).to(cv.dtype)
        return ck, cv


ROPE_CACHE_START = 8192  # positions in the RoPE tables at first; setup_caches and long inputs grow them


def rope_frequencies(config: Config, device: Optional[torch.device] = None) -> Tuple[torch.Tensor, float]:
    """The inverse frequencies (head_size / 2,) of RoPE and the factor cos and sin are scaled by, for the config's
    `rope_scaling` (Hugging Face's names and formulas): None / "default"; "linear" (frequencies / factor); "dynamic"
    (NTK-aware: equal to the default up to the original context, which is the model's block_size); "llama3"
    (Llama 3.1+: low frequencies / factor, high ones kept, a smooth ramp between); "yarn" (frequency ramp between
    interpolation and extrapolation, cos and sin scaled by the attention factor); "freq_factors" (a GGUF's
    rope_freqs: frequencies / factors)."""
    hs, scaling = config.head_size, config.rope_scaling or {}
    inv_freq = 1.0 / (config.rope_base ** (torch.arange(0, hs, 2, device=device, dtype=torch.float32) / hs))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in ("default", "dynamic"):
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    if kind == "freq_factors":
        return inv_freq / torch.tensor(scaling["factors"], device=device, dtype=torch.float32), 1.0
    factor, original = scaling["factor"], scaling["original_max_position_embeddings"]
    if kind == "llama3":
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        medium = (wavelen >= original / high) & (wavelen <= original / low)
        return torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled), 1.0
    if kind == "yarn":
        def mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attention = scaling.get("attention_factor")
        if attention is None:
            m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
            attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

        def correction_dim(rotations: float) -> float:
            return hs * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(config.rope_base))

        lo, hi = correction_dim(scaling.get("beta_fast") or 32), correction_dim(scaling.get("beta_slow") or 1)
        if scaling.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, hs - 1)
        ramp = ((torch.arange(hs // 2, device=device, dtype=torch.float32) - lo) / ((hi - lo) or 0.001)).clamp(0, 1)
        return inv_freq / factor * ramp + inv_freq * (1 - ramp), float(attention)
    raise ValueError(f"RoPE scaling {kind!r} is not supported")


def build_rope_cache(seq_len: int, config: Config,
                     device: Optional[torch.device] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: (seq_len, head_size), in the Hugging Face "rotate half" layout (the first and second halves of a
    head are the two coordinates of each rotated pair). Meta and GGUF q/k weights are permuted to it on import."""
    inv_freq, scale = rope_frequencies(config, device)
    t = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scale, emb.sin() * scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, nh, T, hs); cos, sin: (T, hs) or (B, 1, T, hs)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def init_weights(model: LLaMA, std: float = 0.02) -> None:
    """Random base weights (for tests and benchmarks: speed does not depend on weight values): norms 1, biases and
    matrices N(0, std)."""
    for name, p in model.named_parameters():
        if name.startswith("aligner."):
            continue
        if p.dim() == 1 and not name.endswith(".bias"):
            nn.init.ones_(p)
        else:
            nn.init.normal_(p, std=std)


# One filter decides what trains and what is saved: the Aligner and nothing else.
def is_aligner_param(name: str) -> bool:
    return name.startswith("aligner.")


def mark_only_aligner_as_trainable(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        p.requires_grad = is_aligner_param(name)


def check_only_aligner_trainable(model: nn.Module) -> None:
    """RuntimeError naming them when any base weight would receive gradients."""
    bad = [n for n, p in model.named_parameters() if p.requires_grad and not is_aligner_param(n)]
    if bad:
        raise RuntimeError(f"only the Aligner may train, but these base weights require grad: {bad[:5]}")


def num_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
