"""Base-model conversion (lit_aligner.convert, scripts/convert_*.py): every source format gives a checkpoint whose
logits equal those of `transformers` running the same weights; the writer streams (bounded memory) and never leaves a
half-written file; bad input is one clear error.

The fixtures are one small random LLaMA (GQA; also tied) from `transformers`, written here as a Hugging Face folder
(safetensors / .bin, single / sharded), as Meta checkpoints (1 and 2 model-parallel shards) and as GGUF files in six
tensor types. Their q/k rows are permuted to the interleaved RoPE layout with llama.cpp's own formula, not ours."""

import ctypes
import gc
import json
import os
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import run_script
from lit_aligner.base import load_model
from lit_aligner.convert import ConvertError, convert_gguf, convert_hf, convert_meta
from lit_aligner.convert.writer import TensorSpec, safetensors_header, write_weights
from lit_aligner.tokenizer import Tokenizer

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
# Blocks of the GGUF quant types are 32 wide: every row length (n_embd, intermediate) is a multiple of 32.
N_EMBD, N_HEAD, N_KV, INTER, VOCAB, N_LAYER, ROPE_THETA = 64, 4, 2, 128, 256, 2, 50000.0
IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
GGUF_TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"]


# --- the source model and its files -----------------------------------------------------------------------------------


def make_hf_model(tie: bool):
    """A random LlamaForCausalLM with weights large enough that a wrong layout shows in the logits, and norms != 1."""
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=N_EMBD, intermediate_size=INTER, num_hidden_layers=N_LAYER,
        num_attention_heads=N_HEAD, num_key_value_heads=N_KV, max_position_embeddings=128, rms_norm_eps=1e-5,
        rope_theta=ROPE_THETA, tie_word_embeddings=tie)
    torch.manual_seed(1 + tie)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if p.dim() == 1 else 0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def untied():
    return make_hf_model(tie=False)


@pytest.fixture(scope="module")
def tied():
    return make_hf_model(tie=True)


def hf_logits(model, state=None):
    """Logits of the transformers model, optionally with other weights (HF names) loaded into a copy."""
    if state is not None:
        model = transformers.LlamaForCausalLM(model.config).eval()
        model.load_state_dict(state, strict=False)
        if model.config.tie_word_embeddings:
            model.tie_weights()
    with torch.no_grad():
        return model(IDS).logits


def our_logits(ckpt_dir):
    model = load_model(ckpt_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(IDS, aligner=False)


def assert_same_logits(ckpt_dir, ref):
    diff = (our_logits(ckpt_dir) - ref).abs().max().item()
    assert diff <= 1e-4, diff


def hf_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "rotary" not in k}


def write_byte_tokenizer(folder: Path) -> str:
    """A byte-level BPE tokenizer.json (no merges); returns a text whose ids the tests compare."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(folder / "tokenizer.json"))
    return "Hello, wörld"


def save_hf(model, folder: Path, fmt: str = "safetensors") -> Path:
    """fmt: "safetensors", "safetensors-sharded", "bin" (one pytorch_model.bin) or "bin-sharded" (two + index)."""
    folder.mkdir(parents=True)
    if fmt.startswith("safetensors"):
        model.save_pretrained(folder, max_shard_size="100KB" if fmt.endswith("sharded") else "5GB")
        return folder
    model.config.save_pretrained(folder)
    state = hf_state(model)
    if fmt == "bin":
        torch.save(state, folder / "pytorch_model.bin")
        return folder
    names = sorted(state)
    halves = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    for file, keys in halves.items():
        torch.save({k: state[k] for k in keys}, folder / file)
    weight_map = {k: file for file, keys in halves.items() for k in keys}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def llama_cpp_permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf.py `LlamaModel.permute`: HF (rotate-half) q/k rows -> interleaved pairs, the
    layout of Meta's and GGUF's weights."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


HF_TO_META = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
              "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
              "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3", "mlp.down_proj": "feed_forward.w2",
              "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}
# Meta's model-parallel split: dim 0 for column-parallel layers, dim 1 for row-parallel ones and the embedding.
META_SPLIT = {"attention.wq": 0, "attention.wk": 0, "attention.wv": 0, "feed_forward.w1": 0, "feed_forward.w3": 0,
              "output": 0, "attention.wo": 1, "feed_forward.w2": 1, "tok_embeddings": 1}


def meta_state(model):
    out = {}
    for name, t in hf_state(model).items():
        m = re.match(r"model\.layers\.(\d+)\.(.+)\.weight$", name)
        if m:
            ours = HF_TO_META[m.group(2)]
            if ours in ("attention.wq", "attention.wk"):
                t = llama_cpp_permute(t, N_HEAD if ours == "attention.wq" else N_KV)
            out[f"layers.{m.group(1)}.{ours}.weight"] = t
        else:
            out[{"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
                 "lm_head.weight": "output.weight"}[name]] = t
    out["rope.freqs"] = torch.ones(N_EMBD // N_HEAD // 2)  # LLaMA 1 files carry this unused buffer
    return out


def save_meta(model, folder: Path, n_shards: int) -> Path:
    folder.mkdir(parents=True)
    state = meta_state(model)
    for s in range(n_shards):
        shard = {}
        for name, t in state.items():
            dim = META_SPLIT.get(re.sub(r"^layers\.\d+\.", "", name).removesuffix(".weight"))
            # clone: torch.save of a view would store the whole tensor
            shard[name] = t.chunk(n_shards, dim)[s].clone() if dim is not None and t.dim() == 2 else t
        torch.save(shard, folder / f"consolidated.{s:02d}.pth")
    (folder / "params.json").write_text(json.dumps({
        "dim": N_EMBD, "n_layers": N_LAYER, "n_heads": N_HEAD, "n_kv_heads": N_KV, "vocab_size": -1,
        "multiple_of": 32, "ffn_dim_multiplier": 0.75, "norm_eps": 1e-5, "rope_theta": ROPE_THETA}))  # -> 128 FFN
    return folder


HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def qdq(w: torch.Tensor, qtype) -> torch.Tensor:
    """What a weight becomes after quantizing to qtype and back (rows are quantized independently)."""
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), qtype), qtype).copy())


def save_gguf(model, path: Path, type_name: str, arch: str = "llama", tokenizer: bool = False, raw=None) -> Path:
    """The model as llama.cpp writes it: q/k permuted, 2-D weights in `type_name`, norms in F32, no output.weight
    when tied. `raw`: {name: (array, GGMLQuantizationType)} overrides, for bad-input tests."""
    qtype = gguf.GGMLQuantizationType[type_name]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("Tiny Test Llama")
    w.add_context_length(128)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(INTER)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_KV)
    w.add_rope_freq_base(ROPE_THETA)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(N_EMBD // N_HEAD)
    w.add_vocab_size(VOCAB)
    if tokenizer:
        from tokenizers import pre_tokenizers

        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_list(sorted(pre_tokenizers.ByteLevel.alphabet()))
        w.add_token_types([1] * VOCAB)
        w.add_bos_token_id(0)
        w.add_eos_token_id(1)
    for name, t in hf_state(model).items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        m = re.match(r"model\.layers\.(\d+)\.(.+)\.weight$", name)
        if m:
            ours = HF_TO_GGUF[m.group(2)]
            gname = f"blk.{m.group(1)}.{ours}.weight"
            if ours in ("attn_q", "attn_k"):
                t = llama_cpp_permute(t, N_HEAD if ours == "attn_q" else N_KV)
        else:
            gname = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}[name]
        arr = t.numpy()
        if raw and gname in raw:
            w.add_tensor(gname, raw[gname][0], raw_dtype=raw[gname][1])
        elif t.dim() == 1 or qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(gname, arr.astype(np.float32))
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(gname, arr.astype(np.float16))
        else:
            w.add_tensor(gname, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# --- Hugging Face -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [False, True], ids=["gqa-untied", "gqa-tied"])
def test_hf_safetensors_logits_match_transformers(tie, untied, tied, tmp_path):
    model = tied if tie else untied
    src = save_hf(model, tmp_path / "Tiny-Llama-hf")
    text = write_byte_tokenizer(src)
    result = convert_hf(src, tmp_path / "out")
    assert result.config.name == "Tiny-Llama-hf"  # the folder's name
    assert result.config.tie_embeddings == tie and result.config.rope_base == ROPE_THETA
    assert_same_logits(tmp_path / "out", hf_logits(model))
    assert (tmp_path / "out/tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    from tokenizers import Tokenizer as HFTokenizer

    assert Tokenizer(tmp_path / "out").encode(text, bos=False).tolist() == \
        HFTokenizer.from_file(str(src / "tokenizer.json")).encode(text).ids


@pytest.mark.parametrize("fmt", ["safetensors-sharded", "bin", "bin-sharded"])
def test_hf_sharded_and_bin_sources_logits_match_transformers(fmt, untied, tmp_path):
    src = save_hf(untied, tmp_path / "src", fmt)
    result = convert_hf(src, tmp_path / "out", model_name="tiny-hf")
    assert result.config.name == "tiny-hf"
    assert any("tokenizer" in w for w in result.warnings)  # no tokenizer files: weights still convert, with a warning
    assert_same_logits(tmp_path / "out", hf_logits(untied))


def test_source_dtype_is_kept_unless_dtype_is_given(untied, tmp_path):
    src = tmp_path / "src"
    transformers.LlamaForCausalLM(untied.config).to(torch.bfloat16).save_pretrained(src)
    convert_hf(src, tmp_path / "kept")
    convert_hf(src, tmp_path / "f16", dtype=torch.float16)
    from safetensors import safe_open

    for folder, dtype in (("kept", torch.bfloat16), ("f16", torch.float16)):
        with safe_open(str(tmp_path / folder / "model.safetensors"), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {dtype}


def test_sharded_output_loads_and_a_reconversion_removes_stale_shards(untied, tmp_path):
    src = save_hf(untied, tmp_path / "src")
    out = tmp_path / "out"
    result = convert_hf(src, out, max_shard_bytes=40_000)
    assert len(result.files) > 2 and (out / "model.safetensors.index.json").is_file()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    data_sizes = [os.path.getsize(f) - 8 - int.from_bytes(f.read_bytes()[:8], "little") for f in result.files[:-1]]
    assert index["metadata"]["total_size"] == sum(data_sizes)
    largest = VOCAB * N_EMBD * 4  # a tensor larger than the limit gets a shard of its own
    assert all(size <= max(40_000, largest) for size in data_sizes)
    assert_same_logits(out, hf_logits(untied))
    with pytest.raises(ConvertError, match="already holds a converted model; pass --force"):
        convert_hf(src, out)  # a finished conversion is never replaced by accident
    convert_hf(src, out, force=True)  # now one file: the old shards and index must go, or the loader would read them
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]
    assert_same_logits(out, hf_logits(untied))


# --- Meta -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_shards", [1, 2])
def test_meta_logits_match_transformers(n_shards, untied, tmp_path):
    src = save_meta(untied, tmp_path / "llama" / "tiny-7b", n_shards)
    import sentencepiece as spm

    corpus = ["The quick brown fox jumps over the lazy dog.", "Hello world, 12345!"] * 20
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_prefix=str(tmp_path / "llama" / "tokenizer"),
                                   vocab_size=300, model_type="bpe", byte_fallback=True, minloglevel=2, num_threads=1,
                                   hard_vocab_limit=False)
    result = convert_meta(src, tmp_path / "out")
    c = result.config
    assert (c.name, c.vocab_size, c.intermediate_size, c.n_query_groups, c.rope_base) == \
        ("tiny-7b", VOCAB, INTER, N_KV, ROPE_THETA)
    assert_same_logits(tmp_path / "out", hf_logits(untied))
    # Meta keeps tokenizer.model next to the model folders: found there, and gets a LLaMA tokenizer_config
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "llama" / "tokenizer.model"))
    assert Tokenizer(tmp_path / "out").encode("Hello fox").tolist() == [sp.bos_id()] + sp.encode("Hello fox")


# --- GGUF -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("type_name", GGUF_TYPES)
def test_gguf_logits_match_transformers_on_the_same_rounded_weights(type_name, untied, tmp_path):
    path = save_gguf(untied, tmp_path / f"tiny.{type_name}.gguf", type_name)
    result = convert_gguf(path, tmp_path / "out")
    assert result.config.tie_embeddings is False and result.config.norm_eps == 1e-5
    qtype = gguf.GGMLQuantizationType[type_name]
    rounded = {k: qdq(v, qtype) if v.dim() == 2 else v for k, v in hf_state(untied).items()}
    ours = our_logits(tmp_path / "out")
    assert (ours - hf_logits(untied, rounded)).abs().max().item() <= 1e-4
    original = hf_logits(untied)
    rel = ((ours - original).norm() / original.norm()).item()
    if type_name == "F32":
        assert rel < 1e-6
    else:  # rounded weights: not the original model, but off from it in proportion to the rounding
        weight_error = max(((rounded[k] - v).norm() / v.norm()).item() for k, v in hf_state(untied).items())
        assert 1e-6 < rel < 5 * weight_error, (rel, weight_error)


def test_gguf_tied_without_output_weight_and_its_tokenizer(tied, tmp_path):
    path = save_gguf(tied, tmp_path / "tiny.gguf", "F32", tokenizer=True)
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(str(path)).tensors}
    result = convert_gguf(path, tmp_path / "out")
    assert result.config.tie_embeddings and result.warnings == []
    assert result.config.name == "Tiny-Test-Llama"  # no registry shape matches: general.name, slugged
    assert_same_logits(tmp_path / "out", hf_logits(tied))
    tok = Tokenizer(tmp_path / "out")
    text = "Hello, wörld"
    assert tok.decode(tok.encode(text, bos=False)) == text and len(tok.encode(text, bos=False)) == len(text.encode())


# --- the real default model -------------------------------------------------------------------------------------------


def test_smollm2_gguf_converts_to_a_model_that_answers_2_plus_2(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["name"] == "SmolLM2-135M-Instruct"
    assert (config["n_layer"], config["n_head"], config["n_query_groups"], config["n_embd"]) == (30, 9, 3, 576)
    assert config["tie_embeddings"] and config["vocab_size"] == 49152 and config["rope_base"] == 100000.0
    model, tok = load_model(smollm2_dir), Tokenizer(smollm2_dir)
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}]))
    prompt_len = len(ids)
    with torch.no_grad():
        for _ in range(16):  # greedy, the whole sequence each step: no KV cache involved
            next_id = model(ids[None], aligner=False)[0, -1].argmax()
            ids = torch.cat([ids, next_id[None]])
            if "4" in tok.decode(ids[prompt_len:]) or next_id.item() in tok.stop_ids:
                break
    assert "4" in tok.decode(ids[prompt_len:])


def test_gguf_model_name_of_smollm2_comes_from_the_registry():
    from lit_aligner.convert import gguf_source
    from lit_aligner.default_model import find_smollm2_gguf

    try:
        path = find_smollm2_gguf()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    config, _, _ = gguf_source(path)  # headers only: no tensor is read
    assert config.name == "SmolLM2-135M-Instruct"


# --- the streaming writer ---------------------------------------------------------------------------------------------


def test_streamed_safetensors_equal_what_safetensors_reads_back(tmp_path):
    from safetensors.torch import load_file

    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(6).to(torch.int64),
               "d": torch.randn(2, 3).half().t()}  # non-contiguous
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    assert len(safetensors_header(specs)) % 8 == 0
    write_weights(tmp_path, specs, iter(tensors.items()))
    back = load_file(str(tmp_path / "model.safetensors"))
    assert set(back) == set(tensors) and all(torch.equal(back[k], v) for k, v in tensors.items())


def test_a_failed_write_leaves_no_file_under_the_final_name(tmp_path):
    specs = [TensorSpec("a", (4,), torch.float32), TensorSpec("b", (4,), torch.float32)]

    def tensors():
        yield "a", torch.zeros(4)
        raise KeyboardInterrupt  # a crash half way

    with pytest.raises(KeyboardInterrupt):
        write_weights(tmp_path, specs, tensors())
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="expected b"):
        write_weights(tmp_path, specs, iter([("a", torch.zeros(4)), ("c", torch.zeros(4))]))
    assert list(tmp_path.iterdir()) == []


def _rss_anon_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc to read memory use")
def test_conversion_memory_stays_far_below_the_model_size(tmp_path):
    """A 340 MB checkpoint converts with a few tensors' worth of memory (plus allocator slack), not the model's.
    Anonymous RSS is what counts: pages of the memory-mapped source and of the written file are page cache, which the
    kernel reclaims."""
    n_embd, inter, vocab, n_layer = 1024, 2816, 4096, 6
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=n_embd, intermediate_size=inter,
                                   num_hidden_layers=n_layer, num_attention_heads=8, num_key_value_heads=8)
    src = tmp_path / "src"
    src.mkdir()
    cfg.save_pretrained(src)
    shapes = {"model.embed_tokens.weight": (vocab, n_embd), "model.norm.weight": (n_embd,),
              "lm_head.weight": (vocab, n_embd)}
    for i in range(n_layer):
        p = f"model.layers.{i}."
        shapes.update({p + f"self_attn.{x}_proj.weight": (n_embd, n_embd) for x in "qkvo"})
        shapes.update({p + "mlp.gate_proj.weight": (inter, n_embd), p + "mlp.up_proj.weight": (inter, n_embd),
                       p + "mlp.down_proj.weight": (n_embd, inter), p + "input_layernorm.weight": (n_embd,),
                       p + "post_attention_layernorm.weight": (n_embd,)})
    # Written with our own writer, from small random tensors, so the fixture never needs the model in memory either.
    specs = [TensorSpec(k, s, torch.float32) for k, s in shapes.items()]
    g = torch.Generator().manual_seed(0)
    write_weights(src, specs, ((k, torch.randn(s, generator=g)) for k, s in shapes.items()))
    size = (src / "model.safetensors").stat().st_size
    assert size > 300e6

    def peak_growth(fn) -> int:
        # Memory freed earlier but kept by malloc would hide growth: hand it back to the OS first.
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        baseline, peak, stop = _rss_anon_bytes(), [0], threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], _rss_anon_bytes())
                time.sleep(0.001)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            fn()
        finally:
            stop.set()
            sampler.join()
        return peak[0] - baseline

    growth = peak_growth(lambda: convert_hf(src, tmp_path / "out"))
    assert (tmp_path / "out/model.safetensors").stat().st_size > 300e6
    assert growth < 0.25 * size, f"peak anonymous memory grew {growth / 1e6:.0f} MB converting {size / 1e6:.0f} MB"
    # The measurement itself: holding the whole model in memory does show up.
    from safetensors.torch import load_file

    assert peak_growth(lambda: [t.clone() for t in load_file(str(src / "model.safetensors")).values()]) > 0.8 * size


# --- bad input --------------------------------------------------------------------------------------------------------


def test_missing_and_wrong_folders_are_clear_errors(untied, tmp_path):
    with pytest.raises(ConvertError, match="no such directory"):
        convert_hf(tmp_path / "nope", tmp_path / "out")
    meta = save_meta(untied, tmp_path / "meta", 1)
    with pytest.raises(ConvertError, match="config.json is missing.*convert_meta.py"):
        convert_hf(meta, tmp_path / "out")
    hf = save_hf(untied, tmp_path / "hf")
    with pytest.raises(ConvertError, match="params.json is missing.*convert_hf.py"):
        convert_meta(hf, tmp_path / "out")
    with pytest.raises(ConvertError, match="source folder"):
        convert_hf(hf, hf)
    (meta / "consolidated.00.pth").write_text('{"not": "a checkpoint"}\n')
    with pytest.raises(ConvertError, match=r"consolidated\.00\.pth: not a readable PyTorch checkpoint"):
        convert_meta(meta, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written on failure


def test_hf_weights_of_another_shape_are_refused_before_writing(untied, tmp_path):
    src = save_hf(untied, tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    with pytest.raises(ConvertError, match="wrong shapes"):
        convert_hf(src, tmp_path / "out")
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ConvertError, match="model_type 'gpt2' is not supported"):
        convert_hf(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_gguf_files_are_clear_errors(untied, tmp_path):
    with pytest.raises(ConvertError, match="no such GGUF file"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    text = tmp_path / "notes.gguf"
    text.write_text("hello\n" * 10)
    with pytest.raises(ConvertError, match="notes.gguf: not a GGUF file .it does not start with the GGUF magic"):
        convert_gguf(text, tmp_path / "out")
    whole = save_gguf(untied, tmp_path / "whole.gguf", "F32").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(whole[:len(whole) // 2])  # a download that stopped halfway
    with pytest.raises(ConvertError, match="cut.gguf: a damaged GGUF file.*download it again"):
        convert_gguf(tmp_path / "cut.gguf", tmp_path / "out")
    other = save_gguf(untied, tmp_path / "gpt2.gguf", "F32", arch="gpt2")
    with pytest.raises(ConvertError, match="architecture 'gpt2' is not supported"):
        convert_gguf(other, tmp_path / "out")
    int8 = np.zeros((VOCAB, N_EMBD), dtype=np.int8)
    unsupported = save_gguf(untied, tmp_path / "i8.gguf", "F32",
                            raw={"token_embd.weight": (int8, gguf.GGMLQuantizationType.I8)})
    with pytest.raises(ConvertError, match="I8 cannot be dequantized"):
        convert_gguf(unsupported, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- the CLIs ---------------------------------------------------------------------------------------------------------


def test_convert_hf_cli_writes_a_checkpoint(untied, tmp_path):
    src = save_hf(untied, tmp_path / "src")
    r = run_script("scripts/convert_hf.py", str(src), "--out-dir", str(tmp_path / "out"), "--dtype", "bfloat16")
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "warning:" in r.stderr  # no tokenizer files in this source
    model = load_model(tmp_path / "out")
    assert model.tok_embeddings.weight.dtype == torch.bfloat16
    with torch.no_grad():
        diff = (model(IDS, aligner=False).float() - hf_logits(untied)).abs().max().item()
    assert diff < 0.1  # bf16 rounding only


def test_cli_errors_are_one_line_without_traceback(untied, tmp_path):
    hf = save_hf(untied, tmp_path / "hf")
    r = run_script("scripts/convert_meta.py", str(hf), "--out-dir", str(tmp_path / "out"))
    assert r.returncode == 1 and r.stderr.splitlines()[-1].startswith("error:") and "params.json" in r.stderr
    assert "Traceback" not in r.stderr
