"""Structured outputs (`lit_aligner.generation.structured`) on both tokenizer backends: whatever the logits, a row
masked by its constraint decodes to text the grammar accepts, and ends where the grammar ends."""

import json
import re

import pytest
import torch

from helpers import bpe_tokenizer_dir, sp_tokenizer_dir
from lit_aligner.generation.structured import (OutputFormat, StructuredOutputError, compile_grammar, mask_logits,
                                               parse_response_format, parse_structured_outputs)
from lit_aligner.tokenizer import Tokenizer

pytest.importorskip("llguidance")
CORPUS = [f"The code ab{i} is {i * 7} and cd{i} says yes or no: {{\"name\": \"x{i}\", \"n\": {i}}}" for i in range(200)]


@pytest.fixture(scope="module", params=["bpe", "sentencepiece"])
def tok(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    return Tokenizer(bpe_tokenizer_dir(d, CORPUS, 400) if request.param == "bpe" else sp_tokenizer_dir(d, CORPUS, 300))


def decode_under(fmt: OutputFormat, tok, seed: int, vocab: int, steps: int = 80):
    """Random logits every step, masked by the constraint, greedy: (text, ended at the grammar's end)."""
    c = compile_grammar(fmt, tok, vocab).constraint()
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        t = int(mask_logits(torch.randn(1, vocab, generator=g), [c]).argmax())
        assert c.advance(t), c.error
        if t in tok.stop_ids or t == tok.eos_id:
            return tok.decode(out), True
        out.append(t)
        if c.done:
            return tok.decode(out), True
    return tok.decode(out), False


def test_random_logits_under_a_constraint_give_text_the_grammar_accepts(tok):
    vocab = tok.vocab_size + 7  # a padded embedding: the ids past the tokenizer are never allowed
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 999}},
              "required": ["name", "n"], "additionalProperties": False}
    for seed in range(4):
        text, ended = decode_under(OutputFormat("regex", r"(ab|cd)[0-9]{2}"), tok, seed, vocab)
        assert ended and re.fullmatch(r"(ab|cd)[0-9]{2}", text), text
        text, ended = decode_under(OutputFormat("choice", ["yes", "no", "yes or no"]), tok, seed, vocab)
        assert ended and text in ("yes", "no", "yes or no"), text
        text, ended = decode_under(OutputFormat("json_schema", schema), tok, seed, vocab, steps=200)
        value = json.loads(text)
        assert ended and set(value) == {"name", "n"} and len(value["name"]) <= 8 and 0 <= value["n"] <= 999, text
    # unconstrained, the same random logits are no such text
    g = torch.Generator().manual_seed(0)
    free = tok.decode([int(torch.randn(vocab, generator=g)[:tok.vocab_size].argmax()) for _ in range(6)])
    assert not re.fullmatch(r"(ab|cd)[0-9]{2}", free)


def test_bad_formats_are_one_clear_error(tok):
    for fmt, match in [(OutputFormat("regex", "[a-"), "regex cannot be compiled"),
                       (OutputFormat("json_schema", {"type": "nonsense"}), "json schema cannot be compiled"),
                       (OutputFormat("choice", []), "non-empty list"), (OutputFormat("grammar", ""), "Lark"),
                       (OutputFormat("xml"), "unknown structured output kind")]:
        with pytest.raises(StructuredOutputError, match=match) as e:
            compile_grammar(fmt, tok, tok.vocab_size)
        assert "\n" not in str(e.value)
    assert parse_response_format({"type": "text"}) is None
    assert parse_response_format({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer"}}}
                                 ) == OutputFormat("json_schema", {"type": "integer"})
    assert parse_structured_outputs({"json": '{"type": "string"}'}) == OutputFormat("json_schema", {"type": "string"})
    for bad in [{"type": "xml"}, {"type": "json_schema"}, "json"]:
        with pytest.raises(StructuredOutputError, match="response_format"):
            parse_response_format(bad)
    for bad in [{}, {"regex": "a", "choice": ["a"]}, {"json": "{not json"}]:
        with pytest.raises(StructuredOutputError, match="structured_outputs"):
            parse_structured_outputs(bad)


def test_generate_holds_each_row_to_its_grammar_and_leaves_free_rows_as_they_were(tiny_checkpoint_dir):
    """A batch mixing a JSON-schema row, a regex row and a free row (greedy and sampled) on the tiny random model,
    whose unconstrained text is no JSON: the constrained rows parse and end at their grammar's end, the free row is
    token for token what it is decoded without the others."""
    from lit_aligner.base import load_base
    from lit_aligner.generation import generate

    model, tok = load_base(tiny_checkpoint_dir, device="cpu")
    V = model.lm_head_weight.shape[0]
    schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["a"], "additionalProperties": False}
    js, rx = (compile_grammar(OutputFormat("json_schema", schema), tok, V),
              compile_grammar(OutputFormat("regex", "[0-9]{2}-[a-z]{1,3}"), tok, V))
    prompts = [tok.encode(p) for p in ("Give me JSON.", "A code:", "Tell me a story.")]
    for kw in ({}, {"temperature": 1.0, "generator": torch.Generator().manual_seed(1)}):
        out = generate(model, prompts, 100, stop_ids=tok.stop_ids, grammar=[js, rx, None], **kw)
        assert list(json.loads(tok.decode(out[0]))) == ["a"] and re.fullmatch("[0-9]{2}-[a-z]{1,3}", tok.decode(out[1]))
        if not kw:
            free = generate(model, prompts[2:], 100, stop_ids=tok.stop_ids)[0]
            assert torch.equal(out[2], free)
            with pytest.raises(json.JSONDecodeError):
                json.loads(tok.decode(generate(model, prompts[:1], 40, stop_ids=tok.stop_ids)[0]))


def test_generate_cli_structured_flags_and_their_errors(tiny_checkpoint_dir, tmp_path):
    import helpers

    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"n": {"type": "integer", "maximum": 999}},
                                  "required": ["n"], "additionalProperties": False}))
    out = tmp_path / "answers.jsonl"
    base = ["generate/aligner.py", "--checkpoint-dir", tiny_checkpoint_dir, "--no-aligner", "--max-new-tokens", "100"]
    p = helpers.run_script(*base, "--prompt", "one", "--prompt", "two", "--json-schema", schema, "--out", out)
    assert p.returncode == 0, p.stderr
    assert all(isinstance(json.loads(json.loads(line)["output"])["n"], int) for line in out.read_text().splitlines())
    p = helpers.run_script(*base, "--prompt", "pick", "--choice", "red", "--choice", "green blue")
    assert p.returncode == 0 and p.stdout.strip().splitlines()[-1] in ("red", "green blue"), p.stdout
    for flags, message in [(["--regex", "[a-"], "error: the regex cannot be compiled"),
                           (["--regex", "a", "--json-object"],
                            "error: give one structured-output flag, not --json-object and --regex"),
                           (["--json-schema", tmp_path / "none.json"], "none.json: no such file"),
                           (["--json-schema", "[1, 2]"], "error: --json-schema must be a JSON object"),
                           (["--json-schema", "{nope"], "error: --json-schema is neither a file nor valid JSON")]:
        p = helpers.run_script(*base, "--prompt", "x", *flags)
        assert p.returncode != 0 and message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
