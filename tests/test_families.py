"""The base families people align today, exact against transformers: Llama 3.x (llama3 RoPE scaling, tied embeddings),
Qwen2/2.5 (q/k/v bias), Qwen3 (per-head q/k RMSNorm, explicit head_dim), Mistral v0.3 / Nemo (explicit head_dim),
SmolLM3 (no RoPE in every 4th layer), and the other RoPE scalings of HF configs (linear, dynamic, yarn). Random tiny
models of each family are converted from their Hugging Face folder and from a GGUF written here; logits, cached
greedy decoding and the Aligner are checked on each; their tokenizers and chat templates against transformers'."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import helpers
from lit_aligner.aligner_files import AlignerBaseWarning, AlignerFileError, load_aligner, save_aligner
from lit_aligner.base import load_model
from lit_aligner.config import Config
from lit_aligner.convert import ConvertError, convert_gguf, convert_hf
from lit_aligner.generation import generate
from lit_aligner.model import Aligner, AlignerConfig, mark_only_aligner_as_trainable, num_trainable
from lit_aligner.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

ROOT = Path(__file__).resolve().parents[1]
VOCAB, N_EMBD, N_HEAD, INTER, N_LAYER = 256, 64, 4, 128, 3
IDS = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))  # longer than "original" contexts

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
FAMILIES = {  # name -> (transformers class, config overrides)
    "llama3-gqa-tied": ("Llama", dict(num_key_value_heads=2, rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True)),
    "llama3-mha-untied": ("Llama", dict(num_key_value_heads=4, rope_parameters=LLAMA3_ROPE)),
    "llama-linear": ("Llama", dict(num_key_value_heads=2, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                           "rope_theta": 10000.0})),
    "llama-dynamic": ("Llama", dict(num_key_value_heads=2, rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                                            "rope_theta": 10000.0})),
    "llama-yarn": ("Llama", dict(num_key_value_heads=2, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 16})),
    "mistral-head-dim": ("Mistral", dict(num_key_value_heads=2, head_dim=32, sliding_window=None,
                                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "qwen2-gqa-tied": ("Qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2-mha-untied": ("Qwen2", dict(num_key_value_heads=4)),
    "qwen3-gqa-head-dim": ("Qwen3", dict(num_key_value_heads=2, head_dim=32)),
    "qwen3-tied": ("Qwen3", dict(num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)),
    # SmolLM3: no RoPE in every 4th layer (here layer 3 of 5: its neighbours have RoPE)
    "smollm3-nope": ("SmolLM3", dict(num_key_value_heads=2, num_hidden_layers=5, tie_word_embeddings=True,
                                     pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                     rope_parameters={"rope_type": "default", "rope_theta": 2000000.0})),
}


def make_hf(family: str, seed: int = 0, vocab: int = VOCAB, context: int = 64):
    kind, overrides = FAMILIES[family]
    cfg = getattr(transformers, f"{kind}Config")(**{
        **dict(vocab_size=vocab, hidden_size=N_EMBD, intermediate_size=INTER, num_hidden_layers=N_LAYER,
               num_attention_heads=N_HEAD, max_position_embeddings=context, rms_norm_eps=1e-6), **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, f"{kind}ForCausalLM")(cfg).eval()
    with torch.no_grad():  # weights large enough that a wrong layout shows in the logits; norms != 1; biases != 0
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=list(FAMILIES))
def converted(request, tmp_path_factory):
    """(family, transformers model, our converted directory)."""
    model = make_hf(request.param)
    d = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(d / "hf")
    convert_hf(d / "hf", d / "ours", model_name=request.param)
    return request.param, model, d / "ours"


def hf_logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


# ---------------------------------------------------------------------------------------------------------------------
# Logits and decoding


def test_logits_equal_transformers_in_fp32(converted):
    family, hf, ours = converted
    model = load_model(ours, dtype=torch.float32)
    config = model.config
    assert config.attn_bias == family.startswith("qwen2") and config.qk_norm == family.startswith("qwen3")
    assert config.nope_layers == ([3] if family.startswith("smollm3") else None)
    assert config.head_size == hf.config.head_dim if hasattr(hf.config, "head_dim") and hf.config.head_dim else True
    with torch.no_grad():
        diff = (model(IDS, aligner=False) - hf_logits(hf)).abs().max().item()
    assert diff <= 1e-4, (family, diff)


def test_cached_greedy_decoding_equals_full_forward_and_transformers_generate(converted):
    family, hf, ours = converted
    model = load_model(ours, dtype=torch.float32)
    prompt = IDS[0, :20]
    ours_new = generate(model, [prompt], 12)[0]
    seq = prompt.clone()
    with torch.no_grad():
        for _ in range(12):  # the full forward, one token at a time
            seq = torch.cat([seq, model(seq[None], aligner=False)[0, -1].argmax()[None]])
    assert torch.equal(ours_new, seq[20:]), family
    with torch.no_grad():
        hf_out = hf.generate(prompt[None], max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours_new, hf_out[0, 20:]), family


def test_the_aligner_on_every_family_zero_gates_are_the_base_and_the_prefix_uses_the_layer_keys(converted):
    family, _, ours = converted
    model = load_model(ours, dtype=torch.float32)
    config = model.config
    aligner = Aligner(config, AlignerConfig(n_tokens=3, start_layer=1))
    model.aligner = aligner
    mark_only_aligner_as_trainable(model)
    assert num_trainable(model) == 3 * config.n_embd + (config.n_layer - 1) * config.n_head
    with torch.no_grad():
        assert torch.equal(model(IDS), model(IDS, aligner=False))  # zero gates: the base, bit for bit
        aligner.gate.normal_()
        # The prefix keys/values of one layer, computed independently: its own k/v rows (+ bias, + k-norm), no RoPE.
        attn = model.layers[2].attn
        q_size, kv = config.n_head * config.head_size, config.n_query_groups * config.head_size
        w, b = attn.wqkv.weight, attn.wqkv.bias
        k = aligner.prefix @ w[q_size:q_size + kv].T + (b[q_size:q_size + kv] if b is not None else 0)
        v = aligner.prefix @ w[q_size + kv:].T + (b[q_size + kv:] if b is not None else 0)
        k = k.view(3, config.n_query_groups, config.head_size)
        if config.qk_norm:
            k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + config.norm_eps) * attn.k_norm.weight
        pk, pv = attn.project_prefix(aligner.prefix)
        torch.testing.assert_close(pk[0], k.transpose(0, 1))
        torch.testing.assert_close(pv[0], v.view(3, config.n_query_groups, config.head_size).transpose(0, 1))
        assert not torch.allclose(model(IDS), model(IDS, aligner=False))


# ---------------------------------------------------------------------------------------------------------------------
# GGUF: qwen2, qwen3, and Llama 3 (llama with rope_freqs)


def llama_cpp_permute(w, n_head):
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(hf_config) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel: the per-frequency divisors of Llama 3.1's RoPE scaling."""
    r = hf_config.rope_parameters
    hs = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    freqs = 1.0 / (r["rope_theta"] ** (np.arange(0, hs, 2, dtype=np.float32) / hs))
    low_wl = r["original_max_position_embeddings"] / r["low_freq_factor"]
    high_wl = r["original_max_position_embeddings"] / r["high_freq_factor"]
    factors = []
    for f in freqs:
        wavelen = 2 * np.pi / f
        if wavelen < high_wl:
            factors.append(1.0)
        elif wavelen > low_wl:
            factors.append(r["factor"])
        else:
            smooth = (r["original_max_position_embeddings"] / wavelen - r["low_freq_factor"]) / (
                r["high_freq_factor"] - r["low_freq_factor"])
            factors.append(1 / ((1 - smooth) / r["factor"] + smooth))
    return np.array(factors, dtype=np.float32)


GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
              "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def save_gguf(hf, path: Path, arch: str) -> Path:
    """The model as llama.cpp writes it (F32): `llama` permutes q/k and carries rope_freqs for Llama 3 scaling;
    `qwen2` / `qwen3` keep the half layout."""
    c = hf.config
    hs = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(hs)
    w.add_value_length(hs)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(hs)
    w.add_vocab_size(c.vocab_size)
    if c.rope_parameters.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(c))
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        m = re.match(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)$", name)
        if m:
            ours = GGUF_NAMES[m.group(2)]
            if arch in ("llama", "smollm3") and ours in ("attn_q", "attn_k"):
                t = llama_cpp_permute(t, c.num_attention_heads if ours == "attn_q" else c.num_key_value_heads)
            gname = f"blk.{m.group(1)}.{ours}.{m.group(3)}"
        else:
            gname = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}[name]
        w.add_tensor(gname, t.detach().numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("family,arch", [("llama3-gqa-tied", "llama"), ("qwen2-gqa-tied", "qwen2"),
                                         ("qwen2-mha-untied", "qwen2"), ("qwen3-gqa-head-dim", "qwen3"),
                                         ("smollm3-nope", "smollm3")])
def test_gguf_of_each_architecture_gives_the_source_logits(family, arch, tmp_path):
    hf = make_hf(family, seed=3)
    path = save_gguf(hf, tmp_path / f"{family}.gguf", arch)
    result = convert_gguf(path, tmp_path / "out", model_name=family)
    assert result.config.attn_bias == (arch == "qwen2") and result.config.qk_norm == (arch == "qwen3")
    assert result.config.nope_layers == ([3] if arch == "smollm3" else None)
    if arch == "llama":
        assert result.config.rope_scaling["rope_type"] == "freq_factors"
    model = load_model(tmp_path / "out", dtype=torch.float32)
    with torch.no_grad():
        diff = (model(IDS, aligner=False) - hf_logits(hf)).abs().max().item()
    assert diff <= 1e-4, (family, diff)


def test_unsupported_configs_are_one_clear_error_naming_the_field(tmp_path):
    hf = make_hf("qwen2-gqa-tied")
    hf.save_pretrained(tmp_path / "src")
    cfg_path = tmp_path / "src" / "config.json"
    base = json.loads(cfg_path.read_text())
    cases = {
        "longrope": ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0],
                                          "long_factor": [1.0]}}, "rope_scaling.rope_type 'longrope'"),
        "window": ({"use_sliding_window": True, "sliding_window": 8}, "sliding_window 8"),
        "mlp bias": ({"mlp_bias": True}, "mlp_bias"),
        "model type": ({"model_type": "gemma2"}, "model_type 'gemma2'"),
        "smollm3 window": ({"model_type": "smollm3", "layer_types": ["full_attention", "sliding_attention"] * 2},
                           "layer_types ['full_attention', 'sliding_attention']"),
        "smollm3 nope": ({"model_type": "smollm3", "no_rope_layers": [1, 0]}, "no_rope_layers has 2 entries for 3"),
    }
    for name, (change, message) in cases.items():
        cfg_path.write_text(json.dumps({**base, **change}))
        with pytest.raises(ConvertError, match=re.escape(message)):
            convert_hf(tmp_path / "src", tmp_path / f"out-{name.replace(' ', '-')}")


def test_mistral_v01_sliding_window_caps_the_context_where_full_attention_is_exact():
    c = Config.from_hf_config({"model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096,
                               "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                               "num_key_value_heads": 8, "max_position_embeddings": 32768, "sliding_window": 4096})
    assert c.block_size == 4096


def test_named_configs_of_the_new_families_have_their_published_shapes():
    expected = {  # (n_layer, n_head, n_query_groups, n_embd, head_size, vocab, tied)
        "Llama-3.1-8B": (32, 32, 8, 4096, 128, 128256, False), "Llama-3.2-1B": (16, 32, 8, 2048, 64, 128256, True),
        "Qwen2.5-0.5B": (24, 14, 2, 896, 64, 151936, True), "Qwen3-0.6B": (28, 16, 8, 1024, 128, 151936, True),
        "Mistral-Nemo-Base-2407": (40, 32, 8, 5120, 128, 131072, False),
    }
    for name, shape in expected.items():
        c = Config.from_name(name)
        assert (c.n_layer, c.n_head, c.n_query_groups, c.n_embd, c.head_size, c.vocab_size, c.tie_embeddings) == shape
    with torch.device("meta"):
        from lit_aligner.model import LLaMA

        model = LLaMA(Config.from_name("Qwen2.5-0.5B"))
    n = sum(p.numel() for p in model.parameters())
    assert 0.48e9 < n < 0.5e9  # the published 494M


# ---------------------------------------------------------------------------------------------------------------------
# Aligners across bases of one shape


def test_an_aligner_of_one_family_loads_onto_another_base_of_the_same_shape_and_not_onto_another_shape(tmp_path):
    qwen2 = Config(name="tiny-qwen2", **{**Config.from_name("tiny").shape(), "attn_bias": True})
    llama = Config.from_name("tiny")
    other = Config(name="tiny-qwen3", **{**Config.from_name("tiny").shape(), "n_head": 8, "n_query_groups": 2,
                                         "qk_norm": True})
    a = Aligner(qwen2, AlignerConfig(2, 1))
    path = save_aligner(a, tmp_path / "qwen2.safetensors", qwen2.name)
    with torch.device("meta"):
        from lit_aligner.model import LLaMA

        llama_model, other_model = LLaMA(llama), LLaMA(other)
    with pytest.warns(AlignerBaseWarning, match="tiny-qwen2.*tiny"):
        load_aligner(path, llama_model)
    with pytest.raises(AlignerFileError, match="does not fit the base model tiny-qwen3"):
        load_aligner(path, other_model)


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizers and chat templates


LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
LLAMA3_TEMPLATE = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
                   "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
                   "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
                   "{{ content }}{% endfor %}{% if add_generation_prompt %}"
                   "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA31_DATE = ("{{- bos_token }}{%- if not date_string is defined %}{%- set date_string = strftime_now(\"%d %b %Y\") "
                "%}{%- endif %}{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}{{- 'Today Date: ' + "
                "date_string + '\n\n<|eot_id|>' }}{%- for message in messages %}{{- '<|start_header_id|>' + "
                "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
                "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}")
QWEN_TEMPLATE = ("{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + "
                 "'<|im_end|>\n' }}{%- else %}{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You "
                 "are a helpful assistant.<|im_end|>\n' }}{%- endif %}{%- for message in messages %}{%- if not "
                 "(message.role == 'system' and loop.first) %}{{- '<|im_start|>' + message.role + '\n' + "
                 "message.content + '<|im_end|>\n' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}"
                 "{{- '<|im_start|>assistant\n' }}{%- endif %}")
TEXTS = ["Hello, world! 12345 and 1234567890", "naïve café — 日本語のテキスト 🤖 emoji",
         "  leading   and trailing   spaces\t\ttabs\n\n\nnewlines  ", "it's they'll I'M 3.14159 x=y+z",
         "<|im_start|>user\nhi<|im_end|>", "<|start_header_id|>user<|end_header_id|>\n\nhey<|eot_id|>"]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3? "}]


def build_tokenizer(d: Path, style: str) -> Path:
    """A BPE trained here with the Llama 3 or Qwen2 pre-tokenizer (regex split + byte level, merges ignored for
    whole-word vocabulary hits as Llama 3 does), its special tokens and chat template, as their releases ship them."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
    from tokenizers import Tokenizer as HFTokenizer

    d.mkdir(parents=True)
    if style == "llama3":
        specials, bos, eos = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                              "<|eot_id|>", "<|eom_id|>"], "<|begin_of_text|>", "<|eot_id|>"
    else:
        specials, bos, eos = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>"
    tok = HFTokenizer(models.BPE(ignore_merges=style == "llama3"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT if style == "llama3" else QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    corpus = TEXTS * 20 + ["The quick brown fox jumps over the lazy dog. " * 3, "Numbers 0123456789 " * 5]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    tok.save(str(d / "tokenizer.json"))
    template = LLAMA3_TEMPLATE if style == "llama3" else QWEN_TEMPLATE
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": bos, "eos_token": eos, "chat_template": template,
        "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}))
    return d


@pytest.mark.parametrize("style", ["llama3", "qwen"])
def test_tokenizer_ids_and_chat_template_equal_transformers(style, tmp_path):
    d = build_tokenizer(tmp_path / style, style)
    ours = Tokenizer(d)
    theirs = transformers.AutoTokenizer.from_pretrained(str(d))
    for text in TEXTS:
        assert ours.encode(text).tolist() == theirs(text)["input_ids"], text
        assert ours.decode(ours.encode(text, bos=False)) == text
    assert ours.add_bos == (style == "llama3")
    end = "<|eot_id|>" if style == "llama3" else "<|im_end|>"
    assert ours.token_to_id(end) in ours.stop_ids
    for gen in (True, False):
        assert ours.apply_chat_template(MESSAGES, add_generation_prompt=gen) == \
            theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen)
    if style == "llama3":  # Llama 3.1's date header: strftime_now, `is defined`
        ours.chat_template = theirs.chat_template = LLAMA31_DATE
        assert ours.apply_chat_template(MESSAGES[1:]) == \
            theirs.apply_chat_template(MESSAGES[1:], tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("style,pre", [("llama3", "llama-bpe"), ("qwen", "qwen2")])
def test_gguf_tokenizers_of_llama3_and_qwen_rebuild_the_same_ids(style, pre, tmp_path):
    """A GGUF carries the vocabulary, merges and pre-tokenizer kind; the rebuilt tokenizer.json encodes as the
    original does (what converting a Llama 3 or Qwen GGUF relies on)."""
    from lit_aligner.tokenizer import export_gguf_tokenizer

    d = build_tokenizer(tmp_path / style, style)
    spec = json.loads((d / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = {a["content"] for a in spec["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_eos_token_id(vocab["<|eot_id|>" if style == "llama3" else "<|im_end|>"])
    if style == "llama3":
        w.add_bos_token_id(vocab["<|begin_of_text|>"])
    w.add_tensor("dummy", np.zeros(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    export_gguf_tokenizer(gguf.GGUFReader(str(tmp_path / "t.gguf")), tmp_path / "rebuilt")
    original, rebuilt = Tokenizer(d), Tokenizer(tmp_path / "rebuilt")
    for text in TEXTS:
        assert rebuilt.encode(text).tolist() == original.encode(text).tolist(), text


# ---------------------------------------------------------------------------------------------------------------------
# End to end on one family: convert, train, generate


def test_a_qwen3_base_converts_trains_an_aligner_and_generates(tmp_path):

    hf = make_hf("qwen3-gqa-head-dim", vocab=400, context=512)  # the trained tokenizer's vocabulary
    hf.save_pretrained(tmp_path / "hf")
    build_tokenizer(tmp_path / "tok", "qwen")
    for f in (tmp_path / "tok").iterdir():
        (tmp_path / "hf" / f.name).write_bytes(f.read_bytes())
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    run = lambda *a: helpers.run_script(*a, env=env)  # noqa: E731
    r = run("scripts/convert_hf.py", tmp_path / "hf", "--out-dir", tmp_path / "base")
    assert r.returncode == 0, r.stderr
    r = run("finetune/aligner.py", "--checkpoint-dir", tmp_path / "base", "--out-dir", tmp_path / "run",
            "--max-steps", "3", "--global-batch-size", "4", "--micro-batch-size", "4", "--n-tokens", "2",
            "--max-seq-length", "256", "--eval-iters", "1", "--no-progress", "--compare", "False")
    assert r.returncode == 0, r.stderr
    _, meta = load_aligner(tmp_path / "run" / "aligner.safetensors")
    assert meta["template"] == "chat" and meta["base_model"] == "hf"  # the source folder names the model
    r = run("generate/aligner.py", "--checkpoint-dir", tmp_path / "base", "--aligner",
            tmp_path / "run" / "aligner.safetensors", "--no-aligner", "--prompt", "hi", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    assert "--- base ---" in r.stdout


def test_export_hf_writes_what_transformers_loads_with_the_same_logits(converted, tmp_path):
    """scripts/export_hf.py's export: our directory back to a Hugging Face one that transformers loads (every family:
    q/k/v split, biases, q/k norms, tied heads, rope scaling) with the source model's logits."""
    from lit_aligner.convert.export import export_hf

    family, hf, ours = converted
    export_hf(ours, tmp_path / "hf")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(again).__name__.lower().startswith(hf.config.model_type.replace("mistral", "llama"))
    diff = (hf_logits(again) - hf_logits(hf)).abs().max().item()
    assert diff <= 1e-5, (family, diff)
    with pytest.raises(ConvertError, match="already holds"):
        export_hf(ours, tmp_path / "hf")
    with pytest.raises(ConvertError, match="checkpoint itself"):
        export_hf(ours, ours, force=True)
