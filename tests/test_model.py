"""The model against independent implementations: Hugging Face's LlamaForCausalLM for the base, an explicit
matmul-and-softmax reference written here for the Aligner; plus the KV cache, zero gates, parameter counts,
per-row Aligners and where gradients flow."""

import math

import pytest
import torch

from lit_aligner.config import Config
from lit_aligner.convert.mapping import to_lit
from lit_aligner.model import (LLaMA, Aligner, AlignerConfig, init_weights, mark_only_aligner_as_trainable,
                               num_trainable, stack_aligners)

# name: (n_head, n_query_groups, n_embd, tie_embeddings, rope_base)
SHAPES = {
    "mha": (4, 4, 32, False, 10000.0),
    "gqa": (4, 2, 32, False, 10000.0),
    "tied-gqa": (6, 2, 48, True, 500000.0),
}


def tiny_config(shape: str = "gqa", n_layer: int = 3) -> Config:
    n_head, n_kv, n_embd, tied, rope_base = SHAPES[shape]
    return Config(name=f"test-{shape}", block_size=64, vocab_size=97, n_layer=n_layer, n_head=n_head,
                  n_query_groups=n_kv, n_embd=n_embd, intermediate_size=72, rope_base=rope_base, norm_eps=1e-5,
                  tie_embeddings=tied)


def hf_model(config: Config, attn_implementation: str = "sdpa"):
    """A randomly initialised transformers LlamaForCausalLM of `config`'s shape (norm weights away from 1 too)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.n_embd, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
        num_key_value_heads=config.n_query_groups, max_position_embeddings=config.block_size,
        rms_norm_eps=config.norm_eps, rope_theta=config.rope_base, tie_word_embeddings=config.tie_embeddings,
        attn_implementation=attn_implementation,
    )
    hf = LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.dim() == 1 else 0.0))
    return hf


def ours_from_hf(hf, config: Config) -> LLaMA:
    model = LLaMA(config).eval()
    model.load_state_dict(dict(to_lit(hf.state_dict().items(), config, "hf")), strict=True)
    return model


def random_model(config: Config, seed: int = 0) -> LLaMA:
    torch.manual_seed(seed)
    model = LLaMA(config).eval()
    init_weights(model, std=0.1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # RMSNorm weights: away from 1 so a mix-up of norms would show
                p.add_(torch.randn_like(p) * 0.1)
    return model


def random_aligner(config: Config, n_tokens: int, start_layer: int = 1, gate_scale: float = 0.5) -> Aligner:
    a = Aligner(config, AlignerConfig(n_tokens=n_tokens, start_layer=start_layer))
    with torch.no_grad():
        a.gate.copy_(torch.randn_like(a.gate) * gate_scale)
    return a


# ---------------------------------------------------------------------------------------------------------------
# Base model == Hugging Face
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_logits_equal_hf_llama(shape, attn):
    torch.manual_seed(0)
    config = tiny_config(shape)
    hf = hf_model(config, attn)
    ours = ours_from_hf(hf, config)
    idx = torch.randint(0, config.vocab_size, (2, 11))
    with torch.no_grad():
        expected = hf(idx).logits
        got = ours(idx)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4


def _cached_logits(model: LLaMA, idx: torch.Tensor, n_prompt: int, aligner) -> torch.Tensor:
    """Prefill idx[:, :n_prompt], then feed the rest one token at a time through the KV cache; (B, T, vocab)."""
    B, T = idx.shape
    model.setup_caches(B, T + 3)
    outs = [model(idx[:, :n_prompt], input_pos=torch.arange(n_prompt), aligner=aligner)]
    for t in range(n_prompt, T):
        outs.append(model(idx[:, t:t + 1], input_pos=torch.tensor([t]), aligner=aligner))
    model.clear_caches()
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("with_aligner", [False, True])
def test_kv_cache_decoding_equals_full_forward(with_aligner):
    config = tiny_config("gqa")
    model = random_model(config)
    aligner = random_aligner(config, n_tokens=3) if with_aligner else False
    idx = torch.randint(0, config.vocab_size, (2, 12))
    with torch.no_grad():
        full = model(idx, aligner=aligner)
        cached = _cached_logits(model, idx, n_prompt=5, aligner=aligner)
        bare = model(idx, aligner=False)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    if with_aligner:  # the cached path really carried the Aligner
        assert (cached - bare).abs().max() > 1e-3


def test_greedy_decoding_with_cache_equals_hf_generate():
    torch.manual_seed(1)
    config = tiny_config("tied-gqa")
    hf = hf_model(config)
    ours = ours_from_hf(hf, config)
    prompt = torch.randint(0, config.vocab_size, (1, 6))
    n_new = 10
    with torch.no_grad():
        expected = hf.generate(prompt, max_new_tokens=n_new, do_sample=False, min_new_tokens=n_new,
                               pad_token_id=0)[0, prompt.shape[1]:]
        ours.setup_caches(1, prompt.shape[1] + n_new)
        logits = ours(prompt, input_pos=torch.arange(prompt.shape[1]))
        tokens = []
        for t in range(prompt.shape[1], prompt.shape[1] + n_new):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(nxt.item())
            logits = ours(nxt, input_pos=torch.tensor([t]))
    assert tokens == expected.tolist()


# ---------------------------------------------------------------------------------------------------------------
# The Aligner == an explicit reference
# ---------------------------------------------------------------------------------------------------------------


def reference_forward(model: LLaMA, idx: torch.Tensor, aligner: Aligner) -> torch.Tensor:
    """The paper's forward pass spelled out with matmuls and softmaxes, from the weights only: (B, T, vocab)."""
    c = model.config
    B, T = idx.shape
    hs, nh, nkv = c.head_size, c.n_head, c.n_query_groups
    rep = nh // nkv

    def rms(x, w):
        return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + c.norm_eps))

    # Rotate-half RoPE: pair (j, j + hs/2) rotated by angle pos * base^(-2j/hs).
    inv = c.rope_base ** (-torch.arange(0, hs // 2, dtype=torch.float64) * 2 / hs)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]  # (T, hs/2)
    cos, sin = ang.cos().float(), ang.sin().float()

    def rope(x):  # (B, h, T, hs)
        a, b = x[..., :hs // 2], x[..., hs // 2:]
        return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)

    def heads(x, n):  # (B, T, n*hs) -> (B, n, T, hs)
        return x.view(x.shape[0], x.shape[1], n, hs).transpose(1, 2)

    causal = torch.ones(T, T, dtype=torch.bool).tril()
    x = model.tok_embeddings.weight[idx]
    for i, block in enumerate(model.layers):
        w = block.attn.wqkv.weight
        wq, wk, wv = w[:nh * hs], w[nh * hs:(nh + nkv) * hs], w[(nh + nkv) * hs:]
        h = rms(x, block.attention_norm.weight)
        q = rope(heads(h @ wq.T, nh))
        k = rope(heads(h @ wk.T, nkv)).repeat_interleave(rep, dim=1)
        v = heads(h @ wv.T, nkv).repeat_interleave(rep, dim=1)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(hs)
        y = att.masked_fill(~causal, float("-inf")).softmax(-1) @ v  # (B, nh, T, hs)
        if i >= aligner.start_layer:
            P = aligner.prefix  # (N, C): no RoPE, projected by this layer's own k and v rows
            pk = heads((P @ wk.T)[None], nkv).repeat_interleave(rep, dim=1)  # (1, nh, N, hs)
            pv = heads((P @ wv.T)[None], nkv).repeat_interleave(rep, dim=1)
            pa = ((q @ pk.transpose(-1, -2)) / math.sqrt(hs)).softmax(-1) @ pv  # own softmax over the N keys
            y = y + aligner.gate[i - aligner.start_layer][None, :, None, None] * pa
        x = x + y.transpose(1, 2).reshape(B, T, nh * hs) @ block.attn.wo.weight.T
        h = rms(x, block.ffn_norm.weight)
        ff = block.feed_forward
        x = x + (torch.nn.functional.silu(h @ ff.w1.weight.T) * (h @ ff.w3.weight.T)) @ ff.w2.weight.T
    return rms(x, model.norm.weight) @ model.lm_head_weight.T


@pytest.mark.parametrize("shape", ["mha", "gqa"])
@pytest.mark.parametrize("n_tokens", [1, 10])
def test_prefix_attention_equals_explicit_reference(shape, n_tokens):
    config = tiny_config(shape)
    model = random_model(config)
    aligner = random_aligner(config, n_tokens, start_layer=1)
    idx = torch.randint(0, config.vocab_size, (2, 9))
    with torch.no_grad():
        got = model(idx, aligner=aligner)
        expected = reference_forward(model, idx, aligner)
        bare = model(idx, aligner=False)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert (got - bare).abs().max() > 1e-2  # the reference comparison is not vacuous


def test_precomputed_prefix_kv_equals_aligner():
    config = tiny_config("gqa")
    model = random_model(config)
    aligner = random_aligner(config, 4)
    idx = torch.randint(0, config.vocab_size, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(model(idx, aligner=model.prefix_kv(aligner)), model(idx, aligner=aligner),
                                   atol=0, rtol=0)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_zero_gates_equal_base_bit_for_bit(shape):
    config = tiny_config(shape)
    model = random_model(config)
    aligner = Aligner(config, AlignerConfig(n_tokens=5, start_layer=0))  # fresh: random prefix, zero gates
    assert torch.count_nonzero(aligner.gate) == 0
    with torch.no_grad():
        for T in (1, 4, 13):
            idx = torch.randint(0, config.vocab_size, (3, T))
            assert torch.equal(model(idx, aligner=aligner), model(idx, aligner=False))
        aligner.gate[3 % aligner.gate.shape[0], 1] = 0.3
        assert not torch.equal(model(idx, aligner=aligner), model(idx, aligner=False))


def test_model_own_aligner_is_the_default():
    config = tiny_config("gqa")
    torch.manual_seed(0)
    model = LLaMA(config, AlignerConfig(n_tokens=2, start_layer=1)).eval()
    init_weights(model, std=0.1)
    with torch.no_grad():
        model.aligner.gate.normal_()
        idx = torch.randint(0, config.vocab_size, (1, 6))
        assert torch.equal(model(idx), model(idx, aligner=model.aligner))
        assert not torch.equal(model(idx), model(idx, aligner=False))


# ---------------------------------------------------------------------------------------------------------------
# Parameter counts, per-row Aligners, gradients
# ---------------------------------------------------------------------------------------------------------------


def test_trainable_count_llama2_7b_one_token_is_5056():
    # The paper's headline number: 1 * 4096 + (32 - 2) * 32.
    with torch.device("meta"):
        model = LLaMA(Config.from_name("Llama-2-7b-hf"), AlignerConfig(n_tokens=1, start_layer=2))
    mark_only_aligner_as_trainable(model)
    assert num_trainable(model) == 5056


@pytest.mark.parametrize("name,n_tokens,start_layer",
                         [("Llama-2-13b-hf", 10, 2), ("SmolLM2-135M-Instruct", 1, 2), ("tiny", 7, 0),
                          ("Llama-2-70b-hf", 3, 5)])
def test_trainable_count_is_prefix_plus_gates(name, n_tokens, start_layer):
    config = Config.from_name(name)
    with torch.device("meta"):
        model = LLaMA(config, AlignerConfig(n_tokens=n_tokens, start_layer=start_layer))
    mark_only_aligner_as_trainable(model)
    assert num_trainable(model) == n_tokens * config.n_embd + (config.n_layer - start_layer) * config.n_head
    assert num_trainable(model) == model.aligner.num_params()


def test_stacked_aligners_equal_each_row_alone():
    config = tiny_config("gqa")
    model = random_model(config)
    torch.manual_seed(3)
    a1, a2 = random_aligner(config, 3), random_aligner(config, 3)
    rows = [a1, None, a2, a1]
    stacked = stack_aligners(rows, config)
    idx = torch.randint(0, config.vocab_size, (len(rows), 8))
    with torch.no_grad():
        got = model(idx, aligner=stacked)
        for b, a in enumerate(rows):
            alone = model(idx[b:b + 1], aligner=a if a is not None else False)
            torch.testing.assert_close(got[b:b + 1], alone, atol=1e-5, rtol=1e-5)
        assert (got[0] - got[1]).abs().max() > 0  # rows really differ


def test_gradients_reach_only_the_aligner_and_skip_lower_layers():
    config = tiny_config("gqa", n_layer=4)
    model = random_model(config)
    start = 2
    model.aligner = random_aligner(config, 2, start_layer=start)
    mark_only_aligner_as_trainable(model)
    model.train()
    needs_grad = {}
    hooks = [blk.register_forward_hook(lambda m, inp, out, i=i: needs_grad.__setitem__(i, out.requires_grad))
             for i, blk in enumerate(model.layers)]
    idx = torch.randint(0, config.vocab_size, (2, 8))
    logits = model(idx)
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), idx[:, 1:].flatten()).backward()
    for h in hooks:
        h.remove()
    for name, p in model.named_parameters():
        if name.startswith("aligner."):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    # No autograd graph is built through the layers below start_layer: they are pure inference.
    assert [needs_grad[i] for i in range(config.n_layer)] == [i >= start for i in range(config.n_layer)]


def test_a_bare_row_of_a_stack_is_independent_of_the_other_rows_values():
    """A None row (the bare base) in a stack must not see the other rows' Aligners at all: with a NaN Aligner beside
    it, it still equals the bare base (0 x NaN would otherwise poison it through its zero gate)."""
    config = tiny_config("gqa")
    model = random_model(config)
    bad = random_aligner(config, 3)
    with torch.no_grad():
        bad.prefix.fill_(float("nan"))
    idx = torch.randint(0, config.vocab_size, (2, 8))
    with torch.no_grad():
        got = model(idx, aligner=stack_aligners([bad, None], config))
        bare = model(idx[1:], aligner=False)
    assert torch.isfinite(got[1]).all()
    torch.testing.assert_close(got[1:], bare, atol=1e-5, rtol=1e-5)
